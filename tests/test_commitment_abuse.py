"""Commitments a validator cannot trust: one that names another peer's peer id, one that names any address.

* A uid committing a victim's peer id at a tarpit (accepts TCP, never answers): py-libp2p's ``dial_peer``
  makes a dial wait for any dial in flight to the same peer id, so whenever the tarpit's dial went first
  the victim's own listing waited on it until the connect timeout and the round's listing deadline
  (15 s each by default) and the victim scored 0 — reproduced: 15.0 s, ``round_deadline``, whenever the
  attacker's dial started first. The fetch client now dials each committed address on its own.
* A commitment naming an address on the validator's own network: the OS error of the dial (``connection
  refused`` …) went into the reason the validator publishes in its signed explanation. Now the public
  reason carries only the code; the line stays in the validator's log and record.

The pytest process never imports py-libp2p (hivemind may live here): the real hosts run in a subprocess
(``python tests/test_commitment_abuse.py``), which prints one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TARPIT_S = 4.0
"""Connect timeout and listing deadline of the subprocess's client (the validator's are 15 s and 15 s)."""


# ---------------------------------------------------------------------------------------------------
# pure rules


@pytest.mark.parametrize(
    "uid, peer_ids, listed, owner",
    [
        (2, {1: "P", 2: "P"}, {1}, 1),  # uid 2 commits uid 1's peer id, and uid 1's listing verified
        (1, {1: "P", 2: "P"}, {2}, 2),  # whichever uid it is: the listing decides, not the uid order
        (2, {1: "P", 2: "P"}, set(), None),  # nobody proved it holds P: no verdict
        (2, {1: "P", 2: "P"}, {2}, None),  # its own listing verified: it is the owner
        (2, {1: "P", 2: "Q"}, {1}, None),  # different peer ids
        (3, {1: "P", 2: "P", 3: "P"}, {2}, 2),  # two copiers of uid 2's
        (3, {1: "Q", 3: "P"}, {1}, None),
        (9, {1: "P"}, {1}, None),  # not reachable (no commitment): nothing to say
    ],
)
def test_a_uid_committing_a_listed_uids_peer_id_is_named(uid, peer_ids, listed, owner):
    from validator.fetching import shares_peer_id_with

    assert shares_peer_id_with(uid, peer_ids, listed) == owner


LAN_DETAIL = "cannot reach /ip4/10.0.0.5/tcp/22/p2p/QmVictim: [Errno 111] Connection refused"


@pytest.mark.parametrize(
    "reason, message, public, detail",
    [
        ("dial_failed", LAN_DETAIL, "fetch: dial_failed", f"dial_failed: {LAN_DETAIL}"),
        ("timeout", "/ip4/10.0.0.5/tcp/22: no connection within 15s", "fetch: timeout", "timeout: /ip4/"),
        ("stream_error", "QmVictim: listing: Connection reset", "fetch: stream_error", "stream_error: Qm"),
        ("peer_id_mismatch", "the peer listening at /ip4/10.0.0.5/tcp/4001 is not Qm", "fetch: peer_id_mismatch",
         "peer_id_mismatch: the peer"),
        ("disk_error", "cannot write the blob to the cache: [Errno 28] /var/lib/x", "fetch: disk_error", "disk_"),
        # what the peer itself served is explained in full: it says nothing of the validator's network
        ("wrong_hotkey", "identity record is for hotkey 5A, expected 5B", "fetch: identity record is for hotkey "
         "5A, expected 5B", None),
        ("too_slow", "Qm: blob got 1 of 9 bytes in 10s", "fetch: Qm: blob got 1 of 9 bytes in 10s", None),
    ],
)  # fmt: skip
def test_transport_failures_are_published_as_their_code_only(reason, message, public, detail):
    from peer.net.fetch import FetchError
    from validator.fetching import fetch_detail, public_reason

    e = FetchError(reason, message)
    assert public_reason(e) == public
    got = fetch_detail(e)
    assert got == detail if detail is None else got.startswith(detail)


def test_a_listing_that_could_not_dial_records_the_detail_locally_only():
    from peer.net.explanations import build_explanation
    from peer.net.fetch import FetchError
    from validator.loop import _listing_problem
    from validator.store import CandidateRecord

    rec = CandidateRecord(uid=4, hotkey="5" + "F" * 47)
    got = FetchError("dial_failed", LAN_DETAIL)
    reason = _listing_problem(got, rec, 3, run=None, base_hash="0" * 64, fp="1" * 64, max_bytes=1)
    assert reason == "fetch: dial_failed"  # was "fetch: cannot reach /ip4/10.0.0.5/tcp/22/…: … refused"
    assert "10.0.0.5" in rec.fetch_detail and "refused" in rec.fetch_detail  # the operator still sees it
    record = {
        "run_id": "r", "round": 3, "netuid": 1, "weights": {"shares": {}},
        "scores": [{"uid": 4, "hotkey": rec.hotkey, "score": 0.0, "reason": f"not evaluated: {reason}",
                    "terms": {"status": "rejected"}}],
    }  # fmt: skip
    published = build_explanation(record, hotkey="5" + "G" * 47, peer_id="QmValidator").model_dump_json()
    assert "10.0.0.5" not in published and "refused" not in published
    assert "fetch: dial_failed" in published


# ---------------------------------------------------------------------------------------------------
# real hosts


@pytest.mark.slow
def test_a_tarpit_committing_the_victims_peer_id_does_not_stop_its_listing():
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # the attacker's dial of the tarpit was in flight first (the tarpit accepted it) ...
    assert out["tarpit"]["accepted"] >= 1, out
    # ... and the victim was listed anyway, at once (it waited for the attacker's dial: round_deadline)
    assert out["tarpit"]["V"] == "ok", out
    assert out["tarpit"]["V_s"] < 2.0, out
    assert out["tarpit"]["A"] in ("timeout", "round_deadline", "wrong_hotkey"), out
    # the validator's rule names whose peer id the attacker commits
    assert out["tarpit"]["A_owner"] == "V", out
    # the attacker copying the victim's own address reaches the victim's publisher, which names V's hotkey
    assert out["copy"] == {"A": "wrong_hotkey", "V": "ok", "A_owner": "V"}, out
    # a commitment naming a closed port: the OS error stays local, the public reason is the code
    closed = out["closed_port"]
    assert closed["reason"] == "dial_failed" and closed["public"] == "fetch: dial_failed", closed
    assert "127.0.0.1" in closed["detail"], closed


# ---------------------------------------------------------------------------------------------------
# subprocess side (py-libp2p)


def _subprocess_main() -> dict:
    import functools
    import socket
    import tempfile
    import threading
    import time

    from substrateinterface import Keypair

    from peer.net.fetch import FetchClient, FetchConfig, FetchError, Target
    from peer.net.publisher import start_publisher
    from tests.test_publisher import ALICE_URI, RUN, build_outbox
    from validator.fetching import fetch_detail, gather_bounded, public_reason, shares_peer_id_with

    tmp = Path(tempfile.mkdtemp(prefix="commitment-abuse-"))
    outbox, key, pid, _ = build_outbox(tmp / "victim")
    victim_kp = Keypair.create_from_uri(ALICE_URI)
    pub = start_publisher(outbox, key)
    tarpit = socket.socket()
    tarpit.bind(("127.0.0.1", 0))
    tarpit.listen(64)
    held: list = []

    def accept() -> None:
        while True:
            try:
                held.append(tarpit.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    closed = socket.socket()  # bound, never listening: a closed port
    closed.bind(("127.0.0.1", 0))
    try:
        pub.publish_identity(victim_kp, run_id=RUN, round_=3)
        victim = Target(addr=pub.addrs[0], peer_id=pid, hotkey=victim_kp.ss58_address)
        eve = Keypair.create_from_uri("//Eve").ss58_address
        out: dict = {}
        cfg = FetchConfig(cache_dir=tmp / "cache", run_id=RUN, connect_timeout_s=TARPIT_S)
        for case, attacker_addr in (("tarpit", f"/ip4/127.0.0.1/tcp/{tarpit.getsockname()[1]}"),
                                    ("copy", pub.addrs[0])):  # fmt: skip
            attacker = Target(addr=attacker_addr, peer_id=pid, hotkey=eve)
            with FetchClient(cfg) as client:  # a fresh client: no connection to the victim yet
                done: dict = {}

                async def timed(name, target, delay, done=done):
                    import trio

                    await trio.sleep(delay)  # the attacker's dial is in flight when the victim's starts
                    t0 = time.perf_counter()
                    try:
                        return await client.alist_round(target, 3)
                    finally:
                        done[name] = time.perf_counter() - t0

                got = gather_bounded(
                    client,
                    {"A": functools.partial(timed, "A", attacker, 0.0),
                     "V": functools.partial(timed, "V", victim, 0.3)},
                    parallel=16, deadline_s=TARPIT_S,
                )  # fmt: skip
            row = {k: v.reason if isinstance(v, FetchError) else "ok" for k, v in got.items()}
            listed = {n for n, v in got.items() if not isinstance(v, FetchError)}
            row["A_owner"] = shares_peer_id_with("A", {"A": pid, "V": pid}, listed)
            if case == "tarpit":
                row["V_s"] = round(done.get("V", TARPIT_S), 2)
                row["accepted"] = len(held)
            out[case] = row
        with FetchClient(cfg) as client:
            addr = f"/ip4/127.0.0.1/tcp/{closed.getsockname()[1]}"
            try:
                client.list_round(addr, pid, 3, hotkey=victim_kp.ss58_address)
                out["closed_port"] = {"reason": "ok"}
            except FetchError as e:
                out["closed_port"] = {
                    "reason": e.reason,
                    "public": public_reason(e),
                    "detail": fetch_detail(e),
                }
        return out
    finally:
        pub.stop()
        tarpit.close()
        closed.close()
        for s in held:
            s.close()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    from peer.net.publisher import quiet_libp2p

    quiet_libp2p()
    print(json.dumps(_subprocess_main()))
