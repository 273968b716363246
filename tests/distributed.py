"""A pool of forked gloo ranks that runs test functions, so each test module pays process start-up once.

The parent imports torch and transformers, then forks `world_size` workers that each join one gloo process
group and loop: receive (function, args), run it on every rank, send back its result or traceback. A worker
that does not answer within the timeout fails the test (and the pool is torn down) instead of hanging CI.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from mics_hf import close_process_group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, conn: Any, init: bool, pg_timeout: float) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if init:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=timedelta(seconds=pg_timeout),
        )
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            fn, args, kwargs = msg
            try:
                conn.send(("ok", fn(rank, world_size, *args, **kwargs)))
            except BaseException as exc:  # the parent raises it with the rank's traceback
                conn.send(("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        close_process_group(wait_for_peers=False)  # a test may have failed on one rank only: no barrier
        conn.close()


class RankError(AssertionError):
    """A test function raised on at least one rank; .errors holds each rank's message."""

    def __init__(self, errors: dict[int, str]) -> None:
        super().__init__("\n".join(f"[rank {r}] {e}" for r, e in sorted(errors.items())))
        self.errors = errors


class DistPool:
    def __init__(self, world_size: int, timeout: float = 300.0, *, init: bool = True, pg_timeout: float = 120.0) -> None:
        """init=False forks ranks without a process group (a world of one that never touches torch.distributed);
        pg_timeout is the process group's collective timeout (MiCS's groups inherit it)."""
        self.world_size = world_size
        self.timeout = timeout
        ctx = mp.get_context("fork")
        port = free_port()
        self.conns = []
        self.procs = []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, world_size, port, child, init, pg_timeout), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run fn(rank, world_size, *args, **kwargs) on every rank; return the results in rank order."""
        for c in self.conns:
            c.send((fn, args, kwargs))
        results: list[Any] = [None] * self.world_size
        errors: dict[int, str] = {}
        for rank, c in enumerate(self.conns):
            if not c.poll(self.timeout):
                self.close(force=True)
                raise TimeoutError(f"rank {rank} gave no answer within {self.timeout} s running {fn.__name__}")
            status, value = c.recv()
            if status == "ok":
                results[rank] = value
            else:
                errors[rank] = value
        if errors:
            raise RankError(errors)
        return results

    def close(self, force: bool = False) -> None:
        for c in self.conns:
            try:
                if not force:
                    c.send(None)
            except (BrokenPipeError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=0 if force else 20)
            if p.is_alive():
                p.kill()
                p.join()
        self.conns.clear()
        self.procs.clear()

    def __enter__(self) -> "DistPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
