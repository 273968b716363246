"""The emulated cluster (network namespaces + tbf-shaped veths) and the bytes all-gathers really put on the links.

Needs root and iproute2 with working `ip netns`; skipped with the reason otherwise.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from mics_hf.emulation.cluster import EmulatedCluster, EmulationUnavailable, measure_all_gather

pytestmark = pytest.mark.slow


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def emulation():
    """Skip (printing why) unless this machine can create namespaces, veths, a bridge and tbf qdiscs."""
    if shutil.which("ip") is None:
        reason = "cluster emulation needs iproute2: `ip` not found"
    else:
        try:
            with EmulatedCluster(1, 100):
                pass
            reason = None
        except EmulationUnavailable as exc:
            reason = f"cluster emulation unavailable: {exc}"
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    before = _netns()
    yield
    assert _netns() == before, "namespaces were left behind"


def test_cluster_creates_and_removes_everything(emulation):
    before = _netns()
    with EmulatedCluster(2, 400) as cluster:
        names = cluster.namespaces()
        assert len(names) == 3 and all(str(__import__("os").getpid()) in n for n in names)
        assert set(names) <= _netns()
        assert cluster.address(1) == "10.77.0.2"
        # node 0 reaches node 1 over the bridge; the bytes show up on both eth0 counters
        tx0, rx1 = cluster.tx_bytes(0), cluster.rx_bytes(1)
        ping = cluster.run(0, ["ping", "-c", "1", "-W", "2", "10.77.0.2"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL) if shutil.which("ping") else None
        if ping is not None:
            assert ping.wait(timeout=10) == 0
            assert cluster.tx_bytes(0) > tx0 and cluster.rx_bytes(1) > rx1
        tc = subprocess.run(["ip", "netns", "exec", names[1], "tc", "qdisc", "show", "dev", "eth0"],
                            capture_output=True, text=True).stdout
        assert "tbf" in tc and "400Mbit" in tc
    assert _netns() == before
    cluster.close()  # idempotent
    with pytest.raises(RuntimeError):
        cluster.tx_bytes(0)

    with pytest.raises(ZeroDivisionError):
        with EmulatedCluster(2, 400) as cluster:
            assert set(cluster.namespaces()) <= _netns()
            1 / 0
    assert _netns() == before


def test_hierarchical_all_gather_moves_fewer_inter_node_bytes(emulation):
    nodes, k = 2, 2
    p = nodes * k
    # A dropped packet is retransmitted and counted again on the link, so bytes can only be inflated by
    # retransmissions: take the least of a few runs of each (the same estimator for flat and hierarchical).
    flat = min((measure_all_gather(nodes, k, megabytes=16, rate_mbit=800, hierarchical=False, calibrate=True)
                for _ in range(2)), key=lambda r: sum(r["tx_bytes_per_node"]))
    hier = min((measure_all_gather(nodes, k, megabytes=16, rate_mbit=800, hierarchical=True) for _ in range(3)),
               key=lambda r: sum(r["tx_bytes_per_node"]))
    payload = flat["payload_bytes"]
    overhead = flat["send_overhead"]
    ratio = sum(hier["tx_bytes_per_node"]) / sum(flat["tx_bytes_per_node"])
    print(
        f"\npayload {payload} B; per-node eth0 tx / payload: flat {flat['tx_fraction_per_node']} "
        f"(ideal {(p - 1) / p:.3f}), hierarchical {hier['tx_fraction_per_node']} (ideal {(p - k) / p:.3f}); "
        f"TCP/IP overhead of a plain send {overhead:.4f}; flat / overhead "
        f"{[f / overhead for f in flat['tx_fraction_per_node']]}, hierarchical / overhead "
        f"{[f / overhead for f in hier['tx_fraction_per_node']]}; hierarchical/flat {ratio:.4f} "
        f"(ideal {(p - k) / (p - 1):.4f}); seconds flat {flat['seconds']:.3f} hierarchical {hier['seconds']:.3f}"
    )
    assert ratio == pytest.approx((p - k) / (p - 1), rel=0.05)
    # per node, after removing the TCP/IP framing measured on a plain send of the same size
    for sent in flat["tx_bytes_per_node"]:
        assert sent / overhead == pytest.approx((p - 1) / p * payload, rel=0.10)
    for sent in hier["tx_bytes_per_node"]:
        assert sent / overhead == pytest.approx((p - k) / p * payload, rel=0.10)
    assert 1.0 < overhead < 1.10


def test_training_runs_on_the_emulated_cluster_put_the_booked_bytes_on_the_wire(emulation):
    """MiCS (p = k) and ZeRO-3 (p = world) train the same model to the same loss on 2 emulated nodes, and each
    node's link carries what the engine's ring-model accounting books for the ranks of that node (gloo's
    reduce-scatter at twice the ring volume), plus TCP/IP framing."""
    from mics_hf.emulation.scale import FRAME_EFFICIENCY, GLOO_REDUCE_SCATTER_VOLUME, EmulationScale
    from mics_hf.emulation.sweep import run_config

    scale = EmulationScale(hidden=64, layers=2, heads=2, link_mbit=400, grad_accum=2, micro_batch=1)
    runs = {}
    with EmulatedCluster(2, scale.link_mbit) as cluster:
        for i, (strategy, p) in enumerate((("mics", 2), ("zero3", 4))):
            runs[strategy] = run_config(cluster, scale, 2, strategy, p, warmup=1, steps=1, timeout=240,
                                        port=29700 + i)
    assert runs["mics"]["loss"] == pytest.approx(runs["zero3"]["loss"], rel=1e-4)
    factor = {"all_gather": 1.0, "reduce_scatter": GLOO_REDUCE_SCATTER_VOLUME, "all_reduce": 1.0}
    for strategy, run in runs.items():
        booked_ops = set()
        for node in range(2):
            booked = 0.0
            for rank in (2 * node, 2 * node + 1):
                for key, nbytes in run["booked_bytes_per_step"][rank].items():
                    op, link = key.split("/")
                    if link == "inter_node":
                        booked += factor[op] * nbytes
                        booked_ops.add(op)
            wire = run["link_tx_bytes_per_node_per_step"][node]
            assert booked > 0
            assert wire == pytest.approx(booked / FRAME_EFFICIENCY, rel=0.10), (strategy, node, wire, booked)
        # MiCS with one node per partition crosses the links only for hop 2; ZeRO-3 never runs hop 2
        assert booked_ops == ({"all_reduce"} if strategy == "mics" else {"all_gather", "reduce_scatter"})
