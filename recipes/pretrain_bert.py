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

import dataclasses
import sys
from pathlib import Path

import torch
from accelerate.utils import ProjectConfiguration

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mics_hf  # noqa: E402
from common.cli import build_parser, output_paths, resolve_preset, split_stream  # noqa: E402
from common.data import PackedBlocks, get_tokenizer, mask_tokens, synthetic_batch, text_stream  # noqa: E402
from common.loop import Recipe, train  # noqa: E402
from common.run import dry_run, evaluate_mlm, make_optimizer  # noqa: E402
from mics_hf.presets import build_config, model_class  # noqa: E402

FAMILY = "bert"


def main() -> None:
    args = build_parser(FAMILY, __doc__.split("\n\n")[0]).parse_args()
    if args.preset in ("tiny", "small"):
        args.preset += "-bert"  # the CPU presets have a BERT twin with BERT's vocabulary layout
    preset = resolve_preset(args, FAMILY)
    if args.dry_run:
        return dry_run(preset, args.partition_size_for_report)
    paths = output_paths(args)

    # 1. The accelerator: MiCS settings come from the config file's `mics` block (or MICS_CONFIG).
    accelerator = mics_hf.MiCSAccelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with="wandb" if args.report_to == "wandb" else None,
        project_config=ProjectConfiguration(project_dir=str(paths["root"]), total_limit=args.save_total_limit),
    )
    torch.manual_seed(args.seed)
    rank, world = accelerator.process_index, accelerator.num_processes

    # 2. Text, a WordPiece tokenizer, blocks of [CLS] ... [SEP]; each rank reads its own blocks.
    texts = lambda: text_stream(dataset=args.dataset, dataset_config=args.dataset_config,  # noqa: E731
                                train_file=args.train_file, text_column=args.text_column, max_bytes=args.corpus_bytes)
    train_texts = split_stream(texts, args.eval_every_nth_document, held_out=False)
    eval_texts = split_stream(texts, args.eval_every_nth_document, held_out=True)
    tokenizer = blocks = None
    if not args.synthetic:
        with accelerator.main_process_first():
            tokenizer = get_tokenizer(FAMILY, name=args.tokenizer, cache_dir=paths["tokenizer_cache"],
                                      texts=train_texts, vocab_size=preset.vocab)
        preset = dataclasses.replace(preset, vocab=len(tokenizer))
        blocks = PackedBlocks(train_texts, tokenizer, seq_len=preset.seq, rank=rank, world_size=world, family=FAMILY)

    def batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        if blocks is None:
            ids = synthetic_batch(vocab_size=preset.vocab, micro_batch=preset.micro_batch, seq_len=preset.seq,
                                  step=step * args.gradient_accumulation_steps + micro, rank=rank, seed=args.seed)
            return {"input_ids": ids, "labels": ids}  # throughput runs: every position is a target
        # masks drawn from a generator seeded by (seed, step, micro-step, rank): a resumed run masks identically
        generator = torch.Generator().manual_seed(((args.seed * 1_000_003 + step) * 1_009 + micro) * 4_099 + rank)
        ids, labels = mask_tokens(blocks.next_batch(preset.micro_batch), tokenizer, generator=generator)
        return {"input_ids": ids, "labels": labels}

    # 3. The model from its config, sharded by prepare().
    model = model_class(preset)(build_config(preset))
    if not args.no_activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.numel() for p in model.parameters())
    optimizer, scheduler = make_optimizer(model, args, world)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if blocks is not None:
        accelerator.register_for_checkpointing(blocks)

    evaluate = None if tokenizer is None else (lambda: evaluate_mlm(accelerator, model, tokenizer, eval_texts, preset, args))
    train(accelerator, model, optimizer, scheduler, Recipe(FAMILY, batch, evaluate, tokenizer), preset, args, paths, n_params)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
