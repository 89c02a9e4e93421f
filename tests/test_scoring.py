"""Table tests of validator.scoring with hand-computed values (pure functions, no model)."""

from __future__ import annotations

import math

import pytest

from validator.ema import EmaEntry, EmaState, update_ema
from validator.evaluation import PeerMeasurement, RoundMeasurements
from validator.evidence import originality_evidence
from validator.scoring import (
    BurnPolicy,
    PeerScore,
    ScoringConfig,
    normalize_weights,
    quantile,
    score_round,
)

BASE = 5.0
HELDOUT = ScoringConfig(reward="heldout")
"""The rule before issue #18 (held-out gain × assignment factor), still selectable and replayable."""


def peer(
    uid,
    *,
    heldout=None,
    before=None,
    after=None,
    own=(),
    cross=(),
    norm=1.0,
    status="ok",
    similar=(),
    pages_match=True,
    ctrl_before=None,
    ctrl_after=None,
    ctrl=(),
):
    """``own``: per-page gains on its assigned pages; ``cross``: (uid, [per-page gains of uid's Δ on them])."""
    return PeerMeasurement(
        uid=uid, hotkey=f"hk{uid}", status=status, reason="" if status == "ok" else "because", delta_norm=norm,
        heldout_loss=heldout, assigned_loss_before=before, assigned_loss_after=after,
        control_loss_before=ctrl_before, control_loss_after=ctrl_after, pages_match=pages_match,
        assigned_page_gains=list(own), control_page_gains=list(ctrl),
        cross_gains=[{"uid": u, "hotkey": f"hk{u}", "gain": sum(g) / len(g), "page_gains": list(g)} for u, g in cross],
        similar=list(similar),
    )  # fmt: skip


def rm(peers, round_=3):
    return RoundMeasurements(round=round_, seed_hex="00", base_state_hash="0" * 64, delta_scale=0.5,
                             heldout_page_ids=[1], heldout_loss_base=BASE, control_page_ids=[2], peers=peers)  # fmt: skip


def table():
    # Two assigned pages each. Cross gains are rescaled by (own held-out gain / theirs), then per page the
    # median (of two = mean) is the generic gain; d = own − generic per page; specificity = mean(d),
    # t = mean / (sd / √2).
    # u0: hg 0.2, own [0.6, 0.4]; u1 (hg 0.1) [0.1, 0.1]×2 = [0.2, 0.2]; u2 (hg 0.2) [0.2, 0.1]
    #     generic [0.2, 0.15]; d [0.4, 0.25]; spec 0.325; sd 0.106066; t = 0.325 / 0.075 = 4.3333
    # u1: hg 0.1, own [0.25, 0.15]; u0 [0.2, 0.2]×0.5 = [0.1, 0.1]; u2 [0.1, 0.1]×0.5 = [0.05, 0.05]
    #     generic [0.075, 0.075]; d [0.175, 0.075]; spec 0.125; sd 0.070711; t = 0.125 / 0.05 = 2.5
    # u2: hg 0.2, own [0.1, 0.1]; u0 [0.1, 0.1]; u1 [0.05, 0.05]×2 = [0.1, 0.1]; d [0, 0]; spec 0; t 0
    # reference = 0.75-quantile of [0, 0.125, 0.325] = 0.225
    return [
        peer(0, heldout=4.8, before=5.0, after=4.5, own=[0.6, 0.4], cross=[(1, [0.1, 0.1]), (2, [0.2, 0.1])]),
        peer(1, heldout=4.9, before=6.0, after=5.8, own=[0.25, 0.15], cross=[(0, [0.2, 0.2]), (2, [0.1, 0.1])]),
        peer(2, heldout=4.8, before=4.0, after=3.9, own=[0.1, 0.1], cross=[(0, [0.1, 0.1]), (1, [0.05, 0.05])]),
        peer(3, status="non_finite", norm=float("inf")),
        peer(4, status="rejected", norm=None),
        peer(5, heldout=4.0, before=5.0, after=4.0, norm=100.0),
        peer(6, heldout=BASE, before=5.0, after=5.0, norm=0.0),
        peer(7, heldout=5.3, before=5.0, after=5.2),
        peer(8, heldout=4.8, before=5.0, after=4.6, pages_match=False),
    ]  # fmt: skip


def by_uid(scores: list[PeerScore]) -> dict[int, PeerScore]:
    return {s.uid: s for s in scores}


def test_round_scores_hand_computed():
    s = by_uid(score_round(rm(table()), HELDOUT))
    assert s[0].terms["heldout_gain"] == pytest.approx(0.2)
    assert s[0].terms["generic_gain"] == pytest.approx(0.175)
    assert s[0].terms["specificity"] == pytest.approx(0.325)
    assert s[0].terms["specificity_t"] == pytest.approx(0.325 / 0.075)
    assert s[0].terms["assignment_reference"] == pytest.approx(0.225)
    assert s[0].terms["assignment_factor"] == pytest.approx(0.325 / 0.225)  # above 1, below the cap of 2
    assert s[0].score == pytest.approx(0.2 * 0.325 / 0.225) and s[0].reason == "scored"
    assert s[1].terms["specificity"] == pytest.approx(0.125)
    assert s[1].terms["specificity_t"] == pytest.approx(2.5)
    assert s[1].terms["assignment_factor"] == pytest.approx(0.125 / 0.225)
    assert s[1].score == pytest.approx(0.1 * 0.125 / 0.225)
    assert s[2].terms["specificity"] == pytest.approx(0.0, abs=1e-12)
    assert s[2].terms["specificity_t"] == 0.0
    assert s[2].score == 0 and "not shown to have trained on its assigned pages" in s[2].reason
    assert s[3].score == 0 and "NaN" in s[3].reason
    assert s[4].score == 0 and s[4].reason.startswith("not evaluated")
    assert s[5].score == 0 and "norm 100.0×" in s[5].reason  # median of [1, 1, 1, 100, 1, 1] = 1
    assert s[6].score == 0 and "empty" in s[6].reason
    assert s[7].score == 0 and "does not lower the held-out loss" in s[7].reason
    assert s[8].score == 0 and "not its assignment" in s[8].reason
    # every score carries its terms
    for sc in s.values():
        assert {"heldout_gain", "specificity", "delta_norm", "score"} <= set(sc.terms)


def test_control_pages_are_the_fallback_without_cross_references():
    # ag 0.3 (pages [0.35, 0.25]), cg 0.1 (pages [0.1, 0.1]); Welch t = 0.2 / sqrt(0.005 / 2) = 4
    p = peer(0, heldout=4.9, before=5.0, after=4.7, ctrl_before=5.0, ctrl_after=4.9, own=[0.35, 0.25],
             ctrl=[0.1, 0.1])  # fmt: skip
    s = score_round(rm([p]), HELDOUT)[0]
    assert s.terms["generic_gain"] == pytest.approx(0.1)
    assert s.terms["specificity"] == pytest.approx(0.2)
    assert s.terms["specificity_t"] == pytest.approx(4.0)
    assert s.terms["assignment_reference"] == pytest.approx(0.2)
    assert s.score == pytest.approx(0.1)  # factor 0.2 / 0.2 = 1


def test_assignment_factor_is_capped():
    s = by_uid(score_round(rm(table()), ScoringConfig(reward="heldout", max_assignment_factor=1.0)))
    assert s[0].terms["assignment_factor"] == 1.0 and s[0].score == pytest.approx(0.2)


def test_copies_within_a_round_earn_nothing_for_the_less_specific_one():
    ps = table()[:3]
    ps[0].similar.append({"round": 3, "uid": 9, "hotkey": "hk9", "cosine": 0.999})
    copy = peer(
        9,
        heldout=4.8,
        before=5.0,
        after=4.9,
        own=[0.1, 0.1],
        cross=[(1, [0.1, 0.1]), (2, [0.1, 0.1])],
        similar=[{"round": 3, "uid": 0, "hotkey": "hk0", "cosine": 0.999}],
    )
    s = by_uid(score_round(rm([*ps, copy]), ScoringConfig()))
    assert s[9].score == 0 and "copy of uid 0" in s[9].reason
    assert s[0].score > 0


def test_repeat_of_an_earlier_round_earns_nothing():
    ps = table()[:3]
    ps[1].similar.append({"round": 1, "uid": 4, "hotkey": "hk4", "cosine": 0.97})
    s = by_uid(score_round(rm(ps), ScoringConfig()))
    assert s[1].score == 0 and "from round 1" in s[1].reason
    ps[1].similar[-1]["cosine"] = 0.9  # below duplicate_cosine: not a copy
    assert by_uid(score_round(rm(ps), ScoringConfig()))[1].score > 0


def test_quantile_matches_numpy_linear():
    assert quantile([0.0, 0.125, 0.325], 0.75) == pytest.approx(0.225)
    assert quantile([3.0], 0.3) == 3.0
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == pytest.approx(2.5)


def test_ema_hand_computed():
    state = EmaState(
        last_round=2,
        entries={
            0: EmaEntry(hotkey="hk0", value=0.4, rounds=2),
            1: EmaEntry(hotkey="old", value=1.0, rounds=5),
            5: EmaEntry(hotkey="hk5", value=0.7, rounds=1),
        },
    )
    scores = [
        PeerScore(uid=0, hotkey="hk0", score=0.2, reason="scored"),
        PeerScore(uid=1, hotkey="hk1", score=0.1, reason="scored"),
    ]
    new = update_ema(state, 3, scores, {0: "hk0", 1: "hk1", 2: "hk2"}, alpha=0.5)
    assert new.last_round == 3
    assert new.entries[0].value == pytest.approx(0.3) and new.entries[0].rounds == 3
    assert new.entries[1].value == pytest.approx(0.05) and new.entries[1].rounds == 1  # new hotkey: reset
    assert new.entries[2].value == 0.0  # sent nothing
    assert 5 not in new.entries  # deregistered
    assert update_ema(new, 3, scores, {0: "hk0"}, alpha=0.5) is new  # a round is applied once
    assert EmaState.from_json(new.to_json()) == new


def test_weights_normalisation_and_burn():
    w = normalize_weights({0: 0.3, 1: 0.1, 2: 0.0}, BurnPolicy())
    assert (w.uids, w.weights) == ([0, 1], [65535, 21845])
    assert w.shares[0] == pytest.approx(0.75)
    w = normalize_weights({0: 0.3, 1: 0.1, 2: 0.0}, BurnPolicy(uid=9, fraction=0.2))
    assert (w.uids, w.weights) == ([0, 1, 9], [65535, 21845, 21845])
    assert sum(w.shares.values()) == pytest.approx(1.0)
    w = normalize_weights({0: 0.0, 1: -1.0}, BurnPolicy())
    assert w.empty and "no weights" in w.note
    w = normalize_weights({0: 0.0}, BurnPolicy(uid=0))
    assert (w.uids, w.weights) == ([0], [65535])


def test_bad_configs_are_refused():
    from peer.errors import ConfigError

    with pytest.raises(ConfigError):
        BurnPolicy(fraction=0.1)
    with pytest.raises(ConfigError):
        ScoringConfig(ema_alpha=0)


def test_a_disqualified_copy_cannot_knock_out_the_original():
    ps = table()[:3]
    ps[0].similar.append({"round": 3, "uid": 9, "hotkey": "hk9", "cosine": 1.0})
    scaled_copy = peer(
        9,
        heldout=50.0,
        before=50.0,
        after=1.0,
        norm=100.0,
        similar=[{"round": 3, "uid": 0, "hotkey": "hk0", "cosine": 1.0}],
    )
    s = by_uid(score_round(rm([*ps, scaled_copy]), HELDOUT))
    assert s[9].score == 0 and "norm" in s[9].reason
    assert s[0].score == pytest.approx(0.2 * 0.325 / 0.225)
    s = by_uid(score_round(rm([*ps, scaled_copy]), ScoringConfig()))
    assert s[9].score == 0 and "norm" in s[9].reason
    assert s[0].score > 0 and s[0].reason == "scored"


@pytest.mark.parametrize(
    "norms, bound, refused",
    [
        # the failure seen in the end-to-end test: three Δs in the round, the ×100 one is 4.2× their median
        ([14.9, 63.2, 0.6], 30.0, {1}),
        ([63.2], 30.0, {0}),  # alone: no median at all
        ([30.0 * 1.019, 9.0, 10.0], 30.0, set()),  # clipped to the bound, 8-bit rounding: honest
        ([30.0 * 1.021, 9.0, 10.0], 30.0, {0}),
        ([63.2], None, set()),  # records made before the bound replay unchanged
    ],
)
def test_a_delta_longer_than_the_runs_bound_is_refused_however_few_peers_published(norms, bound, refused):
    ps = [peer(u, heldout=4.8, before=5.0, after=4.5, norm=n) for u, n in enumerate(norms)]
    s = by_uid(score_round(rm(ps), ScoringConfig(max_delta_norm=bound, require_pages_match=False)))
    got = {u for u, sc in s.items() if "max_delta_norm" in sc.reason}
    assert got == refused, {u: sc.reason for u, sc in s.items()}


def test_a_validator_that_falls_behind_audits_an_unpredictable_round():
    from validator.loop import pick_round

    assert pick_round(None, 5, 4, b"s") == 5  # just started: the newest
    assert pick_round(4, 5, 4, b"s") == 5  # keeping up: the newest
    picks = {pick_round(2, 9, 4, bytes([i])) for i in range(64)}
    assert picks == {6, 7, 8, 9}  # behind: any of the last 4 ended rounds, chosen by the seed
    assert pick_round(7, 9, 4, b"s") in (8, 9)  # never one already evaluated


def test_direction_test_pays_only_a_delta_that_beats_its_opposite():
    # u0 of table(): held-out 4.8 at θ − αΔ. Its opposite θ + αΔ at 4.7 (lower: right after an overshooting
    # outer step any move helps, and this Δ points the wrong way) → 0; at 4.9 → scored as before.
    peers = table()
    peers[0].heldout_loss_opposite = 4.7
    s = by_uid(score_round(rm(peers), ScoringConfig()))
    assert s[0].score == 0 and "opposite" in s[0].reason
    assert s[0].terms["direction_margin"] == pytest.approx(-0.1)
    peers = table()
    peers[0].heldout_loss_opposite = 4.9
    s = by_uid(score_round(rm(peers), ScoringConfig()))
    assert s[0].reason == "scored" and s[0].terms["direction_margin"] == pytest.approx(0.1)


# ------------------------------------------------------------------------------- combination copies


def _spans(vectors: dict, earlier=(), dense: bool = True) -> dict:
    """uid → the evaluator's span measurement of these (tiny, hand-made) sketches. ``dense``: rotated by a
    fixed random orthogonal matrix first (same geometry, no zero coordinates: dense Δs); else as given
    (few nonzeros: sparse Δs, each measured on its own support)."""
    import torch

    from validator.sketches import span_measurements

    dim = len(next(iter(vectors.values())))
    rot = torch.eye(dim, dtype=torch.float64)
    if dense:
        rot = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(7)).double())[0]

    def t(v):
        return rot @ torch.tensor(v, dtype=torch.float64)

    sk = {(u, f"hk{u}"): t(v) for u, v in vectors.items()}
    out = span_measurements(sk, [t(e) for e in earlier])
    return {u: out[(u, f"hk{u}")] for u in vectors}


def _copy_peer(uid):
    """A peer that passes the solo gates but shows no work on its pages (t = −T_CAP, see the dup test)."""
    return peer(
        uid, heldout=4.8, before=5.0, after=4.9, own=[0.1, 0.1], cross=[(1, [0.1, 0.1]), (2, [0.1, 0.1])]
    )


def _with_spans(peers, vectors, earlier=(), dense=True):
    spans = _spans(vectors, earlier, dense)
    for p in peers:
        p.span = spans.get(p.uid)
    return peers


@pytest.mark.parametrize(
    "name, copy_vec, explained",
    [
        ("mean of 2", [0.5, 0.5, 0.0], 1.0),
        ("weighted mix", [0.8, 0.2, 0.0], 1.0),
        ("2·A − B", [2.0, -1.0, 0.0], 1.0),
        ("mix + small noise", [1.0, 1.0, 0.1], 2 / 2.01),
    ],
)
def test_a_combination_of_other_peers_deltas_earns_nothing(name, copy_vec, explained):
    # u0 (t 4.33) = A, u1 (t 2.5) = B, u2 independent; u9 (t −1000) is the combination: A, B and u9 are all
    # dependent (A = 2·u9 − B for the mean), and u9 shows the least evidence of own-page work
    ps = _with_spans(
        [*table()[:3], _copy_peer(9)],
        {0: [1.0, 0.0, 0.0, 0.0], 1: [0.0, 1.0, 0.0, 0.0], 2: [0.0, 0.0, 0.0, 1.0], 9: [*copy_vec, 0.0]},
    )
    s = by_uid(score_round(rm(ps), ScoringConfig()))
    assert s[9].score == 0 and "a combination of other peers' Δs" in s[9].reason, name
    assert s[9].terms["combination_explained"] == pytest.approx(explained)
    assert [o["uid"] for o in s[9].terms["combination_of"]] in ([0, 1], [1, 0])
    assert (
        "uid 0" in s[9].reason and "uid 1" in s[9].reason and "t = -1000.00" in s[9].reason
    )  # this round's t is below its sustained one (−3 ÷ √4)
    for u in (0, 1):  # the originals keep their score; without the copy they are independent again
        assert s[u].reason == "scored" and s[u].terms["combination_explained"] == pytest.approx(
            0.0, abs=1e-12
        )
    assert s[0].score == by_uid(score_round(rm(table()[:3]), ScoringConfig()))[0].score


def test_combination_threshold_and_off():
    # u9 = A + B + 0.5·(a direction nobody has): 2 / 2.25 = 0.889 of it lies in the span of A and B
    vecs = {
        0: [1.0, 0.0, 0.0, 0.0],
        1: [0.0, 1.0, 0.0, 0.0],
        2: [0.0, 0.0, 0.0, 1.0],
        9: [1.0, 1.0, 0.5, 0.0],
    }
    ps = _with_spans([*table()[:3], _copy_peer(9)], vecs)
    assert ps[3].span["explained"] == pytest.approx(2 / 2.25)  # least squares on the sketches
    default = by_uid(score_round(rm(ps), ScoringConfig()))[9]
    assert "combination" not in default.reason  # 0.889 < 0.95: (the assignment test refuses it)
    assert default.terms["combination_explained"] == pytest.approx(2 / 2.25)
    assert "combination" in by_uid(score_round(rm(ps), ScoringConfig(combination_fraction=0.85)))[9].reason
    off = by_uid(score_round(rm(ps), ScoringConfig(combination_fraction=None)))[9]
    assert "combination" not in off.reason and "combination_explained" not in off.terms


@pytest.mark.parametrize(
    "evidence, victim",
    [
        ({0: (4.0, 0.3), 1: (3.0, 0.2), 9: (0.5, 0.01)}, 9),  # the copy has the least evidence
        ({0: (4.0, 0.3), 1: (0.2, 0.2), 9: (0.5, 0.01)}, 1),  # ... unless an original shows less (by t)
        ({0: (4.0, 0.3), 1: (0.5, 0.2), 9: (0.5, 0.01)}, 9),  # equal t: the smaller specificity
        ({0: (4.0, 0.3), 1: (None, 0.5), 9: (0.5, 0.01)}, 1),  # no t at all counts as the least
        ({0: (1.0, 0.3), 1: (1.0, 0.3), 9: (1.0, 0.3)}, 9),  # all equal: the higher uid
    ],
)
def test_combination_copies_removes_the_dependent_peer_with_the_least_evidence(evidence, victim):
    from validator.combinations import combination_copies

    spans = {(u, f"hk{u}"): sp for u, sp in _spans({0: [1.0, 0.0], 1: [0.0, 1.0], 9: [1.0, 1.0]}).items()}
    ev = {(u, f"hk{u}"): e for u, e in evidence.items()}
    refused, left = combination_copies(spans, list(spans), ev, 0.95)
    assert list(refused) == [(victim, f"hk{victim}")]  # one removal makes the other two independent
    assert refused[(victim, f"hk{victim}")]["explained"] == pytest.approx(1.0)
    # left: A and B (orthogonal, 0) or the copy and an original (at 45°: cos² = 0.5)
    assert all(f == pytest.approx(0.0 if victim == 9 else 0.5, abs=1e-12) for f in left.values())


def test_a_mix_with_earlier_rounds_deltas_is_a_combination_too():
    # earlier round: E1, E2. u9 = E1 + A (A = u0 of this round); u8 = E1 + E2 (a stale mix, nobody's now)
    earlier = [[1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0]]
    vecs = {
        0: [0.0, 0.0, 1.0, 0.0, 0.0],
        1: [0.0, 0.0, 0.0, 1.0, 0.0],
        2: [0.3, 0.0, 0.0, 0.0, 1.0],
        9: [1.0, 0.0, 1.0, 0.0, 0.0],
        8: [1.0, 1.0, 0.0, 0.0, 0.0],
    }
    ps = _with_spans([*table()[:3], _copy_peer(9), _copy_peer(8)], vecs, earlier)
    assert ps[2].span["earlier"] == pytest.approx(0.09 / 1.09)  # u2 leans on E1 a little: not a copy
    s = by_uid(score_round(rm(ps), ScoringConfig()))
    assert (
        "combination" in s[9].reason
        and "uid 0" in s[9].reason
        and "earlier rounds' Δs (alone 50.0%)" in s[9].reason
    )
    assert "combination" in s[8].reason and "earlier rounds' Δs (alone 100.0%)" in s[8].reason
    assert s[8].terms["combination_of"] == []
    assert s[0].reason == s[1].reason == "scored"


def test_sparse_deltas_are_judged_on_their_own_support():
    # On all coordinates the top-k copy u9 keeps only part of A's and B's entries (explained 0.5); on its
    # support its values are exactly (A + B)/2 there. The evaluator measures it on its support.
    vecs = {
        0: [1.0, 1.0, 0.0, 0.0] + [0.0] * 12,
        1: [0.0, 0.0, 1.0, 1.0] + [0.0] * 12,
        2: [0.0] * 15 + [1.0],
        9: [1.0, 0.0, 1.0, 0.0] + [0.0] * 12,
    }
    spans = _spans(vecs, dense=False)
    assert spans[9]["support"] == pytest.approx(2 / 16) and spans[9]["explained"] == pytest.approx(1.0)
    ps = _with_spans([*table()[:3], _copy_peer(9)], vecs, dense=False)
    s = by_uid(score_round(rm(ps), ScoringConfig()))
    assert "combination" in s[9].reason and "uid 0" in s[9].reason and "uid 1" in s[9].reason
    assert s[0].reason == s[1].reason == "scored"
    for p in ps:  # without the support Gram (all coordinates) u9 is only half explained
        p.span.pop("support_gram", None)
        p.span.pop("support_overlap", None)
    s = by_uid(score_round(rm(ps), ScoringConfig()))
    assert "combination" not in s[9].reason and s[9].terms["combination_explained"] == pytest.approx(0.5)


def test_only_eligible_peers_span_and_old_records_score_as_before():
    # a ×100 copy of u0 (refused by the norm gate) neither explains u0 nor is judged; an old record
    # (no span) decodes and scores as before the rule
    scaled = peer(9, heldout=4.0, before=5.0, after=4.0, norm=100.0)
    ps = _with_spans(
        [*table()[:3], scaled],
        {0: [1.0, 0.0, 0.0], 1: [0.0, 1.0, 0.0], 2: [0.0, 0.0, 1.0], 9: [100.0, 0.0, 0.0]},
    )
    s = by_uid(score_round(rm(ps), ScoringConfig()))
    assert "norm" in s[9].reason and s[0].reason == "scored"
    assert s[0].terms["span_explained_all"] == pytest.approx(1.0)  # the measurement sees the copy ...
    assert s[0].terms["combination_explained"] == pytest.approx(0.0, abs=1e-12)  # ... the rule does not
    old = rm(table()).to_json()
    for p in old["peers"]:
        del p["span"]
    before = score_round(RoundMeasurements.from_json(old), ScoringConfig())
    assert [(x.score, x.reason) for x in before] == [
        (x.score, x.reason) for x in score_round(rm(table()), ScoringConfig())
    ]


def test_span_residual_hand_computed():
    from validator.combinations import span_residual

    c = 0.5  # two unit vectors at 60°
    gram = [[1.0, c, c], [c, 1.0, 1.0], [c, 1.0, 1.0]]  # columns 1 and 2 are the same vector
    assert span_residual(gram, 0, [1]) == pytest.approx(1 - c * c)
    assert span_residual(gram, 0, [1, 2]) == pytest.approx(1 - c * c)  # rank-deficient others
    assert span_residual(gram, 1, [2]) == pytest.approx(0.0, abs=1e-12)
    assert span_residual(gram, 0, []) == 1.0


def test_combination_fraction_is_checked():
    from peer.errors import ConfigError

    for bad in (0.3, 1.2):
        with pytest.raises(ConfigError, match="combination_fraction"):
            ScoringConfig(combination_fraction=bad)
    with pytest.raises(ConfigError, match="combination_trust_t"):
        ScoringConfig(combination_trust_t=0.0)
    assert ScoringConfig(combination_fraction=None).combination_fraction is None


def test_a_delta_that_contains_an_honest_sparse_delta_cannot_get_it_refused():
    # u9 = A's values plus entries of its own elsewhere: on A's support it explains A fully, but there it
    # is as explained by A and has less evidence, so A stays; over its own support u9 is half A (< 95 %)
    vecs = {
        0: [1.0, 1.0] + [0.0] * 14,
        1: [0.0, 0.0, 1.0, 1.0] + [0.0] * 12,
        2: [0.0] * 15 + [1.0],
        9: [1.0, 1.0, 0.0, 0.0, 1.0, 1.0] + [0.0] * 10,
    }
    ps = _with_spans([*table()[:3], _copy_peer(9)], vecs, dense=False)
    assert ps[0].span["explained"] == pytest.approx(1.0)  # A alone would look like a copy of u9
    s = by_uid(score_round(rm(ps), ScoringConfig()))
    assert s[0].reason == "scored" and s[1].reason == "scored"
    assert "combination" not in s[9].reason and s[9].terms["combination_explained"] == pytest.approx(0.5)


EVERYONE = {
    0: [1.0, 0.0, 0.0, 0.0, 0.0],
    1: [0.0, 1.0, 0.0, 0.0, 0.0],
    2: [0.0, 0.0, 0.0, 0.0, 1.0],
    7: [0.0, 0.0, 1.0, 0.0, 0.0],
    9: [1.0, 1.0, 1.0, 0.0, 0.0],
}
"""Sketches of a round where u9 is the swarm's average: A (u0), B (u1) and the refused u7, whose Δ has a
direction of its own; u2 is independent."""


def _refused_scaled_peer():
    """u7: refused by the norm test (its Δ still fed the all-reduce, clipped)."""
    return peer(7, heldout=4.0, before=5.0, after=4.0, norm=100.0)


def test_a_copy_of_everyone_including_refused_peers_is_refused_when_its_evidence_is_weak():
    # u9 = the swarm's average (A, B and the refused u7, whose Δ has a direction of its own): only 2/3 of
    # it lies in the span of the eligible peers; with the refused Δs in the span it is all there, and its
    # own-page evidence (t −1000, pooled −3) is below combination_trust_t
    vecs, refused = EVERYONE, _refused_scaled_peer()
    ps = _with_spans([*table()[:3], refused, _copy_peer(9)], vecs)
    s = by_uid(score_round(rm(ps), ScoringConfig()))
    assert "norm" in s[7].reason
    assert s[9].terms["combination_explained"] == pytest.approx(2 / 3)  # the first tier lets it pass
    assert "refused ones included" in s[9].reason and s[9].terms[
        "combination_explained_with_refused"
    ] == pytest.approx(1.0)
    assert all(f"uid {u}" in s[9].reason for u in (0, 1, 7))
    assert s[0].reason == s[1].reason == "scored"
    off = by_uid(score_round(rm(ps), ScoringConfig(combination_trust_t=None)))[9]
    assert "combination" not in off.reason


def test_refused_sybils_cannot_get_a_peer_with_clear_evidence_refused():
    # R1 = A + B + X and R2 = A + B − X (both refused by their norm) put A = (R1 + R2)/2 − B in the span:
    # u0 (t 4.33 ≥ 3) keeps its score; u1 (t 2.5 < combination_trust_t) is refused — the price of the
    # second tier, documented at the knob
    vecs = {
        0: [1.0, 0.0, 0.0, 0.0, 0.0],
        1: [0.0, 1.0, 0.0, 0.0, 0.0],
        2: [0.0, 0.0, 0.0, 0.0, 1.0],
        7: [1.0, 1.0, 1.0, 0.0, 0.0],
        8: [1.0, 1.0, -1.0, 0.0, 0.0],
    }
    r1 = peer(7, heldout=4.0, before=5.0, after=4.0, norm=100.0)
    r2 = peer(8, heldout=4.0, before=5.0, after=4.0, norm=100.0)
    ps = _with_spans([*table()[:3], r1, r2], vecs)
    known = _history({0: [3.0, 3.0, 3.0], 1: [3.0, 3.0, 3.0]})  # both showed their work in earlier rounds
    s = by_uid(score_round(rm(ps), ScoringConfig(), history=known))
    assert s[0].reason == "scored" and s[0].terms["originality_t"] == pytest.approx(4.33, abs=0.01)
    assert "refused ones included" in s[1].reason
    assert (
        by_uid(score_round(rm(ps), ScoringConfig(combination_trust_t=2.0), history=known))[1].reason
        == "scored"
    )
    # new hotkeys are never trusted (evidence ≤ 3 ÷ √4): both are judged, the one with less evidence goes
    # first, and without it u0 is no longer in the span
    new = by_uid(score_round(rm(ps), ScoringConfig()))
    assert new[0].reason == "scored" and "refused ones included" in new[1].reason


def _history(evidence: dict[int, list[float]]) -> EmaState:
    """An EMA state in which hotkey hk<u> of uid u has these earlier assignment-test t's."""
    return EmaState(
        last_round=2,
        entries={
            u: EmaEntry(hotkey=f"hk{u}", value=0.1, rounds=len(ts), evidence=ts) for u, ts in evidence.items()
        },
    )


@pytest.mark.parametrize(
    "prior, t_now, sustained, best",
    [
        ([], 4.33, 1.5, 4.33),  # a new hotkey: at most clip ÷ √evidence_rounds
        ([3.0, 3.0, 3.0], 4.33, 4.33, 6.0),  # this round's t is the lower
        ([3.0, 3.0, 3.0], 2.5, 2.5, 5.75),
        ([-1.71, -3.0], 3.13, (-1.71 - 3.0 + 3.0) / 2, 3.13),  # the copycat paid 0.069 under `best`
        ([2.26], 2.68, (2.26 + 2.68) / 2, (2.26 + 2.68) / 2**0.5),  # a copycat with a positive offset
        (
            [1.0, 3.0, 3.0, 3.0, 3.0],
            3.0,
            3.0,
            16 / 6**0.5,
        ),  # only the last evidence_rounds − 1 earlier rounds
        ([], None, -math.inf, -math.inf),
    ],
)
def test_originality_evidence_table(prior, t_now, sustained, best):
    assert originality_evidence(prior, t_now, ScoringConfig()) == pytest.approx(sustained)
    assert originality_evidence(prior, t_now, ScoringConfig(originality="best")) == pytest.approx(best)


def test_a_copier_of_everyone_with_one_lucky_round_is_refused_and_its_t_is_kept():
    # the run that failed tests/test_validator_swarm.py: the copycat's t reached 3.13 ≥ combination_trust_t
    # in one round after −1.71 and −4.13; under `best` that round was trusted and paid
    vecs, refused = EVERYONE, _refused_scaled_peer()
    lucky = peer(  # own pages gain 0.1 more than the others' (scaled) gains there: t high, no work behind it
        9, heldout=4.8, before=5.0, after=4.7, own=[0.31, 0.3], cross=[(0, [0.1, 0.1]), (1, [0.1, 0.1])]
    )
    ps = _with_spans([*table()[:3], refused, lucky], vecs)
    known = _history({0: [3.0, 3.0, 3.0], 1: [3.0, 3.0, 3.0], 9: [-1.71, -3.0]})
    s = by_uid(score_round(rm(ps), ScoringConfig(), history=known))
    assert s[9].terms["specificity_t"] >= 3
    assert "refused ones included" in s[9].reason and s[9].score == 0
    assert s[0].reason == s[1].reason == "scored"
    assert s[9].terms["evidence_t"] == 3.0  # kept: its next rounds pool with it
    after = update_ema(known, 3, list(s.values()), {u: f"hk{u}" for u in s}, 0.3)
    assert after.entries[9].evidence == [-1.71, -3.0, 3.0]
    old = by_uid(score_round(rm(ps), ScoringConfig(originality="best"), history=known))[9]
    assert old.reason == "scored" and "evidence_t" in old.terms  # the hole, and the old rule's record


def test_a_copier_that_adds_a_little_real_work_goes_before_the_originals():
    # u9 = (A + B)/2 + a little training of its own (e3): its own-page gains sit 0.02 above the generic
    # ones on every page, so its t (41) is far above A's (4.33) and B's (2.5), its specificity (0.0205)
    # far below theirs. Ranked by t, B went first and the copier kept the average's held-out gain; with t
    # capped at the trust bar, the amount of own-page work decides among peers that clear it
    vecs = {
        0: [1.0, 0.0, 0.0, 0.0],
        1: [0.0, 1.0, 0.0, 0.0],
        2: [0.0, 0.0, 0.0, 1.0],
        9: [0.5, 0.5, 0.05, 0.0],
    }
    worker = peer(
        9, heldout=4.8, before=5.0, after=4.8295, own=[0.17, 0.171], cross=[(0, [0.1, 0.1]), (1, [0.1, 0.1])]
    )
    ps = _with_spans([*table()[:3], worker], vecs)
    known = _history({0: [3.0, 3.0, 3.0], 1: [3.0, 3.0, 3.0], 9: [3.0, 3.0, 3.0]})
    cfg = ScoringConfig(combination_trust_t=2.0)
    s = by_uid(score_round(rm(ps), cfg, history=known))
    assert s[9].terms["specificity_t"] > 40 and s[9].terms["specificity"] == pytest.approx(0.0205)
    assert "a combination of other peers' Δs" in s[9].reason and s[9].score == 0
    assert s[0].reason == s[1].reason == "scored"


def test_a_refused_scaled_or_sign_flipped_copy_is_not_a_source():
    # a sign-flip sybil publishes −B (u1, t 2.5 < combination_trust_t) and a scaled one 100·B: both are
    # B's own work, so they do not make B "a combination" (B stays scored)
    vecs = {
        0: [1.0, 0.0, 0.0, 0.0],
        1: [0.0, 1.0, 0.0, 0.0],
        2: [0.0, 0.0, 0.0, 1.0],
        7: [0.0, -1.0, 0.0, 0.0],
        8: [0.0, 100.0, 0.0, 0.0],
    }
    flip = peer(7, heldout=5.2, before=5.0, after=5.1)
    scaled = peer(8, heldout=4.0, before=5.0, after=4.0, norm=100.0)
    ps = _with_spans([*table()[:3], flip, scaled], vecs)
    s = by_uid(score_round(rm(ps), ScoringConfig()))
    assert "held-out" in s[7].reason and "norm" in s[8].reason
    assert s[1].reason == "scored" and s[0].reason == "scored"


def test_a_copy_of_the_support_mean_of_sparse_deltas_earns_nothing():
    """A ``topk_aggregation: support`` swarm applies each coordinate's mean over the peers that sent it.
    A copy of that is not in the span of the sparse Δs (coordinate 2, sent by two peers, is halved and
    the rest is not), so the span tiers miss it; the support-mean geometry (the others divided by how
    many of them sent each coordinate) explains it fully, and the greedy refuses it, not the originals
    it is made of (they are dependent on it there too, and show more evidence)."""
    dim = 24
    rows = {0: {0: 1.0, 1: 0.5, 2: 0.9, 5: 0.7}, 1: {2: 1.0, 3: 1.0, 5: -0.8}, 2: {5: 0.6, 6: 1.0, 7: 0.6}}
    vecs = {u: [r.get(i, 0.0) for i in range(dim)] for u, r in rows.items()}
    senders = [sum(1 for r in rows.values() if i in r) for i in range(dim)]
    vecs[9] = [sum(r.get(i, 0.0) for r in rows.values()) / max(1, senders[i]) for i in range(dim)]
    ps = _with_spans([*table()[:3], _copy_peer(9)], vecs, dense=False)
    assert ps[3].span["explained"] < 0.95 and ps[3].span["support_mean_explained"] == pytest.approx(1.0)
    s = by_uid(score_round(rm(ps), ScoringConfig()))
    assert s[9].score == 0 and "average over each coordinate's senders" in s[9].reason, s[9].reason
    no_tier2 = by_uid(score_round(rm(ps), ScoringConfig(combination_trust_t=None)))[9]
    assert "average over each coordinate's senders" in no_tier2.reason  # independent of the second tier
    off = by_uid(score_round(rm(ps), ScoringConfig(support_mean_fraction=None)))[9]
    assert "average over each coordinate's senders" not in off.reason
    alone = by_uid(score_round(rm(table()[:3]), ScoringConfig()))
    for u in (0, 1, 2):  # as without the copy (u2 shows no specificity in this table)
        assert s[u].reason == alone[u].reason and s[u].score == pytest.approx(alone[u].score), s[u].reason


def test_non_finite_measurements_are_refused_and_cannot_poison_medians_or_the_ema():
    """A finite Δ can overflow the forward pass (values ~1e20: the validator marks it ``non_finite``).
    Records made before that check, or any NaN that reaches scoring, must not pass a "gain ≤ x" gate
    (every comparison with NaN is false), enter the round's medians, turn into t = T_CAP, or stay in the
    EMA: an honest peer beside such a Δ keeps a finite score and weight."""
    nan = float("nan")
    peers = table()[:3] + [
        peer(9, heldout=nan, before=5.0, after=nan, own=[nan, nan], cross=[(0, [0.1, 0.1])]),
        peer(
            10, heldout=4.7, before=5.0, after=4.5, own=[0.3, 0.2], cross=[(0, [0.1, 0.1]), (9, [nan, nan])]
        ),
    ]
    scores = {s.uid: s for s in score_round(rm(peers), ScoringConfig())}
    assert scores[9].score == 0 and "NaN or infinite" in scores[9].reason
    for s in scores.values():
        assert math.isfinite(s.score), (s.uid, s.reason)
        for k in ("heldout_median", "specificity", "specificity_t"):
            assert s.terms.get(k) is None or math.isfinite(s.terms[k]), (s.uid, k)
    assert scores[0].score > 0 and scores[10].score > 0
    # uid 10's NaN reference (uid 9) is not one of its references: uid 0's alone
    assert scores[10].terms["generic_basis"].startswith("median of 1 ")
    # the EMA: a NaN score counts as 0, and the uid's value stays finite
    state = update_ema(
        EmaState(), 1, [PeerScore(uid=0, hotkey="hk0", score=nan, reason="x")], {0: "hk0"}, 0.3
    )
    state = update_ema(
        state, 2, [PeerScore(uid=0, hotkey="hk0", score=1.0, reason="scored")], {0: "hk0"}, 0.3
    )
    assert state.entries[0].value == pytest.approx(0.3)


def test_a_sample_agrees_on_the_state_when_one_hash_holds_the_quorum():
    """Red team: with unanimity required, one sampled hotkey signing a made-up state hash made the
    validator list the whole subnet every round. A hash with ``vote_quorum`` (3/4) of the votes now
    suffices; a real split still lists everyone."""
    from validator.sampling import SamplingConfig, sample_agrees

    q = SamplingConfig().vote_quorum
    table = [
        ({}, False),  # nobody named a state: list everyone
        ({"a": [1] * 16}, True),
        ({"a": [1] * 15, "junk": [2]}, True),  # one liar in a sample of 16
        ({"a": [1] * 12, "b": [2] * 4}, True),  # exactly 3/4
        ({"a": [1] * 11, "b": [2] * 5}, False),
        ({"a": [1] * 8, "b": [2] * 8}, False),
        ({"a": [1], "b": [2]}, False),
    ]
    for votes, want in table:
        assert sample_agrees(votes, q) is want, votes
    assert sample_agrees({"a": [1] * 15, "junk": [2]}, 1.0) is False  # the rule before
    from peer.errors import ConfigError

    with pytest.raises(ConfigError):
        SamplingConfig(vote_quorum=0.5)


OLD_THIN = ScoringConfig(cap_median_of_passers=False)
"""The rule before the red team of thin rounds (2026-12-06, benchmarks/thin_rounds.py)."""


def test_peers_that_fail_the_assignment_test_do_not_set_the_memorisation_cap():
    """Red team: hotkeys with a tiny positive specificity that fail the assignment test (paid 0, free to
    run) made the round's median specificity/held-out ratio ~0 and capped every honest peer's work."""
    decoys = [
        peer(
            u,
            heldout=4.8,
            before=5.0,
            after=4.9,
            own=[0.101, 0.0995],
            cross=[(0, [0.1, 0.1]), (1, [0.05, 0.05])],
        )
        for u in (11, 12, 13)
    ]
    alone = by_uid(score_round(rm(table()[:3]), ScoringConfig()))
    old = by_uid(score_round(rm([*table()[:3], *decoys]), OLD_THIN))
    assert old[0].terms["capped"]  # the attack, under the rule before
    s = by_uid(score_round(rm([*table()[:3], *decoys]), ScoringConfig()))
    for u in (11, 12, 13):
        assert s[u].score == 0 and "not shown to have trained" in s[u].reason
    assert not s[0].terms["capped"] and s[0].terms["work"] == pytest.approx(alone[0].terms["work"])


def _pages(base: float, n: int, wiggle: float = 0.004) -> list[float]:
    """``n`` deterministic page gains around ``base`` (a fixed zig-zag, mean ``base``)."""
    return [base + wiggle * ((-1) ** i) * (1 + (i % 3)) / 2 for i in range(n - n % 2)] + (
        [base] if n % 2 else []
    )


@pytest.mark.parametrize("third_peer", [False, True])
def test_a_reference_that_fits_this_peers_pages_better_than_its_own_control_pages_is_not_used(third_peer):
    """The experimental ``reference_bias_t`` (off by default: see its docstring). Red team: C, a noisy copy of H's Δ ((Δ_H + N)/√2: cosine 0.71, no copy gate fires), was H's cross
    reference; its gains on H's pages, rescaled by the held-out ratio, were H's own, so H showed no
    specificity (paid 0 alone with C; less with a third peer). C does on H's pages what it does nowhere
    else (its control pages): that reference is not used, and H is measured against the rest."""
    h_own = _pages(0.05, 24)  # generic 0.02 + its own pages 0.03
    h = peer(
        1,
        heldout=4.98,
        before=5.0,
        after=4.95,
        own=h_own,
        ctrl=_pages(0.02, 8),
        ctrl_before=5.0,
        ctrl_after=4.98,
    )
    c = peer(9, heldout=4.9859, before=5.0, after=4.986, own=_pages(0.014, 24), ctrl=_pages(0.014, 8))
    h.cross_gains.append(
        {"uid": 9, "hotkey": "hk9", "gain": 0.05 / 2**0.5, "page_gains": [g / 2**0.5 for g in h_own]}
    )
    c.cross_gains.append({"uid": 1, "hotkey": "hk1", "gain": 0.02, "page_gains": _pages(0.02, 24)})
    peers = [h, c]
    if third_peer:
        h2 = peer(
            2,
            heldout=4.98,
            before=5.0,
            after=4.95,
            own=_pages(0.05, 24),
            ctrl=_pages(0.02, 8),
            ctrl_before=5.0,
            ctrl_after=4.98,
        )
        h.cross_gains.append({"uid": 2, "hotkey": "hk2", "gain": 0.02, "page_gains": _pages(0.02, 24)})
        h2.cross_gains.append({"uid": 1, "hotkey": "hk1", "gain": 0.02, "page_gains": _pages(0.02, 24)})
        peers.append(h2)
    cfg = dict(require_pages_match=False)
    old = by_uid(score_round(rm(peers), ScoringConfig(**cfg)))  # the default: the test is off
    s = by_uid(score_round(rm(peers), ScoringConfig(**cfg, reference_bias_t=2.5)))
    assert s[1].terms["references_biased"] == 1
    assert s[1].score > 0 and s[1].terms["specificity"] == pytest.approx(0.03, abs=0.002), s[1].terms
    assert old[1].terms["specificity"] < 0.02  # the attack, with the test off: C halves it or worse
    assert s[9].score == 0
