"""The emulation's scaling rule, slept compute, and the sweep's verdicts (no namespaces needed)."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch

from mics_hf.planning.costmodel import CLUSTERS, predict, unit_parameters
from mics_hf.emulation.scale import FRAME_EFFICIENCY, EmulationScale
from mics_hf.emulation.step import _SleptCompute, build_model
from mics_hf.emulation.sweep import (
    SweepResult,
    _annotate,
    check,
    engine_cpu_from_run,
    format_table,
    plan_runs,
    plot,
)


def test_time_scale_by_hand():
    scale = EmulationScale(instance="p3dn.24xlarge", link_mbit=200)
    # 200 Mbit/s less framing (1448 of 1514 bytes), 4-byte parameters, over 100 Gbit/s x 0.60 achievable
    # carrying 2-byte ones
    goodput = 200e6 / 8 * 1448 / 1514
    assert scale.link_goodput == pytest.approx(goodput)
    assert scale.time_scale == pytest.approx((goodput / 4) / (100e9 / 8 * 0.60 / 2))
    # R_e = f x 0.52 x 125 TFLOPS
    assert scale.device_flops == pytest.approx(scale.time_scale * 0.52 * 125e12)


@pytest.mark.parametrize("hidden,layers", [(64, 4), (128, 8), (256, 6)])
def test_compute_to_communication_ratio_is_the_real_instances(hidden, layers):
    """Seconds to send one unit's parameters over the node link / seconds to compute it, emulated vs real
    (2-byte parameters on the real instance, 4-byte ones in the emulation)."""
    scale = EmulationScale(hidden=hidden, layers=layers, heads=2)
    real = CLUSTERS["p3dn.24xlarge"]
    real_unit, _ = unit_parameters(scale.real_preset)
    tokens = scale.real_preset.micro_batch * scale.real_preset.seq
    real_ratio = (2 * real_unit / (real.inter_node_bandwidth * real.inter_node_efficiency)) / (
        8 * real_unit * tokens / (real.compute_efficiency * real.peak_tflops * 1e12))
    unit, _ = unit_parameters(scale.preset)
    sleeps = scale.sleep_seconds()
    emulated_ratio = (4 * unit / scale.link_goodput) / (sleeps["layer_forward"] + sleeps["layer_backward"])
    assert emulated_ratio == pytest.approx(real_ratio, rel=1e-9)


def test_reduced_model_keeps_shape_and_embedding_share():
    scale = EmulationScale(hidden=128, layers=8)
    real, small = scale.real_preset, scale.preset
    assert (small.family, small.seq, small.micro_batch) == (real.family, real.seq, real.micro_batch)
    assert small.ffn / small.hidden == real.ffn / real.hidden
    real_unit, real_root = unit_parameters(real)
    unit, root = unit_parameters(small)
    real_share = real.vocab * real.hidden / (real.layers * real_unit)
    share = small.vocab * small.hidden / (small.layers * unit)
    assert share == pytest.approx(real_share, rel=0.05)


def test_cost_model_cluster_computes_at_the_emulated_rate():
    scale = EmulationScale(grad_accum=4)
    pred = predict(scale.preset, scale.cost_model_cluster(), 1, strategy="mics", partition_size=2, grad_accum=4)
    assert pred.compute_time_s == pytest.approx(scale.compute_seconds_per_step(), rel=1e-9)
    assert scale.cost_model_cluster().reduce_scatter_volume == 2.0
    assert scale.cost_model_cluster().inter_node_efficiency == FRAME_EFFICIENCY


def test_engine_cpu_time_is_counted_as_compute():
    """The p = k runs' steps are mostly the engine's own CPU work: a communication-free run measures it, and the
    cost model adds it to every micro-step's compute."""
    scale = EmulationScale(grad_accum=4)
    slept = scale.compute_seconds_per_step()
    # a one-rank run took 1.2 s more than its sleeps over 4 micro-steps: 0.3 s per micro-step
    assert engine_cpu_from_run(scale, slept + 1.2) == pytest.approx(0.3)
    assert engine_cpu_from_run(scale, slept - 0.1) == 0.0  # faster than its sleeps: no engine time measured
    busy = dataclasses.replace(scale, engine_cpu_s=0.3)
    bare = predict(scale.preset, scale.cost_model_cluster(), 1, strategy="mics", partition_size=2, grad_accum=4)
    with_cpu = predict(busy.preset, busy.cost_model_cluster(), 1, strategy="mics", partition_size=2, grad_accum=4)
    assert with_cpu.compute_time_s == pytest.approx(slept + 4 * 0.3, rel=1e-9)
    # one node: the intra-node collectives hide behind compute, so the step grows by the CPU time itself
    assert with_cpu.step_time_s - bare.step_time_s == pytest.approx(4 * 0.3, rel=0.05)
    with pytest.raises(ValueError, match="engine_cpu_s=-1"):
        EmulationScale(engine_cpu_s=-1)


@pytest.mark.parametrize("kwargs,match", [
    ({"instance": "p9"}, "unknown cluster"),
    ({"model": "bert-11b"}, "unknown preset"),
    ({"hidden": 0}, "hidden=0"),
    ({"link_mbit": -1}, "link_mbit"),
    ({"run_tokens": 10_000}, "run_tokens"),
    ({"micro_batch": 0}, "micro_batch"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EmulationScale(**kwargs)


def test_slept_compute_sleeps_forward_and_backward():
    x = torch.ones(3, requires_grad=True)
    t0 = time.perf_counter()
    y = _SleptCompute.apply(x * 2, 0.05, 0.15)
    forward = time.perf_counter() - t0
    t0 = time.perf_counter()
    y.sum().backward()
    backward = time.perf_counter() - t0
    assert 0.05 <= forward < 0.15 and 0.15 <= backward < 0.4
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_backward_sleep_precedes_the_layers_gradients():
    """The reduce-scatter must not see a layer's gradients before its (slept) backward compute has run."""
    scale = EmulationScale(hidden=64, layers=2, heads=2, link_mbit=1e6)  # tiny sleeps
    model, layers = build_model(scale)
    events = []
    orig = _SleptCompute.backward

    def spy(ctx, grad):
        events.append("sleep")
        return orig(ctx, grad)

    _SleptCompute.backward = staticmethod(spy)
    try:
        layers[-1].register_full_backward_hook(lambda *a: events.append("layer-grads"))
        ids = torch.randint(3, scale.preset.vocab, (1, 4))
        model(input_ids=ids, labels=ids).loss.backward()
    finally:
        _SleptCompute.backward = staticmethod(orig)
    # the LM head's sleep, then the last layer's sleep, then that layer's own gradients
    assert events[:3] == ["sleep", "sleep", "layer-grads"]


def _synthetic(step: dict) -> SweepResult:
    scale = EmulationScale()
    runs = []
    for n, strategy, p in plan_runs((1, 2, 4), 2):
        runs.append({"strategy": strategy, "nodes": n, "ranks": 2 * n, "partition_size": p,
                     "step_seconds": step[(strategy, p if strategy != "zero3" else None, n)],
                     "link_tx_bytes_per_node_per_step": [1e6] * n})
    _annotate(scale, runs)
    ag = [{"nodes": 4, "partition_size": 8, "measured_ratio": 0.84, "ideal_ratio": 6 / 7}]
    return SweepResult(scale=scale, runs=runs, all_gather=ag, meta={"date": "2026-01-01"})


def _steps(mics4: float, zero3_4: float) -> dict:
    s = {}
    for n in (1, 2, 4):
        s[("mics", 2, n)] = 10.0 if n == 1 else (10.2 if n == 2 else mics4)
        s[("zero3", None, n)] = 10.0 if n == 1 else (15.0 if n == 2 else zero3_4)
        s[("hsdp", 2, n)] = 11.0
        s[("mics", 4, n)] = 12.0
        s[("hsdp", 4, n)] = 13.0
    return s


def test_verdicts_follow_the_numbers(tmp_path):
    good = {name: ok for name, ok, _ in check(_synthetic(_steps(mics4=10.5, zero3_4=21.5)))}
    assert good["MiCS weak-scaling efficiency 1 -> 4 nodes >= 90%"]  # 10 / 10.5 = 95%
    assert good["MiCS / ZeRO-3 throughput at 4 nodes >= 2"]  # 21.5 / 10.5 = 2.05
    assert good["MiCS ahead of FSDP2 HSDP, partition spanning 2 nodes, 4 nodes"]
    assert good["hierarchical all-gather link bytes within 5% of (p-k)/(p-1) (p=8)"]  # 0.84 vs 0.857: -2%
    bad = {name: ok for name, ok, _ in check(_synthetic(_steps(mics4=11.5, zero3_4=20.0)))}
    assert not bad["MiCS weak-scaling efficiency 1 -> 4 nodes >= 90%"]  # 87%
    assert not bad["MiCS / ZeRO-3 throughput at 4 nodes >= 2"]  # 1.74
    result = _synthetic(_steps(mics4=10.5, zero3_4=21.5))
    run = result.find("zero3", 4)
    assert run["weak_scaling_efficiency"] == pytest.approx(10.0 / 21.5)
    # throughput in real-instance units: compute alone reaches the instance's achievable rate
    unit, root = unit_parameters(result.scale.preset)
    ideal = result.scale.compute_seconds_per_step()
    mics1 = result.find("mics", 1, 2)
    assert mics1["tflops_per_gpu_real_equivalent"] == pytest.approx(0.52 * 125 * ideal / 10.0, rel=1e-6)
    table = format_table(result)
    assert table.count("\n") == 2 + len(result.runs) - 1 and "ZeRO-3" in table
    png = plot(result, tmp_path / "sweep.png")
    assert png.stat().st_size > 10_000
    json.dumps(result.to_json())  # the record must be serialisable


def test_a_recorded_sweep_renders_again_with_the_same_verdicts(tmp_path):
    from mics_hf.emulation.sweep import main as sweep_main
    from mics_hf.emulation.sweep import write_report

    result = _synthetic(_steps(mics4=10.5, zero3_4=21.5))
    result.meta.update(command="mics-hf emulate weak-scaling", machine="test", python="3", torch="t",
                       transformers="t")
    result.all_gather[0].update(flat_tx_per_node=[1e6] * 4, hierarchical_tx_per_node=[0.84e6] * 4)
    again = SweepResult.from_json(json.loads(json.dumps(result.to_json())))
    assert again.scale == result.scale and check(again) == check(result)
    paths = write_report(result, tmp_path, stem="sweep")
    second = write_report(result, tmp_path, stem="sweep")  # never overwrites a record
    assert second["md"].name == "sweep_2.md" and paths["md"].exists()
    text = paths["md"].read_text()
    assert "| MiCS | 2 | 4 x 2 |" in text and "PASS: MiCS weak-scaling efficiency 1 -> 4 nodes >= 90%" in text
    assert "](sweep.png)" in text
    paths["md"].unlink()
    sweep_main(["render", str(paths["json"])])
    assert paths["md"].read_text() == text
