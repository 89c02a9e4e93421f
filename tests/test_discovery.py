"""Join by netuid alone, end to end on a LocalLedger, and validators' explanations served to miners.

Peer A joins the subnet without ``--initial-peers``: nothing is live, so it starts the swarm and
publishes a hotkey-signed identity record naming its DHT addresses. Peer B joins with only
``--netuid`` (and the ledger): it finds A from the chain (commitment → publisher → signed identity →
live DHT dial) and averages with it. A validator then scores a round, publishes its signed explanation
through its own publisher, and a registered free-rider that never published reads the validator's
reason for its 0 in ``peer status``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
from substrateinterface import Keypair

from peer.chain.base import SubnetParams
from peer.chain.local import LocalLedger
from tests.fixtures_swarm import REPO, join_args, peer_env, read_rounds, wait_for

TAO = 10**9
ROUND_BLOCKS = 20


def _wallet(path, name: str) -> Keypair:
    from peer.chain.wallet import WalletConfig, create_wallet

    return create_wallet(WalletConfig(name=name, hotkey="default", path=str(path), create=True))


@pytest.mark.slow
def test_peer_joins_by_netuid_and_a_free_rider_reads_the_validators_reason(procs, debug_data, tmp_path):
    ledger_path = tmp_path / "ledger.sqlite"
    ledger = LocalLedger(ledger_path, block_time=0.5)
    coldkey = Keypair.create_from_uri("//Bob")
    ledger.fund(coldkey.ss58_address, 1000 * TAO)
    netuid = ledger.create_subnet(
        Keypair.create_from_uri("//Alice"), SubnetParams(burn=0, weights_rate_limit=0)
    )
    wallets = tmp_path / "w"
    validator = _wallet(wallets, "validator")
    rider = _wallet(wallets, "rider")
    for kp in (validator, rider):
        ledger.register(netuid, kp, coldkey)
    ledger.add_stake(netuid, validator.ss58_address, coldkey, 100 * TAO)
    chain = ["--ledger.path", str(ledger_path), "--netuid", str(netuid), "--round-blocks", str(ROUND_BLOCKS)]
    run_id = f"netuid-{uuid.uuid4().hex[:8]}"
    homes = {n: tmp_path / n for n in ("a", "b")}

    def start(name: str):
        return procs.start(
            name,
            join_args(
                home=homes[name],
                data_dir=debug_data,
                wallet_path=wallets,
                name=name,
                run_id=run_id,
                initial_peers=[],  # join by netuid alone
                chain=chain,
                extra=["--max-rounds", "40"],
            ),
        )

    a = start("a")

    def a_announces_dht() -> bool:
        try:
            return bool(json.loads((homes["a"] / "outbox" / "identity.json").read_text()).get("dht_addrs"))
        except (OSError, ValueError):
            return False

    wait_for(a_announces_dht, 180, "peer a's signed identity record with its DHT addresses", [a])
    assert "starting a new swarm" in a.log()
    b = start("b")
    wait_for(lambda: "live peer(s)" in b.log(), 180, "peer b to discover a", [a, b])
    wait_for(
        lambda: any(r["group_size"] == 2 for r in read_rounds(homes["b"])),
        240,
        "a round averaged by both peers",
        [a, b],
    )

    v = procs.start(
        "validator",
        [
            sys.executable, "-m", "validator.cli", "run", "--config", "debug", "--data-dir", str(debug_data),
            "--run-id", run_id, "--state-dir", str(tmp_path / "vstate"), "--wallet.path", str(wallets),
            "--wallet.name", "validator", "--device", "cpu", "--max-rounds", "1", "--max-seconds", "240",
            "--publish-grace", "0.5", "--publisher.listen", "/ip4/127.0.0.1/tcp/0", *chain,
        ],
        env=peer_env(),
    )  # fmt: skip
    assert v.wait(timeout=300) == 0, v.log()[-4000:]
    rounds = sorted(int(p.name) for p in (tmp_path / "vstate" / "rounds").iterdir() if p.name.isdigit())
    assert rounds, v.log()[-3000:]
    record = json.loads((tmp_path / "vstate" / "rounds" / str(rounds[-1]) / "record.json").read_text())
    by_hotkey = {s["hotkey"]: s for s in record["scores"]}
    assert by_hotkey[rider.ss58_address]["score"] == 0
    assert "no publisher commitment" in by_hotkey[rider.ss58_address]["reason"]
    served = tmp_path / "vstate" / "outbox" / "explanations" / str(rounds[-1]) / "explanation.json"
    assert served.exists()

    # the validator is gone now, so serve its outbox again the way it did (its publisher, its key)
    from peer.net.identity import identity_path
    from peer.net.publisher import start_publisher

    pub = start_publisher(tmp_path / "vstate" / "outbox", identity_path(tmp_path / "vstate"))
    try:
        from peer.chain.membership import ensure_commitment

        ledger.advance(11)  # the commitment rate limit
        ensure_commitment(ledger, netuid, validator, pub.commitment())
        args = ["--wallet.path", str(wallets), "--wallet.name", "rider", "--home", str(tmp_path / "rider")]
        args += ["--ledger.path", str(ledger_path), "--netuid", str(netuid), "--run-id", run_id]
        st = subprocess.run(
            [sys.executable, "-m", "peer.cli", "status", *args],
            cwd=REPO,
            env=peer_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert st.returncode == 0, st.stderr
        want = f"round {rounds[-1]}: 0 — {by_hotkey[rider.ss58_address]['reason']}"
        assert want in st.stdout, st.stdout + st.stderr
    finally:
        pub.stop()
        ledger.close()


@pytest.mark.slow
def test_discovery_finds_live_signed_dht_addresses_on_both_chains(env, procs, tmp_path):
    """The recipe on the LocalLedger and on the real runtime (Chopsticks): a live DHT is found; a peer whose
    DHT is dead, and one whose record names a DHT of another peer id, are skipped with the reason."""
    import time

    from peer.chain.config import ChainConfig
    from peer.chain.membership import ensure_commitment
    from peer.net.discovery import discover_in_subprocess
    from peer.net.identity import identity_path, load_or_create_identity
    from peer.net.publisher import start_publisher

    run_id = f"disc-{uuid.uuid4().hex[:8]}"
    homes = {n: tmp_path / n for n in ("live", "dead", "redirect")}
    for h in homes.values():
        load_or_create_identity(identity_path(h))
    ready = tmp_path / "dht.ready.json"
    dht = procs.start(
        "dht",
        [
            sys.executable, "-m", "peer.cli", "bootstrap", "--host-maddrs", "/ip4/127.0.0.1/tcp/0",
            "--identity", str(identity_path(homes["live"])), "--ready-file", str(ready),
        ],
    )  # fmt: skip
    wait_for(ready.exists, 120, "the live peer's DHT", [dht])
    live_maddrs = json.loads(ready.read_text())["maddrs"]
    handles = []
    try:
        owners = {"live": env.miners[0], "dead": env.miners[1], "redirect": env.validator}
        for name, kp in owners.items():
            pub = start_publisher(homes[name] / "outbox", identity_path(homes[name]))
            handles.append(pub)
            dht_addrs = {
                "live": live_maddrs,
                "dead": [f"/ip4/127.0.0.1/tcp/1/p2p/{pub.peer_id}"],
                "redirect": live_maddrs,  # someone else's peer id: not this hotkey's DHT
            }[name]
            pub.publish_identity(kp, run_id=run_id, round_=0, dht_addrs=dht_addrs)
            ensure_commitment(env.chain, env.netuid, kp, pub.commitment())
        if env.kind == "substrate":
            env.advance(1)
        t0 = time.monotonic()
        # in its own process, as `peer join` runs it: py-libp2p cannot share this (hivemind-importing)
        # pytest process
        if env.kind == "substrate":
            # Chopsticks on 127.0.0.1 is not a local chain to the dial policy (a validator's own finney node
            # is there too): its peers on 127.0.0.1 are dialled because the flag says so
            chain_cfg = ChainConfig(chain_endpoint=env.chain.url, netuid=env.netuid, dial_private="yes")
        else:
            chain_cfg = ChainConfig(ledger_path=str(env.chain.path), netuid=env.netuid)
        res = discover_in_subprocess(chain_cfg, run_id=run_id, timeout_s=10)
        assert time.monotonic() - t0 < 60
    finally:
        for h in handles:
            h.stop()
    assert res.initial_peers == live_maddrs, res
    assert res.live == 1 and res.candidates == 3
    why = {s["hotkey"]: s["why"] for s in res.skipped}
    assert why[env.miners[1].ss58_address].startswith("DHT not reachable")
    assert "names no DHT address" in why[env.validator.ss58_address]
