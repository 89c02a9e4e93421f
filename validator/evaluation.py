"""Measure every peer's contribution of one round: what its Δ does to the loss, and whether it is its own.

For round ``r`` with base state θ_r, seed ``s`` and page key ``q`` (``page_pick(s, q)``: a block hash
produced after the fetch) every validator that used the same block derives the same pages:

* "held-out" pages, the loss the swarm is paid to remove: ``eval_pages(r, q, unseen, k, "unseen")``, drawn
  from the *unseen* training pages — those assigned this round to no hotkey of the metagraph
  (``gain_pages = "unseen"``, the default). No peer knows them until its Δ is in the validator's hands,
  so none can train on them. The public held-out split (5 % of pages by a hash of the page id) is too
  small for that: a peer that trained on it besides its own pages took 40–74 % of a 4-peer subnet's
  weight (benchmarks/RESULTS.md, "Training on the public held-out split"). It is still measured at θ_r,
  for the swarm's loss curve (``public_heldout_loss``), and ``gain_pages = "heldout"`` draws the paid
  pages from it as every record before did;
* control pages ``eval_pages(r, s, train_pages, k, "control")`` — training pages nobody was told to use
  (a peer's own assigned pages are dropped from its control set);
* per peer, ``k`` of its assigned pages ``eval_pages(r, s, assign_pages(hotkey, r, s, ...), k,
  "assigned/<hotkey>")``.

Did a peer train on *its* pages? Page sets differ in how much any generic improvement helps them, so
comparing a peer's gain on its assigned pages with its gain on other pages is noisy. Instead the same
pages are used twice: each plausible peer (finite, sane norm, lowers held-out loss) is also evaluated on
the assigned pages of ``cross_peers`` other plausible peers (a ring in a seeded order), so every
plausible peer's assigned pages carry the gains of several Δs that were *not* trained on them
(``cross_gains``). Its own gain minus their median is its specificity (see :mod:`validator.scoring`).

For each peer the validator applies θ_r − α·Δ in place (α = ``delta_scale``), computes per-page losses on
held-out + its assigned + control pages in one batched pass, and restores θ_r by copying the saved base
back (never by adding Δ again: that would drift in floating point). Base losses of every page are
computed once per round and shared by all peers, so the cost per peer is the forward passes of its
own "after" pages plus its assigned "before" pages.

Overlapped rounds (``train.rounds: overlapped``) take the held-out gain to *first order*,
``(L(θ + α·Δ) − L(θ − α·Δ)) / 2`` (``heldout_rule = "first_order"``): a peer trained Δ_r from its own start
point θ_r − Δ_{r−1}, so much of an honest Δ_r undoes its own Δ_{r−1}, and on the shared θ_{r+1} that
repair moves *away* from θ_{r+1} whichever way it is applied. Its cost is even in α and cancels in the
difference; what is left is how far Δ points downhill from the shared state. In the overlapped demo every
honest Δ alone raised held-out loss by 0.10–0.18 nats while its first-order gain was +0.10 to +0.18
(benchmarks/RESULTS.md, "Overlapped rounds: validators pay the first-order gain"). The base stays the
shared θ, so a peer cannot earn by "repairing" a junk Δ_{r−1} of its own.

Measurements, not verdicts: the numbers go to :mod:`validator.scoring`, which turns them into a score.
Besides losses we measure the Δ's L2 norm, whether it is finite, and a *sketch* (a fixed strided subset
of its coordinates) whose cosine similarity with other peers' sketches (this round and earlier rounds)
reveals copies.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from peer.config import RunConfig
from peer.data.model import build_model, hash_tensors
from peer.data.pages import PageStore, assign_pages, eval_pages
from peer.errors import CheckpointError, ConfigError
from peer.net.layout import ArtifactLayouts, run_topk
from peer.training.sparse import decode_contribution
from validator.sketches import (
    PUBLIC_SKETCH,
    cosine,
    keyed_sketch_positions,
    sketch_indices,
    sketch_plan_id,
    span_measurements,
)

SKETCH_PURPOSE = "sketch"
HELDOUT_RULES = ("alone", "first_order")
GAIN_PAGES = ("unseen", "heldout")


@dataclass(kw_only=True)
class EvalConfig:
    """How much a validator measures per round. Every validator of a subnet should use the same values,
    otherwise their scores differ (the pages they look at are derived from these counts)."""

    heldout_pages: int = 16
    """Held-out pages evaluated per round (shared by all peers). More pages = less noise in the held-out
    gain, linearly more forward passes per peer. Raise it if peers' scores jump from round to round."""
    gain_pages: str = "unseen"
    """Where those pages come from. ``unseen``: training pages that no hotkey of the metagraph was
    assigned this round, drawn by the page key (a block produced after the fetch), so no peer can have
    trained on them. ``heldout``: the public held-out split — a peer can train on all of it (5 % of the
    corpus) and be paid for it; kept to replay older records. Falls back to ``heldout`` in a round
    whose assignments leave fewer unseen pages than ``heldout_pages`` (a tiny corpus, many peers)."""
    assigned_pages: int = 24
    """Pages of a peer's own assignment evaluated before and after its Δ (of ``data.pages_per_round``). The
    assignment test's power grows with it: a peer sees each of its pages only a few times a round, so
    the gain it learned there is small next to page-to-page noise. Measured on ``debug`` (64 pages a
    round): 8 pages ranked peers by inner steps with Spearman 0.56–0.98, 24 pages 0.87–1.0. If honest
    peers fail with "not shown to have trained on its assigned pages", raise it."""
    control_pages: int = 8
    """Unassigned training pages evaluated per round (base losses shared by all peers)."""
    delta_scale: float = 0.5
    """α in θ_r − α·Δ: how far along a peer's Δ the losses are measured. 1.0 applies the whole Δ (the
    peer's local weights); local steps often overfit their few pages, so at 1.0 honest Δs can *raise*
    held-out loss although their average lowers it. A smaller α measures the useful direction (the swarm
    applies each Δ as a fraction of the average). Lower it if honest peers show negative held-out gains."""
    batch_size: int = 32
    """Samples per forward pass. Raise for throughput on a GPU; lower if the validator runs out of memory."""
    sketch_size: int = 65536
    """Coordinates of each Δ kept for similarity checks (and stored per round for later rounds)."""
    cross_peers: int = 2
    """Other peers' Δs evaluated on each plausible peer's assigned pages (the paired control of the
    assignment test). Costs cross_peers × assigned_pages forward passes per peer, the largest share of a
    validator's work. With 2 the generic gain is the mean of two references, so one odd reference peer
    can tilt a round's specificity (the EMA over rounds dilutes it); raise it to 3 for a median."""
    plausible_norm_ratio: float = 5.0
    """Δs above this × the round's median norm are not used as cross references (scoring decides
    separately whether they earn anything)."""
    similarity_record: float = 0.8
    """Pairs of Δs with cosine similarity at least this are recorded as measurements (scoring decides)."""
    direction_test: bool = True
    """Also measure held-out loss at θ_r + α·Δ (16 more held-out pages per peer, ~15 % of its cost). A Δ
    must lower the loss more than its opposite does: right after an overshooting outer step any move,
    even a sign-flipped Δ, can lower held-out loss, and only the comparison shows who pointed the right
    way. Turn it off only to save time when rounds are known to be well-behaved."""
    device: str = "cpu"
    """Where the model runs: ``cpu`` or ``cuda[:i]``."""

    def __post_init__(self) -> None:
        if self.cross_peers < 0:
            raise ConfigError(f"eval.cross_peers must be >= 0, got {self.cross_peers}")
        for name in ("heldout_pages", "assigned_pages", "control_pages", "batch_size", "sketch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.delta_scale <= 1:
            raise ConfigError(f"eval.delta_scale must be in (0, 1], got {self.delta_scale}")
        if not 0 < self.similarity_record <= 1:
            raise ConfigError(f"eval.similarity_record must be in (0, 1], got {self.similarity_record}")
        if self.gain_pages not in GAIN_PAGES:
            raise ConfigError(f"eval.gain_pages must be one of {GAIN_PAGES}, got {self.gain_pages!r}")


@dataclass(kw_only=True)
class Candidate:
    """One peer's input to a round's evaluation (what fetch and verification produced)."""

    uid: int
    hotkey: str
    delta_blob: bytes | None = None
    """The 8-bit safetensors Δ as published (None when there is nothing to evaluate)."""
    rejected: str | None = None
    """Why this peer is not evaluated (missing, bad signature, wrong base, ...); None if it is."""
    claimed_pages: list[int] | None = None
    """Pages its manifest says it trained on (compared with the assignment; not used for evaluation)."""
    blob_sha256: str | None = None
    delta_format: str | None = None
    """The Δ format its signed manifest names (``ContributionManifest.delta_format``); a blob whose
    header names another is malformed. None: not checked (the blob's own header decides)."""


@dataclass(kw_only=True)
class PeerMeasurement:
    """Everything measured for one peer in one round (JSON-able; the score's raw material)."""

    uid: int
    hotkey: str
    status: str
    """``ok`` (evaluated), ``rejected`` (see reason), ``non_finite`` (NaN/inf in Δ) or ``malformed``."""
    reason: str = ""
    blob_sha256: str | None = None
    pages_match: bool | None = None
    """The manifest's pages are (a subset of) the validator's own assignment for this hotkey."""
    delta_norm: float | None = None
    heldout_loss: float | None = None
    """Mean held-out loss of θ_r − α·Δ."""
    heldout_loss_opposite: float | None = None
    """Mean held-out loss of θ_r + α·Δ (the direction test; None when it is off)."""
    assigned_loss_before: float | None = None
    assigned_loss_after: float | None = None
    control_loss_before: float | None = None
    control_loss_after: float | None = None
    assigned_page_ids: list[int] = field(default_factory=list)
    control_page_ids: list[int] = field(default_factory=list)
    assigned_page_gains: list[float] = field(default_factory=list)
    """Per assigned page: loss before − after (same order as ``assigned_page_ids``); in ``first_order``
    rounds (L(θ + α·Δ) − L(θ − α·Δ)) / 2 (:attr:`RoundMeasurements.heldout_rule`)."""
    control_page_gains: list[float] = field(default_factory=list)
    """Per control page: loss before − after (same order as ``control_page_ids``); first order in
    ``first_order`` rounds, as ``assigned_page_gains``."""
    cross_gains: list[dict] = field(default_factory=list)
    """Gains of other peers' Δs on this peer's assigned pages: ``{"uid", "hotkey", "gain", "page_gains"}``
    (first order in ``first_order`` rounds, as ``assigned_page_gains``)."""
    plausible: bool = False
    """Finite, sane norm and lowers held-out loss: used as a cross reference for other peers."""
    similar: list[dict] = field(default_factory=list)
    """Recorded similarities: ``{"round": r, "uid": u, "hotkey": h, "cosine": c}`` with c ≥ similarity_record."""
    span: dict | None = None
    """Where its Δ sketch lies relative to the other sketches: the measurement behind the combination
    copy test (a Δ that is, nearly, a linear mix of other peers' Δs; see :func:`validator.sketches.span_measurements`).
    None: not measured (no sketch, an all-zero one, or a record from before this test). Keys:
    ``explained``, the fraction of its squared sketch norm in the span of every other sketch of this
    round and of the earlier rounds' sketches (least squares); ``earlier``, the fraction in the span of
    the earlier rounds' sketches alone; ``earlier_sketches``, how many those were; ``products``,
    ``[{"uid", "hotkey", "dot"}]`` for every sketch of this round, itself included: inner products of
    the parts left after projecting the earlier span out, each sketch scaled to unit norm — the Gram
    matrix from which scoring recomputes the explained fraction over any subset of peers."""
    seconds: float = 0.0
    """Wall time this peer cost (decode, apply, forward passes, restore)."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Mapping) -> PeerMeasurement:
        return cls(**d)


def page_pick(seed: bytes, page_key: bytes | None) -> bytes:
    """What draws a round's evaluated pages: the seed (known to peers while they train) alone, or mixed
    with the page key (``validator.sampling.page_key``: the hash of a block produced only after the
    validator held every Δ it evaluates), so that no peer can tune its Δ to the held-out, control or
    evaluated assigned pages, while it trains or by serving its Δ late — nor make its Δ, as another
    peer's cross reference, look generic on the control pages while it targets that peer's pages
    (``ScoringConfig.reference_bias_t``). Pure."""
    if page_key is None:
        return seed
    return hashlib.blake2b(b"gradswarm/eval-pages/" + seed + page_key, digest_size=32).digest()


@dataclass(kw_only=True)
class RoundMeasurements:
    round: int
    seed_hex: str
    base_state_hash: str
    delta_scale: float
    heldout_page_ids: list[int]
    heldout_loss_base: float
    control_page_ids: list[int]
    peers: list[PeerMeasurement]
    base_seconds: float = 0.0
    """Time of the shared base-model forward passes."""
    page_key_hex: str | None = None
    """The page key that, with the seed, drew the evaluated pages — held-out, control, the evaluated
    subset of each assignment, the cross-reference ring (:func:`page_pick`). Since late 2026-12-06
    the hash of a block produced after every Δ was fetched (``validator.sampling.page_key``; the record's
    ``sampling["page_block"]`` names it); before, the end-of-round sampling key, which a peer that served
    its Δ late already knew. None (records before either, tools without a chain): the seed alone, which
    every peer knows while it trains."""
    gain_pages: str = "heldout"
    """Where ``heldout_page_ids`` came from (:attr:`EvalConfig.gain_pages`): ``unseen`` training pages,
    or the public held-out split (``heldout``: every record from before this field)."""
    unseen_excluded: list[str] = field(default_factory=list)
    """``unseen`` rounds: the hotkeys whose assignments of this round were left out of the pool (the
    metagraph's and the candidates'), sorted; what a replay needs to draw the same pages."""
    public_heldout_loss: float | None = None
    """Mean loss of θ_r on ``heldout_pages`` pages of the public held-out split (the swarm's loss curve;
    :func:`swarm_heldout_loss`). None: the paid pages were those (``gain_pages`` ``heldout``)."""
    heldout_rule: str = "alone"
    """How scoring reads a Δ's held-out gain (:func:`heldout_gain`). ``alone``:
    L(θ) − L(θ − α·Δ) (blocking rounds, and every record from before this field). ``first_order``:
    (L(θ + α·Δ) − L(θ − α·Δ)) / 2, for overlapped rounds (module docstring); the opposite point is then
    measured whether or not ``direction_test`` is on."""

    def to_json(self) -> dict:
        d = asdict(self)
        d["peers"] = [p.to_json() for p in self.peers]
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> RoundMeasurements:
        d = dict(d)
        d["peers"] = [PeerMeasurement.from_json(p) for p in d["peers"]]
        return cls(**d)


# -----------------------------------------------------------------------------------------------------


def check_declared_format(blob: bytes, declared: str | None) -> None:
    """Raise ``ArtifactRefused("bad_metadata")`` if a Δ blob's header names another format than its
    manifest (``declared``; None skips the check). Reads the header only."""
    if declared is None:
        return
    from peer.net.layout import ArtifactRefused, parse_header

    found = parse_header(blob).metadata.get("format")
    if found != declared:
        raise ArtifactRefused("bad_metadata", f"Δ blob is {found!r}, its manifest says {declared!r}")


class Evaluator:
    """Holds one model and the round's base; evaluates any number of Δs against it.

    Build once per validator (the model is reused across rounds).
    """

    def __init__(self, cfg: EvalConfig, run: RunConfig, store: PageStore, sketch_key: bytes | None = None):
        """``sketch_key``: the validator's secret for its copy-test sketches (:func:`keyed_sketch_positions`);
        None = the public strided plan (tests, benchmarks, replays of records made before keys)."""
        self.cfg = cfg
        self.run = run
        self.store = store
        self.device = torch.device(cfg.device)
        self.model = build_model(run, self.device)
        self.model.eval()
        self.params = dict(self.model.named_parameters())
        self.base: dict[str, torch.Tensor] = {}
        self.base_hash: str | None = None
        self._rule = "alone"  # the round's heldout_rule (set by evaluate_round)
        shapes = [(n, p.numel()) for n, p in self.params.items()]
        self.sketch_plan = sketch_indices(shapes, cfg.sketch_size) if sketch_key is None else None
        self.sketch_positions = (
            None if sketch_key is None else keyed_sketch_positions(shapes, cfg.sketch_size, sketch_key)
        )
        self.sketch_plan_id = PUBLIC_SKETCH if sketch_key is None else sketch_plan_id(sketch_key)
        """Which coordinates :meth:`sketch` reads (recorded per round: only sketches of one plan compare)."""
        shapes_by_name = {n: tuple(p.shape) for n, p in self.params.items()}
        self.delta_layout = ArtifactLayouts.from_shapes(shapes_by_name, topk=run_topk(run)).contribution
        """The exact tensors of an honest Δ of this model — 8-bit dense, or sparse (``delta_layout.sparse``,
        the run's top-k) as the blob's ``format`` says: a Δ is checked against it before decoding."""

    # ---- base state
    def load_base(self, state: Mapping[str, torch.Tensor]) -> str:
        """Load θ_r into the model (checks names and shapes); returns its state hash."""
        missing = set(self.params) - set(state)
        extra = set(state) - set(self.params)
        if missing or extra:
            raise CheckpointError(
                f"base state does not match model config {self.run.name!r}: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(extra)[:3]}"
            )
        with torch.no_grad():
            for name, p in self.params.items():
                t = state[name]
                if tuple(t.shape) != tuple(p.shape):
                    raise CheckpointError(
                        f"base state tensor {name} has shape {tuple(t.shape)}, model wants {tuple(p.shape)}"
                    )
                p.copy_(t.to(p.dtype))
                if not bool(torch.isfinite(p).all()):
                    raise CheckpointError(f"base state tensor {name} holds NaN or infinite values")
        self.base = {n: p.detach().clone() for n, p in self.params.items()}
        self.base_hash = hash_tensors((n, p) for n, p in self.params.items())
        return self.base_hash

    def _restore(self) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.base[n])

    # ---- losses
    @torch.inference_mode()
    def page_losses(self, pages: Sequence[int]) -> list[float]:
        """Mean next-token loss of each page under the model's current parameters (one batched pass)."""
        if not pages:
            return []
        spp = self.store.cfg.samples_per_page
        data = self.store.samples(pages)
        per_sample = []
        bs = self.cfg.batch_size
        for i in range(0, len(data), bs):
            batch = data[i : i + bs].to(self.device)
            logits = self.model(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="none"
            )
            per_sample.append(loss.view(batch.shape[0], -1).mean(dim=1).double().cpu())
        samples = torch.cat(per_sample)
        return [float(x) for x in samples.view(len(pages), spp).mean(dim=1)]

    # ---- pages
    def heldout_page_ids(self, round_: int, seed: bytes) -> list[int]:
        return eval_pages(round_, seed, self.store.heldout_pages, self.cfg.heldout_pages, "heldout")

    def unseen_page_ids(self, round_: int, seed: bytes, pick: bytes, hotkeys: Sequence[str]) -> list[int]:
        """``heldout_pages`` training pages that none of ``hotkeys`` was assigned in round ``round_`` (their
        assignments derive from ``seed``), drawn by ``pick``; fewer when fewer are left."""
        assigned: set[int] = set()
        for hk in hotkeys:
            assigned.update(self.assignment(hk, round_, seed))
        pool = [p for p in self.store.train_pages if p not in assigned]
        if not pool:
            return []
        return eval_pages(round_, pick, pool, self.cfg.heldout_pages, "unseen")

    def control_page_ids(self, round_: int, seed: bytes) -> list[int]:
        return eval_pages(round_, seed, self.store.train_pages, self.cfg.control_pages, "control")

    def assignment(self, hotkey: str, round_: int, seed: bytes) -> list[int]:
        return assign_pages(hotkey, round_, seed, self.store.train_pages, self.run.data.pages_per_round)

    def assigned_page_ids(
        self, hotkey: str, round_: int, seed: bytes, pick: bytes | None = None
    ) -> list[int]:
        """The evaluated subset of ``hotkey``'s assignment (drawn by ``pick``, default the seed)."""
        own = self.assignment(hotkey, round_, seed)
        return eval_pages(round_, pick or seed, own, self.cfg.assigned_pages, f"assigned/{hotkey}")

    # ---- Δ handling
    def decode(self, blob: bytes) -> dict[str, torch.Tensor]:
        """The Δ (8-bit dense or sparse) as fp32 tensors of the model's shapes; any malformed or oversized
        blob raises :class:`~peer.errors.CheckpointError` (``ArtifactRefused`` with a reason code) before
        anything beyond an honest Δ's size is allocated (a sparse Δ: its entries, then the dense fp32 Δ)."""
        delta = decode_contribution(blob, self.delta_layout)
        if set(delta) != set(self.params):
            raise CheckpointError(
                f"Δ names {len(delta)} tensors that do not match the model's {len(self.params)}"
            )
        for n, t in delta.items():
            if tuple(t.shape) != tuple(self.params[n].shape):
                raise CheckpointError(
                    f"Δ tensor {n} has shape {tuple(t.shape)}, model wants {tuple(self.params[n].shape)}"
                )
        return delta

    def sketch(self, delta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The Δ's coordinates the copy tests compare, in a fixed order (``sketch_plan_id``)."""
        parts = []
        for name in self.params:
            flat = delta[name].reshape(-1)
            if self.sketch_positions is not None:
                parts.append(flat.index_select(0, self.sketch_positions[name].to(flat.device)).float())
            else:
                offset, stride = self.sketch_plan[name]
                parts.append(flat[offset::stride].float())
        return torch.cat(parts)

    # ---- the round
    def evaluate_round(
        self,
        round_: int,
        seed: bytes,
        base_state: Mapping[str, torch.Tensor],
        candidates: Sequence[Candidate],
        earlier_sketches: Mapping[tuple[int, int, str], torch.Tensor] | None = None,
        heldout_rule: str | None = None,
        page_key: bytes | None = None,
        exclude_hotkeys: Sequence[str] = (),
        gain_pages: str | None = None,
    ) -> tuple[RoundMeasurements, dict[tuple[int, str], torch.Tensor]]:
        """Measure every candidate. Returns the measurements and this round's sketches ``(uid, hotkey) → sketch``.

        ``earlier_sketches`` maps ``(round, uid, hotkey)`` of earlier rounds to their sketches; a Δ that
        repeats one of them (stale, or copied from an earlier round) shows up in ``similar``.
        ``heldout_rule`` (``alone`` / ``first_order``, :attr:`RoundMeasurements.heldout_rule`) defaults to
        the run's round mode: ``first_order`` for overlapped rounds; a replay passes its record's rule.
        ``page_key`` (``validator.sampling.page_key``) draws the evaluated pages with the seed (:func:`page_pick`);
        the assignments themselves stay the seed's (what the peers trained on). ``gain_pages``
        (default ``cfg.gain_pages``; a replay passes its record's) says where the held-out pages come
        from; in ``unseen`` rounds the assignments of ``exclude_hotkeys`` (the metagraph's hotkeys) and of
        every candidate are left out of their pool.
        """
        if heldout_rule is None:
            heldout_rule = "first_order" if self.run.train.rounds == "overlapped" else "alone"
        if heldout_rule not in HELDOUT_RULES:
            raise ValueError(f"heldout_rule must be one of {HELDOUT_RULES}, not {heldout_rule!r}")
        self._rule = heldout_rule
        t0 = time.perf_counter()
        base_hash = self.load_base(base_state)
        pick = page_pick(seed, page_key)
        public = self.heldout_page_ids(round_, pick)
        gain_pages, heldout, excluded = gain_pages or self.cfg.gain_pages, public, []
        if gain_pages == "unseen":
            excluded = sorted({*exclude_hotkeys, *(c.hotkey for c in candidates)})
            unseen = self.unseen_page_ids(round_, seed, pick, excluded)
            if len(unseen) < self.cfg.heldout_pages:  # fewer unseen pages than wanted: the public split
                gain_pages, excluded = "heldout", []
            else:
                heldout = unseen
        control = self.control_page_ids(round_, pick)
        assigned: dict[int, list[int]] = {}
        for c in candidates:
            if c.rejected is None and c.delta_blob is not None:
                assigned[c.uid] = self.assigned_page_ids(c.hotkey, round_, seed, pick)
        # one batched pass over every page whose base loss anyone needs
        wanted = [*heldout, *control, *(p for ps in assigned.values() for p in ps)]
        wanted = list(dict.fromkeys(wanted + (public if gain_pages == "unseen" else [])))
        base_loss = dict(zip(wanted, self.page_losses(wanted), strict=True))
        if not _all_finite(base_loss.values()):
            raise CheckpointError(
                f"θ_r {base_hash[:12]} gives a NaN or infinite loss: nothing can be measured"
            )
        heldout_base = _mean([base_loss[p] for p in heldout])
        base_seconds = time.perf_counter() - t0

        # phase 1: each peer on held-out + its own assigned + control pages
        peers: list[PeerMeasurement] = []
        sketches: dict[tuple[int, str], torch.Tensor] = {}
        for c in candidates:
            peers.append(
                self._measure(
                    c,
                    round_,
                    seed,
                    heldout,
                    control,
                    assigned.get(c.uid, []),
                    base_loss,
                    heldout_base,
                    sketches,
                )
            )
        # phase 2: plausible peers on each other's assigned pages (paired control of the assignment test)
        self._cross(round_, pick, candidates, peers, assigned, base_loss, heldout_base)
        self._similarities(round_, peers, sketches, earlier_sketches or {})
        self._spans(round_, peers, sketches, earlier_sketches or {})
        rm = RoundMeasurements(
            round=round_,
            seed_hex=seed.hex(),
            page_key_hex=None if page_key is None else page_key.hex(),
            base_state_hash=base_hash,
            delta_scale=self.cfg.delta_scale,
            heldout_page_ids=heldout,
            heldout_loss_base=heldout_base,
            control_page_ids=control,
            peers=peers,
            base_seconds=base_seconds,
            heldout_rule=heldout_rule,
            gain_pages=gain_pages,
            unseen_excluded=excluded,
            public_heldout_loss=_mean([base_loss[p] for p in public]) if gain_pages == "unseen" else None,
        )
        return rm, sketches

    def _losses_at(
        self, delta: Mapping[str, torch.Tensor], pages: Sequence[int], sign: float = 1.0
    ) -> list[float]:
        """Per-page losses of θ_r − sign·α·Δ; θ_r is copied back afterwards, also on error."""
        self._apply(delta, sign)
        try:
            return self.page_losses(pages)
        finally:
            self._restore()

    def _page_gains(
        self, delta: Mapping[str, torch.Tensor], pages: Sequence[int], base_loss: Mapping[int, float]
    ) -> tuple[list[float], list[float] | None, list[float]]:
        """Per-page losses at θ − α·Δ, at θ + α·Δ (``first_order`` rounds only, else None), and the
        gains the round's rule reads from them: base − after, or (opposite − after) / 2."""
        after = self._losses_at(delta, pages)
        if self._rule != "first_order":
            return after, None, [base_loss[pg] - x for pg, x in zip(pages, after, strict=True)]
        opposite = self._losses_at(delta, pages, sign=-1.0)
        return after, opposite, [(o - x) / 2 for o, x in zip(opposite, after, strict=True)]

    def _apply(self, delta: Mapping[str, torch.Tensor], sign: float = 1.0) -> None:
        alpha = sign * self.cfg.delta_scale
        with torch.no_grad():
            for n, p in self.params.items():
                p.sub_(delta[n].to(device=p.device, dtype=p.dtype), alpha=alpha)

    def _measure(
        self,
        c: Candidate,
        round_: int,
        seed: bytes,
        heldout: list[int],
        control: list[int],
        assigned: list[int],
        base_loss: dict[int, float],
        heldout_base: float,
        sketches: dict[tuple[int, str], torch.Tensor],
    ) -> PeerMeasurement:
        t0 = time.perf_counter()
        m = PeerMeasurement(uid=c.uid, hotkey=c.hotkey, status="ok", blob_sha256=c.blob_sha256)
        if c.claimed_pages is not None:
            m.pages_match = set(c.claimed_pages) <= set(self.assignment(c.hotkey, round_, seed))
        if c.rejected is not None or c.delta_blob is None:
            m.status, m.reason = "rejected", c.rejected or "no contribution"
            return m
        try:
            check_declared_format(c.delta_blob, c.delta_format)
            delta = self.decode(c.delta_blob)
        except CheckpointError as e:
            m.status, m.reason = "malformed", f"{getattr(e, 'reason', 'malformed')}: {e}"
            m.seconds = time.perf_counter() - t0
            return m
        norm_sq = sum(float(t.double().pow(2).sum()) for t in delta.values())
        m.delta_norm = math.sqrt(norm_sq) if math.isfinite(norm_sq) else float("inf")
        if not math.isfinite(norm_sq):
            m.status, m.reason = "non_finite", "Δ holds NaN or infinite values"
            m.seconds = time.perf_counter() - t0
            return m
        sketches[(c.uid, c.hotkey)] = self.sketch(delta)
        own = set(self.assignment(c.hotkey, round_, seed))
        ctrl = [p for p in control if p not in own]
        m.assigned_page_ids, m.control_page_ids = assigned, ctrl
        m.assigned_loss_before = _mean([base_loss[p] for p in assigned])
        m.control_loss_before = _mean([base_loss[p] for p in ctrl])
        if norm_sq == 0:  # θ_r − 0 = θ_r: the base losses are the answer, no forward pass needed
            m.heldout_loss, m.assigned_loss_after, m.control_loss_after = (
                heldout_base,
                m.assigned_loss_before,
                m.control_loss_before,
            )
            m.assigned_page_gains, m.control_page_gains = [0.0] * len(assigned), [0.0] * len(ctrl)
            m.seconds = time.perf_counter() - t0
            return m
        after, opposite, gains = self._page_gains(delta, heldout + assigned + ctrl, base_loss)
        h, a = len(heldout), len(assigned)
        if opposite is not None:
            m.heldout_loss_opposite = _mean(opposite[:h])
        elif self.cfg.direction_test:
            m.heldout_loss_opposite = _mean(self._losses_at(delta, heldout, sign=-1.0))
        if not _all_finite(after, opposite or [], [m.heldout_loss_opposite or 0.0]):
            # a finite Δ can still overflow the forward pass (values ~1e20): its losses say nothing, and a
            # NaN slips past every "gain ≤ x" test and into the round's medians and the EMA
            del sketches[(c.uid, c.hotkey)]
            m.heldout_loss_opposite = None  # the record holds no NaN (strict JSON readers refuse it)
            m.status, m.reason = "non_finite", NON_FINITE_LOSS
            m.seconds = time.perf_counter() - t0
            return m
        m.heldout_loss = _mean(after[:h])
        m.assigned_loss_after = _mean(after[h : h + a])
        m.control_loss_after = _mean(after[h + a :])
        m.assigned_page_gains, m.control_page_gains = gains[h : h + a], gains[h + a :]
        m.seconds = time.perf_counter() - t0
        return m

    def _cross(
        self,
        round_: int,
        seed: bytes,
        candidates: Sequence[Candidate],
        peers: list[PeerMeasurement],
        assigned: dict[int, list[int]],
        base_loss: dict[int, float],
        heldout_base: float,
    ) -> None:
        norms = [p.delta_norm for p in peers if p.status == "ok" and p.delta_norm]
        med = sorted(norms)[len(norms) // 2] if len(norms) >= 3 else None
        for p in peers:
            p.plausible = (
                p.status == "ok"
                and bool(p.delta_norm)
                and (heldout_gain(p, heldout_base, self._rule) or 0.0) > 0
                and (med is None or p.delta_norm <= self.cfg.plausible_norm_ratio * med)
            )
        base_by_uid = {c.uid: c for c in candidates}
        ring = sorted((p for p in peers if p.plausible), key=lambda p: _h(round_, seed, p.hotkey))
        m = min(self.cfg.cross_peers, len(ring) - 1)
        if m <= 0:
            return
        for pos, p in enumerate(ring):
            t0 = time.perf_counter()
            targets = [ring[(pos + i) % len(ring)] for i in range(1, m + 1)]
            pages = [pg for t in targets for pg in assigned[t.uid]]
            _, _, gains = self._page_gains(self.decode(base_by_uid[p.uid].delta_blob), pages, base_loss)
            if not _all_finite(gains):  # finite on its own pages, overflowing on others' (e.g. rare tokens)
                p.status, p.reason, p.plausible = (
                    "non_finite",
                    NON_FINITE_LOSS + " (on other peers' pages)",
                    False,
                )
                p.seconds += time.perf_counter() - t0
                continue
            i = 0
            for t in targets:
                k = len(assigned[t.uid])
                page_gains = gains[i : i + k]
                t.cross_gains.append(
                    {"uid": p.uid, "hotkey": p.hotkey, "gain": _mean(page_gains), "page_gains": page_gains}
                )
                i += k
            p.seconds += time.perf_counter() - t0

    def _similarities(
        self,
        round_: int,
        peers: list[PeerMeasurement],
        sketches: Mapping[tuple[int, str], torch.Tensor],
        earlier: Mapping[tuple[int, int, str], torch.Tensor],
    ) -> None:
        keys = list(sketches)
        by_key = {(p.uid, p.hotkey): p for p in peers}
        thr = self.cfg.similarity_record
        for i, ki in enumerate(keys):
            for kj in keys[i + 1 :]:
                cos = cosine(sketches[ki], sketches[kj])
                if cos >= thr:
                    by_key[ki].similar.append({"round": round_, "uid": kj[0], "hotkey": kj[1], "cosine": cos})
                    by_key[kj].similar.append({"round": round_, "uid": ki[0], "hotkey": ki[1], "cosine": cos})
            for (r, uid, hk), sk in sorted(earlier.items()):
                if r >= round_ or sk.shape != sketches[ki].shape:
                    continue
                cos = cosine(sketches[ki], sk)
                if cos >= thr:
                    by_key[ki].similar.append({"round": r, "uid": uid, "hotkey": hk, "cosine": cos})

    def _spans(
        self,
        round_: int,
        peers: list[PeerMeasurement],
        sketches: Mapping[tuple[int, str], torch.Tensor],
        earlier: Mapping[tuple[int, int, str], torch.Tensor],
    ) -> None:
        shape = next(iter(sketches.values())).shape if sketches else None
        older = [sk for (r, _, _), sk in sorted(earlier.items()) if r < round_ and sk.shape == shape]
        spans = span_measurements(sketches, older)
        for p in peers:
            p.span = spans.get((p.uid, p.hotkey))


def _h(*parts: object) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\x1f")
    return h.digest()


def swarm_heldout_loss(measurements: Mapping) -> float:
    """θ_r's loss on the public held-out split (the swarm's loss curve) from a record's measurements: the
    paid pages' base loss in records whose paid pages were that split."""
    public = measurements.get("public_heldout_loss")
    return measurements["heldout_loss_base"] if public is None else public


def heldout_gain(p: PeerMeasurement, heldout_loss_base: float | None, rule: str = "alone") -> float | None:
    """A Δ's held-out gain under a round's ``heldout_rule`` (None when not measured): ``alone``
    L(θ) − L(θ − α·Δ); ``first_order`` (L(θ + α·Δ) − L(θ − α·Δ)) / 2."""
    if rule == "first_order":
        if p.heldout_loss_opposite is None or p.heldout_loss is None:
            return None
        return (p.heldout_loss_opposite - p.heldout_loss) / 2
    if heldout_loss_base is None or p.heldout_loss is None:
        return None
    return heldout_loss_base - p.heldout_loss


NON_FINITE_LOSS = "Δ makes the model's loss NaN or infinite"
"""Why a finite Δ whose forward passes overflow is refused (status ``non_finite``)."""


def _all_finite(*lists: Sequence[float]) -> bool:
    return all(math.isfinite(x) for xs in lists for x in xs)


def _mean(xs: Sequence[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None
