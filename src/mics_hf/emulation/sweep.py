"""The emulated weak-scaling sweep: MiCS, ZeRO-3 and FSDP2 HSDP on 1..N emulated nodes, measured and predicted.

`mics-hf emulate weak-scaling` (root only) builds one emulated cluster of max(nodes) namespaces with tbf-shaped
links (``mics_hf.emulation.cluster``), and for every node count runs each strategy on the first n nodes with compute
slept by the scaling rule of ``mics_hf.emulation.scale``. Per run it measures the step time (slowest rank,
after warm-up) and the bytes that crossed each node's link (eth0 counters), and predicts the step time with
``costmodel.predict`` on the emulated cluster's description. Before the sweep it measures the two numbers of
the machine the cost model needs (loopback all-gather rate, per-collective latency); after it, the flat and
hierarchical all-gathers' link bytes at each spanning partition size. Everything created is removed on exit,
error or signal (the cluster's own cleanup).

The runs:
- ``mics`` with p = k (a partition is one node) and ``zero3`` (p = world) at every node count;
- ``hsdp`` (FSDP2, p = k) at every node count;
- ``mics`` and ``hsdp`` with p = 2k (a partition spans two nodes) at every node count >= 2.

Throughput is reported in real-instance units: the emulated FLOP rate (8N convention) divided by the time scale
f, i.e. the TFLOPS per GPU the same schedule would reach on the real instance (compute alone gives the
instance's achievable rate, compute_efficiency x peak).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Sequence

from ..planning.costmodel import predict
from .cluster import EmulatedCluster, measure_all_gather, run_phases
from .scale import EMULATED_BYTES, EmulationScale

__all__ = ["SweepResult", "calibrate", "calibrate_engine_cpu", "check", "engine_cpu_from_run", "format_table", "plot",
           "run_config", "sweep"]

LABELS = {"mics": "MiCS", "zero3": "ZeRO-3", "hsdp": "FSDP2 HSDP"}


def _port(index: int) -> int:
    return 29600 + index % 300


def calibrate(scale: EmulationScale, *, megabytes: float = 16, timeout: float = 300, repeat: int = 21
              ) -> EmulationScale:
    """Measure the loopback all-gather rate (one node) and gloo's latency per ring step.

    The latency is the median of ``repeat`` 10 kB all-gathers over 2 nodes (2k ranks, so 2k - 1 ring steps),
    divided by the steps: a single call of a few milliseconds varies by 3x on a loaded 2-core machine.
    """
    k = scale.ranks_per_node
    local = measure_all_gather(1, k, megabytes, scale.link_mbit, timeout=timeout)
    bandwidth = (k - 1) / k * local["payload_bytes"] / local["seconds"]
    small = measure_all_gather(2, k, 0.01, scale.link_mbit, timeout=timeout, repeat=repeat)
    return dataclasses.replace(scale, intra_node_bandwidth=bandwidth, latency_s=small["seconds"] / (2 * k - 1))


def engine_cpu_from_run(scale: EmulationScale, step_seconds: float) -> float:
    """The engine's CPU seconds per micro-step: a communication-free run's step time less the slept compute,
    per micro-step (never negative: a run faster than its sleeps measures no engine time)."""
    return max(0.0, (step_seconds - scale.compute_seconds_per_step()) / scale.grad_accum)


def calibrate_engine_cpu(scale: EmulationScale, *, warmup: int = 1, steps: int = 2, timeout: float = 600
                         ) -> EmulationScale:
    """Measure the engine's own CPU time per micro-step in a run without communication: one rank (p = 1, a
    world of one, so no collective moves a byte), same model, tokens and micro-steps as the sweep.

    On a machine where the sweep's ranks share cores this undercounts their CPU time (one rank runs alone
    here); the record states it.
    """
    alone = dataclasses.replace(scale, ranks_per_node=1)
    with EmulatedCluster(1, scale.link_mbit) as cluster:
        run = run_config(cluster, alone, 1, "mics", 1, warmup=warmup, steps=steps, timeout=timeout)
    return dataclasses.replace(scale, engine_cpu_s=engine_cpu_from_run(scale, run["step_seconds"]))


def run_config(cluster: EmulatedCluster, scale: EmulationScale, nodes: int, strategy: str, partition_size: int,
               *, warmup: int = 1, steps: int = 2, timeout: float = 600, port: int = 29600) -> dict:
    """One strategy on the first ``nodes`` nodes of ``cluster``: measured step time and link bytes."""
    k = scale.ranks_per_node
    world = nodes * k
    fields = {f.name: getattr(scale, f.name) for f in dataclasses.fields(scale)}
    argv = [sys.executable, "-m", "mics_hf.emulation.step", "--strategy", strategy,
            "--partition-size", str(partition_size), "--scale", json.dumps(fields),
            "--warmup", str(warmup), "--steps", str(steps)]
    phase = run_phases(cluster, [argv] * world, k, ["steps"], timeout=timeout, port=port)["steps"]
    ranks = [json.loads(text) for text in phase["done"]]
    per_step = [max(r["step_seconds"][i] for r in ranks) for i in range(steps)]
    tx = [b / steps for b in phase["tx"][:nodes]]
    return {
        "strategy": strategy, "nodes": nodes, "ranks": world, "partition_size": partition_size,
        "step_seconds": statistics.median(per_step), "step_seconds_all": per_step,
        "link_tx_bytes_per_node_per_step": tx, "loss": ranks[0]["loss"],
        "booked_bytes_per_step": [r["booked_bytes_per_step"] for r in ranks],
    }


def _predicted(scale: EmulationScale, nodes: int, strategy: str, p: int) -> float:
    cluster = scale.cost_model_cluster()
    kwargs = {} if strategy == "zero3" else {"partition_size": p}
    return predict(scale.preset, cluster, nodes, strategy=strategy, grad_accum=scale.grad_accum,
                   hierarchical_reduce=True, param_bytes=EMULATED_BYTES, reduce_bytes=EMULATED_BYTES,
                   hop2_bytes=EMULATED_BYTES, **kwargs).step_time_s


@dataclasses.dataclass
class SweepResult:
    scale: EmulationScale
    runs: list[dict]
    all_gather: list[dict]
    meta: dict

    def find(self, strategy: str, nodes: int, p: int | None = None) -> dict | None:
        for run in self.runs:
            if run["strategy"] == strategy and run["nodes"] == nodes and (p is None or run["partition_size"] == p):
                return run
        return None

    def to_json(self) -> dict:
        fields = {f.name: getattr(self.scale, f.name) for f in dataclasses.fields(self.scale)}
        return {"meta": self.meta, "scale": self.scale.describe(), "scale_fields": fields, "runs": self.runs,
                "all_gather": self.all_gather}

    @classmethod
    def from_json(cls, data: dict) -> "SweepResult":
        """Rebuild a recorded sweep (to re-render its table, criteria and plot without rerunning it)."""
        if "scale_fields" not in data:
            raise ValueError("this record has no 'scale_fields': it is not a sweep record written by "
                             "`mics-hf emulate weak-scaling`; rerun the sweep to get one")
        return cls(scale=EmulationScale(**data["scale_fields"]), runs=data["runs"], all_gather=data["all_gather"],
                   meta=data["meta"])


def plan_runs(nodes_list: Sequence[int], k: int, strategies: Sequence[str] = ("mics", "zero3", "hsdp")
              ) -> list[tuple[int, str, int]]:
    """(nodes, strategy, partition size) of every run, in order."""
    unknown = sorted(set(strategies) - set(LABELS))
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; use some of {list(LABELS)}")
    runs = []
    for n in nodes_list:
        runs += [(n, "mics", k), (n, "zero3", n * k), (n, "hsdp", k)]
        if n >= 2:
            runs += [(n, "mics", 2 * k), (n, "hsdp", 2 * k)]
    return [run for run in runs if run[1] in strategies]


def _annotate(scale: EmulationScale, runs: list[dict]) -> None:
    """Add predicted step time, real-equivalent TFLOPS per GPU and weak-scaling efficiency to each run."""
    flops_per_step = 8 * scale.n_params * scale.tokens_per_micro_step * scale.grad_accum
    for run in runs:
        run["predicted_step_seconds"] = _predicted(scale, run["nodes"], run["strategy"], run["partition_size"])
        run["prediction_error"] = run["predicted_step_seconds"] / run["step_seconds"] - 1
        run["tflops_per_gpu_real_equivalent"] = flops_per_step / run["step_seconds"] / scale.time_scale / 1e12
    for run in runs:
        family = [r for r in runs if r["strategy"] == run["strategy"]
                  and (r["partition_size"] == run["partition_size"] or run["strategy"] == "zero3")]
        base = min(family, key=lambda r: r["nodes"])
        run["weak_scaling_efficiency"] = base["step_seconds"] / run["step_seconds"]
        run["efficiency_base_nodes"] = base["nodes"]


def sweep(scale: EmulationScale, nodes_list: Sequence[int] = (1, 2, 4), *, warmup: int = 1, steps: int = 2,
          strategies: Sequence[str] = ("mics", "zero3", "hsdp"), calibrate_first: bool = True,
          measure_all_gathers: bool = True, log=print) -> SweepResult:
    nodes_list = sorted(set(int(n) for n in nodes_list))
    if nodes_list[0] < 1:
        raise ValueError(f"node counts must be >= 1, got {nodes_list}")
    planned = plan_runs(nodes_list, scale.ranks_per_node, strategies)  # bad strategy names fail before any work
    if calibrate_first:
        log("calibrating: loopback all-gather rate and cross-node latency ...")
        scale = calibrate(scale)
        log(f"  intra-node {scale.intra_node_bandwidth / 1e6:.0f} MB/s, latency {scale.latency_s * 1e3:.2f} ms per ring step")
        log("calibrating: the engine's CPU time per micro-step (one rank, no communication) ...")
        scale = calibrate_engine_cpu(scale, warmup=warmup, steps=steps)
        log(f"  engine CPU {scale.engine_cpu_s * 1e3:.1f} ms per micro-step beyond the slept compute")
    runs = []
    with EmulatedCluster(max(nodes_list), scale.link_mbit) as cluster:
        for i, (n, strategy, p) in enumerate(planned):
            log(f"run {i + 1}: {LABELS[strategy]} p={p} on {n} node(s) x {scale.ranks_per_node} ...")
            run = run_config(cluster, scale, n, strategy, p, warmup=warmup, steps=steps, port=_port(i))
            log(f"  step {run['step_seconds']:.3f} s, link tx/node/step "
                f"{[round(b / 1e6, 2) for b in run['link_tx_bytes_per_node_per_step']]} MB")
            runs.append(run)
    _annotate(scale, runs)
    all_gather = []
    if measure_all_gathers:
        for n in [n for n in nodes_list if n >= 2]:
            k = scale.ranks_per_node
            flat = measure_all_gather(n, k, 16, scale.link_mbit, hierarchical=False)
            hier = measure_all_gather(n, k, 16, scale.link_mbit, hierarchical=True)
            p = n * k
            measured = statistics.mean(hier["tx_bytes_per_node"]) / statistics.mean(flat["tx_bytes_per_node"])
            all_gather.append({"nodes": n, "partition_size": p, "flat_tx_per_node": flat["tx_bytes_per_node"],
                               "hierarchical_tx_per_node": hier["tx_bytes_per_node"],
                               "measured_ratio": measured, "ideal_ratio": (p - k) / (p - 1),
                               "flat_seconds": flat["seconds"], "hierarchical_seconds": hier["seconds"]})
            log(f"all-gather p={p}: hierarchical/flat link bytes {measured:.3f} (ideal {(p - k) / (p - 1):.3f})")
    meta = _meta()
    return SweepResult(scale=scale, runs=runs, all_gather=all_gather, meta=meta)


def _meta() -> dict:
    import torch
    import transformers

    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        cpu = platform.processor() or "unknown"
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPU cores ({cpu}), {platform.system()} {platform.release()}",
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        # the console script's name, not the path it was run from (records must not name this machine's paths)
        "command": " ".join(["mics-hf" if Path(sys.argv[0]).name in ("cli.py", "mics-hf") else Path(sys.argv[0]).name,
                             *sys.argv[1:]]),
    }


# ---- verdicts, table and plot ---------------------------------------------------------------------------------
def check(result: SweepResult, *, min_efficiency: float = 0.90, min_ratio: float = 2.0,
          byte_tolerance: float = 0.05, prediction_tolerance: float = 0.20) -> list[tuple[str, bool, str]]:
    """The issue's criteria as (name, passed, detail) lines; measured numbers only, nothing assumed."""
    k = result.scale.ranks_per_node
    nodes = sorted({r["nodes"] for r in result.runs})
    lo, hi = nodes[0], nodes[-1]
    out = []
    mics_hi, zero3_hi = result.find("mics", hi, k), result.find("zero3", hi)
    if mics_hi is not None:
        out.append((f"MiCS weak-scaling efficiency {lo} -> {hi} nodes >= {min_efficiency:.0%}",
                    mics_hi["weak_scaling_efficiency"] >= min_efficiency,
                    f"{mics_hi['weak_scaling_efficiency']:.1%}"))
    if mics_hi is not None and zero3_hi is not None:
        ratio = zero3_hi["step_seconds"] / mics_hi["step_seconds"]
        out.append((f"MiCS / ZeRO-3 throughput at {hi} nodes >= {min_ratio:g}", ratio >= min_ratio,
                    f"{ratio:.2f}x"))
    for ag in result.all_gather:
        err = ag["measured_ratio"] / ag["ideal_ratio"] - 1
        out.append((f"hierarchical all-gather link bytes within {byte_tolerance:.0%} of (p-k)/(p-1) "
                    f"(p={ag['partition_size']})", abs(err) <= byte_tolerance,
                    f"{ag['measured_ratio']:.3f} vs {ag['ideal_ratio']:.3f} ({err:+.1%})"))
    for n in nodes:
        mics, hsdp = result.find("mics", n, 2 * k), result.find("hsdp", n, 2 * k)
        if mics and hsdp:
            speedup = hsdp["step_seconds"] / mics["step_seconds"]
            out.append((f"MiCS ahead of FSDP2 HSDP, partition spanning 2 nodes, {n} nodes", speedup > 1,
                        f"{speedup:.2f}x"))
    for run in result.runs:
        if run["strategy"] == "hsdp":
            continue  # FSDP2's CPU schedule (synchronous reduce-scatter) is not what the cost model describes
        out.append((f"cost model within {prediction_tolerance:.0%}: {LABELS[run['strategy']]} p={run['partition_size']} "
                    f"{run['nodes']} node(s)", abs(run["prediction_error"]) <= prediction_tolerance,
                    f"predicted {run['predicted_step_seconds']:.2f} s vs measured {run['step_seconds']:.2f} s "
                    f"({run['prediction_error']:+.1%})"))
    return out


def format_table(result: SweepResult) -> str:
    head = ("| strategy | p | nodes x ranks | step s (measured) | step s (cost model) | error | TFLOPS/GPU (real eq.) "
            "| weak scaling | inter-node MB/node/step |")
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    k = result.scale.ranks_per_node
    for run in sorted(result.runs, key=lambda r: (r["strategy"] != "mics", r["strategy"], r["partition_size"] if r["strategy"] != "zero3" else 0, r["nodes"])):
        tx = statistics.mean(run["link_tx_bytes_per_node_per_step"]) / 1e6 if run["nodes"] > 1 else 0.0
        lines.append(
            f"| {LABELS[run['strategy']]} | {run['partition_size']} | {run['nodes']} x {k} | {run['step_seconds']:.3f} | "
            f"{run['predicted_step_seconds']:.3f} | {run['prediction_error']:+.1%} | "
            f"{run['tflops_per_gpu_real_equivalent']:.1f} | {run['weak_scaling_efficiency']:.1%} | {tx:.2f} |"
        )
    return "\n".join(lines)


def plot(result: SweepResult, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    k = result.scale.ranks_per_node
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    series = [("mics", k, "MiCS p=k"), ("zero3", None, "ZeRO-3"), ("hsdp", k, "FSDP2 HSDP p=k"),
              ("mics", 2 * k, "MiCS p=2k (spans nodes)"), ("hsdp", 2 * k, "FSDP2 HSDP p=2k")]
    for strategy, p, label in series:
        runs = sorted((r for r in result.runs if r["strategy"] == strategy and (p is None or r["partition_size"] == p)),
                      key=lambda r: r["nodes"])
        if not runs:
            continue
        x = [r["ranks"] for r in runs]
        axes[0].plot(x, [r["tflops_per_gpu_real_equivalent"] for r in runs], marker="o", label=label)
        axes[1].plot(x, [100 * r["weak_scaling_efficiency"] for r in runs], marker="o", label=label)
        if strategy != "hsdp":
            axes[2].scatter([r["step_seconds"] for r in runs], [r["predicted_step_seconds"] for r in runs], label=label)
    axes[0].set(xlabel="ranks (emulated GPUs)", ylabel=f"TFLOPS per GPU, {result.scale.real_cluster.name} equivalent",
                title="Throughput per GPU (8N)")
    axes[1].set(xlabel="ranks (emulated GPUs)", ylabel="% of the smallest run's throughput per GPU",
                title="Weak-scaling efficiency")
    top = max(max(r["step_seconds"], r["predicted_step_seconds"]) for r in result.runs) * 1.1
    axes[2].plot([0, top], [0, top], color="grey", lw=0.8)
    axes[2].fill_between([0, top], [0, 0.8 * top], [0, 1.2 * top], color="grey", alpha=0.15, label="+-20%")
    axes[2].set(xlabel="measured step time (s)", ylabel="cost model (s)", title="Cost model vs emulation",
                xlim=(0, top), ylim=(0, top))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Emulated {result.scale.real_cluster.name}, {result.scale.real_preset.name} shape "
                 f"(hidden {result.scale.hidden}, {result.scale.layers} layers), {k} ranks per node")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_report(result: SweepResult, png_name: str) -> str:
    """The markdown record: provenance, what was emulated and what measured, the table, the criteria, the plot."""
    sc, d, m = result.scale, result.scale.describe(), result.meta
    sleeps = d["sleep_seconds"]
    verdicts = "\n".join(f"- {'PASS' if ok else 'FAIL'}: {name}: {detail}" for name, ok, detail in check(result))
    ag = "\n".join(
        f"| {a['nodes']} x {sc.ranks_per_node} | {a['partition_size']} | {statistics.mean(a['flat_tx_per_node']) / 1e6:.2f} "
        f"| {statistics.mean(a['hierarchical_tx_per_node']) / 1e6:.2f} | {a['measured_ratio']:.3f} "
        f"| {a['ideal_ratio']:.3f} |" for a in result.all_gather)
    ag_table = ("\n\nOne 16 MiB all-gather, bytes on each node's link (mean over nodes):\n\n"
                "| nodes x ranks | p | flat MB | hierarchical MB | measured ratio | (p-k)/(p-1) |\n"
                "| --- | ---: | ---: | ---: | ---: | ---: |\n" + ag) if result.all_gather else ""
    return f"""# Emulated weak scaling ({m['date']})

- Command: `{m['command']}`
- Machine: {m['machine']}; Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}.
- Emulated: {d['instance']} ({sc.ranks_per_node} ranks per emulated node instead of 8), {d['model']} shape at
  hidden {sc.hidden}, {sc.layers} layers, vocabulary {sc.preset.vocab} ({sc.n_params / 1e6:.2f}M
  parameters), {d['tokens_per_micro_step']} tokens per rank per micro-step ({sc.real_preset.micro_batch} x
  {sc.real_preset.seq}), {sc.grad_accum} micro-steps per optimizer step. Links: tbf {sc.link_mbit:g} Mbit/s per node
  ({d['link_goodput_bytes_per_s'] / 1e6:.2f} MB/s goodput) for the instance's {d['real_goodput_bytes_per_s'] / 1e9:.2f}
  GB/s; time scale f = {d['time_scale']:.3g}; compute slept at {d['device_tflops'] * 1e3:.1f} GFLOP/s per rank:
  {sleeps['layer_forward'] * 1e3:.1f} ms forward and {sleeps['layer_backward'] * 1e3:.1f} ms backward per layer per
  micro-step ([Note: emulation scaling rule] in `mics_hf/emulate_scale.py`).
- Measured: step times (slowest rank, median of the timed steps after warm-up), bytes on every node's eth0.
  Calibrated for the cost model: loopback all-gather {sc.intra_node_bandwidth / 1e6:.0f} MB/s, gloo latency
  {sc.latency_s * 1e3:.2f} ms per ring step (median of 21 small all-gathers over 2 nodes, per step); the
  engine's own CPU time {sc.engine_cpu_s * 1e3:.1f} ms per micro-step beyond the slept compute (one rank, no
  communication), counted by the cost model as compute.
- Cost model: `mics_hf.planning.costmodel.predict` on `EmulationScale.cost_model_cluster()` (the same rule, gloo's
  reduce-scatter at twice the ring volume, fp32 on the wire); nothing fitted to these measurements.
- TFLOPS/GPU: the emulated 8N FLOP rate divided by f, i.e. what the schedule reaches on the real instance
  (compute alone: {sc.real_cluster.compute_efficiency * sc.real_cluster.peak_tflops:.0f}).

{format_table(result)}{ag_table}

Criteria:

{verdicts}

![emulated weak scaling]({png_name})
"""


def write_report(result: SweepResult, output_dir: str | Path, *, stem: str | None = None) -> dict[str, Path]:
    """Write <stem>.json, <stem>.png and <stem>.md (provenance, table, criteria) into output_dir.

    An existing file is never overwritten: the stem gets _2, _3, ... instead.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = stem or f"emulated_weak_scaling_{result.meta['date']}"
    stem, n = base, 1
    while any((out / f"{stem}.{ext}").exists() for ext in ("json", "png", "md")):
        n += 1
        stem = f"{base}_{n}"
    paths = {"json": out / f"{stem}.json", "png": out / f"{stem}.png", "md": out / f"{stem}.md"}
    paths["json"].write_text(json.dumps(result.to_json(), indent=1) + "\n")
    plot(result, paths["png"])
    paths["md"].write_text(format_report(result, paths["png"].name))
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m mics_hf.emulation.sweep render <record.json>`: rewrite the .md and .png beside a recorded sweep."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mics_hf.emulation.sweep")
    parser.add_argument("command", choices=("render",))
    parser.add_argument("record", help="a sweep's .json record")
    args = parser.parse_args(argv)
    path = Path(args.record)
    result = SweepResult.from_json(json.loads(path.read_text()))
    _annotate(result.scale, result.runs)  # recomputes predictions with the current cost model
    plot(result, path.with_suffix(".png"))
    path.with_suffix(".md").write_text(format_report(result, path.with_suffix(".png").name))
    print(format_table(result))
    for name, ok, detail in check(result):
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")


if __name__ == "__main__":
    main()
