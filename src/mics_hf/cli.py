"""The `mics-hf` command: inspect a MiCS layout before launching anything."""

from __future__ import annotations

import argparse
import sys

from .engine.topology import build_topology, node_map_from_devices_per_node


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
    from .checkpoint.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir, tokenizer=args.tokenizer, overwrite=args.overwrite)
    print(f"wrote a Hugging Face model directory to {out}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .planning.planner import format_plan, plan

    print(format_plan(plan(args.model, args.cluster, args.nodes, micro_batch=args.micro_batch,
                           grad_accum=args.grad_accum, seq=args.seq, baseline=args.baseline)))
    return 0


def _micro_batch(text: str) -> int | str:
    if text == "max":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--micro-batch {text!r}: give a positive integer or 'max'")
    return value


def _emulate(args: argparse.Namespace) -> int:
    from .emulation.cluster import EmulationUnavailable, check_available

    try:
        check_available()  # before any work: not root, or no iproute2
    except EmulationUnavailable as exc:
        raise ValueError(f"{exc}; run `mics-hf emulate` as root on a Linux machine with iproute2") from exc
    if args.what == "all-gather":
        import json

        from .emulation.cluster import measure_all_gather

        for hierarchical in (False, True):
            print(json.dumps(measure_all_gather(args.nodes[-1], args.ranks_per_node, args.megabytes, args.link_mbit,
                                                hierarchical, calibrate=not hierarchical)))
        return 0
    from .emulation.scale import EmulationScale
    from .emulation.sweep import check, format_table, sweep, write_report

    scale = EmulationScale(instance=args.instance, model=args.model, hidden=args.hidden, layers=args.layers,
                           heads=args.heads, micro_batch=args.micro_batch, link_mbit=args.link_mbit,
                           ranks_per_node=args.ranks_per_node, grad_accum=args.grad_accum)
    result = sweep(scale, args.nodes, warmup=args.warmup, steps=args.steps, strategies=args.strategies.split(","),
                   measure_all_gathers=not args.no_all_gather)
    print(format_table(result))
    verdicts = check(result)
    for name, ok, detail in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    paths = write_report(result, args.output_dir, stem=args.stem)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0 if all(ok for _, ok, _ in verdicts) or not args.check else 1


def _node_list(text: str) -> list[int]:
    try:
        nodes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--nodes {text!r}: give node counts separated by commas, e.g. 1,2,4")
    if not nodes or nodes[0] < 1:
        raise argparse.ArgumentTypeError(f"--nodes {text!r}: node counts must be >= 1")
    return nodes


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
    export.add_argument("--overwrite", action="store_true",
                        help="export into a non-empty out_dir, replacing only the files the export writes")
    export.set_defaults(func=_export)
    planner = sub.add_parser("plan", help="pick the partition size and predict MiCS vs ZeRO-3 vs HSDP (cost model)")
    planner.add_argument("--model", required=True, help="a preset: gpt-175b, gpt-100b, bert-10b, gpt2-10b, ...")
    planner.add_argument("--cluster", required=True, help="p3dn, p4d, p4de or p5 (AWS instance types)")
    planner.add_argument("--nodes", type=int, required=True)
    planner.add_argument("--grad-accum", type=int, default=1)
    planner.add_argument("--seq", type=int, default=None, help="default: the preset's sequence length")
    planner.add_argument("--micro-batch", type=_micro_batch, default="max",
                         help="samples per GPU per micro-step, or 'max' (default): the largest that fits")
    planner.add_argument("--baseline", default=None,
                         help="also predict ZeRO-3 as an implementation ran it: deepspeed-0.5.6 (the paper's "
                              "baseline) or deepspeed-improved (after DeepSpeed PR 1453)")
    planner.set_defaults(func=_plan)
    emulate = sub.add_parser(
        "emulate", help="emulated cluster on this machine (root): weak-scaling sweep or one all-gather's link bytes",
        description="Network namespaces as nodes, tbf-shaped links, compute slept by the scaling rule of "
                    "mics_hf.emulation.scale; everything created is removed on exit.")
    emulate.add_argument("what", choices=("weak-scaling", "all-gather"))
    emulate.add_argument("--nodes", type=_node_list, default=[1, 2, 4], help="node counts, e.g. 1,2,4")
    emulate.add_argument("--ranks-per-node", type=int, default=2)
    emulate.add_argument("--instance", default="p3dn.24xlarge", help="the real instance whose ratio is kept")
    emulate.add_argument("--model", default="bert-10b", help="the preset whose shape is reduced")
    emulate.add_argument("--hidden", type=int, default=128)
    emulate.add_argument("--layers", type=int, default=8)
    emulate.add_argument("--heads", type=int, default=2)
    emulate.add_argument("--micro-batch", type=int, default=None, help="default: the preset's")
    emulate.add_argument("--link-mbit", type=float, default=100.0, help="tbf rate of each node's link")
    emulate.add_argument("--grad-accum", type=int, default=8)
    emulate.add_argument("--warmup", type=int, default=1)
    emulate.add_argument("--steps", type=int, default=2)
    emulate.add_argument("--strategies", default="mics,zero3,hsdp", help="which of mics,zero3,hsdp to run")
    emulate.add_argument("--no-all-gather", action="store_true", help="skip the flat vs hierarchical byte check")
    emulate.add_argument("--stem", default=None, help="file name stem of the report (default: dated)")
    emulate.add_argument("--megabytes", type=float, default=16, help="all-gather: output size")
    emulate.add_argument("--output-dir", default="benchmarks", help="where the JSON, PNG and table go")
    emulate.add_argument("--check", action="store_true", help="exit 1 if a criterion of the sweep fails")
    emulate.set_defaults(func=_emulate)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"mics-hf: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
