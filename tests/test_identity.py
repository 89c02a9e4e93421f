"""One identity key file, the same peer id in hivemind's p2pd and in py-libp2p; compact commitments."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from peer.net.identity import (
    IdentityError,
    load_identity,
    load_or_create_identity,
    peer_id_from_bytes,
    peer_id_to_bytes,
)
from peer.net.records import MAX_COMMITMENT_BYTES, Commitment, RecordError

REPO = Path(__file__).resolve().parent.parent


def test_identity_is_created_once_and_reloaded(tmp_path):
    path = tmp_path / "home" / "p2p_identity.key"
    pid = load_or_create_identity(path)
    assert pid.startswith("Qm") and len(pid) == 46
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_identity(path) == pid  # same file, same id
    assert peer_id_from_bytes(peer_id_to_bytes(pid)) == pid
    assert not list(path.parent.glob(".*tmp"))


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "not a libp2p private key"),
        (b"\x08\x00\x12\x05hello", "not a libp2p private key"),
        (b"x" * 20000, "too big"),
    ],
)
def test_bad_identity_file_is_one_clear_line(tmp_path, content, words):
    path = tmp_path / "p2p_identity.key"
    path.write_bytes(content)
    with pytest.raises(IdentityError, match=words) as e:
        load_or_create_identity(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(IdentityError, match="not found"):
        load_identity(tmp_path / "missing.key")


def test_commitment_is_compact_and_round_trips():
    pid = "QmbbT4x8dUhBgZBisGwyynSygiJrdATd7uged9B17qT83c"
    c = Commitment(addr="/ip4/203.0.113.5/tcp/4001", peer_id=pid)
    raw = c.to_bytes()
    assert len(raw) <= 64 < MAX_COMMITMENT_BYTES
    assert Commitment.from_bytes(raw) == c
    assert Commitment.from_multiaddr(c.multiaddr) == c
    ed = Commitment(
        addr="/ip6/2001:db8::1/tcp/4001", peer_id="12D3KooWHANHtv8fpBHoaxgY7dxEm1aNV8PFtHZuQCcD1ox8QbuD"
    )
    assert Commitment.from_bytes(ed.to_bytes()) == ed
    for bad in (b"", b"\x02" + raw[1:], b"\x01garbage", raw + b"\x00" * 200):
        with pytest.raises(RecordError):
            Commitment.from_bytes(bad)
    with pytest.raises(RecordError, match="form"):
        Commitment.from_multiaddr("/ip4/1.2.3.4/tcp/1")


HIVEMIND_SIDE = r"""
import json, sys
import hivemind
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon_bindings.datastructures import PeerID
key, hm_key = sys.argv[1], sys.argv[2]
P2P.generate_identity(hm_key)  # a key written by hivemind itself
first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
# hivemind parses the key file itself too (PeerID.from_identity, used by its is_identity_taken check,
# which is skipped here: it costs ~5 s of waiting for nobody to answer)
dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=key,
                   initial_peers=[str(m) for m in first.get_visible_maddrs()], check_if_identity_free=False)
print(json.dumps({"dht_peer_id": dht.peer_id.to_base58(),
                  "maddrs": [str(m) for m in dht.get_visible_maddrs()],
                  "hivemind_parses_ours": PeerID.from_identity(open(key, "rb").read()).to_base58(),
                  "hivemind_key_peer_id": PeerID.from_identity(open(hm_key, "rb").read()).to_base58()}), flush=True)
sys.stdin.readline()
dht.shutdown(); first.shutdown()
"""

LIBP2P_SIDE = r"""
import json, sys, logging, trio, multiaddr
logging.disable(logging.CRITICAL)
from peer.net.identity import libp2p_keypair
from peer.net.publisher import make_host
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.crypto.ed25519 import create_new_key_pair
key, target = sys.argv[1], sys.argv[2]
own = ID.from_pubkey(libp2p_keypair(key).public_key).to_base58()
async def main():
    host = make_host(create_new_key_pair())
    async with host.run(listen_addrs=[]):
        info = info_from_p2p_addr(multiaddr.Multiaddr(target))
        with trio.fail_after(20):
            await host.connect(info)  # noise proves the daemon holds the key of this peer id
        return str(info.peer_id)
print(json.dumps({"libp2p_peer_id": own, "dialled": trio.run(main)}))
"""


@pytest.mark.slow
def test_same_key_same_peer_id_in_hivemind_and_libp2p(tmp_path):
    key, hm_key = tmp_path / "p2p_identity.key", tmp_path / "hivemind.key"
    ours = load_or_create_identity(key)
    hm = subprocess.Popen(
        [sys.executable, "-c", HIVEMIND_SIDE, str(key), str(hm_key)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = hm.stdout.readline()
        assert line, hm.stderr.read()[-3000:]
        info = json.loads(line)
        assert info["dht_peer_id"] == info["hivemind_parses_ours"] == ours  # p2pd runs as our peer id
        assert load_identity(hm_key).peer_id == info["hivemind_key_peer_id"]  # we read hivemind's keys too
        addr = next(m for m in info["maddrs"] if "/tcp/" in m and "127.0.0.1" in m)
        lp = subprocess.run(
            [sys.executable, "-c", LIBP2P_SIDE, str(key), addr],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert lp.returncode == 0, lp.stderr[-3000:]
        out = json.loads(lp.stdout.strip().splitlines()[-1])
        assert out == {"libp2p_peer_id": ours, "dialled": ours}  # py-libp2p (noise) reached p2pd as that id
    finally:
        if hm.poll() is None:
            hm.stdin.write("\n")
            hm.stdin.flush()
            try:
                hm.wait(15)
            except subprocess.TimeoutExpired:
                hm.kill()
                hm.wait()


def test_peer_status_shows_identity_registration_and_rounds(tmp_path):
    """`peer status` on a real LocalLedger: unregistered first, then registered with a matching commitment."""
    from substrateinterface import Keypair

    from peer.chain import ChainConfig, connect
    from peer.chain.wallet import WalletConfig, create_wallet

    wallet = WalletConfig(name="w", hotkey="h", path=str(tmp_path / "wallets"))
    hotkey = create_wallet(wallet)
    home = tmp_path / "home"
    ledger = tmp_path / "ledger.sqlite"
    cmd = [
        sys.executable, "-m", "peer.cli", "status", "--json", "--home", str(home),
        "--wallet.name", "w", "--wallet.hotkey", "h", "--wallet.path", str(tmp_path / "wallets"),
        "--ledger.path", str(ledger),
    ]  # fmt: skip

    def status(cli: bool = False) -> dict:
        if not cli:  # the same code the command runs, without its start-up cost
            from dataclasses import asdict

            from peer.status import collect_status

            return asdict(
                collect_status(
                    hotkey=hotkey.ss58_address, home=home, chain_cfg=ChainConfig(ledger_path=str(ledger))
                )
            )
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout)

    st = status()
    assert st["hotkey"] == hotkey.ss58_address and st["peer_id"] is None
    assert st["registration"].startswith("unknown (no ledger")
    assert not ledger.exists()  # status never creates a ledger

    pid = load_or_create_identity(home / "p2p_identity.key")
    (home / "outbox" / "rounds" / "4").mkdir(parents=True)
    (home / "outbox" / "rounds" / "4" / "manifest.json").write_text("{}")
    chain = connect(ChainConfig(ledger_path=str(ledger)))
    try:
        netuid = chain.create_subnet(Keypair.create_from_uri("//Owner"))
        assert netuid == 1
        st = status()
        assert st["registration"] == "not registered on subnet 1"
        chain.register(netuid, hotkey)
        chain.set_commitment(
            netuid, hotkey, Commitment(addr="/ip4/127.0.0.1/tcp/4001", peer_id=pid).to_bytes()
        )
    finally:
        chain.close()
    st = status(cli=True)
    assert st["peer_id"] == pid and st["last_contribution_round"] == 4 and st["last_state_round"] is None
    assert st["registration"].startswith("uid ") and st["registration"].endswith("on subnet 1")
    assert st["commitment"] == f"/ip4/127.0.0.1/tcp/4001/p2p/{pid}" and st["commitment_matches"] is True
