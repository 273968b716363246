"""Sharded checkpoints: exact resume in new processes, resharding to other world / partition sizes, HF export."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

import mics_hf
from distributed import DistPool
from models import global_batches, tiny_gpt2
from parity import full_optimizer_state

ACCUM = 2
STEPS = 6


def _make(world: int, p: int, k: int, dropout: float = 0.1):
    torch.use_deterministic_algorithms(True)
    model = tiny_gpt2()
    model.config.resid_pdrop = dropout  # dropout makes the resume depend on the restored RNG state
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    net = mics_hf.shard_model(model, mics_hf.MiCSConfig(partition_size=p, devices_per_node=k))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, eps=1e-4, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return net, opt, sched


def _train(rank: int, world: int, *, first: int, last: int, save_at: int | None, root: str | None, resume: bool, p: int = 4, k: int = 2) -> dict:
    """Train steps [first, last); optionally save after step save_at or resume from root first."""
    torch.manual_seed(1234 + rank)  # per-rank RNG stream (dropout)
    net, opt, sched = _make(world, p, k)
    start = first
    if resume:
        info = mics_hf.load_checkpoint(root, net, opt, scheduler=sched)
        start = info["next_step"]
    data = global_batches(steps=STEPS, accum=ACCUM, world=world, micro=2)
    losses = []
    net.train()
    for step in range(start, last):
        total = 0.0
        for m in range(ACCUM):
            with net.no_sync() if m < ACCUM - 1 else nullcontext():
                loss = net(input_ids=data[step, m, rank], labels=data[step, m, rank]).loss / ACCUM
                loss.backward()
            total += loss.item()
        mics_hf.clip_grad_norm_(net, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total)
        if save_at is not None and step + 1 == save_at:
            mics_hf.save_checkpoint(root, net, opt, step=step + 1, scheduler=sched, extra={"next_step": step + 1})
    return {"losses": losses, "state": mics_hf.full_state_dict(net, rank0_only=False), "lr": sched.get_last_lr()}


def test_resume_in_new_processes_is_exact(pools, tmp_path):
    root = str(tmp_path / "ckpt")
    straight = pools(4).run(_train, first=0, last=STEPS, save_at=None, root=None, resume=False)
    with DistPool(4) as first_job:
        part1 = first_job.run(_train, first=0, last=3, save_at=3, root=root, resume=False)
    with DistPool(4) as second_job:  # new processes: nothing survives but the files
        part2 = second_job.run(_train, first=0, last=STEPS, save_at=None, root=root, resume=True)
    for s, a, b in zip(straight, part1, part2):
        assert a["losses"] + b["losses"] == s["losses"]  # bit-identical, fp32 CPU deterministic
        assert b["lr"] == s["lr"]
        for key, ref in s["state"].items():
            assert torch.equal(b["state"][key], ref), key
    assert (Path(root) / "latest").read_text().strip() == "step_00000003"


# ---- resharding: (world 8, p 4) -> (4, 2), (2, 1), (8, 8) --------------------------------------------------
def _save_after_steps(rank: int, world: int, *, root: str, p: int, k: int) -> dict:
    net, opt, _ = _make(world, p, k, dropout=0.0)
    data = global_batches(steps=2, accum=1, world=world, micro=1)
    for step in range(2):
        net(input_ids=data[step, 0, rank], labels=data[step, 0, rank]).loss.backward()
        opt.step()
        opt.zero_grad()
    mics_hf.save_checkpoint(root, net, opt, step=2)
    return {"params": mics_hf.full_state_dict(net, rank0_only=False), "optim": full_optimizer_state(net, opt)}


def _load_at(rank: int, world: int, *, root: str, p: int, k: int) -> dict:
    net, opt, _ = _make(world, p, k, dropout=0.0)
    mics_hf.load_checkpoint(root, net, opt)
    return {"params": mics_hf.full_state_dict(net, rank0_only=False), "optim": full_optimizer_state(net, opt)}


def test_resharding_matrix(pools, tmp_path):
    root = str(tmp_path / "ckpt")
    saved = pools(8).run(_save_after_steps, root=root, p=4, k=2)[0]
    for world, p, k in [(4, 2, 2), (2, 1, 1), (8, 8, 2)]:
        loaded = pools(world).run(_load_at, root=root, p=p, k=k)
        for rank, got in enumerate(loaded):
            assert set(got["params"]) == set(saved["params"])
            for key, ref in saved["params"].items():
                assert torch.equal(got["params"][key], ref), (world, p, rank, key)
            assert set(got["optim"]) == set(saved["optim"])
            for key, ref in saved["optim"].items():
                assert torch.equal(got["optim"][key], ref), (world, p, rank, key)


def _writers(rank: int, world: int, *, root: str) -> list[str]:
    net, opt, _ = _make(world, 2, 2, dropout=0.0)
    path = mics_hf.save_checkpoint(root, net, opt, step=0)
    meta = mics_hf.checkpoint.format.read_metadata(path)
    return sorted(f["file"] for f in meta["files"] if f["kind"] == "shard")


def test_each_shard_is_written_once_by_different_partition_groups(pools, tmp_path):
    root = tmp_path / "ckpt"
    files = pools(8).run(_writers, root=str(root))[0]
    assert files == ["shard-q0000.safetensors", "shard-q0001.safetensors"]  # p = 2 positions, not 8 copies
    # writer of position q is member (q mod r) of its replication group: rank 0 writes q0, rank 3 writes q1
    assert mics_hf.checkpoint.save._writer_of(0, mics_hf.engine.topology.build_topology(world_size=8, rank=0, node_of_rank=(0, 0, 1, 1, 2, 2, 3, 3), partition_size=2)) == 0
    assert mics_hf.checkpoint.save._writer_of(1, mics_hf.engine.topology.build_topology(world_size=8, rank=0, node_of_rank=(0, 0, 1, 1, 2, 2, 3, 3), partition_size=2)) == 3


# ---- export ---------------------------------------------------------------------------------------------
def _export_live(rank: int, world: int, *, out: str, root: str) -> dict:
    net, opt, _ = _make(world, 4, 2, dropout=0.0)
    data = global_batches(steps=1, accum=1, world=world, micro=1)
    net(input_ids=data[0, 0, rank], labels=data[0, 0, rank]).loss.backward()
    opt.step()
    mics_hf.save_pretrained(net, out)
    mics_hf.save_checkpoint(root, net, opt, step=1)
    return mics_hf.full_state_dict(net)


def test_export_live_and_offline_load_with_from_pretrained(pools, tmp_path):
    from transformers import AutoModelForCausalLM

    from mics_hf.cli import main

    live, offline, root = tmp_path / "live", tmp_path / "offline", tmp_path / "ckpt"
    full = pools(4).run(_export_live, out=str(live), root=str(root))[0]
    assert main(["export", str(root), str(offline)]) == 0
    for directory in (live, offline):
        assert (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()
        loaded = AutoModelForCausalLM.from_pretrained(str(directory))
        assert type(loaded).__name__ == "GPT2LMHeadModel"
        sd = loaded.state_dict()
        for key, ref in full.items():
            if key in sd:
                assert torch.equal(sd[key], ref), (directory.name, key)
        assert torch.equal(loaded.lm_head.weight, full["transformer.wte.weight"])  # tied weights stay tied


def test_rng_states_round_trip_without_pickle():
    """torch, Python and NumPy streams continue exactly after capture -> reseed -> restore."""
    import random

    import numpy as np

    from mics_hf.checkpoint.rng import capture_rng, restore_rng

    random.seed(3)
    np.random.seed(4)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state
    np.random.randn()
    state = capture_rng()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    first = (random.random(), np.random.rand(), torch.rand(1).item(), random.gauss(0, 1), np.random.randn())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), random.gauss(0, 1), np.random.randn()) == first
