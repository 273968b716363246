"""Checkpoints: the on-disk format and its validation (format), save, load (resharding), export, RNG, full
state dicts. Imports the engine; the engine never imports this package."""

from . import hf_save  # noqa: F401  (gives sharded models a save_pretrained that writes full weights)
from .export import consolidate_checkpoint, export_checkpoint, save_pretrained
from .format import CheckpointError, latest_checkpoint, read_metadata
from .load import load_checkpoint, restore_rng_state
from .save import save_checkpoint
from .state_dict import full_state_dict

__all__ = [
    "CheckpointError",
    "latest_checkpoint",
    "read_metadata",
    "save_checkpoint",
    "load_checkpoint",
    "restore_rng_state",
    "save_pretrained",
    "export_checkpoint",
    "consolidate_checkpoint",
    "full_state_dict",
]
