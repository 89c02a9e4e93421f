"""One identity key file, the same peer id in hivemind's p2pd and in py-libp2p; on-chain commitments that
the Bittensor SDK can read."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from peer.chain.substrate import commitment_info
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


RSA_PID = "QmbbT4x8dUhBgZBisGwyynSygiJrdATd7uged9B17qT83c"
ED_PID = "12D3KooWHANHtv8fpBHoaxgY7dxEm1aNV8PFtHZuQCcD1ox8QbuD"


def sdk_get_commitment(metadata) -> str:
    """What bittensor SDK 8.5.2's ``Subtensor.get_commitment`` returns for a ``Commitments.CommitmentOf``
    storage value (bittensor/core/subtensor.py, v8.5.2, after ``get_metadata``), line for line: the
    first field, its only value without ``0x``, hex-decoded, then ``.decode()`` (UTF-8)."""
    try:
        commitment = metadata["info"]["fields"][0]
        hex_data = commitment[list(commitment.keys())[0]][2:]
        return bytes.fromhex(hex_data).decode()
    except TypeError:
        return ""


def storage_value(data: bytes) -> dict:
    """The CommitmentOf value the SDK reads back for what SubstrateChain.set_commitment sends (the
    shape of the SDK's own unit test: ``{"info": {"fields": [{"Raw<n>": "0x…"}]}}``)."""
    ((field,),) = commitment_info(data)["fields"]
    return {"deposit": 0, "block": 1, "info": {"fields": [field]}}


@pytest.mark.parametrize(
    "addr, pid",
    [
        ("/ip4/203.0.113.5/tcp/4001", RSA_PID),
        ("/ip6/2001:db8:85a3:1234:5678:8a2e:370:7334/tcp/65535", ED_PID),  # the longest usual form
        ("/ip4/127.0.0.1/tcp/1", ED_PID),
    ],
)
def test_commitment_is_text_the_sdk_reads(addr, pid):
    c = Commitment(addr=addr, peer_id=pid)
    raw = c.to_bytes()
    assert raw == c.multiaddr.encode() and len(raw) <= MAX_COMMITMENT_BYTES
    assert Commitment.from_bytes(raw) == c
    assert Commitment.from_multiaddr(c.multiaddr) == c
    # SubstrateChain writes exactly these bytes as the Raw<n> field; the SDK gets the multiaddr back
    ((field,),) = commitment_info(raw)["fields"]
    assert list(field) == [f"Raw{len(raw)}"]
    assert sdk_get_commitment(storage_value(raw)) == c.multiaddr
    assert Commitment.from_multiaddr(sdk_get_commitment(storage_value(raw))) == c


def test_older_binary_commitments_still_parse():
    c = Commitment(addr="/ip4/203.0.113.5/tcp/4001", peer_id=RSA_PID)
    binary = c.to_binary()
    assert binary[0] == 1 and len(binary) == 46
    assert Commitment.from_bytes(binary) == c
    with pytest.raises(UnicodeDecodeError):  # why the text form: the SDK cannot read the binary one
        sdk_get_commitment(storage_value(binary))
    ed = Commitment(addr="/ip6/2001:db8::1/tcp/4001", peer_id=ED_PID)
    assert Commitment.from_bytes(ed.to_binary()) == ed == Commitment.from_bytes(ed.to_bytes())


def test_commitment_text_is_canonical():
    c = Commitment(addr="/ip6/2001:0db8:0:0::1/tcp/4001", peer_id=ED_PID)
    assert c.to_bytes() == f"/ip6/2001:db8::1/tcp/4001/p2p/{ED_PID}".encode()


@pytest.mark.parametrize(
    "bad, words",
    [
        (b"", "0 bytes"),
        (b"/" + b"a" * 200, "bytes"),
        (b"\x02" + f"ip4/1.2.3.4/tcp/1/p2p/{RSA_PID}".encode(), "first byte 0x02"),
        (b"\x01garbage", "not a multiaddr"),
        (f"/ip4/1.2.3.4/tcp/1/p2p/{RSA_PID}".encode() + b"\x00" * 10, "not a valid multiaddr"),
        ("/ip4/1.2.3.4/tcp/1/p2p/Qmé".encode(), "not ASCII"),
        (b"/ip4/1.2.3.4/tcp/99999/p2p/" + RSA_PID.encode(), "not a valid multiaddr"),
        (b"/ip4/1.2.3.4/tcp/1/p2p/notbase58!!", "not a valid multiaddr"),
        (b"/ip4/1.2.3.4/tcp/1", "not of the form"),
        (b"/p2p/" + RSA_PID.encode(), "not of the form"),
        (b"/ip4/1.2.3.4/tcp/1/p2p/Qm\n", "not a valid multiaddr"),
    ],
)
def test_hostile_commitment_bytes_are_refused_with_a_reason(bad, words):
    with pytest.raises(RecordError, match=words) as e:
        Commitment.from_bytes(bad)
    assert "\n" not in str(e.value)


def test_validator_refuses_a_hostile_commitment_with_a_reason(tmp_path):
    """Any registered hotkey can commit any bytes: the validator's round must refuse them, not crash."""
    from substrateinterface import Keypair

    from peer.chain.local import LocalLedger
    from validator.loop import sync_metagraph

    ledger = LocalLedger(tmp_path / "l.sqlite", block_time=10_000.0)
    try:
        ledger.create_subnet(Keypair.create_from_uri("//Owner"))
        good = Commitment(addr="/ip4/127.0.0.1/tcp/4001", peer_id=RSA_PID)
        commits = {"//evil": b"\x07garbage", "//old": good.to_binary(), "//new": good.to_bytes()}
        for uri, data in commits.items():
            hk = Keypair.create_from_uri(uri)
            ledger.register(1, hk)
            ledger.set_commitment(1, hk, data)
        _, targets = sync_metagraph(ledger, 1, own_hotkey="", allow_private=True)
    finally:
        ledger.close()
    by_hotkey = {t.hotkey: t for t in targets}
    evil = by_hotkey[Keypair.create_from_uri("//evil").ss58_address]
    assert evil.target is None and "unreadable commitment" in evil.rejected and "0x07" in evil.rejected
    for uri in ("//old", "//new"):
        t = by_hotkey[Keypair.create_from_uri(uri).ss58_address]
        assert t.rejected is None and (t.target.addr, t.target.peer_id) == (good.addr, good.peer_id)


def test_too_long_commitment_is_refused_before_the_chain():
    c = Commitment(addr="/dns4/" + "a" * 60 + ".example.org/tcp/4001", peer_id=ED_PID)
    with pytest.raises(RecordError, match="shorter address"):
        c.to_bytes()
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
