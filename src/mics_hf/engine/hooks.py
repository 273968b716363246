"""The hooks that drive one training step: unshard before a unit runs, reshard after, reduce after backward.

The path of one step, top to bottom:

Forward. The root's pre-hook starts the step: every unit is sharded (a discarded forward or an optimizer step
since the last one leaves nothing stale), requires_grad changes are picked up, queued collective checks are
raised. The pre-hook of unit i waits for its all-gather (flat or hierarchical, compute dtype), starts the
gather of the unit after it in the previous forward's order (prefetch), and routes the unit's tensor inputs
through `_PostBackward`, an identity whose backward runs once the unit's whole backward, input gradients
included, has run. The post-hook reshards the unit (not the root) and arms a pre-backward hook on its outputs.

Backward. The pre-backward hook gathers the unit again and prefetches the one before it. `_PostBackward`
reduce-scatters the unit's gradients (hop 1) into the fp32 shard gradients and reshards it, only now, so
frozen weights that autograd still needs for input gradients (LoRA) are never freed under it. At the end of
backward a callback reduces every unit that ran but was not reduced yet (the root; units whose inputs need no
gradient), waits for hop 1 and, unless under no_sync(), all-reduces the shards across the replication group
(hop 2, an average: see unit.py's [Note: gradient scaling]).

[Note: structural collectives] Which collectives a rank issues, and in which order, depends only on which
units ran (forward, recomputation, backward) and on no_sync(): never on which parameters received gradients
on that rank. A unit with trainable parameters that ran is reduce-scattered even if this rank's data reached
none of them (zeros); hop 2 runs for every unit that hop 1 touched since the last hop 2. Units that ran on
some ranks only are caught by the collective tags (unit.py's [Note: collective tags]).

[Note: gathered units] Prefetching gathers a unit before it runs; it starts only while fewer than
`MiCSConfig.max_gathered_units` units (the root not counted) are gathered or being gathered, so the gathered
parameters and the pooled all-gather buffers stay bounded however far the host runs ahead of the device. A
unit the step needs now is always gathered. Hop 1 likewise keeps at most three reduce-scatters in flight:
before a unit's reduce-scatter starts, all but the two newest are finished (issued at least two units of
compute ago, so the wait is short; waiting for all but the newest measurably stalled the hierarchical CPU path,
whose second stage starts one hook late), and their pooled buffers come back. Without the bound every unit's
reduce-scatter buffers would be alive at the end of backward, a whole gradient's worth, kept by the pool.

[Note: activation checkpointing] Checkpointed units re-run forward during backward (`_in_backward()`). The
pre-hook then only gathers and routes inputs through `_PostBackward`: with reentrant checkpointing that
recomputed graph is the one backpropagated, so its `_PostBackward` fires; with non-reentrant checkpointing the
recomputed graph only refills saved tensors and the original forward's `_PostBackward` fires. The post-hook
never reshards inside a backward. unshard/reshard are idempotent, driven by ShardState.
"""

from __future__ import annotations

import enum
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..config import MiCSConfig, MixedPrecisionPolicy
from .buffers import GatheredUnits
from .collectives import CommStats
from .topology import Topology
from .unit import ShardedUnit, ShardState, TagChecks

__all__ = ["MiCSState", "TrainingState"]


class TrainingState(enum.Enum):
    IDLE = "idle"
    FORWARD = "forward"
    BACKWARD = "backward"


# Arguments or outputs of these types need the pytree walk; anything else is a leaf.
_CONTAINERS = (tuple, list, dict)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class _PostBackward(torch.autograd.Function):
    """Identity on a unit's tensor inputs; its backward calls `callback` once their gradients are complete,
    which autograd can only do after every node of the unit that leads to them has run."""

    @staticmethod
    def forward(ctx, callback: Callable[[], None], *tensors: torch.Tensor):  # type: ignore[override]
        ctx.callback = callback
        return tensors

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        ctx.callback()
        return (None, *grads)


class MiCSState:
    """Per-model engine state: the units (root last), the forward order, hooks, checks and statistics."""

    def __init__(
        self,
        root: nn.Module,
        units: list[tuple[nn.Module, ShardedUnit]],
        *,
        config: MiCSConfig,
        policy: MixedPrecisionPolicy,
        topology: Topology,
        stats: CommStats,
        checks: TagChecks,
        gathered: GatheredUnits | None = None,
    ) -> None:
        self.root = root
        self.units = units  # (module, unit), root's entry last
        self.config = config
        self.policy = policy
        self.topology = topology
        self.stats = stats
        self.checks = checks
        self.gathered = gathered if gathered is not None else GatheredUnits(config.max_gathered_units)
        self.sync_gradients = True
        self.training_state = TrainingState.IDLE
        self.forward_order: list[ShardedUnit] = []  # the previous forward's unit order (drives prefetch)
        self._position: dict[int, int] = {}  # id(unit) -> its index in forward_order
        self._recording: list[ShardedUnit] = []  # this forward's order, adopted when the forward ends
        self._callback_queued = False
        self.num_backwards = 0
        self.num_hop2 = 0  # optimizer-step syncs performed (for tests and metrics)
        self._handles: list[Any] = []
        self._unreduced: set[int] = set()  # ids of units that ran since their last reduce-scatter
        self._hop1_started: list[ShardedUnit] = []  # hop 1 launched, hop 2 not yet (this backward)
        self._hop2_started: set[int] = set()
        self._last_hop2: ShardedUnit | None = None
        self.replaced: dict[int, Any] = {}  # id(original parameter) -> (weakref, shard, name); set by shard_model
        # Inference that runs many forwards in a row (generate()): units stay gathered from one no-grad forward to
        # the next instead of being gathered again at every decoding step; see generation.py.
        self.keep_gathered = False
        self._shard_ids: set[int] | None = None  # the parameters the units own (see _check_no_new_parameters)
        self.pool: Any = None  # the model's BufferPool (buffers.py); set by shard_model
        self._register_hooks()

    @property
    def root_unit(self) -> ShardedUnit:
        return self.units[-1][1]

    def reshard_all(self) -> None:
        """Shard every unit (between steps): what state dicts and checkpoints must read and write."""
        if self.training_state is TrainingState.IDLE:
            for _, unit in self.units:
                unit.reshard()

    # ---- registration ------------------------------------------------------------------------------------
    def _register_hooks(self) -> None:
        # one closure per unit, made once: the step's hooks create no functions
        self._pre_backward = {id(u): self._make_pre_backward(u) for _, u in self.units}
        self._post_backward_of = {id(u): (lambda u=u: self._post_backward(u)) for _, u in self.units}
        for module, unit in self.units:
            is_root = module is self.root
            self._handles.append(
                module.register_forward_pre_hook(self._make_pre_forward(unit, is_root), with_kwargs=True, prepend=True)
            )
            self._handles.append(module.register_forward_hook(self._make_post_forward(unit, is_root)))

    # ---- forward -----------------------------------------------------------------------------------------
    def _make_pre_forward(self, unit: ShardedUnit, is_root: bool) -> Callable:
        def pre_forward(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if _in_backward():  # activation-checkpoint recomputation, see [Note: activation checkpointing]
                unit.wait_unshard()
                self._unreduced.add(id(unit))
                return None if is_root else self._route_inputs(unit, args, kwargs)
            if is_root:
                self._begin_forward()
            elif not self._recording or self._recording[-1] is not unit:
                self._recording.append(unit)
            unit.wait_unshard()
            if self.config.prefetch and self.forward_order and self.gathered.has_room():
                nxt = self.forward_order[0] if is_root else self._neighbour(unit, +1)
                if nxt is not None:
                    nxt.unshard()
            if torch.is_grad_enabled():
                self._unreduced.add(id(unit))
            if is_root and self.policy.param_dtype is not None:
                dtype = self.policy.param_dtype
                cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
                return tree_map(cast, args), tree_map(cast, kwargs)
            return None if is_root else self._route_inputs(unit, args, kwargs)

        return pre_forward

    def _route_inputs(self, unit: ShardedUnit, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Pass the unit's inputs that need gradients through _PostBackward (nothing to do if none does)."""
        if not torch.is_grad_enabled():
            return None
        if not any(isinstance(v, _CONTAINERS) for v in args) and not any(isinstance(v, _CONTAINERS) for v in kwargs.values()):
            return self._route_flat(unit, args, kwargs)  # the usual call: no pytree walk
        leaves, spec = tree_flatten((args, kwargs))
        picked = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not picked:
            return None
        routed = _PostBackward.apply(self._post_backward_of[id(unit)], *(leaves[i] for i in picked))
        for i, t in zip(picked, routed):
            leaves[i] = t
        return tree_unflatten(leaves, spec)

    def _route_flat(self, unit: ShardedUnit, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """_route_inputs for arguments that hold no containers (what blocks are called with)."""
        keys = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
        picked = [i for i, v in enumerate(args) if isinstance(v, torch.Tensor) and v.requires_grad]
        if not picked and not keys:
            return None
        routed = _PostBackward.apply(self._post_backward_of[id(unit)], *(args[i] for i in picked), *(kwargs[k] for k in keys))
        new_args = list(args)
        for i, t in zip(picked, routed):
            new_args[i] = t
        new_kwargs = dict(kwargs)
        for k, t in zip(keys, routed[len(picked):]):
            new_kwargs[k] = t
        return tuple(new_args), new_kwargs

    def _make_post_forward(self, unit: ShardedUnit, is_root: bool) -> Callable:
        def post_forward(module: nn.Module, args: tuple, output: Any) -> None:
            if _in_backward():
                if torch.is_grad_enabled():
                    self._arm_pre_backward(unit, output)
                return None
            if is_root:
                self._end_forward()
            elif not self._keeping():
                unit.reshard()  # the backward gathers it again (the MiCS/ZeRO-3 memory saving)
            if torch.is_grad_enabled():
                self._arm_pre_backward(unit, output)
            return None

        return post_forward

    def _keeping(self) -> bool:
        return self.keep_gathered and not torch.is_grad_enabled()

    def _begin_forward(self) -> None:
        self.checks.raise_pending()
        # Start from sharded units: what an abandoned step (a prefetch, a forward without backward) left
        # gathered, and the root after an optimizer step or a checkpoint load, are gathered afresh.
        keeping = self._keeping()
        for _, u in self.units:
            if not keeping:
                u.reshard()
            u.refresh_trainable()
        if not keeping:
            self._check_no_new_parameters()
        self._recording = []
        self.training_state = TrainingState.FORWARD

    def _check_no_new_parameters(self) -> None:
        """A parameter added after sharding (get_peft_model or a new head on a sharded model) belongs to no unit:
        nothing would average its gradient across ranks and every rank would train its own copy. Refuse it."""
        known = self._shard_ids
        if known is None:
            known = self._shard_ids = {id(sp.sharded) for _, u in self.units for sp in u.params}
        new = next((p for p in self.root.parameters() if id(p) not in known), None)  # every forward: no names built
        if new is not None:
            name = next(n for n, p in self.root.named_parameters() if p is new)
            raise ValueError(
                f"parameter {name!r} was added to the model after it was sharded, so no unit owns it and its "
                "gradients would never be averaged across ranks; add adapters and heads before sharding (e.g. "
                "get_peft_model on the model from mics_hf.defer_from_pretrained / before shard_model or prepare())"
            )

    def _end_forward(self) -> None:
        if self._recording:
            self.forward_order = self._recording
            self._position = {id(u): i for i, u in enumerate(self.forward_order)}
        if not torch.is_grad_enabled() and not self.keep_gathered:  # no backward will follow: free everything now
            for _, u in self.units:
                u.reshard()
        self.training_state = TrainingState.IDLE

    def _neighbour(self, unit: ShardedUnit, step: int) -> ShardedUnit | None:
        i = self._position.get(id(unit))
        if i is None:
            return None
        i += step
        return self.forward_order[i] if 0 <= i < len(self.forward_order) else None

    # ---- backward ----------------------------------------------------------------------------------------
    def _arm_pre_backward(self, unit: ShardedUnit, output: Any) -> None:
        hook = self._pre_backward[id(unit)]
        if isinstance(output, torch.Tensor):
            leaves = (output,)
        elif isinstance(output, tuple) and not any(isinstance(v, _CONTAINERS) for v in output):
            leaves = output  # a block's usual output: tensors (and None), no pytree walk
        else:
            leaves, _ = tree_flatten(output)
        for t in leaves:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(hook)

    def _make_pre_backward(self, unit: ShardedUnit) -> Callable:
        def pre_backward(grad: torch.Tensor) -> None:
            if not self._callback_queued:
                self._callback_queued = True
                self.training_state = TrainingState.BACKWARD
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            if unit.state is not ShardState.UNSHARDED:
                unit.wait_unshard()
            self._unreduced.add(id(unit))
            if self.config.prefetch and self.forward_order and self.gathered.has_room():
                prev = self.forward_order[-1] if unit is self.root_unit else self._neighbour(unit, -1)
                if prev is not None:
                    prev.unshard()
            return None

        return pre_backward

    def _post_backward(self, unit: ShardedUnit) -> None:
        """The unit's whole backward has run: reduce-scatter its gradients (hop 1), then free it."""
        self._progress_reductions()
        unit.reduce_grads()
        self._unreduced.discard(id(unit))
        self._hop1_started.append(unit)
        unit.reshard()

    def _progress_reductions(self) -> None:
        """Keep the reductions in flight moving; called when a unit's gradients are ready, before its own.

        Every rank reaches this in the same unit order, so whatever it launches is issued in the same order
        everywhere. First, the deferred inter-node stage of hierarchical reduce-scatters (CPU only, see
        Work.advance) starts now, to cross the links while the next units compute. Then, on a synchronising
        micro-step with replicas, hop 2 starts for every unit but the most recent one: their reduce-scatters
        were issued at least one unit of compute ago, so waiting for them is short, and the all-reduce overlaps
        the rest of backward. With one replica (ZeRO-3, a world of one) there is no hop 2 to start.
        """
        if self._hop1_started:  # only the newest can still have a deferred stage: the others were pushed already
            self._hop1_started[-1].advance_reduce()
        if not (self.sync_gradients and self.topology.replication_size > 1):
            # no hop 2 to start: just bound the reduce-scatters in flight ([Note: gathered units])
            while len(self._hop1_started) > 2:
                self._hop1_started.pop(0).wait_reduce()
            return
        while len(self._hop1_started) > 1:
            u = self._hop1_started.pop(0)
            u.wait_reduce()
            self._start_hop2(u)

    def _start_hop2(self, unit: ShardedUnit) -> None:
        """Start hop 2 for `unit`. On CPU the previous unit's hop 2 is finished (and its tags checked) first:
        gloo aborts the process on a size mismatch, so a mismatched pairing must be reported before the next
        all-reduce is issued. On CUDA they stay in flight together (the tags are checked later)."""
        if self._last_hop2 is not None and unit.device.type != "cuda":
            self._last_hop2.wait_all_reduce()
        unit.all_reduce_grads()
        self._last_hop2 = unit
        self._hop2_started.add(id(unit))

    def _end_of_backward(self) -> None:
        """Runs once after the whole backward: finish hop 1 for every unit, then hop 2 unless under no_sync."""
        try:
            for _, u in reversed(self.units):  # units that ran but were not reduced yet, in a fixed order
                if id(u) in self._unreduced:
                    u.reduce_grads()
            for _, u in self.units:
                u.wait_reduce()
            if self.sync_gradients:
                for _, u in self.units:
                    if id(u) not in self._hop2_started:
                        self._start_hop2(u)
                for _, u in self.units:
                    u.wait_all_reduce()
                self.num_hop2 += 1
            with self.stats.exposed("gradient_reductions", self.root_unit.device):  # the tail of backward
                for _, u in self.units:
                    u.join_streams()
            for _, u in self.units:
                u.reshard()
            self.num_backwards += 1
        finally:
            self._unreduced.clear()
            self._hop1_started.clear()
            self._hop2_started.clear()
            self._last_hop2 = None
            self._callback_queued = False
            self.training_state = TrainingState.IDLE

    # ---- teardown ----------------------------------------------------------------------------------------
    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
