"""LocalLedger-only behaviour: several processes on one file, signatures, replacement, wall-time blocks,
the incentive view against a hand-computed example, config/CLI errors."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from substrateinterface import Keypair

from peer.chain import ChainConfig, ChainUnreachable, RegistrationError, SubnetParams, UnknownNetwork, connect
from peer.chain.base import BadSignature, ChainError, PermissionDenied
from peer.chain.local import LocalLedger, SignedCall, sign_call
from peer.chain.yuma import stake_weighted_median, yuma_epoch
from peer.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
TAO = 10**9


def kp(uri: str) -> Keypair:
    return Keypair.create_from_uri(uri)


@pytest.fixture
def ledger(tmp_path):
    led = LocalLedger(tmp_path / "l.sqlite", block_time=10_000.0)
    yield led
    led.close()


# ------------------------------------------------------------------------------------ concurrency
WORKER = textwrap.dedent(
    """
    import json, sys
    from substrateinterface import Keypair
    from peer.chain.local import LocalLedger
    path, worker, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    led = LocalLedger(path)
    out = []
    for i in range(k):
        hk = Keypair.create_from_uri(f"//w{worker}-{i}")
        reg = led.register(1, hk)
        led.set_commitment(1, hk, f"w{worker}-{i}".encode())
        led.set_weights(1, hk, [reg.uid], [65535], 0)
        out.append([hk.ss58_address, reg.uid])
    print(json.dumps(out))
    """
)


def test_concurrent_writers_from_several_processes(tmp_path):
    path = tmp_path / "shared.sqlite"
    led = LocalLedger(path, block_time=10_000.0)
    netuid = led.create_subnet(kp("//Alice"), SubnetParams(max_uids=64))
    assert netuid == 1
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), str(w), "6"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(4)
    ]
    try:
        results = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            results += json.loads(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    uids = sorted(uid for _, uid in results)
    assert uids == list(range(24))  # every registration got its own uid, none lost
    mg = led.metagraph(1)
    assert mg.n == 24
    assert {hk: uid for hk, uid in results} == {nr.hotkey: nr.uid for nr in mg.neurons}
    assert len(led.commitments(1)) == 24
    assert set(led.weights(1)) == set(range(24))
    led.close()


# ------------------------------------------------------------------------------------ signatures
def test_signed_calls_are_verified(ledger):
    alice, hk, mallory = kp("//Alice"), kp("//hk"), kp("//Mallory")
    ledger.create_subnet(alice)
    xt = ledger.sign("register", {"netuid": 1}, hk)
    ledger.submit(xt)
    with pytest.raises(BadSignature, match="replay"):
        ledger.submit(xt)
    forged = dataclasses.replace(
        ledger.sign("register", {"netuid": 1}, mallory),
        signer=kp("//Bob").ss58_address,
    )
    with pytest.raises(BadSignature, match="does not match"):
        ledger.submit(forged)
    other = sign_call("00" * 16, ledger.block(), "register", {"netuid": 1}, mallory)
    with pytest.raises(BadSignature):  # signed for another ledger
        ledger.submit(other)
    stale = sign_call(ledger.genesis_id, 0, "register", {"netuid": 1}, mallory)
    ledger.advance(300)
    with pytest.raises(BadSignature, match="stale"):
        ledger.submit(stale)
    with pytest.raises(BadSignature):
        ledger.submit(
            SignedCall(call="register", args={}, signer="nonsense", era=0, nonce="00", signature="0x00")
        )
    with pytest.raises(PermissionDenied):
        ledger.set_hyperparameters(1, mallory, tempo=5)


# ------------------------------------------------------------------------------------ registration
def test_full_subnet_replaces_lowest_incentive_non_immune(ledger):
    alice = kp("//Alice")
    ledger.create_subnet(alice, SubnetParams(max_uids=3, immunity_period=5))
    hks = [kp(f"//n{i}") for i in range(3)]
    for h in hks:
        ledger.register(1, h)
    ledger.fund(alice.ss58_address, 100 * TAO)
    ledger.add_stake(1, hks[0].ss58_address, alice, 10 * TAO)
    ledger.set_weights(1, hks[0], [1, 2], [65535, 100], 0)
    ledger.set_commitment(1, hks[2], b"x")
    with pytest.raises(RegistrationError, match="immune"):
        ledger.register(1, kp("//late"))
    ledger.advance(12)  # past immunity and an epoch boundary: incentives exist now
    inc = ledger.incentives(1)
    assert inc[1] > inc[2] > 0
    reg = ledger.register(1, kp("//late"))
    assert reg.uid == 2 and reg.new  # uid 2 earned least (lowest pruning score) among non-immune uids
    assert ledger.uid_of(1, hks[2].ss58_address) is None
    assert hks[2].ss58_address not in ledger.commitments(1)


def test_blocks_follow_wall_time(tmp_path):
    led = LocalLedger(tmp_path / "t.sqlite", block_time=0.05)
    b0 = led.block()
    time.sleep(0.3)
    assert led.block() - b0 >= 4
    other = LocalLedger(tmp_path / "t.sqlite", block_time=99.0)  # an existing ledger keeps its block time
    assert other.block_time == 0.05 and abs(other.block() - led.block()) <= 1
    assert other.block_hash(3) == led.block_hash(3)
    led.close()
    other.close()


# ------------------------------------------------------------------------------------ incentives
def test_stake_weighted_median():
    assert stake_weighted_median([0.75, 0.25], [0.75, 0.25]) == 0.75
    assert stake_weighted_median([0.25, 0.75], [0.75, 0.25]) == 0.25
    assert stake_weighted_median([], []) == 0.0


def test_yuma_hand_computed():
    # validators 0 (stake 3) and 1 (stake 1); miners 2, 3.
    # W0 = (.75, .25), W1 = (.25, .75); S = (.75, .25); consensus C = (.75, .25)
    # clipped W1 = (.25, .25); R = (.625, .25) -> I = (5/7, 2/7); D = (6/7, 1/7)
    res = yuma_epoch(4, [3, 1, 0, 0], [True] * 4, {0: [(2, 65535), (3, 21845)], 1: [(2, 21845), (3, 65535)]})
    assert res.consensus == pytest.approx([0, 0, 0.75, 0.25])
    assert res.incentive == pytest.approx([0, 0, 5 / 7, 2 / 7])
    assert res.dividends == pytest.approx([6 / 7, 1 / 7, 0, 0])


def test_ledger_epoch_matches_hand_computed(ledger):
    alice = kp("//Alice")
    v0, v1, m2, m3 = (kp(f"//e{i}") for i in range(4))
    ledger.create_subnet(alice, SubnetParams(tempo=10), owner_hotkey=v0)
    for h in (v1, m2, m3):
        ledger.register(1, h, alice)
    ledger.fund(alice.ss58_address, 10**4 * TAO)
    ledger.add_stake(1, v0.ss58_address, alice, 300 * TAO)
    ledger.add_stake(1, v1.ss58_address, alice, 100 * TAO)
    ledger.set_weights(1, v0, [2, 3], [3, 1], 0)
    ledger.set_weights(1, v1, [2, 3], [1, 3], 0)
    ledger.close_epoch_now(1)
    mg = ledger.metagraph(1)
    assert [nr.incentive for nr in mg.neurons] == pytest.approx([0, 0, 5 / 7, 2 / 7])
    assert [nr.dividends for nr in mg.neurons] == pytest.approx([6 / 7, 1 / 7, 0, 0])
    total = 11 * TAO  # one epoch of tempo 10 at 1 TAO per block, half to miners, half to validators
    assert mg.neurons[2].emission == pytest.approx(total * 0.5 * 5 / 7, abs=2)
    assert mg.neurons[0].emission == pytest.approx(total * 0.5 * 6 / 7, abs=2)
    assert mg.neurons[2].stake == mg.neurons[2].emission  # emission is credited as stake


# ------------------------------------------------------------------------------------ config / CLI
def test_config_errors_are_one_line():
    with pytest.raises(UnknownNetwork, match="not a known network"):
        ChainConfig(network="nowhere")
    with pytest.raises(ConfigError, match="ws://"):
        ChainConfig(chain_endpoint="http://x")
    with pytest.raises(ConfigError):
        ChainConfig(block_time=0)
    t0 = time.monotonic()
    with pytest.raises(ChainUnreachable, match="cannot reach"):
        connect(ChainConfig(chain_endpoint="ws://127.0.0.1:1", timeout=5))
    assert time.monotonic() - t0 < 10


def test_connect_local_and_args(tmp_path):
    import argparse

    from peer.chain import add_chain_args, chain_config_from_args

    p = argparse.ArgumentParser()
    add_chain_args(p)
    args = p.parse_args(
        ["--ledger.path", str(tmp_path / "x.sqlite"), "--netuid", "3", "--ledger.block-time", "0.5"]
    )
    cfg = chain_config_from_args(args)
    assert cfg.is_local and cfg.netuid == 3
    chain = connect(cfg)
    assert isinstance(chain, LocalLedger) and chain.block_time == 0.5
    chain.close()
    cfg2 = chain_config_from_args(p.parse_args(["--subtensor.network", "test"]))
    assert not cfg2.is_local and cfg2.url.startswith("wss://")


def run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "peer.chain.cli", "chain", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(cwd)},
    )


def test_cli_local_flow(tmp_path):
    f = ["--ledger.path", "led.sqlite", "--wallet.path", "w"]
    r = run_cli(
        "create-subnet", *f, "--wallet.name", "owner", "--wallet.create", "--owner-hotkey", cwd=tmp_path
    )
    assert r.returncode == 0 and "netuid=1" in r.stdout, r.stderr
    r = run_cli("fund", *f, "--wallet.name", "a", "--wallet.create", "--tao", "50", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("register", *f, "--wallet.name", "a", "--wallet.hotkey", "h", "--wallet.create", cwd=tmp_path)
    assert r.returncode == 0 and "uid=1" in r.stdout, r.stderr
    r = run_cli("stake", *f, "--wallet.name", "a", "--wallet.hotkey", "h", "--tao", "500", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "holds 50 TAO" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("stake", *f, "--wallet.name", "a", "--wallet.hotkey", "h", "--tao", "20", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("metagraph", *f, cwd=tmp_path)
    assert r.returncode == 0 and "20.000" in r.stdout, r.stderr
    r = run_cli("metagraph", *f, "--netuid", "9", cwd=tmp_path)
    assert r.returncode == 2 and "subnet 9 does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("metagraph", "--subtensor.network", "nowhere", cwd=tmp_path)
    assert r.returncode == 2 and "not a known network" in r.stderr


def test_fixed_genesis_gives_a_reproducible_chain(tmp_path):
    gid = "00112233445566778899aabbccddeeff"
    a = LocalLedger(tmp_path / "a.sqlite", genesis_id=gid)
    b = LocalLedger(tmp_path / "b.sqlite", genesis_id=gid)
    c = LocalLedger(tmp_path / "c.sqlite")
    try:
        assert a.block_hash(0) == b.block_hash(0) != c.block_hash(0)
    finally:
        for ledger in (a, b, c):
            ledger.close()
    with pytest.raises(ChainError, match="32 lowercase hex"):
        LocalLedger(tmp_path / "d.sqlite", genesis_id="not-hex")


# ------------------------------------------------------------------------------ coldkeys: only to sign
PASSWORD = "correct horse battery 7!"


@pytest.fixture(scope="module")
def encrypted_wallet(tmp_path_factory) -> Path:
    """A btcli-layout wallet ``enc`` whose coldkey bittensor-wallet encrypted with a password (btcli's
    default), with an unencrypted hotkey ``h``. Made once: encrypting costs seconds (argon2)."""
    from bittensor_wallet import Wallet

    root = tmp_path_factory.mktemp("wallets")
    w = Wallet(name="enc", hotkey="h", path=str(root))
    with contextlib.redirect_stdout(io.StringIO()):
        w.create_new_coldkey(use_password=True, overwrite=False, suppress=True, coldkey_password=PASSWORD)
        w.create_new_hotkey(use_password=False, overwrite=False, suppress=True)
    assert (root / "enc" / "coldkey").read_bytes().startswith(b"$NACL")
    return root


def run_peer_chain(
    *argv: str, cwd: Path, env: dict | None = None, stdin: str = ""
) -> subprocess.CompletedProcess:
    """``peer chain …`` through the ``peer`` command line, stdin not a terminal."""
    return subprocess.run(
        [sys.executable, "-m", "peer.cli", "chain", *argv],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(cwd), **(env or {})},
    )


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    return r.stderr


@pytest.mark.slow  # argon2 (bittensor-wallet's key derivation): ~4 s per decryption, 4 of them
def test_encrypted_coldkey_is_read_only_where_it_signs(tmp_path, encrypted_wallet):
    from bittensor_wallet import Keyfile

    from peer.chain.wallet import password_env_value

    cold_path = encrypted_wallet / "enc" / "coldkey"
    address = json.loads((encrypted_wallet / "enc" / "coldkeypub.txt").read_text())["ss58Address"]
    var = Keyfile(str(cold_path)).env_var_name()
    assert var.startswith("BT_PW_") and var.endswith("_ENC_COLDKEY")
    f = ["--ledger.path", "led.sqlite"]
    enc = [*f, "--wallet.path", str(encrypted_wallet), "--wallet.name", "enc", "--wallet.hotkey", "h"]
    r = run_peer_chain(
        "create-subnet", *f, "--wallet.path", "w", "--wallet.name", "owner", "--wallet.create", cwd=tmp_path
    )
    assert r.returncode == 0 and "netuid=1" in r.stdout, r.stderr

    # the faucet needs the address only: no password, nothing decrypted
    r = run_peer_chain("fund", *enc, "--tao", "50", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"{address}: 50 TAO", r.stderr

    # what must sign says how to proceed, in one line, and sends nothing
    for cmd in (["register"], ["stake", "--tao", "5"]):
        line = one_error_line(run_peer_chain(*cmd, *enc, cwd=tmp_path))
        assert f"coldkey {cold_path} is encrypted" in line and f"peer chain {cmd[0]}" in line
        assert var in line and "peer chain password-env --wallet.name enc" in line and "btcli" in line
    r = run_peer_chain("metagraph", *f, cwd=tmp_path)
    assert r.returncode == 0 and "0/256 uids" in r.stdout, r.stdout

    # password-env checks the password and prints bittensor-wallet's own variable for it
    pe = ["password-env", "--wallet.path", str(encrypted_wallet), "--wallet.name", "enc"]
    r = run_peer_chain(*pe, cwd=tmp_path, stdin=PASSWORD + "\n")
    assert r.returncode == 0, r.stderr
    name, value = r.stdout.strip().removeprefix("export ").split("=", 1)
    value = value.strip("'")
    assert name == var
    with contextlib.redirect_stdout(io.StringIO()):  # bittensor-wallet's own encoding, then unset again
        kf = Keyfile(str(cold_path))
        assert value == kf.save_password_to_env(PASSWORD)
        kf.remove_password_from_env()

    # with the variable set, the signing commands work: the encrypted coldkey owns the hotkey and stakes
    r = run_peer_chain("register", *enc, cwd=tmp_path, env={var: value})
    assert r.returncode == 0 and f"coldkey={address}" in r.stdout, r.stderr
    r = run_peer_chain("stake", *enc, "--tao", "5", cwd=tmp_path, env={var: value})
    assert r.returncode == 0 and "staked 5 TAO" in r.stdout, r.stderr
    # registered: a second register reads no coldkey (no variable needed)
    r = run_peer_chain("register", *enc, cwd=tmp_path)
    assert r.returncode == 0 and "already registered" in r.stdout, r.stderr
    # a variable holding another password: one line, not a traceback
    wrong = password_env_value(cold_path, "not the password")
    line = one_error_line(run_peer_chain("stake", *enc, "--tao", "5", cwd=tmp_path, env={var: wrong}))
    assert f"the password in {var} does not decrypt it" in line
    ledger = LocalLedger(tmp_path / "led.sqlite")
    try:
        assert ledger.balance(address) == 45 * TAO  # one stake of 5 went through
    finally:
        ledger.close()


def test_registered_peer_never_loads_its_coldkey(ledger):
    from peer.chain.membership import ensure_registered

    ledger.create_subnet(kp("//Owner"))
    hot, cold = kp("//hot"), kp("//cold")

    def must_not_load():
        raise AssertionError("the coldkey was loaded for a registered hotkey")

    first = ensure_registered(ledger, 1, hot, lambda: cold, burn=False)
    assert first.new and first.coldkey == cold.ss58_address
    again = ensure_registered(ledger, 1, hot, must_not_load, burn=False)
    assert not again.new and again.uid == first.uid


def test_peer_rewrites_an_older_binary_commitment_as_text(ledger):
    from peer.chain.membership import ensure_commitment
    from peer.net.records import Commitment

    ledger.create_subnet(kp("//Owner"))
    hot = kp("//peer")
    ledger.register(1, hot)
    c = Commitment(addr="/ip4/127.0.0.1/tcp/4001", peer_id="QmbbT4x8dUhBgZBisGwyynSygiJrdATd7uged9B17qT83c")
    ledger.set_commitment(1, hot, c.to_binary())  # what an earlier release committed
    # a restart within the rate limit: the binary one names the same address, so the peer starts anyway
    assert ensure_commitment(ledger, 1, hot, c) is False
    assert ledger.commitments(1)[hot.ss58_address] == c.to_binary()
    other = Commitment(addr="/ip4/127.0.0.1/tcp/4002", peer_id=c.peer_id)
    with pytest.raises(ConfigError, match="cannot update the on-chain address yet"):
        ensure_commitment(ledger, 1, hot, other)  # a different address cannot wait
    ledger.advance(ledger.hyperparameters(1).commitment_rate_limit)
    assert ensure_commitment(ledger, 1, hot, c) is True
    assert ledger.commitments(1)[hot.ss58_address] == c.multiaddr.encode()
    assert ensure_commitment(ledger, 1, hot, c) is False  # the same text: nothing sent


# ------------------------------------------------------------------------------ the SDK reads our commitments
@pytest.mark.chain
def test_sdk_reads_our_commitment_on_the_runtime(substrate_env):
    """On the real runtime: SubstrateChain stores the text form as one ``Raw<n>`` field, and bittensor SDK
    8.5.2's ``get_commitment`` decode of the storage value (``substrate.query(...).value`` through
    substrate-interface, the library that SDK uses) gives the multiaddr back; an older binary commitment
    is what made it fail (UnicodeDecodeError), and still parses for us."""
    from peer.net.records import Commitment
    from tests.test_identity import ED_PID, sdk_get_commitment

    env, miner = substrate_env, substrate_env.miners[1]
    c = Commitment(addr="/ip4/203.0.113.5/tcp/4001", peer_id=ED_PID)
    env.chain.set_commitment(env.netuid, miner, c.to_bytes())
    value = env.chain.s.query("Commitments", "CommitmentOf", [env.netuid, miner.ss58_address]).value
    assert sdk_get_commitment(value) == c.multiaddr, value
    assert Commitment.from_bytes(env.chain.commitments(env.netuid)[miner.ss58_address]) == c

    old = substrate_env.miners[0]  # another hotkey: the commitment rate limit is per hotkey
    env.chain.set_commitment(env.netuid, old, c.to_binary())
    value = env.chain.s.query("Commitments", "CommitmentOf", [env.netuid, old.ss58_address]).value
    with pytest.raises(UnicodeDecodeError):
        sdk_get_commitment(value)
    assert Commitment.from_bytes(env.chain.commitments(env.netuid)[old.ss58_address]) == c


def test_registered_hotkeys_are_the_metagraphs_and_refreshed_once_per_ttl(ledger):
    """Whose θ votes a peer counts (red team: four fresh keys outvoted three honest peers)."""
    from peer.chain.membership import RegisteredHotkeys

    ledger.create_subnet(kp("//Alice"), SubnetParams())
    a, b = kp("//ra"), kp("//rb")
    ledger.register(1, a)
    voters = RegisteredHotkeys(ledger, 1, ttl_s=3600.0)
    assert voters() == frozenset({a.ss58_address}) and set(voters.incentive) == {a.ss58_address}
    ledger.register(1, b)
    assert voters() == frozenset({a.ss58_address})  # read once per ttl (a round), not per call
    assert RegisteredHotkeys(ledger, 1, ttl_s=0.0)() == frozenset({a.ss58_address, b.ss58_address})
