"""An optimizer built before ``shard_model`` is an error at its first step, not a step that updates nothing.

[Note: an optimizer built before sharding]
``shard_model`` replaces every parameter with a new tensor, the local shard (as FSDP2's ``fully_shard`` does).
An optimizer constructed earlier still holds the old parameters: they never receive a gradient again, so
``optimizer.step()`` would silently leave the model unchanged, step after step. DDP users are used to building
the optimizer first, so this is the easy mistake. ``shard_model`` records the replaced parameters (weakly, with
their names) and registers one global optimizer pre-step hook (``torch.optim.optimizer.
register_optimizer_step_pre_hook``, torch's own extension point): the first ``step()`` of each optimizer looks
its parameters up once and raises, naming the parameter and the fix, if it holds any replaced one. Later steps
of a checked optimizer cost one set lookup. ``MiCSAccelerator.prepare`` swaps the parameters of an optimizer
prepared with the model, so that order still works there.
"""

from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["register_replaced"]

_NAME_OF_REPLACED: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter before sharding -> its name
_CHECKED: weakref.WeakSet = weakref.WeakSet()  # optimizers already found clean
_HOOK: list = []  # the one registered hook handle


def register_replaced(named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Record the parameters ``shard_model`` replaced, and make sure the step hook is registered."""
    for name, original in named:
        _NAME_OF_REPLACED[original] = name
    if not _HOOK:
        _HOOK.append(register_optimizer_step_pre_hook(_check_first_step))


def _check_first_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if optimizer in _CHECKED:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = _NAME_OF_REPLACED.get(p)
            if name is not None:
                raise RuntimeError(
                    f"this {type(optimizer).__name__} holds parameter {name!r} as it was before "
                    "mics_hf.shard_model replaced it with its local shard, so its step() would update nothing. "
                    "Build the optimizer after shard_model, on model.parameters() (the shards), as with FSDP2"
                )
    _CHECKED.add(optimizer)
