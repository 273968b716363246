"""Leaving a distributed job: MiCS closes the groups it created and never the user's default group.

A script using mics_hf ends however PyTorch's documentation says a script ends: with
`dist.barrier(); dist.destroy_process_group()`, with `dist.destroy_process_group()` alone, or with nothing
(a stock Trainer script). The library owns only the partition / replication / intra-node / inter-node groups
it made with `dist.new_group`; the default group belongs to whoever called `init_process_group`.

Two exit hazards were seen on CPU (gloo) jobs whose training had already finished:

- a group object destroyed while the interpreter is finalising can abort the process ("terminate called
  without an active exception"): its gloo worker threads are joined after the runtime they call into is gone.
  MiCS's groups are referenced from a module-level cache and from every unit, so without care they are the
  last objects to die, during finalisation;
- a group destroyed right after a collective can deadlock: a gloo worker thread releases the finished
  collective's tensors after waking the caller, releasing a tensor Python also knows takes the GIL, and the
  thread destroying the group holds the GIL while it joins that worker.

So `shard_model` registers `release_at_exit()`: at interpreter exit, while the runtime is fully alive, it
releases the GIL for a moment (the workers finish), destroys MiCS's own groups that are still registered
(a user who already called `destroy_process_group()` has shut them down with the rest), and drops the last
references MiCS holds, so each group's destructor runs there and not during finalisation. It sends nothing to
peers: after an error a peer may be gone.

`close_process_group()` is an optional helper for MiCS's own programs and for callers that want one call to
leave together: a barrier, the same pause, then `destroy_process_group()` of everything.
"""

from __future__ import annotations

import atexit
import time

import torch.distributed as dist

from .topology import clear_group_cache, created_groups

# How long the GIL is released before groups are destroyed. A worker needs it only for a moment; the margin
# is for a machine where more ranks than cores compete for the CPU.
SETTLE_S = 0.05


def close_process_group(*, wait_for_peers: bool = True, settle_s: float = SETTLE_S) -> None:
    """Destroy the default process group and every group made from it, after all ranks got here.

    Optional: ending with `dist.destroy_process_group()` works as well. `wait_for_peers=False` skips the
    barrier, for error paths where a peer may be gone (a barrier would then wait for the group's timeout).
    Does nothing when no group is initialised, so it is safe in `finally`.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if wait_for_peers:
        dist.barrier()
    time.sleep(settle_s)
    dist.destroy_process_group()
    clear_group_cache()  # the cached partition / replication groups died with the default group


def release_groups(*, settle_s: float = SETTLE_S) -> None:
    """Destroy the groups MiCS created, if still registered, and forget them; the default group is left alone."""
    time.sleep(settle_s)
    if dist.is_available() and dist.is_initialized():
        for pg in created_groups():
            if dist.distributed_c10d._world.pg_map.get(pg) is not None:  # not already destroyed by the user
                dist.destroy_process_group(pg)
    clear_group_cache()


_registered = False


def release_at_exit() -> None:
    """Make the interpreter release MiCS's groups on exit, while their destructors can still run safely."""
    global _registered
    if not _registered:
        atexit.register(release_groups)
        _registered = True
