"""Validators and joining peers dial only what a public subnet should reach (peer.net.dial_policy).

A commitment is chosen by any registered hotkey. On a public chain, one naming ``127.0.0.1:22`` or the
validator's LAN must not be dialled at all: the rule (a table), which chains allow private addresses
(a table), and two real paths that would otherwise connect — discovery dialling a listener on this
machine, and the validator's metagraph step.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from substrateinterface import Keypair

from peer.chain.base import SubnetParams
from peer.chain.config import ChainConfig
from peer.chain.local import LocalLedger
from peer.net.dial_policy import dial_refusal, private_allowed_for

REPO = Path(__file__).resolve().parents[1]
PID = "12D3KooWRBy97UB99e3J6hiPesre1MZeuNQvfan4gBziswrRJsNK"


@pytest.mark.parametrize(
    "maddr, public_only, private_ok",
    [
        ("/ip4/8.8.8.8/tcp/4001", None, None),
        (f"/ip4/8.8.8.8/tcp/4001/p2p/{PID}", None, None),
        ("/ip6/2001:4860::1/tcp/4001", None, None),
        ("/ip4/127.0.0.1/tcp/22", "loopback", None),
        ("/ip4/127.0.0.2/tcp/22", "loopback", None),
        ("/ip4/10.0.0.5/tcp/5432", "private", None),
        ("/ip4/192.168.1.1/tcp/80", "private", None),
        ("/ip4/172.16.0.1/tcp/80", "private", None),
        ("/ip4/169.254.169.254/tcp/80", "link-local", None),  # cloud metadata
        ("/ip4/100.64.1.1/tcp/80", "not globally routable", None),  # carrier-grade NAT
        ("/ip4/203.0.113.5/tcp/4001", "non-public", None),  # documentation range
        ("/ip6/::1/tcp/22", "loopback", None),
        ("/ip6/fd00::1/tcp/22", "private", None),
        ("/ip6/fe80::1/tcp/22", "link-local", None),
        ("/ip6/::ffff:10.0.0.1/tcp/22", "10.0.0.1", None),  # IPv4-mapped: judged as the IPv4 address
        ("/ip4/224.0.0.1/tcp/1", "multicast", "cannot be dialled"),
        ("/ip4/0.0.0.0/tcp/1", "unspecified", "cannot be dialled"),
        ("/ip6/::/tcp/1", "unspecified", "cannot be dialled"),
        ("/dns4/metadata.internal/tcp/80", "not an IP address", "not an IP address"),
        ("/dns/localhost/tcp/80", "not an IP address", "not an IP address"),
        ("/ip4/8.8.8.8/udp/4001/quic-v1", "TCP only", "TCP only"),
        ("/ip4/8.8.8.8", "TCP only", "TCP only"),
        ("/ip4/8.8.8.8/tcp/0", "port 0", "port 0"),
        ("/ip4/8.8.8.8/tcp/1/tcp/2", "TCP only", "TCP only"),
        # IPv6 addresses that stand for a private IPv4 one through a gateway or tunnel
        ("/ip6/64:ff9b::a00:5/tcp/5432", "10.0.0.5", None),  # NAT64
        ("/ip6/64:ff9b:1::a00:5/tcp/5432", "10.0.0.5", None),  # local-use NAT64
        ("/ip6/2002:a00:5::1/tcp/5432", "10.0.0.5", None),  # 6to4
        ("/ip6/::a9fe:a9fe/tcp/80", "169.254.169.254", None),  # IPv4-compatible
        ("/ip6/::ffff:0:a00:5/tcp/22", "10.0.0.5", None),  # SIIT
        ("/ip6/fec0::1/tcp/22", "site-local", None),
        ("/ip6/64:ff9b::808:808/tcp/4001", None, None),  # NAT64 of a public address: fine
        ("not a multiaddr", "not a multiaddr", "not a multiaddr"),
        ("", "not", "not"),
    ],
)
def test_dial_refusal(maddr, public_only, private_ok):
    for allow, want in ((False, public_only), (True, private_ok)):
        got = dial_refusal(maddr, allow_private=allow)
        assert (got is None) if want is None else (got is not None and want in got), (allow, got)


@pytest.mark.parametrize(
    "cfg, allowed",
    [
        (ChainConfig(), True),  # the embedded LocalLedger
        (ChainConfig(network="finney"), False),
        (ChainConfig(network="test"), False),
        # a subtensor on this machine is not a local chain: a validator's own finney node runs there
        (ChainConfig(network="local-subtensor"), False),
        (ChainConfig(chain_endpoint="ws://127.0.0.1:9944"), False),
        (ChainConfig(chain_endpoint="ws://10.1.2.3:9944"), False),
        (ChainConfig(chain_endpoint="wss://node.example.com:443"), False),
        (ChainConfig(chain_endpoint="ws://127.0.0.1:9944", dial_private="yes"), True),  # Chopsticks
        (ChainConfig(network="finney", dial_private="yes"), True),
        (ChainConfig(dial_private="no"), False),
    ],
)
def test_private_addresses_are_dialled_only_on_the_local_ledger_or_when_asked(cfg, allowed):
    assert private_allowed_for(cfg) is allowed


def test_an_unknown_choice_is_a_config_error():
    from peer.errors import ConfigError

    with pytest.raises(ConfigError, match="--dial-private"):
        ChainConfig(dial_private="maybe")


def _wait_for(cond, seconds: float) -> None:
    import time

    deadline = time.monotonic() + seconds
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.1)


class _Listener:
    """A TCP service on 127.0.0.1 that counts who connects (what a probe would reach)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@contextlib.contextmanager
def _probe_subnet(folder: Path):
    """A LocalLedger subnet where one hotkey commits a live local service and another a LAN address."""
    ledger = LocalLedger(folder / "ledger.sqlite", block_time=0.5)
    coldkey = Keypair.create_from_uri("//Bob")
    ledger.fund(coldkey.ss58_address, 10**12)
    netuid = ledger.create_subnet(Keypair.create_from_uri("//Alice"), SubnetParams(burn=0))
    service = _Listener()
    probes = {}
    for name, addr in (("loop", f"/ip4/127.0.0.1/tcp/{service.port}"), ("lan", "/ip4/10.0.0.5/tcp/5432")):
        kp = Keypair.create_from_uri(f"//{name}")
        ledger.register(netuid, kp, coldkey)
        ledger.set_commitment(netuid, kp, f"{addr}/p2p/{PID}".encode())
        probes[kp.ss58_address] = addr
    try:
        yield ledger, netuid, service, probes
    finally:
        service.close()
        ledger.close()


@pytest.fixture
def subnet_with_probes(tmp_path):
    with _probe_subnet(tmp_path) as subnet:
        yield subnet


def _in_subprocess(mode: str) -> dict:
    """Run ``mode`` of this file in a fresh process: py-libp2p cannot share the pytest process with the
    hivemind that other tests import (duplicate protobuf symbols)."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), mode],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO)},  # this file imports the repo's packages at the top
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _discovery_probe() -> dict:
    """(subprocess) Discovery with the rule on, then off, against the probe subnet."""
    import tempfile

    from peer.net.discovery import discover

    with tempfile.TemporaryDirectory() as tmp, _probe_subnet(Path(tmp)) as (ledger, netuid, service, probes):
        res = discover(ledger, netuid, run_id="x", timeout_s=4, allow_private=False)
        out = {"accepted_on": service.accepted, "live": res.live, "candidates": res.candidates}
        out["why"] = {s["hotkey"]: s["why"] for s in res.skipped}
        out["probes"] = sorted(probes)
        # the control: with private addresses allowed (a local chain) the same commitment is dialled
        discover(ledger, netuid, run_id="x", timeout_s=20, allow_private=True)
        _wait_for(lambda: service.accepted >= 1, 10)
        out["accepted_off"] = service.accepted
    return out


@pytest.mark.slow
def test_discovery_on_a_public_chain_never_dials_a_committed_private_address():
    out = _in_subprocess("discovery")
    assert out["accepted_on"] == 0 and out["live"] == 0 and out["candidates"] == 0, out
    assert sorted(out["why"]) == out["probes"], out
    assert all("non-public address" in w for w in out["why"].values()), out
    assert out["accepted_off"] >= 1, out


def test_the_validator_refuses_a_private_commitment_with_its_reason(subnet_with_probes):
    from validator.loop import sync_metagraph

    ledger, netuid, _, probes = subnet_with_probes
    _, targets = sync_metagraph(ledger, netuid, own_hotkey="", allow_private=False)
    assert {t.hotkey for t in targets} == set(probes)
    for t in targets:
        assert t.target is None and "commitment names a non-public address" in t.rejected, t.rejected
    _, targets = sync_metagraph(ledger, netuid, own_hotkey="", allow_private=True)
    assert all(t.target is not None and t.rejected is None for t in targets)


def test_the_doctor_fails_a_commitment_that_public_validators_will_not_dial(subnet_with_probes, tmp_path):
    from peer.chain.wallet import WalletConfig
    from peer.doctor import FAIL, WARN, DoctorInputs, _Found, check_commitment

    ledger, netuid, _, probes = subnet_with_probes
    hotkey = next(iter(probes))
    wallet = WalletConfig(name="w", hotkey="default", path=str(tmp_path))
    for cfg, status, says in (
        (ChainConfig(network="finney", netuid=netuid), FAIL, "never dial it"),
        (ChainConfig(netuid=netuid), WARN, "no publisher has run"),  # local: the next check speaks
    ):
        inp = DoctorInputs(wallet=wallet, home=tmp_path / "home", chain_cfg=cfg, run_id="x")
        check = check_commitment(inp, _Found(hotkey=hotkey, chain=ledger))
        assert check.status == status and says in check.detail, check
        if status == FAIL:
            assert "--publisher.announce" in check.fix


def _mentions(e: BaseException, text: str, depth: int = 0) -> bool:
    """Whether ``text`` is in ``e`` or any error it wraps (py-libp2p and trio nest them)."""
    if text in str(e):
        return True
    inner = list(e.exceptions) if isinstance(e, BaseExceptionGroup) else []
    inner += [x for x in (e.__cause__, e.__context__) if x is not None]
    return depth < 12 and any(_mentions(x, text, depth + 1) for x in inner)


def _host_probe() -> dict:
    """(subprocess) Every dial path of a host made with the rule on, then off, at a local service."""
    import multiaddr
    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo

    from peer.net.publisher import make_host

    service = _Listener()
    addr = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{service.port}")
    pid = ID.from_pubkey(create_new_key_pair().public_key)

    async def main(allow_private: bool) -> list[str]:
        host = make_host(create_new_key_pair(), allow_private=allow_private)
        refused = []
        async with host.run(listen_addrs=[]):
            network = host.get_network()
            host.get_peerstore().add_addrs(pid, [addr], 3600)  # what identify would have stored
            assert await network.auto_connector._get_candidate_peers() == []
            for name, dial in (
                ("dial_addr", lambda: network.dial_addr(addr, pid)),
                ("dial_peer", lambda: network.dial_peer(pid)),  # new_stream's redial path
                ("connect", lambda: host.connect(PeerInfo(pid, [addr]))),
            ):
                network.unblock_peer(pid)  # py-libp2p blocks a peer id for 60 s after a failed dial
                try:
                    with trio.move_on_after(30):  # a refusal is instant; an allowed dial may take a while
                        await dial()
                except Exception as e:  # noqa: BLE001 - the guard's refusal or the handshake failing
                    if _mentions(e, "refused to dial"):
                        refused.append(name)
        return refused

    try:
        out = {"refused_on": trio.run(main, False), "accepted_on": service.accepted}
        # the control: allowed, the same dials reach the service (noise then fails: it is not libp2p)
        out["refused_off"] = trio.run(main, True)
        _wait_for(lambda: service.accepted >= 1, 10)
        out["accepted_off"] = service.accepted
    finally:
        service.close()
    return out


@pytest.mark.slow
def test_a_host_never_dials_a_refused_address_whoever_advertised_it():
    """py-libp2p stores the addresses a remote advertises (identify) and redials them later; the host's
    guard refuses each dial the rule refuses, on every path, and the host never dials on its own."""
    out = _in_subprocess("host")
    assert out["refused_on"] == ["dial_addr", "dial_peer", "connect"] and out["accepted_on"] == 0, out
    assert out["refused_off"] == [] and out["accepted_off"] >= 1, out


if __name__ == "__main__" and len(sys.argv) == 2:
    sys.path.insert(0, str(REPO))
    from peer.net.publisher import quiet_libp2p

    quiet_libp2p()
    print(json.dumps({"discovery": _discovery_probe, "host": _host_probe}[sys.argv[1]]()))
