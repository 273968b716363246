"""Reading a checkpoint into a sharded model at any world and partition size (resharding by row arithmetic).

Nothing is changed until every rank has read and validated what it needs and the ranks agree (format.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from safetensors import safe_open

from ..engine.topology import world_and_rank
from .format import (
    CheckpointError,
    _all_ok,
    _check_same_model,
    _optimizer_index,
    _params_by_fqn,
    _verify_file,
    read_metadata,
)
from .rng import restore_rng as _restore_rng

__all__ = ["load_checkpoint", "restore_rng_state"]


class _ShardReader:
    """Reads row ranges of a tensor from whichever shard files hold them (safetensors slices, no full loads)."""

    def __init__(self, path: Path, meta: Mapping[str, Any], verify: bool) -> None:
        self.path = path
        self.shards = [f for f in meta["files"] if f["kind"] == "shard"]
        self.verify = verify
        self._open: dict[str, Any] = {}

    def _handle(self, entry: Mapping[str, Any]):
        name = entry["file"]
        if name not in self._open:
            if self.verify:
                _verify_file(self.path / name, entry)
            try:
                self._open[name] = safe_open(str(self.path / name), framework="pt")
            except Exception as exc:
                raise CheckpointError(f"cannot read {self.path / name} ({exc}); it is corrupted, load an earlier checkpoint") from exc
        return self._open[name]

    def rows(self, key: str, fqn: str, start: int, stop: int, like: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(like, device="cpu")
        flat = out.view(stop - start, -1) if like.dim() > 0 else out.view(1, 1)
        for entry in self.shards:
            a, b = entry["rows"][fqn]
            lo, hi = max(a, start), min(b, stop)
            if lo >= hi:
                continue
            piece = self._handle(entry).get_slice(key)[lo - a : hi - a]
            flat[lo - start : hi - start].copy_(piece.reshape(hi - lo, -1))
        return out

    def buffer(self, name: str) -> torch.Tensor | None:
        for entry in self.shards:
            if entry["position"] == 0:
                handle = self._handle(entry)
                key = f"buffer/{name}"
                return handle.get_tensor(key) if key in handle.keys() else None
        return None


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scheduler: Any = None,
    scaler: Any = None,
    verify: bool = True,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint into a sharded model (any world size and partition size), its optimizer and the rest.

    `path` is a step directory or a root with `latest`. Returns {"step": ..., **extra}. Nothing is changed
    unless the whole checkpoint validates first (model identity, files present, sizes and CRC32).
    """
    meta = read_metadata(path)
    ckpt = Path(meta["_path"])
    params = _params_by_fqn(model)
    _check_same_model(meta, params, ckpt)
    if optimizer is not None and meta.get("optimizer") is None:
        raise CheckpointError(f"checkpoint {ckpt} holds no optimizer state; call load_checkpoint without an optimizer")
    opt_groups = _optimizer_index(optimizer, params) if optimizer is not None else None
    if optimizer is not None:
        saved_groups = [g["params"] for g in meta["optimizer"]["param_groups"]]
        if [sorted(g) for g in saved_groups] != [sorted(g) for g in opt_groups]:
            raise CheckpointError(
                f"the optimizer's {len(opt_groups)} param group(s) do not hold the same parameters as the checkpoint's "
                f"{len(saved_groups)}; build the optimizer with the same param groups as the run that saved it"
            )
        if meta["optimizer"]["class"] != type(optimizer).__name__:
            raise CheckpointError(
                f"checkpoint optimizer is {meta['optimizer']['class']}, the given one is {type(optimizer).__name__}; "
                "use the same optimizer class"
            )
    # Each rank reads (and, with verify, size- and CRC-checks) only the shard files that overlap its rows, into
    # memory; the ranks then agree that all of them succeeded before any state is changed anywhere.
    reader = _ShardReader(ckpt, meta, verify)
    values: dict[str, torch.Tensor] = {}
    opt_values: dict[str, dict[str, torch.Tensor]] = {}
    error: BaseException | None = None
    try:
        _read_values(reader, params, meta, values, opt_values, optimizer is not None)
        buffers = {name: reader.buffer(name) for name, _ in model.named_buffers() if name in meta.get("buffers", {})}
        rng = _read_rng(ckpt, meta) if restore_rng else None
    except CheckpointError as exc:
        error = exc
    if world_and_rank()[0] == 1 and error is not None:
        raise error
    _all_ok(error is None, f"reading checkpoint {ckpt}", error)

    with torch.no_grad():
        for fqn, sp in params.items():
            sp.sharded.copy_(values[fqn])
        for name, buf in model.named_buffers():
            if buffers.get(name) is not None:
                buf.copy_(buffers[name])
    if optimizer is not None:
        optimizer.load_state_dict(_optimizer_state(meta["optimizer"], opt_groups, params, opt_values))
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and meta.get("scaler") is not None:
        scaler.load_state_dict(meta["scaler"])
    if rng is not None:
        _restore_rng(rng)
    return {"step": meta["step"], **meta.get("extra", {})}


def restore_rng_state(path: str | os.PathLike) -> bool:
    """Restore this rank's RNG states from a checkpoint (no-op at another world size); True if restored."""
    meta = read_metadata(path)
    rng = _read_rng(Path(meta["_path"]), meta)
    if rng is not None:
        _restore_rng(rng)
    return rng is not None


def _read_values(reader: "_ShardReader", params, meta, values, opt_values, with_optimizer: bool) -> None:
    for fqn, sp in params.items():
        start, stop = sp.offsets
        values[fqn] = reader.rows(f"param/{fqn}", fqn, start, stop, sp.sharded)
        if with_optimizer:
            for key in meta["optimizer"]["sharded_keys"].get(fqn, []):
                opt_values.setdefault(fqn, {})[key] = reader.rows(f"optim/{fqn}/{key}", fqn, start, stop, sp.sharded)


def _read_rng(ckpt: Path, meta: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    world, rank = world_and_rank()
    if world != meta["world_size"]:
        return None  # RNG streams are per rank; at another world size there is no state to restore
    entry = next((f for f in meta["files"] if f["kind"] == "rng" and f["rank"] == rank), None)
    if entry is None:
        return None
    _verify_file(ckpt / entry["file"], entry)
    with safe_open(str(ckpt / entry["file"]), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _optimizer_state(saved: Mapping[str, Any], opt_groups, params, opt_values) -> dict[str, Any]:
    index = {fqn: i for i, fqn in enumerate(fqn for names in opt_groups for fqn in names)}
    state: dict[int, dict[str, Any]] = {}
    for fqn, i in index.items():
        entry: dict[str, Any] = {}
        for key, value in saved["scalars"].get(fqn, {}).items():
            entry[key] = torch.tensor(value, dtype=torch.float32) if isinstance(value, (int, float)) else value
        for key, tensor in opt_values.get(fqn, {}).items():
            entry[key] = tensor.to(params[fqn].sharded.device)
        if entry:
            state[i] = entry
    saved_by_params = {tuple(sorted(g["params"])): g["hyper"] for g in saved["param_groups"]}
    groups = []
    for names in opt_groups:
        hyper = dict(saved_by_params[tuple(sorted(names))])
        if "betas" in hyper and isinstance(hyper["betas"], list):
            hyper["betas"] = tuple(hyper["betas"])
        groups.append({**hyper, "params": [index[n] for n in names]})
    return {"state": state, "param_groups": groups}
