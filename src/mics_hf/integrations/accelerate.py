"""MiCSAccelerator: a drop-in `accelerate.Accelerator` that shards prepared models with MiCS.

With MiCS settings found (see integrations/config.py) it replaces DDP wrapping by `shard_model`, points the
optimizers at the shards whatever order `prepare()` gets them in, keeps `accumulate()` / `no_sync()` skipping
only hop 2, clips the global norm, saves and loads sharded checkpoints, and gives full weights to
`get_state_dict` / `save_model`. Without settings it is a plain Accelerator.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import DynamoBackend

from ..checkpoint import load_checkpoint, save_checkpoint
from ..checkpoint.state_dict import full_state_dict
from ..config import COMPILE_KEYS, MiCSConfig
from ..engine.optim import clip_grad_norm_ as mics_clip_grad_norm_
from ..engine.shard import get_state, is_sharded, shard_model, sharded_param_for
from ..engine.stats import comm_stats
from ..engine.teardown import close_process_group
from ..engine.topology import build_topology, node_map_from_devices_per_node
from .pretrained import pending_checkpoint, shard_pretrained
from .settings import MiCSSettings, launcher_devices_per_node, resolve_mics_settings

__all__ = ["MiCSAccelerator"]

_MIXED_TO_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _unwrap_optimizer(opt: Any) -> torch.optim.Optimizer:
    while isinstance(opt, AcceleratedOptimizer):
        opt = opt.optimizer
    return opt


class MiCSAccelerator(Accelerator):
    """An Accelerator whose models are sharded with MiCS when MiCS settings are found.

    `mics` (argument): a MiCSConfig, a mapping of its keys, a JSON string or a JSON/YAML path. Otherwise the
    `MICS_CONFIG` environment variable, then the `mics` block (under `fsdp_config`) of the Accelerate config
    file that launched the process. `mixed_precision` of the Accelerator (or the file) sets `param_dtype` when
    the block does not.
    """

    def __init__(self, *args: Any, mics: MiCSConfig | Mapping[str, Any] | str | None = None, **kwargs: Any) -> None:
        settings = resolve_mics_settings(mics)  # bad settings fail here, before any process group exists
        if settings is not None:
            for var, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
                if os.environ.get(var, "false").lower() == "true":
                    raise ValueError(
                        f"MiCS settings came from {settings.source}, but the launch enabled {name}; MiCS replaces "
                        f"{name}: launch with distributed_type MULTI_GPU, or drop the MiCS settings"
                    )
            for key in ("fsdp_plugin", "deepspeed_plugin", "deepspeed_plugins"):
                if kwargs.get(key) is not None:
                    raise ValueError(f"MiCSAccelerator got both MiCS settings ({settings.source}) and {key}; use one")
        if not kwargs.get("cpu") and not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # A MULTI_GPU launch on a machine without GPUs: run the ranks on CPU with gloo, also when the script
            # says cpu=False (Accelerate's examples do). Otherwise every process would train alone, silently.
            kwargs["cpu"] = True
        super().__init__(*args, **kwargs)
        self.mics_settings: MiCSSettings | None = settings
        self.mics_config: MiCSConfig | None = self._build_config(settings) if settings is not None else None
        if self.mics_config is not None and self.mixed_precision == "fp16" and self.scaler is not None:
            from ..engine.optim import sharded_grad_scaler

            self.scaler = sharded_grad_scaler(self.device.type)

    # ---- configuration --------------------------------------------------------------------------------
    def _build_config(self, settings: MiCSSettings) -> MiCSConfig:
        values = dict(settings)
        if values.get("devices_per_node") is None and values.get("node_of_rank") is None:
            k = launcher_devices_per_node()
            if k is not None and self.num_processes % k == 0:
                values["devices_per_node"] = k
        if values.get("param_dtype") is None and self.mixed_precision in _MIXED_TO_DTYPE:
            values["param_dtype"] = _MIXED_TO_DTYPE[self.mixed_precision]
        dynamo = self.state.dynamo_plugin
        if not values.get("compile") and dynamo is not None and dynamo.backend != DynamoBackend.NO:
            # Accelerate's dynamo settings (and the Trainer's --torch_compile) compile each unit's forward: a
            # whole-model torch.compile would trace MiCS's hooks and collectives, so prepare() never does that.
            values["compile"] = {k: v for k, v in dynamo.to_kwargs().items() if k in COMPILE_KEYS and v is not None}
        config = MiCSConfig.from_dict(values)
        # Validate the layout now, before any model is touched: a partition size that does not fit is an error
        # at construction time, not after the model was loaded.
        k = config.devices_per_node or launcher_devices_per_node() or self.num_processes
        nodes = config.node_of_rank or node_map_from_devices_per_node(self.num_processes, k)
        try:
            build_topology(
                world_size=self.num_processes, rank=self.process_index, node_of_rank=nodes,
                partition_size=config.partition_size, hierarchical=config.hierarchical,
            )
        except ValueError as exc:
            raise ValueError(f"MiCS settings from {settings.source}: {exc}") from exc
        return config

    @property
    def mics_enabled(self) -> bool:
        return self.mics_config is not None

    # ---- prepare --------------------------------------------------------------------------------------
    def prepare(self, *args: Any, device_placement: list[bool] | None = None) -> Any:
        if not self.mics_enabled:
            return super().prepare(*args, device_placement=device_placement)
        # Shard every model first, then point every optimizer at the shards: prepare() may get them in any order.
        models = [self.prepare_model(obj) if isinstance(obj, nn.Module) else obj for obj in args]
        sharded = [m for m in models if isinstance(m, nn.Module) and is_sharded(m)]
        for obj in models:
            if isinstance(obj, torch.optim.Optimizer):
                self._point_optimizer_at_shards(_unwrap_optimizer(obj), sharded)
        return super().prepare(*models, device_placement=device_placement)

    def prepare_model(self, model: nn.Module, device_placement: bool | None = None, evaluation_mode: bool = False) -> nn.Module:
        if not self.mics_enabled:
            return super().prepare_model(model, device_placement=device_placement, evaluation_mode=evaluation_mode)
        if not is_sharded(model):
            place = device_placement is None or device_placement
            on_meta = any(p.is_meta for p in model.parameters())
            if pending_checkpoint(model) is not None:
                # loaded under --mics / mics_hf.from_pretrained's deferral: each rank reads its rows of the files
                shard_pretrained(model, self.mics_config, device=self.device)
            else:
                # a meta-device model is materialised unit by unit on this process's device; a materialised one
                # is sharded where it is and only its shards move (never a full copy of the model per device)
                shard_model(model, self.mics_config, device=self.device if (on_meta or place) else None)
        if model not in self._models:
            self._models.append(model)
        return model

    def _point_optimizer_at_shards(self, optimizer: torch.optim.Optimizer, models: list[nn.Module]) -> None:
        shards = {id(p) for m in models for p in m.parameters()}
        if optimizer.state and any(id(p) not in shards for group in optimizer.param_groups for p in group["params"]):
            raise ValueError(
                "the optimizer already has state for the unsharded parameters; create it fresh (before training) "
                "and pass it to prepare() with the model"
            )
        for group in optimizer.param_groups:
            new = []
            for p in group["params"]:
                if id(p) in shards:
                    new.append(p)
                    continue
                shard = next((s for m in models if (s := sharded_param_for(m, p)) is not None), None)
                if shard is None:
                    raise ValueError(
                        f"the optimizer holds a parameter of shape {tuple(p.shape)} that belongs to no model passed to "
                        "prepare(); pass the model and its optimizer to the same prepare() call"
                    )
                new.append(shard)
            group["params"] = new

    # ---- gradients ------------------------------------------------------------------------------------
    def _model_of(self, parameters: Iterable[torch.Tensor] | nn.Module) -> nn.Module | None:
        if isinstance(parameters, nn.Module):
            return parameters if is_sharded(parameters) else None
        params = list(parameters) if not isinstance(parameters, torch.Tensor) else [parameters]
        ids = {id(p) for p in params}
        for model in self._models:
            if is_sharded(model):
                own = {id(p) for p in model.parameters()}
                if ids and ids <= own:
                    if ids != own:
                        raise ValueError(
                            "clip_grad_norm_ of a MiCS model clips the whole model's gradient; pass "
                            "model.parameters() (all of them), not a subset"
                        )
                    return model
        return None

    def clip_grad_norm_(self, parameters: Any, max_norm: float, norm_type: float = 2) -> torch.Tensor:
        if not self.mics_enabled:
            return super().clip_grad_norm_(parameters, max_norm, norm_type=norm_type)
        model = self._model_of(parameters)
        if model is None:
            return super().clip_grad_norm_(parameters, max_norm, norm_type=norm_type)
        self.unscale_gradients()
        return mics_clip_grad_norm_(model, max_norm, norm_type=norm_type)

    # ---- state ----------------------------------------------------------------------------------------
    def get_state_dict(self, model: nn.Module, unwrap: bool = True) -> dict[str, torch.Tensor]:
        if self.mics_enabled and is_sharded(model):
            return full_state_dict(model)
        return super().get_state_dict(model, unwrap=unwrap)

    def mics_metrics(self, model: nn.Module | None = None, *, reset: bool = True) -> dict[str, float]:
        """Communication counters of a MiCS model (bytes/calls per op and link class), ready for `log()`."""
        model = model or next((m for m in self._models if is_sharded(m)), None)
        if model is None:
            return {}
        stats = comm_stats(model)
        out = {f"mics/{k}": v for k, v in stats.as_dict().items()}
        out["mics/partition_size"] = get_state(model).topology.partition_size
        if reset:
            stats.reset()
        return out

    def _pairs(self) -> list[tuple[nn.Module, Any, Any]]:
        """(model, its optimizer, its scheduler) for every MiCS model, matched by parameters."""
        pairs = []
        for model in self._models:
            if not is_sharded(model):
                continue
            own = {id(p) for p in model.parameters()}
            opt = next(
                (o for o in self._optimizers if any(id(p) in own for g in _unwrap_optimizer(o).param_groups for p in g["params"])),
                None,
            )
            raw_opt = _unwrap_optimizer(opt) if opt is not None else None
            sched = next(
                (s.scheduler for s in self._schedulers if isinstance(s, AcceleratedScheduler) and _unwrap_optimizer(s.scheduler.optimizer) is raw_opt),
                None,
            )
            pairs.append((model, raw_opt, sched))
        return pairs

    def save_state(self, output_dir: str | None = None, safe_serialization: bool = True, **kwargs: Any) -> str:
        """Sharded, atomic checkpoint of every MiCS model with its optimizer, scheduler, scaler and RNG."""
        if not self.mics_enabled:
            return super().save_state(output_dir, safe_serialization=safe_serialization, **kwargs)
        if output_dir is None:
            if not self.project_configuration.automatic_checkpoint_naming:
                raise ValueError("save_state needs an output_dir (or ProjectConfiguration(automatic_checkpoint_naming=True))")
            output_dir = os.path.join(self.project_dir, "checkpoints", f"checkpoint_{self.save_iteration}")
            self.project_configuration.iteration += 1
        custom = {}
        for i, obj in enumerate(self._custom_objects):
            custom[str(i)] = obj.state_dict()
        for i, (model, opt, sched) in enumerate(self._pairs()):
            root = Path(output_dir) / (f"model_{i}" if i else "")
            save_checkpoint(
                root, model, opt, step=self.step, scheduler=sched,
                scaler=self.scaler if self.scaler is not None else None,
                extra={"accelerate_step": self.step, "custom_objects": custom}, overwrite=True,
                keep_last=self.project_configuration.total_limit,
            )
        return str(output_dir)

    def load_state(self, input_dir: str | None = None, load_kwargs: dict | None = None, **kwargs: Any) -> None:
        if not self.mics_enabled:
            return super().load_state(input_dir, load_kwargs=load_kwargs, **kwargs)
        if input_dir is None:
            raise ValueError("load_state needs the input_dir a previous save_state wrote")
        extra: dict[str, Any] = {}
        for i, (model, opt, sched) in enumerate(self._pairs()):
            root = Path(input_dir) / (f"model_{i}" if i else "")
            extra = load_checkpoint(root, model, opt, scheduler=sched, scaler=self.scaler)
        self.step = int(extra.get("accelerate_step", self.step))
        for i, obj in enumerate(self._custom_objects):
            state = extra.get("custom_objects", {}).get(str(i))
            if state is not None:
                obj.load_state_dict(state)
        return None

    # ---- end ------------------------------------------------------------------------------------------
    def end_training(self) -> None:
        """Finish the trackers, then leave together and close the process group (Accelerate's own version
        destroys it at once, which can hang or abort a gloo rank at exit; see mics_hf.engine.teardown)."""
        for tracker in self.trackers:
            tracker.finish()
        if not getattr(self.state, "fork_launched", False):  # a notebook launch keeps its group, as in Accelerate
            close_process_group()
