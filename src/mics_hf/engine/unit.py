"""One unit's communication: its sharded parameters, reused flat buffers, unshard / reshard / gradient reduction.

[Note: sharding layout] Every parameter is cut along dim 0 into p blocks of `rows = ceil(d0 / p)` rows (the
last blocks may be short or empty). Position q holds rows [q*rows, (q+1)*rows) as a real fp32 tensor: the
optimizer, state dicts and resharding see ordinary tensors. For communication each rank lays its blocks of
all the unit's parameters, each padded to `rows` rows, side by side in one flat segment of S elements; the
all-gather output is p such segments, and copy-out writes each parameter's p blocks into its own padded
unsharded storage. The reduce-scatter input has the same layout built from the unsharded gradients of the
trainable parameters only: frozen parameters are gathered but never reduced and hold no gradient memory.

[Note: the hot path] Per unit and step, in steady state: the all-gather output comes from the BufferPool
(buffers.py) and the gather runs in place (this rank's segment is a view of the output, hierarchical stages
included); copy-in is one `_foreach_copy_` (shards and tag, cast to the compute dtype on the way), copy-out one
`split_with_sizes_copy` into the unit's unsharded storage, reading the hierarchical chunk order through a
transposed view of the gathered chunks (the order of contiguous node placements; any other order falls back to
a copy per parameter). The reduce-scatter's copy-in is one `_chunk_cat`, which pads each gradient to p blocks as it
copies (no `F.pad`) and casts to the reduce dtype; a hierarchical order adds one `index_select` into the
input. All the unit's unsharded parameters live in one storage, grown and freed as one.

[Note: gradient scaling] Hop 1 sums a unit's gradients over the partition group and adds sum / p to the shard
gradient (the 1/p is the alpha of that same addition: scaling costs no pass of its own); hop 2 sums the shard
gradient over the replication group and divides by r. Because hop 2 averages the whole accumulated shard
gradient, a part that an earlier synced backward already averaged (identical on every replica) passes through
unchanged, and only the new contributions are averaged: every synced backward adds its gradients exactly once,
with or without no_sync(), as DDP's averaging does. The reduce-scatter itself is a SUM: gloo has no
PREMUL_SUM, and its AVG would still need the fp32 accumulation, so it would save nothing.

[Note: persistent unsharded parameters] Each parameter has one unsharded nn.Parameter for the model's whole
life, a view of the unit's storage; reshard() frees that storage (resize to 0) and unshard() re-grows and
refills it. Keeping the object lets autograd (and activation checkpointing, which re-runs forward during
backward) always see the same leaf, so gradients land on it whatever happened in between. Refilling goes
through `_unsafe_preserve_version_counter` because autograd must not take the refill for an in-place edit.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn

from ..config import MixedPrecisionPolicy
from . import collectives as C
from .buffers import BufferPool, GatheredUnits
from .streams import CommStreams, on_stream as _on, waiting_on as _waiting_on
from .tags import TAG_NUMEL, TagChecks, sum_tag_modulus
from .topology import Topology

__all__ = ["ShardedParam", "ShardedUnit", "UnitGroups", "ShardState", "CommStreams", "TagChecks", "TAG_NUMEL"]

_HOP2_TAG_MODULUS = sum_tag_modulus(torch.float32, 1)  # hop 2 sums the fp32 / fp64 shard gradient


class ShardState(enum.Enum):
    SHARDED = "sharded"
    GATHERING = "gathering"  # all-gather in flight (prefetch)
    UNSHARDED = "unsharded"


@dataclass(frozen=True)
class UnitGroups:
    """The collective groups a unit uses, with accounting info (see collectives.CommGroup).

    The reduce_* groups, when set, are a second communicator over the same ranks for hop 1, so that
    reduce-scatters never queue behind all-gathers (MiCSConfig.separate_reduce_group).
    """

    partition: C.CommGroup
    replication: C.CommGroup
    intra_node: C.CommGroup | None
    inter_node: C.CommGroup | None
    chunk_order: tuple[int, ...]  # positions in the order the (hierarchical) all-gather leaves them
    reduce_partition: C.CommGroup | None = None
    reduce_intra_node: C.CommGroup | None = None
    reduce_inter_node: C.CommGroup | None = None

    @property
    def hierarchical(self) -> bool:
        return self.intra_node is not None

    def for_reduce(self) -> tuple[C.CommGroup, C.CommGroup | None, C.CommGroup | None]:
        """(partition, intra-node, inter-node) groups of hop 1."""
        if self.reduce_partition is None:
            return self.partition, self.intra_node, self.inter_node
        return self.reduce_partition, self.reduce_intra_node, self.reduce_inter_node


def shard_rows(dim0: int, p: int, position: int) -> tuple[int, int]:
    """The rows [start, stop) of a dim-0 size `dim0` that position `position` of p holds ([Note: sharding layout])."""
    rows = -(-dim0 // p)
    start = min(position * rows, dim0)
    return start, min(start + rows, dim0)


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
        self.numel = param.numel()
        self.dims = tuple(param.shape) or (1,)
        self.dim0 = self.dims[0]
        self.row_numel = math.prod(self.dims[1:])
        self.rows = -(-self.dim0 // p)  # ceil
        self.padded_len = self.rows * self.row_numel  # elements of one block in the flat segment
        start, stop = self.offsets = shard_rows(self.dim0, p, position)
        device = device if device is not None else param.device
        if local is None:
            local = param.detach().reshape(self.dims)[start:stop]
            owned = False  # a view of the user's parameter: copied
        elif tuple(local.shape) != (stop - start, *self.dims[1:]):
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
        self.aliased = p == 1 and policy.compute_dtype == policy.master_dtype
        if self.aliased:
            self.padded = self.sharded.data.view(1, -1)
            self.unsharded = nn.Parameter(self.sharded.data.view(param.shape), requires_grad=param.requires_grad)
        else:  # its own storage until the unit binds it into the unit's (ShardedUnit.__init__)
            self.bind(torch.empty(p, self.padded_len, dtype=policy.compute_dtype, device=device))
        self.segment_offset = 0  # in the all-gather segment; set by ShardedUnit
        self.grad_offset = -1  # in the reduce-scatter segment and grad_flat; -1 while frozen

    def bind(self, padded: torch.Tensor) -> None:
        """Make the unsharded parameter a view of `padded` (p, padded_len): its storage from now on."""
        self.padded = padded
        self.unsharded = nn.Parameter(padded.view(-1)[: self.numel].view(self.global_shape), requires_grad=self.sharded.requires_grad)

    @property
    def requires_grad(self) -> bool:
        """Trainable or frozen, as the user sees it: the flag of the shard that model.parameters() returns."""
        return self.sharded.requires_grad

    def point_modules_to(self, tensor: nn.Parameter) -> None:
        for module, name in self.uses:
            module._parameters[name] = tensor


def _is_transpose(order: tuple[int, ...], rows: int) -> bool:
    """True if chunk a * B + b holds position b * A + a (A = rows, B = p / A): the hierarchical order of
    contiguous nodes, which a transposed view of the gathered chunks reads in position order."""
    p = len(order)
    if p % rows:
        return False
    a_n, b_n = rows, p // rows
    return all(order[a * b_n + b] == b * a_n + a for a in range(a_n) for b in range(b_n))


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
        pool: BufferPool | None = None,
        gathered: GatheredUnits | None = None,
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
        self.pool = pool if pool is not None else BufferPool(device)
        self.gathered = gathered  # the count of gathered units this unit takes part in (None: the root's)
        offset = 0
        for sp in params:
            sp.segment_offset = offset
            offset += sp.padded_len
        self.segment_numel = offset + TAG_NUMEL
        self.state = ShardState.SHARDED
        self._gather_work: C.Work | None = None
        self._gather_out: torch.Tensor | None = None
        self._reduce_work: C.Work | None = None
        self._reduce_bufs: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self._hop2_work: C.Work | None = None
        self._unsynced = False  # hop 1 added gradients that hop 2 has not averaged across the replicas yet
        order = groups.chunk_order
        self._my_chunk = order.index(topology.position) if self.p > 1 else 0
        self._order = None if order == tuple(range(self.p)) else torch.tensor(order, device=device)
        compute = policy.compute_dtype
        # the sum tag of hop 1 travels in the gradients' dtype and is summed in the reduce dtype: exact in both
        self._rs_modulus = min(sum_tag_modulus(compute, self.p), sum_tag_modulus(policy.gradient_reduce_dtype, self.p))
        self._tags: dict[tuple, torch.Tensor] = {}
        self._make_tags()  # on the compute stream, before any side stream reads them
        self._bind_storage(groups)
        self._send_views: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._trainable_flags: tuple[bool, ...] | None = None
        self._grad_flat: torch.Tensor | None = None
        self.refresh_trainable()

    def _bind_storage(self, groups: UnitGroups) -> None:
        """One storage for every unsharded parameter of the unit, and the copy-out targets into it."""
        p, compute = self.p, self.policy.compute_dtype
        owned = [sp for sp in self.params if not sp.aliased]
        self._unsharded = tuple(sp.unsharded for sp in self.params)
        self._storage: torch.Tensor | None = None
        self._copy_out_targets: list[torch.Tensor] | None = None
        self._gathered_tags = torch.zeros(p, TAG_NUMEL, dtype=compute, device=self.device)
        if not owned:
            return
        self._storage = torch.empty(sum(p * sp.padded_len for sp in owned), dtype=compute, device=self.device)
        self._storage_nbytes = self._storage.numel() * self._storage.element_size()
        offset = 0
        for sp in owned:
            sp.bind(self._storage[offset : offset + p * sp.padded_len].view(p, sp.padded_len))
            offset += p * sp.padded_len
        self._unsharded = tuple(sp.unsharded for sp in self.params)
        self._split_sizes = [sp.padded_len for sp in self.params] + [TAG_NUMEL]
        if p == 1:  # copy-in straight from the shards: one _foreach_copy_ into views shaped like them
            self._local_targets = [sp.padded.view(sp.sharded.shape) for sp in self.params]
            self._local_sources = [sp.sharded for sp in self.params]
        elif self._order is None:
            self._grid = None
            self._copy_out_targets = [sp.padded for sp in self.params] + [self._gathered_tags]
        else:  # the source is read through a transposed view; the targets stay contiguous
            rows = groups.intra_node.size if groups.intra_node is not None else 1
            if _is_transpose(groups.chunk_order, rows):
                self._grid = (rows, p // rows)
                self._copy_out_targets = [sp.padded.view(p // rows, rows, sp.padded_len) for sp in self.params]
                self._copy_out_targets.append(self._gathered_tags.view(p // rows, rows, TAG_NUMEL))
        self._free_storage()

    def _alloc_storage(self) -> None:
        if self._storage is not None and self._storage.untyped_storage().size() != self._storage_nbytes:
            self._storage.untyped_storage().resize_(self._storage_nbytes)

    def _free_storage(self) -> None:
        if self._storage is not None:
            self._storage.untyped_storage().resize_(0)

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
        self._grad_views: list[torch.Tensor] = []
        with torch.no_grad():
            for sp, view in zip(self.trainable, self.grad_views if kept else []):
                grad = kept.get(id(sp))
                if grad is not None:
                    view.copy_(grad)
                    sp.sharded.grad = view
            for sp in self.params:
                if not sp.requires_grad:
                    sp.sharded.grad = None
        self._trainable_flags = flags
        return True

    @property
    def grad_flat(self) -> torch.Tensor:
        """The accumulated fp32 shard gradient of the trainable parameters (+ the tag), zeros until reduced into."""
        if self._grad_flat is None:
            self._grad_flat = torch.zeros(self.grad_numel + TAG_NUMEL, dtype=self.policy.master_dtype, device=self.device)
            # the shards' .grad are these views; identity with them says nothing replaced or dropped a gradient
            self._grad_views = [
                self._grad_flat[sp.grad_offset : sp.grad_offset + sp.local_numel].view(sp.sharded.shape) for sp in self.trainable
            ]
        return self._grad_flat

    @property
    def grad_views(self) -> list[torch.Tensor]:
        self.grad_flat  # noqa: B018  (allocates the buffer and its views on first use)
        return self._grad_views

    # ---- unshard / reshard -------------------------------------------------------------------------------
    def unshard(self) -> None:
        """Start the all-gather of this unit (no-op if it is in flight or done)."""
        if self.state is not ShardState.SHARDED:
            return
        if self.gathered is not None:
            self.gathered.add()
        self.state = ShardState.GATHERING
        if self.p == 1:  # nothing to gather: wait_unshard copies (or aliases) the local shard
            return
        dtype, seg = self.policy.compute_dtype, self.segment_numel
        with _on(self.streams, "all_gather"), torch.no_grad():
            out = self.pool.acquire("all_gather", self.p * seg, dtype)
            send = out[self._my_chunk * seg : (self._my_chunk + 1) * seg]  # in place: this rank's slot
            targets, sources = self._copy_in_views(out, send, dtype)
            torch._foreach_copy_(targets, sources)
            if self.groups.hierarchical:
                m = self.groups.inter_node.size
                block = self._my_chunk // m  # this rank's index in its intra-node group
                self._gather_work = C.hierarchical_all_gather(
                    out, send, inter=self.groups.inter_node, intra=self.groups.intra_node, stats=self.stats,
                    label=self.label, staged=out[block * m * seg : (block + 1) * m * seg],
                )
            else:
                self._gather_work = C.all_gather(out, send, self.groups.partition, stats=self.stats, label=self.label)
        self._gather_out = out

    def _copy_in_views(self, out: torch.Tensor, send: torch.Tensor, dtype: torch.dtype) -> tuple[list, list]:
        """Views of this rank's slot shaped like the shards (and the tag), per pooled buffer, made once."""
        key = out.data_ptr()
        if key not in self._send_views:
            targets = [send[sp.segment_offset : sp.segment_offset + sp.local_numel].view(sp.sharded.shape) for sp in self.params]
            self._send_views[key] = (targets + [send[-TAG_NUMEL:]], [sp.sharded for sp in self.params] + [self._gather_tag(dtype)])
        return self._send_views[key]

    def wait_unshard(self) -> None:
        """Finish the all-gather, copy out into the unsharded parameters and point the modules at them."""
        if self.state is ShardState.UNSHARDED:
            return
        if self.state is ShardState.SHARDED:
            self.unshard()
        if self.p == 1:
            if self._storage is not None:
                with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(self._unsharded):
                    self._alloc_storage()
                    torch._foreach_copy_(self._local_targets, self._local_sources)
            self._point_modules_at_unsharded()
            return
        assert self._gather_work is not None and self._gather_out is not None
        with self.stats.exposed("all_gather", self.device):
            self._gather_work.wait()
        out, self._gather_out, self._gather_work = self._gather_out, None, None
        with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(self._unsharded):
            self._alloc_storage()
            self._copy_out(out)
        self.checks.gathered(self, self._gathered_tags, self._gather_tag(out.dtype))
        self.pool.release("all_gather", out)  # on the compute stream, after the copy-out that read it
        self._point_modules_at_unsharded()

    def _copy_out(self, out: torch.Tensor) -> None:
        """The gathered chunks into the unsharded storage, in position order ([Note: the hot path])."""
        seg = self.segment_numel
        if self._copy_out_targets is not None:
            # hierarchical: chunk a * B + b is position b * A + a, so the transposed (B, A) view is position order
            src = out.view(self.p, seg) if self._order is None else out.view(*self._grid, seg).transpose(0, 1)
            torch.split_with_sizes_copy(src, self._split_sizes, dim=-1, out=self._copy_out_targets)
            return
        gathered = out.view(self.p, seg)  # an order that is no grid: chunk c is position order[c]
        for sp in self.params:
            sp.padded.index_copy_(0, self._order, gathered[:, sp.segment_offset : sp.segment_offset + sp.padded_len])
        self._gathered_tags.copy_(gathered[:, -TAG_NUMEL:])

    def _point_modules_at_unsharded(self) -> None:
        for sp in self.params:
            sp.point_modules_to(sp.unsharded)
        self.state = ShardState.UNSHARDED

    def reshard(self) -> None:
        """Point the modules back at the shards and free the unsharded storage."""
        if self.state is ShardState.GATHERING:
            self.wait_unshard()  # never leave a collective un-waited; its buffer goes back to the pool
        if self.state is ShardState.SHARDED:
            return
        for sp in self.params:
            sp.point_modules_to(sp.sharded)
        self._free_storage()
        self.state = ShardState.SHARDED
        if self.gathered is not None:
            self.gathered.remove()

    # ---- tags ([Note: collective tags] in tags.py) ---------------------------------------------------------
    def _make_tags(self) -> None:
        compute, reduce, master = self.policy.compute_dtype, self.policy.gradient_reduce_dtype, self.policy.master_dtype
        self._gather_tag(compute)
        if self._rs_modulus >= 2:
            tag = self._sum_tag(compute, self._rs_modulus)
            self._tags[("rows", compute)] = tag.repeat(self.p, 1)  # the tag column of the reduce-scatter input
            self._expected_sum(reduce, self._rs_modulus, self.p)
        self._expected_sum(master, _HOP2_TAG_MODULUS, self.topology.replication_size)
        # hop 2's 1/r as a device scalar: a Python float would become a new tensor on every call
        self._tag(("1/r", master), 1.0 / self.topology.replication_size, master)

    def _gather_tag(self, dtype: torch.dtype) -> torch.Tensor:
        # copied, never summed: (index + 1) in base 256 is exact in every float dtype, bf16 included
        t = self.index + 1
        return self._tag(("gather", dtype), [t % 256, t // 256], dtype)

    def _sum_tag(self, dtype: torch.dtype, modulus: int) -> torch.Tensor:
        t = 1 + self.index % modulus
        return self._tag(("sum", dtype, modulus), [t, t * t], dtype)

    def _expected_sum(self, dtype: torch.dtype, modulus: int, ranks: int) -> torch.Tensor:
        t = 1 + self.index % modulus
        return self._tag(("sums", dtype, modulus, ranks), [ranks * t, ranks * t * t], dtype)

    def _tag(self, key: tuple, values: list[int] | float, dtype: torch.dtype) -> torch.Tensor:
        # made once per dtype on the device (no host-to-device copy per collective); read-only afterwards
        if key not in self._tags:
            self._tags[key] = torch.tensor(values, dtype=dtype, device=self.device)
        return self._tags[key]

    # ---- gradients ---------------------------------------------------------------------------------------
    def reduce_grads(self) -> None:
        """Hop 1: copy the unsharded gradients into the reduce-scatter input and start the reduce-scatter.

        Runs for every unit with trainable parameters whenever the step's structure says so, whether or not
        this rank's data produced gradients (missing ones are zeros), so every rank issues the same collectives.
        Frees the unsharded gradients right away: they never accumulate across micro-steps. The copy-in runs
        where autograd made the gradients (the compute stream), so they are freed in stream order.
        """
        self.wait_reduce()
        if self.grad_numel == 0:  # a frozen unit: nothing is ever reduced
            self._drop_unsharded_grads()
            return
        if self.p == 1:
            self._accumulate_local_grads()
            return
        dtype, p = self.policy.gradient_reduce_dtype, self.p
        segment = self.grad_numel + TAG_NUMEL
        partition, intra, inter = self.groups.for_reduce()
        with torch.no_grad():
            with self.stats.exposed("reduce_scatter", self.device):  # waits only if the buffer is still in use
                full = self.pool.acquire("reduce_scatter_input", p * segment, dtype)
            rows = full.view(p, segment)
            grads = self._grads_and_tag()
            if dtype != grads[0].dtype and full.is_cuda:  # CUDA's _chunk_cat casts nothing: convert first
                grads = [g.to(dtype) for g in grads]
            if self._order is None:
                torch._chunk_cat(grads, 0, p, out=rows)  # pads each gradient to p blocks, casts to `dtype`
            else:  # chunk c must hold position order[c]'s block
                staging = self.pool.acquire("reduce_scatter_staging", p * segment, dtype)
                torch._chunk_cat(grads, 0, p, out=staging.view(p, segment))
                torch.index_select(staging.view(p, segment), 0, self._order, out=rows)
                self.pool.release("reduce_scatter_staging", staging)
            del grads
            self._drop_unsharded_grads()
            with _on(self.streams, "reduce_scatter"):
                out = self.pool.acquire("reduce_scatter_output", segment, dtype)
                staged = None
                if intra is not None:
                    staged = self.pool.acquire("reduce_scatter_staged", inter.size * segment, dtype)
                    work = C.hierarchical_reduce_scatter(
                        out, full, intra=intra, inter=inter, stats=self.stats, label=self.label, staged=staged
                    )
                else:
                    work = C.reduce_scatter(out, full, partition, stats=self.stats, label=self.label)
        self._reduce_work = work
        self._reduce_bufs = (full, out, staged)

    def _grads_and_tag(self) -> list[torch.Tensor]:
        """The trainable parameters' unsharded gradients (zeros where this rank's data reached none) + tag rows."""
        dtype = self.policy.compute_dtype
        grads = []
        for sp in self.trainable:
            grad = sp.unsharded.grad
            if grad is None:  # rare (a parameter this rank's data did not reach): contributes zeros
                grad = torch.zeros(sp.dims, dtype=dtype, device=self.device)
            elif grad.dim() == 0:
                grad = grad.view(1)
            grads.append(grad)
        rows = self._tags.get(("rows", dtype))
        grads.append(rows if rows is not None else torch.zeros(self.p, TAG_NUMEL, dtype=dtype, device=self.device))
        return grads

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
        full, out, staged = self._reduce_bufs
        # on CUDA the accumulation stays on the reduce-scatter stream; the end of backward joins it
        with _waiting_on(self.streams, "reduce_scatter"):
            self._reduce_work.wait()
            self._reduce_work = self._reduce_bufs = None
            if self._rs_modulus >= 2:
                expected = self._expected_sum(out.dtype, self._rs_modulus, self.p)
                self.checks.summed(self, "reduce-scatter", out[-TAG_NUMEL:], expected, self.p)
            self._attach_shard_grads()
            self.grad_flat[: self.grad_numel].add_(out[: self.grad_numel], alpha=1.0 / self.p)
            # released on the reduce-scatter stream: the next user waits for what was queued there so far
            self.pool.release("reduce_scatter_output", out)
            self.pool.release("reduce_scatter_input", full)
            if staged is not None:
                self.pool.release("reduce_scatter_staged", staged)
        self._unsynced = True

    def _accumulate_local_grads(self) -> None:
        """Hop 1 of a partition group of one rank: no communication, add the gradients straight into the shard.

        On CUDA this runs on the reduce-scatter stream, like hop 1 for p > 1, so hop 2 (which waits for that
        stream) never reads grad_flat before the addition is done.
        """
        with _on(self.streams, "reduce_scatter"), torch.no_grad():
            self._attach_shard_grads()
            views, grads = [], []
            for sp, view in zip(self.trainable, self.grad_views):
                grad = sp.unsharded.grad
                if grad is not None:
                    views.append(view)
                    grads.append(grad if grad.dim() else grad.view(1))
                    if self.streams is not None:  # made on the compute stream, read on this one
                        grad.record_stream(self.streams.reduce_scatter)
            if views:
                torch._foreach_add_(views, grads)
            del grads
            self._drop_unsharded_grads()
        self._unsynced = True

    def _attach_shard_grads(self) -> None:
        """Make each trainable shard's .grad a view of grad_flat; zero the buffer if the optimizer dropped them."""
        views = self.grad_views
        if all(sp.sharded.grad is view for sp, view in zip(self.trainable, views)):
            return
        with torch.no_grad():
            for sp, view in zip(self.trainable, views):
                current = sp.sharded.grad
                if current is not None and current.data_ptr() != view.data_ptr():
                    view.copy_(current)  # the user put a gradient there: keep accumulating onto it
                elif current is None:
                    view.zero_()
                sp.sharded.grad = view
            # zero the padding tail of each block so hop 2 and norms never see stale values
            for sp in self.trainable:
                self.grad_flat[sp.grad_offset + sp.local_numel : sp.grad_offset + sp.padded_len].zero_()

    def all_reduce_grads(self) -> None:
        """Hop 2: start the sum of the accumulated shard gradients across the replication group.

        Issued whenever hop 1 added something since the last hop 2 (a structural fact, the same on every rank);
        wait_all_reduce divides by r ([Note: gradient scaling]).
        """
        if self.groups.replication.pg is None or not self._unsynced:
            return
        self._unsynced = False
        with _on(self.streams, "all_reduce", after="reduce_scatter"):  # grad_flat was accumulated there
            self.grad_flat[-TAG_NUMEL:].copy_(self._sum_tag(self.grad_flat.dtype, _HOP2_TAG_MODULUS))
            self._hop2_work = C.all_reduce(self.grad_flat, self.groups.replication, stats=self.stats, label=self.label)

    def wait_all_reduce(self) -> None:
        if self._hop2_work is None:
            return
        with _waiting_on(self.streams, "all_reduce"):
            self._hop2_work.wait()
            r = self.groups.replication.size
            expected = self._expected_sum(self.grad_flat.dtype, _HOP2_TAG_MODULUS, r)
            self.checks.summed(self, "replica all-reduce", self.grad_flat[-TAG_NUMEL:], expected, r)
            self.grad_flat[: self.grad_numel].mul_(self._tag(("1/r", self.grad_flat.dtype), 1.0 / r, self.grad_flat.dtype))
        self._hop2_work = None

    def join_streams(self) -> None:
        """The compute stream waits for this unit's gradient work (before the optimizer reads grad_flat)."""
        if self.streams is not None:
            current = self.streams.current()
            current.wait_stream(self.streams.reduce_scatter)
            current.wait_stream(self.streams.all_reduce)
