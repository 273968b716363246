"""The public measurements that check the implementation profiles before the paper's claims, and the profiles'
predictions for them. One source for tests/test_costmodel.py, benchmarks/costmodel_profiles.py and the record.

None of these is a MiCS-paper claim:

- DeepSpeed PR 1453 ("Various ZeRO Stage3 Optimizations + Improvements", merged 2022-01-20): 8 p4d nodes (64
  A100), RoBERTa from Hugging Face, seq 512, 16 samples per GPU, layer-wise activation checkpointing, TFLOPS per
  GPU counted without the recomputation (6N): RoBERTa-10B 54.86 before, 92.07 after; RoBERTa-50B ("52B
  parameter", "vocab size ~53k") 67.61 before, 116.06 after. "Before" is v0.5.x's ZeRO-3 (profile
  deepspeed-0.5.6), "after" the PR (profile deepspeed-improved).
- DeepSpeed issue 1174 / PR 1188 (merged 2021-07, in v0.5.6): bing_bert, hidden 2560, 64 layers, FFN 10240,
  vocab 32003 (5.1B parameters), one p4d node, no full-layer checkpointing: ZeRO-2 forward ~60 ms; ZeRO-3
  forward ~470-480 ms before the PR, ~270 ms after, backward ~900 ms before, ~670 ms after. The 270 ms forward
  calibrates ``profiles.HOST_FETCH_S_056``; the 670 ms backward is then a check.
- aws-ofi-nccl#33 (p3dn.24xlarge, 2 nodes x 8 GPUs, all_reduce): 671 us at 2 MB, 1140 us at 4 MB (out of
  place), a check of ``network.ring_time``'s latency and bandwidth.

Shapes: RoBERTa-10B is the ``roberta-10b`` preset (hidden 5120, 30 layers, the MiCS authors' config). PR 1453 does
not give RoBERTa-50B's shape; here it is the same width (hidden 5120, FFN 4h) with 165 layers and RoBERTa's
50,265-token vocabulary, 52.2B parameters (the PR says 52B), an assumption stated here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .costmodel import CLUSTERS, Prediction, predict
from .presets import ModelPreset, get_preset
from .profiles import PROFILES, HOST_FETCH_S_056, build_trace, collective_functions, simulate_step

__all__ = ["PR1188", "PR1453", "ROBERTA_50B", "BERT_5B", "ValidationPoint", "pr1188_times", "calibrate_host_fetch",
           "pr1453_predictions", "profile_errors"]

ROBERTA_50B = ModelPreset(name="roberta-50b", family="bert", hidden=5120, layers=165, heads=40, ffn=20480,
                          vocab=50265, seq=512, micro_batch=16,
                          note="DeepSpeed PR 1453's 52B RoBERTa; shape assumed (hidden 5120, 165 layers)")
BERT_5B = ModelPreset(name="bert-5b", family="bert", hidden=2560, layers=64, heads=40, ffn=10240, vocab=32003,
                      seq=512, micro_batch=1, note="DeepSpeed PR 1188's bing_bert config (5.1B)")


@dataclass(frozen=True)
class ValidationPoint:
    """One public measurement and the profile that should predict it."""

    label: str
    profile: str
    measured: float
    unit: str
    source: str


PR1453: tuple[tuple[ModelPreset, ValidationPoint], ...] = (
    (get_preset("roberta-10b"), ValidationPoint("RoBERTa-10B, 64 A100, before PR 1453", "deepspeed-0.5.6", 54.86,
                                                "TFLOPS/GPU (6N)", "DeepSpeed PR 1453 description")),
    (ROBERTA_50B, ValidationPoint("RoBERTa-50B, 64 A100, before PR 1453", "deepspeed-0.5.6", 67.61,
                                  "TFLOPS/GPU (6N)", "DeepSpeed PR 1453 description")),
    (get_preset("roberta-10b"), ValidationPoint("RoBERTa-10B, 64 A100, after PR 1453", "deepspeed-improved", 92.07,
                                                "TFLOPS/GPU (6N)", "DeepSpeed PR 1453 description")),
    (ROBERTA_50B, ValidationPoint("RoBERTa-50B, 64 A100, after PR 1453", "deepspeed-improved", 116.06,
                                  "TFLOPS/GPU (6N)", "DeepSpeed PR 1453 description")),
)
PR1453_NODES, PR1453_MICRO_BATCH, PR1453_CLUSTER = 8, 16, "p4d.24xlarge"

PR1188 = {"zero2_forward_s": 0.060, "zero3_forward_s": 0.270, "zero3_backward_s": 0.670}


def pr1453_predictions() -> list[tuple[ValidationPoint, Prediction, float]]:
    """(point, prediction, predicted 6N TFLOPS per GPU) for PR 1453's four numbers."""
    out = []
    for preset, point in PR1453:
        x = predict(preset, PR1453_CLUSTER, PR1453_NODES, strategy="zero3", micro_batch=PR1453_MICRO_BATCH,
                    profile=point.profile)
        out.append((point, x, x.tflops_per_gpu * 6 / 8))
    return out


def profile_errors(profile: str) -> list[tuple[ValidationPoint, float]]:
    """(point, predicted / measured - 1) for PR 1453's measurements of ``profile``'s implementation: how far the
    profile was from that implementation on real hardware, for a report to state beside its prediction."""
    return [(point, tflops / point.measured - 1) for point, _, tflops in pr1453_predictions()
            if point.profile == profile]


def pr1188_times(host_fetch_s: float = HOST_FETCH_S_056) -> tuple[float, float]:
    """(forward, backward) seconds of PR 1188's 5.1B BERT on one p4d node under deepspeed-0.5.6, with compute
    scaled so the forward's compute equals ZeRO-2's measured 60 ms (the batch is not given; ZeRO-2's forward is
    the same compute without gathers)."""
    c, m = CLUSTERS["p4d.24xlarge"], BERT_5B

    def trace(flops: float):
        return build_trace(m.family, m.hidden, m.layers, m.ffn, m.vocab, m.seq, tokens=m.seq, flops_per_s=flops,
                           checkpointing=False)

    _, visits = trace(1.0)
    first_backward = next(i for i, v in enumerate(visits) if v.backward)
    forward_compute = sum(v.compute_s for v in visits[:first_backward])
    numels, visits = trace(forward_compute / PR1188["zero2_forward_s"])
    gather_s, reduce_s = collective_functions(
        ranks=8, gpus_per_node=8, instance=c.name, nic_bytes_per_s=c.inter_node_bandwidth,
        nvlink_bytes_per_s=c.intra_node_bandwidth * c.intra_node_efficiency, wire_bytes=2)
    profile = dataclasses.replace(PROFILES["deepspeed-0.5.6"], host_fetch_s=host_fetch_s)
    sim = simulate_step(profile, numels, visits, gather_s=gather_s, reduce_s=reduce_s, ranks=8)
    return sim.forward_s, sim.step_s - sim.persistent_regather_s - sim.forward_s


def calibrate_host_fetch(target_forward_s: float = PR1188["zero3_forward_s"]) -> float:
    """The host seconds per fetch that make ``pr1188_times``'s forward equal PR 1188's 270 ms (bisection)."""
    lo, hi = 0.0, 5e-3
    for _ in range(50):
        mid = (lo + hi) / 2
        if pr1188_times(mid)[0] < target_forward_s:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
