"""``validator replay --round R``: recompute a recorded round from its stored artifacts and seed.

Anyone holding a validator's state dir (its ``rounds/<R>/record.json``, the sketches of the rounds it
compared with, and the blobs it fetched) and the swarm's data can check that validator: the base state
and every Δ are loaded by content hash, the pages are derived again from the seed, the evaluation and
the pure scoring run again with the recorded configs, and the result is compared with what was logged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from peer.config import load_run_config
from peer.data.shards import open_page_store
from peer.net.outbox import decode_state
from validator.ema import EmaState, last_evaluated, update_ema
from validator.evaluation import Candidate, EvalConfig, Evaluator
from validator.sampling import select_peers
from validator.scoring import BurnPolicy, ScoringConfig, normalize_weights, not_sampled_scores, score_round
from validator.sketches import PUBLIC_SKETCH, sketch_plan_id
from validator.store import SKETCH_KEY, ReplayError, RoundRecord, ValidatorStore

REL_TOL = 1e-4
ABS_TOL = 1e-6


@dataclass(kw_only=True)
class ReplayResult:
    logged: RoundRecord
    replayed: RoundRecord
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def configs_from_record(rec: RoundRecord, device: str | None = None) -> tuple[EvalConfig, ScoringConfig]:
    ev = dict(rec.eval_config)
    if device is not None:
        ev["device"] = device
    sc = dict(rec.scoring_config)
    sc["burn"] = BurnPolicy(**sc["burn"])
    # records written before the work-proportional rule scored with the held-out rule, unbounded
    sc.setdefault("reward", "heldout")
    sc.setdefault("max_reference_scale", float("inf"))
    # records written before the combination copy test scored without it
    sc.setdefault("combination_fraction", None)
    sc.setdefault("combination_trust_t", None)
    sc.setdefault("support_mean_fraction", None)  # records before the support-mean copy test
    sc.setdefault("originality", "best")  # records before sustained own-page evidence
    sc.setdefault("reference_out_of_scale", "clip")  # records before out-of-scale references were dropped
    sc.setdefault("reference_bias_t", None)  # records before the (experimental) reference bias test
    sc.setdefault("cap_median_of_passers", False)  # records before the cap's median excluded failing peers
    sc.setdefault("max_delta_norm", None)  # records before the absolute norm bound
    ev.setdefault("gain_pages", "heldout")  # records before unseen pages paid the public held-out split
    return EvalConfig(**ev), ScoringConfig(**sc)


def replay_round(
    store: ValidatorStore,
    round_: int,
    data_dir: Path,
    *,
    device: str | None = None,
    corpus_dir: Path | None = None,
    evaluator: Evaluator | None = None,
    data: str | None = None,
    config: str | None = None,
    what_if: dict | None = None,
) -> ReplayResult:
    """Recompute round ``round_`` from what the store kept. ``config``: the model config's name or YAML
    path (default: the record's config name); it must be the config the round was scored with.
    ``what_if``: EvalConfig fields to change (e.g. ``{"gain_pages": "heldout"}``: the same Δs measured
    under another rule, for benchmarks; the mismatches then say how the rule changed the round)."""
    rec = store.load_round(round_)
    run = load_run_config(config or rec.config_name)
    if run.name != rec.config_name:
        raise ReplayError(
            f"--config {config} is model config {run.name!r}; round {round_} was scored with "
            f"{rec.config_name!r}: pass that one"
        )
    eval_cfg, scoring_cfg = configs_from_record(rec, device)
    eval_cfg = replace(eval_cfg, **(what_if or {}))
    pages = open_page_store(data, data_dir, run.data, corpus_dir)
    _check_same_data(rec, pages.fingerprint)
    base = decode_state(store.read_blob(rec.base_sha256))
    not_sampled = {int(u): r for u, r in rec.sampling.get("not_sampled", {}).items()}
    candidates = []
    for c in rec.candidates:
        if c.uid in not_sampled:
            continue  # the budget left it out: nothing was measured, its EMA was kept
        cand = Candidate(
            uid=c.uid,
            hotkey=c.hotkey,
            rejected=c.rejected,
            blob_sha256=c.blob_sha256,
            claimed_pages=list(c.manifest["pages"]) if c.manifest else None,
            delta_format=c.manifest.get("delta_format") if c.manifest else None,
        )
        if c.rejected is None and c.blob_sha256:
            cand.delta_blob = store.read_blob(c.blob_sha256)
        candidates.append(cand)
    earlier = {}
    for r in rec.sketch_rounds:
        if not store.has_sketches(r):  # an empty file is fine: that round had no Δ to compare with
            raise ReplayError(f"round {round_} compared Δs with round {r}, whose sketches are gone (pruned?)")
        earlier.update(store.load_sketches(r))
    ev = evaluator
    if ev is None or ev.sketch_plan_id != rec.sketch_plan:
        ev = Evaluator(eval_cfg, run, pages, sketch_key=_sketch_key(store, rec))
    ev.cfg = eval_cfg
    rule = rec.measurements.get("heldout_rule", "alone")  # records from before the rule existed: alone
    key_hex = rec.measurements.get("page_key_hex")  # records before it: pages drawn by the seed alone
    page_key = bytes.fromhex(key_hex) if key_hex else None
    rm, _ = ev.evaluate_round(
        rec.round,
        bytes.fromhex(rec.seed_hex),
        base,
        candidates,
        earlier,
        rule,
        page_key,
        exclude_hotkeys=rec.measurements.get("unseen_excluded", []),
        gain_pages=(what_if or {}).get("gain_pages")
        or rec.measurements.get("gain_pages", "heldout"),  # records before it: the public split
    )
    ema_before = EmaState.from_json(rec.ema_before)
    uids = {int(u): e["hotkey"] for u, e in rec.ema_after["entries"].items()}
    not_sampled = {u: r for u, r in not_sampled.items() if u in uids}
    scores = score_round(rm, scoring_cfg, history=ema_before) + not_sampled_scores(not_sampled, uids)
    ema_after = update_ema(
        ema_before, rec.round, scores, uids, scoring_cfg.ema_alpha, not_sampled=not_sampled
    )
    weights = normalize_weights({u: e.value for u, e in ema_after.entries.items()}, scoring_cfg.burn)
    replayed = RoundRecord(**{**rec.__dict__})
    replayed.measurements = rm.to_json()
    replayed.scores = [s.to_json() for s in scores]
    replayed.ema_after = ema_after.to_json()
    replayed.weights = {**rec.weights, "uids": weights.uids, "weights": weights.weights}
    mismatches = compare(rec, replayed) + check_sample(rec, ema_before, uids)
    return ReplayResult(logged=rec, replayed=replayed, mismatches=mismatches)


def _sketch_key(store: ValidatorStore, rec: RoundRecord) -> bytes | None:
    """The key of the round's sketch plan: None for the public one, else the state dir's ``sketch_key``,
    which must be the one the round used."""
    if rec.sketch_plan == PUBLIC_SKETCH:
        return None
    key = store.existing_sketch_key()
    if key is None or sketch_plan_id(key) != rec.sketch_plan:
        raise ReplayError(
            f"round {rec.round} took its sketches with the key {rec.sketch_plan}, and {store.root / SKETCH_KEY} "
            f"{'is missing' if key is None else 'is another one'}: replay with the validator's whole state dir"
        )
    return key


def check_sample(rec: RoundRecord, ema_before: EmaState, uids: dict[int, str]) -> list[str]:
    """The recorded sample is the one the rule gives: same priority order (from the EMA before the
    round), same key, same limit. Catches a validator that picks whom to evaluate by hand."""
    smp = rec.sampling
    if not smp:
        return []  # recorded before sampling existed: everyone was evaluated
    order = [int(u) for u in smp["order"]]
    hotkeys = {c.uid: c.hotkey for c in rec.candidates}
    sel = select_peers(
        {u: hotkeys[u] for u in order},
        last_evaluated(ema_before, {u: hotkeys[u] for u in order}),
        smp["max_peers"],
        bytes.fromhex(smp["key_hex"]),
        smp["random_fraction"],
    )
    if sel.selected != [int(u) for u in smp["selected"]]:
        return [f"sample differs: logged {smp['selected']}, the rule gives {sel.selected}"]
    return []


def _check_same_data(rec: RoundRecord, fingerprint: str) -> None:
    """Refuse to replay on other data than the round's accepted contributions were trained on."""
    used = {c.manifest.get("data_fingerprint") for c in rec.candidates if c.manifest and c.rejected is None}
    used.discard(None)
    if used and fingerprint not in used:
        raise ReplayError(
            f"round {rec.round} was scored on data {sorted(used)[0][:16]}…, this data is {fingerprint[:16]}…: "
            "pass the validator's --data (or --data-dir)"
        )


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, float) or isinstance(b, float):
        if math.isnan(a) and math.isnan(b):
            return True
        return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)
    return a == b


def compare(logged: RoundRecord, replayed: RoundRecord) -> list[str]:
    """Differences between a logged round and its replay (floats within REL_TOL/ABS_TOL)."""
    out = []
    a = {s["uid"]: s for s in logged.scores}
    b = {s["uid"]: s for s in replayed.scores}
    if set(a) != set(b):
        out.append(f"uids differ: logged {sorted(a)}, replayed {sorted(b)}")
    for uid in sorted(set(a) & set(b)):
        if not _close(a[uid]["score"], b[uid]["score"]):
            out.append(f"uid {uid}: score logged {a[uid]['score']:.6g}, replayed {b[uid]['score']:.6g}")
        if a[uid]["reason"] != b[uid]["reason"] and not (a[uid]["score"] > 0 and b[uid]["score"] > 0):
            out.append(f"uid {uid}: reason logged {a[uid]['reason']!r}, replayed {b[uid]['reason']!r}")
    if not _close(logged.measurements["heldout_loss_base"], replayed.measurements["heldout_loss_base"]):
        out.append("base held-out loss differs")
    lw = dict(zip(logged.weights.get("uids", []), logged.weights.get("weights", []), strict=True))
    rw = dict(zip(replayed.weights.get("uids", []), replayed.weights.get("weights", []), strict=True))
    if set(lw) != set(rw) or any(abs(lw[u] - rw[u]) > 1 for u in lw):
        out.append(f"weights differ: logged {lw}, replayed {rw}")
    return out
