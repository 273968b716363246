"""Pretrain a GPT (causal LM) or pre-LayerNorm BERT (masked LM) with the Hugging Face Trainer and `--mics`.

    torchrun --nproc_per_node 4 recipes/pretrain_trainer.py --family gpt --preset tiny \
        --mics '{"partition_size": 4, "devices_per_node": 2}' --output_dir runs/trainer --max_steps 50 \
        --per_device_train_batch_size 8 --gradient_accumulation_steps 2 --logging_steps 1 --report_to wandb

The same pretraining as recipes/pretrain_gpt.py and pretrain_bert.py, written the way Hugging Face's
run_clm.py / run_mlm.py are: arguments through HfArgumentParser, training through the Trainer. The two lines
that make it MiCS: `MiCSTrainingArguments` and `MiCSTrainer` (see README). Per-step throughput (tokens/s,
TFLOPS per GPU in the 8N and 6N conventions) is added to the Trainer's logs and every log line is also written
to `<output_dir>/metrics.jsonl`.

CORNER: the Trainer wants a sized dataset here, so the recipe packs just the blocks the run will consume
(max_steps x global batch) into memory; the Accelerate recipes stream instead.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DataCollatorForLanguageModeling, HfArgumentParser, TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mics_hf  # noqa: E402
from common.data import PackedBlocks, get_tokenizer, text_stream  # noqa: E402
from mics_hf import MiCSTrainer, MiCSTrainingArguments  # noqa: E402
from mics_hf.planning.flops import tflops_per_gpu  # noqa: E402
from mics_hf.planning.presets import build_config, get_preset, model_class  # noqa: E402


@dataclass
class RecipeArguments:
    family: str = field(default="gpt", metadata={"choices": ["gpt", "bert"], "help": "causal LM or masked LM"})
    preset: str = field(default="tiny", metadata={"help": "model shape: tiny, small, gpt2-10b, bert-10b, ..."})
    dataset: str | None = field(default=None, metadata={"help": "a Hub dataset (needs the network)"})
    dataset_config: str | None = None
    train_file: str | None = field(default=None, metadata={"help": "local .txt / .json / .jsonl"})
    tokenizer: str | None = field(default=None, metadata={"help": "a Hub tokenizer; default: trained locally"})
    corpus_bytes: int = 4_000_000


class BlockDataset(torch.utils.data.Dataset):
    def __init__(self, blocks: list[torch.Tensor]) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i]}


class RecipeTrainer(MiCSTrainer):
    """Adds throughput to every training log: samples/s, tokens/s, TFLOPS per GPU (8N and 6N)."""

    def __init__(self, *args, n_params: int, seq: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.n_params, self.seq = n_params, seq
        self._last = (time.perf_counter(), 0)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            now, step = time.perf_counter(), self.state.global_step
            t0, s0 = self._last
            if step > s0:
                a = self.args
                samples = (step - s0) * a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
                seconds = now - t0
                logs["samples_per_s"] = samples / seconds
                logs["tokens_per_s"] = samples * self.seq / seconds
                logs["tflops_per_gpu_8n"] = tflops_per_gpu(self.n_params, samples * self.seq, seconds, a.world_size, factor=8)
                logs["tflops_per_gpu_6n"] = tflops_per_gpu(self.n_params, samples * self.seq, seconds, a.world_size, factor=6)
            self._last = (now, step)
        super().log(logs, *args, **kwargs)


class JsonlWriter(TrainerCallback):
    """Every log line, as the trackers received it, also goes to metrics.jsonl (rank 0)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def main() -> None:
    recipe, args = HfArgumentParser((RecipeArguments, MiCSTrainingArguments)).parse_args_into_dataclasses()
    preset_name = recipe.preset + ("-bert" if recipe.family == "bert" and recipe.preset in ("tiny", "small") else "")
    preset = get_preset(preset_name, family=recipe.family)
    out = Path(args.output_dir)

    texts = lambda: text_stream(dataset=recipe.dataset, dataset_config=recipe.dataset_config,  # noqa: E731
                                train_file=recipe.train_file, text_column="text", max_bytes=recipe.corpus_bytes)
    with args.main_process_first(desc="tokenizer"):
        tokenizer = get_tokenizer(recipe.family, name=recipe.tokenizer, cache_dir=out.parent / ".tokenizers",
                                  texts=texts, vocab_size=preset.vocab)
    preset = dataclasses.replace(preset, vocab=len(tokenizer))
    needed = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    packer = PackedBlocks(texts, tokenizer, seq_len=preset.seq, rank=0, world_size=1, family=recipe.family)
    blocks = list(packer.next_batch(max(needed, 1)))  # the Trainer shards this dataset across ranks itself

    model = model_class(preset)(build_config(preset))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=recipe.family == "bert", mlm_probability=0.15)
    trainer = RecipeTrainer(
        model=model, args=args, train_dataset=BlockDataset(blocks), data_collator=collator,
        processing_class=tokenizer, callbacks=[JsonlWriter(out / "metrics.jsonl")],
        n_params=sum(p.numel() for p in model.parameters()), seq=preset.seq,
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model()  # full weights, the normal Hugging Face layout
    if trainer.is_world_process_zero():
        print(f"metrics (JSONL): {out / 'metrics.jsonl'}   model: {out}   MiCS: {mics_hf.is_sharded(trainer.model)}")
    mics_hf.close_process_group()  # leave together, then close the group (see mics_hf.engine.teardown)


if __name__ == "__main__":
    main()
