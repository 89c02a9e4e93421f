"""Fault injection for studying the incentive mechanism: how a peer misbehaves, if it does.

``peer join --behaviour B`` (refused on a real network; the local ledger only). hivemind keeps such
switches for its tests; we keep them so tests and the demo can show that validators pay honest work
and nothing else. Each behaviour changes three things: whether the peer trains, which Δ it publishes
for validators, and what (and with which weight) it puts into the swarm's all-reduce.

=============  ======================================================  =============================
behaviour      publishes                                               averages in
=============  ======================================================  =============================
honest         its own Δ, trained on its assigned pages               its Δ, weight 1
free-rider     a zero Δ, trains nothing                               nothing (weight 0), lurks
copycat        the swarm's averaged Δ of the round, trains nothing    nothing (weight 0), lurks
random-data    Δ trained on pages *not* assigned to it                that Δ, weight 1
heldout-train  Δ trained on its assigned pages plus k/2 held-out      that Δ, weight 1
               pages drawn per round (k = pages per round), shuffled
               together; its manifest claims only the assigned pages
               (``heldout-train-full``: k, at most all of them)
nan            a NaN Δ                                                nothing
scaled         100 × its Δ                                            100 × Δ (clipped by reducers)
sign-flip      −Δ                                                     −Δ
sign-flip-3    −3 Δ  (also ``sign-flip-10``, ``sign-flip-100``)          −3 Δ  (−10 Δ, −100 Δ)
noise          Gaussian noise, 10 × its Δ's norm                      that noise
collude        one fixed seeded direction, 3 × its Δ's norm: every    that vector (colluders with
               colluder sends the same direction                      equal Δ norms send one vector)
stale          nothing in its first round (it trains then), after    nothing (weight 0)
               that the same old Δ every round (trains no more)
=============  ======================================================  =============================
"""

from __future__ import annotations

import enum
import hashlib

import torch


class Behaviour(enum.StrEnum):
    HONEST = "honest"
    FREE_RIDER = "free-rider"
    COPYCAT = "copycat"
    RANDOM_DATA = "random-data"
    HELDOUT_TRAIN = "heldout-train"
    HELDOUT_TRAIN_FULL = "heldout-train-full"
    NAN = "nan"
    SCALED = "scaled"
    SIGN_FLIP = "sign-flip"
    SIGN_FLIP_3 = "sign-flip-3"
    SIGN_FLIP_10 = "sign-flip-10"
    SIGN_FLIP_100 = "sign-flip-100"
    NOISE = "noise"
    COLLUDE = "collude"
    STALE = "stale"

    @property
    def is_honest(self) -> bool:
        return self is Behaviour.HONEST


_FACTORS = {
    Behaviour.SCALED: 100.0,
    Behaviour.SIGN_FLIP: -1.0,
    Behaviour.SIGN_FLIP_3: -3.0,
    Behaviour.SIGN_FLIP_10: -10.0,
    Behaviour.SIGN_FLIP_100: -100.0,
}
NOISE_SCALE = 10.0
"""``noise`` sends Gaussian noise of this many times its own Δ's norm."""
COLLUDE_SCALE = 3.0
"""``collude`` sends the shared direction at this many times its own Δ's norm."""
_HELDOUT_SHARE = {Behaviour.HELDOUT_TRAIN: 0.5, Behaviour.HELDOUT_TRAIN_FULL: 1.0}


def heldout_pages_per_round(b: Behaviour, k: int) -> int:
    """How many held-out pages the peer trains on each round besides its ``k`` assigned pages."""
    return int(k * _HELDOUT_SHARE.get(b, 0.0))


def _norm(delta: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta)))


def _gaussian(delta: list[torch.Tensor], seed: int, norm: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    noise = [torch.randn(d.shape, generator=g) for d in delta]
    return [n * (norm / max(_norm(noise), 1e-30)) for n in noise]


def poisoned(b: Behaviour, delta: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """The poisoned Δ an attacking behaviour sends instead of its own (None: not a poisoning behaviour).

    ``noise`` seeds its noise with a hash of its Δ (fresh every round); ``collude`` uses one direction
    seeded by a constant, so colluders need no channel to agree on it."""
    if b in _FACTORS:
        return [d * _FACTORS[b] for d in delta]
    if b is Behaviour.NOISE:
        seed = int.from_bytes(
            hashlib.blake2b(delta[0].detach().contiguous().numpy().tobytes(), digest_size=7).digest(),
            "little",
        )
        return _gaussian(delta, seed, NOISE_SCALE * _norm(delta))
    if b is Behaviour.COLLUDE:
        return _gaussian(delta, 424242, COLLUDE_SCALE * _norm(delta))
    return None


def trains(b: Behaviour, round_index: int) -> bool:
    """Whether the peer runs inner steps this round (``round_index`` counts rounds since it started)."""
    if b in (Behaviour.FREE_RIDER, Behaviour.COPYCAT):
        return False
    if b is Behaviour.STALE:
        return round_index == 0
    return True


def averaging_input(b: Behaviour, delta: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """(tensors, weight) this peer feeds into the all-reduce."""
    if b in (Behaviour.FREE_RIDER, Behaviour.COPYCAT, Behaviour.NAN, Behaviour.STALE):
        return [torch.zeros_like(d) for d in delta], 0.0
    bad = poisoned(b, delta)
    if bad is not None:
        return bad, 1.0
    return delta, 1.0


def published_delta(
    b: Behaviour, delta: list[torch.Tensor], last_trained: list[torch.Tensor] | None, round_index: int
) -> list[torch.Tensor] | None:
    """The Δ the peer publishes *before* averaging (None: nothing; a copycat publishes after averaging).

    A stale peer replays: it keeps the Δ of its one trained round unpublished, then publishes it in every
    later round as if it were that round's work (stale base, another round's pages, and from the second
    replay on a repeat of its own earlier Δ)."""
    if b is Behaviour.COPYCAT:
        return None
    if b is Behaviour.STALE:
        return last_trained if round_index > 0 else None
    if b is Behaviour.FREE_RIDER:
        return [torch.zeros_like(d) for d in delta]
    if b is Behaviour.NAN:
        return [torch.full_like(d, float("nan")) for d in delta]
    bad = poisoned(b, delta)
    if bad is not None:
        return bad
    return delta
