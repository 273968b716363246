"""Field-by-field validation of a checkpoint's metadata, before anything trusts it.

A tampered or corrupted `mics_checkpoint.json` must never become a wrong model: every field has its type and
range checked, file names must be the canonical ones (so none can point elsewhere), every position has one
shard file and every rank one RNG file, and the row ranges of each parameter must tile [0, rows) exactly (a
gap would load uninitialised memory, an overlap or a swap permuted rows). Errors name the field.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any, Mapping

from .files import CheckpointError, check_name
from .format import dtype_of, rng_file_name, shard_file_name

__all__ = ["validate_metadata"]

_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 60
_SHOW.maxlist = _SHOW.maxdict = 4
_SHOW.maxlevel = 2
_MAX_DIMS = 64


def _fail(where: Path, field: str, problem: str) -> None:
    raise CheckpointError(
        f"{where}: field {field} {problem}; the metadata was tampered with or corrupted: load an earlier checkpoint"
    )


def _int(where: Path, value: Any, field: str, lo: int = 0, hi: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        _fail(where, field, f"is {_SHOW.repr(value)}, not an integer in [{lo}, {'inf' if hi is None else hi}]")
    return value


def _of(where: Path, value: Any, kind: type | tuple[type, ...], field: str) -> Any:
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        _fail(where, field, f"is {_SHOW.repr(value)}, not a JSON {names}")
    return value


def _shape(where: Path, value: Any, field: str) -> list[int]:
    _of(where, value, list, field)
    if len(value) > _MAX_DIMS:
        _fail(where, field, f"has {len(value)} dimensions")
    for i, d in enumerate(value):
        _int(where, d, f"{field}[{i}]")
    return value


def _dtype(where: Path, value: Any, field: str, *, optional: bool) -> None:
    if value is None and optional:
        return
    try:
        dtype_of(_of(where, value, str, field), field)
    except CheckpointError as exc:
        _fail(where, field, str(exc).split(" is ", 1)[-1])


def validate_metadata(meta: dict[str, Any], where: Path) -> None:
    """Check every field a reader uses (see the module docstring); raise CheckpointError naming the field."""
    v1 = meta.get("version") == 1
    _int(where, meta.get("step"), "step")
    world = _int(where, meta.get("world_size"), "world_size", lo=1)
    p = _int(where, meta.get("partition_size"), "partition_size", lo=1)
    if world % p:
        _fail(where, "partition_size", f"({p}) does not divide world_size ({world})")
    if meta.get("devices_per_node") is not None:
        _int(where, meta["devices_per_node"], "devices_per_node", lo=1)
    _of(where, meta.get("model_class"), str, "model_class")
    params = _of(where, meta.get("params"), dict, "params")
    for fqn, info in params.items():
        field = f"params[{fqn!r}]"
        _of(where, info, dict, field)
        _shape(where, info.get("shape"), f"{field}.shape")
        _dtype(where, info.get("dtype"), f"{field}.dtype", optional=False)
        for i, alias in enumerate(_of(where, info.get("aliases", []), list, f"{field}.aliases")):
            _of(where, alias, str, f"{field}.aliases[{i}]")
    for name, info in _of(where, meta.get("buffers", {}), dict, "buffers").items():
        _of(where, info, dict, f"buffers[{name!r}]")
        _shape(where, info.get("shape"), f"buffers[{name!r}].shape")
        _dtype(where, info.get("dtype"), f"buffers[{name!r}].dtype", optional=v1)
    _validate_files(meta, params, world, p, where)
    for key in ("scheduler", "scaler"):
        if meta.get(key) is not None:
            _of(where, meta[key], dict, key)
    _of(where, meta.get("extra", {}), dict, "extra")
    if meta.get("optimizer") is not None:
        _validate_optimizer(meta["optimizer"], params, where, v1)


def _validate_files(meta: Mapping[str, Any], params: Mapping[str, Any], world: int, p: int, where: Path) -> None:
    shards: dict[int, Mapping[str, Any]] = {}
    rngs: set[int] = set()
    for i, entry in enumerate(_of(where, meta.get("files"), list, "files")):
        field = f"files[{i}]"
        _of(where, entry, dict, field)
        name = check_name(entry.get("file"), f"{where}: field {field}.file")
        _int(where, entry.get("bytes"), f"{field}.bytes")
        _int(where, entry.get("crc32"), f"{field}.crc32", hi=2**32 - 1)
        kind = entry.get("kind")
        if kind == "shard":
            q = _int(where, entry.get("position"), f"{field}.position", hi=p - 1)
            if q in shards:
                _fail(where, f"{field}.position", f"repeats position {q}")
            if name != shard_file_name(q):
                _fail(where, f"{field}.file", f"is {name!r}, but position {q}'s file is {shard_file_name(q)!r}")
            rows = _of(where, entry.get("rows"), dict, f"{field}.rows")
            if set(rows) != set(params):
                odd = sorted(set(rows) ^ set(params))[:3]
                _fail(where, f"{field}.rows", f"does not list exactly the parameters of `params` (e.g. {odd})")
            for fqn, span in rows.items():
                f = f"{field}.rows[{fqn!r}]"
                if not isinstance(span, list) or len(span) != 2:
                    _fail(where, f, f"is {_SHOW.repr(span)}, not [first_row, end_row]")
                a, b = _int(where, span[0], f), _int(where, span[1], f)
                if a > b:
                    _fail(where, f, f"is [{a}, {b}]: the first row is after the end")
            shards[q] = entry
        elif kind == "rng":
            r = _int(where, entry.get("rank"), f"{field}.rank", hi=world - 1)
            if r in rngs:
                _fail(where, f"{field}.rank", f"repeats rank {r}")
            if name != rng_file_name(r):
                _fail(where, f"{field}.file", f"is {name!r}, but rank {r}'s RNG file is {rng_file_name(r)!r}")
            rngs.add(r)
        else:
            _fail(where, f"{field}.kind", f"is {_SHOW.repr(kind)}, not 'shard' or 'rng'")
    if set(shards) != set(range(p)):
        _fail(where, "files", f"has shard files for positions {sorted(shards)[:8]}, not exactly one for each of 0..{p - 1}")
    if rngs != set(range(world)):
        _fail(where, "files", f"has RNG files for ranks {sorted(rngs)[:8]}, not exactly one for each of 0..{world - 1}")
    for fqn, info in params.items():
        _check_tiling(fqn, info["shape"], [(q, shards[q]["rows"][fqn]) for q in range(p)], where)


def _check_tiling(fqn: str, shape: list[int], spans: list[tuple[int, list[int]]], where: Path) -> None:
    """The non-empty row ranges of one tensor must cover [0, rows) with no gap and no overlap."""
    rows = shape[0] if shape else 1
    expect = 0
    for q, (a, b) in sorted(((q, s) for q, s in spans if s[1] > s[0]), key=lambda qs: qs[1][0]):
        if a != expect:
            gap = "a gap" if a > expect else "an overlap"
            _fail(where, f"files[position {q}].rows[{fqn!r}]", f"starts at row {a} where row {expect} was due ({gap})")
        expect = b
    if expect != rows:
        _fail(where, f"params[{fqn!r}]", f"has {rows} rows but the shard files hold rows [0, {expect})")


def _validate_optimizer(opt: Any, params: Mapping[str, Any], where: Path, v1: bool) -> None:
    _of(where, opt, dict, "optimizer")
    _of(where, opt.get("class"), str, "optimizer.class")
    seen: set[str] = set()
    for i, group in enumerate(_of(where, opt.get("param_groups"), list, "optimizer.param_groups")):
        field = f"optimizer.param_groups[{i}]"
        _of(where, group, dict, field)
        _of(where, group.get("hyper"), dict, f"{field}.hyper")
        for j, fqn in enumerate(_of(where, group.get("params"), list, f"{field}.params")):
            if not isinstance(fqn, str) or fqn not in params or fqn in seen:
                _fail(where, f"{field}.params[{j}]", f"is {_SHOW.repr(fqn)}: not a parameter of `params`, or listed twice")
            seen.add(fqn)
    for fqn, keys in _of(where, opt.get("sharded_keys", {}), dict, "optimizer.sharded_keys").items():
        field = f"optimizer.sharded_keys[{fqn!r}]"
        if fqn not in params:
            _fail(where, field, "is not a parameter of `params`")
        for key, dtype in _of(where, keys, dict, field).items():
            _dtype(where, dtype, f"{field}[{key!r}]", optional=v1)
    for fqn, entries in _of(where, opt.get("scalars", {}), dict, "optimizer.scalars").items():
        field = f"optimizer.scalars[{fqn!r}]"
        if fqn not in params:
            _fail(where, field, "is not a parameter of `params`")
        for key, entry in _of(where, entries, dict, field).items():
            f = f"{field}[{key!r}]"
            _of(where, entry, dict, f)
            if set(entry) == {"tensor", "value"}:
                _dtype(where, entry["tensor"], f"{f}.tensor", optional=False)
                if not isinstance(entry["value"], (int, float)) or (isinstance(entry["value"], bool) and entry["tensor"] != "bool"):
                    _fail(where, f"{f}.value", f"is {_SHOW.repr(entry['value'])}, not a number")
            elif set(entry) != {"json"}:
                _fail(where, f, "must be {'tensor': dtype, 'value': number} or {'json': value}")
