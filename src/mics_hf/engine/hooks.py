"""The hooks that drive one training step: unshard before a unit runs, reshard after, reduce after backward.

Forward: the pre-hook of unit i waits for its all-gather and starts the gather of unit i+1 (the order is
recorded on the first step); the post-hook frees it and arms a pre-backward hook on its outputs.
Backward: the pre-backward hook gathers unit i again (and prefetches i-1); once every parameter of the unit
has its gradient, the unit's gradients are reduce-scattered (hop 1) into the fp32 shard gradients. At the
end of backward a callback waits for all of that and, unless under no_sync(), all-reduces the accumulated
shards across the replication group (hop 2).

[Note: activation checkpointing] Checkpointed units re-run forward during backward. Inside a backward
(`_current_graph_task_id() != -1`) the post-forward hook therefore never reshards: the unit is freed by its
gradient reduction instead. unshard/reshard are idempotent, driven by ShardState.
"""

from __future__ import annotations

import enum
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from ..config import MiCSConfig
from .collectives import CommStats
from .topology import Topology
from .unit import ShardedUnit, ShardState

__all__ = ["MiCSState", "TrainingState"]


class TrainingState(enum.Enum):
    IDLE = "idle"
    FORWARD = "forward"
    BACKWARD = "backward"


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class MiCSState:
    """Per-model engine state: the units (root last), the recorded execution order, hooks and statistics."""

    def __init__(self, root: nn.Module, units: list[tuple[nn.Module, ShardedUnit]], *, config: MiCSConfig, topology: Topology, stats: CommStats) -> None:
        self.root = root
        self.units = units  # (module, unit), root's entry last
        self.unit_of: dict[int, ShardedUnit] = {id(m): u for m, u in units}
        self.config = config
        self.topology = topology
        self.stats = stats
        self.sync_gradients = True
        self.training_state = TrainingState.IDLE
        self.forward_order: list[ShardedUnit] = []
        self._order_recorded = False
        self._callback_queued = False
        self.num_backwards = 0
        self.num_hop2 = 0  # optimizer-step syncs performed (for tests and metrics)
        self._handles: list[Any] = []
        self._hop1_started: list[ShardedUnit] = []  # hop 1 launched, hop 2 not yet (this backward)
        self._hop2_started: set[int] = set()
        self.replaced: dict[int, Any] = {}  # id(original parameter) -> (weakref, shard); set by shard_model
        self._register_hooks()

    @property
    def root_unit(self) -> ShardedUnit:
        return self.units[-1][1]

    # ---- registration ------------------------------------------------------------------------------------
    def _register_hooks(self) -> None:
        for module, unit in self.units:
            is_root = module is self.root
            self._handles.append(
                module.register_forward_pre_hook(self._make_pre_forward(unit, is_root), with_kwargs=True, prepend=True)
            )
            self._handles.append(module.register_forward_hook(self._make_post_forward(unit, is_root)))
            for sp in unit.params:
                if sp.requires_grad:
                    self._handles.append(sp.unsharded.register_post_accumulate_grad_hook(self._make_grad_ready(unit)))

    # ---- forward -----------------------------------------------------------------------------------------
    def _make_pre_forward(self, unit: ShardedUnit, is_root: bool) -> Callable:
        def pre_forward(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if _in_backward():  # activation-checkpoint recomputation: parameters are (being) gathered already
                unit.wait_unshard()
                return None
            if is_root:
                self._begin_forward()
            elif not self._order_recorded and unit not in self.forward_order:
                self.forward_order.append(unit)
            unit.wait_unshard()
            if self.config.prefetch and self._order_recorded and not is_root:
                nxt = self._neighbour(unit, +1)
                if nxt is not None:
                    nxt.unshard()
            elif self.config.prefetch and self._order_recorded and is_root and self.forward_order:
                self.forward_order[0].unshard()
            if is_root and self.config.param_dtype is not None:
                dtype = self.config.param_dtype
                cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
                return tree_map(cast, args), tree_map(cast, kwargs)
            return None

        return pre_forward

    def _make_post_forward(self, unit: ShardedUnit, is_root: bool) -> Callable:
        def post_forward(module: nn.Module, args: tuple, output: Any) -> None:
            if _in_backward():
                if torch.is_grad_enabled():
                    self._arm_pre_backward(unit, output)
                return None
            if is_root:
                self._order_recorded = True
                if not torch.is_grad_enabled():  # no backward will follow: free everything now
                    self._finish_without_backward()
                self.training_state = TrainingState.IDLE
            else:
                unit.reshard()  # the backward gathers it again (the MiCS/ZeRO-3 memory saving)
            if torch.is_grad_enabled():
                self._arm_pre_backward(unit, output)
            return None

        return post_forward

    def _begin_forward(self) -> None:
        # Units left gathered by an abandoned step (a prefetch, a forward without backward) start clean.
        for _, u in self.units:
            if u is not self.root_unit:
                u.reshard()
        self.training_state = TrainingState.FORWARD

    def _finish_without_backward(self) -> None:
        for _, u in self.units:
            u.reshard()

    def _neighbour(self, unit: ShardedUnit, step: int) -> ShardedUnit | None:
        try:
            i = self.forward_order.index(unit) + step
        except ValueError:
            return None
        return self.forward_order[i] if 0 <= i < len(self.forward_order) else None

    # ---- backward ----------------------------------------------------------------------------------------
    def _arm_pre_backward(self, unit: ShardedUnit, output: Any) -> None:
        leaves, _ = tree_flatten(output)
        for t in leaves:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(self._make_pre_backward(unit))

    def _make_pre_backward(self, unit: ShardedUnit) -> Callable:
        def pre_backward(grad: torch.Tensor) -> None:
            if not self._callback_queued:
                self._callback_queued = True
                self.training_state = TrainingState.BACKWARD
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            if unit.state is not ShardState.UNSHARDED:
                unit.wait_unshard()
            if self.config.prefetch and self.forward_order:
                prev = self.forward_order[-1] if unit is self.root_unit else self._neighbour(unit, -1)
                if prev is not None:
                    prev.unshard()
            return None

        return pre_backward

    def _make_grad_ready(self, unit: ShardedUnit) -> Callable:
        def grad_ready(param: torch.Tensor) -> None:
            unit.num_grads_ready += 1
            if unit.num_grads_ready == unit.num_grad_params:
                self._progress_reductions()
                unit.reduce_grads()
                if unit is not self.root_unit:
                    unit.reshard()
                self._hop1_started.append(unit)

        return grad_ready

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
            return
        while len(self._hop1_started) > 1:
            u = self._hop1_started.pop(0)
            u.wait_reduce()
            u.all_reduce_grads()
            self._hop2_started.add(id(u))

    def _end_of_backward(self) -> None:
        """Runs once after the whole backward: finish hop 1 for every unit, then hop 2 unless under no_sync."""
        try:
            for _, u in reversed(self.units):
                if u.num_grads_ready > 0:  # parameters the step did not use: reduce what did arrive
                    u.reduce_grads()
            for _, u in self.units:
                u.wait_reduce()
            if self.sync_gradients:
                for _, u in self.units:
                    if id(u) not in self._hop2_started:
                        u.all_reduce_grads()
                for _, u in self.units:
                    u.wait_all_reduce()
                self.num_hop2 += 1
            for _, u in self.units:
                u.join_streams()
                u.reshard()
            self.num_backwards += 1
        finally:
            self._hop1_started.clear()
            self._hop2_started.clear()
            self._callback_queued = False
            self.training_state = TrainingState.IDLE

    # ---- teardown ----------------------------------------------------------------------------------------
    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
