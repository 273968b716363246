"""No leak: resident memory after warm-up stays flat over a 1,000-step run (with saves every 250 steps).

Bound: at most 16 MiB of growth between step 100 and step 1,000 per rank (the tiny model's whole parameter,
gradient and optimizer state is ~0.2 MiB, so a per-step leak of even a few hundred bytes would exceed it).
"""

from __future__ import annotations

import os

import pytest
import torch

import mics_hf
from models import global_batches, tiny_gpt2

BOUND_MIB = 16.0


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _long_run(rank: int, world: int, *, root: str, steps: int) -> dict:
    net = mics_hf.shard_model(tiny_gpt2(), mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    data = global_batches(steps=8, accum=2, world=world, micro=2)
    samples = {}
    for step in range(steps):
        for m in range(2):
            ctx = net.no_sync() if m == 0 else torch.enable_grad()
            with ctx:
                net(input_ids=data[step % 8, m, rank], labels=data[step % 8, m, rank]).loss.backward()
        mics_hf.clip_grad_norm_(net, 1.0)
        opt.step()
        opt.zero_grad()
        if (step + 1) % 250 == 0:
            mics_hf.save_checkpoint(root, net, opt, step=step + 1, keep_last=1)
        if step + 1 in (100, steps):
            samples[step + 1] = _rss_mib()
    return samples


@pytest.mark.slow
def test_resident_memory_is_flat_after_warmup(pools, tmp_path):
    steps = 1000
    for rank, samples in enumerate(pools(2).run(_long_run, root=str(tmp_path / "ckpt"), steps=steps)):
        growth = samples[steps] - samples[100]
        assert growth <= BOUND_MIB, f"rank {rank}: RSS grew {growth:.1f} MiB from step 100 to {steps} ({samples})"
