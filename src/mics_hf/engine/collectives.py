"""Stateless collectives: flat and hierarchical all-gather / reduce-scatter, and the replica all-reduce.

Each function takes its groups and buffers explicitly, starts the communication, records what this rank sends
into a CommStats, and returns a `Work` handle. Nothing here knows about modules or parameters.

[Note: byte accounting] Bytes are what this rank sends under the ring model: (g-1)/g of the gathered or reduced
size for a group of g (2(g-1)/g for an all-reduce). A ring ordered by node crosses a node boundary only at the
last rank of each node, so a rank's bytes are booked on the link to its ring successor: `inter_node` if the
successor is on another node, else `intra_node`. Summed over a node this gives the paper's volume factors:
(p-1)/p of the message for a flat all-gather over p ranks, (p-k)/p for the hierarchical one. Calls are booked
on the group's class: `inter_node` if the group spans nodes.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "CommStats",
    "CommGroup",
    "Work",
    "CollectiveError",
    "all_gather",
    "hierarchical_all_gather",
    "reduce_scatter",
    "hierarchical_reduce_scatter",
    "all_reduce",
    "LINKS",
    "OPS",
]

OPS = ("all_gather", "reduce_scatter", "all_reduce")
LINKS = ("intra_node", "inter_node")


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names the unit, the group and the tensor shapes."""


@dataclass
class CommStats:
    """Calls, bytes sent and time spent waiting, per (operation, link class).

    [Note: timing metrics] `wait_seconds` is host time spent blocked in a collective's wait. On CPU the host
    does the waiting, so it is the communication the step exposes. On CUDA a wait only queues a stream
    dependency and returns at once, so the host time says nothing; there `exposed_seconds` is measured with
    CUDA events recorded on the compute stream around each point where it waits for communication (an
    all-gather's result, a reused buffer still read by a reduce-scatter, the gradient reductions at the end
    of backward): the time the compute stream stood still for communication. Events are read after the step
    (as_dict, resolve), never with a synchronisation inside it.
    """

    calls: defaultdict = field(default_factory=lambda: defaultdict(int))
    bytes: defaultdict = field(default_factory=lambda: defaultdict(int))
    wait_seconds: defaultdict = field(default_factory=lambda: defaultdict(float))
    exposed_seconds: defaultdict = field(default_factory=lambda: defaultdict(float))
    _events: list = field(default_factory=list)

    def record(self, op: str, group_link: str, send_link: str, nbytes: int) -> None:
        self.calls[(op, group_link)] += 1
        self.bytes[(op, send_link)] += int(nbytes)

    @contextlib.contextmanager
    def exposed(self, op: str, device: torch.device) -> Iterator[None]:
        """Book the compute stream's stall inside the block on `op` (CUDA only; on CPU wait_seconds does)."""
        if device.type != "cuda":
            yield
            return
        before = torch.cuda.Event(enable_timing=True)
        before.record()
        yield
        after = torch.cuda.Event(enable_timing=True)
        after.record()
        self._events.append((op, before, after))

    def resolve(self, *, wait: bool = False) -> None:
        """Turn completed event pairs into exposed_seconds; pairs still in flight stay for a later call, unless
        `wait`, which waits for them (as_dict does: metrics are read after a step, never inside one)."""
        waiting = []
        for op, before, after in self._events:
            if wait:
                after.synchronize()
            if after.query():
                self.exposed_seconds[op] += before.elapsed_time(after) / 1e3
            else:
                waiting.append((op, before, after))
        self._events = waiting

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()
        self.wait_seconds.clear()
        self.exposed_seconds.clear()
        self._events.clear()

    def total_bytes(self, op: str | None = None, link: str | None = None) -> int:
        return sum(v for (o, l), v in self.bytes.items() if (op is None or o == op) and (link is None or l == link))

    def as_dict(self) -> dict[str, float]:
        """Flat metric names, e.g. comm/all_gather/inter_node/bytes, for loggers."""
        self.resolve(wait=True)
        out: dict[str, float] = {}
        for (op, link), v in sorted(self.bytes.items()):
            out[f"comm/{op}/{link}/bytes"] = v
        for (op, link), v in sorted(self.calls.items()):
            out[f"comm/{op}/{link}/calls"] = v
        for op, v in sorted(self.wait_seconds.items()):
            out[f"comm/{op}/wait_seconds"] = v
        for op, v in sorted(self.exposed_seconds.items()):
            out[f"comm/{op}/exposed_seconds"] = v
        return out


@dataclass(frozen=True)
class CommGroup:
    """A process group plus what accounting and error messages need to know about it."""

    name: str
    ranks: tuple[int, ...]
    pg: dist.ProcessGroup | None
    link: str
    send_link: str

    @property
    def size(self) -> int:
        return len(self.ranks)

    @classmethod
    def make(cls, name: str, ranks: Sequence[int], pg: dist.ProcessGroup | None, node_of_rank: Sequence[int], rank: int) -> "CommGroup":
        ranks = tuple(ranks)
        ring = sorted(ranks, key=lambda r: (node_of_rank[r], r))
        successor = ring[(ring.index(rank) + 1) % len(ring)]
        spans = len({node_of_rank[r] for r in ranks}) > 1
        return cls(
            name=name,
            ranks=ranks,
            pg=pg if len(ranks) > 1 else None,
            link="inter_node" if spans else "intra_node",
            send_link="inter_node" if node_of_rank[successor] != node_of_rank[rank] else "intra_node",
        )

    def describe(self) -> str:
        return f"{self.name} group (ranks {list(self.ranks)}, {self.link})"


class Work:
    """A started collective. `wait()` finishes it (running any later stage) and re-raises errors with context.

    Stages after the first are deferred to `wait()` on CPU, where a stage-2 launch would block on stage 1
    anyway; on CUDA every stage is launched at once and ordered on the communication streams.
    """

    def __init__(self, op: str, context: Callable[[], str], stats: CommStats | None) -> None:
        self._op = op
        self._context = context
        self._stats = stats
        self._pending: list = []
        self._later: list[Callable[[], object]] = []
        self.done = False

    def _fail(self, exc: BaseException) -> CollectiveError:
        return CollectiveError(f"{self._op} failed: {self._context()}: {type(exc).__name__}: {exc}")

    def start(self, launch: Callable[[], object]) -> "Work":
        try:
            handle = launch()
        except Exception as exc:  # re-raised with the unit, group and shapes; never swallowed
            raise self._fail(exc) from exc
        if handle is not None:
            self._pending.append(handle)
        return self

    def then(self, launch: Callable[[], object], *, eager: bool) -> "Work":
        if eager:
            self._wait_pending()
            return self.start(launch)
        self._later.append(launch)
        return self

    def advance(self) -> None:
        """Start the next deferred stage now (waiting for the stages before it), without waiting for it.

        The engine calls this at the next hook, a point every rank reaches in the same order, so the stage's
        collective is issued in the same order on every rank; it then overlaps the compute that follows
        instead of waiting for `wait()`.
        """
        if not self._later or self.done:
            return
        t0 = time.perf_counter()
        self._wait_pending()
        self.start(self._later.pop(0))
        if self._stats is not None:
            self._stats.wait_seconds[self._op] += time.perf_counter() - t0

    def _wait_pending(self) -> None:
        try:
            for handle in self._pending:
                handle.wait()
        except Exception as exc:
            raise self._fail(exc) from exc
        self._pending.clear()

    def wait(self) -> None:
        if self.done:
            return
        t0 = time.perf_counter()
        self._wait_pending()
        while self._later:
            self.start(self._later.pop(0))
            self._wait_pending()
        self.done = True
        if self._stats is not None:
            self._stats.wait_seconds[self._op] += time.perf_counter() - t0


# torch 2.13 renamed the tensor collectives (the old names warn); torch 2.11 on the GPU machines has only the old.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)


def _shapes(**tensors: torch.Tensor) -> str:
    return ", ".join(f"{k}={tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}" for k, t in tensors.items())


def _ctx(label: str, groups: Sequence[CommGroup], **tensors: torch.Tensor) -> Callable[[], str]:
    return lambda: f"unit '{label}', {' then '.join(g.describe() for g in groups)}, {_shapes(**tensors)}"


def _ring_bytes(group: CommGroup, total: torch.Tensor, factor: float = 1.0) -> int:
    g = group.size
    return int(factor * (g - 1) * total.numel() * total.element_size() // g)


def all_gather(output: torch.Tensor, shard: torch.Tensor, group: CommGroup, *, stats: CommStats | None, label: str, async_op: bool = True) -> Work:
    """output (g * n) <- the n-element shards of the group's ranks, in group-rank order."""
    work = Work("all_gather", _ctx(label, [group], input=shard, output=output), stats)
    gather = lambda out, inp, group: _all_gather_tensor(out, inp, group=group.pg, async_op=async_op)  # noqa: E731
    return _one_stage(work, "all_gather", (shard, output), group, gather, stats)


def hierarchical_all_gather(
    output: torch.Tensor,
    shard: torch.Tensor,
    *,
    inter: CommGroup,
    intra: CommGroup,
    stats: CommStats | None,
    label: str,
    staged: torch.Tensor | None = None,
) -> Work:
    """The MiCS two-stage all-gather for a partition group spanning m nodes with k ranks each.

    Stage 1 gathers among the ranks with the same local index on the m nodes (k such exchanges run in parallel
    on the inter-node links); stage 2 gathers the m-shard blocks inside each node. The output holds the p
    shards in `Topology.hierarchical_chunk_order`, not in position order. `staged` (m shards) may be given:
    when it is the output's block at this rank's intra-node index and `shard` its own slot inside it, the whole
    gather runs in place, with no buffer of its own.
    """
    if staged is None:
        staged = torch.empty(inter.size * shard.numel(), dtype=shard.dtype, device=shard.device)
    work = Work("all_gather", _ctx(label, [inter, intra], input=shard, output=output), stats)
    gather = lambda out, inp, group: _all_gather_tensor(out, inp, group=group.pg, async_op=True)  # noqa: E731
    return _two_stages(work, "all_gather", (shard, staged, output), (inter, intra), gather, stats)


def reduce_scatter(output: torch.Tensor, full: torch.Tensor, group: CommGroup, *, stats: CommStats | None, label: str) -> Work:
    """output (n) <- sum over the group of chunk [rank] of each rank's `full` (g * n), in group-rank order."""
    work = Work("reduce_scatter", _ctx(label, [group], input=full, output=output), stats)
    return _one_stage(work, "reduce_scatter", (full, output), group, _scatter, stats)


def _scatter(out: torch.Tensor, inp: torch.Tensor, group: CommGroup) -> object:
    return _reduce_scatter_tensor(out, inp, op=dist.ReduceOp.SUM, group=group.pg, async_op=True)


def _one_stage(
    work: Work,
    op: str,
    tensors: tuple[torch.Tensor, torch.Tensor],
    group: CommGroup,
    launch: Callable[[torch.Tensor, torch.Tensor, CommGroup], object],
    stats: CommStats | None,
) -> Work:
    """Run `launch` (source -> output) in `group`; a single-rank group is a local copy and books no bytes."""
    source, output = tensors
    if group.pg is None:
        output.copy_(source)
        return work
    if stats is not None:  # a ring moves (g-1)/g of its larger side: the gathered or the unreduced tensor
        stats.record(op, group.link, group.send_link, _ring_bytes(group, max(source, output, key=torch.numel)))
    return work.start(lambda: launch(output, source, group))


def hierarchical_reduce_scatter(
    output: torch.Tensor,
    full: torch.Tensor,
    *,
    intra: CommGroup,
    inter: CommGroup,
    stats: CommStats | None,
    label: str,
    staged: torch.Tensor | None = None,
) -> Work:
    """The mirror of the hierarchical all-gather: reduce-scatter inside the node, then between nodes.

    `full` must be laid out in `Topology.hierarchical_chunk_order`. Stage 1 leaves each rank the node-local sum
    of the m chunks owned by its inter-node group; stage 2 sums those across nodes, so only (m-1)/m of an
    m-chunk block crosses a node boundary per rank instead of (p-1)/p of the whole gradient. `staged` (m
    chunks, the stage-1 result) may be given by a caller that reuses its buffers.
    """
    if staged is None:
        staged = torch.empty(inter.size * output.numel(), dtype=full.dtype, device=full.device)
    work = Work("reduce_scatter", _ctx(label, [intra, inter], input=full, output=output), stats)
    return _two_stages(work, "reduce_scatter", (full, staged, output), (intra, inter), _scatter, stats)


def _two_stages(
    work: Work,
    op: str,
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    groups: tuple[CommGroup, CommGroup],
    launch: Callable[[torch.Tensor, torch.Tensor, CommGroup], object],
    stats: CommStats | None,
) -> Work:
    """Run `launch` as stage 1 (source -> staged) in groups[0], then stage 2 (staged -> output) in groups[1].

    A single-rank stage is a local copy. Bytes are booked per stage on its own group's links. On CPU stage 2 is
    deferred to Work.wait / Work.advance; on CUDA both are launched now and ordered on the stream.
    """
    source, staged, output = tensors
    first, second = groups
    if stats is not None:  # a ring stage moves (g-1)/g of its larger side: the gathered or the unreduced tensor
        stats.record(op, first.link, first.send_link, _ring_bytes(first, max(source, staged, key=torch.numel)))
        stats.record(op, second.link, second.send_link, _ring_bytes(second, max(staged, output, key=torch.numel)))
    if first.pg is None:
        staged.copy_(source)
    else:
        work.start(lambda: launch(staged, source, first))
    if second.pg is None:
        return work.then(lambda: _copy(output, staged), eager=source.is_cuda)
    return work.then(lambda: launch(output, staged, second), eager=source.is_cuda)


def all_reduce(tensor: torch.Tensor, group: CommGroup, *, stats: CommStats | None, label: str) -> Work:
    """In-place sum across the group (hop 2 runs it across the replication group)."""
    work = Work("all_reduce", _ctx(label, [group], tensor=tensor), stats)
    if group.pg is None:
        return work
    if stats is not None:
        stats.record("all_reduce", group.link, group.send_link, _ring_bytes(group, tensor, factor=2.0))
    return work.start(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group.pg, async_op=True))
