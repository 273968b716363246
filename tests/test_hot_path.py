"""The step's hot path: reused buffers, the bound on gathered units, hop 1's dtype, a separate reduce communicator.

Each behaviour is checked from the outside where it can be (storage pointers, counts, gradients against the
float64 reference of test_parity) and never by timing.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import mics_hf
from mics_hf.engine.shard import get_state
from mics_hf.engine.unit import ShardState
from models import global_batches, tiny_gpt2
from parity import full_grads, rel_diff, run_parity

D = 12


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(D, D)
        self.b = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.tanh(self.a(x)))


class Deep(nn.Module):
    """Many small units: the in-flight bound has something to bound."""

    def __init__(self, n: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.blocks = nn.ModuleList([Block() for _ in range(n)])
        self.head = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h)
        return self.head(h).square().mean()


def _buffers_reused(rank: int, world: int, *, p: int, param_dtype=None) -> dict:
    # six blocks: more units than collectives in flight, so one buffer per unit would show
    net = mics_hf.shard_model(tiny_gpt2(n_layer=6), mics_hf.MiCSConfig(partition_size=p, devices_per_node=2, param_dtype=param_dtype))
    state = get_state(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    data = global_batches(steps=4, accum=1, world=world, micro=2)
    seen: list[set[int]] = []
    pool = state.pool
    original = pool.acquire

    def spy(name, numel, dtype):  # records which storage each acquisition hands out
        buf = original(name, numel, dtype)
        seen[-1].add(buf.untyped_storage().data_ptr())
        return buf

    pool.acquire = spy
    allocations = []
    for step in range(4):
        seen.append(set())
        net(input_ids=data[step, 0, rank], labels=data[step, 0, rank]).loss.backward()
        opt.step()
        opt.zero_grad()
        allocations.append(pool.num_allocations)
    return {"seen": [sorted(s) for s in seen], "allocations": allocations, "in_use": pool.in_use,
            "per_class": max(pool.free_by_class().values()),
            # contiguous nodes: the hierarchical chunk order is a grid, read by the one fused copy-out
            "fused_copy_out": all(u._copy_out_targets is not None for _, u in state.units)}


@pytest.mark.parametrize("p, dtype", [(2, None), (4, None), (4, torch.bfloat16)], ids=["p2", "p4-hier", "p4-hier-bf16"])
def test_communication_buffers_are_reused_across_steps(pools, p, dtype):
    """From the second step on, every all-gather and reduce-scatter uses storage the first step made."""
    for r in pools(4).run(_buffers_reused, p=p, param_dtype=dtype):
        first, *later = r["seen"]
        assert first and all(set(s) <= set(first) for s in later), r["seen"]
        assert r["allocations"][1:] == [r["allocations"][0]] * 3, r["allocations"]  # nothing new after step 1
        assert r["in_use"] == 0, r  # every buffer came back
        # per class (buffer kind, dtype, size): the collectives in flight at once (at most three reduce-scatters
        # when no hop 2 runs in backward, two all-gathers), never one per unit
        assert r["per_class"] <= 3, r
        assert r["fused_copy_out"], r


def _count_alive(rank: int, world: int, *, limit: int, checkpointing: bool = False) -> dict:
    torch.manual_seed(0)
    model = Deep().double()
    ref = copy.deepcopy(model)
    net = mics_hf.shard_model(model, mics_hf.MiCSConfig(partition_size=2, devices_per_node=2, units=(Block,), max_gathered_units=limit))
    state = get_state(net)
    units = [u for m, u in state.units if m is not net]
    alive_seen = []

    def sample(*_):  # after every unit's forward and every gradient that reaches a block
        alive = sum(u.state is not ShardState.SHARDED for u in units)
        storages = sum(u._storage is not None and u._storage.untyped_storage().size() > 0 for u in units)
        alive_seen.append((alive, storages, state.gathered.alive))

    for blk in net.blocks:
        blk.register_forward_hook(sample)
        blk.register_full_backward_hook(sample)
    g = torch.Generator().manual_seed(rank)
    xs = [torch.randn(4, D, generator=torch.Generator().manual_seed(r), dtype=torch.float64) for r in range(world)]
    for _ in range(2):
        net(xs[rank]).backward()
    for x in xs:
        for _ in range(2):
            ref(x).backward()
    grads = full_grads(net)
    diff = max(rel_diff(grads[k], q.grad / world) for k, q in ref.named_parameters())
    del g
    return {"alive": alive_seen, "peak": state.gathered.peak, "diff": diff}


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_gathered_units_stay_within_the_bound(pools, limit):
    """At most `max_gathered_units` blocks are ever gathered (counted from their states and their storage),
    and the gradients are the reference's whatever the bound."""
    for r in pools(4).run(_count_alive, limit=limit):
        assert r["peak"] <= limit, r["peak"]
        assert max(a for a, _, _ in r["alive"]) <= limit and max(s for _, s, _ in r["alive"]) <= limit, r["alive"]
        assert all(a == c for a, _, c in r["alive"]), r["alive"]  # the engine's count is the true count
        assert r["diff"] <= 1e-10, r["diff"]
    if limit >= 2:  # prefetching does gather ahead when there is room
        assert max(a for a, _, _ in r["alive"]) == 2


def test_reduce_dtype_defaults_to_the_compute_dtype():
    cfg = mics_hf.MiCSConfig(param_dtype="bf16")
    assert cfg.mixed_precision.gradient_reduce_dtype is torch.bfloat16
    assert mics_hf.MiCSConfig(param_dtype="bf16", reduce_dtype="fp32").mixed_precision.gradient_reduce_dtype is torch.float32
    assert mics_hf.MiCSConfig().mixed_precision.gradient_reduce_dtype is torch.float32  # fp32 compute: fp32
    with pytest.raises(ValueError, match="max_gathered_units"):
        mics_hf.MiCSConfig(max_gathered_units=0)
    with pytest.raises(ValueError, match="separate_reduce_group"):
        mics_hf.MiCSConfig(separate_reduce_group=1)


def _reduce_dtype_seen(rank: int, world: int, *, reduce_dtype=None) -> dict:
    net = mics_hf.shard_model(tiny_gpt2(), mics_hf.MiCSConfig(partition_size=2, devices_per_node=2, param_dtype=torch.bfloat16,
                                                              reduce_dtype=reduce_dtype))
    data = global_batches(steps=1, accum=1, world=world, micro=2)
    stats = mics_hf.comm_stats(net)
    stats.reset()
    net(input_ids=data[0, 0, rank], labels=data[0, 0, rank]).loss.backward()
    return {
        "rs_bytes": stats.total_bytes("reduce_scatter"),
        "grad_dtypes": sorted({str(q.grad.dtype) for q in net.parameters() if q.grad is not None}),
    }


def test_default_reduce_scatter_moves_half_the_bytes_under_bf16_and_accumulates_in_fp32(pools):
    pool = pools(4)
    default = pool.run(_reduce_dtype_seen)
    fp32 = pool.run(_reduce_dtype_seen, reduce_dtype=torch.float32)
    for d, f in zip(default, fp32):
        assert d["rs_bytes"] * 2 == f["rs_bytes"], (d, f)
        assert d["grad_dtypes"] == f["grad_dtypes"] == ["torch.float32"], (d, f)


@pytest.mark.parametrize("p, hier", [(2, "auto"), (4, True)], ids=["p2", "p4-hier"])
def test_separate_reduce_communicator_gives_the_same_results(pools, p, hier):
    """Hop 1 on its own process groups: float64 parity with the reference, as on the shared ones."""
    for sep in (False, True):
        for rank, r in enumerate(pools(4).run(_parity_with_groups, partition_size=p, hierarchical=hier, separate=sep)):
            assert r["grad_diff"] <= 1e-10 and r["param_diff"] <= 1e-10, (sep, rank, r)
            assert r["separate"] == sep


def _parity_with_groups(rank: int, world: int, *, partition_size: int, hierarchical, separate: bool) -> dict:
    import dataclasses

    original = mics_hf.shard_model
    made = []

    def with_option(model, config=None, **kwargs):  # run_parity builds its own config: add the option to it
        net = original(model, dataclasses.replace(config, separate_reduce_group=separate), **kwargs)
        groups = get_state(net).units[0][1].groups
        made.append(groups.reduce_partition is not None and groups.reduce_partition.pg is not groups.partition.pg)
        return net

    mics_hf.shard_model = with_option
    try:
        out = run_parity(rank, world, partition_size=partition_size, devices_per_node=2, hierarchical=hierarchical,
                         accum=2, dtype=torch.float64)
    finally:
        mics_hf.shard_model = original
    out["separate"] = made == [True]
    return out
