"""A stock-style Trainer script with the two-line MiCS change, for `torchrun` tests (tiny causal LM, CPU).

    parser = HfArgumentParser((ScriptArguments, MiCSTrainingArguments))   # was TrainingArguments
    trainer = MiCSTrainer(model=model, args=args, ...)                     # was Trainer
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, HfArgumentParser

sys.path.insert(0, str(Path(__file__).parent))

import mics_hf  # noqa: E402
from mics_hf import MiCSTrainer, MiCSTrainingArguments  # noqa: E402
from models import VOCAB, tiny_gpt2  # noqa: E402


@dataclass
class ScriptArguments:
    report: str = ""  # where rank 0 writes the final full weights (.safetensors) and a JSON report
    model_name_or_path: str = ""  # a save_pretrained directory, loaded the stock scripts' way
    generate: bool = False  # after training, every rank decodes a prompt of its own length


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int = 12, seed: int = 7) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    script, args = HfArgumentParser((ScriptArguments, MiCSTrainingArguments)).parse_args_into_dataclasses()
    torch.use_deterministic_algorithms(True)
    if script.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(script.model_name_or_path)  # as run_clm.py does
        deferred = next(model.parameters()).is_meta  # --mics reads it into the shards instead
    else:
        model, deferred = tiny_gpt2(), False
    trainer = MiCSTrainer(model=model, args=args, train_dataset=TokenDataset(256), eval_dataset=TokenDataset(32, seed=8))
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    trainer.save_model()
    generated = None
    if script.generate:
        rank = trainer.args.process_index
        prompt = torch.randint(1, VOCAB, (1, 2 + rank), generator=torch.Generator().manual_seed(rank))
        with torch.no_grad():
            generated = trainer.model.generate(prompt, max_new_tokens=2 + 3 * rank, do_sample=False, pad_token_id=0).tolist()
    state = mics_hf.full_state_dict(trainer.model) if mics_hf.is_sharded(trainer.model) else trainer.model.state_dict()
    if script.report and trainer.is_world_process_zero():
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in state.items() if k != "lm_head.weight"}, script.report + ".safetensors")
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        Path(script.report + ".json").write_text(json.dumps({
            "mics": mics_hf.is_sharded(trainer.model),
            "losses": losses,
            "eval_loss": metrics["eval_loss"],
            "world": trainer.args.world_size,
            "log_keys": sorted({k for e in trainer.state.log_history for k in e}),
            "deferred": deferred,
            "best": trainer.state.best_model_checkpoint,
            "generated": generated,
        }))
    mics_hf.close_process_group()  # leave together, then close the group (see mics_hf.engine.teardown)

if __name__ == "__main__":
    main()
