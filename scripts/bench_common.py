"""What the benchmarks share: forking the gloo ranks, and what each one records beside its numbers (the machine,
the versions, the commit and the command)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent


def machine_info(**versions: str) -> dict[str, Any]:
    """CPU, platform, Python/torch/transformers/mics_hf versions and the git commit; `versions` adds more."""
    import torch
    import transformers

    import mics_hf

    processor = platform.processor()
    if not processor and os.path.exists("/proc/cpuinfo"):
        # platform.processor() is empty on many Linux builds; /proc/cpuinfo names the CPU.
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                processor = line.split(":", 1)[1].strip()
                break
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": processor or "unknown",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **versions,
        "mics_hf": mics_hf.__version__,
        "mics_hf_commit": commit,
    }


def command_line() -> str:
    """The command that produced a result file, relative to the repository root."""
    return " ".join(shlex.quote(a) for a in ["python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for the ranks' rendezvous (another process could still take it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fork_ranks(
    rank_main: Callable[[int, Any, int, str], None], opts: Any, nproc: int, results_path: str
) -> tuple[dict[str, Any], str | None]:
    """Run rank_main(rank, opts, port, results_path) in `nproc` forked ranks and wait for them all.

    Returns the JSON that rank 0 left at results_path ({} if it wrote none) and the launcher's error (None if every
    rank exited 0). A rank that dies does not lose the results rank 0 wrote before: the ranks write as they go, and
    the caller reports both.

    fork, not spawn: the parent has already imported torch and transformers, which each spawned rank would pay
    again (~4 s per process on this machine).
    """
    # Imported here, like torch in machine_info: the benchmarks set OMP_NUM_THREADS before torch is first imported.
    import torch.multiprocessing as torch_mp

    launch_error = None
    try:
        torch_mp.start_processes(
            rank_main, args=(opts, free_port(), results_path), nprocs=nproc, join=True, start_method="fork"
        )
    except Exception as exc:  # a rank died outside its own error handling: report it with whatever finished before
        launch_error = f"{type(exc).__name__}: {exc}"
    results = json.loads(Path(results_path).read_text()) if os.path.exists(results_path) else {}
    return results, launch_error
