"""Validators' signed explanations: why each peer earned what it earned in a round.

After every round a validator writes one :class:`ExplanationRecord` (every peer's score, weight share,
EMA, the reason and the numbers behind it), signed by the validator's hotkey, into its own outbox
(``explanations/<round>/explanation.json``). Its publisher serves it (``{"op": "explain"}`` of
:mod:`peer.net.artifact_protocol`); anyone — ``peer status``, ``peer doctor``, a dashboard — fetches it
and checks it against the validator's hotkey from the metagraph, so a miner learns *why* its weight is 0
without asking in chat, and nobody can put words in a validator's mouth.

Bounds: at most :data:`MAX_EXPLANATION_BYTES` on the wire and on disk (checked before parsing),
:data:`MAX_PEERS` entries, short reasons, only scalar terms (non-finite numbers become strings).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from peer.net.records import RecordError, SignedRecord

EXPLANATIONS_DIR = "explanations"
EXPLANATION_FILE = "explanation.json"
MAX_EXPLANATION_BYTES = 512 << 10
"""Largest explanation record read from disk or accepted from the network (~300 bytes per peer)."""
MAX_PEERS = 1024
MAX_TERMS = 48
MAX_REASON_CHARS = 512
KEEP_ROUNDS = 16
"""Rounds of explanations a validator keeps serving."""

TermValue = float | int | bool | Annotated[str, Field(max_length=256)] | None


class PeerExplanation(BaseModel):
    """One peer's line of a validator's round."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    uid: int = Field(ge=0, le=65535)
    hotkey: str = Field(min_length=40, max_length=60)
    score: float
    """The round score (0 with the reason when a gate failed)."""
    weight_share: float = Field(ge=0.0, le=1.0)
    """This uid's share of the weight vector the validator set after the round."""
    ema: float
    """The validator's EMA of this uid's scores after the round (what weights follow)."""
    reason: str = Field(max_length=MAX_REASON_CHARS)
    """``scored`` or why the score is 0, in words (with the numbers that decided it)."""
    terms: dict[Annotated[str, Field(max_length=64)], TermValue] = Field(
        default_factory=dict, max_length=MAX_TERMS
    )
    """Every scalar term that went into the score (held-out gain, specificity, t, norm, ...)."""


class ExplanationRecord(SignedRecord):
    """A validator's explanation of one round, signed by the validator's hotkey.

    ``peer_id`` is the validator publisher's libp2p peer id (the one that serves it); ``round`` the
    evaluated round.
    """

    kind: ClassVar[str] = "explanation"
    netuid: int = Field(ge=0, le=65535)
    base_state_hash: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    weights_note: str = Field(default="", max_length=256)
    peers: list[PeerExplanation] = Field(default_factory=list, max_length=MAX_PEERS)

    def for_hotkey(self, hotkey: str) -> PeerExplanation | None:
        return next((p for p in self.peers if p.hotkey == hotkey), None)


# ------------------------------------------------------------------------------------------- building


def _scalar_terms(terms: dict) -> dict[str, TermValue]:
    """The scalar terms of a score, JSON-safe: non-finite floats as strings, nested values dropped
    (except ``duplicate_of``, flattened), long strings cut."""
    out: dict[str, TermValue] = {}
    items = list(terms.items())
    dup = terms.get("duplicate_of")
    if isinstance(dup, dict):
        items += [(f"duplicate_of_{k}", v) for k, v in dup.items()]
    for k, v in items:
        if len(out) >= MAX_TERMS or not isinstance(k, str) or len(k) > 64:
            continue
        if isinstance(v, bool) or v is None or isinstance(v, int):
            out[k] = v
        elif isinstance(v, float):
            out[k] = v if math.isfinite(v) else str(v)
        elif isinstance(v, str):
            out[k] = v[:256]
    return out


def _finite(x, default: float = 0.0) -> float:
    x = float(x)
    return x if math.isfinite(x) else default


def build_explanation(round_record: dict, *, hotkey: str, peer_id: str) -> ExplanationRecord:
    """The (unsigned) explanation of a validator round from its ``rounds/<r>/record.json`` dict.

    Pure: the same record gives the same explanation. Peers beyond :data:`MAX_PEERS` (highest uids)
    are left out rather than making the record unservable.
    """
    rec = round_record
    ema = {int(u): e.get("value", 0.0) for u, e in rec.get("ema_after", {}).get("entries", {}).items()}
    shares = {int(u): float(x) for u, x in rec.get("weights", {}).get("shares", {}).items()}
    peers = []
    for s in sorted(rec.get("scores", []), key=lambda s: s["uid"])[:MAX_PEERS]:
        peers.append(
            PeerExplanation(
                uid=int(s["uid"]),
                hotkey=s["hotkey"],
                score=_finite(s["score"]),
                weight_share=min(1.0, max(0.0, _finite(shares.get(int(s["uid"]), 0.0)))),
                ema=_finite(ema.get(int(s["uid"]), 0.0)),
                reason=str(s.get("reason", ""))[:MAX_REASON_CHARS],
                terms=_scalar_terms(s.get("terms", {})),
            )
        )
    return ExplanationRecord(
        run_id=rec["run_id"],
        round=int(rec["round"]),
        hotkey=hotkey,
        peer_id=peer_id,
        netuid=int(rec["netuid"]),
        base_state_hash=rec.get("base_state_hash"),
        weights_note=str(rec.get("weights", {}).get("note", ""))[:256],
        peers=peers,
    )


# ------------------------------------------------------------------------------------------- outbox


def explanation_path(outbox: Path, round_: int) -> Path:
    return Path(outbox) / EXPLANATIONS_DIR / str(round_) / EXPLANATION_FILE


def write_explanation(outbox: Path, record: ExplanationRecord, *, keep: int = KEEP_ROUNDS) -> Path:
    """Put a signed record in ``outbox`` (temp file + rename) and drop rounds older than the last ``keep``."""
    if not record.signature:
        raise RecordError("explanation: refusing to publish an unsigned record")
    raw = record.model_dump_json().encode()
    if len(raw) > MAX_EXPLANATION_BYTES:
        raise RecordError(f"explanation: {len(raw)} bytes > {MAX_EXPLANATION_BYTES}")
    from peer.net.outbox import atomic_write_bytes  # here: readers of explanations need no torch

    path = explanation_path(outbox, record.round)
    atomic_write_bytes(path, raw)
    for r in explanation_rounds(outbox)[:-keep]:
        old = explanation_path(outbox, r)
        old.unlink(missing_ok=True)
        try:
            old.parent.rmdir()
        except OSError:
            pass
    return path


def explanation_rounds(outbox: Path) -> list[int]:
    base = Path(outbox) / EXPLANATIONS_DIR
    if not base.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in base.iterdir()
        if p.name.isdigit() and len(p.name) < 16 and (p / EXPLANATION_FILE).is_file()
    )


# ------------------------------------------------------------------------------------------- reading


def parse_explanation(raw: str | bytes) -> ExplanationRecord:
    """Parse strictly, refusing oversized input before parsing; RecordError says why."""
    if len(raw) > MAX_EXPLANATION_BYTES:
        raise RecordError(f"explanation: {len(raw)} bytes > {MAX_EXPLANATION_BYTES}")
    try:
        return ExplanationRecord.model_validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "record"
        raise RecordError(f"explanation: invalid field {where}: {first['msg']}") from None


def verify_explanation(
    raw: str | bytes, *, hotkey: str, peer_id: str | None, run_id: str | None, round_: int | None = None
) -> ExplanationRecord:
    """Parse and check an explanation served by the validator ``hotkey`` (at ``peer_id``)."""
    rec = parse_explanation(raw)
    if rec.hotkey != hotkey:
        raise RecordError(f"explanation: signed for hotkey {rec.hotkey}, the validator is {hotkey}")
    rec.verify(run_id=run_id, round_=round_)
    if peer_id is not None and rec.peer_id != peer_id:
        raise RecordError(f"explanation: names publisher {rec.peer_id}, served by {peer_id}")
    return rec


def describe(entry: PeerExplanation, round_: int) -> str:
    """One line for a human: ``round 120: 0 — not shown to have trained … (t = 1.2 < 2.0)``."""
    score = "0" if entry.score == 0 else f"{entry.score:.4g}"
    share = f", weight share {entry.weight_share:.1%}" if entry.weight_share else ""
    return f"round {round_}: {score} — {entry.reason}{share}"


def read_local(outbox: Path, round_: int) -> ExplanationRecord | None:
    """The record a validator wrote for ``round_`` in its own outbox (None if absent or invalid)."""
    path = explanation_path(outbox, round_)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_EXPLANATION_BYTES + 1)
        return parse_explanation(raw)
    except (OSError, RecordError):
        return None


def to_json(record: ExplanationRecord) -> dict:
    return json.loads(record.model_dump_json())
