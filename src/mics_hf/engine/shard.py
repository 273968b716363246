"""shard_model(): turn a user's module, in place, into a MiCS-sharded one that keeps its class.

The module keeps its class for isinstance checks (a dynamic subclass adds `no_sync()` and friends, the way
FSDP2 does), its forward signature, `.config` and HF methods. Its parameters become the local fp32 shards,
which is what `model.parameters()` returns and what optimizers must be built on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import warnings
import weakref
from collections import Counter
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import MiCSConfig
from .collectives import CommGroup, CommStats
from .hooks import MiCSState
from .replicas import verify_replicas
from .teardown import release_at_exit
from .topology import (
    Topology,
    build_topology,
    create_process_groups,
    node_map_from_devices_per_node,
    require_divides,
    world_and_rank,
)
from .buffers import BufferPool, GatheredUnits
from .clipping import register_shards
from .stale_optimizer import register_sharded
from .unit import CommStreams, ShardedParam, ShardedUnit, TagChecks, UnitGroups, shard_rows

__all__ = ["shard_model", "MiCSModule", "is_sharded", "get_state", "WeightSource", "register_model_method", "original_method", "persistent_buffers"]

_STATE_ATTR = "_mics_state"


class MiCSModule:
    """Mixed into the class of a sharded model; every method acts on the whole sharded model."""

    @property
    def mics_state(self) -> MiCSState:
        return getattr(self, _STATE_ATTR)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Skip hop 2 (the replica all-reduce) for the backwards inside; hop 1 still runs every micro-step.

        Gradients accumulate, reduce-scattered and in fp32, on the local shards; the first backward outside
        no_sync() all-reduces the accumulation across the replication group once.
        """
        state = self.mics_state
        previous = state.sync_gradients
        state.sync_gradients = False
        try:
            yield
        finally:
            state.sync_gradients = previous

    def set_requires_gradient_sync(self, requires: bool) -> None:
        """Non-context form of no_sync(): False skips hop 2 until set back to True."""
        self.mics_state.sync_gradients = bool(requires)

    def reshard(self) -> None:
        """Free every gathered parameter (e.g. after generation outside a training step)."""
        self.mics_state.reshard_all()

    # A sharded model's state holds process groups, streams and shared buffers: copying it segfaulted inside
    # torch (deepcopy of a ProcessGroup) and pickling failed on the class. Say what to do instead.
    def __deepcopy__(self, memo: dict) -> Any:
        raise TypeError(
            f"a {type(self).__name__} sharded by mics_hf cannot be deep-copied (its state holds process groups "
            "and communication buffers). For an EMA, teacher or reference model, copy the model before "
            "shard_model and shard the copy as well, or build an unsharded copy from "
            "mics_hf.full_state_dict(model)"
        )

    def __reduce_ex__(self, protocol: int) -> Any:
        raise TypeError(
            f"a {type(self).__name__} sharded by mics_hf cannot be pickled (torch.save(model)); save it with "
            "mics_hf.save_checkpoint(...) to resume, or model.save_pretrained(...) / "
            "mics_hf.full_state_dict(model) for the full weights"
        )


_CLASS_CACHE: dict[type, type] = {}
_MODEL_METHODS: dict[str, Callable] = {}


def register_model_method(name: str, method: Callable) -> None:
    """Give every sharded model whose class has a method `name` this replacement (e.g. save_pretrained, which
    must gather the shards; registered by mics_hf.checkpoint, which the engine does not import). The
    replacement reaches the user's own method as `original_method(self, name)`."""
    _MODEL_METHODS[name] = method
    _CLASS_CACHE.clear()


def original_method(model: nn.Module, name: str) -> Callable:
    """The user's class's own `name`, bound to the sharded model."""
    return getattr(type(model).__bases__[-1], name).__get__(model)


def _mics_class(cls: type) -> type:
    if cls not in _CLASS_CACHE:
        # Same name as the user's class: HF writes `type(model).__name__` into config.json's `architectures`,
        # and a MiCS-prefixed name there would break AutoModel loading of a saved model.
        body: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
        body.update({n: m for n, m in _MODEL_METHODS.items() if callable(getattr(cls, n, None))})
        _CLASS_CACHE[cls] = type(cls.__name__, (MiCSModule, cls), body)
    return _CLASS_CACHE[cls]


def sharded_param_for(model: nn.Module, original: torch.Tensor) -> nn.Parameter | None:
    """The local shard that replaced `original` (a parameter of the model before sharding), or None.

    Lets an optimizer built before sharding be pointed at the shards (what Accelerate's prepare() needs).
    """
    entry = get_state(model).replaced.get(id(original))
    if entry is None or entry[0]() is not original:
        return None
    return entry[1]


def is_sharded(model: nn.Module) -> bool:
    return hasattr(model, _STATE_ATTR)


def get_state(model: nn.Module) -> MiCSState:
    if not is_sharded(model):
        raise ValueError(
            f"{type(model).__name__} is not sharded by mics_hf; call mics_hf.shard_model(model, MiCSConfig(...)) first"
        )
    return getattr(model, _STATE_ATTR)


def _discover_node_map(world_size: int) -> tuple[int, ...]:
    """Group ranks into nodes by host name (one all_gather_object); validated by build_topology."""
    if world_size == 1:
        return (0,)
    names: list[str | None] = [None] * world_size
    dist.all_gather_object(names, socket.gethostname())
    index: dict[str, int] = {}
    return tuple(index.setdefault(n, len(index)) for n in names)  # type: ignore[arg-type]


def _validate_before_collectives(model: nn.Module, config: MiCSConfig, world_size: int, with_weights: bool = False) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"shard_model expects an nn.Module, got {type(model).__name__}")
    if is_sharded(model):
        raise ValueError(
            f"{type(model).__name__} is already sharded by mics_hf; shard a model once (build a new model to "
            "change the MiCSConfig)"
        )
    if not any(True for _ in model.parameters()):
        raise ValueError(
            f"{type(model).__name__} has no parameters, so there is nothing to shard; pass the model that owns "
            "the weights"
        )
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta and len(meta) != len(list(model.parameters())) and not with_weights:
        raise ValueError(
            f"some parameters are on the meta device ({meta[:3]}...) and others are not; build the whole model under "
            "accelerate.init_empty_weights(include_buffers=False), or materialise it entirely"
        )
    if meta and _init_function(model) is None:
        raise ValueError(
            f"parameters {meta[:3]}... are on the meta device and {type(model).__name__} has neither `_init_weights` "
            "(Hugging Face models) nor `reset_parameters` on its modules; materialise the model before sharding"
        )
    if config.partition_size is not None:
        require_divides(
            "partition_size", config.partition_size, world_size, f"the world size {world_size}",
            choices="partition sizes that divide it:",
        )
    if config.node_of_rank is not None and len(config.node_of_rank) != world_size:
        raise ValueError(
            f"node_of_rank lists {len(config.node_of_rank)} ranks but the world has {world_size}; give one node per rank"
        )
    if config.devices_per_node is not None and config.node_of_rank is None:
        node_map_from_devices_per_node(world_size, config.devices_per_node)  # raises with the divisors
    devices = {p.device for p in model.parameters() if not p.is_meta}
    if len(devices) > 1:
        raise ValueError(
            f"the model's parameters are on several devices {sorted(map(str, devices))}; move it to one device "
            "(model.to(device)) before sharding"
        )


def _resolve_topology(config: MiCSConfig, world_size: int, rank: int) -> Topology:
    if config.node_of_rank is not None:
        nodes = config.node_of_rank
    elif config.devices_per_node is not None:
        nodes = node_map_from_devices_per_node(world_size, config.devices_per_node)
    else:
        nodes = _discover_node_map(world_size)
    return build_topology(
        world_size=world_size,
        rank=rank,
        node_of_rank=nodes,
        partition_size=config.partition_size,
        hierarchical=config.hierarchical,
    )


def _unit_modules(model: nn.Module, config: MiCSConfig) -> list[tuple[str, nn.Module]]:
    """The modules gathered as one unit each, in module order; the root is added by the caller.

    `units` entries are module classes, class names, or module names (paths such as "lm_head" or
    "model.embed_tokens"); a string that names a module of the model is taken as a module name.
    """
    wanted = config.units
    if wanted is None:
        wanted = _repeated_layer_class(model) or tuple(getattr(model, "_no_split_modules", None) or [])
    if not wanted:
        return []
    named = dict(model.named_modules())
    paths = {w for w in wanted if isinstance(w, str) and w and w in named}
    class_names = {w for w in wanted if isinstance(w, str) and w not in paths}
    classes = tuple(w for w in wanted if isinstance(w, type))
    found = [
        (name, m)
        for name, m in named.items()
        if m is not model
        and (name in paths or type(m).__name__ in class_names or (classes and isinstance(m, classes)))
    ]
    if config.units is not None:
        matched_classes = {type(m).__name__ for _, m in found} | {c.__name__ for c in classes if any(isinstance(m, c) for _, m in found)}
        unmatched = sorted(w if isinstance(w, str) else w.__name__ for w in wanted if not (
            (isinstance(w, str) and (w in paths or w in matched_classes)) or (isinstance(w, type) and w.__name__ in matched_classes)))
        if unmatched:
            raise ValueError(
                f"no module of {type(model).__name__} matches units={unmatched}; give module classes or class names "
                "that occur in the model (e.g. its transformer block class) or module names such as 'lm_head', or "
                "leave units=None for the model's repeated layer"
            )
    return found


def _repeated_layer_class(model: nn.Module) -> tuple[str, ...]:
    """The class that repeats most among the parameterised children of one nn.ModuleList or nn.Sequential.

    That is the transformer layers of an HF model (a ModuleList) and the blocks of timm / torchvision-style
    models or of a model that is itself an nn.Sequential (stem, blocks, head). Preferred over `_no_split_modules`, which only lists what must stay on one device
    and can name sub-modules (RobertaPreLayerNorm names its attention and embeddings: its FFN weights, two
    thirds of every layer, would then sit in the root unit, gathered for the whole step).
    """
    best: tuple[int, str] = (1, "")  # (how many children, class name); a class must repeat to count
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            counts = Counter(type(m).__name__ for m in module.children() if any(True for _ in m.parameters()))
            for name, count in counts.items():
                best = max(best, (count, name))
    return (best[1],) if best[1] else ()


def _warn_if_root_is_heavy(model: nn.Module, assignment: dict[str, list], p: int) -> None:
    """A root unit that holds most parameters is gathered whole for the entire step: say so, and how to fix it."""
    sizes = {unit: sum(entry[1].numel() for entry in entries) for unit, entries in assignment.items()}
    total = sum(sizes.values())
    if p > 1 and total and sizes.get("", 0) > total / 2:
        warnings.warn(
            f"mics_hf: the root unit of {type(model).__name__} holds {sizes[''] / total:.0%} of its parameters "
            f"({len(assignment) - 1} other unit(s)), so they stay gathered for the whole step and MiCS saves little "
            "memory; pass MiCSConfig(units=...) with the class or module names of the model's repeated blocks",
            stacklevel=3,
        )


def _assign_parameters(model: nn.Module, unit_names: list[str]) -> dict[str, list[tuple[str, nn.Parameter, list[tuple[nn.Module, str]]]]]:
    """Map each unit path ('' = root) to its parameters: (fqn, param, every (module, attr) using it).

    A parameter belongs to the deepest unit that contains every one of its uses, so a weight tied between the
    embedding and the LM head (both in the root) goes to the root, and one shared by two blocks to their
    common ancestor unit.
    """
    uses: dict[int, list[tuple[str, nn.Module, str]]] = {}
    params: dict[int, nn.Parameter] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is None:
                continue
            fqn = f"{mod_name}.{attr}" if mod_name else attr
            if any(m is module and a == attr for _, m, a in uses.get(id(p), [])):
                continue
            uses.setdefault(id(p), []).append((fqn, module, attr))
            params[id(p)] = p
    units_sorted = sorted(unit_names, key=len, reverse=True)

    def owner(fqn: str) -> str:
        return next((u for u in units_sorted if fqn.startswith(u + ".")), "")

    out: dict[str, list] = {u: [] for u in unit_names + [""]}
    for pid, entries in uses.items():
        owners = {owner(fqn) for fqn, _, _ in entries}
        unit = owners.pop() if len(owners) == 1 else _common_unit(owners, units_sorted)
        out[unit].append((entries[0][0], params[pid], [(m, a) for _, m, a in entries]))
    return out


def _common_unit(owners: set[str], units_sorted: list[str]) -> str:
    prefix = min(owners, key=len)
    while prefix:
        if all(o == prefix or o.startswith(prefix + ".") for o in owners) and prefix in units_sorted:
            return prefix
        prefix = prefix.rpartition(".")[0]
    return ""


def _loaded_low_precision(model: nn.Module) -> torch.dtype | None:
    """bf16 or fp16 when every floating parameter of the model was loaded in it (it then computes in it)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16} else None


def _master_dtype(model: nn.Module) -> torch.dtype:
    """float64 masters for a model whose floating parameters are all float64 (a float64 run stays float64 end
    to end, e.g. a reference check); float32 for every other model (bf16 / fp16 weights get fp32 masters)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if torch.float64 in dtypes and len(dtypes) > 1:
        raise ValueError(
            f"{type(model).__name__} mixes float64 parameters with {sorted(map(str, dtypes - {torch.float64}))}; "
            "a unit's parameters travel in one buffer of one dtype: call model.double() or model.float() first"
        )
    return torch.float64 if dtypes == {torch.float64} else torch.float32


def _init_function(model: nn.Module):
    """How to initialise a module's own parameters after materialising them from the meta device."""
    if hasattr(model, "_init_weights"):  # Hugging Face: the model's own scheme (e.g. GPT-2's scaled c_proj)
        return lambda module: model._init_weights(module)
    if any(hasattr(m, "reset_parameters") for m in model.modules()):
        return lambda module: module.reset_parameters() if hasattr(module, "reset_parameters") else None
    return None


class WeightSource(Protocol):
    """Where a meta-device model's weights come from (e.g. a pretrained checkpoint; see mics_hf.checkpoint.pretrained)."""

    def rows(self, names: Sequence[str], shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor | None:
        """Rows [start, stop) along dim 0 of the parameter known by `names` (tied weights: several), shaped
        (stop - start, *shape[1:]); None when the source does not hold it (it is then initialised)."""

    def buffer(self, names: Sequence[str], like: torch.Tensor) -> torch.Tensor | None:
        """The saved value of a persistent buffer, or None to keep the model's own."""


def _names_by_param(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _materialise_unit(
    model: nn.Module, unit: nn.Module, entries: list, other_units: list[nn.Module], device: torch.device,
    rows_of: "Callable[[str, nn.Parameter], torch.Tensor | None]",
) -> list[tuple]:
    """(fqn, param, uses, original, local rows or None) for a unit's parameters, materialising meta ones.

    A meta-device unit is given real parameters one unit at a time, never the whole model: this rank's rows
    come from the weight source when it holds them (no full tensor is ever built); otherwise every rank
    initialises the same full unit from the same RNG state (the model's initial weights do not depend on the
    rank) and keeps only its shard. Modules inside other units are skipped: their parameters are already shards.
    """
    loaded = {fqn: rows_of(fqn, p) for fqn, p, _ in entries if p.is_meta}
    if all(v is not None for v in loaded.values()):  # nothing on meta, or all of it read from the source
        return [(fqn, p, uses, p, loaded.get(fqn)) for fqn, p, uses in entries]
    fresh = []
    for fqn, p, uses in entries:
        if not p.is_meta:  # already real (e.g. an adapter initialised by its own library)
            fresh.append((fqn, p, uses, p, None))
            continue
        real = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad)
        for module, name in uses:
            module._parameters[name] = real
        fresh.append((fqn, real, uses, p, loaded[fqn]))
    inside_nested = {id(m) for u in other_units for m in u.modules()}
    init = _init_function(model)
    real_before = [(p, p.detach().clone()) for _, p, _ in entries if not p.is_meta]
    with torch.no_grad():
        for module in unit.modules():
            if id(module) not in inside_nested:
                init(module)
        for p, value in real_before:  # the model's init scheme must not overwrite what was already real
            p.copy_(value)
    return fresh


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers that belong in a state dict (torch's `persistent=False` ones, like position_ids, do not)."""
    out = {}
    for prefix, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


def _load_buffers(model: nn.Module, weights: WeightSource | None, device: torch.device) -> None:
    """Move the model's buffers to `device` and, from a weight source, read the persistent ones it holds."""
    persistent = persistent_buffers(model)
    for mod_name, module in model.named_modules():
        for name, buf in list(module._buffers.items()):
            if buf is None:
                continue
            fqn = f"{mod_name}.{name}" if mod_name else name
            saved = weights.buffer([fqn], buf) if weights is not None and fqn in persistent else None
            if saved is not None:
                module._buffers[name] = saved.to(device=device, dtype=buf.dtype)
            elif buf.is_meta:
                raise ValueError(
                    f"buffer {fqn!r} is on the meta device and no weights hold it; build the model under "
                    "accelerate.init_empty_weights(include_buffers=False), which keeps buffers real"
                )
            elif buf.device != device:
                module._buffers[name] = buf.to(device)


def _compile_forward(module: nn.Module, options: bool | dict) -> None:
    """torch.compile the unit's forward only: MiCS's hooks (gathers, reductions) stay outside the compiled
    region, as FSDP2 users do with per-block compile, so dynamo never traces a collective."""
    kwargs = dict(options) if isinstance(options, dict) else {}
    module.forward = torch.compile(module.forward, **kwargs)


def _comm_groups(topology: Topology, *, separate_reduce: bool = False) -> UnitGroups:
    pgs = create_process_groups(topology, separate_reduce=separate_reduce)
    if topology.world_size > 1:
        release_at_exit()  # MiCS's own groups die at exit while that is safe; the user's group is theirs
    r = topology.rank
    nodes = topology.node_of_rank
    partition = CommGroup.make("partition", topology.partition_group, pgs.partition, nodes, r)
    replication = CommGroup.make("replication", topology.replication_group, pgs.replication, nodes, r)
    if topology.hierarchical:
        intra = CommGroup.make("intra_node", topology.intra_node_group_of(r), pgs.intra_node, nodes, r)
        inter = CommGroup.make("inter_node", topology.inter_node_group_of(r), pgs.inter_node, nodes, r)
        order = topology.hierarchical_chunk_order()
    else:
        intra = inter = None
        order = tuple(range(topology.partition_size))
    reduce: dict[str, CommGroup | None] = {}
    if separate_reduce:  # hop 1's own communicators: the same ranks and accounting, another process group
        reduce["reduce_partition"] = dataclasses.replace(partition, pg=pgs.reduce_partition if partition.pg is not None else None)
        if intra is not None:
            reduce["reduce_intra_node"] = dataclasses.replace(intra, pg=pgs.reduce_intra_node if intra.pg is not None else None)
            reduce["reduce_inter_node"] = dataclasses.replace(inter, pg=pgs.reduce_inter_node if inter.pg is not None else None)
    return UnitGroups(partition=partition, replication=replication, intra_node=intra, inter_node=inter, chunk_order=order, **reduce)


def shard_model(
    model: nn.Module, config: MiCSConfig | None = None, *, device: torch.device | str | None = None,
    weights: WeightSource | None = None,
) -> nn.Module:
    """Shard `model` in place with MiCS and return it.

    Every rank of the default process group must call this with the same model structure and config. With no
    process group initialised it runs as a world of one (same hooks, no communication). Build the optimizer
    on `model.parameters()` afterwards: those are the local fp32 shards.

    A model built on the meta device (`accelerate.init_empty_weights(include_buffers=False)`) is materialised
    one unit at a time on `device` (default: the current CUDA device, else CPU), each rank reading only its
    rows from `weights` (see mics_hf.from_pretrained) or, for what `weights` does not hold, with the model's
    own initialisation, so no rank ever holds the whole model. A materialised model is sharded where it is and
    its shards moved to `device` (default: where the model is): never a full copy per device.

    The replicas of every shard are then checked to be bit-identical (one all-reduce), so ranks that built
    different weights fail here, naming the first parameter, instead of training r different models.
    """
    config = config or MiCSConfig()
    world_size, rank = world_and_rank()
    _validate_before_collectives(model, config, world_size, with_weights=weights is not None)
    topology = _resolve_topology(config, world_size, rank)
    groups = _comm_groups(topology, separate_reduce=config.separate_reduce_group)
    stats = CommStats()
    policy = config.mixed_precision.for_master(_master_dtype(model))
    if policy.param_dtype is None and _loaded_low_precision(model) is not None:
        # A model loaded in bf16/fp16 computes in that dtype, as it does unsharded; the masters are still fp32.
        policy = dataclasses.replace(policy, param_dtype=_loaded_low_precision(model))
    first = next(model.parameters())
    if device is not None:
        device = torch.device(device)
    elif first.is_meta:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = first.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    names_of = _names_by_param(model)
    p_size, position = topology.partition_size, topology.position

    def rows_of(fqn: str, param: nn.Parameter) -> torch.Tensor | None:
        if weights is None:
            return None
        start, stop = shard_rows((tuple(param.shape) or (1,))[0], p_size, position)
        return weights.rows(names_of.get(id(param), [fqn]), tuple(param.shape), start, stop)

    streams = CommStreams(device) if device.type == "cuda" else None  # see [Note: stream ordering]
    pool = BufferPool(device)  # one per model: units with the same layout share buffers ([Note: buffer reuse])
    gathered = GatheredUnits(config.max_gathered_units)
    unit_entries = _unit_modules(model, config)
    assignment = _assign_parameters(model, [n for n, _ in unit_entries])
    _warn_if_root_is_heavy(model, assignment, topology.partition_size)
    units: list[tuple[nn.Module, ShardedUnit]] = []
    checks = TagChecks(lambda i: repr(units[i][1].label) if 0 <= i < len(units) else f"unit #{i}")
    replaced: dict[int, tuple[weakref.ref, nn.Parameter, str]] = {}
    # innermost units first (deepest path first, the root last): a unit's materialisation then never touches
    # modules of a nested unit, whose parameters are already shards
    ordered = sorted(unit_entries, key=lambda e: -e[0].count(".")) + [("", model)]
    for name, module in ordered:
        nested = [m for n, m in unit_entries if m is not module and (name == "" or n.startswith(name + "."))]
        entries = _materialise_unit(model, module, assignment[name], nested, device, rows_of)
        sharded = []
        for fqn, p, uses, original, local in entries:
            sp = ShardedParam(
                fqn, p, uses, p=topology.partition_size, position=topology.position, policy=policy, local=local,
                device=device,
            )
            replaced[id(original)] = (weakref.ref(original), sp.sharded, fqn)
            sharded.append(sp)
        if not sharded and module is not model:
            continue
        unit = ShardedUnit(
            name, sharded, topology=topology, groups=groups, policy=policy, stats=stats, device=device,
            streams=streams, index=len(units), checks=checks, pool=pool,
            gathered=None if module is model else gathered,  # the root stays gathered for the step: not counted
        )
        for sp in sharded:
            sp.point_modules_to(sp.sharded)
        units.append((module, unit))
        if config.compile and module is not model:
            _compile_forward(module, config.compile)

    _load_buffers(model, weights, device)
    verify_replicas(
        [(sp.fqn, sp.sharded) for _, u in units for sp in u.params] + list(model.named_buffers()),
        groups.replication.pg, list(topology.replication_group), device,
    )
    state = MiCSState(model, units, config=config, policy=policy, topology=topology, stats=stats, checks=checks, gathered=gathered)
    state.pool = pool
    state.replaced = replaced
    setattr(model, _STATE_ATTR, state)
    # torch.nn.utils.clip_grad_norm_(model.parameters(), ...) must see the global norm ([Note: torch's
    # clip_grad_norm_ on MiCS shards] in clipping.py)
    register_shards([sp.sharded for _, u in units for sp in u.params], groups.partition.pg)
    register_sharded(state)  # [Note: an optimizer built before sharding] in stale_optimizer.py
    model.__class__ = _mics_class(type(model))
    # Accelerate skips DDP wrapping for modules marked as prepared: MiCS does its own gradient communication.
    model._is_accelerate_prepared = True
    return model
