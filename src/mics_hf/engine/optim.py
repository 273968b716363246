"""What an optimizer step needs to know about shards: the global gradient norm and a shard-aware loss scaler."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .clipping import global_grad_norm
from .shard import get_state

__all__ = ["clip_grad_norm_", "grad_scaler", "sharded_grad_scaler"]


def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Clip the shard gradients so the norm of the *whole* model's gradient is at most max_norm; return that norm.

    Each partition group holds exactly one copy of every gradient element (after hop 2 all replicas agree), so
    summing the local |g|^q over the partition group gives the global norm without touching other groups.
    Call it after the backward that synchronised (outside no_sync()), as with torch's clip_grad_norm_.
    """
    state = get_state(model)
    grads = [sp.sharded.grad for _, g in state.units for sp in g.params if sp.sharded.grad is not None]
    pg = state.units[-1][1].groups.partition.pg
    # accumulate in the master dtype: float32, or float64 for a float64 model
    total = global_grad_norm(grads, norm_type, pg, state.root_unit.device, state.policy.master_dtype)
    clip = float(max_norm) / (total + 1e-6)
    if grads:
        torch._foreach_mul_(grads, torch.clamp(clip, max=1.0))
    return total


def grad_scaler(model: nn.Module, *, init_scale: float = 2.0**16, growth_interval: int = 2000, enabled: bool = True):
    """A dynamic loss scaler for fp16 whose inf/nan decision is agreed by all ranks (all skip the same steps).

    Shards hold different slices of the gradient, so an overflow is seen by some ranks only; the FSDP
    ShardedGradScaler all-reduces its found-inf flag across the world, which is exactly what MiCS shards need.
    """
    return sharded_grad_scaler(
        get_state(model).root_unit.device.type, init_scale=init_scale, growth_interval=growth_interval, enabled=enabled
    )


def sharded_grad_scaler(device: str, **kwargs):
    """The scaler behind grad_scaler(), for callers that have a device but no model yet (e.g. Accelerate)."""
    if dist.is_available() and dist.is_initialized():
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device=device, **kwargs)
    return torch.amp.GradScaler(device, **kwargs)
