"""Command-line arguments shared by the BERT and GPT recipes, and what they resolve to.

Flag names follow Hugging Face's example scripts (`--dataset_name`-style names are kept short here:
`--dataset`, `--dataset_config`, `--train_file`, `--output_dir`, `--report_to`, ...).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Iterator

from mics_hf.planning.presets import PRESETS, ModelPreset, get_preset

OVERRIDES = ("hidden", "layers", "heads", "ffn", "vocab", "seq", "micro_batch")


def build_parser(family: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model shape (the paper's, or tiny/small for CPU)")
    for name in OVERRIDES:
        m.add_argument(f"--{name}", type=int, default=None, help=f"override the preset's {name}")
    m.add_argument("--no_activation_checkpointing", action="store_true", help="keep activations (faster, more memory)")
    m.add_argument("--dry_run", action="store_true", help="build on the meta device, print size and per-rank state memory, exit")
    m.add_argument("--partition_size_for_report", type=int, default=8, help="p used by --dry_run's memory report")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default=None, help="a Hub dataset name (needs the network), e.g. " +
                   ("wikipedia" if family == "bert" else "openwebtext"))
    d.add_argument("--dataset_config", default=None)
    d.add_argument("--train_file", default=None, help="local .txt / .json / .jsonl file (field --text_column)")
    d.add_argument("--text_column", default="text")
    d.add_argument("--synthetic", action="store_true", help="random tokens: pure throughput runs")
    d.add_argument("--tokenizer", default=None, help="a Hub tokenizer name; default: train one locally on the corpus")
    d.add_argument("--corpus_bytes", type=int, default=4_000_000, help="cap on the offline corpus size")
    d.add_argument("--eval_every_nth_document", type=int, default=20, help="documents held out for evaluation")
    t = p.add_argument_group("training")
    t.add_argument("--max_steps", type=int, default=50)
    t.add_argument("--gradient_accumulation_steps", type=int, default=1)
    t.add_argument("--learning_rate", type=float, default=1e-3)
    t.add_argument("--weight_decay", type=float, default=0.01)
    t.add_argument("--warmup_steps", type=int, default=10)
    t.add_argument("--max_grad_norm", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--output_dir", default="runs/" + family)
    t.add_argument("--save_steps", type=int, default=0, help="sharded checkpoint every N steps (0: only at the end)")
    t.add_argument("--save_total_limit", type=int, default=2)
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    t.add_argument("--eval_steps", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    t.add_argument("--eval_batches", type=int, default=4)
    t.add_argument("--no_save_model", action="store_true", help="skip the final Hugging Face export")
    w = p.add_argument_group("tracking")
    w.add_argument("--report_to", choices=("none", "wandb"), default="none")
    w.add_argument("--wandb_project", default="mics_hf")
    w.add_argument("--run_name", default=None)
    w.add_argument("--tags", default="", help="comma-separated W&B tags")
    return p


def resolve_preset(args: argparse.Namespace, family: str) -> ModelPreset:
    overrides = {k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None}
    return get_preset(args.preset, family=family, **overrides)


def split_stream(factory: Callable[[], Iterator[str]], every: int, *, held_out: bool) -> Callable[[], Iterator[str]]:
    """Hold out every n-th document for evaluation (the offline corpus has no eval split of its own)."""

    def stream() -> Iterator[str]:
        for i, text in enumerate(factory()):
            if (i % every == every - 1) == held_out:
                yield text

    return stream


def output_paths(args: argparse.Namespace) -> dict[str, Path]:
    out = Path(args.output_dir)
    return {
        "root": out,
        "metrics": out / "metrics.jsonl",
        "checkpoints": out / "checkpoints",
        "model": out / "model",
        "tokenizer_cache": out.parent / ".tokenizers",
    }
