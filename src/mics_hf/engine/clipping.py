"""Gradient norms of sharded parameters, and ``torch.nn.utils.clip_grad_norm_`` made correct on them.

[Note: torch's clip_grad_norm_ on MiCS shards]
A MiCS model's parameters are plain tensors holding 1/p of each weight, so ``torch.nn.utils.clip_grad_norm_``
(what PyTorch's own examples, Lightning, timm and a plain ``accelerate.Accelerator`` call) would compute each
rank's *local* norm and scale each shard by a different factor: a silently wrong gradient, the replicas of a
weight no longer one model. FSDP2 avoids this because its parameters are DTensors whose norm all-reduces. Here
``shard_model`` registers its shards with their partition group (p > 1 only; at p = 1 every rank holds whole
tensors and torch's own function is right) and wraps ``torch.nn.utils.clip_grad_norm_`` once: for parameters
that are none of ours it calls torch's function unchanged; for shards split over one partition group (of one
model, or of several models with the same layout, which share their groups) it sums the local |g|^q over that
group (each group holds exactly one copy of every element, replicas agree after hop 2), then scales with
torch's own ``clip_grads_with_norm_``; a mix of shards and other tensors, or of shards over different groups,
is an error naming ``mics_hf.clip_grad_norm_``. A name bound
by ``from torch.nn.utils import clip_grad_norm_`` before the first ``shard_model`` still points at torch's
function: README says to call it through ``torch.nn.utils`` (as PyTorch's examples do) or to use
``mics_hf.clip_grad_norm_``.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn.utils
import torch.nn.utils.clip_grad
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["global_grad_norm", "register_shards"]

# shard parameter -> the partition process group its gradient is split over (weak: a dropped model is forgotten)
_GROUP_OF: WeakIdKeyDictionary = WeakIdKeyDictionary()


def global_grad_norm(grads: list[torch.Tensor], norm_type: float, pg: dist.ProcessGroup | None,
                     device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The norm of the whole gradient whose pieces ``grads`` this rank holds, ``pg`` holding the other pieces."""
    norm_type = float(norm_type)
    if norm_type == math.inf:
        local = max((g.detach().abs().max() for g in grads if g.numel()), default=torch.zeros((), device=device))
        total = local.to(device=device, dtype=dtype).clone()
        op = dist.ReduceOp.MAX
    else:
        total = sum((g.detach().to(dtype).norm(norm_type) ** norm_type for g in grads if g.numel()),
                    torch.zeros((), device=device, dtype=dtype))
        op = dist.ReduceOp.SUM
    if pg is not None:
        dist.all_reduce(total, op=op, group=pg)
    return total if norm_type == math.inf else total ** (1.0 / norm_type)


def register_shards(params: Iterable[torch.Tensor], pg: dist.ProcessGroup | None) -> None:
    """Record that ``params`` are shards split over ``pg``, and route torch's clip_grad_norm_ through here."""
    if pg is None:  # p = 1: whole tensors on every rank, torch's own norm is the global one
        return
    for p in params:
        _GROUP_OF[p] = pg
    _install()


def _install() -> None:
    if getattr(torch.nn.utils.clip_grad_norm_, "_mics_wraps", None) is not None:
        return
    original = torch.nn.utils.clip_grad.clip_grad_norm_

    @functools.wraps(original)
    def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        foreach: bool | None = None) -> torch.Tensor:
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        found = [_GROUP_OF.get(p) for p in params]
        ours = {id(pg): pg for pg in found if pg is not None}
        if not ours:
            return original(params, max_norm, norm_type, error_if_nonfinite, foreach)
        if len(ours) > 1 or None in found:
            what = ("shards split over a different partition group (another MiCS model's layout)" if len(ours) > 1
                    else "tensors that are not MiCS shards")
            raise ValueError(
                f"torch.nn.utils.clip_grad_norm_ got MiCS shards mixed with {what}: such a mix has no single "
                "global norm. Clip each sharded model on its own with mics_hf.clip_grad_norm_(model, max_norm), "
                "or pass one sharded model's parameters only"
            )
        grads = [p.grad for p in params if p.grad is not None]
        device = grads[0].device if grads else params[0].device
        dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        total = global_grad_norm(grads, norm_type, next(iter(ours.values())), device, dtype)
        if error_if_nonfinite and not bool(torch.isfinite(total)):
            raise RuntimeError(
                f"the gradients' global norm (order {float(norm_type)}) is {float(total)}, so they cannot be "
                "clipped by it; pass error_if_nonfinite=False to scale them by it anyway"
            )
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach)
        return total

    clip_grad_norm_._mics_wraps = original
    torch.nn.utils.clip_grad_norm_ = clip_grad_norm_
    torch.nn.utils.clip_grad.clip_grad_norm_ = clip_grad_norm_
