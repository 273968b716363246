"""Pretrained Hugging Face models straight into MiCS shards, at any size.

`mics_hf.from_pretrained(AutoModelForCausalLM, "gpt2", MiCSConfig(...))` builds the model on the meta device
from its config, then `shard_model` reads each rank's rows of every tensor from the checkpoint's safetensors
files (memory-mapped): no rank ever holds the whole model, on the host or on the device. This is what
DeepSpeed's `zero.Init` + `from_pretrained` and FSDP2's rank-0 broadcast give their users.

Stock Trainer scripts call `AutoModel...from_pretrained(model_args.model_name_or_path, ...)` themselves. Under
`--mics` that call is deferred (`defer_from_pretrained`): it returns the model on the meta device with its
checkpoint recorded, and MiCSTrainer / MiCSAccelerator.prepare shard it from the files. A call this path cannot
honour exactly (device_map, quantization, pickled weights, adapters, ...) runs transformers' own loader.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from accelerate import init_empty_weights
from transformers import AutoConfig, GenerationConfig, PreTrainedModel

from ..checkpoint.pretrained import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, PretrainedWeights
from ..config import MiCSConfig
from ..engine.shard import persistent_buffers, shard_model

__all__ = ["from_pretrained", "shard_pretrained", "defer_from_pretrained", "start_deferring", "stop_deferring", "pending_checkpoint"]

_PENDING = "_mics_pretrained"  # attribute of a deferred model: the checkpoint directory to read at sharding
_GUARD = "_mics_pretrained_guard"
# keyword arguments of from_pretrained that the deferred path honours; any other one runs transformers' loader
_HONOURED = {
    "config", "cache_dir", "revision", "token", "local_files_only", "trust_remote_code", "dtype", "torch_dtype",
    "low_cpu_mem_usage", "attn_implementation", "force_download", "use_safetensors", "from_tf", "subfolder",
    "_from_auto", "_from_pipeline", "_commit_hash", "adapter_kwargs", "proxies",  # what the Auto classes add
}


def resolve_checkpoint(name_or_path: str | os.PathLike, **hub: Any) -> Path:
    """The local directory of a checkpoint: the path itself, or the Hub snapshot (config and safetensors only)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the directory save_pretrained wrote (it holds config.json)")
    from huggingface_hub import snapshot_download

    kwargs = {k: hub[k] for k in ("revision", "cache_dir", "token", "local_files_only", "force_download") if hub.get(k) is not None}
    return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors"], **kwargs))


def _has_safetensors(directory: Path) -> bool:
    return (directory / SAFE_WEIGHTS_NAME).is_file() or (directory / SAFE_WEIGHTS_INDEX_NAME).is_file()


def _resolve_dtype(dtype: Any, config: Any, weights: PretrainedWeights) -> torch.dtype:
    """transformers' rule: None -> the default dtype; "auto" -> config.dtype, else the checkpoint's."""
    if dtype is None:
        return torch.get_default_dtype()
    if dtype == "auto":
        declared = getattr(config, "dtype", None)
        if declared is not None:
            return getattr(torch, declared) if isinstance(declared, str) else declared
        return weights.dtype() or torch.get_default_dtype()
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype; pass e.g. torch.bfloat16, 'bfloat16' or 'auto'")
        return getattr(torch, dtype)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype; pass e.g. torch.bfloat16, 'bfloat16' or 'auto'")
    return dtype


def _build_on_meta(model_class: Any, directory: Path, *, config: Any, dtype: Any, trust_remote_code: bool,
                   attn_implementation: str | None, config_kwargs: dict[str, Any]) -> nn.Module:
    if config is None:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code, **config_kwargs)
    elif config_kwargs:
        raise ValueError(f"got a config and config overrides {sorted(config_kwargs)}; set them on the config instead")
    elif not hasattr(config, "to_dict"):  # a path or name, as transformers also accepts
        config = AutoConfig.from_pretrained(config, trust_remote_code=trust_remote_code)
    weights = PretrainedWeights(directory)
    resolved = _resolve_dtype(dtype, config, weights)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables...) real
        if hasattr(model_class, "_from_config"):
            model = model_class._from_config(config, dtype=resolved, **extra)
        else:  # an Auto class
            model = model_class.from_config(config, dtype=resolved, trust_remote_code=trust_remote_code, **extra)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # transformers ties after loading; the engine must see the tied weight as one parameter
    generation = directory / "generation_config.json"
    if getattr(model, "can_generate", lambda: False)() and generation.is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    setattr(model, _PENDING, directory)
    return model


def _materialise_adapters(model: nn.Module) -> None:
    """Give PEFT adapter weights added to a deferred (meta) base their values by PEFT's own initialisation.

    `get_peft_model` on a meta base creates LoRA weights on meta too; the checkpoint does not hold them and the
    base model's `_init_weights` would draw LoRA's B at random (PEFT starts it at zero, so training starts from
    the pretrained model). Every rank draws the same values from the same seed; sharding then checks it.
    """
    peft_config = getattr(model, "peft_config", None)
    if not isinstance(peft_config, dict):
        return
    for module in model.modules():
        reset = getattr(module, "reset_lora_parameters", None)
        adapters = getattr(module, "lora_A", None)
        if reset is None or adapters is None:
            continue
        for name in list(adapters.keys()):
            parts = (module.lora_A[name], module.lora_B[name])
            if not any(p.is_meta for part in parts for p in part.parameters()):
                continue  # PEFT initialised them for real before looking at the base's device: keep its values
            for part in parts:
                part.to_empty(device="cpu")
            reset(name, peft_config[name].init_lora_weights)


def _names(model: nn.Module) -> tuple[dict[int, list[str]], list[str]]:
    """The names of the parameters still to be read (meta ones) and of the persistent buffers."""
    params: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.is_meta:
            params.setdefault(id(p), []).append(name)
    return params, list(persistent_buffers(model))


def pending_checkpoint(model: nn.Module) -> Path | None:
    """The checkpoint a deferred model will be read from when it is sharded (None for any other model)."""
    return getattr(model, _PENDING, None)


def shard_pretrained(model: nn.Module, config: MiCSConfig | None = None, *, device: torch.device | str | None = None) -> nn.Module:
    """Shard a model built on the meta device by `from_pretrained` / a deferred load, reading its checkpoint."""
    directory = pending_checkpoint(model)
    if directory is None:
        raise ValueError("this model has no pending checkpoint; load it with mics_hf.from_pretrained")
    guard = getattr(model, _GUARD, None)
    if guard is not None:
        guard.remove()
    _materialise_adapters(model)
    weights = PretrainedWeights(directory, base_model_prefix=getattr(model, "base_model_prefix", "") or "")
    params, buffers = _names(model)
    weights.check_names(params, buffers)
    try:
        shard_model(model, config, device=device, weights=weights)
    finally:
        weights.close()
    for module in model.modules():  # a PEFT wrapper reaches its base model's attributes; delete where they live
        module.__dict__.pop(_PENDING, None)
        module.__dict__.pop(_GUARD, None)
    model.eval()  # as transformers' from_pretrained leaves it (dropout off until model.train())
    return model


def from_pretrained(
    model_class: Any,
    name_or_path: str | os.PathLike,
    mics_config: MiCSConfig | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    config: Any = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
    **config_kwargs: Any,
) -> nn.Module:
    """A pretrained model (a transformers model class or Auto class), sharded with MiCS as it is read.

    Every rank of the process group calls it. `dtype` follows transformers (None: float32, "auto": the
    checkpoint's); the masters are fp32 and the model computes in `dtype` unless `mics_config` says otherwise.
    Only safetensors checkpoints are read (pickles can run code). The model is returned in eval mode, as
    transformers returns it: call `model.train()` before training.
    """
    directory = resolve_checkpoint(name_or_path, revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    if not _has_safetensors(directory):
        PretrainedWeights(directory)  # raises, naming what the directory holds and what to do
    model = _build_on_meta(
        model_class, directory, config=config, dtype=dtype, trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation, config_kwargs=config_kwargs,
    )
    return shard_pretrained(model, mics_config, device=device)


# ---- deferred loading for stock scripts -----------------------------------------------------------------
def _not_loaded_yet(module: nn.Module, args: Any) -> None:
    raise RuntimeError(
        f"{type(module).__name__} was loaded under --mics and its weights are read from {pending_checkpoint(module)} "
        "when it is sharded; pass it to the MiCSTrainer / accelerator.prepare() before running it, or call "
        "mics_hf.shard_pretrained(model, config). A model that should stay unsharded (a frozen reference or "
        "teacher): load it before the arguments are parsed or after the MiCSTrainer is built"
    )


def _deferred_from_pretrained(original: Any):
    def from_pretrained(cls: Any, name_or_path: Any = None, *model_args: Any, **kwargs: Any) -> Any:
        unknown = set(kwargs) - _HONOURED
        if model_args or unknown or kwargs.get("from_tf") or kwargs.get("subfolder") or kwargs.get("use_safetensors") is False \
                or (kwargs.get("adapter_kwargs") or {}).get("_adapter_model_path") or name_or_path is None:
            return original(cls, name_or_path, *model_args, **kwargs)
        try:
            directory = resolve_checkpoint(name_or_path, **kwargs)
        except Exception:  # not resolvable this way (e.g. a Hub repo with pickles only): transformers decides
            return original(cls, name_or_path, *model_args, **kwargs)
        if not _has_safetensors(directory):
            return original(cls, name_or_path, *model_args, **kwargs)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        model = _build_on_meta(
            cls, directory, config=kwargs.get("config"), dtype=dtype, trust_remote_code=bool(kwargs.get("trust_remote_code")),
            attn_implementation=kwargs.get("attn_implementation"), config_kwargs={},
        )
        setattr(model, _GUARD, model.register_forward_pre_hook(_not_loaded_yet))
        return model

    return classmethod(from_pretrained)


def start_deferring() -> None:
    """From now on `PreTrainedModel.from_pretrained` returns meta-device models read when sharded (idempotent)."""
    current = PreTrainedModel.__dict__["from_pretrained"]
    if getattr(current.__func__, "_mics_original", None) is None:
        deferred = _deferred_from_pretrained(current.__func__)
        deferred.__func__._mics_original = current.__func__
        PreTrainedModel.from_pretrained = deferred


def stop_deferring() -> None:
    original = getattr(PreTrainedModel.__dict__["from_pretrained"].__func__, "_mics_original", None)
    if original is not None:
        PreTrainedModel.from_pretrained = classmethod(original)


@contextlib.contextmanager
def defer_from_pretrained() -> Iterator[None]:
    """Inside, `PreTrainedModel.from_pretrained` returns meta-device models that are read when sharded."""
    was_on = getattr(PreTrainedModel.__dict__["from_pretrained"].__func__, "_mics_original", None) is not None
    start_deferring()
    try:
        yield
    finally:
        if not was_on:
            stop_deferring()
