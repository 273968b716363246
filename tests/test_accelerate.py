"""Accelerate: MiCS selected by a config file, parity with DDP, exact resume, configs and bad input.

The end-to-end tests run real `accelerate launch --config_file accelerate_configs/mics_cpu.yaml` jobs of
tests/accel_train.py (4 CPU processes, 2 emulated nodes x 2): MiCS must be active (asserted from inside), its
parameters after 6 optimizer steps with accumulate() equal a plain DDP launch of the same script, hop 2 runs
once per optimizer step, and save_state -> a new launch -> load_state continues bit-identically.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch import run_job


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))
ACCELERATE = Path(sys.executable).with_name("accelerate")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MICS_", "ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _launch(config: Path, out: Path, *args: str, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    from distributed import free_port

    # an explicit free port: a leftover job on Accelerate's default 29500 must not capture this launch
    cmd = [str(ACCELERATE), "launch", "--config_file", str(config), "--main_process_port", str(free_port()),
           str(ROOT / "tests" / "accel_train.py"), "--out", str(out), *args]
    return run_job(cmd, env=env or _env(), timeout=timeout, cwd=str(out.parent))


def _load(out: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return json.loads(Path(str(out) + ".json").read_text()), load_file(str(out) + ".safetensors")


@pytest.mark.slow
def test_mics_cpu_yaml_matches_ddp_and_resumes_exactly(tmp_path):
    ddp_yaml = tmp_path / "ddp.yaml"
    ddp_yaml.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\nmachine_rank: 0\n"
        "num_processes: 4\nmixed_precision: 'no'\nuse_cpu: false\n"
    )
    mics_yaml = ROOT / "accelerate_configs" / "mics_cpu.yaml"
    ckpt = tmp_path / "ckpt"
    straight = _launch(mics_yaml, tmp_path / "mics", "--save-at", "3", "--save-dir", str(ckpt))
    assert straight.returncode == 0, straight.stderr[-3000:]
    resumed = _launch(mics_yaml, tmp_path / "resumed", "--save-at", "3", "--load-dir", str(ckpt))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ddp = _launch(ddp_yaml, tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    mics_report, mics_state = _load(tmp_path / "mics")
    resumed_report, resumed_state = _load(tmp_path / "resumed")
    ddp_report, ddp_state = _load(tmp_path / "ddp")
    assert mics_report["mics"] and mics_report["world"] == 4  # MiCS active, 4 processes, from the yaml alone
    assert not ddp_report["mics"] and ddp_report["world"] == 4
    assert mics_report["hop2"] == mics_report["optimizer_steps"] == 6  # once per optimizer step, accumulation 2
    assert resumed_report["hop2"] == 3
    for key, ref in ddp_state.items():
        scale = max(ref.abs().max().item(), 1e-3)
        assert (mics_state[key] - ref).abs().max().item() / scale <= 1e-5, key
        assert (resumed_state[key] == mics_state[key]).all(), key  # bit-identical resume
    assert resumed_report["losses"] == mics_report["losses"][3:]
    assert len(mics_report["gathered"]) == 4  # gather_for_metrics: one value per process
    from safetensors.torch import load_file

    saved = {}
    for f in sorted((tmp_path / "mics_saved").glob("*.safetensors")):
        saved.update(load_file(str(f)))
    for key, ref in mics_state.items():  # save_model wrote the full, unsharded weights
        assert torch_equal(saved[key], ref), key
    assert max(abs(a - b) for a, b in zip(mics_report["losses"], ddp_report["losses"])) <= 1e-5


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_yaml_parses_with_accelerate_and_ours(config):
    from accelerate.commands.config.config_args import ClusterConfig

    from mics_hf import MiCSConfig
    from mics_hf.integrations.settings import read_accelerate_config

    ClusterConfig.from_yaml_file(str(config))  # Accelerate's own loader accepts it unchanged
    raw, block = read_accelerate_config(config)
    if config.name.startswith(("mics_", "zero3_")):
        assert block is not None
        cfg = MiCSConfig.from_dict(block)
        assert raw["num_processes"] % cfg.partition_size == 0
        if config.name == "zero3_p4d.yaml":
            assert cfg.partition_size == raw["num_processes"] and cfg.hierarchical is False
    else:
        assert block is None and raw["distributed_type"] == "FSDP"
        assert raw["parallelism_config"]["parallelism_config_dp_shard_size"] == 8


# ---- bad input: each a clear error before training starts ------------------------------------------------
def _yaml(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("compute_environment: LOCAL_MACHINE\nnum_machines: 1\nmachine_rank: 0\nuse_cpu: false\n" + body)
    return path


@pytest.mark.parametrize(
    "body, message",
    [
        ("distributed_type: FSDP\nnum_processes: 4\nfsdp_config:\n  fsdp_version: 2\n  mics:\n    partition_size: 2\n", "distributed_type: FSDP"),
        ("distributed_type: DEEPSPEED\nnum_processes: 4\ndeepspeed_config: {}\nfsdp_config:\n  mics:\n    partition_size: 2\n", "distributed_type: DEEPSPEED"),
        ("distributed_type: MULTI_GPU\nnum_processes: 4\nfsdp_config:\n  mics:\n    partition_sise: 2\n", r"unknown MiCS config key\(s\) \['partition_sise'\]; valid keys are \['partition_size', 'devices_per_node'"),
        ("distributed_type: MULTI_GPU\nnum_processes: 4\nfsdp_config:\n  mics:\n    partition_size: 3\n", r"partition_size=3 does not divide num_processes=4; partition sizes that divide it: \[1, 2, 4\]"),
    ],
    ids=["fsdp", "deepspeed", "unknown_key", "partition_not_dividing"],
)
def test_bad_yaml_is_refused_by_our_reader(tmp_path, body, message):
    import re

    from mics_hf.integrations.settings import read_accelerate_config

    with pytest.raises(ValueError) as info:
        read_accelerate_config(_yaml(tmp_path, body))
    assert re.search(message, str(info.value)), str(info.value)


def _construct(rank: int, world: int, *, env: dict) -> str:
    os.environ.update(env)
    try:
        from mics_hf import MiCSAccelerator

        MiCSAccelerator()
    except ValueError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize(
    "value, message",
    [
        ("/nonexistent/mics.json", "MICS_CONFIG points to /nonexistent/mics.json, which does not exist"),
        ('{"partition_size": 2,', "MICS_CONFIG is not valid JSON"),
        ('{"partition_size": 2, "hierarchcal": true}', r"unknown MiCS config key\(s\) \['hierarchcal'\]"),
    ],
    ids=["missing_file", "invalid_json", "unknown_key"],
)
def test_bad_mics_config_env_fails_at_construction(value, message):
    from distributed import DistPool

    with DistPool(1, init=False) as pool:
        (result,) = pool.run(_construct, env={"MICS_CONFIG": value})
    assert message in result or __import__("re").search(message, result), result


def test_bad_yaml_fails_under_accelerate_launch_before_training(tmp_path):
    """End to end: a `mics` block with distributed_type FSDP stops the launch with our message, no training."""
    config = _yaml(tmp_path, "distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_version: 2\n  mics:\n    partition_size: 2\n")
    result = _launch(config, tmp_path / "never", timeout=180)
    assert result.returncode != 0
    assert "has a `mics` block but distributed_type: FSDP" in result.stderr + result.stdout
    assert not Path(str(tmp_path / "never") + ".json").exists()


def test_launching_config_is_found_from_the_parent_command_line(tmp_path):
    """Workers find the file on the command line of the `accelerate launch` above them (relative paths too)."""
    config = _yaml(tmp_path, "distributed_type: MULTI_GPU\nnum_processes: 2\n")
    child = "from mics_hf.integrations.settings import find_launching_accelerate_config as f; print(f())"
    parent = f"import subprocess; subprocess.run([{sys.executable!r}, '-c', {child!r}])"  # argv[0] is faked below
    fake_accelerate = str(tmp_path / "bin" / "accelerate")
    script = f'exec -a {fake_accelerate} {sys.executable} -c "{parent}" launch --config_file bad.yaml train.py'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=str(tmp_path), timeout=60)
    assert out.stdout.strip() == str(config), out.stderr


@pytest.mark.slow
def test_torchrun_with_mics_config_environment_variable(tmp_path):
    """No Accelerate launcher: `MICS_CONFIG=... torchrun script.py` turns MiCS on the same way."""
    env = _env(MICS_CONFIG='{"partition_size": 2, "devices_per_node": 2}')
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           str(ROOT / "tests" / "accel_train.py"), "--out", str(tmp_path / "run"), "--steps", "2"]
    result = run_job(cmd, env=env, timeout=240, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    report, _ = _load(tmp_path / "run")
    assert report["mics"] and report["world"] == 4 and report["hop2"] == 2


def _mixed_precision(rank: int, world: int, *, mixed: str) -> str:
    from mics_hf import MiCSAccelerator

    acc = MiCSAccelerator(mixed_precision=mixed, mics={"partition_size": 1})
    return str(acc.mics_config.param_dtype)


def test_mixed_precision_of_the_accelerator_becomes_the_compute_dtype():
    from distributed import DistPool

    with DistPool(1, init=False) as pool:
        assert pool.run(_mixed_precision, mixed="bf16") == ["torch.bfloat16"]


@pytest.mark.slow
def test_accelerate_example_style_script_with_cpu_false_pretrained_and_unwrap_save(tmp_path):
    """Accelerate's examples pass cpu=False: on a machine without GPUs the ranks still form one gloo world of 4
    (not 4 separate workers); a from_pretrained model moved with .to(device) is sharded by prepare(); the
    examples' unwrap_model(model).save_pretrained(...) writes full weights that transformers loads."""
    from distributed import free_port
    from models import tiny_gpt2

    pretrained = tmp_path / "pretrained"
    tiny_gpt2(seed=4).save_pretrained(pretrained)
    out = tmp_path / "saved"
    cmd = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "accelerate_configs" / "mics_cpu.yaml"),
           "--main_process_port", str(free_port()), str(ROOT / "tests" / "accel_pretrained.py"),
           "--model", str(pretrained), "--out", str(out)]
    result = run_job(cmd, env=_env(), timeout=240, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(Path(str(out) + ".json").read_text())
    assert report == {"mics": True, "world": 4, "same": True}
