"""Bounded fetches for a validator round: jobs on the fetch client's trio loop, at most ``parallel`` at a
time, under one deadline (:func:`gather_bounded`), a race for the first good copy (:func:`race_first`),
and one wave of signed listings (:func:`list_wave`). ``validator.loop.fetch_round`` is built from them."""

from __future__ import annotations

import functools
import logging
import time

log = logging.getLogger("gradswarm.validator")

ROUND_DEADLINE = "round_deadline"
RETRIED_REASONS = frozenset({"dial_failed", "stream_error"})
"""Fetch failures that are retried within the step's deadline: a refused or reset connection (a publisher
restarting, a loaded machine's accept queue). Not timeouts: a publisher that stalls already cost its
``io_timeout_s`` once, and retrying it would hold a slot of ``fetch_parallel`` other peers are waiting for."""
TRANSPORT_REASONS = frozenset({"dial_failed", "timeout", "stream_error", "peer_id_mismatch", "disk_error"})
"""Fetch failures whose text describes the validator's own network or machine rather than what the peer
served: an OS error for the committed address (``connection refused``, ``no route to host``), a handshake
answered by whatever listens there, a cache write error. A commitment may name any address, the
validator's LAN included, so publishing that text would make the validator a port scanner whose results
anyone can read: its public explanation carries only the code (:func:`public_reason`); the line stays in
its log and in the round's record (``CandidateRecord.fetch_detail``)."""
RETRY_DELAYS_S = (0.5, 1.5)
"""Pauses before the retries of a RETRIED_REASONS failure (one retry per entry), outside the parallel
limit. A peer that keeps refusing costs at most these plus its failed attempts, within the deadline."""


def gather_bounded(client, jobs: dict, *, parallel: int, deadline_s: float) -> dict:
    """Run ``jobs`` (key → zero-argument async function on the fetch client's trio loop) at most
    ``parallel`` at a time; returns key → result or FetchError. A job failing for one of
    RETRIED_REASONS runs again after each of RETRY_DELAYS_S. Jobs still running after ``deadline_s``
    are cancelled (their partial downloads are dropped) and answer FetchError(``round_deadline``)."""
    from peer.net.fetch import FetchError

    async def main() -> dict:
        import trio

        results: dict = {}
        limiter = trio.CapacityLimiter(parallel)

        async def one(key, job) -> None:
            for retry_in in (*RETRY_DELAYS_S, None):
                async with limiter:
                    try:
                        results[key] = await job()
                        return
                    except FetchError as e:
                        if retry_in is None or e.reason not in RETRIED_REASONS:
                            client.rejections[e.reason] += 1
                            results[key] = e
                            return
                        failed = e
                log.info("%s: %s; retrying in %.1fs", key, failed, retry_in)
                await trio.sleep(retry_in)

        with trio.move_on_after(deadline_s):
            async with trio.open_nursery() as nursery:
                for key, job in jobs.items():
                    nursery.start_soon(one, key, job)
        for key in jobs:
            if key not in results:
                client.rejections[ROUND_DEADLINE] += 1
                results[key] = FetchError(
                    ROUND_DEADLINE,
                    f"not done within the round's fetch deadline ({deadline_s:.1f}s left for this step)",
                )
        return results

    if not jobs:
        return {}
    return client._call(main)


LISTING_SHARE, LISTING_MIN_S, LISTING_WAVE_MIN_S = 0.25, 5.0, 2.0
"""Listings (small signed answers) get this share of the round's fetch deadline, at least LISTING_MIN_S;
a later wave (a sampled peer turned out unusable, its replacement is listed) at least LISTING_WAVE_MIN_S."""
STATE_RACE = 3
"""Publishers θ_r is downloaded from at once; the first complete, verified copy wins."""


def race_first(client, jobs: dict, *, deadline_s: float):
    """Run ``jobs`` (key → zero-argument async function) at once; return ``(key, result)`` of the first
    that succeeds and cancel the others, or None if all fail or ``deadline_s`` passes."""
    from peer.net.fetch import FetchError

    async def main():
        import trio

        won = []

        async def one(key, job, cancel) -> None:
            try:
                result = await job()
            except FetchError as e:
                client.rejections[e.reason] += 1
                log.info("%s: %s", key, e)
                return
            if not won:
                won.append((key, result))
                cancel.cancel()

        with trio.move_on_after(max(0.0, deadline_s)):
            async with trio.open_nursery() as nursery:
                for key, job in jobs.items():
                    nursery.start_soon(one, key, job, nursery.cancel_scope)
        return won[0] if won else None

    if not jobs:
        return None
    return client._call(main)


def list_wave(
    client,
    reachable: dict,
    uids,
    round_: int,
    listings: dict,
    *,
    parallel: int,
    deadline: float,
    listing_deadline: float,
) -> None:
    """Signed listings of round ``round_`` for ``uids`` (uid → PeerTarget in ``reachable``) into
    ``listings``. Small answers: a publisher that sits on one costs the listing share of the deadline (a
    later wave at least LISTING_WAVE_MIN_S, within the round's ``deadline``; perf_counter times)."""
    if not uids:
        return
    now = time.perf_counter()
    listings.update(
        gather_bounded(
            client,
            {u: functools.partial(client.alist_round, reachable[u].target, round_) for u in uids},
            parallel=parallel,
            deadline_s=max(0.0, min(deadline - now, max(listing_deadline - now, LISTING_WAVE_MIN_S))),
        )
    )


def public_reason(e) -> str:
    """How a failed fetch (a FetchError) is explained in public: ``fetch: <code>`` for
    TRANSPORT_REASONS, ``fetch: <its line>`` for a refusal of what the peer served (its own records and
    bytes: ``wrong_hotkey``, ``hash_mismatch``, ``too_slow``, …)."""
    return f"fetch: {e.reason}" if e.reason in TRANSPORT_REASONS else f"fetch: {e}"


def fetch_detail(e) -> str | None:
    """The full line of a TRANSPORT_REASONS failure, for the validator's own record (None otherwise: the
    public reason already says everything)."""
    return f"{e.reason}: {e}" if e.reason in TRANSPORT_REASONS else None


def shares_peer_id_with(uid: int, peer_ids: dict[int, str], listed: set[int]) -> int | None:
    """The uid proven to run the publisher of the peer id ``uid`` commits, when that is another uid.

    ``peer_ids``: uid → committed peer id; ``listed``: the uids whose listing verified (noise proved the
    connection's peer id, the publisher served an identity record signed by that uid's hotkey). A peer id
    is one publisher, whose signed identity names one hotkey, so at most one uid can hold it; any other uid
    committing it (at a tarpit, or at the victim's own address) is copying it. Chain order is not used to
    pick the owner: a peer's peer id is public on the DHT before its commitment lands, and a re-commit (a
    new address) moves its block, so "earliest" could be front-run. None when no other uid of that peer id
    has been listed (the lowest such uid if several claim to, which cannot happen with valid records)."""
    pid = peer_ids.get(uid)
    if pid is None:
        return None
    owners = sorted(w for w in listed if w != uid and peer_ids.get(w) == pid)
    return owners[0] if owners else None
