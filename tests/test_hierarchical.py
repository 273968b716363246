"""Hierarchical collectives: inter-node bytes follow the paper's formulas, and results equal the flat path."""

from __future__ import annotations

import torch
import torch.distributed as dist

import mics_hf
from mics_hf.engine.shard import get_state
from models import global_batches, tiny_gpt2


def _one_unit_bytes(rank: int, world: int, *, k: int, p: int, hierarchical: bool) -> dict:
    """Gather and reduce one transformer block once; return this rank's bytes per (op, link) and the payload."""
    net = mics_hf.shard_model(
        tiny_gpt2(), mics_hf.MiCSConfig(partition_size=p, devices_per_node=k, hierarchical=hierarchical)
    )
    state = get_state(net)
    module, group = state.units[0]
    stats = mics_hf.comm_stats(net)
    stats.reset()
    group.unshard()
    group.wait_unshard()
    gather = {link: stats.bytes[("all_gather", link)] for link in ("intra_node", "inter_node")}
    payload = group.p * group.segment_numel * 4  # fp32 gathered unit, bytes
    for sp in group.params:
        sp.unsharded.grad = torch.ones_like(sp.unsharded)
    stats.reset()
    group.reduce_grads()
    group.wait_reduce()
    reduce = {link: stats.bytes[("reduce_scatter", link)] for link in ("intra_node", "inter_node")}
    group.reshard()
    node_inter = torch.tensor([gather["inter_node"], reduce["inter_node"]], dtype=torch.float64)
    # per node: sum over the ranks of my node (nodes are contiguous blocks of k ranks here)
    node_id = rank // k
    all_inter = [torch.zeros_like(node_inter) for _ in range(world)]
    dist.all_gather(all_inter, node_inter)
    per_node = sum(all_inter[r] for r in range(world) if r // k == node_id)
    return {"gather": gather, "reduce": reduce, "payload": payload, "node_inter": per_node.tolist(), "segment": group.segment_numel * 4}


def test_inter_node_bytes_match_the_paper(pools):
    pool = pools(8)
    for k, p in [(2, 4), (2, 8), (4, 8)]:
        m = p // k
        hier = pool.run(_one_unit_bytes, k=k, p=p, hierarchical=True)
        flat = pool.run(_one_unit_bytes, k=k, p=p, hierarchical=False)
        for h, f in zip(hier, flat):
            stage_payload = m * h["segment"]  # the inter-node stage gathers m shards
            assert h["gather"]["inter_node"] == (m - 1) * stage_payload // m  # (p/k - 1)/(p/k) of the stage
            assert h["reduce"]["inter_node"] == (m - 1) * stage_payload // m  # the mirror for gradients
            # per node: (p - k)/p of the message instead of (p - 1)/p
            assert h["node_inter"][0] == (p - k) * h["payload"] / p
            assert f["node_inter"][0] == (p - 1) * f["payload"] / p
            assert h["node_inter"][1] == (p - k) * h["payload"] / p
            # a rank sends the same total, (m-1)S + (k-1)mS = (p-1)S; only which links carry it changes
            assert sum(h["gather"].values()) == sum(f["gather"].values()) == (p - 1) * h["segment"]


def _train(rank: int, world: int, *, hierarchical: bool) -> dict:
    net = mics_hf.shard_model(tiny_gpt2(), mics_hf.MiCSConfig(partition_size=4, devices_per_node=2, hierarchical=hierarchical))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, eps=1e-4)
    data = global_batches(steps=3, accum=1, world=world, micro=2)
    losses = []
    for step in range(3):
        loss = net(input_ids=data[step, 0, rank], labels=data[step, 0, rank]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "state": mics_hf.full_state_dict(net, rank0_only=False)}


def test_hierarchical_results_equal_flat(pools):
    pool = pools(8)
    hier = pool.run(_train, hierarchical=True)
    flat = pool.run(_train, hierarchical=False)
    for h, f in zip(hier, flat):
        assert max(abs(a - b) for a, b in zip(h["losses"], f["losses"])) <= 1e-6
        for key, ref in f["state"].items():
            diff = (h["state"][key] - ref).abs().max().item()
            assert diff <= 1e-5 * max(ref.abs().max().item(), 1e-3), key  # summation order differs
