"""Read a Hugging Face checkpoint (safetensors, sharded index included) straight into MiCS shards.

`PretrainedWeights(directory)` is a weight source for `shard_model(..., weights=...)`: each rank reads only its
rows of each tensor through safetensors' memory map, so no rank ever holds the full model, and the model
itself is built on the meta device. What `save_pretrained` writes is read as it is: the keys of the model's
state dict, with the base model's prefix added or dropped (a base checkpoint under a model with a head, or the
reverse) and LayerNorm's legacy `gamma` / `beta` names. A checkpoint whose names match none of that (one that
transformers converts while loading) is refused with the way out, never loaded half-matched.

Pickled checkpoints (`pytorch_model.bin`) are refused: unpickling can run arbitrary code, and a file we read may
have been written by an attacker. The index is untrusted input too: bounded, parsed strictly, and every file it
names must be a plain name inside the directory.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import torch
from .files import CheckpointError, SafetensorsFile, check_name

__all__ = ["PretrainedWeights", "SAFE_WEIGHTS_NAME", "SAFE_WEIGHTS_INDEX_NAME"]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_INDEX_LIMIT = 64 << 20  # bytes: an index of 100k tensors is a few MB
_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")


def _read_index(path: Path) -> dict[str, str]:
    size = path.stat().st_size
    if size > _INDEX_LIMIT:
        raise CheckpointError(f"{path} has {size} bytes, more than an index of tensor names can have; it is not a weights index")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({str(exc)[:200]}); download the checkpoint again") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{path} has no 'weight_map' of tensor name -> file name; download the checkpoint again")
    for name in set(weight_map.values()):
        check_name(name, f"{path.name}: weight_map file")
    return weight_map


class PretrainedWeights:
    """A directory written by `save_pretrained` (safetensors), read row range by row range."""

    def __init__(self, directory: str | os.PathLike, *, base_model_prefix: str = "") -> None:
        self.directory = Path(directory)
        self.prefix = base_model_prefix
        index = self.directory / SAFE_WEIGHTS_INDEX_NAME
        single = self.directory / SAFE_WEIGHTS_NAME
        if index.is_file():
            self.file_of = _read_index(index)
        elif single.is_file():
            self.file_of = None
        else:
            pickled = [n for n in _PICKLES if (self.directory / n).exists()]
            hint = (
                f"it holds {pickled[0]}, which mics_hf never loads (unpickling can run code): convert it once with "
                "`transformers` (from_pretrained, then save_pretrained(dir, safe_serialization=True)) in a trusted "
                "environment" if pickled else "point at the directory written by save_pretrained"
            )
            raise CheckpointError(f"{self.directory} has neither {SAFE_WEIGHTS_NAME} nor {SAFE_WEIGHTS_INDEX_NAME}; {hint}")
        self._open: dict[str, SafetensorsFile] = {}
        if self.file_of is None:
            self.keys = self._file(SAFE_WEIGHTS_NAME).keys()
            self.file_of = dict.fromkeys(self.keys, SAFE_WEIGHTS_NAME)
        else:
            self.keys = set(self.file_of)
        self.used: set[str] = set()
        self.missing: list[str] = []
        self._mode: str | None = None  # how model names map to file names; fixed by check_names()

    # ---- files ----------------------------------------------------------------------------------------
    def _file(self, name: str) -> SafetensorsFile:
        """The file, opened once; its header is validated (offsets inside the file, no overlaps, sizes match
        shapes) before anything is read. Reads go straight into tensors with pread: no memory map, so a rank's
        resident memory holds only its own rows."""
        if name not in self._open:
            self._open[name] = SafetensorsFile(self.directory, name, f"{self.directory.name}/{name}", follow_links=True)
        return self._open[name]

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()

    # ---- names ----------------------------------------------------------------------------------------
    def _candidates(self, name: str) -> Iterable[str]:
        # a PEFT model's names for the base weights: base_model.model.<name>, with LoRA's wrapped layer as base_layer
        if name.startswith("base_model.model."):
            name = name[len("base_model.model."):].replace(".base_layer.", ".")
        yield name
        if self.prefix:
            head = self.prefix + "."
            yield name[len(head):] if name.startswith(head) else head + name
        for new, old in ((".weight", ".gamma"), (".bias", ".beta")):
            if name.endswith(new):
                yield name[: -len(new)] + old

    def key_for(self, names: Sequence[str]) -> str | None:
        for name in names:
            for key in self._candidates(name):
                if key in self.keys:
                    return key
        return None

    def check_names(self, model_params: dict[str, list[str]], model_buffers: Iterable[str]) -> None:
        """Decide, before any rank reads, whether the file's names can be trusted to mean the model's.

        `model_params`: one entry per parameter, its names (tied weights: several). Missing parameters are
        initialised (as transformers does for a new head) and unused keys ignored, each with a warning; both at
        once means the names follow another convention, which only transformers' loader converts: an error.
        """
        found = {names[0]: self.key_for(names) for names in model_params.values()}
        self.missing = sorted(n for n, k in found.items() if k is None)
        used = {k for k in found.values() if k is not None} | {k for b in model_buffers if (k := self.key_for([b]))}
        unused = sorted(self.keys - used)
        if self.missing and unused:
            raise CheckpointError(
                f"{self.directory}: the model's parameters {self.missing[:3]} are not in the checkpoint and its tensors "
                f"{unused[:3]} belong to no parameter ({len(self.missing)} and {len(unused)} in all): its names follow "
                "a convention that transformers converts while loading; load it with from_pretrained on CPU and call "
                "mics_hf.shard_model(model, config), or re-save it with save_pretrained from a current transformers"
            )
        if self.missing:
            warnings.warn(
                f"mics_hf: {len(self.missing)} parameters of the model are not in {self.directory} and are newly "
                f"initialised: {self.missing[:8]}; train them before using the model for predictions", stacklevel=3,
            )
        if unused:
            warnings.warn(f"mics_hf: {len(unused)} tensors of {self.directory} are not used by the model: {unused[:8]}", stacklevel=3)

    # ---- reading (the WeightSource protocol of mics_hf.engine.shard) ------------------------------------
    def rows(self, names: Sequence[str], shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor | None:
        key = self.key_for(names)
        if key is None:
            return None
        f = self._file(self.file_of[key])
        saved = tuple(f.describe(key)[1])
        if saved != tuple(shape):
            raise CheckpointError(
                f"{self.directory}: {key!r} has shape {saved} in the checkpoint but the model's {names[0]!r} has "
                f"{tuple(shape)}; build the model from the checkpoint's own config.json (a resized embedding must be "
                "resized after loading, on the full model)"
            )
        self.used.add(key)
        return f.rows(key, start, stop)  # a 0-dim tensor is one row of nothing

    def buffer(self, names: Sequence[str], like: torch.Tensor) -> torch.Tensor | None:
        key = self.key_for(names)
        if key is None:
            return None
        value = self._file(self.file_of[key]).tensor(key)
        if tuple(value.shape) != tuple(like.shape):
            raise CheckpointError(
                f"{self.directory}: buffer {key!r} has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(like.shape)} in the model; build the model from the checkpoint's own config.json"
            )
        return value

    def dtype(self) -> torch.dtype | None:
        """The dtype of the checkpoint's floating tensors (what `dtype="auto"` loads in), if they share one."""
        name = sorted(set(self.file_of.values()))[0]
        f = self._file(name)
        floats = {f.describe(k)[0] for k in sorted(f.keys())[:64]} & {torch.float64, torch.float32, torch.float16, torch.bfloat16}
        return floats.pop() if len(floats) == 1 else None
