"""A tiny MiCS training run for the fault-injection tests, launched by torchrun (see tests/test_faults.py).

Tiny GPT-2, fp32 on CPU with gloo, deterministic data indexed by (step, micro-step, rank), gradient
accumulation 2 with `no_sync()`, AdamW. It resumes from `latest` under --ckpt-root when there is one, saves
every --save-every steps, and rank 0 writes the final full state dict and its losses under --out.

Faults, each injected on purpose at a precise point:
  --kill-rank R --kill-at-step S   rank R SIGKILLs itself before step S, on the first attempt only
  --kill-during-save-step S        the save of step S dies half-way: every rank has written its files and
                                   rank 0 its metadata into `.tmp-step_S`, then rank 0 SIGKILLs itself in
                                   `_publish` before renaming anything; the other ranks are parked in the
                                   save meanwhile and die with it (torchrun tears them down; failing that,
                                   they SIGKILL themselves after 30 s)
  --hang-rank R --hang-at-step S   rank R stops taking part in collectives at step S (sleeps)

Corner cut: the per-rank losses are only rank 0's (the test compares them with another run's rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import mics_hf  # noqa: E402
import mics_hf.checkpoint.save  # noqa: E402
from models import global_batches, tiny_gpt2  # noqa: E402

ACCUM = 2
MICRO = 2


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt-root", required=True)
    ap.add_argument("--out", required=True, help="directory: rank 0 writes params.safetensors and losses.json")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--save-every", type=int, default=0, help="0: never save")
    ap.add_argument("--timeout-s", type=float, default=120.0, help="process-group timeout")
    ap.add_argument("--kill-rank", type=int, default=None)
    ap.add_argument("--kill-at-step", type=int, default=None)
    ap.add_argument("--kill-during-save-step", type=int, default=None)
    ap.add_argument("--hang-rank", type=int, default=None)
    ap.add_argument("--hang-at-step", type=int, default=None)
    return ap.parse_args()


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm_kill_during_save(rank: int) -> dict[str, bool]:
    """Make the next armed save die after its files are written, before it is published.

    Rank 0 dies inside `_publish` (the metadata is already in the temporary directory, nothing renamed yet).
    The other ranks wait at the final agreement on the publish instead of dying at once, so that rank 0 is sure
    to get there first (it needs nothing more from them once it has their file lists).
    """
    armed = {"on": False}
    publish, all_ok = mics_hf.checkpoint.save._publish, mics_hf.checkpoint.save._all_ok

    def dying_publish(tmp, final, root):
        if armed["on"]:
            print(f"[fault] rank {rank}: SIGKILL inside _publish({tmp.name})", flush=True)
            die()
        return publish(tmp, final, root)

    def dying_all_ok(ok, what, error):
        if armed["on"] and rank != 0 and what.startswith("publishing"):
            time.sleep(30.0)  # torchrun normally ends this process as soon as rank 0 is dead
            print(f"[fault] rank {rank}: SIGKILL before the publish agreement", flush=True)
            die()
        return all_ok(ok, what, error)

    mics_hf.checkpoint.save._publish = dying_publish
    mics_hf.checkpoint.save._all_ok = dying_all_ok
    return armed


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout_s))
    try:
        run(args)
        mics_hf.close_process_group()
    finally:
        mics_hf.close_process_group(wait_for_peers=False)  # a failed or killed peer: no barrier


def run(args: argparse.Namespace) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    torch.manual_seed(1234 + rank)
    model = mics_hf.shard_model(tiny_gpt2(), mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-4, weight_decay=0.01)
    save_fault = arm_kill_during_save(rank) if args.kill_during_save_step is not None else None

    start = 0
    latest = mics_hf.latest_checkpoint(args.ckpt_root)
    if latest is not None:
        info = mics_hf.load_checkpoint(latest, model, opt)
        start = info["next_step"]
        if rank == 0:
            print(f"[resume] attempt {attempt}: loaded {latest.name}, continuing at step {start}", flush=True)

    data = global_batches(steps=args.steps, accum=ACCUM, world=world, micro=MICRO)
    losses: dict[str, float] = {}
    model.train()
    for step in range(start, args.steps):
        if attempt == 0 and rank == args.kill_rank and step == args.kill_at_step:
            print(f"[fault] rank {rank}: SIGKILL at step {step}", flush=True)
            die()
        if rank == args.hang_rank and step == args.hang_at_step:
            print(f"[fault] rank {rank}: hanging at step {step}", flush=True)
            time.sleep(3600)
        total = 0.0
        for m in range(ACCUM):
            with model.no_sync() if m < ACCUM - 1 else nullcontext():
                tokens = data[step, m, rank]
                loss = model(input_ids=tokens, labels=tokens).loss / ACCUM
                loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses[str(step)] = total
        done = step + 1
        if args.save_every and done % args.save_every == 0:
            if save_fault is not None:
                save_fault["on"] = done == args.kill_during_save_step
            mics_hf.save_checkpoint(args.ckpt_root, model, opt, step=done, extra={"next_step": done})

    state = mics_hf.full_state_dict(model)  # every rank takes part; rank 0 gets the tensors
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        # full_state_dict keeps tied weights as one tensor under each key; safetensors wants distinct storage
        save_file({k: v.clone() for k, v in state.items()}, str(out / "params.safetensors"))
        (out / "losses.json").write_text(json.dumps({"attempt": attempt, "start": start, "losses": losses}))
    dist.barrier()


if __name__ == "__main__":
    main()
