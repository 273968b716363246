"""One unit's communication: its sharded parameters, the flat buffers, unshard / reshard / gradient reduction.

[Note: sharding layout] Every parameter is cut along dim 0 into p blocks of `rows = ceil(d0 / p)` rows (the
last blocks may be short or empty). Position q holds rows [q*rows, (q+1)*rows) as a real fp32 tensor: the
optimizer, state dicts and resharding see ordinary tensors. For communication each rank lays its blocks of
all the unit's parameters, each padded to `rows` rows, side by side in one flat segment of S elements; the
all-gather output is p such segments, and copy-out writes each parameter's p blocks into its own padded
unsharded storage. The reduce-scatter input has the same layout built from the unsharded gradients of the
trainable parameters only: frozen parameters are gathered but never reduced and hold no gradient memory.

[Note: gradient scaling] Hop 1 sums a unit's gradients over the partition group and adds sum / p to the shard
gradient; hop 2 sums the shard gradient over the replication group and divides by r. Because hop 2 averages
the whole accumulated shard gradient, a part that an earlier synced backward already averaged (identical on
every replica) passes through unchanged, and only the new contributions are averaged: every synced backward
adds its gradients exactly once, with or without no_sync(), as DDP's averaging does.

[Note: collective tags] Each communication segment ends with TAG_NUMEL elements naming the unit. After an
all-gather every rank checks that all p chunks carry its own unit's tag, and after a reduce-scatter or a
replica all-reduce that the summed tags are p (or r) times its own (tag t and t^2: equal sums of both mean
every contribution was t). A rank that ran a different unit (a unit skipped on some ranks only, a
data-dependent branch) is therefore an error naming both units, never a silent mix of two units' data.
On CPU the check runs at once; on CUDA it is queued without a host sync and raised at the next forward.

[Note: persistent unsharded parameters] Each parameter has one unsharded nn.Parameter for the model's whole
life; reshard() frees its storage (resize to 0) and unshard() re-grows and refills it. Keeping the object
lets autograd (and activation checkpointing, which re-runs forward during backward) always see the same
leaf, so gradients land on it whatever happened in between. Refilling goes through
`_unsafe_preserve_version_counter` because autograd must not take the refill for an in-place edit.
"""

from __future__ import annotations

import contextlib
import enum
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from ..config import MixedPrecisionPolicy
from . import collectives as C
from .topology import Topology

__all__ = ["ShardedParam", "ShardedUnit", "UnitGroups", "ShardState", "CommStreams"]


class CommStreams:
    """Side CUDA streams for the three kinds of communication, so they overlap compute (none on CPU).

    [Note: stream ordering] Each side stream first waits for the compute stream at the point the work is
    issued (the shards or gradients it reads were written there), the compute stream waits for the
    collective's completion before it reads the result (Work.wait on the compute stream), and a buffer made
    on a side stream but read on the compute stream is marked with record_stream so the caching allocator
    does not hand its memory out again too early. No torch.cuda.synchronize() is needed anywhere.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.all_gather = torch.cuda.Stream(device)
        self.reduce_scatter = torch.cuda.Stream(device)
        self.all_reduce = torch.cuda.Stream(device)

    def current(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def start_on(self, stream: torch.cuda.Stream, after: torch.cuda.Stream | None = None) -> "contextlib.AbstractContextManager":
        """Make `stream` wait for `after` (default: the compute stream), then run the block on it."""
        stream.wait_stream(after if after is not None else self.current())
        return torch.cuda.stream(stream)


def _on(streams: CommStreams | None, name: str, *, after: str | None = None) -> "contextlib.AbstractContextManager":
    if streams is None:
        return contextlib.nullcontext()
    return streams.start_on(getattr(streams, name), getattr(streams, after) if after else None)


def _waiting_on(streams: CommStreams | None, name: str) -> "contextlib.AbstractContextManager":
    """Run the block (a Work.wait and what consumes its result) on side stream `name`; nothing on CPU."""
    return torch.cuda.stream(getattr(streams, name)) if streams is not None else contextlib.nullcontext()


class ShardState(enum.Enum):
    SHARDED = "sharded"
    GATHERING = "gathering"  # all-gather in flight (prefetch)
    UNSHARDED = "unsharded"


@dataclass(frozen=True)
class UnitGroups:
    """The collective groups a unit uses, with accounting info (see collectives.CommGroup)."""

    partition: C.CommGroup
    replication: C.CommGroup
    intra_node: C.CommGroup | None
    inter_node: C.CommGroup | None
    chunk_order: tuple[int, ...]  # positions in the order the (hierarchical) all-gather leaves them

    @property
    def hierarchical(self) -> bool:
        return self.intra_node is not None


TAG_NUMEL = 2  # elements appended to every communication segment (see [Note: collective tags])
_TAG_MODULUS = 500  # summed tags t, t^2 stay exact integers in float32 for any group of up to 64 ranks


class ShardedParam:
    """A parameter of a unit: its fp32 shard, its persistent unsharded parameter and its place in the buffers."""

    def __init__(
        self, fqn: str, param: nn.Parameter, uses: Sequence[tuple[nn.Module, str]], *, p: int, position: int,
        policy: MixedPrecisionPolicy, local: torch.Tensor | None = None, device: torch.device | None = None,
    ) -> None:
        """`param` gives the shape and flags (it may be on the meta device when `local` is given); `local`: this
        rank's rows when they were read elsewhere (a pretrained file), else they are cut from `param`. The shard
        and the unsharded storage live on `device` (default: param's), so a CPU model is sharded, then moved."""
        self.fqn = fqn
        self.uses = list(uses)  # every (module, attribute) that refers to this parameter (tied weights: several)
        self.global_shape = param.shape
        dims = tuple(param.shape) or (1,)
        self.dim0 = dims[0]
        self.row_numel = math.prod(dims[1:])
        self.rows = -(-self.dim0 // p)  # ceil
        self.padded_len = self.rows * self.row_numel  # elements of one block in the flat segment
        start = min(position * self.rows, self.dim0)
        stop = min(start + self.rows, self.dim0)
        self.offsets = (start, stop)
        device = device if device is not None else param.device
        if local is None:
            local = param.detach().reshape(dims)[start:stop]
            owned = False  # a view of the user's parameter: copied
        elif tuple(local.shape) != (stop - start, *dims[1:]):
            raise ValueError(f"{fqn}: rows [{start}, {stop}) of shape {tuple(param.shape)} expected, got a tensor of shape {tuple(local.shape)}")
        else:
            owned = True  # read for this shard alone: kept as it is when it already has the right dtype and device
        if not (owned and local.dtype == policy.master_dtype and local.device == device and local.is_contiguous()):
            with torch.no_grad():
                local = torch.empty(local.shape, dtype=policy.master_dtype, device=device).copy_(local)  # contiguous, owned
        self.sharded = nn.Parameter(local, requires_grad=param.requires_grad)
        self.local_numel = local.numel()
        # p = 1 computing in the master dtype (the DDP end of the spectrum): the shard IS the full parameter, so
        # the unsharded parameter aliases its storage (through .data: a separate version counter, so optimizer updates never
        # look like in-place edits to autograd) and unshard/reshard copy and free nothing.
        compute_dtype = policy.compute_dtype
        self.aliased = p == 1 and compute_dtype == policy.master_dtype
        if self.aliased:
            self.padded = self.sharded.data.view(1, -1)
            self.unsharded = nn.Parameter(self.sharded.data.view(param.shape), requires_grad=param.requires_grad)
        else:
            padded = torch.empty(p * self.padded_len, dtype=compute_dtype, device=device)
            self.padded = padded.view(p, self.padded_len)
            self.unsharded = nn.Parameter(padded[: param.numel()].view(param.shape), requires_grad=param.requires_grad)
            self._free_storage()
        self.segment_offset = 0  # in the all-gather segment; set by ShardedUnit
        self.grad_offset = -1  # in the reduce-scatter segment and grad_flat; -1 while frozen

    @property
    def requires_grad(self) -> bool:
        """Trainable or frozen, as the user sees it: the flag of the shard that model.parameters() returns."""
        return self.sharded.requires_grad

    def _free_storage(self) -> None:
        if not self.aliased:
            self.unsharded.untyped_storage().resize_(0)

    def _alloc_storage(self) -> None:
        if self.aliased:
            return
        storage = self.unsharded.untyped_storage()
        nbytes = self.padded.numel() * self.padded.element_size()
        if storage.size() != nbytes:
            storage.resize_(nbytes)

    def point_modules_to(self, tensor: nn.Parameter) -> None:
        for module, name in self.uses:
            module._parameters[name] = tensor


class ShardedUnit:
    """The parameters of one unit, gathered and freed together, and their gradient reduction."""

    def __init__(
        self,
        label: str,
        params: list[ShardedParam],
        *,
        topology: Topology,
        groups: UnitGroups,
        policy: MixedPrecisionPolicy,
        stats: C.CommStats,
        device: torch.device,
        streams: "CommStreams | None" = None,
        index: int = 0,
        checks: "TagChecks | None" = None,
    ) -> None:
        self.label = label or "<root>"
        self.streams = streams
        self.params = params
        self.topology = topology
        self.groups = groups
        self.policy = policy
        self.stats = stats
        self.device = device
        self.p = topology.partition_size
        self.index = index  # position among the model's units: the tag its collectives carry
        self.checks = checks if checks is not None else TagChecks(lambda i: f"unit #{i}")
        offset = 0
        for sp in params:
            sp.segment_offset = offset
            offset += sp.padded_len
        self.segment_numel = offset + TAG_NUMEL
        self.state = ShardState.SHARDED
        self._gather_work: C.Work | None = None
        self._gather_out: torch.Tensor | None = None
        self._reduce_work: C.Work | None = None
        self._reduce_out: torch.Tensor | None = None
        self._hop2_work: C.Work | None = None
        self._unsynced = False  # hop 1 added gradients that hop 2 has not averaged across the replicas yet
        order = groups.chunk_order
        identity = tuple(range(self.p))
        self._order = None if order == identity else torch.tensor(order, device=device)
        self._inverse = None
        if self._order is not None:
            inv = [0] * self.p
            for c, q in enumerate(order):
                inv[q] = c
            self._inverse = torch.tensor(inv, device=device)
        self._tags: dict[tuple, torch.Tensor] = {}
        for dtype in {policy.compute_dtype, policy.gradient_reduce_dtype, policy.master_dtype}:
            self._gather_tag(dtype), self._sum_tag(dtype)  # on the compute stream, before any side stream reads them
        self._trainable_flags: tuple[bool, ...] | None = None
        self._grad_flat: torch.Tensor | None = None
        self.refresh_trainable()

    # ---- trainable parameters and the gradient layout ----------------------------------------------------
    def refresh_trainable(self) -> bool:
        """Follow requires_grad changes made on the shards (e.g. freezing for LoRA after sharding); True if any.

        Lays the trainable parameters' blocks out in the reduce-scatter segment and in grad_flat (the
        accumulated shard gradient, one flat buffer so hop 2 is one all-reduce per unit); frozen parameters get
        no slot. Gradients accumulated so far are kept for parameters that stay trainable.
        """
        flags = tuple(sp.requires_grad for sp in self.params)
        if flags == self._trainable_flags:
            return False
        kept = {id(sp): sp.sharded.grad for sp in self.params if sp.requires_grad and sp.sharded.grad is not None}
        offset = 0
        for sp, trainable in zip(self.params, flags):
            sp.unsharded.requires_grad_(trainable)
            sp.grad_offset = offset if trainable else -1
            offset += sp.padded_len if trainable else 0
        self.trainable = [sp for sp in self.params if sp.grad_offset >= 0]  # read on every reduction
        self.grad_numel = offset  # trainable elements of one position's segment (tags excluded)
        self._grad_flat = None  # allocated by the first reduction (a model only loaded or generating needs none)
        with torch.no_grad():
            for sp in self.params:
                grad = kept.get(id(sp))
                if grad is not None:
                    view = self._grad_view(sp)
                    view.copy_(grad)
                    sp.sharded.grad = view
                elif not sp.requires_grad:
                    sp.sharded.grad = None
        self._trainable_flags = flags
        return True

    @property
    def grad_flat(self) -> torch.Tensor:
        """The accumulated fp32 shard gradient of the trainable parameters (+ the tag), zeros until reduced into."""
        if self._grad_flat is None:
            self._grad_flat = torch.zeros(self.grad_numel + TAG_NUMEL, dtype=self.policy.master_dtype, device=self.device)
        return self._grad_flat

    def _grad_view(self, sp: ShardedParam) -> torch.Tensor:
        return self.grad_flat[sp.grad_offset : sp.grad_offset + sp.local_numel].view(sp.sharded.shape)

    # ---- unshard / reshard -------------------------------------------------------------------------------
    def unshard(self) -> None:
        """Start the all-gather of this unit (no-op if it is in flight or done)."""
        if self.state is not ShardState.SHARDED:
            return
        if self.p == 1:  # nothing to gather: wait_unshard copies (or aliases) the local shard
            self.state = ShardState.GATHERING
            return
        dtype = self.policy.compute_dtype
        with _on(self.streams, "all_gather"), torch.no_grad():
            send = torch.empty(self.segment_numel, dtype=dtype, device=self.device)
            for sp in self.params:
                seg = send[sp.segment_offset : sp.segment_offset + sp.padded_len]
                seg[: sp.local_numel].copy_(sp.sharded.reshape(-1))
                seg[sp.local_numel :].zero_()
            send[-TAG_NUMEL:].copy_(self._gather_tag(dtype))
            out = torch.empty(self.p * self.segment_numel, dtype=dtype, device=self.device)
            if self.groups.hierarchical:
                self._gather_work = C.hierarchical_all_gather(
                    out, send, inter=self.groups.inter_node, intra=self.groups.intra_node, stats=self.stats, label=self.label
                )
            else:
                self._gather_work = C.all_gather(out, send, self.groups.partition, stats=self.stats, label=self.label)
        self._gather_out = out
        self.state = ShardState.GATHERING

    def wait_unshard(self) -> None:
        """Finish the all-gather, copy out into the unsharded parameters and point the modules at them."""
        if self.state is ShardState.UNSHARDED:
            return
        if self.state is ShardState.SHARDED:
            self.unshard()
        if self.p == 1:
            with torch.no_grad():
                for sp in self.params:
                    if not sp.aliased:
                        sp._alloc_storage()
                        with torch.autograd._unsafe_preserve_version_counter(sp.unsharded):
                            sp.unsharded.copy_(sp.sharded.view(sp.global_shape))
                    sp.point_modules_to(sp.unsharded)
            self.state = ShardState.UNSHARDED
            return
        assert self._gather_work is not None and self._gather_out is not None
        self._gather_work.wait()
        gathered = self._gather_out.view(self.p, self.segment_numel)
        self.checks.gathered(self, gathered[:, -TAG_NUMEL:], self._gather_tag(gathered.dtype))
        with torch.no_grad():
            for sp in self.params:
                sp._alloc_storage()
                src = gathered[:, sp.segment_offset : sp.segment_offset + sp.padded_len]
                with torch.autograd._unsafe_preserve_version_counter(sp.unsharded):
                    if self._inverse is None:
                        sp.padded.copy_(src)
                    else:  # chunk c of the output is position order[c]: read through the permutation
                        sp.padded.index_copy_(0, self._order, src)
                sp.point_modules_to(sp.unsharded)
        if self.streams is not None:  # made on the all-gather stream, read above on the compute stream
            self._gather_out.record_stream(self.streams.current())
        self._gather_work = None
        self._gather_out = None
        self.state = ShardState.UNSHARDED

    def reshard(self) -> None:
        """Point the modules back at the shards and free the unsharded storage."""
        if self.state is ShardState.GATHERING:
            self.wait_unshard()  # never leave a collective un-waited; its buffer is dropped right after
        if self.state is ShardState.SHARDED:
            return
        for sp in self.params:
            sp.point_modules_to(sp.sharded)
            sp._free_storage()
        self.state = ShardState.SHARDED

    # ---- tags --------------------------------------------------------------------------------------------
    def _gather_tag(self, dtype: torch.dtype) -> torch.Tensor:
        # copied, never summed: (index + 1) in base 256 is exact in every float dtype, bf16 included
        t = self.index + 1
        return self._tag(("gather", dtype), [t % 256, t // 256], dtype)

    def _sum_tag(self, dtype: torch.dtype) -> torch.Tensor:
        t = 1 + self.index % _TAG_MODULUS
        return self._tag(("sum", dtype), [t, t * t], dtype)

    def _tag(self, key: tuple, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        # made once per dtype on the device (no host-to-device copy per collective); read-only afterwards
        if key not in self._tags:
            self._tags[key] = torch.tensor(values, dtype=dtype, device=self.device)
        return self._tags[key]

    # ---- gradients ---------------------------------------------------------------------------------------
    def reduce_grads(self) -> None:
        """Hop 1: copy the unsharded gradients into the reduce-scatter input and start the reduce-scatter.

        Runs for every unit with trainable parameters whenever the step's structure says so, whether or not
        this rank's data produced gradients (missing ones are zeros), so every rank issues the same collectives.
        Frees the unsharded gradients right away: they never accumulate across micro-steps.
        """
        self.wait_reduce()
        if self.grad_numel == 0:  # a frozen unit: nothing is ever reduced
            self._drop_unsharded_grads()
            return
        if self.p == 1:
            self._accumulate_local_grads()
            return
        dtype = self.policy.gradient_reduce_dtype
        with _on(self.streams, "reduce_scatter"), torch.no_grad():
            segment = self.grad_numel + TAG_NUMEL
            full = torch.empty(self.p * segment, dtype=dtype, device=self.device)
            full2d = full.view(self.p, segment)
            for sp in self.trainable:
                dst = full2d[:, sp.grad_offset : sp.grad_offset + sp.padded_len]
                grad = sp.unsharded.grad
                if grad is None:  # a parameter this rank's data did not reach: contributes zeros
                    dst.zero_()
                    continue
                flat = grad.reshape(-1)
                if flat.numel() != self.p * sp.padded_len:
                    flat = torch.nn.functional.pad(flat, (0, self.p * sp.padded_len - flat.numel()))
                src = flat.view(self.p, sp.padded_len)
                if self._inverse is None:  # copy_ casts to the reduce dtype on the way
                    dst.copy_(src)
                else:  # chunk c must hold position order[c]'s block (index_copy_ does not cast)
                    dst.index_copy_(0, self._inverse, src.to(dtype))
                if self.streams is not None:  # made on the compute stream, read on the reduce-scatter stream
                    grad.record_stream(self.streams.reduce_scatter)
            self._drop_unsharded_grads()
            full2d[:, -TAG_NUMEL:].copy_(self._sum_tag(dtype))
            out = torch.empty(segment, dtype=dtype, device=self.device)
            if self.groups.hierarchical:
                self._reduce_work = C.hierarchical_reduce_scatter(
                    out, full, intra=self.groups.intra_node, inter=self.groups.inter_node, stats=self.stats, label=self.label
                )
            else:
                self._reduce_work = C.reduce_scatter(out, full, self.groups.partition, stats=self.stats, label=self.label)
        self._reduce_out = out

    def _drop_unsharded_grads(self) -> None:
        for sp in self.params:
            sp.unsharded.grad = None

    def advance_reduce(self) -> None:
        """Launch the next stage of a hierarchical reduce-scatter in flight (CPU defers it; see Work.advance)."""
        if self._reduce_work is not None:
            self._reduce_work.advance()

    def wait_reduce(self) -> None:
        """Finish hop 1 and add the partition group's sum / p to the shard gradients ([Note: gradient scaling])."""
        if self._reduce_work is None:
            return
        # on CUDA the accumulation stays on the reduce-scatter stream; the end of backward joins it
        with _waiting_on(self.streams, "reduce_scatter"):
            self._reduce_work.wait()
            self._reduce_work = None
            out, self._reduce_out = self._reduce_out, None
            if out.dtype in (torch.float32, torch.float64):  # low-precision sums of tags are not exact
                self.checks.summed(self, "reduce-scatter", out[-TAG_NUMEL:], self._sum_tag(out.dtype), self.p)
            self._attach_shard_grads()
            self.grad_flat[: self.grad_numel].add_(out[: self.grad_numel], alpha=1.0 / self.p)
            self._unsynced = True

    def _accumulate_local_grads(self) -> None:
        """Hop 1 of a partition group of one rank: no communication, add the gradients straight into the shard.

        On CUDA this runs on the reduce-scatter stream, like hop 1 for p > 1, so hop 2 (which waits for that
        stream) never reads grad_flat before the addition is done.
        """
        with _on(self.streams, "reduce_scatter"), torch.no_grad():
            self._attach_shard_grads()
            for sp in self.trainable:
                grad = sp.unsharded.grad
                if grad is not None:
                    self._grad_view(sp).add_(grad.view(sp.sharded.shape))
                    if self.streams is not None:
                        grad.record_stream(self.streams.reduce_scatter)
            self._drop_unsharded_grads()
        self._unsynced = True

    def _attach_shard_grads(self) -> None:
        """Make each trainable shard's .grad a view of grad_flat; zero the buffer if the optimizer dropped them."""
        trainable = self.trainable
        stale = any(sp.sharded.grad is None or sp.sharded.grad.data_ptr() != self._grad_ptr(sp) for sp in trainable)
        if not stale:
            return
        with torch.no_grad():
            for sp in trainable:
                view = self._grad_view(sp)
                current = sp.sharded.grad
                if current is not None and current.data_ptr() != view.data_ptr():
                    view.copy_(current)  # the user put a gradient there: keep accumulating onto it
                elif current is None:
                    view.zero_()
                sp.sharded.grad = view
            # zero the padding tail of each block so hop 2 and norms never see stale values
            for sp in trainable:
                self.grad_flat[sp.grad_offset + sp.local_numel : sp.grad_offset + sp.padded_len].zero_()

    def _grad_ptr(self, sp: ShardedParam) -> int:
        # arithmetic, not a slice: this runs for every parameter on every reduction
        return self.grad_flat.data_ptr() + sp.grad_offset * self.grad_flat.element_size()

    def all_reduce_grads(self) -> None:
        """Hop 2: start the sum of the accumulated shard gradients across the replication group.

        Issued whenever hop 1 added something since the last hop 2 (a structural fact, the same on every rank);
        wait_all_reduce divides by r ([Note: gradient scaling]).
        """
        if self.groups.replication.pg is None or not self._unsynced:
            return
        self._unsynced = False
        with _on(self.streams, "all_reduce", after="reduce_scatter"):  # grad_flat was accumulated there
            self.grad_flat[-TAG_NUMEL:].copy_(self._sum_tag(self.grad_flat.dtype))
            self._hop2_work = C.all_reduce(self.grad_flat, self.groups.replication, stats=self.stats, label=self.label)

    def wait_all_reduce(self) -> None:
        if self._hop2_work is None:
            return
        with _waiting_on(self.streams, "all_reduce"):
            self._hop2_work.wait()
            r = self.groups.replication.size
            self.checks.summed(self, "replica all-reduce", self.grad_flat[-TAG_NUMEL:], self._sum_tag(self.grad_flat.dtype), r)
            self.grad_flat[: self.grad_numel].mul_(1.0 / r)
        self._hop2_work = None

    def join_streams(self) -> None:
        """The compute stream waits for this unit's gradient work (before the optimizer reads grad_flat)."""
        if self.streams is not None:
            current = self.streams.current()
            current.wait_stream(self.streams.reduce_scatter)
            current.wait_stream(self.streams.all_reduce)


class TagChecks:
    """Raises when a collective's tags show that the ranks of a group ran different units ([Note: collective tags]).

    `describe(i)` names the unit with index i. On CPU a mismatch raises at once; on CUDA the comparison stays on
    the device and `raise_pending()` (called at the start of the next forward) reports it, so the check never
    stalls the host.
    """

    def __init__(self, describe) -> None:
        self.describe = describe
        self._pending: list[tuple] = []

    def gathered(self, unit: ShardedUnit, tags: torch.Tensor, expected: torch.Tensor) -> None:
        self._check(unit, "all-gather", tags, expected, 0)

    def summed(self, unit: ShardedUnit, op: str, sums: torch.Tensor, expected: torch.Tensor, ranks: int) -> None:
        self._check(unit, op, sums, expected, ranks)

    def _check(self, unit: ShardedUnit, op: str, got: torch.Tensor, expected: torch.Tensor, ranks: int) -> None:
        if got.is_cuda:  # copy on the current (communication) stream; an event marks when it has landed
            host = torch.empty(got.shape, dtype=got.dtype, pin_memory=True)  # pinned: the copy does not block
            host.copy_(got.detach(), non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending.append((unit, op, host, expected.cpu(), ranks, done))
            return
        self._verify(unit, op, got, expected, ranks)

    def raise_pending(self) -> None:
        pending, self._pending = self._pending, []
        for unit, op, got, expected, ranks, done in pending:
            done.synchronize()  # recorded in the previous step: long complete by the next forward
            self._verify(unit, op, got, expected, ranks)

    def _verify(self, unit: ShardedUnit, op: str, got: torch.Tensor, expected: torch.Tensor, ranks: int) -> None:
        got = got.detach().to(torch.float64)
        expected = expected.to(torch.float64)
        if ranks == 0:  # all-gather: one tag per chunk, each must be this unit's
            bad = [int(row[0].item() + 256 * row[1].item()) - 1 for row in got if not torch.equal(row, expected)]
            if not bad:
                return
            others = sorted({self.describe(i) for i in bad})
        else:  # sums of t and t^2 over the group equal ranks * (t, t^2) only if every rank sent t
            if torch.equal(got, ranks * expected):
                return
            others = ["a different unit"]
        raise C.CollectiveError(
            f"{op} of unit {unit.label!r} was paired with {', '.join(others)} on another rank of its group: the "
            "ranks did not run the same units in the same order (a unit skipped on some ranks only, e.g. layer "
            "drop or a data-dependent branch around a whole unit, or a unit whose output reaches the loss on some "
            "ranks only, so that only they run its backward). Every rank must run every unit, forward and "
            "backward, the same number of times per step; keep the branch inside a unit (set units= so that it "
            "is), or make the unit's output reach the loss on every rank (e.g. add it times 0)"
        )
