"""An optimizer built before ``shard_model`` is an error at its first step, not a step that updates nothing.

[Note: an optimizer built before sharding]
``shard_model`` replaces every parameter with a new tensor, the local shard (as FSDP2's ``fully_shard`` does).
An optimizer constructed earlier still holds the old parameters: they never receive a gradient again, so
``optimizer.step()`` would silently leave the model unchanged, step after step. DDP users are used to building
the optimizer first, so this is the easy mistake. ``shard_model`` already records, per model, which shard
replaced which parameter (``MiCSState.replaced``, what ``MiCSAccelerator.prepare`` uses to re-point an optimizer);
it registers the model's state here (weakly) and one global optimizer pre-step hook
(``torch.optim.optimizer.register_optimizer_step_pre_hook``, torch's own extension point): the first ``step()``
of each optimizer looks its parameters up once and raises, naming the parameter and the fix, if it holds any
replaced one. Later steps of a checked optimizer cost one set lookup.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

__all__ = ["register_sharded"]

_STATES: weakref.WeakSet = weakref.WeakSet()  # the MiCSState of every sharded model alive
_CHECKED: weakref.WeakSet = weakref.WeakSet()  # optimizers already found clean
_HOOK: list = []  # the one registered hook handle


def register_sharded(state: Any) -> None:
    """Watch for optimizers holding the parameters `state`'s model had before sharding (`state.replaced`)."""
    _STATES.add(state)
    if not _HOOK:
        _HOOK.append(register_optimizer_step_pre_hook(_check_first_step))


def _replaced_name(p: torch.Tensor) -> str | None:
    for state in list(_STATES):
        entry = state.replaced.get(id(p))
        if entry is not None and entry[0]() is p:
            return entry[2]
    return None


def _check_first_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if optimizer in _CHECKED:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = _replaced_name(p)
            if name is not None:
                raise RuntimeError(
                    f"this {type(optimizer).__name__} holds parameter {name!r} as it was before "
                    "mics_hf.shard_model replaced it with its local shard, so its step() would update nothing. "
                    "Build the optimizer after shard_model, on model.parameters() (the shards), as with FSDP2"
                )
    _CHECKED.add(optimizer)
