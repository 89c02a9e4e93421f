"""The bandwidth lab (``launch.netlab``): real peers in network namespaces behind 20 Mbit/s links.

Needs root and iproute2 (``ip netns``, veth, bridge, ``tc tbf``); skips with the reason otherwise.
"""

from __future__ import annotations

import json
import sys
import time
import uuid

import pytest

from launch.netlab import NetLab, lab_unavailable, list_namespaces
from tests.fixtures_swarm import join_args, read_rounds, wait_for

pytestmark = pytest.mark.wan

RATE_MBIT = 20.0
PEERS = ["peer-0", "peer-1", "peer-2"]


@pytest.fixture
def lab_ok() -> None:
    reason = lab_unavailable()
    if reason:
        pytest.skip(reason)


def test_lab_caps_bandwidth_and_cleans_up(lab_ok):
    with NetLab(["a", "b", "c"], rate_mbit={"a": RATE_MBIT, "b": None, "c": None}) as lab:
        names = set(lab.ns.values()) | {lab.hub}
        assert names <= set(list_namespaces())
        capped_up = lab.measure_mbit("a", "b", seconds=2.0)
        capped_down = lab.measure_mbit("c", "a", seconds=2.0)
        free = lab.measure_mbit("b", "c", seconds=1.0)
    assert 0.8 * RATE_MBIT < capped_up <= 1.05 * RATE_MBIT, capped_up
    assert 0.8 * RATE_MBIT < capped_down <= 1.05 * RATE_MBIT, capped_down
    assert free > 5 * RATE_MBIT, free  # the cap is on a's link only
    assert not names & set(list_namespaces())


def test_lab_cleans_up_on_error(lab_ok):
    with pytest.raises(RuntimeError, match="boom"), NetLab(["a"], rate_mbit=RATE_MBIT) as lab:
        names = set(lab.ns.values()) | {lab.hub}
        raise RuntimeError("boom")
    assert not names & set(list_namespaces())


def test_three_peers_under_20mbit_stay_bit_identical(lab_ok, procs, debug_data, tmp_path):
    """3 ``peer join`` processes + a bootstrap, each in its own namespace, every peer link capped at
    20 Mbit/s: 3 rounds averaged by all three with bit-identical state hashes, and the bytes went
    through the capped links."""
    run_id = f"wan-{uuid.uuid4().hex[:8]}"
    with NetLab(["bootstrap", *PEERS], rate_mbit={p: RATE_MBIT for p in PEERS}) as lab:
        ready = tmp_path / "boot.json"
        boot = procs.start(
            "bootstrap",
            lab.wrap(
                "bootstrap",
                [sys.executable, "-m", "peer.cli", "bootstrap", "--host-maddrs"]
                + [f"/ip4/{lab.addr('bootstrap')}/tcp/0", "--ready-file", str(ready)],
            ),
        )
        wait_for(ready.exists, 60, "the bootstrap in its namespace", [boot])
        boot_maddr = json.loads(ready.read_text())["maddrs"][0]
        assert lab.addr("bootstrap") in boot_maddr

        homes, peers = {}, []
        for name in PEERS:
            homes[name] = tmp_path / name
            args = join_args(
                home=homes[name],
                data_dir=debug_data,
                wallet_path=tmp_path / "wallets",
                name=name,
                run_id=run_id,
                initial_peers=[boot_maddr],
                extra=["--no-publish", "--eval-pages", "0", "--max-rounds", "6"],
            )
            args = [a.replace("/ip4/127.0.0.1/", f"/ip4/{lab.addr(name)}/") for a in args]
            peers.append(procs.start(name, lab.wrap(name, args)))

        def identical_rounds() -> list[int]:
            by_peer = [{r["round"]: r for r in read_rounds(homes[p])} for p in PEERS]
            common = set(by_peer[0]).intersection(*by_peer[1:])
            return sorted(
                r
                for r in common
                if all(b[r]["status"] == "averaged" and b[r]["group_size"] == 3 for b in by_peer)
                and len({b[r]["state_hash"] for b in by_peer}) == 1
            )

        t0 = time.time()
        wait_for(lambda: len(identical_rounds()) >= 3, 150, "3 rounds averaged by all three peers", peers)
        elapsed = time.time() - t0

        # every averaged round that all three finished is bit-identical across them
        by_peer = [{r["round"]: r for r in read_rounds(homes[p])} for p in PEERS]
        for r in set(by_peer[0]).intersection(*by_peer[1:]):
            if all(b[r]["status"] == "averaged" for b in by_peer):
                assert len({b[r]["state_hash"] for b in by_peer}) == 1, (r, [b[r] for b in by_peer])
        # the all-reduce went over the capped links (egress of each peer's veth)
        for name in PEERS:
            sent = sum(r["bytes_sent"] for r in by_peer[PEERS.index(name)].values())
            assert sent > 0
            stats = lab.qdisc_stats(name)
            assert "tbf" in stats and "Sent" in stats, stats
            qdisc_bytes = int(stats.split("Sent", 1)[1].split()[0])
            assert qdisc_bytes >= sent, (name, qdisc_bytes, sent)
        for p in peers:
            p.stop()
        names = set(lab.ns.values()) | {lab.hub}
    assert not names & set(list_namespaces())
    print(f"3 identical averaged rounds under {RATE_MBIT} Mbit/s after {elapsed:.0f}s of peers running")


def test_unavailable_lab_says_why_in_one_line(monkeypatch):
    import launch.netlab as netlab

    monkeypatch.setattr(netlab.os, "geteuid", lambda: 1000)
    assert netlab.lab_unavailable() == "the bandwidth lab needs root (ip netns, veth, tc): run as root"
    monkeypatch.setattr(netlab.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netlab.shutil, "which", lambda tool: None if tool == "tc" else "/usr/sbin/ip")
    reason = netlab.lab_unavailable()
    assert "iproute2" in reason and "tc" in reason and "\n" not in reason
