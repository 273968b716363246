#!/usr/bin/env python
"""The paper's weak-scaling study on a Slurm cluster: MiCS against ZeRO-3 and the peer, FSDP2 HSDP.

What it does, in the order a user runs it:

    plan     one run directory per (strategy, node count) under --out, each with the Accelerate config for that
             run (derived from the shipped templates in accelerate_configs/) and a command.sh holding the exact
             `sbatch --nodes N slurm/pretrain.sbatch <config> <recipe> <recipe args>` line; prints the sweep
             with the cost model's prediction for every run, and writes submit_all.sh.
    collect  reads every run's metrics.jsonl (the recipes write one row per optimizer step), takes medians after
             the warm-up steps and prints the paper-style table: TFLOPS per GPU (8N), samples/s, weak-scaling
             efficiency and the MiCS / ZeRO-3 throughput ratio per node count; writes results.md and
             results.json. --predict adds the cost model's numbers beside the measured ones.
    plot     PNGs of the same numbers: TFLOPS per GPU, efficiency and the MiCS / ZeRO-3 ratio against GPUs.

Why weak scaling: the paper's claim (99.4% from 128 to 512 GPUs for MiCS, 72% for ZeRO-3) keeps the work per GPU
fixed, so the per-GPU micro-batch is the same in every run and the global batch grows with the GPU count. Under
that rule TFLOPS per GPU at N nodes over TFLOPS per GPU at the smallest node count is the efficiency (1.0 =
perfectly linear), and at one node count all strategies process the same global batch, so their samples/s ratio
is a like-for-like speed-up.

The three strategies are the same recipe script under three Accelerate configs:

    mics   mics_hf, partition group p (default: the smallest that fits, chosen by mics_hf.planning.costmodel.plan),
           hierarchical all-gather when the group spans nodes, two-hop gradient synchronisation
    zero3  mics_hf with p = world and flat collectives: ZeRO-3's partitioning and communication
    hsdp   Accelerate's own FSDP2 on a 2-D mesh (replicate x shard) with the shard group = MiCS's p: the public
           peer with MiCS's grouping but flat all-gathers (see the note in each generated hsdp config)

Usage:
    python scripts/weak_scaling.py plan --preset gpt2-10b --cluster p4d --nodes 1,2,4,8,16,32,64
    bash runs/weak_scaling/gpt2-10b_p4d/submit_all.sh          # on the cluster's login node
    python scripts/weak_scaling.py collect --out runs/weak_scaling/gpt2-10b_p4d --predict
    python scripts/weak_scaling.py plot --out runs/weak_scaling/gpt2-10b_p4d --predict
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from mics_hf.planning import costmodel
from mics_hf.planning.presets import PRESETS, get_preset

REPO = Path(__file__).resolve().parents[1]
SBATCH = "slurm/pretrain.sbatch"  # relative to the repository root, where command.sh submits from
STRATEGIES: tuple[str, ...] = ("mics", "zero3", "hsdp")
LABELS = {"mics": "MiCS", "zero3": "ZeRO-3", "hsdp": "FSDP2 HSDP"}
CLUSTER_NAMES = {name.split(".")[0]: name for name in costmodel.CLUSTERS}  # "p4d" -> "p4d.24xlarge"
RECIPES = {"gpt": "recipes/pretrain_gpt.py", "bert": "recipes/pretrain_bert.py"}
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"  # what plan decided for a run; collect reads it back instead of parsing directory names


# ---- plan: which runs, and their configs ----------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One (strategy, node count) point of the sweep, as plan decided it and collect reads it back."""

    name: str
    strategy: str
    nodes: int
    gpus: int
    gpus_per_node: int
    partition_size: int  # MiCS's p; ZeRO-3: the world; HSDP: dp_shard_size
    preset: str
    family: str
    cluster: str
    mixed_precision: str
    micro_batch: int
    grad_accum: int
    max_steps: int
    reduce_bytes: int  # gradient reduce-scatter / hop-2 dtype size, as the config sets it and the cost model sees it

    @property
    def replicas(self) -> int:
        return self.gpus // self.partition_size

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.gpus


def template_for(strategy: str, cluster: str) -> Path:
    """The shipped config a run's config is derived from (p3dn has its own fp16 MiCS template)."""
    if strategy == "mics":
        return REPO / "accelerate_configs" / ("mics_p3dn.yaml" if cluster.startswith("p3dn") else "mics_p4d.yaml")
    return REPO / "accelerate_configs" / {"zero3": "zero3_p4d.yaml", "hsdp": "fsdp2_hsdp_p4d.yaml"}[strategy]


def accelerate_config(spec: RunSpec) -> dict[str, Any]:
    """The template with this run's layout: N machines, 8N processes, and the strategy's sharding settings."""
    config = yaml.safe_load(template_for(spec.strategy, spec.cluster).read_text())
    config["num_machines"] = spec.nodes
    config["num_processes"] = spec.gpus
    # machine_rank and main_process_ip stay placeholders: slurm/pretrain.sbatch passes both on the command line.
    config["mixed_precision"] = spec.mixed_precision  # fp16 on V100 (no bf16), bf16 on A100 / H100
    if spec.strategy == "hsdp":
        # No `mics` block: the recipe's MiCSAccelerator then falls back to a plain Accelerator, and Accelerate's
        # own FSDP2 does the sharding; the parallelism_config turns the 1-D FSDP mesh into HSDP's 2-D one.
        config["parallelism_config"] = {
            "parallelism_config_dp_replicate_size": spec.replicas,  # = nodes when the shard group is one node
            "parallelism_config_dp_shard_size": spec.partition_size,  # = 8 when it is one node
        }
        return config
    mics = config.setdefault("fsdp_config", {}).setdefault("mics", {})
    mics["partition_size"] = spec.partition_size
    # ZeRO-3 gathers with a flat ring over the whole world; MiCS goes hierarchical when its group spans nodes.
    mics["hierarchical"] = "auto" if spec.strategy == "mics" else False
    half = {"fp16": "float16", "bf16": "bfloat16"}[spec.mixed_precision]
    mics["reduce_dtype"] = "float32" if spec.reduce_bytes == 4 else half
    mics["prefetch"] = True
    return config


def config_header(spec: RunSpec) -> str:
    """Comment lines on top of a generated config: what it is, and for HSDP how the peer is reached."""
    lines = [
        f"# {LABELS[spec.strategy]} on {spec.nodes} x {spec.cluster} ({spec.gpus} GPUs), {spec.preset}: generated by",
        f"# scripts/weak_scaling.py plan from {template_for(spec.strategy, spec.cluster).relative_to(REPO)}.",
        "# machine_rank / main_process_ip are placeholders: slurm/pretrain.sbatch passes them per node.",
    ]
    if spec.strategy == "hsdp":
        lines += [
            "# The HSDP peer relies on Accelerate's FSDP2 through the same recipe script: without a `mics` block",
            "# the recipe's MiCSAccelerator is a plain Accelerator, prepare() wraps the model with FSDP2 on the",
            f"# (replicate {spec.replicas} x shard {spec.partition_size}) mesh below. Gradients are reduced in the",
            "# mixed-precision dtype (Accelerate's FSDP2 policy) and the model is built in full on every rank's CPU",
            "# before it is sharded (no meta-device path outside MiCS).",
        ]
    return "\n".join(lines) + "\n"


def recipe_args(spec: RunSpec, run_dir: str, extra: Sequence[str]) -> list[str]:
    """Arguments for the recipe: synthetic tokens (pure throughput, as the paper measures), a fixed per-GPU
    micro-batch (weak scaling), metrics into the run directory, no Hugging Face export at the end."""
    return [
        "--preset", spec.preset, "--micro_batch", str(spec.micro_batch),
        "--gradient_accumulation_steps", str(spec.grad_accum), "--max_steps", str(spec.max_steps),
        "--synthetic", "--no_save_model", "--output_dir", run_dir, "--run_name", spec.name, *extra,
    ]


def repo_relative(path: Path) -> str:
    """A path as command.sh spells it: relative to the repository root when the sweep lives inside it, so a plan
    made on a laptop works in a clone at another path on the cluster; absolute otherwise."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def sbatch_command(spec: RunSpec, run_dir: Path, extra_recipe: Sequence[str], extra_sbatch: Sequence[str]) -> str:
    """The exact submission line for one run (submitted from the repository root)."""
    rel = repo_relative(run_dir)
    env = []
    if spec.cluster.startswith("p3dn"):
        env = ["--export=ALL,FI_EFA_USE_DEVICE_RDMA=0"]  # p3dn's EFA has no GPUDirect RDMA (p4d and later do)
    words = ["sbatch", "--nodes", str(spec.nodes), "--job-name", spec.name, "--output", f"{rel}/slurm-%j.out",
             *env, *extra_sbatch, SBATCH, f"{rel}/accelerate_config.yaml", RECIPES[spec.family],
             *recipe_args(spec, rel, extra_recipe)]
    return shlex.join(words)


def write_run(spec: RunSpec, run_dir: Path, extra_recipe: Sequence[str], extra_sbatch: Sequence[str]) -> None:
    """accelerate_config.yaml, command.sh and run.json for one run."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "accelerate_config.yaml").write_text(
        config_header(spec) + yaml.safe_dump(accelerate_config(spec), sort_keys=False))
    # sbatch runs the job in the directory it was called from, and the paths in the line are relative to the
    # repository root: command.sh goes there first, wherever it is called from.
    inside = run_dir.resolve().is_relative_to(REPO)
    cd = f'"$(dirname "$0")/{os.path.relpath(REPO, run_dir.resolve())}"' if inside else shlex.quote(str(REPO))
    command = sbatch_command(spec, run_dir, extra_recipe, extra_sbatch)
    script = run_dir / "command.sh"
    script.write_text(
        "#!/usr/bin/env bash\n"
        f"# {LABELS[spec.strategy]}, {spec.preset}, {spec.nodes} x {spec.cluster} ({spec.gpus} GPUs): generated by "
        "scripts/weak_scaling.py plan.\n"
        "set -euo pipefail\n"
        f"cd {cd}  # the repository root\n"
        f"{command}\n"
    )
    script.chmod(0o755)
    (run_dir / RUN_FILE).write_text(json.dumps(dataclasses.asdict(spec), indent=2) + "\n")


def parse_nodes(text: str) -> list[int]:
    """--nodes "1,2,4" -> [1, 2, 4] (sorted, unique, positive)."""
    try:
        nodes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--nodes {text!r}: give comma-separated node counts, e.g. 1,2,4,8")
    if not nodes or nodes[0] < 1:
        raise argparse.ArgumentTypeError(f"--nodes {text!r}: node counts must be positive integers")
    return nodes


def positive_int(text: str) -> int:
    """An argparse type: counts of steps, samples and GPUs start at 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive integer")
    return value


def parse_strategies(text: str) -> list[str]:
    """--strategies "mics,zero3" -> ["mics", "zero3"] (known names only, order kept)."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in STRATEGIES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--strategies {text!r}: choose from {','.join(STRATEGIES)}")
    return list(dict.fromkeys(names))


def predict_run(spec: RunSpec) -> costmodel.Prediction:
    """The cost model's step for a run, with the run's own p, micro-batch, accumulation and reduce dtype."""
    return costmodel.predict(
        spec.preset, spec.cluster, spec.nodes, strategy=spec.strategy,  # type: ignore[arg-type]
        partition_size=None if spec.strategy == "zero3" else spec.partition_size, micro_batch=spec.micro_batch,
        grad_accum=spec.grad_accum, reduce_bytes=spec.reduce_bytes, hop2_bytes=spec.reduce_bytes,
    )


def cmd_plan(args: argparse.Namespace) -> int:
    """Decide p, then write a run directory for every (strategy, node count) that fits; print the sweep."""
    cluster = costmodel.CLUSTERS[CLUSTER_NAMES[args.cluster]]
    preset = get_preset(args.preset)
    k = cluster.gpus_per_node
    micro_batch = args.micro_batch or preset.micro_batch
    # MiCS's p is fixed for the whole sweep (the paper adds partition groups as it scales). The planner picks the
    # smallest p whose states fit, over the partition sizes the largest world allows.
    if args.partition_size is None:
        try:
            p = costmodel.plan(preset, cluster, max(args.nodes), micro_batch=micro_batch, grad_accum=args.grad_accum,
                               reduce_bytes=args.reduce_bytes, hop2_bytes=args.reduce_bytes).partition_size
        except ValueError as exc:
            print(f"error: the cost model's planner found no partition size: {exc}", file=sys.stderr)
            return 2
    else:
        p = args.partition_size
    out = Path(args.out or f"runs/weak_scaling/{args.preset}_{args.cluster}")
    extra_recipe = shlex.split(args.recipe_args)
    extra_sbatch = shlex.split(args.sbatch_args)

    rows: list[tuple[RunSpec, costmodel.Prediction | None, str]] = []
    for strategy in args.strategies:
        for nodes in args.nodes:
            gpus = nodes * k
            size = gpus if strategy == "zero3" else p
            spec = RunSpec(
                name=f"{strategy}-{args.preset}-{nodes}n", strategy=strategy, nodes=nodes, gpus=gpus, gpus_per_node=k,
                partition_size=size, preset=preset.name, family=preset.family, cluster=cluster.name,
                mixed_precision=cluster.dtype, micro_batch=micro_batch, grad_accum=args.grad_accum,
                max_steps=args.max_steps,
                # Accelerate's FSDP2 reduces in the mixed-precision dtype whatever we ask of mics_hf.
                reduce_bytes=2 if strategy == "hsdp" else args.reduce_bytes,
            )
            if size not in costmodel.valid_partition_sizes(gpus, k):
                rows.append((spec, None, f"skipped: p={size} does not fit the {gpus}-GPU world"))
                continue
            prediction = predict_run(spec)
            if not prediction.fits and not args.keep_unfit:
                rows.append((spec, prediction, "skipped: predicted out of memory (--keep_unfit writes it anyway)"))
                continue
            write_run(spec, out / f"{strategy}-{nodes}n", extra_recipe, extra_sbatch)
            rows.append((spec, prediction, f"{out / f'{strategy}-{nodes}n'}"))

    written = [out / f"{s.strategy}-{s.nodes}n" for s, _, status in rows if not status.startswith("skipped")]
    if written:
        submit = out / "submit_all.sh"
        submit.write_text("#!/usr/bin/env bash\n# Every run of this sweep, one sbatch each (generated by "
                          "scripts/weak_scaling.py plan).\nset -euo pipefail\nhere=\"$(dirname \"$0\")\"\n"
                          + "".join(f'bash "$here/{d.name}/command.sh"\n' for d in written))
        submit.chmod(0o755)
    table = format_plan(rows, preset.name, cluster, p, micro_batch, args.grad_accum)
    (out / "plan.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "plan.md").write_text(table + "\n")
    print(table)
    print(f"\n{len(written)} run directories under {out}; submit them all with: bash {out / 'submit_all.sh'}")
    stale = sorted(d.parent.name for d in out.glob(f"*/{RUN_FILE}") if d.parent not in written)
    if stale:  # collect reads every run directory, so say which ones this plan did not write
        print(f"note: {len(stale)} run directories from an earlier plan remain and `collect` will include them: "
              f"{', '.join(stale)}")
    return 0


def format_plan(rows: list[tuple[RunSpec, costmodel.Prediction | None, str]], preset: str, cluster: costmodel.Cluster,
                p: int, micro_batch: int, grad_accum: int) -> str:
    """The sweep as a Markdown table, with the cost model's prediction for each run."""
    lines = [
        f"weak-scaling sweep: {preset} on {cluster.name} ({cluster.gpus_per_node}x {cluster.gpu} per node), "
        f"micro-batch {micro_batch} per GPU x {grad_accum} accumulation step(s), MiCS partition size p = {p}",
        "",
        "| strategy | nodes | GPUs | p | replicas | global batch | predicted TFLOPS/GPU (8N) | predicted GiB/rank | run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for spec, pred, status in rows:
        tflops = f"{pred.tflops_per_gpu:.1f}" if pred else "-"
        mem = f"{pred.memory.total / 2**30:.1f}" + ("" if pred.fits else " (OOM)") if pred else "-"
        replicas = spec.replicas if pred else "-"  # a skipped run's p may not divide its world
        lines.append(f"| {LABELS[spec.strategy]} | {spec.nodes} | {spec.gpus} | {spec.partition_size} | {replicas} "
                     f"| {spec.global_batch} | {tflops} | {mem} | {status} |")
    if any(s.strategy == "hsdp" for s, _, st in rows if not st.startswith("skipped")):
        n_params = next(pred.n_params for _, pred, _ in rows if pred is not None)
        lines += ["", f"note: HSDP runs build the full fp32 model on every rank's host memory before FSDP2 shards it: "
                      f"{cluster.gpus_per_node} x {4 * n_params / 2**30:.0f} GiB per node for {preset}."]
    return "\n".join(lines)


# ---- collect: medians per run, efficiency, ratios -------------------------------------------------------------
def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Training rows of a metrics.jsonl, one per step (a rerun appends: the last row of a step wins; evaluation
    rows, which carry no step time, and a torn last line from a killed job are dropped)."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row.get("step_time_s") is not None:
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def summarize(rows: list[dict[str, Any]], warmup_steps: int) -> dict[str, float] | None:
    """Medians over the steps after the warm-up ones (allocator growth, NCCL setup, autotuning); None if none left."""
    body = rows[warmup_steps:]
    if not body:
        return None

    def med(key: str) -> float | None:
        values = [r[key] for r in body if isinstance(r.get(key), (int, float))]
        return statistics.median(values) if values else None

    inter = [sum(v for k, v in r.items() if k.startswith("mics/comm/") and k.endswith("/inter_node/bytes"))
             for r in body if any(k.startswith("mics/comm/") for k in r)]
    return {
        "tflops_per_gpu_8n": med("tflops_per_gpu_8n"),
        "tflops_per_gpu_6n": med("tflops_per_gpu_6n"),
        "samples_per_s": med("samples_per_s"),
        "tokens_per_s": med("tokens_per_s"),
        "step_time_s": med("step_time_s"),
        # Only mics_hf measures the time blocked on communication; Accelerate's FSDP2 runs report none.
        "exposed_comm_time_s": med("exposed_comm_time_s") if inter else None,
        "inter_node_gib_per_step": statistics.median(inter) / 2**30 if inter else None,
        "steps_used": len(body),
    }


def load_runs(out: Path) -> list[tuple[RunSpec, Path]]:
    """Every run directory plan wrote under --out (found by its run.json)."""
    runs = []
    for path in sorted(out.glob(f"*/{RUN_FILE}")):
        spec = RunSpec(**json.loads(path.read_text()))
        runs.append((spec, path.parent))
    return sorted(runs, key=lambda x: (STRATEGIES.index(x[0].strategy), x[0].nodes))


def gather_results(out: Path, warmup_steps: int, predict: bool) -> dict[str, Any]:
    """Everything collect prints and plot draws: one entry per run, one per node count, and the problems."""
    runs, problems = [], []
    for spec, run_dir in load_runs(out):
        entry: dict[str, Any] = {"run": run_dir.name, **dataclasses.asdict(spec), "measured": None}
        metrics = run_dir / METRICS_FILE
        logs = sorted(run_dir.glob("slurm-*.out"))
        hint = f" (log: {logs[-1]})" if logs else " (not run yet?)"
        if not metrics.is_file():
            problems.append(f"{run_dir.name}: missing {METRICS_FILE}{hint}")
        else:
            rows = read_metrics(metrics)
            entry["measured"] = summarize(rows, warmup_steps)
            if entry["measured"] is None:
                problems.append(f"{run_dir.name}: incomplete, {len(rows)} step(s), none after the {warmup_steps} "
                                f"warm-up steps{hint}")
            elif len(rows) < spec.max_steps:
                problems.append(f"{run_dir.name}: incomplete, {len(rows)} of {spec.max_steps} steps (medians over "
                                f"the {len(rows) - warmup_steps} after warm-up){hint}")
        if predict:
            try:
                pred = predict_run(spec)
                entry["predicted"] = {"tflops_per_gpu_8n": pred.tflops_per_gpu, "samples_per_s": pred.samples_per_s,
                                      "step_time_s": pred.step_time_s, "fits": pred.fits}
            except ValueError as exc:
                entry["predicted"] = None
                problems.append(f"{run_dir.name}: no prediction ({exc})")
        runs.append(entry)

    # Weak-scaling efficiency: TFLOPS per GPU over that at the strategy's smallest measured node count (the same
    # base for the predictions, so measured and predicted columns compare like with like).
    for strategy in STRATEGIES:
        mine = [r for r in runs if r["strategy"] == strategy]
        measured = [r for r in mine if r["measured"] and r["measured"]["tflops_per_gpu_8n"]]
        base = measured[0] if measured else (mine[0] if mine else None)
        for r in mine:
            r["base_nodes"] = base["nodes"] if base else None
            if r["measured"] and r["measured"]["tflops_per_gpu_8n"] and measured:
                base_tflops = measured[0]["measured"]["tflops_per_gpu_8n"]
                r["measured"]["efficiency"] = r["measured"]["tflops_per_gpu_8n"] / base_tflops
            if predict and r.get("predicted") and base and base.get("predicted"):
                base_tflops = base["predicted"]["tflops_per_gpu_8n"]
                r["predicted"]["efficiency"] = r["predicted"]["tflops_per_gpu_8n"] / base_tflops

    # MiCS / ZeRO-3 (and MiCS / HSDP) per node count: the same global batch, so a samples/s ratio.
    ratios = []
    for nodes in sorted({r["nodes"] for r in runs}):
        at = {r["strategy"]: r for r in runs if r["nodes"] == nodes}
        entry = {"nodes": nodes, "gpus": next(iter(at.values()))["gpus"]}
        for other in ("zero3", "hsdp"):
            entry[f"mics_over_{other}"] = _ratio(at.get("mics"), at.get(other), "measured")
            if predict:
                entry[f"predicted_mics_over_{other}"] = _ratio(at.get("mics"), at.get(other), "predicted")
        ratios.append(entry)
    return {"out": str(out), "warmup_steps": warmup_steps, "runs": runs, "ratios": ratios, "problems": problems}


def _ratio(a: dict | None, b: dict | None, kind: str) -> float | None:
    x, y = (a or {}).get(kind), (b or {}).get(kind)
    if not x or not y or not x.get("samples_per_s") or not y.get("samples_per_s"):
        return None
    return x["samples_per_s"] / y["samples_per_s"]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_results(results: dict[str, Any], predict: bool) -> str:
    """The paper-style Markdown: per-run table, ratio table, then what is missing."""
    runs = results["runs"]
    if not runs:
        return f"no run directories (with {RUN_FILE}) under {results['out']}: run `plan` first"
    first = runs[0]
    lines = [f"# Weak scaling: {first['preset']} on {first['cluster']}", "",
             f"Medians over the steps after the first {results['warmup_steps']}; TFLOPS per GPU in the paper's 8N "
             "convention; efficiency = TFLOPS/GPU at N nodes / at the strategy's smallest measured node count "
             f"(per-GPU micro-batch fixed at {first['micro_batch']}).", ""]
    head = ("| strategy | nodes | GPUs | p | TFLOPS/GPU (8N) | samples/s | step (s) | exposed comm (s) "
            "| inter-node GiB/step/rank | efficiency |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if predict:
        head += " predicted TFLOPS/GPU | predicted samples/s | predicted efficiency |"
        rule += "---:|---:|---:|"
    lines += [head, rule]
    for r in runs:
        m, p = r["measured"] or {}, r.get("predicted") or {}
        row = (f"| {LABELS[r['strategy']]} | {r['nodes']} | {r['gpus']} | {r['partition_size']} "
               f"| {_fmt(m.get('tflops_per_gpu_8n'), '.1f')} | {_fmt(m.get('samples_per_s'), '.1f')} "
               f"| {_fmt(m.get('step_time_s'), '.3f')} | {_fmt(m.get('exposed_comm_time_s'), '.3f')} "
               f"| {_fmt(m.get('inter_node_gib_per_step'), '.2f')} | {_fmt(m.get('efficiency'), '.1%')} |")
        if predict:
            row += (f" {_fmt(p.get('tflops_per_gpu_8n'), '.1f')} | {_fmt(p.get('samples_per_s'), '.1f')} "
                    f"| {_fmt(p.get('efficiency'), '.1%')} |")
        lines.append(row)
    head = "| nodes | GPUs | MiCS / ZeRO-3 | MiCS / FSDP2 HSDP |"
    rule = "|---:|---:|---:|---:|"
    if predict:
        head += " predicted MiCS / ZeRO-3 | predicted MiCS / HSDP |"
        rule += "---:|---:|"
    lines += ["", head, rule]
    for x in results["ratios"]:
        keys = ["mics_over_zero3", "mics_over_hsdp"] + (["predicted_mics_over_zero3", "predicted_mics_over_hsdp"]
                                                         if predict else [])
        lines.append(f"| {x['nodes']} | {x['gpus']} | " + " | ".join(_times(x[k]) for k in keys) + " |")
    if results["problems"]:
        lines += ["", "Missing or incomplete runs:", ""] + [f"- {p}" for p in results["problems"]]
    return "\n".join(lines)


def cmd_collect(args: argparse.Namespace) -> int:
    """Print the results table and write it as results.md and results.json beside the runs."""
    out = Path(args.out)
    results = gather_results(out, args.warmup_steps, args.predict)
    text = format_results(results, args.predict)
    print(text)
    if results["runs"]:
        (out / "results.md").write_text(text + "\n")
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {out / 'results.md'} and {out / 'results.json'}")
    return 0


# ---- plot -----------------------------------------------------------------------------------------------------
def cmd_plot(args: argparse.Namespace) -> int:
    """Three PNGs against the GPU count (log2 axis): TFLOPS per GPU, efficiency, MiCS's throughput ratios."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a login node or in CI
    import matplotlib.pyplot as plt

    out = Path(args.out)
    results = gather_results(out, args.warmup_steps, args.predict)
    if not results["runs"]:
        print(f"no run directories (with {RUN_FILE}) under {out}: run `plan` first", file=sys.stderr)
        return 2
    first = results["runs"][0]
    title = f"{first['preset']} on {first['cluster']}, weak scaling (micro-batch {first['micro_batch']} per GPU)"
    colors = {"mics": "tab:blue", "zero3": "tab:red", "hsdp": "tab:green"}
    dashes = {"mics": "--", "zero3": "-.", "hsdp": ":"}

    def strategy_lines(ax: Any, key: str, scale: float = 1.0) -> None:
        """One solid line per strategy from the measurements, dashed from the cost model when asked."""
        for strategy in STRATEGIES:
            mine = [r for r in results["runs"] if r["strategy"] == strategy]
            pts = [(r["gpus"], r["measured"][key] * scale) for r in mine
                   if r["measured"] and r["measured"].get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", color=colors[strategy], label=LABELS[strategy])
            if args.predict:
                pred = [(r["gpus"], r["predicted"][key] * scale) for r in mine
                        if r.get("predicted") and r["predicted"].get(key) is not None]
                if pred:  # a dash pattern per strategy: the predictions of MiCS and HSDP often coincide
                    ax.plot(*zip(*pred), dashes[strategy], color=colors[strategy], alpha=0.7,
                            label=f"{LABELS[strategy]} (cost model)")

    def finish(ax: Any, ylabel: str, name: str) -> None:
        ax.set_xscale("log", base=2)
        gpus = sorted({r["gpus"] for r in results["runs"]})
        ax.set_xticks(gpus, [str(g) for g in gpus])
        ax.set_xlabel("GPUs")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.figure.tight_layout()
        ax.figure.savefig(out / name, dpi=120)
        plt.close(ax.figure)
        print(f"wrote {out / name}")

    fig, ax = plt.subplots(figsize=(6, 4))
    strategy_lines(ax, "tflops_per_gpu_8n")
    ax.set_ylim(bottom=0)
    finish(ax, "TFLOPS per GPU (8N)", "tflops_per_gpu.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    strategy_lines(ax, "efficiency", scale=100.0)
    ax.axhline(100.0, color="gray", lw=0.8, ls=":")  # perfectly linear
    ax.set_ylim(0, 110)
    finish(ax, "weak-scaling efficiency (%)", "efficiency.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for other in ("zero3", "hsdp"):  # coloured as the strategy MiCS is compared with
        key, label = f"mics_over_{other}", f"MiCS / {LABELS[other]}"
        pts = [(x["gpus"], x[key]) for x in results["ratios"] if x[key] is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", color=colors[other], label=label)
        if args.predict:
            pred = [(x["gpus"], x[f"predicted_{key}"]) for x in results["ratios"]
                    if x.get(f"predicted_{key}") is not None]
            if pred:
                ax.plot(*zip(*pred), "--", color=colors[other], alpha=0.7, label=f"{label} (cost model)")
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")  # parity
    finish(ax, "throughput ratio (samples/s)", "ratio.png")
    return 0


# ---- command line ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    plan = sub.add_parser("plan", help="write one run directory per (strategy, nodes) and print the sweep",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    plan.add_argument("--preset", default="gpt2-10b", choices=sorted(PRESETS), help="model shape (mics_hf.planning.presets)")
    plan.add_argument("--cluster", default="p4d", choices=sorted(CLUSTER_NAMES), help="AWS instance type")
    plan.add_argument("--nodes", type=parse_nodes, default=parse_nodes("1,2,4,8,16,32,64"),
                      help="comma-separated node counts")
    plan.add_argument("--strategies", type=parse_strategies, default=list(STRATEGIES),
                      help=f"comma-separated subset of {','.join(STRATEGIES)}")
    plan.add_argument("--partition_size", type=positive_int, default=None,
                      help="MiCS's p (and HSDP's shard group); default: the cost model's planner, the smallest "
                           "that fits")
    plan.add_argument("--micro_batch", type=positive_int, default=None,
                      help="per-GPU micro-batch, fixed across node counts (default: the preset's)")
    plan.add_argument("--grad_accum", type=positive_int, default=1,
                      help="gradient accumulation steps per optimizer step")
    plan.add_argument("--max_steps", type=positive_int, default=30, help="optimizer steps per run")
    plan.add_argument("--reduce_bytes", type=int, choices=(2, 4), default=2,
                      help="bytes per gradient element in MiCS's / ZeRO-3's reduce-scatter and hop 2: 2 = bf16/fp16, "
                           "as the paper's DeepSpeed and Accelerate's FSDP2 (the HSDP peer) communicate, so the three "
                           "compare like for like; 4 = fp32, mics_hf's numerically safer default (twice the bytes)")
    plan.add_argument("--keep_unfit", action="store_true", help="also write runs the cost model predicts out of memory")
    plan.add_argument("--recipe_args", default="", help="extra recipe arguments, quoted, e.g. \"--report_to wandb\" "
                      "(the cost model does not see them)")
    plan.add_argument("--sbatch_args", default="",
                      help="extra sbatch arguments, quoted, e.g. \"--partition gpu --time 1:00:00\"")
    plan.add_argument("--out", default=None, help="sweep directory (default: runs/weak_scaling/<preset>_<cluster>)")
    plan.set_defaults(func=cmd_plan)

    for name, func, text in (("collect", cmd_collect, "medians per run -> results.md / results.json"),
                             ("plot", cmd_plot, "PNG figures of the collected numbers")):
        p = sub.add_parser(name, help=text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--out", required=True, help="the sweep directory plan wrote")
        p.add_argument("--warmup_steps", type=int, default=5, help="leading steps left out of the medians")
        p.add_argument("--predict", action="store_true", help="add the cost model's predictions (mics_hf.planning.costmodel)")
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
