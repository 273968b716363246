"""Train a tiny GPT-2 with mics_hf on CPU processes that emulate a small cluster, and show where the bytes go.

Run it through scripts/demo.sh (torchrun, 4 processes). With the defaults the 4 ranks form 2 emulated nodes of
2 ranks each, and one partition group of 4 ranks spans both nodes: every unit (GPT2Block, plus the root with the
embeddings and the tied LM head) is all-gathered and its gradients reduce-scattered with the hierarchical
two-stage collectives, whose inter-node stage moves only the shards the other node lacks. Each step prints the
loss, the step time and the bytes moved per (collective, link class); the end prints a summary table.
Try `--hierarchical false` (flat collectives: 1.5x the inter-node bytes for the same total) or `--partition-size 2`
(one partition group per node: all-gathers stay intra-node, and hop 2 crosses the nodes once per step).

The script reads top to bottom like nanoGPT: setup, data, model, shard, optimizer, loop, summary. It uses the
plain PyTorch API only (shard_model, no_sync, clip_grad_norm_, comm_stats), no Accelerate or Trainer.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time
from typing import Literal

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

import mics_hf

OPS = ("all_gather", "reduce_scatter", "all_reduce")
LINKS = ("intra_node", "inter_node")
MB = 1e6


def parse_args() -> argparse.Namespace:
    """Command-line flags; the defaults finish in well under two minutes on a 2-core machine."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--partition-size", type=int, default=4, help="p: ranks per partition group (one model replica)")
    ap.add_argument("--devices-per-node", type=int, default=2, help="k: ranks per emulated node")
    ap.add_argument("--hierarchical", choices=("auto", "true", "false"), default="auto",
                    help="hierarchical all-gather / reduce-scatter: auto = when a partition group spans nodes")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps")
    ap.add_argument("--accum", type=int, default=2, help="micro-steps per optimizer step (gradient accumulation)")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per rank per micro-step")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (also the model's n_positions)")
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--data-bytes", type=int, default=2_000_000, help="how much text to read")
    args = ap.parse_args()
    for flag in ("steps", "accum", "micro_batch", "seq", "data_bytes"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    return args


def parse_hierarchical(value: str) -> Literal["auto"] | bool:
    """The --hierarchical flag as MiCSConfig wants it."""
    return {"auto": "auto", "true": True, "false": False}[value]


def log(msg: str) -> None:
    """Print on rank 0 only: every rank computes the same summary numbers."""
    if dist.get_rank() == 0:
        print(msg, flush=True)


# -------------------------------------------------------------------------------------------------------------
# Data. Demo corner cut: the text is the Python standard library's own source (present on every machine, no
# network), tokenised as raw bytes (vocab 256), so no tokenizer is needed. The recipes train a real tokenizer.
# -------------------------------------------------------------------------------------------------------------
def load_stdlib_bytes(max_bytes: int) -> torch.Tensor:
    """The first max_bytes of the stdlib's top-level .py files (sorted by name), as a uint8 token tensor."""
    stdlib = os.path.dirname(os.__file__)
    chunks: list[bytes] = []
    total = 0
    for name in sorted(os.listdir(stdlib)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(stdlib, name), "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    text = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(text), dtype=torch.uint8)


def get_batch(data: torch.Tensor, *, step: int, micro: int, rank: int, world: int, batch: int, seq: int,
              seed: int) -> torch.Tensor:
    """This rank's (batch, seq) windows for one micro-step.

    Every rank draws the same global set of window starts (seeded by step and micro-step) and keeps its own
    slice of it (by rank), so the ranks train on disjoint samples, as a distributed sampler would give them.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + micro)
    starts = torch.randint(0, data.numel() - seq, (world * batch,), generator=g)
    mine = starts[rank * batch:(rank + 1) * batch]
    return torch.stack([data[s:s + seq] for s in mine.tolist()]).long()


def main() -> None:
    args = parse_args()

    # ---- processes: torchrun sets RANK / WORLD_SIZE / MASTER_ADDR; gloo because this is CPU -----------------
    dist.init_process_group("gloo")
    torch.set_num_threads(1)  # 4 ranks share 2 cores: more intra-op threads only add contention
    rank, world = dist.get_rank(), dist.get_world_size()

    # ---- data ------------------------------------------------------------------------------------------------
    data = load_stdlib_bytes(args.data_bytes)

    # ---- model: the same seed on every rank, so all ranks start from identical weights before sharding ------
    torch.manual_seed(args.seed)
    model_config = GPT2Config(
        vocab_size=256,
        n_positions=args.seq,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,  # GPT-2's 50256 is outside a byte vocabulary; nothing here generates text
        eos_token_id=None,
    )
    model = GPT2LMHeadModel(model_config)
    # transformers derives the loss from the class name, finds none in "GPT2LMHeadModel" and warns on every rank
    # before falling back to the causal-LM loss; naming that loss keeps the output readable.
    model.loss_type = "ForCausalLM"
    num_params = sum(p.numel() for p in model.parameters())

    # ---- shard: units are the GPT2Blocks (the model's _no_split_modules); the root keeps the rest -----------
    mics_config = mics_hf.MiCSConfig(
        partition_size=args.partition_size,
        devices_per_node=args.devices_per_node,  # emulated nodes: everything really runs on one machine
        hierarchical=parse_hierarchical(args.hierarchical),
    )
    model = mics_hf.shard_model(model, mics_config)
    topology = mics_hf.topology_of(model)
    stats = mics_hf.comm_stats(model)
    tokens_per_step = world * args.accum * args.micro_batch * args.seq
    log(f"data: {data.numel() / MB:.1f} MB of stdlib source, byte tokens (vocab 256)")
    log(f"model: GPT-2 {num_params / 1e6:.2f}M parameters, n_layer={args.n_layer} n_embd={args.n_embd} seq={args.seq}")
    log(f"topology: {topology.describe()}")
    log(f"batch: {world} ranks x {args.accum} micro-steps x {args.micro_batch} x {args.seq} = {tokens_per_step} tokens/step")
    log("comm columns: MB sent in the step by all ranks together, intra-node/inter-node; AG = all-gather (unshard),"
        " RS = reduce-scatter (hop 1), AR = replica all-reduce (hop 2)")

    # ---- optimizer: built AFTER sharding, on the local fp32 shards (all an optimizer ever sees) --------------
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    # ---- training loop -------------------------------------------------------------------------------------
    losses: list[float] = []
    step_seconds: list[float] = []
    bytes_per_step: list[dict[tuple[str, str], float]] = []
    calls_per_step: list[dict[str, int]] = []
    t_start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        stats.reset()
        t0 = time.perf_counter()
        loss_sum = 0.0
        for micro in range(args.accum):
            x = get_batch(data, step=step, micro=micro, rank=rank, world=world, batch=args.micro_batch,
                          seq=args.seq, seed=args.seed)
            last = micro == args.accum - 1
            # no_sync() skips only hop 2 (the replica all-reduce): hop 1, the reduce-scatter of each unit's
            # gradients in the partition group, still runs every micro-step, so full gradients never pile up.
            with model.no_sync() if not last else contextlib.nullcontext():
                loss = model(input_ids=x, labels=x).loss  # HF shifts the labels: next-byte prediction
                (loss / args.accum).backward()
            loss_sum += loss.item()
        # The norm is global: each partition group holds one full copy of the gradient, summed over its shards.
        mics_hf.clip_grad_norm_(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - t0)

        # Logging, outside the timed region: loss averaged over ranks, and bytes summed over ranks. A rank's
        # bytes are what it sends on the link to its ring successor, so the world sum is the traffic per link.
        # (This all_reduce is the demo's own; it is not counted in comm_stats.)
        report = torch.tensor([loss_sum / args.accum] + [float(stats.bytes.get((op, link), 0))
                                                          for op in OPS for link in LINKS], dtype=torch.float64)
        dist.all_reduce(report, op=dist.ReduceOp.SUM)
        mean_loss = report[0].item() / world
        moved = {key: report[1 + i].item() for i, key in enumerate((op, link) for op in OPS for link in LINKS)}
        losses.append(mean_loss)
        bytes_per_step.append(moved)
        calls_per_step.append({op: sum(v for (o, _), v in stats.calls.items() if o == op) for op in OPS})
        comm = " ".join(
            f"{short}={moved[(op, 'intra_node')] / MB:.2f}/{moved[(op, 'inter_node')] / MB:.2f}"
            for op, short in zip(OPS, ("AG", "RS", "AR"))
        )
        log(f"step {step + 1:3d}/{args.steps} | loss {mean_loss:.4f} | {step_seconds[-1] * 1e3:6.0f} ms | "
            f"MB intra/inter {comm}")
    wall = time.perf_counter() - t_start

    # ---- summary ---------------------------------------------------------------------------------------------
    median_s = statistics.median(step_seconds)
    log("")
    log(f"summary ({args.steps} steps, {world} ranks, {topology.num_nodes} emulated nodes x {topology.devices_per_node}, "
        f"partition_size={topology.partition_size}, replication_size={topology.replication_size}, "
        f"hierarchical={topology.hierarchical})")
    tail = losses[-5:]  # one step's loss is noisy (+-0.15 here): the mean of the last few shows the trend
    log(f"  loss            first {losses[0]:.4f}  last {losses[-1]:.4f}  mean of last {len(tail)} "
        f"{statistics.mean(tail):.4f}  (uniform guess: ln 256 = {math.log(256):.4f})")
    log(f"  step time       median {median_s * 1e3:.0f} ms  (training loop wall {wall:.1f} s)")
    log(f"  throughput      {tokens_per_step / median_s:,.0f} tokens/s (at the median step time)")
    log("  communication per optimizer step, all ranks together:")
    log(f"    {'op':<16}{'intra-node MB':>15}{'inter-node MB':>15}{'calls/rank':>12}")  # a hierarchical call counts per stage
    for op in OPS:
        intra = statistics.mean(b[(op, "intra_node")] for b in bytes_per_step) / MB
        inter = statistics.mean(b[(op, "inter_node")] for b in bytes_per_step) / MB
        calls = statistics.mean(c[op] for c in calls_per_step)
        log(f"    {op:<16}{intra:>15.3f}{inter:>15.3f}{calls:>12.0f}")
    log("  links: inter-node = sent to a rank on the other emulated node (the slow links MiCS economises), intra-node"
        " = within a node; hop 1 = reduce_scatter in the partition group every micro-step, hop 2 = all_reduce across"
        " the replication group once per optimizer step (none when partition_size = world: a single replica).")

    # Required: without it gloo may hang or abort at exit and torchrun reports a failure.
    mics_hf.close_process_group()


if __name__ == "__main__":
    main()
