"""An Accelerate script written the way Accelerate's nlp_example.py is, with the one-word MiCS change.

`Accelerator(cpu=False, ...)` -> `MiCSAccelerator(cpu=False, ...)`. The model is loaded with from_pretrained,
moved with `.to(accelerator.device)` before prepare(), trained, and saved with
`accelerator.unwrap_model(model).save_pretrained(dir, is_main_process=..., save_function=accelerator.save)`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import mics_hf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    accelerator = mics_hf.MiCSAccelerator(cpu=False, mixed_precision="no")  # was: Accelerator(cpu=False, ...)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    model = model.to(accelerator.device)
    optimizer = torch.optim.AdamW(params=model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    g = torch.Generator().manual_seed(accelerator.process_index)
    for _ in range(2):
        ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=g).to(accelerator.device)
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.save_pretrained(args.out, is_main_process=accelerator.is_main_process, save_function=accelerator.save)
    full = mics_hf.full_state_dict(model)
    if accelerator.is_main_process:
        loaded = AutoModelForCausalLM.from_pretrained(args.out)  # full weights, no size mismatch
        same = all(torch.equal(loaded.state_dict()[k], v) for k, v in full.items())
        Path(args.out + ".json").write_text(json.dumps({
            "mics": mics_hf.is_sharded(model), "world": accelerator.num_processes, "same": same,
        }))
    accelerator.end_training()


if __name__ == "__main__":
    main()
