"""One contract, two implementations: LocalLedger and SubstrateChain on the real runtime (Chopsticks).

Every test runs against both (fixture ``env`` in tests/fixtures_chain.py); the substrate half is marked
``chain``. Tests never depend on absolute block numbers.
"""

from __future__ import annotations

import re

import pytest
from substrateinterface import Keypair

from peer.chain import (
    BurnRequired,
    Chain,
    ChainClock,
    ChainError,
    CommitRevealError,
    InsufficientBalance,
    NotRegistered,
    RateLimited,
    RevealTooEarly,
    RevealTooLate,
    SubnetNotFound,
    WeightsError,
    commit_hash,
    ensure_commitment,
)
from tests.fixtures_chain import TAO, TEMPO

HEX32 = re.compile(r"^0x[0-9a-f]{64}$")


def fresh(tag: str) -> Keypair:
    return Keypair.create_from_mnemonic(Keypair.generate_mnemonic())


def test_block_and_hash(env):
    c = env.chain
    assert isinstance(c, Chain) and c.block_time > 0
    b = c.block()
    h = c.block_hash(b)
    assert b >= 0 and HEX32.match(h)
    assert c.block_hash(b) == h
    assert env.advance(2) >= b + 2
    assert c.block_hash(b) == h  # old hashes do not change
    assert c.block_hash(b + 1) != h
    with pytest.raises(ChainError):
        c.block_hash(c.block() + 1000)


def test_metagraph_and_uids(env):
    c = env.chain
    mg = c.metagraph(env.netuid)
    assert mg.netuid == env.netuid and mg.n == 4
    assert [nr.uid for nr in mg.neurons] == [0, 1, 2, 3]
    by = mg.by_hotkey()
    v = by[env.validator.ss58_address]
    assert v.uid == c.uid_of(env.netuid, env.validator.ss58_address) == 1
    assert v.stake >= 100 * TAO and v.validator_permit
    assert v.coldkey == env.coldkey.ss58_address
    for i, m in enumerate(env.miners):
        assert c.uid_of(env.netuid, m.ss58_address) == 2 + i
        assert by[m.ss58_address].coldkey == env.coldkey.ss58_address
    assert c.uid_of(env.netuid, fresh("x").ss58_address) is None
    with pytest.raises(SubnetNotFound):
        c.metagraph(999)


def test_hyperparameters(env):
    hp = env.chain.hyperparameters(env.netuid)
    assert hp.tempo == TEMPO and hp.weights_rate_limit == 0
    assert hp.commit_reveal_enabled is False and hp.reveal_period_epochs == 1
    assert hp.max_uids >= 4 and hp.burn == TAO
    with pytest.raises(SubnetNotFound):
        env.chain.hyperparameters(999)


def test_register_needs_explicit_burn_and_is_idempotent(env):
    c, hk = env.chain, fresh("new")
    with pytest.raises(BurnRequired, match="burn"):
        c.register(env.netuid, hk, env.coldkey)
    assert c.uid_of(env.netuid, hk.ss58_address) is None
    before = c.balance(env.coldkey.ss58_address)
    reg = c.register(env.netuid, hk, env.coldkey, burn=True)
    assert reg.new and reg.uid == 4 and reg.coldkey == env.coldkey.ss58_address
    assert before - c.balance(env.coldkey.ss58_address) >= TAO
    again = c.register(env.netuid, hk, env.coldkey, burn=True)
    assert not again.new and again.uid == 4
    with pytest.raises(SubnetNotFound):
        c.register(999, hk, env.coldkey, burn=True)


def test_commitments(env):
    c, miner = env.chain, env.miners[0]
    data = b"/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWAbc"
    c.set_commitment(env.netuid, miner, data)
    assert c.commitments(env.netuid)[miner.ss58_address] == data
    with pytest.raises(RateLimited):
        c.set_commitment(env.netuid, miner, b"again")
    assert ensure_commitment(c, env.netuid, miner, data) is False  # same data: nothing sent
    with pytest.raises(RateLimited):
        ensure_commitment(c, env.netuid, miner, b"changed")
    with pytest.raises(NotRegistered):
        c.set_commitment(env.netuid, fresh("u"), b"x")


def test_set_weights_roundtrip(env):
    c, n = env.chain, env.netuid
    tx = c.set_weights(n, env.validator, [2, 3], [65535, 21845], 0)
    assert c.weights(n)[1] == [(2, 65535), (3, 21845)]
    mg = c.metagraph(n)
    assert mg.neurons[1].last_update == tx.block


def test_set_weights_are_max_upscaled(env):
    c, n = env.chain, env.netuid
    c.set_weights(n, env.validator, [3, 2], [1, 2], 0)
    assert c.weights(n)[1] == [(2, 65535), (3, 32768)]


def test_set_weights_refusals(env):
    c, n = env.chain, env.netuid
    with pytest.raises(WeightsError):
        c.set_weights(n, env.validator, [2, 3], [1], 0)
    with pytest.raises(WeightsError):
        c.set_weights(n, env.validator, [2, 2], [1, 1], 0)
    with pytest.raises(WeightsError):
        c.set_weights(n, env.validator, [2, 99], [1, 1], 0)
    with pytest.raises(NotRegistered):
        c.set_weights(n, fresh("u"), [2], [1], 0)
    env.set_params(weights_version_key=5)
    with pytest.raises(WeightsError):
        c.set_weights(n, env.validator, [2, 3], [1, 1], 4)
    c.set_weights(n, env.validator, [2, 3], [1, 1], 5)


def test_weights_rate_limit(env):
    c, n = env.chain, env.netuid
    env.set_params(weights_rate_limit=4)
    env.advance(5)
    first = c.set_weights(n, env.validator, [2, 3], [1, 1], 0)
    with pytest.raises(RateLimited):
        c.set_weights(n, env.validator, [2, 3], [1, 2], 0)
    env.land_at(first.block + 4)
    c.set_weights(n, env.validator, [2, 3], [1, 2], 0)
    assert c.weights(n)[1] == [(2, 32768), (3, 65535)]


def test_commit_reveal_roundtrip(env):
    """Our commit hash is the runtime's: the real reveal_weights accepts it."""
    c, n, v = env.chain, env.netuid, env.validator
    env.set_params(commit_reveal_enabled=True)
    assert c.hyperparameters(n).commit_reveal_enabled
    with pytest.raises(CommitRevealError):
        c.set_weights(n, v, [2, 3], [1, 1], 0)
    uids, vals, salt = [2, 3], [13107, 65535], [7, 1, 2, 3, 4, 5, 6, 8]
    wc = c.commit_weights(n, v, uids, vals, salt, 0)
    assert wc.hash == commit_hash(v.public_key, n, uids, vals, salt, 0)
    assert c.pending_commits(n, v.ss58_address) == [wc]
    assert wc.first_reveal_block > wc.commit_block and wc.last_reveal_block == wc.first_reveal_block + TEMPO
    with pytest.raises(RevealTooEarly):
        c.reveal_weights(n, v, uids, vals, salt, 0)
    env.land_at(wc.first_reveal_block)
    with pytest.raises(RevealTooLate):  # wrong salt: no commit matches
        c.reveal_weights(n, v, uids, vals, [9, 9], 0)
    env.land_at(max(wc.first_reveal_block, c.block() + (1 if env.kind == "local" else 0)))
    tx = c.reveal_weights(n, v, uids, vals, salt, 0)
    assert wc.first_reveal_block <= tx.block <= wc.last_reveal_block
    assert c.weights(n)[1] == [(2, 13107), (3, 65535)]
    assert c.pending_commits(n, v.ss58_address) == []


def test_reveal_after_window_is_too_late(env):
    c, n, v = env.chain, env.netuid, env.validator
    env.set_params(commit_reveal_enabled=True)
    wc = c.commit_weights(n, v, [2], [1], [5], 0)
    env.land_at(wc.last_reveal_block + 1)
    with pytest.raises(RevealTooLate):
        c.reveal_weights(n, v, [2], [1], [5], 0)


def test_commit_needs_commit_reveal_on(env):
    with pytest.raises(CommitRevealError):
        env.chain.commit_weights(env.netuid, env.validator, [2], [1], [5], 0)


def test_add_stake(env):
    c = env.chain
    before = c.metagraph(env.netuid).neurons[2].stake
    c.add_stake(env.stake_netuid, env.miners[0].ss58_address, env.coldkey, 7 * TAO)
    assert c.metagraph(env.netuid).neurons[2].stake - before >= 7 * TAO
    with pytest.raises(InsufficientBalance):
        c.add_stake(env.stake_netuid, env.miners[0].ss58_address, fresh("poor"), TAO)


def test_chain_clock(env):
    clock = ChainClock(chain=env.chain, round_blocks=3)
    env.advance(4)
    r = clock.current_round()
    assert r == env.chain.block() // 3
    assert clock.seed(r) == bytes.fromhex(env.chain.block_hash(3 * r)[2:])
    assert clock.seed(r - 1) != clock.seed(r)
    assert clock.round_end(r) > clock.round_end(r - 1)


def test_registration_counts_as_update_for_rate_limit(env):
    c, n = env.chain, env.netuid
    env.set_params(weights_rate_limit=50)
    hk = fresh("v2")
    c.register(n, hk, env.coldkey, burn=True)
    with pytest.raises(RateLimited):
        c.set_weights(n, hk, [2], [1], 0)


def test_commit_rate_limit(env):
    c, n, v = env.chain, env.netuid, env.validator
    env.set_params(commit_reveal_enabled=True, weights_rate_limit=4)
    env.advance(5)
    c.commit_weights(n, v, [2], [1], [1], 0)
    with pytest.raises(RateLimited):
        c.commit_weights(n, v, [2], [2], [1], 0)


def test_full_subnet_replaces_the_uid_that_earned_least(env):
    """uids 0 owner, 1 validator, 2 miner0, 3 miner1, 4 extra; the validator weights 3 and 4. After an
    epoch uid 2 earned nothing and is the oldest uid that did not (the owner's hotkey is never
    replaced): a newcomer takes it over. (On the runtime the miners earn nothing here at all: the
    validator's stake is root stake; the rule picks the oldest zero-emission uid either way.)"""
    c, n = env.chain, env.netuid
    env.set_params(max_uids=5, immunity_period=0)
    assert c.register(n, fresh("extra"), env.coldkey, burn=True).uid == 4
    c.set_weights(n, env.validator, [3, 4], [1, 1], 0)
    env.advance(TEMPO + 2)  # past an epoch boundary
    mg = c.metagraph(n)
    assert mg.neurons[2].emission == 0
    newcomer = fresh("late")
    reg = c.register(n, newcomer, env.coldkey, burn=True)
    assert reg.uid == 2 and reg.new
    assert c.uid_of(n, env.miners[0].ss58_address) is None
    assert c.metagraph(n).n == 5
