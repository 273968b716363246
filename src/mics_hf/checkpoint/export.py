"""Export to the normal Hugging Face layout (config.json + safetensors + tokenizer), live or from a checkpoint.

[Note: outputs never destroy] An export is written into a fresh temporary directory beside `out_dir` and
then published: renamed onto `out_dir` when that does not exist or is empty (atomic), or, with
`overwrite=True`, moved into it file by file, so files the export does not write are kept. Refused whatever
`overwrite` says: an `out_dir` that is, contains or lies inside the checkpoint being read, one that is a
mics_hf checkpoint or checkpoint root, and one holding weight files the export would not replace (from_pretrained
could load those stale weights instead of the new ones).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from ..engine.hooks import TrainingState
from ..engine.shard import get_state
from ..engine.topology import world_and_rank
from .files import check_name, fsync_dir, fsync_tree, open_inside, parse_json, read_small
from .format import LATEST, METADATA, CheckpointError, _all_ok, dtype_of, is_complete, read_metadata
from .hf_save import is_peft_model
from .save import ADAPTER_CONFIG
from .load import _row_layout, _ShardReader
from .state_dict import full_state_dict

__all__ = ["save_pretrained", "export_checkpoint", "consolidate_checkpoint"]

# files that hold model weights: a stale one could be loaded by from_pretrained instead of the new weights
_WEIGHTS = re.compile(r"((model|pytorch_model|tf_model|flax_model)([-.].*)?\.(safetensors|bin|h5|msgpack|pt|pth))|.*\.index\.json")


@contextlib.contextmanager
def _original_class(model: nn.Module) -> Iterator[nn.Module]:
    """Show HF the user's own class while saving, so config.json's `architectures` names it, not MiCS<...>."""
    mics_cls = type(model)
    model.__class__ = mics_cls.__bases__[-1]
    try:
        yield model
    finally:
        model.__class__ = mics_cls


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _check_out_dir(out_dir: Path, *, overwrite: bool, reading: Sequence[Path] = ()) -> bool:
    """Refuse an output directory that an export would damage (see [Note: outputs never destroy]).

    Returns True when out_dir exists and is not empty (the export then goes in file by file).
    """
    if os.path.lexists(out_dir) and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a directory; pass a directory for the exported model")
    real = Path(os.path.realpath(out_dir))
    for ckpt in reading:
        if _related(real, Path(os.path.realpath(ckpt))):
            raise CheckpointError(
                f"the output directory {out_dir} is, contains or lies inside the checkpoint {ckpt} being exported; "
                "writing there would change or delete it: choose a directory outside it"
            )
    inside = next((p for p in real.parents if is_complete(p)), None)
    if inside is not None:
        raise CheckpointError(f"the output directory {out_dir} lies inside the mics_hf checkpoint {inside}; choose a directory outside it")
    if not out_dir.is_dir():
        return False
    if os.path.lexists(out_dir / METADATA) or os.path.lexists(out_dir / LATEST):
        raise CheckpointError(
            f"the output directory {out_dir} is a mics_hf checkpoint or checkpoint root; exporting there would mix a model "
            "into it: choose another directory"
        )
    entries = sorted(os.listdir(out_dir))
    if entries and not overwrite:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise CheckpointError(
            f"the output directory {out_dir} is not empty ({shown}); pass overwrite=True (`mics-hf export --overwrite`) "
            "to replace the files the export writes, keeping the others, or choose an empty or new directory"
        )
    return bool(entries)


def _make_tmp(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-export-{out_dir.name}-", dir=out_dir.parent))


def _publish_export(tmp: Path, out_dir: Path, into_existing: bool) -> None:
    """Move the finished export into place; files of out_dir the export does not write are kept."""
    fsync_tree(tmp)
    if not into_existing:
        os.replace(tmp, out_dir)  # atomic; replaces an empty directory, fails on one that filled up meanwhile
        fsync_dir(out_dir.parent)
        return
    written = sorted(os.listdir(tmp))
    stale = sorted(n for n in os.listdir(out_dir) if _WEIGHTS.fullmatch(n) and n not in written)
    if stale:
        raise CheckpointError(
            f"the output directory {out_dir} holds weight files this export does not write ({', '.join(stale[:5])}); "
            "from_pretrained could load them instead of the new weights: remove them, or export into an empty directory"
        )
    blocked = [n for n in written if (out_dir / n).is_dir() and not (out_dir / n).is_symlink()]
    if blocked:
        raise CheckpointError(f"{out_dir} has directories where the export writes files ({blocked[:5]}); move them away")
    for name in sorted(written, key=lambda n: n == "config.json"):  # config.json last
        os.replace(tmp / name, out_dir / name)
    fsync_dir(out_dir)
    tmp.rmdir()


def _write_export(out_dir: Path, into_existing: bool, write: Any) -> None:
    """Run write(tmp) into a fresh temporary directory and publish it; on failure remove only that directory."""
    tmp = _make_tmp(out_dir)
    try:
        write(tmp)
        _publish_export(tmp, out_dir, into_existing)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_pretrained(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer: Any = None, overwrite: bool = False, **kwargs: Any) -> None:
    """Gather the full weights of a sharded HF model and write them with `save_pretrained` (rank 0 writes).

    Every rank must call it. `AutoModel*.from_pretrained(out_dir)` then loads the same weights; kwargs go to the
    model's own `save_pretrained` (e.g. max_shard_size). A non-empty out_dir is refused unless `overwrite`
    (see [Note: outputs never destroy]).
    """
    state = get_state(model)
    if not hasattr(model, "save_pretrained"):
        raise CheckpointError(
            f"{type(model).__name__} has no save_pretrained (not a Hugging Face model); use mics_hf.full_state_dict "
            "and torch/safetensors to save it"
        )
    if state.training_state is not TrainingState.IDLE:
        raise CheckpointError("save_pretrained was called in the middle of a forward/backward; call it between steps")
    state.reshard_all()
    out = Path(os.path.realpath(out_dir))  # the user's own path: publish into what a link there points to
    _, rank = world_and_rank()
    error: BaseException | None = None
    into_existing = False
    if rank == 0:
        try:
            into_existing = _check_out_dir(out, overwrite=overwrite)
        except Exception as exc:
            error = exc
    _all_ok(error is None, f"checking the output directory {out}", error)
    weights = full_state_dict(model)  # every rank gathers; rank 0 keeps the full tensors

    def write(tmp: Path) -> None:
        if is_peft_model(model):  # an export is a whole model: the adapters merged into the base weights
            _merged(model, weights).save_pretrained(str(tmp), safe_serialization=True, **kwargs)
        else:
            with _original_class(model):
                model.save_pretrained(str(tmp), state_dict=weights, safe_serialization=True, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    if rank == 0:
        try:
            _write_export(out, into_existing, write)
        except Exception as exc:
            error = exc
    _all_ok(error is None, f"saving the model to {out}", error)


def _merged(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """An unsharded copy of a live PEFT model with its gathered weights, adapters merged (rank 0, CPU)."""
    base = model.get_base_model()
    name = next(iter(model.peft_config))
    return _merge(type(base), base.config, model.peft_config[name], name, weights)


def _merge(base_cls: type, config: Any, peft_config: Any, name: str, weights: dict[str, torch.Tensor]) -> nn.Module:
    """PEFT's own merge_and_unload on a copy built on the meta device that takes the full tensors as they are
    (no second copy); tied weights stay tied because the state holds one tensor under each of their names."""
    from accelerate import init_empty_weights
    from peft import get_peft_model

    with init_empty_weights(include_buffers=False):
        fresh = base_cls._from_config(config) if hasattr(base_cls, "_from_config") else base_cls(config)
    copy = get_peft_model(fresh, peft_config, adapter_name=name)
    missing, unexpected = copy.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in missing if any(p.is_meta for n, p in copy.named_parameters() if n == k)]
    if missing or unexpected:
        raise CheckpointError(f"the PEFT model's gathered state does not fit a fresh copy (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return copy.merge_and_unload()


def consolidate_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Assemble the full parameters (under every alias) and persistent buffers of a sharded checkpoint in one
    process, no GPUs needed; every file is size-, CRC- and shape-checked first (see load.py)."""
    meta = read_metadata(path)
    reader = _ShardReader(Path(meta["_path"]), meta, verify=True)
    out: dict[str, torch.Tensor] = {}
    try:
        for fqn, info in meta["params"].items():
            rows, rest = _row_layout(info["shape"])
            full = reader.rows(f"param/{fqn}", fqn, 0, rows, rest, dtype_of(info["dtype"], f"params[{fqn!r}].dtype"))
            full = full.reshape(info["shape"])
            out[fqn] = full
            for alias in info.get("aliases", []):
                out[alias] = full
        zero = reader._file(reader.shards[0])
        for name, info in meta.get("buffers", {}).items():
            key = f"buffer/{name}"
            if key in zero.keys():
                dtype = zero.describe(key)[0] if info["dtype"] is None else dtype_of(info["dtype"], f"buffers[{name!r}].dtype")
                out[name] = reader.buffer(name, dtype, tuple(info["shape"]))
    finally:
        reader.close()
    return out, meta


def _config_and_class(ckpt: Path, meta: dict[str, Any], base_class: str | None = None) -> tuple[Any, type]:
    """The checkpoint's config.json (read as untrusted JSON) and the transformers model class it names."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not os.path.lexists(ckpt / "config.json"):
        raise CheckpointError(
            f"{ckpt} has no config.json (the model had no Hugging Face config); load it with "
            "mics_hf.consolidate_checkpoint and save the tensors yourself"
        )
    values = parse_json(read_small(ckpt, "config.json", "config.json", 64 << 20), "config.json", ckpt / "config.json")
    model_type = values.get("model_type") if isinstance(values, dict) else None
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{ckpt / 'config.json'} names model_type {str(model_type)[:60]!r}, which this transformers does not know")
    config = CONFIG_MAPPING[model_type].from_dict(values)
    # The class that was trained first: a model fine-tuned with a new head keeps the `architectures` of the
    # checkpoint it started from (e.g. BertForMaskedLM under a BertForSequenceClassification); config.json's
    # `architectures` only when the recorded class is not a transformers class (e.g. a PEFT wrapper).
    recorded = base_class or meta.get("model_class")  # a PEFT model: the class it wraps
    known = isinstance(recorded, str) and isinstance(getattr(transformers, recorded, None), type)
    cls_name = recorded if known else (getattr(config, "architectures", None) or [recorded])[0]
    model_cls = getattr(transformers, cls_name, None) if isinstance(cls_name, str) else None
    if not (isinstance(model_cls, type) and issubclass(model_cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"transformers has no model class {str(cls_name)[:60]!r} (from {ckpt / 'config.json'}); upgrade transformers")
    return config, model_cls


def export_checkpoint(
    path: str | os.PathLike, out_dir: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None, overwrite: bool = False
) -> Path:
    """`mics-hf export`: a sharded checkpoint -> a Hugging Face model directory, offline, in one process.

    A non-empty out_dir is refused unless `overwrite`, and the checkpoint itself never (see [Note: outputs never
    destroy]). `tokenizer` is a directory of the user's (default: the checkpoint's own `tokenizer/`).
    """
    meta = read_metadata(path)
    ckpt = Path(meta["_path"])
    out = Path(os.path.realpath(out_dir))  # the user's own path: publish into what a link there points to
    into_existing = _check_out_dir(out, overwrite=overwrite, reading=[ckpt])
    adapter = _adapter_config(ckpt) if os.path.lexists(ckpt / ADAPTER_CONFIG) else None
    config, model_cls = _config_and_class(ckpt, meta, adapter[2] if adapter else None)
    state, _ = consolidate_checkpoint(ckpt)
    if adapter is not None:
        merged = _merge(model_cls, config, adapter[0], adapter[1], state)  # a PEFT model: one merged model
        _write_export(out, into_existing, lambda tmp: _write_with_tokenizer(merged, {}, tmp, ckpt, tokenizer))
        return Path(out_dir)
    with torch.device("meta"):
        model = model_cls(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape))
    if missing or wrong:
        raise CheckpointError(
            f"{ckpt} does not match its own config.json ({model_cls.__name__}): missing {missing[:3]}, other shapes "
            f"{wrong[:3]}; the checkpoint was tampered with"
        )
    state = {k: v for k, v in state.items() if k in expected}  # non-persistent buffers (position_ids) stay out
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise CheckpointError(f"tokenizer directory {tokenizer} does not exist; pass the directory saved by save_pretrained")

    _write_export(out, into_existing, lambda tmp: _write_with_tokenizer(model, state, tmp, ckpt, tokenizer))
    return Path(out_dir)


def _write_with_tokenizer(model: nn.Module, state: dict[str, torch.Tensor], tmp: Path, ckpt: Path, tokenizer: Any) -> None:
    model.save_pretrained(str(tmp), state_dict=state or None, safe_serialization=True)
    if tokenizer is not None:
        _copy_user_tokenizer(Path(tokenizer), tmp)
    elif os.path.lexists(ckpt / "tokenizer"):
        _copy_checkpoint_tokenizer(ckpt, tmp)


def _adapter_config(ckpt: Path) -> tuple[Any, str, str]:
    """The PEFT config a checkpoint recorded (untrusted JSON: bounded, and built only through peft's own
    config classes, which accept known fields only)."""
    from peft import get_peft_config

    values = parse_json(read_small(ckpt, ADAPTER_CONFIG, ADAPTER_CONFIG, 1 << 20), ADAPTER_CONFIG, ckpt / ADAPTER_CONFIG)
    if not isinstance(values, dict) or not isinstance(values.get("config"), dict) or not all(
            isinstance(values.get(k), str) for k in ("adapter_name", "base_class")):
        raise CheckpointError(f"{ckpt / ADAPTER_CONFIG} is not an adapter config written by mics_hf; the checkpoint was tampered with")
    try:
        return get_peft_config(values["config"]), values["adapter_name"], values["base_class"]
    except Exception as exc:
        raise CheckpointError(f"{ckpt / ADAPTER_CONFIG} does not describe a PEFT adapter ({str(exc)[:200]}); the checkpoint was tampered with") from None


def _skip(name: str, dst: Path) -> bool:
    """Tokenizer files never replace what the model export wrote, nor add weights (a model directory given as
    the tokenizer would otherwise overwrite the exported weights)."""
    return os.path.lexists(dst / name) or bool(_WEIGHTS.fullmatch(name)) or name in ("config.json", "generation_config.json")


def _copy_user_tokenizer(src: Path, dst: Path) -> None:
    """The user's own directory: its links are followed (the Hugging Face cache is made of links)."""
    for name in sorted(os.listdir(src)):
        if (src / name).is_file() and not _skip(name, dst):
            shutil.copyfile(src / name, dst / name)


def _copy_checkpoint_tokenizer(ckpt: Path, dst: Path) -> None:
    """The checkpoint's `tokenizer/`: untrusted, so no links (to it or inside it) and regular files only."""
    field = "the checkpoint's tokenizer/"
    src = ckpt / "tokenizer"
    if src.is_symlink() or not src.is_dir():
        raise CheckpointError(f"{src} is a symbolic link or not a directory; a checkpoint's tokenizer/ must be a plain directory")
    for name in sorted(os.listdir(src)):
        check_name(name, f"{field} entry")
        if _skip(name, dst):
            continue
        fd = open_inside(src, name, f"{field} file {name!r}")
        with os.fdopen(fd, "rb") as f_in, open(dst / name, "wb") as f_out:
            shutil.copyfileobj(f_in, f_out)
