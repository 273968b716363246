"""What every benchmark records beside its numbers: the machine, the versions, the commit and the command."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

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
