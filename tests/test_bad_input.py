"""Bad input to shard_model: a ValueError that says what is wrong and what would work, raised on every rank
before any collective or process group is created (so no rank is left waiting in a collective).

Cases: partition size not dividing the world; a partition covering part of a node (pure arithmetic, see
test_topology); devices per node not dividing the world; hierarchical=True with a single node; a model with no
parameters; sharding a model twice; a non-float param_dtype (see test_config); units that match nothing; a
node map of the wrong length; meta-device parameters the model has no way to initialise.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import mics_hf
from models import tiny_gpt2

_COLLECTIVES = ("new_group", "all_gather_object", "all_gather_into_tensor", "all_gather_single", "all_reduce", "broadcast")


def _shard_without_collectives(rank: int, world: int, *, case: str) -> str:
    """Build the bad input, forbid every collective, call shard_model, return the error message."""
    model, cfg = _CASES[case]()
    saved = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def forbidden(*args, **kwargs):
        raise AssertionError("a collective ran before the input was validated")

    for name in saved:
        setattr(dist, name, forbidden)
    try:
        mics_hf.shard_model(model, cfg)
    except ValueError as exc:
        return str(exc)
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
    return "no error"


def _sharded_twice():
    model = tiny_gpt2()
    # the first sharding is legitimate and may communicate; only the second call is checked
    _shard_real(model)
    return model, mics_hf.MiCSConfig(partition_size=2, devices_per_node=2)


def _shard_real(model):
    mics_hf.shard_model(model, mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))


class _RawWeights(nn.Module):
    """Parameters with no initialisation recipe (no reset_parameters, no _init_weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(4, 4))


def _meta_model():
    with torch.device("meta"):
        model = _RawWeights()
    return model, mics_hf.MiCSConfig(devices_per_node=2)


_CASES = {
    "partition_not_dividing_world": lambda: (tiny_gpt2(), mics_hf.MiCSConfig(partition_size=3, devices_per_node=2)),
    "devices_per_node_not_dividing_world": lambda: (tiny_gpt2(), mics_hf.MiCSConfig(devices_per_node=3)),
    "hierarchical_true_single_node": lambda: (tiny_gpt2(), mics_hf.MiCSConfig(partition_size=8, devices_per_node=8, hierarchical=True)),
    "hierarchical_true_group_inside_node": lambda: (tiny_gpt2(), mics_hf.MiCSConfig(partition_size=2, devices_per_node=2, hierarchical=True)),
    "no_parameters": lambda: (nn.Sequential(nn.ReLU()), mics_hf.MiCSConfig(devices_per_node=2)),
    "sharded_twice": _sharded_twice,
    "units_match_nothing": lambda: (tiny_gpt2(), mics_hf.MiCSConfig(devices_per_node=2, units=("NoSuchBlock",))),
    "node_map_wrong_length": lambda: (tiny_gpt2(), mics_hf.MiCSConfig(node_of_rank=(0, 0, 1, 1))),
    "meta_parameters": _meta_model,
}

EXPECTED = {
    "partition_not_dividing_world": r"partition_size=3 does not divide the world size 8; .*\[1, 2, 4, 8\]",
    "devices_per_node_not_dividing_world": r"devices_per_node=3 does not divide the world size 8; use one of \[1, 2, 4, 8\]",
    "hierarchical_true_single_node": r"hierarchical=True needs a partition group that spans several nodes.*hierarchical='auto' or False",
    "hierarchical_true_group_inside_node": r"partition_size=2 fits inside one node of 2 devices.*partition_size in \[4, 8\]",
    "no_parameters": r"has no parameters",
    "sharded_twice": r"already sharded by mics_hf",
    "units_match_nothing": r"no module of GPT2LMHeadModel matches units=\['NoSuchBlock'\]",
    "node_map_wrong_length": r"node_of_rank lists 4 ranks but the world has 8",
    "meta_parameters": r"on the meta device and _RawWeights has neither `_init_weights`.*materialise the model",
}

# Validation that needs the topology (hierarchical / partial nodes) runs after a rank -> node map is known; with
# devices_per_node or node_of_rank given that needs no collective either.


@pytest.mark.parametrize("case", sorted(_CASES))
def test_bad_input_fails_before_any_collective(pools, case):
    import re

    messages = pools(8).run(_shard_without_collectives, case=case)
    for rank, message in enumerate(messages):
        assert re.search(EXPECTED[case], message), (rank, message)


def test_bad_input_leaves_the_process_group_usable(pools):
    """After every rank refused a bad config, a real collective still completes (nobody is stuck in one)."""
    pool = pools(8)
    pool.run(_shard_without_collectives, case="partition_not_dividing_world")
    assert pool.run(_sum_ranks) == [28.0] * 8


def _sum_ranks(rank: int, world: int) -> float:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()
