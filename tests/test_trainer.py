"""`--mics` in a Trainer script under torchrun: parity with DDP, exact resume, resume on another world size,
a loadable save_model(), MiCS metrics in the W&B run, and bad arguments refused before any weight is touched."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from launch import run_job
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "trainer_train.py"
MICS = '{"partition_size": 2, "devices_per_node": 2}'  # 4 ranks as 2 emulated nodes x 2


def _run(tmp: Path, name: str, *extra: str, nproc: int = 4, accum: int = 2, batch: int = 2) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MICS_", "ACCELERATE_"))}
    env.update(OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", WANDB_MODE="offline",
               WANDB_DIR=str(tmp / name), WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    (tmp / name).mkdir(exist_ok=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(SCRIPT),
        "--output_dir", str(tmp / name / "out"), "--max_steps", "6", "--save_steps", "3", "--logging_steps", "1",
        "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accum),
        "--learning_rate", "1e-3", "--adam_epsilon", "1e-4", "--max_grad_norm", "1.0", "--seed", "3",
        "--save_total_limit", "2", "--report", str(tmp / name / "report"), *extra,
    ]
    result = run_job(cmd, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    from safetensors.torch import load_file

    report = json.loads((tmp / name / "report.json").read_text())
    report["state"] = load_file(str(tmp / name / "report.safetensors"))
    report["dir"] = tmp / name
    return report


def _close(a: dict, b: dict, tol: float = 1e-5) -> float:
    worst = 0.0
    for key, ref in b.items():
        worst = max(worst, (a[key] - ref).abs().max().item() / max(ref.abs().max().item(), 1e-3))
    assert worst <= tol, worst
    return worst


@pytest.mark.slow
def test_trainer_mics_matches_ddp_resumes_and_exports(tmp_path):
    mics = _run(tmp_path, "mics", "--mics", MICS, "--report_to", "wandb", "--run_name", "mics-test")
    ddp = _run(tmp_path, "ddp", "--report_to", "none")
    assert mics["mics"] and not ddp["mics"] and mics["world"] == ddp["world"] == 4
    _close(mics["state"], ddp["state"])  # final parameters: MiCS p = 2 vs DDP, fp32 tolerance
    assert max(abs(a - b) for a, b in zip(mics["losses"], ddp["losses"])) <= 1e-5

    checkpoint = mics["dir"] / "out" / "checkpoint-3"
    assert (checkpoint / "mics" / "latest").is_file()
    resumed = _run(tmp_path, "resumed", "--mics", MICS, "--resume_from_checkpoint", str(checkpoint), "--report_to", "none")
    for key, ref in mics["state"].items():
        assert torch.equal(resumed["state"][key], ref), key  # 3 + resume + 3 == 6 straight, bit for bit
    assert resumed["losses"] == mics["losses"]  # the first 3 come back with trainer_state.json, the rest are recomputed

    # the same checkpoint on 2 processes (the same global batch: 2 x 2 x 4 micro-steps): it reshards and goes on
    two = _run(tmp_path, "two", "--mics", '{"partition_size": 2}', "--resume_from_checkpoint", str(checkpoint),
               "--report_to", "none", nproc=2, accum=4)
    _close(two["state"], mics["state"])

    # save_model(): a normal HF directory that from_pretrained loads with the trained weights
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(mics["dir"] / "out")).state_dict()
    for key, ref in mics["state"].items():
        assert torch.equal(loaded[key], ref), key
    # --save_total_limit 2 kept checkpoints 3 and 6, each with its sharded state
    assert sorted(p.name for p in (mics["dir"] / "out").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]

    # W&B (offline) holds the Trainer's metrics and MiCS's own
    sys.path.insert(0, str(ROOT / "tests"))
    from wandb_reader import find_run_file, read_run

    history = read_run(find_run_file(mics["dir"]))["history"]
    keys = {k for row in history for k in row}
    assert {"train/loss", "train/grad_norm", "train/learning_rate"} <= keys, keys
    assert {"train/mics/partition_size", "train/mics/comm/all_gather/intra_node/bytes",
            "train/mics/comm/reduce_scatter/intra_node/bytes", "train/mics/comm/all_reduce/inter_node/bytes"} <= keys, keys
    logged = [row["train/loss"] for row in history if "train/loss" in row]
    assert logged == pytest.approx(mics["losses"])
    assert all(row["train/mics/partition_size"] == 2 for row in history if "train/mics/partition_size" in row)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mics", MICS, "--fsdp", "full_shard"], "--mics and --fsdp both shard the model"),
        (["--mics", '{"partition_size": 2,'], "--mics is not valid JSON"),
        (["--mics", '{"partition_size": 2, "bogus": 1}'], r"unknown MiCS config key\(s\) \['bogus'\]; valid keys are"),
        (["--mics", '{"partition_size": 3}'], r"partition_size=3 does not divide the world size 4; partition sizes that divide it: \[1, 2, 4\]"),
        (["--mics", "/no/such/mics.yaml"], "--mics points to /no/such/mics.yaml, which does not exist"),
    ],
    ids=["with_fsdp", "invalid_json", "unknown_key", "partition_not_dividing", "missing_file"],
)
def test_bad_mics_arguments(monkeypatch, tmp_path, argv, message):
    import re

    from transformers import HfArgumentParser

    from mics_hf import MiCSTrainingArguments

    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError) as info:
        HfArgumentParser(MiCSTrainingArguments).parse_args_into_dataclasses(["--output_dir", str(tmp_path), *argv])
    assert re.search(message, str(info.value)), str(info.value)


def test_mics_flag_alone_takes_environment_settings(monkeypatch, tmp_path):
    from transformers import HfArgumentParser

    from mics_hf import MiCSTrainingArguments

    monkeypatch.setenv("MICS_CONFIG", '{"partition_size": 1}')
    (args,) = HfArgumentParser(MiCSTrainingArguments).parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--mics"])
    assert args.mics_settings == {"partition_size": 1} and args.mics_settings.source == "$MICS_CONFIG"
    monkeypatch.delenv("MICS_CONFIG")
    (plain,) = HfArgumentParser(MiCSTrainingArguments).parse_args_into_dataclasses(["--output_dir", str(tmp_path)])
    assert plain.mics_settings is None


@pytest.mark.slow
def test_trainer_mics_bf16_with_gradient_checkpointing_and_evaluation(tmp_path):
    """--bf16 becomes MiCS's compute dtype (fp32 master shards); --gradient_checkpointing re-enters the hooks."""
    report = _run(tmp_path, "bf16", "--mics", MICS, "--bf16", "--gradient_checkpointing", "--eval_strategy", "steps",
                  "--eval_steps", "3", "--report_to", "none")
    assert report["mics"] and len(report["losses"]) == 6
    assert all(0 < loss < 10 for loss in report["losses"]) and 0 < report["eval_loss"] < 10
    assert all(v.dtype == torch.float32 for v in report["state"].values())  # exported from the fp32 masters


@pytest.mark.slow
def test_trainer_from_pretrained_load_best_checkpoint_contents_and_generate(tmp_path):
    """The stock scripts' --model_name_or_path is read into the shards; --load_best_model_at_end reloads the best
    checkpoint's shards (greater_is_better inverted so the best is checkpoint-3, not the last); checkpoint-N holds
    config, generation config and training arguments; generate() with a different length per rank ends."""
    from models import tiny_gpt2
    from safetensors.torch import load_file

    import mics_hf

    pretrained = tmp_path / "pretrained"
    tiny_gpt2(seed=9).save_pretrained(pretrained)
    report = _run(tmp_path, "best", "--mics", MICS, "--model_name_or_path", str(pretrained), "--eval_strategy", "steps",
                  "--eval_steps", "3", "--load_best_model_at_end", "--metric_for_best_model", "eval_loss",
                  "--greater_is_better", "true", "--generate", "--report_to", "none")
    assert report["mics"] and report["deferred"]
    best = Path(report["best"])
    assert best.name == "checkpoint-3", best
    for name in ("config.json", "generation_config.json", "training_args.bin", "trainer_state.json"):
        assert (best / name).is_file(), name
    weights, _ = mics_hf.consolidate_checkpoint(best / "mics")
    assert all(torch.equal(report["state"][k], weights[k]) for k in report["state"])  # the best, not the last
    final = load_file(str(report["dir"] / "out" / "model.safetensors"))  # save_model() after the reload
    assert all(torch.equal(final[k], weights[k]) for k in final)
    assert report["generated"] is not None and len(report["generated"][0]) == 2 + 2  # rank 0: 2 prompt + 2 new
