"""The checkpoint format: the on-disk layout, its metadata, and the checks every reader runs.

Sharded, atomic, reshardable checkpoints of a MiCS model, its optimizer and the rest of a training run;
save.py writes them, load.py reads them (resharding), export.py turns one into a Hugging Face directory.

[Note: why not torch.distributed.checkpoint] DCP already deduplicates replicas and reshards, but its
`.metadata` file is a pickle and its non-tensor entries are read back with `torch.load(weights_only=False)`:
loading a checkpoint from an untrusted place could run code. mics_hf's format needs neither: tensors live in
safetensors files, everything else in one JSON file, and resharding is plain row arithmetic because every
parameter is sharded along dim 0.

Layout of one checkpoint directory (`<root>/step_00000100/`):
  mics_checkpoint.json       metadata: global shape and dtype of every tensor, which rows each file holds,
                             size and CRC32 of every file, optimizer hyper-parameters, scheduler / scaler
                             state, the user's `extra` (data position), and a SHA-256 over all of it
  shard-q0003.safetensors    position 3's rows of every parameter and of its optimizer state; written once
                             by one rank of position 3's replication group (writers spread over the groups)
  rng-rank0003.safetensors   that rank's RNG states (for an exact resume at the same world size)
  config.json, tokenizer/    the Hugging Face config and tokenizer, when given (for `mics-hf export`)
  adapter_config.json        a PEFT model's adapter config (`mics-hf export` merges the adapter)
`<root>/latest` names the newest complete checkpoint; `<root>/.lock` serialises savers into one root.

[Note: atomic save] Files are written into `<root>/.tmp-step_N/` and fsynced; only when every rank has
succeeded does rank 0 write the metadata, rename the directory to `step_N` and then replace `latest` (through
`latest.tmp`). Overwriting a step first renames the old `step_N` to `.old-step_N`; while `step_N` is missing,
`latest_checkpoint` falls back to `.old-step_N`, so at every instant `latest` leads to a complete
checkpoint. The next save (holding the lock) removes `.tmp-step_*` and `latest.tmp`, and either deletes
`.old-step_N` (when `step_N` is back) or renames it back (when the crash came between the two renames).

[Note: untrusted checkpoints] A checkpoint may come from anywhere. Every path in it stays inside the
checkpoint directory (files.py), the metadata is validated field by field (row ranges must tile every
tensor exactly; file names are the canonical ones; dtypes are known), its checksum must match, and load.py
checks every tensor's dtype and shape against the model before any state changes, on every rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from ..engine.shard import get_state
from ..engine.topology import world_and_rank
from ..engine.unit import ShardedParam
from .files import DTYPE_NAMES, CheckpointError, parse_json, read_small

__all__ = ["CheckpointError", "FORMAT", "METADATA", "LATEST", "latest_checkpoint", "read_metadata"]

FORMAT = "mics_hf-checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no checksum, buffer shapes without dtypes
METADATA = "mics_checkpoint.json"
LATEST = "latest"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
_STEP_NAME = re.compile(r"step_(\d{8,20})")
_METADATA_LIMIT = 1 << 30
_MESSAGE_LIMIT = 2000


# ---- agreement across ranks -------------------------------------------------------------------------------
def _short(text: str, limit: int = _MESSAGE_LIMIT) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def _all_ok(ok: bool, what: str, error: BaseException | None, *, agree: Any = None) -> None:
    """Agree on success across ranks: every rank raises one CheckpointError if any failed, naming the ranks.

    `agree` (e.g. the checksum of the metadata a rank read) must also be equal on every rank.
    """
    world, _ = world_and_rank()
    if world == 1:
        if error is not None:
            if isinstance(error, CheckpointError):
                raise error
            raise CheckpointError(f"{what} failed: {type(error).__name__}: {_short(str(error))}") from error
        return
    mine = None if ok else _short(f"{type(error).__name__}: {error}")
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (mine, agree))
    by_message: dict[str, list[int]] = {}
    for r, (message, _) in enumerate(gathered):
        if message is not None:
            by_message.setdefault(message, []).append(r)
    if by_message:
        count = sum(len(ranks) for ranks in by_message.values())
        detail = "; ".join(
            f"rank {ranks[0]}: {m}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}: {m}"
            for m, ranks in sorted(by_message.items(), key=lambda kv: kv[1])
        )
        raise CheckpointError(f"{what} failed on {count} rank(s): {detail}") from error
    values = {repr(a) for _, a in gathered}
    if len(values) > 1:
        raise CheckpointError(
            f"{what}: the ranks read different checkpoints ({sorted(values)[:4]}); a save into the same root ran "
            "during the load, or the ranks see different file systems: pass one step directory and retry"
        )


def _jsonable(value: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{what} is not JSON-serialisable ({exc}); checkpoints store non-tensor state as JSON so that loading "
            "never unpickles: keep it to numbers, strings, lists and dicts"
        ) from exc


# ---- names ------------------------------------------------------------------------------------------------
def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    """The step number of a step directory name (numeric, so step 10^8 sorts after 99999999), else None."""
    match = _STEP_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def shard_file_name(position: int) -> str:
    return f"shard-q{position:04d}.safetensors"


def rng_file_name(rank: int) -> str:
    return f"rng-rank{rank:04d}.safetensors"


def is_complete(directory: Path) -> bool:
    """A real directory (not a link) holding a regular metadata file: a published checkpoint."""
    try:
        return stat.S_ISDIR(os.lstat(directory).st_mode) and stat.S_ISREG(os.lstat(directory / METADATA).st_mode)
    except OSError:
        return False


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root` (from its `latest` pointer), or None if there is none.

    The pointer is untrusted: it must hold one step directory name. While an overwrite of that step is between
    its two renames, the previous version (`.old-step_N`) is returned (see [Note: atomic save]).
    """
    root = Path(root)
    if not os.path.lexists(root / LATEST) or not root.is_dir():
        return None
    name = read_small(root, LATEST, f"the `latest` pointer of {root}", limit=4096).decode("utf-8", "replace").strip()
    if step_of(name) is None:
        raise CheckpointError(
            f"the `latest` pointer {root / LATEST} holds {name[:80]!r}, not a step directory name like step_00000100: "
            "it was tampered with or corrupted; write the name of a complete checkpoint into it or pass a step directory"
        )
    candidate = root / name
    if os.path.islink(candidate):
        raise CheckpointError(
            f"the `latest` pointer {root / LATEST} names {name}, a symbolic link; checkpoints never contain links (one "
            "could point anywhere): pass the step directory you trust instead"
        )
    if os.path.lexists(candidate):
        return candidate  # read_metadata says precisely what is wrong if it is not a complete checkpoint
    old = root / (OLD_PREFIX + name)
    return old if is_complete(old) else None


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """The step directory that `path` means (itself, or its root's `latest`), with the user's links resolved."""
    path = Path(path)
    if not path.exists():
        old = path.with_name(OLD_PREFIX + path.name)
        hint = f" ({old} holds its previous version: a save that overwrote it crashed; the next save restores it)" if is_complete(old) else ""
        raise CheckpointError(f"checkpoint {path} does not exist{hint}; pass a step directory or a root holding `latest`")
    real = Path(os.path.realpath(path))
    if real.is_dir() and os.path.lexists(real / METADATA):
        return real
    latest = latest_checkpoint(real) if real.is_dir() else None
    if latest is None and real.is_dir() and os.path.lexists(real / LATEST):
        raise CheckpointError(
            f"the `latest` pointer of {path} names a checkpoint that does not exist; pass a step directory of {path}"
        )
    if latest is None:
        partial = real.is_dir() and (real.name.startswith(TMP_PREFIX) or any(real.glob(TMP_PREFIX + "*")))
        hint = " (it looks like a save that never completed)" if partial else ""
        raise CheckpointError(
            f"{path} is not a mics_hf checkpoint: no {METADATA} and no `latest` pointer{hint}; pass a "
            "directory written by mics_hf.save_checkpoint"
        )
    return latest


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


def metadata_checksum(meta: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of everything but the checksum itself (floats round-trip exactly)."""
    body = {k: v for k, v in meta.items() if k not in ("checksum", "_path")}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


# ---- reading and validating -------------------------------------------------------------------------------
def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a checkpoint's metadata (JSON only); `path` may be a root with a `latest` pointer.

    Everything a reader relies on is checked here (see [Note: untrusted checkpoints]); `_path` is added.
    """
    ckpt = checkpoint_dir(path)
    meta = parse_json(read_small(ckpt, METADATA, METADATA, _METADATA_LIMIT), METADATA, ckpt / METADATA)
    where = ckpt / METADATA
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{where} is not a mics_hf checkpoint (format {str(found)[:80]!r})")
    version = meta.get("version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise CheckpointError(
            f"{ckpt} has checkpoint format version {str(version)[:20]}, this mics_hf reads versions {list(READABLE_VERSIONS)}; "
            "load it with the mics_hf that wrote it and export it, or upgrade"
        )
    if version >= 2:
        if meta.get("checksum") != metadata_checksum(meta):
            raise CheckpointError(
                f"{where} fails its checksum: it was edited or corrupted after the save; restore it or load an earlier checkpoint"
            )
    else:
        _upgrade_v1(meta, where)
    from .validate import validate_metadata  # the field-by-field schema

    validate_metadata(meta, where)
    meta["_path"] = str(ckpt)
    return meta


def _upgrade_v1(meta: dict[str, Any], where: Path) -> None:
    """Version 1 stored buffer shapes only and optimizer scalars as bare numbers; bring it to version 2's shape."""
    try:
        meta["buffers"] = {n: {"shape": s, "dtype": None} for n, s in meta.get("buffers", {}).items()}
        opt = meta.get("optimizer")
        if isinstance(opt, dict):
            opt["sharded_keys"] = {fqn: {k: None for k in keys} for fqn, keys in opt.get("sharded_keys", {}).items()}
            opt["scalars"] = {
                fqn: {
                    k: {"tensor": "float32", "value": v} if isinstance(v, (int, float)) and not isinstance(v, bool) else {"json": v}
                    for k, v in entry.items()
                }
                for fqn, entry in opt.get("scalars", {}).items()
            }
    except (AttributeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where} (format version 1) is malformed ({exc}); load an earlier checkpoint") from None


def dtype_of(name: str | None, field: str) -> torch.dtype | None:
    """The torch dtype a metadata dtype name means (None stays None: a version 1 checkpoint did not say)."""
    if name is None:
        return None
    if name not in DTYPE_NAMES:
        raise CheckpointError(f"checkpoint metadata field {field} is {str(name)[:40]!r}, not a dtype this format stores")
    return DTYPE_NAMES[name]

