"""User-facing configuration: what to shard, how to group ranks, which precision to compute in.

Everything here is a frozen, keyword-only dataclass validated on construction, so a bad value fails with a
ValueError that names the fix before any process group or collective is touched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence, Union

import torch
import torch.nn as nn

__all__ = ["MiCSConfig", "MixedPrecisionPolicy", "VALID_CONFIG_KEYS", "COMPILE_KEYS"]

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "no": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp64": torch.float64,
    "float64": torch.float64,
    "double": torch.float64,
}


def parse_dtype(value: Union[str, torch.dtype, None], *, field: str) -> torch.dtype | None:
    """Turn "bf16" / "float16" / torch.bfloat16 into a floating torch.dtype; None stays None."""
    if value is None or isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str) and value.lower().removeprefix("torch.") in _DTYPE_NAMES:
        dtype = _DTYPE_NAMES[value.lower().removeprefix("torch.")]
    else:
        raise ValueError(
            f"{field}={value!r} is not a dtype; use one of {sorted(set(_DTYPE_NAMES) - {'no', 'half'})} "
            "or a torch floating dtype such as torch.bfloat16"
        )
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(
            f"{field}={dtype} is not a floating-point type; parameters and gradients are communicated in "
            "torch.float32, torch.bfloat16, torch.float16 or torch.float64"
        )
    return dtype


@dataclass(frozen=True, kw_only=True)
class MixedPrecisionPolicy:
    """Dtypes of the unsharded parameters (compute) and of gradient reduction.

    The sharded master parameters, their gradients and the optimizer state are float32 (the "fp32 master
    shards" rule): only the communicated and computed copies change precision. The one exception is a model
    whose parameters are all float64: its masters stay float64 (see `for_master`), so a float64 run is
    float64 end to end, as it is without sharding.

    reduce_dtype is the dtype of hop 1, the reduce-scatter of the unsharded gradients. Unset, it is the compute
    dtype (what FSDP2 and DDP do): the gradients are reduced in the dtype autograd made them in, half the bytes
    of fp32 under bf16 compute. Accumulation is not affected: each reduce-scatter's result is added into the
    fp32 shard gradient, micro-steps accumulate there, and hop 2 (the replica all-reduce) sums that fp32
    gradient. Set reduce_dtype=torch.float32 to also sum across the partition group in fp32.
    """

    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    master_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "param_dtype", parse_dtype(self.param_dtype, field="param_dtype"))
        object.__setattr__(self, "reduce_dtype", parse_dtype(self.reduce_dtype, field="reduce_dtype"))
        if self.master_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"master_dtype={self.master_dtype} must be torch.float32 or torch.float64")

    def for_master(self, master_dtype: torch.dtype) -> "MixedPrecisionPolicy":
        """The same policy for masters of `master_dtype`: unset compute and reduce dtypes follow the master."""
        return dataclasses.replace(self, master_dtype=master_dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the unsharded parameters have during forward and backward."""
        return self.param_dtype or self.master_dtype

    @property
    def gradient_reduce_dtype(self) -> torch.dtype:
        """Hop 1's dtype: explicit, else the compute dtype (accumulation stays in the master dtype)."""
        return self.reduce_dtype or self.compute_dtype


COMPILE_KEYS = ("backend", "mode", "fullgraph", "dynamic", "options")


@dataclass(frozen=True, kw_only=True)
class MiCSConfig:
    """How mics_hf shards a model.

    partition_size: p, ranks per partition group (one full replica of the model states). None = devices per
        node, the paper's default: the smallest group that keeps all-gathers on fast intra-node links.
    devices_per_node: k. None = discovered from the host names of the ranks (under torchrun this equals
        LOCAL_WORLD_SIZE); set it explicitly to emulate several nodes on one machine.
    node_of_rank: an explicit rank -> node map (overrides devices_per_node) for placements that are not
        contiguous, e.g. (0, 1, 0, 1).
    hierarchical: "auto" uses the hierarchical all-gather / reduce-scatter when a partition group spans more
        than one node and k > 1; True forces it (an error if there is a single node); False forces flat.
    param_dtype / reduce_dtype: mixed precision (see MixedPrecisionPolicy). reduce_dtype (hop 1's
        reduce-scatter) defaults to the compute dtype; gradients still accumulate in the fp32 shard gradient,
        and hop 2 all-reduces that fp32 gradient.
    units: module classes, class names or module names ("lm_head") gathered and freed together. None = the
        model's repeated layer (the class of its longest nn.ModuleList or nn.Sequential of same-class modules:
        the transformer blocks), else the HF model's `_no_split_modules`; the root module always keeps the
        remaining parameters (a warning says so when that is most of them).
    prefetch: start all-gathering the next unit while the current one computes (forward and backward).
    max_gathered_units: at most this many units (the root not counted) gathered or being gathered at once by
        prefetching, so memory stays flat however far the host runs ahead of the GPU; 2 = the running unit and
        the next. 1 turns prefetching off. A unit the step needs is always gathered.
    separate_reduce_group: run hop 1's reduce-scatters on a second communicator over the same ranks, so that
        they never queue behind all-gathers in backward (one more process group per partition group).
    compile: torch.compile each unit's forward (not the root's); True for torch.compile's defaults, or a
        mapping of its keyword arguments (backend, mode, fullgraph, dynamic, options). MiCS's hooks stay
        outside the compiled regions.
    """

    partition_size: int | None = None
    devices_per_node: int | None = None
    node_of_rank: tuple[int, ...] | None = None
    hierarchical: Literal["auto"] | bool = "auto"
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    units: tuple[Union[type[nn.Module], str], ...] | None = None
    prefetch: bool = True
    compile: bool | Mapping[str, Any] = False
    max_gathered_units: int = 2
    separate_reduce_group: bool = False

    def __post_init__(self) -> None:
        for name in ("partition_size", "devices_per_node"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer (or None for the default)")
        if self.node_of_rank is not None:
            nodes = tuple(self.node_of_rank)
            if not nodes or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in nodes):
                raise ValueError(
                    f"node_of_rank={self.node_of_rank!r} must list a non-negative node index for every rank"
                )
            object.__setattr__(self, "node_of_rank", nodes)
        if not (self.hierarchical == "auto" or isinstance(self.hierarchical, bool)):  # 1 == True: not a bool
            raise ValueError(f'hierarchical={self.hierarchical!r} must be "auto", True or False')
        if not isinstance(self.prefetch, bool):
            raise ValueError(f"prefetch={self.prefetch!r} must be True or False")
        if not isinstance(self.separate_reduce_group, bool):
            raise ValueError(f"separate_reduce_group={self.separate_reduce_group!r} must be True or False")
        if isinstance(self.max_gathered_units, bool) or not isinstance(self.max_gathered_units, int) or self.max_gathered_units < 1:
            raise ValueError(
                f"max_gathered_units={self.max_gathered_units!r} must be a positive integer (2: the running unit and "
                "the next one; 1 turns prefetching off)"
            )
        object.__setattr__(self, "param_dtype", parse_dtype(self.param_dtype, field="param_dtype"))
        object.__setattr__(self, "reduce_dtype", parse_dtype(self.reduce_dtype, field="reduce_dtype"))
        if isinstance(self.compile, Mapping):
            unknown = sorted(set(self.compile) - set(COMPILE_KEYS))
            if unknown:
                raise ValueError(
                    f"compile={dict(self.compile)!r} has unknown key(s) {unknown}; torch.compile options MiCS passes on: "
                    f"{list(COMPILE_KEYS)}"
                )
            object.__setattr__(self, "compile", dict(self.compile))
        elif not isinstance(self.compile, bool):
            raise ValueError(f"compile={self.compile!r} must be True, False or a mapping of torch.compile options")
        if self.units is not None:
            units = (self.units,) if isinstance(self.units, (str, type)) else tuple(self.units)
            for unit in units:
                if not (isinstance(unit, str) or (isinstance(unit, type) and issubclass(unit, nn.Module))):
                    raise ValueError(
                        f"units entry {unit!r} must be an nn.Module subclass or a class name such as 'GPT2Block'"
                    )
            object.__setattr__(self, "units", units)

    @property
    def mixed_precision(self) -> MixedPrecisionPolicy:
        return MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "MiCSConfig":
        """Build from a JSON/YAML mapping (the `mics` block); unknown keys are an error that lists the valid ones."""
        if not isinstance(values, Mapping):
            raise ValueError(f"a MiCS config must be a mapping of keys to values, got {type(values).__name__}")
        unknown = sorted(set(values) - set(VALID_CONFIG_KEYS))
        if unknown:
            raise ValueError(
                f"unknown MiCS config key(s) {unknown}; valid keys are {list(VALID_CONFIG_KEYS)}"
            )
        kwargs = dict(values)
        if isinstance(kwargs.get("units"), Sequence) and not isinstance(kwargs.get("units"), str):
            kwargs["units"] = tuple(kwargs["units"])
        if isinstance(kwargs.get("node_of_rank"), Sequence):
            kwargs["node_of_rank"] = tuple(kwargs["node_of_rank"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view (dtypes and unit classes become names)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.dtype):
                value = str(value).removeprefix("torch.")
            elif f.name == "units" and value is not None:
                value = [u if isinstance(u, str) else u.__name__ for u in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


VALID_CONFIG_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(MiCSConfig))
