"""The assignment test's statistics (pure): per-page t statistics, and a hotkey's evidence pooled over rounds.

Did a peer train on *its* pages? validator.scoring measures, per evaluated assigned page, its own gain
minus what other peers' Δs do there (the specificity), and judges the mean by its one-sample t
(:func:`t_one`; Welch's :func:`t_welch` against control pages when there is no cross reference). One
round's t is noisy for a small peer, so the test also pools a hotkey's last rounds (:func:`assignment_test`,
Stouffer's Σ t / √k of clipped t's), and the copy tests rank dependent peers by *sustained* evidence
(:func:`originality_evidence`). Moved from validator.scoring (no behaviour change).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from validator.ema import EmaState

if TYPE_CHECKING:
    from validator.scoring import ScoringConfig

T_CAP = 1000.0
"""Bound of every t statistic (a zero-variance sample would otherwise give ±inf)."""


def prior_evidence(history: EmaState | None, uid: int, hotkey: str, n: int) -> list[float]:
    """The last ``n`` assignment-test t statistics of ``hotkey`` on ``uid`` in ``history`` (oldest first;
    empty for a new or changed hotkey, or ``n`` = 0)."""
    if history is None or n <= 0:
        return []
    e = history.entries.get(uid)
    return list(e.evidence[-n:]) if e is not None and e.hotkey == hotkey else []


def clip_t(t: float, clip: float) -> float:
    """An assignment-test t as it enters the evidence: clipped to [−clip, clip] (``evidence_t_clip``)."""
    return max(-clip, min(clip, t))


def pooled_evidence(prior: Sequence[float], t_now: float, clip: float) -> tuple[float, int]:
    """(Σ t / √k, k) over the earlier t's and this round's, each clipped to [−clip, clip] (Stouffer's
    combination: N(0, 1)-like for a peer whose t's are noise, whatever k)."""
    ts = [clip_t(x, clip) for x in (*prior, t_now)]
    return sum(ts) / math.sqrt(len(ts)), len(ts)


def originality_evidence(prior: Sequence[float], t_now: float | None, cfg: ScoringConfig) -> float:
    """The own-page evidence the combination tests rank a peer by (−inf: no t measured), given its
    earlier t's (``prior``, oldest first) and this round's. ``sustained``: min(t_now, Σ clip(t) ÷
    √evidence_rounds) over this round and the last ``evidence_rounds − 1`` earlier ones, missing rounds
    counting 0 (so a new hotkey's is at most clip ÷ √evidence_rounds); ``best``: max(t_now, the pooled
    Σ clip(t) ÷ √k over the rounds it has)."""
    if t_now is None:
        return -math.inf
    if cfg.originality == "best":
        return max(t_now, pooled_evidence(prior, t_now, cfg.evidence_t_clip)[0])
    recent = [*(prior[-(cfg.evidence_rounds - 1) :] if cfg.evidence_rounds > 1 else ()), t_now]
    sustained = sum(clip_t(x, cfg.evidence_t_clip) for x in recent) / math.sqrt(cfg.evidence_rounds)
    return min(t_now, sustained)


def assignment_test(
    prior: Sequence[float], t_now: float | None, cfg: ScoringConfig
) -> tuple[bool, float, float | None, int]:
    """(passes, pay factor, pooled t, rounds pooled) of the assignment test of a peer whose specificity
    is > 0, given its earlier t's (``prior``) and this round's (None: no per-page t, not tested).

    Passes with pay factor 1 when this round's own t reaches ``min_specificity_t`` (the single-round
    test: an honest peer's earlier weak or negative rounds never hold back a round that proves itself;
    measured, a pooled-only test refused such rounds and over-paid big peers next to them). Otherwise
    passes when the pooled t reaches ``min_specificity_t``, with pay factor ``t_now ÷
    min_specificity_t``: a round that passes on earlier evidence is paid in proportion to its own
    evidence (no cliff for a small honest peer's weak round, and no full pay for a round without
    training that rides on earlier ones). For a new hotkey both are this round's t alone.
    """
    if t_now is None:
        return True, 1.0, None, 0
    pooled, k = pooled_evidence(prior, t_now, cfg.evidence_t_clip)
    if t_now >= cfg.min_specificity_t:
        return True, 1.0, pooled, k
    if pooled < cfg.min_specificity_t:
        return False, 0.0, pooled, k
    return True, max(0.0, t_now / cfg.min_specificity_t), pooled, k


def t_one(xs: Sequence[float]) -> float | None:
    """One-sample t statistic of mean(xs) > 0 (None with fewer than 2 values or a non-finite one; capped at
    ±T_CAP)."""
    if len(xs) < 2 or not all(math.isfinite(x) for x in xs):
        return None
    mean = sum(xs) / len(xs)
    if abs(mean) <= 1e-12:  # rounding noise, not a signal
        return 0.0
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    if var == 0:
        return T_CAP if mean > 0 else (-T_CAP if mean < 0 else 0.0)
    return max(-T_CAP, min(T_CAP, mean / math.sqrt(var / len(xs))))


def t_welch(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Welch's t statistic of mean(a) > mean(b) (None with fewer than 2 values on a side, or a non-finite one)."""
    if len(a) < 2 or len(b) < 2 or not all(math.isfinite(x) for x in [*a, *b]):
        return None
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    if abs(ma - mb) <= 1e-12:
        return 0.0
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
    se = math.sqrt(va / len(a) + vb / len(b))
    if se == 0:
        return T_CAP if ma > mb else (-T_CAP if ma < mb else 0.0)
    return max(-T_CAP, min(T_CAP, (ma - mb) / se))
