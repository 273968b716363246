"""Export to the normal Hugging Face layout (config.json + safetensors + tokenizer), live or from a checkpoint."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open

from ..engine.shard import get_state
from .format import CheckpointError, _verify_file, read_metadata
from .state_dict import full_state_dict

__all__ = ["save_pretrained", "export_checkpoint", "consolidate_checkpoint"]


@contextlib.contextmanager
def _original_class(model: nn.Module) -> Iterator[nn.Module]:
    """Show HF the user's own class while saving, so config.json's `architectures` names it, not MiCS<...>."""
    mics_cls = type(model)
    model.__class__ = mics_cls.__bases__[-1]
    try:
        yield model
    finally:
        model.__class__ = mics_cls


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a directory; pass a directory for the exported model")


def _publish_dir(tmp: Path, out_dir: Path) -> None:
    """Replace out_dir by the completed tmp directory; an existing export survives until the new one is whole."""
    old = out_dir.with_name(f".old-{out_dir.name}")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def save_pretrained(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer: Any = None, **kwargs: Any) -> None:
    """Gather the full weights of a sharded HF model and write them with `save_pretrained` (rank 0 writes).

    Every rank must call it. `AutoModel*.from_pretrained(out_dir)` then loads the same weights; kwargs go to the
    model's own `save_pretrained` (e.g. max_shard_size).
    """
    get_state(model)
    if not hasattr(model, "save_pretrained"):
        raise CheckpointError(
            f"{type(model).__name__} has no save_pretrained (not a Hugging Face model); use mics_hf.full_state_dict "
            "and torch/safetensors to save it"
        )
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    state = full_state_dict(model)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0:
        tmp = out_dir.with_name(f".tmp-{out_dir.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        with _original_class(model):
            model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _publish_dir(tmp, out_dir)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def consolidate_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Assemble the full fp32 parameters (and buffers) of a sharded checkpoint in one process, no GPUs needed."""
    meta = read_metadata(path)
    ckpt = Path(meta["_path"])
    shards = sorted((f for f in meta["files"] if f["kind"] == "shard"), key=lambda f: f["position"])
    for entry in shards:
        _verify_file(ckpt / entry["file"], entry)
    out: dict[str, torch.Tensor] = {}
    handles = {e["file"]: safe_open(str(ckpt / e["file"]), framework="pt") for e in shards}
    for fqn, info in meta["params"].items():
        pieces = [handles[e["file"]].get_tensor(f"param/{fqn}") for e in shards if e["rows"][fqn][1] > e["rows"][fqn][0]]
        full = torch.cat([p.reshape(p.shape[0], -1) for p in pieces]).reshape(info["shape"])
        out[fqn] = full
        for alias in info.get("aliases", []):
            out[alias] = full
    zero = next(e for e in shards if e["position"] == 0)
    for name in meta.get("buffers", {}):
        key = f"buffer/{name}"
        if key in handles[zero["file"]].keys():
            out[name] = handles[zero["file"]].get_tensor(key)
    return out, meta


def export_checkpoint(path: str | os.PathLike, out_dir: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None) -> Path:
    """`mics-hf export`: a sharded checkpoint -> a Hugging Face model directory, offline, in one process."""
    import transformers

    state, meta = consolidate_checkpoint(path)
    ckpt = Path(meta["_path"])
    if not (ckpt / "config.json").is_file():
        raise CheckpointError(
            f"{ckpt} has no config.json (the model had no Hugging Face config); load it with "
            "mics_hf.consolidate_checkpoint and save the tensors yourself"
        )
    config = transformers.AutoConfig.from_pretrained(str(ckpt))
    cls_name = (config.architectures or [meta["model_class"]])[0]
    model_cls = getattr(transformers, cls_name, None)
    if model_cls is None:
        raise CheckpointError(f"transformers has no class {cls_name!r} (from {ckpt / 'config.json'}); upgrade transformers")
    with torch.device("meta"):
        model = model_cls(config)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
    tok_dir = Path(tokenizer) if tokenizer is not None else (ckpt / "tokenizer" if (ckpt / "tokenizer").is_dir() else None)
    if tok_dir is not None:
        if not tok_dir.is_dir():
            raise CheckpointError(f"tokenizer directory {tok_dir} does not exist; pass the directory saved by save_pretrained")
        for f in tok_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
    _publish_dir(tmp, out_dir)
    return out_dir
