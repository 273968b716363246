"""Check that the replicas of every shard start identical, as DDP's construction-time broadcast guarantees.

MiCS keeps r copies of each shard (one per partition group) and from then on only averages their gradients, so
copies that start different stay different: each partition group trains its own model and nothing fails. That
happens when ranks build the model from different seeds (Accelerate's `set_seed(..., device_specific=True)`,
seeding by rank) or load different files. DDP hides it by broadcasting rank 0's weights; FSDP2 does not check.
Here every rank fingerprints its shards and buffers bit for bit, and one all-reduce over the replication group
finds the first entry that differs, before the first step.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

__all__ = ["verify_replicas", "fingerprint"]

_CHUNK = 1 << 22  # elements fingerprinted at a time: bounds the temporary int64 copy to 32 MiB
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprint(tensor: torch.Tensor) -> int:
    """A position-weighted sum of the tensor's bit patterns (int64, wrapping): equal tensors give equal values,
    and a changed, swapped or NaN-payload element changes it (a float sum could hide -0.0 / +0.0 or reorderings)."""
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return 0
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    bits = flat.view(_INT_VIEW[flat.element_size()])
    total = torch.zeros((), dtype=torch.int64, device=flat.device)
    for lo in range(0, bits.numel(), _CHUNK):
        part = bits[lo : lo + _CHUNK].to(torch.int64)
        weights = torch.arange(lo, lo + part.numel(), dtype=torch.int64, device=part.device) % 8191 + 1
        total += (part * weights).sum()
    return int(total)


def verify_replicas(named: Iterable[tuple[str, torch.Tensor]], group: dist.ProcessGroup | None, ranks: list[int], device: torch.device) -> None:
    """Raise ValueError naming the first tensor whose copies differ across `group` (this rank's replicas).

    Every rank of the world calls it with its own replication group, the same names in the same order (the
    model's structure), so all ranks agree on the outcome and none is left waiting.
    """
    if group is None or len(ranks) < 2:
        return
    entries = list(named)
    if not entries:
        return
    local = torch.tensor([fingerprint(t) for _, t in entries], dtype=torch.int64)
    both = torch.cat([local, torch.bitwise_not(local)]).to(device)  # max of ~x is ~min(x): one all-reduce
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    both = both.cpu()
    n = len(entries)
    highest, lowest = both[:n], torch.bitwise_not(both[n:])
    differ = (highest != lowest).nonzero()
    if differ.numel():
        first = int(differ[0])
        raise ValueError(
            f"mics_hf: the replicas of {entries[first][0]!r} differ between ranks {ranks} (the ranks that hold the "
            f"same shard); {differ.numel()} of {n} parameters and buffers differ. Every rank must build the model "
            "with the same weights: seed identically on every rank before building it (not per rank, e.g. not "
            "accelerate's set_seed(seed, device_specific=True)), or load them from the same pretrained files"
        )
