#!/usr/bin/env python
"""Engine benchmark: mics_hf against PyTorch DDP and FSDP2 on a tiny GPT-2, 4 gloo ranks on CPU, one run.

What it measures: the median training-step time (forward, backward, gradient communication, AdamW step) of the
same model, data and seed under six engines, run one after another by the same four processes:

    DDP                  every rank keeps a full replica; one all-reduce of the gradients
    FSDP2 HSDP           2-D mesh (replicate, shard) = (N/k, k): the peer of mics_hf with p = k
    FSDP2 1-D            sharded over all N ranks: the ZeRO-3 peer (and of mics_hf with p = N)
    mics_hf p=1, 2, 4    the same engine at three partition sizes; p=1 is DDP-like, p=4 spans both emulated
                         nodes and so uses the hierarchical all-gather / reduce-scatter

Why ratios only: on a 2-core machine four ranks contend for CPU and absolute times move by about +-30% between
runs, so the only numbers worth comparing are ratios of engines measured in the same run. To keep the comparison
fair under drift, engines run in rounds whose order alternates (ABC.. then ..CBA) and the step times of all rounds
are pooled.

Where it cuts corners: the data are random tokens (the loss barely moves; it is printed only to show that every
engine trains the same model), the nodes are emulated (devices_per_node=2 on one host, so "inter-node" bytes
travel over loopback like all others), and compute dominates at this size: the benchmark checks engine overhead,
not the network savings MiCS is for.

Usage:
    python benchmarks/bench_engine.py --quick          # smoke test, ~1 minute
    python benchmarks/bench_engine.py --record         # full run, writes benchmarks/engine_<date>.md and .json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

# One intra-op thread per rank: four ranks already oversubscribe two cores, and more threads only add contention.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Models are built from configs; a hub lookup would only retry for ~46 s without network.
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
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.models.gpt2.modeling_gpt2 import GPT2Block  # noqa: E402

import mics_hf  # noqa: E402

HSDP_KEY = "fsdp2_hsdp"
DDP_KEY = "ddp"


# --------------------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Options:
    """Everything a rank needs to run the benchmark; picklable so forked workers receive it unchanged."""

    nproc: int
    devices_per_node: int
    partition_sizes: tuple[int, ...]
    engines: tuple[str, ...]
    n_embd: int
    n_layer: int
    n_head: int
    vocab: int
    seq: int
    micro_batch: int
    accum: int
    warmup: int
    steps: int
    rounds: int
    lr: float
    seed: int
    timeout_s: float

    def gpt2_config(self) -> GPT2Config:
        return gpt2_config(vocab=self.vocab, n_positions=self.seq, n_embd=self.n_embd, n_layer=self.n_layer, n_head=self.n_head)


def engine_keys(partition_sizes: tuple[int, ...]) -> list[str]:
    """Every engine this run can compare, in the order of the first round."""
    return [DDP_KEY, HSDP_KEY, "fsdp2_1d"] + [f"mics_p{p}" for p in partition_sizes]


def engine_label(key: str) -> str:
    """The name printed in tables."""
    if key.startswith("mics_p"):
        return f"mics_hf p={key.removeprefix('mics_p')}"
    return {DDP_KEY: "DDP", HSDP_KEY: "FSDP2 HSDP", "fsdp2_1d": "FSDP2 1-D"}[key]


def parse_args(argv: list[str] | None = None) -> tuple[Options, argparse.Namespace]:
    """Command-line flags -> Options (what ranks need) plus the namespace (what only the parent needs)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_layout_args(ap, partition_sizes="1,2,4", help="mics_hf partition sizes p to run, comma-separated")
    ap.add_argument("--engines", default="all", help="comma-separated subset of: ddp, fsdp2_hsdp, fsdp2_1d, mics_pP")
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per rank per micro-step")
    ap.add_argument("--accum", type=int, default=1, help="micro-steps per optimizer step (gradient accumulation)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per engine and round")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per engine and round")
    ap.add_argument("--rounds", type=int, default=2, help="passes over all engines, alternating their order")
    add_run_args(ap, kind="engine", timeout_s=120.0)
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 warmup + 3 timed steps, 1 round")
    ns = ap.parse_args(argv)
    if ns.quick:
        ns.warmup, ns.steps, ns.rounds = 1, 3, 1
    sizes = parse_layout(ap, ns)
    known = engine_keys(sizes)
    wanted = known if ns.engines == "all" else [e.strip() for e in ns.engines.split(",") if e.strip()]
    unknown = [e for e in wanted if e not in known]
    if unknown:
        ap.error(f"unknown engine(s) {unknown}; this run knows {known} (mics_pP needs P in --partition-sizes)")
    if ns.warmup < 0 or ns.steps < 1 or ns.rounds < 1 or ns.accum < 1:
        ap.error("--steps, --rounds and --accum must be >= 1 and --warmup >= 0")
    opts = Options(
        nproc=ns.nproc, devices_per_node=ns.devices_per_node, partition_sizes=sizes, engines=tuple(wanted),
        n_embd=ns.n_embd, n_layer=ns.n_layer, n_head=ns.n_head, vocab=ns.vocab, seq=ns.seq,
        micro_batch=ns.micro_batch, accum=ns.accum, warmup=ns.warmup, steps=ns.steps, rounds=ns.rounds,
        lr=ns.lr, seed=ns.seed, timeout_s=ns.timeout_s,
    )
    return opts, ns


# --------------------------------------------------------------------------------------------------------------
# Engines: how each one wraps the model and skips gradient communication on non-final micro-steps
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Engine:
    """One way to train the model data-parallel.

    wrap: turns the freshly built model into the engine's model (called on every rank, same order).
    micro_step: the context for one micro-step; sync=False on non-final micro-steps of an accumulation.
    """

    key: str
    wrap: Callable[[nn.Module], nn.Module]
    micro_step: Callable[[nn.Module, bool], ContextManager[Any]]


def _no_sync_unless(model: nn.Module, sync: bool) -> ContextManager[Any]:
    # DDP skips its gradient all-reduce under no_sync(); mics_hf skips only hop 2 (the replica all-reduce) and
    # still reduce-scatters every micro-step (hop 1), so unsharded gradients never accumulate.
    return contextlib.nullcontext() if sync else model.no_sync()  # type: ignore[operator]


@contextlib.contextmanager
def _fsdp2_sync(model: nn.Module, sync: bool) -> Any:
    # FSDP2 has no no_sync() context: the flag is read during backward, so setting it before each micro-step
    # (False on non-final ones, True on the last) is the whole protocol.
    model.set_requires_gradient_sync(sync)  # type: ignore[operator]
    yield


class Meshes:
    """Device meshes built once per process and reused: each mesh creates process groups, which gloo keeps."""

    def __init__(self, opts: Options) -> None:
        self._opts = opts
        self._hsdp: DeviceMesh | None = None
        self._flat: DeviceMesh | None = None

    @property
    def hsdp(self) -> DeviceMesh:
        """(replicate, shard) = (N/k, k): shard groups are the emulated nodes, like mics_hf partition groups."""
        if self._hsdp is None:
            k = self._opts.devices_per_node
            self._hsdp = init_device_mesh(
                "cpu", (self._opts.nproc // k, k), mesh_dim_names=("replicate", "shard")
            )
        return self._hsdp

    @property
    def flat(self) -> DeviceMesh:
        """All N ranks in one shard group (ZeRO-3)."""
        if self._flat is None:
            self._flat = init_device_mesh("cpu", (self._opts.nproc,), mesh_dim_names=("shard",))
        return self._flat


def _fully_shard_gpt2(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    # One FSDP2 unit per transformer block, then the root (embeddings, tied LM head, final norm): the same units
    # mics_hf derives from GPT2's _no_split_modules, so both engines gather and free the same amounts.
    for module in model.modules():
        if isinstance(module, GPT2Block):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def build_engine(key: str, opts: Options, meshes: Meshes) -> Engine:
    """The Engine for a key such as 'ddp', 'fsdp2_hsdp' or 'mics_p2'."""
    if key == DDP_KEY:
        return Engine(key, lambda m: DistributedDataParallel(m), _no_sync_unless)
    if key == HSDP_KEY:
        return Engine(key, lambda m: _fully_shard_gpt2(m, meshes.hsdp), _fsdp2_sync)
    if key == "fsdp2_1d":
        return Engine(key, lambda m: _fully_shard_gpt2(m, meshes.flat), _fsdp2_sync)
    if key.startswith("mics_p"):
        config = mics_hf.MiCSConfig(partition_size=int(key.removeprefix("mics_p")), devices_per_node=opts.devices_per_node)
        return Engine(key, lambda m: mics_hf.shard_model(m, config), _no_sync_unless)
    raise ValueError(f"unknown engine {key!r}")


# --------------------------------------------------------------------------------------------------------------
# One engine on one rank
# --------------------------------------------------------------------------------------------------------------


def make_batches(opts: Options, rank: int) -> torch.Tensor:
    """Token ids [warmup + steps, accum, micro_batch, seq] for this rank: identical for every engine and round."""
    g = torch.Generator().manual_seed(opts.seed * 1_000_003 + rank)
    shape = (opts.warmup + opts.steps, opts.accum, opts.micro_batch, opts.seq)
    return torch.randint(opts.vocab, shape, generator=g)


def local_numel(model: nn.Module) -> int:
    """Parameter elements this rank holds (FSDP2 parameters are DTensors: count their local shard)."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel()
    return total


def comm_per_step(model: nn.Module, key: str, steps: int) -> dict[str, dict[str, float]] | None:
    """mics_hf's own accounting, per (op, link) per optimizer step on this rank; None for the peers."""
    if not key.startswith("mics_p"):
        return None
    # The two counters are keyed differently: bytes by the link this rank sends on (its ring successor's node),
    # calls by the class of the group the collective ran in (inter_node if the group spans nodes).
    stats = mics_hf.comm_stats(model)
    return {
        "bytes": {f"{op}/{link}": n / steps for (op, link), n in stats.bytes.items()},
        "calls": {f"{op}/{link}": n / steps for (op, link), n in stats.calls.items()},
    }


def reset_comm(model: nn.Module, key: str) -> None:
    """Forget the warmup's traffic so the per-step numbers count timed steps only."""
    if key.startswith("mics_p"):
        mics_hf.comm_stats(model).reset()


def run_engine(engine: Engine, opts: Options, rank: int, batches: torch.Tensor) -> dict[str, Any]:
    """Build, wrap and train the model; return this rank's step times, losses, traffic and shard size.

    Each step starts after a barrier, so a step's time on the slowest rank (taken later with a MAX reduction)
    is the wall time of the whole step, including waits for other ranks.
    """
    torch.manual_seed(opts.seed)  # same initial weights on every rank and for every engine
    model = GPT2LMHeadModel(opts.gpt2_config())
    # GPT-2 names no loss type, so transformers warns and picks this one anyway; naming it keeps the log clean.
    model.loss_type = "ForCausalLM"
    model.train()
    model = engine.wrap(model)
    # Built after wrapping: for the sharding engines, model.parameters() are the local shards.
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr)
    times: list[float] = []
    losses: list[float] = []
    for step in range(opts.warmup + opts.steps):
        if step == opts.warmup:
            reset_comm(model, engine.key)
        dist.barrier()
        start = time.perf_counter()
        step_loss = torch.zeros(())
        for micro in range(opts.accum):
            with engine.micro_step(model, micro == opts.accum - 1):
                ids = batches[step, micro]
                loss = model(input_ids=ids, labels=ids).loss / opts.accum
                loss.backward()
            step_loss += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        if step >= opts.warmup:
            times.append(elapsed)
        losses.append(step_loss.item())
    result = {
        "times": times,
        "losses": losses,
        "comm": comm_per_step(model, engine.key, opts.steps),
        "numel": local_numel(model),
    }
    # Free the engine's state before the next one is built: four ranks share the machine's memory too.
    del optimizer, model
    gc.collect()
    return result


def reduce_result(local: dict[str, Any], world: int) -> dict[str, Any]:
    """Combine the ranks' results: per-step max time, mean loss, mean traffic per rank, max shard size."""
    times = torch.tensor(local["times"], dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    losses = torch.tensor(local["losses"], dtype=torch.float64)
    dist.all_reduce(losses, op=dist.ReduceOp.SUM)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (local["comm"], local["numel"]))
    comm = None
    if gathered[0][0] is not None:
        # Mean over ranks: in a ring only the ranks at a node boundary send on inter-node links, so one rank's
        # counters are not representative; the mean times N is the world's total.
        comm = {"bytes": {}, "calls": {}}
        for rank_comm, _ in gathered:
            for kind, counts in rank_comm.items():
                for name, value in counts.items():
                    comm[kind][name] = comm[kind].get(name, 0.0) + value / world
    return {
        "times": times.tolist(),
        "losses": (losses / world).tolist(),
        "comm": comm,
        "numel_max": max(n for _, n in gathered),
    }


# --------------------------------------------------------------------------------------------------------------
# A rank: every engine, every round
# --------------------------------------------------------------------------------------------------------------


def merge_errors(errors: list[str | None]) -> str:
    """One block per distinct traceback, naming the ranks that raised it (a symmetric error appears once)."""
    by_text: dict[str, list[int]] = {}
    for rank, error in enumerate(errors):
        if error:
            by_text.setdefault(error.split(": ", 1)[1], []).append(rank)
    return "\n".join(f"ranks {ranks}: {text}" for text, ranks in by_text.items())


def rank_main(rank: int, opts: Options, port: int, results_path: str) -> None:
    """Entry point of a forked rank: join the gloo world, run the rounds, rank 0 writes results as it goes."""
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=opts.timeout_s)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=opts.nproc, timeout=timeout
    )
    try:
        # Engine errors are agreed on in a separate group with a longer timeout: a rank that raised must not
        # meet the others' pending collectives on the default group, and the others need time to time out.
        control = dist.new_group(backend="gloo", timeout=2 * timeout)
        meshes = Meshes(opts)
        batches = make_batches(opts, rank)
        results: dict[str, dict[str, Any]] = {
            key: {"times": [], "losses": [], "comm": [], "numel_max": None, "error": None} for key in opts.engines
        }
        for round_index in range(opts.rounds):
            order = list(opts.engines) if round_index % 2 == 0 else list(reversed(opts.engines))
            for key in order:
                slot = results[key]
                if slot["error"] is not None:
                    continue  # one traceback per engine is enough
                error = None
                try:
                    reduced = reduce_result(run_engine(build_engine(key, opts, meshes), opts, rank, batches), opts.nproc)
                except Exception as exc:  # recorded with its traceback and reported by the parent; never hidden
                    error = f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
                    reduced = None
                errors: list[str | None] = [None] * opts.nproc
                dist.all_gather_object(errors, error, group=control)
                if any(errors):
                    slot["error"] = merge_errors(errors)
                    gc.collect()
                    continue
                slot["times"].extend(reduced["times"])
                slot["losses"].append(reduced["losses"])
                if reduced["comm"] is not None:
                    slot["comm"].append(reduced["comm"])
                slot["numel_max"] = reduced["numel_max"]
                if rank == 0:
                    # Written after every engine so a later crash still leaves the engines that finished.
                    Path(results_path).write_text(json.dumps(results))
        if rank == 0:
            Path(results_path).write_text(json.dumps(results))
        mics_hf.close_process_group()  # without it gloo can hang or abort at exit and the run reports a failure
    finally:
        mics_hf.close_process_group(wait_for_peers=False)  # an error path: a peer may be gone


# --------------------------------------------------------------------------------------------------------------
# The parent: launch, summarise, record
# --------------------------------------------------------------------------------------------------------------


def launch(opts: Options) -> tuple[dict[str, Any], str | None]:
    """Fork the ranks with a scratch directory for their results; see bench_common.fork_ranks."""
    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        return fork_ranks(rank_main, opts, opts.nproc, os.path.join(tmp, "results.json"))


def summarise(opts: Options, results: dict[str, Any]) -> dict[str, Any]:
    """Medians, spreads and ratios per engine, the traffic of mics_hf, and the two goals."""
    rows: dict[str, dict[str, Any]] = {}
    for key in opts.engines:
        r = results.get(key)
        if r is None or (not r["times"] and r.get("error") is None):
            rows[key] = {"error": "no result (the run stopped before this engine finished)"}
            continue
        if r.get("error") is not None:
            rows[key] = {"error": r["error"]}
            continue
        ms = sorted(t * 1000 for t in r["times"])
        comm = None
        if r["comm"]:
            # Averaged over rounds; keyed "op/link" -> {"bytes": sent per rank per step, "calls": per step}.
            comm = {}
            names = sorted({n for c in r["comm"] for kind in c.values() for n in kind})
            for name in names:
                comm[name] = {
                    kind: statistics.mean(c[kind].get(name, 0.0) for c in r["comm"]) for kind in ("bytes", "calls")
                }
        rows[key] = {
            "median_ms": statistics.median(ms),
            "p10_ms": ms[int(0.1 * (len(ms) - 1))],
            "p90_ms": ms[int(round(0.9 * (len(ms) - 1)))],
            "num_steps": len(ms),
            "final_loss": r["losses"][-1][-1],
            "params_per_rank": r["numel_max"],
            "comm_per_step": comm,
            "error": None,
        }
    for key, row in rows.items():
        for ref in (HSDP_KEY, DDP_KEY):
            base = rows.get(ref, {}).get("median_ms")
            if row.get("median_ms") is not None and base:
                row[f"ratio_to_{ref}"] = row["median_ms"] / base
    goals = []
    k = opts.devices_per_node
    goals.append(_goal(rows, f"mics_p{k}", HSDP_KEY, 1.0, f"mics_hf p={k} / FSDP2 HSDP <= 1.00"))
    goals.append(_goal(rows, "mics_p1", DDP_KEY, 1.15, "mics_hf p=1 / DDP <= 1.15 (within 15% of DDP)"))
    return {"world": opts.nproc, "rows": rows, "goals": goals}


def _goal(rows: dict[str, dict[str, Any]], key: str, ref: str, limit: float, text: str) -> dict[str, Any]:
    ratio = rows.get(key, {}).get(f"ratio_to_{ref}")
    verdict = "n/a" if ratio is None else ("PASS" if ratio <= limit else "MISS")
    return {"goal": text, "ratio": ratio, "limit": limit, "verdict": verdict}


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _fmt_ratio(row: dict[str, Any], ref: str) -> str:
    value = row.get(f"ratio_to_{ref}")
    return "-" if value is None else f"{value:.2f}"


def render_table(summary: dict[str, Any]) -> list[str]:
    """The results as Markdown lines (readable in a terminal too)."""
    lines = [
        "| engine | median step (ms) | p10-p90 (ms) | / FSDP2 HSDP | / DDP | params per rank | final loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, row in summary["rows"].items():
        if row.get("error"):
            lines.append(f"| {engine_label(key)} | ERROR | | | | | |")
            continue
        lines.append(
            f"| {engine_label(key)} | {row['median_ms']:.1f} | {row['p10_ms']:.1f}-{row['p90_ms']:.1f} | "
            f"{_fmt_ratio(row, HSDP_KEY)} | {_fmt_ratio(row, DDP_KEY)} | {row['params_per_rank']:,} | "
            f"{row['final_loss']:.6f} |"
        )
    return lines


def render_comm(summary: dict[str, Any]) -> list[str]:
    """mics_hf traffic per (op, link) per optimizer step, from mics_hf.comm_stats (ring-model bytes sent)."""
    lines = [
        "| engine | op | link | bytes sent on this link, per rank (mean) | world total | calls in groups of this class |",
        "|---|---|---|---:|---:|---:|",
    ]
    for key, row in summary["rows"].items():
        for name, c in (row.get("comm_per_step") or {}).items():
            op, link = name.split("/")
            lines.append(
                f"| {engine_label(key)} | {op} | {link} | {_fmt_bytes(c['bytes'])} | "
                f"{_fmt_bytes(c['bytes'] * summary['world'])} | {c['calls']:g} |"
            )
    return lines


def render_goals(summary: dict[str, Any]) -> list[str]:
    out = []
    for g in summary["goals"]:
        ratio = "n/a" if g["ratio"] is None else f"{g['ratio']:.2f}"
        out.append(f"- {g['verdict']}: {g['goal']} (measured {ratio})")
    return out


def render_errors(summary: dict[str, Any]) -> list[str]:
    out = []
    for key, row in summary["rows"].items():
        if row.get("error"):
            out += [f"{engine_label(key)} failed:", row["error"]]
    return out


def record(opts: Options, summary: dict[str, Any], info: dict[str, Any], out_dir: Path, wall_s: float) -> Path:
    """Write engine_<date>.md and .json; a second run on the same day gets a numbered file instead of overwriting."""
    params = sum(p.numel() for p in GPT2LMHeadModel(opts.gpt2_config()).parameters())
    config = [
        f"- {opts.nproc} CPU ranks (gloo, 1 thread each), emulated as {opts.nproc // opts.devices_per_node} nodes x "
        f"{opts.devices_per_node} ranks (devices_per_node={opts.devices_per_node}); all traffic is loopback",
        f"- GPT2LMHeadModel: n_embd {opts.n_embd}, n_layer {opts.n_layer}, n_head {opts.n_head}, vocab {opts.vocab}, "
        f"seq {opts.seq}, dropout 0, tied LM head; {params:,} parameters; random tokens, seed {opts.seed}",
        f"- micro-batch {opts.micro_batch} per rank, accumulation {opts.accum}, AdamW lr {opts.lr}",
        f"- {opts.rounds} round(s) over the engines, order alternating; per engine and round {opts.warmup} warmup "
        f"+ {opts.steps} timed steps",
        "- step time: barrier, then forward/backward of every micro-step, optimizer step and zero_grad; the max "
        "over ranks of each step, then the median over all timed steps of all rounds",
        "- FSDP2 HSDP: init_device_mesh('cpu', (N/k, k), ('replicate', 'shard')); FSDP2 1-D: mesh (N,); "
        "fully_shard on each GPT2Block, then on the root (default reshard_after_forward)",
        f"- mics_hf: shard_model(model, MiCSConfig(partition_size=p, devices_per_node={opts.devices_per_node})); "
        "hierarchical is automatic (p=4 spans both nodes)",
    ]
    comm_intro = (
        "From `mics_hf.comm_stats`, per optimizer step, mean over rounds. Bytes are what a rank sends under the "
        "ring model, booked on the link to its ring successor (mean over ranks; world total = mean x N); calls are "
        "booked on the class of the group (inter_node if the group spans nodes), so a link can carry bytes with "
        "0 calls booked on it."
    )
    return write_record(
        out_dir, "engine", title="Engine benchmark", info=info, wall_s=wall_s, errors=render_errors(summary),
        intro="Only the ratios in this file are meaningful: on this machine absolute step times vary by about +-30% "
        "between runs, so compare engines measured in the same run, never absolute times across files.",
        versions=("python", "torch", "transformers"),
        sections=[
            ("Config", config),
            ("Results", [
                *render_table(summary),
                "",
                "Final loss is the mean over ranks at the last step: equal values show every engine trained the same model.",
            ]),
            ("mics_hf communication per optimizer step", [comm_intro, "", *render_comm(summary)]),
            ("Goals", render_goals(summary)),
        ],
        payload={"config": dataclasses.asdict(opts), "model_parameters": params, "wall_s": wall_s, **summary},
    )


def main(argv: list[str] | None = None) -> int:
    opts, ns = parse_args(argv)
    print(
        f"bench_engine: {opts.nproc} ranks ({opts.nproc // opts.devices_per_node} emulated nodes x "
        f"{opts.devices_per_node}), engines {', '.join(engine_label(k) for k in opts.engines)}; "
        f"{opts.rounds} round(s) x ({opts.warmup} warmup + {opts.steps} timed steps), accum {opts.accum}",
        flush=True,
    )
    start = time.perf_counter()
    results, launch_error = launch(opts)
    wall_s = time.perf_counter() - start
    summary = summarise(opts, results)
    print("\n".join(["", *render_table(summary), ""]))
    if any(row.get("comm_per_step") for row in summary["rows"].values()):
        print("mics_hf communication per optimizer step (ring-model bytes sent, mean over ranks):")
        print("\n".join([*render_comm(summary), ""]))
    print("Goals (informational; only ratios from one run count, absolute times vary +-30% between runs):")
    print("\n".join(render_goals(summary)))
    errors = render_errors(summary)
    if launch_error:
        errors.append(f"launcher: {launch_error}")
    if errors:
        print("\nERRORS", *errors, sep="\n", file=sys.stderr)
    if ns.record:
        path = record(opts, summary, machine_info(), ns.out_dir, wall_s)
        print(f"\nrecorded {os.path.relpath(path, ROOT)} (and .json)")
    print(f"wall time {wall_s:.0f} s")
    # A goal miss is information, not a failure; an engine that crashed is.
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
