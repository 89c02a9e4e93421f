"""The trainer: one peer's round loop (DiLoCo over hivemind), as a recipe of named steps.

θ_r is the swarm's state at the start of round r: bit-identical on every peer in step with the swarm
(its hash is announced on the DHT, published with the state, and is the base validators evaluate
round r's contributions on). Per round r (the clock says which round it is and when it ends)::

    sync_state      only when we do not hold θ_r (start, late join, after a failed or skipped round):
                    agree on θ_r with the swarm, download the majority's θ_r if ours differs
    train_inner     inner AdamW steps on the pages assigned to (hotkey, r, seed_r), from x_r = θ_r − c_r
    boundary        Δ_r = x_r − x_local (norm-bounded); hand Δ_r to the all-reduce; outer step → θ_{r+1}
    background      publish Δ_r; hash, checkpoint, publish and announce θ_{r+1}; held-out loss; log

Two round modes (``train.rounds``; ``peer join --rounds``):

* ``overlapped`` (opt-in: README "How a round works"): training runs to the round's
  end; the all-reduce of Δ_r runs in the background during round r+1; the outer step is applied one
  round late: θ_{r+1} = OuterStep(θ_r, ḡ_{r−1}) and the next start point is x_{r+1} = θ_{r+1} − Δ_r
  (c_{r+1} = Δ_r: the peer's own, not yet averaged progress stands in for ḡ_r until ḡ_r arrives);
  with ``train.overlapped_start: shared`` instead x_{r+1} = θ_{r+1} + (θ_{r+1} − θ_r) (c_{r+1} = θ_r − θ_{r+1},
  the swarm's last outer step: the same start point on every peer).
* ``blocking`` (the default): training stops ``averaging_reserve_seconds`` before the round's end,
  the all-reduce of Δ_r runs while training waits, θ_{r+1} = OuterStep(θ_r, ḡ_r), x_{r+1} = θ_{r+1}.

A failed all-reduce (a peer died mid-way) is never applied: θ takes no step for it (the local progress
it carried is dropped); the announcements then tell a peer that ended up off the majority to resync.
Checkpoint, state and contribution files, the state hash, the announcement and the held-out loss are
produced by a background thread, never on the training thread.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peer.config import RunConfig
from peer.data.model import build_model, count_parameters, evaluate_loss, lm_loss, uses_bf16
from peer.data.pages import assign_pages, eval_pages, round_batches
from peer.data.shards import open_page_store
from peer.errors import CheckpointError, ConfigError
from peer.net.outbox import (
    Outbox,
    atomic_write_json,
    encode_delta,
    load_checkpoint,
    sha256_hex,
    write_safetensors_streamed,
)
from peer.net.records import BlobRef, ContributionManifest, StateManifest
from peer.progress import Progress
from peer.tracking import Tracker
from peer.training import behaviour as bh
from peer.training.background import BackgroundWriter
from peer.training.behaviour import Behaviour
from peer.training.clock import RoundClock
from peer.training.cpu_usage import BackgroundCpu, peak_rss_mb
from peer.training.diloco import DilocoState, optimizer_state_bytes

log = logging.getLogger("gradswarm.trainer")


@dataclass(kw_only=True)
class TrainerConfig:
    """How one peer runs (what it agrees on with the swarm is in ``run``)."""

    run: RunConfig
    run_id: str
    """Swarm name: DHT keys, matchmaking and W&B group. Peers with different run ids never meet."""
    home: Path
    """The peer's own folder: outbox, checkpoint, status, logs."""
    data_dir: Path
    """Prepared data (tokenizer + pages); shared by peers on one machine."""
    corpus_dir: Path | None = None
    """Offline corpus folder (default: $GRADSWARM_CORPUS or the repo's .cache/corpus)."""
    data: str | None = None
    """Sharded data set (manifest URL or path, ``peer join --data``); None = the built-in corpus."""
    device: str = "cpu"
    """``cpu`` or ``cuda[:i]``."""
    precision: str = "auto"
    """Inner steps' arithmetic: ``bf16`` (CUDA autocast to bfloat16; weights, gradients, optimizer state and
    Δ stay fp32), ``fp32``, or ``auto`` (bf16 on a GPU that supports it, fp32 on a CPU). On an H200 bf16
    steps of llama-125m/1b run several times faster than fp32 (benchmarks/RESULTS.md "GPU inner steps");
    use ``fp32`` only to rule out mixed precision when a GPU peer's loss diverges."""
    optimizer: str = "adamw"
    """Inner optimizer: ``adamw`` (torch) or ``adamw8bit`` (bitsandbytes; ¼ of the optimizer-state memory)."""
    compression: str = "8bit"
    """Wire compression of the all-reduce: ``8bit`` (blockwise, bitsandbytes), ``fp16``, ``none``, or
    ``topk``: sparse Δs with error feedback (``train.topk_*``; README "Sparse Δs"), also published sparse.
    Every peer of a swarm must use the same."""
    max_rounds: int | None = None
    """Stop after this many rounds (None: run until interrupted)."""
    max_seconds: float | None = None
    """Stop after this many seconds."""
    behaviour: Behaviour = Behaviour.HONEST
    """Fault injection (local ledger only): see peer.training.behaviour."""
    eval_pages: int = 4
    """Held-out pages evaluated after each round for the loss curve (0 = skip). Runs in the background
    thread on a second copy of the model (memory of one more model; CPU taken from training on a busy
    box): set 0 on small machines or large models."""
    probe_loss: bool = False
    """Evaluate one batch before and after the inner steps (``loss_before``/``loss_after`` in the
    manifest and log). Two extra forward passes on the training thread per round: off by default."""
    matchmaking_seconds: float = 1.5
    """Time peers spend forming the round's group. Raise it on slow networks ("could not find a group")."""
    join_wait_seconds: float = 5.0
    """How long a starting peer waits for the swarm's state announcements before starting alone."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    keep_rounds: int = 6
    """Rounds of contributions and states kept in the outbox."""
    publish_state: bool = True
    """Write θ_r to the outbox each round (validators fetch the base state from peers)."""
    matchmaking_lead_seconds: float = 0.5
    """Matchmaking starts this long plus ``matchmaking_seconds`` before the averaging point (not at the
    round's start: a peer looking for a group keeps its averager and DHT busy). Raise it if peers often
    average "alone" on a slow DHT."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.run_id):
            raise ConfigError(f"--run-id {self.run_id!r}: use 1-64 letters, digits, '_' or '-'")
        self.home = Path(self.home)
        self.data_dir = Path(self.data_dir)
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise ValueError(f"optimizer must be adamw or adamw8bit, got {self.optimizer!r}")
        if self.compression not in ("8bit", "fp16", "none", "topk"):
            raise ValueError(f"compression must be 8bit, fp16, none or topk, got {self.compression!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"--precision {self.precision!r}: use auto, bf16 or fp32")
        if self.precision == "bf16" and not self.device.startswith("cuda"):
            raise ConfigError("--precision bf16 needs a GPU (--device cuda); on a CPU use --precision fp32")

    @property
    def bf16(self) -> bool:
        """Whether inner steps run under bf16 autocast (``precision``, resolved for ``device``)."""
        return uses_bf16(self.precision, self.device)


@dataclass
class RoundReport:
    round: int
    inner_steps: int = 0
    samples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    loss_first: float | None = None
    loss_last: float | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    status: str = "skipped"
    group_size: int = 1
    averaging_seconds: float = 0.0
    bytes_sent: int = 0
    """All-reduce payload bytes this peer sent since the previous round's all-reduce returned. A part
    owner's last replies can still be on their way when its own all-reduce returns: their bytes count
    in its next round (with one part, e.g. ``debug``, an owner may show 0 for a round): sum over rounds
    for a rate."""
    bytes_received: int = 0
    state_hash: str = ""
    heldout_loss: float | None = None
    delta_norm: float | None = None
    """L2 norm of this round's Δ before the ``max_delta_norm`` bound."""
    delta_clipped: bool = False
    """The bound scaled Δ down (if this holds in most rounds, raise ``train.max_delta_norm``)."""
    synced_from_peer: bool = False
    peak_rss_mb: float = 0.0
    """Peak resident memory of this process plus its averager child, MiB."""
    rounds_mode: str = "blocking"
    """``overlapped`` or ``blocking`` (see the module docstring)."""
    state_round: int | None = None
    """The round whose start state ``state_hash`` is: the first θ that includes this round's average
    (r+1 in blocking rounds, r+2 in overlapped ones). None if the average could not be applied."""
    inner_seconds: float = 0.0
    """Wall time of the inner-step phase over which ``background_cpu`` was measured."""
    background_cpu: dict = field(default_factory=dict)
    """CPU seconds per non-training process (and the trainer's other threads) during the inner steps."""
    boundary_seconds: float = 0.0
    """Time the training thread spent between this round's last inner step and the next round's first
    (all-reduce wait in blocking rounds, outer step and hand-over in overlapped ones)."""


@dataclass
class InFlight:
    """Δ_r handed to the all-reduce, and what the round's report still needs once its average is in."""

    round: int
    pending: object  # peer.training.swarm.PendingAverage
    report: RoundReport
    pages: list[int]
    base_hash: str


class Trainer:
    """One peer. Build with :meth:`__init__`, then :meth:`run` (blocks until done or interrupted)."""

    def __init__(
        self,
        cfg: TrainerConfig,
        *,
        keypair,
        clock: RoundClock,
        dht,
        tracker: Tracker,
        progress: Progress | None = None,
        identity: dict | None = None,
        publisher=None,
        ranks=None,
        voters=None,
    ):
        """``voters``: whose state announcements count (:class:`peer.training.swarm.SwarmAveraging`)."""
        self.cfg = cfg
        self.keypair = keypair
        self.hotkey = keypair.ss58_address
        self.clock = clock
        self.dht = dht
        self.tracker = tracker
        self.progress = progress or Progress(self.hotkey[:8], enabled=False)
        self.identity = identity or {}
        self.publisher = publisher
        run = cfg.run
        self.overlapped = run.train.rounds == "overlapped"
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.store = open_page_store(cfg.data, cfg.data_dir, run.data, cfg.corpus_dir)
        self.ranks = ranks  # peer.training.ranks.PeerRanks of a multi-rank peer (None: one process)
        self.model = build_model(run, cfg.device if ranks is None else "cpu")
        self.state = self._make_state()
        self.topk = self._enable_topk()
        self.state_lock = threading.Lock()
        self._hash_lock = threading.Lock()
        self.round: int | None = None  # the round whose start state θ_r we hold
        self._hash_cache: dict[str, str] = {}  # "theta" / "momentum" → hash, until the state changes
        self.outbox = Outbox(cfg.home / "outbox", keep_rounds=cfg.keep_rounds)
        self.checkpoint_path = cfg.home / "checkpoint" / "state.safetensors"
        self._last_trained_delta: list[torch.Tensor] | None = None
        self._rounds_done = 0
        self._inflight: InFlight | None = None
        self._carry: list[torch.Tensor] | None = (
            None  # overlapped rounds: our own Δ whose average is in flight
        )
        self._off_majority: int | None = None  # a round whose θ we hold but the swarm's majority does not
        self._check_timer: threading.Timer | None = None
        self._eval_model = None
        self.writer = BackgroundWriter()
        self._load_checkpoint()
        from peer.training.swarm import SwarmAveraging

        self.swarm = SwarmAveraging(
            dht,
            run_id=cfg.run_id,
            keypair=keypair,
            shapes=[s.shape for s in self.state.snapshot],
            compression=cfg.compression,
            state_provider=self._provide_state,
            matchmaking_seconds=cfg.matchmaking_seconds,
            matchmaking_lead=cfg.matchmaking_lead_seconds,
            allreduce_timeout=run.train.averaging_timeout,
            max_part_norm=run.train.max_delta_norm,
            topk=self.topk,
            voters=voters,
        )
        self.peer_id = self.swarm.peer_id
        labels = {getattr(dht, "pid", None): "dht", getattr(self.swarm.averager, "pid", None): "averager"}
        if publisher is not None and getattr(publisher, "process", None) is not None:
            labels[publisher.process.pid] = "publisher"
        self.cpu = BackgroundCpu({k: v for k, v in labels.items() if k is not None})
        log.info(
            "peer %s hotkey %s: %s, %.2fM parameters, %s rounds",
            self.peer_id,
            self.hotkey,
            run.name,
            count_parameters(self.model) / 1e6,
            run.train.rounds,
        )
        lr, _ = run.train.outer_settings(sparse=cfg.compression == "topk")
        if self.overlapped and run.train.overlapped_start == "shared" and lr > 0.5:
            log.warning(
                "overlapped_start shared with an outer lr of %g: measured on debug, 4 peers, it trails the own "
                "start at 0.7 (1.117 x data parallelism) and oscillates at 1.0 (1.26); 0.5 gave 1.041 "
                "(train.overlapped_outer_lr in the model config)",
                lr,
            )

    def _make_state(self) -> DilocoState:
        """θ and the inner optimizer: on this process, or sharded over the peer's ranks (FSDP2)."""
        if self.ranks is None:
            return DilocoState(self.model, self.cfg.run.train, self.cfg.optimizer)
        from peer.training.fsdp import ShardedDilocoState

        return ShardedDilocoState(self.model, self.cfg.run.train, self.cfg.optimizer, ranks=self.ranks)

    def _inner_step(self, batch: torch.Tensor) -> float:
        """One inner step on ``batch`` (a sharded peer splits it over its ranks); the batch's mean loss."""
        if self.ranks is not None:
            return self.state.train_step(batch)
        loss = lm_loss(self.model, batch.to(self.cfg.device), bf16=self.cfg.bf16)
        self.state.inner_step(loss)
        return float(loss.detach())

    def _probe(self, batch: torch.Tensor) -> float:
        if self.ranks is not None:
            return self.state.eval_loss(batch)
        return evaluate_loss(self.model, [batch], self.cfg.device)

    def _enable_topk(self):
        """``--compression topk``: the swarm's top-k, and error feedback in the DiLoCo state (before the
        checkpoint is loaded: it holds the error-feedback buffer)."""
        if self.cfg.compression != "topk":
            return None
        from peer.training.sparse import TopK

        topk = TopK.from_train(self.cfg.run.train)
        self.state.enable_topk(topk, self.cfg.run.train.topk_ef_decay)
        return topk

    # ------------------------------------------------------------------------------------------------
    # state: hash, checkpoint, sharing

    def state_hash(self) -> str:
        """Hash of θ_r, computed once per change of the state (by whichever thread asks first)."""
        return self._cached_hash("theta", self.state.state_hash)

    def momentum_hash(self) -> str:
        """Hash of the outer momentum that goes with θ_r (announced with θ_r's hash, so that a peer
        downloading our state can check it), cached like :meth:`state_hash`."""
        return self._cached_hash("momentum", self.state.momentum_hash)

    def _cached_hash(self, name: str, compute) -> str:
        with self._hash_lock:
            if name not in self._hash_cache:
                self._hash_cache[name] = compute()
            return self._hash_cache[name]

    def _announce(self, r: int, state_hash: str) -> None:
        """Announce θ_r (and its momentum) to the swarm."""
        self.swarm.announce_state(r, state_hash, ttl=self._announce_ttl(), momentum_hash=self.momentum_hash())

    def _invalidate_hash(self) -> None:
        with self._hash_lock:
            self._hash_cache.clear()

    def _provide_state(self):
        """Called by the averager (in a background thread) when a peer downloads our state."""
        with self.state_lock:
            meta = {
                "round": -1 if self.round is None else self.round,
                "state_hash": self.state_hash(),
                "config": self.cfg.run.name,
            }
            return meta, [t.clone() for t in self.state.state_tensors()]

    def _load_checkpoint(self) -> None:
        if not self.checkpoint_path.exists():
            return
        tensors = load_checkpoint(self.checkpoint_path)
        meta_path = self.checkpoint_path.with_suffix(".json")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError):
            raise CheckpointError(
                f"{meta_path} is missing or corrupt; delete {self.checkpoint_path.parent} to start over"
            ) from None
        if meta.get("config") != self.cfg.run.name:
            raise CheckpointError(
                f"checkpoint in {self.checkpoint_path.parent} is for model config {meta.get('config')!r}, not {self.cfg.run.name!r}"
            )
        self.state.load_state_dict(tensors)
        if self.state.state_hash() != meta.get("state_hash"):
            raise CheckpointError(
                f"checkpoint {self.checkpoint_path} does not match its recorded hash (corrupt); delete it to resync"
            )
        self.round = int(meta["round"])
        self._invalidate_hash()
        log.info("resumed from checkpoint: round %d", self.round)

    def _save_checkpoint(self) -> None:
        """θ and momentum, streamed to a temp file and renamed (background thread)."""
        write_safetensors_streamed(self.checkpoint_path, self.state.state_dict())
        atomic_write_json(
            self.checkpoint_path.with_suffix(".json"),
            {"round": self.round, "state_hash": self.state_hash(), "config": self.cfg.run.name},
        )

    # ------------------------------------------------------------------------------------------------
    # the round's steps

    def sync_state(self, r: int, wait_seconds: float | None = None) -> bool:
        """Make sure we hold θ_r agreed by the swarm. Returns True if the state was downloaded.

        If we did not hold θ_r, wait up to ``wait_seconds`` (default ``join_wait_seconds``) for the
        swarm's announcements of θ_r while the swarm is known to exist (θ_{r−1} was announced)."""
        swarm = self.swarm
        best, averaging = swarm.view(r)
        if self.round != r:
            wait = self.cfg.join_wait_seconds if wait_seconds is None else wait_seconds
            deadline = time.time() + wait
            while best is None and averaging and time.time() < deadline:
                time.sleep(0.25)  # the swarm is still averaging round r-1: wait for θ_r's announcements
                best, averaging = swarm.view(r)
        downloaded = False
        if best is not None and best != self.state_hash():
            loaded = swarm.download_state(
                best, names=self.state.names, want_momentum=swarm.announced_momentum(r, best)
            )
            if loaded is None:
                self.progress.event(
                    f"round {r}: could not download the swarm's state {best[:10]}; continuing with ours"
                )
            else:
                _, tensors = loaded
                self.writer.wait_idle()  # background jobs may be reading θ
                with self.state_lock:
                    self.state.load_state_tensors(tensors)
                    self._invalidate_hash()
                downloaded = self.state_hash() == best  # checked before adoption: this is a safeguard
                self.progress.event(
                    f"round {r}: loaded the swarm's state {best[:10]} from a peer"
                    if downloaded
                    else f"round {r}: a downloaded state does not hash to {best[:10]}; the next round re-syncs"
                )
        with self.state_lock:
            self.round = r  # the hash depends on θ only: no need to recompute it here
        self._off_majority = None
        self._announce(r, self.state_hash())
        return downloaded

    def _announce_ttl(self) -> float:
        return 4 * self.cfg.run.train.round_seconds + 60

    def assigned_pages(self, r: int, seed: bytes) -> list[int]:
        k = self.cfg.run.data.pages_per_round
        if self.cfg.behaviour is Behaviour.RANDOM_DATA:
            own = set(assign_pages(self.hotkey, r, seed, self.store.train_pages, k))
            others = [p for p in self.store.train_pages if p not in own]
            return eval_pages(r, seed, others, k, purpose=f"random-data/{self.hotkey}")
        return assign_pages(self.hotkey, r, seed, self.store.train_pages, k)

    def training_pages(self, r: int, pages: list[int]) -> list[int]:
        """The pages the peer trains on in round ``r``: the pages it claims in its manifest (``pages``),
        plus held-out pages for ``heldout-train`` (which it does not claim)."""
        n = bh.heldout_pages_per_round(self.cfg.behaviour, len(pages))
        if n <= 0:
            return pages
        purpose = f"heldout-train/{self.hotkey}"
        return [*pages, *eval_pages(r, self.clock.seed(r), self.store.heldout_pages, n, purpose=purpose)]

    def train_inner(self, r: int, pages: list[int], stop_at: float, report: RoundReport) -> None:
        """Inner steps from the live parameters (set by ``state.begin_round``) until ``stop_at``.

        ``pages`` are the claimed (manifest) pages; :meth:`training_pages` may add unclaimed ones."""
        train = self.cfg.run.train
        batches = round_batches(
            self.store.samples(self.training_pages(r, pages)),
            train.batch_size,
            self.clock.seed(r) + self.hotkey.encode(),
        )
        probe = batches[0] if self.cfg.probe_loss else None
        self.cpu.start()
        if probe is not None:
            report.loss_before = self._probe(probe)
        if not bh.trains(self.cfg.behaviour, self._rounds_done):
            report.loss_after = report.loss_before
            wait = stop_at - time.time()
            if wait > 0:
                time.sleep(wait)  # a non-training behaviour idles through the round
            report.inner_seconds, report.background_cpu = self.cpu.stop()
            return
        self.model.train()
        t0 = time.time()
        i = 0
        last_losses: list[float] = []
        while time.time() < stop_at and report.inner_steps < train.max_inner_steps:
            batch = batches[i % len(batches)]
            i += 1
            value = self._inner_step(batch)
            report.inner_steps += 1
            report.samples += batch.shape[0]
            report.tokens += batch[:, 1:].numel()
            if report.loss_first is None:
                report.loss_first = value
            last_losses = (last_losses + [value])[-5:]
            elapsed = time.time() - t0
            self.progress.update(
                round_=r,
                step=report.inner_steps,
                loss=value,
                tok_s=report.tokens / max(elapsed, 1e-9),
                peers=report.group_size,
            )
        report.train_seconds = time.time() - t0
        report.loss_last = sum(last_losses) / len(last_losses) if last_losses else None
        if probe is not None:
            report.loss_after = self._probe(probe)
        report.inner_seconds, report.background_cpu = self.cpu.stop()
        wait = stop_at - time.time()
        if wait > 0:
            time.sleep(wait)  # reached max_inner_steps early: idle until the averaging point

    def publish_delta(
        self, r: int, delta: list[torch.Tensor], pages: list[int], report: RoundReport, base_hash: str
    ) -> None:
        named = dict(zip(self.state.names, delta, strict=True))
        from peer.net.layout import DELTA_FORMAT, SPARSE_DELTA_FORMAT

        if self.topk is not None:
            from peer.training.sparse import encode_sparse_delta

            blob = encode_sparse_delta(named, self.topk)  # the very Δ̂ that was averaged
            delta_format = SPARSE_DELTA_FORMAT
        else:
            blob, delta_format = encode_delta(named), DELTA_FORMAT
        manifest = ContributionManifest(
            run_id=self.cfg.run_id,
            round=r,
            hotkey=self.hotkey,
            peer_id=self.peer_id,
            base_state_hash=base_hash,
            data_fingerprint=self.store.fingerprint,
            model_config_name=self.cfg.run.name,
            pages=pages,
            samples=report.samples,
            tokens=report.tokens,
            inner_steps=report.inner_steps,
            loss_before=report.loss_before,
            loss_after=report.loss_after,
            blob=BlobRef(name="contribution.safetensors", sha256=sha256_hex(blob), size=len(blob)),
            behaviour=self.cfg.behaviour.value,
            delta_format=delta_format,
        ).signed(self.keypair)
        self.outbox.write_contribution(r, blob, json.loads(manifest.model_dump_json()))

    def publish_state(self) -> None:
        """θ_r to the outbox, streamed (background thread; the training thread does not touch θ meanwhile)."""
        r = self.round
        state_hash = self.state_hash()
        named = dict(zip(self.state.names, self.state.snapshot, strict=True))

        def manifest(digest: str, size: int) -> dict:
            signed = StateManifest(
                run_id=self.cfg.run_id,
                round=r,
                hotkey=self.hotkey,
                peer_id=self.peer_id,
                state_hash=state_hash,
                model_config_name=self.cfg.run.name,
                blob=BlobRef(name="state.safetensors", sha256=digest, size=size),
            ).signed(self.keypair)
            return json.loads(signed.model_dump_json())

        self.outbox.write_state_tensors(r, named, {"round": str(r), "state_hash": state_hash}, manifest)

    def _apply_average(self, outcome, averaged: list[torch.Tensor], keep_step: bool = False) -> bool:
        """θ ← OuterStep(θ, ḡ) if the all-reduce succeeded (or we were alone); θ unchanged if it failed.
        True if θ took the step (``keep_step``: the step is then ``state.last_step``)."""
        if outcome.status in ("averaged", "alone"):
            self.state.outer_step(averaged, keep_step=keep_step)
            return True
        self.state.discard_local()
        return False

    def _fill_averaging(self, report: RoundReport, outcome) -> None:
        report.status = outcome.status
        report.group_size = outcome.group_size
        report.averaging_seconds = outcome.seconds
        report.bytes_sent = outcome.bytes_sent
        report.bytes_received = outcome.bytes_received
        if outcome.error and outcome.status == "failed":
            self.progress.event(f"round {report.round}: averaging failed ({outcome.error}); not applied")

    def _heldout_loss(self) -> float | None:
        """Held-out loss of θ (the agreed state, not the live parameters), on a second model copy."""
        if self.cfg.eval_pages <= 0:
            return None
        if self._eval_model is None:
            self._eval_model = build_model(self.cfg.run, self.cfg.device)
        with torch.no_grad():
            for p, s in zip(self._eval_model.parameters(), self.state.snapshot, strict=True):
                p.copy_(s.to(p.device, p.dtype))
        pages = eval_pages(0, b"heldout-curve", self.store.heldout_pages, self.cfg.eval_pages)  # fixed curve
        return evaluate_loss(self._eval_model, self.store.batches(pages, 32), self.cfg.device)

    def _after_state_change(self, report: RoundReport | None) -> None:
        """Background job after θ changed (or was first taken up): hash, announce, publish, held-out loss,
        checkpoint, prune, then write ``report`` (the round whose average this θ is the first to include)."""
        state_hash = self.state_hash()
        r = self.round
        self._announce(r, state_hash)  # first: others may wait for it
        if self.cfg.publish_state and r not in self.outbox.rounds("state"):
            # θ_r: the state validators evaluate round r's Δs on (blocking) or round r−1's (overlapped: they
            # fetch it right after the boundary, so it goes out before the held-out loss and checkpoint)
            self.publish_state()
        if report is not None:
            report.state_hash = state_hash
            report.state_round = r
            report.heldout_loss = self._heldout_loss()
        self._save_checkpoint()
        self.outbox.prune()
        if report is not None:
            self._record(report)
        if self.overlapped:
            self._arm_majority_check(r, state_hash)

    def _arm_majority_check(self, r: int, state_hash: str) -> None:
        """Halfway through round r (when every peer has announced θ_r), compare ours with the majority;
        a peer off the majority does not apply the next outer step and resyncs at the next round."""
        if self._check_timer is not None:
            self._check_timer.cancel()
        delay = self.clock.round_end(r) - self.cfg.run.train.round_seconds / 2 - time.time()
        self._check_timer = threading.Timer(max(0.0, delay), self._check_majority, (r, state_hash))
        self._check_timer.daemon = True
        self._check_timer.start()

    def _check_majority(self, r: int, state_hash: str) -> None:
        """Set ``_off_majority`` to r if the swarm's announced θ_r is not ours (unknown: left as it is)."""
        from peer.errors import NetworkError

        try:
            best = self.swarm.majority_state(r)
        except (NetworkError, TimeoutError, RuntimeError) as e:
            log.info("state check of round %d skipped: %s", r, e)
            return
        if best is not None and best != state_hash:
            self._off_majority = r
            self.progress.event(f"round {r}: the swarm holds θ {best[:10]}, we hold {state_hash[:10]}")
            if self.swarm.rebase(r, best):  # average Δ_r with the majority: we hold its θ_{r+1} by then
                self.progress.event(f"round {r}: averaging in the group of θ {best[:10]}")

    # ------------------------------------------------------------------------------------------------
    # rounds

    def _schedule_averaging(self, r: int, start_at: float) -> None:
        weight = bh.averaging_input(self.cfg.behaviour, [torch.zeros(1)])[1]
        base = self.state_hash()
        self.swarm.schedule(
            r,
            start_at=start_at,
            base=base,
            gather={"round": r, "base": base, "hotkey": self.hotkey},
            weight=weight,
            give_up_at=start_at + min(self.cfg.matchmaking_seconds, self.cfg.run.train.round_seconds / 4),
        )

    def _take_delta(self, r: int, pages: list[int], report: RoundReport) -> tuple[list, list]:
        """Δ_r (norm-bounded) and what goes into the all-reduce; publishes Δ_r in the background."""
        train = self.cfg.run.train
        delta = self.state.pseudo_gradient()
        report.delta_norm = self.state.last_delta_norm
        report.delta_clipped = report.delta_norm > train.max_delta_norm
        if bh.trains(self.cfg.behaviour, self._rounds_done):
            self._last_trained_delta = delta
        published = bh.published_delta(self.cfg.behaviour, delta, self._last_trained_delta, self._rounds_done)
        if published is not None:
            self.writer.submit(self.publish_delta, r, published, pages, report, self.state_hash())
        tensors, _ = bh.averaging_input(self.cfg.behaviour, delta)
        return delta, tensors

    def run_round(self, r: int) -> RoundReport:
        """One blocking round: train until the averaging point, all-reduce Δ_r, θ_{r+1} = OuterStep(θ_r, ḡ_r)."""
        train = self.cfg.run.train
        report = RoundReport(round=r, rounds_mode="blocking")
        stop_at = self.clock.round_end(r) - train.averaging_reserve_seconds
        report.synced_from_peer = self.sync_state(r)
        self.writer.submit(self._publish_state_if_missing)
        pages = self.assigned_pages(r, self.clock.seed(r))
        self._schedule_averaging(r, stop_at)
        self.state.begin_round()
        self.train_inner(r, pages, stop_at, report)
        t0 = time.time()
        delta, tensors = self._take_delta(r, pages, report)
        base_hash = self.state_hash()
        outcome, averaged = self.swarm.run(tensors)
        self._fill_averaging(report, outcome)
        if self.cfg.behaviour is Behaviour.COPYCAT and report.status == "averaged":
            self.writer.submit(self.publish_delta, r, averaged, pages, report, base_hash)
        self.writer.wait_idle()  # nothing in the background reads θ_r any more
        with self.state_lock:
            self._apply_average(outcome, averaged)
            self.round = r + 1
            self._invalidate_hash()
        self._rounds_done += 1
        report.boundary_seconds = time.time() - t0
        self.writer.submit(self._after_state_change, report)
        return report

    def _publish_state_if_missing(self) -> None:
        if self.cfg.publish_state and self.round not in self.outbox.rounds("state"):
            self.publish_state()

    def run_round_overlapped(self, r: int) -> RoundReport:
        """One overlapped round (module docstring): train round r to its end, then at the boundary apply
        ḡ_{r−1} (its all-reduce ran during round r), hand Δ_r to the all-reduce and go on training."""
        report = RoundReport(round=r, rounds_mode="overlapped")
        if self.round != r or self._off_majority == r:
            # after a round we trained but whose predecessor we did not average (we joined), peers that
            # did announce θ_r right after their boundary: a short wait; a swarm that just started has
            # nobody to wait for (θ_r = θ_{r−1}), and the mid-round check catches a late announcement
            short = self.round == r - 1 and self._rounds_done > 0
            wait = min(self.cfg.join_wait_seconds, 2.0) if short else None
            report.synced_from_peer = self.sync_state(r, wait_seconds=wait)
            self.writer.submit(self._after_state_change, None)
        shared = self.cfg.run.train.overlapped_start == "shared"
        in_step = self._inflight is not None and self._inflight.round == r - 1
        carry = self._carry if in_step else None  # c_r = Δ_{r−1}, whose average is still in flight
        if report.synced_from_peer and shared:
            carry = None  # our last outer step was taken on a θ the swarm did not hold: start from θ_r
        pages = self.assigned_pages(r, self.clock.seed(r))
        end = self.clock.round_end(r)
        self._schedule_averaging(r, end)
        self.state.begin_round(carry)
        self.train_inner(r, pages, end, report)
        t0 = time.time()
        self.writer.wait_idle()  # nothing in the background reads θ_r any more (normally long done)
        delta, tensors = self._take_delta(r, pages, report)  # publishing Δ_r runs in the background
        base_hash = self.state_hash()
        previous, self._inflight = self._inflight, None
        if previous is not None:
            outcome, averaged = previous.pending.result()  # normally finished long ago
            self._fill_averaging(previous.report, outcome)
        applied = (
            previous is not None and previous.round == r - 1 and self.round == r and self._off_majority != r
        )
        stepped = False
        with self.state_lock:
            if applied:
                stepped = self._apply_average(outcome, averaged, keep_step=shared)
                self.round = r + 1
                self._invalidate_hash()
        self._inflight = InFlight(
            round=r, pending=self.swarm.start(tensors), report=report, pages=pages, base_hash=base_hash
        )
        if shared:  # x_{r+1} = θ_{r+1} − (θ_r − θ_{r+1}): the swarm's last step once more, the same for all
            self._carry = self.state.last_step if stepped else None
        else:  # x_{r+1} = θ_{r+1} − Δ_r: the peer's own progress stands in for ḡ_r
            self._carry = delta if bh.trains(self.cfg.behaviour, self._rounds_done) else None
        self.state.begin_round(self._carry)  # the next round trains on at once
        self._rounds_done += 1
        report.boundary_seconds = time.time() - t0
        if previous is not None:
            self._finish_previous(previous, outcome, averaged, applied)
        return report

    def _finish_previous(self, previous: InFlight, outcome, averaged, applied: bool) -> None:
        if self.cfg.behaviour is Behaviour.COPYCAT and outcome.status == "averaged":
            rep = previous.report
            self.writer.submit(
                self.publish_delta, previous.round, averaged, previous.pages, rep, previous.base_hash
            )
        if applied:
            self.writer.submit(self._after_state_change, previous.report)
        else:
            previous.report.status = "unapplied"  # we did not hold the θ it applies to: resync next round
            self.writer.submit(self._record, previous.report)

    def drain(self) -> None:
        """Overlapped rounds: wait for the last all-reduce and apply it (the peer stops holding the first θ
        that includes its last round, like a blocking peer)."""
        previous, self._inflight = self._inflight, None
        if previous is None:
            return
        outcome, averaged = previous.pending.result()
        self._fill_averaging(previous.report, outcome)
        self.writer.wait_idle()
        if self.round == previous.round and self._off_majority != previous.round:
            # we stop after our first round: no average of the round before it reached us, so (as the
            # next round's sync would when nobody announced θ_{r+1}) take θ_{r+1} = θ_r
            self.round = previous.round + 1
        if self._check_timer is not None:
            self._check_timer.cancel()
        if self.round == previous.round + 1 and self._off_majority != self.round:
            # the mid-round check of θ_{r+1} that guards every other boundary has not run yet: run it
            # now, or a peer whose θ_{r+1} parted from the swarm's (its all-reduce of round r−1 failed
            # or ran alone) applies ḡ_r to it and records a state no one else holds as `averaged`
            self._check_majority(self.round, self.state_hash())
        applied = self.round == previous.round + 1 and self._off_majority != previous.round + 1
        with self.state_lock:
            if applied:
                self._apply_average(outcome, averaged)
                self.round = previous.round + 2
                self._invalidate_hash()
        self._finish_previous(previous, outcome, averaged, applied)
        self.writer.wait_idle()

    def _record(self, rep: RoundReport) -> None:
        rep.peak_rss_mb = peak_rss_mb()
        tok_s = rep.tokens / rep.train_seconds if rep.train_seconds else 0.0
        background = sum(rep.background_cpu.values()) / rep.inner_seconds if rep.inner_seconds else None
        metrics = {
            "round": rep.round,
            "inner_steps": rep.inner_steps,
            "tokens": rep.tokens,
            "tokens_per_s": tok_s,
            "train/loss_first": rep.loss_first,
            "train/loss_last": rep.loss_last,
            "train/loss_before": rep.loss_before,
            "train/loss_after": rep.loss_after,
            "heldout_loss": rep.heldout_loss,
            "delta_norm": rep.delta_norm,
            "delta_clipped": rep.delta_clipped,
            "peers_in_group": rep.group_size,
            "averaging/seconds": rep.averaging_seconds,
            "averaging/bytes_sent": rep.bytes_sent,
            "averaging/bytes_received": rep.bytes_received,
            "averaging/ok": rep.status == "averaged",
            "background_cpu_cores": background,
            "boundary_seconds": rep.boundary_seconds,
            "inner_optimizer_state_bytes": optimizer_state_bytes(self.state.inner),
        }
        self.tracker.log({k: v for k, v in metrics.items() if v is not None}, step=rep.round)
        held = f"{rep.heldout_loss:.3f}" if rep.heldout_loss is not None else "-"
        self.progress.event(
            f"round {rep.round}: {rep.status} (group {rep.group_size}, {rep.averaging_seconds:.1f}s, "
            f"{rep.bytes_sent / 1e6:.2f} MB out) · {rep.inner_steps} steps · {tok_s:,.0f} tok/s · "
            f"held-out loss {held} · state {rep.state_hash[:10]}"
        )
        status = {
            "hotkey": self.hotkey,
            "peer_id": self.peer_id,
            "run_id": self.cfg.run_id,
            "behaviour": self.cfg.behaviour.value,
            "pid": os.getpid(),
            "updated": time.time(),
            "last_round": rep.__dict__,
            "state_round": self.round,
            **self.identity,
        }
        atomic_write_json(self.cfg.home / "status.json", status)
        with open(self.cfg.home / "rounds.jsonl", "a") as fh:
            fh.write(json.dumps(rep.__dict__) + "\n")

    def run(self) -> None:
        start = time.time()
        rounds = 0
        step = self.run_round_overlapped if self.overlapped else self.run_round
        lead = self.cfg.matchmaking_seconds + self.cfg.matchmaking_lead_seconds
        last: int | None = None
        try:
            while True:
                if self.cfg.max_rounds is not None and rounds >= self.cfg.max_rounds:
                    break
                if self.cfg.max_seconds is not None and time.time() - start >= self.cfg.max_seconds:
                    break
                r = self.clock.current_round()
                if last is not None and r <= last:
                    time.sleep(0.2)  # a chain clock's round can end (estimate) before its next block
                    continue
                reserve = 0.0 if self.overlapped else self.cfg.run.train.averaging_reserve_seconds
                if time.time() > self.clock.round_end(r) - reserve - lead and self._inflight is None:
                    time.sleep(max(0.0, self.clock.round_end(r) - time.time()) + 0.01)
                    continue  # too late to take part in this round; start with the next one
                step(r)
                last = r
                rounds += 1
            self.drain()
            self.writer.wait_idle()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        if self._check_timer is not None:
            self._check_timer.cancel()
        self.writer.close()
        self.progress.close()
        self.swarm.shutdown()
        self.tracker.finish()
