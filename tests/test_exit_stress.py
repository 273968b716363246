"""Scripts end the PyTorch way: repeated torchrun launches of a plain training script must all exit 0.

tests/exit_train.py trains a MiCS-sharded model on 4 or 8 gloo ranks and ends with `dist.destroy_process_group()`
or with no teardown at all; an exit-time abort or hang shows only in some launches, so each combination runs
several times. `MICS_STRESS_LAUNCHES` sets how many (default 1 in the suite; the recorded run in
benchmarks/teardown_2026-12-04.md used 10 per combination, 40 launches).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from launch import run_job

SCRIPT = Path(__file__).with_name("exit_train.py")
LAUNCHES = int(os.environ.get("MICS_STRESS_LAUNCHES", "1"))

# (ranks, ending, scope): the 4-rank launches let the model go when main() returns, the 8-rank launches keep it
# alive until the interpreter finalises, so both exit orders are covered.
CASES = [(4, "destroy", "main"), (4, "nothing", "main"), (8, "destroy", "module"), (8, "nothing", "module")]


@pytest.mark.slow
@pytest.mark.parametrize("nproc, ending, scope", CASES, ids=[f"{n}ranks-{e}-{s}" for n, e, s in CASES])
def test_repeated_launches_all_exit_cleanly(nproc, ending, scope):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(SCRIPT), ending, "2", scope]
    failures = []
    for launch in range(LAUNCHES):
        result = run_job(cmd, env=env, timeout=180)
        finished = set(re.findall(r"rank (\d+) loss", result.stdout))  # ranks' lines may share one line
        if result.returncode != 0 or len(finished) != nproc:
            failures.append(f"launch {launch}: exit {result.returncode}, {len(finished)}/{nproc} ranks finished\n"
                            f"stdout: {result.stdout[-1500:]}\n"
                            f"{result.stderr[-2000:]}")
    assert not failures, f"{len(failures)}/{LAUNCHES} launches failed:\n" + "\n".join(failures)
