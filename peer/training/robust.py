"""Robust averaging of one part of the swarm's pseudo-gradient: the rule a part owner applies.

The owner of a part holds every sender's slice of it (``n`` vectors ``x_i`` with sender weights
``ω_i``) and must return one vector that honest senders' slices determine and that no single sender
can steer far. Two steps, both pure functions of the *set* of (sender, part): senders are taken in
sender order, the iteration count is fixed, nothing depends on arrival order or threads.

0. **One vote per vector** (:func:`merge_duplicates`): near-identical parts from a minority of the
   senders count as one sender (honest Δs from different pages are never near-identical).
1. **Bound size** (:func:`clip_to_median_norm`): each ``x_i`` is scaled down to ``norm_clip`` × the
   median norm. A ×100 Δ becomes at most twice a typical one; its direction is left to step 2.
2. **Find the centre and the outliers** (:func:`biweight_mean`): an M-estimate of location with Tukey's
   biweight (Beaton & Tukey 1974) on the L2 distance to the centre. Start at the coordinate-wise median
   (breakdown point ½); then, a fixed number of times: ``d_i = ‖x_i − c‖``, scale ``s`` = median of
   the ``d_i``, weight ``a_i = ω_i · (1 − (d_i / (C·s))²)²`` (0 beyond ``C·s``), ``c`` = the
   ``a``-weighted mean. ``C`` is ``cutoff``.
3. **Average the inliers** (:func:`screened_mean`, ``inlier_mean``): the plain ``ω``-weighted mean of
   the parts with ``d_i ≤ C·s`` around that centre — exactly the plain mean when nobody is far out.

Guarantee (per part): a sender with ``‖x_j − c‖ > C·s`` moves the result by **nothing**; a nearer one
by less than ``ω_j · C·s / Σω`` in whatever direction it likes (an *inner* attack; the biweight centre
alone, ``inlier_mean=False``, bounds it by ``0.286·C·s / Σa`` but shrinks honest updates by tapering
the farthest honest sender). A sign-flipped, ×100 or noise Δ sits several ``s`` away from the honest
centre (honest Δs of one round share a direction; their distances to the centre concentrate near
``s``), so it gets weight 0 instead of the bounded-but-nonzero pull that a Huber-type rule such as
CenteredClip (:func:`centered_clip`, Karimireddy et al. 2021; BTARD, Gorbunov et al. 2022) leaves it:
with CenteredClip's radius τ an outlier still shifts the fixed point by ``τ / n_honest`` toward itself.

Parts are disjoint slices of the model's coordinates and each is reduced on its own, so per-part
bounds compose in L2 over the model: a sender's total influence is at most the root of the sum of its
squared per-part influences — it gains nothing by splitting its attack across parts.

Breakdown: the median start and the median scale tolerate fewer than half of the senders being
arbitrary; the weight cut makes gross outliers irrelevant as long as the honest senders are the
majority *and* the closest group. Two or more colluders sending the same vector are a tight cluster
that the median scale can mistake for the centre when they are close to half of the group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class RobustRule:
    """How a part owner averages the senders' parts (see the module docstring)."""

    norm_clip: float | None = 2.0
    """Scale each part down to this × the median part norm before averaging (None: no size bound).
    Lower it if one peer's ×k Δ still visibly moves the average; raise it if honest peers with many more
    inner steps than the others (longer Δs) should count for more."""
    cutoff: float | None = 2.5
    """Tukey biweight cut-off ``C``, in units of the median distance to the centre (None: plain mean
    after the size bound). Parts farther than ``C`` × that distance get weight 0. Symptom-driven tuning:
    held-out loss worse with a sign-flipping or noisy peer in the group than without it → lower it
    (not below ~1.8: honest distances spread ±15 % around the median, and an honest peer that trained
    many more or fewer steps than the rest sits farther out); honest-only swarms converge slower than
    with plain averaging, or ``rejected`` counts grow in honest groups → raise it."""
    iters: int = 8
    """Fixed number of re-weighting iterations (a fixed count keeps the result reproducible); 4–8
    converge on the groups we measured, each costs two passes over the part."""

    inlier_mean: bool = True
    """Return the plain ``ω``-weighted mean of the senders within ``cutoff`` × the median distance of the
    biweight centre (True), or the biweight centre itself (False). True costs honest-only groups nothing
    (it is the plain mean when nobody is far out); False tapers the farthest honest sender too, which
    shrank honest-only progress by up to 3 % in the simulation, but bounds an *inner* attacker more
    tightly (0.29·C·s/Σa instead of C·s/n)."""
    dedup: float | None = 0.05
    """Senders whose parts lie within this relative distance of each other (``‖x_i − x_j‖ ≤ dedup ·
    min norm``) count as one sender (None: off). Honest Δs sit ≈ 0.8 apart in these units; colluders
    that copy one vector sit at 0. Raise it if colluders add a little noise to their copies; it must
    stay well below the honest spread (≤ 0.3)."""

    direction_screen: bool = True
    """Also leave out a sender whose part points away from the biweight centre (``⟨x_i, c⟩ < 0``, from the
    Gram matrix: one n × n product, nothing per value). Honest Δs of one round share a direction (cosine
    ≈ 0.6 with each other, ≈ 0.8 with their mean); a ×−1 sign flip has ≈ −0.8 whatever the distances,
    and with 5 honest senders it sits at ≈ 3 s, near the cut-off, so the distance test alone kept it in
    4–5 of 16 rounds (RESULTS.md, robust averaging round 3). With it on, 3 and 5 honest peers: every
    attack ≤ 1.010, honest-only groups bit-identical to it off. An honest sender's own part is a 1/n
    share of the centre, so it is left out only if the others point against it by more than its own
    length — in parts of ~10^5 values that does not happen by chance. Symptom → tuning: ``rejected``
    counts in honest-only groups (Δs that disagree in sign: a far too high inner lr) → turn it off."""

    def __post_init__(self) -> None:
        if self.dedup is not None and not 0 <= self.dedup < 1:
            raise ValueError(f"dedup must be in [0, 1), got {self.dedup}")
        if self.norm_clip is not None and self.norm_clip <= 0:
            raise ValueError(f"norm_clip must be > 0, got {self.norm_clip}")
        if self.cutoff is not None and self.cutoff <= 1:
            raise ValueError(f"cutoff must be > 1 (the median sender must count), got {self.cutoff}")
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")


PLAIN = RobustRule(norm_clip=None, cutoff=None, dedup=None)
"""No robustness: the weighted mean (the benchmark's baseline)."""
MEDIAN_NORM_CLIP = RobustRule(norm_clip=2.0, cutoff=None, dedup=None)
"""The previous defence: size bound only (2 × the median part norm), then the mean."""


def _median(values: torch.Tensor) -> float:
    """Median of a 1-D tensor (mean of the two middle values for an even count)."""
    s = values.sort().values
    k = len(s)
    return float(s[k // 2]) if k % 2 else float((s[k // 2 - 1] + s[k // 2]) / 2)


NETWORK_MAX_SENDERS = 8
"""Up to this many senders the coordinate median uses a min/max sorting network (no sort kernel)."""


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median of the rows of ``x`` ([n, d]); the middle two averaged for even ``n``.

    For ``n ≤ NETWORK_MAX_SENDERS`` an odd-even transposition network of elementwise min/max (exact,
    so bit-equal to the sort; ~50× faster than ``sort(dim=0)`` at 5 × 2^19 values), else a sort."""
    n = x.shape[0]
    if n == 3:  # the common small groups: the same min/max ops written out, two temporaries only
        lo, hi = torch.minimum(x[0], x[1]), torch.maximum(x[0], x[1])
        torch.minimum(hi, x[2], out=hi)
        return torch.maximum(lo, hi, out=lo)
    if n == 4:  # the middle two of four are max of the pair minima and min of the pair maxima
        lo = torch.maximum(torch.minimum(x[0], x[1]), torch.minimum(x[2], x[3]))
        hi = torch.minimum(torch.maximum(x[0], x[1]), torch.maximum(x[2], x[3]))
        return lo.add_(hi).div_(2)  # (s1 + s2) / 2, addition commutes: bit-equal to the sort's
    if n <= NETWORK_MAX_SENDERS:
        rows = list(x.clone().unbind(0))  # in place from here: fresh 2 MB tensors page-fault on a busy box
        scratch = torch.empty_like(rows[0])
        for phase in range(n):
            for i in range(phase % 2, n - 1, 2):
                lo, hi = rows[i], rows[i + 1]
                torch.minimum(lo, hi, out=scratch)
                torch.maximum(lo, hi, out=hi)
                rows[i], scratch = scratch, lo
        s = rows
    else:
        s = x.sort(dim=0).values
    return s[n // 2].clone() if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def merge_duplicates(
    parts: Sequence[torch.Tensor], weights: Sequence[float], tolerance: float
) -> tuple[list[torch.Tensor], list[float], int]:
    """Count senders whose parts are (near-)identical as one sender.

    Two positive-weight parts ``x_i, x_j`` are duplicates when ``‖x_i − x_j‖ ≤ tolerance ·
    min(‖x_i‖, ‖x_j‖)``. Greedy in sender order: each part joins the first earlier representative it
    duplicates; a group that is a minority of the positive-weight senders is replaced by its first member
    with the group's mean weight (a majority group is left alone, see the comment in the code). Honest Δs of one
    round come from different pages and are never this close (measured pairwise cosine 0.5–0.67, i.e.
    relative distance ≈ 0.8), so this changes nothing in an honest group and turns ``k`` colluders that
    send one vector into one voice. Returns ``(parts, weights, merged)``, ``merged`` = senders folded
    into an earlier one. Zero-weight senders are kept as they are (the rule ignores them anyway)."""
    flat = torch.stack([p.reshape(-1).float() for p in parts])
    keep, out_weights, merged = _merge_by_gram((flat @ flat.T).double(), weights, tolerance)
    return [parts[i] for i in keep], out_weights, merged


def _merge_by_gram(
    g: torch.Tensor, weights: Sequence[float], tolerance: float
) -> tuple[list[int], list[float], int]:
    """:func:`merge_duplicates` on the senders' Gram matrix (float64): ``(kept senders, their weights,
    merged)``. Distances come from the Gram matrix, so this costs no pass over the parts."""
    n = len(weights)
    sq = g.diagonal()
    reps: list[int] = []
    members: dict[int, list[int]] = {}
    for i in range(n):
        if weights[i] <= 0:
            continue
        home = None
        for r in reps:
            dist2 = float(sq[i] + sq[r] - 2 * g[i, r])
            bound = tolerance * min(float(sq[i]), float(sq[r])) ** 0.5
            if dist2 <= bound * bound:
                home = r
                break
        if home is None:
            reps.append(i)
            members[i] = [i]
        else:
            members[home].append(i)
    n_pos = sum(len(m) for m in members.values())
    # only a minority group is merged: a majority of identical parts is what honest senders send for a
    # slice none of them trained (all zeros, or weight decay only); merging it would hand the rest the vote
    fold = {r for r, m in members.items() if len(m) > 1 and 2 * len(m) < n_pos}
    merged = sum(len(members[r]) - 1 for r in fold)
    if merged == 0:
        return list(range(n)), list(weights), 0
    folded = {m for r in fold for m in members[r][1:]}
    keep, out_weights = [], []
    for i in range(n):
        if i in folded:
            continue
        keep.append(i)
        out_weights.append(sum(weights[m] for m in members[i]) / len(members[i]) if i in fold else weights[i])
    return keep, out_weights, merged


def clip_to_median_norm(
    parts: Sequence[torch.Tensor], weights: Sequence[float], factor: float
) -> tuple[list[torch.Tensor], int]:
    """Scale parts longer than ``factor`` × the median norm (of positive-weight senders) down to it.

    Returns the parts and how many were scaled."""
    norms = [float(p.norm()) for p in parts]
    counted = torch.tensor([n for n, w in zip(norms, weights, strict=True) if w > 0])
    if len(counted) == 0:
        return list(parts), 0
    bound = factor * _median(counted)
    out, clipped = [], 0
    for p, n, w in zip(parts, norms, weights, strict=True):
        if w > 0 and n > bound:
            p = p * (bound / n)
            clipped += 1
        out.append(p)
    return out, clipped


def biweight_mean(
    parts: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    cutoff: float,
    iters: int,
    center0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tukey-biweight M-estimate of the centre of ``parts`` (see the module docstring).

    Returns ``(centre, a)`` where ``a`` are the final per-sender weights normalised to sum 1 (0 for a
    sender the rule ignored). Senders with weight ``ω ≤ 0`` are ignored throughout. ``center0``
    overrides the coordinate-median start.
    """
    x = torch.stack([p.reshape(-1).float() for p in parts])
    omega = torch.tensor([max(float(w), 0.0) for w in weights], dtype=torch.float64)
    center, a, _ = _biweight(x, omega, cutoff=cutoff, iters=iters, center0=center0)
    total = float(a.sum())
    return center.reshape(parts[0].shape), (a / total if total > 0 else a).float()


def _biweight(
    x: torch.Tensor,
    omega: torch.Tensor,
    *,
    cutoff: float,
    iters: int,
    center0: torch.Tensor | None = None,
    gram: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The biweight iteration on the rows of ``x`` ([n, d]): ``(centre, a, d)``, ``d`` the distances to it.

    Every centre after the start is a combination ``c = Σ κ_i x_i`` of the rows, so distances come from
    the n × n Gram matrix: ``‖x_i − c‖² = G_ii − 2 (Gκ)_i + κᵀGκ``. The iterations then cost O(n²)
    instead of a pass over the part each; the part is touched by the median, two gemvs and one n × n
    product (float32 BLAS, accumulated in float64 from there; distances here are ≈ 0.5–1 × the norms, so
    the cancellation costs nothing that matters)."""
    pos = omega > 0
    if not bool(pos.any()):
        return torch.zeros_like(x[0]), torch.zeros(len(x), dtype=torch.float64), torch.zeros(len(x))
    gram = (x @ x.T).double() if gram is None else gram
    sq = gram.diagonal()
    if center0 is not None:
        c0 = center0.reshape(-1).float()
    else:
        c0 = coordinate_median(x if bool(pos.all()) else x[pos])
    d2 = sq - 2 * (x @ c0).double() + float(torch.dot(c0, c0))  # float32 BLAS, like the Gram matrix
    kappa = None
    a = omega
    for _ in range(iters):
        d = d2.clamp(min=0).sqrt()
        s = _median(d[pos])
        if s > 0:
            u = d / (cutoff * s)
            a = omega * (1 - u.square()).clamp(min=0).square()
        else:  # at least half the senders sit exactly on the centre: keep those
            a = omega * (d == 0).double()
        total = float(a.sum())
        if total <= 0:
            break
        kappa = a / total
        gk = gram @ kappa
        d2 = sq - 2 * gk + float(kappa @ gk)
    center = c0.clone() if kappa is None else (kappa.float() @ x)  # one gemv, sender order
    return center, a, d2.clamp(min=0).sqrt()


AGGREGATIONS = ("mean", "support")
"""How the last step of :func:`robust_mean` combines the kept parts: see :func:`weighted_mean`."""


def weighted_mean(x: torch.Tensor, a: torch.Tensor, *, aggregation: str = "mean") -> torch.Tensor:
    """``a``-weighted combination of the rows of ``x`` (``a`` ≥ 0, not all 0): one gemv, sender order.

    ``mean``: the ``a``-weighted mean. For sparse Δs a value that only one of n senders kept is then
    applied ÷ n, so the outer step per sent value shrinks as groups grow (where supports do not
    overlap) and a learning rate tuned at one group size overshoots or crawls at another.

    ``support`` (sparse Δs): each coordinate averaged over the rows that hold a non-zero value there,
    ``Σ a_i x_ij / Σ_{i: x_ij ≠ 0} a_i`` (0 where no row has one) — SparseLoCo's aggregation (Templar
    scatters its peers' top-k values with ``reduce="mean"``): a coordinate moves by its senders' mean
    value whatever n is. It is not linear in the rows, so a copy of it is not in the span of the
    senders' Δs; the validator has a test of its own for that copy
    (``validator.evaluation._support_mean_geometry``). A sender moves a coordinate by at most its own
    value there, after the size bound on its row. Dense rows (no zeros) give exactly the mean."""
    a = a.double()
    weights = (a / float(a.sum())).float()
    mean = weights @ x
    if aggregation == "mean":
        return mean
    if aggregation != "support":
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    counts = weights @ (x != 0).float()
    return torch.where(counts > 0, mean / counts.clamp(min=torch.finfo(torch.float32).tiny), 0.0)


def screened_mean(
    x: torch.Tensor,
    omega: torch.Tensor,
    d: torch.Tensor,
    cutoff: float,
    exclude: torch.Tensor | None = None,
    *,
    aggregation: str = "mean",
) -> tuple[torch.Tensor, int]:
    """The ``ω``-weighted mean of the *inliers*: rows of ``x`` within ``cutoff`` × the median of the
    distances ``d`` to the biweight centre.

    The biweight finds the centre and who is far from it; averaging the inliers with their own weights
    (instead of the biweight's tapered ones) makes the result exactly the plain mean when nobody is an
    outlier — the taper otherwise shrinks the update by down-weighting the farthest honest sender.
    ``exclude`` (bool per row) drops rows on top of the distance test (the scale ``s`` still counts
    them). ``aggregation``: see :func:`weighted_mean`. Returns ``(mean, dropped)``. Sender order, one gemv:
    deterministic given the inputs."""
    pos = omega > 0
    s = _median(d[pos])
    inlier = (d <= cutoff * s) & pos if s > 0 else (d == 0) & pos
    if exclude is not None and bool((inlier & ~exclude).any()):  # never all of them
        inlier = inlier & ~exclude
    a = omega * inlier.double()  # the median sender is an inlier: Σa > 0
    return weighted_mean(x, a, aggregation=aggregation), int((pos & ~inlier).sum())


def centered_clip(
    parts: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    tau: float,
    iters: int,
    center0: torch.Tensor | None = None,
) -> torch.Tensor:
    """CenteredClip (Karimireddy et al. 2021): ``v ← v + Σ ω_i clip_τ(x_i − v) / Σ ω_i``, ``iters`` times.

    Starts at ``center0`` (default: the coordinate-wise median). Each step moves by at most ``τ·ω_j/Σω``
    per sender; at the fixed point an outlier still pulls by ``τ / n_inside`` toward itself. Kept for
    the benchmark's comparison (``benchmarks/robustness.py --rules``), not used by the reducer.
    """
    x = torch.stack([p.reshape(-1).float() for p in parts])
    omega = torch.tensor([max(float(w), 0.0) for w in weights], dtype=torch.float32)
    pos = omega > 0
    if not bool(pos.any()):
        return torch.zeros_like(x[0]).reshape(parts[0].shape)
    v = coordinate_median(x[pos]) if center0 is None else center0.reshape(-1).float().clone()
    total = float(omega.sum())
    for _ in range(iters):
        diff = x - v
        d = diff.norm(dim=1).clamp(min=1e-30)
        scale = (tau / d).clamp(max=1.0)
        v = v + ((omega * scale) @ diff) / total
    return v.reshape(parts[0].shape)


def robust_mean(
    parts: Sequence[torch.Tensor], weights: Sequence[float], rule: RobustRule, *, aggregation: str = "mean"
) -> tuple[torch.Tensor, int]:
    """The part owner's average under ``rule``: duplicates merged, size bound, biweight-screened mean.

    ``aggregation`` (``support`` for sparse Δs, :func:`weighted_mean`): how the last step
    combines the kept parts; who is merged, clipped or screened out is decided on whole parts as for
    dense ones. Returns the average and how many senders the rule merged, clipped or dropped (for
    the biweight weights: a final weight below 1 % of an equal share), for the all-reduce's
    ``rejected`` counter."""
    if not parts:
        raise ValueError("robust_mean needs at least one part")
    if rule.dedup is None and rule.norm_clip is None and rule.cutoff is None:
        return _plain_mean(parts, weights, aggregation), 0
    # one copy of the parts ([n, d], ours to scale in place) and one Gram matrix serve every step: the
    # duplicate test, the norms and every biweight distance; the part itself is touched by the stack,
    # the Gram product, the median, one gemv for the distances to it and one for the result
    shape = parts[0].shape
    x = torch.stack([p.reshape(-1).float() for p in parts])
    gram = (x @ x.T).double()
    weights = list(weights)
    rejected = 0
    if rule.dedup is not None:
        keep, weights, rejected = _merge_by_gram(gram, weights, rule.dedup)
        if len(keep) < len(x):
            x, gram = x[keep], gram[keep][:, keep]
    n_pos = sum(1 for w in weights if w > 0)
    if rule.norm_clip is not None:
        rejected += _clip_rows_to_median_norm(x, gram, weights, rule.norm_clip)
    if rule.cutoff is not None and n_pos >= 3:  # two senders: no majority to tell who is off
        omega = torch.tensor([max(float(w), 0.0) for w in weights], dtype=torch.float64)
        center, a, d = _biweight(x, omega, cutoff=rule.cutoff, iters=rule.iters, gram=gram)
        if rule.inlier_mean:
            exclude = None
            if rule.direction_screen and float(a.sum()) > 0:  # ⟨x_i, c⟩ = (G κ)_i: from the Gram matrix
                exclude = (gram @ (a / a.sum())) < 0
            averaged, dropped = screened_mean(x, omega, d, rule.cutoff, exclude, aggregation=aggregation)
            return averaged.reshape(shape), rejected + dropped
        if aggregation != "mean" and float(a.sum()) > 0:
            center = weighted_mean(x, a, aggregation=aggregation)
        center, a = center.reshape(shape), a / max(float(a.sum()), 1e-300)
        rejected += int(
            sum(1 for ai, w in zip(a.tolist(), weights, strict=True) if w > 0 and ai < 0.01 / n_pos)
        )
        return center, rejected
    return _plain_mean(list(x.unbind(0)), weights, aggregation).reshape(shape), rejected


def _clip_rows_to_median_norm(
    x: torch.Tensor, gram: torch.Tensor, weights: Sequence[float], factor: float
) -> int:
    """:func:`clip_to_median_norm` in place on the rows of ``x`` (norms from the Gram matrix, which is
    rescaled to match). Returns how many rows were scaled."""
    norms = gram.diagonal().clamp(min=0).sqrt().tolist()
    counted = torch.tensor([n for n, w in zip(norms, weights, strict=True) if w > 0], dtype=torch.float64)
    if len(counted) == 0:
        return 0
    bound = factor * _median(counted)
    clipped = 0
    for i, (n, w) in enumerate(zip(norms, weights, strict=True)):
        if w > 0 and n > bound:
            f = bound / n
            x[i].mul_(f)
            gram[i, :] *= f
            gram[:, i] *= f
            clipped += 1
    return clipped


def _plain_mean(
    parts: Sequence[torch.Tensor], weights: Sequence[float], aggregation: str = "mean"
) -> torch.Tensor:
    """The ``ω``-weighted mean, summed in sender order (the result does not depend on arrival); a sparse
    ``aggregation`` goes through :func:`weighted_mean` (zeros where every weight is ≤ 0)."""
    if aggregation != "mean":
        w = torch.tensor([max(float(v), 0.0) for v in weights], dtype=torch.float64)
        if float(w.sum()) <= 0:
            return torch.zeros_like(parts[0], dtype=torch.float32)
        x = torch.stack([p.reshape(-1).float() for p in parts])
        return weighted_mean(x, w, aggregation=aggregation).reshape(parts[0].shape)
    acc = torch.zeros_like(parts[0], dtype=torch.float32)
    denominator = 0.0
    for p, w in zip(parts, weights, strict=True):  # sender order: the sum does not depend on arrival
        w = max(float(w), 0.0) if math.isfinite(w) else 0.0  # as every other path: no negative weight
        acc.add_(p.float(), alpha=w)
        denominator += w
    return acc.div_(denominator) if denominator > 0 else acc
