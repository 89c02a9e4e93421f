"""The peer's view of the swarm over hivemind: DHT, averager, state-hash announcements, state sync.

* :func:`start_dht` validates multiaddrs and joins the DHT (clear errors for bad or unreachable peers).
* :class:`SwarmAveraging` owns the :class:`~peer.training.allreduce.ConsensusAverager` over the round's
  pseudo-gradient buffers: matchmaking per round (the round number and the hash of the θ a peer
  averages from form the group key, :func:`group_bits`), 8-bit blockwise compression on the wire
  (bitsandbytes), the all-reduce, byte counters.
* State agreement: each peer announces ``hash(θ_r)`` under ``<run>.state.<r>``; a peer whose hash
  is not the majority's (late join, failed round, restart) downloads θ_r from a peer that holds the
  majority hash (hivemind ``load_state_from_peers``) and checks the hash before adopting it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from peer.errors import NetworkError, UserError
from peer.net.records import DHTAnnouncement
from peer.training.state_download import install_message_limit, metadata_problem

log = logging.getLogger("gradswarm.swarm")


class BadMultiaddr(UserError):
    pass


def check_initial_peers(values: Sequence[str]) -> list[str]:
    """Validate ``--initial-peers``: multiaddrs that end in the peer id (``…/p2p/<peer id>``)."""
    peers = parse_maddrs(values, "--initial-peers")
    for maddr in peers:
        if "/p2p/" not in maddr:
            raise BadMultiaddr(
                f"--initial-peers {maddr!r} lacks the peer id: append /p2p/<peer id> (printed by the bootstrap peer)"
            )
    return peers


def parse_maddrs(values: Sequence[str], what: str) -> list[str]:
    from multiaddr import Multiaddr

    out = []
    for value in values:
        try:
            Multiaddr(value)
        except Exception as e:  # multiaddr raises a zoo of error types for malformed input
            raise BadMultiaddr(
                f"{what} {value!r} is not a valid multiaddr ({e}); expected e.g. /ip4/1.2.3.4/tcp/31337/p2p/Qm…"
            ) from None
        out.append(value)
    return out


def dht_key(run_id: str, name: str) -> str:
    from peer.net.dht_records import dht_key as _key

    return _key(run_id, name)


def state_record_validator(run_id: str):
    """DHT validator: the run's state key accepts only hotkey-signed announcements."""
    from peer.net.dht_records import HotkeyRecordValidator

    return HotkeyRecordValidator(run_id=run_id, protected_keys=[dht_key(run_id, "state")])


def start_dht(
    *,
    initial_peers: Sequence[str],
    host_maddrs: Sequence[str],
    announce_maddrs: Sequence[str],
    identity_path: str | None = None,
    record_validators: Sequence = (),
):
    import hivemind

    initial_peers = check_initial_peers(initial_peers)
    host_maddrs = parse_maddrs(host_maddrs, "--host-maddrs")
    announce_maddrs = parse_maddrs(announce_maddrs, "--announce-maddrs")
    try:
        return hivemind.DHT(
            initial_peers=initial_peers,
            host_maddrs=host_maddrs,
            announce_maddrs=announce_maddrs or None,
            identity_path=identity_path,
            check_if_identity_free=False,  # our key file is per peer home; the check costs ~5 s
            record_validators=list(record_validators),
            start=True,
            await_ready=True,
        )
    except (
        Exception
    ) as e:  # hivemind raises P2PDaemonError / RuntimeError / TimeoutError for unreachable peers
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NetworkError(
            f"could not join the DHT ({msg}); check that --initial-peers are running and reachable, "
            "and that --host-maddrs is a free local address"
        ) from None


@dataclass
class RoundOutcome:
    """What happened to the all-reduce of one round."""

    status: str
    """``averaged`` (in a group), ``alone`` (no other peer found), ``failed`` (group formed, all-reduce broke)."""
    group_size: int
    seconds: float
    bytes_sent: int
    bytes_received: int
    gathered: dict
    error: str | None = None


class PendingAverage:
    """One all-reduce handed to the averager (see :meth:`SwarmAveraging.start`); runs in the averager
    process while the trainer keeps training. :meth:`result` waits for it (once) and returns the
    outcome and the averaged tensors — on any failure, a copy of our own Δ and status ``alone``/``failed``."""

    def __init__(self, swarm: SwarmAveraging, control, error: BaseException | None, delta):
        self.swarm = swarm
        self.control = control
        self.error = error
        self.delta = delta
        self.started = time.time()
        self._outcome: tuple[RoundOutcome, list[torch.Tensor]] | None = None
        self.finished: float | None = None
        self._counters0 = swarm.counters_since()
        if control is not None:
            control.add_done_callback(self._mark_finished)
            control.allow_allreduce()

    def _mark_finished(self, _future) -> None:
        self.finished = time.time()

    def done(self) -> bool:
        return self._outcome is not None or self.control is None or self.control.done()

    def result(self) -> tuple[RoundOutcome, list[torch.Tensor]]:
        if self._outcome is None:
            self._outcome = self._collect()
        return self._outcome

    def _collect(self) -> tuple[RoundOutcome, list[torch.Tensor]]:
        from hivemind.averaging.partition import AllreduceException

        swarm = self.swarm
        error, gathered, status = None, {}, "averaged"
        if self.control is None:
            error, status = f"matchmaking did not start: {self.error!r}", "failed"
        else:
            try:
                gathered = (
                    self.control.result(timeout=swarm.allreduce_timeout + swarm.matchmaking_seconds + 5) or {}
                )
            except AllreduceException as e:
                error = str(e)
                status = "alone" if "could not find a group" in error else "failed"
            except Exception as e:  # noqa: BLE001 - any all-reduce failure fails only this round
                self.control.cancel()
                error, status = f"{type(e).__name__}: {e}", "failed"
        seconds = (self.finished or time.time()) - self.started  # hand-over to the end of the all-reduce
        sent0, recv0, _ = self._counters0
        sent1, recv1, _ = swarm.counters_until()
        if status == "averaged":
            with swarm.averager.get_tensors() as buffers:
                result = [b.clone() for b in buffers]
        else:
            result = [d.clone() for d in self.delta]
        return (
            RoundOutcome(
                status=status,
                group_size=max(1, len(gathered)),
                seconds=seconds,
                bytes_sent=sent1 - sent0,
                bytes_received=recv1 - recv0,
                gathered={str(k): v for k, v in gathered.items()},
                error=error,
            ),
            result,
        )


class SwarmAveraging:
    """Round-keyed consensus averaging of the pseudo-gradient over hivemind (see module docstring)."""

    def __init__(
        self,
        dht,
        *,
        run_id: str,
        keypair,
        shapes: Sequence[torch.Size],
        compression: str,
        state_provider: Callable[[], tuple[dict, list[torch.Tensor]]],
        matchmaking_seconds: float,
        allreduce_timeout: float,
        matchmaking_lead: float = 0.5,
        matchmaking_poll_interval: float = 0.25,
        clip_ratio: float | None = 4.0,
        max_part_norm: float | None = None,
        target_group_size: int | None = None,
        topk=None,
        voters: Callable[[], Collection[str] | None] | None = None,
    ):
        """``voters``: the hotkeys whose state announcements count (the subnet's registered ones,
        :class:`peer.chain.membership.RegisteredHotkeys`); None, or a call returning None, counts every
        signed announcement (a swarm without a chain)."""
        import bitsandbytes  # noqa: F401  (must be imported before the averager for blockwise 8-bit)

        from peer.training.allreduce import ConsensusAverager

        self.dht = dht
        self.run_id = run_id
        self.keypair = keypair
        self.voters = voters
        self.buffers = [torch.zeros(s, dtype=torch.float32) for s in shapes]
        install_message_limit()  # before the averager's process is forked: it inherits the cap
        self.averager = ConsensusAverager(
            self.buffers,
            dht=dht,
            prefix=f"{run_id}_diloco",
            compression=make_compression(compression, topk),
            state_compression=make_compression("none"),
            state_provider=state_provider,
            clip_ratio=clip_ratio,
            max_part_norm=max_part_norm,
            min_group_size=2,
            target_group_size=target_group_size,
            min_matchmaking_time=matchmaking_seconds,
            matchmaking_poll_interval=matchmaking_poll_interval,
            request_timeout=matchmaking_seconds / 2,
            allreduce_timeout=allreduce_timeout,
            next_chunk_timeout=allreduce_timeout / 3,
            allow_state_sharing=True,
            declare_state_period=10,
            start=True,
        )
        self.matchmaking_seconds = matchmaking_seconds
        self.matchmaking_lead = matchmaking_lead
        self.allreduce_timeout = allreduce_timeout
        self._pending: tuple[threading.Event, dict] | None = None
        self._running: PendingAverage | None = None
        self._timer: threading.Timer | None = None
        self._schedule_lock = threading.RLock()  # schedule()/rebase() against the timer's begin()
        self._pipe_lock = threading.Lock()  # the averager's pipe: the timer thread and the trainer
        self._counters_end: tuple[int, int, int] | None = None

    @property
    def peer_id(self) -> str:
        return self.dht.peer_id.to_base58()

    def counters_since(self) -> tuple[int, int, int]:
        """Where a round's byte counts start: where the previous round's ended (now, for the first), so
        a part owner's replies still being sent when its all-reduce returned count in the next round
        instead of in none."""
        return self._counters_end or self.averager.counters.snapshot()

    def counters_until(self) -> tuple[int, int, int]:
        """Where a round's byte counts end (and the next round's start)."""
        self._counters_end = self.averager.counters.snapshot()
        return self._counters_end

    def schedule(
        self,
        round_: int,
        start_at: float,
        base: str,
        gather: dict,
        weight: float = 1.0,
        give_up_at: float | None = None,
    ) -> None:
        """Arrange the all-reduce of ``round_`` to start at ``start_at`` (unix time), in a group of peers
        that all average from the θ hashed ``base`` (:func:`group_bits`).

        Matchmaking begins only ``matchmaking_seconds`` + ``matchmaking_lead`` before ``start_at`` (a
        timer thread calls hivemind's ``step(scheduled_time=…)`` then), not now: a peer looking for a
        group keeps its averager and DHT processes busy, so it must not look through the inner steps.
        The group is formed by ``start_at``; :meth:`start` then hands it the tensors.
        A peer that has found no group by ``give_up_at`` (default: ``start_at`` + matchmaking time)
        averages alone, so a lone peer does not eat into the next round.
        """
        with self._schedule_lock:
            self._cancel_timer()
            if self._pending is not None:
                self._pending[1]["superseded"] = True
            ready = threading.Event()
            args = dict(
                round_=round_,
                start_at=start_at,
                base=base,
                gather=gather,
                weight=weight,
                give_up_at=give_up_at,
            )
            slot: dict = {"args": args}  # schedule()'s arguments, for rebase()
            self._pending = (ready, slot)
        begin_at = start_at - self.matchmaking_seconds - self.matchmaking_lead

        def begin() -> None:
            try:
                with self._schedule_lock:
                    if slot.get("superseded"):
                        return  # rebase() (or a later schedule()) replaced this group before it began
                    slot["begun"] = True
                slot["control"] = self._begin(group_bits(round_, base), start_at, gather, weight, give_up_at)
            except BaseException as e:  # noqa: BLE001 - handed to start(), which fails only this round
                slot["error"] = e
            finally:
                ready.set()

        with self._schedule_lock:
            delay = begin_at - time.time()
            if delay <= 0:
                begin()
            else:
                self._timer = threading.Timer(delay, begin)
                self._timer.daemon = True
                self._timer.start()

    def rebase(self, round_: int, base: str) -> bool:
        """Re-key the group scheduled for ``round_`` to the θ hashed ``base`` (the swarm's majority θ
        when ours is not it), if its matchmaking has not begun yet. Returns whether it did.

        Why (overlapped rounds): a peer whose θ_r parted from the swarm's (its all-reduce of round r−2
        ran alone, e.g. both peers of a 2-peer swarm under load) would otherwise look for round r's group
        under its own θ_r, find nobody, average round r alone too, and so part again at θ_{r+2}: every
        other round alone, for good. It resyncs to the majority's θ_{r+1} before applying ḡ_r, so
        averaging Δ_r in the majority's group is what it then applies to the same θ as everyone."""
        with self._schedule_lock:
            if self._pending is None:
                return False
            slot = self._pending[1]
            sched = slot["args"]
            if sched["round_"] != round_ or sched["base"] == base or slot.get("begun"):
                return False
            self.schedule(**{**sched, "base": base, "gather": {**sched["gather"], "base": base}})
            return True

    def _begin(self, bits: str, start_at: float, gather: dict, weight: float, give_up_at: float | None):
        from hivemind.utils.timed_storage import get_dht_time

        with self._pipe_lock:
            self.averager.set_group_bits(bits)
            now = time.time()
            scheduled = get_dht_time() + max(0.0, start_at - now)
            grace = (
                self.matchmaking_seconds
                if give_up_at is None
                else max(0.2, min(self.matchmaking_seconds, give_up_at - start_at))
            )
            return self.averager.step(
                gather=gather,
                weight=weight,
                scheduled_time=scheduled,
                timeout=max(scheduled - get_dht_time(), 0) + grace,
                require_trigger=True,
                wait=False,
            )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def start(self, delta: Sequence[torch.Tensor]) -> PendingAverage:
        """Hand ``delta`` to the group scheduled with :meth:`schedule` and let the all-reduce run in the
        background; :meth:`PendingAverage.result` collects it. The previous all-reduce must be collected."""
        assert self._pending is not None, "schedule() first"
        assert self._running is None or self._running.done(), "collect the previous all-reduce first"
        with self._schedule_lock:
            (ready, slot), self._pending = self._pending, None
        ready.wait(timeout=self.matchmaking_seconds + self.matchmaking_lead + 30)
        with self.averager.get_tensors() as buffers:
            for b, d in zip(buffers, delta, strict=True):
                b.copy_(d)
        pending = PendingAverage(self, slot.get("control"), slot.get("error"), delta)
        self._running = pending
        return pending

    def run(self, delta: Sequence[torch.Tensor]) -> tuple[RoundOutcome, list[torch.Tensor]]:
        """Average ``delta`` in the scheduled group and wait for it (blocking rounds)."""
        return self.start(delta).result()

    # -- state agreement --------------------------------------------------------------------------

    def announce_state(
        self, round_: int, state_hash: str, ttl: float, momentum_hash: str | None = None
    ) -> None:
        """Store a hotkey-signed ``{round, hash, momentum}`` under the run's state key (one entry per
        hotkey): θ_round's hash, which the swarm votes on, and the hash of the outer momentum that goes
        with it, which a peer downloading that θ checks (:func:`momentum_choice`)."""
        from hivemind.utils.timed_storage import get_dht_time

        from peer.net.dht_records import sign_announcement

        key = dht_key(self.run_id, "state")
        expires_at = get_dht_time() + ttl
        subkey, value = sign_announcement(
            self.keypair,
            key=key,
            run_id=self.run_id,
            round_=round_,
            peer_id=self.peer_id,
            value={"hash": state_hash}
            if momentum_hash is None
            else {"hash": state_hash, "momentum": momentum_hash},
            expires_at=expires_at,
        )
        # fire and forget: a lost announcement only delays agreement by a round
        self.dht.store(key, subkey=subkey, value=value, expiration_time=expires_at, return_future=True)

    def votes(self) -> tuple[dict[str, tuple[int, str]], dict[str, float]]:
        """hotkey → (round, hash) of the latest θ each hotkey announced, and each voter's weight for ties
        (its incentive; :func:`choose_state`), from one DHT read. Signatures verified, expiries as signed;
        forged entries and unregistered hotkeys never count. One vote per hotkey: keyed by the peer id a
        record names, a registered attacker signing an honest peer's id replaced that peer's vote (review
        finding)."""
        return tally(self._announcements(), getattr(self.voters, "incentive", None) or {})

    def _announcements(self) -> dict[str, DHTAnnouncement]:
        """hotkey → its verified latest state announcement, from one DHT read (signatures and signed
        expiries checked; on a chain, registered hotkeys only)."""
        from peer.net.dht_records import read_announcements

        key = dht_key(self.run_id, "state")
        found = self.dht.get(key, latest=True)
        entries = found.value if found is not None and isinstance(found.value, dict) else None
        allowed = self.voters() if self.voters is not None else None
        return read_announcements(entries, key=key, run_id=self.run_id, allowed=allowed)

    def announced_momentum(self, round_: int, state_hash: str) -> str | None:
        """The outer momentum hash that goes with θ_round hashed ``state_hash``
        (:func:`momentum_choice` over one fresh read), or None when its voters named none."""
        return momentum_choice(self._announcements(), round_, state_hash)

    def view(self, round_: int) -> tuple[str | None, bool]:
        """:func:`sync_view` of one fresh read of the votes."""
        announced, weight = self.votes()
        return sync_view(announced, round_, weight)

    def majority_state(self, round_: int) -> str | None:
        """The hash of θ_round the swarm agrees on (see :func:`choose_state`), or None if nobody announced."""
        return self.view(round_)[0]

    def download_state(
        self,
        want_hash: str,
        tries: int = 2,
        names: Sequence[str] | None = None,
        want_momentum: str | None = None,
    ) -> tuple[dict, list[torch.Tensor]] | None:
        """Load θ and outer momentum (``2 × params`` fp32 tensors) from a peer that serves the state hashed
        ``want_hash``; every byte is checked as it arrives (:mod:`peer.training.state_download`), and with
        the parameters' ``names`` the θ is hashed before it is returned, and the momentum too when
        ``want_momentum`` names its hash (a provider whose state is not the one the swarm announced is
        skipped for the next)."""
        shapes = [tuple(b.shape) for b in self.buffers] * 2
        for _ in range(tries):
            with self._pipe_lock:
                future = self.averager.load_verified_state(
                    want_hash,
                    shapes,
                    deadline_s=3 * self.allreduce_timeout,
                    chunk_timeout=self.allreduce_timeout / 3,
                    names=names,
                    want_momentum=want_momentum,
                )
            loaded = future.result()
            if loaded is None:
                continue
            metadata, tensors = loaded
            problem = downloaded_state_problem(tensors, [b.shape for b in self.buffers])
            if problem is None and metadata_problem(metadata, want_hash) is None:
                return metadata, tensors
            log.warning("refused a state downloaded from a peer (%s); trying again", problem)
        return None

    def shutdown(self) -> None:
        self._cancel_timer()
        self.averager.shutdown()


def downloaded_state_problem(tensors, param_shapes: Sequence[torch.Size]) -> str | None:
    """Why a state downloaded from a peer cannot be adopted, or None when it is exactly this model's.

    A state is θ_r followed by the outer momentum (:meth:`DilocoState.state_tensors`): ``2 × params``
    fp32 tensors with the parameters' shapes, all finite. Anything else — more or fewer tensors,
    another shape or dtype, NaN/inf — is refused before it touches the model. Pure.
    """
    expected = [tuple(s) for s in param_shapes] * 2
    if not isinstance(tensors, list | tuple) or len(tensors) != len(expected):
        n = len(tensors) if isinstance(tensors, list | tuple) else type(tensors).__name__
        return f"{n} tensors where the model has {len(expected)}"
    for i, (t, shape) in enumerate(zip(tensors, expected, strict=True)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != shape:
            what = f"{t.dtype}{list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            return f"tensor {i} is {what}, the model's is float32{list(shape)}"
        if not bool(torch.isfinite(t).all()):
            return f"tensor {i} holds NaN or infinite values"
    return None


def group_bits(round_: int, base: str) -> str:
    """The averaging group key's bits for round ``round_`` from θ hashed ``base`` (hex): 24 bits of the
    round, then the first 32 bits of the hash. Pure.

    Peers that hold different θ never land in one group (hivemind's leader refuses a joiner whose key
    differs). Averaged into one ḡ, their outer steps would give each a different θ while both report
    ``averaged``: a late joiner that found no announcement of θ_r in time, or the two sides of a round that
    failed for one peer only. Now such a peer averages with those on its θ (or alone) and takes the
    majority's θ at the next round's sync. A hostile peer gains nothing by another key: it just is not
    in our group."""
    if len(base) < 8 or any(c not in "0123456789abcdef" for c in base[:8]):
        raise ValueError(f"base {base!r} is not a hex state hash")
    return format(round_ % (1 << 24), "024b") + format(int(base[:8], 16), "032b")


def tally(
    announcements: Mapping[str, DHTAnnouncement], incentive: Mapping[str, float]
) -> tuple[dict[str, tuple[int, str]], dict[str, float]]:
    """Votes (hotkey → (round, hash)) and tie weights (hotkey → incentive) from verified announcements
    (hotkey → record): one vote per hotkey, whatever peer id its record names. Pure."""
    votes = {hk: (a.round, str(a.value.get("hash"))) for hk, a in announcements.items()}
    return votes, {hk: float(incentive.get(hk, 0.0)) for hk in announcements}


def momentum_choice(
    announcements: Mapping[str, DHTAnnouncement],
    round_: int,
    state_hash: str,
) -> str | None:
    """The outer momentum hash a peer downloading θ_round hashed ``state_hash`` requires: the one that a
    strict majority of the hotkeys whose latest announcement is that θ announced with it. None without
    such a majority — e.g. while most of them run an older release that names none, where one hotkey
    naming a made-up hash would otherwise have stopped every joiner from syncing (review finding) — and
    the momentum is then not checked. Honest peers that hold the same θ hold the same momentum (both come
    from the same averaged Δs), so a provider that lies about the momentum alone is outvoted like one
    that lies about θ; a strict majority needs no tie-break. Pure."""
    voters = [a for a in announcements.values() if a.round == round_ and a.value.get("hash") == state_hash]
    named = collections.Counter(
        m
        for a in voters
        if isinstance(m := a.value.get("momentum"), str)
        and len(m) == 64
        and all(c in "0123456789abcdef" for c in m)
    )
    best = max(named.items(), key=lambda kv: kv[1], default=None)
    return best[0] if best is not None and 2 * best[1] > len(voters) else None


def sync_view(
    announced: dict[str, tuple[int, str]], round_: int, weight: Mapping[str, float] | None = None
) -> tuple[str | None, bool]:
    """From ``peer id → (round, hash)`` of each peer's latest announcement: the hash of θ_round to hold
    (:func:`choose_state` over those who announced θ_round; None if nobody did) and whether a peer's latest
    is θ_{round−1}, i.e. the swarm is still averaging round−1 and θ_round's announcements may yet come.

    Both come from one read: a peer keeps one announcement, so two reads (θ_round, then θ_{round−1})
    can miss a peer that moved on in between and tell a late joiner there is nothing to wait for. Pure."""
    best = choose_state({p: h for p, (r, h) in announced.items() if r == round_}, weight)
    return best, any(r == round_ - 1 for r, _ in announced.values())


def choose_state(states: dict[str, str], weight: Mapping[str, float] | None = None) -> str | None:
    """The state hash to hold, from ``peer id → announced hash``: the most announced one; ties go to the
    state announced by the peer of highest ``weight`` (its hotkey's incentive on chain: what validators
    paid it), then to the smallest hash. Every peer picks the same unless peers read the incentives on
    either side of an epoch boundary. None when nothing was announced.

    Why the incentive before the hash: a part owner that sends different averages to different peers
    leaves each honest peer alone on its own θ, one vote each; the smallest hash then went to whoever
    could grind one (any attacker tweaking its own θ until its hash starts with zeros), and every honest
    peer downloaded its state (red team). An incentive is what validators paid for measured work: a
    single attacking hotkey must out-earn every honest peer first (two registered ones announcing the
    same hash win such a split on count). Pure."""
    if not states:
        return None
    counts = collections.Counter(states.values())
    top = max(counts.values())
    tied = [h for h, c in counts.items() if c == top]
    weight = weight or {}

    def trust(h: str) -> float:
        return max((weight.get(p, 0.0) for p, x in states.items() if x == h), default=0.0)

    return min(tied, key=lambda h: (-trust(h), h))


def make_compression(name: str, topk=None):
    """Wire compression: ``8bit`` (bitsandbytes blockwise for tensors ≥ 4096 values, fp16 below),
    ``fp16``, ``none`` or ``topk`` (sparse Δ̂s, :mod:`peer.training.sparse`; ``topk`` is the swarm's
    :class:`~peer.training.sparse.TopK`). 8-bit sends ~¼ of fp32's bytes; the consensus all-reduce keeps
    peers identical."""
    if name == "topk":
        from peer.training.allreduce import TopKWireCompression
        from peer.training.sparse import TopK

        return TopKWireCompression(topk if topk is not None else TopK(chunk=4096, k=64))
    from hivemind.compression import (
        BlockwiseQuantization,
        Float16Compression,
        NoCompression,
        SizeAdaptiveCompression,
    )

    if name == "8bit":
        return SizeAdaptiveCompression(
            threshold=2**12, less=Float16Compression(), greater_equal=BlockwiseQuantization()
        )
    if name == "fp16":
        return Float16Compression()
    if name == "none":
        return NoCompression()
    raise ValueError(f"unknown compression {name!r}")
