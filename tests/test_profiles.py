"""Implementation profiles and the EFA network model: the simulator's arithmetic by hand, the code-derived rules
(reuse distance, persistence), every profile field traced to a source, bad input, and `mics-hf plan`'s output.

The validation against public measurements and the paper's claims are in tests/test_costmodel.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mics_hf.cli import main
from mics_hf.planning.costmodel import CLUSTERS, predict
from mics_hf.planning.network import (
    BASE_LATENCY_S,
    NET_STEP_LATENCY_S,
    NVLINK_STEP_LATENCY_S,
    efa_efficiency,
    ring_time,
)
from mics_hf.planning.planner import plan
from mics_hf.planning.presets import count_parameters, get_preset
from mics_hf.planning.profiles import (
    PROFILE_SOURCES,
    PROFILES,
    ImplementationProfile,
    Visit,
    _keep_after,
    build_trace,
    simulate_step,
)

DS056, IMPROVED = PROFILES["deepspeed-0.5.6"], PROFILES["deepspeed-improved"]


# ---- the network -----------------------------------------------------------------------------------------------
def test_efa_curve_by_hand():
    # p4d: 0.592 at 32 ranks (NVIDIA/nccl#527), 0.08 less per doubling (NVIDIA/nccl#235), at most 0.80.
    assert efa_efficiency("p4d.24xlarge", 32) == pytest.approx(29.61 / 50)
    assert efa_efficiency("p4d.24xlarge", 512) == pytest.approx(29.61 / 50 - 0.08 * 4)
    assert efa_efficiency("p4d.24xlarge", 4) == pytest.approx(0.80)
    assert efa_efficiency("p3dn.24xlarge", 128) == pytest.approx(0.56)
    with pytest.raises(ValueError, match="no EFA measurements for 'p9'; use one of"):
        efa_efficiency("p9", 16)


def test_ring_time_by_hand():
    # 64 ranks on 8 p4d nodes, 100 MB all-gather: 63 network steps, 63/64 of it through 50 GB/s x curve(64).
    nic = 50e9 * efa_efficiency("p4d.24xlarge", 64)
    expected = BASE_LATENCY_S + 63 * NET_STEP_LATENCY_S + 63 / 64 * 1e8 / nic
    assert ring_time(1e8, 64, 8, instance="p4d.24xlarge", nic_bytes_per_s=50e9, nvlink_bytes_per_s=231e9) == \
        pytest.approx(expected)
    inside = ring_time(1e8, 8, 8, instance="p4d.24xlarge", nic_bytes_per_s=50e9, nvlink_bytes_per_s=231e9)
    assert inside == pytest.approx(BASE_LATENCY_S + 7 * NVLINK_STEP_LATENCY_S + 7 / 8 * 1e8 / 231e9)
    assert ring_time(1e8, 1, 8, instance="p4d.24xlarge", nic_bytes_per_s=50e9, nvlink_bytes_per_s=231e9) == 0.0


# ---- the simulator by hand -------------------------------------------------------------------------------------
def _two_visits(profile: ImplementationProfile, gather: float, compute: float):
    # two forward sub-modules, one 1e6-element tensor each; no gradients
    visits = [Visit("a", (0,), compute, False), Visit("b", (1,), compute, False)]
    return simulate_step(profile, [10**6, 10**6], visits, gather_s=lambda n: gather, reduce_s=lambda n: 0.0,
                         ranks=8)


def test_ds056_overlaps_one_gather_with_the_current_compute_only():
    bare = dataclasses.replace(DS056, host_fetch_s=0.0)
    # a: gathered blocking (g); b's gather starts when the host reaches b, while a computes: g + max(c, g) + c
    sim = _two_visits(bare, gather=3.0, compute=1.0)
    assert sim.step_s == pytest.approx(3.0 + max(1.0, 3.0) + 1.0)
    assert sim.num_gathers == 2 and sim.gather_busy_s == pytest.approx(6.0)
    # a host cost per fetch delays both the compute and the next gather:
    # a's gather 3, host 0.5, b's gather (3, overlapping a's compute 1), host 0.5, b's compute 1
    assert _two_visits(dataclasses.replace(DS056, host_fetch_s=0.5), 3.0, 1.0).step_s == pytest.approx(8.0)


def test_v056_counter_is_one_behind_its_trace_in_pytorch_hook_order():
    # The code reading behind step_id_off_by_one, replayed with v0.5.6's registration order on a real module:
    # per-module pre-hooks first (record the module, advance the counter), the top module's reset after them.
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 2))
    state = {"step": 0, "trace": [], "visits": []}

    def per_module(module, args):
        state["visits"].append((state["step"], module))
        if len(state["trace"]) < 4:
            state["trace"].append(module)
        state["step"] += 1

    for module in model.modules():
        module.register_forward_pre_hook(per_module)
    model.register_forward_pre_hook(lambda module, args: state.update(step=0))
    model(torch.zeros(1, 2))  # the traced step
    state["visits"].clear()
    state["step"] = 0  # reset at the optimizer step
    model(torch.zeros(1, 2))
    matches = [state["trace"][step] is module for step, module in state["visits"]]
    assert matches == [True, False, False, False]  # only the top module finds itself: no prefetch, no reuse


def test_v056_gathers_every_use_and_prefetches_nothing():
    # one tensor used in the forward and again in the backward, 1e6 elements apart (well within the 1e9 reuse
    # distance): kept for later when the trace lookups work, gathered again under v0.5.6's off-by-one
    visits = [Visit("a", (0,), 1.0, False), Visit("b", (1,), 1.0, False), Visit("a", (0,), 1.0, True)]
    run = dict(gather_s=lambda n: 2.0, reduce_s=lambda n: 0.0, ranks=8)
    bare = dataclasses.replace(DS056, host_fetch_s=0.0, launch_s=0.0)
    assert simulate_step(bare, [10**6] * 2, visits, **run).num_gathers == 3
    working = dataclasses.replace(bare, step_id_off_by_one=False)
    assert simulate_step(working, [10**6] * 2, visits, **run).num_gathers == 2


def test_persistent_tensors_are_gathered_again_at_every_step():
    # a 1e6-element weight and two 10-element (persistent) tensors: one blocking gather each after the step
    visits = [Visit("a", (0, 1, 2), 1.0, True)]
    gather = {10**6: 2.0, 10: 0.25}
    sim = simulate_step(dataclasses.replace(DS056, host_fetch_s=0.0, launch_s=0.0), [10**6, 10, 10], visits,
                        gather_s=gather.__getitem__, reduce_s=lambda n: 0.0, ranks=8)
    assert sim.persistent_regather_s == pytest.approx(0.5)
    assert sim.step_s == pytest.approx(2.0 + 1.0 + 0.5)
    # 309 persistent tensors for RoBERTa-10B (10 per layer), each a 64-rank ring of 63 latency steps
    numels, _ = build_trace("bert", 5120, 30, 20480, 50265, 512, tokens=1, flops_per_s=1.0)
    small = [n for n in numels if n < DS056.persistence_threshold]
    c = CLUSTERS["p4d.24xlarge"]
    per_tensor = sum(ring_time(2 * n, 64, 8, instance=c.name, nic_bytes_per_s=c.inter_node_bandwidth,
                               nvlink_bytes_per_s=c.intra_node_bandwidth * c.intra_node_efficiency) for n in small)
    assert len(small) == 309

    def step(profile: str, grad_accum: int) -> float:
        return predict("roberta-10b", "p4d.24xlarge", 8, strategy="zero3", micro_batch=16, grad_accum=grad_accum,
                       profile=profile).step_time_s

    # v0.6.0 releases them at the optimizer step: gathered once per step, whatever the accumulation
    assert 2 * step("deepspeed-improved", 1) - step("deepspeed-improved", 2) == pytest.approx(per_tensor, rel=1e-6)
    # v0.5.6 releases them after every backward: gathered again at every micro-step
    assert step("deepspeed-0.5.6", 2) == pytest.approx(2 * step("deepspeed-0.5.6", 1), rel=1e-9)


def test_sync_before_each_prefetch_serialises_a_prefetch_bucket():
    # the prefetch rule as v0.5.6 writes it (its off-by-one means it never runs; deepspeed-improved replaced it)
    bare = dataclasses.replace(DS056, host_fetch_s=0.0, step_id_off_by_one=False)
    visits = [Visit("a", (0,), 1.0, False), Visit("b", (1,), 1.0, False), Visit("c", (2,), 1.0, False)]
    sim = simulate_step(bare, [10**6] * 3, visits, gather_s=lambda n: 2.0, reduce_s=lambda n: 0.0, ranks=8)
    # a: 2 exposed; prefetch b, c (3e6 < 5e7 elements): b exposed (2, sync before c), c overlaps a's compute
    # (max(1, 2)); b, c then compute 1 + 1
    assert sim.step_s == pytest.approx(2.0 + 2.0 + 2.0 + 1.0 + 1.0)
    # without the syncs the network runs the three gathers back to back (6) and only c's compute trails: 7
    unsynced = dataclasses.replace(bare, sync_before_each_prefetch=False, device_sync_per_fetch=False)
    sim = simulate_step(unsynced, [10**6] * 3, visits, gather_s=lambda n: 2.0, reduce_s=lambda n: 0.0, ranks=8)
    assert sim.step_s == pytest.approx(7.0)


def test_improved_profile_hides_gathers_behind_compute():
    sim = _two_visits(IMPROVED, gather=1.0, compute=3.0)
    assert sim.step_s == pytest.approx(1.0 + 3.0 + 3.0)  # only the first gather is exposed


def test_list_api_reduce_scatter_costs_one_copy_launch_per_rank():
    bare = dataclasses.replace(DS056, host_fetch_s=0.0)
    visits = [Visit("a", (0,), 1.0, True)]
    sim = simulate_step(bare, [10], visits, gather_s=lambda n: 0.0, reduce_s=lambda n: 0.25, ranks=512)
    assert sim.host_s == pytest.approx(512 * DS056.launch_s)
    assert sim.step_s == pytest.approx(max(1.0, 512 * DS056.launch_s) + 0.25)
    assert sim.num_reduces == 1 and sim.num_gathers == 0  # 10 elements: persistent, never gathered


def test_reuse_distance_regathers_a_100b_layer_under_checkpointing():
    # gpt-100b's layer (h = 10240, 1.26e9 elements) holds more than stage3_max_reuse_distance (1e9): after
    # the recomputed forward, c_attn (distance 2 x 9h^2 = 1.9e9) and attn.c_proj (1.7e9) are freed and
    # gathered again for the backward; mlp.c_fc (2 x 4h^2 = 0.84e9) and mlp.c_proj (0) are kept.
    numels, visits = build_trace("gpt", 10240, 2, 40960, 50257, 2048, tokens=1, flops_per_s=1.0)
    keep = _keep_after(visits, numels, DS056.max_reuse_distance)
    layer0 = [(v.module, k) for v, k in zip(visits, keep) if v.module.startswith("layer0.")]
    recompute = layer0[6:12]
    assert [m for m, _ in recompute][1] == "layer0.attn.c_attn"
    assert dict(recompute) == {"layer0.ln_1": False, "layer0.attn.c_attn": False, "layer0.attn.c_proj": False,
                               "layer0.ln_2": False, "layer0.mlp.c_fc": True, "layer0.mlp.c_proj": True}
    # (the LayerNorms are released by the rule too, but their tensors are under the persistence threshold)
    # roberta-10b's layer (h = 5120, 3.1e8 elements) stays within the distance: nothing is gathered a third time
    numels, visits = build_trace("bert", 5120, 2, 20480, 50265, 512, tokens=1, flops_per_s=1.0)
    keep = _keep_after(visits, numels, DS056.max_reuse_distance)
    recomputed = [k for v, k in zip(visits, keep) if v.module.startswith("layer0.")][8:16]
    assert all(recomputed)


def test_trace_counts_8n_compute():
    numels, visits = build_trace("gpt", 64, 3, 256, 512, 128, tokens=100, flops_per_s=1.0)
    # layers: forward, recomputed forward, backward (8N); the LM head is not recomputed (6N)
    layers = 3 * (3 * 64 * 64 + 64 * 64 + 2 * 64 * 256)
    assert sum(v.compute_s for v in visits) == pytest.approx((8 * layers + 6 * 512 * 64) * 100)
    # the trace's tensors are the Hugging Face model's parameters (tied embedding once), both families
    for name in ("tiny", "tiny-bert"):
        m = dataclasses.replace(get_preset(name), layers=3)
        numels, _ = build_trace(m.family, m.hidden, m.layers, m.ffn, m.vocab, m.seq, tokens=1, flops_per_s=1.0)
        assert sum(numels) == count_parameters(m)


def test_every_profile_field_has_a_source():
    fields = {f.name for f in dataclasses.fields(ImplementationProfile)} - {"name", "summary", "analytic"}
    assert fields <= set(PROFILE_SOURCES["deepspeed-0.5.6"]), fields - set(PROFILE_SOURCES["deepspeed-0.5.6"])
    changed = {f for f in fields if getattr(IMPROVED, f) != getattr(DS056, f)}
    assert changed - {"sync_before_each_prefetch", "list_api_copies", "wait_reductions_per_bucket"} <= \
        set(PROFILE_SOURCES["deepspeed-improved"])


# ---- predict / plan with a profile ----------------------------------------------------------------------------
def test_profile_prediction_is_self_consistent():
    x = predict("gpt-100b", "p4d.24xlarge", 64, strategy="zero3", micro_batch=2, profile="deepspeed-0.5.6")
    assert x.profile == "deepspeed-0.5.6" and x.partition_size == 512 and x.replicas == 1
    assert x.step_time_s > x.compute_time_s
    assert x.samples_per_s * x.step_time_s == pytest.approx(512 * 2)
    better = predict("gpt-100b", "p4d.24xlarge", 64, strategy="zero3", micro_batch=2, profile="deepspeed-improved")
    assert better.step_time_s < x.step_time_s
    assert predict("gpt-100b", "p4d.24xlarge", 64, strategy="zero3", micro_batch=2).profile == "mics_hf"


@pytest.mark.parametrize("kwargs, match", [
    (dict(profile="deepspeed-0.4"), r"unknown implementation profile 'deepspeed-0.4'; use one of \['mics_hf', "
                                    r"'deepspeed-0.5.6', 'deepspeed-improved'\]"),
    (dict(profile="deepspeed-0.5.6", strategy="mics"), r"use strategy='zero3' with it"),
])
def test_bad_profile_input_names_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        predict("bert-10b", "p3dn.24xlarge", 4, **kwargs)


def test_plan_with_a_baseline_adds_its_row():
    result = plan("gpt-100b", "p4d.24xlarge", 64, micro_batch="max", baseline="deepspeed-0.5.6")
    assert set(result.predictions) == {"mics", "zero3", "hsdp", "zero3:deepspeed-0.5.6"}
    assert result.predictions["zero3:deepspeed-0.5.6"].micro_batch == result.micro_batch == 2
    with pytest.raises(ValueError, match=r"use one of \['deepspeed-0.5.6', 'deepspeed-improved'\]"):
        plan("gpt-100b", "p4d.24xlarge", 64, baseline="mics_hf")


# ---- `mics-hf plan` -------------------------------------------------------------------------------------------
def test_cli_plan_defaults_to_the_largest_micro_batch_and_says_so(capsys):
    # README's command prints README's number (MiCS 149 TFLOPS/GPU for 175B on 16 p4de)
    assert main(["plan", "--model", "gpt-175b", "--cluster", "p4de", "--nodes", "16"]) == 0
    out = capsys.readouterr().out
    assert "micro-batch 2: the largest that fits at p = 64" in out
    assert "| MiCS | mics_hf | 64 | hierarchical | 38.300 | 149.4 |" in out
    assert main(["plan", "--model", "gpt-175b", "--cluster", "p4de", "--nodes", "16", "--micro-batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "the largest that fits" not in out and "micro-batch 1," in out


def test_cli_plan_with_deepspeed_baseline_prints_both_profiles(capsys):
    assert main(["plan", "--model", "gpt-100b", "--cluster", "p4d", "--nodes", "64",
                 "--baseline", "deepspeed-0.5.6"]) == 0
    out = capsys.readouterr().out
    assert "| ZeRO-3 | mics_hf | 512 | flat |" in out
    assert "| ZeRO-3 | deepspeed-0.5.6 | 512 | flat |" in out
    assert "MiCS / ZeRO-3 throughput:" in out and "MiCS / ZeRO-3 (deepspeed-0.5.6) throughput: 3.25x" in out
    # the ratio comes with how far the profile was from v0.5.6's own measured throughput
    assert "deepspeed-0.5.6 against DeepSpeed PR 1453's measurements" in out
    assert "RoBERTa-10B +54.7%; RoBERTa-50B +26.4%" in out


@pytest.mark.parametrize("argv, message", [
    (["--baseline", "deepspeed-0.4"], "baseline='deepspeed-0.4' is not a ZeRO-3 implementation profile; use one of "
                                      "['deepspeed-0.5.6', 'deepspeed-improved']"),
    (["--model", "gpt-7b"], "unknown preset 'gpt-7b'; valid presets"),
])
def test_cli_plan_bad_input_is_a_clear_error(capsys, argv, message):
    args = {"--model": "gpt-100b", "--cluster": "p4d", "--nodes": "64"}
    for flag, value in zip(argv[::2], argv[1::2]):
        args[flag] = value
    assert main(["plan", *[x for pair in args.items() for x in pair]]) == 2
    assert message in capsys.readouterr().err


def test_cli_plan_rejects_a_bad_micro_batch(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--model", "gpt-100b", "--cluster", "p4d", "--nodes", "64", "--micro-batch", "0"])
    assert "--micro-batch '0': give a positive integer or 'max'" in capsys.readouterr().err
