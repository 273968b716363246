"""Reused communication buffers and the count of gathered units: what keeps the step's memory flat.

[Note: buffer reuse] A unit's all-gather output, its reduce-scatter input and output and the hierarchical
reduce-scatter's staging buffer are flat tensors that live only while one collective does. Allocating them
afresh per collective costs an allocation each (and, on CUDA, memory the caching allocator cannot hand out again
until the side stream that used it has caught up, which is unbounded when the host runs ahead). BufferPool keeps
them instead, keyed by (name, dtype, numel): units with the same layout (every transformer block) share one
class, so a step needs as many buffers per class as collectives of that class are in flight at once (two in
steady state), and from the second step on nothing is allocated. A buffer is zeroed once, when it is made:
the gather's padding is never written afterwards, so it stays zero.

On CUDA a released buffer carries an event recorded on the stream that last used it; the stream that acquires
it next waits for that event, so reuse is ordered on the device without the host ever blocking, and without
record_stream.
"""

from __future__ import annotations

from collections import defaultdict

import torch

__all__ = ["BufferPool", "GatheredUnits"]


class BufferPool:
    """Free lists of flat buffers by (name, dtype, numel); counts what it allocates and what is in use."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._free: dict[tuple, list[tuple[torch.Tensor, "torch.cuda.Event | None"]]] = defaultdict(list)
        self.num_allocations = 0  # buffers made since the model was sharded (flat after the first step)
        self.in_use = 0
        self.peak_in_use = 0

    def acquire(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A buffer of `numel` elements; on CUDA the current stream first waits until its last user is done."""
        free = self._free[(name, dtype, numel)]
        if free:
            buf, ready = free.pop()
            if ready is not None:
                torch.cuda.current_stream(self.device).wait_event(ready)
        else:
            buf = torch.zeros(numel, dtype=dtype, device=self.device)
            self.num_allocations += 1
        self.in_use += 1
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        return buf

    def release(self, name: str, buf: torch.Tensor) -> None:
        """Return `buf`, after everything queued so far on the current stream (its last user) has run."""
        ready = None
        if buf.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(buf.device))
        self._free[(name, buf.dtype, buf.numel())].append((buf, ready))
        self.in_use -= 1

    def free_by_class(self) -> dict[tuple, int]:
        """Free buffers per (name, dtype, numel): between steps, every buffer of each class."""
        return {key: len(v) for key, v in self._free.items()}


class GatheredUnits:
    """How many units (the root not counted) are gathered or being gathered, and the most seen at once.

    Prefetching starts a gather only while fewer than `limit` units are alive ([Note: gathered units] in
    hooks.py), so the gathered parameters and the all-gather buffers stay bounded whatever the host does.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.alive = 0
        self.peak = 0

    def has_room(self) -> bool:
        return self.alive < self.limit

    def add(self) -> None:
        self.alive += 1
        self.peak = max(self.peak, self.alive)

    def remove(self) -> None:
        self.alive -= 1
