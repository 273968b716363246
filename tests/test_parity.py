"""Parity: mics_hf against a single-process reference on the same global batches (gloo, CPU, fp32).

World 8 with 2 or 4 devices per node, p in {1, 2, 4, 8}, hierarchical on and off, accumulation 1 and 4, a
tiny GPT-2 and BERT with tied embeddings and odd sizes that need padding, activation checkpointing
(reentrant and not), prefetch on and off, global gradient clipping (2-norm and inf-norm, with a max_norm small
enough to clip), and a world of one. Parameters after 3 AdamW steps must match to
1e-5 relative per tensor, the first step's gradients to 1e-5, every step's loss to 1e-6.
"""

from __future__ import annotations

import pytest

from parity import run_parity

CASES = [
    # model, devices_per_node, partition_size, hierarchical, accum, extra
    ("gpt2", 2, 1, "auto", 1, {}),
    ("gpt2", 2, 2, "auto", 4, {}),
    ("gpt2", 2, 4, True, 1, {}),
    ("gpt2", 2, 4, False, 4, {}),
    ("gpt2", 2, 8, True, 4, {}),
    ("gpt2", 4, 2, "auto", 1, {}),
    ("gpt2", 4, 4, "auto", 4, {}),
    ("gpt2", 4, 8, True, 1, {}),
    ("gpt2", 4, 8, False, 4, {}),
    ("gpt2", 2, 4, True, 2, {"checkpointing": True}),
    ("gpt2", 2, 8, True, 1, {"checkpointing": "reentrant"}),
    ("gpt2", 2, 8, False, 2, {"prefetch": False}),
    ("gpt2", 2, 4, True, 2, {"clip": 0.05}),
    ("gpt2", 4, 1, "auto", 1, {"clip": 0.05, "norm_type": float("inf")}),
    ("bert", 2, 4, True, 4, {}),
    ("bert", 4, 8, False, 1, {}),
    ("bert", 2, 2, "auto", 1, {"checkpointing": True}),
]


def _id(case) -> str:
    model, k, p, hier, accum, extra = case
    tags = "-".join(f"{key}={val}" for key, val in extra.items())
    return f"{model}-k{k}-p{p}-hier{hier}-acc{accum}" + (f"-{tags}" if tags else "")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_parity_world8(pools, case):
    model, k, p, hier, accum, extra = case
    results = pools(8).run(
        run_parity, model=model, devices_per_node=k, partition_size=p, hierarchical=hier, accum=accum, **extra
    )
    for rank, r in enumerate(results):
        assert r["loss_diff"] <= 1e-6, (rank, r)
        assert r["grad_diff"] <= 1e-5, (rank, r)
        assert r["param_diff"] <= 1e-5, (rank, r)
        assert r["hop2"] == 3, (rank, r)  # one replica all-reduce per optimizer step, whatever the accumulation
        assert r["norm_diff"] <= 1e-5, (rank, r)  # clip_grad_norm_ returns the global norm


def test_parity_world_of_one_without_process_group(pools):
    """No torch.distributed at all: the same hooks run, nothing is communicated, results match the reference."""
    (r,) = pools(1, init=False).run(_single, accum=2)
    assert r["param_diff"] <= 1e-5 and r["loss_diff"] <= 1e-6 and r["grad_diff"] <= 1e-5, r


def _single(rank: int, world: int, accum: int) -> dict:
    import torch.distributed as dist

    assert not dist.is_initialized()
    # run_parity all-reduces the loss; a world of one has nothing to reduce, so patch that call out locally
    orig = dist.all_reduce
    dist.all_reduce = lambda *a, **k: None
    try:
        return run_parity(rank, world, partition_size=None, devices_per_node=1, accum=accum)
    finally:
        dist.all_reduce = orig
