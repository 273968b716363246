"""Writing a checkpoint: each shard once, by one rank of its replication group, published atomically.

See format.py for the layout and [Note: atomic save].
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import save_file

from ..engine.hooks import TrainingState
from ..engine.shard import get_state
from ..engine.topology import world_and_rank
from .format import (
    FORMAT,
    LATEST,
    METADATA,
    VERSION,
    CheckpointError,
    _aliases,
    _all_ok,
    _crc32,
    _fsync_dir,
    _fsync_file,
    _jsonable,
    _optimizer_index,
    _params_by_fqn,
    _write_json_atomic,
    step_dir_name,
)
from .rng import capture_rng as _capture_rng

__all__ = ["save_checkpoint"]


def _writer_of(position: int, topology) -> int:
    """The rank that writes position q's shard: member (q mod r) of its replication group, so the p files are
    written by ranks of different partition groups instead of all by the first one."""
    replicas = [g[position] for g in topology.partition_groups]
    return replicas[position % len(replicas)]


def save_checkpoint(
    root: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    step: int,
    scheduler: Any = None,
    scaler: Any = None,
    extra: Mapping[str, Any] | None = None,
    keep_last: int | None = None,
    overwrite: bool = False,
    tokenizer: Any = None,
) -> Path:
    """Write a sharded checkpoint of `model` (and optimizer, scheduler, scaler, RNG, `extra`) to root/step_N.

    Every rank must call it. Returns the checkpoint directory. `extra` is JSON (e.g. the data position);
    `keep_last` deletes older complete checkpoints beyond that many; an existing step directory is an error
    unless `overwrite`, in which case it is replaced only once the new one is complete. A `tokenizer` is saved
    beside the weights for `mics-hf export`.
    """
    state = get_state(model)
    if state.training_state is not TrainingState.IDLE:
        raise CheckpointError("save_checkpoint was called in the middle of a forward/backward; call it between steps")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"step={step!r} must be a non-negative integer (it names the checkpoint directory)")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise CheckpointError(f"keep_last={keep_last!r} must be a positive integer or None (keep everything)")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"checkpoint root {root} exists and is not a directory; pass a directory path")
    final = root / step_dir_name(step)
    if final.exists() and not overwrite:
        raise CheckpointError(
            f"{final} already exists; pass overwrite=True to replace it (the old one is kept until the new one is "
            "complete) or save under another step"
        )
    world, rank = world_and_rank()
    topo = state.topology
    params = _params_by_fqn(model)
    opt_groups = _optimizer_index(optimizer, params) if optimizer is not None else None
    scheduler_state = _jsonable(scheduler.state_dict(), "the LR scheduler state") if scheduler is not None else None
    scaler_state = _jsonable(scaler.state_dict(), "the grad scaler state") if scaler is not None else None
    extra = _jsonable(dict(extra or {}), "extra")
    tmp = root / f".tmp-{final.name}"

    error: BaseException | None = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):  # partial saves of crashed runs
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except OSError as exc:
            error = exc
    _all_ok(error is None, f"creating {tmp}", error)

    files: list[dict[str, Any]] = []
    try:
        files = _write_rank_files(tmp, model, optimizer, params, topo, rank)
    except Exception as exc:  # reported to every rank below, never swallowed
        error = exc
    _all_ok(error is None, f"writing checkpoint files into {tmp}", error)
    all_files = _gather_to_rank0(files)

    if rank == 0:
        try:
            meta = _metadata(model, optimizer, params, opt_groups, topo, step, scheduler_state, scaler_state, extra, all_files)
            _write_json_atomic(tmp / METADATA, meta)
            config = getattr(model, "config", None)
            if config is not None and hasattr(config, "to_json_string"):
                (tmp / "config.json").write_text(config.to_json_string())
                _fsync_file(tmp / "config.json")
            if tokenizer is not None:  # lets `mics-hf export` produce a complete model directory
                tokenizer.save_pretrained(str(tmp / "tokenizer"))
            _fsync_dir(tmp)
            _publish(tmp, final, root)
            if keep_last is not None:
                _prune(root, keep_last, keep=final.name)
        except Exception as exc:
            error = exc
            shutil.rmtree(tmp, ignore_errors=True)
    _all_ok(error is None, f"publishing checkpoint {final}", error)
    return final


def _write_rank_files(tmp: Path, model, optimizer, params, topo, rank: int) -> list[dict[str, Any]]:
    out = []
    position = topo.position
    if _writer_of(position, topo) == rank:
        tensors: dict[str, torch.Tensor] = {}
        rows: dict[str, list[int]] = {}
        for fqn, sp in params.items():
            tensors[f"param/{fqn}"] = sp.sharded.detach().contiguous().cpu()
            rows[fqn] = list(sp.offsets)
            if optimizer is not None:
                for key, value in optimizer.state.get(sp.sharded, {}).items():
                    if isinstance(value, torch.Tensor) and value.shape == sp.sharded.shape and value.dim() > 0:
                        tensors[f"optim/{fqn}/{key}"] = value.detach().contiguous().cpu()
        if position == 0:  # buffers are replicated: position 0's writer stores them once
            for name, buf in model.named_buffers():
                tensors[f"buffer/{name}"] = buf.detach().contiguous().cpu()
        name = f"shard-q{position:04d}.safetensors"
        out.append(_save(tmp / name, tensors, {"kind": "shard", "position": position, "rows": rows}))
    rng = _capture_rng()
    out.append(_save(tmp / f"rng-rank{rank:04d}.safetensors", rng, {"kind": "rng", "rank": rank}))
    return out


def _save(path: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    save_file(tensors, str(path))
    _fsync_file(path)
    return {**info, "file": path.name, "bytes": path.stat().st_size, "crc32": _crc32(path)}


def _gather_to_rank0(files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    world, rank = world_and_rank()
    if world == 1:
        return files
    gathered: list[Any] = [None] * world if rank == 0 else None  # type: ignore[assignment]
    dist.gather_object(files, gathered, dst=0)
    return [f for per_rank in (gathered or []) for f in per_rank]


def _metadata(model, optimizer, params, opt_groups, topo, step, scheduler_state, scaler_state, extra, files) -> dict:
    aliases = _aliases(model, params)
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "world_size": topo.world_size,
        "partition_size": topo.partition_size,
        "devices_per_node": topo.devices_per_node,
        "model_class": type(model).__bases__[-1].__name__,
        "params": {
            fqn: {"shape": list(sp.global_shape), "dtype": str(sp.sharded.dtype).removeprefix("torch."), "aliases": aliases[fqn]} for fqn, sp in params.items()
        },
        "buffers": {name: list(b.shape) for name, b in model.named_buffers()},
        "files": files,
        "scheduler": scheduler_state,
        "scaler": scaler_state,
        "extra": extra,
        "optimizer": None,
    }
    if optimizer is not None:
        groups = []
        scalars: dict[str, dict[str, float]] = {}
        sharded_keys: dict[str, list[str]] = {}
        for names, group in zip(opt_groups, optimizer.param_groups):
            hyper = {k: v for k, v in group.items() if k != "params"}
            groups.append({"hyper": _jsonable(hyper, "optimizer hyper-parameters"), "params": names})
        for fqn, sp in params.items():
            for key, value in optimizer.state.get(sp.sharded, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == sp.sharded.shape and value.dim() > 0:
                    sharded_keys.setdefault(fqn, []).append(key)
                elif isinstance(value, torch.Tensor) and value.numel() == 1:
                    scalars.setdefault(fqn, {})[key] = value.item()
                else:
                    scalars.setdefault(fqn, {})[key] = _jsonable(value, f"optimizer state {fqn}/{key}")
        meta["optimizer"] = {
            "class": type(optimizer).__name__,
            "param_groups": groups,
            "sharded_keys": sharded_keys,
            "scalars": scalars,
        }
    return meta


def _publish(tmp: Path, final: Path, root: Path) -> None:
    """Rename the complete directory into place, then move `latest` (see [Note: atomic save])."""
    old = None
    if final.exists():
        old = root / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    latest_tmp = root / (LATEST + ".tmp")
    latest_tmp.write_text(final.name + "\n")
    _fsync_file(latest_tmp)
    os.replace(latest_tmp, root / LATEST)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _prune(root: Path, keep_last: int, keep: str) -> None:
    complete = sorted(p for p in root.glob("step_*") if (p / METADATA).is_file())
    for path in complete[:-keep_last]:
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)
