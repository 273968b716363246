#!/usr/bin/env python
"""Checkpoint benchmark: mics_hf.save_checkpoint / load_checkpoint against rank 0 torch.save of a full state dict.

What it measures, on 4 gloo ranks on CPU (1 thread each), for each partition size p (default 2 and 4), in one run:

    mics_hf save          save_checkpoint(model + AdamW): wall time (barrier before, max over ranks of the end),
                          bytes each rank wrote (from the checkpoint's JSON `files` entries, cross-checked with the
                          kernel's per-process write_bytes), total bytes
    mics_hf load          load_checkpoint into a freshly sharded model + optimizer of the same layout (also with
                          verify=False, to show what the CRC32 check of every file costs)
    mics_hf reshard       load_checkpoint of the checkpoint saved at the other p (e.g. saved at p=4, loaded at p=2)
    baseline              every rank gathers (mics_hf.full_state_dict for the model, the same all-gather for AdamW's
                          exp_avg / exp_avg_sq), then rank 0 alone torch.save's the full {model, optimizer} dict,
                          fsyncs it (mics_hf fsyncs its files too) and torch.load's it back

Every load is checked: a position-weighted checksum of the parameters and of both Adam moments (and the step count)
must equal the one taken before the save, whatever the layout.

What it cannot show: on one machine with one disk all ranks' writes share that disk (and the page cache), so the
parallel-write advantage of a sharded checkpoint is not visible here; what is visible is that no rank writes
everything (bytes per rank) and that loading into another layout works. Files are read back from the page cache
(this script cannot drop it), so loads measure CPU work (CRC32, copies, unpickling), not disk reads. On 2 cores
shared by 4 ranks (and by other people's jobs) absolute times move a lot between runs: only the ratios measured in
the same run mean anything.

Usage:
    python benchmarks/bench_checkpoint.py --quick      # ~20M-parameter GPT-2, smoke test
    python benchmarks/bench_checkpoint.py --record     # GPT-2 small (124M), writes benchmarks/checkpoint_<date>.md/.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

# One intra-op thread per rank: four ranks already oversubscribe two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Models are built from configs; a hub lookup would only retry without network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
# Benchmark the checkout this script lives in, not whatever mics_hf happens to be installed.
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
from bench_common import (  # noqa: E402
    add_layout_args,
    add_run_args,
    fork_ranks,
    gpt2_config,
    machine_info,
    parse_layout,
    write_record,
)
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import mics_hf  # noqa: E402
from mics_hf.checkpoint.format import METADATA
from mics_hf.checkpoint.save import _writer_of  # noqa: E402  (which rank writes which shard file)
from mics_hf.checkpoint.state_dict import gather_full_param  # noqa: E402
from mics_hf.engine.shard import get_state  # noqa: E402  (the ShardedParams, for the checksums and the optimizer gather)

BYTES_PER_PARAM = 12  # fp32 parameter + AdamW exp_avg + exp_avg_sq


# --------------------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Options:
    """Everything a rank needs; picklable so forked workers receive it unchanged."""

    nproc: int
    devices_per_node: int
    partition_sizes: tuple[int, ...]
    n_embd: int
    n_layer: int
    n_head: int
    vocab: int
    n_positions: int
    seq: int
    lr: float
    seed: int
    timeout_s: float
    tmp_root: str

    def gpt2_config(self) -> GPT2Config:
        return gpt2_config(
            vocab=self.vocab, n_positions=self.n_positions, n_embd=self.n_embd, n_layer=self.n_layer, n_head=self.n_head
        )


def parse_args(argv: list[str] | None = None) -> tuple[Options, argparse.Namespace]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_layout_args(ap, partition_sizes="2,4", help="partition sizes p, comma-separated; each checkpoint is also "
                    "loaded at every other p (resharding)")
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-head", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--n-positions", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=8, help="tokens of the one tiny training step (batch 1 per rank)")
    add_run_args(ap, kind="checkpoint", timeout_s=600.0)
    ap.add_argument("--tmp-dir", default=None, help="parent of the scratch directory (default: the system temp dir)")
    ap.add_argument("--quick", action="store_true", help="smoke test: GPT-2 with n_embd 256, n_layer 6 (~18M params)")
    ns = ap.parse_args(argv)
    if ns.quick:
        ns.n_embd, ns.n_layer, ns.n_head = 256, 6, 8
    sizes = parse_layout(ap, ns)
    opts = Options(
        nproc=ns.nproc, devices_per_node=ns.devices_per_node, partition_sizes=sizes, n_embd=ns.n_embd,
        n_layer=ns.n_layer, n_head=ns.n_head, vocab=ns.vocab, n_positions=ns.n_positions, seq=ns.seq, lr=ns.lr,
        seed=ns.seed, timeout_s=ns.timeout_s, tmp_root="",
    )
    return opts, ns


def count_params(opts: Options) -> int:
    """Unique parameters (the LM head is tied to the token embedding and counted once)."""
    with torch.device("meta"):
        model = GPT2LMHeadModel(opts.gpt2_config())
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------------------
# A rank
# --------------------------------------------------------------------------------------------------------------


def build(opts: Options, p: int, train_step: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A GPT-2 sharded at partition size p with its AdamW; with train_step, one tiny step so AdamW has state."""
    torch.manual_seed(opts.seed)
    model = GPT2LMHeadModel(opts.gpt2_config())
    model.loss_type = "ForCausalLM"
    model.train()
    model = mics_hf.shard_model(model, mics_hf.MiCSConfig(partition_size=p, devices_per_node=opts.devices_per_node))
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr)
    if train_step:
        # Different tokens per p: the checkpoints of different layouts then hold different values, so the
        # checksum shows that a reshard load really replaced what the previous load put there.
        g = torch.Generator().manual_seed((opts.seed * 1_000_003 + dist.get_rank()) * 101 + p)
        ids = torch.randint(opts.vocab, (1, opts.seq), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def checksum(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[float]:
    """Layout-independent fingerprint: sum over parameters of sum_rows (global row index + 1) * row sum, for the
    parameters, exp_avg and exp_avg_sq, plus the step counts summed over parameters; every replica adds the same, so divide by the
    number of partition groups. A row in the wrong place or a missing shard changes it."""
    state = get_state(model)
    local = torch.zeros(4, dtype=torch.float64)
    for _, group in state.units:
        for sp in group.params:
            start, stop = sp.offsets
            if stop <= start:
                continue
            weights = torch.arange(start + 1, stop + 1, dtype=torch.float64)
            tensors = [sp.sharded.detach()]
            st = optimizer.state.get(sp.sharded, {})
            tensors += [st["exp_avg"], st["exp_avg_sq"]] if st else [torch.zeros_like(sp.sharded)] * 2
            for i, t in enumerate(tensors):
                rows = t.detach().double().reshape(stop - start, -1).sum(dim=1)
                local[i] += (rows * weights).sum()
            if start == 0:  # the step count is per parameter, not per row: count it at position 0 only
                local[3] += float(st["step"]) if st else 0.0
    dist.all_reduce(local)
    return (local / state.topology.num_partition_groups).tolist()


def same_checksum(a: list[float], b: list[float]) -> bool:
    return all(abs(x - y) <= 1e-9 * max(1.0, abs(x), abs(y)) for x, y in zip(a, b))


def io_write_bytes() -> int:
    """Bytes this process caused to be written to storage (/proc/self/io), or -1 where the kernel lacks it."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run fn on every rank between barriers; the wall time is the max over ranks from the common start."""
    dist.barrier()
    start = time.perf_counter()
    value = fn()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    dist.barrier()
    return elapsed.item(), value


def save_phase(opts: Options, p: int, ckpt_root: Path) -> dict[str, Any]:
    """Build + step at p, save with mics_hf, then the rank-0 torch.save baseline from the same state."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model, optimizer = build(opts, p, train_step=True)
    reference = checksum(model, optimizer)
    topo = mics_hf.topology_of(model)

    io_before = io_write_bytes()
    save_s, path = timed(lambda: mics_hf.save_checkpoint(ckpt_root, model, optimizer, step=1))
    io_delta = io_write_bytes() - io_before if io_before >= 0 else -1
    io_all: list[Any] = [None] * world
    dist.all_gather_object(io_all, io_delta)

    # Bytes per rank from the metadata: shard-q files by their writer rank, rng-rank files by their rank.
    meta = json.loads((Path(path) / METADATA).read_text())
    by_rank = [0] * world
    files = []
    for entry in meta["files"]:
        owner = _writer_of(entry["position"], topo) if entry["kind"] == "shard" else entry["rank"]
        by_rank[owner] += entry["bytes"]
        files.append({"file": entry["file"], "bytes": entry["bytes"], "rank": owner})
    other = sum(f.stat().st_size for f in Path(path).iterdir() if f.name not in {e["file"] for e in meta["files"]})

    # Baseline: gather everything (all ranks), rank 0 writes one torch.save file.
    keep = rank == 0
    gather_model_s, full_model = timed(lambda: mics_hf.full_state_dict(model))
    if keep:
        # full_state_dict clones tied weights under each key; an unsharded model's state_dict shares them, and
        # torch.save then stores them once. Share them again so both formats hold the same bytes of content.
        primary: dict[int, str] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) in primary and name in full_model:
                full_model[name] = full_model[primary[id(param)]]
            primary.setdefault(id(param), name)

    def gather_optimizer() -> dict[str, Any] | None:
        state = get_state(model)
        index = {id(q): i for i, q in enumerate(q for g in optimizer.param_groups for q in g["params"])}
        out: dict[int, dict[str, torch.Tensor]] = {}
        for _, group in state.units:
            for sp in group.params:
                st = optimizer.state.get(sp.sharded)
                if not st:
                    continue
                entry = {"step": st["step"].clone()}
                for key in ("exp_avg", "exp_avg_sq"):
                    full = gather_full_param(sp, group.groups.partition.pg, state.topology.partition_size, local=st[key])
                    if keep:
                        entry[key] = full.clone()
                out[index[id(sp.sharded)]] = entry
        if not keep:
            return None
        groups = []
        for g in optimizer.param_groups:
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(q)] for q in g["params"]]})
        return {"state": out, "param_groups": groups}

    gather_opt_s, full_opt = timed(gather_optimizer)

    baseline: dict[str, Any] = {}
    if rank == 0:
        target = ckpt_root.parent / f"baseline_p{p}.pt"
        io0 = io_write_bytes()
        start = time.perf_counter()
        torch.save({"model": full_model, "optimizer": full_opt}, target)
        baseline["torch_save_s"] = time.perf_counter() - start
        start = time.perf_counter()
        with open(target, "rb") as f:
            os.fsync(f.fileno())
        baseline["fsync_s"] = time.perf_counter() - start
        baseline["io_write_bytes"] = io_write_bytes() - io0 if io0 >= 0 else -1
        baseline["bytes"] = target.stat().st_size
        full_model = full_opt = None
        gc.collect()
        start = time.perf_counter()
        loaded = torch.load(target, map_location="cpu", weights_only=True)
        baseline["torch_load_s"] = time.perf_counter() - start
        baseline["loaded_model_tensors"] = len(loaded["model"])
        del loaded
        target.unlink()
        gc.collect()
    dist.barrier()
    del model, optimizer, full_model, full_opt
    gc.collect()
    return {
        "p": p,
        "path": str(path),
        "checksum": reference,
        "save_s": save_s,
        "bytes_by_rank": by_rank,
        "io_write_bytes_by_rank": io_all,
        "files": files,
        "other_files_bytes": other,
        "total_bytes": sum(by_rank) + other,
        "gather_model_s": gather_model_s,
        "gather_optimizer_s": gather_opt_s,
        "baseline": baseline,
    }


def load_phase(opts: Options, p: int, saved: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """A fresh model + optimizer at p; load its own checkpoint (verify on and off), then every other p's."""
    model, optimizer = build(opts, p, train_step=False)
    out = []
    order = [p] + [q for q in saved if q != p]
    for q in order:
        for verify in ((True, False) if q == p else (True,)):
            seconds, _ = timed(lambda: mics_hf.load_checkpoint(saved[q]["path"], model, optimizer, verify=verify))
            ok = same_checksum(checksum(model, optimizer), saved[q]["checksum"])
            out.append({"saved_p": q, "loaded_p": p, "verify": verify, "load_s": seconds, "checksum_ok": ok})
    del model, optimizer
    gc.collect()
    return out


def rank_main(rank: int, opts: Options, port: int, results_path: str) -> None:
    torch.set_num_threads(1)
    # torch 2.13 deprecates all_gather_into_tensor, which mics_hf.full_state_dict calls once per parameter: once
    # per rank is enough to see it.
    warnings.filterwarnings("once", message=".*all_gather_into_tensor.*is deprecated")
    timeout = datetime.timedelta(seconds=opts.timeout_s)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=opts.nproc, timeout=timeout)
    results: dict[str, Any] = {"saves": {}, "loads": [], "error": None}
    try:
        control = dist.new_group(backend="gloo", timeout=2 * timeout)

        def attempt(what: str, fn: Callable[[], Any]) -> tuple[bool, Any]:
            """Run a phase on every rank; if any rank raised, every rank learns it and the run stops cleanly."""
            error, value = None, None
            try:
                value = fn()
            except Exception as exc:
                error = f"rank {rank}: {what}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            errors: list[Any] = [None] * opts.nproc
            dist.all_gather_object(errors, error, group=control)
            if any(errors):
                results["error"] = "\n".join(e for e in errors if e)
                gc.collect()
                return False, None
            return True, value

        saved: dict[int, dict[str, Any]] = {}
        for p in opts.partition_sizes:
            if rank == 0:
                print(f"  p={p}: build, one AdamW step, mics_hf save, baseline gather + torch.save/load", flush=True)
            ok, value = attempt(f"save at p={p}", lambda: save_phase(opts, p, Path(opts.tmp_root) / f"ckpt_p{p}"))
            if not ok:
                break
            saved[p] = value
            if rank == 0:
                Path(results_path).write_text(json.dumps({**results, "saves": saved}))
        if results["error"] is None:
            for p in opts.partition_sizes:
                if rank == 0:
                    print(f"  p={p}: fresh model, load its own checkpoint and the other layouts'", flush=True)
                ok, value = attempt(f"load at p={p}", lambda: load_phase(opts, p, saved))
                if not ok:
                    break
                results["loads"].extend(value)
        results["saves"] = saved
        if rank == 0:
            Path(results_path).write_text(json.dumps(results))
        mics_hf.close_process_group()
    finally:
        mics_hf.close_process_group(wait_for_peers=False)  # an error path: a peer may be gone


# --------------------------------------------------------------------------------------------------------------
# The parent: launch, summarise, record
# --------------------------------------------------------------------------------------------------------------


def summarise(opts: Options, results: dict[str, Any]) -> dict[str, Any]:
    saves = {int(p): s for p, s in (results.get("saves") or {}).items()}
    loads = results.get("loads") or []
    per_p: dict[int, dict[str, Any]] = {}
    for p, s in saves.items():
        b = s["baseline"]
        baseline_total = s["gather_model_s"] + s["gather_optimizer_s"] + b["torch_save_s"] + b["fsync_s"]
        same = next((l for l in loads if l["saved_p"] == p and l["loaded_p"] == p and l["verify"]), None)
        row: dict[str, Any] = {
            "save_s": s["save_s"],
            "baseline_gather_s": s["gather_model_s"] + s["gather_optimizer_s"],
            "baseline_write_s": b["torch_save_s"] + b["fsync_s"],
            "baseline_save_total_s": baseline_total,
            "baseline_load_s": b["torch_load_s"],
            "mics_max_bytes_one_rank": max(s["bytes_by_rank"]),
            "baseline_bytes_rank0": b["bytes"],
            "ratio_save_to_baseline_total": s["save_s"] / baseline_total,
            "ratio_save_to_baseline_write": s["save_s"] / (b["torch_save_s"] + b["fsync_s"]),
            "ratio_max_bytes_one_rank": max(s["bytes_by_rank"]) / b["bytes"],
            "ratio_total_bytes": s["total_bytes"] / b["bytes"],
        }
        if same is not None:
            row["load_s"] = same["load_s"]
            row["ratio_load_to_baseline"] = same["load_s"] / b["torch_load_s"]
        per_p[p] = row
    return {"saves": saves, "loads": loads, "ratios": per_p, "all_checksums_ok": all(l["checksum_ok"] for l in loads)}


def _gb(n: float) -> str:
    if n >= 1e8:
        return f"{n / 1e9:.3f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def render_table(opts: Options, summary: dict[str, Any]) -> list[str]:
    world = opts.nproc
    head = " / ".join(f"r{r}" for r in range(world))
    lines = [
        f"| p | operation | wall (s) | bytes written by rank ({head}) | max one rank | total | check |",
        "|---:|---|---:|---|---:|---:|---|",
    ]
    for p, s in summary["saves"].items():
        b = s["baseline"]
        per = " / ".join(_gb(x) for x in s["bytes_by_rank"])
        lines.append(f"| {p} | mics_hf save_checkpoint | {s['save_s']:.2f} | {per} | {_gb(max(s['bytes_by_rank']))} | "
                     f"{_gb(s['total_bytes'])} | |")
        for l in summary["loads"]:
            if l["loaded_p"] != p:
                continue
            what = ("mics_hf load_checkpoint" if l["saved_p"] == p else f"mics_hf load_checkpoint, reshard p={l['saved_p']} -> p={p}")
            if not l["verify"]:
                what += " (verify=False)"
            lines.append(f"| {p} | {what} | {l['load_s']:.2f} | - | - | - | {'ok' if l['checksum_ok'] else 'MISMATCH'} |")
        base_per = " / ".join(_gb(b["bytes"]) if r == 0 else "0" for r in range(world))
        lines.append(f"| {p} | baseline gather (full_state_dict {s['gather_model_s']:.2f} s + optimizer "
                     f"{s['gather_optimizer_s']:.2f} s) | {s['gather_model_s'] + s['gather_optimizer_s']:.2f} | - | - | - | |")
        lines.append(f"| {p} | baseline rank 0 torch.save ({b['torch_save_s']:.2f} s) + fsync ({b['fsync_s']:.2f} s) | "
                     f"{b['torch_save_s'] + b['fsync_s']:.2f} | {base_per} | {_gb(b['bytes'])} | {_gb(b['bytes'])} | |")
        lines.append(f"| {p} | baseline rank 0 torch.load | {b['torch_load_s']:.2f} | - | - | - | |")
    return lines


def render_ratios(summary: dict[str, Any]) -> list[str]:
    lines = [
        "| p | save / baseline (gather + write) | save / baseline write only | load / torch.load | "
        "max bytes one rank / baseline rank 0 | total bytes / baseline |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for p, r in summary["ratios"].items():
        load = f"{r['ratio_load_to_baseline']:.2f}" if "ratio_load_to_baseline" in r else "-"
        lines.append(f"| {p} | {r['ratio_save_to_baseline_total']:.2f} | {r['ratio_save_to_baseline_write']:.2f} | "
                     f"{load} | {r['ratio_max_bytes_one_rank']:.2f} | {r['ratio_total_bytes']:.2f} |")
    return lines


def render_io(opts: Options, summary: dict[str, Any]) -> list[str]:
    """The kernel's count (/proc/self/io write_bytes) next to the metadata's, per rank, for each mics_hf save."""
    out = []
    for p, s in summary["saves"].items():
        io = s["io_write_bytes_by_rank"]
        if any(x is None or x < 0 for x in io):
            out.append(f"- p={p}: /proc/self/io write_bytes unavailable")
            continue
        out.append(f"- p={p}: mics_hf save, kernel write_bytes per rank: " + " / ".join(_gb(x) for x in io)
                   + f"; baseline rank 0: {_gb(s['baseline']['io_write_bytes'])}")
        writers = ", ".join(f"{f['file']} by rank {f['rank']}" for f in s["files"] if f["file"].startswith("shard"))
        out.append(f"  shard files: {writers}")
    return out


NOTES = [
    "One machine, one disk: the ranks' shard files all go to the same disk and page cache, so a sharded save cannot "
    "be faster here for reasons of parallel bandwidth; on a cluster each writer would use its own node's link to "
    "shared storage. What this run shows is that no rank writes everything (the largest per-rank share is 1/p of "
    "the state, versus all of it on rank 0 for torch.save), and that a checkpoint saved at one partition size loads "
    "into another (the checksums match).",
    "Loads read files that were just written, so they come from the page cache: load times are CPU work (CRC32 "
    "verification, slicing, copying, unpickling), not disk reads.",
    "mics_hf save includes fsync and a CRC32 read-back of every file it wrote; the baseline's write time includes an "
    "fsync of its one file. load_checkpoint with verify=True (the default) checks size and CRC32 of every shard file "
    "on every rank, so each rank reads the whole checkpoint; the verify=False row shows the cost of that.",
    "The baseline load is torch.load on rank 0 only: it does not put the weights back into a sharded model, which a "
    "real resume would also need; the baseline gather is every rank all-gathering in its partition group.",
    "2 cores shared by 4 ranks and by other jobs: absolute times are noisy; only ratios from the same run count.",
]


def config_lines(opts: Options, params: int, tmp_parent: str) -> list[str]:
    return [
        f"- {opts.nproc} CPU ranks (gloo, 1 thread each), emulated as {opts.nproc // opts.devices_per_node} nodes x "
        f"{opts.devices_per_node} ranks; partition sizes {', '.join(map(str, opts.partition_sizes))}",
        f"- GPT2LMHeadModel: n_embd {opts.n_embd}, n_layer {opts.n_layer}, n_head {opts.n_head}, vocab {opts.vocab}, "
        f"n_positions {opts.n_positions}, tied LM head; {params:,} parameters "
        f"(fp32 params + 2 AdamW moments = {_gb(params * BYTES_PER_PARAM)} per copy)",
        f"- AdamW lr {opts.lr}, one step on batch 1 x {opts.seq} random tokens per rank so that the optimizer state "
        "exists",
        "- mics_hf: shard_model(model, MiCSConfig(partition_size=p, devices_per_node="
        f"{opts.devices_per_node})); save_checkpoint(root, model, optimizer, step=1); "
        "load_checkpoint(path, fresh_model, fresh_optimizer) with the default verify=True (and once verify=False)",
        "- baseline: mics_hf.full_state_dict(model) (tied weights shared again so they are stored once, as in an "
        "unsharded state_dict) + AdamW exp_avg / exp_avg_sq all-gathered the same way into a standard optimizer "
        "state_dict; rank 0: torch.save({'model', 'optimizer'}), fsync, torch.load(weights_only=True)",
        "- wall time: barrier, operation, max over ranks of the elapsed time (baseline save / load: rank 0's time)",
        f"- scratch directory on the local disk under {tmp_parent}, removed at the end",
    ]


def record(opts: Options, summary: dict[str, Any], info: dict[str, Any], out_dir: Path, wall_s: float,
           params: int, tmp_parent: str, errors: list[str]) -> Path:
    return write_record(
        out_dir, "checkpoint", title="Checkpoint benchmark", info=info, wall_s=wall_s, errors=errors,
        intro="Only the ratios in this file are meaningful, and only within this run: absolute times on this shared "
        "2-core machine move a lot between runs.",
        versions=("python", "torch", "transformers", "safetensors"),
        sections=[
            ("Config", config_lines(opts, params, tmp_parent)),
            ("Results", [
                *render_table(opts, summary),
                "",
                "check: a layout-independent checksum of parameters, both Adam moments and step counts after the load "
                "equals the one taken before the save.",
            ]),
            ("Ratios (same run)", render_ratios(summary)),
            ("Bytes written, as the kernel counts them", render_io(opts, summary)),
            ("Notes", [f"- {note}" for note in NOTES]),
        ],
        payload={
            "config": dataclasses.asdict(opts) | {"tmp_root": tmp_parent}, "model_parameters": params,
            "wall_s": wall_s, **summary, "errors": errors,
        },
    )


def main(argv: list[str] | None = None) -> int:
    opts, ns = parse_args(argv)
    params = count_params(opts)
    tmp_parent = ns.tmp_dir or tempfile.gettempdir()
    # Per partition size: one mics_hf checkpoint (kept for the reshard loads) and one baseline file at a time.
    need = (len(opts.partition_sizes) + 1) * params * BYTES_PER_PARAM
    free = shutil.disk_usage(tmp_parent).free
    print(f"bench_checkpoint: GPT-2 with {params:,} parameters ({_gb(params * BYTES_PER_PARAM)} per copy of params + "
          f"AdamW), {opts.nproc} ranks, p in {list(opts.partition_sizes)}; scratch under {tmp_parent} needs ~{_gb(need)}, "
          f"{_gb(free)} free", flush=True)
    if free < 1.5 * need:
        print(f"not enough free space under {tmp_parent}: need ~{_gb(1.5 * need)} with margin; pass --tmp-dir",
              file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="bench_checkpoint_", dir=tmp_parent)
    opts = dataclasses.replace(opts, tmp_root=tmp)
    start = time.perf_counter()
    try:
        results, launch_error = fork_ranks(rank_main, opts, opts.nproc, os.path.join(tmp, "results.json"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # also on error and Ctrl-C
    wall_s = time.perf_counter() - start
    errors = []
    if results.get("error"):
        errors.append(results["error"])
    if launch_error:
        errors.append(f"launcher: {launch_error}")
    summary = summarise(opts, results)
    print("\n".join(["", *render_table(opts, summary), "", "Ratios (same run):", *render_ratios(summary), "",
                     "Bytes written as the kernel counts them (/proc/self/io write_bytes):", *render_io(opts, summary),
                     "", "Notes:", *[f"- {n}" for n in NOTES]]))
    if summary["loads"] and not summary["all_checksums_ok"]:
        errors.append("a load did not restore the saved state (checksum mismatch), see the table")
    if errors:
        print("\nERRORS", *errors, sep="\n", file=sys.stderr)
    if ns.record:
        path = record(opts, summary, machine_info(safetensors=__import__('safetensors').__version__), ns.out_dir, wall_s, params, tmp_parent, errors)
        print(f"\nrecorded {os.path.relpath(path, ROOT)} (and .json)")
    print(f"wall time {wall_s:.0f} s; scratch directory {tmp} removed")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
