"""`generate()` on a sharded model: ranks decode in lockstep, and units stay gathered for the whole call.

Every forward of a sharded model (p > 1) all-gathers each unit inside the partition group, so all ranks must
run the same number of forwards. Sequences stop at different lengths on different ranks, so transformers'
`synced_gpus` (which it turns on for DeepSpeed ZeRO-3 and FSDP only) is turned on here too: a rank that has
finished keeps running dummy forwards until every rank has. Without it the first rank to finish leaves the
others waiting in an all-gather until the process group's timeout.

Decoding runs one forward per token; regathering every unit at every step would send the whole model over
the network per token. When the gathered model fits in half of the free memory, units are gathered once
and kept until the call returns (`mics_keep_gathered=False` / `True` decides explicitly).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn as nn

from .shard import get_state, original_method, register_model_method

__all__ = ["gathered_bytes", "free_bytes"]


def gathered_bytes(model: nn.Module) -> int:
    state = get_state(model)
    return sum(sp.padded.numel() * sp.padded.element_size() for _, u in state.units for sp in u.params if not sp.aliased)


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def _generate(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state = get_state(self)
    keep = kwargs.pop("mics_keep_gathered", None)
    topology = state.topology
    if kwargs.get("synced_gpus") is None and topology.world_size > 1 and topology.partition_size > 1:
        kwargs["synced_gpus"] = True
    if keep is None:
        device = state.root_unit.device
        keep = gathered_bytes(self) <= free_bytes(device) // 2
    previous = state.keep_gathered
    state.keep_gathered = bool(keep)
    try:
        # The root unit (embeddings, final norm, head) is gathered by the hook on the sharded model's forward. A
        # wrapper's generate may run the wrapped model's forward instead (PEFT's PeftModel calls
        # base_model.generate), which never passes that hook: gather the root for the whole call here.
        state.root_unit.wait_unshard()
        return original_method(self, "generate")(*args, **kwargs)
    finally:
        state.keep_gathered = previous
        state.reshard_all()


register_model_method("generate", _generate)
