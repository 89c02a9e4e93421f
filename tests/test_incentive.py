"""Table tests of the specificity reward (validator.scoring, ``reward = "specificity"``, issue #18).

Pure functions, hand-computed values: what a peer is paid for, the properties the rule is built for
(linear in work, sybil-neutral, fair among equals) under the model it assumes (held-out gain ∝ steps^a,
specificity ∝ steps^b with a + b·q = 1, q = reward_exponent), the memorisation cap, and that every gate
still pays nothing.
The end-to-end figures on real local subnets are benchmarks/incentive.py's (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import pytest

from peer.errors import ConfigError
from tests.test_scoring import BASE, HELDOUT, by_uid, peer, rm, table
from validator.ema import MAX_EVIDENCE, EmaEntry, EmaState, update_ema
from validator.evidence import assignment_test
from validator.scoring import ScoringConfig, normalize_weights, score_round

P = ScoringConfig().reward_exponent
A = 0.39
"""Held-out gain ∝ steps^A (measured on debug, benchmarks/incentive.py)."""
B = (1 - A) / P
"""Specificity ∝ steps^B: the exponent that makes the rule exactly linear (measured: ~0.84)."""


def test_default_rule_is_specificity_and_old_rule_stays_selectable():
    assert ScoringConfig().reward == "specificity"
    assert HELDOUT.reward == "heldout"
    for bad in ({"reward": "linear"}, {"reward_exponent": 0.05}, {"max_specificity_ratio": 1.0}):
        with pytest.raises(ConfigError):
            ScoringConfig(**bad)


def test_specificity_reward_hand_computed():
    # table(): specificities u0 0.325 (t 4.33, hg 0.2), u1 0.125 (t 2.5, hg 0.1), u2 0 (t 0, hg 0.2).
    # ratio median over eligible peers with spec > 0: median(0.325 / 0.2, 0.125 / 0.1) = 1.4375;
    # caps: u0 3 × 0.2 × 1.4375 = 0.8625, u1 3 × 0.1 × 1.4375 = 0.43125: neither binds.
    # held-out median over the eligible u0, u1, u2: median(0.2, 0.1, 0.2) = 0.2
    s = by_uid(score_round(rm(table()), ScoringConfig()))
    assert s[0].reason == "scored" and s[0].score == pytest.approx(1.0 * 0.325**P)
    assert s[0].terms["work"] == pytest.approx(0.325) and s[0].terms["capped"] is False
    assert s[0].terms["specificity_cap"] == pytest.approx(0.8625)
    assert s[0].terms["heldout_median"] == pytest.approx(0.2)
    assert s[1].score == pytest.approx(0.5 * 0.125**P) and s[1].terms["specificity_cap"] == pytest.approx(
        0.43125
    )
    assert s[1].terms["relative_heldout_gain"] == pytest.approx(0.5)
    assert s[2].score == 0 and "not trained on its assigned pages" in s[2].reason
    assert "assignment_factor" not in s[0].terms  # no cliff, no factor: the specificity itself is paid
    # every gate of the old rule still pays nothing, with the same reasons
    old = by_uid(score_round(rm(table()), HELDOUT))
    for uid in (3, 4, 5, 6, 7, 8):
        assert s[uid].score == 0 and s[uid].reason == old[uid].reason


def test_insignificant_specificity_is_refused():
    # u1's page differences [0.175, 0.075]: t = 2.5; a stricter gate refuses it, with the numbers
    s = by_uid(score_round(rm(table()), ScoringConfig(min_specificity_t=3.0)))
    assert s[1].score == 0 and "t = 2.50 < 3.0" in s[1].reason
    assert s[0].score > 0


def _work_round(steps: list[float], a: float = A, b: float = B):
    """One round of peers whose held-out gain is 0.01 × steps^a and specificity 0.001 × steps^b on every
    assigned page (±1 % so t is finite); no cross references (control pages give the generic gain, 0)."""
    peers = []
    for i, s in enumerate(steps):
        hg, spec = 0.01 * s**a, 0.001 * s**b
        peers.append(
            peer(
                i,
                heldout=BASE - hg,
                before=5.0,
                after=5.0 - spec,
                own=[spec * 1.01, spec * 0.99],
                ctrl_before=5.0,
                ctrl_after=5.0,
                ctrl=[0.0, 0.0],
            )  # fmt: skip
        )
    return score_round(rm(peers), ScoringConfig(max_specificity_ratio=1e9))


@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_k_hotkeys_splitting_a_machine_earn_what_it_earns_alone(k):
    # one round: the machine as one hotkey, and the same compute split across k more hotkeys
    single, *split = _work_round([64.0] + [64.0 / k] * k)
    assert sum(x.score for x in split) == pytest.approx(single.score, rel=1e-9)


@pytest.mark.parametrize(("ratio", "a", "b"), [(2, A, B), (4, A, B), (4, 0.2, 0.6), (4, 0.5, 1.0)])
def test_pay_follows_compute_as_far_as_the_measures_do(ratio, a, b):
    lo, hi = _work_round([16.0, 16.0 * ratio], a=a, b=b)
    # linear when a + b·q = 1 (what q was calibrated to); otherwise steps^(a + b·q)
    assert hi.score / lo.score == pytest.approx(ratio ** (a + b * P))


def test_identical_work_earns_identical_weights():
    scores = _work_round([32.0] * 4)
    w = normalize_weights({s.uid: s.score for s in scores}, ScoringConfig().burn)
    assert max(w.shares.values()) / min(w.shares.values()) == pytest.approx(1.0)


def test_memorisation_cap_pays_specificity_only_up_to_its_heldout_gain():
    # three peers, spec/hg ratios 1, 1, 20: median 1, cap 3 × hg × 1 → the memoriser is paid 3 × hg
    peers = []
    for i, (hg, spec) in enumerate([(0.1, 0.1), (0.1, 0.1), (0.01, 0.2)]):
        peers.append(
            peer(
                i,
                heldout=BASE - hg,
                before=5.0,
                after=5.0 - spec,
                own=[spec * 1.01, spec * 0.99],
                ctrl_before=5.0,
                ctrl_after=5.0,
                ctrl=[0.0, 0.0],
            )  # fmt: skip
        )
    s = by_uid(score_round(rm(peers), ScoringConfig()))
    assert s[2].terms["capped"] is True and s[2].terms["work"] == pytest.approx(0.03)
    # held-out median(0.1, 0.1, 0.01) = 0.1: the memoriser's relative gain is 0.1
    assert s[2].score == pytest.approx(0.1 * 0.03**P) and s[2].reason == "scored"
    assert s[0].terms["capped"] is False and s[0].score == pytest.approx(0.1**P)


def test_work_on_other_pages_earns_nothing_and_partial_work_earns_its_share():
    # own-page gains no better than generic (random-data): refused; half the specificity: (1/2)^p of the pay
    full = _work_round([32.0])[0]
    p = peer(0, heldout=BASE - 0.1, before=5.0, after=4.9, own=[0.1, 0.1], ctrl_before=5.0, ctrl_after=4.9,
             ctrl=[0.1, 0.1])  # fmt: skip
    s = score_round(rm([p]), ScoringConfig())[0]
    assert s.score == 0 and "not trained on its assigned pages" in s.reason
    spec = full.terms["specificity"]
    h = spec / 2
    half = peer(0, heldout=BASE - 0.1, before=5.0, after=5.0 - h, own=[h * 1.01, h * 0.99], ctrl_before=5.0,
                ctrl_after=5.0, ctrl=[0.0, 0.0])  # fmt: skip
    assert score_round(rm([half]), ScoringConfig())[0].score == pytest.approx(full.score * 0.5**P)


# ------------------------------------------------------------------------------------------- the harness


def test_per_peer_args_reach_only_their_peer(tmp_path):
    from launch.config import load_launch_config
    from launch.local_subnet import LocalSubnet, Participant

    cfg = load_launch_config(None, {"peers": 2, "per_peer_args": [["--max-inner-steps", "8"]]})
    sub = LocalSubnet(cfg, run_dir=tmp_path / "run")
    p0, p1 = (Participant(name=f"peer-{i}", role="peer", behaviour="honest", home=tmp_path) for i in (0, 1))
    assert sub.own_peer_args(p0) == ["--max-inner-steps", "8"] and sub.own_peer_args(p1) == []
    for bad, msg in (([["-x"], ["-y"], ["-z"]], "3 entries for 2 peer"), ([["--a", 3]], "list of strings")):
        with pytest.raises(ConfigError, match=msg):
            load_launch_config(None, {"peers": 2, "per_peer_args": bad})


def test_benchmark_scenarios_and_figures():
    from benchmarks.incentive import figures, scenario_budgets, worst

    assert scenario_budgets("compute", 16) == [("1x", 16), ("2x", 32), ("4x", 64)]
    assert scenario_budgets("sybil5", 16) == [("single", 64)] + [("sybil", 13)] * 5
    assert sum(s for _, s in scenario_budgets("sybil3", 16)[1:]) == 63  # 64 split three ways, rounded
    labels = {"a": "single", "b": "sybil", "c": "sybil"}
    assert figures({"a": 0.5, "b": 0.3, "c": 0.2}, labels) == {"sybil": pytest.approx(1.0)}
    assert figures({"a": 0.2, "b": 0.3, "c": 0.5}, {"a": "1x", "b": "2x", "c": "4x"}) == {
        "2x": pytest.approx(1.5),
        "4x": pytest.approx(2.5),
    }
    assert worst([2.0, None, 3.0], "2x") == 0.0 and worst([0.9, 1.2], "sybil") == 1.2


def test_weak_references_are_scaled_up_at_most_max_reference_scale():
    # u0 removes 0.05 nats of held-out loss, u1 and u2 only 0.005 (small Δs late in a run): their gains on
    # u0's pages (0.004 each) scaled by 0.05 / 0.005 = 10 would claim a generic gain of 0.04 there.
    # Bounded to 4: generic 0.016, d = [0.05 − 0.016, 0.04 − 0.016], specificity 0.029.
    def peers():
        return [
            peer(0, heldout=BASE - 0.05, before=5.0, after=4.955, own=[0.05, 0.04],
                 cross=[(1, [0.004, 0.004]), (2, [0.004, 0.004])]),
            peer(1, heldout=BASE - 0.005, before=5.0, after=4.99, own=[0.01, 0.01],
                 cross=[(0, [0.01, 0.01]), (2, [0.001, 0.001])]),
            peer(2, heldout=BASE - 0.005, before=5.0, after=4.99, own=[0.01, 0.01],
                 cross=[(0, [0.01, 0.01]), (1, [0.001, 0.001])]),
        ]  # fmt: skip

    clip = ScoringConfig(reference_out_of_scale="clip")
    s = by_uid(score_round(rm(peers()), clip))
    assert s[0].terms["generic_gain"] == pytest.approx(0.016)
    assert s[0].terms["specificity"] == pytest.approx(0.029)
    unbounded = by_uid(score_round(rm(peers()), ScoringConfig(max_reference_scale=float("inf"))))
    assert unbounded[0].terms["specificity"] == pytest.approx(0.005)
    # the default drops both (a ×4 reference still under-estimates a 10× larger Δ's generic gain) and
    # falls back to u0's own gain on control pages: 0.045 − 0.011
    ps = peers()
    ps[0].control_loss_before, ps[0].control_loss_after, ps[0].control_page_gains = 5.0, 4.989, [0.01, 0.012]
    d = by_uid(score_round(rm(ps), ScoringConfig()))[0].terms
    assert d["references_dropped"] == 2 and d["generic_basis"] == "its own gain on control pages"
    assert d["specificity"] == pytest.approx(0.034)
    # u1's reference u0 (0.005 / 0.05 = 1/10) is dropped too; u2 (ratio 1) stays
    assert by_uid(score_round(rm(ps), ScoringConfig()))[1].terms["references_dropped"] == 1
    with pytest.raises(ConfigError):
        ScoringConfig(max_reference_scale=0.5)


# ------------------------------------------------------------------- pooled assignment evidence (#18)

DEFAULT = ScoringConfig()


@pytest.mark.parametrize(
    ("prior", "t_now", "passes", "factor", "pooled", "k"),
    [
        ([], 1.6, True, 1.0, 1.6, 1),  # a new hotkey: the single-round test
        ([], 1.4, False, 0.0, 1.4, 1),
        ([2.0, 2.5], 1.0, True, 1.0 / 1.5, 5.5 / 3**0.5, 3),  # a weak round of a consistent peer: paid 2/3
        ([3.0, 3.0, 3.0], 0.3, True, 0.2, 9.3 / 2, 4),  # rides on history: paid only its own evidence
        ([0.2, -0.5, 0.4], 1.2, False, 0.0, 1.3 / 2, 4),  # noise history does not add up
        ([-1.0, -1.0, -1.0], 2.0, True, 1.0, -0.5, 4),  # a round that proves itself passes alone
        ([-1.0, -1.0, -1.0], 1.4, False, 0.0, -0.8, 4),  # … a weak one after weak rounds does not
        ([50.0], 0.5, True, 0.5 / 1.5, 3.5 / 2**0.5, 2),  # one huge t counts as 3
        ([1.0, 1.0, 1.0], 2.0, True, 1.0, 5.0 / 2, 4),
        ([], None, True, 1.0, None, 0),  # no per-page t (control-page fallback without t): not tested
    ],
)
def test_assignment_test_table(prior, t_now, passes, factor, pooled, k):
    got = assignment_test(prior, t_now, DEFAULT)
    assert got[0] is passes and got[1] == pytest.approx(factor) and got[3] == k
    assert got[2] == (None if pooled is None else pytest.approx(pooled))


def test_one_evidence_round_is_the_single_round_test():
    one = ScoringConfig(evidence_rounds=1)
    assert assignment_test([], 1.0, one)[0] is False
    s = score_round(rm(table()), ScoringConfig(min_specificity_t=3.0, evidence_rounds=1), history=history())
    assert by_uid(s)[1].score == 0
    for bad in ({"evidence_rounds": 0}, {"evidence_rounds": MAX_EVIDENCE + 2}, {"evidence_t_clip": 0.0}):
        with pytest.raises(ConfigError):
            ScoringConfig(**bad)


def history(hotkey="hk1", evidence=(3.0, 3.0)) -> EmaState:
    return EmaState(
        last_round=2, entries={1: EmaEntry(hotkey=hotkey, value=0.1, rounds=2, evidence=list(evidence))}
    )


def test_score_round_pools_the_hotkeys_earlier_rounds():
    # table(): u1 has t 2.5 this round (specificity 0.125, relative held-out gain 0.5). At a gate of 3 it
    # fails alone; with two earlier rounds at t 3: pooled (3 + 3 + 2.5) / √3 = 4.907 ≥ 3, paid 2.5 / 3.
    cfg = ScoringConfig(min_specificity_t=3.0)
    alone = by_uid(score_round(rm(table()), cfg))[1]
    assert alone.score == 0 and "t = 2.50 < 3.0" in alone.reason
    s = by_uid(score_round(rm(table()), cfg, history=history()))
    assert s[1].reason == "scored"
    assert s[1].terms["pooled_t"] == pytest.approx(8.5 / 3**0.5) and s[1].terms["pooled_rounds"] == 3
    assert s[1].terms["evidence_factor"] == pytest.approx(2.5 / 3.0)
    assert s[1].score == pytest.approx(0.5 * 0.125**P * 2.5 / 3.0)
    assert s[0].score == by_uid(score_round(rm(table()), cfg))[0].score  # others: no history, unchanged
    # a weak history refuses with the pooled figure in the reason
    weak = by_uid(score_round(rm(table()), cfg, history=history(evidence=(0.0, -1.0))))[1]
    assert weak.score == 0 and "pooled over 3 rounds 0.87 < 3.0" in weak.reason
    # another hotkey on the uid (re-registered) starts without evidence
    assert by_uid(score_round(rm(table()), cfg, history=history(hotkey="other")))[1].score == 0
    # the old rule ignores history
    assert score_round(rm(table()), HELDOUT, history=history()) == score_round(rm(table()), HELDOUT)


def test_update_ema_keeps_each_hotkeys_evidence():
    uids = {u: f"hk{u}" for u in range(9)}
    prev = EmaState(
        last_round=2,
        entries={
            0: EmaEntry(hotkey="hk0", value=0.0, evidence=[1.0] * MAX_EVIDENCE),
            1: EmaEntry(hotkey="old", value=0.3, evidence=[2.0]),
            5: EmaEntry(hotkey="hk5", value=0.1, evidence=[1.5]),
        },
    )
    scores = score_round(rm(table()), DEFAULT, history=prev)
    new = update_ema(prev, 3, scores, uids, alpha=0.3, not_sampled={})
    # u0's t 4.33 is kept clipped to 3, the oldest dropped; u1 changed hotkey: only this round's 2.5;
    # u2 was refused (specificity 0) and its t 0 is kept too; u5 failed the norm gate: no new evidence
    assert new.entries[0].evidence == [1.0] * (MAX_EVIDENCE - 1) + [3.0]
    assert new.entries[1].evidence == [pytest.approx(2.5)]
    assert new.entries[2].evidence == [0.0]
    assert new.entries[5].evidence == [1.5] and new.entries[8].evidence == []
    skipped = update_ema(new, 4, [], uids, alpha=0.3, not_sampled={0: "not sampled"})
    assert skipped.entries[0].evidence == new.entries[0].evidence  # left out by the budget: kept
    assert EmaState.from_json(new.to_json()) == new
    old_json = {"last_round": 1, "entries": {"0": {"hotkey": "hk0", "value": 0.5, "rounds": 1}}}
    assert EmaState.from_json(old_json).entries[0].evidence == []  # state written before the knob


def test_a_peer_that_does_not_train_earns_a_negligible_share():
    # Monte Carlo of benchmarks/incentive.py on an honest t distribution like a 13-step hotkey's
    # (median 3.5, a few weak rounds): a peer that never trains earns a few % of an honest one (a bit more
    # than under the single-round test: its lucky noise can pool too, at a shrunk pay); one that coasts
    # 3 rounds in 4 earns about its training share.
    from benchmarks.incentive import non_trainer_pay

    honest = [-0.7, 0.75, 1.9, 2.6, 3.0, 3.5, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0]
    one = ScoringConfig(evidence_rounds=1)
    never = non_trainer_pay(DEFAULT, honest, (False,), rounds=20_000)
    single = non_trainer_pay(one, honest, (False,), rounds=20_000)
    assert never["income"] < 0.07 and never["off_pass_rate"] < 0.12
    assert single["income"] < never["income"] < 1.5 * single["income"]
    coast = non_trainer_pay(DEFAULT, honest, (True, False, False, False), rounds=20_000)
    assert 0.25 <= coast["income"] < 0.25 + 0.75 * 0.12
