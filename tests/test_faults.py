"""Fault injection under torchrun: a rank killed mid-training, every rank killed mid-save, a rank that hangs.

Each test launches `tests/fault_train.py` on 4 CPU ranks (gloo, p = 2, r = 2) with `python -m
torch.distributed.run --standalone` (a c10d rendezvous on a port torchrun picks itself, so restarts work
and no port can be raced for). Every launch has a hard wall-clock limit, and every process it started is
killed afterwards whatever happened, so a hang fails the test instead of blocking CI or leaking ranks.

Process start-up (4 ranks importing torch and transformers on few cores) dominates the cost, so the runs are
a few steps long and the uninterrupted reference run is shared by the tests that compare with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

import mics_hf
from mics_hf.checkpoint.format import read_metadata
from launch import family_of, kill_all
from models import tiny_gpt2

SCRIPT = Path(__file__).with_name("fault_train.py")
NPROC = 4
STEPS = 8
SAVE_EVERY = 2
LAUNCH_LIMIT_S = 240  # hard limit per torchrun launch; a normal one takes 15-60 s on a loaded 2-core machine


@dataclass
class Launch:
    returncode: int
    elapsed: float
    lines: list[tuple[float, str]] = field(default_factory=list)  # (seconds since launch, line)

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def first(self, needle: str) -> float | None:
        """Seconds since launch at which a line containing `needle` was printed, or None."""
        return next((t for t, line in self.lines if needle in line), None)


def _processes_mentioning(marker: str) -> list[psutil.Process]:
    """Live processes (not zombies) whose command line contains `marker`, other than this one."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(marker in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def torchrun(*args: str, marker: str, torchrun_args: tuple[str, ...] = (), limit_s: float = LAUNCH_LIMIT_S) -> Launch:
    """Run fault_train.py on NPROC ranks; the output is captured line by line with arrival times.

    torchrun starts each worker in its own session, so on a time-out the workers are found as torchrun's
    descendants (and by `marker`, a path unique to the test, in their command lines) and killed one by one.
    """
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(NPROC), "--standalone",
        "--monitor-interval", "0.1", *torchrun_args, str(SCRIPT), *args,
    ]
    env = {
        **os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
        # A restarted attempt must not share the agent's TCPStore with the dead one: gloo would read the dead
        # ranks' addresses and fail with "connectFullMesh ... Connection refused" (pytorch/pytorch#135712).
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.monotonic() - t0, line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        returncode = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        kill_all(family_of(proc.pid) + _processes_mentioning(marker))
        proc.wait(timeout=30)
        reader.join(timeout=10)
        pytest.fail(f"torchrun did not finish within {limit_s} s (killed); output:\n" + "".join(l for _, l in lines))
    elapsed = time.monotonic() - t0
    reader.join(timeout=10)  # EOF once every worker holding the pipe is gone
    return Launch(returncode, elapsed, list(lines))


def train_args(root: Path, out: Path, *extra: str) -> tuple[str, ...]:
    return ("--ckpt-root", str(root), "--out", str(out), "--steps", str(STEPS), *extra)


def load_result(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(out / "params.safetensors")), json.loads((out / "losses.json").read_text())


def assert_same_params(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(ref)
    for key, value in ref.items():
        assert torch.equal(got[key], value), f"{key} differs from the uninterrupted run"


@pytest.fixture
def marker(tmp_path):
    """A path unique to the test: every process it launches names it; survivors are killed at the end."""
    yield str(tmp_path)
    kill_all(_processes_mentioning(str(tmp_path)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, no checkpoints: (full state dict, losses by step)."""
    base = tmp_path_factory.mktemp("fault_reference")
    try:
        run = torchrun(*train_args(base / "ckpt", base / "out"), marker=str(base))
    finally:
        kill_all(_processes_mentioning(str(base)))
    assert run.returncode == 0, run.output
    params, losses = load_result(base / "out")
    assert sorted(losses["losses"], key=int) == [str(s) for s in range(STEPS)]
    return params, losses["losses"]


@pytest.mark.slow
def test_killed_rank_restarts_from_checkpoint_bit_identically(tmp_path, marker, reference):
    root, out = tmp_path / "ckpt", tmp_path / "out"
    run = torchrun(
        *train_args(root, out, "--save-every", str(SAVE_EVERY), "--kill-rank", "1", "--kill-at-step", "5"),
        marker=marker, torchrun_args=("--max-restarts", "1"),
    )
    assert run.returncode == 0, run.output
    assert "[fault] rank 1: SIGKILL at step 5" in run.output, run.output
    assert "[resume] attempt 1: loaded step_00000004, continuing at step 4" in run.output, run.output
    params, losses = load_result(out)
    assert (losses["attempt"], losses["start"]) == (1, 4)
    ref_params, ref_losses = reference
    assert losses["losses"] == {s: ref_losses[s] for s in map(str, range(4, STEPS))}
    assert_same_params(params, ref_params)
    assert mics_hf.latest_checkpoint(root) == root / f"step_{STEPS:08d}"


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, marker, reference):
    root, out = tmp_path / "ckpt", tmp_path / "out"
    crashed = torchrun(*train_args(root, out, "--save-every", str(SAVE_EVERY), "--kill-during-save-step", "4"), marker=marker)
    assert crashed.returncode != 0, crashed.output
    assert "[fault] rank 0: SIGKILL inside _publish(.tmp-step_00000004)" in crashed.output, crashed.output
    assert not out.exists()
    # The half-written save is left as a temporary directory; `latest` still names step 2, which loads.
    partial = root / ".tmp-step_00000004"
    assert (partial / "mics_checkpoint.json").is_file() and any(partial.glob("shard-q*.safetensors"))
    assert not (root / "step_00000004").exists()
    latest = mics_hf.latest_checkpoint(root)
    assert latest == root / "step_00000002"
    assert read_metadata(root)["_path"] == str(latest)
    model = mics_hf.shard_model(tiny_gpt2(), mics_hf.MiCSConfig())  # a world of one: loading reshards p 2 -> 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-4, weight_decay=0.01)
    assert mics_hf.load_checkpoint(root, model, opt) == {"step": 2, "next_step": 2}

    resumed = torchrun(*train_args(root, out, "--save-every", str(SAVE_EVERY)), marker=marker)
    assert resumed.returncode == 0, resumed.output
    assert "[resume] attempt 0: loaded step_00000002, continuing at step 2" in resumed.output, resumed.output
    assert not list(root.glob(".tmp-*")), "the next save must remove the partial directory"
    assert sorted(p.name for p in root.glob("step_*")) == [f"step_{s:08d}" for s in range(2, STEPS + 1, 2)]
    assert mics_hf.latest_checkpoint(root) == root / f"step_{STEPS:08d}"
    params, losses = load_result(out)
    ref_params, ref_losses = reference
    assert losses["losses"] == {s: ref_losses[s] for s in map(str, range(2, STEPS))}
    assert_same_params(params, ref_params)


@pytest.mark.slow
def test_hung_rank_fails_the_job_within_the_timeout(tmp_path, marker):
    timeout_s = 10
    run = torchrun(
        *("--ckpt-root", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--steps", "3"),
        *("--hang-rank", "1", "--hang-at-step", "1", "--timeout-s", str(timeout_s)),
        marker=marker, limit_s=180,
    )
    output = run.output
    assert run.returncode != 0, output
    hung_at = run.first("[fault] rank 1: hanging at step 1")
    assert hung_at is not None, output
    # The peers give up after the process-group timeout (which MiCS's groups inherit), then torchrun tears the
    # job down: well within 90 s of the hang, not gloo's default 30 minutes.
    assert run.elapsed - hung_at < 90, f"the job took {run.elapsed - hung_at:.0f} s to fail after the hang:\n{output}"
    assert run.elapsed - hung_at >= timeout_s / 2, output  # it failed on the timeout, not on something else
    assert "CollectiveError" in output, output
    assert any(f"{op} failed: unit '" in output for op in ("all_gather", "reduce_scatter", "all_reduce")), output
    assert "group (ranks [" in output, output
    assert not (tmp_path / "out").exists()
    deadline = time.monotonic() + 10
    while (left := _processes_mentioning(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind: {[(p.pid, p.info['cmdline']) for p in left]}"
