"""Red-team figures: scoring attacks in thin or attacker-dominated rounds (pure functions, no model).

    .venv/bin/python benchmarks/thin_rounds.py

Four attacks found by a red team of ``validator.scoring`` on 2026-12-06, each rebuilt from hand-made
measurements (realistic magnitudes: held-out gains 0.01–0.04 nats, per-page noise ±0.01, 24 assigned
pages) and scored by the real :func:`validator.scoring.score_round`, next to the same round without the
attack. What makes them reachable: every evaluated page (assigned subset, control, held-out) and the
cross-reference ring derive from the round's seed, known when training starts.

1. a noisy copy C = (Δ_H + N)/√2 (cosine 0.71, under every copy threshold) used as H's reference erases
   H's specificity (2-peer round: H paid 0; 3-peer round: H's share 0.47 → 0.35);
2. three non-training sybils whose Δs ascend on each other's known pages and memorise the honest
   peer's known pages: the honest peer 0, the sybils paid;
3. the memorisation cap's reference (the round's median specificity ÷ held-out gain) is set by the
   round's own peers, decoys that fail the assignment test included;
4. two junk hotkeys R1 = Δ_H + X, R2 = Δ_H − X (both refused) get a weak honest peer refused as "a
   combination of other peers' Δs" in the second tier.

Fixed: 3 for decoys that fail the assignment test (``cap_median_of_passers``). Open (benchmarks/RESULTS.md,
"Red team of thin rounds"): 1, 2 and 4, and 3 when memorisers are the majority of passing peers. The
evaluated pages are now drawn with the end-of-round key (``validator.evaluation.page_pick``), which a
reference test would need; ``ScoringConfig.reference_bias_t`` is such a test, off by default (its
docstring says why): set it in ``CFG`` to see what it does here. A line "now" that matches its "before"
means the attack still works.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import random

import torch

from validator.ema import EmaEntry, EmaState
from validator.evaluation import PeerMeasurement, RoundMeasurements
from validator.scoring import BurnPolicy, ScoringConfig, normalize_weights, score_round
from validator.sketches import span_measurements

BASE = 4.0
K = 24  # eval.assigned_pages
rng = random.Random(1)


def pages(mean, sd=0.01, k=K):
    return [mean + rng.gauss(0, sd) for _ in range(k)]


def peer(uid, hg, own, cross, norm=10.0, opp=None, similar=(), ctrl=None):
    """own: per-page gains on its assigned pages; cross: {ref uid: per-page gains of ref's Δ on them};
    ctrl: its gains on the round's 8 control pages (the reference of last resort; default: generic gains
    in proportion to its held-out gain, as for a Δ trained on none of them)."""
    if ctrl is None:
        ctrl = [max(hg, 0.0) * (1 + rng.gauss(0, 0.3)) + rng.gauss(0, 0.01) for _ in range(8)]
    return PeerMeasurement(
        control_page_gains=list(ctrl),
        control_loss_before=5.0 if ctrl else None,
        control_loss_after=5.0 - sum(ctrl) / len(ctrl) if ctrl else None,
        uid=uid,
        hotkey=f"hk{uid}",
        status="ok",
        pages_match=True,
        delta_norm=norm,
        heldout_loss=BASE - hg,
        heldout_loss_opposite=BASE + hg,
        assigned_loss_before=5.0,
        assigned_loss_after=5.0 - sum(own) / len(own),
        assigned_page_gains=list(own),
        cross_gains=[
            {"uid": u, "hotkey": f"hk{u}", "gain": sum(g) / len(g), "page_gains": list(g)}
            for u, g in cross.items()
        ],
        similar=list(similar),
    )


def rm(peers, r=7):
    return RoundMeasurements(
        round=r,
        seed_hex="00",
        base_state_hash="0" * 64,
        delta_scale=0.5,
        heldout_page_ids=list(range(16)),
        heldout_loss_base=BASE,
        control_page_ids=[],
        peers=peers,
    )


CFG = ScoringConfig(max_delta_norm=10.0)
"""The shipped rule."""
BEFORE = ScoringConfig(max_delta_norm=10.0, cap_median_of_passers=False)
"""The rule before the red team: every peer that passed the solo gates is a reference."""


def _formatter(t: dict):
    def f(k: str) -> str:
        return "None" if t.get(k) is None else f"{t[k]:+.4f}"

    return f


def show(title, peers, cfg=CFG, history=None):
    """Score ``peers`` under the shipped rule, with each one's share under the rule before beside it."""
    s = score_round(rm(peers), cfg, history)
    before = score_round(rm(peers), BEFORE, history)
    w = normalize_weights({x.uid: x.score for x in s}, BurnPolicy())
    w0 = normalize_weights({x.uid: x.score for x in before}, BurnPolicy())
    print(f"== {title}")
    for x in s:
        t = x.terms
        f = _formatter(t)
        print(
            f"  uid {x.uid}: share {w.shares.get(x.uid, 0):.2f} (before {w0.shares.get(x.uid, 0):.2f}) score "
            f"{x.score:.4f} spec {f('specificity')} t {f('specificity_t')} work {f('work')} capped "
            f"{t.get('capped')} | {x.reason[:70]}"
        )
    return s


def attack_1() -> None:
    # A noisy, norm-preserving copy of H's Δ (C = (Δ_H + N)/√2, |N| = |Δ_H|: cosine 0.71, under every copy
    # threshold) used as H's cross reference: its gains on H's pages, × hg_H/hg_C = √2, ARE H's gains.
    r2 = 2**0.5
    dH = [1 + rng.gauss(0, 0.3) for _ in range(K)]  # page difficulty of H's 24 eval pages
    dX = [1 + rng.gauss(0, 0.3) for _ in range(K)]  # ... of the other peer's pages
    H_own = [0.02 * d + 0.03 + rng.gauss(0, 0.01) for d in dH]  # generic + learned its pages
    H_on_X = [0.02 * d + rng.gauss(0, 0.01) for d in dX]
    X_on_H = [0.02 * d + rng.gauss(0, 0.01) for d in dH]
    H2_own = [0.02 * d + 0.03 + rng.gauss(0, 0.01) for d in dX]
    # every Δ's generic gains on the round's 8 control pages (trained on none of them)
    dC = [1 + rng.gauss(0, 0.3) for _ in range(8)]
    ctrl = {u: [hg * d + rng.gauss(0, 0.01) for d in dC] for u, hg in ((1, 0.02), (2, 0.02), (9, 0.02 / r2))}
    show(
        "baseline: H (uid 1) + honest H2 (uid 2)",
        [peer(1, 0.02, H_own, {2: X_on_H}, ctrl=ctrl[1]), peer(2, 0.02, H2_own, {1: H_on_X}, ctrl=ctrl[2])],
    )
    C_on_H = [g / r2 + rng.gauss(0, 0.002) for g in H_own]
    C_own = [g / r2 + rng.gauss(0, 0.002) for g in H_on_X]
    show(
        "attack, 2-peer round: H + noisy copy C (uid 9)",
        [
            peer(1, 0.02, H_own, {9: C_on_H}, ctrl=ctrl[1]),
            peer(9, 0.02 / r2, C_own, {1: H_on_X}, ctrl=ctrl[9]),
        ],
    )
    show(
        "attack, 3-peer round: H + H2 + C (H's refs: H2 and C)",
        [
            peer(1, 0.02, H_own, {2: X_on_H, 9: C_on_H}, ctrl=ctrl[1]),
            peer(2, 0.02, H2_own, {1: H_on_X, 9: [g / r2 for g in H_on_X]}, ctrl=ctrl[2]),
            peer(9, 0.02 / r2, C_own, {1: H_on_X, 2: H_on_X}, ctrl=ctrl[9]),
        ],
    )


def attack_2() -> None:
    # 1 honest H (uid 1) + 3 sybils (uids 11-13) that never train on their own pages. Every eval page is known
    # when training starts (eval_pages(r, seed, ...), seed = the round's first block hash), and so is the
    # cross-reference ring (sorted by _h(round, seed, hotkey)): here H -> S1 -> S2 -> S3 -> H, each Δ measured
    # on its 2 successors' pages, so refs(H)={S2,S3}, refs(S1)={S3,H}, refs(S2)={H,S1}, refs(S3)={S1,S2}.
    # Sybil Δ = generic training (hg 0.015) + a few ascent steps on the sybil targets' 24 eval pages (-0.04
    # there) + memorising H's 24 eval pages (+0.05 there) when H is its target.
    d = {u: [1 + rng.gauss(0, 0.3) for _ in range(K)] for u in (1, 11, 12, 13)}

    def gen(s, u):
        return [s * x + rng.gauss(0, 0.01) for x in d[u]]  # a Δ of strength s on u's pages, untrained

    H_own = [0.02 * x + 0.03 + rng.gauss(0, 0.01) for x in d[1]]

    def asc(u):
        return [g - 0.04 for g in gen(0.015, u)]

    def mem(u):
        return [g + 0.05 for g in gen(0.015, u)]

    honest_round = [
        peer(1, 0.02, H_own, {12: gen(0.015, 1), 13: gen(0.015, 1)}),
        peer(11, 0.015, gen(0.015, 11), {13: gen(0.015, 11), 1: gen(0.02, 11)}),
        peer(12, 0.015, gen(0.015, 12), {1: gen(0.02, 12), 11: gen(0.015, 12)}),
        peer(13, 0.015, gen(0.015, 13), {11: gen(0.015, 13), 12: gen(0.015, 13)}),
    ]
    show("baseline: 3 non-training sybils, no collusion", honest_round)
    show(
        "attack: same non-trainers, colluding references",
        [
            peer(1, 0.02, H_own, {12: mem(1), 13: mem(1)}),
            peer(11, 0.015, gen(0.015, 11), {13: asc(11), 1: gen(0.02, 11)}),
            peer(12, 0.015, gen(0.015, 12), {1: gen(0.02, 12), 11: asc(12)}),
            peer(13, 0.015, gen(0.015, 13), {11: asc(13), 12: asc(13)}),
        ],
    )


def attack_3() -> None:
    # The memorisation cap's reference is the round's median specificity/held-out ratio over peers that passed
    # the gates so far (scoring.py:574-582) -- peers that go on to FAIL the assignment test included.
    # (a) raising the median: memorisers uncapped once they are the majority
    # (b) lowering it: decoys with a tiny positive specificity that fail t (score 0, cost nothing) cap honest
    # peers, so a worker W (uid 20) with a big generic held-out gain and little own-page work overtakes them
    d = {u: [1 + rng.gauss(0, 0.3) for _ in range(K)] for u in range(1, 30)}

    def mk(u, hg, spec, refs, sd=0.01):
        own = [hg * x + spec + rng.gauss(0, sd) for x in d[u]]
        return peer(u, hg, own, {r: [0.02 * x + rng.gauss(0, sd) for x in d[u]] for r in refs})

    def M(u):
        return mk(u, 0.015, 0.15, [1, 2])

    def H2(u, o):
        return mk(u, 0.02, 0.03, o)  # same compute spent memorising its 24 known eval pages

    show(
        "(a) 4 honest + 1 memoriser (uid 11)",
        [H2(1, [2, 3]), H2(2, [3, 4]), H2(3, [4, 1]), H2(4, [1, 2]), M(11)],
    )
    show("(a) 2 honest + 3 memorisers (uids 11-13)", [H2(1, [2, 11]), H2(2, [1, 12]), M(11), M(12), M(13)])
    W = mk(20, 0.04, 0.006, [1, 2], sd=0.004)

    def D(u):
        return mk(u, 0.02, 0.0003, [1, 2], sd=0.002)

    show("(b) 2 honest + worker W", [H2(1, [2, 20]), H2(2, [1, 20]), W])
    show(
        "(b) 2 honest + worker W + 4 decoys (uids 21-24)",
        [H2(1, [2, 20]), H2(2, [1, 20]), W, D(21), D(22), D(23), D(24)],
    )


def attack_4() -> None:
    # Two junk hotkeys R1 = Δ_H + X, R2 = Δ_H − X (X a large harmful direction: both refused for raising the
    # held-out loss) put Δ_H in the span of "refused" Δs. H's originality is below combination_trust_t = 3 in its
    # first round (≤ 3/√4) and every round for a small peer whose t is ~2.5, so the second tier refuses it,
    # even though no other weak peer is dependent (the knob's doc says "only when it ranks below another
    # dependent peer").
    def spans(vecs):
        rot = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(7)).double())[0]
        out = span_measurements(
            {(u, f"hk{u}"): rot @ torch.tensor(v, dtype=torch.float64) for u, v in vecs.items()}
        )
        return {k[0]: v for k, v in out.items()}

    dH = [1 + rng.gauss(0, 0.3) for _ in range(K)]
    d2 = [1 + rng.gauss(0, 0.3) for _ in range(K)]
    H = peer(
        1,
        0.01,
        [0.01 * x + 0.006 + rng.gauss(0, 0.012) for x in dH],
        {2: [0.02 * x + rng.gauss(0, 0.01) for x in dH]},
    )
    H2 = peer(
        2,
        0.02,
        [0.02 * x + 0.03 + rng.gauss(0, 0.01) for x in d2],
        {1: [0.01 * x + rng.gauss(0, 0.01) for x in d2]},
    )
    R1, R2 = peer(7, -0.05, pages(0.0), {}), peer(8, -0.05, pages(0.0), {})
    sp = spans(
        {1: [1, 0, 0, 0, 0, 0], 2: [0, 1, 0, 0, 0, 0], 7: [1, 0, 1.5, 0, 0, 0], 8: [1, 0, -1.5, 0, 0, 0]}
    )
    for p in (H, H2, R1, R2):
        p.span = sp[p.uid]
    hist = EmaState(
        last_round=6,
        entries={
            1: EmaEntry(hotkey="hk1", value=0.05, rounds=3, evidence=[2.4, 2.6, 2.5]),
            2: EmaEntry(hotkey="hk2", value=0.1, rounds=3, evidence=[3.0, 3.0, 3.0]),
        },
    )
    show("without the junk pair", [H, H2], history=hist)
    show("with R1 = H + X, R2 = H - X (uids 7, 8)", [H, H2, R1, R2], history=hist)


def main() -> int:
    for i, attack in enumerate((attack_1, attack_2, attack_3, attack_4), 1):
        print(f"\n######## attack {i}")
        attack()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
