"""Pure scoring: a round's measurements → round scores → EMA → u16 weights, every term explained.

Nothing here reads a clock, a file or the network: the same measurements give the same scores on every
machine, which is what makes ``validator replay`` and a second validator agree.

Round score of a peer (``explain`` keeps every term)::

    heldout_gain      = heldout_loss_base − heldout_loss(θ_r − α·Δ)          nats/token, > min_heldout_gain
                        (on the round's held-out pages: unseen training pages, assigned to no hotkey this
                        round and drawn after the fetch — ``gain_pages``; validator.evaluation)
                        (overlapped rounds, ``heldout_rule`` "first_order": (L(θ + α·Δ) − L(θ − α·Δ)) / 2,
                        the part of it odd in α; validator.evaluation)
    assigned_gain     = loss before − after on k of its assigned pages
    generic_gain      = median over other eligible peers j of gain_j(its pages) × heldout_gain / heldout_gain_j
                        (what a Δ of its general strength that was *not* trained on these pages achieves
                        there, from ``cross_gains``); without any, its own gain on unassigned control pages
    specificity       = assigned_gain − generic_gain                          it learned *its* pages
                        (computed per assigned page; its one-sample t statistic must reach
                        ``min_specificity_t``: gains on nearly every assigned page, not noise —
                        in this round, or pooled with the hotkey's last rounds, Σt/√k)
    work              = min(specificity, max_specificity_ratio × heldout_gain × the round's median of
                            specificity / heldout_gain)                        the memorisation cap
    relative_gain     = heldout_gain / the round's median heldout_gain of eligible peers
    evidence_factor   = 1 if this round's t ≥ min_specificity_t, else t ÷ min_specificity_t (passed pooled)
    score             = relative_gain × work ** q × evidence_factor     (q = reward_exponent)

Why this product (issue #18, measured in benchmarks/incentive.py on real local subnets, README
"Rewards"): a Δ's held-out gain grows like steps^0.39 (median over 66 rounds), its own-page
specificity like steps^0.84. Paid by the rule before #18 (held-out gain × a clamped factor), k hotkeys splitting
one machine earned up to 2× what the machine earned alone; paid on specificity alone, equal peers'
weights spread (it is the noisy measure, ±25 % a round) and early rounds under-paid big peers. The
product is ~steps^(0.39 + 0.84·q) = steps^1 at q ≈ 0.73: the held-out gain says the work generalises
(and is nearly noise-free among equals), the specificity proves it was done on the pages only this
hotkey was assigned (work on anyone else's pages — random-data, a copy, the average — earns nothing).
Dividing by the round's median held-out gain makes every round count alike in the EMA (the first rounds
of a run remove 10–100× more loss than later ones) without changing who earns what within a round.

The rule before #18 (``reward = "heldout"``, kept for replaying old records and for comparison)::

    reference         = max(min_assignment_reference, q-quantile of the eligible peers' specificity)
    assignment_factor = clamp(specificity / reference, 0, max_assignment_factor)  0 below min_assignment_factor
    score             = heldout_gain × assignment_factor

and 0, with the reason, when any gate fails (checked in this order): not evaluated (missing, rejected,
malformed), NaN/inf, manifest pages not its assignment, empty Δ, norm above ``max_norm_ratio`` × the
round's median, a near-copy (cosine ≥ ``duplicate_cosine``) of an earlier round's Δ, no held-out gain,
its opposite (θ_r + α·Δ) lowering the held-out loss as much (the direction test),
a near-copy of another peer's Δ this round that shows more specificity on its *own* pages (the
original learned its pages; a copier did not — so "the later one earns nothing" without trusting
timestamps), a combination of other peers' Δs (≥ ``combination_fraction`` of it in the span of the
others' and the earlier rounds' Δs, and the dependent peer with the least own-page evidence:
:func:`combination_copies`), no specificity (≤ 0) or one that is not significant (t < ``min_specificity_t``, in the
round and pooled over the hotkey's last ``evidence_rounds`` rounds).

EMA: ``ema ← β·score + (1 − β)·ema`` for every uid of the metagraph that was evaluated this round (a peer
that sent nothing scores 0); a peer with a contribution that the budget left out (validator.sampling,
``not sampled``) keeps its EMA; a uid whose hotkey changed starts again from 0; a round is applied at most
once. The state also keeps each hotkey's last assignment-test t's (the pooled evidence):
``score_round(…, history=state)`` reads them, ``update_ema`` appends this round's.

Weights: the EMA values normalised to shares, with an explicit burn policy (a fixed share to a burn uid,
and all of it when nobody earned anything; without a burn uid such a round sets no weights), then
max-upscaled to u16 as the runtime stores them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from peer.errors import ConfigError
from validator.combinations import combination_copies, source_names, weak_combinations
from validator.ema import MAX_EVIDENCE, EmaState
from validator.evaluation import NON_FINITE_LOSS, PeerMeasurement, RoundMeasurements, heldout_gain
from validator.evidence import (
    assignment_test,
    clip_t,
    originality_evidence,
    prior_evidence,
    t_one,
    t_welch,
)

U16_MAX = 65535
REWARDS = ("specificity", "heldout")
ORIGINALITY = {
    "sustained": "the lower of this round's and that sustained over its recent rounds",
    "best": "best of this round's and pooled",
}
"""``ScoringConfig.originality`` → how a refusal names the evidence it used."""


@dataclass(kw_only=True)
class BurnPolicy:
    """Where weight goes that no peer earned. Explicit: nothing is burned unless configured."""

    uid: int | None = None
    """uid that receives burned weight (on Bittensor subnets, usually the owner's uid 0). None: no burn."""
    fraction: float = 0.0
    """Share of every weight vector given to ``uid`` (0 = burn only when nobody earned anything)."""

    def __post_init__(self) -> None:
        if not 0 <= self.fraction <= 1:
            raise ConfigError(f"burn fraction must be in [0, 1], got {self.fraction}")
        if self.fraction > 0 and self.uid is None:
            raise ConfigError("a burn fraction needs a burn uid (--burn.uid)")
        if self.uid is not None and not 0 <= self.uid <= U16_MAX:
            raise ConfigError(f"burn uid must be a u16, got {self.uid}")


DELTA_NORM_TOLERANCE = 1.02
"""How far above ``max_delta_norm`` a published Δ may be: an 8-bit blockwise Δ clipped to the bound
decodes within ~0.5 % of it (absmax codes round to nearest)."""


@dataclass(kw_only=True)
class ScoringConfig:
    """How measurements become scores. Validators of one subnet should agree on these."""

    max_norm_ratio: float = 12.0
    """A Δ whose L2 norm exceeds this × the round's median norm scores 0 (scaled/poisoned updates). It must
    exceed the compute spread the subnet pays for: honest Δ norms grow about linearly with inner steps once
    a run is under way (benchmarks/incentive.py: 64 vs 13 steps → 5.0–5.5× the norm), so at the old 5× five
    small hotkeys made a peer with 5× their compute "scaled" and took its pay. A ×100 Δ is still caught
    here; a moderately scaled one overshoots and fails the held-out gain or the direction test."""
    min_peers_for_norm: int = 3
    """The norm test needs at least this many finite Δs in the round (with fewer the median means little;
    the absolute bound ``max_delta_norm`` below still holds)."""
    max_delta_norm: float | None = None
    """The run's ``train.max_delta_norm``: every honest peer scales its Δ down to it before publishing
    (and the all-reduce clips to it), so a Δ longer than this × ``DELTA_NORM_TOLERANCE`` (8-bit rounding)
    was not made by the protocol and scores 0. Unlike the test against the round's median it needs no
    other peer: in a round where few peers had published (a slow start on a loaded machine), a ×100 Δ
    was 4× the median of 3 and was paid (``tests/test_validator_swarm.py``, 2026-12-06). The validator
    sets it from the run config it shares with the peers; None: off (records made before it)."""
    duplicate_cosine: float = 0.95
    """Cosine similarity at or above which two Δs count as copies. Honest peers' Δs share a direction
    (cosine ~0.4-0.7 measured on the debug model); raise it if honest peers are flagged as copies."""
    combination_fraction: float | None = 0.95
    """A Δ of which at least this fraction (of its squared sketch norm) lies in the span of other eligible
    peers' Δs of the round and of the earlier rounds' Δs (least squares, ``PeerMeasurement.span``) is a
    combination of their work — an average, a weighted mix, 2·A − B, plus a little noise — and earns
    nothing. Dependence is symmetric (with C = (A + B)/2, A = 2·C − B), so the rule removes, one at a
    time, the dependent peer with the least own-page evidence (assignment-test t: the best of this
    round's and the pooled one; then specificity) and
    measures again (:func:`combination_copies`); a sparse (top-k) Δ is measured on its own support.
    Measured (benchmarks/combination_copies.py, debug model, Δs of 13–64 inner steps on each hotkey's
    pages, 3 rounds × 2–3 trials): honest peers' fraction grows with the round's sample — max 0.62 / 0.74 /
    0.75 / 0.77 / 0.80 for 3 / 5 / 8 / 16 / 32 dense peers, up to 0.85 for 32 top-k peers with the earlier
    rounds' Δs in the span — while a mean, weighted mix or 2·A − B of 8-bit Δs is ≥ 0.9999, with 10 %
    (of its norm) noise 0.989, 20 % 0.958, 30 % 0.91 (escapes; the assignment test is what is left for
    it). Symptom → tuning: honest peers refused with "a combination of other peers' Δs" (large samples,
    a model whose Δs share more of a direction) → raise it towards 1 (after measuring with the
    benchmark); noisy mixes of others' Δs are paid → lower it, keeping it above the honest maximum.
    None: off (records made before this rule are replayed with it off)."""
    combination_trust_t: float | None = 3.0
    """Second tier of the combination test (:func:`weak_combinations`): a peer that survived the first
    is refused when its Δ lies ≥ ``combination_fraction`` in the span of *every* other measured Δ —
    those of peers refused by other gates included — and its own-page evidence (``originality``) is
    below this. It catches a copier of the swarm's averaged Δ, to which refused peers contributed, when
    it passes the assignment test by chance (its t has no work behind it but is not N(0, 1): ≥ 3 in 2 of
    28 measured copycat rounds, see ``originality``). The price: refused sybils that combine honest Δs can
    get an honest peer refused while its t stays below this (honest peers of 13–64 inner steps on the
    debug model showed t 3.7–12 in tests/test_validator_swarm.py; small ones ~2–3 early in a run,
    rising with the pooled evidence). Symptom → tuning: small honest peers refused with "refused ones
    included" → lower it; copies of the swarm's average paid → raise it. None: only the first tier."""
    originality: str = "sustained"
    """The own-page evidence (``trust``) that the combination tests rank peers by, and that lets a peer
    out of the second tier. ``sustained``: the lower of this round's assignment t and the hotkey's
    evidence sustained over its last ``evidence_rounds`` rounds (Σ clipped t ÷ √evidence_rounds, a
    round without a measured t counting 0; :func:`originality_evidence`), and every measured peer's t is
    kept, also when a copy gate refuses it. ``best`` (the rule before): the higher of this round's t and
    the pooled one, and only paid rounds' t's kept. Why: a copier of the swarm's average has no own-page
    work, but its t is not N(0, 1): its per-page gains share a round-level offset (the average against
    the references' scaled gains), so |t| reaches 3–4 (28 copycat rounds in tests/test_validator_swarm.py
    runs: sd ≈ 1.8, 2 at ≥ 3). Under ``best`` one such round took it past ``combination_trust_t`` and
    paid it (weight 0.069 on the ledger, the limit 0.05); under ``sustained`` it must show that in this
    round *and* in earlier ones (about two rounds at ≥ 3), while an honest peer (t 4–14) is trusted from
    its second round on. The price: a hotkey in its first round is never trusted, so refused sybils that
    combine honest Δs can get a new honest peer refused in that round (only when it ranks below another
    dependent peer)."""
    support_mean_fraction: float | None = 0.99
    """Sparse Δs: the combination test in the support-mean geometry (each other Δ divided, coordinate by
    coordinate, by how many of them sent there; ``_support_mean_copies``), which finds a copy of the
    average a ``train.topk_aggregation: support`` swarm applies (1.0000 explained in
    ``benchmarks/combination_copies.py``, where the plain span test saw 0.76–0.80). Higher than
    ``combination_fraction`` because honest sparse Δs show more there: max 0.936 among 16 peers and 0.958
    among 32 with the earlier rounds' Δs (0.77 / 0.85 in the plain geometry; RESULTS "Combination
    copies"): re-measure before raising ``eval.max_peers`` beyond 32. Symptom → tuning: honest sparse peers refused with
    "a copy of the round's average over each coordinate's senders" (larger samples) → raise it towards
    1; None: off."""
    min_heldout_gain: float = 0.0
    """Held-out gain (nats/token) a Δ must exceed to score anything."""
    reference_quantile: float = 0.75
    """Quantile of the eligible peers' specificity used as the full-credit reference. Higher = stricter."""
    min_assignment_reference: float = 0.01
    """Floor of that reference (nats), so a round where nobody trained on its pages pays nobody for it."""
    min_specificity_t: float = 1.5
    """The assignment test must be significant: the per-page specificities (own gain − generic gain on
    each assigned page) need a t statistic of at least this — in the round itself (full pay), or pooled
    with the hotkey's earlier rounds (``evidence_rounds``; pay × t ÷ this). A peer that trained on its
    pages gains on nearly every one of them; noise does not. Single-round test only (benchmarks/incentive.py):
    at 2.0, 5–8 % of honest peer-rounds were refused, at 1.5 3.4–3.5 % out of sample (hotkeys with 13–21
    inner steps a round: t grows like √(pages it touched)). A peer that never trains passes by chance in
    ~7 % of rounds alone (t tail) and ~11 % with pooling, paid its noise-sized specificity (shrunk): ~5 %
    of a 13-step honest peer's pay, ~3 % of a 64-step one's (Monte Carlo on measured t's,
    ``benchmarks/incentive.py --analyse``). Symptom → tuning: honest peers fail with "not shown to have
    trained" → raise ``evidence_rounds`` first (free), then ``eval.assigned_pages`` (validator time), then
    lower this; non-training peers slip through → raise it."""
    evidence_rounds: int = 4
    """The assignment test pools this many of a hotkey's rounds: this round's per-page t statistic and
    those of its last ``evidence_rounds − 1`` rounds that reached the test (kept in the EMA state), combined
    as Σt / √k (Stouffer; each t clipped to ± ``evidence_t_clip``); the pooled value must reach
    ``min_specificity_t``. A non-trainer's t's are noise around 0, so their pooled value is N(0, 1)-like
    however many rounds are pooled: its chance to pass stays the single-round one. A small honest peer's
    t's are all positive (t ≈ √pages-it-touched), so pooling k rounds multiplies its evidence by ~√k.
    Symptom → tuning: small honest hotkeys (13–21 steps a round) refused with "not shown to have
    trained" → raise it (costs nothing at evaluation); a peer that stops training keeps passing on its
    history → lower it (its rounds without training are still paid only their noise-sized specificity
    × the shrink below). 1 = the single-round test (before this knob, issue #18)."""
    evidence_t_clip: float = 3.0
    """Each round's t enters the pooled test clipped to [−this, this], so one very clear round (t in the
    tens on a big peer) cannot carry later rounds without training; with 3.0 and 4 pooled rounds, three
    clear rounds let a round with t ≥ −4.5 pass the pooled test, which is why a round whose own t is
    below ``min_specificity_t`` is paid only ``t ÷ min_specificity_t`` of its score (no cliff, no free
    ride)."""
    max_assignment_factor: float = 2.0
    """Cap of the assignment factor. Above 1 a peer that learned its own pages better than the reference
    earns more for the same held-out gain (with norm-clipped Δs, more inner steps and cleaner data show up
    here, not in the held-out gain). 1.0 pays the held-out gain alone once the assignment is proven."""
    min_assignment_factor: float = 0.3
    """Assignment factors below this count as 0 (noise of a peer that did not train on its pages).
    Lower it if honest peers early in a run show small but real specificity and score 0."""
    require_pages_match: bool = True
    """A manifest whose pages are not the validator's assignment for that hotkey scores 0."""
    ema_alpha: float = 0.3
    """Weight of the newest round in the EMA. Higher reacts faster to a peer's change (and to noise)."""
    reward: str = "specificity"
    """What a Δ that passed every gate is paid for (module docstring). ``specificity``: its held-out gain
    relative to the round's median × (the work it proved on its own pages) ** reward_exponent
    (proportional to compute, sybil-neutral, issue #18). ``heldout``: the rule before #18, held-out gain
    × assignment factor (the held-out gain grows much slower than inner steps, so splitting one machine
    across hotkeys paid up to 2× per unit of work); kept to replay records made with it."""
    reward_exponent: float = 0.73
    """q in ``relative_heldout_gain × work ** q``: the concave-to-linear correction. On ``debug`` a Δ's
    held-out gain grows like steps^0.39 and its specificity like steps^0.84 (benchmarks/incentive.py,
    medians over 66 rounds of 15 runs), so 0.39 + 0.84·q = 1 at q = 0.73 makes the pay linear in steps. Symptom →
    tuning: k hotkeys sharing one machine earn together more than it alone (sybil figure > 1) → raise
    it; equal peers' weights spread too much (specificity is the noisy factor) → lower it. Measure with
    ``benchmarks/incentive.py --analyse`` on recorded runs before changing it."""
    max_reference_scale: float = 4.0
    """Bound of the factor (its held-out gain ÷ the reference's) by which another peer's gains on this
    peer's pages are scaled to estimate its generic gain. Late in a run small Δs remove almost no
    held-out loss (0.003–0.007 nats next to a 64-step peer's 0.046: a factor ~10 that multiplies their
    page noise into the reference and refused an honest 64-step peer). Honest compute spreads give
    factors of 4^0.39 ≈ 1.7 for 4× the steps. ``inf`` = unbounded (the rule before #18)."""
    reference_out_of_scale: str = "drop"
    """What a cross reference whose scale factor lies outside [1 / max_reference_scale,
    max_reference_scale] does. ``drop``: it is not used (with none left, the peer's own control pages are
    the reference). ``clip`` (the rule before): it is used, scaled by the bound. A clipped reference
    under-estimates the generic gain of a larger Δ — a 5-step Δ's page gains × 4 are far below what a
    40-step Δ gains on any page — so the larger Δ showed "specificity" it did not have: a sparse Δ
    trained on none of its own pages passed the assignment test with t = 6.0 against references of 20
    and 5 steps (``benchmarks/validator.py --sparse``, trial 1: Spearman by own-data share −0.100)."""
    reference_bias_t: float | None = None
    """Off by default (None); an experiment kept for the next attempt. With a value (e.g. 2.5), a cross
    reference whose gains on this peer's pages differ from its own gains on the round's 8 control pages
    by a Welch |t| ≥ this is not used (``references_biased`` in the terms; with none left, the peer's own
    control pages are the reference). It stops the blatant forms of two attacks of the red team of thin
    rounds (2026-12-06, ``benchmarks/thin_rounds.py``): a noisy copy of an honest peer's Δ, (Δ_H + N)/√2,
    serving as H's reference and erasing H's specificity; non-training sybils whose Δs memorise a
    victim's known pages and ascend on each other's. Why it is off (review, same day): on recorded
    rounds a peer's two references agree closely on its pages and share the round's 8 control pages, so
    drops come together — ~5 % of references, both of one peer's in ~2 %, some peer of a 6-peer round
    losing both in ~8 % — and the control-page fallback is weak exactly then (honest t 5.2 → 0.3 in one
    replayed round; a non-trainer's pass rate 6.9 → 9.0 %); and an attacker that adds per-page noise to
    its gains on the victim's pages lowers |t| below the bar (the victim zeroed in 4 of 5 trials). A
    usable version needs a test the attacker's variance cannot dilute and "no evidence" instead of the
    fallback."""
    cap_median_of_passers: bool = True
    """The memorisation cap's median (specificity ÷ held-out gain) is taken over the peers that also pass
    their assignment test. Before (False), every peer past the solo gates counted, and decoy hotkeys
    with a tiny positive specificity that fail the test (paid nothing, cost nothing) dragged the median
    down and capped every honest peer (red team: a generic worker's share 0.27 → 0.58 against two
    honest peers' 0.35 → 0.17, with four decoys)."""
    max_specificity_ratio: float = 3.0
    """Memorisation cap: a peer's paid specificity is at most this × its held-out gain × the round's
    median (specificity ÷ held-out gain) over eligible peers. A Δ that memorises its pages without a
    matching held-out gain (many epochs on them) is paid as if it were at the cap. The ratio grows like
    steps^0.45, so a big peer among many small ones sits above the median: in benchmarks/incentive.py 8 of
    451 honest scored peer-rounds were capped (64-step peers next to five 13-step ones, and rounds where
    the held-out gain was ~0.002); 5 instead of 3 moved no figure by more than 0.08. Raise it if honest
    peers show ``capped``."""
    burn: BurnPolicy = field(default_factory=BurnPolicy)

    def __post_init__(self) -> None:
        if self.max_norm_ratio <= 1:
            raise ConfigError("scoring.max_norm_ratio must be > 1")
        if self.max_delta_norm is not None and not (
            math.isfinite(self.max_delta_norm) and self.max_delta_norm > 0
        ):
            raise ConfigError(
                f"scoring.max_delta_norm must be a finite number > 0, got {self.max_delta_norm}"
            )
        if not 0 < self.duplicate_cosine <= 1:
            raise ConfigError("scoring.duplicate_cosine must be in (0, 1]")
        if self.combination_trust_t is not None and not self.combination_trust_t > 0:
            raise ConfigError(
                f"scoring.combination_trust_t must be > 0 (or None), got {self.combination_trust_t}"
            )
        if self.combination_fraction is not None and not 0.5 <= self.combination_fraction <= 1:
            raise ConfigError(
                f"scoring.combination_fraction must be in [0.5, 1] (or None: off), got {self.combination_fraction}"
            )
        if self.support_mean_fraction is not None and not 0.5 <= self.support_mean_fraction <= 1:
            raise ConfigError(
                "scoring.support_mean_fraction must be in [0.5, 1] (or None: off), "
                f"got {self.support_mean_fraction}"
            )
        if not 0 <= self.reference_quantile <= 1:
            raise ConfigError("scoring.reference_quantile must be in [0, 1]")
        if self.min_assignment_reference <= 0:
            raise ConfigError("scoring.min_assignment_reference must be > 0")
        if not 0 <= self.min_assignment_factor <= 1 <= self.max_assignment_factor:
            raise ConfigError("scoring: need 0 <= min_assignment_factor <= 1 <= max_assignment_factor")
        if not 0 < self.ema_alpha <= 1:
            raise ConfigError("scoring.ema_alpha must be in (0, 1]")
        if self.reward not in REWARDS:
            raise ConfigError(f"scoring.reward {self.reward!r}: choose from {', '.join(REWARDS)}")
        if not 0.1 <= self.reward_exponent <= 3:
            raise ConfigError(f"scoring.reward_exponent must be in [0.1, 3], got {self.reward_exponent}")
        if not self.max_reference_scale >= 1:
            raise ConfigError("scoring.max_reference_scale must be >= 1")
        if self.max_specificity_ratio <= 1:
            raise ConfigError("scoring.max_specificity_ratio must be > 1")
        if not 1 <= self.evidence_rounds <= MAX_EVIDENCE + 1:
            raise ConfigError(
                f"scoring.evidence_rounds must be in [1, {MAX_EVIDENCE + 1}], got {self.evidence_rounds}"
            )
        if not self.evidence_t_clip > 0:
            raise ConfigError("scoring.evidence_t_clip must be > 0")
        if self.reference_out_of_scale not in ("drop", "clip"):
            raise ConfigError(
                f"scoring.reference_out_of_scale {self.reference_out_of_scale!r}: choose drop or clip"
            )
        if self.originality not in ORIGINALITY:
            raise ConfigError(
                f"scoring.originality {self.originality!r}: choose from {', '.join(ORIGINALITY)}"
            )


@dataclass(kw_only=True)
class PeerScore:
    uid: int
    hotkey: str
    score: float
    reason: str
    """``scored`` or why the score is 0."""
    terms: dict = field(default_factory=dict)
    """Every measurement and intermediate term that went into ``score``."""

    def to_json(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------- helpers


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), pure Python."""
    if not xs:
        raise ValueError("quantile of an empty sequence")
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def median(xs: Sequence[float]) -> float:
    return quantile(xs, 0.5)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


# ------------------------------------------------------------------------------------------- a round


def score_round(m: RoundMeasurements, cfg: ScoringConfig, history: EmaState | None = None) -> list[PeerScore]:
    """Round scores of every measured peer, in the order of ``m.peers``. ``history`` is the EMA state
    before this round: its per-hotkey assignment-test evidence is pooled with this round's
    (``evidence_rounds``); None = no earlier evidence (every hotkey is new)."""
    terms: dict[tuple[int, str], dict] = {}
    for p in m.peers:
        gain = heldout_gain(p, m.heldout_loss_base, m.heldout_rule)
        assigned_gain = _diff(p.assigned_loss_before, p.assigned_loss_after)
        control_gain = _diff(p.control_loss_before, p.control_loss_after)
        if m.heldout_rule == "first_order":  # the page gains are first order: so are their means
            if p.assigned_page_gains:
                assigned_gain = sum(p.assigned_page_gains) / len(p.assigned_page_gains)
            if p.control_page_gains:
                control_gain = sum(p.control_page_gains) / len(p.control_page_gains)
        terms[(p.uid, p.hotkey)] = {
            "status": p.status,
            "delta_norm": p.delta_norm,
            "pages_match": p.pages_match,
            "heldout_loss_base": m.heldout_loss_base,
            "heldout_loss": p.heldout_loss,
            "heldout_gain": gain,
            "heldout_rule": m.heldout_rule,
            "gain_pages": m.gain_pages,
            "heldout_loss_opposite": p.heldout_loss_opposite,
            "direction_margin": _diff(p.heldout_loss_opposite, p.heldout_loss),
            "assigned_loss_before": p.assigned_loss_before,
            "assigned_loss_after": p.assigned_loss_after,
            "assigned_gain": assigned_gain,
            "control_loss_before": p.control_loss_before,
            "control_loss_after": p.control_loss_after,
            "control_gain": control_gain,
            "cross_gains": list(p.cross_gains),
            "delta_scale": m.delta_scale,
        }
    finite_norms = [p.delta_norm for p in m.peers if p.status == "ok" and p.delta_norm]
    med = median(finite_norms) if len(finite_norms) >= cfg.min_peers_for_norm else None

    reasons: dict[tuple[int, str], str | None] = {}
    # gates that need no other peer
    for p in m.peers:
        t = terms[(p.uid, p.hotkey)]
        t["median_norm"] = med
        t["norm_ratio"] = (p.delta_norm / med) if med and p.delta_norm is not None else None
        reasons[(p.uid, p.hotkey)] = _solo_gate(p, t, cfg, m.round)
    # specificity: own gain on its pages minus what the other eligible peers' Δs achieve there
    eligible_keys = {k for k, r in reasons.items() if r is None}
    controls = None  # what the (experimental, off by default) reference bias test compares with
    if cfg.reference_bias_t is not None:
        controls = {(p.uid, p.hotkey): list(p.control_page_gains) for p in m.peers}
    for p in m.peers:
        _specificity(
            p,
            terms,
            eligible_keys,
            cfg.max_reference_scale,
            drop=cfg.reference_out_of_scale == "drop",
            controls=controls,
            bias_t=cfg.reference_bias_t,
        )
    # copies within the round: among near-duplicates only the most specific one keeps its score
    for p in m.peers:
        key = (p.uid, p.hotkey)
        if reasons[key] is not None:
            continue
        mine = terms[key]["specificity"]
        for s in p.similar:
            if s["round"] != m.round or s["cosine"] < cfg.duplicate_cosine:
                continue
            if (s["uid"], s["hotkey"]) not in eligible_keys:
                continue  # only a peer that passed its own gates can be "the original" (else 100×copy would win)
            other = terms[(s["uid"], s["hotkey"])]
            theirs = other["specificity"]
            if theirs is not None and (
                mine is None or theirs > mine or (theirs == mine and s["uid"] < p.uid)
            ):
                reasons[key] = (
                    f"copy of uid {s['uid']}'s Δ (cosine {s['cosine']:.3f}), which fits its own pages better"
                )
                terms[key]["duplicate_of"] = {"uid": s["uid"], "round": s["round"], "cosine": s["cosine"]}
                break
    # combinations within the round: a Δ (nearly) in the span of the others' is a copy of their work
    _combination_gate(m.peers, terms, reasons, cfg, history)
    if cfg.originality == "sustained":
        # a copy gate's refusal keeps the peer's measured t as evidence (a copier's noisy t's then pool)
        for key in eligible_keys:
            st = terms[key]["specificity_t"]
            if reasons[key] is not None and st is not None:
                terms[key]["evidence_t"] = clip_t(st, cfg.evidence_t_clip)
    eligible = [
        terms[k]["specificity"]
        for k, r in reasons.items()
        if r is None and terms[k]["specificity"] is not None
    ]
    reference = (
        max(cfg.min_assignment_reference, quantile(eligible, cfg.reference_quantile)) if eligible else None
    )

    passers = None
    if cfg.cap_median_of_passers:
        passers = {k for k, r in reasons.items() if r is None and _passes_own_test(terms[k], k, cfg, history)}
    ratio_median = _specificity_ratio_median(terms, reasons, passers)
    heldout_median = _heldout_median(terms, reasons)
    out = []
    for p in m.peers:
        key = (p.uid, p.hotkey)
        t = terms[key]
        t["reward_rule"] = cfg.reward
        reason = reasons[key]
        score = 0.0
        if cfg.reward == "heldout":
            t["assignment_reference"] = reference
        if reason is None and cfg.reward == "specificity":
            prior = prior_evidence(history, p.uid, p.hotkey, cfg.evidence_rounds - 1)
            score, reason = _specificity_reward(t, cfg, ratio_median, heldout_median, prior)
        elif reason is None:
            factor = min(cfg.max_assignment_factor, max(0.0, t["specificity"] / reference))
            t["assignment_factor"] = factor
            st = t["specificity_t"]
            if st is not None and st < cfg.min_specificity_t:
                reason = (
                    f"not shown to have trained on its assigned pages (specificity {t['specificity']:+.4f} over "
                    f"{t['specificity_pages']} pages, t = {st:.2f} < {cfg.min_specificity_t})"
                )
            elif factor < cfg.min_assignment_factor:
                reason = (
                    f"not trained on its assigned pages (specificity {t['specificity']:+.4f} vs reference "
                    f"{reference:.4f}: factor {factor:.2f} < {cfg.min_assignment_factor})"
                )
            else:
                score = t["heldout_gain"] * factor
                reason = "scored"
        t["score"] = score
        out.append(PeerScore(uid=p.uid, hotkey=p.hotkey, score=score, reason=reason, terms=t))
    return out


def _combination_gate(
    peers: Sequence[PeerMeasurement],
    terms: dict,
    reasons: dict,
    cfg: ScoringConfig,
    history: EmaState | None = None,
) -> None:
    """Refuse the peers that :func:`combination_copies` finds among those still eligible, then those that
    :func:`weak_combinations` finds with the refused peers' Δs in the span too; record every measured
    peer's explained fraction in its terms."""
    spans = {(p.uid, p.hotkey): p.span for p in peers if p.span is not None}
    for key, sp in spans.items():
        terms[key]["span_explained_all"] = sp["explained"]
        terms[key]["span_earlier"] = sp["earlier"]
    if cfg.combination_fraction is None:
        return
    pool = [k for k in spans if reasons[k] is None]
    trust = {}  # own-page evidence (``cfg.originality``)
    for key in pool:
        prior = prior_evidence(history, key[0], key[1], cfg.evidence_rounds - 1)
        trust[key] = originality_evidence(prior, terms[key]["specificity_t"], cfg)
        terms[key]["originality_t"] = None if trust[key] == -math.inf else trust[key]
    # the rank among dependent peers: evidence up to the trust bar, then the amount of own-page work. Above
    # the bar a higher t says "more consistent", not "more work": a copier that adds a little real training
    # to the swarm's average (C = (A + B)/2 + ε·own) can show a t above an honest A's, never A's specificity
    bar = math.inf if cfg.combination_trust_t is None else cfg.combination_trust_t
    evidence = {k: (min(trust[k], bar), terms[k]["specificity"]) for k in pool}
    refused, explained = combination_copies(spans, pool, evidence, cfg.combination_fraction)
    for key, frac in explained.items():
        terms[key]["combination_explained"] = frac
    for key, r in refused.items():
        terms[key]["combination_explained"] = r["explained"]
        terms[key]["combination_of"] = r["of"]
        t_key = trust[key]
        reasons[key] = (
            f"a combination of other peers' Δs: {r['explained']:.2%} of it lies in the span of "
            f"{source_names(r)} (limit {cfg.combination_fraction:.0%}), and it shows the least evidence of "
            "training on its own pages among the dependent ones (t = "
            + ("unknown" if t_key == -math.inf else f"{t_key:.2f}")
            + ")"
        )
    survivors = [k for k in pool if k not in refused]
    weak = {}
    if cfg.combination_trust_t is not None:
        # refused peers as sources — not the copies found above nor near-copies (their work is another's)
        outside = [
            k for k in spans if reasons[k] is not None and k not in refused and "duplicate_of" not in terms[k]
        ]
        weak = weak_combinations(
            spans,
            survivors,
            outside,
            trust,
            evidence,
            cfg.combination_fraction,
            cfg.combination_trust_t,
        )
    for key, r in weak.items():
        terms[key]["combination_explained_with_refused"] = r["explained"]
        terms[key]["combination_of"] = r["of"]
        reasons[key] = (
            f"a combination of other peers' Δs, refused ones included: {r['explained']:.2%} of it lies in "
            f"the span of {source_names(r)} (limit {cfg.combination_fraction:.0%}), and its own-page evidence "
            f"(t = {trust[key]:.2f}, {ORIGINALITY[cfg.originality]}) is below {cfg.combination_trust_t}"
        )
    _support_mean_copies(spans, [k for k in survivors if k not in weak], evidence, terms, reasons, cfg)


def _support_mean_copies(spans, survivors, evidence, terms, reasons, cfg: ScoringConfig) -> None:
    """Sparse Δs: the first tier again (:func:`combination_copies`: refuse, among the mutually dependent
    peers, the one with the least own-page evidence, and measure again), in each sparse Δ's
    ``support_mean_gram`` geometry, where the other Δs are divided coordinate by coordinate by how many
    of them sent there. That finds a copy of the average a ``topk_aggregation: support`` swarm applies,
    which is not a linear combination of the Δs and escapes the span tests above."""
    pool = [k for k in survivors if "support_mean_gram" in spans[k]]
    for key in pool:
        terms[key]["support_mean_explained"] = spans[key]["support_mean_explained"]
    if len(pool) < 2:
        return
    if cfg.support_mean_fraction is None:
        return
    geometry = {k: {**spans[k], "support_gram": spans[k]["support_mean_gram"]} for k in pool}
    refused, _ = combination_copies(geometry, pool, evidence, cfg.support_mean_fraction)
    for key, r in refused.items():
        terms[key]["support_mean_explained"] = r["explained"]
        terms[key]["combination_of"] = r["of"]
        t_key = evidence[key][0]
        reasons[key] = (
            f"a copy of the round's average over each coordinate's senders: {r['explained']:.2%} of it lies "
            f"in the span of {source_names(r)}, each divided by how many peers sent each coordinate (limit "
            f"{cfg.support_mean_fraction:.0%}), and it shows the least evidence of training on its own pages "
            "among the dependent ones (t = " + ("unknown" if t_key == -math.inf else f"{t_key:.2f}") + ")"
        )


def _specificity_ratio_median(terms: dict, reasons: dict, passers: set | None = None) -> float | None:
    """Median of specificity ÷ held-out gain over the peers that passed every gate so far and, with
    ``passers``, their own assignment test (None: none with a positive specificity), the reference of
    the memorisation cap."""
    ratios = [
        terms[k]["specificity"] / terms[k]["heldout_gain"]
        for k, r in reasons.items()
        if r is None
        and (passers is None or k in passers)
        and terms[k]["specificity"] is not None
        and terms[k]["specificity"] > 0
    ]
    return median(ratios) if ratios else None


def _passes_own_test(t: dict, key: tuple[int, str], cfg: ScoringConfig, history: EmaState | None) -> bool:
    """Whether a peer's own Δ shows work on its own pages: specificity > 0 and the assignment test."""
    if t["specificity"] is None or t["specificity"] <= 0:
        return False
    prior = prior_evidence(history, key[0], key[1], cfg.evidence_rounds - 1)
    return assignment_test(prior, t["specificity_t"], cfg)[0]


def _heldout_median(terms: dict, reasons: dict) -> float | None:
    """Median held-out gain of the peers that passed every gate so far (all > 0), the round's unit."""
    gains = [terms[k]["heldout_gain"] for k, r in reasons.items() if r is None]
    return median(gains) if gains else None


def _specificity_reward(
    t: dict,
    cfg: ScoringConfig,
    ratio_median: float | None,
    heldout_median: float | None,
    prior: Sequence[float] = (),
) -> tuple[float, str]:
    """(score, reason) of an eligible peer under ``reward = "specificity"``; fills the terms it used.

    work = min(specificity, max_specificity_ratio × heldout_gain × ratio_median);
    score = heldout_gain / heldout_median × work ** q × evidence factor. The assignment test (this
    round's t pooled with the hotkey's earlier ones, :func:`assignment_test`) is a gate; no cliff above
    it: less specificity (and a weaker round), less pay.
    """
    spec, st = t["specificity"], t["specificity_t"]
    if st is not None:
        # this round's evidence, recorded whatever the outcome (update_ema keeps it for later rounds)
        t["evidence_t"] = clip_t(st, cfg.evidence_t_clip)
    t["evidence_prior"] = list(prior)
    if spec is None or spec <= 0:
        return 0.0, (
            "not trained on its assigned pages (specificity "
            + ("unknown" if spec is None else f"{spec:+.4f}")
            + " ≤ 0: its Δ does no more on its pages than other peers' Δs do)"
        )
    passes, factor, pooled, k = assignment_test(prior, st, cfg)
    t["pooled_t"], t["pooled_rounds"], t["evidence_factor"] = pooled, k, factor
    if not passes:
        return 0.0, (
            f"not shown to have trained on its assigned pages (specificity {spec:+.4f} over "
            f"{t['specificity_pages']} pages, t = {st:.2f}"
            + (f", pooled over {k} rounds {pooled:.2f}" if k > 1 else "")
            + f" < {cfg.min_specificity_t})"
        )
    cap = None if ratio_median is None else cfg.max_specificity_ratio * t["heldout_gain"] * ratio_median
    work = spec if cap is None else min(spec, cap)
    t["specificity_cap"] = cap
    t["capped"] = cap is not None and spec > cap
    t["work"] = work
    t["heldout_median"] = heldout_median
    t["relative_heldout_gain"] = rel = t["heldout_gain"] / heldout_median if heldout_median else 1.0
    t["reward_exponent"] = cfg.reward_exponent
    return rel * work**cfg.reward_exponent * factor, "scored"


def _specificity(
    p: PeerMeasurement,
    terms: dict,
    eligible_keys: set,
    max_scale: float = math.inf,
    drop: bool = False,
    controls: Mapping[tuple[int, str], Sequence[float]] | None = None,
    bias_t: float | None = None,
) -> None:
    """Fill generic_gain, specificity, specificity_t and their basis into ``p``'s terms. With ``bias_t``,
    a reference whose page gains here differ from its own gains on the round's control pages
    (``controls``) by a Welch |t| ≥ ``bias_t`` is not used (``ScoringConfig.reference_bias_t``).

    With cross references (eligible peers' Δs evaluated on p's assigned pages): per page i,
    generic_i = median_j(gain_j(page i) × scale_j), scale_j = heldout_gain / heldout_gain_j bounded to
    [1 / max_scale, max_scale] (``drop``: a reference outside that range is left out instead; the
    number left out is ``references_dropped``), d_i = own gain_i − generic_i,
    specificity = mean(d), t = one-sample t of d. Otherwise: own gains on assigned vs control pages
    (difference of means, Welch's t).
    """
    t = terms[(p.uid, p.hotkey)]
    own = list(p.assigned_page_gains)
    refs = []
    if (p.uid, p.hotkey) in eligible_keys:
        for c in p.cross_gains:
            key = (c["uid"], c["hotkey"])
            page_gains = [c["gain"], *c.get("page_gains", [])]
            if key in eligible_keys and all(g is not None and math.isfinite(g) for g in page_gains):
                if bias_t is not None and controls is not None:
                    tb = t_welch(list(c.get("page_gains", [])), list(controls.get(key, ())))
                    if tb is not None and abs(tb) >= bias_t:
                        t["references_biased"] = t.get("references_biased", 0) + 1
                        continue
                ratio = t["heldout_gain"] / terms[key]["heldout_gain"]
                if drop and not 1 / max_scale <= ratio <= max_scale:
                    t["references_dropped"] = t.get("references_dropped", 0) + 1
                    continue
                scale = min(max_scale, max(1 / max_scale, ratio))
                refs.append((c["gain"] * scale, [g * scale for g in c.get("page_gains", [])]))
    if refs:
        t["generic_basis"] = (
            f"median of {len(refs)} other peers' gains on its pages, × its held-out gain / theirs"
        )
        if own and all(len(pg) == len(own) for _, pg in refs):
            d = [g - median([pg[i] for _, pg in refs]) for i, g in enumerate(own)]
            t["generic_gain"] = t["assigned_gain"] - sum(d) / len(d)
            t["specificity"], t["specificity_t"], t["specificity_pages"] = sum(d) / len(d), t_one(d), len(d)
            return
        t["generic_gain"] = median([g for g, _ in refs])
        t["specificity"], t["specificity_t"], t["specificity_pages"] = (
            _diff(t["assigned_gain"], t["generic_gain"]),
            None,
            len(own),
        )
        return
    t["generic_gain"], t["generic_basis"] = t["control_gain"], "its own gain on control pages"
    t["specificity"] = _diff(t["assigned_gain"], t["generic_gain"])
    t["specificity_t"] = t_welch(own, list(p.control_page_gains))
    t["specificity_pages"] = len(own)


def _solo_gate(p: PeerMeasurement, t: dict, cfg: ScoringConfig, round_: int) -> str | None:
    """Why ``p`` scores 0 on its own measurements alone, or None."""
    if p.status != "ok":
        return {
            "rejected": f"not evaluated: {p.reason}",
            "malformed": f"malformed Δ: {p.reason}",
            "non_finite": p.reason
            if p.reason.startswith(NON_FINITE_LOSS)
            else "Δ holds NaN or infinite values",
        }.get(p.status, f"{p.status}: {p.reason}")
    if not _measurements_finite(p):  # evaluation refuses these already; a NaN passes every "≤" test below
        return NON_FINITE_LOSS
    if cfg.require_pages_match and p.pages_match is False:
        return "its manifest names pages that are not its assignment"
    if not p.delta_norm:
        return "empty Δ (all zeros): no work"
    if cfg.max_delta_norm is not None and p.delta_norm > cfg.max_delta_norm * DELTA_NORM_TOLERANCE:
        return (
            f"Δ norm {p.delta_norm:.4g} above the run's max_delta_norm {cfg.max_delta_norm:g} "
            "(honest peers scale their Δ down to it)"
        )
    if t["norm_ratio"] is not None and t["norm_ratio"] > cfg.max_norm_ratio:
        return f"Δ norm {t['norm_ratio']:.1f}× the round's median (limit {cfg.max_norm_ratio}×)"
    for s in p.similar:
        if s["round"] < round_ and s["cosine"] >= cfg.duplicate_cosine:
            t["duplicate_of"] = {"uid": s["uid"], "round": s["round"], "cosine": s["cosine"]}
            return f"repeats the Δ of uid {s['uid']} from round {s['round']} (cosine {s['cosine']:.3f})"
    if t["heldout_gain"] is None or t["heldout_gain"] <= cfg.min_heldout_gain:
        order = "first-order " if t.get("heldout_rule") == "first_order" else ""
        return f"does not lower the held-out loss ({order}gain {t['heldout_gain']:+.4f} nats)"
    if t["direction_margin"] is not None and t["direction_margin"] <= 0:
        return (
            f"its opposite −Δ lowers the held-out loss as much or more (margin {t['direction_margin']:+.4f} "
            "nats): the gain is not due to its direction"
        )
    return None


def _measurements_finite(p: PeerMeasurement) -> bool:
    values = [
        p.heldout_loss,
        p.heldout_loss_opposite,
        p.assigned_loss_after,
        p.control_loss_after,
        *p.assigned_page_gains,
        *p.control_page_gains,
    ]
    return all(v is None or math.isfinite(v) for v in values)


def not_sampled_scores(not_sampled: Mapping[int, str], uids: Mapping[int, str]) -> list[PeerScore]:
    """Explanation rows (score 0, EMA untouched) for the peers the budget left out."""
    return [
        PeerScore(uid=u, hotkey=uids[u], score=0.0, reason=r, terms={"status": "not_sampled", "score": 0.0})
        for u, r in sorted(not_sampled.items())
    ]


# ------------------------------------------------------------------------------------------- weights


@dataclass(kw_only=True)
class WeightVector:
    uids: list[int]
    weights: list[int]
    """u16, max-upscaled (the largest is 65535), as the runtime stores them."""
    shares: dict[int, float]
    """Normalised share of each uid (sums to 1), before u16 conversion."""
    note: str

    @property
    def empty(self) -> bool:
        return not self.uids


def normalize_weights(values: Mapping[int, float], burn: BurnPolicy) -> WeightVector:
    """Shares proportional to ``values`` (uid → EMA), burn policy applied, then u16 max-upscaled.

    Peers with a value ≤ 0 get no weight. When nobody has a positive value the whole vector goes to the
    burn uid, or — without one — the vector is empty and no weights should be set.
    """
    positive = {u: v for u, v in values.items() if v > 0 and math.isfinite(v)}
    total = sum(positive.values())
    shares: dict[int, float] = {}
    if total <= 0:
        if burn.uid is None:
            return WeightVector(
                uids=[], weights=[], shares={}, note="nobody earned anything and no burn uid: no weights"
            )
        shares = {burn.uid: 1.0}
        note = f"nobody earned anything: all weight burned to uid {burn.uid}"
    else:
        keep = 1.0 - burn.fraction if burn.uid is not None else 1.0
        for u, v in positive.items():
            shares[u] = shares.get(u, 0.0) + keep * v / total
        if burn.uid is not None and burn.fraction > 0:
            shares[burn.uid] = shares.get(burn.uid, 0.0) + burn.fraction
            note = f"{len(positive)} uids earned; {burn.fraction:.0%} burned to uid {burn.uid}"
        else:
            note = f"{len(positive)} uids earned"
    top = max(shares.values())
    uids = sorted(shares)
    weights = [round(shares[u] / top * U16_MAX) for u in uids]
    return WeightVector(uids=uids, weights=weights, shares=shares, note=note)
