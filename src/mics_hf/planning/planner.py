"""The planner behind `mics-hf plan`: pick the partition size and micro-batch, predict MiCS, ZeRO-3 and FSDP2
HSDP side by side (and optionally ZeRO-3 as a given implementation ran it), and weak scaling.

The predictions come from ``mics_hf.planning.costmodel.predict`` (its docstring states the model);
``baseline`` names an implementation profile of ``mics_hf.planning.profiles`` (e.g. "deepspeed-0.5.6", the
ZeRO-3 the MiCS paper compared against).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

from .costmodel import GIB, Cluster, MemoryEstimate, Prediction, Strategy, _get_cluster, _require_int, predict
from .presets import ModelPreset
from .profiles import PROFILES, get_profile
from .validation import profile_errors

__all__ = ["PlanResult", "WeakScaling", "format_plan", "plan", "weak_scaling"]


@dataclass(frozen=True, kw_only=True)
class WeakScaling:
    """Predictions at each node count (same per-GPU batch) and throughput per GPU relative to the first."""

    nodes: tuple[int, ...]
    predictions: tuple[Prediction, ...]
    efficiency: tuple[float, ...]


def weak_scaling(model: str | ModelPreset, cluster: str | Cluster, nodes_list: Sequence[int],
                 strategy: Strategy = "mics", **kwargs: object) -> WeakScaling:
    """Weak-scaling efficiency: samples/s per GPU at each node count over that at the smallest one.

    The partition size and micro-batch are resolved once, at the smallest node count, and kept (the paper
    scales by adding partition groups at a fixed per-GPU batch). ``kwargs`` go to ``predict``.
    """
    nodes_sorted = tuple(sorted(_require_int("nodes", x) for x in nodes_list))
    if len(nodes_sorted) < 2 or len(set(nodes_sorted)) != len(nodes_sorted):
        raise ValueError(f"nodes_list={list(nodes_list)!r}: give at least two different node counts")
    first = predict(model, cluster, nodes_sorted[0], strategy=strategy, **kwargs)  # type: ignore[arg-type]
    fixed = dict(kwargs, micro_batch=first.micro_batch)
    if strategy != "zero3":
        fixed["partition_size"] = first.partition_size
    preds = (first,) + tuple(
        predict(model, cluster, x, strategy=strategy, **fixed) for x in nodes_sorted[1:]  # type: ignore[arg-type]
    )
    base = first.samples_per_s / first.num_gpus
    return WeakScaling(nodes=nodes_sorted, predictions=preds,
                       efficiency=tuple(x.samples_per_s / x.num_gpus / base for x in preds))


@dataclass(frozen=True, kw_only=True)
class PlanResult:
    """The planner's choice of partition size, the memory it leaves, and the three strategies side by side."""

    model: str
    n_params: int
    cluster: Cluster
    nodes: int
    num_gpus: int
    partition_size: int
    micro_batch: int
    grad_accum: int
    seq: int
    memory: MemoryEstimate
    predictions: Mapping[str, Prediction]
    micro_batch_rule: str = "given"
    baseline: str | None = None


def plan(model: str | ModelPreset, cluster: str | Cluster, nodes: int, *,
         micro_batch: int | Literal["max"] | None = None, grad_accum: int = 1, seq: int | None = None,
         reduce_bytes: int = 2, hop2_bytes: int = 2, baseline: str | None = None) -> PlanResult:
    """Pick the smallest partition size whose model states (16 B/param / p) plus buffers, activations and the
    reserve fit in GPU memory, and predict MiCS, ZeRO-3 and HSDP at it (ZeRO-3 at p = N).

    micro_batch: None = the preset's; "max" = choose p at micro-batch 1, then the largest micro-batch that fits
    at that p (what `mics-hf plan` does unless told otherwise). baseline: also predict ZeRO-3 as that
    implementation profile ran it (``profiles.PROFILES``, e.g. "deepspeed-0.5.6"), at the same micro-batch,
    under key "zero3:<profile>".
    """
    if baseline is not None:
        if baseline not in PROFILES or get_profile(baseline).analytic:
            choices = [name for name, prof in PROFILES.items() if not prof.analytic]
            raise ValueError(f"baseline={baseline!r} is not a ZeRO-3 implementation profile; use one of {choices} "
                             "(the mics_hf profile is already the ZeRO-3 row)")
    rule = "max" if micro_batch == "max" else ("preset" if micro_batch is None else "given")
    common = dict(micro_batch=micro_batch, grad_accum=grad_accum, seq=seq, reduce_bytes=reduce_bytes,
                  hop2_bytes=hop2_bytes)
    mics = predict(model, cluster, nodes, strategy="mics", **common)  # type: ignore[arg-type]
    fixed = dict(common, micro_batch=mics.micro_batch)
    preds = {
        "mics": mics,
        "zero3": predict(model, cluster, nodes, strategy="zero3", **fixed),  # type: ignore[arg-type]
        "hsdp": predict(model, cluster, nodes, strategy="hsdp", partition_size=mics.partition_size,
                        **fixed),  # type: ignore[arg-type]
    }
    if baseline is not None:
        preds[f"zero3:{baseline}"] = predict(model, cluster, nodes, strategy="zero3", profile=baseline,
                                             **fixed)  # type: ignore[arg-type]
    return PlanResult(
        model=mics.model, n_params=mics.n_params, cluster=_get_cluster(cluster), nodes=nodes, num_gpus=mics.num_gpus,
        partition_size=mics.partition_size, micro_batch=mics.micro_batch, grad_accum=grad_accum, seq=mics.seq,
        memory=mics.memory, predictions=types.MappingProxyType(preds), micro_batch_rule=rule, baseline=baseline,
    )


_LABELS = {"mics": "MiCS", "zero3": "ZeRO-3", "hsdp": "FSDP2 HSDP"}


def _label(key: str) -> str:
    return _LABELS[key.partition(":")[0]]  # "zero3:deepspeed-0.5.6" -> ZeRO-3 (the profile has its own column)


def _gather_label(x: Prediction) -> str:
    if x.partition_size <= x.gpus_per_node:
        return "intra-node"
    return "hierarchical" if x.hierarchical else "flat"


def format_plan(result: PlanResult) -> str:
    """A readable report of ``plan``'s result: the choice, the memory left, and a comparison table."""
    c = result.cluster
    mem = result.memory
    p = result.partition_size
    span = f"{p // c.gpus_per_node} nodes" if p > c.gpus_per_node else ("1 node" if p == c.gpus_per_node
                                                                         else f"{p} of {c.gpus_per_node} GPUs")
    lines = [
        f"plan: {result.model} ({result.n_params / 1e9:.2f}B params) on {result.nodes} x {c.name} "
        f"({result.num_gpus} GPUs, {c.gpus_per_node}x {c.gpu}), seq {result.seq}, micro-batch "
        f"{result.micro_batch}, grad-accum {result.grad_accum}",
    ]
    if result.micro_batch_rule == "max":
        lines.append(f"micro-batch {result.micro_batch}: the largest that fits at p = {p} (choose another with "
                     "--micro-batch N)")
    lines += [
        f"partition size p = {p} ({span}), replication groups of r = {result.num_gpus // p}",
        f"memory per rank (MiCS): states {mem.model_states / GIB:.1f} + buffers {mem.buffers / GIB:.1f} + "
        f"activations {mem.activations / GIB:.1f} + reserve {mem.reserve / GIB:.1f} = {mem.total / GIB:.1f} of "
        f"{mem.capacity / GIB:.0f} GiB, {mem.free / GIB:.1f} GiB left",
        "",
        "| strategy | profile | p | all-gather | step (s) | TFLOPS/GPU (8N) | samples/s | comm exposed (s) | overlap "
        "| memory/rank (GiB) | fits |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for key, x in result.predictions.items():
        lines.append(
            f"| {_label(key)} | {x.profile} | {x.partition_size} | {_gather_label(x)} | {x.step_time_s:.3f} | "
            f"{x.tflops_per_gpu:.1f} | {x.samples_per_s:.1f} | {x.exposed_comm_s:.3f} | {x.overlap:.0%} | "
            f"{x.memory.total / GIB:.1f} | {'yes' if x.fits else 'NO'} |"
        )
    mics, zero3 = result.predictions["mics"], result.predictions["zero3"]
    lines.append("")
    lines.append(f"MiCS / ZeRO-3 throughput: {mics.samples_per_s / zero3.samples_per_s:.2f}x "
                 f"(analytic model, see mics_hf.planning.costmodel's docstring for its assumptions)")
    if result.baseline is not None:
        base = result.predictions[f"zero3:{result.baseline}"]
        lines.append(f"MiCS / ZeRO-3 ({result.baseline}) throughput: {mics.samples_per_s / base.samples_per_s:.2f}x "
                     f"(simulated per tensor on the EFA model, see mics_hf.planning.profiles)")
        # how far this profile was from its implementation on real hardware, so the ratio is read with its error
        checks = "; ".join(f"{point.label.split(',')[0]} {error:+.1%}" for point, error in
                           profile_errors(result.baseline))
        lines.append(f"  {result.baseline} against DeepSpeed PR 1453's measurements on 64 A100 (TFLOPS/GPU, "
                     f"+ = predicted faster than measured): {checks}; see benchmarks/costmodel_2026-12-06_2.md")
    return "\n".join(lines)
