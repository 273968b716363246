"""Full (unsharded) state dicts from a sharded model, with the same keys as the unsharded model."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..engine.collectives import _all_gather_tensor
from ..engine.shard import get_state
from ..engine.unit import ShardedParam

__all__ = ["full_state_dict", "gather_full_param"]


def gather_full_param(
    sp: ShardedParam, partition_pg: dist.ProcessGroup | None, p: int, local: torch.Tensor | None = None
) -> torch.Tensor:
    """All-gather one parameter's master shards (or `local`, a tensor shaped like the shard, e.g. its gradient)
    inside the partition group; every rank of the group gets the full tensor."""
    local = sp.sharded if local is None else local
    padded = torch.zeros(sp.padded_len, dtype=sp.sharded.dtype, device=sp.sharded.device)
    padded[: sp.local_numel].copy_(local.detach().reshape(-1))
    if partition_pg is None:
        full = padded
    else:
        full = torch.empty(p * sp.padded_len, dtype=padded.dtype, device=padded.device)
        _all_gather_tensor(full, padded, group=partition_pg)
    return full[: sp.global_shape.numel()].view(sp.global_shape)


def full_state_dict(
    model: nn.Module, *, rank0_only: bool = True, cpu: bool = True, keys: "set[str] | None" = None
) -> dict[str, torch.Tensor]:
    """Gather every parameter to full size; rank 0 gets {key: tensor} (all ranks if rank0_only=False), others {}.

    Keys are those of the unsharded model's state_dict, values fp32 parameters and the model's own buffers. Tied
    weights are one tensor under each of their keys, as in the unsharded model: `save_pretrained` and
    `torch.save` keep them tied, while safetensors' `save_file` refuses shared tensors (drop the tied key or
    clone first). Every rank must call it: each partition group gathers in
    parallel. `keys` (the same on every rank) gathers only those entries, e.g. a PEFT adapter's.
    """
    state = get_state(model)
    state.reshard_all()  # modules must refer to the shards (a forward without backward leaves the root gathered)
    keep = not rank0_only or state.topology.rank == 0
    by_id: dict[int, tuple[ShardedParam, object]] = {}
    for _, g in state.units:
        for sp in g.params:
            by_id[id(sp.sharded)] = (sp, g.groups.partition.pg)
    copies: dict[int, torch.Tensor] = {}  # tied weights stay one tensor under each of their keys
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if keys is not None and key not in keys:
            continue
        if id(value) not in copies:
            if id(value) in by_id:
                sp, pg = by_id[id(value)]
                tensor = gather_full_param(sp, pg, state.topology.partition_size)
            else:
                tensor = value.detach()
            copies[id(value)] = (tensor.cpu().clone() if cpu else tensor.clone()) if keep else tensor
        if keep:
            out[key] = copies[id(value)]
    return out
