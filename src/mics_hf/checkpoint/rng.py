"""Every RNG a training step may draw from (torch CPU and CUDA, Python, NumPy) as tensors.

Checkpoints store them with safetensors, so an exact resume never needs to unpickle anything.
"""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["capture_rng", "restore_rng"]


def capture_rng() -> dict[str, torch.Tensor]:
    """torch (CPU and CUDA), Python and NumPy RNG states as tensors, so no pickle is needed to restore them."""
    import random

    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss = random.getstate()
    rng["python"] = torch.tensor([version, *internal, -1 if gauss is None else 1], dtype=torch.int64)
    rng["python_gauss"] = torch.tensor([0.0 if gauss is None else gauss], dtype=torch.float64)
    try:
        import numpy as np

        _, keys, pos, has_gauss, cached = np.random.get_state()
        rng["numpy"] = torch.tensor([*keys.tolist(), pos, has_gauss], dtype=torch.int64)
        rng["numpy_gauss"] = torch.tensor([cached], dtype=torch.float64)
    except ImportError:
        pass
    return rng


def restore_rng(rng: Mapping[str, torch.Tensor]) -> None:
    import random

    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    if "python" in rng:
        values = rng["python"].tolist()
        gauss = None if values[-1] == -1 else rng["python_gauss"].item()
        random.setstate((values[0], tuple(values[1:-1]), gauss))
    if "numpy" in rng:
        import numpy as np

        values = rng["numpy"].tolist()
        np.random.set_state(("MT19937", np.array(values[:-2], dtype=np.uint32), values[-2], values[-1], rng["numpy_gauss"].item()))
