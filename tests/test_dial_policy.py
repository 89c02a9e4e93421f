"""Validators and joining peers dial only what a public subnet should reach (peer.net.dial_policy).

A commitment is chosen by any registered hotkey. On a public chain, one naming ``127.0.0.1:22`` or the
validator's LAN must not be dialled at all: the rule (a table), which chains allow private addresses
(a table), and two real paths that would otherwise connect — discovery dialling a listener on this
machine, and the validator's metagraph step.
"""

from __future__ import annotations

import socket
import threading

import pytest
from substrateinterface import Keypair

from peer.chain.base import SubnetParams
from peer.chain.config import ChainConfig
from peer.chain.local import LocalLedger
from peer.net.dial_policy import dial_refusal, private_allowed_for

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
        ("not a multiaddr", "not a multiaddr", "not a multiaddr"),
        ("", "not", "not"),
    ],
)
def test_dial_refusal(maddr, public_only, private_ok):
    for allow, want in ((False, public_only), (True, private_ok)):
        got = dial_refusal(maddr, allow_private=allow)
        assert (got is None) if want is None else (got is not None and want in got), (allow, got)


@pytest.mark.parametrize(
    "cfg, override, allowed",
    [
        (ChainConfig(), "auto", True),  # the embedded LocalLedger
        (ChainConfig(network="finney"), "auto", False),
        (ChainConfig(network="test"), "auto", False),
        (ChainConfig(network="local-subtensor"), "auto", True),
        (ChainConfig(chain_endpoint="ws://127.0.0.1:9944"), "auto", True),  # Chopsticks
        (ChainConfig(chain_endpoint="ws://localhost:9944"), "auto", True),
        (ChainConfig(chain_endpoint="ws://10.1.2.3:9944"), "auto", True),  # a lab chain
        (ChainConfig(chain_endpoint="wss://node.example.com:443"), "auto", False),
        (ChainConfig(chain_endpoint="ws://8.8.8.8:9944"), "auto", False),
        (ChainConfig(network="finney"), "yes", True),
        (ChainConfig(), "no", False),
    ],
)
def test_private_addresses_are_dialled_only_on_local_chains(cfg, override, allowed):
    assert private_allowed_for(cfg, override) is allowed


def test_an_unknown_override_is_refused():
    with pytest.raises(ValueError, match="dial-private"):
        private_allowed_for(ChainConfig(), "maybe")


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


@pytest.fixture
def subnet_with_probes(tmp_path):
    """A LocalLedger subnet where one hotkey commits a live local service and another a LAN address."""
    ledger = LocalLedger(tmp_path / "ledger.sqlite", block_time=0.5)
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


def test_discovery_on_a_public_chain_never_dials_a_committed_private_address(subnet_with_probes):
    from peer.net.discovery import discover

    ledger, netuid, service, probes = subnet_with_probes
    res = discover(ledger, netuid, run_id="x", timeout_s=4, allow_private=False)
    assert service.accepted == 0 and res.live == 0 and res.candidates == 0
    why = {s["hotkey"]: s["why"] for s in res.skipped}
    assert set(why) == set(probes) and all("non-public address" in w for w in why.values()), why
    # the control: with private addresses allowed (a local chain) the same commitment is dialled
    discover(ledger, netuid, run_id="x", timeout_s=4, allow_private=True)
    assert service.accepted >= 1


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
