"""What a validator reports per round: W&B (through peer.tracking's Tracker) and a readable table.

W&B run: job_type ``validator``, group = the swarm's run id, name = the hotkey's short form. Per round:
the base model's held-out loss, counts (evaluated, earned, not sampled), timings (time per peer), every
peer's score/EMA/weight as scalars (``peer/<uid>/...``; a peer the budget did not sample logs its EMA and
weight only, its row's reason says ``not sampled``) and, on a real W&B run, a table with one row per peer and every term.
``WANDB_MODE=offline`` writes files without login; ``disabled`` (CI's default) logs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from validator.evaluation import swarm_heldout_loss
from validator.store import RoundRecord

COLUMNS = [
    "uid",
    "hotkey",
    "status",
    "heldout_gain",
    "assigned_gain",
    "generic_gain",
    "specificity",
    "assignment_factor",
    "work",
    "relative_heldout_gain",
    "delta_norm",
    "score",
    "ema",
    "weight",
    "seconds",
    "reason",
]


def peer_rows(rec: RoundRecord) -> list[dict]:
    """One dict per peer with every column of :data:`COLUMNS` (None where not measured)."""
    ema = {int(u): e["value"] for u, e in rec.ema_after.get("entries", {}).items()}
    weight = dict(zip(rec.weights.get("uids", []), rec.weights.get("weights", []), strict=True))
    seconds = {p["uid"]: p["seconds"] for p in rec.measurements.get("peers", [])}
    rows = []
    for s in rec.scores:
        t = s["terms"]
        rows.append(
            {
                "uid": s["uid"],
                "hotkey": s["hotkey"],
                "status": t.get("status"),
                "heldout_gain": t.get("heldout_gain"),
                "assigned_gain": t.get("assigned_gain"),
                "generic_gain": t.get("generic_gain"),
                "specificity": t.get("specificity"),
                "assignment_factor": t.get("assignment_factor"),
                "work": t.get("work"),
                "relative_heldout_gain": t.get("relative_heldout_gain"),
                "delta_norm": t.get("delta_norm"),
                "score": s["score"],
                "ema": ema.get(s["uid"], 0.0),
                "weight": weight.get(s["uid"], 0),
                "seconds": seconds.get(s["uid"]),
                "reason": s["reason"],
            }
        )
    return rows


def round_metrics(rec: RoundRecord) -> dict:
    rows = peer_rows(rec)
    evaluated = [r for r in rows if r["status"] == "ok"]
    not_sampled = [r for r in rows if r["status"] == "not_sampled"]
    per_peer = [r["seconds"] for r in evaluated if r["seconds"]]
    metrics = {
        "round": rec.round,
        "heldout_loss_base": swarm_heldout_loss(rec.measurements),  # the public split: the swarm's curve
        "paid_pages_loss_base": rec.measurements["heldout_loss_base"],  # the pages gains were paid on
        "peers/total": len(rows),
        "peers/evaluated": len(evaluated),
        "peers/earned": sum(1 for r in rows if r["score"] > 0),
        "peers/not_sampled": len(not_sampled),
        "time/fetch_s": rec.timings.get("fetch_s"),
        "time/evaluate_s": rec.timings.get("evaluate_s"),
        "time/base_s": rec.timings.get("base_s"),
        "time/round_s": rec.timings.get("round_s"),
        "time/per_peer_s": sum(per_peer) / len(per_peer) if per_peer else None,
        "weights/set": int(bool(rec.weights.get("uids"))),
    }
    for r in rows:
        keys = ("score", "ema", "weight", "heldout_gain", "specificity", "seconds")
        if r["status"] == "not_sampled":
            keys = ("ema", "weight")  # no round score: a 0 would read as a failed evaluation
        for k in keys:
            if r[k] is not None:
                metrics[f"peer/{r['uid']}/{k}"] = r[k]
    return {k: v for k, v in metrics.items() if v is not None}


def log_round(tracker, rec: RoundRecord) -> None:
    metrics = round_metrics(rec)
    from peer.tracking import WandbTracker

    if isinstance(tracker, WandbTracker):
        import wandb

        rows = peer_rows(rec)
        metrics["peers"] = wandb.Table(columns=COLUMNS, data=[[r[c] for c in COLUMNS] for r in rows])
    tracker.log(metrics, step=rec.round)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:+.4f}" if abs(v) < 1000 else f"{v:.3g}"
    return str(v)


def explanation_table(rec: RoundRecord, columns: Sequence[str] = COLUMNS) -> str:
    """A plain-text table of every peer's terms (what ``validator replay`` prints)."""
    rows = peer_rows(rec)
    cells = [[c for c in columns]] + [
        [(r["hotkey"][:10] if c == "hotkey" else _fmt(r[c])) for c in columns] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns) - 1)]
    lines = []
    for row in cells:
        lines.append(
            "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        )
    head = (
        f"round {rec.round} · seed {rec.seed_hex[:16]}… · base θ {rec.base_state_hash[:12]} · "
        f"base held-out loss {swarm_heldout_loss(rec.measurements):.4f} · weights: {rec.weights.get('note', '-')}"
    )
    return "\n".join([head, *lines])
