"""The scaling rule that makes a few CPU processes on shaped links behave like GPUs on a real instance type.

[Note: emulation scaling rule]
A real instance (a ``costmodel.CLUSTERS`` entry, e.g. p3dn.24xlarge) has an achievable compute rate per GPU
R = compute_efficiency x peak and an achievable inter-node goodput per node B = inter_node_efficiency x NIC rate,
and moves 2-byte (fp16/bf16) parameters and gradients. The emulation picks its own per-node link goodput B_e (a
tbf rate on each emulated node's eth0, less TCP/IP framing) and moves 4-byte ones (fp32: CPUs compute bf16
slowly, and the compute is slept anyway). In parameters per second the links are f = (B_e / 4) / (B / 2) times
the real ones, and every emulated rank "computes" at R_e = f x R: a layer's forward sleeps 2 x params x tokens
/ R_e and its backward 6 x params x tokens / R_e (the 8N convention with activation recomputation, the same
rule ``costmodel.predict`` uses). Compute and communication are then both 1/f times slower than on the real
instance, so their ratio, which is what decides overlap, exposed communication and weak-scaling efficiency, is
the real instance's.

The model is the preset's architecture (the same Hugging Face class) at reduced width and depth: both the
bytes a layer communicates and the FLOPs slept for it are proportional to its parameter count, so for the same
tokens per micro-step (the preset's micro_batch x seq) the ratio does not depend on the width. The vocabulary is
scaled so the embedding keeps the share of parameters it has in the full model (otherwise a narrow model would
be mostly embedding). What does not scale: per-collective latency (gloo over TCP, milliseconds, against
NCCL's microseconds), hence few, large units; and a node's ranks share one host CPU, which is why compute is
slept rather than run (the forward really runs, on ``run_tokens`` tokens, only to drive the hooks and produce
gradients of the right shapes).

Intra-node traffic goes over each namespace's loopback (unshaped): it stands for NVLink and is measured, not
scaled. ``cost_model_cluster`` describes the emulated machine to ``costmodel.predict`` with the same numbers, so
the model's predictions can be checked against measured emulated step times.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..planning.costmodel import Cluster, _get_cluster, unit_parameters
from ..planning.presets import ModelPreset, get_preset

__all__ = ["FRAME_EFFICIENCY", "GLOO_REDUCE_SCATTER_VOLUME", "EMULATED_BYTES", "REAL_BYTES", "EmulationScale"]

EMULATED_BYTES = 4  # fp32 parameters and gradients on the emulated wire
REAL_BYTES = 2  # fp16 / bf16 on the real instance (costmodel.PARAM_BYTES)

# TCP payload per Ethernet frame that tbf counts: MSS 1448 (1500 MTU - 20 IP - 20 TCP - 12 timestamp option) of a
# 1514-byte frame (+14 Ethernet header). A plain send measured 1.046 bytes on the link per payload byte (0.956).
FRAME_EFFICIENCY = 1448 / 1514
# gloo's reduce_scatter is an all-reduce followed by a slice: measured on the emulated links it moves 2x the
# ring reduce-scatter's bytes (the same as all_reduce), while all_gather moves the ring ideal.
GLOO_REDUCE_SCATTER_VOLUME = 2.0


@dataclass(frozen=True, kw_only=True)
class EmulationScale:
    """One emulated setting: which real instance and model it stands for, and how small it is made.

    instance: the real instance type whose compute/communication ratio is kept. model: the preset whose shape
    (family, FFN ratio, seq, micro_batch) is kept. hidden/layers/heads: the reduced shape. link_mbit: the tbf
    rate of each emulated node's link. ranks_per_node: k of the emulated nodes. grad_accum: micro-steps per
    optimizer step. run_tokens: tokens actually run per micro-step (compute is slept for micro_batch x seq).
    intra_node_bandwidth / latency_s: the measured loopback all-gather rate (bytes/s) and gloo's latency per
    ring step here (``emulate_sweep.calibrate``), used only to describe the machine to the cost model.
    engine_cpu_s: the engine's own CPU seconds per rank per micro-step beyond the slept compute (Python hooks,
    the ``run_tokens`` forward and backward, the optimizer's share), measured by ``emulate_sweep.calibrate_engine_cpu``
    in a run without communication; the cost model counts it as compute (see ``cost_model_cluster``).
    """

    instance: str = "p3dn.24xlarge"
    model: str = "bert-10b"
    hidden: int = 128
    layers: int = 8
    heads: int = 2
    micro_batch: int | None = None
    link_mbit: float = 100.0
    ranks_per_node: int = 2
    grad_accum: int = 8
    run_tokens: int = 8
    intra_node_bandwidth: float = 1.0e9
    latency_s: float = 0.5e-3
    engine_cpu_s: float = 0.0

    def __post_init__(self) -> None:
        _get_cluster(self.instance)  # unknown instance: ValueError naming the valid ones
        get_preset(self.model)
        for name in ("hidden", "layers", "heads", "ranks_per_node", "grad_accum", "run_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.micro_batch is not None and (not isinstance(self.micro_batch, int) or self.micro_batch < 1):
            raise ValueError(f"micro_batch={self.micro_batch!r} must be a positive integer (or None: the preset's)")
        if self.link_mbit <= 0:
            raise ValueError(f"link_mbit={self.link_mbit!r} must be positive")
        if not self.engine_cpu_s >= 0:
            raise ValueError(f"engine_cpu_s={self.engine_cpu_s!r} must be >= 0 (seconds per micro-step)")
        if self.run_tokens > self.real_preset.seq:
            raise ValueError(f"run_tokens={self.run_tokens} exceeds the preset's seq={self.real_preset.seq}")

    # ---- the real side ------------------------------------------------------------------------------------
    @property
    def real_cluster(self) -> Cluster:
        return _get_cluster(self.instance)

    @property
    def real_preset(self) -> ModelPreset:
        preset = get_preset(self.model)
        if self.micro_batch is not None:
            preset = dataclasses.replace(preset, micro_batch=self.micro_batch)
        return preset

    @property
    def tokens_per_micro_step(self) -> int:
        """Tokens per rank per micro-step the compute is slept for: the real preset's micro_batch x seq."""
        return self.real_preset.micro_batch * self.real_preset.seq

    # ---- the scale ----------------------------------------------------------------------------------------
    @property
    def link_goodput(self) -> float:
        """Payload bytes/s one emulated node's link carries (tbf rate less TCP/IP framing)."""
        return self.link_mbit * 1e6 / 8 * FRAME_EFFICIENCY

    @property
    def time_scale(self) -> float:
        """f: emulated link goodput over the real instance's achievable per-node goodput, in parameters/s."""
        real = self.real_cluster
        real_goodput = real.inter_node_bandwidth * real.inter_node_efficiency
        return (self.link_goodput / EMULATED_BYTES) / (real_goodput / REAL_BYTES)

    @property
    def device_flops(self) -> float:
        """R_e: FLOP/s an emulated rank computes at (the real achievable rate times f)."""
        real = self.real_cluster
        return self.time_scale * real.compute_efficiency * real.peak_tflops * 1e12

    @property
    def preset(self) -> ModelPreset:
        """The reduced model: the real preset's architecture at hidden/layers, vocabulary scaled (see note)."""
        real = self.real_preset
        ffn = max(1, round(real.ffn * self.hidden / real.hidden))
        vocab = round(real.vocab * (self.layers / real.layers) * (self.hidden / real.hidden))
        vocab = max(vocab, 16)
        return dataclasses.replace(
            real, name=f"{real.name}-emulated", hidden=self.hidden, layers=self.layers, heads=self.heads,
            ffn=ffn, vocab=vocab,
            note=f"{real.name} at hidden {self.hidden}, {self.layers} layers, vocab scaled to {vocab}",
        )

    @property
    def n_params(self) -> int:
        """Parameters of the reduced model (layers plus the root unit)."""
        unit, root = unit_parameters(self.preset)
        return self.layers * unit + root

    def sleep_seconds(self) -> dict[str, float]:
        """Seconds slept per micro-step: forward / backward of one layer and of the root unit."""
        unit, root = unit_parameters(self.preset)
        tokens, rate = self.tokens_per_micro_step, self.device_flops
        return {
            "layer_forward": 2 * unit * tokens / rate,
            "layer_backward": 6 * unit * tokens / rate,
            "root_forward": 2 * root * tokens / rate,
            "root_backward": 6 * root * tokens / rate,
        }

    def compute_seconds_per_step(self) -> float:
        s = self.sleep_seconds()
        per_micro = self.layers * (s["layer_forward"] + s["layer_backward"]) + s["root_forward"] + s["root_backward"]
        return self.grad_accum * per_micro

    # ---- the emulated machine, for the cost model -----------------------------------------------------------
    def cost_model_cluster(self) -> Cluster:
        """The emulated cluster as ``costmodel.predict`` sees it (compute at R_e, links as shaped, gloo's RS).

        The engine's own CPU time per micro-step (``engine_cpu_s``) is counted as compute: the rate is lowered so
        that one micro-step computes for its slept seconds plus ``engine_cpu_s``, spread over the units in
        proportion to their parameters (the hooks' work grows with the units, the 8-token forward with the
        layers). It runs on the rank's main thread like the sleeps, so it overlaps communication as they do.
        """
        real = self.real_cluster
        slept = self.compute_seconds_per_step() / self.grad_accum
        slowdown = slept / (slept + self.engine_cpu_s)
        return Cluster(
            name=f"emulated-{real.name.split('.')[0]}",
            gpu="slept compute + engine CPU",
            gpus_per_node=self.ranks_per_node,
            dtype="bf16",
            peak_tflops=self.time_scale * real.peak_tflops * slowdown,
            compute_efficiency=real.compute_efficiency,
            gpu_memory_bytes=real.gpu_memory_bytes,
            intra_node_bandwidth=self.intra_node_bandwidth,
            intra_node_efficiency=1.0,
            intra_node_latency_s=self.latency_s,
            inter_node_bandwidth=self.link_mbit * 1e6 / 8,
            inter_node_efficiency=FRAME_EFFICIENCY,
            inter_node_latency_s=self.latency_s,
            base_latency_s=0.0,
            reduce_scatter_volume=GLOO_REDUCE_SCATTER_VOLUME,
        )

    def describe(self) -> dict:
        real = self.real_cluster
        return {
            "instance": real.name,
            "model": self.real_preset.name,
            "emulated_model": dataclasses.asdict(self.preset),
            "tokens_per_micro_step": self.tokens_per_micro_step,
            "grad_accum": self.grad_accum,
            "ranks_per_node": self.ranks_per_node,
            "link_mbit": self.link_mbit,
            "link_goodput_bytes_per_s": self.link_goodput,
            "real_goodput_bytes_per_s": real.inter_node_bandwidth * real.inter_node_efficiency,
            "time_scale": self.time_scale,
            "device_tflops": self.device_flops / 1e12,
            "sleep_seconds": self.sleep_seconds(),
            "bytes_per_parameter": {"emulated": EMULATED_BYTES, "real": REAL_BYTES},
            "intra_node_bandwidth": self.intra_node_bandwidth,
            "latency_s": self.latency_s,
            "engine_cpu_s_per_micro_step": self.engine_cpu_s,
        }


