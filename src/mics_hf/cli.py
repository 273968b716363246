"""The `mics-hf` command: inspect a MiCS layout before launching anything."""

from __future__ import annotations

import argparse
import sys

from .topology import build_topology, node_map_from_devices_per_node


def _topology(args: argparse.Namespace) -> int:
    nodes = node_map_from_devices_per_node(args.world_size, args.devices_per_node)
    t = build_topology(
        world_size=args.world_size, rank=0, node_of_rank=nodes, partition_size=args.partition_size,
        hierarchical={"auto": "auto", "true": True, "false": False}[args.hierarchical],
    )
    print(t.describe())
    print(f"partition groups  : {[list(g) for g in t.partition_groups]}")
    print(f"replication groups: {[list(g) for g in t.replication_groups]}")
    if t.hierarchical:
        print(f"intra-node groups : {[list(g) for g in t.intra_node_groups]}")
        print(f"inter-node groups : {[list(g) for g in t.inter_node_groups]}")
        p, k = t.partition_size, t.devices_per_node
        print(f"inter-node all-gather volume per node: {p - k}/{p} of the gathered size (flat ring: {p - 1}/{p})")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir, tokenizer=args.tokenizer)
    print(f"wrote a Hugging Face model directory to {out}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .costmodel import format_plan, plan

    print(format_plan(plan(args.model, args.cluster, args.nodes, grad_accum=args.grad_accum, seq=args.seq)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mics-hf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    topo = sub.add_parser("topology", help="print the partition / replication / node groups of a layout")
    topo.add_argument("--world-size", type=int, required=True)
    topo.add_argument("--devices-per-node", type=int, required=True)
    topo.add_argument("--partition-size", type=int, default=None, help="default: devices per node")
    topo.add_argument("--hierarchical", choices=("auto", "true", "false"), default="auto")
    topo.set_defaults(func=_topology)
    export = sub.add_parser("export", help="turn a sharded checkpoint into a Hugging Face model directory (offline)")
    export.add_argument("checkpoint", help="a step directory, or a checkpoint root with a `latest` pointer")
    export.add_argument("out_dir")
    export.add_argument("--tokenizer", default=None, help="tokenizer directory to copy (default: the checkpoint's own)")
    export.set_defaults(func=_export)
    planner = sub.add_parser("plan", help="pick the partition size and predict MiCS vs ZeRO-3 vs HSDP (cost model)")
    planner.add_argument("--model", required=True, help="a preset: gpt-175b, gpt-100b, bert-10b, gpt2-10b, ...")
    planner.add_argument("--cluster", required=True, help="p3dn, p4d, p4de or p5 (AWS instance types)")
    planner.add_argument("--nodes", type=int, required=True)
    planner.add_argument("--grad-accum", type=int, default=1)
    planner.add_argument("--seq", type=int, default=None, help="default: the preset's sequence length")
    planner.set_defaults(func=_plan)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"mics-hf: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
