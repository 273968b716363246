"""An analytic alpha-beta model of one training step under MiCS, ZeRO-3 and FSDP2 HSDP, and a planner.

What it answers: for a model preset on N nodes of an AWS GPU instance type, which partition size fits, how long
a step takes, how much of the communication hides behind compute, and what that means in TFLOPS per GPU (8N
convention, ``flops.tflops_per_gpu``) and samples/s. ``plan`` picks the partition size; ``format_plan`` prints
the comparison. Nothing here touches a device: these are plain functions of datasheet numbers.

[Note: where the constants come from]
Every hardware number in ``CLUSTERS`` is a public specification (AWS instance pages, NVIDIA datasheets), named
beside it. On top of them, three "achievable fractions" and the NCCL latency constants, each stated once here,
the same for every cluster, taken from public measurements and NOT fitted to the paper's claims that
tests/test_costmodel.py checks:

- ``COMPUTE_EFFICIENCY = 0.52``: the fraction of dense tensor-core peak a large transformer step sustains.
  Megatron-LM (Narayanan et al., SC'21, Table 1) sustains 163 TFLOPS/GPU = 52% of A100 peak end to end for its
  530B and 1T GPT models with activation recomputation, the largest-GEMM regime of its table (44-52% overall).
  It is applied to 8N FLOPs (attention scores, s/(6h) = 2-3% more for the 100B/175B/BERT shapes here, are
  not counted, so compute comes out slightly fast). It also caps every predicted TFLOPS at 0.52 x peak: the paper's
  170/169 TFLOPS claims (54.5%) therefore test whether communication hides, not this constant.
- ``INTER_NODE_EFFICIENCY = 0.60``: NCCL bus bandwidth over EFA as a fraction of the NIC line rate at 3+ nodes.
  NVIDIA/nccl issue #527 (p4d, NCCL 2.9.9, all_reduce 1 GiB): 31.8 GB/s busbw on 3 nodes, 29.6 on 4, of
  50 GB/s (0.64, 0.59); NVIDIA/nccl issue #235 (p3dn): 6-8 GB/s on 8-32 nodes of 12.5 GB/s (0.48-0.64).
- ``INTRA_NODE_EFFICIENCY = 0.77``: the same issue #527, one p4d node: 230.8 GB/s busbw of 300 GB/s per
  direction over NVSwitch.
- Latencies: NCCL's own tuning model (src/graph/tuning.cc, ring / Simple protocol): 3.4 us per NVLink step,
  14.0 us per network step, 8.4 us base per collective.

[Note: the step model]
Per unit (one transformer layer; the root unit holds embeddings / LM head): the forward all-gathers its
parameters (2-byte), the backward all-gathers them again and reduce-scatters the gradients; on the last
micro-step the reduced shard is all-reduced across the replication group (hop 2), per unit, right after its
reduce-scatter (what both mics_hf and DeepSpeed's MiCS do). Collectives are rings. A flat all-gather over p
ranks costs p-1 steps, each at the latency of the slowest hop (the network when the ring spans nodes; the
paper's alpha-beta model: NCCL's pipelined rings pay the network latency only once per node boundary, which
would shrink the latency gap between flat and hierarchical), and puts (p-1)/p of the message on every node's
NIC. MiCS's hierarchical all-gather (p > k) is an inter-node stage among the p/k same-local-rank ranks, k of them
in parallel sharing the NIC ((p-k)/p of the message per node), then an intra-node stage over NVLink. The
gradient reduce-scatter is flat for every strategy (the paper's implementation had no hierarchical one).
ZeRO-3 is p = N, flat, no hop 2. HSDP (FSDP2 2-D mesh) is MiCS's partition with flat collectives.

Overlap: one communication stream per rank, so a unit's collectives add up; they run while the neighbouring
unit computes. A unit's forward costs max(compute, next unit's all-gather); its backward max(compute,
previous unit's all-gather + this unit's reduce-scatter [+ hop 2]). Exposed: the root's all-gather and the
first unit's, the last reduce-scatter and hop 2 of the last unit and the root. Hop 2 thus overlaps only while
the NIC has room behind the backward compute. Compute per unit: 2 x params x tokens forward, 6 x backward
(recomputed forward + backward: the paper's 8N with activation checkpointing) at COMPUTE_EFFICIENCY x peak.
With s micro-steps, hop 1 runs every micro-step, hop 2 once. The optimizer step (a memory-bound pass over the
local shard, tens of ms at these sizes) and data loading are not modelled.

Message dtypes: parameters 2 bytes; gradients ``reduce_bytes`` and hop 2 ``hop2_bytes``, both 2 by default, an
assumption: the paper's system is built on DeepSpeed, which communicates gradients in the training dtype unless
told otherwise, and the paper does not state hop 2's dtype. mics_hf's default ``reduce_dtype=None`` reduce-scatters
in the compute dtype (2 bytes under bf16) and all-reduces the fp32 shard gradient (``hop2_bytes=4`` models
that); ``reduce_dtype="fp32"`` is ``reduce_bytes=4`` (it also doubles the reduce-scatter buffer in the memory estimate).
"""

from __future__ import annotations

import dataclasses
import functools
import types
from dataclasses import dataclass
from typing import Literal, Mapping

from .flops import PEAK_TFLOPS, model_state_bytes_per_rank, tflops_per_gpu
from .presets import ModelPreset, count_parameters, get_preset
from .profiles import ImplementationProfile, build_trace, collective_functions, get_profile, simulate_step

__all__ = [
    "BASE_LATENCY_S", "CLUSTERS", "COMPUTE_EFFICIENCY", "INTER_NODE_EFFICIENCY", "INTRA_NODE_EFFICIENCY",
    "MEMORY_RESERVE_FRACTION", "NET_STEP_LATENCY_S", "NVLINK_STEP_LATENCY_S", "STRATEGIES", "Cluster",
    "CommBreakdown", "MemoryEstimate", "PlanResult", "Prediction", "WeakScaling", "all_gather_time",
    "all_reduce_time", "format_plan", "inter_node_volume_factor", "memory_per_rank", "plan", "predict",
    "unit_parameters", "valid_partition_sizes", "weak_scaling",
]

Strategy = Literal["mics", "zero3", "hsdp"]
STRATEGIES: tuple[str, ...] = ("mics", "zero3", "hsdp")

GIB = 2**30
GBPS = 1e9 / 8  # bytes/s in one Gbit/s

COMPUTE_EFFICIENCY = 0.52  # Megatron-LM SC'21 Table 1 (see the module docstring)
INTER_NODE_EFFICIENCY = 0.60  # NCCL over EFA, NVIDIA/nccl #527 and #235 (see the module docstring)
INTRA_NODE_EFFICIENCY = 0.77  # NCCL over NVSwitch, NVIDIA/nccl #527 (see the module docstring)
BASE_LATENCY_S = 8.4e-6  # NCCL tuning.cc baseLat, ring / Simple: paid once per collective
NVLINK_STEP_LATENCY_S = 3.4e-6  # NCCL tuning.cc hwLat[NVLINK][RING][SIMPLE]
NET_STEP_LATENCY_S = 14.0e-6  # NCCL tuning.cc hwLat[NET][RING][SIMPLE]
# Kept free for the CUDA context, cuBLAS / NCCL workspaces and allocator fragmentation. An assumption (no public
# measurement covers every allocator and NCCL setting), stated once, not fitted.
MEMORY_RESERVE_FRACTION = 0.10
PARAM_BYTES = 2  # parameters are gathered in the 2-byte compute dtype (fp16 on V100, bf16 otherwise)


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """One AWS instance type as the model sees it: k GPUs joined by NVLink, nodes joined by EFA.

    Bandwidths are bytes/s in one direction at line rate (the efficiency fields apply on top): intra-node
    per GPU, inter-node per node (all its NICs together). Latencies are per ring step.

    The last five fields default to the module constants (NCCL on AWS) and exist so that a cluster with another
    transport can be described, e.g. ``mics_hf.emulation.scale``'s emulated cluster (gloo over shaped links):
    ``reduce_scatter_volume`` is the bytes a reduce-scatter moves relative to the ring ideal (1 for NCCL; 2 for
    gloo, whose reduce-scatter is an all-reduce, see ENVIRONMENT notes in the README).
    """

    name: str
    gpu: str
    gpus_per_node: int
    dtype: str
    peak_tflops: float
    gpu_memory_bytes: float
    intra_node_bandwidth: float
    intra_node_latency_s: float
    inter_node_bandwidth: float
    inter_node_latency_s: float
    compute_efficiency: float = COMPUTE_EFFICIENCY
    inter_node_efficiency: float = INTER_NODE_EFFICIENCY
    intra_node_efficiency: float = INTRA_NODE_EFFICIENCY
    base_latency_s: float = BASE_LATENCY_S
    reduce_scatter_volume: float = 1.0


_CLUSTER_LIST: tuple[Cluster, ...] = (
    # AWS p3dn page: 8x V100 32 GB, NVLink, 100 Gbps networking (EFA). V100 datasheet: 125 TFLOPS fp16 tensor
    # (no bf16), 32 GB HBM2, NVLink 300 GB/s (both directions together, so 150 GB/s each way).
    Cluster(name="p3dn.24xlarge", gpu="V100-SXM2-32GB", gpus_per_node=8, dtype="fp16",
            peak_tflops=PEAK_TFLOPS["v100"]["fp16"], gpu_memory_bytes=32 * GIB,
            intra_node_bandwidth=300e9 / 2, intra_node_latency_s=NVLINK_STEP_LATENCY_S,
            inter_node_bandwidth=100 * GBPS, inter_node_latency_s=NET_STEP_LATENCY_S),
    # AWS p4d page: 8x A100 40 GB, 600 GB/s NVSwitch GPU interconnect, 400 Gbps EFA (4x 100 Gbps). A100
    # datasheet: 312 TFLOPS bf16/fp16 dense; 600 GB/s NVLink is both directions together.
    Cluster(name="p4d.24xlarge", gpu="A100-SXM4-40GB", gpus_per_node=8, dtype="bf16",
            peak_tflops=PEAK_TFLOPS["a100"]["bf16"], gpu_memory_bytes=40 * GIB,
            intra_node_bandwidth=600e9 / 2, intra_node_latency_s=NVLINK_STEP_LATENCY_S,
            inter_node_bandwidth=400 * GBPS, inter_node_latency_s=NET_STEP_LATENCY_S),
    # AWS p4de page: as p4d with 8x A100 80 GB (HBM2e); same NVSwitch and 400 Gbps EFA.
    Cluster(name="p4de.24xlarge", gpu="A100-SXM4-80GB", gpus_per_node=8, dtype="bf16",
            peak_tflops=PEAK_TFLOPS["a100"]["bf16"], gpu_memory_bytes=80 * GIB,
            intra_node_bandwidth=600e9 / 2, intra_node_latency_s=NVLINK_STEP_LATENCY_S,
            inter_node_bandwidth=400 * GBPS, inter_node_latency_s=NET_STEP_LATENCY_S),
    # AWS p5 page: 8x H100 80 GB, 900 GB/s NVSwitch, 3200 Gbps EFAv2. H100 SXM datasheet: 989 TFLOPS bf16 dense
    # (1,979 with sparsity), 80 GB HBM3, NVLink 900 GB/s both directions together.
    Cluster(name="p5.48xlarge", gpu="H100-SXM5-80GB", gpus_per_node=8, dtype="bf16",
            peak_tflops=PEAK_TFLOPS["h100"]["bf16"], gpu_memory_bytes=80 * GIB,
            intra_node_bandwidth=900e9 / 2, intra_node_latency_s=NVLINK_STEP_LATENCY_S,
            inter_node_bandwidth=3200 * GBPS, inter_node_latency_s=NET_STEP_LATENCY_S),
)

CLUSTERS: Mapping[str, Cluster] = types.MappingProxyType({c.name: c for c in _CLUSTER_LIST})
"""The instance types the model knows, by AWS name (read-only)."""


# ---- input checks ---------------------------------------------------------------------------------------------
def _require_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")
    return value


def _get_cluster(cluster: str | Cluster) -> Cluster:
    if isinstance(cluster, Cluster):
        return cluster
    short = {name.split(".")[0]: name for name in CLUSTERS}  # "p4de" for "p4de.24xlarge"
    cluster = short.get(cluster, cluster)
    if cluster not in CLUSTERS:
        raise ValueError(f"unknown cluster {cluster!r}; use one of {sorted(CLUSTERS)} (AWS instance type names)")
    return CLUSTERS[cluster]


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; use one of {list(STRATEGIES)} (ZeRO-3 is 'zero3')")


def _resolve_preset(model: str | ModelPreset, seq: int | None) -> ModelPreset:
    if isinstance(model, ModelPreset):
        preset = model
    elif isinstance(model, str):
        preset = get_preset(model)
    else:
        raise ValueError(f"model={model!r}: pass a preset name (e.g. 'gpt-100b') or a presets.ModelPreset")
    if seq is not None and seq != preset.seq:
        preset = dataclasses.replace(preset, seq=_require_int("seq", seq), note=f"{preset.note}; seq={seq}")
    return preset


def valid_partition_sizes(num_gpus: int, gpus_per_node: int) -> tuple[int, ...]:
    """Partition sizes MiCS allows: divisors of the world that divide a node or are whole nodes."""
    return tuple(
        d for d in range(1, num_gpus + 1)
        if num_gpus % d == 0 and ((d <= gpus_per_node and gpus_per_node % d == 0) or d % gpus_per_node == 0)
    )


def _check_partition_size(p: int, num_gpus: int, k: int) -> int:
    _require_int("partition_size", p)
    valid = valid_partition_sizes(num_gpus, k)
    if p not in valid:
        raise ValueError(
            f"partition_size={p} does not work on {num_gpus} GPUs with {k} per node: a partition group must "
            f"divide the world and fit inside one node or cover whole nodes; use one of {list(valid)}"
        )
    return p


# ---- model shape ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Shape:
    preset: ModelPreset
    unit_params: int  # one transformer layer
    root_params: int  # embeddings, final norm, LM / MLM head (tied weights once)

    @property
    def n_params(self) -> int:
        return self.root_params + self.preset.layers * self.unit_params


@functools.lru_cache(maxsize=None)
def _shape(preset: ModelPreset) -> _Shape:
    """Per-layer and root parameter counts, from count_parameters on 1- and 2-layer copies (layers are equal)."""
    one = count_parameters(dataclasses.replace(preset, layers=1))
    two = count_parameters(dataclasses.replace(preset, layers=2))
    return _Shape(preset, unit_params=two - one, root_params=one - (two - one))


def unit_parameters(model: str | ModelPreset) -> tuple[int, int]:
    """(parameters of one transformer layer, parameters of the root unit) of a preset, as the model counts them."""
    shape = _shape(_resolve_preset(model, None))
    return shape.unit_params, shape.root_params


# ---- collective primitives ------------------------------------------------------------------------------------
def inter_node_volume_factor(p: int, gpus_per_node: int, *, hierarchical: bool) -> float:
    """Fraction of an all-gathered message that crosses each node's NIC: (p-1)/p flat, (p-k)/p hierarchical."""
    k = gpus_per_node
    if p <= k:
        return 0.0
    return (p - k) / p if hierarchical else (p - 1) / p


def _intra_ring(message_bytes: float, ranks: int, c: Cluster) -> float:
    """Ring all-gather / reduce-scatter of ``message_bytes`` among ``ranks`` GPUs of one node."""
    if ranks <= 1:
        return 0.0
    bandwidth = c.intra_node_bandwidth * c.intra_node_efficiency
    return c.base_latency_s + (ranks - 1) * c.intra_node_latency_s + (ranks - 1) / ranks * message_bytes / bandwidth


def all_gather_time(message_bytes: float, p: int, cluster: str | Cluster, *, hierarchical: bool = False) -> float:
    """Seconds for an all-gather whose output is ``message_bytes``, over p consecutive ranks (also the cost of
    the flat reduce-scatter of the same message).

    Flat over m = p/k > 1 nodes: p-1 steps at the network latency; each node's NIC carries (p-1)/p of the
    message, each GPU's NVLink the same (the slower of the two bounds). Hierarchical: an inter-node ring among
    m ranks ((p-k)/p of the message per NIC, k rings in parallel), then an intra-node ring over NVLink.
    """
    c = _get_cluster(cluster)
    k = c.gpus_per_node
    if p <= k:
        return _intra_ring(message_bytes, p, c)
    if p % k != 0:
        raise ValueError(f"p={p} spans nodes but is not a multiple of gpus_per_node={k}; use a multiple of {k}")
    nic = c.inter_node_bandwidth * c.inter_node_efficiency
    factor = inter_node_volume_factor(p, k, hierarchical=hierarchical)
    if not hierarchical:
        nvlink = c.intra_node_bandwidth * c.intra_node_efficiency
        transfer = max(factor * message_bytes / nic, (p - 1) / p * message_bytes / nvlink)
        return c.base_latency_s + (p - 1) * c.inter_node_latency_s + transfer
    m = p // k
    inter = c.base_latency_s + (m - 1) * c.inter_node_latency_s + factor * message_bytes / nic
    return inter + _intra_ring(message_bytes, k, c)


def all_reduce_time(bytes_per_rank: float, r: int, groups_per_node: int, cluster: str | Cluster,
                    *, spans_nodes: bool) -> float:
    """Seconds for ring all-reduces of ``bytes_per_rank`` over r ranks, ``groups_per_node`` such groups in
    parallel sharing each node's NIC (hop 2: min(p, k) replication groups meet on every node).

    Each rank sends 2(r-1)/r of its buffer; across nodes the NIC carries that for every group on the node.
    """
    if r <= 1:
        return 0.0
    c = _get_cluster(cluster)
    volume = 2 * (r - 1) / r * bytes_per_rank
    nvlink = volume / (c.intra_node_bandwidth * c.intra_node_efficiency)
    if not spans_nodes:
        return c.base_latency_s + 2 * (r - 1) * c.intra_node_latency_s + nvlink
    nic = groups_per_node * volume / (c.inter_node_bandwidth * c.inter_node_efficiency)
    return c.base_latency_s + 2 * (r - 1) * c.inter_node_latency_s + max(nic, nvlink)


# ---- memory ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class MemoryEstimate:
    """Bytes per rank: model states (16 B/param / p), gathered buffers, activations, and the reserve."""

    model_states: float
    buffers: float
    activations: float
    reserve: float
    capacity: float

    @property
    def total(self) -> float:
        return self.model_states + self.buffers + self.activations + self.reserve

    @property
    def free(self) -> float:
        """Bytes left after everything (negative: does not fit)."""
        return self.capacity - self.total

    @property
    def fits(self) -> bool:
        return self.free >= 0


def _memory(shape: _Shape, c: Cluster, p: int, micro_batch: int, reduce_bytes: int) -> MemoryEstimate:
    m = shape.preset
    b, s, h = micro_batch, m.seq, m.hidden
    # Gathered: the running unit and the prefetched one (2-byte), one unit's full gradient in the compute dtype
    # and its reduce-scatter input; the root unit stays gathered from forward to backward.
    buffers = shape.unit_params * (2 * PARAM_BYTES + PARAM_BYTES + reduce_bytes) + shape.root_params * PARAM_BYTES
    # Activation checkpointing keeps each layer's 2-byte input; the layer being recomputed holds its full set,
    # s b h (34 + 5 a s / h) bytes (Korthikanti et al. 2022, eq. 1, 16-bit, FFN 4h, no tensor parallelism);
    # the logits take 2 bytes plus an fp32 copy and its fp32 gradient.
    activations = b * s * h * (2 * m.layers + 34 + 5 * m.heads * s / h) + b * s * m.vocab * (2 + 4 + 4)
    return MemoryEstimate(
        model_states=model_state_bytes_per_rank(shape.n_params, p),
        buffers=buffers,
        activations=activations,
        reserve=MEMORY_RESERVE_FRACTION * c.gpu_memory_bytes,
        capacity=c.gpu_memory_bytes,
    )


def memory_per_rank(model: str | ModelPreset, cluster: str | Cluster, partition_size: int, *,
                    micro_batch: int | None = None, seq: int | None = None, reduce_bytes: int = 2) -> MemoryEstimate:
    """Estimated per-rank memory at partition size p (ZeRO-3: p = N; DDP: p = 1)."""
    shape = _shape(_resolve_preset(model, seq))
    b = shape.preset.micro_batch if micro_batch is None else _require_int("micro_batch", micro_batch)
    return _memory(shape, _get_cluster(cluster), _require_int("partition_size", partition_size), b, reduce_bytes)


def _smallest_fitting_p(shape: _Shape, c: Cluster, num_gpus: int, micro_batch: int, reduce_bytes: int) -> int:
    for p in valid_partition_sizes(num_gpus, c.gpus_per_node):
        if _memory(shape, c, p, micro_batch, reduce_bytes).fits:
            return p
    worst = _memory(shape, c, num_gpus, micro_batch, reduce_bytes)
    raise ValueError(
        f"{shape.preset.name} ({shape.n_params / 1e9:.1f}B params) does not fit on {num_gpus} GPUs of "
        f"{c.name} at micro_batch={micro_batch} even at p={num_gpus} (needs {worst.total / GIB:.1f} of "
        f"{c.gpu_memory_bytes / GIB:.0f} GiB per rank); use more nodes, a smaller micro_batch, or a GPU with more "
        "memory (p4de.24xlarge / p5.48xlarge have 80 GiB)"
    )


def _max_micro_batch(shape: _Shape, c: Cluster, p: int, reduce_bytes: int, limit: int = 1024) -> int:
    if not _memory(shape, c, p, 1, reduce_bytes).fits:
        raise ValueError(
            f"{shape.preset.name} does not fit on {c.name} at p={p} even with micro_batch=1; use a larger "
            "partition_size or more memory per GPU"
        )
    b = 1
    while b < limit and _memory(shape, c, p, b + 1, reduce_bytes).fits:
        b += 1
    return b


# ---- the step -------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class CommBreakdown:
    """Seconds of communication per optimizer step, by collective, before overlap."""

    forward_all_gather_s: float
    backward_all_gather_s: float
    reduce_scatter_s: float
    replica_all_reduce_s: float

    @property
    def total_s(self) -> float:
        gathers = self.forward_all_gather_s + self.backward_all_gather_s
        return gathers + self.reduce_scatter_s + self.replica_all_reduce_s


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """One predicted optimizer step. ``overlap``: fraction of communication time hidden behind compute."""

    model: str
    cluster: str
    strategy: str
    nodes: int
    num_gpus: int
    gpus_per_node: int
    partition_size: int
    replicas: int
    hierarchical: bool
    micro_batch: int
    grad_accum: int
    seq: int
    n_params: int
    step_time_s: float
    compute_time_s: float
    exposed_comm_s: float
    overlap: float
    comm: CommBreakdown
    tflops_per_gpu: float
    samples_per_s: float
    memory: MemoryEstimate
    profile: str = "mics_hf"

    @property
    def fits(self) -> bool:
        return self.memory.fits


def _resolve_batch(micro_batch: int | Literal["max"] | None, shape: _Shape, c: Cluster, p: int | None,
                   num_gpus: int, strategy: str, reduce_bytes: int) -> tuple[int, int]:
    """(partition size, micro-batch); "max" = the largest micro-batch that fits at the (smallest fitting) p."""
    if micro_batch is not None and micro_batch != "max":
        _require_int("micro_batch", micro_batch)
    fixed_b = shape.preset.micro_batch if micro_batch is None else micro_batch
    if strategy == "zero3":
        if p is not None and p != num_gpus:
            raise ValueError(f"strategy='zero3' partitions over all {num_gpus} GPUs; drop partition_size={p} "
                             "(or use strategy='mics' for a smaller partition group)")
        p = num_gpus
    elif p is None:
        p = _smallest_fitting_p(shape, c, num_gpus, 1 if fixed_b == "max" else fixed_b, reduce_bytes)
    _check_partition_size(p, num_gpus, c.gpus_per_node)
    b = _max_micro_batch(shape, c, p, reduce_bytes) if fixed_b == "max" else fixed_b
    return p, b


def predict(model: str | ModelPreset, cluster: str | Cluster, nodes: int, *, strategy: Strategy = "mics",
            partition_size: int | None = None, micro_batch: int | Literal["max"] | None = None,
            grad_accum: int = 1, seq: int | None = None, reduce_bytes: int = 2,
            hop2_bytes: int = 2, hierarchical_reduce: bool = False, param_bytes: int = PARAM_BYTES,
            profile: str = "mics_hf") -> Prediction:
    """Predict one optimizer step of ``model`` on ``nodes`` instances of ``cluster`` under ``strategy``.

    partition_size: MiCS / HSDP partition group (default: the smallest that fits, as ``plan`` picks); ZeRO-3
    always uses N. micro_batch: samples per GPU per micro-step (default the preset's; "max": the largest that
    fits at that p). grad_accum: micro-steps per optimizer step. hierarchical_reduce: MiCS's gradient
    reduce-scatter is hierarchical too when its all-gather is (mics_hf does this; the paper's system did not,
    hence the default False). param_bytes: bytes per gathered parameter (2: fp16/bf16; the emulation gathers
    fp32). A configuration that does not fit in memory is still predicted; check ``.fits``.

    profile: the implementation whose schedule is modelled (``mics_hf.planning.profiles.PROFILES``):
    "mics_hf" (default; per-unit, fully overlapped, this module's model) or a DeepSpeed ZeRO-3 profile
    ("deepspeed-0.5.6", "deepspeed-improved"), which needs strategy="zero3" and is simulated per tensor.
    """
    _check_strategy(strategy)
    chosen = get_profile(profile)
    c = _get_cluster(cluster)
    nodes = _require_int("nodes", nodes)
    grad_accum = _require_int("grad_accum", grad_accum)
    for name, value in (("reduce_bytes", reduce_bytes), ("hop2_bytes", hop2_bytes), ("param_bytes", param_bytes)):
        if value not in (2, 4):
            raise ValueError(f"{name}={value!r}: use 2 (fp16/bf16) or 4 (fp32)")
    shape = _shape(_resolve_preset(model, seq))
    m, k = shape.preset, c.gpus_per_node
    n = nodes * k
    p, b = _resolve_batch(micro_batch, shape, c, partition_size, n, strategy, reduce_bytes)
    r = n // p
    hierarchical = strategy == "mics" and p > k
    if not chosen.analytic:
        if strategy != "zero3":
            raise ValueError(f"profile={chosen.name!r} describes DeepSpeed's ZeRO-3, which partitions over all "
                             f"ranks; use strategy='zero3' with it (or profile='mics_hf' for strategy={strategy!r})")
        return _predict_profile(shape, c, nodes, b, grad_accum, chosen)

    speed = c.compute_efficiency * c.peak_tflops * 1e12
    tokens = b * m.seq
    c_f, c_b = 2 * shape.unit_params * tokens / speed, 6 * shape.unit_params * tokens / speed
    root_f, root_b = 2 * shape.root_params * tokens / speed, 6 * shape.root_params * tokens / speed

    def gather(params: int) -> float:
        return all_gather_time(params * param_bytes, p, c, hierarchical=hierarchical)

    def reduce(params: int) -> float:
        return c.reduce_scatter_volume * all_gather_time(params * reduce_bytes, p, c,
                                                         hierarchical=hierarchical and hierarchical_reduce)

    def hop2(params: int) -> float:
        return all_reduce_time(params * hop2_bytes / p, r, min(p, k), c, spans_nodes=n > k)

    ag, rs, ar = gather(shape.unit_params), reduce(shape.unit_params), hop2(shape.unit_params)
    ag_root, rs_root, ar_root = gather(shape.root_params), reduce(shape.root_params), hop2(shape.root_params)

    def micro_step(sync: bool) -> float:
        a, a_root = (ar, ar_root) if sync else (0.0, 0.0)
        forward = ag_root + ag + (m.layers - 1) * max(c_f, ag) + c_f + root_f
        backward = (max(root_b, ag) + (m.layers - 1) * max(c_b, ag + rs + a) + max(c_b, rs + a)
                    + rs + a + rs_root + a_root)
        return forward + backward

    step = (grad_accum - 1) * micro_step(False) + micro_step(True)
    compute = grad_accum * (m.layers * (c_f + c_b) + root_f + root_b)
    comm = CommBreakdown(
        forward_all_gather_s=grad_accum * (ag_root + m.layers * ag),
        backward_all_gather_s=grad_accum * m.layers * ag,
        reduce_scatter_s=grad_accum * (m.layers * rs + rs_root),
        replica_all_reduce_s=m.layers * ar + ar_root,
    )
    exposed = step - compute
    samples = n * b * grad_accum
    return Prediction(
        model=m.name, cluster=c.name, strategy=strategy, nodes=nodes, num_gpus=n, gpus_per_node=k,
        partition_size=p, replicas=r, hierarchical=hierarchical, micro_batch=b, grad_accum=grad_accum,
        seq=m.seq, n_params=shape.n_params, step_time_s=step, compute_time_s=compute, exposed_comm_s=exposed,
        overlap=1.0 - exposed / comm.total_s if comm.total_s > 0 else 1.0, comm=comm,
        tflops_per_gpu=tflops_per_gpu(shape.n_params, samples * m.seq, step, n),
        samples_per_s=samples / step,
        memory=_memory(shape, c, p, b, reduce_bytes),
    )


def _predict_profile(shape: _Shape, c: Cluster, nodes: int, b: int, grad_accum: int,
                     profile: ImplementationProfile) -> Prediction:
    """ZeRO-3 (p = N) under a simulated implementation profile (``profiles.simulate_step``), on the EFA model."""
    m, k = shape.preset, c.gpus_per_node
    n = nodes * k
    numels, visits = build_trace(m.family, m.hidden, m.layers, m.ffn, m.vocab, m.seq, tokens=b * m.seq,
                                 flops_per_s=c.compute_efficiency * c.peak_tflops * 1e12)
    gather_s, reduce_s = collective_functions(
        ranks=n, gpus_per_node=k, instance=c.name, nic_bytes_per_s=c.inter_node_bandwidth,
        nvlink_bytes_per_s=c.intra_node_bandwidth * c.intra_node_efficiency, wire_bytes=profile.wire_bytes)
    sim = simulate_step(profile, numels, visits, gather_s=gather_s, reduce_s=reduce_s, ranks=n)
    # the persistent tensors are gathered again once per optimizer step (v0.6.0) or per micro-step (v0.5.6)
    regather = 0.0 if profile.release_persistent_each_backward else sim.persistent_regather_s
    step, compute = grad_accum * (sim.step_s - regather) + regather, grad_accum * sim.compute_s
    comm = CommBreakdown(forward_all_gather_s=grad_accum * sim.forward_gather_busy_s,
                         backward_all_gather_s=grad_accum * (sim.gather_busy_s - sim.forward_gather_busy_s)
                         + grad_accum * (sim.persistent_regather_s - regather) + regather,
                         reduce_scatter_s=grad_accum * sim.reduce_busy_s, replica_all_reduce_s=0.0)
    exposed = step - compute
    samples = n * b * grad_accum
    return Prediction(
        model=m.name, cluster=c.name, strategy="zero3", nodes=nodes, num_gpus=n, gpus_per_node=k,
        partition_size=n, replicas=1, hierarchical=False, micro_batch=b, grad_accum=grad_accum, seq=m.seq,
        n_params=shape.n_params, step_time_s=step, compute_time_s=compute, exposed_comm_s=exposed,
        overlap=max(0.0, 1.0 - exposed / comm.total_s) if comm.total_s > 0 else 1.0, comm=comm,
        tflops_per_gpu=tflops_per_gpu(shape.n_params, samples * m.seq, step, n),
        samples_per_s=samples / step, memory=_memory(shape, c, n, b, 2), profile=profile.name,
    )


# ---- the planner lives in planner.py; these names stay importable from here ----------------------------------
_PLANNER_NAMES = ("PlanResult", "WeakScaling", "format_plan", "plan", "weak_scaling")


def __getattr__(name: str) -> object:
    if name in _PLANNER_NAMES:
        from . import planner

        return getattr(planner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
