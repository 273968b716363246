"""The training loop both pretraining recipes run, top to bottom: resume, train with accumulation, log every
step, checkpoint, evaluate, export. A recipe supplies only how to build a batch and what to evaluate."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import mics_hf
from mics_hf.planning.presets import ModelPreset

from .metrics import MetricsWriter, StepMetrics, Stopwatch, mean_over_ranks, summary_table
from .run import print_main, start_trackers


@dataclass
class Recipe:
    """What differs between BERT and GPT pretraining."""

    family: str
    # (step, micro_step) -> model keyword arguments for one micro-batch (input_ids, labels, ...)
    batch: Callable[[int, int], dict[str, torch.Tensor]]
    # () -> {"eval/...": value}; None when there is no held-out text (synthetic data)
    evaluate: Callable[[], dict[str, float]] | None
    tokenizer: Any = None


def train(accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any, recipe: Recipe,
          preset: ModelPreset, args: argparse.Namespace, paths: dict[str, Path], n_params: int) -> list[dict]:
    # 1. Resume: model, optimizer, scheduler, RNG and data position from the latest sharded checkpoint.
    start = 0
    latest = mics_hf.latest_checkpoint(paths["checkpoints"])
    if args.resume and latest is not None:
        accelerator.load_state(str(paths["checkpoints"]))
        start = accelerator.step // args.gradient_accumulation_steps
        print_main(accelerator, f"resumed from {latest} at step {start}")
    start_trackers(accelerator, args, preset, n_params)
    metrics = StepMetrics(
        n_params=n_params, num_gpus=accelerator.num_processes,
        batch_per_rank=preset.micro_batch * args.gradient_accumulation_steps, seq=preset.seq, layers=preset.layers,
        hidden=preset.hidden, vocab=preset.vocab, checkpointing=not args.no_activation_checkpointing,
        device=accelerator.device, dtype=accelerator.mixed_precision if accelerator.mixed_precision != "no" else "fp32",
    )
    writer = MetricsWriter(accelerator, paths["metrics"], total_steps=args.max_steps, start_step=start)
    clock = Stopwatch(accelerator.device)
    accelerator.mics_metrics(reset=True)

    # 2. Train. accumulate() makes non-final micro-steps skip hop 2 (the replica all-reduce) only.
    model.train()
    for step in range(start, args.max_steps):
        clock.start()
        total_loss = torch.zeros((), device=accelerator.device)
        grad_norm = torch.zeros(())
        for micro in range(args.gradient_accumulation_steps):
            inputs = {k: v.to(accelerator.device) for k, v in recipe.batch(step, micro).items()}
            with accelerator.accumulate(model):
                loss = model(**inputs).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            total_loss += loss.detach() / args.gradient_accumulation_steps
        seconds = clock.stop()
        comm = accelerator.mics_metrics(reset=True)  # this step's bytes and calls per op and link class
        # time the step stood still for communication: CUDA events on the compute stream where the engine has
        # them, else the host's blocked time (on CPU the host does the waiting)
        timed = [v for k, v in comm.items() if k.endswith("/exposed_seconds")]
        exposed = sum(timed) if timed else sum(v for k, v in comm.items() if k.endswith("/wait_seconds"))
        writer.write(metrics(step=step + 1, loss=mean_over_ranks(total_loss.float()), lr=scheduler.get_last_lr()[0],
                             grad_norm=float(grad_norm), seconds=seconds, exposed_comm_s=exposed, comm=comm))
        if args.save_steps and (step + 1) % args.save_steps == 0:
            accelerator.save_state(str(paths["checkpoints"]))
        if args.eval_steps and (step + 1) % args.eval_steps == 0 and recipe.evaluate is not None:
            accelerator.log(recipe.evaluate(), step=step + 1)

    # 3. Final evaluation, checkpoint, and a normal Hugging Face model directory. The progress bar and the JSONL
    # file close first: the final rows are appended below, and the export's own progress bar must not interleave.
    writer.close()
    final_eval = recipe.evaluate() if recipe.evaluate is not None else {}
    if final_eval:
        accelerator.log(final_eval, step=args.max_steps)
        if accelerator.is_main_process:
            with open(paths["metrics"], "a") as f:
                f.write(__import__("json").dumps({"step": args.max_steps, **final_eval}) + "\n")
    accelerator.save_state(str(paths["checkpoints"]))
    if not args.no_save_model:
        # the recipe owns <output_dir>/model: a rerun replaces the files it wrote there, nothing else
        mics_hf.save_pretrained(model, paths["model"], tokenizer=recipe.tokenizer, overwrite=True)
    if accelerator.is_main_process:
        print(summary_table(writer.rows))
        for key, value in final_eval.items():
            print(f"{key}: {value:.4f}" if isinstance(value, float) and math.isfinite(value) else f"{key}: {value}")
        print(f"metrics (JSONL): {paths['metrics']}")
        print(f"checkpoints: {paths['checkpoints']}   Hugging Face model: {paths['model']}")
        if args.report_to == "wandb":
            run = accelerator.get_tracker("wandb", unwrap=True)
            print(f"W&B run ({'offline' if getattr(run.settings, 'mode', '') == 'offline' else 'online'}): {run.dir}")
    accelerator.end_training()
    return writer.rows
