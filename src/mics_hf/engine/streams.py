"""Side CUDA streams for communication (none on CPU), and the two ways work is put on them."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["CommStreams", "on_stream", "waiting_on"]

# CUDA stream priorities: lower is more urgent. Communication is on the critical path of the next unit's
# compute, so its kernels (copies, NCCL) are scheduled ahead of compute kernels that are ready at the same time.
_HIGH_PRIORITY = -1


class CommStreams:
    """Side CUDA streams for the three kinds of communication, so they overlap compute.

    [Note: stream ordering] Each side stream first waits for the compute stream at the point the work is
    issued (the shards it reads were written there), the compute stream waits for the collective's completion
    before it reads the result (Work.wait on the compute stream), and a buffer reused from the pool is ordered
    by the event its last user recorded (buffers.py). The reduce-scatter's copy-in runs on the compute stream,
    where autograd made the gradients, so they are freed in stream order without record_stream. No
    torch.cuda.synchronize() is needed anywhere. The streams are created at high priority.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.all_gather = torch.cuda.Stream(device, priority=_HIGH_PRIORITY)
        self.reduce_scatter = torch.cuda.Stream(device, priority=_HIGH_PRIORITY)
        self.all_reduce = torch.cuda.Stream(device, priority=_HIGH_PRIORITY)

    def current(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def start_on(self, stream: torch.cuda.Stream, after: torch.cuda.Stream | None = None) -> "contextlib.AbstractContextManager":
        """Make `stream` wait for `after` (default: the compute stream), then run the block on it."""
        stream.wait_stream(after if after is not None else self.current())
        return torch.cuda.stream(stream)


def on_stream(streams: CommStreams | None, name: str, *, after: str | None = None) -> "contextlib.AbstractContextManager":
    """Run the block on side stream `name` after the compute stream (or stream `after`); nothing on CPU."""
    if streams is None:
        return contextlib.nullcontext()
    return streams.start_on(getattr(streams, name), getattr(streams, after) if after else None)


def waiting_on(streams: CommStreams | None, name: str) -> "contextlib.AbstractContextManager":
    """Run the block (a Work.wait and what consumes its result) on side stream `name`; nothing on CPU."""
    return torch.cuda.stream(getattr(streams, name)) if streams is not None else contextlib.nullcontext()
