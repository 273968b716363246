"""Pretrain a pre-LayerNorm BERT (masked LM) with MiCS, through Accelerate.

    accelerate launch --config_file accelerate_configs/mics_cpu.yaml recipes/pretrain_bert.py --preset tiny-bert
    accelerate launch --config_file accelerate_configs/mics_p3dn.yaml recipes/pretrain_bert.py --preset bert-10b \
        --dataset wikipedia --dataset_config 20220301.en --report_to wandb

The paper's BERT models are pre-LayerNorm; Hugging Face's RobertaPreLayerNorm is that architecture (BERT's
layers with the LayerNorm moved before each sub-block), trained here with BERT's masked-LM objective (15% of
tokens, 80/10/10) and no next-sentence prediction, as RoBERTa does. Without --dataset/--train_file it trains
on the Python standard library's own source files with a WordPiece tokenizer trained on them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common.data import mask_tokens, synthetic_batch  # noqa: E402
from common.loop import Recipe, train  # noqa: E402
from common.run import build_model, evaluate_mlm, make_optimizer, setup  # noqa: E402

FAMILY = "bert"


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
        if blocks is None:
            ids = synthetic_batch(vocab_size=preset.vocab, micro_batch=preset.micro_batch, seq_len=preset.seq,
                                  step=step * args.gradient_accumulation_steps + micro, rank=rank, seed=args.seed)
            return {"input_ids": ids, "labels": ids}  # throughput runs: every position is a target
        # masks drawn from a generator seeded by (seed, step, micro-step, rank): a resumed run masks identically
        generator = torch.Generator().manual_seed(((args.seed * 1_000_003 + step) * 1_009 + micro) * 4_099 + rank)
        ids, labels = mask_tokens(blocks.next_batch(preset.micro_batch), tokenizer, generator=generator)
        return {"input_ids": ids, "labels": labels}

    # 3. The model (on the meta device under MiCS), sharded and materialised by prepare().
    model = build_model(accelerator, preset, args)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer, scheduler = make_optimizer(model, args, accelerator.num_processes)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if blocks is not None:
        accelerator.register_for_checkpointing(blocks)

    evaluate = None if tokenizer is None else (lambda: evaluate_mlm(accelerator, model, tokenizer, data.eval_texts, preset, args))
    # train() ends with end_training(): every rank waits for the others, then the group is closed
    train(accelerator, model, optimizer, scheduler, Recipe(FAMILY, batch, evaluate, tokenizer), preset, args, paths, n_params)


if __name__ == "__main__":
    main()
