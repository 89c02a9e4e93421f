"""The validator's round loop, as a recipe of named steps.

For every round ``r`` that has ended (the chain's clock says so)::

    sync_metagraph   uids, hotkeys and publisher commitments from the chain (ours excluded)
    fetch_round      θ_r: the state hash most peers' signed state manifests name, fetched from one of
                     them and checked against that hash; each peer's Δ_r with its signed manifest,
                     verified by the fetch client (hotkey, run, round, peer id, sha256) and then here
                     (base hash, model config, data fingerprint); every refusal becomes a reason
    evaluate         validator.evaluation: losses before/after each Δ, assignment test, copies
    score            validator.scoring: round scores → EMA → u16 weights (pure)
    set_weights      validator.weights: queue for this round, send (set or commit/reveal), retry later
    record           the round's record + sketches in the state dir (for replay), EMA, W&B, a table

Each step is a plain function of explicit inputs; :func:`run_round` strings them together and
:func:`run` repeats it. State that survives restarts lives in the state dir (validator.store).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from peer.chain.base import Chain, ChainError, ChainUnreachable, Metagraph
from peer.config import RunConfig
from peer.data.pages import PageStore
from peer.errors import CheckpointError
from peer.net.outbox import decode_state
from peer.net.records import Commitment
from validator.evaluation import Candidate, EvalConfig, Evaluator, RoundMeasurements
from validator.scoring import (
    EmaState,
    PeerScore,
    ScoringConfig,
    WeightVector,
    normalize_weights,
    score_round,
    update_ema,
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

    def __post_init__(self) -> None:
        from peer.errors import ConfigError

        if self.round_blocks < 1:
            raise ConfigError("--round-blocks must be >= 1")
        if self.audit_window < 1:
            raise ConfigError("audit_window must be >= 1")
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


def sync_metagraph(chain: Chain, netuid: int, own_hotkey: str) -> tuple[Metagraph, list[PeerTarget]]:
    """The metagraph and, for every other uid, where its publisher is (or why we cannot reach it)."""
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
        try:
            targets.append(
                PeerTarget(
                    uid=nr.uid,
                    hotkey=nr.hotkey,
                    target=Target.from_commitment(Commitment.from_bytes(raw), nr.hotkey),
                )
            )
        except ValueError as e:
            targets.append(PeerTarget(uid=nr.uid, hotkey=nr.hotkey, rejected=f"unreadable commitment ({e})"))
    return mg, targets


@dataclass(kw_only=True)
class RoundInputs:
    round: int
    seed: bytes
    base_state: dict[str, torch.Tensor]
    base_sha256: str
    base_state_hash: str
    base_sources: list[str]
    candidates: list[Candidate]
    records: list[CandidateRecord]
    fetch_seconds: float = 0.0


class NoBaseState(ChainError):
    """No peer served a verifiable θ_r for this round (nothing to evaluate against)."""


def fetch_round(
    client,
    targets: list[PeerTarget],
    round_: int,
    seed: bytes,
    *,
    run: RunConfig,
    data_fingerprint: str,
    evaluator: Evaluator,
) -> RoundInputs:
    """θ_r (majority of signed state manifests, hash-checked) and every peer's verified Δ_r."""
    from peer.net.fetch import FetchError

    t0 = time.perf_counter()
    reachable = [t for t in targets if t.target is not None]
    votes: dict[str, list[PeerTarget]] = {}
    for t in reachable:
        try:
            listing = client.list_round(t.target.addr, t.target.peer_id, round_, hotkey=t.hotkey)
        except FetchError as e:
            log.info("uid %d: no state listing for round %d (%s)", t.uid, round_, e)
            continue
        if listing.state is not None and listing.state.model_config_name == run.name:
            votes.setdefault(listing.state.state_hash, []).append(t)
    base = None
    for state_hash, voters in sorted(votes.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        for t in voters:
            try:
                fetched = client.fetch(t.target, round_, "state")
                state = decode_state(fetched.read_bytes())
                if evaluator.load_base(state) != state_hash:
                    raise CheckpointError(f"uid {t.uid}'s state does not hash to {state_hash[:12]}")
            except (FetchError, CheckpointError) as e:
                log.warning("round %d: state from uid %d refused: %s", round_, t.uid, e)
                continue
            base = (state, fetched.sha256, state_hash, [v.hotkey for v in voters])
            break
        if base is not None:
            break
    if base is None:
        raise NoBaseState(
            f"round {round_}: no peer served a verifiable θ_{round_} ({len(reachable)} reachable)"
        )
    state, base_sha, base_hash, sources = base

    fetched_all = (
        client.fetch_many([t.target for t in reachable], round_, "contribution") if reachable else {}
    )
    candidates, records = [], []
    for t in targets:
        rec = CandidateRecord(uid=t.uid, hotkey=t.hotkey, rejected=t.rejected)
        cand = Candidate(uid=t.uid, hotkey=t.hotkey, rejected=t.rejected)
        if t.target is not None:
            got = fetched_all.get(t.target)
            if isinstance(got, FetchError) or got is None:
                reason = f"fetch: {got}" if got is not None else "fetch: no answer"
                cand.rejected = rec.rejected = reason
            else:
                m = got.manifest
                rec.manifest, rec.blob_sha256 = m.model_dump(mode="json"), got.sha256
                cand.blob_sha256, cand.claimed_pages = got.sha256, list(m.pages)
                reason = _manifest_problem(m, run=run, base_hash=base_hash, data_fingerprint=data_fingerprint)
                if reason is None:
                    cand.delta_blob = got.read_bytes()
                else:
                    cand.rejected = rec.rejected = reason
        candidates.append(cand)
        records.append(rec)
    return RoundInputs(
        round=round_,
        seed=seed,
        base_state=state,
        base_sha256=base_sha,
        base_state_hash=base_hash,
        base_sources=sources,
        candidates=candidates,
        records=records,
        fetch_seconds=time.perf_counter() - t0,
    )


def _manifest_problem(m, *, run: RunConfig, base_hash: str, data_fingerprint: str) -> str | None:
    if m.base_state_hash != base_hash:
        return f"trained from state {m.base_state_hash[:12]}, not the swarm's θ_r {base_hash[:12]}"
    if m.model_config_name != run.name:
        return f"model config {m.model_config_name!r}, this swarm runs {run.name!r}"
    if m.data_fingerprint != data_fingerprint:
        return "data fingerprint differs from the validator's prepared data"
    return None


def evaluate(
    evaluator: Evaluator, inputs: RoundInputs, store: ValidatorStore, lookback: int
) -> tuple[RoundMeasurements, dict, list[int]]:
    sketch_rounds, earlier = store.earlier_sketches(inputs.round, lookback)
    rm, sketches = evaluator.evaluate_round(
        inputs.round, inputs.seed, inputs.base_state, inputs.candidates, earlier
    )
    return rm, sketches, sketch_rounds


def score(
    rm: RoundMeasurements, cfg: ScoringConfig, ema: EmaState, uids: dict[int, str]
) -> tuple[list[PeerScore], EmaState, WeightVector]:
    scores = score_round(rm, cfg)
    new_ema = update_ema(ema, rm.round, scores, uids, cfg.ema_alpha)
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
    mg, targets = sync_metagraph(v.chain, v.cfg.netuid, v.hotkey.ss58_address)
    seed = v.clock.seed(round_)
    inputs = fetch_round(
        v.client,
        targets,
        round_,
        seed,
        run=v.run,
        data_fingerprint=v.pages.fingerprint,
        evaluator=v.evaluator,
    )
    v.store.put_blob(inputs.base_sha256, _base_bytes(v.client, inputs))
    t1 = time.perf_counter()
    rm, sketches, sketch_rounds = evaluate(v.evaluator, inputs, v.store, v.cfg.sketch_lookback)
    t2 = time.perf_counter()
    ema_before = v.store.load_ema()
    scores, ema_after, weights = score(
        rm,
        v.scoring_cfg,
        ema_before,
        {n.uid: n.hotkey for n in mg.neurons if n.hotkey != v.hotkey.ss58_address},
    )
    outcomes = set_weights(v.setter, round_, weights)
    v.store.save_ema(ema_after)
    rec = RoundRecord(
        run_id=v.cfg.run_id,
        config_name=v.run.name,
        netuid=v.cfg.netuid,
        round=round_,
        seed_hex=seed.hex(),
        base_sha256=inputs.base_sha256,
        base_state_hash=inputs.base_state_hash,
        base_sources=inputs.base_sources,
        candidates=inputs.records,
        sketch_rounds=sketch_rounds,
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
            "evaluate_s": t2 - t1,
            "base_s": rm.base_seconds,
            "round_s": time.perf_counter() - t0,
        },
    )
    v.store.save_round(rec, sketches)
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
    last = max(v.store.rounds(), default=None)
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
            target = pick_round(last, newest, v.cfg.audit_window, v.clock.seed(newest))
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
    return (
        f"round {rec.round}: base held-out loss {rec.measurements['heldout_loss_base']:.4f}; "
        f"{len(scored)}/{len(rec.scores)} peers earned; weights {rec.weights['note']}; "
        f"{rec.timings['round_s']:.1f}s"
    )
