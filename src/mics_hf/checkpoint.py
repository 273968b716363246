"""Sharded, atomic, reshardable checkpoints of a MiCS model, its optimizer and the rest of a training run.

[Note: why not torch.distributed.checkpoint] DCP already deduplicates replicas and reshards, but its
`.metadata` file is a pickle and its non-tensor entries are read back with `torch.load(weights_only=False)`:
loading a checkpoint from an untrusted place could run code. mics_hf's format needs neither: tensors live in
safetensors files, everything else in one JSON file, and resharding is plain row arithmetic because every
parameter is sharded along dim 0.

Layout of one checkpoint directory (`<root>/step_00000100/`):
  mics_checkpoint.json       metadata: global shape of every tensor, which rows each file holds, optimizer
                             hyper-parameters, scheduler / scaler state, the user's `extra` (data position)
  shard-q0003.safetensors    position 3's rows of every parameter and of its optimizer state; written once
                             by one rank of position 3's replication group (writers spread over the groups)
  rng-rank0003.safetensors   that rank's RNG states (for an exact resume at the same world size)
  config.json                the Hugging Face config, when the model has one (for `mics-hf export`)
`<root>/latest` names the newest complete checkpoint; it is replaced last.

[Note: atomic save] Files are written into `<root>/.tmp-step_00000100/`, flushed and fsynced; only when every
rank has succeeded does rank 0 write the metadata, rename the directory into place and then replace `latest`.
A crash at any point leaves the previous checkpoint and `latest` untouched; the partial `.tmp-*` directory is
ignored by loads and removed by the next save.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .param_group import ShardedParam
from .rng import capture_rng as _capture_rng
from .rng import restore_rng as _restore_rng
from .shard import get_state
from .state import TrainingState

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "restore_rng_state", "CheckpointError", "read_metadata", "FORMAT"]

FORMAT = "mics_hf-checkpoint"
VERSION = 1
METADATA = "mics_checkpoint.json"
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read as asked; the message says why and what to do."""


# ---- small helpers ---------------------------------------------------------------------------------------
def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _barrier() -> None:
    if _dist()[0] > 1:
        dist.barrier()


def _all_ok(ok: bool, what: str, error: BaseException | None) -> None:
    """Agree on success across ranks; every rank raises if any failed, naming the failing ranks."""
    world, rank = _dist()
    if world == 1:
        if error is not None:
            raise CheckpointError(f"{what} failed: {type(error).__name__}: {error}") from error
        return
    messages: list[Any] = [None] * world
    dist.all_gather_object(messages, None if ok else f"{type(error).__name__}: {error}")
    failed = {r: m for r, m in enumerate(messages) if m is not None}
    if failed:
        detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(failed.items()))
        raise CheckpointError(f"{what} failed on {len(failed)} rank(s): {detail}") from error


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(block, crc)
    return crc


def _write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{what} is not JSON-serialisable ({exc}); checkpoints store non-tensor state as JSON so that loading "
            "never unpickles: keep it to numbers, strings, lists and dicts"
        ) from exc


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root` (from its `latest` pointer), or None if there is none."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    return path if (path / METADATA).is_file() else None


# ---- what gets saved --------------------------------------------------------------------------------------
def _params_by_fqn(model: nn.Module) -> dict[str, ShardedParam]:
    state = get_state(model)
    return {sp.fqn: sp for _, g in state.units for sp in g.params}


def _aliases(model: nn.Module, params: Mapping[str, ShardedParam]) -> dict[str, list[str]]:
    by_id = {id(sp.sharded): fqn for fqn, sp in params.items()}
    out: dict[str, list[str]] = {fqn: [] for fqn in params}
    for name, p in model.named_parameters(remove_duplicate=False):
        fqn = by_id.get(id(p))
        if fqn is not None and name != fqn:
            out[fqn].append(name)
    return out


def _optimizer_index(optimizer: torch.optim.Optimizer, params: Mapping[str, ShardedParam]) -> list[list[str]]:
    """The fqn of every parameter of every param group, in the optimizer's order."""
    by_id = {id(sp.sharded): fqn for fqn, sp in params.items()}
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        names = []
        for p in group["params"]:
            if id(p) not in by_id:
                raise CheckpointError(
                    f"optimizer param group {i} holds a tensor of shape {tuple(p.shape)} that is not a shard of this "
                    "model; build the optimizer on model.parameters() after mics_hf.shard_model"
                )
            names.append(by_id[id(p)])
        groups.append(names)
    return groups


def _writer_of(position: int, topology) -> int:
    """The rank that writes position q's shard: member (q mod r) of its replication group, so the p files are
    written by ranks of different partition groups instead of all by the first one."""
    replicas = [g[position] for g in topology.partition_groups]
    return replicas[position % len(replicas)]


# ---- save -------------------------------------------------------------------------------------------------
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
    world, rank = _dist()
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
    world, rank = _dist()
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


# ---- load -------------------------------------------------------------------------------------------------
def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint's metadata (JSON only); `path` may be a root with a `latest` pointer."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a step directory or a root holding `latest`")
    if not (path / METADATA).is_file():
        latest = latest_checkpoint(path) if path.is_dir() else None
        if latest is None:
            partial = path.name.startswith(".tmp-") or any(path.glob(".tmp-*")) if path.is_dir() else False
            hint = " (it looks like a save that never completed)" if partial else ""
            raise CheckpointError(
                f"{path} is not a mics_hf checkpoint: no {METADATA} and no `latest` pointer{hint}; pass a "
                "directory written by mics_hf.save_checkpoint"
            )
        path = latest
    try:
        meta = json.loads((path / METADATA).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path / METADATA} is corrupted ({exc}); restore it or load an earlier checkpoint") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / METADATA} is not a mics_hf checkpoint (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {meta.get('version')}, this mics_hf reads version {VERSION}; "
            "load it with the mics_hf that wrote it and export it, or upgrade"
        )
    meta["_path"] = str(path)
    return meta


def _verify_file(path: Path, entry: Mapping[str, Any]) -> None:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete, load an earlier one")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CheckpointError(
            f"checkpoint file {path} has {size} bytes, {entry['bytes']} were written: it is truncated or was "
            "replaced; load an earlier checkpoint"
        )
    if _crc32(path) != entry["crc32"]:
        raise CheckpointError(f"checkpoint file {path} fails its CRC32 check: it is corrupted; load an earlier checkpoint")


def _check_same_model(meta: Mapping[str, Any], params: Mapping[str, ShardedParam], path: Path) -> None:
    saved = meta["params"]
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    wrong = sorted(
        f"{fqn}: checkpoint {tuple(saved[fqn]['shape'])} vs model {tuple(sp.global_shape)}"
        for fqn, sp in params.items()
        if fqn in saved and tuple(saved[fqn]["shape"]) != tuple(sp.global_shape)
    )
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"shapes differ for {len(wrong)} tensor(s), e.g. {wrong[:3]}")
        if missing:
            parts.append(f"the model has {len(missing)} parameter(s) the checkpoint lacks, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"the checkpoint has {len(unexpected)} parameter(s) the model lacks, e.g. {unexpected[:3]}")
        raise CheckpointError(
            f"checkpoint {path} was saved from a different model ({meta.get('model_class')}): {'; '.join(parts)}. "
            "Build the same architecture and size before loading"
        )


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
    if _dist()[0] == 1 and error is not None:
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
    world, rank = _dist()
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
