"""Meta-device models are materialised one unit at a time inside shard_model, with the model's own init.

Checks: every rank ends up with the same full model (the initial weights do not depend on the rank or the
layout), the values follow GPT-2's initialisation (LayerNorm 1/0, weights ~N(0, 0.02), biases 0), the largest
tensor ever materialised at once is one unit (not the model), and the model trains like a normally built one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate import init_empty_weights

import mics_hf
from models import global_batches, tiny_gpt2


def _meta_gpt2(rank: int, world: int, *, p: int) -> dict:
    torch.manual_seed(0)
    with init_empty_weights(include_buffers=False):
        model = tiny_gpt2(n_layer=4, n_embd=48)
    assert all(t.is_meta for t in model.parameters())
    allocated: list[int] = []
    original_empty = torch.empty

    def spy(*args, **kwargs):  # record every parameter-sized allocation made while materialising
        t = original_empty(*args, **kwargs)
        allocated.append(t.numel())
        return t

    torch.empty = spy
    try:
        mics_hf.shard_model(model, mics_hf.MiCSConfig(partition_size=p, devices_per_node=2), device="cpu")
    finally:
        torch.empty = original_empty
    full = mics_hf.full_state_dict(model, rank0_only=False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = global_batches(steps=8, accum=1, world=world, micro=4)
    losses = []
    for step in range(8):
        loss = model(input_ids=data[0, 0, rank], labels=data[0, 0, rank]).loss  # one batch: it must memorise it
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    flat = torch.cat([v.reshape(-1) for v in full.values()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    return {
        "same_on_all_ranks": all(torch.equal(gathered[0], g) for g in gathered),
        "ln_weight": full["transformer.h.0.ln_1.weight"].unique().tolist(),
        "ln_bias": full["transformer.h.0.ln_1.bias"].abs().max().item(),
        "fc_std": full["transformer.h.0.mlp.c_fc.weight"].std().item(),
        "fc_bias": full["transformer.h.0.mlp.c_fc.bias"].abs().max().item(),
        "wte_std": full["transformer.wte.weight"].std().item(),
        "largest_allocation": max(allocated),
        "model_numel": sum(v.numel() for k, v in full.items() if k != "lm_head.weight"),
        "losses": losses,
    }


def test_meta_model_is_materialised_unit_by_unit(pools):
    pool = pools(4)
    for p in (2, 4):
        for r in pool.run(_meta_gpt2, p=p):
            assert r["same_on_all_ranks"], r
            assert r["ln_weight"] == [1.0] and r["ln_bias"] == 0.0 and r["fc_bias"] == 0.0
            assert abs(r["fc_std"] - 0.02) < 0.004 and abs(r["wte_std"] - 0.02) < 0.004, r
            assert r["largest_allocation"] < r["model_numel"] / 3, r  # one unit at a time, never the model
            assert r["losses"][-1] < r["losses"][0] - 0.5, r["losses"]  # and it trains
