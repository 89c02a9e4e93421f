"""Combination copies: a Δ that lies (nearly) in the span of other peers' Δs is a copy of their work.

Pure functions over the span measurements the evaluator records (``PeerMeasurement.span``: inner products
of unit Δ sketches, and for a sparse Δ the Gram matrix on its own support). :func:`combination_copies`
is the first tier (who among the eligible peers is a combination of the others, decided by own-page
evidence, since linear dependence is symmetric); :func:`weak_combinations` the second (with the refused
peers' Δs in the span too, for peers whose evidence is weak). ``validator.scoring`` applies both as a
gate and explains every refusal; README "Validator" gives the measured margins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def source_names(r: dict) -> str:
    """Whose Δs a refused combination was made of, for its reason ("uid 3, uid 5, earlier rounds' Δs")."""
    parts = [f"uid {o['uid']}" for o in r["of"]]
    if r["earlier"] >= 0.01:
        parts.append(f"earlier rounds' Δs (alone {r['earlier']:.1%})")
    return ", ".join(parts) or "the others"


def weak_combinations(
    spans: Mapping[tuple[int, str], dict],
    survivors: Sequence[tuple[int, str]],
    outside: Sequence[tuple[int, str]],
    trust: Mapping[tuple[int, str], float],
    evidence: Mapping[tuple[int, str], tuple[float | None, float | None]],
    threshold: float,
    trust_t: float,
) -> dict[tuple[int, str], dict]:
    """The second tier: :func:`combination_copies` over the ``survivors`` (eligible peers the first tier
    kept) whose own-page evidence (``trust``: ``ScoringConfig.originality``, by default the lower of this
    round's assignment t and the evidence sustained over the hotkey's recent rounds) is below
    ``trust_t``, with the trusted survivors', the ``outside`` peers' (refused by other gates) and the
    earlier rounds' Δs as fixed explainers.

    Why: a copier who averages *everyone's* Δs — the swarm's averaged Δ, to which peers refused for
    other reasons (random data, a scaled or sign-flipped Δ) contributed — lies in the span of the
    eligible peers only in part (0.89 measured in tests/test_validator_swarm.py) and escapes the first
    tier. Refused peers cannot join that greedy as equals: their evidence says nothing about originality
    (a peer trained on other pages has none, and is still nobody's copy), and refused sybils that
    combine honest Δs — R₁ = A + B + X, R₂ = A + B − X — would make honest peers "dependent" there. So
    only peers whose own-page evidence is too weak to count are judged with refused Δs in the span, and
    a refused Δ that is (nearly, ≥ ``threshold`` of it) a scaled copy of one survivor's — −A, 100·A —
    is not a source (it is that survivor's work). The coordinated griefing above (two or more refused
    sybils) can still reach an honest peer while its evidence stays below ``trust_t`` (in a hotkey's
    first round always), and only when it ranks below another dependent peer; a copier that passed the
    assignment test by chance (its t has no own-page work behind it, but a round-level offset shared by
    its pages: |t| ≥ 3 in 2 of 28 measured copycat rounds) is caught unless it also did so in its
    recent rounds."""
    weak = [k for k in survivors if trust.get(k, -math.inf) < trust_t]
    if not weak:
        return {}
    geo = _SpanGeometry(spans, [*survivors, *outside])
    # a refused Δ that is (nearly) a scaled copy of one survivor's — a sign-flipped or ×100 copy — is
    # that survivor's work, not a source: it would make its original "explained"
    sources = [r for r in outside if all(geo.explained(r, r, [k]) < threshold for k in survivors)]
    fixed = [k for k in survivors if k not in weak] + sources
    refused, _ = combination_copies(spans, weak, evidence, threshold, fixed)
    return refused


SPAN_ENERGY_TOL = 1e-12
"""A residual (of a unit-norm sketch) with less squared norm than this spans no direction: rounding, as
``validator.evaluation.SPAN_TOL`` (its square)."""


def span_residual(gram: Sequence[Sequence[float]], i: int, others: Sequence[int]) -> float:
    """Squared norm of column ``i`` left after projecting it on the span of the columns ``others``, from
    their Gram matrix (inner products). Cholesky with symmetric pivoting on the ``others`` (the largest
    remaining diagonal first) and a drop tolerance (``SPAN_ENERGY_TOL``), so a rank-deficient set of
    others — a copy among them — is handled; the Schur complement of ``i`` is the residual.
    O(len(others)³); pure Python (a round's sample is at most a few dozen peers)."""
    idx = [*others, i]
    a = [[float(gram[r][c]) for c in idx] for r in idx]
    last = len(others)
    active = list(range(last))
    while active:
        p = max(active, key=lambda r: a[r][r])
        d = a[p][p]
        if d <= SPAN_ENERGY_TOL:
            break
        active.remove(p)
        rows = [*active, last]
        for r in rows:
            f = a[r][p] / d
            if f == 0.0:
                continue
            row_p = a[p]
            row_r = a[r]
            for c in rows:
                row_r[c] -= f * row_p[c]
    return max(0.0, a[last][last])


class _SpanGeometry:
    """The explained fractions over the ``pool`` keys, from the recorded span measurements. Each peer is
    judged in its own geometry: the shared Gram matrix (every peer's ``products`` row) or, for a sparse
    Δ, the Gram matrix on its own support (``support_gram``; there only the sketches with some energy
    on that support take part)."""

    def __init__(self, spans: Mapping[tuple[int, str], dict], pool: Sequence[tuple[int, str]]):
        self.where = {k: n for n, k in enumerate(pool)}
        self.shared = [[0.0] * len(pool) for _ in pool]
        for a in pool:
            for prod in spans[a]["products"]:
                b = (prod["uid"], prod["hotkey"])
                if b in self.where:
                    self.shared[self.where[a]][self.where[b]] = float(prod["dot"])
        self.own: dict[tuple[int, str], list[list[float]]] = {}
        self.present: dict[tuple[int, str], set] = {}
        for a in pool:
            sg = spans[a].get("support_gram")
            if sg is None:
                continue
            order = [(prod["uid"], prod["hotkey"]) for prod in spans[a]["products"]]
            pos = {k: n for n, k in enumerate(order)}
            self.own[a] = [
                [float(sg[pos[r]][pos[c]]) if r in pos and c in pos else 0.0 for c in pool] for r in pool
            ]
            overlap = spans[a].get("support_overlap") or [1.0] * len(order)
            self.present[a] = {k for k, o in zip(order, overlap, strict=True) if o > 0 and k in self.where}

    def members(self, geometry: tuple[int, str], keys: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
        """The ``keys`` that take part in ``geometry``'s measurement."""
        present = self.present.get(geometry)
        return list(keys) if present is None else [k for k in keys if k in present or k == geometry]

    def explained(
        self, geometry: tuple[int, str], i: tuple[int, str], others: Sequence[tuple[int, str]]
    ) -> float:
        """Share of ``i``'s unit sketch (measured in ``geometry``'s) in the span of the ``others`` and the
        earlier rounds' sketches."""
        gram = self.own.get(geometry, self.shared)
        residual = span_residual(gram, self.where[i], [self.where[o] for o in self.members(geometry, others)])
        return min(1.0, max(0.0, 1.0 - residual))


def combination_copies(
    spans: Mapping[tuple[int, str], dict],
    pool: Sequence[tuple[int, str]],
    evidence: Mapping[tuple[int, str], tuple[float | None, float | None]],
    threshold: float,
    fixed: Sequence[tuple[int, str]] = (),
) -> tuple[dict[tuple[int, str], dict], dict[tuple[int, str], float]]:
    """Which Δs of ``pool`` (``(uid, hotkey)`` keys of the eligible peers) are combinations of the others'
    (and of the ``fixed`` peers' Δs, which explain but are never judged nor removed).

    Linear dependence is symmetric — with C = (A + B)/2, A = 2·C − B lies in the span of {B, C} too — so
    the test alone cannot say who copied. Greedy: a peer whose explained fraction (the share of its unit
    sketch in the span of the other remaining peers' and the earlier rounds' sketches) is at least
    ``threshold`` is refused when, among the peers that are that dependent in its geometry, it shows
    the least own-page evidence (``evidence``: (assignment t — scoring caps it at the trust bar, so among
    peers that clear the bar their specificity decides —, specificity), None lowest; then the higher
    uid); the one such peer with the least evidence goes, and the rest is measured again. The original
    learned its pages, a copier did not; once the copy is gone the originals are independent again.

    The geometry matters for sparse Δs, judged on their own support (:class:`_SpanGeometry`): there a Δ
    that merely *contains* an honest sparse Δ's values (and more elsewhere) explains it fully while not
    being explained itself over all of its coordinates; judged in the honest Δ's geometry, that Δ is as
    dependent as the honest one and has less evidence, so the honest one is not refused. With dense
    Δs only (one shared geometry) the rule is: refuse the least-evidence dependent peer, repeat.

    Returns (refused key → {"explained" (when it was refused), "earlier" (the earlier rounds' share
    alone), "of": whose Δs it combines, :func:`_sources`}, the survivors' final explained fractions).
    """
    fixed = [k for k in fixed if k not in pool]
    geo = _SpanGeometry(spans, [*pool, *fixed])

    def rank(k: tuple[int, str]) -> tuple:
        return (*(none_lowest(x) for x in evidence.get(k, (None, None))), -k[0])

    active = sorted(pool)
    found: dict[tuple[int, str], float] = {}
    while True:
        span_keys = [*active, *fixed]
        fractions = {k: geo.explained(k, k, _but(span_keys, k)) for k in active}
        refusable, shared_dependent = [], None
        for k in active:
            if fractions[k] < threshold:
                continue
            if k not in geo.own:  # the shared geometry: the same dependent set for every dense Δ
                if shared_dependent is None:
                    shared_dependent = [
                        j
                        for j in active
                        if (fractions[j] if j not in geo.own else geo.explained(k, j, _but(span_keys, j)))
                        >= threshold
                    ]
                dependent = shared_dependent
            else:
                members = geo.members(k, span_keys)
                dependent = [k] + [
                    j
                    for j in members
                    if j != k and j in active and geo.explained(k, j, _but(members, j)) >= threshold
                ]
            if min(dependent, key=rank) == k:
                refusable.append(k)
        if not refusable:
            break
        victim = min(refusable, key=rank)
        found[victim] = fractions[victim]
        active = [o for o in active if o != victim]
    refused = {
        k: {
            "explained": frac,
            "earlier": spans[k]["earlier"],
            "of": _sources(geo, spans[k], k, [*active, *fixed]),
        }
        for k, frac in found.items()
    }
    return refused, fractions


def _sources(
    geo: _SpanGeometry, span: dict, key: tuple[int, str], originals: list[tuple[int, str]]
) -> list[dict]:
    """Whose Δs a refused one combines, among the peers left after every copy was removed: those whose
    removal lowers its explained fraction by at least 1 % (``share``), largest first, at most 5; when
    none does alone, the (at most 3) its sketch leans on most, with inner product ≥ 0.1 after the
    earlier span is projected out (``share`` 0); none for a mix of earlier rounds' Δs alone."""
    originals = geo.members(key, originals)
    full = geo.explained(key, key, originals)
    drops = sorted(
        ((full - geo.explained(key, key, [x for x in originals if x != o]), o) for o in originals),
        key=lambda d: (-d[0], d[1]),
    )
    named = [(d, o) for d, o in drops if d >= 0.01][:5]
    if not named:  # redundant originals (none needed alone): those it leans on, if any (not: a stale mix)
        lean = {(p["uid"], p["hotkey"]): abs(p["dot"]) for p in span["products"]}
        named = sorted(
            ((0.0, o) for o in originals if lean.get(o, 0.0) >= 0.1), key=lambda d: (-lean[d[1]], d[1])
        )
        named = named[:3]
    return [{"uid": o[0], "hotkey": o[1], "share": d} for d, o in named]


def _but(keys: Sequence[tuple[int, str]], k: tuple[int, str]) -> list[tuple[int, str]]:
    return [o for o in keys if o != k]


def none_lowest(x: float | None) -> float:
    """An evidence value for ranking: an unknown one (None) ranks lowest."""
    return -math.inf if x is None else x
