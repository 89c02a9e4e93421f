"""A stake-weighted, Yuma-like consensus and incentive computation (pure; LocalLedger's epoch).

Simplifications against the runtime's Yuma consensus, chosen so a local run ends with readable rewards:

* Bonds have no moving average (``bonds_moving_average = 0``): a validator's bond in a miner is its
  share of the stake-weighted clipped weight on that miner in this epoch only.
* No liquid alpha, no Yuma3, no owner cut, no childkeys; dTAO pools are ignored: emission per epoch is
  a fixed amount split 50/50 between miners (by incentive) and validators (by dividends).
* Only uids with a validator permit count as validators; self-weights are dropped.
* If no permitted setter has stake, every permitted setter counts with equal stake (a fresh local
  subnet has no stake yet; the runtime would give everyone zero).

Steps (kappa = 0.5): rows of W are normalised to sum 1; consensus ``C_j`` is the stake-weighted
median of column j (the largest w such that validators holding >= kappa of the stake give >= w);
weights are clipped to it, ``W'_ij = min(W_ij, C_j)``; rank ``R_j = sum_i S_i W'_ij``; incentive
``I = R / sum(R)``; bonds ``B_ij = S_i W'_ij / sum_k S_k W'_kj``; dividends ``D_i = sum_j B_ij I_j``
normalised to sum 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

KAPPA = 0.5


@dataclass(frozen=True)
class EpochResult:
    """Per-uid results of one epoch (lists indexed by uid)."""

    consensus: list[float]
    incentive: list[float]
    dividends: list[float]
    validator_stake: list[float]
    """Normalised stake S_i used for uid i (0 for non-validators)."""


def stake_weighted_median(values: Sequence[float], stakes: Sequence[float], kappa: float = KAPPA) -> float:
    """Largest ``w`` among ``values`` such that stake with ``value >= w`` is at least ``kappa`` of the total."""
    total = sum(stakes)
    if total <= 0:
        return 0.0
    best = 0.0
    for w in sorted(set(values)):
        support = sum(s for v, s in zip(values, stakes, strict=True) if v >= w)
        if support >= kappa * total - 1e-12:
            best = w
    return best


def yuma_epoch(
    n: int,
    stake: Sequence[int],
    permit: Sequence[bool],
    weights: Mapping[int, Sequence[tuple[int, int]]],
    kappa: float = KAPPA,
) -> EpochResult:
    """One epoch for ``n`` uids: ``weights[i] = [(j, w_u16), ...]`` set by uid ``i``."""
    if len(stake) != n or len(permit) != n:
        raise ValueError("stake and permit need one entry per uid")
    setters = [i for i in range(n) if permit[i] and any(j != i and w > 0 for j, w in weights.get(i, ()))]
    raw = {i: float(stake[i]) for i in setters}
    if setters and sum(raw.values()) <= 0:
        raw = {i: 1.0 for i in setters}
    tot = sum(raw.values())
    s = [raw.get(i, 0.0) / tot if tot > 0 else 0.0 for i in range(n)]
    # normalised weight rows without self-weights and out-of-range uids
    w_rows: dict[int, list[float]] = {}
    for i in setters:
        row = [0.0] * n
        for j, w in weights.get(i, ()):
            if j != i and 0 <= j < n:
                row[j] = float(w)
        z = sum(row)
        w_rows[i] = [x / z for x in row] if z > 0 else row
    consensus = [0.0] * n
    for j in range(n):
        consensus[j] = stake_weighted_median([w_rows[i][j] for i in setters], [s[i] for i in setters], kappa)
    rank = [0.0] * n
    clipped: dict[int, list[float]] = {
        i: [min(w_rows[i][j], consensus[j]) for j in range(n)] for i in setters
    }
    for j in range(n):
        rank[j] = sum(s[i] * clipped[i][j] for i in setters)
    rtot = sum(rank)
    incentive = [r / rtot if rtot > 0 else 0.0 for r in rank]
    dividends = [0.0] * n
    for j in range(n):
        col = sum(s[i] * clipped[i][j] for i in setters)
        if col <= 0:
            continue
        for i in setters:
            dividends[i] += s[i] * clipped[i][j] / col * incentive[j]
    dtot = sum(dividends)
    dividends = [d / dtot if dtot > 0 else 0.0 for d in dividends]
    return EpochResult(consensus=consensus, incentive=incentive, dividends=dividends, validator_stake=s)
