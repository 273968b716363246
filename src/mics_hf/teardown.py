"""Leaving a distributed job: every rank waits for the others, then the process groups are closed safely.

Two exit failures were seen on CPU (gloo) jobs whose training had already finished, each failing the launch:

- a process that exits with its groups alive can abort during interpreter shutdown ("terminate called without an
  active exception");
- a process that drops its last reference to a group right after a collective can deadlock. A gloo worker thread
  releases the finished collective's tensors after waking the caller, and releasing a tensor that Python also
  knows takes the GIL; the thread destroying the group holds the GIL while it joins that worker. DDP's reducer
  often holds the last reference, so the hang shows when the model is freed at the end of `main()`.

`close_process_group()` avoids both: a barrier (so no peer is still mid-collective), a short sleep that releases
the GIL (so the workers finish releasing), then `destroy_process_group()`. A script that never calls it (a stock
Trainer script with `--mics`) is covered by `close_at_exit()`, which sharding a model registers.
"""

from __future__ import annotations

import atexit
import time

import torch.distributed as dist

from .topology import clear_group_cache

# How long the GIL is released before the groups are destroyed. A worker needs it only for a moment; the margin
# is for a machine where more ranks than cores compete for the CPU.
SETTLE_S = 0.05


def close_process_group(*, wait_for_peers: bool = True, settle_s: float = SETTLE_S) -> None:
    """Destroy the default process group and every group made from it, after all ranks got here.

    `wait_for_peers=False` skips the barrier, for error paths where a peer may be gone (a barrier would then
    wait for the group's timeout). Does nothing when no group is initialised, so it is safe in `finally`.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait_for_peers:
        dist.barrier()
    time.sleep(settle_s)
    dist.destroy_process_group()
    clear_group_cache()  # the cached partition / replication groups died with the default group


_registered = False


def close_at_exit() -> None:
    """Make the interpreter close the groups on exit, while it can still run their destructors, if the script
    has not closed them itself. No barrier there: after an error a peer may be gone or stuck in a collective."""
    global _registered
    if not _registered:
        atexit.register(close_process_group, wait_for_peers=False)
        _registered = True
