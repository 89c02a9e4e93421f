"""The validator's round loop, as a recipe of named steps.

For every round ``r`` that has ended (the chain's clock says so)::

    sync_metagraph   uids, hotkeys and publisher commitments from the chain (ours excluded)
    fetch_round      the *sample* among every reachable uid (validator.sampling: at most
                     ``max_peers``, keyed by the hash of the block that ends the round); signed listings of
                     the sample plus ``min_listings`` extras (concurrently, bounded, under the round's
                     fetch deadline; everyone's if their state votes disagree); θ_r: the state hash most
                     listed peers name, fetched from one of them and checked against that hash; the
                     sampled manifests checked (base hash, model config, data fingerprint, a size the
                     model allows) and unusable ones replaced by a redraw; the sampled peers' Δ_r,
                     concurrently, under the same deadline; every refusal becomes a reason
    page_key         only now that every Δ is here: the hash of a block that did not exist before (at
                     least ``page_key_delay_blocks`` after the round's end) draws the evaluated pages
    evaluate         validator.evaluation: losses before/after each Δ, assignment test, copies — in
                     priority order, starting no new peer once the time budget is spent
    score            validator.scoring: round scores → EMA → u16 weights (pure)
    set_weights      validator.weights: queue for this round, send (set or commit/reveal), retry later
    record           the round's record + sketches in the state dir (for replay), EMA, W&B, a table

Each step is a plain function of explicit inputs; :func:`run_round` strings them together and
:func:`run` repeats it. State that survives restarts lives in the state dir (validator.store): a round
being evaluated is marked there, so a validator killed mid-round evaluates that round again after a
restart (fetched blobs are cached by hash, weights already sent for it are never sent again).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from peer.chain.base import Chain, ChainError, ChainUnreachable, Metagraph
from peer.config import RunConfig
from peer.data.pages import PageStore
from peer.errors import CheckpointError
from peer.net.outbox import decode_state
from validator.ema import EmaState, last_evaluated, update_ema
from validator.evaluation import (
    Candidate,
    EvalConfig,
    Evaluator,
    PeerMeasurement,
    RoundMeasurements,
    swarm_heldout_loss,
)
from validator.fetching import (
    LISTING_MIN_S,
    LISTING_SHARE,
    ROUND_DEADLINE,
    STATE_RACE,
    fetch_detail,
    gather_bounded,
    list_wave,
    public_reason,
    race_first,
    shares_peer_id_with,
)
from validator.sampling import (
    NOT_SAMPLED,
    SamplingConfig,
    Selection,
    fits_time_budget,
    page_key,
    page_key_block,
    sample_agrees,
    sampling_key,
    select_peers,
    vote_extras,
)
from validator.scoring import (
    PeerScore,
    ScoringConfig,
    WeightVector,
    normalize_weights,
    not_sampled_scores,
    score_round,
)
from validator.store import CandidateRecord, RoundRecord, ValidatorStore
from validator.weights import Outcome, WeightsConfig, WeightSetter

log = logging.getLogger("gradswarm.validator")


@dataclass(kw_only=True)
class LoopConfig:
    """How the validator follows the chain's rounds."""

    run_id: str
    """The swarm's run id (records of other runs are refused)."""
    netuid: int
    round_blocks: int
    """Blocks per round; must equal the peers' ``--round-blocks``."""
    publish_grace_s: float = 1.0
    """Seconds to wait after a round ends before fetching it (peers publish Δ_r at the boundary).
    Raise it if peers show ``missing`` contributions that arrive a moment later."""
    sketch_lookback: int = 3
    """Earlier rounds whose Δ sketches a new Δ is compared with (stale/copied Δs)."""
    max_rounds: int | None = None
    """Stop after evaluating this many rounds (None: run until interrupted)."""
    max_seconds: float | None = None
    """Stop after this many seconds."""
    audit_window: int = 4
    """When the validator falls behind (a round takes longer to evaluate than to train), it evaluates one
    of the last ``audit_window`` ended rounds, chosen by the chain's block hash, instead of always the
    newest — so peers cannot predict which rounds are audited. Peers keep 6 rounds in their outbox: keep it
    below that."""
    poll_s: float = 0.25
    """Seconds between checks of the chain head while waiting for a round to end."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How many peers are evaluated per round (validator.sampling)."""
    fetch_parallel: int = 16
    """Publishers talked to at the same time (listings and Δ downloads). Raise it with many peers on a fast
    link; lower it if the validator's link saturates and every fetch slows down."""
    fetch_deadline_s: float = 60.0
    """Seconds the whole fetch step of a round may take (listings, θ_r, the sampled Δs). Whatever has not
    arrived by then is refused as ``round fetch deadline``, so a publisher that trickles or stalls costs
    the round at most this. Keep it well under the round length; raise it if honest peers on slow links
    hit it (their blobs keep arriving in the cache for the next attempt)."""

    page_key_delay_blocks: int = 10
    """The evaluated pages (held-out, control, the evaluated part of each assignment) are drawn by the hash
    of a block produced after this validator holds every Δ it evaluates (validator.sampling.page_key_block),
    so no peer can tune its Δ to them by serving it late; the block is at least this many blocks after the
    round's end, so that validators whose fetches finish at different moments within that window draw the
    same pages and agree on scores. Costs up to this many blocks of waiting per round. The CLI sets it
    from ``--eval.page-key-delay`` seconds (default 5: :func:`validator.sampling.page_key_delay_blocks`). Two validators'
    scores differ on the same Δs (their records name different ``sampling.page_block``) → raise it above
    publish grace + fetch time (``timings.fetch_s``); evaluation starts too late in the round → lower it
    (any value ≥ 1 block is safe)."""

    dial_private: bool = False
    """Whether committed loopback/private/link-local addresses are dialled (peer.net.dial_policy). The CLI
    sets it from ``--dial-private`` (auto: only on the LocalLedger). Off on a public chain: otherwise
    any hotkey can make the validator probe its own network."""

    def __post_init__(self) -> None:
        from peer.errors import ConfigError

        if self.round_blocks < 1:
            raise ConfigError("--round-blocks must be >= 1")
        if self.fetch_parallel < 1 or self.fetch_deadline_s <= 0:
            raise ConfigError("--eval.fetch-parallel must be >= 1 and --eval.fetch-deadline > 0")
        if self.audit_window < 1:
            raise ConfigError("audit_window must be >= 1")
        if self.page_key_delay_blocks < 1:
            raise ConfigError("page_key_delay_blocks must be >= 1")
        if self.publish_grace_s < 0 or self.poll_s <= 0:
            raise ConfigError("publish grace must be >= 0 and poll interval > 0")


# ------------------------------------------------------------------------------------------- steps


@dataclass(kw_only=True)
class PeerTarget:
    uid: int
    hotkey: str
    target: object | None = None
    """peer.net.fetch.Target built from the commitment (None if there is none or it is unreadable)."""
    rejected: str | None = None


def sync_metagraph(
    chain: Chain, netuid: int, own_hotkey: str, *, allow_private: bool = False
) -> tuple[Metagraph, list[PeerTarget]]:
    """The metagraph and, for every other uid, where its publisher is (or why we cannot reach it). A
    commitment naming an address :func:`peer.net.dial_policy.dial_refusal` refuses is never dialled."""
    from peer.net.fetch import Target

    mg = chain.metagraph(netuid)
    commitments = chain.commitments(netuid)
    targets = []
    for nr in mg.neurons:
        if nr.hotkey == own_hotkey:
            continue
        raw = commitments.get(nr.hotkey)
        if raw is None:
            targets.append(
                PeerTarget(uid=nr.uid, hotkey=nr.hotkey, rejected="no publisher commitment on chain")
            )
            continue
        target, why = Target.from_chain(raw, nr.hotkey, allow_private=allow_private)
        targets.append(PeerTarget(uid=nr.uid, hotkey=nr.hotkey, target=target, rejected=why))
    return mg, targets


@dataclass(kw_only=True)
class RoundInputs:
    round: int
    seed: bytes
    base_state: dict[str, torch.Tensor]
    base_sha256: str
    base_state_hash: str
    base_sources: list[str]
    state_round: int
    """The round whose state ``base_state`` is: ``round`` (blocking), ``round + 1`` (overlapped)."""
    trained_from_state_hash: str
    """θ_r's hash, which every usable manifest names as its base (= base_state_hash when blocking)."""
    candidates: list[Candidate]
    """Sampled peers first (priority order), then the ones refused before sampling; not the unsampled."""
    records: list[CandidateRecord]
    """Every peer of the metagraph (sampled or not), in ``candidates`` order then the unsampled."""
    selection: Selection | None = None
    sampling: dict = field(default_factory=dict)
    """What the record keeps of the sample (key, limits, priority order, who was left out and why)."""
    fetch_seconds: float = 0.0


class NoBaseState(ChainError):
    """No peer served a verifiable θ_r for this round (nothing to evaluate against)."""


def max_artifact_bytes(run: RunConfig, numel: int) -> int:
    """Largest blob (state or Δ) a peer of this model can honestly publish: every parameter in fp32 plus
    1 MiB of header and quantisation scales. Anything declaring more is refused before a byte is fetched."""
    return 4 * numel + (1 << 20)


def fetch_round(
    client,
    targets: list[PeerTarget],
    round_: int,
    seed: bytes,
    *,
    run: RunConfig,
    data_fingerprint: str,
    evaluator: Evaluator,
    sampling: SamplingConfig | None = None,
    key: bytes = b"",
    last_evaluated: dict[int, int | None] | None = None,
    parallel: int = 16,
    deadline_s: float = 60.0,
    state_round: int | None = None,
) -> RoundInputs:
    """The sample (validator.sampling, among every reachable uid), listings of the sampled peers plus a
    few for the θ_r vote (everyone's if those disagree), θ_r (majority of signed state manifests,
    hash-checked), the sample redrawn without listed peers that have nothing usable, and the sampled
    peers' verified Δ_r — all under one deadline of ``deadline_s`` seconds.

    ``state_round`` (default ``round_``) is the round whose state the Δs are evaluated on. Overlapped
    swarms pass ``round_ + 1``: Δ_r was trained from θ_r − Δ_{r−1}, and θ_{r+1} = θ_r − ḡ_{r−1} (published
    right after the boundary) is the shared state closest to it. Manifests must then still name θ_r (the
    majority of round r's state manifests) as their base, and θ_{r+1} is voted, downloaded and
    hash-checked as θ_r is in blocking swarms, waiting up to the listings' share of the deadline for it."""
    from peer.net.fetch import FetchError

    state_round = round_ if state_round is None else state_round
    if state_round not in (round_, round_ + 1):
        raise ValueError(f"state_round must be {round_} or {round_ + 1}, not {state_round}")
    t0 = time.perf_counter()
    deadline = t0 + deadline_s
    sampling = sampling or SamplingConfig(max_peers=0)
    last_evaluated = last_evaluated or {}
    max_bytes = max_artifact_bytes(run, sum(p.numel() for p in evaluator.params.values()))
    reachable = {t.uid: t for t in targets if t.target is not None}
    hotkeys = {u: t.hotkey for u, t in reachable.items()}
    listing_deadline = t0 + min(deadline_s, max(LISTING_MIN_S, LISTING_SHARE * deadline_s))
    listings: dict[int, object] = {}

    def list_peers(uids) -> None:
        """Signed listings of ``uids`` not listed yet (:func:`validator.fetching.list_wave`)."""
        todo = [u for u in uids if u not in listings]
        list_wave(client, reachable, todo, round_, listings, parallel=parallel, deadline=deadline,
                  listing_deadline=listing_deadline)  # fmt: skip

    # 1. the sample among every reachable uid, plus extras drawn by the key for the θ_r vote
    first = select_peers(hotkeys, last_evaluated, sampling.max_peers, key, sampling.random_fraction)
    extras = vote_extras(hotkeys, first.selected, key, sampling.min_listings - len(first.selected))
    list_peers(first.selected + extras)
    votes = _state_votes(listings, reachable, run, max_bytes)
    if not sample_agrees(votes, sampling.vote_quorum):  # the sample disagrees about θ_r: read everyone's
        log.info("round %d: listed peers name %d different states; listing every peer", round_, len(votes))
        list_peers(list(reachable))
        votes = _state_votes(listings, reachable, run, max_bytes)

    # 2. θ_r: the state most listed peers name, from one of them, checked against its hash
    if state_round == round_:
        # from a sample only its majority's θ: a minority of it must not decide because the majority's
        # voters failed to serve (review finding); then everyone is listed, as before
        top = _majority_hash(votes)
        trusted = {top: votes[top]} if top is not None and len(listings) < len(reachable) else votes
        base = _find_base(client, trusted, listings, evaluator, round_, key, deadline)
        if base is None and len(listings) < len(reachable):  # no voter of the sample served it: ask all
            list_peers(list(reachable))
            votes = _state_votes(listings, reachable, run, max_bytes)
            base = _find_base(client, votes, listings, evaluator, round_, key, deadline)
        if base is None:
            raise NoBaseState(
                f"round {round_}: no peer served a verifiable θ_{round_} ({len(reachable)} reachable, "
                f"{len(listings)} listed, {sum(len(v) for v in votes.values())} named a state)"
            )
        state, base_sha, base_hash, sources = base
        trained_from = base_hash
    else:  # overlapped: Δ_r is checked against θ_r's hash and evaluated on θ_{r+1}
        trained_from = _majority_hash(votes)
        if trained_from is None:
            raise NoBaseState(f"round {round_}: no listed peer names a θ_{round_} ({len(listings)} listed)")
        voters = [t.uid for t in votes[trained_from]]
        state, base_sha, base_hash, sources = _find_next_state(
            client,
            reachable,
            voters,
            state_round,
            run=run,
            evaluator=evaluator,
            key=key,
            parallel=parallel,
            listing_deadline=listing_deadline,
            deadline=deadline,
            max_bytes=max_bytes,
        )

    # 3. the sample, drawn again without the listed peers that have no usable contribution (each is
    # refused with its reason, as a peer with nothing to evaluate), until every sampled peer is usable
    records = {t.uid: CandidateRecord(uid=t.uid, hotkey=t.hotkey, rejected=t.rejected) for t in targets}
    manifests: dict[int, tuple] = {}
    refused: set[int] = set()
    peer_ids = {u: t.target.peer_id for u, t in reachable.items()}
    while True:
        listed = {u for u, got in listings.items() if not isinstance(got, FetchError)}
        for u, got in listings.items():
            if u in manifests or u in refused:
                continue
            owner = shares_peer_id_with(u, peer_ids, listed) if isinstance(got, FetchError) else None
            if owner is not None:  # its listing failed, and the peer id it commits is another uid's
                records[u].fetch_detail = f"{got.reason}: {got}"
                records[u].rejected = (
                    f"commits the peer id of uid {owner} ({peer_ids[u][:16]}…), whose publisher serves "
                    f"uid {owner}'s signed identity"
                )
                refused.add(u)
                continue
            reason = _listing_problem(
                got,
                records[u],
                round_,
                run=run,
                base_hash=trained_from,
                fp=data_fingerprint,
                max_bytes=max_bytes,
            )
            if reason is None:
                manifests[u] = (reachable[u], got.contribution)
            else:
                records[u].rejected = reason
                refused.add(u)
        pool = {u: h for u, h in hotkeys.items() if u not in refused}
        selection = select_peers(pool, last_evaluated, sampling.max_peers, key, sampling.random_fraction)
        unlisted = [u for u in selection.selected if u not in listings]
        if not unlisted or time.perf_counter() >= deadline:
            break
        list_peers(unlisted)
    for u in selection.selected:
        if u not in manifests:  # sampled, but the round's fetch deadline passed before it was listed
            records[u].rejected = f"fetch: {ROUND_DEADLINE}: not listed within the round's fetch deadline"
    for u, reason in selection.not_sampled.items():
        records[u].rejected = reason
    left = max(0.0, deadline - time.perf_counter())
    blobs = gather_bounded(
        client,
        {
            u: functools.partial(
                client.afetch_blob,
                manifests[u][0].target,
                manifests[u][1].blob,
                round_=round_,
                kind="contribution",
            )
            for u in selection.selected
            if u in manifests
        },
        parallel=parallel,
        deadline_s=left,
    )
    candidates: list[Candidate] = []
    for u in selection.selected:
        rec = records[u]
        if u not in manifests:
            candidates.append(Candidate(uid=u, hotkey=rec.hotkey, rejected=rec.rejected))
            continue
        t, m = manifests[u]
        cand = Candidate(
            uid=u,
            hotkey=t.hotkey,
            claimed_pages=list(m.pages),
            blob_sha256=m.blob.sha256,
            delta_format=m.delta_format,
        )
        got = blobs[u]
        if isinstance(got, FetchError):
            log.info("uid %d: Δ of round %d not fetched (%s: %s)", u, round_, got.reason, got)
            cand.rejected = rec.rejected = public_reason(got)
            rec.fetch_detail = fetch_detail(got)
            cand.blob_sha256 = None
        else:
            rec.blob_sha256 = m.blob.sha256
            cand.delta_blob = got.read_bytes()
        candidates.append(cand)
    sampled = set(selection.selected)
    for t in targets:
        if t.uid not in sampled and t.uid not in selection.not_sampled:
            rec = records[t.uid]
            candidates.append(
                Candidate(
                    uid=t.uid,
                    hotkey=t.hotkey,
                    rejected=rec.rejected,
                    claimed_pages=list(rec.manifest["pages"]) if rec.manifest else None,
                )
            )
    order = [c.uid for c in candidates] + sorted(selection.not_sampled)
    return RoundInputs(
        round=round_,
        seed=seed,
        base_state=state,
        base_sha256=base_sha,
        base_state_hash=base_hash,
        base_sources=sources,
        state_round=state_round,
        trained_from_state_hash=trained_from,
        candidates=candidates,
        records=[records[u] for u in order],
        selection=selection,
        sampling={
            "key_hex": key.hex(),
            "max_peers": sampling.max_peers,
            "max_seconds": sampling.max_seconds,
            "random_fraction": sampling.random_fraction,
            "min_listings": sampling.min_listings,
            "listed": sorted(listings),
            "order": selection.order,
            "selected": selection.selected,
            "not_sampled": {str(u): r for u, r in selection.not_sampled.items()},
        },
        fetch_seconds=time.perf_counter() - t0,
    )


def _find_base(client, votes: dict, listings: dict, evaluator, round_: int, key: bytes, deadline: float):
    """``(state, blob sha256, state hash, voters' hotkeys)`` of the state most voters name that one of
    them serves and that hashes as named (then the next most named), or None."""
    for state_hash, voters in sorted(votes.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        # voters in an order keyed by the end-of-round hash: no uid can make sure it is asked first
        left = sorted(voters, key=lambda t: hashlib.blake2b(key + t.uid.to_bytes(4, "little")).digest())
        while left and time.perf_counter() < deadline:
            # race a few voters: the first complete, verified download wins; a wave gets at most half the
            # time left, so a wave of stallers cannot take it all
            racing, left = left[:STATE_RACE], left[STATE_RACE:]
            won = race_first(
                client,
                {
                    t.uid: functools.partial(
                        client.afetch_blob, t.target, listings[t.uid].state.blob, round_=round_, kind="state"
                    )
                    for t in racing
                },
                deadline_s=(deadline - time.perf_counter()) / (2 if left else 1),
            )
            if won is None:
                continue
            uid, path = won
            try:
                state = decode_state(path.read_bytes(), client.cfg.layout("state"))
                if evaluator.load_base(state) != state_hash:
                    raise CheckpointError(f"uid {uid}'s state does not hash to {state_hash[:12]}")
            except CheckpointError as e:
                log.warning("round %d: state from uid %d refused: %s", round_, uid, e)
                left += [t for t in racing if t.uid != uid]
                continue
            return state, listings[uid].state.blob.sha256, state_hash, [v.hotkey for v in voters]
    return None


def _majority_hash(votes: dict[str, list]) -> str | None:
    """The state hash most voters name (ties: the smallest hash), or None without votes."""
    if not votes:
        return None
    return min(votes, key=lambda h: (-len(votes[h]), h))


NEXT_STATE_POLL_S = 0.5
"""Overlapped swarms: seconds between listings of round r+1 while no listed peer serves θ_{r+1} yet."""


def _find_next_state(
    client,
    reachable: dict,
    voters: list[int],
    state_round: int,
    *,
    run: RunConfig,
    evaluator,
    key: bytes,
    parallel: int,
    listing_deadline: float,
    deadline: float,
    max_bytes: int,
):
    """Overlapped swarms: θ_{r+1} (``state_round``) as :func:`_find_base` finds θ_r, from round r+1's
    listings of the peers that named the majority's θ_r (then everyone's), re-listing those that serve no
    θ_{r+1} yet every NEXT_STATE_POLL_S until the listings' deadline (peers publish it right after the
    boundary, in the background). NoBaseState if none serves a verifiable one."""
    from peer.net.fetch import FetchError

    listings: dict[int, object] = {}

    def relist(uids) -> None:
        todo = [
            u
            for u in uids
            if isinstance(listings.get(u), (FetchError, type(None))) or listings[u].state is None
        ]
        list_wave(client, reachable, todo, state_round, listings, parallel=parallel, deadline=deadline,
                  listing_deadline=listing_deadline)  # fmt: skip

    asked = list(voters)
    relist(asked)
    votes = _state_votes(listings, reachable, run, max_bytes)
    while not votes and time.perf_counter() + NEXT_STATE_POLL_S < listing_deadline:
        time.sleep(NEXT_STATE_POLL_S)
        relist(asked)
        votes = _state_votes(listings, reachable, run, max_bytes)
    base = _find_base(client, votes, listings, evaluator, state_round, key, deadline)
    if base is None and len(asked) < len(reachable):
        asked = list(reachable)
        relist(asked)
        votes = _state_votes(listings, reachable, run, max_bytes)
        base = _find_base(client, votes, listings, evaluator, state_round, key, deadline)
    if base is None:
        raise NoBaseState(
            f"round {state_round - 1}: no peer served a verifiable θ_{state_round} to evaluate its Δs on "
            f"(overlapped rounds; {len(listings)} listed, {sum(len(v) for v in votes.values())} named one)"
        )
    return base


def _state_votes(listings: dict, reachable: dict, run: RunConfig, max_bytes: int) -> dict[str, list]:
    """state hash → the listed peers whose signed state manifest names it (this model, a size it allows)."""
    from peer.net.fetch import FetchError

    votes: dict[str, list[PeerTarget]] = {}
    for u, got in sorted(listings.items()):
        if isinstance(got, FetchError):
            continue
        st = got.state
        if st is not None and st.model_config_name == run.name and st.blob.size <= max_bytes:
            votes.setdefault(st.state_hash, []).append(reachable[u])
    return votes


def _listing_problem(got, rec: CandidateRecord, round_: int, *, run, base_hash, fp, max_bytes) -> str | None:
    """Why a peer's listing gives nothing to evaluate (None: its contribution manifest is usable);
    records the manifest in ``rec`` when there is one."""
    from peer.net.fetch import FetchError

    if isinstance(got, FetchError):
        log.info("uid %d: no listing for round %d (%s: %s)", rec.uid, round_, got.reason, got)
        rec.fetch_detail = fetch_detail(got)
        return public_reason(got)
    m = got.contribution
    if m is None:
        return f"fetch: has no contribution for round {round_} (it has rounds {got.rounds[-8:] or 'none'})"
    rec.manifest = m.model_dump(mode="json")
    return _manifest_problem(m, run=run, base_hash=base_hash, data_fingerprint=fp, max_bytes=max_bytes)


def _manifest_problem(
    m, *, run: RunConfig, base_hash: str, data_fingerprint: str, max_bytes: int
) -> str | None:
    if m.base_state_hash != base_hash:
        return f"trained from state {m.base_state_hash[:12]}, not the swarm's θ_r {base_hash[:12]}"
    if m.model_config_name != run.name:
        return f"model config {m.model_config_name!r}, this swarm runs {run.name!r}"
    if m.data_fingerprint != data_fingerprint:
        return "data fingerprint differs from the validator's prepared data"
    if m.blob.size > max_bytes:
        return f"declares a {m.blob.size}-byte Δ; a Δ of {run.name!r} is at most {max_bytes} bytes"
    return None


class BudgetedEvaluator(Evaluator):
    """The Evaluator, but it starts no new peer once the round's seconds budget is spent
    (:func:`validator.sampling.fits_time_budget`); those peers are listed in :attr:`skipped`.

    Candidates are measured in the order given (the sample's priority order), so the budget cuts the
    least stale peers. ``budget_s`` 0 evaluates everyone (the plain Evaluator's behaviour)."""

    budget_s: float = 0.0
    skipped: list[int]

    def cross_share(self) -> float:
        """Cost of the cross-reference phase per peer relative to its own measurement (page counts)."""
        c = self.cfg
        own = c.heldout_pages * (2 if c.direction_test else 1) + c.assigned_pages + c.control_pages
        return c.cross_peers * c.assigned_pages / own

    def evaluate_round(self, *args, **kwargs):
        self._started = time.perf_counter()
        self._measured: list[float] = []
        self.skipped = []
        return super().evaluate_round(*args, **kwargs)

    def _measure(self, c: Candidate, *args, **kwargs):
        if c.rejected is None and c.delta_blob is not None:
            elapsed = time.perf_counter() - self._started
            if not fits_time_budget(elapsed, self._measured, self.budget_s, self.cross_share()):
                self.skipped.append(c.uid)
                return PeerMeasurement(uid=c.uid, hotkey=c.hotkey, status="rejected", reason=TIME_BUDGET)
        m = super()._measure(c, *args, **kwargs)
        if m.status == "ok":
            self._measured.append(m.seconds)
        return m


TIME_BUDGET = f"{NOT_SAMPLED} (time budget)"


def draw_page_key(chain: Chain, clock, round_: int, delay_blocks: int) -> tuple[int, bytes]:
    """(block, key) that draw round ``round_``'s evaluated pages: call it once every Δ is held. Reads the
    head, then waits for :func:`validator.sampling.page_key_block`'s block to exist."""
    block = page_key_block(clock.round_start_block(round_ + 1), chain.block(), delay_blocks)
    log.info(PAGE_WAIT, round_, block)
    return block, page_key(clock.block_seed(block), round_)


PAGE_WAIT = "round %d: every Δ is here; waiting for block %d, whose hash draws the evaluated pages"


def evaluate(
    evaluator: Evaluator,
    inputs: RoundInputs,
    store: ValidatorStore,
    lookback: int,
    budget_s: float = 0.0,
    pages_key: bytes | None = None,
    hotkeys: Sequence[str] = (),
) -> tuple[RoundMeasurements, dict, list[int]]:
    """Measure the sampled peers, on the pages ``pages_key`` draws (:func:`draw_page_key`; None: the seed
    alone; ``hotkeys``: the metagraph's, whose assignments are not unseen pages); peers the time budget
    left out are moved from the measurements to ``inputs``' not-sampled set (record and sampling
    updated), as if the sample had not included them."""
    sketch_rounds, earlier = store.earlier_sketches(inputs.round, lookback, evaluator.sketch_plan_id)
    if isinstance(evaluator, BudgetedEvaluator):
        evaluator.budget_s = budget_s
    try:
        rm, sketches = evaluator.evaluate_round(
            inputs.round,
            inputs.seed,
            inputs.base_state,
            inputs.candidates,
            earlier,
            page_key=pages_key,
            exclude_hotkeys=hotkeys,
        )
    except CheckpointError as e:  # θ_r itself is unusable (non-finite): no peer can be measured against it
        raise NoBaseState(f"round {inputs.round}: {e}") from e
    skipped = set(getattr(evaluator, "skipped", []) if budget_s > 0 else [])
    if skipped:
        reason = f"{TIME_BUDGET}: --eval.max-seconds {budget_s:g} spent"
        rm.peers = [p for p in rm.peers if p.uid not in skipped]
        inputs.candidates = [c for c in inputs.candidates if c.uid not in skipped]
        for rec in inputs.records:
            if rec.uid in skipped:
                rec.rejected, rec.blob_sha256 = reason, None
        inputs.sampling["not_sampled"].update({str(u): reason for u in skipped})
        inputs.sampling["time_budget_skipped"] = sorted(skipped)
    return rm, sketches, sketch_rounds


def score(
    rm: RoundMeasurements,
    cfg: ScoringConfig,
    ema: EmaState,
    uids: dict[int, str],
    not_sampled: dict[int, str] | None = None,
) -> tuple[list[PeerScore], EmaState, WeightVector]:
    """Round scores of the evaluated peers (+ a ``not sampled`` row for each left-out one), the EMA moved
    for the evaluated only, and the weights from the EMA."""
    not_sampled = {u: r for u, r in (not_sampled or {}).items() if u in uids}
    scores = score_round(rm, cfg, history=ema) + not_sampled_scores(not_sampled, uids)
    new_ema = update_ema(ema, rm.round, scores, uids, cfg.ema_alpha, not_sampled=not_sampled)
    weights = normalize_weights({u: e.value for u, e in new_ema.entries.items()}, cfg.burn)
    return scores, new_ema, weights


def set_weights(setter: WeightSetter, round_: int, weights: WeightVector) -> list[Outcome]:
    if not weights.empty:
        setter.enqueue(round_, weights.uids, weights.weights)
    return setter.process()


# ------------------------------------------------------------------------------------------- the loop


@dataclass(kw_only=True)
class Validator:
    """The resources a round needs (no logic of its own: see the step functions)."""

    cfg: LoopConfig
    run: RunConfig
    hotkey: object
    chain: Chain
    clock: object
    client: object
    evaluator: Evaluator
    store: ValidatorStore
    pages: PageStore
    setter: WeightSetter
    tracker: object
    eval_cfg: EvalConfig
    scoring_cfg: ScoringConfig
    weights_cfg: WeightsConfig
    on_round: Callable[[RoundRecord], None] | None = None
    rejections: Counter = field(default_factory=Counter)


def run_round(v: Validator, round_: int) -> RoundRecord:
    """One round: sync → fetch → evaluate → score → set weights → record."""
    from validator.tracking import log_round

    t0 = time.perf_counter()
    mg, targets = sync_metagraph(
        v.chain, v.cfg.netuid, v.hotkey.ss58_address, allow_private=v.cfg.dial_private
    )
    uids = {n.uid: n.hotkey for n in mg.neurons if n.hotkey != v.hotkey.ss58_address}
    seed = v.clock.seed(round_)
    # the sample is keyed by the block that ends the round (round r+1's first): unknown while peers train
    key = sampling_key(v.clock.seed(round_ + 1), round_)
    ema_before = v.store.load_ema()
    v.store.mark_started(round_)
    inputs = fetch_round(
        v.client,
        targets,
        round_,
        seed,
        run=v.run,
        data_fingerprint=v.pages.fingerprint,
        evaluator=v.evaluator,
        sampling=v.cfg.sampling,
        key=key,
        last_evaluated=last_evaluated(ema_before, uids),
        parallel=v.cfg.fetch_parallel,
        deadline_s=v.cfg.fetch_deadline_s,
        state_round=round_ + 1 if v.run.train.rounds == "overlapped" else round_,
    )
    v.store.put_blob(inputs.base_sha256, _base_bytes(v.client, inputs))
    t_page = time.perf_counter()
    page_block, pkey = draw_page_key(v.chain, v.clock, round_, v.cfg.page_key_delay_blocks)
    inputs.sampling["page_block"] = page_block
    t1 = time.perf_counter()
    rm, sketches, sketch_rounds = evaluate(
        v.evaluator,
        inputs,
        v.store,
        v.cfg.sketch_lookback,
        v.cfg.sampling.max_seconds,
        pkey,
        [n.hotkey for n in mg.neurons],  # every validator excludes the same assignments: its own hotkey's too
    )
    t2 = time.perf_counter()
    not_sampled = {int(u): r for u, r in inputs.sampling["not_sampled"].items()}
    scores, ema_after, weights = score(rm, v.scoring_cfg, ema_before, uids, not_sampled)
    outcomes = set_weights(v.setter, round_, weights)  # queued per round: a rerun never sends twice
    rec = RoundRecord(
        run_id=v.cfg.run_id,
        config_name=v.run.name,
        netuid=v.cfg.netuid,
        round=round_,
        seed_hex=seed.hex(),
        base_sha256=inputs.base_sha256,
        base_state_hash=inputs.base_state_hash,
        base_sources=inputs.base_sources,
        state_round=inputs.state_round,
        trained_from_state_hash=inputs.trained_from_state_hash,
        candidates=inputs.records,
        sketch_rounds=sketch_rounds,
        sketch_plan=v.evaluator.sketch_plan_id,
        eval_config=asdict(v.eval_cfg),
        scoring_config=asdict(v.scoring_cfg),
        measurements=rm.to_json(),
        scores=[s.to_json() for s in scores],
        ema_before=ema_before.to_json(),
        ema_after=ema_after.to_json(),
        weights={
            "uids": weights.uids,
            "weights": weights.weights,
            "shares": {str(k): x for k, x in weights.shares.items()},
            "note": weights.note,
            "outcomes": [asdict(o) for o in outcomes],
        },
        timings={
            "fetch_s": inputs.fetch_seconds,
            "page_wait_s": t1 - t_page,
            "evaluate_s": t2 - t1,
            "base_s": rm.base_seconds,
            "round_s": time.perf_counter() - t0,
        },
        sampling=inputs.sampling,
    )
    v.store.save_round(rec, sketches)  # the record first: a restart takes the EMA from it if needed
    v.store.save_ema(ema_after)
    v.store.clear_started(round_)
    v.store.prune()
    log_round(v.tracker, rec)
    if v.on_round is not None:
        v.on_round(rec)
    return rec


def _base_bytes(client, inputs: RoundInputs) -> bytes:
    path = Path(client.cfg.cache_dir) / f"{inputs.base_sha256}.safetensors"
    return path.read_bytes()


def run(v: Validator) -> int:
    """Evaluate every round that ends from now on; returns the number of rounds evaluated."""
    start = time.time()
    done = 0
    v.store.reconcile_ema()
    last = max(v.store.rounds(), default=None)
    resume = v.store.started()  # a round this validator was killed in the middle of
    while True:
        if v.cfg.max_rounds is not None and done >= v.cfg.max_rounds:
            break
        if v.cfg.max_seconds is not None and time.time() - start >= v.cfg.max_seconds:
            break
        try:
            current = v.clock.current_round()
        except ChainUnreachable as e:
            log.warning("chain unreachable (%s); retrying", e)
            time.sleep(max(v.cfg.poll_s, 1.0))
            continue
        newest = current - 1
        if newest < 0 or (last is not None and newest <= last):
            v.setter.process()  # retries and reveals between rounds
            time.sleep(v.cfg.poll_s)
            continue
        time.sleep(v.cfg.publish_grace_s)
        try:
            if (
                resume is not None
                and (last is None or resume > last)
                and newest - resume < v.cfg.audit_window
            ):
                target = resume  # finish the interrupted round while its artifacts are still served
                log.info("resuming round %d, interrupted by a restart", target)
            else:
                target = pick_round(last, newest, v.cfg.audit_window, v.clock.seed(newest))
            resume = None
        except ChainError as e:
            log.warning("cannot read round %d's seed (%s); retrying", newest, e)
            continue
        try:
            rec = run_round(v, target)
            done += 1
            print(summary_line(rec), flush=True)
        except NoBaseState as e:
            log.warning("%s; skipping the round", e)
        except ChainError as e:
            log.warning("round %d: chain trouble (%s); skipping the round", target, e)
        last = target
    return done


def pick_round(last: int | None, newest: int, window: int, seed: bytes) -> int:
    """The ended round to evaluate next: ``newest`` when the validator keeps up; when it fell behind, one of
    the unevaluated rounds of the last ``window`` picked by ``seed`` (the newest round's block hash, unknown
    before that round ended), so a peer cannot learn which rounds get audited and cheat only in the others."""
    if last is None:  # just started: the newest round (older ones may predate the peers we see now)
        return newest
    first = max(newest - window + 1, last + 1)
    if first >= newest:
        return newest
    choices = list(range(first, newest + 1))
    return choices[int.from_bytes(hashlib.blake2b(seed, digest_size=8).digest(), "little") % len(choices)]


def summary_line(rec: RoundRecord) -> str:
    scored = [s for s in rec.scores if s["score"] > 0]
    skipped = len(rec.sampling.get("not_sampled", {}))
    return (
        f"round {rec.round}: base held-out loss {swarm_heldout_loss(rec.measurements):.4f}; "
        f"{len(scored)}/{len(rec.scores) - skipped} evaluated peers earned"
        + (f" ({skipped} not sampled)" if skipped else "")
        + f"; weights {rec.weights['note']}; "
        f"{rec.timings['round_s']:.1f}s"
    )
