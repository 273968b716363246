"""Every RNG a training step may draw from (torch CPU and CUDA, Python, NumPy) as tensors.

Checkpoints store them with safetensors, so an exact resume never needs to unpickle anything.
"""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["capture_rng", "restore_rng", "check_rng"]

# key -> (dtype, length or None for "as long as this machine's state")
_LAYOUT: dict[str, tuple[torch.dtype, int | None]] = {
    "cpu": (torch.uint8, None),
    "cuda": (torch.uint8, None),
    "python": (torch.int64, 627),  # version, 624 words and the position, gauss flag
    "python_gauss": (torch.float64, 1),
    "numpy": (torch.int64, 626),  # 624 keys, position, has_gauss
    "numpy_gauss": (torch.float64, 1),
}


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


def check_rng(rng: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse RNG states that `restore_rng` would reject or misread, before anything is restored.

    Checks the keys, dtypes and lengths, then restores them once and puts the current states back (a dry run:
    torch, Python and NumPy validate their own states), so a bad file is an error while nothing has changed.
    """
    from .files import CheckpointError

    unknown = sorted(set(rng) - set(_LAYOUT))
    if unknown or "cpu" not in rng:
        raise CheckpointError(f"{where} holds RNG streams {sorted(rng)[:8]}, expected 'cpu' and some of {list(_LAYOUT)}")
    for key, value in rng.items():
        dtype, length = _LAYOUT[key]
        if key == "cpu":
            length = torch.get_rng_state().numel()
        if value.dtype != dtype or value.dim() != 1 or (length is not None and value.numel() != length):
            raise CheckpointError(
                f"{where}: RNG stream {key!r} is {str(value.dtype).removeprefix('torch.')} {list(value.shape)}, expected "
                f"{str(dtype).removeprefix('torch.')} [{length if length is not None else 'n'}]; the file is corrupted"
            )
    for key in ("python", "numpy"):
        if key in rng and f"{key}_gauss" not in rng:
            raise CheckpointError(f"{where}: RNG stream {key!r} comes without {key + '_gauss'!r}; the file is corrupted")
    current = capture_rng()
    try:
        restore_rng(rng)
    except Exception as exc:
        raise CheckpointError(f"{where}: the RNG states are invalid ({type(exc).__name__}: {str(exc)[:200]}); the file is corrupted") from None
    finally:
        restore_rng(current)


def restore_rng(rng: Mapping[str, torch.Tensor]) -> None:
    """Set every RNG from `capture_rng`'s tensors (validate them with `check_rng` first)."""
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
