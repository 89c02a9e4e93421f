"""validator.weights on a real LocalLedger: set_weights, commit-reveal, refusals, an outage, restarts."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import pytest
from substrateinterface import Keypair

from peer.chain import SubnetParams, make_salt
from peer.chain.local import LocalLedger
from validator.weights import WeightsConfig, WeightSetter, backoff_delays, package_version, version_key

TAO = 10**9
FAR = 1e12  # a "now" after every backoff


@dataclass
class Env:
    ledger: LocalLedger
    netuid: int
    validator: Keypair
    miners: list[int]


def make_env(tmp_path, **params) -> Env:
    ledger = LocalLedger(
        tmp_path / "ledger.sqlite", block_time=10_000.0, busy_timeout=0.3
    )  # blocks move by advance()
    owner, coldkey = Keypair.create_from_uri("//Alice"), Keypair.create_from_uri("//Bob")
    netuid = ledger.create_subnet(
        owner, SubnetParams(**params), owner_hotkey=Keypair.create_from_uri("//owner-hk")
    )
    validator = Keypair.create_from_uri("//validator")
    ledger.register(netuid, validator, coldkey)
    miners = [ledger.register(netuid, Keypair.create_from_uri(f"//miner{i}"), coldkey).uid for i in range(3)]
    ledger.fund(coldkey.ss58_address, 1000 * TAO)
    ledger.add_stake(netuid, validator.ss58_address, coldkey, 100 * TAO)
    return Env(ledger, netuid, validator, miners)


@pytest.fixture
def env(tmp_path):
    e = make_env(tmp_path, weights_rate_limit=5)
    yield e
    e.ledger.close()


def stored(env: Env) -> list[tuple[int, int]]:
    uid = env.ledger.uid_of(env.netuid, env.validator.ss58_address)
    return [tuple(x) for x in env.ledger.weights(env.netuid).get(uid, [])]


def test_version_key_follows_the_package_version():
    assert version_key("0.1.0") == 10
    assert version_key("1.2.3rc1") == 1023
    assert version_key() == version_key(package_version())


def test_set_weights_once_per_interval_even_after_a_restart(env, tmp_path):
    env.ledger.advance(10)
    ws = WeightSetter(env.ledger, env.netuid, env.validator, tmp_path / "state")
    assert ws.enqueue(7, env.miners, [100, 50, 0])
    [out] = ws.process()
    assert out.action == "set"
    assert stored(env) == [(env.miners[0], 65535), (env.miners[1], 32768), (env.miners[2], 0)]
    assert not ws.enqueue(7, env.miners, [1, 1, 1])  # already done
    again = WeightSetter(env.ledger, env.netuid, env.validator, tmp_path / "state")  # restarted validator
    assert again.is_done(7) and not again.enqueue(7, env.miners, [1, 1, 1])
    assert again.process() == []


def test_refused_weights_are_queued_retried_and_land_later(env, tmp_path):
    env.ledger.advance(10)
    cfg = WeightsConfig(retry_base_s=1.0, retry_max_s=4.0)
    ws = WeightSetter(env.ledger, env.netuid, env.validator, tmp_path / "state", cfg)
    ws.enqueue(1, env.miners, [1, 2, 3])
    assert ws.process()[0].action == "set"
    ws.enqueue(2, env.miners, [3, 2, 1])
    [out] = ws.process(now=1000.0)  # inside the weights rate limit: the chain refuses
    assert out.action == "retry" and "RateLimited" in out.detail
    assert ws.process(now=1000.5)[0].action == "waiting"
    assert backoff_delays(cfg, 4) == [1.0, 2.0, 4.0, 4.0]
    restarted = WeightSetter(env.ledger, env.netuid, env.validator, tmp_path / "state", cfg)
    [e] = restarted.pending()
    assert e.interval == 2 and e.attempts == 1 and "RateLimited" in e.last_error
    env.ledger.advance(5)
    assert restarted.process(now=FAR)[0].action == "set"
    assert stored(env) == [(env.miners[0], 65535), (env.miners[1], 43690), (env.miners[2], 21845)]
    assert restarted.pending() == [] and restarted.is_done(2)


def test_ledger_down_during_a_weight_set_then_it_lands(env, tmp_path):
    env.ledger.advance(10)
    ws = WeightSetter(env.ledger, env.netuid, env.validator, tmp_path / "state")
    ws.enqueue(3, env.miners, [5, 5, 5])
    blocker = sqlite3.connect(str(env.ledger.path), timeout=0.1, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the ledger: writes time out
    try:
        [out] = ws.process()
        assert out.action == "retry" and "ChainUnreachable" in out.detail
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert stored(env) == []
    assert ws.process(now=FAR)[0].action == "set"
    assert stored(env) == [(u, 65535) for u in env.miners]


def test_newer_weights_supersede_unsent_older_ones(env, tmp_path):
    ws = WeightSetter(env.ledger, env.netuid, env.validator, tmp_path / "state")
    ws.enqueue(4, env.miners, [1, 0, 0])
    ws.enqueue(5, env.miners, [0, 1, 0])
    env.ledger.advance(10)
    outs = {o.interval: o.action for o in ws.process()}
    assert outs == {4: "superseded", 5: "set"}
    assert stored(env) == [(env.miners[0], 0), (env.miners[1], 65535), (env.miners[2], 0)]


def test_a_set_that_landed_before_a_crash_is_not_sent_again(env, tmp_path):
    env.ledger.advance(10)
    ws = WeightSetter(env.ledger, env.netuid, env.validator, tmp_path / "state")
    ws.enqueue(6, env.miners, [2, 1, 1])
    env.ledger.set_weights(env.netuid, env.validator, env.miners, [2, 1, 1], ws.version)  # sent, then crashed
    restarted = WeightSetter(env.ledger, env.netuid, env.validator, tmp_path / "state")
    assert restarted.process()[0].action == "already_on_chain"  # no second set (it would be rate limited)


def test_commit_reveal_survives_a_restart(tmp_path):
    env = make_env(
        tmp_path, weights_rate_limit=0, commit_reveal_enabled=True, tempo=9, reveal_period_epochs=1
    )
    try:
        env.ledger.advance(3)
        ws = WeightSetter(env.ledger, env.netuid, env.validator, tmp_path / "state")
        ws.enqueue(8, env.miners, [3, 0, 1])
        [out] = ws.process()
        assert out.action == "committed"
        [e] = ws.pending()
        assert e.salt and e.commit_hash and e.first_reveal_block > env.ledger.block()
        restarted = WeightSetter(env.ledger, env.netuid, env.validator, tmp_path / "state")
        assert restarted.process(now=FAR)[0].action == "waiting"
        env.ledger.advance(e.first_reveal_block - env.ledger.block())
        assert restarted.process(now=FAR)[0].action == "revealed"
        assert stored(env) == [(env.miners[0], 65535), (env.miners[1], 0), (env.miners[2], 21845)]
        assert restarted.is_done(8) and restarted.done[8]["how"] == "commit_reveal"
    finally:
        env.ledger.close()


def test_a_commit_that_landed_before_a_crash_is_found_and_revealed(tmp_path):
    env = make_env(
        tmp_path, weights_rate_limit=0, commit_reveal_enabled=True, tempo=9, reveal_period_epochs=1
    )
    try:
        ws = WeightSetter(env.ledger, env.netuid, env.validator, tmp_path / "state")
        ws.enqueue(9, env.miners, [1, 1, 0])
        [e] = ws.pending()
        e.salt = make_salt()
        e.commit_hash = ws._hash(e)
        ws._save()  # what _commit writes before sending ...
        env.ledger.commit_weights(
            env.netuid, env.validator, e.uids, e.weights, e.salt, e.version_key
        )  # ... sent; crash
        restarted = WeightSetter(env.ledger, env.netuid, env.validator, tmp_path / "state")
        [out] = restarted.process()
        assert out.action == "committed" and out.detail == "found on chain"
        assert (
            len(env.ledger.pending_commits(env.netuid, env.validator.ss58_address)) == 1
        )  # not committed twice
    finally:
        env.ledger.close()


def test_a_corrupt_queue_file_is_a_clear_error(tmp_path, env):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "weights_queue.json").write_text("{not json")
    from peer.errors import ConfigError

    with pytest.raises(ConfigError, match="move it away"):
        WeightSetter(env.ledger, env.netuid, env.validator, tmp_path / "state")
