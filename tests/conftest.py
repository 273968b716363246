"""Shared fixtures: offline Hugging Face, and one forked gloo pool per test module and world size."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import transformers  # noqa: E402,F401  (imported before forking so every rank inherits it)

from distributed import DistPool  # noqa: E402


@pytest.fixture(scope="module")
def pools():
    """pools(8) -> a DistPool of 8 ranks, created once per module and closed at its end."""
    made: dict[tuple[int, bool], DistPool] = {}

    def get(world_size: int, *, init: bool = True) -> DistPool:
        key = (world_size, init)
        if key not in made:
            made[key] = DistPool(world_size, init=init)
        return made[key]

    yield get
    for pool in made.values():
        pool.close()
