#!/usr/bin/env python
"""The engine's own host work per unit per step, mics_hf against FSDP2's fully_shard, world 1, CPU, one run.

    python benchmarks/bench_host_overhead.py             # prints the table
    python benchmarks/bench_host_overhead.py --record    # also writes benchmarks/host_overhead_<date>.md and .json

The model is a stack of many small blocks (Linear - tanh - Linear, width 32 by default), each one unit, on a
batch of 8 rows: compute per block is a few microseconds, so what an engine adds per unit (hooks, state
bookkeeping, copy-in / copy-out calls, Python) dominates the step. Each engine trains the same model in one
process (a gloo group of one rank, which FSDP2 needs): `bare` (the model as it is), `fsdp2` (fully_shard on each
block, then the root), `mics` (shard_model with the blocks as units). Timed: forward + backward + zero_grad
(the optimizer is left out: FSDP2's parameters are DTensors and its optimizer step would be charged to it).
Engines run in rounds whose order alternates, and all rounds' steps are pooled.

Reported: median step time, and per unit per step the overhead (engine step - bare step) / units; the ratio
mics / FSDP2 of these overheads is the number to compare. Two precisions: fp32 (mics_hf at world 1 then
aliases its fp32 shards and copies nothing, the DDP end) and bf16 compute with fp32 masters (both engines then
copy every unit in and out).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
from bench_common import free_port, machine_info, write_record  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402

import mics_hf  # noqa: E402

ENGINES = ("bare", "fsdp2", "mics")


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.tanh(self.a(x)))


class Stack(nn.Module):
    def __init__(self, width: int, n: int) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(n)])
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h)
        return self.out(h).square().mean()


def build(engine: str, opts: argparse.Namespace, dtype: torch.dtype | None, mesh) -> nn.Module:
    torch.manual_seed(0)
    model = Stack(opts.width, opts.units)
    if engine == "fsdp2":
        mp = MixedPrecisionPolicy(param_dtype=dtype) if dtype is not None else MixedPrecisionPolicy()
        for blk in model.blocks:
            fully_shard(blk, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    elif engine == "mics":
        mics_hf.shard_model(model, mics_hf.MiCSConfig(partition_size=1, units=(Block,), param_dtype=dtype))
    return model


def time_engine(engine: str, opts: argparse.Namespace, dtype: torch.dtype | None, mesh, x: torch.Tensor) -> list[float]:
    model = build(engine, opts, dtype, mesh)
    # bare in bf16 computes under autocast (fp32 parameters), as a user without an engine would
    autocast = torch.autocast("cpu", dtype=dtype) if (engine == "bare" and dtype is not None) else None
    times = []
    for step in range(opts.warmup + opts.steps):
        t0 = time.perf_counter()
        if autocast is not None:
            with autocast:
                loss = model(x)
        else:
            loss = model(x)
        loss.backward()
        for prm in model.parameters():
            prm.grad = None
        if step >= opts.warmup:
            times.append(time.perf_counter() - t0)
    del model
    return times


def run(opts: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (1,))
    x = torch.randn(opts.batch, opts.width, generator=torch.Generator().manual_seed(1))
    out = {}
    try:
        for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            times = {e: [] for e in ENGINES}
            for r in range(opts.rounds):
                order = ENGINES if r % 2 == 0 else tuple(reversed(ENGINES))
                for engine in order:
                    times[engine] += time_engine(engine, opts, dtype, mesh, x.to(dtype) if dtype and engine != "bare" else x)
            med = {e: statistics.median(t) * 1e3 for e, t in times.items()}
            units = opts.units + 1  # the blocks and the root
            over = {e: (med[e] - med["bare"]) * 1e3 / units for e in ("fsdp2", "mics")}  # microseconds per unit
            out[label] = {"median_ms": med, "overhead_us_per_unit": over,
                          "ratio_overhead_mics_to_fsdp2": over["mics"] / over["fsdp2"] if over["fsdp2"] > 0 else None,
                          "ratio_step_mics_to_fsdp2": med["mics"] / med["fsdp2"]}
    finally:
        mics_hf.close_process_group()
    return out


def table(results: dict, units: int) -> list[str]:
    lines = ["| precision | bare step (ms) | FSDP2 step (ms) | mics_hf step (ms) | FSDP2 overhead (us/unit) | "
             "mics_hf overhead (us/unit) | mics/FSDP2 overhead | mics/FSDP2 step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in results.items():
        m, o = r["median_ms"], r["overhead_us_per_unit"]
        ratio = r["ratio_overhead_mics_to_fsdp2"]
        lines.append(f"| {label} | {m['bare']:.2f} | {m['fsdp2']:.2f} | {m['mics']:.2f} | {o['fsdp2']:.1f} | "
                     f"{o['mics']:.1f} | {'-' if ratio is None else f'{ratio:.2f}'} | {r['ratio_step_mics_to_fsdp2']:.2f} |")
    lines += ["", f"Overhead per unit = (engine median - bare median) / {units} units (the blocks and the root)."]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--units", type=int, default=48, help="blocks (each one unit)")
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--label", default="", help="a word for the record (e.g. before / after)")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks")
    opts = ap.parse_args()
    start = time.perf_counter()
    results = run(opts)
    wall = time.perf_counter() - start
    lines = table(results, opts.units + 1)
    print("\n".join(lines))
    if opts.record:
        path = write_record(
            opts.out_dir, "host_overhead", title=f"Engine host overhead per unit{' (' + opts.label + ')' if opts.label else ''}",
            intro="Only ratios measured in this run count (absolute times move +-30% with the machine's load). "
            + __doc__.split("\n\n")[2].replace("\n", " "),
            info=machine_info(), versions=("python", "torch", "transformers"), wall_s=wall,
            sections=[("Config", [f"- world 1 (gloo group of one), 1 thread; {opts.units} blocks of width {opts.width} "
                                  f"+ root, batch {opts.batch}; {opts.rounds} rounds x ({opts.warmup} warm-up + "
                                  f"{opts.steps} timed steps) per engine"]),
                      ("Results", lines)],
            errors=[], payload={"label": opts.label, "options": vars(opts) | {"out_dir": str(opts.out_dir)}, "results": results},
        )
        print(f"recorded {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
