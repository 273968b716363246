"""`model.save_pretrained(dir)` on a sharded model writes full weights, as it does unsharded.

A sharded model's parameters are its local shards, so the model's own `save_pretrained` (directly, or through
`accelerator.unwrap_model(model)`) would write shard-sized tensors that no loader accepts. The replacement
installed on every sharded model with a `save_pretrained` gathers the full tensors (every rank takes part)
and lets the model's own method write them on global rank 0 when `is_main_process` allows:
- a `state_dict=` of full tensors (e.g. `accelerator.get_state_dict(model)`) is written as given, no gather;
  one holding shards (`model.state_dict()`) is refused, naming what to pass instead;
- a PEFT model gathers and writes only its adapter, the PEFT way (`mics_hf.save_pretrained` exports the
  merged model instead);
- a call made on some ranks only (under `if accelerator.is_main_process:`) would leave the gather waiting
  forever: the ranks first meet in the process group's store, and a rank that waits longer than
  JOIN_TIMEOUT_S raises an error saying to call it on every rank.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..engine.hooks import TrainingState
from ..engine.shard import get_state, original_method, register_model_method
from .format import CheckpointError
from .state_dict import full_state_dict

__all__ = ["JOIN_TIMEOUT_S", "is_peft_model", "adapter_keys"]

JOIN_TIMEOUT_S = 300.0  # how long a rank waits for the others to call save_pretrained too
_calls = [0]  # calls made by this process: every rank makes the same calls in the same order


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def adapter_keys(model: nn.Module) -> set[str]:
    """The state-dict keys PEFT's save_pretrained writes for the active adapter(s), found by running PEFT's own
    selection on the (local) state dict and matching the tensors it returns."""
    from peft.utils import get_peft_model_state_dict

    local = model.state_dict(keep_vars=True)
    by_id: dict[int, list[str]] = {}
    for key, value in local.items():
        by_id.setdefault(id(value), []).append(key)
    keys: set[str] = set()
    for name in getattr(model, "active_adapters", None) or ["default"]:
        for value in get_peft_model_state_dict(model, state_dict=local, adapter_name=name).values():
            keys.update(by_id.get(id(value), []))
    return keys


def _join(model: nn.Module, what: str) -> None:
    """Meet every rank in the default store before a collective that a rank-0-only call would hang in."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    try:
        store = dist.distributed_c10d._get_default_store()
    except Exception:  # no store to meet in (a custom init): the gather itself is the meeting point
        return
    _calls[0] += 1
    key = f"mics_hf/{what}/{_calls[0]}"
    world = dist.get_world_size()
    arrived = store.add(key, 1)
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while arrived < world:
        if time.monotonic() > deadline:
            raise CheckpointError(
                f"{what} of a MiCS-sharded model gathers the weights from every rank, but only {arrived} of {world} "
                f"ranks called it within {JOIN_TIMEOUT_S:.0f} s: call it on every rank (is_main_process=... decides "
                "who writes), not under `if accelerator.is_main_process:` / `if rank == 0:`"
            )
        time.sleep(0.05)
        arrived = store.add(key, 0)


def _check_given(model: nn.Module, state_dict: dict[str, Any]) -> None:
    """Refuse a state dict that holds local shards instead of full tensors."""
    state = get_state(model)
    shapes = {id(sp.sharded): sp for _, u in state.units for sp in u.params}
    local = model.state_dict(keep_vars=True)
    for key, value in state_dict.items():
        sp = shapes.get(id(local.get(key)))
        if sp is not None and isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(sp.global_shape):
            raise CheckpointError(
                f"state_dict[{key!r}] has shape {tuple(value.shape)}, a local shard of the full {tuple(sp.global_shape)}: "
                "pass state_dict=accelerator.get_state_dict(model) or mics_hf.full_state_dict(model), or no "
                "state_dict at all (the sharded model then gathers its full weights itself)"
            )


def _save_pretrained(self: nn.Module, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
    own = original_method(self, "save_pretrained")
    state = get_state(self)
    # Global rank 0 writes, when the caller's is_main_process allows: the others hold at most empty
    # dictionaries from a gather (accelerator.get_state_dict gives them {}), which must never reach the disk.
    writer = state.topology.rank == 0 and bool(kwargs.get("is_main_process", True))
    if kwargs.get("state_dict") is not None:
        _check_given(self, kwargs["state_dict"])
        return own(save_directory, *args, **kwargs) if writer else None
    if state.training_state is not TrainingState.IDLE:
        raise CheckpointError("save_pretrained was called in the middle of a forward/backward; call it between steps")
    _join(self, "save_pretrained")
    keys = adapter_keys(self) if is_peft_model(self) else None
    full = full_state_dict(self, keys=keys)  # every rank gathers; global rank 0 keeps the full tensors
    return own(save_directory, *args, **{**kwargs, "state_dict": full}) if writer else None


register_model_method("save_pretrained", _save_pretrained)
