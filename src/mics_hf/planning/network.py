"""Collective times on AWS EFA as the public measurements show them: bandwidth that falls with the number of ranks
in a ring, and a latency per ring step that makes small messages slow.

Used by the implementation profiles of ``mics_hf.planning.profiles`` (DeepSpeed's ZeRO-3, whose every collective
is a flat ring over all ranks). The default cost model (``costmodel.predict`` with the ``mics_hf`` profile) keeps
its single ``INTER_NODE_EFFICIENCY``; see [Note: which network a prediction uses] in ``profiles``.

[Note: EFA bandwidth by ring size]
Every public multi-node measurement runs 8 ranks per node, so "more nodes" and "more ranks in the ring" are the
same thing in them. Large-message bus bandwidth as a fraction of the node's line rate (``EFA_MEASUREMENTS``):

- p3dn.24xlarge (100 Gbit/s = 12.5 GB/s), NVIDIA/nccl#235 (2019-07-16, moved to aws-ofi-nccl#19): "80Gb/s
  (10GB/s) on 2 nodes, but performance drops to 50-60Gb/s (6-8 GB/s) when using 8 to 32 nodes". Read as
  10 GB/s at 2 nodes (16 ranks), 8 at 8 nodes (64 ranks), 6 at 32 nodes (256 ranks): 0.80, 0.64, 0.48 of line
  rate, i.e. exactly 0.08 less per doubling of the ring. aws-ofi-nccl#19's summary agrees in shape ("8
  machines throughput is 70% of on-prem infiniband, 16 machines is 60%").
- p4d.24xlarge (400 Gbit/s = 50 GB/s), NVIDIA/nccl#527 (2022-07-25, NCCL 2.9.9, all_reduce 1 GiB): busbw 31.77
  GB/s on 3 nodes (24 ranks), 29.61 on 4 nodes (32 ranks): 0.635, 0.592 (0.104 less per doubling between them).
  Its 2-node row (57.2 GB/s, above line rate) is left out: nccl-tests over-reports busbw on 2 machines
  (aws-ofi-nccl#19, "busbw is incorrectly reported for 2 machines").

The model: fraction = anchor - 0.08 x log2(ranks / anchor_ranks), capped at 0.80 (the best measured), where the
anchor is the cluster's own largest measured ring (p4d: 32 ranks, 0.592; p3dn: 256 ranks, 0.48) and the slope is
p3dn's, the only series that spans more than 4 nodes (p4d's own two points fall faster, 0.104 per doubling). For
p4d at 64 and 512 ranks this is an extrapolation (0.512, 0.272); the measurement that would replace it is an
all-gather busbw on 16 and 64 p4d nodes. p4de is p4d's network; p5 has no public series here and uses p4d's.

[Note: EFA latency per ring step]
Each ring step across nodes costs ``NET_STEP_LATENCY_S`` = 9.6 us, NCCL 2.11's own figure (src/graph/tuning.cc
at v2.11.4-1, ``hwLat[NET][RING][SIMPLE]``), plus 8.4 us per collective (``baseLat[RING][SIMPLE]``), charged on
every one of the R-1 steps of a ring that spans nodes (a pipelined ring waits for its slowest hop each step; NCCL's
own tuner charges the network only at node boundaries, which undershoots the measurements below). Checked against
aws-ofi-nccl#33 (p3dn, 2 nodes, all_reduce): 671 us at 2 MB, 1140 us at 4 MB; predicted 0.67 and 1.05 ms
(tests/test_costmodel.py). Inside one node the NVLink step is 3.4 us (``hwLat[NVLINK][RING][SIMPLE]``, same file).
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Literal, Mapping

__all__ = ["BASE_LATENCY_S", "EFA_MEASUREMENTS", "EFA_SLOPE_PER_DOUBLING", "NET_STEP_LATENCY_S",
           "NVLINK_STEP_LATENCY_S", "EfaCurve", "efa_curve", "efa_efficiency", "ring_time"]

BASE_LATENCY_S = 8.4e-6  # NCCL v2.11.4-1 src/graph/tuning.cc baseLat[RING][SIMPLE]
NET_STEP_LATENCY_S = 9.6e-6  # NCCL v2.11.4-1 src/graph/tuning.cc hwLat[NET][RING][SIMPLE]
NVLINK_STEP_LATENCY_S = 3.4e-6  # NCCL v2.11.4-1 src/graph/tuning.cc hwLat[NVLINK][RING][SIMPLE]
EFA_SLOPE_PER_DOUBLING = 0.08  # NVIDIA/nccl#235, p3dn: 0.80 (16 ranks), 0.64 (64), 0.48 (256) of line rate
EFA_CAP = 0.80  # the best large-message fraction measured (p3dn, 2 nodes, NVIDIA/nccl#235)


@dataclass(frozen=True)
class EfaMeasurement:
    """One public large-message bus-bandwidth figure: ``ranks`` in the ring (8 per node), fraction of line rate."""

    instance: str
    ranks: int
    fraction: float
    source: str


EFA_MEASUREMENTS: tuple[EfaMeasurement, ...] = (
    EfaMeasurement("p3dn.24xlarge", 16, 10.0 / 12.5, "NVIDIA/nccl#235: 10 GB/s on 2 nodes"),
    EfaMeasurement("p3dn.24xlarge", 64, 8.0 / 12.5, "NVIDIA/nccl#235: 8 GB/s at 8 nodes (6-8 GB/s on 8-32)"),
    EfaMeasurement("p3dn.24xlarge", 256, 6.0 / 12.5, "NVIDIA/nccl#235: 6 GB/s at 32 nodes (6-8 GB/s on 8-32)"),
    EfaMeasurement("p4d.24xlarge", 24, 31.77 / 50.0, "NVIDIA/nccl#527: all_reduce 1 GiB busbw 31.77 GB/s, 3 nodes"),
    EfaMeasurement("p4d.24xlarge", 32, 29.61 / 50.0, "NVIDIA/nccl#527: all_reduce 1 GiB busbw 29.61 GB/s, 4 nodes"),
)


@dataclass(frozen=True)
class EfaCurve:
    """fraction(ranks) = anchor_fraction - slope x log2(ranks / anchor_ranks), capped at ``cap``."""

    anchor_ranks: int
    anchor_fraction: float
    slope: float = EFA_SLOPE_PER_DOUBLING
    cap: float = EFA_CAP

    def fraction(self, ranks: int) -> float:
        if ranks < 2:
            raise ValueError(f"ranks={ranks!r}: a ring across nodes has at least 2 ranks")
        value = self.anchor_fraction - self.slope * math.log2(ranks / self.anchor_ranks)
        if value <= 0:
            raise ValueError(
                f"the EFA curve gives no bandwidth at {ranks} ranks (anchor {self.anchor_fraction:.3f} at "
                f"{self.anchor_ranks} ranks, {self.slope} less per doubling): this is far outside the measured "
                "range (16-256 ranks); pass a measured fraction for this ring size instead"
            )
        return min(self.cap, value)


def _anchor(instance: str) -> EfaCurve:
    own = [m for m in EFA_MEASUREMENTS if m.instance == instance]
    largest = max(own, key=lambda m: m.ranks)
    return EfaCurve(anchor_ranks=largest.ranks, anchor_fraction=largest.fraction)


_CURVES: Mapping[str, EfaCurve] = types.MappingProxyType({
    "p3dn.24xlarge": _anchor("p3dn.24xlarge"),
    "p4d.24xlarge": _anchor("p4d.24xlarge"),
    "p4de.24xlarge": _anchor("p4d.24xlarge"),  # the same EFA as p4d (AWS p4 page)
    "p5.48xlarge": _anchor("p4d.24xlarge"),  # no public series; p4d's shape, stated in the module docstring
})


def efa_curve(instance: str) -> EfaCurve:
    """The bandwidth curve of an AWS instance type's EFA (see [Note: EFA bandwidth by ring size])."""
    if instance not in _CURVES:
        raise ValueError(f"no EFA measurements for {instance!r}; use one of {sorted(_CURVES)}")
    return _CURVES[instance]


def efa_efficiency(instance: str, ranks: int) -> float:
    """Large-message bus bandwidth of a ring of ``ranks`` ranks (8 per node) as a fraction of the line rate."""
    return efa_curve(instance).fraction(ranks)


def ring_time(message_bytes: float, ranks: int, gpus_per_node: int, *, instance: str, nic_bytes_per_s: float,
              nvlink_bytes_per_s: float, kind: Literal["all_gather", "reduce_scatter", "all_reduce"] = "all_gather",
              ) -> float:
    """Seconds for one flat ring collective over ``ranks`` consecutive ranks (``gpus_per_node`` per node).

    ``message_bytes``: the gathered output (all-gather), the full input (reduce-scatter) or the buffer
    (all-reduce). Across nodes each node's NIC carries (R-1)/R of the message per pass (two passes for an
    all-reduce) at ``nic_bytes_per_s`` x the EFA fraction for R ranks, every step costs the network step
    latency; inside one node the ring runs at ``nvlink_bytes_per_s`` (already an achievable rate) and the
    NVLink step latency.
    """
    if ranks <= 1:
        return 0.0
    passes = 2 if kind == "all_reduce" else 1
    steps = passes * (ranks - 1)
    volume = passes * (ranks - 1) / ranks * message_bytes
    if ranks <= gpus_per_node:
        return BASE_LATENCY_S + steps * NVLINK_STEP_LATENCY_S + volume / nvlink_bytes_per_s
    nic = nic_bytes_per_s * efa_efficiency(instance, ranks)
    return BASE_LATENCY_S + steps * NET_STEP_LATENCY_S + max(volume / nic, volume / nvlink_bytes_per_s)
