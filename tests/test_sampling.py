"""Table tests of validator.sampling (which peers a validator evaluates, under which budget) and of the EMA
that keeps the peers it left out (pure functions, no model)."""

from __future__ import annotations

import pytest

from validator.ema import EmaEntry, EmaState, update_ema
from validator.scoring import PeerScore


def _hk(uids):
    return {u: f"hk{u}" for u in uids}


def test_sample_takes_never_evaluated_then_oldest_first():
    from validator.sampling import select_peers

    cands = _hk(range(6))
    last = {0: 7, 1: None, 2: 3, 3: 5, 4: None, 5: 3}  # never: 1, 4; then 2, 5 (round 3); then 3; then 0
    key = b"k" * 32
    s = select_peers(cands, last, 4, key, random_fraction=0.0)
    assert set(s.selected) == {1, 4, 2, 5}
    assert set(s.order[:2]) == {1, 4} and set(s.order[2:4]) == {2, 5} and s.order[4:] == [3, 0]
    assert s.selected == s.order[:4]  # priority order: the time budget cuts the least stale first
    assert set(s.not_sampled) == {3, 0}
    assert all(r.startswith("not sampled (budget: 4 of 6") for r in s.not_sampled.values())
    # everyone when the budget is 0 (off) or covers all
    for k in (0, 6, 9):
        s = select_peers(cands, last, k, key)
        assert sorted(s.selected) == list(range(6)) and s.not_sampled == {}


def test_sample_ties_are_broken_by_the_key_not_by_uid():
    from validator.sampling import select_peers

    cands = _hk(range(10))
    picks = {tuple(select_peers(cands, {}, 3, bytes([i]) * 32, 0.0).selected) for i in range(40)}
    assert len(picks) > 20  # equals are ordered by a keyed hash: different keys, different samples
    key = b"\x07" * 32
    assert (
        select_peers(cands, {}, 3, key).selected
        == select_peers(dict(reversed(cands.items())), {}, 3, key).selected
    )


def test_sample_random_slots_come_from_the_rest_by_keyed_hash():
    from validator.sampling import _tie, select_peers

    cands = _hk(range(10))
    last = {u: u for u in range(10)}  # staleness order = 0, 1, ..., 9
    key = b"\x42" * 32
    s = select_peers(cands, last, 4, key, random_fraction=0.5)  # 2 by staleness, 2 drawn from the rest
    rest = sorted(range(2, 10), key=lambda u: _tie(key, u, f"hk{u}"))
    assert s.selected == sorted([0, 1, *rest[:2]])
    # over many keys, every peer has a chance in every round (the deterrent), the stalest always go
    seen = set()
    for i in range(64):
        sel = select_peers(cands, last, 4, bytes([i]) * 32, 0.5).selected
        assert {0, 1} <= set(sel)
        seen |= set(sel)
    assert seen == set(range(10))


def test_sample_rotates_through_every_peer():
    from validator.ema import last_evaluated
    from validator.sampling import sampling_key, select_peers

    uids = _hk(range(10))
    ema = EmaState()
    evaluated_in: dict[int, list[int]] = {u: [] for u in uids}
    for r in range(1, 21):
        s = select_peers(uids, last_evaluated(ema, uids), 3, sampling_key(bytes([r]) * 32, r), 0.0)
        for u in s.selected:
            evaluated_in[u].append(r)
        scores = [PeerScore(uid=u, hotkey=uids[u], score=0.1, reason="scored") for u in s.selected]
        ema = update_ema(ema, r, scores, uids, 0.5, not_sampled=s.not_sampled)
    for u, rounds in evaluated_in.items():
        gaps = [b - a for a, b in zip([0, *rounds], [*rounds, 21], strict=True)]
        assert max(gaps) <= 4, (u, rounds)  # ceil(10 / 3) = 4: nobody waits longer


def test_ema_keeps_unsampled_peers_and_counts_only_evaluated_rounds():
    state = EmaState(
        last_round=2,
        entries={
            0: EmaEntry(hotkey="hk0", value=0.4, rounds=2, last_evaluated=2),
            1: EmaEntry(hotkey="hk1", value=0.6, rounds=3, last_evaluated=1),
            2: EmaEntry(hotkey="old", value=0.9, rounds=4, last_evaluated=2),
        },
    )
    scores = [PeerScore(uid=0, hotkey="hk0", score=0.2, reason="scored")]
    new = update_ema(
        state, 3, scores, {0: "hk0", 1: "hk1", 2: "hk2", 3: "hk3"}, 0.5, not_sampled={1: "x", 2: "x"}
    )
    assert (new.entries[0].value, new.entries[0].rounds, new.entries[0].last_evaluated) == (
        pytest.approx(0.3),
        3,
        3,
    )
    assert (new.entries[1].value, new.entries[1].rounds, new.entries[1].last_evaluated) == (0.6, 3, 1)  # kept
    assert (new.entries[2].value, new.entries[2].rounds, new.entries[2].last_evaluated) == (
        0.0,
        0,
        None,
    )  # new hotkey
    assert (new.entries[3].value, new.entries[3].last_evaluated) == (0.0, 3)  # sent nothing: evaluated, 0
    from validator.ema import last_evaluated
    from validator.scoring import not_sampled_scores

    assert last_evaluated(new, {0: "hk0", 1: "hk1", 2: "hk2", 3: "other"}) == {0: 3, 1: 1, 2: None, 3: None}
    rows = not_sampled_scores({1: "not sampled (budget)"}, {1: "hk1"})
    assert rows[0].score == 0 and rows[0].terms["status"] == "not_sampled"
    # an EMA file written before sampling existed still loads
    assert EmaState.from_json({"last_round": 1, "entries": {"0": {"hotkey": "a", "value": 0.1, "rounds": 1}}})


@pytest.mark.parametrize(
    ("elapsed", "measured", "budget", "share", "fits"),
    [
        (0.0, [], 1.0, 0.5, True),  # the first peer always starts
        (99.0, [], 1.0, 0.5, True),
        (5.0, [1.0, 1.0], 0.0, 0.5, True),  # 0 = no limit
        (2.0, [1.0, 1.0], 4.0, 0.5, False),  # 2 + cross 1.0 + next 1.5 = 4.5 > 4
        (2.0, [1.0, 1.0], 4.5, 0.5, True),
        (2.0, [1.0, 1.0], 4.0, 0.0, True),  # without a cross phase 2 + 1 = 3
    ],
)
def test_time_budget_table(elapsed, measured, budget, share, fits):
    from validator.sampling import fits_time_budget

    assert fits_time_budget(elapsed, measured, budget, share) is fits


def test_sampling_key_is_the_end_of_round_hash_and_configs_are_checked():
    from peer.errors import ConfigError
    from validator.sampling import SamplingConfig, sampling_key

    assert sampling_key(b"a" * 32, 3) != sampling_key(b"b" * 32, 3) != sampling_key(b"a" * 32, 4)
    for bad in ({"max_peers": -1}, {"max_seconds": -1.0}, {"random_fraction": 1.5}):
        with pytest.raises(ConfigError):
            SamplingConfig(**bad)


@pytest.mark.parametrize(
    ("end", "head", "delay", "block"),
    [
        (20, 20, 2, 22),  # fetched within the round's first block: the agreed block, two after the end
        (20, 21, 2, 22),  # validators finishing in blocks 20 and 21 draw the same pages
        (20, 22, 2, 23),  # block 22 already existed when the fetch ended: a peer could have seen it
        (20, 57, 2, 58),  # a round audited late (audit_window): a block after that late fetch
        (20, 20, 1, 21),
    ],
)
def test_the_page_block_never_exists_before_every_delta_is_held(end, head, delay, block):
    from validator.sampling import page_key_block

    assert page_key_block(end, head, delay) == block
    assert block > head  # unknown to every peer while the validator was still fetching


@pytest.mark.parametrize(
    ("seconds", "block_time", "blocks"),
    [(5.0, 0.5, 10), (5.0, 12.0, 1), (0.0, 12.0, 1), (12.0, 12.0, 1), (12.1, 12.0, 2), (5.0, 10_000.0, 1)],
)
def test_the_page_key_delay_is_whole_blocks_and_at_least_one(seconds, block_time, blocks):
    from validator.sampling import page_key_delay_blocks

    assert page_key_delay_blocks(seconds, block_time) == blocks


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_a_bad_page_key_delay_is_refused(bad):
    from peer.errors import ConfigError
    from validator.sampling import page_key_delay_blocks

    with pytest.raises(ConfigError):
        page_key_delay_blocks(bad, 12.0)


def test_page_keys_follow_the_block_and_the_round():
    from validator.evaluation import page_pick
    from validator.sampling import page_key, page_key_block, sampling_key

    a, b = page_key(b"a" * 32, 3), page_key(b"b" * 32, 3)
    assert len({a, b, page_key(b"a" * 32, 4), sampling_key(b"a" * 32, 3)}) == 4
    seed = b"s" * 32
    assert page_pick(seed, a) != page_pick(seed, b) != seed
    with pytest.raises(ValueError):
        page_key_block(20, 20, 0)
