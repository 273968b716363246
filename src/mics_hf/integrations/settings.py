"""Where a launched process finds its MiCS settings; the only place mics_hf reads environment variables.

Order (first found wins): an explicit argument; `MICS_CONFIG` (a path to JSON/YAML, or a JSON string); the
`mics` block of the Accelerate config file that launched this process; otherwise MiCS is off.

[Note: where the `mics` block lives] `accelerate launch` rejects unknown top-level keys and never forwards
custom keys to the workers. Nested keys of `fsdp_config` are copied onto the launcher's arguments unchecked
and, with `distributed_type: MULTI_GPU`, never acted on, so the block lives there:

    distributed_type: MULTI_GPU
    fsdp_config:
      mics:
        partition_size: 8

The workers do not receive the config path either; they find it on the command line of the `accelerate
launch` process above them (or use Accelerate's default config file when none was given).
"""

from __future__ import annotations

import json
import os
import reprlib
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..config import VALID_CONFIG_KEYS, MiCSConfig
from ..engine.topology import require_divides

__all__ = [
    "ENV_VAR",
    "MiCSSettings",
    "parse_mics_value",
    "read_accelerate_config",
    "find_launching_accelerate_config",
    "resolve_mics_settings",
]

ENV_VAR = "MICS_CONFIG"
BLOCK_SECTION = "fsdp_config"
BLOCK_KEY = "mics"


class MiCSSettings(dict):
    """The `mics` mapping plus where it came from (for messages and logs)."""

    def __init__(self, values: Mapping[str, Any], source: str) -> None:
        super().__init__(values)
        self.source = source


_FILE_LIMIT = 1 << 20  # bytes: a MiCS or Accelerate config is a few hundred
_VALUE_LIMIT = 100_000  # values after YAML aliases are expanded (a rank -> node map of 100k ranks fits)
_MESSAGE_LIMIT = 2000  # characters of a config value or error that a message may quote
_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 80
_SHOW.maxlist = _SHOW.maxdict = _SHOW.maxtuple = 8
_SHOW.maxlevel = 3


def _short(text: str) -> str:
    """A message cut to _MESSAGE_LIMIT characters, so a huge value can never make a huge error."""
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + f"... ({len(text) - _MESSAGE_LIMIT} more characters)"


def _check_size(data: Any, what: str) -> None:
    """Refuse values that expand to more than _VALUE_LIMIT nodes (a YAML alias bomb: 500 bytes, 10^9 values),
    counting with an early stop, before anything prints or walks them."""
    budget, characters = _VALUE_LIMIT, _FILE_LIMIT
    stack = [data]
    while stack:
        value = stack.pop()
        budget -= 1
        characters -= len(value) if isinstance(value, str) else 0
        if budget < 0 or characters < 0:
            raise ValueError(
                f"{what} expands to more than {_VALUE_LIMIT} values or {_FILE_LIMIT} characters (YAML anchors and aliases "
                "can multiply a small file); "
                "a MiCS config is a handful of keys: write them out"
            )
        if isinstance(value, Mapping):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)


def _load_file(path: Path, what: str) -> Any:
    """A JSON or YAML file (by suffix), size-bounded and checked by _check_size; errors quote at most a little."""
    if not path.is_file():
        raise ValueError(f"{what} points to {path}, which does not exist; give an existing JSON/YAML file or a JSON string")
    if path.stat().st_size > _FILE_LIMIT:
        raise ValueError(f"{what}: {path} has {path.stat().st_size} bytes, more than a config file can ({_FILE_LIMIT}); check the path")
    text = path.read_text()
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    try:
        data = yaml.safe_load(text) if is_yaml else json.loads(text)
    except (json.JSONDecodeError, yaml.YAMLError, RecursionError) as exc:
        raise ValueError(_short(f"{what}: {path} is not valid {'YAML' if is_yaml else 'JSON'}: {exc}")) from None
    _check_size(data, f"{what} ({path})")
    return data


def parse_mics_value(value: str | os.PathLike | Mapping[str, Any], *, what: str) -> dict[str, Any]:
    """A `mics` mapping from a dict, a JSON string, or a path to a JSON/YAML file (which may hold a `mics` key)."""
    if isinstance(value, Mapping):
        data: Any = dict(value)
    else:
        text = str(value).strip()
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise ValueError(f"{what} is not valid JSON ({_short(str(exc))}): {text[:80]!r}; e.g. '{{\"partition_size\": 8}}'") from None
        elif text == "":
            data = {}
        else:
            data = _load_file(Path(text).expanduser(), what)
    _check_size(data, what)
    if isinstance(data, Mapping) and BLOCK_KEY in data and isinstance(data[BLOCK_KEY], Mapping):
        data = data[BLOCK_KEY]  # a whole file with a `mics:` section
    if not isinstance(data, Mapping):
        raise ValueError(f"{what} must be a mapping of MiCS keys ({list(VALID_CONFIG_KEYS)}), got {_SHOW.repr(data)}")
    try:
        MiCSConfig.from_dict(data)  # unknown keys / bad values (hierarchical=1 included) fail here, listing the valid ones
    except ValueError as exc:
        raise ValueError(_short(f"{what}: {exc}")) from None
    return dict(data)


def read_accelerate_config(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Validate an Accelerate config file with Accelerate's own loader; return (its dict, its `mics` block or None)."""
    from accelerate.commands.config.config_args import ClusterConfig

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Accelerate config file {path} does not exist")
    _load_file(path, "Accelerate config file")  # bounded first: Accelerate's loader would print any value it rejects
    cluster = ClusterConfig.from_yaml_file(str(path)) if path.suffix.lower() in (".yaml", ".yml") else ClusterConfig.from_json_file(str(path))
    raw = cluster.to_dict()
    section = raw.get(BLOCK_SECTION) or {}
    block = section.get(BLOCK_KEY) if isinstance(section, Mapping) else None
    if block is None:
        return raw, None
    dtype = str(raw.get("distributed_type", "")).split(".")[-1].upper()
    if dtype in ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"):
        raise ValueError(
            f"{path} has a `mics` block but distributed_type: {dtype}; MiCS replaces {dtype} and runs under "
            "distributed_type: MULTI_GPU (also on CPU): change distributed_type, or remove the `mics` block to use "
            f"{dtype}"
        )
    settings = parse_mics_value(block, what=f"the `mics` block of {path}")
    num = raw.get("num_processes")
    p = settings.get("partition_size")
    if isinstance(num, int) and num > 0 and isinstance(p, int) and p > 0:
        require_divides(f"{path}: partition_size", p, num, f"num_processes={num}", choices="partition sizes that divide it:")
    return raw, settings


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _parent(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                ppid = int(line.split()[1])
                return ppid if ppid > 1 else None
    except (OSError, ValueError):
        return None
    return None


def find_launching_accelerate_config(pid: int | None = None) -> Path | None:
    """The config file of the `accelerate launch` that started this process (walking up the parents)."""
    pid = os.getpid() if pid is None else pid
    seen = 0
    while pid is not None and seen < 32:
        args = _cmdline(pid)
        launch = any(a.endswith("accelerate") or a.endswith("accelerate-launch") or a == "accelerate.commands.launch" for a in args) and (
            "launch" in args or any(a.endswith("accelerate-launch") for a in args)
        )
        if launch:
            for i, a in enumerate(args):
                if a in ("--config_file", "--config-file") and i + 1 < len(args):
                    value = Path(args[i + 1])
                    if not value.is_absolute():
                        try:
                            value = Path(os.readlink(f"/proc/{pid}/cwd")) / value
                        except OSError:
                            pass
                    return value
                if a.startswith(("--config_file=", "--config-file=")):
                    return Path(a.split("=", 1)[1])
            from accelerate.commands.config.config_args import default_config_file

            return Path(default_config_file) if Path(default_config_file).is_file() else None
        pid = _parent(pid)
        seen += 1
    return None


def resolve_mics_settings(explicit: MiCSConfig | Mapping[str, Any] | str | None = None) -> MiCSSettings | None:
    """Apply the lookup order of this module's docstring; None means MiCS is off."""
    if explicit is not None:
        if isinstance(explicit, MiCSConfig):
            return MiCSSettings(explicit.to_dict(), "the constructor argument")
        return MiCSSettings(parse_mics_value(explicit, what="the mics argument"), "the constructor argument")
    env = os.environ.get(ENV_VAR)
    if env is not None:
        return MiCSSettings(parse_mics_value(env, what=f"{ENV_VAR}"), f"${ENV_VAR}")
    path = find_launching_accelerate_config()
    if path is not None and path.is_file():
        _, block = read_accelerate_config(path)
        if block is not None:
            return MiCSSettings(block, str(path))
    return None


def launcher_devices_per_node() -> int | None:
    """k from the launcher: torchrun / accelerate launch set LOCAL_WORLD_SIZE on every worker."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value and value.isdigit() else None
