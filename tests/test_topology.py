"""Rank arithmetic, checked by hand against the paper's layout (no processes needed)."""

from __future__ import annotations

import pytest

from mics_hf.engine.topology import build_topology, node_map_from_devices_per_node


def topo(world: int, k: int, p: int | None, rank: int = 0, hierarchical="auto"):
    return build_topology(
        world_size=world, rank=rank, node_of_rank=node_map_from_devices_per_node(world, k), partition_size=p,
        hierarchical=hierarchical,
    )


def test_groups_two_nodes_of_two_partition_four():
    t = topo(8, 2, 4)
    assert t.partition_groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert t.replication_groups == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert t.intra_node_groups == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert t.inter_node_groups == ((0, 2), (1, 3), (4, 6), (5, 7))
    assert t.hierarchical and t.nodes_per_partition == 2 and t.replication_size == 2


def test_partition_inside_a_node_is_flat_and_default_is_one_node():
    t = topo(8, 4, None)
    assert t.partition_size == 4 and not t.hierarchical
    assert t.partition_groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert topo(8, 4, 2).partition_groups == ((0, 1), (2, 3), (4, 5), (6, 7))


def test_degenerate_cases_ddp_and_zero3():
    ddp = topo(4, 2, 1)
    assert ddp.partition_groups == ((0,), (1,), (2,), (3,)) and ddp.replication_groups == ((0, 1, 2, 3),)
    zero3 = topo(4, 2, 4, hierarchical=False)
    assert zero3.partition_groups == ((0, 1, 2, 3),) and zero3.replication_groups == ((0,), (1,), (2,), (3,))


def test_hierarchical_chunk_order_is_inter_then_intra():
    # rank 0: intra group (0, 1); inter groups (0, 2) and (1, 3) -> chunks hold positions 0, 2, 1, 3
    assert topo(8, 2, 4, rank=0).hierarchical_chunk_order() == (0, 2, 1, 3)
    # 4 nodes of 2, p = 8: inter groups (0,2,4,6) and (1,3,5,7)
    assert topo(8, 2, 8, rank=5).hierarchical_chunk_order() == (0, 2, 4, 6, 1, 3, 5, 7)
    # 2 nodes of 4, p = 8: intra (0..3), inter (0,4) (1,5) (2,6) (3,7)
    assert topo(8, 4, 8, rank=2).hierarchical_chunk_order() == (0, 4, 1, 5, 2, 6, 3, 7)


def test_scattered_placement_is_grouped_by_node_not_by_rank():
    # ranks 0 and 2 on node 0, ranks 1 and 3 on node 1 (a round-robin launcher)
    t = build_topology(world_size=4, rank=1, node_of_rank=(0, 1, 0, 1), partition_size=2)
    assert t.partition_groups == ((0, 2), (1, 3))  # each group inside one node
    assert t.replication_groups == ((0, 1), (2, 3))
    assert t.position == 0 and t.partition_group == (1, 3)
    t4 = build_topology(world_size=4, rank=1, node_of_rank=(0, 1, 0, 1), partition_size=4)
    assert t4.intra_node_groups == ((0, 2), (1, 3)) and t4.inter_node_groups == ((0, 1), (2, 3))
    # position order is the sorted group (0, 1, 2, 3); chunks: intra (1, 3) x inter (0, 1) / (2, 3)
    assert t4.hierarchical_chunk_order() == (0, 1, 2, 3)
    t4b = build_topology(world_size=4, rank=0, node_of_rank=(0, 1, 0, 1), partition_size=4)
    assert t4b.hierarchical_chunk_order() == (0, 1, 2, 3)


@pytest.mark.parametrize(
    "world, k, p, expected",
    [
        (8, 2, 3, "does not divide the world size 8"),
        (12, 4, 6, "covers part of a node"),
        (8, 2, 2, None),
    ],
)
def test_partition_size_errors_list_what_works(world, k, p, expected):
    if expected is None:
        topo(world, k, p)
        return
    with pytest.raises(ValueError, match=expected) as info:
        topo(world, k, p)
    assert "partition sizes that work" in str(info.value)


def test_hierarchical_true_needs_several_nodes():
    with pytest.raises(ValueError, match="spans several nodes"):
        topo(8, 8, 8, hierarchical=True)
    with pytest.raises(ValueError, match="spans several nodes"):
        topo(8, 2, 2, hierarchical=True)


def test_devices_per_node_must_divide_world():
    with pytest.raises(ValueError, match=r"devices_per_node=3 does not divide the world size 8; use one of \[1, 2, 4, 8\]"):
        node_map_from_devices_per_node(8, 3)


def test_unequal_nodes_are_rejected():
    with pytest.raises(ValueError, match="different numbers of ranks"):
        build_topology(world_size=4, rank=0, node_of_rank=(0, 0, 0, 1), partition_size=None)


def test_cli_prints_groups_and_rejects_bad_layouts(capsys):
    from mics_hf.cli import main

    assert main(["topology", "--world-size", "8", "--devices-per-node", "2", "--partition-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "inter-node groups : [[0, 2], [1, 3], [4, 6], [5, 7]]" in out and "2/4 of the gathered size" in out
    assert main(["topology", "--world-size", "8", "--devices-per-node", "2", "--partition-size", "3"]) == 2
    assert "partition sizes that work: [1, 2, 4, 8]" in capsys.readouterr().err
