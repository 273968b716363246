"""The pieces of a recipe that are the same for BERT and GPT: setup (arguments, accelerator, data), optimizer,
trackers, evaluation, dry runs."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from mics_hf.planning.flops import model_state_bytes_per_rank
from mics_hf.planning.presets import ModelPreset, count_parameters

from .cli import build_parser, output_paths, resolve_preset, split_stream
from .data import PackedBlocks, mask_tokens

METRICS_DIR = Path(__file__).resolve().parents[1] / "metrics"


def make_accelerator(args: argparse.Namespace, paths: dict[str, Path]) -> Any:
    """The accelerator: its MiCS settings come from the launching config's `mics` block (or MICS_CONFIG)."""
    from accelerate.utils import ProjectConfiguration

    import mics_hf

    return mics_hf.MiCSAccelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with="wandb" if args.report_to == "wandb" else None,
        project_config=ProjectConfiguration(project_dir=str(paths["root"]), total_limit=args.save_total_limit),
    )


@dataclasses.dataclass
class Data:
    """The text side of a run: tokenizer, this rank's packed training blocks, the held-out documents."""

    preset: ModelPreset  # with `vocab` set to the tokenizer's size
    tokenizer: Any = None
    blocks: PackedBlocks | None = None
    eval_texts: Callable[[], Iterator[str]] | None = None


def make_data(accelerator: Any, args: argparse.Namespace, paths: dict[str, Path], preset: ModelPreset, family: str) -> Data:
    """Text stream -> tokenizer (rank 0 trains it first, the others read its cache) -> blocks of `seq` tokens."""
    from .data import get_tokenizer, text_stream

    if args.synthetic:
        return Data(preset)
    texts = lambda: text_stream(dataset=args.dataset, dataset_config=args.dataset_config,  # noqa: E731
                                train_file=args.train_file, text_column=args.text_column, max_bytes=args.corpus_bytes)
    train_texts = split_stream(texts, args.eval_every_nth_document, held_out=False)
    with accelerator.main_process_first():
        tokenizer = get_tokenizer(family, name=args.tokenizer, cache_dir=paths["tokenizer_cache"],
                                  texts=train_texts, vocab_size=preset.vocab)
    preset = dataclasses.replace(preset, vocab=len(tokenizer))  # the embedding matches the tokenizer
    blocks = PackedBlocks(train_texts, tokenizer, seq_len=preset.seq, rank=accelerator.process_index,
                          world_size=accelerator.num_processes, family=family)
    return Data(preset, tokenizer, blocks, split_stream(texts, args.eval_every_nth_document, held_out=True))


@dataclasses.dataclass
class Setup:
    """What a recipe starts from: its arguments, output paths, accelerator and this rank's data."""

    args: argparse.Namespace
    paths: dict[str, Path]
    accelerator: Any
    data: Data  # data.preset is the resolved preset, its `vocab` set to the tokenizer's size


def setup(family: str, description: str) -> Setup | None:
    """Parse the command line, resolve the preset, build the accelerator and this rank's data.

    Returns None after --dry_run, which sizes the model without allocating it (and without an accelerator).
    """
    args = build_parser(family, description).parse_args()
    if family == "bert" and args.preset in ("tiny", "small"):
        args.preset += "-bert"  # the CPU presets have a BERT twin with BERT's vocabulary layout
    preset = resolve_preset(args, family)
    if args.dry_run:
        dry_run(preset, args.partition_size_for_report)
        return None
    paths = output_paths(args)
    accelerator = make_accelerator(args, paths)
    # Seeded after the accelerator exists and before data and model are built: the same initial weights on
    # every rank.
    torch.manual_seed(args.seed)
    return Setup(args, paths, accelerator, make_data(accelerator, args, paths, preset, family))


def build_model(accelerator: Any, preset: ModelPreset, args: argparse.Namespace) -> torch.nn.Module:
    """The model from its config. Under MiCS it is created on the meta device and materialised one unit at a
    time by prepare(), so no rank ever holds the whole model: that is how the 10B-175B presets fit."""
    import contextlib

    from accelerate import init_empty_weights

    from mics_hf.planning.presets import build_config, model_class

    meta = init_empty_weights(include_buffers=False) if accelerator.mics_enabled else contextlib.nullcontext()
    with meta:
        model = model_class(preset)(build_config(preset))
    if not args.no_activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def print_main(accelerator: Any, text: str) -> None:
    if accelerator.is_main_process:
        print(text, flush=True)


def dry_run(preset: ModelPreset, partition_size: int) -> None:
    """Size a model without allocating it: parameters counted on the meta device."""
    n = count_parameters(preset)
    per_rank = model_state_bytes_per_rank(n, partition_size)
    print(f"preset {preset.name}: {n:,} parameters ({n / 1e9:.2f}B); hidden {preset.hidden}, {preset.layers} layers, "
          f"{preset.heads} heads, FFN {preset.ffn}, vocab {preset.vocab}, seq {preset.seq}")
    print(f"model states (fp32 master + Adam + bf16/fp16 copy, 16 bytes/parameter): {16 * n / 1e9:.1f} GB in total, "
          f"{per_rank / 1e9:.2f} GB per rank with partition_size={partition_size}")
    if preset.note:
        print(f"note: {preset.note}")


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, num_processes: int):
    """AdamW without weight decay on biases and norms, linear warm-up then cosine decay (HF's example scripts).

    Accelerate steps a prepared scheduler once per process per optimizer step (its convention for batches
    that grow with the world), so the schedule's lengths are multiplied by the number of processes, as in
    Hugging Face's `accelerate` examples.
    """
    from transformers import get_scheduler

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate, betas=(0.9, 0.95), eps=1e-8,
    )
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=args.warmup_steps * num_processes,
                              num_training_steps=args.max_steps * num_processes)
    return optimizer, scheduler


def start_trackers(accelerator: Any, args: argparse.Namespace, preset: ModelPreset, n_params: int) -> None:
    """Log the full configuration once: arguments, model shape, parameter count, MiCS settings, world size."""
    config = {**vars(args), **{f"model_{k}": v for k, v in dataclasses.asdict(preset).items()}}
    config.update(n_params=n_params, world_size=accelerator.num_processes,
                  mics=dict(accelerator.mics_settings or {}), mixed_precision=accelerator.mixed_precision)
    kwargs = {}
    if args.report_to == "wandb":
        wandb_dir = Path(args.output_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        tags = [t for t in args.tags.split(",") if t]
        kwargs = {"wandb": {"name": args.run_name, "tags": tags, "dir": str(wandb_dir)}}
    accelerator.init_trackers(args.wandb_project, config=config, init_kwargs=kwargs)


def _eval_blocks(accelerator: Any, tokenizer: Any, texts: Callable[[], Iterator[str]], preset: ModelPreset, family: str) -> PackedBlocks:
    return PackedBlocks(texts, tokenizer, seq_len=preset.seq, rank=accelerator.process_index,
                        world_size=accelerator.num_processes, family=family)


@torch.no_grad()
def evaluate_perplexity(accelerator: Any, model: torch.nn.Module, tokenizer: Any, texts: Callable[[], Iterator[str]],
                        preset: ModelPreset, args: argparse.Namespace) -> dict[str, float]:
    """Causal-LM perplexity on held-out documents, through the project's `perplexity` metric module."""
    import evaluate

    blocks = _eval_blocks(accelerator, tokenizer, texts, preset, "gpt")
    model.eval()
    losses = []
    for _ in range(args.eval_batches):
        ids = blocks.next_batch(preset.micro_batch).to(accelerator.device)
        logits = model(input_ids=ids).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none")
        losses.append(accelerator.gather_for_metrics(nll))
    model.train()
    result = evaluate.load(str(METRICS_DIR / "perplexity")).compute(losses=torch.cat(losses).cpu().double().numpy())
    return {"eval/perplexity": result["perplexity"], "eval/loss": result["mean_nll"]}


@torch.no_grad()
def evaluate_mlm(accelerator: Any, model: torch.nn.Module, tokenizer: Any, texts: Callable[[], Iterator[str]],
                 preset: ModelPreset, args: argparse.Namespace) -> dict[str, float]:
    """Masked-LM accuracy and perplexity over masked tokens, through the project's metric modules."""
    import evaluate

    blocks = _eval_blocks(accelerator, tokenizer, texts, preset, "bert")
    generator = torch.Generator().manual_seed(10_000 + args.seed)  # the same masks at every evaluation
    model.eval()
    preds, refs, nlls = [], [], []
    for _ in range(args.eval_batches):
        ids, labels = mask_tokens(blocks.next_batch(preset.micro_batch), tokenizer, generator=generator)
        ids, labels = ids.to(accelerator.device), labels.to(accelerator.device)
        logits = model(input_ids=ids).logits.float()
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="none", ignore_index=-100)
        # every rank gathers whole batches (same shapes everywhere: gloo cannot gather ragged tensors); the
        # unmasked positions carry reference -100 and are dropped after the gather
        preds.append(accelerator.gather_for_metrics(logits.argmax(-1).reshape(-1)))
        refs.append(accelerator.gather_for_metrics(labels.reshape(-1)))
        nlls.append(accelerator.gather_for_metrics(nll))
    model.train()
    refs_all = torch.cat(refs).cpu()
    keep = refs_all != -100
    acc = evaluate.load(str(METRICS_DIR / "mlm_accuracy")).compute(
        predictions=torch.cat(preds).cpu()[keep].numpy(), references=refs_all[keep].numpy())
    ppl = evaluate.load(str(METRICS_DIR / "perplexity")).compute(losses=torch.cat(nlls).cpu()[keep].double().numpy())
    return {"eval/mlm_accuracy": acc["mlm_accuracy"], "eval/perplexity": ppl["perplexity"], "eval/loss": ppl["mean_nll"]}
