"""Throughput arithmetic against hand-computed values and the paper's published figures."""

from __future__ import annotations

import pytest
import torch

from mics_hf.planning.flops import (
    PEAK_TFLOPS,
    megatron_tflops_per_gpu,
    mfu,
    model_state_bytes_per_rank,
    peak_tflops,
    tflops_per_gpu,
)


def test_bloomberggpt_reproduces_102_tflops_with_8n():
    # BloombergGPT: 50.6B params, 512 A100, seq 2048, global batch 2048 sequences, 32.5 s/step -> 102 TFLOPS/GPU.
    tokens = 2048 * 2048
    tflops = tflops_per_gpu(50_600_000_000, tokens, 32.5, 512)
    assert tflops == pytest.approx(8 * 50.6e9 * tokens / 32.5 / 512 / 1e12)
    assert abs(tflops - 102.0) < 0.5
    # The 6N convention is exactly 3/4 of it.
    assert tflops_per_gpu(50_600_000_000, tokens, 32.5, 512, factor=6) == pytest.approx(tflops * 6 / 8)


def test_tflops_small_integers():
    # 8 * 1e12 params * 3 tokens / 2 s / 4 GPUs / 1e12 = 3.
    assert tflops_per_gpu(10**12, 3, 2.0, 4) == pytest.approx(3.0)


def test_megatron_small_integers_by_hand():
    # B=1, s=6, l=1, h=2, V=16: 96*1*6*1*4 * (1 + 6/12 + 16/32) = 2304 * 2 = 4608 FLOPs.
    common = dict(batch=1, seq=6, layers=1, hidden=2, vocab=16, seconds=1.0, num_gpus=1)
    assert megatron_tflops_per_gpu(**common) * 1e12 == pytest.approx(4608)
    # Without recomputation: 3 passes over the layers (2592) + logits 6*B*s*h*V (1152) = 3744
    # = 72*1*6*1*4 * (1 + 6/12 + 16/24).
    assert megatron_tflops_per_gpu(**common, checkpointing=False) * 1e12 == pytest.approx(3744)
    # Scaling by time and GPU count.
    assert megatron_tflops_per_gpu(**{**common, "seconds": 2.0, "num_gpus": 3}) * 1e12 == pytest.approx(768)


def test_megatron_is_8n_plus_attention_and_logits_for_gpt3():
    # For a GPT-3 175B-like model, N ~ 12 l h^2, so Megatron / 8N = 1 + s/(6h) + V/(16 l h) ~ 1.030.
    batch, seq, layers, hidden, vocab = 1536, 2048, 96, 12288, 50257
    n = 12 * layers * hidden**2
    eight_n = tflops_per_gpu(n, batch * seq, 10.0, 1024)
    megatron = megatron_tflops_per_gpu(
        batch=batch, seq=seq, layers=layers, hidden=hidden, vocab=vocab, seconds=10.0, num_gpus=1024
    )
    expected_ratio = 1 + seq / (6 * hidden) + vocab / (16 * layers * hidden)
    assert megatron / eight_n == pytest.approx(expected_ratio)
    assert 1.02 < expected_ratio < 1.04


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        ("NVIDIA A100-SXM4-40GB", "bf16", 312.0),
        ("NVIDIA A100-SXM4-80GB", "fp16", 312.0),
        ("NVIDIA A100 80GB PCIe", torch.bfloat16, 312.0),
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
        ("nvidia h100 80gb hbm3", "bfloat16", 989.0),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H200", "bf16", 989.0),
        ("Tesla V100-SXM2-32GB", "fp16", 125.0),
        ("Tesla V100-SXM2-32GB", "half", 125.0),
        ("Tesla V100-PCIE-16GB", "fp16", 112.0),
        ("Tesla V100-SXM2-32GB", "bf16", None),  # V100 has no bf16 tensor cores
        ("NVIDIA GeForce RTX 4090", "bf16", None),
        ("cpu", "bf16", None),
    ],
)
def test_peak_tflops_lookup(name, dtype, expected):
    assert peak_tflops(name, dtype) == expected


def test_peak_table_has_the_papers_peaks():
    assert PEAK_TFLOPS["a100"]["bf16"] == 312.0
    assert PEAK_TFLOPS["v100"]["fp16"] == 125.0
    assert PEAK_TFLOPS["h100"]["bf16"] == PEAK_TFLOPS["h200"]["bf16"] == 989.0


def test_peak_tflops_rejects_unknown_dtype():
    with pytest.raises(ValueError, match=r"dtype='fp8'.*\['bf16', 'fp16'\]"):
        peak_tflops("NVIDIA H100 80GB HBM3", "fp8")


def test_mfu_matches_paper_percentages():
    # Seed article: 170 TFLOPS = 54.5% and 169 TFLOPS = 54.2% of A100's 312.
    assert round(mfu(170.0, 312.0) * 100, 1) == 54.5
    assert round(mfu(169.0, peak_tflops("NVIDIA A100-SXM4-80GB")) * 100, 1) == 54.2
    assert mfu(100.0, None) is None
    with pytest.raises(ValueError, match="peak=0"):
        mfu(100.0, 0)


def test_model_state_bytes_per_rank():
    # 16 bytes/param * 175e9 / 8 = 350e9 bytes (350 GB) per rank.
    assert model_state_bytes_per_rank(175_000_000_000, 8) == 350e9
    # p = 1 is DDP's full 16P; other byte counts scale linearly.
    assert model_state_bytes_per_rank(1000, 1) == 16_000
    assert model_state_bytes_per_rank(1000, 4, bytes_per_param=12) == 3000


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: tflops_per_gpu(10, 10, 0.0, 1), "seconds=0.0"),
        (lambda: tflops_per_gpu(10, 10, 1.0, 0), "num_gpus=0"),
        (lambda: megatron_tflops_per_gpu(batch=0, seq=1, layers=1, hidden=1, vocab=1, seconds=1, num_gpus=1),
         "batch=0"),
        (lambda: model_state_bytes_per_rank(10, 0), "partition_size=0"),
    ],
)
def test_bad_inputs_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
