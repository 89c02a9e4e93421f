"""What a local subnet run shows: per-process rows (live), the final peer table, summary.json, report.png.

Everything here is read from files the processes write and from the ledger; nothing is computed
twice. Sources:

* a peer's ``<home>/status.json`` and ``<home>/rounds.jsonl`` (``peer join``): rounds, tokens, losses;
* a validator's home (``validator run``): the scores of its last round, if it writes them;
* the LocalLedger: uids, stake, the weights validators set (row-normalised, averaged over validators)
  and the incentive of the last epoch.

``summary.json`` is written atomically (temp file + rename) whenever it changes, so an interrupted run
still leaves a readable partial summary.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

SUMMARY_SPEC = 1


# ------------------------------------------------------------------------------------ reading files


def _public_heldout_loss(measurements: Mapping) -> float | None:
    """θ_r's loss on the public held-out split: ``public_heldout_loss`` where the validator paid gains on
    unseen training pages, else the paid pages' base loss (they were that split)."""
    public = measurements.get("public_heldout_loss")
    return measurements.get("heldout_loss_base") if public is None else public


def read_json(path: Path) -> dict | None:
    """A JSON object file, or None if it is missing or (briefly, while replaced) unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_jsonl(path: Path) -> list[dict]:
    """Complete lines of a JSON-lines file (a half-written last line is skipped)."""
    try:
        text = path.read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


# ------------------------------------------------------------------------------------ weights
def normalised_weights(
    rows: Mapping[int, Sequence[tuple[int, int]]], validator_uids: Sequence[int]
) -> dict[int, float]:
    """uid -> weight share in [0, 1]: each validator's row divided by its sum, averaged over validators.

    Validators that have not set weights yet are left out of the average (not counted as zeros).
    """
    shares: dict[int, float] = {}
    n = 0
    for v in validator_uids:
        row = rows.get(v)
        if not row:
            continue
        total = sum(w for _, w in row)
        if total <= 0:
            continue
        n += 1
        for uid, w in row:
            shares[uid] = shares.get(uid, 0.0) + w / total
    return {uid: s / n for uid, s in shares.items()} if n else {}


# ------------------------------------------------------------------------------------ rows
@dataclass(kw_only=True)
class Row:
    """One process in the live table, and (for peers) one line of the final table."""

    name: str
    role: str
    """bootstrap | peer | validator"""
    hotkey: str = ""
    behaviour: str = ""
    state: str = "starting"
    """starting | running | done | stopped | crashed (exit N)"""
    uid: int | None = None
    round: int | None = None
    """Last chain round this process finished."""
    rounds: int = 0
    """Rounds a peer completed (contributions published)."""
    tokens: int = 0
    loss: float | None = None
    heldout_loss: float | None = None
    tok_s: float | None = None
    score: float | None = None
    """The validator's latest score for this peer (None until a validator scored it)."""
    weight: float | None = None
    """Share of the weights validators set on this uid (0..1)."""
    incentive: float | None = None
    """Share of the miner emission in the last epoch (0..1), from the ledger."""
    stake_tao: float | None = None
    log: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def update_peer_row(row: Row, home: Path) -> list[dict]:
    """Refresh a peer's row from its status.json and rounds.jsonl; returns its round records."""
    status = read_json(home / "status.json")
    rounds = read_jsonl(home / "rounds.jsonl")
    if status is not None:
        row.uid = status.get("uid", row.uid)
        last = status.get("last_round") or {}
        row.round = last.get("round", row.round)
        row.loss = last.get("loss_last", row.loss)
        row.heldout_loss = last.get("heldout_loss", row.heldout_loss)
        secs = last.get("train_seconds") or 0.0
        row.tok_s = (last.get("tokens", 0) / secs) if secs else 0.0
    row.rounds = len(rounds)
    row.tokens = sum(int(r.get("tokens") or 0) for r in rounds)
    return rounds


def compact_validator_record(rec: Mapping) -> dict:
    """The parts of a validator's round record (validator/store.py) the summary keeps."""
    scores = {s["hotkey"]: float(s["score"]) for s in rec.get("scores", []) if "hotkey" in s}
    reasons = {s["hotkey"]: s.get("reason", "") for s in rec.get("scores", []) if "hotkey" in s}
    weights = rec.get("weights") or {}
    return {
        "round": int(rec["round"]),
        "heldout_loss_base": _public_heldout_loss(rec.get("measurements") or {}),
        "scores": scores,
        "reasons": reasons,
        "weight_shares": weights.get("shares", {}),
        "weights_note": weights.get("note", ""),
        "round_s": (rec.get("timings") or {}).get("round_s"),
    }


# ------------------------------------------------------------------------------------ summary
@dataclass(kw_only=True)
class History:
    """What the launcher saw over time: weights per chain round, validators' round records."""

    weights_by_round: dict[int, dict[str, float]] = field(default_factory=dict)
    """chain round -> {peer name: weight share} as last seen during that round."""
    validator_rounds: dict[str, list[dict]] = field(default_factory=dict)
    """validator name -> its per-round records (if it writes any)."""

    def record_weights(self, round_: int, by_name: Mapping[str, float]) -> bool:
        """Keep the latest weights seen in ``round_``; True if they differ from the last ones recorded."""
        last_round = max(self.weights_by_round, default=None)
        changed = last_round is None or self.weights_by_round[last_round] != by_name
        self.weights_by_round[round_] = dict(by_name)
        return changed


def heldout_by_round(peer_rounds: Mapping[str, list[dict]]) -> list[dict]:
    """Per chain round r: the held-out loss of the model *after* round r (θ_{r+1}), median over peers
    (all hold the same averaged model), and each peer's value."""
    by_round: dict[int, dict[str, float]] = {}
    for name, recs in peer_rounds.items():
        for rec in recs:
            loss = rec.get("heldout_loss")
            if isinstance(loss, int | float) and math.isfinite(loss) and isinstance(rec.get("round"), int):
                by_round.setdefault(rec["round"], {})[name] = float(loss)
    return [
        {"round": r, "heldout_loss": statistics.median(v.values()), "by_peer": v}
        for r, v in sorted(by_round.items())
    ]


def build_summary(
    *,
    meta: Mapping,
    rows: Sequence[Row],
    peer_rounds: Mapping[str, list[dict]],
    history: History,
    crashed: Sequence[Mapping],
) -> dict:
    """The JSON document written to ``summary.json`` (spec ``SUMMARY_SPEC``)."""
    peers = [r for r in rows if r.role == "peer"]
    ranked = sorted(peers, key=lambda r: (-(r.weight or 0.0), -(r.incentive or 0.0), r.name))
    return {
        "spec_version": SUMMARY_SPEC,
        **meta,
        "peers": [r.to_json() for r in ranked],
        "validators": [r.to_json() for r in rows if r.role == "validator"],
        "bootstrap": [r.to_json() for r in rows if r.role == "bootstrap"],
        "heldout_loss": heldout_by_round(peer_rounds),
        "weights": [{"round": r, "weights": w} for r, w in sorted(history.weights_by_round.items())],
        "validator_rounds": history.validator_rounds,
        "crashed": list(crashed),
    }


# ------------------------------------------------------------------------------------ rendering
def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


PEER_COLUMNS = ("uid", "peer", "hotkey", "behaviour", "rounds", "tokens", "score", "weight", "incentive")


def peer_table_rows(summary: Mapping) -> list[list[str]]:
    """The final table's cells (also used for the plain-text version)."""
    out = []
    for p in summary["peers"]:
        out.append(
            [
                _fmt(p["uid"], "d"),
                p["name"],
                p["hotkey"][:10] + "…" if p["hotkey"] else "-",
                p["behaviour"],
                str(p["rounds"]),
                f"{p['tokens']:,}",
                _fmt(p["score"], ".4f"),
                _fmt(p["weight"], ".3f"),
                _fmt(p["incentive"], ".3f"),
            ]
        )
    return out


def render_peer_table(summary: Mapping):
    """A rich Table of peers ranked by weight."""
    from rich.table import Table

    t = Table(title=f"gradswarm local subnet · {summary.get('run_id', '')} · {summary.get('status', '')}")
    for col in PEER_COLUMNS:
        t.add_column(
            col,
            justify="right" if col in ("uid", "rounds", "tokens", "score", "weight", "incentive") else "left",
        )
    for cells in peer_table_rows(summary):
        t.add_row(*cells)
    return t


def plain_peer_table(summary: Mapping) -> str:
    """The same table as fixed-width text (logs, README)."""
    rows = [list(PEER_COLUMNS), *peer_table_rows(summary)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(PEER_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_report_png(summary: Mapping, path: Path) -> None:
    """Two panels: held-out loss over rounds, each peer's weight over rounds (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_w) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax in (ax_loss, ax_w):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    held = summary.get("heldout_loss") or []
    if held:
        ax_loss.plot(
            [h["round"] + 1 for h in held],
            [h["heldout_loss"] for h in held],
            marker="o",
            label="peers (fixed held-out pages)",
        )
    for name, recs in sorted((summary.get("validator_rounds") or {}).items()):
        pts = [(r["round"], r["heldout_loss_base"]) for r in recs if r.get("heldout_loss_base") is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax_loss.plot(xs, ys, "s--", markersize=4, label=f"{name} (round's held-out pages)")
    if held or any(summary.get("validator_rounds", {}).values()):
        ax_loss.legend(fontsize=8)
    else:
        ax_loss.text(0.5, 0.5, "no round finished", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set_title("held-out loss of the shared model θ_r")
    ax_loss.set_xlabel("round r (θ_r = the model at its start)")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.grid(alpha=0.3)

    weights = summary.get("weights") or []
    behaviours = {p["name"]: p["behaviour"] for p in summary.get("peers", [])}
    for name in sorted(behaviours):
        xs = [w["round"] for w in weights if name in w["weights"]]
        ys = [w["weights"][name] for w in weights if name in w["weights"]]
        if xs:
            style = "-" if behaviours[name] == "honest" else "--"
            ax_w.plot(xs, ys, style, marker=".", label=f"{name} ({behaviours[name]})")
    if weights:
        ax_w.legend(fontsize=8)
    else:
        ax_w.text(0.5, 0.5, "no weights set yet", ha="center", va="center", transform=ax_w.transAxes)
    ax_w.set_title("validator weight per peer")
    ax_w.set_xlabel("chain round")
    ax_w.set_ylabel("weight share")
    ax_w.set_ylim(-0.02, 1.02)
    ax_w.grid(alpha=0.3)
    fig.suptitle(f"gradswarm local subnet · {summary.get('run_id', '')}")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
