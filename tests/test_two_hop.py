"""Two-hop gradient sync: hop 1 (reduce-scatter in the partition group) every micro-step, hop 2 (replica
all-reduce) once per optimizer step; unsharded gradients never accumulate; replicas stay identical."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.distributed as dist

import mics_hf
from mics_hf.engine.shard import get_state
from models import global_batches, tiny_gpt2

STEPS = 2


def _count_calls(rank: int, world: int, *, accum: int, partition_size: int) -> dict:
    net = mics_hf.shard_model(tiny_gpt2(), mics_hf.MiCSConfig(partition_size=partition_size, devices_per_node=2))
    state = get_state(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    data = global_batches(steps=STEPS, accum=accum, world=world, micro=2)
    stats = mics_hf.comm_stats(net)
    stats.reset()
    per_step, leftovers, replica_equal = [], [], []
    for step in range(STEPS):
        before = dict(stats.calls)
        for m in range(accum):
            with net.no_sync() if m < accum - 1 else nullcontext():
                net(input_ids=data[step, m, rank], labels=data[step, m, rank]).loss.backward()
            # hop 1 already reduced and freed every unsharded gradient; parameters are resharded
            leftovers.append(
                sum(sp.unsharded.grad is not None or sp.unsharded.untyped_storage().size() > 0
                    for _, g in state.units for sp in g.params)
            )
        per_step.append({k: stats.calls[k] - before.get(k, 0) for k in stats.calls})
        opt.step()
        opt.zero_grad()
        replica_equal.append(_replicas_identical(net))
    return {
        "per_step": per_step,
        "units": len(state.units),
        "hop2": mics_hf.engine.stats.num_hop2(net),
        "leftovers": leftovers,
        "replica_equal": replica_equal,
    }


def _replicas_identical(net) -> bool:
    """Every rank of a replication group must hold bit-identical shards after the optimizer step."""
    state = get_state(net)
    group = state.units[-1][1].groups.replication
    if group.pg is None:
        return True
    flat = torch.cat([sp.sharded.detach().reshape(-1) for _, g in state.units for sp in g.params])
    gathered = [torch.empty_like(flat) for _ in range(group.size)]
    dist.all_gather(gathered, flat, group=group.pg)
    return all(torch.equal(gathered[0], t) for t in gathered[1:])


def _calls(step: dict, op: str) -> int:
    return sum(v for (o, _), v in step.items() if o == op)


def test_hop2_once_per_optimizer_step_and_hop1_every_micro_step(pools):
    pool = pools(8)
    one = pool.run(_count_calls, accum=1, partition_size=2)
    four = pool.run(_count_calls, accum=4, partition_size=2)
    for r1, r4 in zip(one, four):
        units = r1["units"]
        for s1, s4 in zip(r1["per_step"], r4["per_step"]):
            assert _calls(s1, "all_reduce") == _calls(s4, "all_reduce") == units  # hop 2: once per unit per step
            assert _calls(s1, "reduce_scatter") == units
            assert _calls(s4, "reduce_scatter") == 4 * units  # hop 1: every micro-step
            # the forward and the backward each gather every unit except the root, which stays gathered
            assert _calls(s4, "all_gather") == 4 * (2 * (units - 1) + 1)
        assert r1["hop2"] == r4["hop2"] == STEPS
        assert sum(r4["leftovers"]) == 0 and sum(r1["leftovers"]) == 0
        assert all(r1["replica_equal"]) and all(r4["replica_equal"])


def _partial_grads_differ_under_no_sync(rank: int, world: int) -> dict:
    """Under no_sync() the shard gradients are partition-group sums only, so replicas differ until hop 2."""
    net = mics_hf.shard_model(tiny_gpt2(), mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
    data = global_batches(steps=1, accum=2, world=world, micro=2)
    with net.no_sync():
        net(input_ids=data[0, 0, rank], labels=data[0, 0, rank]).loss.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    group = get_state(net).units[-1][1].groups.replication
    flat = torch.cat([g.reshape(-1) for g in grads])
    gathered = [torch.empty_like(flat) for _ in range(group.size)]
    dist.all_gather(gathered, flat, group=group.pg)
    before = any(not torch.equal(gathered[0], t) for t in gathered[1:])
    net(input_ids=data[0, 1, rank], labels=data[0, 1, rank]).loss.backward()
    flat = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    dist.all_gather(gathered, flat, group=group.pg)
    after = all(torch.equal(gathered[0], t) for t in gathered[1:])
    return {"differ_before_hop2": before, "equal_after_hop2": after}


def test_no_sync_skips_only_hop2(pools):
    for r in pools(8).run(_partial_grads_differ_under_no_sync):
        assert r["differ_before_hop2"] and r["equal_after_hop2"], r
