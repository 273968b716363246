"""Reading a checkpoint into a sharded model at any world and partition size (resharding by row arithmetic).

[Note: validate, agree, then apply] A load runs in two phases. Phase 1 reads and checks everything on every
rank, changing nothing: the metadata (format.py, validate.py), the model's identity (every parameter's shape
and dtype, every buffer's), the optimizer's param groups and hyper-parameters, the scheduler and scaler
states, and this rank's rows of every tensor (dtype and shape checked in the file, sizes and CRC32s), its
buffers and its RNG states (dry-run). The ranks then agree that all of them succeeded and read the same
metadata (its checksum); any failure on any rank is one CheckpointError on every rank. Only then does phase
2 copy the values into the model, optimizer, scheduler, scaler and RNGs.

[Note: resharding] Parameter rows are cut as ceil(rows / p) per position, so a position may hold 0 rows of a
small parameter (BERT's 2-row token_type_embeddings at p = 4, a 2-label classifier head). Each rank reads
its rows [start, stop) from the files whose saved ranges overlap them; the saved ranges were proved to tile
every tensor, so every row is read exactly once, and an empty range reads nothing.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..engine.hooks import TrainingState
from ..engine.shard import get_state, persistent_buffers
from ..engine.topology import world_and_rank
from ..engine.unit import ShardedParam
from .files import SafetensorsFile
from .format import (
    CheckpointError,
    _all_ok,
    _optimizer_index,
    _params_by_fqn,
    dtype_of,
    metadata_checksum,
    read_metadata,
)
from .rng import check_rng
from .rng import restore_rng as _restore_rng

__all__ = ["load_checkpoint", "restore_rng_state"]


class _ShardReader:
    """Reads row ranges of a tensor from whichever shard files hold them (never a whole file into memory)."""

    def __init__(self, ckpt: Path, meta: Mapping[str, Any], verify: bool) -> None:
        self.ckpt = ckpt
        self.shards = sorted((f for f in meta["files"] if f["kind"] == "shard"), key=lambda f: f["position"])
        self.verify = verify
        self._open: dict[str, SafetensorsFile] = {}

    def _file(self, entry: Mapping[str, Any]) -> SafetensorsFile:
        name = entry["file"]
        if name not in self._open:
            self._open[name] = SafetensorsFile(
                self.ckpt, name, f"files[position {entry['position']}]", expect_bytes=entry["bytes"],
                expect_crc32=entry["crc32"] if self.verify else None,
            )
        return self._open[name]

    def rows(self, key: str, fqn: str, start: int, stop: int, rest: tuple[int, ...], dtype: torch.dtype | None) -> torch.Tensor:
        """Rows [start, stop) of `key` (a tensor of `fqn`'s row layout), shape (stop - start, *rest).

        Every overlapping piece is checked (exact dtype, and shape (its rows, *rest)) before memory is allocated.
        `dtype` None (a version 1 checkpoint) takes the file's dtype, which every piece must share.
        """
        pieces = []
        for entry in self.shards:
            a, b = entry["rows"][fqn]
            lo, hi = max(a, start), min(b, stop)
            if lo >= hi:
                continue
            f = self._file(entry)
            dtype = f.describe(key)[0] if dtype is None else dtype
            f.expect(key, dtype, (b - a, *rest))
            pieces.append((lo, hi, a, f))
        if sum(hi - lo for lo, hi, _, _ in pieces) != stop - start:  # cannot happen once the tiling is proved
            raise CheckpointError(f"the shard files of {self.ckpt} do not hold rows [{start}, {stop}) of {fqn!r} exactly once")
        if dtype is None:
            raise CheckpointError(f"{self.ckpt}: no dtype is recorded for {key!r}; re-save the checkpoint")
        row_numel = math.prod(rest)
        out = torch.empty((stop - start, *rest), dtype=dtype)
        flat = out.view(stop - start, row_numel)  # [Note: resharding]: 0 rows is a valid, empty read
        for lo, hi, a, f in pieces:
            flat[lo - start : hi - start].copy_(f.rows(key, lo - a, hi - a).reshape(hi - lo, row_numel))
        return out

    def buffer(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A buffer from position 0's file, refused unless it has exactly the model's dtype and shape."""
        f = self._file(self.shards[0])
        f.expect(f"buffer/{name}", dtype, shape)
        return f.tensor(f"buffer/{name}")

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


def _row_layout(shape: Any) -> tuple[int, tuple[int, ...]]:
    """(rows, shape of one row) of a global shape; a 0-dim tensor is one row of nothing."""
    dims = tuple(shape) or (1,)
    return dims[0], dims[1:]


@dataclass
class _LoadPlan:
    """Everything phase 2 applies, read and validated in phase 1 (see [Note: validate, agree, then apply])."""

    meta: dict[str, Any]
    checksum: str
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    rng: dict[str, torch.Tensor] | None = None


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

    Every rank must call it. `path` is a step directory or a root with `latest`. Returns {**extra, "step": ...}.
    Nothing is changed unless the whole checkpoint validates on every rank first (see the Notes above);
    `verify=False` skips only the CRC32s (sizes, dtypes, shapes and the metadata checksum are always checked).
    """
    state = get_state(model)
    if state.training_state is not TrainingState.IDLE:
        raise CheckpointError("load_checkpoint was called in the middle of a forward/backward; call it between steps")
    state.reshard_all()  # modules refer to the shards that are about to be overwritten
    plan: _LoadPlan | None = None
    error: BaseException | None = None
    try:
        plan = _read_and_validate(path, model, optimizer, scheduler, scaler, verify, restore_rng)
    except Exception as exc:  # any failure, on any rank, becomes one error on every rank
        error = exc
    _all_ok(error is None, f"loading checkpoint {path}", error, agree=plan.checksum if plan is not None else None)
    assert plan is not None
    try:
        _apply(plan, model, optimizer, scheduler, scaler)
    except Exception as exc:
        error = exc
    _all_ok(error is None, f"applying the validated checkpoint {path} (the model may be half-loaded: load it again)", error)
    return {**plan.meta.get("extra", {}), "step": plan.meta["step"]}


def restore_rng_state(path: str | os.PathLike) -> bool:
    """Restore this rank's RNG states from a checkpoint (no-op at another world size); True if restored.

    Every rank must call it (the ranks agree that every RNG file validated before any is restored).
    """
    rng, error = None, None
    try:
        meta = read_metadata(path)
        rng = _read_rng(Path(meta["_path"]), meta)
    except Exception as exc:
        error = exc
    _all_ok(error is None, f"restoring RNG states from {path}", error)
    if rng is not None:
        _restore_rng(rng)
    return rng is not None


def _read_and_validate(path, model, optimizer, scheduler, scaler, verify: bool, restore_rng: bool) -> _LoadPlan:
    """Phase 1: read and check everything this rank needs; change nothing."""
    meta = read_metadata(path)
    ckpt = Path(meta["_path"])
    params = _params_by_fqn(model)
    buffers = persistent_buffers(model)
    _check_same_model(meta, params, buffers, model, ckpt)
    opt_groups = _check_optimizer(meta, optimizer, params, ckpt) if optimizer is not None else None
    plan = _LoadPlan(meta=meta, checksum=metadata_checksum(meta))
    plan.scheduler = _checked_state(meta.get("scheduler"), scheduler, "LR scheduler", ckpt)
    plan.scaler = _checked_state(meta.get("scaler"), scaler, "grad scaler", ckpt)
    reader = _ShardReader(ckpt, meta, verify)
    try:
        opt_values: dict[str, dict[str, torch.Tensor]] = {}
        for fqn, sp in params.items():
            start, stop = sp.offsets
            _, rest = _row_layout(sp.global_shape)
            plan.values[fqn] = reader.rows(f"param/{fqn}", fqn, start, stop, rest, sp.sharded.dtype).view(sp.sharded.shape)
            if optimizer is not None:
                for key, dtype in meta["optimizer"]["sharded_keys"].get(fqn, {}).items():
                    where = f"optimizer.sharded_keys[{fqn!r}][{key!r}]"
                    tensor = reader.rows(f"optim/{fqn}/{key}", fqn, start, stop, rest, dtype_of(dtype, where))
                    opt_values.setdefault(fqn, {})[key] = tensor.view(sp.sharded.shape)
        plan.buffers = {name: reader.buffer(name, buf.dtype, tuple(buf.shape)) for name, buf in buffers.items()}
    finally:
        reader.close()
    if optimizer is not None:
        plan.optimizer = _optimizer_state(meta["optimizer"], opt_groups, optimizer, params, opt_values)
    plan.rng = _read_rng(ckpt, meta) if restore_rng else None
    return plan


def _apply(plan: _LoadPlan, model: nn.Module, optimizer, scheduler, scaler) -> None:
    """Phase 2: copy the validated values in (nothing here can meet a bad file any more)."""
    params = _params_by_fqn(model)
    with torch.no_grad():
        for fqn, sp in params.items():
            sp.sharded.copy_(plan.values[fqn])
        for name, buf in persistent_buffers(model).items():
            buf.copy_(plan.buffers[name])
    if optimizer is not None and plan.optimizer is not None:
        optimizer.load_state_dict(plan.optimizer)
    if scheduler is not None and plan.scheduler is not None:
        scheduler.load_state_dict(plan.scheduler)
    if scaler is not None and plan.scaler is not None:
        scaler.load_state_dict(plan.scaler)
    if plan.rng is not None:
        _restore_rng(plan.rng)


def _read_rng(ckpt: Path, meta: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
    world, rank = world_and_rank()
    if world != meta["world_size"]:
        return None  # RNG streams are per rank; at another world size there is no state to restore
    entry = next(f for f in meta["files"] if f["kind"] == "rng" and f["rank"] == rank)  # validate.py: one per rank
    field_name = f"files[rng rank {rank}]"
    with SafetensorsFile(ckpt, entry["file"], field_name, expect_bytes=entry["bytes"], expect_crc32=entry["crc32"]) as f:
        rng = {key: f.tensor(key) for key in sorted(f.keys())}
    check_rng(rng, f"{ckpt / entry['file']}")
    return rng


def _check_same_model(meta: Mapping[str, Any], params: Mapping[str, ShardedParam], buffers: Mapping[str, torch.Tensor], model: nn.Module, path: Path) -> None:
    """Same parameters (names, shapes, dtypes) and persistent buffers (names, shapes, dtypes), or one clear error."""
    saved = meta["params"]
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    wrong = sorted(
        f"{fqn}: checkpoint {tuple(saved[fqn]['shape'])} vs model {tuple(sp.global_shape)}"
        for fqn, sp in params.items()
        if fqn in saved and tuple(saved[fqn]["shape"]) != tuple(sp.global_shape)
    )
    saved_buffers = meta.get("buffers", {})
    non_persistent = {name for name, _ in model.named_buffers()} - set(buffers)  # version 1 saved these too
    missing += sorted(f"buffer {n}" for n in set(buffers) - set(saved_buffers))
    unexpected += sorted(f"buffer {n}" for n in set(saved_buffers) - set(buffers) - non_persistent)
    wrong += sorted(
        f"buffer {n}: checkpoint {tuple(saved_buffers[n]['shape'])} vs model {tuple(b.shape)}"
        for n, b in buffers.items()
        if n in saved_buffers and tuple(saved_buffers[n]["shape"]) != tuple(b.shape)
    )
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"shapes differ for {len(wrong)} tensor(s), e.g. {wrong[:3]}")
        if missing:
            parts.append(f"the model has {len(missing)} tensor(s) the checkpoint lacks, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"the checkpoint has {len(unexpected)} tensor(s) the model lacks, e.g. {unexpected[:3]}")
        raise CheckpointError(
            f"checkpoint {path} was saved from a different model ({meta.get('model_class')}): {'; '.join(parts)}. "
            "Build the same architecture and size before loading"
        )
    dtypes = [(fqn, saved[fqn]["dtype"], sp.sharded.dtype) for fqn, sp in params.items()]
    dtypes += [(f"buffer {n}", saved_buffers[n]["dtype"], b.dtype) for n, b in buffers.items() if saved_buffers[n]["dtype"] is not None]
    differ = [f"{n}: checkpoint {d} vs model {str(m).removeprefix('torch.')}" for n, d, m in dtypes if dtype_of(d, n) != m]
    if differ:
        raise CheckpointError(
            f"checkpoint {path} stores {len(differ)} tensor(s) in another dtype than the model, e.g. {differ[:3]}; values "
            "are never cast silently: build the model with the same dtypes (MixedPrecisionPolicy's master dtype) as the "
            "run that saved it"
        )


def _check_optimizer(meta: Mapping[str, Any], optimizer: torch.optim.Optimizer, params, ckpt: Path) -> list[list[str]]:
    """Same class, same param groups, and hyper-parameters of the same kinds as the live optimizer's."""
    saved = meta.get("optimizer")
    if saved is None:
        raise CheckpointError(f"checkpoint {ckpt} holds no optimizer state; call load_checkpoint without an optimizer")
    opt_groups = _optimizer_index(optimizer, params)
    saved_groups = [g["params"] for g in saved["param_groups"]]
    if sorted(sorted(g) for g in saved_groups) != sorted(sorted(g) for g in opt_groups):
        raise CheckpointError(
            f"the optimizer's {len(opt_groups)} param group(s) do not hold the same parameters as the checkpoint's "
            f"{len(saved_groups)}; build the optimizer with the same param groups as the run that saved it"
        )
    if saved["class"] != type(optimizer).__name__:
        raise CheckpointError(
            f"checkpoint optimizer is {saved['class']}, the given one is {type(optimizer).__name__}; use the same optimizer class"
        )
    hyper_of = {tuple(sorted(g["params"])): g["hyper"] for g in saved["param_groups"]}
    for i, (names, group) in enumerate(zip(opt_groups, optimizer.param_groups)):
        live = {k: v for k, v in group.items() if k != "params"}
        _checked_state(hyper_of[tuple(sorted(names))], _Live(live), f"optimizer param group {i} hyper-parameters", ckpt)
    return opt_groups


class _Live:
    """Adapts a plain dict to the state_dict() interface of _checked_state."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def _compatible(live: Any, saved: Any) -> bool:
    """Whether a JSON value from the checkpoint can stand where the live object has `live` (shallow kinds)."""
    if live is None:
        return True
    if isinstance(live, bool):
        return isinstance(saved, bool)
    if isinstance(live, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool)
    if isinstance(live, str):
        return isinstance(saved, str)
    if isinstance(live, (list, tuple)):
        return isinstance(saved, list) and len(saved) == len(live) and all(_compatible(a, b) for a, b in zip(live, saved))
    if isinstance(live, dict):
        return isinstance(saved, dict) and set(saved) <= set(live) and all(_compatible(live[k], v) for k, v in saved.items())
    return False


def _checked_state(saved: Any, live_obj: Any, what: str, ckpt: Path) -> dict[str, Any] | None:
    """A copy of a saved state dict that the live object can take: only its keys, values of the same kinds."""
    if saved is None or live_obj is None:
        return None
    live = live_obj.state_dict()
    unknown = sorted(set(saved) - set(live))
    if unknown:
        raise CheckpointError(
            f"checkpoint {ckpt}: the {what} state has key(s) {unknown[:5]} that this {type(live_obj).__name__} lacks; "
            f"use the same {what} as the run that saved it"
        )
    if live and not saved:
        raise CheckpointError(f"checkpoint {ckpt}: the {what} state is empty (it was disabled when saved) but this one is in use")
    odd = [k for k in saved if not _compatible(live[k], saved[k])]
    if odd:
        key = odd[0]
        raise CheckpointError(
            f"checkpoint {ckpt}: the {what} state {key!r} is {str(saved[key])[:80]}, where this one holds "
            f"{str(live[key])[:80]}: not the same kind of value; the checkpoint was tampered with or comes from another setup"
        )
    return copy.deepcopy(saved)


def _optimizer_state(saved: Mapping[str, Any], opt_groups, optimizer, params, opt_values) -> dict[str, Any]:
    """The torch optimizer state dict to load: saved hyper-parameters over the live ones, states by index."""
    index = {fqn: i for i, fqn in enumerate(fqn for names in opt_groups for fqn in names)}
    state: dict[int, dict[str, Any]] = {}
    for fqn, i in index.items():
        entry: dict[str, Any] = {}
        for key, value in saved["scalars"].get(fqn, {}).items():
            if "tensor" in value:
                entry[key] = torch.tensor(value["value"], dtype=dtype_of(value["tensor"], f"optimizer.scalars[{fqn!r}]"))
            else:
                entry[key] = copy.deepcopy(value["json"])
        for key, tensor in opt_values.get(fqn, {}).items():
            entry[key] = tensor.to(params[fqn].sharded.device)
        if entry:
            state[i] = entry
    hyper_of = {tuple(sorted(g["params"])): g["hyper"] for g in saved["param_groups"]}
    groups = []
    for names, live in zip(opt_groups, optimizer.param_groups):
        hyper = {k: v for k, v in live.items() if k != "params"}
        for key, value in hyper_of[tuple(sorted(names))].items():
            hyper[key] = tuple(value) if isinstance(live.get(key), tuple) else copy.deepcopy(value)
        groups.append({**hyper, "params": [index[n] for n in names]})
    return {"state": state, "param_groups": groups}
