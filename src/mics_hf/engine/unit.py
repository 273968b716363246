"""One unit's communication: its sharded parameters, the flat buffers, unshard / reshard / gradient reduction.

[Note: sharding layout] Every parameter is cut along dim 0 into p blocks of `rows = ceil(d0 / p)` rows (the
last blocks may be short or empty). Position q holds rows [q*rows, (q+1)*rows) as a real fp32 tensor: the
optimizer, state dicts and resharding see ordinary tensors. For communication each rank lays its blocks of
all the unit's parameters, each padded to `rows` rows, side by side in one flat segment of S elements; the
all-gather output is p such segments, and copy-out writes each parameter's p blocks into its own padded
unsharded storage. The reduce-scatter input is the same layout built from the unsharded gradients.

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


class ShardedParam:
    """A parameter of a unit: its fp32 shard, its persistent unsharded parameter and its place in the buffers."""

    def __init__(self, fqn: str, param: nn.Parameter, uses: Sequence[tuple[nn.Module, str]], *, p: int, position: int, policy: MixedPrecisionPolicy) -> None:
        self.fqn = fqn
        self.uses = list(uses)  # every (module, attribute) that refers to this parameter (tied weights: several)
        self.global_shape = param.shape
        self.requires_grad = param.requires_grad
        dims = tuple(param.shape) or (1,)
        self.dim0 = dims[0]
        self.row_numel = math.prod(dims[1:])
        self.rows = -(-self.dim0 // p)  # ceil
        self.padded_len = self.rows * self.row_numel  # elements of one block in the flat segment
        start = min(position * self.rows, self.dim0)
        stop = min(start + self.rows, self.dim0)
        self.offsets = (start, stop)
        with torch.no_grad():
            local = param.detach().reshape(dims)[start:stop].to(policy.master_dtype).clone()
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
            padded = torch.empty(p * self.padded_len, dtype=compute_dtype, device=param.device)
            self.padded = padded.view(p, self.padded_len)
            self.unsharded = nn.Parameter(padded[: param.numel()].view(param.shape), requires_grad=param.requires_grad)
            self._free_storage()
        self.segment_offset = 0  # set by ShardedUnit

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
        offset = 0
        for sp in params:
            sp.segment_offset = offset
            offset += sp.padded_len
        self.segment_numel = offset
        self.state = ShardState.SHARDED
        self._gather_work: C.Work | None = None
        self._gather_out: torch.Tensor | None = None
        self._reduce_work: C.Work | None = None
        self._reduce_out: torch.Tensor | None = None
        self._hop2_work: C.Work | None = None
        # accumulated gradient of the local shards in the master dtype, one flat buffer so hop 2 is one
        # all-reduce per unit.
        self.grad_flat = torch.zeros(self.segment_numel, dtype=policy.master_dtype, device=device)
        self._grad_valid = False  # grad_flat holds an accumulation that the shards' .grad still refer to
        order = groups.chunk_order
        identity = tuple(range(self.p))
        self._order = None if order == identity else torch.tensor(order, device=device)
        self._inverse = None
        if self._order is not None:
            inv = [0] * self.p
            for c, q in enumerate(order):
                inv[q] = c
            self._inverse = torch.tensor(inv, device=device)
        self.num_grad_params = sum(1 for sp in params if sp.requires_grad)
        self.num_grads_ready = 0

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

    # ---- gradients ---------------------------------------------------------------------------------------
    def reduce_grads(self) -> None:
        """Hop 1: copy the unsharded gradients into the reduce-scatter input and start the reduce-scatter.

        Frees the unsharded gradients right away: they never accumulate across micro-steps.
        """
        self.wait_reduce()
        if self.p == 1:
            self._accumulate_local_grads()
            return
        dtype = self.policy.gradient_reduce_dtype
        any_grad = False
        with _on(self.streams, "reduce_scatter"), torch.no_grad():
            full = torch.empty(self.p * self.segment_numel, dtype=dtype, device=self.device)
            full2d = full.view(self.p, self.segment_numel)
            for sp in self.params:
                dst = full2d[:, sp.segment_offset : sp.segment_offset + sp.padded_len]
                grad = sp.unsharded.grad
                if grad is None:
                    dst.zero_()
                    continue
                any_grad = True
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
                sp.unsharded.grad = None
            self.num_grads_ready = 0
            if not any_grad:
                return
            out = torch.empty(self.segment_numel, dtype=dtype, device=self.device)
            if self.groups.hierarchical:
                self._reduce_work = C.hierarchical_reduce_scatter(
                    out, full, intra=self.groups.intra_node, inter=self.groups.inter_node, stats=self.stats, label=self.label
                )
            else:
                self._reduce_work = C.reduce_scatter(out, full, self.groups.partition, stats=self.stats, label=self.label)
        self._reduce_out = out

    def advance_reduce(self) -> None:
        """Launch the next stage of a hierarchical reduce-scatter in flight (CPU defers it; see Work.advance)."""
        if self._reduce_work is not None:
            self._reduce_work.advance()

    def wait_reduce(self) -> None:
        """Finish hop 1 and add the result, divided once by the world size, to the fp32 shard gradients."""
        if self._reduce_work is None:
            return
        # on CUDA the accumulation stays on the reduce-scatter stream; the end of backward joins it
        with _waiting_on(self.streams, "reduce_scatter"):
            self._reduce_work.wait()
            self._reduce_work = None
            out, self._reduce_out = self._reduce_out, None
            self._attach_shard_grads()
            self.grad_flat.add_(out, alpha=1.0 / self.topology.world_size)

    def _accumulate_local_grads(self) -> None:
        """Hop 1 of a partition group of one rank: no communication, add grad / N straight into the shard."""
        self._attach_shard_grads()
        scale = 1.0 / self.topology.world_size
        with torch.no_grad():
            for sp in self.params:
                if sp.unsharded.grad is not None:
                    seg = self.grad_flat[sp.segment_offset : sp.segment_offset + sp.local_numel]
                    seg.add_(sp.unsharded.grad.reshape(-1), alpha=scale)
                    sp.unsharded.grad = None
        self.num_grads_ready = 0

    def _attach_shard_grads(self) -> None:
        """Make each shard's .grad a view of grad_flat; zero the buffer if the optimizer dropped the grads."""
        stale = any(
            sp.requires_grad and (sp.sharded.grad is None or sp.sharded.grad.data_ptr() != self._grad_ptr(sp))
            for sp in self.params
        )
        if not stale:
            return
        with torch.no_grad():
            for sp in self.params:
                view = self.grad_flat[sp.segment_offset : sp.segment_offset + sp.local_numel].view(sp.sharded.shape)
                current = sp.sharded.grad
                if current is not None and current.data_ptr() != view.data_ptr():
                    view.copy_(current)  # the user put a gradient there: keep accumulating onto it
                elif current is None:
                    view.zero_()
                sp.sharded.grad = view if sp.requires_grad else None
            # zero the padding tail of each block so hop 2 and norms never see stale values
            for sp in self.params:
                self.grad_flat[sp.segment_offset + sp.local_numel : sp.segment_offset + sp.padded_len].zero_()

    def _grad_ptr(self, sp: ShardedParam) -> int:
        # arithmetic, not a slice: this runs for every parameter on every reduction
        return self.grad_flat.data_ptr() + sp.segment_offset * self.grad_flat.element_size()

    def all_reduce_grads(self) -> None:
        """Hop 2: start the sum of the accumulated shard gradients across the replication group."""
        if self.groups.replication.pg is None or not any(sp.sharded.grad is not None for sp in self.params):
            return
        with _on(self.streams, "all_reduce", after="reduce_scatter"):  # grad_flat was accumulated there
            self._hop2_work = C.all_reduce(self.grad_flat, self.groups.replication, stats=self.stats, label=self.label)

    def wait_all_reduce(self) -> None:
        if self._hop2_work is not None:
            with _waiting_on(self.streams, "all_reduce"):
                self._hop2_work.wait()
            self._hop2_work = None

    def join_streams(self) -> None:
        """The compute stream waits for this unit's gradient work (before the optimizer reads grad_flat)."""
        if self.streams is not None:
            current = self.streams.current()
            current.wait_stream(self.streams.reduce_scatter)
            current.wait_stream(self.streams.all_reduce)
