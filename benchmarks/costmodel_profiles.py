"""Print every prediction of the implementation-profile record (benchmarks/costmodel_<date>.md) as markdown tables.

Pure arithmetic of mics_hf.planning (cost model, profiles, EFA model); nothing is measured. Run:
    python benchmarks/costmodel_profiles.py
"""

from __future__ import annotations

import dataclasses

from mics_hf.planning.costmodel import CLUSTERS, predict
from mics_hf.planning.network import efa_efficiency, ring_time
from mics_hf.planning.planner import plan, weak_scaling
from mics_hf.planning.profiles import HOST_FETCH_S_056
from mics_hf.planning.validation import PR1188, calibrate_host_fetch, pr1188_times, pr1453_predictions

P3DN, P4D, P4DE = "p3dn.24xlarge", "p4d.24xlarge", "p4de.24xlarge"


def err(predicted: float, measured: float) -> str:
    return f"{predicted / measured - 1:+.1%}"


def validation() -> None:
    print("| measurement (source) | profile | measured | predicted | error |")
    print("|---|---|---:|---:|---:|")
    for mib, measured in ((2, 671e-6), (4, 1140e-6)):
        t = ring_time(mib * 2**20, 16, 8, instance=P3DN, nic_bytes_per_s=12.5e9, nvlink_bytes_per_s=150e9 * 0.77,
                      kind="all_reduce")
        print(f"| p3dn 2 nodes all_reduce {mib} MiB (aws-ofi-nccl#33) | network | {measured * 1e6:.0f} us | "
              f"{t * 1e6:.0f} us | {err(t, measured)} |")
    forward, backward = pr1188_times()
    print(f"| 5.1B BERT forward, 1 p4d node (PR 1188) | deepspeed-0.5.6 | 270 ms | {forward * 1e3:.0f} ms | "
          f"calibration (host per fetch {calibrate_host_fetch() * 1e3:.3f} ms) |")
    print(f"| 5.1B BERT backward, 1 p4d node (PR 1188) | deepspeed-0.5.6 | {PR1188['zero3_backward_s'] * 1e3:.0f} ms | "
          f"{backward * 1e3:.0f} ms | {err(backward, PR1188['zero3_backward_s'])} |")
    for point, x, tflops in pr1453_predictions():
        print(f"| {point.label} ({point.source}) | {point.profile} | {point.measured:.2f} | {tflops:.2f} | "
              f"{err(tflops, point.measured)} |")


def claims() -> None:
    print("| claim | setting | claimed | predicted (deepspeed-0.5.6) | error | also: deepspeed-improved |")
    print("|---|---|---:|---:|---:|---:|")
    ws = {p: weak_scaling("gpt-100b", P4D, [16, 64], "zero3", micro_batch=2, profile=p)
          for p in ("deepspeed-0.5.6", "deepspeed-improved")}
    a, b = ws["deepspeed-0.5.6"], ws["deepspeed-improved"]
    print(f"| ZeRO-3 weak scaling 128 -> 512 GPUs | gpt-100b, p4d, micro-batch 2, 16 -> 64 nodes | 72% | "
          f"{a.efficiency[-1]:.1%} ({a.predictions[0].tflops_per_gpu:.1f} -> {a.predictions[1].tflops_per_gpu:.1f}) "
          f"| {err(a.efficiency[-1], 0.72)} | {b.efficiency[-1]:.1%} |")
    print(f"| ZeRO-3 ~62 TFLOPS/GPU at 512 A100 | gpt-100b, p4d, 64 nodes, micro-batch 2 | 62 | "
          f"{a.predictions[1].tflops_per_gpu:.1f} | {err(a.predictions[1].tflops_per_gpu, 62)} | "
          f"{b.predictions[1].tflops_per_gpu:.1f} |")
    rows = []
    for name in ("bert-10b", "bert-15b", "bert-50b"):
        for nodes in (2, 4, 8, 16):
            try:
                r = plan(name, P3DN, nodes, baseline="deepspeed-0.5.6")
            except ValueError:
                continue
            improved = predict(name, P3DN, nodes, strategy="zero3", profile="deepspeed-improved")
            m, z, d = r.predictions["mics"], r.predictions["zero3"], r.predictions["zero3:deepspeed-0.5.6"]
            rows.append((m.samples_per_s / d.samples_per_s, name, nodes, m, z, d, improved))
    best = max(rows, key=lambda row: row[0])
    print(f"| up to 2.82x MiCS / ZeRO-3, BERT on p3dn | best of bert-10b/15b/50b x 2-16 nodes, micro-batch 8: "
          f"{best[1]}, {best[2]} nodes | 2.82x | {best[0]:.2f}x | {err(best[0], 2.82)} | "
          f"{max(r[3].samples_per_s / r[6].samples_per_s for r in rows):.2f}x |")
    print()
    print("| model | nodes | MiCS TFLOPS | ZeRO-3 mics_hf | ZeRO-3 deepspeed-0.5.6 | deepspeed-improved | "
          "MiCS / 0.5.6 | MiCS / improved |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for ratio, name, nodes, m, z, d, imp in rows:
        print(f"| {name} | {nodes} | {m.tflops_per_gpu:.1f} | {z.tflops_per_gpu:.1f} | {d.tflops_per_gpu:.1f} | "
              f"{imp.tflops_per_gpu:.1f} | {ratio:.2f} | {m.samples_per_s / imp.samples_per_s:.2f} |")


def mics_under_efa_curve() -> None:
    """MiCS's rows with the EFA curve instead of the constant 0.60, under both readings of 'ring size'."""
    print("| MiCS row | constant 0.60 | curve, rings counted in ranks | curve, rings counted in nodes x 8 |")
    print("|---|---:|---:|---:|")
    for label, model, cluster, nodes, p in (("100B on 64 p4d (p = 128)", "gpt-100b", P4D, 64, 128),
                                            ("175B on 16 p4de (p = 64)", "gpt-175b", P4DE, 16, 64)):
        c = CLUSTERS[cluster]
        by_ranks = efa_efficiency(cluster, p // c.gpus_per_node)  # the inter-node rings: one rank per node
        by_nodes = efa_efficiency(cluster, p)
        out = []
        for eff in (c.inter_node_efficiency, by_ranks, by_nodes):
            x = predict(model, dataclasses.replace(c, inter_node_efficiency=eff), nodes, micro_batch="max")
            out.append(f"{x.tflops_per_gpu:.1f} (eff {eff:.3f})")
        print(f"| {label} | " + " | ".join(out) + " |")


if __name__ == "__main__":
    print(f"host seconds per fetch (deepspeed-0.5.6): {HOST_FETCH_S_056 * 1e3:.3f} ms\n")
    validation()
    print()
    claims()
    print()
    mics_under_efa_curve()
