"""What the benchmarks share: forking the gloo ranks, the rank layout flags, the dropout-free GPT-2 they train, and
what each one records beside its numbers (the machine, the versions, the commit and the command)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

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


def add_layout_args(ap: argparse.ArgumentParser, *, partition_sizes: str, help: str) -> None:
    """--nproc, --devices-per-node and --partition-sizes: the emulated cluster every CPU benchmark runs on."""
    ap.add_argument("--nproc", type=int, default=4, help="ranks (CPU processes, gloo)")
    ap.add_argument("--devices-per-node", type=int, default=2, help="k: ranks per emulated node")
    ap.add_argument("--partition-sizes", default=partition_sizes, help=help)


def add_run_args(ap: argparse.ArgumentParser, *, kind: str, timeout_s: float) -> None:
    """--lr, --seed, --timeout-s, --record and --out-dir: what every benchmark run takes besides its own flags."""
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout-s", type=float, default=timeout_s, help="process-group timeout: a hang fails, never blocks")
    ap.add_argument("--record", action="store_true", help=f"write benchmarks/{kind}_<date>.md and .json")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks", help="where --record writes")


def parse_layout(ap: argparse.ArgumentParser, ns: argparse.Namespace) -> tuple[int, ...]:
    """The partition sizes of --partition-sizes, after checking the layout (argparse's error names the fix)."""
    sizes = tuple(int(s) for s in ns.partition_sizes.split(",") if s.strip())
    if ns.nproc % ns.devices_per_node:
        ap.error(f"--devices-per-node {ns.devices_per_node} must divide --nproc {ns.nproc}")
    bad = [p for p in sizes if p < 1 or ns.nproc % p]
    if bad or not sizes:
        ap.error(f"every partition size must divide --nproc {ns.nproc}; got {sizes}")
    return sizes


def gpt2_config(*, vocab: int, n_positions: int, n_embd: int, n_layer: int, n_head: int):
    """A GPT-2 config with dropout off, so that every engine computes exactly the same function."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        # GPT-2's special token 50256 lies outside a small vocabulary; the last id keeps the config valid.
        bos_token_id=vocab - 1, eos_token_id=vocab - 1,
    )


def write_record(
    out_dir: Path,
    kind: str,
    *,
    title: str,
    intro: str,
    info: dict[str, Any],
    versions: Sequence[str],
    wall_s: float,
    sections: Sequence[tuple[str, list[str]]],
    errors: Sequence[str],
    payload: dict[str, Any],
) -> Path:
    """Write benchmarks/<kind>_<date>.md and .json, never overwriting: a second run that day gets `_2`, `_3`, ...

    The markdown starts with what every record states (the command, the machine and the versions listed in
    `versions`, keys of `info`), then `sections` as (heading, lines), then any errors; the JSON is `payload`
    with the date, the command and the machine added.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    stem, n = f"{kind}_{date}", 2
    while (out_dir / f"{stem}.md").exists() or (out_dir / f"{stem}.json").exists():
        stem, n = f"{kind}_{date}_{n}", n + 1
    md = [
        f"# {title}, {date}", "", intro, "", "## Command", "", "```bash", command_line(), "```", "",
        "## Machine and versions", "",
        f"- CPUs: {info['cpu_count']} ({info['processor']}), no GPU; {info['platform']}",
        "- " + ", ".join(f"{name} {info[name]}" for name in versions)
        + f", mics_hf {info['mics_hf']} (commit {info['mics_hf_commit']})",
        f"- wall time of the run: {wall_s:.0f} s",
        # other work on the same cores moves absolute times; the load says how busy the machine was
        "- load average (1, 5, 15 min) at the end of the run: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()), "",
    ]
    for heading, lines in sections:
        md += [f"## {heading}", "", *lines, ""]
    if errors:
        md += ["## Errors", "", "```", *errors, "```", ""]
    (out_dir / f"{stem}.md").write_text("\n".join(md))
    full = {"date": date, "command": command_line(), "machine": info, **payload}
    (out_dir / f"{stem}.json").write_text(json.dumps(full, indent=2, default=str) + "\n")
    return out_dir / f"{stem}.md"
