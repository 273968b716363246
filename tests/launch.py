"""Running a launcher (torchrun, accelerate launch) from a test, with a time limit that cleans up after itself.

`subprocess.run(timeout=...)` kills only the launcher: its ranks live on as orphans, and the test fails with no
hint of where they were. Here, on time-out, every rank first gets SIGABRT, which Python's faulthandler (enabled
through the environment) answers by printing each thread's stack; then the launcher and all its descendants are
killed, and the test fails with those stacks and the end of the output.
"""

from __future__ import annotations

import signal
import subprocess
from typing import Mapping, Sequence

import psutil
import pytest


def family_of(pid: int) -> list[psutil.Process]:
    """The process and all its descendants, descendants first (collect them before killing anything)."""
    try:
        root = psutil.Process(pid)
        return root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return []


def kill_all(procs: list[psutil.Process]) -> None:
    """SIGKILL each process (gone ones are skipped) and reap them."""
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def run_job(cmd: Sequence[str], *, env: Mapping[str, str], timeout: float, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run `cmd` to completion and return its CompletedProcess (text output); fail the test after `timeout` s."""
    env = {**env, "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        family = family_of(proc.pid)  # collected before any kill: an orphan would no longer be found
        ranks = family[:-1]
        for p in ranks:
            try:
                p.send_signal(signal.SIGABRT)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(ranks, timeout=5)
        kill_all(family)
        out, err = proc.communicate(timeout=30)
        pytest.fail(
            f"{cmd[0]} did not finish within {timeout:.0f} s; it and its ranks were killed. Stacks (SIGABRT) and "
            f"the end of stderr:\n{err[-12000:]}\nend of stdout:\n{out[-2000:]}"
        )
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)
