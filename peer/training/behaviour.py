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
nan            a NaN Δ                                                nothing
scaled         100 × its Δ                                            100 × Δ (clipped by reducers)
sign-flip      −Δ                                                     −Δ
stale          nothing in its first round (it trains then), after    nothing (weight 0)
               that the same old Δ every round (trains no more)
=============  ======================================================  =============================
"""

from __future__ import annotations

import enum

import torch


class Behaviour(enum.StrEnum):
    HONEST = "honest"
    FREE_RIDER = "free-rider"
    COPYCAT = "copycat"
    RANDOM_DATA = "random-data"
    NAN = "nan"
    SCALED = "scaled"
    SIGN_FLIP = "sign-flip"
    STALE = "stale"

    @property
    def is_honest(self) -> bool:
        return self is Behaviour.HONEST


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
    if b is Behaviour.SCALED:
        return [d * 100 for d in delta], 1.0
    if b is Behaviour.SIGN_FLIP:
        return [-d for d in delta], 1.0
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
    if b is Behaviour.SCALED:
        return [d * 100 for d in delta]
    if b is Behaviour.SIGN_FLIP:
        return [-d for d in delta]
    return delta
