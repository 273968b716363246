"""A tiny training script for `accelerate launch` tests: the same code runs as MiCS or as plain DDP.

Data is indexed by (step, micro-step, rank) instead of a prepared DataLoader so that the MiCS run, the DDP run
and a resumed run see exactly the same samples.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import mics_hf  # noqa: E402
from models import global_batches, tiny_gpt2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--save-at", type=int, default=None)
    parser.add_argument("--save-dir", default=None)
    parser.add_argument("--load-dir", default=None)
    args = parser.parse_args()

    torch.use_deterministic_algorithms(True)
    acc = mics_hf.MiCSAccelerator(gradient_accumulation_steps=args.accum)
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-4, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    opt, model, sched = acc.prepare(opt, model, sched)  # optimizer first on purpose: any order must work
    start = 0
    if args.load_dir:
        acc.load_state(args.load_dir)
        start = args.save_at
    data = global_batches(steps=args.steps, accum=args.accum, world=acc.num_processes, micro=2)
    rank = acc.process_index
    losses = []
    for step in range(start, args.steps):
        total = torch.zeros(())
        for m in range(args.accum):
            with acc.accumulate(model):
                loss = model(input_ids=data[step, m, rank], labels=data[step, m, rank]).loss
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad()
            total += loss.detach() / args.accum
        losses.append(acc.reduce(total, reduction="mean").item())
        if args.save_at is not None and args.save_dir and step + 1 == args.save_at:
            acc.save_state(args.save_dir)
    state = acc.get_state_dict(model)
    # gather_for_metrics works as usual: every rank's loss of the last micro-batch, in rank order
    gathered = acc.gather_for_metrics(loss.detach().reshape(1))
    if acc.mics_enabled:  # full weights in safetensors, written by the main process (checked for the MiCS run)
        acc.save_model(model, args.out + "_saved")
    report = {
        "mics": acc.mics_enabled and mics_hf.is_sharded(model),
        "hop2": mics_hf.engine.stats.num_hop2(model) if mics_hf.is_sharded(model) else None,
        "world": acc.num_processes,
        "distributed_type": str(acc.distributed_type),
        "losses": losses,
        "optimizer_steps": args.steps - start,
        "gathered": gathered.tolist(),
    }
    if acc.is_main_process:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}, args.out + ".safetensors")
        Path(args.out + ".json").write_text(json.dumps(report))
    acc.end_training()  # MiCSAccelerator: leave together, then close the group


if __name__ == "__main__":
    main()
