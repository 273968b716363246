"""Pretrain a GPT-style causal language model with MiCS, through Accelerate.

    accelerate launch --config_file accelerate_configs/mics_cpu.yaml recipes/pretrain_gpt.py --preset tiny
    accelerate launch --config_file accelerate_configs/mics_p4d.yaml recipes/pretrain_gpt.py --preset gpt2-10b \
        --dataset openwebtext --report_to wandb

The same script runs from a laptop-sized CPU demo to the paper's 10B-175B models: the Accelerate config file
decides the cluster layout and the MiCS partition size (its `mics` block). Without --dataset/--train_file it
trains on the Python standard library's own source files with a byte-level BPE tokenizer trained on them, so
it works offline on any machine. The loop itself is recipes/common/loop.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.data import synthetic_batch  # noqa: E402
from common.loop import Recipe, train  # noqa: E402
from common.run import build_model, evaluate_perplexity, make_optimizer, setup  # noqa: E402

FAMILY = "gpt"


def main() -> None:
    # 1. Arguments, the accelerator (MiCS from the config file), then text -> tokenizer -> packed blocks for this rank.
    run = setup(FAMILY, __doc__.split("\n\n")[0])
    if run is None:  # --dry_run printed the model's size
        return
    args, paths, accelerator, data = run.args, run.paths, run.accelerator, run.data
    rank = accelerator.process_index
    preset, tokenizer, blocks = data.preset, data.tokenizer, data.blocks

    # 2. One micro-batch for (step, micro-step).
    def batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        if blocks is None:  # --synthetic: random tokens, deterministic per (step, micro-step, rank)
            ids = synthetic_batch(vocab_size=preset.vocab, micro_batch=preset.micro_batch, seq_len=preset.seq,
                                  step=step * args.gradient_accumulation_steps + micro, rank=rank, seed=args.seed)
        else:
            ids = blocks.next_batch(preset.micro_batch)
        return {"input_ids": ids, "labels": ids}  # the model shifts the labels itself

    # 3. The model (on the meta device under MiCS), sharded and materialised by prepare().
    model = build_model(accelerator, preset, args)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer, scheduler = make_optimizer(model, args, accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if blocks is not None:
        accelerator.register_for_checkpointing(blocks)  # the data position is part of every checkpoint

    evaluate = None if tokenizer is None else (
        lambda: evaluate_perplexity(accelerator, model, tokenizer, data.eval_texts, preset, args))
    # train() ends with end_training(): every rank waits for the others, then the group is closed
    train(accelerator, model, optimizer, scheduler, Recipe(FAMILY, batch, evaluate, tokenizer), preset, args, paths, n_params)


if __name__ == "__main__":
    main()
