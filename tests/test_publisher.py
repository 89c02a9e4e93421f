"""The artifact plane with real processes: publishers serve outboxes, a separate client process fetches.

The pytest process never imports py-libp2p (hivemind may live here): publishers are started with
``peer.net.publisher.start_publisher`` (a subprocess) and the client side runs ``python tests/test_publisher.py
client ARGS_JSON``, which prints one JSON line of results that the tests check.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN = "run-pub"
ALICE_URI, BOB_URI = "//Alice", "//Bob"


# ---------------------------------------------------------------------------------------------------
# outbox fixtures (pytest process: torch + records only)


def _blob(n: int, seed: int) -> bytes:
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(seed)
    return save({"w": torch.randn(n, generator=g)})


def _contribution(
    kp,
    peer_id: str,
    round_: int,
    blob: bytes,
    *,
    run_id: str = RUN,
    hotkey: str | None = None,
    name="contribution.safetensors",
):
    from peer.net.records import BlobRef, ContributionManifest

    fields = dict(
        run_id=run_id, round=round_, hotkey=hotkey or kp.ss58_address, peer_id=peer_id,
        base_state_hash="0" * 64, data_fingerprint="1" * 64, model_config_name="debug", pages=[1, 2],
        samples=4, tokens=128, inner_steps=2, loss_before=3.0, loss_after=2.5,
    )  # fmt: skip
    ref = dict(name=name, sha256=hashlib.sha256(blob).hexdigest(), size=len(blob))
    if name != "contribution.safetensors":  # bypass validation to forge a traversal name
        m = ContributionManifest.model_construct(
            **fields, blob=BlobRef.model_construct(**ref), signature=None
        )
        body = json.loads(json.dumps(m.model_dump(mode="json")))
        body["signature"] = "0x" + kp.sign(m.signing_payload()).hex()
        return body
    m = ContributionManifest(**fields, blob=BlobRef(**ref))
    if hotkey is not None and hotkey != kp.ss58_address:  # claims another hotkey, signed by kp
        return json.loads(
            m.model_copy(update={"signature": "0x" + kp.sign(m.signing_payload()).hex()}).model_dump_json()
        )
    return json.loads(m.signed(kp).model_dump_json())


def _state(kp, peer_id: str, round_: int, blob: bytes):
    from peer.net.records import BlobRef, StateManifest

    m = StateManifest(
        run_id=RUN, round=round_, hotkey=kp.ss58_address, peer_id=peer_id, state_hash="2" * 64,
        model_config_name="debug", blob=BlobRef(name="state.safetensors", sha256=hashlib.sha256(blob).hexdigest(), size=len(blob)),
    )  # fmt: skip
    return json.loads(m.signed(kp).model_dump_json())


def build_outbox(home: Path) -> tuple[Path, Path, str, dict]:
    """Alice's outbox with a good round 3 and one forged round per attack. Returns (outbox, key, peer id, rounds)."""
    from substrateinterface import Keypair

    from peer.net.identity import load_or_create_identity
    from peer.net.outbox import Outbox

    key = home / "identity.key"
    pid = load_or_create_identity(key)
    alice, bob = Keypair.create_from_uri(ALICE_URI), Keypair.create_from_uri(BOB_URI)
    ob = Outbox(home / "outbox")
    good, state = _blob(4000, 1), _blob(2000, 2)
    ob.write_contribution(3, good, _contribution(alice, pid, 3, good))
    ob.write_state(3, state, _state(alice, pid, 3, state))
    rounds = {"good": 3}
    forged = {
        "other_hotkey": (5, _contribution(bob, pid, 5, good)),  # bob's own manifest
        "forged_signature": (6, _contribution(bob, pid, 6, good, hotkey=alice.ss58_address)),  # claims alice
        "replay_round": (7, _contribution(alice, pid, 3, good)),  # alice's round-3 manifest in round 7
        "replay_run": (8, _contribution(alice, pid, 8, good, run_id="another-run")),
        "hash_mismatch": (9, _contribution(alice, pid, 9, _blob(4000, 9))),
        "traversal": (10, _contribution(alice, pid, 10, good, name="../../../../etc/passwd")),
        "not_safetensors": (11, None),
    }
    for case, (r, manifest) in forged.items():
        rounds[case] = r
        blob = good
        if case == "hash_mismatch":  # the manifest names the blob; the file on disk is altered after
            blob = bytearray(_blob(4000, 9))
            blob[-1] ^= 0xFF
            blob = bytes(blob)
        if case == "not_safetensors":
            blob = b"\x80\x04not a safetensors file, a pickle" * 10
            manifest = _contribution(alice, pid, r, blob)
        ob.write_contribution(r, blob, manifest)
    return ob.root, key, pid, rounds


@pytest.fixture
def publishers(tmp_path):
    """Alice's publisher (A) and a second, strictly rate-limited one (B) run by Bob."""
    from substrateinterface import Keypair

    from peer.net.identity import load_or_create_identity
    from peer.net.publisher import PublisherConfig, start_publisher

    outbox, key, _, rounds = build_outbox(tmp_path / "alice")
    bob_key = tmp_path / "bob" / "identity.key"
    load_or_create_identity(bob_key)
    handles = []
    try:
        a = start_publisher(outbox, key, cfg=PublisherConfig(chunk_bytes=1024))
        handles.append(a)
        b = start_publisher(
            tmp_path / "bob" / "outbox", bob_key, cfg=PublisherConfig(burst=2, requests_per_second=0.2)
        )
        handles.append(b)
        a.publish_identity(Keypair.create_from_uri(ALICE_URI), run_id=RUN, round_=3)
        b.publish_identity(Keypair.create_from_uri(BOB_URI), run_id=RUN, round_=3)
        yield a, b, rounds
    finally:
        for h in handles:
            h.stop()


def run_client(args: dict, timeout: float = 90) -> dict:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "client", json.dumps(args)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------
# tests


@pytest.mark.slow
def test_fetch_verifies_and_rejects_forgeries(publishers, tmp_path):
    a, b, rounds = publishers
    out = run_client(
        {
            "a": {"addr": a.addrs[0], "peer_id": a.peer_id},
            "b": {"addr": b.addrs[0], "peer_id": b.peer_id},
            "rounds": rounds,
            "cache": str(tmp_path / "cache"),
        }
    )
    # the honest round arrives verified, as safetensors, byte-identical to the outbox
    good = out["good"]
    assert (
        good["contribution"]["sha256"]
        == hashlib.sha256((a.outbox / "rounds/3/contribution.safetensors").read_bytes()).hexdigest()
    )
    assert good["state"]["size"] == (a.outbox / "state/3/state.safetensors").stat().st_size
    assert good["tensors"] == ["w"]
    assert good["refetch_cached"] is True
    # each forgery is refused with its reason, and nothing unverified is left in the cache
    expected = {
        "other_hotkey": "wrong_hotkey",
        "forged_signature": "bad_signature",
        "replay_round": "wrong_round",
        "replay_run": "wrong_run",
        "hash_mismatch": "hash_mismatch",
        "traversal": "missing",  # the publisher itself refuses to serve a manifest naming ../
        "traversal_client_side": "bad_manifest",  # and a client refuses such a manifest from anyone
        "not_safetensors": "not_safetensors",
        "peer_id_mismatch": "peer_id_mismatch",
        "identity_of_other_hotkey": "wrong_hotkey",
        "evil_oversized_frame": "oversized_frame",
        "evil_truncated_frame": "truncated_frame",
        "evil_overlong_blob": "oversized",
        "rate_limited": "refused_rate_limited",
    }
    for case, reason in expected.items():
        assert out["cases"][case]["reason"] == reason, (case, out["cases"][case])
        assert out["cases"][case]["message"], case
    assert out["rejections"].get("hash_mismatch") == 1
    assert sorted(p for p in os.listdir(tmp_path / "cache")) == sorted(
        f"{good[k]['sha256']}.safetensors" for k in ("contribution", "state")
    )
    # raw protocol abuse toward the publisher: refused with a reason, publisher keeps serving
    assert out["raw"]["oversized_request"]["reason"] == "oversized_frame"
    assert out["raw"]["garbage_request"]["reason"] == "bad_message"
    assert out["raw"]["unknown_op"]["reason"] == "bad_request"
    assert out["raw"]["fetch_unlisted_hash"]["reason"] == "not_found"
    stats = out["stats_after"]
    for counter in (
        "refused_oversized_frame",
        "refused_truncated_frame",
        "refused_bad_message",
        "refused_bad_request",
        "outbox_bad_manifest",
    ):
        assert stats.get(counter, 0) >= 1, (counter, stats)
    assert out["good_after_abuse"] is True
    assert a.alive() and b.alive()

    # the human command: verified files, or one line and exit code 2
    alice = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
    cmd = [
        sys.executable,
        "-m",
        "peer.net.fetch_cli",
        "--from",
        a.multiaddrs[0],
        "--run-id",
        RUN,
        "--out",
        str(tmp_path / "cli"),
    ]
    ok = subprocess.run(
        [*cmd, "--hotkey", alice, "--round", "3", "--state", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    res = json.loads(ok.stdout)
    assert res["contribution"]["sha256"] == good["contribution"]["sha256"] and 3 in res["rounds"]
    bad = subprocess.run(
        [*cmd, "--hotkey", "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty", "--round", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert bad.stderr.startswith("peer fetch: error:") and "hotkey" in bad.stderr


@pytest.mark.slow
def test_the_inbound_cap_counts_an_ipv4_address_or_an_ipv6_64():
    from peer.net.admission import address_key

    assert address_key("203.0.113.5") == "203.0.113.5"
    assert address_key("::ffff:203.0.113.5") == "203.0.113.5"  # an IPv4 peer on a dual-stack socket
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("fe80::1%eth0") == "fe80::1"  # link-local: every host on a link shares a /64
    assert address_key("not-an-ip") is None


@pytest.mark.slow
def test_one_address_cannot_hold_every_inbound_slot_of_a_publisher(tmp_path):
    """Red team: py-libp2p gives 250 inbound slots, taken when TCP connects (before the handshake), with
    no limit per address: 260 sockets that never sent a byte took a publisher offline (an honest listing
    failed with dial_failed in 0.7 s). Now one address holds at most 16 live inbound connections (peer.net
    .admission); the rest are closed at once, and the honest validator (127.0.0.1, exempt) is served."""
    import socket

    from substrateinterface import Keypair

    from peer.net.admission import MAX_INBOUND_PER_ADDRESS
    from peer.net.publisher import start_publisher

    outbox, key, pid, rounds = build_outbox(tmp_path / "alice")
    pub = start_publisher(outbox, key)
    socks = []
    try:
        pub.publish_identity(Keypair.create_from_uri(ALICE_URI), run_id=RUN, round_=3)
        addr = pub.multiaddrs[0].split("/p2p/")[0]
        port = int(addr.rsplit("/", 1)[1])
        for _ in range(300):  # another loopback address: the attacker, subject to the cap
            socks.append(socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0)))
        time.sleep(2.0)
        closed = 0
        for sk in socks:
            sk.settimeout(0.05)
            try:
                closed += sk.recv(1) == b""
            except (TimeoutError, ConnectionResetError):
                closed += isinstance(sys.exc_info()[1], ConnectionResetError)
        assert closed >= 300 - MAX_INBOUND_PER_ADDRESS, closed
        code = (
            "import json, sys, tempfile; from peer.net.fetch import FetchClient, FetchConfig, FetchError\n"
            f"c = FetchClient(FetchConfig(cache_dir=tempfile.mkdtemp(), run_id={RUN!r})); c.start()\n"
            f"try: print(json.dumps(list(c.list_round({addr!r}, {pid!r}, 3, "
            f"hotkey={Keypair.create_from_uri(ALICE_URI).ss58_address!r}).rounds)))\n"
            "except FetchError as e: print(json.dumps(e.reason))\n"
            "finally: c.close()\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=90
        )
        assert out.returncode == 0, out.stderr[-3000:]
        listed = json.loads(out.stdout.strip().splitlines()[-1])
        assert isinstance(listed, list) and rounds["good"] in listed, listed  # not "dial_failed"
    finally:
        for sk in socks:
            sk.close()
        pub.stop()


def test_publisher_exits_when_parent_is_killed(tmp_path):
    from peer.net.identity import load_or_create_identity

    key = tmp_path / "identity.key"
    load_or_create_identity(key)
    (tmp_path / "outbox").mkdir()
    code = (
        "import sys, time; from pathlib import Path; from peer.net.publisher import start_publisher; "
        f"h = start_publisher(Path({str(tmp_path / 'outbox')!r}), Path({str(key)!r})); "
        "print(h.process.pid, flush=True); time.sleep(120)"
    )
    trainer = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        pub_pid = int(trainer.stdout.readline())
        os.kill(pub_pid, 0)  # running
        trainer.kill()  # SIGKILL: no chance to clean up
        trainer.wait()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5 and _alive(pub_pid):
            time.sleep(0.1)
        assert not _alive(pub_pid), "publisher outlived its parent"
        assert time.monotonic() - t0 < 5
    finally:
        try:
            os.killpg(trainer.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by init) counts as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_publisher_start_failure_is_one_line(tmp_path):
    from peer.errors import UserError
    from peer.net.identity import load_or_create_identity
    from peer.net.publisher import start_publisher

    key = tmp_path / "identity.key"
    load_or_create_identity(key)
    with pytest.raises(UserError, match="not a multiaddr"):
        start_publisher(tmp_path / "outbox", key, listen="/nonsense/1", timeout=20)


# ---------------------------------------------------------------------------------------------------
# the client process


def client_main(args: dict) -> dict:
    import logging

    from safetensors import safe_open
    from substrateinterface import Keypair

    from peer.net.artifact_protocol import encode_frame, read_frame, unpack_map
    from peer.net.fetch import FetchClient, FetchConfig, FetchError, Target, verify_manifest
    from peer.net.records import ContributionManifest

    logging.disable(logging.WARNING)
    alice, bob = Keypair.create_from_uri(ALICE_URI), Keypair.create_from_uri(BOB_URI)
    A = Target(addr=args["a"]["addr"], peer_id=args["a"]["peer_id"], hotkey=alice.ss58_address)
    B = Target(addr=args["b"]["addr"], peer_id=args["b"]["peer_id"], hotkey=bob.ss58_address)
    rounds = args["rounds"]
    out: dict = {"cases": {}, "raw": {}}

    def refused(case: str, fn) -> None:
        try:
            fn()
            out["cases"][case] = {"reason": "accepted", "message": ""}
        except FetchError as e:
            out["cases"][case] = {"reason": e.reason, "message": str(e)}

    client = FetchClient(FetchConfig(cache_dir=Path(args["cache"]), run_id=RUN, max_chunk_bytes=1 << 20))
    with client:
        c = client.fetch(A, rounds["good"], "contribution")
        s = client.fetch(A, rounds["good"], "state")
        with safe_open(str(c.path), "pt") as f:
            tensors = sorted(f.keys())
        again = client.fetch(A, rounds["good"], "contribution")
        out["good"] = {
            "contribution": {"sha256": c.sha256, "size": c.size},
            "state": {"sha256": s.sha256, "size": s.size},
            "tensors": tensors,
            "refetch_cached": again.path == c.path,
        }
        for case in (
            "other_hotkey",
            "forged_signature",
            "replay_round",
            "replay_run",
            "hash_mismatch",
            "traversal",
            "not_safetensors",
        ):
            refused(case, lambda r=rounds[case]: client.fetch(A, r, "contribution"))
        # a traversal manifest handed straight to the client (as an evil publisher would)
        forged = build_traversal_manifest(alice, A.peer_id)
        refused(
            "traversal_client_side",
            lambda: verify_manifest(
                forged,
                ContributionManifest,
                hotkey=alice.ss58_address,
                peer_id=A.peer_id,
                run_id=RUN,
                round_=10,
                max_blob_bytes=1 << 30,
            ),
        )
        # commitment says "peer B at A's address": noise proves otherwise
        refused(
            "peer_id_mismatch",
            lambda: client.fetch(Target(addr=A.addr, peer_id=B.peer_id, hotkey=bob.ss58_address), 3),
        )
        # B's identity record is signed by bob: asking for it as alice's fails
        refused(
            "identity_of_other_hotkey",
            lambda: client.list_round(B.addr, B.peer_id, 3, hotkey=alice.ss58_address),
        )

        # B allows a burst of 2 requests, then refuses
        def hammer():
            for _ in range(6):
                client.stats(B.addr, B.peer_id)

        refused("rate_limited", hammer)

        # an evil publisher (a real py-libp2p host in a thread) sending bad frames
        evil = EvilPublisher(alice)
        evil.start()
        E = Target(addr=evil.addr, peer_id=evil.peer_id, hotkey=alice.ss58_address)
        for case, r in (("evil_oversized_frame", 1), ("evil_truncated_frame", 2), ("evil_overlong_blob", 3)):
            refused(case, lambda r=r: client.fetch(E, r, "contribution"))
        evil.stop()

        # raw protocol abuse toward A
        async def raw(payload: bytes, close_early: bool = False) -> dict:
            stream = await client._open(A)
            await stream.write(payload)
            if close_early:
                await stream.close()
                return {"reason": "sent"}
            frame = await read_frame(stream, 1 << 20, what="answer")
            return unpack_map(frame, what="answer")

        call = lambda *a: client._call(raw, *a)  # noqa: E731
        out["raw"]["oversized_request"] = call((1 << 30).to_bytes(4, "big"))
        call(b"\x00\x00", True)  # truncated header, then gone
        out["raw"]["garbage_request"] = call(encode_frame(b"\xc1\xc1\xc1"))
        out["raw"]["unknown_op"] = call(
            encode_frame(__import__("msgpack").packb({"op": "delete", "path": "/etc/passwd"}))
        )
        out["raw"]["fetch_unlisted_hash"] = call(
            encode_frame(__import__("msgpack").packb({"op": "fetch", "sha256": "a" * 64}))
        )
        time.sleep(0.3)
        out["stats_after"] = client.stats(A.addr, A.peer_id)
        out["good_after_abuse"] = (
            client.list_round(A.addr, A.peer_id, rounds["good"], hotkey=alice.ss58_address).contribution
            is not None
        )
    out["rejections"] = dict(client.rejections)
    return out


def build_traversal_manifest(kp, peer_id: str) -> str:
    return json.dumps(_contribution(kp, peer_id, 10, b"x" * 100, name="../../../../etc/passwd"))


class EvilPublisher:
    """A real py-libp2p host that lists honest-looking signed manifests but sends broken blob frames."""

    def __init__(self, kp):
        self.kp = kp
        self._ready = __import__("threading").Event()

    def start(self) -> None:
        import threading

        self._thread = threading.Thread(target=lambda: __import__("trio").run(self._main), daemon=True)
        self._thread.start()
        self._ready.wait(20)

    def stop(self) -> None:
        import trio

        trio.from_thread.run_sync(self._done.set, trio_token=self._token)
        self._thread.join(10)

    async def _main(self) -> None:
        import multiaddr
        import trio
        from libp2p.crypto.ed25519 import create_new_key_pair

        from peer.net.artifact_protocol import (
            FetchHeader,
            ListResponse,
            encode_frame,
            pack,
            read_frame,
            unpack_map,
        )
        from peer.net.publisher import make_host
        from peer.net.records import PeerIdentityRecord

        host = make_host(create_new_key_pair(), [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")])
        self.peer_id = host.get_id().to_base58()
        blob = b"y" * 5000
        manifests = {r: json.dumps(_contribution(self.kp, self.peer_id, r, blob)) for r in (1, 2, 3)}
        by_hash = {hashlib.sha256(blob).hexdigest(): blob}
        current = {"round": None}
        identity = PeerIdentityRecord(
            run_id=RUN,
            round=0,
            hotkey=self.kp.ss58_address,
            peer_id=self.peer_id,
            addrs=["/ip4/127.0.0.1/tcp/1"],
        ).signed(self.kp)

        async def handle(stream):
            req = unpack_map(await read_frame(stream, 4096, what="req"), what="req")
            if req["op"] == "list":
                current["round"] = req["round"]
                await stream.write(
                    pack(
                        ListResponse(
                            peer_id=self.peer_id,
                            identity=identity.model_dump_json(),
                            rounds=[1, 2, 3],
                            contribution=manifests.get(req["round"]),
                        )
                    )
                )
                await stream.close()
                return
            data = by_hash[req["sha256"]]
            await stream.write(pack(FetchHeader(size=len(data), chunk_bytes=1024)))
            mode = current["round"]
            if mode == 1:
                await stream.write((1 << 31).to_bytes(4, "big") + data[:100])
            elif mode == 2:
                await stream.write(encode_frame(data[:1000])[:500])
            else:
                await stream.write(encode_frame(data) + encode_frame(b"extra"))
            await stream.close()

        from libp2p.custom_types import TProtocol

        host.set_stream_handler(TProtocol("/gradswarm/artifact/1.0.0"), handle)
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            self.addr = str(host.get_addrs()[0]).split("/p2p/")[0]
            self._token = trio.lowlevel.current_trio_token()
            self._done = trio.Event()
            self._ready.set()
            await self._done.wait()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "client":
    sys.path.insert(0, str(REPO))
    print(json.dumps(client_main(json.loads(sys.argv[2]))))
