"""The trainer: one peer's round loop (DiLoCo over hivemind), as a recipe of named steps.

Per round r (the clock says which round it is and when it ends)::

    sync_state      agree on θ_r with the swarm (announce our hash; download the majority's if ours differs)
    train_inner     inner AdamW steps on the pages assigned to (hotkey, r, seed_r) until the round's
                    averaging point (round end − reserve) or max_inner_steps
    publish_delta   Δ_r = θ_r − θ_local → outbox (8-bit safetensors + hotkey-signed manifest)
    average         all-reduce Δ_r with the peers of round r (consensus all-reduce: identical results)
    outer_step      Nesterov SGD → θ_{r+1}; checkpoint; publish θ_{r+1} to the outbox; log

A failed all-reduce (a peer died mid-way) discards the round's progress (θ_{r+1} = θ_r) rather than
applying a partial average; the next ``sync_state`` reconciles with the majority.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from peer.config import RunConfig
from peer.data.model import build_model, count_parameters, evaluate_loss, lm_loss
from peer.data.pages import assign_pages, eval_pages, round_batches
from peer.data.shards import open_page_store
from peer.errors import CheckpointError, ConfigError
from peer.net.outbox import (
    Outbox,
    atomic_write_bytes,
    atomic_write_json,
    encode_delta,
    encode_state,
    load_checkpoint,
    sha256_hex,
)
from peer.net.records import BlobRef, ContributionManifest, StateManifest
from peer.progress import Progress
from peer.tracking import Tracker
from peer.training import behaviour as bh
from peer.training.behaviour import Behaviour
from peer.training.clock import RoundClock
from peer.training.diloco import DilocoState, optimizer_state_bytes

log = logging.getLogger("gradswarm.trainer")


def peak_rss_mb() -> float:
    """Peak RSS of this process plus the unique memory (USS) of its children (the averager), MiB."""
    import resource

    import psutil

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = 0.0
    for child in psutil.Process().children(recursive=False):
        try:
            children += child.memory_full_info().uss / 2**20  # unique: the fork shares pages
        except psutil.Error:
            pass
    return own + children


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
    optimizer: str = "adamw"
    """Inner optimizer: ``adamw`` (torch) or ``adamw8bit`` (bitsandbytes; ¼ of the optimizer-state memory)."""
    compression: str = "8bit"
    """Wire compression of the all-reduce: ``8bit`` (blockwise, bitsandbytes), ``fp16`` or ``none``."""
    max_rounds: int | None = None
    """Stop after this many rounds (None: run until interrupted)."""
    max_seconds: float | None = None
    """Stop after this many seconds."""
    behaviour: Behaviour = Behaviour.HONEST
    """Fault injection (local ledger only): see peer.training.behaviour."""
    eval_pages: int = 4
    """Held-out pages evaluated after each round for the loss curve (0 = skip). Costs forward passes."""
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

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.run_id):
            raise ConfigError(f"--run-id {self.run_id!r}: use 1-64 letters, digits, '_' or '-'")
        self.home = Path(self.home)
        self.data_dir = Path(self.data_dir)
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise ValueError(f"optimizer must be adamw or adamw8bit, got {self.optimizer!r}")
        if self.compression not in ("8bit", "fp16", "none"):
            raise ValueError(f"compression must be 8bit, fp16 or none, got {self.compression!r}")


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
    ):
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
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.store = open_page_store(cfg.data, cfg.data_dir, run.data, cfg.corpus_dir)
        self.model = build_model(run, cfg.device)
        self.state = DilocoState(self.model, run.train, cfg.optimizer)
        self.state_lock = threading.Lock()
        self.round: int | None = None  # the round whose start state θ_r we hold
        self._hash_cache: str | None = None
        self.outbox = Outbox(cfg.home / "outbox", keep_rounds=cfg.keep_rounds)
        self.checkpoint_path = cfg.home / "checkpoint" / "state.safetensors"
        self._last_trained_delta: list[torch.Tensor] | None = None
        self._rounds_done = 0
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
            allreduce_timeout=run.train.averaging_timeout,
            max_part_norm=run.train.max_delta_norm,
        )
        self.peer_id = self.swarm.peer_id
        log.info(
            "peer %s hotkey %s: %s, %.2fM parameters",
            self.peer_id,
            self.hotkey,
            run.name,
            count_parameters(self.model) / 1e6,
        )

    # ------------------------------------------------------------------------------------------------
    # state: hash, checkpoint, sharing

    def state_hash(self) -> str:
        """Hash of θ_r, computed once per change of the state."""
        if self._hash_cache is None:
            self._hash_cache = self.state.state_hash()
        return self._hash_cache

    def _invalidate_hash(self) -> None:
        self._hash_cache = None

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
        blob = encode_state(self.state.state_dict())
        atomic_write_bytes(self.checkpoint_path, blob)
        atomic_write_json(
            self.checkpoint_path.with_suffix(".json"),
            {"round": self.round, "state_hash": self.state_hash(), "config": self.cfg.run.name},
        )

    # ------------------------------------------------------------------------------------------------
    # the round's steps

    def sync_state(self, r: int) -> bool:
        """Make sure we hold θ_r agreed by the swarm. Returns True if the state was downloaded."""
        swarm = self.swarm
        best = swarm.majority_state(r)
        if self.round != r:
            deadline = time.time() + self.cfg.join_wait_seconds
            while best is None and time.time() < deadline and swarm.majority_state(r - 1) is not None:
                time.sleep(0.25)  # the swarm is still averaging round r-1: wait for θ_r's announcements
                best = swarm.majority_state(r)
        downloaded = False
        if best is not None and best != self.state_hash():
            loaded = swarm.download_state(best)
            if loaded is None:
                self.progress.event(
                    f"round {r}: could not download the swarm's state {best[:10]}; continuing with ours"
                )
            else:
                _, tensors = loaded
                with self.state_lock:
                    self.state.load_state_tensors(tensors)
                    self._invalidate_hash()
                downloaded = self.state_hash() == best
                if not downloaded:
                    raise CheckpointError("downloaded state does not match its announced hash")
                self.progress.event(f"round {r}: loaded the swarm's state {best[:10]} from a peer")
        with self.state_lock:
            self.round = r  # the hash depends on θ only: no need to recompute it here
        swarm.announce_state(r, self.state_hash(), ttl=4 * self.cfg.run.train.round_seconds + 60)
        return downloaded

    def assigned_pages(self, r: int, seed: bytes) -> list[int]:
        k = self.cfg.run.data.pages_per_round
        if self.cfg.behaviour is Behaviour.RANDOM_DATA:
            own = set(assign_pages(self.hotkey, r, seed, self.store.train_pages, k))
            others = [p for p in self.store.train_pages if p not in own]
            return eval_pages(r, seed, others, k, purpose=f"random-data/{self.hotkey}")
        return assign_pages(self.hotkey, r, seed, self.store.train_pages, k)

    def train_inner(self, r: int, pages: list[int], stop_at: float, report: RoundReport) -> None:
        train = self.cfg.run.train
        batches = round_batches(
            self.store.samples(pages), train.batch_size, self.clock.seed(r) + self.hotkey.encode()
        )
        probe = batches[0].to(self.cfg.device)
        self.state.begin_round()
        report.loss_before = evaluate_loss(self.model, [probe], self.cfg.device)
        if not bh.trains(self.cfg.behaviour, self._rounds_done):
            report.loss_after = report.loss_before
            return
        self.model.train()
        t0 = time.time()
        i = 0
        last_losses: list[float] = []
        while time.time() < stop_at and report.inner_steps < train.max_inner_steps:
            batch = batches[i % len(batches)].to(self.cfg.device)
            i += 1
            loss = lm_loss(self.model, batch)
            self.state.inner_step(loss)
            value = float(loss.detach())
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
        report.loss_after = evaluate_loss(self.model, [probe], self.cfg.device)

    def publish_delta(self, r: int, delta: list[torch.Tensor], pages: list[int], report: RoundReport) -> None:
        named = dict(zip(self.state.names, delta, strict=True))
        blob = encode_delta(named)
        manifest = ContributionManifest(
            run_id=self.cfg.run_id,
            round=r,
            hotkey=self.hotkey,
            peer_id=self.peer_id,
            base_state_hash=self.state_hash(),
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
        ).signed(self.keypair)
        self.outbox.write_contribution(r, blob, json.loads(manifest.model_dump_json()))

    def publish_state(self) -> None:
        r = self.round
        named = dict(zip(self.state.names, self.state.snapshot, strict=True))
        blob = encode_state(named, metadata={"round": str(r), "state_hash": self.state_hash()})
        manifest = StateManifest(
            run_id=self.cfg.run_id,
            round=r,
            hotkey=self.hotkey,
            peer_id=self.peer_id,
            state_hash=self.state_hash(),
            model_config_name=self.cfg.run.name,
            blob=BlobRef(name="state.safetensors", sha256=sha256_hex(blob), size=len(blob)),
        ).signed(self.keypair)
        self.outbox.write_state(r, blob, json.loads(manifest.model_dump_json()))

    def average(self, r: int, delta: list[torch.Tensor], report: RoundReport) -> list[torch.Tensor]:
        tensors, _ = bh.averaging_input(self.cfg.behaviour, delta)
        outcome, averaged = self.swarm.run(tensors)
        report.status = outcome.status
        report.group_size = outcome.group_size
        report.averaging_seconds = outcome.seconds
        report.bytes_sent = outcome.bytes_sent
        report.bytes_received = outcome.bytes_received
        if outcome.error and outcome.status == "failed":
            self.progress.event(f"round {r}: averaging failed ({outcome.error}); round discarded")
        return averaged

    def outer_step(self, averaged: list[torch.Tensor], report: RoundReport) -> None:
        with self.state_lock:
            if report.status in ("averaged", "alone"):
                self.state.outer_step(averaged)
            else:
                self.state.discard_local()
            self.round = report.round + 1
            self._invalidate_hash()
        report.state_hash = self.state_hash()

    def evaluate_heldout(self) -> float | None:
        if self.cfg.eval_pages <= 0:
            return None
        pages = eval_pages(
            0, b"heldout-curve", self.store.heldout_pages, self.cfg.eval_pages
        )  # fixed: a comparable curve
        return evaluate_loss(self.model, self.store.batches(pages, 32), self.cfg.device)

    # ------------------------------------------------------------------------------------------------

    def run_round(self, r: int) -> RoundReport:
        train = self.cfg.run.train
        report = RoundReport(round=r)
        stop_at = self.clock.round_end(r) - train.averaging_reserve_seconds
        report.synced_from_peer = self.sync_state(r)
        if self.cfg.publish_state and r not in self.outbox.rounds("state"):
            self.publish_state()  # θ_r: the base validators apply this round's contributions to
        seed = self.clock.seed(r)
        pages = self.assigned_pages(r, seed)
        weight = bh.averaging_input(self.cfg.behaviour, [torch.zeros(1)])[1]
        self.swarm.schedule(
            r,
            start_at=stop_at,
            gather={"round": r, "base": self.state_hash(), "hotkey": self.hotkey},
            weight=weight,
            give_up_at=self.clock.round_end(r) - 0.1,
        )
        self.train_inner(r, pages, stop_at, report)
        delta = self.state.pseudo_gradient()
        report.delta_norm = self.state.last_delta_norm
        report.delta_clipped = report.delta_norm > train.max_delta_norm
        if bh.trains(self.cfg.behaviour, self._rounds_done):
            self._last_trained_delta = delta
        published = bh.published_delta(self.cfg.behaviour, delta, self._last_trained_delta, self._rounds_done)
        if published is not None:
            self.publish_delta(r, published, pages, report)
        averaged = self.average(r, delta, report)
        if self.cfg.behaviour is Behaviour.COPYCAT and report.status == "averaged":
            self.publish_delta(r, averaged, pages, report)
        self.outer_step(averaged, report)
        report.heldout_loss = self.evaluate_heldout()
        self._save_checkpoint()
        if self.cfg.publish_state:
            self.publish_state()
        self.outbox.prune()
        self.swarm.announce_state(self.round, self.state_hash(), ttl=4 * train.round_seconds + 60)
        self._rounds_done += 1
        report.peak_rss_mb = peak_rss_mb()
        self._record(report)
        return report

    def _record(self, rep: RoundReport) -> None:
        tok_s = rep.tokens / rep.train_seconds if rep.train_seconds else 0.0
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
        try:
            while True:
                if self.cfg.max_rounds is not None and rounds >= self.cfg.max_rounds:
                    break
                if self.cfg.max_seconds is not None and time.time() - start >= self.cfg.max_seconds:
                    break
                r = self.clock.current_round()
                stop_at = self.clock.round_end(r) - self.cfg.run.train.averaging_reserve_seconds
                if time.time() > stop_at - self.cfg.matchmaking_seconds:
                    time.sleep(max(0.0, self.clock.round_end(r) - time.time()) + 0.01)
                    continue  # too late to take part in this round; start with the next one
                self.run_round(r)
                rounds += 1
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.progress.close()
        self.swarm.shutdown()
        self.tracker.finish()
