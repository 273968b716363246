"""MiCSConfig validation: bad values fail on construction with a message that names the fix."""

from __future__ import annotations

import pytest
import torch

from mics_hf import MiCSConfig
from mics_hf.config import VALID_CONFIG_KEYS


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"param_dtype": torch.int8}, "not a floating-point type"),
        ({"param_dtype": "int8"}, "is not a dtype"),
        ({"reduce_dtype": torch.int32}, "not a floating-point type"),
        ({"partition_size": 0}, "must be a positive integer"),
        ({"partition_size": True}, "must be a positive integer"),
        ({"devices_per_node": -2}, "must be a positive integer"),
        ({"hierarchical": "yes"}, '"auto", True or False'),
        ({"prefetch": "no"}, "must be True or False"),
        ({"units": (int,)}, "must be an nn.Module subclass"),
        ({"node_of_rank": (0, -1)}, "non-negative node index"),
    ],
)
def test_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MiCSConfig(**kwargs)


def test_keyword_only_and_frozen():
    with pytest.raises(TypeError):
        MiCSConfig(4)  # type: ignore[misc]
    cfg = MiCSConfig(partition_size=4)
    with pytest.raises(Exception):
        cfg.partition_size = 2  # type: ignore[misc]


def test_dtype_names_and_dict_round_trip():
    cfg = MiCSConfig.from_dict({"partition_size": 8, "param_dtype": "bf16", "units": ["GPT2Block"], "hierarchical": True})
    assert cfg.param_dtype is torch.bfloat16 and cfg.units == ("GPT2Block",)
    assert MiCSConfig.from_dict(cfg.to_dict()) == cfg
    # hop 1 reduces in the compute dtype unless asked otherwise (accumulation stays in the fp32 shard gradient)
    assert cfg.mixed_precision.gradient_reduce_dtype is torch.bfloat16


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError) as info:
        MiCSConfig.from_dict({"partition_sise": 4})
    for key in VALID_CONFIG_KEYS:
        assert key in str(info.value)
