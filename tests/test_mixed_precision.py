"""Mixed precision: bf16 and fp16 compute against the fp32 reference, and the fp16 loss scaler's agreement.

Stated tolerances (the reference computes in fp32, so these measure rounding, not engine error; a missing hop
or a wrong scale is off by O(1)): first-step gradients within 3e-2 (bf16) / 1e-2 (fp16) relative per tensor,
losses within 1e-3 / 1e-4 relative. Parameters are not compared: Adam turns gradient rounding into
full-size updates.
"""

from __future__ import annotations

import pytest
import torch

import mics_hf
from models import global_batches, tiny_gpt2
from parity import run_parity


@pytest.mark.parametrize("dtype, grad_tol, loss_tol", [(torch.bfloat16, 3e-2, 1e-3), (torch.float16, 1e-2, 1e-4)])
def test_low_precision_matches_fp32_reference(pools, dtype, grad_tol, loss_tol):
    results = pools(8).run(run_parity, partition_size=4, devices_per_node=2, param_dtype=dtype, accum=2)
    for rank, r in enumerate(results):
        assert r["grad_diff"] <= grad_tol and r["loss_diff"] <= loss_tol, (rank, r)


def _master_shards_stay_fp32(rank: int, world: int) -> dict:
    net = mics_hf.shard_model(tiny_gpt2(), mics_hf.MiCSConfig(partition_size=4, devices_per_node=2, param_dtype=torch.bfloat16))
    data = global_batches(steps=1, accum=1, world=world, micro=2)
    seen = set()
    hook = net.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, a, o: seen.add(m.weight.dtype))
    net(input_ids=data[0, 0, rank], labels=data[0, 0, rank]).loss.backward()
    hook.remove()
    return {
        "compute": [str(d) for d in seen],
        "shards": sorted({str(p.dtype) for p in net.parameters()}),
        "grads": sorted({str(p.grad.dtype) for p in net.parameters() if p.grad is not None}),
    }


def test_bf16_computes_in_bf16_and_keeps_fp32_master_shards(pools):
    for r in pools(8).run(_master_shards_stay_fp32):
        assert r["compute"] == ["torch.bfloat16"], r
        assert r["shards"] == ["torch.float32"] and r["grads"] == ["torch.float32"], r


def _scaler_skips_together(rank: int, world: int) -> dict:
    """Overflow in ONE rank's shard: every rank must skip that step and back off the scale."""
    net = mics_hf.shard_model(tiny_gpt2(), mics_hf.MiCSConfig(partition_size=4, devices_per_node=2, param_dtype=torch.float16))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    scaler = mics_hf.grad_scaler(net, init_scale=1024.0)
    data = global_batches(steps=2, accum=1, world=world, micro=2)
    before = [p.detach().clone() for p in net.parameters()]
    scaler.scale(net(input_ids=data[0, 0, rank], labels=data[0, 0, rank]).loss).backward()
    if rank == 3:
        next(p for p in net.parameters() if p.grad is not None and p.grad.numel()).grad.view(-1)[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    skipped = all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    scale_after_overflow = scaler.get_scale()
    opt.zero_grad()
    scaler.scale(net(input_ids=data[1, 0, rank], labels=data[1, 0, rank]).loss).backward()
    scaler.step(opt)
    scaler.update()
    stepped = not all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    return {"skipped": skipped, "scale": scale_after_overflow, "stepped_next": stepped}


def test_fp16_loss_scaler_agrees_across_ranks(pools):
    results = pools(8).run(_scaler_skips_together)
    for rank, r in enumerate(results):
        assert r["skipped"], (rank, r)  # ranks 0-2 and 4-7 saw finite shards, yet skipped with rank 3
        assert r["scale"] == 512.0, (rank, r)
        assert r["stepped_next"], (rank, r)
