"""mics_hf: MiCS (scale-aware partitioning, hierarchical collectives, two-hop gradient sync) for PyTorch and HF."""

from .checkpoint import (
    CheckpointError,
    consolidate_checkpoint,
    export_checkpoint,
    full_state_dict,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_pretrained,
)
from .config import MiCSConfig, MixedPrecisionPolicy
from .engine.collectives import CollectiveError, CommStats
from .engine.optim import clip_grad_norm_, grad_scaler
from .engine.shard import MiCSModule, is_sharded, shard_model
from .engine.stats import comm_stats, topology_of
from .engine.teardown import close_process_group

__all__ = [
    "MiCSConfig",
    "MixedPrecisionPolicy",
    "CommStats",
    "CollectiveError",
    "MiCSModule",
    "shard_model",
    "is_sharded",
    "clip_grad_norm_",
    "grad_scaler",
    "full_state_dict",
    "comm_stats",
    "topology_of",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "CheckpointError",
    "save_pretrained",
    "export_checkpoint",
    "consolidate_checkpoint",
    "close_process_group",
    "MiCSAccelerator",
    "MiCSTrainingArguments",
    "MiCSTrainer",
    "from_pretrained",
    "defer_from_pretrained",
    "shard_pretrained",
]

__version__ = "0.1.0"

_INTEGRATIONS = {
    "MiCSAccelerator": ("mics_hf.integrations.accelerate", "MiCSAccelerator"),
    "MiCSTrainingArguments": ("mics_hf.integrations.trainer", "MiCSTrainingArguments"),
    "MiCSTrainer": ("mics_hf.integrations.trainer", "MiCSTrainer"),
    "from_pretrained": ("mics_hf.integrations.pretrained", "from_pretrained"),
    "defer_from_pretrained": ("mics_hf.integrations.pretrained", "defer_from_pretrained"),
    "shard_pretrained": ("mics_hf.integrations.pretrained", "shard_pretrained"),
}


def __getattr__(name: str):
    # The integrations import accelerate / transformers; the core never does, so they load on first use.
    if name in _INTEGRATIONS:
        import importlib

        module, attr = _INTEGRATIONS[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'mics_hf' has no attribute {name!r}")
