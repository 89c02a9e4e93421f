"""A validator's memory of every uid: the exponential moving average of its round scores and the
hotkey's recent assignment-test evidence (pure; ``validator.scoring`` reads the evidence, the store
writes the state as ``ema.json`` after each round, and ``last_evaluated`` orders the sampling)."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from validator.scoring import PeerScore

MAX_EVIDENCE = 15
"""Earlier assignment-test t statistics kept per hotkey in the EMA state (``evidence_rounds`` uses the last
``evidence_rounds − 1`` of them)."""


@dataclass(kw_only=True)
class EmaEntry:
    hotkey: str
    value: float
    rounds: int = 0
    """Rounds this hotkey has been scored on this uid."""
    last_evaluated: int | None = None
    """Last round this hotkey was evaluated on this uid (None: never); the sampling priority."""
    evidence: list[float] = field(default_factory=list)
    """Its last assignment-test t statistics (clipped, oldest first, at most ``MAX_EVIDENCE``): the
    earlier rounds that ``score_round`` pools with the current one (``evidence_rounds``)."""


@dataclass(kw_only=True)
class EmaState:
    last_round: int | None = None
    entries: dict[int, EmaEntry] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "last_round": self.last_round,
            "entries": {str(u): asdict(e) for u, e in sorted(self.entries.items())},
        }

    @classmethod
    def from_json(cls, d: Mapping) -> EmaState:
        return cls(
            last_round=d["last_round"], entries={int(u): EmaEntry(**e) for u, e in d["entries"].items()}
        )


def update_ema(
    state: EmaState,
    round_: int,
    scores: Sequence[PeerScore],
    uids: Mapping[int, str],
    alpha: float,
    not_sampled: Collection[int] = (),
) -> EmaState:
    """The EMA after round ``round_``: every uid of the metagraph (``uid → hotkey``) moves towards its score
    (0 when it has none), except the uids in ``not_sampled`` (left out by the validator's budget), which
    keep their value. A round at or before ``state.last_round`` is not applied again. A score whose terms
    hold an ``evidence_t`` (its assignment test ran) appends it to the hotkey's evidence."""
    if state.last_round is not None and round_ <= state.last_round:
        return state
    by_uid = {s.uid: s for s in scores}
    skip = set(not_sampled)
    entries: dict[int, EmaEntry] = {}
    for uid, hotkey in sorted(uids.items()):
        prev = state.entries.get(uid)
        same = prev is not None and prev.hotkey == hotkey
        old = prev.value if same else 0.0
        rounds = prev.rounds if same else 0
        last = prev.last_evaluated if same else None
        evidence = list(prev.evidence) if same else []
        if uid in skip:
            entries[uid] = EmaEntry(
                hotkey=hotkey, value=old, rounds=rounds, last_evaluated=last, evidence=evidence
            )
            continue
        s = by_uid.get(uid)
        mine = s is not None and s.hotkey == hotkey
        score = s.score if mine and math.isfinite(s.score) else 0.0  # a NaN would stay in the EMA for good
        if mine and s.terms.get("evidence_t") is not None:
            evidence = (evidence + [float(s.terms["evidence_t"])])[-MAX_EVIDENCE:]
        entries[uid] = EmaEntry(
            hotkey=hotkey,
            value=alpha * score + (1 - alpha) * old,
            rounds=rounds + 1,
            last_evaluated=round_,
            evidence=evidence,
        )
    return EmaState(last_round=round_, entries=entries)


def last_evaluated(state: EmaState, uids: Mapping[int, str]) -> dict[int, int | None]:
    """uid → the last round its *current* hotkey was evaluated (None: never), the sampling priority."""
    out: dict[int, int | None] = {}
    for uid, hotkey in uids.items():
        e = state.entries.get(uid)
        out[uid] = e.last_evaluated if e is not None and e.hotkey == hotkey else None
    return out
