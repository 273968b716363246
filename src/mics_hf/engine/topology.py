"""Rank arithmetic: which ranks form partition, replication, intra-node and inter-node groups.

Everything except `create_process_groups` is pure arithmetic on a rank -> node map, so it can be unit-tested
without processes and validated before any collective runs.

[Note: partition order] Ranks are ordered by (node, rank) and cut into consecutive runs of p. With the usual
contiguous placement this is the paper's [[0..p-1], [p..2p-1], ...]; with a scattered placement it still gives
groups that sit inside one node or cover whole nodes. Inside a partition group, a rank's *position* (the
shard it owns) is its index in the sorted group, which is its rank in the process group torch.distributed
creates. A hierarchical collective leaves shards in another order; `Topology.hierarchical_chunk_order` gives it,
and copy-in / copy-out read through it instead of paying an extra permuting copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["Topology", "ProcessGroups", "build_topology", "node_map_from_devices_per_node", "create_process_groups"]


def world_and_rank() -> tuple[int, int]:
    """(world size, rank) of the default process group, or (1, 0) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def require_divides(setting: str, value: int, total: int, of: str, *, choices: str = "use one of") -> None:
    """Raise ValueError unless `value` divides `total`, listing every value that does (e.g. partition sizes).

    `setting` names the user's knob ("partition_size", "--mics partition_size"), `of` what it must divide
    ("the world size 8", "num_processes=4"); `choices` introduces the list of divisors.
    """
    if total % value != 0:
        divisors = [d for d in range(1, total + 1) if total % d == 0]
        raise ValueError(f"{setting}={value} does not divide {of}; {choices} {divisors}")


def node_map_from_devices_per_node(world_size: int, devices_per_node: int) -> tuple[int, ...]:
    """Contiguous placement: ranks [0..k-1] on node 0, [k..2k-1] on node 1, ... (what launchers do)."""
    require_divides("devices_per_node", devices_per_node, world_size, f"the world size {world_size}")
    return tuple(r // devices_per_node for r in range(world_size))


@dataclass(frozen=True)
class Topology:
    """The groups one rank takes part in, plus the whole layout for accounting and error messages."""

    world_size: int
    rank: int
    node_of_rank: tuple[int, ...]
    devices_per_node: int
    partition_size: int
    hierarchical: bool
    partition_groups: tuple[tuple[int, ...], ...]
    replication_groups: tuple[tuple[int, ...], ...]
    # For hierarchical groups only (empty otherwise): per partition group, its per-node and per-local-index parts.
    intra_node_groups: tuple[tuple[int, ...], ...] = ()
    inter_node_groups: tuple[tuple[int, ...], ...] = ()
    extras: dict = field(default_factory=dict, compare=False)

    @property
    def num_partition_groups(self) -> int:
        return self.world_size // self.partition_size

    @property
    def replication_size(self) -> int:
        return self.world_size // self.partition_size

    @property
    def num_nodes(self) -> int:
        return len(set(self.node_of_rank))

    @property
    def nodes_per_partition(self) -> int:
        """m = p / k when a partition group spans whole nodes, else 1."""
        return max(1, self.partition_size // self.devices_per_node)

    def partition_group_of(self, rank: int) -> tuple[int, ...]:
        return next(g for g in self.partition_groups if rank in g)

    def replication_group_of(self, rank: int) -> tuple[int, ...]:
        return next(g for g in self.replication_groups if rank in g)

    def intra_node_group_of(self, rank: int) -> tuple[int, ...]:
        return next(g for g in self.intra_node_groups if rank in g)

    def inter_node_group_of(self, rank: int) -> tuple[int, ...]:
        return next(g for g in self.inter_node_groups if rank in g)

    @property
    def partition_group(self) -> tuple[int, ...]:
        return self.partition_group_of(self.rank)

    @property
    def replication_group(self) -> tuple[int, ...]:
        return self.replication_group_of(self.rank)

    @property
    def position(self) -> int:
        """This rank's shard index inside its partition group."""
        return self.partition_group.index(self.rank)

    def hierarchical_chunk_order(self, rank: int | None = None) -> tuple[int, ...]:
        """Positions of the shards in the order a hierarchical all-gather leaves them (see module note).

        Stage 1 gathers inside the inter-node group, stage 2 inside the intra-node group, so output chunk
        a * m + b is the shard of the b-th rank of the inter-node group of the a-th rank of my intra-node group.
        The hierarchical reduce-scatter consumes its input in this same order.
        """
        rank = self.rank if rank is None else rank
        partition = self.partition_group_of(rank)
        chunks = []
        for local in self.intra_node_group_of(rank):
            chunks.extend(partition.index(r) for r in self.inter_node_group_of(local))
        return tuple(chunks)

    def spans_nodes(self, ranks: Sequence[int]) -> bool:
        return len({self.node_of_rank[r] for r in ranks}) > 1

    def describe(self) -> str:
        return (
            f"world={self.world_size}, nodes={self.num_nodes} x devices_per_node={self.devices_per_node}, "
            f"partition_size={self.partition_size} ({self.num_partition_groups} partition group(s)), "
            f"replication_size={self.replication_size}, hierarchical={self.hierarchical}"
        )


def _valid_partition_sizes(world_size: int, devices_per_node: int) -> list[int]:
    inside = [p for p in range(1, devices_per_node + 1) if devices_per_node % p == 0]
    whole_nodes = [
        devices_per_node * m
        for m in range(2, world_size // devices_per_node + 1)
        if world_size % (devices_per_node * m) == 0
    ]
    return inside + whole_nodes


def build_topology(
    *,
    world_size: int,
    rank: int,
    node_of_rank: Sequence[int],
    partition_size: int | None,
    hierarchical: str | bool = "auto",
) -> Topology:
    """Validate the layout and compute every group. Raises ValueError naming the values that would work."""
    nodes = tuple(node_of_rank)
    if len(nodes) != world_size:
        raise ValueError(
            f"the rank -> node map lists {len(nodes)} ranks but the world has {world_size}; give one node per rank"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the world of {world_size} ranks")
    counts: dict[int, int] = {}
    for n in nodes:
        counts[n] = counts.get(n, 0) + 1
    per_node = set(counts.values())
    if len(per_node) != 1:
        raise ValueError(
            f"nodes hold different numbers of ranks ({dict(sorted(counts.items()))}); MiCS needs the same number "
            "of devices on every node: launch the same --nproc_per_node everywhere"
        )
    k = per_node.pop()
    p = k if partition_size is None else partition_size
    valid = _valid_partition_sizes(world_size, k)
    if world_size % p != 0:
        raise ValueError(
            f"partition_size={p} does not divide the world size {world_size} "
            f"({len(counts)} node(s) x {k} devices); partition sizes that work: {valid}"
        )
    if p not in valid:
        raise ValueError(
            f"partition_size={p} covers part of a node: with {k} devices per node a partition group must fit "
            f"inside one node (p divides {k}) or be a whole number of nodes (p a multiple of {k}); "
            f"partition sizes that work: {valid}"
        )
    spans = p > k
    if hierarchical is True and not spans:
        raise ValueError(
            f"hierarchical=True needs a partition group that spans several nodes, but partition_size={p} fits "
            f"inside one node of {k} devices; use hierarchical='auto' or False, or partition_size in "
            f"{[v for v in valid if v > k] or 'none (one node only)'}"
        )
    if hierarchical is True and k == 1:
        raise ValueError(
            "hierarchical=True needs more than one device per node (k = 1 makes it the flat all-gather); "
            "use hierarchical='auto'"
        )
    use_hier = spans and k > 1 if hierarchical == "auto" else bool(hierarchical)

    order = sorted(range(world_size), key=lambda r: (nodes[r], r))
    # Each group is stored sorted because torch.distributed numbers a group's ranks in sorted order: a rank's
    # position (shard index) is its index in the sorted partition group, i.e. its rank in that process group.
    partition_groups = tuple(tuple(sorted(order[i : i + p])) for i in range(0, world_size, p))
    replication_groups = tuple(tuple(sorted(g[q] for g in partition_groups)) for q in range(p))
    intra: list[tuple[int, ...]] = []
    inter: list[tuple[int, ...]] = []
    if use_hier:
        for g in partition_groups:
            per_node = [tuple(sorted(r for r in g if nodes[r] == n)) for n in sorted({nodes[r] for r in g})]
            intra.extend(per_node)
            inter.extend(tuple(sorted(part[l] for part in per_node)) for l in range(k))
    return Topology(
        world_size=world_size,
        rank=rank,
        node_of_rank=nodes,
        devices_per_node=k,
        partition_size=p,
        hierarchical=use_hier,
        partition_groups=partition_groups,
        replication_groups=replication_groups,
        intra_node_groups=tuple(intra),
        inter_node_groups=tuple(inter),
    )


@dataclass
class ProcessGroups:
    """The process groups this rank uses; None where the group is a single rank (no communication)."""

    partition: dist.ProcessGroup | None
    replication: dist.ProcessGroup | None
    intra_node: dist.ProcessGroup | None
    inter_node: dist.ProcessGroup | None
    # hop 1's own communicators over the same ranks (MiCSConfig.separate_reduce_group), else None
    reduce_partition: dist.ProcessGroup | None = None
    reduce_intra_node: dist.ProcessGroup | None = None
    reduce_inter_node: dist.ProcessGroup | None = None


_GROUP_CACHE: dict[tuple, dist.ProcessGroup] = {}


def world_timeout() -> timedelta | None:
    """The timeout the default group was created with, so MiCS's groups fail as fast as the user asked.

    torch's new_group otherwise falls back to the backend default (30 minutes for gloo), which would turn a
    dead rank into a half-hour hang. The value is read from the backend's options; None if not exposed.
    """
    try:
        world = dist.group.WORLD
        backend = world._get_backend(torch.device("cuda" if dist.get_backend() == "nccl" else "cpu"))
        return backend.options._timeout
    except (AttributeError, RuntimeError):
        return None


def _new_group_everywhere(groups: Sequence[tuple[int, ...]], rank: int, purpose: str = "") -> dist.ProcessGroup | None:
    """Every rank calls new_group for every group, in the same order (a requirement of torch.distributed).

    Groups are cached by (purpose, ranks): a second communicator over the same ranks has its own purpose.
    """
    mine = None
    timeout = world_timeout()
    for ranks in groups:
        if len(ranks) == 1:
            continue
        key = (purpose, *ranks) if purpose else ranks
        if key not in _GROUP_CACHE:
            _GROUP_CACHE[key] = dist.new_group(list(ranks), timeout=timeout)
        if rank in ranks:
            mine = _GROUP_CACHE[key]
    return mine


def create_process_groups(topology: Topology, *, separate_reduce: bool = False) -> ProcessGroups:
    """Create (or reuse) the groups of `topology`; a world of one creates none.

    separate_reduce: also create hop 1's own partition (and intra- / inter-node) groups, so that reduce-scatters
    run on communicators of their own and never queue behind all-gathers.
    """
    if topology.world_size == 1:
        return ProcessGroups(None, None, None, None)
    r = topology.rank
    if len(topology.partition_groups) == 1 and topology.partition_size == topology.world_size:
        partition = dist.group.WORLD
    else:
        partition = _new_group_everywhere(topology.partition_groups, r)
    replication = _new_group_everywhere(topology.replication_groups, r)
    intra = _new_group_everywhere(topology.intra_node_groups, r) if topology.hierarchical else None
    inter = _new_group_everywhere(topology.inter_node_groups, r) if topology.hierarchical else None
    groups = ProcessGroups(partition=partition, replication=replication, intra_node=intra, inter_node=inter)
    if separate_reduce:
        groups.reduce_partition = _new_group_everywhere(topology.partition_groups, r, "reduce")
        if topology.hierarchical:
            groups.reduce_intra_node = _new_group_everywhere(topology.intra_node_groups, r, "reduce")
            groups.reduce_inter_node = _new_group_everywhere(topology.inter_node_groups, r, "reduce")
    return groups


def created_groups() -> list[dist.ProcessGroup]:
    """The groups MiCS made with new_group (never the default group), newest first, for teardown."""
    return list(reversed(_GROUP_CACHE.values()))


def clear_group_cache() -> None:
    """Forget cached groups (after destroy_process_group, e.g. in tests that re-initialise)."""
    _GROUP_CACHE.clear()
