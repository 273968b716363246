"""close_process_group(): every rank waits for the others, the groups are gone, a DDP model frees cleanly after."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from distributed import DistPool, free_port


def _leave(rank: int, world: int, *, port: int, marker: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    import mics_hf
    from mics_hf.engine import topology

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    model = DistributedDataParallel(torch.nn.Linear(4, 4))  # its reducer keeps the default group alive
    model(torch.ones(2, 4)).sum().backward()
    gathered = [torch.zeros(3) for _ in range(world)]
    dist.all_gather(gathered, torch.full((3,), float(rank)))  # a finished collective with Python-owned tensors
    mics_hf.shard_model(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)),
                        mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))  # fills the group cache
    cached = len(topology._GROUP_CACHE)
    if rank == world - 1:
        time.sleep(0.5)  # the last rank is late: the others must wait for it
        Path(marker).write_text("arrived")
    mics_hf.close_process_group()
    seen = Path(marker).exists()  # every rank passed the barrier only after the late rank wrote the marker
    del model, gathered  # the reducer drops the last reference to the group here: this must not hang
    return {"seen": seen, "initialized": dist.is_initialized(), "cached_before": cached,
            "cached_after": len(topology._GROUP_CACHE)}


def test_close_process_group_waits_for_every_rank_and_closes(tmp_path):
    with DistPool(4, init=False, timeout=120) as pool:
        results = pool.run(_leave, port=free_port(), marker=str(tmp_path / "late"))
    for r in results:
        assert r["seen"] and not r["initialized"]
        assert r["cached_before"] >= 1 and r["cached_after"] == 0


def test_close_process_group_without_a_group_does_nothing():
    import mics_hf

    assert not dist.is_initialized()
    mics_hf.close_process_group()  # safe in a `finally`, even when init never happened
    assert not dist.is_initialized()


STOCK_SCRIPT = """
import atexit, os, sys
import torch, torch.distributed as dist
import mics_hf

out = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()

def report():
    registered = len(dist.distributed_c10d._world.pg_map) if dist.is_initialized() else 0
    open(f"{out}.{rank}", "w").write(f"{dist.is_initialized()} {registered}")

# registered before shard_model, so it runs after mics_hf's handler (atexit is last in, first out)
atexit.register(report)
torch.manual_seed(0)  # every rank builds the same weights (shard_model checks the replicas)
model = mics_hf.shard_model(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)),
                            mics_hf.MiCSConfig(partition_size=2, devices_per_node=2))
model(torch.ones(4, 8)).sum().backward()
# no teardown here, like a stock Trainer script
"""


def test_at_exit_mics_closes_its_own_groups_and_leaves_the_users_group_alone(tmp_path):
    """4 ranks, partition 2: MiCS made partition and replication groups; at exit those are destroyed and
    the default group, which the script created, is still initialised and the only one registered."""
    import os
    import sys

    from launch import run_job

    script = tmp_path / "stock.py"
    script.write_text(STOCK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", str(script),
           str(tmp_path / "at_exit")]
    result = run_job(cmd, env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(4):
        assert (tmp_path / f"at_exit.{rank}").read_text() == "True 1"
