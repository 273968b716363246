"""The checkpoint format: the on-disk layout, its metadata, and the checks every reader runs.

Sharded, atomic, reshardable checkpoints of a MiCS model, its optimizer and the rest of a training run;
save.py writes them, load.py reads them (resharding), export.py turns one into a Hugging Face directory.

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
import zlib
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from ..engine.shard import get_state
from ..engine.topology import world_and_rank
from ..engine.unit import ShardedParam

__all__ = ["CheckpointError", "FORMAT", "METADATA", "LATEST", "latest_checkpoint", "read_metadata"]

FORMAT = "mics_hf-checkpoint"
VERSION = 1
METADATA = "mics_checkpoint.json"
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read as asked; the message says why and what to do."""


# ---- agreement across ranks and small file helpers --------------------------------------------------------
def _all_ok(ok: bool, what: str, error: BaseException | None) -> None:
    """Agree on success across ranks; every rank raises if any failed, naming the failing ranks."""
    world, rank = world_and_rank()
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



# ---- reading and validating -------------------------------------------------------------------------------
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
