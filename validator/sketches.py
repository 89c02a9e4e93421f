"""Δ sketches: the coordinates a validator keeps of every Δ, and where each sketch lies relative to the others.

Every copy test reads sketches, not whole Δs (a 1B Δ is 4 GB in fp32; its sketch is 65,536 numbers, kept
per round for the later rounds' stale and copy checks):

* the *plan* — which coordinates: a public strided subset (``PUBLIC_SKETCH``, records before keyed
  sketches, tests) or a set drawn by the validator's secret key (:func:`keyed_sketch_positions`), so a
  copier cannot change exactly the coordinates that are looked at;
* the *geometry* — :func:`cosine` for near-duplicates, and :func:`span_measurements`: the fraction of
  each sketch in the span of every other sketch of the round and of the earlier rounds (least squares),
  with the Gram matrix from which scoring redoes it over any subset of peers (the combination copy test,
  validator.combinations).

Moved from validator.evaluation (no behaviour change); the Evaluator takes sketches with these.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch


def sketch_indices(shapes: Sequence[tuple[str, int]], size: int) -> dict[str, tuple[int, int]]:
    """For each tensor (name, numel) in order: (offset, stride) of a global strided subset of ~``size`` coords."""
    total = sum(n for _, n in shapes)
    stride = max(1, math.ceil(total / size))
    out, pos = {}, 0
    for name, n in shapes:
        offset = (-pos) % stride
        out[name] = (offset, stride)
        pos += n
    return out


PUBLIC_SKETCH = "strided"
"""The sketch plan of an evaluator without a key: a strided subset fixed by the model's shapes alone (the
plan of every record made before keyed sketches; tests and benchmarks use it for reproducible numbers)."""


def sketch_plan_id(key: bytes) -> str:
    """The name a record gives to the keyed plan of ``key`` (a fingerprint: it does not reveal the key)."""
    return "keyed-" + hashlib.blake2b(key, digest_size=8, person=b"gs-sketch-id").hexdigest()


def keyed_sketch_positions(
    shapes: Sequence[tuple[str, int]], size: int, key: bytes
) -> dict[str, torch.Tensor]:
    """For each tensor (name, numel) in order: the sorted positions (int64) it contributes to a sketch of
    ``size`` coordinates drawn uniformly without replacement from the whole model by a keyed hash stream.

    Why keyed: every copy test (duplicate cosine, combinations, stale replays) reads only the sketch. A
    subset anyone can compute (the public strided plan) is dodged by a copier that keeps another peer's Δ
    and overwrites just those coordinates — 0.006 % of a 1B model's — and then passes as original work.
    With positions only the validator knows, a Δ changed on a fraction f of its energy looks changed by
    about f in the sketch too: the sketch's cosine estimates the full Δs' cosine, whatever the copier did.
    The key is the validator's own secret (``ValidatorStore.sketch_key``), fixed for its life, so sketches
    of earlier rounds stay comparable and ``validator replay`` (with the state dir) reproduces them."""
    total = sum(n for _, n in shapes)
    if total <= size:
        chosen = list(range(total))
    else:
        seen: set[int] = set()
        chosen = []
        counter = 0
        while len(chosen) < size:
            block = hashlib.blake2b(counter.to_bytes(8, "little"), key=key, digest_size=64).digest()
            counter += 1
            for i in range(0, 64, 8):
                pos = int.from_bytes(block[i : i + 8], "little") % total  # bias ≤ total / 2⁶⁴: none
                if pos not in seen and len(chosen) < size:
                    seen.add(pos)
                    chosen.append(pos)
    positions = torch.tensor(sorted(chosen), dtype=torch.int64)
    out, start = {}, 0
    for name, n in shapes:
        lo, hi = torch.searchsorted(positions, torch.tensor([start, start + n])).tolist()
        out[name] = positions[lo:hi] - start
        start += n
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0 or not math.isfinite(na) or not math.isfinite(nb):
        return 0.0
    return float(torch.dot(a.double(), b.double()) / (na * nb))


SPAN_TOL = 1e-6
"""Singular values (of unit-norm sketches) below this span no direction: a sketch part this small
(≤ 1e-12 of a sketch's energy) is rounding, not a direction of work."""


def _basis(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (columns) of the span of ``a``'s columns, directions below ``SPAN_TOL`` dropped
    (a rank-deficient set — an exact duplicate — gives no spurious direction)."""
    if a.shape[1] == 0:
        return a
    u, s, _ = torch.linalg.svd(a, full_matrices=False)
    return u[:, s > SPAN_TOL]


def _project_out(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` minus its projection on the orthonormal columns ``u``, twice (re-orthogonalisation:
    one pass leaves rounding of the size of the projected part, which is all of a copy's energy)."""
    for _ in range(2):
        x = x - u @ (u.T @ x)
    return x


SPARSE_SUPPORT = 0.5
"""A sketch with nonzeros on less than this share of its coordinates is a sparse (top-k) Δ: its span
is measured on its own support (see :func:`span_measurements`)."""


def _unit_columns(vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each vector in float64 scaled to unit norm (an all-zero one stays zero: it spans nothing)."""
    out = []
    for v in vectors:
        n = float(v.norm())
        out.append(v / n if n > 0 else v)
    return out


def _coordinates(m: torch.Tensor) -> torch.Tensor:
    """A k × k matrix T with Tᵀ·T = Mᵀ·M for M (d × k, float64): the columns' geometry (every inner
    product) in k dimensions, so the rest works on small matrices.

    From the Gram matrix (one BLAS-3 product; measured ~10× faster than a Householder QR of M at d =
    65,536) and its symmetric eigendecomposition, T = Λ^½·Vᵀ. Accuracy: the sketches are float32, so
    every product is exact in float64 and each sum of 65,536 of them is accurate to ~1e-13 of the unit
    columns' norms; the eigendecomposition adds ~k²·1e-16 (k = 128: ~2e-12). Residual energies are then
    accurate to about ``SPAN_TOL``² = 1e-12 of a unit sketch's energy — directions that small are
    dropped as rounding — while the decisions taken on them are at 0.05 (1 − the combination
    threshold), ten orders of magnitude above."""
    g = m.T @ m
    w, v = torch.linalg.eigh((g + g.T) / 2)
    return (v * w.clamp(min=0).sqrt()).T


def _residual_coords(old: Sequence[torch.Tensor], cols: Sequence[torch.Tensor]) -> torch.Tensor:
    """Coordinates ((m + n) × n) of the unit ``cols`` after the span of the unit ``old`` is projected out
    (:func:`_coordinates` of [old | cols], then the earlier block's SVD basis removed)."""
    m = len(old)
    t = _coordinates(torch.stack(_unit_columns(old) + _unit_columns(cols), dim=1))
    return _project_out(_basis(t[:, :m]), t[:, m:])


def span_measurements(
    sketches: Mapping[tuple[int, str], torch.Tensor], earlier: Sequence[torch.Tensor] = ()
) -> dict[tuple[int, str], dict]:
    """For each sketch of this round (``(uid, hotkey) → sketch``): how much of it lies in the span of the
    others and of the ``earlier`` rounds' sketches (the ``PeerMeasurement.span`` dict). All-zero or
    non-finite sketches are left out (no entry, and they span nothing).

    Every sketch is scaled to unit norm (float64); the earlier span is projected out of this round's sketches
    (:func:`_residual_coords`), their Gram matrix is recorded (``products``), and each one's residual
    against all the others is taken with an SVD basis that drops directions below ``SPAN_TOL``
    (``explained``). A sparse (top-k) sketch (nonzeros on < ``SPARSE_SUPPORT`` of it) is measured on its
    own support: there a top-k of a mix of sparse Δs *is* the mix of their values, while over all
    coordinates it keeps only part of each; its entry adds ``support`` (the share of coordinates) and
    ``support_gram`` (the Gram matrix on that support, rows and columns in ``products`` order) and
    ``support_overlap`` (the share of each sketch's squared norm on that support, same order) and
    ``support_mean_explained`` and ``support_mean_gram`` (:func:`_support_mean_geometry`: the copy test
    for an average formed coordinate by coordinate over the senders that sent it).

    Cost: one Gram product of d × (m + n) (d = the sketch size, 65,536 by default, m earlier and n
    current sketches), d·(m + n)² flops, an eigendecomposition and n SVDs of at most (m + n)-square
    matrices, and per sparse sketch the same on its support (~1.6 % of d at the default top-k
    density): with 32 sampled peers and 3 earlier rounds (m + n = 128) ~1 GFLOP.
    """
    keys, vecs = [], []
    for k, sk in sketches.items():
        v = sk.detach().reshape(-1).double().cpu()
        n = float(v.norm())
        if n > 0 and math.isfinite(n):
            keys.append(k)
            vecs.append(v)
    old = []
    for sk in earlier:
        v = sk.detach().reshape(-1).double().cpu()
        n = float(v.norm())
        if n > 0 and math.isfinite(n):
            old.append(v)
    if not keys:
        return {}
    shared = _residual_coords(old, vecs)
    shared_gram = _symmetric_gram(shared)
    out = {}
    for i, k in enumerate(keys):
        support = vecs[i] != 0
        share = float(support.double().mean())
        sparse = share < SPARSE_SUPPORT
        if sparse:  # every sketch restricted to this one's support, for both geometries below
            old_s, vecs_s = [o[support] for o in old], [v[support] for v in vecs]
        x = _residual_coords(old_s, vecs_s) if sparse else shared
        gram = _symmetric_gram(x) if sparse else shared_gram
        rest = torch.cat([x[:, :i], x[:, i + 1 :]], dim=1)
        resid = _project_out(_basis(rest), x[:, i : i + 1])
        out[k] = {
            "explained": min(1.0, max(0.0, 1.0 - float(resid.pow(2).sum()))),
            "earlier": min(1.0, max(0.0, 1.0 - float(gram[i, i]))),
            "earlier_sketches": len(old),
            "products": [
                {"uid": kj[0], "hotkey": kj[1], "dot": float(shared_gram[i, j])} for j, kj in enumerate(keys)
            ],
        }
        if sparse:
            explained_m, gram_m = _support_mean_geometry(old_s, vecs_s, i)
            out[k]["support_mean_explained"] = explained_m
            out[k]["support_mean_gram"] = [[float(g) for g in row] for row in gram_m]
            out[k]["support"] = share
            out[k]["support_gram"] = [[float(g) for g in row] for row in gram]
            out[k]["support_overlap"] = [
                float(vs.pow(2).sum() / v.pow(2).sum()) for vs, v in zip(vecs_s, vecs, strict=True)
            ]  # a sketch with none of its energy here spans nothing here (and is not judged here)
    return out


def _support_mean_geometry(
    old: Sequence[torch.Tensor], vecs: Sequence[torch.Tensor], i: int
) -> tuple[float, torch.Tensor]:
    """The copy test for an average taken coordinate by coordinate over its senders, on sketch ``i``'s
    support (``vecs``: every sketch of the round restricted to it; ``old``: the earlier rounds').

    A swarm that combines sparse Δs by ``support`` (``train.topk_aggregation``: each coordinate averaged
    over the senders that sent it) applies Σ_j Δ_j ⊘ count, which is not in the span of the Δs
    themselves. Here every other sketch is divided, coordinate by coordinate, by how many of the others
    are non-zero there; a copier who publishes that average (re-sparsified) is then fully explained.
    An honest sparse Δ alone is not: on the coordinates only it sent nothing else is non-zero, and
    where others sent too the divisors change from one coordinate to the next. Returns ``i``'s explained
    fraction and the Gram matrix of [the divided others, with ``i`` itself undivided at its position]
    after the earlier span is projected out, so that scoring can redo the test over any subset
    (:func:`validator.combinations.combination_copies`, as with ``support_gram``); linear dependence
    is symmetric there too (the honest Δs a copy averages are dependent on it), and scoring's greedy
    refuses the one with the least own-page evidence first."""
    count = torch.zeros_like(vecs[i])
    for j, v in enumerate(vecs):
        if j != i:
            count += (v != 0).double()
    cols = [v if j == i else v / count.clamp(min=1) for j, v in enumerate(vecs)]
    y = _residual_coords(old, cols)
    rest = torch.cat([y[:, :i], y[:, i + 1 :]], dim=1)
    resid = _project_out(_basis(rest), y[:, i : i + 1])
    return min(1.0, max(0.0, 1.0 - float(resid.pow(2).sum()))), _symmetric_gram(y)


def _symmetric_gram(x: torch.Tensor) -> torch.Tensor:
    g = x.T @ x
    return (g + g.T) / 2
