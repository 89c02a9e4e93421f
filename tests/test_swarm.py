"""Real peers in real processes (hivemind DHT + averagers on 127.0.0.1) training the debug model."""

from __future__ import annotations

import json
import signal
import time
import uuid

import pytest

from peer.net.outbox import CONTRIBUTION, MANIFEST, STATE, decode_delta, decode_state, file_sha256
from peer.net.records import ContributionManifest, StateManifest
from tests.fixtures_swarm import join_args, read_rounds, wait_for

ROUND_SECONDS = 6.0  # debug config


def _check_outbox_intact(home) -> int:
    """Every manifest parses, is signed, and its blob is complete with the recorded hash. Returns #manifests."""
    outbox = home / "outbox"
    count = 0
    for kind, blob_name, cls, decode in (
        ("rounds", CONTRIBUTION, ContributionManifest, decode_delta),
        ("state", STATE, StateManifest, decode_state),
    ):
        for d in sorted((outbox / kind).glob("*")) if (outbox / kind).exists() else []:
            if not (d / MANIFEST).exists():
                continue  # a round the peer did not finish: no manifest, nothing visible
            manifest = cls.parse((d / MANIFEST).read_text())
            manifest.verify()
            assert file_sha256(d / blob_name) == manifest.blob.sha256
            decode((d / blob_name).read_bytes())
            count += 1
    return count


@pytest.mark.slow
def test_swarm_trains_survives_sigkill_and_syncs_late_joiner(procs, bootstrap, debug_data, tmp_path):
    run_id = f"swarm-{uuid.uuid4().hex[:8]}"
    wallets = tmp_path / "wallets"

    def start(name: str, extra: list[str]):
        home = tmp_path / name
        args = join_args(
            home=home,
            data_dir=debug_data,
            wallet_path=wallets,
            name=name,
            run_id=run_id,
            initial_peers=[bootstrap],
            extra=extra,
        )
        return procs.start(name, args), home

    a, home_a = start("a", ["--max-rounds", "9"])
    b, home_b = start("b", ["--max-rounds", "9"])
    c, home_c = start("c", [])
    everyone = [a, b, c]
    wait_for(
        lambda: all(len(read_rounds(h)) >= 2 for h in (home_a, home_b, home_c)),
        120,
        "three peers to finish two rounds",
        everyone,
    )

    # SIGKILL c in the middle of a round's inner training
    while not 1.5 < time.time() % ROUND_SECONDS < 2.5:
        time.sleep(0.05)
    c.kill(signal.SIGKILL)
    killed_at = time.time()
    d, home_d = start("d", ["--max-rounds", "2"])  # a late joiner

    assert d.wait(timeout=90) == 0, d.log()[-3000:]
    assert a.wait(timeout=90) == 0, a.log()[-3000:]
    assert b.wait(timeout=30) == 0, b.log()[-3000:]

    rounds_a, rounds_b, rounds_d = read_rounds(home_a), read_rounds(home_b), read_rounds(home_d)
    by_round_a = {r["round"]: r for r in rounds_a}

    # after every round in which both averaged, a and b hold bit-identical parameters
    both = [
        r
        for r in rounds_b
        if r["status"] == "averaged" and by_round_a.get(r["round"], {}).get("status") == "averaged"
    ]
    assert len(both) >= 4, (rounds_a, rounds_b)
    for r in both:
        assert r["state_hash"] == by_round_a[r["round"]]["state_hash"], r["round"]
        assert r["group_size"] >= 2

    # the survivors finished every round after the kill, averaging within one timeout
    assert len(rounds_a) == 9 and len(rounds_b) == 9
    after_kill = [r for r in rounds_a if r["round"] * ROUND_SECONDS > killed_at - ROUND_SECONDS]
    assert after_kill and all(r["averaging_seconds"] < 20 for r in after_kill)

    # held-out loss went down
    assert rounds_a[-1]["heldout_loss"] < rounds_a[0]["heldout_loss"] - 0.3, [
        r["heldout_loss"] for r in rounds_a
    ]

    # the late joiner downloaded the swarm's state and then stayed identical to the others
    assert rounds_d and rounds_d[0]["synced_from_peer"], rounds_d
    shared = [
        r
        for r in rounds_d
        if r["status"] == "averaged" and by_round_a.get(r["round"], {}).get("status") == "averaged"
    ]
    assert shared, (rounds_d, rounds_a)
    for r in shared:
        assert r["state_hash"] == by_round_a[r["round"]]["state_hash"]

    # nothing torn on disk, not even in the killed peer's outbox
    for home in (home_a, home_b, home_c, home_d):
        assert _check_outbox_intact(home) > 0
        assert not list(home.rglob("*.tmp")) or home == home_c
    ckpt = json.loads((home_c / "checkpoint" / "state.json").read_text())
    assert ckpt["round"] >= 2


@pytest.mark.slow
def test_sync_mode_two_peers(procs, bootstrap, debug_data, tmp_path):
    """--averaging sync: hivemind Optimizer, per-step gradient averaging across two processes."""
    run_id = f"sync-{uuid.uuid4().hex[:8]}"
    peers = []
    for name in ("s1", "s2"):
        args = join_args(
            home=tmp_path / name,
            data_dir=debug_data,
            wallet_path=tmp_path / "w",
            name=name,
            run_id=run_id,
            initial_peers=[bootstrap],
            extra=["--averaging", "sync", "--max-rounds", "3"],
        )
        peers.append(procs.start(name, args))
    for p in peers:
        assert p.wait(timeout=120) == 0, p.log()[-3000:]
    for name in ("s1", "s2"):
        rounds = read_rounds(tmp_path / name)
        assert len(rounds) == 3
        assert rounds[-1]["loss"] < rounds[0]["loss"]
        assert rounds[-1]["epoch"] > 0
        assert _check_outbox_intact(tmp_path / name) == 3
