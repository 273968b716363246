"""Writing a checkpoint: each shard once, by one rank of its replication group, published atomically.

See format.py for the layout and [Note: atomic save]. Rank 0 alone touches the checkpoint root (lock,
clean-up, publication, pruning); every step that can fail on one rank is agreed by all of them, so a failure
anywhere is one CheckpointError on every rank.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import save_file

from ..engine.hooks import TrainingState
from ..engine.shard import get_state, persistent_buffers
from ..engine.topology import world_and_rank
from .files import crc32_file, fsync_dir, fsync_file, fsync_tree, remove_path, root_lock, write_file_atomic
from .format import (
    FORMAT,
    LATEST,
    METADATA,
    OLD_PREFIX,
    TMP_PREFIX,
    VERSION,
    CheckpointError,
    _aliases,
    _all_ok,
    _jsonable,
    _optimizer_index,
    _params_by_fqn,
    is_complete,
    metadata_checksum,
    rng_file_name,
    shard_file_name,
    step_dir_name,
    step_of,
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

    Every rank must call it. Returns the checkpoint directory. `extra` is JSON (e.g. the data position; the key
    "step" is reserved for the step that load_checkpoint returns); `keep_last` deletes older complete
    checkpoints (by step number) beyond that many; an existing step directory is an error unless `overwrite`,
    in which case it is replaced only once the new one is complete. A `tokenizer` is saved beside the weights
    for `mics-hf export`. Another save into the same root at the same time is refused (a lock).
    """
    state = get_state(model)
    if state.training_state is not TrainingState.IDLE:
        raise CheckpointError("save_checkpoint was called in the middle of a forward/backward; call it between steps")
    state.reshard_all()  # modules refer to the shards
    _check_arguments(step, keep_last, extra)
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / (TMP_PREFIX + final.name)
    _, rank = world_and_rank()
    topo = state.topology
    params = _params_by_fqn(model)
    opt_groups = _optimizer_index(optimizer, params) if optimizer is not None else None
    scheduler_state = _jsonable(scheduler.state_dict(), "the LR scheduler state") if scheduler is not None else None
    scaler_state = _jsonable(scaler.state_dict(), "the grad scaler state") if scaler is not None else None
    extra = _jsonable(dict(extra or {}), "extra")

    with contextlib.ExitStack() as held:  # rank 0 holds the root's lock until the save is published or failed
        error: BaseException | None = None
        if rank == 0:
            try:
                _prepare(root, final, tmp, overwrite, held)
            except Exception as exc:
                error = exc
        _all_ok(error is None, f"preparing {tmp}", error)
        try:
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
                    _write_extras(tmp, model, tokenizer, meta)
                    _publish(tmp, final, root)
                except Exception as exc:
                    error = exc
            _all_ok(error is None, f"publishing checkpoint {final}", error)
        except BaseException:
            if rank == 0:
                with contextlib.suppress(OSError):
                    if os.path.lexists(tmp):
                        remove_path(tmp)  # only this save's own temporary directory
            raise
        if rank == 0 and keep_last is not None:
            try:
                _prune(root, keep_last, keep=final.name)
            except Exception as exc:
                error = CheckpointError(f"checkpoint {final} was saved, but removing older ones (keep_last={keep_last}) failed: {exc}")
        _all_ok(error is None, f"pruning old checkpoints of {root}", error)
    return final


def _check_arguments(step: Any, keep_last: Any, extra: Mapping[str, Any] | None) -> None:
    """The same checks on every rank, before any collective: a bad argument fails everywhere alike."""
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 10**20:
        raise CheckpointError(f"step={step!r} must be a non-negative integer below 10^20 (it names the checkpoint directory)")
    if keep_last is not None and (not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1):
        raise CheckpointError(f"keep_last={keep_last!r} must be a positive integer or None (keep everything)")
    if extra is not None and "step" in extra:
        raise CheckpointError(
            "extra has a key 'step', which load_checkpoint uses for the checkpoint's own step; rename it (e.g. 'next_step')"
        )


def _prepare(root: Path, final: Path, tmp: Path, overwrite: bool, held: contextlib.ExitStack) -> None:
    """Rank 0: create the root, take its lock, clean up after crashed saves, create the temporary directory."""
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"checkpoint root {root} exists and is not a directory; pass a directory path")
    root.mkdir(parents=True, exist_ok=True)
    held.enter_context(root_lock(root))
    _clean_leftovers(root)
    if os.path.lexists(final):
        if not overwrite:
            raise CheckpointError(
                f"{final} already exists; pass overwrite=True to replace it (the old one is kept until the new one is "
                "complete) or save under another step"
            )
        if not is_complete(final):
            raise CheckpointError(
                f"{final} exists but is not a complete mics_hf checkpoint (no {METADATA}); it is not replaced even "
                "with overwrite=True: move it away or save under another step"
            )
    tmp.mkdir()


def _clean_leftovers(root: Path) -> None:
    """Rank 0, holding the lock: undo or remove what crashed saves left (see [Note: atomic save])."""
    for entry in sorted(os.listdir(root)):
        path = root / entry
        if entry == LATEST + ".tmp" or (entry.startswith(TMP_PREFIX) and step_of(entry[len(TMP_PREFIX):]) is not None):
            remove_path(path)
        elif entry.startswith(OLD_PREFIX) and step_of(entry[len(OLD_PREFIX):]) is not None:
            target = root / entry[len(OLD_PREFIX):]
            if is_complete(target):
                remove_path(path)  # the new version was published: the old one is no longer needed
            elif not os.path.lexists(target):
                os.replace(path, target)  # a crash between the two renames of an overwrite: restore the old one
                fsync_dir(root)


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
                    if _is_sharded_state(value, sp.sharded):
                        tensors[f"optim/{fqn}/{key}"] = value.detach().contiguous().cpu()
        if position == 0:  # buffers are replicated: position 0's writer stores them once
            for name, buf in persistent_buffers(model).items():
                tensors[f"buffer/{name}"] = buf.detach().contiguous().cpu()
        out.append(_save(tmp / shard_file_name(position), tensors, {"kind": "shard", "position": position, "rows": rows}))
    out.append(_save(tmp / rng_file_name(rank), _capture_rng(), {"kind": "rng", "rank": rank}))
    return out


def _is_sharded_state(value: Any, shard: torch.Tensor) -> bool:
    """An optimizer state tensor shaped like the shard (exp_avg, momentum): stored by rows like the parameter."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == shard.shape


def _save(path: Path, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    save_file(tensors, str(path))
    fsync_file(path)
    return {**info, "file": path.name, "bytes": path.stat().st_size, "crc32": crc32_file(path)}


def _gather_to_rank0(files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    world, rank = world_and_rank()
    if world == 1:
        return files
    gathered: list[Any] = [None] * world if rank == 0 else None  # type: ignore[assignment]
    dist.gather_object(files, gathered, dst=0)
    return [f for per_rank in (gathered or []) for f in per_rank]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


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
            fqn: {"shape": list(sp.global_shape), "dtype": _dtype_name(sp.sharded.dtype), "aliases": aliases[fqn]}
            for fqn, sp in params.items()
        },
        "buffers": {name: {"shape": list(b.shape), "dtype": _dtype_name(b.dtype)} for name, b in persistent_buffers(model).items()},
        "files": sorted(files, key=lambda f: (f["kind"], f.get("position", f.get("rank")))),
        "scheduler": scheduler_state,
        "scaler": scaler_state,
        "extra": extra,
        "optimizer": None if optimizer is None else _optimizer_metadata(optimizer, params, opt_groups),
    }
    meta["checksum"] = metadata_checksum(meta)
    return meta


def _optimizer_metadata(optimizer, params, opt_groups) -> dict[str, Any]:
    """Hyper-parameters, which state tensors are stored by rows (with their dtypes), and the scalar states."""
    groups = []
    for names, group in zip(opt_groups, optimizer.param_groups):
        hyper = {k: v for k, v in group.items() if k != "params"}
        groups.append({"hyper": _jsonable(hyper, "optimizer hyper-parameters"), "params": names})
    sharded_keys: dict[str, dict[str, str]] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for fqn, sp in params.items():
        for key, value in optimizer.state.get(sp.sharded, {}).items():
            if _is_sharded_state(value, sp.sharded):
                sharded_keys.setdefault(fqn, {})[key] = _dtype_name(value.dtype)
            elif isinstance(value, torch.Tensor) and value.numel() == 1:
                scalars.setdefault(fqn, {})[key] = {"tensor": _dtype_name(value.dtype), "value": value.item()}
            else:
                scalars.setdefault(fqn, {})[key] = {"json": _jsonable(value, f"optimizer state {fqn}/{key}")}
    return {"class": type(optimizer).__name__, "param_groups": groups, "sharded_keys": sharded_keys, "scalars": scalars}


ADAPTER_CONFIG = "adapter_config.json"


def _write_extras(tmp: Path, model: nn.Module, tokenizer: Any, meta: Mapping[str, Any]) -> None:
    """Rank 0: config.json and tokenizer beside the shards, then the metadata; everything fsynced."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        (tmp / "config.json").write_text(config.to_json_string())
    if tokenizer is not None:  # lets `mics-hf export` produce a complete model directory
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
    adapters = getattr(model, "peft_config", None)
    if isinstance(adapters, dict) and adapters:  # a PEFT model: `mics-hf export` merges its adapter
        name = next(iter(adapters))
        base = model.get_base_model() if hasattr(model, "get_base_model") else None
        values = {"adapter_name": name, "base_class": type(base).__name__, "config": adapters[name].to_dict()}
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(values, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))
    write_file_atomic(tmp / METADATA, json.dumps(meta, indent=1, sort_keys=True).encode())
    fsync_tree(tmp)


def _publish(tmp: Path, final: Path, root: Path) -> None:
    """Rename the complete directory into place, then move `latest` (see [Note: atomic save])."""
    old = root / (OLD_PREFIX + final.name)
    replacing = os.path.lexists(final)
    if replacing:
        os.replace(final, old)  # until the next rename, latest_checkpoint falls back to `old`
    try:
        os.replace(tmp, final)
    except BaseException:
        if replacing:
            os.replace(old, final)
        raise
    fsync_dir(root)
    write_file_atomic(root / LATEST, (final.name + "\n").encode())
    fsync_dir(root)
    if replacing:
        remove_path(old)


def _prune(root: Path, keep_last: int, keep: str) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`, ordered by step number (never `keep`)."""
    steps = sorted((step_of(name), name) for name in os.listdir(root) if step_of(name) is not None and is_complete(root / name))
    for _, name in steps[:-keep_last]:
        if name != keep:
            remove_path(root / name)
