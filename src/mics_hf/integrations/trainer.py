"""`--mics` for Hugging Face Trainer scripts: MiCSTrainingArguments and MiCSTrainer.

The two-line change to a stock script: parse `MiCSTrainingArguments` instead of `TrainingArguments` and build
`MiCSTrainer` instead of `Trainer`. Then `--mics` (alone: settings from MICS_CONFIG / the launching Accelerate
config / defaults; with a value: JSON or a JSON/YAML path) turns MiCS on, the way `--fsdp` and `--deepspeed` do.

Checkpoints written at `--save_steps` hold the sharded model and optimizer state (`checkpoint-N/mics/`, the
mics_hf format: every rank writes only its shard, and a resume may use another number of processes);
`save_model()` writes the normal Hugging Face layout with full weights.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME

from ..checkpoint import latest_checkpoint, load_checkpoint, restore_rng_state, save_checkpoint
from ..checkpoint.state_dict import full_state_dict
from ..engine.shard import get_state, is_sharded
from ..engine.topology import require_divides
from .accelerate import MiCSAccelerator
from .accelerate import _unwrap_optimizer as _raw
from .pretrained import start_deferring, stop_deferring
from .settings import MiCSSettings, parse_mics_value, resolve_mics_settings

__all__ = ["MiCSTrainingArguments", "MiCSTrainer", "MICS_CHECKPOINT_SUBDIR"]

logger = transformers.utils.logging.get_logger(__name__)

MICS_CHECKPOINT_SUBDIR = "mics"


@dataclass
class MiCSTrainingArguments(TrainingArguments):
    """TrainingArguments plus `--mics` (see the module docstring)."""

    mics: str | None = field(
        default=None,
        metadata={
            "help": (
                "Shard with MiCS. Alone: settings from $MICS_CONFIG, the launching Accelerate config's `mics` "
                "block, or defaults. With a value: a JSON string such as '{\"partition_size\": 8}' or a path to a "
                "JSON/YAML file with the same keys as the Accelerate `mics` block."
            ),
            "nargs": "?",
            "const": "",
        },
    )

    def __post_init__(self) -> None:
        if self.mics is not None:
            # Checked before TrainingArguments sets anything up, so nothing (no model, no process group) is touched.
            if self.fsdp not in (None, "", [], False) and str(self.fsdp) not in ("[]", ""):
                raise ValueError("--mics and --fsdp both shard the model; choose one (MiCS replaces FSDP)")
            if self.deepspeed:
                raise ValueError("--mics and --deepspeed both shard the model; choose one (MiCS replaces ZeRO)")
            self._mics_settings = self._resolve_mics()
            # The stock scripts load the model after parsing the arguments: read it straight into shards (see
            # integrations/pretrained.py) instead of a full copy per process.
            start_deferring()
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            # torchrun on a machine without GPUs: without this every process would train alone, silently.
            self.use_cpu = True
        super().__post_init__()

    def _resolve_mics(self) -> MiCSSettings:
        if self.mics == "":
            settings = resolve_mics_settings(None) or MiCSSettings({}, "defaults")
        else:
            settings = MiCSSettings(parse_mics_value(self.mics, what="--mics"), "--mics")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        p = settings.get("partition_size")
        if p is not None:
            require_divides("--mics partition_size", p, world, f"the world size {world}", choices="partition sizes that divide it:")
        return settings

    @property
    def mics_settings(self) -> MiCSSettings | None:
        return getattr(self, "_mics_settings", None)

    @property
    def place_model_on_device(self) -> bool | None:
        # MiCS places the shards itself: moving the whole model to every device first is what it avoids.
        return False if self.mics_settings is not None else super().place_model_on_device


class MiCSTrainer(Trainer):
    """A Trainer that shards with mics_hf when its arguments carry `--mics` (otherwise a plain Trainer)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.mics_enabled and self.model is not None and not is_sharded(self.model):
            # Shard now, not at train(): evaluate() / predict() / generate() before training then run on the
            # sharded model, and a model deferred by --mics is read from its checkpoint here.
            self.model = self.accelerator.prepare_model(self.model)
            self.model_wrapped = self.model
        stop_deferring()

    @property
    def mics_enabled(self) -> bool:
        return getattr(self.args, "mics_settings", None) is not None

    @contextlib.contextmanager
    def _accelerator_class(self) -> Iterator[None]:
        # Trainer builds `Accelerator(**args)` from a module-level name after ~50 lines of argument plumbing;
        # swapping the name for the duration of that one call reuses all of it instead of copying it.
        original = transformers.trainer.Accelerator
        transformers.trainer.Accelerator = functools.partial(MiCSAccelerator, mics=dict(self.args.mics_settings))
        try:
            yield
        finally:
            transformers.trainer.Accelerator = original

    def create_accelerator_and_postprocess(self) -> None:
        if not self.mics_enabled:
            return super().create_accelerator_and_postprocess()
        with self._accelerator_class():
            super().create_accelerator_and_postprocess()

    # ---- saving ---------------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not (self.mics_enabled and is_sharded(self.model)):
            return super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir or self.args.output_dir
        if _internal_call:  # a --save_steps checkpoint: sharded model (+ optimizer) state, written by every rank
            optimizer = None if self.args.save_only_model else _raw(self.optimizer)
            save_checkpoint(
                Path(output_dir) / MICS_CHECKPOINT_SUBDIR, self.model, optimizer, step=self.state.global_step,
                scheduler=None if self.args.save_only_model else self.lr_scheduler,
                scaler=self.accelerator.scaler, overwrite=True,
            )
            if self.args.should_save:
                self._save_beside_shards(output_dir)
            return
        state = full_state_dict(self.model)  # every rank gathers; rank 0 keeps the full tensors
        if self.args.should_save:
            self._save(output_dir, state_dict=state)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_beside_shards(self, output_dir: str) -> None:
        """What `checkpoint-N/` holds besides the shards, as for DDP: config, generation config, tokenizer and
        training arguments (weights: `mics-hf export checkpoint-N/mics <dir>`)."""
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        for part in (getattr(model, "config", None), getattr(model, "generation_config", None)):
            if part is not None and hasattr(part, "save_pretrained"):
                part.save_pretrained(output_dir)
        if hasattr(self.model, "peft_config"):
            for name, peft_config in self.model.peft_config.items():
                peft_config.save_pretrained(output_dir if name == "default" else os.path.join(output_dir, name))
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_best_model(self) -> None:
        if not (self.mics_enabled and is_sharded(self.model)):
            return super()._load_best_model()
        best = self.state.best_model_checkpoint
        logger.info(f"Loading best model from {best} (score: {self.state.best_metric}).")
        load_checkpoint(self._mics_checkpoint(best), self.model, restore_rng=False)  # the weights only

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.mics_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)  # MiCS: already in checkpoint-N/mics

    def _save_rng_state(self, output_dir: str) -> None:
        if not self.mics_enabled:
            return super()._save_rng_state(output_dir)  # MiCS: per-rank RNG is in checkpoint-N/mics

    def _save_scaler(self, output_dir: str) -> None:
        if not self.mics_enabled:
            return super()._save_scaler(output_dir)

    # ---- resuming -------------------------------------------------------------------------------------
    def _mics_checkpoint(self, checkpoint: str) -> Path:
        root = Path(checkpoint) / MICS_CHECKPOINT_SUBDIR
        if latest_checkpoint(root) is None:
            raise ValueError(
                f"{checkpoint} holds no MiCS checkpoint ({root} is missing or incomplete); resume from a checkpoint "
                "written by a --mics run, or drop --mics"
            )
        return root

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not self.mics_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        self._mics_checkpoint(resume_from_checkpoint)  # fail early; the state is loaded once the model is sharded

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if not self.mics_enabled or checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        load_checkpoint(
            self._mics_checkpoint(checkpoint), self.model, _raw(self.optimizer), scheduler=self.lr_scheduler,
            scaler=self.accelerator.scaler, restore_rng=False,
        )

    def _load_scaler(self, checkpoint: str | None) -> None:
        if not self.mics_enabled:
            return super()._load_scaler(checkpoint)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if not self.mics_enabled or checkpoint is None:
            return super()._load_rng_state(checkpoint)
        restore_rng_state(self._mics_checkpoint(checkpoint))

    # ---- metrics --------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.mics_enabled and is_sharded(self.model) and "loss" in logs:
            logs = {**logs, **self.accelerator.mics_metrics(self.model, reset=True)}
            logs["mics/replication_size"] = get_state(self.model).topology.replication_size
        return super().log(logs, *args, **kwargs)

