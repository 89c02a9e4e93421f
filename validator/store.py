"""The validator's state directory: everything needed to resume, and to replay any kept round.

Layout (``--state-dir``, by default ``~/.gradswarm/<run id>/validator-<wallet>-<hotkey>``)::

    ema.json                         EMA of every uid (ema.EmaState), written after each round
    in_progress.json                 the round being evaluated (a restart finishes it first)
    weights_queue.json               weights not yet on chain, and intervals done (validator.weights)
    blobs/<sha256>.safetensors       fetched base states and contributions, content-addressed
    rounds/<r>/record.json           the round: seed, base, every candidate's signed manifest or why it
                                     was rejected, configs, measurements, scores, EMA, weights
    rounds/<r>/sketches.safetensors  the round's Δ sketches (copy detection in later rounds; its plan in the metadata)
    sketch_key                       the secret that picks the sketches' coordinates (keep it with the rest)

Every file is written to a temp name and renamed. Old rounds (and blobs no kept round references) are
pruned after ``keep_rounds``. Nothing is pickled: JSON and safetensors only.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save

from peer.errors import CheckpointError, UserError
from peer.net.outbox import atomic_write_bytes, atomic_write_json
from validator.ema import EmaState
from validator.sketches import PUBLIC_SKETCH

RECORD_FORMAT = 1
SKETCH_KEY = "sketch_key"
"""The validator's secret for its sketch positions (64 hex characters, mode 0600)."""


class ReplayError(UserError):
    """A round cannot be replayed: not recorded here, or its artifacts were pruned."""


@dataclass(kw_only=True)
class CandidateRecord:
    uid: int
    hotkey: str
    blob_sha256: str | None = None
    manifest: dict | None = None
    """The signed ContributionManifest as fetched (verifiable by anyone)."""
    rejected: str | None = None
    """Why it has nothing scored, as published in the validator's explanation."""
    fetch_detail: str | None = None
    """A transport failure's full line (the address's OS error, …), kept here and in the log only: the
    public reason carries just its code (validator.fetching.TRANSPORT_REASONS)."""


@dataclass(kw_only=True)
class RoundRecord:
    format: int = RECORD_FORMAT
    run_id: str
    config_name: str
    netuid: int | None
    round: int
    seed_hex: str
    base_sha256: str
    base_state_hash: str
    base_sources: list[str] = field(default_factory=list)
    """Hotkeys whose signed state manifests named the evaluated state."""
    state_round: int | None = None
    """The round whose state the Δs were evaluated on (``base_state_hash``): ``round`` in blocking swarms,
    ``round + 1`` in overlapped ones (None: a record from before this field, blocking)."""
    trained_from_state_hash: str | None = None
    """θ_r's hash, the base every accepted manifest named (differs from ``base_state_hash`` when
    overlapped)."""
    candidates: list[CandidateRecord] = field(default_factory=list)
    sketch_rounds: list[int] = field(default_factory=list)
    """Earlier rounds whose sketches were compared with this round's Δs."""
    sketch_plan: str = PUBLIC_SKETCH
    """Which coordinates the sketches read: ``keyed-<fingerprint>`` (the validator's ``sketch_key``) or
    ``strided`` (public; records from before keyed sketches)."""
    eval_config: dict = field(default_factory=dict)
    scoring_config: dict = field(default_factory=dict)
    measurements: dict = field(default_factory=dict)
    scores: list[dict] = field(default_factory=list)
    ema_before: dict = field(default_factory=dict)
    ema_after: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    sampling: dict = field(default_factory=dict)
    """The round's sample (validator.sampling): key, limits, priority order, selected uids, and every
    not-sampled uid with its reason (their EMA was left as it was)."""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> RoundRecord:
        d = dict(d)
        if d.get("format") != RECORD_FORMAT:
            raise ReplayError(f"round record format {d.get('format')!r} is not {RECORD_FORMAT}")
        d["candidates"] = [CandidateRecord(**c) for c in d["candidates"]]
        return cls(**d)


class ValidatorStore:
    def __init__(self, root: Path, keep_rounds: int = 16):
        self.root = Path(root)
        self.keep_rounds = keep_rounds
        self.blobs = self.root / "blobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.blobs.mkdir(exist_ok=True)

    # ---- EMA
    def load_ema(self) -> EmaState:
        path = self.root / "ema.json"
        if not path.exists():
            return EmaState()
        try:
            return EmaState.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{path} is unreadable ({e}); move it away to start the EMA from zero"
            ) from None

    def save_ema(self, ema: EmaState) -> None:
        atomic_write_json(self.root / "ema.json", ema.to_json())

    def reconcile_ema(self) -> None:
        """After a crash between writing a round's record and the EMA: take the EMA from the record."""
        rounds = self.rounds()
        if not rounds:
            return
        ema = self.load_ema()
        if ema.last_round is None or ema.last_round < rounds[-1]:
            self.save_ema(EmaState.from_json(self.load_round(rounds[-1]).ema_after))

    # ---- a round in progress (resumed after a restart)
    def mark_started(self, round_: int) -> None:
        atomic_write_json(self.root / "in_progress.json", {"round": round_})

    def started(self) -> int | None:
        """The round being evaluated when the validator stopped (None if it finished its last one)."""
        path = self.root / "in_progress.json"
        try:
            r = json.loads(path.read_text())["round"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # a torn marker only costs the resume
        return r if isinstance(r, int) and r not in self.rounds() else None

    def clear_started(self, round_: int) -> None:
        path = self.root / "in_progress.json"
        if self.started() in (round_, None):
            path.unlink(missing_ok=True)

    # ---- blobs
    def blob_path(self, sha256: str) -> Path:
        return self.blobs / f"{sha256}.safetensors"

    def put_blob(self, sha256: str, data: bytes) -> Path:
        path = self.blob_path(sha256)
        if not path.exists():
            atomic_write_bytes(path, data)
        return path

    def read_blob(self, sha256: str) -> bytes:
        path = self.blob_path(sha256)
        if not path.exists():
            raise ReplayError(f"blob {sha256[:12]}… is not in {self.blobs} (pruned?)")
        return path.read_bytes()

    # ---- rounds
    def round_dir(self, round_: int) -> Path:
        return self.root / "rounds" / str(round_)

    def rounds(self) -> list[int]:
        base = self.root / "rounds"
        if not base.is_dir():
            return []
        return sorted(
            int(p.name) for p in base.iterdir() if p.name.isdigit() and (p / "record.json").exists()
        )

    # ---- the sketch key
    def sketch_key(self) -> bytes:
        """This validator's secret for the positions its copy tests read (``sketch_key`` in the state dir,
        created on first use; :func:`validator.sketches.keyed_sketch_positions`). Keep it with the
        state dir: a new key makes the earlier rounds' sketches incomparable (they are then skipped)."""
        key = self.existing_sketch_key()
        if key is None:
            key = os.urandom(32)
            atomic_write_bytes(self.root / SKETCH_KEY, key.hex().encode(), mode=0o600)
        return key

    def existing_sketch_key(self) -> bytes | None:
        path = self.root / SKETCH_KEY
        if not path.exists():
            return None
        text = path.read_text().strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise CheckpointError(f"{path} is not 64 hex characters; restore it from a backup or delete it")
        return key

    def save_round(self, rec: RoundRecord, sketches: dict[tuple[int, str], torch.Tensor]) -> None:
        d = self.round_dir(rec.round)
        tensors = {f"{uid}:{hk}": t.contiguous() for (uid, hk), t in sketches.items()}
        atomic_write_bytes(d / "sketches.safetensors", save(tensors, metadata={"plan": rec.sketch_plan}))
        atomic_write_json(d / "record.json", rec.to_json())  # last: a visible record means complete files

    def load_round(self, round_: int) -> RoundRecord:
        path = self.round_dir(round_) / "record.json"
        if not path.exists():
            have = self.rounds()
            raise ReplayError(
                f"round {round_} is not recorded in {self.root} (recorded: "
                f"{f'{have[0]}..{have[-1]}' if have else 'none'})"
            )
        try:
            return RoundRecord.from_json(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError) as e:
            raise ReplayError(f"{path} is unreadable: {e}") from None

    def has_sketches(self, round_: int) -> bool:
        """The round's sketch file exists (it may hold no sketch: a round where no Δ was evaluated)."""
        return (self.round_dir(round_) / "sketches.safetensors").exists()

    def sketch_plan(self, round_: int) -> str | None:
        """The plan the round's sketches were taken with (None: no sketch file; files written before plans
        were recorded are the public strided plan)."""
        path = self.round_dir(round_) / "sketches.safetensors"
        if not path.exists():
            return None
        try:
            with safe_open(path, framework="pt") as f:  # reads the header only
                metadata = f.metadata() or {}
        except (OSError, SafetensorError) as e:
            raise CheckpointError(f"{path} is corrupt ({e}); delete that round folder") from None
        return metadata.get("plan", PUBLIC_SKETCH)

    def load_sketches(self, round_: int) -> dict[tuple[int, int, str], torch.Tensor]:
        path = self.round_dir(round_) / "sketches.safetensors"
        if not path.exists():
            return {}
        try:
            raw = load(path.read_bytes())
        except SafetensorError as e:
            raise CheckpointError(f"{path} is corrupt ({e}); delete that round folder") from None
        out = {}
        for key, t in raw.items():
            uid, _, hk = key.partition(":")
            out[(round_, int(uid), hk)] = t
        return out

    def earlier_sketches(
        self, round_: int, lookback: int, plan: str = PUBLIC_SKETCH
    ) -> tuple[list[int], dict[tuple[int, int, str], torch.Tensor]]:
        """The sketches of the last ``lookback`` recorded rounds before ``round_`` taken with ``plan`` (other
        plans' coordinates are not comparable), and those rounds."""
        rounds = [
            r
            for r in self.rounds()
            if round_ - lookback <= r < round_ and self.sketch_plan(r) in (plan, None)
        ]
        out: dict[tuple[int, int, str], torch.Tensor] = {}
        for r in rounds:
            out.update(self.load_sketches(r))
        return rounds, out

    def prune(self) -> None:
        rounds = self.rounds()
        for r in rounds[: -self.keep_rounds]:
            shutil.rmtree(self.round_dir(r), ignore_errors=True)
        keep: set[str] = set()
        for r in self.rounds():
            rec = self.load_round(r)
            keep.add(rec.base_sha256)
            keep.update(c.blob_sha256 for c in rec.candidates if c.blob_sha256)
        for path in self.blobs.glob("*.safetensors"):
            if path.stem not in keep and _older_than(path, 3600):
                path.unlink(missing_ok=True)


def _older_than(path: Path, seconds: float) -> bool:
    import time

    try:
        return time.time() - path.stat().st_mtime > seconds
    except FileNotFoundError:
        return False
