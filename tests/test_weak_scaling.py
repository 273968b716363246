"""scripts/weak_scaling.py and slurm/pretrain.sbatch without a cluster: the plan's files, collect's arithmetic on
hand-written metrics, the plots, and the batch script's syntax. No training runs; a few seconds."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mics_hf.integrations.settings import read_accelerate_config

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ws():
    """scripts/weak_scaling.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("weak_scaling", REPO / "scripts" / "weak_scaling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["weak_scaling"] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def test_plan_writes_one_valid_run_per_strategy_and_node_count(ws, tmp_path):
    from accelerate.commands.config.config_args import ClusterConfig

    out = tmp_path / "sweep"
    assert ws.main(["plan", "--preset", "gpt2-10b", "--cluster", "p4d", "--nodes", "4,1,2", "--out", str(out)]) == 0
    expected = {f"{s}-{n}n" for s in ("mics", "zero3", "hsdp") for n in (1, 2, 4)}
    assert {d.name for d in out.iterdir() if d.is_dir()} == expected
    for name in expected:
        strategy, nodes = name.split("-")[0], int(name.split("-")[1].removesuffix("n"))
        run = out / name
        config = run / "accelerate_config.yaml"
        cluster = ClusterConfig.from_yaml_file(str(config))  # Accelerate's own loader accepts the file
        assert (cluster.num_machines, cluster.num_processes) == (nodes, 8 * nodes)
        raw, mics = read_accelerate_config(config)
        assert raw["mixed_precision"] == "bf16"
        if strategy == "mics":
            assert mics["partition_size"] == 8 and mics["hierarchical"] == "auto"  # the planner's p: one node
        elif strategy == "zero3":
            assert mics["partition_size"] == 8 * nodes and mics["hierarchical"] is False
        else:
            assert mics is None and str(raw["distributed_type"]).endswith("FSDP")
            assert raw["parallelism_config"] == {"parallelism_config_dp_replicate_size": nodes,
                                                 "parallelism_config_dp_shard_size": 8}
        command = (run / "command.sh").read_text()
        assert f"sbatch --nodes {nodes} " in command
        assert f"slurm/pretrain.sbatch {run.resolve()}/accelerate_config.yaml recipes/pretrain_gpt.py " in command
        assert f"--output_dir {run.resolve()} " in command and "--micro_batch 8 " in command
        subprocess.run(["bash", "-n", str(run / "command.sh")], check=True)
        assert json.loads((run / "run.json").read_text())["nodes"] == nodes
    assert (out / "submit_all.sh").read_text().count("command.sh") == 9


def test_plan_skips_a_partition_group_larger_than_the_world(ws, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["plan", "--preset", "gpt2-10b", "--nodes", "1,2", "--strategies", "mics,hsdp", "--partition_size", "16",
            "--out", str(out)]
    assert ws.main(argv) == 0
    assert sorted(d.name for d in out.iterdir() if d.is_dir()) == ["hsdp-2n", "mics-2n"]
    assert "skipped: p=16 does not fit the 8-GPU world" in capsys.readouterr().out
    assert read_accelerate_config(out / "mics-2n" / "accelerate_config.yaml")[1]["partition_size"] == 16


# Per-GPU throughput after warm-up: MiCS flat, ZeRO-3 decaying, HSDP measured at 1-2 nodes only.
TFLOPS = {"mics": {1: 150.0, 2: 150.0, 4: 150.0}, "zero3": {1: 100.0, 2: 80.0, 4: 50.0}, "hsdp": {1: 140.0, 2: 126.0}}
SAMPLES_PER_GPU = {"mics": {1: 3.0, 2: 3.0, 4: 3.0}, "zero3": {1: 2.0, 2: 1.6, 4: 1.0}, "hsdp": {1: 2.8, 2: 2.52}}
WARMUP, MAX_STEPS = 5, 8


def _write_metrics(path: Path, tflops: float, samples: float, steps: int) -> None:
    """Warm-up rows that would wreck a median, then steps at 0.9x, 1.1x and 1x the value (median: the value)."""
    lines = []
    for step in range(1, steps + 1):
        scale = 0.01 if step <= WARMUP else (0.9, 1.1, 1.0)[(step - WARMUP - 1) % 3]
        lines.append(json.dumps({"step": step, "loss": 10.0, "step_time_s": 1.0 / scale, "exposed_comm_time_s": 0.1,
                                 "tflops_per_gpu_8n": tflops * scale, "tflops_per_gpu_6n": 0.75 * tflops * scale,
                                 "samples_per_s": samples * scale, "tokens_per_s": 512 * samples * scale,
                                 "mics/comm/all_gather/inter_node/bytes": 2**30}))
    lines.append(json.dumps({"step": steps, "eval/perplexity": 3.0}))  # an evaluation row: no step time
    lines.append('{"step": 99, "loss"')  # the torn last line of a killed job
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def sweep(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("ws") / "sweep"
    assert ws.main(["plan", "--preset", "gpt2-10b", "--nodes", "1,2,4", "--max_steps", str(MAX_STEPS),
                    "--out", str(out)]) == 0
    for strategy, by_nodes in TFLOPS.items():
        for nodes, tflops in by_nodes.items():
            steps = WARMUP + 2 if (strategy, nodes) == ("hsdp", 2) else MAX_STEPS  # hsdp-2n stopped early
            _write_metrics(out / f"{strategy}-{nodes}n" / "metrics.jsonl", tflops,
                           SAMPLES_PER_GPU[strategy][nodes] * 8 * nodes, steps)
    return out  # hsdp-4n never ran


def test_collect_computes_efficiency_and_ratios(ws, sweep, capsys):
    assert ws.main(["collect", "--out", str(sweep), "--warmup_steps", str(WARMUP)]) == 0
    results = json.loads((sweep / "results.json").read_text())
    runs = {(r["strategy"], r["nodes"]): r for r in results["runs"]}
    assert runs[("zero3", 2)]["measured"]["tflops_per_gpu_8n"] == pytest.approx(80.0)
    assert runs[("zero3", 4)]["measured"]["samples_per_s"] == pytest.approx(32.0)  # 1.0 x 32 GPUs
    efficiency = {key: r["measured"]["efficiency"] for key, r in runs.items() if r["measured"]}
    assert efficiency == pytest.approx({("mics", 1): 1.0, ("mics", 2): 1.0, ("mics", 4): 1.0,
                                        ("zero3", 1): 1.0, ("zero3", 2): 0.8, ("zero3", 4): 0.5,
                                        ("hsdp", 1): 1.0, ("hsdp", 2): 0.9})
    # hsdp-2n has 7 steps: medians over steps 6-7 (0.9x, 1.1x) -> the value itself.
    assert runs[("hsdp", 2)]["measured"]["steps_used"] == 2
    assert runs[("mics", 4)]["measured"]["inter_node_gib_per_step"] == pytest.approx(1.0)
    ratios = {x["nodes"]: x for x in results["ratios"]}
    assert [ratios[n]["mics_over_zero3"] for n in (1, 2, 4)] == pytest.approx([1.5, 1.875, 3.0])
    assert ratios[2]["mics_over_hsdp"] == pytest.approx(3.0 / 2.52) and ratios[4]["mics_over_hsdp"] is None
    assert runs[("hsdp", 4)]["measured"] is None
    problems = "\n".join(results["problems"])
    assert "hsdp-4n: missing metrics.jsonl" in problems and "hsdp-2n: incomplete, 7 of 8 steps" in problems
    text = (sweep / "results.md").read_text()
    assert "| ZeRO-3 | 4 | 32 | 32 | 50.0 | 32.0 |" in text and "| 4 | 32 | 3.00x | - |" in text
    assert text.strip() in capsys.readouterr().out


def test_collect_with_predictions(ws, sweep):
    results = ws.gather_results(sweep, WARMUP, predict=True)
    for r in results["runs"]:
        assert r["predicted"]["tflops_per_gpu_8n"] > 0
        if r["nodes"] == 1:
            assert r["predicted"]["efficiency"] == pytest.approx(1.0)
    assert all(x["predicted_mics_over_zero3"] > 0 for x in results["ratios"])
    assert "predicted efficiency" in ws.format_results(results, predict=True)


def test_collect_without_runs_is_not_an_error(ws, tmp_path):
    assert ws.main(["collect", "--out", str(tmp_path)]) == 0


def test_plot_writes_pngs(ws, sweep):
    assert ws.main(["plot", "--out", str(sweep), "--predict"]) == 0
    for name in ("tflops_per_gpu.png", "efficiency.png", "ratio.png"):
        assert (sweep / name).read_bytes()[:8] == PNG_MAGIC


def test_sbatch_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "slurm" / "pretrain.sbatch")], check=True)
