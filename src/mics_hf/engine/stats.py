"""Read-only views of a sharded model's engine: its communication statistics and its topology."""

from __future__ import annotations

import torch.nn as nn

from .collectives import CommStats
from .shard import get_state
from .topology import Topology

__all__ = ["comm_stats", "topology_of", "num_hop2"]


def comm_stats(model: nn.Module) -> CommStats:
    """Calls, bytes and wait seconds per (op, link) since sharding or the last .reset()."""
    return get_state(model).stats


def topology_of(model: nn.Module) -> Topology:
    """The partition / replication / node layout the model was sharded with."""
    return get_state(model).topology


def num_hop2(model: nn.Module) -> int:
    """How many replica all-reduces (optimizer-step gradient syncs) the model has run."""
    return get_state(model).num_hop2
