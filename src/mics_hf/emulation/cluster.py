"""Emulate a multi-node cluster on one machine (root + iproute2) and measure bytes that really cross the links.

[Note: emulated cluster] `EmulatedCluster` builds, entirely inside namespaces it creates (the host network is
never touched): one namespace holding a bridge `br0`, and one namespace per node whose `eth0` is a veth whose
peer sits on that bridge. Node i has 10.77.0.<i+1>/24 (a private /24 that only exists inside the bridge
namespace). Each node's eth0 egress is shaped by `tbf` (and, with shape_ingress, the bridge-side peer too, so a
node's ingress is limited as a full-duplex NIC would be). Names carry the PID and a random tag so parallel runs
never collide; everything is deleted on close(), on an exception inside the with-block, at interpreter exit
(atexit) and on SIGTERM / Ctrl-C.

Ranks in the same node namespace reach each other on their own 10.77.0.x address, which the kernel routes over
that namespace's loopback: intra-node traffic never crosses eth0, so eth0's tx_bytes count inter-node bytes only.

`measure_all_gather` runs one flat or hierarchical all-gather over nodes x ranks_per_node gloo workers (this
module run as `python -m mics_hf.emulation.cluster worker ...`) and reads every node's eth0 counters around it. The
workers follow a line protocol on stdin/stdout: `READY <phase>` -> parent reads counters, answers `GO` ->
`DONE <phase> <seconds>` -> parent reads counters again and answers `NEXT` (no worker sends anything between
DONE and NEXT, so the next phase's warm-up never lands in the counters of this one).
"""

from __future__ import annotations

import argparse
import atexit
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Sequence

__all__ = ["EmulatedCluster", "EmulationUnavailable", "PhaseWorker", "measure_all_gather", "run_phases", "SUBNET"]

SUBNET = "10.77.0"
_SRC_DIR = str(Path(__file__).resolve().parents[1])

_LIVE: "weakref.WeakSet[EmulatedCluster]" = weakref.WeakSet()
_HANDLERS_INSTALLED = False


class EmulationUnavailable(RuntimeError):
    """The machine cannot host an emulated cluster (not root, no iproute2, no netns / veth / tbf support)."""


def _close_all() -> None:
    for cluster in list(_LIVE):
        try:
            cluster.close()
        except Exception:  # best effort at exit: keep deleting the others
            pass


def _install_handlers() -> None:
    """atexit + SIGTERM/SIGHUP -> close every live cluster. Ctrl-C raises KeyboardInterrupt, so finally runs."""
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(_close_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(sig)
        if previous not in (signal.SIG_DFL, None):
            continue  # someone else handles it; atexit still cleans up on a normal exit

        def handler(signum, frame, _sig=sig):
            _close_all()
            signal.signal(_sig, signal.SIG_DFL)
            os.kill(os.getpid(), _sig)

        signal.signal(sig, handler)


def check_available() -> None:
    """Raise EmulationUnavailable with the reason if this process cannot create namespaces."""
    if shutil.which("ip") is None:
        raise EmulationUnavailable("the cluster emulation needs root and iproute2: the `ip` command was not found")
    if shutil.which("tc") is None:
        raise EmulationUnavailable("the cluster emulation needs root and iproute2: the `tc` command was not found")
    if os.geteuid() != 0:
        raise EmulationUnavailable(
            f"the cluster emulation needs root and iproute2: running as uid {os.geteuid()}, not root"
        )


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise EmulationUnavailable(f"`ip {' '.join(args)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _run(argv: Sequence[str]) -> None:
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if proc.returncode != 0:
        raise EmulationUnavailable(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")


class EmulatedCluster:
    """`nodes` network namespaces on one bridge, each node's eth0 shaped to `rate_mbit` (see module note)."""

    def __init__(self, nodes: int, rate_mbit: float, burst_kb: int = 64, *, shape_ingress: bool = True) -> None:
        if nodes < 1:
            raise ValueError(f"nodes must be at least 1, got {nodes}")
        if nodes > 250:
            raise ValueError(f"at most 250 nodes fit the /24 {SUBNET}.0/24, got {nodes}")
        if rate_mbit <= 0:
            raise ValueError(f"rate_mbit must be positive, got {rate_mbit}")
        check_available()
        self.nodes = nodes
        self.rate_mbit = rate_mbit
        self.burst_kb = burst_kb
        self.shape_ingress = shape_ingress
        tag = f"mics{os.getpid()}-{secrets.token_hex(2)}"
        self.bridge_ns = f"{tag}-br"
        self.node_ns = [f"{tag}-n{i}" for i in range(nodes)]
        self._created: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._closed = False
        _install_handlers()
        _LIVE.add(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # ---- construction -------------------------------------------------------------------------------------
    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _tbf(self, ns: str, dev: str) -> None:
        rate = f"{self.rate_mbit:g}mbit"
        _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
              "rate", rate, "burst", f"{self.burst_kb}kb", "latency", "200ms"])

    def _build(self) -> None:
        br = self.bridge_ns
        self._add_ns(br)
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        for i, ns in enumerate(self.node_ns):
            self._add_ns(ns)
            peer = f"v{i}"
            # Both ends are created directly inside namespaces: nothing ever appears in the host namespace.
            _ip("-n", br, "link", "add", peer, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", br, "link", "set", peer, "master", "br0")
            _ip("-n", br, "link", "set", peer, "up")
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            self._tbf(ns, "eth0")
            if self.shape_ingress:
                self._tbf(br, peer)

    # ---- use ----------------------------------------------------------------------------------------------
    def address(self, node: int) -> str:
        self._check_node(node)
        return f"{SUBNET}.{node + 1}"

    def _check_node(self, node: int) -> None:
        if self._closed:
            raise RuntimeError("this EmulatedCluster is closed")
        if not 0 <= node < self.nodes:
            raise ValueError(f"node {node} is outside 0..{self.nodes - 1}")

    def run(self, node: int, argv: list[str], env: dict | None = None, **popen_kwargs) -> subprocess.Popen:
        """Start argv inside node's namespace; env replaces the environment (None: inherit). Killed on close()."""
        self._check_node(node)
        proc = subprocess.Popen(["ip", "netns", "exec", self.node_ns[node], *argv], env=env, **popen_kwargs)
        self._procs.append(proc)
        return proc

    def _counter(self, node: int, name: str) -> int:
        self._check_node(node)
        out = subprocess.run(
            ["ip", "netns", "exec", self.node_ns[node], "cat", f"/sys/class/net/eth0/statistics/{name}"],
            capture_output=True, text=True,
        )
        if out.returncode != 0:
            raise RuntimeError(f"reading {name} of node {node} failed: {out.stderr.strip()}")
        return int(out.stdout.strip())

    def tx_bytes(self, node: int) -> int:
        return self._counter(node, "tx_bytes")

    def rx_bytes(self, node: int) -> int:
        return self._counter(node, "rx_bytes")

    def namespaces(self) -> list[str]:
        return [self.bridge_ns, *self.node_ns]

    # ---- teardown -----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Kill the processes started by run() and delete every namespace (and so every link) created. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        errors = []
        for ns in reversed(self._created):
            r = _ip("netns", "del", ns, check=False)
            if r.returncode != 0 and "No such file" not in r.stderr:
                errors.append(f"{ns}: {r.stderr.strip()}")
        self._created.clear()
        _LIVE.discard(self)
        if errors:
            raise RuntimeError("could not delete namespaces: " + "; ".join(errors))

    def __enter__(self) -> "EmulatedCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# ---- measurement ---------------------------------------------------------------------------------------------
def _worker_env(rank: int, world: int, port: int) -> dict:
    env = dict(os.environ)
    env.update(
        MASTER_ADDR=f"{SUBNET}.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        GLOO_SOCKET_IFNAME="eth0",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([_SRC_DIR, *filter(None, [os.environ.get("PYTHONPATH")])]),
        PYTHONUNBUFFERED="1",
    )
    return env


def _expect(procs, prefix: str) -> list[str]:
    """Each worker's next line starting with `prefix`. A dead worker gives EOF; the run's deadline is a kill timer
    (run_phases), which turns a hang into EOF here."""
    lines = []
    for proc in procs:
        while True:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"a worker exited (rc={proc.poll()}) while the parent waited for {prefix}")
            line = line.strip()
            if line.startswith(prefix):
                lines.append(line)
                break
    return lines


def run_phases(cluster: EmulatedCluster, argvs: Sequence[Sequence[str]], ranks_per_node: int,
               phases: Sequence[str], *, timeout: float, port: int = 29500) -> dict[str, dict]:
    """Start rank r's worker (argvs[r]) on node r // ranks_per_node and drive the phase protocol (module note).

    Returns, per phase: "done" (the text after `DONE <phase> ` of every rank, in rank order), "tx" / "rx"
    (bytes on each node's eth0 during the phase) and "wall" (seconds from GO to the last DONE). A worker
    that dies, or a run longer than ``timeout``, raises RuntimeError; every worker is gone on return.
    """
    world = len(argvs)
    procs = [
        cluster.run(rank // ranks_per_node, list(argv), env=_worker_env(rank, world, port),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for rank, argv in enumerate(argvs)
    ]
    timer = threading.Timer(timeout, lambda: [p.kill() for p in procs if p.poll() is None])
    timer.start()
    deadline = time.monotonic() + timeout
    results: dict[str, dict] = {}
    try:
        for phase in phases:
            _expect(procs, f"READY {phase}")
            tx0 = [cluster.tx_bytes(n) for n in range(cluster.nodes)]
            rx0 = [cluster.rx_bytes(n) for n in range(cluster.nodes)]
            t0 = time.perf_counter()
            for p in procs:
                p.stdin.write("GO\n")
                p.stdin.flush()
            done = _expect(procs, f"DONE {phase}")
            wall = time.perf_counter() - t0
            time.sleep(0.05)  # trailing ACKs
            results[phase] = {
                "done": [line.split(" ", 2)[2] if line.count(" ") >= 2 else "" for line in done],
                "tx": [cluster.tx_bytes(n) - tx0[n] for n in range(cluster.nodes)],
                "rx": [cluster.rx_bytes(n) - rx0[n] for n in range(cluster.nodes)],
                "wall": wall,
            }
            if os.environ.get("MICS_EMULATE_DEBUG"):
                for n in range(cluster.nodes):
                    for ns, dev in ((cluster.node_ns[n], "eth0"), (cluster.bridge_ns, f"v{n}")):
                        print(subprocess.run(["ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", dev],
                                             capture_output=True, text=True).stdout, file=sys.stderr)
            # Only now may the workers go on (the next phase's warm-up must not land in these counters).
            for p in procs:
                p.stdin.write("NEXT\n")
                p.stdin.flush()
        for p in procs:
            rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
            if rc != 0:
                raise RuntimeError(f"a worker exited with {rc}")
    finally:
        timer.cancel()
        for p in procs:
            if p.poll() is None:
                p.kill()
            for stream in (p.stdin, p.stdout):
                try:
                    stream.close()
                except Exception:
                    pass
    return results


class PhaseWorker:
    """The worker side of the phase protocol: `run(phase, fn)` warms up, reports READY, waits for GO, times fn."""

    @staticmethod
    def say(msg: str) -> None:
        print(msg, flush=True)

    @staticmethod
    def wait_for(word: str) -> None:
        while True:
            line = sys.stdin.readline()
            if not line:
                raise SystemExit(f"parent went away while waiting for {word}")
            if line.strip() == word:
                return

    def run(self, phase: str, fn, *, warmup=None, barrier=None) -> None:
        """warmup() (default fn()), barrier(), READY; GO -> result = fn() -> `DONE <phase> <result>`; NEXT."""
        (warmup or fn)()
        if barrier is not None:
            barrier()
        self.say(f"READY {phase}")
        self.wait_for("GO")
        result = fn()
        self.say(f"DONE {phase} {result}")
        self.wait_for("NEXT")


def measure_all_gather(
    nodes: int = 2,
    ranks_per_node: int = 2,
    megabytes: float = 16,
    rate_mbit: float = 200,
    hierarchical: bool = False,
    *,
    calibrate: bool = False,
    burst_kb: int = 64,
    shape_ingress: bool = True,
    timeout: float = 120.0,
    repeat: int = 1,
) -> dict:
    """One warm-up then one measured all-gather of a `megabytes` output buffer on an emulated cluster.

    With repeat > 1 the measured phase runs the all-gather that many times and "seconds" is the median (link
    bytes then cover all of them); for latency, where one call of a few milliseconds is noisy.

    Returns {"seconds": slowest rank's time for the measured call, "tx_bytes_per_node", "rx_bytes_per_node",
    "payload_bytes"}; with calibrate=True also "send_overhead": eth0 tx bytes of node 0 per payload byte of a
    plain point-to-point send (rank 0 -> first rank of node 1) of the same size, i.e. the TCP/IP framing factor.
    """
    if nodes < 2 and calibrate:
        raise ValueError("calibrate=True needs at least 2 nodes")
    world = nodes * ranks_per_node
    payload = int(megabytes * 2**20)
    payload -= payload % (4 * world)
    phases = ["gather"] + (["send"] if calibrate else [])
    argv = [sys.executable, "-m", "mics_hf.emulation.cluster", "worker", "--nodes", str(nodes),
            "--ranks-per-node", str(ranks_per_node), "--bytes", str(payload),
            "--phases", ",".join(phases), "--repeat", str(repeat)] + (["--hierarchical"] if hierarchical else [])
    result: dict = {"payload_bytes": payload, "nodes": nodes, "ranks_per_node": ranks_per_node,
                    "hierarchical": hierarchical, "rate_mbit": rate_mbit}
    with EmulatedCluster(nodes, rate_mbit, burst_kb, shape_ingress=shape_ingress) as cluster:
        phase_results = run_phases(cluster, [argv] * world, ranks_per_node, phases, timeout=timeout)
    gather = phase_results["gather"]
    result.update(seconds=max(float(d) for d in gather["done"]), wall_seconds=gather["wall"],
                  tx_bytes_per_node=gather["tx"], rx_bytes_per_node=gather["rx"])
    if calibrate:
        result.update(send_overhead=phase_results["send"]["tx"][0] / payload,
                      send_tx_bytes_per_node=phase_results["send"]["tx"])
    result["tx_fraction_per_node"] = [b / payload for b in result["tx_bytes_per_node"]]
    return result


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from ..engine.collectives import CommGroup, all_gather, hierarchical_all_gather
    from ..engine.teardown import close_process_group
    from ..engine.topology import build_topology, create_process_groups, node_map_from_devices_per_node

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    k = args.ranks_per_node
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        nodes = node_map_from_devices_per_node(world, k)
        topo = build_topology(world_size=world, rank=rank, node_of_rank=nodes, partition_size=world,
                              hierarchical=bool(args.hierarchical))
        pgs = create_process_groups(topo)
        partition = CommGroup.make("partition", topo.partition_group, pgs.partition, nodes, rank)
        if topo.hierarchical:
            intra = CommGroup.make("intra_node", topo.intra_node_group_of(rank), pgs.intra_node, nodes, rank)
            inter = CommGroup.make("inter_node", topo.inter_node_group_of(rank), pgs.inter_node, nodes, rank)
        numel = args.bytes // 4
        output = torch.empty(numel, dtype=torch.float32)
        shard = torch.full((numel // world,), float(rank), dtype=torch.float32)

        def gather() -> None:
            if topo.hierarchical:
                hierarchical_all_gather(output, shard, inter=inter, intra=intra, stats=None, label="emulate").wait()
            else:
                all_gather(output, shard, partition, stats=None, label="emulate").wait()

        buf = torch.ones(numel, dtype=torch.float32)
        peer = k  # first rank of node 1

        def send() -> None:
            if rank == 0:
                dist.send(buf, dst=peer)
            elif rank == peer:
                dist.recv(buf, src=0)

        ops = {"gather": gather, "send": send}

        def timed(op):
            def run() -> str:
                times = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    op()
                    times.append(time.perf_counter() - t0)
                return f"{sorted(times)[len(times) // 2]:.6f}"
            return run

        worker = PhaseWorker()
        for phase in args.phases.split(","):
            # the untimed warm-up opens connections and allocates buffers
            worker.run(phase, timed(ops[phase]), warmup=ops[phase], barrier=dist.barrier)
        if "gather" in args.phases.split(","):
            expected = sorted(set(range(world)))
            got = sorted(set(output.view(world, -1)[:, 0].long().tolist()))
            if got != expected:
                raise SystemExit(f"rank {rank}: gathered shards {got}, expected {expected}")
        close_process_group()
    finally:
        close_process_group(wait_for_peers=False)  # an error path: a peer may be gone


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mics_hf.emulation.cluster")
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker", help="internal: one rank of measure_all_gather")
    w.add_argument("--nodes", type=int, required=True)
    w.add_argument("--ranks-per-node", type=int, required=True)
    w.add_argument("--bytes", type=int, required=True)
    w.add_argument("--phases", default="gather")
    w.add_argument("--hierarchical", action="store_true")
    w.add_argument("--repeat", type=int, default=1)
    m = sub.add_parser("all-gather", help="measure one flat and one hierarchical all-gather")
    m.add_argument("--nodes", type=int, default=2)
    m.add_argument("--ranks-per-node", type=int, default=2)
    m.add_argument("--megabytes", type=float, default=16)
    m.add_argument("--rate-mbit", type=float, default=200)
    args = parser.parse_args(argv)
    if args.cmd == "worker":
        _worker(args)
        return
    import json

    for hier in (False, True):
        r = measure_all_gather(args.nodes, args.ranks_per_node, args.megabytes, args.rate_mbit, hier,
                               calibrate=not hier)
        print(json.dumps(r))


if __name__ == "__main__":
    main()
