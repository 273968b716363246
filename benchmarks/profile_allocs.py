#!/usr/bin/env python
"""Allocations on the engine's hot path: how many tensors mics_hf allocates per step per unit, by path.

    python benchmarks/profile_allocs.py              # 4 gloo ranks, prints the table
    python benchmarks/profile_allocs.py --record     # also writes benchmarks/allocs_<date>.md and .json

How it counts: the torch profiler with profile_memory=True records one `[memory]` event per allocation and per
free made through c10's CPU allocator (read from the raw trace). Each unit method on the step's path (unshard, wait_unshard, reduce_grads,
wait_reduce, all_reduce_grads, wait_all_reduce) is wrapped in a `record_function` range from outside the engine,
and every positive `[memory]` event on the rank's main thread is booked on the innermost range that contains it.
Two ranges are booked apart: `param_storage` (re-growing the unsharded parameters' own memory, the gathered
model itself) and `backend` (inside torch.distributed's calls: gloo's staging, which NCCL does not have).
Warm-up steps run first; the profiled steps are steady state. Counts are per optimizer step and per unit (the
total over the model's units divided by their number), mean over the profiled steps, on rank 0.

What it does not see: allocations made inside gloo's own threads, and autograd's (activations, the unsharded
gradients), which are the model's, not the engine's. Cases: p = 2 (flat collectives, hop 2 across 2 replicas),
p = 4 across 2 emulated nodes (hierarchical), and p = 2 computing in bf16.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from bench_common import fork_ranks, gpt2_config, machine_info, write_record  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import mics_hf  # noqa: E402
from mics_hf.engine.shard import get_state  # noqa: E402
from mics_hf.engine.unit import ShardedUnit  # noqa: E402

PATHS = ("unshard", "wait_unshard", "param_storage", "reduce_grads", "wait_reduce", "all_reduce_grads", "wait_all_reduce",
         "backend")
# Where the unsharded parameters' own memory is re-grown (inside wait_unshard): booked apart, because that
# memory is the gathered model itself, which every sharded engine allocates, not a communication buffer.
# "backend": inside torch.distributed's calls (launch and wait), i.e. gloo's own staging, booked apart because
# it is the backend's, not the engine's (NCCL allocates none there).
STORAGE_METHODS = ("_alloc_storage",)
CASES = {  # name -> (partition_size, param_dtype)
    "p2_fp32": (2, None),
    "p4_hier_fp32": (4, None),
    "p2_bf16": (2, torch.bfloat16),
}
PREFIX = "mics_path::"
OTHER = "other (autograd, optimizer, model)"


def _wrap(cls: type, name: str, label: str) -> None:
    original = getattr(cls, name, None)
    if original is None or getattr(original, "_profiled", False):
        return

    @functools.wraps(original)
    def wrapped(self, *args, __original=original, **kwargs):
        with record_function(PREFIX + label):
            return __original(self, *args, **kwargs)

    wrapped._profiled = True  # type: ignore[attr-defined]
    setattr(cls, name, wrapped)


def _instrument() -> None:
    """Wrap the unit's hot-path methods in profiler ranges (once per process; behaviour unchanged)."""
    from mics_hf.engine import unit as unit_module

    for name in PATHS:
        if name != "param_storage":
            _wrap(ShardedUnit, name, name)
    for cls in (ShardedUnit, unit_module.ShardedParam):  # the engine keeps this memory per unit or per parameter
        for name in STORAGE_METHODS:
            if name in vars(cls):
                _wrap(cls, name, "param_storage")
    from mics_hf.engine import collectives

    for name in ("_all_gather_tensor", "_reduce_scatter_tensor"):  # the engine's tensor collectives
        _wrap_function(collectives, name, "backend")
    _wrap_function(dist, "all_reduce", "backend")
    _wrap(dist.Work, "wait", "backend")  # the handles' wait, where gloo finishes (and copies out) a collective


def _wrap_function(owner, name: str, label: str) -> None:
    original = getattr(owner, name)
    if getattr(original, "_profiled", False):
        return

    @functools.wraps(original)
    def wrapped(*args, __original=original, **kwargs):
        with record_function(PREFIX + label):
            return __original(*args, **kwargs)

    wrapped._profiled = True  # type: ignore[attr-defined]
    setattr(owner, name, wrapped)


def _book(prof) -> dict[str, dict[str, float]]:
    """Allocation events (positive [memory] records of the raw profiler trace) booked on the innermost engine
    range of the same thread: counts and bytes. The raw trace is read because the summarised events fold an
    allocation into the op that made it and keep only the frees as `[memory]`."""
    raw = list(prof.profiler.kineto_results.events())
    ranges = [(e.start_ns(), e.end_ns(), e.start_thread_id(), e.name().removeprefix(PREFIX))
              for e in raw if e.name().startswith(PREFIX)]
    out = {name: {"allocs": 0, "bytes": 0} for name in PATHS}
    out[OTHER] = {"allocs": 0, "bytes": 0}
    for e in raw:
        if e.name() != "[memory]" or e.nbytes() <= 0:
            continue
        t = e.start_ns()
        inside = [r for r in ranges if r[0] <= t <= r[1] and r[2] == e.start_thread_id()]
        key = min(inside, key=lambda r: r[1] - r[0])[3] if inside else OTHER
        out[key]["allocs"] += 1
        out[key]["bytes"] += e.nbytes()
    return out


def rank_main(rank: int, opts: argparse.Namespace, port: int, results_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=opts.nproc,
                            timeout=timedelta(seconds=120))
    _instrument()
    results = {}
    try:
        for case, (p, dtype) in CASES.items():
            torch.manual_seed(0)
            from transformers import GPT2LMHeadModel

            model = GPT2LMHeadModel(gpt2_config(vocab=1024, n_positions=64, n_embd=128, n_layer=opts.n_layer, n_head=4))
            model.loss_type = "ForCausalLM"
            net = mics_hf.shard_model(model, mics_hf.MiCSConfig(partition_size=p, devices_per_node=2, param_dtype=dtype))
            units = len(get_state(net).units)
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
            g = torch.Generator().manual_seed(rank)
            ids = torch.randint(1024, (opts.warmup + opts.steps, 4, 64), generator=g)

            def step(i: int) -> None:
                net(input_ids=ids[i], labels=ids[i]).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            for i in range(opts.warmup):
                step(i)
            dist.barrier()
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                for i in range(opts.warmup, opts.warmup + opts.steps):
                    step(i)
            booked = _book(prof)
            per = {k: {"allocs_per_step_per_unit": v["allocs"] / opts.steps / units,
                       "bytes_per_step_per_unit": v["bytes"] / opts.steps / units} for k, v in booked.items()}
            results[case] = {"units": units, "paths": per}
            del net, opt, model
        if rank == 0:
            Path(results_path).write_text(json.dumps(results))
        mics_hf.close_process_group()
    finally:
        mics_hf.close_process_group(wait_for_peers=False)


def table(results: dict) -> list[str]:
    lines = ["| case | units | " + " | ".join(PATHS) + " | engine total (param storage and backend excluded) | other |",
             "|---|---:|" + "---:|" * (len(PATHS) + 2)]
    for case, r in results.items():
        cells = [f"{r['paths'][k]['allocs_per_step_per_unit']:.2f}" for k in PATHS]
        total = sum(r["paths"][k]["allocs_per_step_per_unit"] for k in PATHS if k not in ("param_storage", "backend"))
        other = r["paths"][OTHER]["allocs_per_step_per_unit"]
        lines.append(f"| {case} | {r['units']} | " + " | ".join(cells) + f" | {total:.2f} | {other:.1f} |")
    lines += ["", "Bytes allocated per step per unit on the engine paths (KiB):", "",
              "| case | " + " | ".join(PATHS) + " |", "|---|" + "---:|" * len(PATHS)]
    for case, r in results.items():
        lines.append(f"| {case} | " + " | ".join(f"{r['paths'][k]['bytes_per_step_per_unit'] / 1024:.1f}" for k in PATHS) + " |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=4)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--label", default="", help="a word for the record (e.g. before / after)")
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks")
    opts = ap.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="profile_allocs_") as tmp:
        results, error = fork_ranks(rank_main, opts, opts.nproc, os.path.join(tmp, "r.json"))
    wall = time.perf_counter() - start
    lines = table(results) if results else []
    print("\n".join(["Allocations per optimizer step per unit, rank 0 (torch profiler, profile_memory=True):", "", *lines]))
    if error:
        print("ERROR", error, file=sys.stderr)
    if opts.record and results:
        info = machine_info()
        path = write_record(
            opts.out_dir, "allocs", title=f"Engine hot-path allocations{' (' + opts.label + ')' if opts.label else ''}",
            intro="Counts, not times: they do not depend on the machine's load. " + __doc__.split("\n\n")[2].replace("\n", " "),
            info=info, versions=("python", "torch", "transformers"), wall_s=wall,
            sections=[("Config", [f"- {opts.nproc} gloo ranks, devices_per_node=2; tiny GPT-2 (n_embd 128, n_layer "
                                  f"{opts.n_layer}, vocab 1024, seq 64, micro-batch 4), AdamW; {opts.warmup} warm-up + "
                                  f"{opts.steps} profiled steps"]),
                      ("Allocations per step per unit", lines)],
            errors=[error] if error else [], payload={"label": opts.label, "results": results},
        )
        print(f"recorded {os.path.relpath(path, ROOT)}")
    return 1 if error or not results else 0


if __name__ == "__main__":
    sys.exit(main())
