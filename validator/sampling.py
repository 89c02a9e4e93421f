"""Which peers a validator evaluates in a round when it cannot evaluate all of them (pure, table-tested).

Evaluating a peer costs ~1.7× the forward passes of its pages, so a validator with many peers scores a
*sample* per round (as SN38 and Templar validators do). The sample must be

* **unpredictable before the round ends**: a peer that knew it would not be evaluated could skip the work.
  The round's seed (hash of its first block) is known while the peers train, so the sampling key is the
  hash of the block that *ends* the round — the first block of round r+1 (``sampling_key``). It exists
  only once round r is over, the validator reads it when it starts evaluating, and anyone replaying the
  round derives the same key from the chain;
* **fair over time**: most slots go to the peers not evaluated for longest (never-evaluated first), so
  every peer is evaluated about every N/K rounds;
* **a deterrent in every round**: ``random_fraction`` of the slots go to peers drawn by the key from
  the rest, so "I was evaluated last round, I'm safe now" is never true.

Ties (same last-evaluated round) are broken by a hash of (key, uid, hotkey), so the order among equals
is unpredictable too. A peer not sampled keeps its EMA (validator.ema.update_ema with ``evaluated``)
and is explained as ``not sampled``.

**Listing is sampled too.** Listing a peer (dial, handshake, a signed answer) costs the validator time
per peer, so listing everyone before sampling grows linearly with the subnet. The validator therefore
samples among *every reachable uid* first and lists only the sample plus a few extra peers for the θ_r
vote (``min_listings``, :func:`vote_extras`); a sampled peer whose listing fails, has no contribution or
an unusable manifest is scored like before (``missing``/refused, which also moves it to the back of the
staleness order) and the sample is drawn again among the rest (:func:`select_peers` on the shrunken pool)
until it holds only usable peers. If the listed peers' state votes disagree the validator lists everyone
(the old, linear behaviour): a majority read from a sample is only trusted when it holds ``vote_quorum``
of the sample's votes.

The time budget (``max_seconds``) is a second, runtime limit: the loop stops *starting* peers once the
expected cost of the next one no longer fits (:func:`fits_time_budget`); the ones left are ``not sampled
(time budget)`` and keep their priority for the next round.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from peer.errors import ConfigError

NOT_SAMPLED = "not sampled"
"""Prefix of the reason of every peer that was not evaluated because of the budget (tables, W&B, replay)."""


@dataclass(kw_only=True)
class SamplingConfig:
    """How many peers a validator evaluates per round (``validator run --eval.max-peers/--eval.max-seconds``)."""

    max_peers: int = 32
    """Peers with a contribution evaluated per round (0 = all). Each costs ~1.7× the forward passes of its
    pages: 8 debug peers took ~6 s on one thread of a 2-core CPU (benchmarks/validator_scale.py), a 125M
    model needs a GPU for more than a handful. Lower
    it if rounds take longer than the chain's round (the summary line's seconds); every peer is still
    evaluated about every N/K rounds. It also bounds scoring: the combination copy test grows like
    n^5.6 in a sample full of coordinated sybils (3.3 s at 32, 34 s at 48: README "Combination copies"),
    so measure scoring time before raising it above 32, and avoid 0 on a large subnet."""
    max_seconds: float = 0.0
    """Seconds of evaluation per round (0 = no limit). Once the next peer's expected cost no longer fits,
    the rest are ``not sampled (time budget)`` and go first next round. Set it to ~0.7 × the round length
    on slow hardware so the validator never falls behind."""
    random_fraction: float = 0.25
    """Share of the ``max_peers`` slots drawn at random (by the end-of-round key) among peers the
    staleness order did not pick. Higher = a stronger deterrent against skipping work in rounds a peer
    thinks are not audited; lower = a more even rotation."""

    min_listings: int = 16
    """Peers listed at least per round (the sample plus extras drawn by the key) for the θ_r vote: the
    state hash is taken from a sample of this many signed listings when it agrees (``vote_quorum``), or
    from everyone's when it does not. Raise it if you distrust a small sample; 0 = list only the sample."""
    vote_quorum: float = 0.75
    """Share of the listed peers' state votes one hash needs for the sample to count as agreeing
    (:func:`sample_agrees`); below it every reachable peer is listed. At 1 (unanimity, the rule before)
    a single sampled hotkey that signs a state manifest with a made-up hash made the validator list the
    whole subnet every round (red team, 2026-12-06): bounded by the listing deadline, but linear in the
    subnet again. A wrong majority needs attackers in more than this share of a sample drawn by the
    round's key, which they cannot choose."""

    def __post_init__(self) -> None:
        if self.min_listings < 0:
            raise ConfigError(f"sampling min_listings must be >= 0, got {self.min_listings}")
        if not 0.5 < self.vote_quorum <= 1:
            raise ConfigError(f"sampling vote_quorum must be in (0.5, 1], got {self.vote_quorum}")
        if self.max_peers < 0:
            raise ConfigError(f"--eval.max-peers must be >= 0 (0 = all), got {self.max_peers}")
        if self.max_seconds < 0 or not math.isfinite(self.max_seconds):
            raise ConfigError(f"--eval.max-seconds must be >= 0 (0 = no limit), got {self.max_seconds}")
        if not 0 <= self.random_fraction <= 1:
            raise ConfigError(f"sampling random_fraction must be in [0, 1], got {self.random_fraction}")


def sampling_key(end_block_hash: bytes, round_: int) -> bytes:
    """The round's sampling key from the hash of the block that ends it (first block of round r+1)."""
    return hashlib.blake2b(
        b"gradswarm/sample/" + round_.to_bytes(8, "little") + end_block_hash, digest_size=32
    ).digest()


def page_key_block(end_block: int, head_after_fetch: int, delay_blocks: int) -> int:
    """The block whose hash draws the round's evaluated pages (pure, table-tested).

    It must not exist before the validator holds every Δ it will evaluate, or a peer that serves its Δ
    late (stalling up to the fetch deadline, or a round audited later: ``LoopConfig.audit_window``) could
    tune it to the drawn held-out, control and assigned pages. So it is at least one block after the head
    the validator read once its fetch had finished; and, so that validators whose fetches end at
    different moments still draw the same pages, at least ``delay_blocks`` after the round's end block
    (``end_block`` = the first block of round r+1)."""
    if delay_blocks < 1:
        raise ValueError(f"delay_blocks must be >= 1, got {delay_blocks}")
    return max(end_block + delay_blocks, head_after_fetch + 1)


def page_key_delay_blocks(seconds: float, block_time: float) -> int:
    """``--eval.page-key-delay`` seconds as the ``delay_blocks`` of :func:`page_key_block`: whole blocks,
    rounded up, at least one."""
    if not seconds >= 0 or not math.isfinite(seconds):
        raise ConfigError(f"--eval.page-key-delay must be a number of seconds >= 0, got {seconds}")
    return max(1, math.ceil(seconds / block_time))


def page_key(block_hash: bytes, round_: int) -> bytes:
    """The key that, with the round's seed, draws the evaluated pages (``validator.evaluation.page_pick``)
    from the hash of :func:`page_key_block`'s block."""
    return hashlib.blake2b(
        b"gradswarm/pages/" + round_.to_bytes(8, "little") + block_hash, digest_size=32
    ).digest()


def _tie(key: bytes, uid: int, hotkey: str) -> bytes:
    return hashlib.blake2b(key + uid.to_bytes(4, "little") + hotkey.encode(), digest_size=16).digest()


@dataclass(kw_only=True)
class Selection:
    """A round's sample: whom to evaluate, in priority order, and why the others were left out."""

    selected: list[int]
    """uids to evaluate, highest priority first (the time budget cuts from the end)."""
    not_sampled: dict[int, str]
    """uid → reason for every candidate left out."""
    order: list[int]
    """Every candidate in priority order (for the record: replay checks the selection)."""


def select_peers(
    candidates: Mapping[int, str],
    last_evaluated: Mapping[int, int | None],
    max_peers: int,
    key: bytes,
    random_fraction: float = 0.25,
) -> Selection:
    """Pick at most ``max_peers`` of ``candidates`` (uid → hotkey of peers with a contribution).

    ``last_evaluated``: uid → last round that uid (with its current hotkey) was evaluated, None/absent =
    never. Priority order: never evaluated first, then oldest; ties by a hash of (key, uid, hotkey).
    ``ceil((1 − random_fraction) · max_peers)`` slots go down that order; the remaining slots to the
    candidates left with the smallest hash of (key, uid, hotkey) — random to anyone who does not know the
    key. ``max_peers`` 0 or ≥ the number of candidates selects everyone.
    """

    def tie(uid: int) -> bytes:
        return _tie(key, uid, candidates[uid])

    def staleness(uid: int) -> tuple[int, bytes]:
        last = last_evaluated.get(uid)
        return (-1 if last is None else last, tie(uid))

    order = sorted(candidates, key=staleness)
    if max_peers == 0 or max_peers >= len(order):
        return Selection(selected=order, not_sampled={}, order=order)
    by_staleness = max_peers - int(math.floor(random_fraction * max_peers))
    chosen = order[:by_staleness]
    rest = sorted(order[by_staleness:], key=tie)
    chosen += rest[: max_peers - by_staleness]
    chosen_set = set(chosen)
    selected = [u for u in order if u in chosen_set]  # priority order: the time budget cuts the least stale
    reason = f"{NOT_SAMPLED} (budget: {max_peers} of {len(order)} peers with a contribution this round)"
    return Selection(
        selected=selected, not_sampled={u: reason for u in order if u not in chosen_set}, order=order
    )


def sample_agrees(votes: Mapping[str, Sequence], quorum: float) -> bool:
    """Whether the listed peers' state votes (hash → voters) agree enough to trust their majority without
    listing everyone: one hash holds at least ``quorum`` of the votes. No votes: no. Pure."""
    total = sum(len(v) for v in votes.values())
    return total > 0 and max(len(v) for v in votes.values()) >= quorum * total


def vote_extras(pool: Mapping[int, str], chosen: Sequence[int], key: bytes, n: int) -> list[int]:
    """``n`` uids of ``pool`` (uid → hotkey) not in ``chosen``, drawn by the round's key (smallest hash of
    (key, uid, hotkey)): extra listings for the θ_r vote, unpredictable before the round ends."""
    taken = set(chosen)
    rest = sorted((u for u in pool if u not in taken), key=lambda u: _tie(key, u, pool[u]))
    return rest[: max(0, n)]


def expected_peer_seconds(measured: Sequence[float], cross_share: float) -> float | None:
    """Expected cost of one more peer: the mean phase-1 seconds of the peers measured so far this round
    plus its share of the cross-reference phase that runs after them (``cross_share`` × that mean)."""
    if not measured:
        return None
    return (1.0 + cross_share) * sum(measured) / len(measured)


def fits_time_budget(
    elapsed_s: float, measured: Sequence[float], budget_s: float, cross_share: float
) -> bool:
    """Whether the next peer may start: always the first one (a round evaluates at least one peer); then
    only if ``elapsed`` + the cross phase of the peers already measured + the next peer's expected cost
    stays within ``budget_s``. ``budget_s`` 0 = no limit."""
    if budget_s <= 0 or not measured:
        return True
    per = expected_peer_seconds(measured, cross_share)
    pending_cross = cross_share * sum(measured)
    return elapsed_s + pending_cross + per <= budget_s
