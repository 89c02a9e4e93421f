"""What a validator logs: the W&B offline run (no login) and the explanation table."""

from __future__ import annotations

import time
from dataclasses import asdict

import pytest

from peer.errors import CheckpointError
from tests.test_scoring import rm, table
from validator.ema import EmaState, update_ema
from validator.evaluation import EvalConfig
from validator.scoring import ScoringConfig, normalize_weights, score_round
from validator.store import RoundRecord
from validator.tracking import explanation_table, log_round, round_metrics


def record() -> RoundRecord:
    m = rm(table())
    scores = score_round(m, ScoringConfig())
    ema = update_ema(EmaState(), m.round, scores, {s.uid: s.hotkey for s in scores}, 0.3)
    w = normalize_weights({u: e.value for u, e in ema.entries.items()}, ScoringConfig().burn)
    return RoundRecord(
        run_id="r", config_name="debug", netuid=1, round=m.round, seed_hex="ab" * 32, base_sha256="0" * 64,
        base_state_hash="1" * 64, eval_config=asdict(EvalConfig()), scoring_config=asdict(ScoringConfig()),
        measurements=m.to_json(), scores=[s.to_json() for s in scores], ema_after=ema.to_json(),
        weights={"uids": w.uids, "weights": w.weights, "shares": {str(k): v for k, v in w.shares.items()},
                 "note": w.note},
        timings={"fetch_s": 0.5, "evaluate_s": 2.0, "base_s": 0.3, "round_s": 3.0},
    )  # fmt: skip


def test_metrics_and_table_explain_every_peer():
    rec = record()
    metrics = round_metrics(rec)
    assert metrics["heldout_loss_base"] == 5.0 and metrics["peers/total"] == 9
    assert metrics["peers/earned"] == 2 and metrics["peer/0/weight"] == 65535
    text = explanation_table(rec)
    assert "specificity" in text and "Δ holds NaN" in text and "not its assignment" in text


def test_offline_wandb_run_without_login(tmp_path, monkeypatch):
    from peer.tracking import TrackingConfig, make_tracker, read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    tracker = make_tracker(TrackingConfig(mode="offline", dir=str(tmp_path)), run_id="swarm-x", job_type="validator",
                           name="validator-abc", config={"config": "debug"}, default_dir=tmp_path)  # fmt: skip
    log_round(tracker, record())
    tracker.finish()
    [run_file] = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    deadline = time.time() + 60  # wandb's service process may flush the file a moment after finish()
    got = read_offline_run(run_file)
    while not got["run"] and time.time() < deadline:
        time.sleep(0.5)
        got = read_offline_run(run_file)
    assert got["run"] == {"group": "swarm-x", "job_type": "validator", "name": "validator-abc"}
    row = next(r for r in got["history"] if "heldout_loss_base" in r)
    assert row["heldout_loss_base"] == 5.0 and row["peer/0/weight"] == 65535
    assert row["peers/_type"] == "table-file" and row["peers/nrows"] == 9  # the per-peer table


def test_store_tells_an_empty_sketch_round_from_a_pruned_one(tmp_path):
    import torch

    from validator.store import ValidatorStore

    store = ValidatorStore(tmp_path)
    rec = record()
    store.save_round(rec, {})  # a round in which no Δ was evaluated: an empty but present sketch file
    rec2 = record()
    rec2.round = rec.round + 1
    store.save_round(rec2, {(3, "hk"): torch.ones(4)})
    assert store.has_sketches(rec.round) and store.load_sketches(rec.round) == {}
    assert set(store.load_sketches(rec2.round)) == {(rec2.round, 3, "hk")}
    rounds, earlier = store.earlier_sketches(rec2.round + 1, lookback=3)
    assert rounds == [rec.round, rec2.round] and list(earlier) == [(rec2.round, 3, "hk")]
    assert not store.has_sketches(rec.round + 5)


def test_the_sketch_key_is_private_stable_and_only_same_plan_rounds_compare(tmp_path):
    import stat

    import torch

    from validator.replay import _sketch_key
    from validator.sketches import sketch_plan_id
    from validator.store import ReplayError, ValidatorStore

    store = ValidatorStore(tmp_path)
    assert store.existing_sketch_key() is None
    key = store.sketch_key()
    assert len(key) == 32 and store.sketch_key() == key == ValidatorStore(tmp_path).existing_sketch_key()
    assert stat.S_IMODE((tmp_path / "sketch_key").stat().st_mode) == 0o600
    old, new = record(), record()  # a round before keys (strided), then one with the key
    new.round, new.sketch_plan = old.round + 1, sketch_plan_id(key)
    store.save_round(old, {(1, "a"): torch.ones(4)})
    store.save_round(new, {(2, "b"): torch.ones(4)})
    assert store.sketch_plan(old.round) == "strided" and store.sketch_plan(new.round) == new.sketch_plan
    rounds, earlier = store.earlier_sketches(new.round + 1, 3, new.sketch_plan)
    assert rounds == [new.round] and list(earlier) == [(new.round, 2, "b")]  # other coordinates: left out
    assert _sketch_key(store, new) == key and _sketch_key(store, old) is None
    (tmp_path / "sketch_key").write_text("00" * 32)  # another key: a replay cannot reproduce the sketches
    with pytest.raises(ReplayError, match="another one"):
        _sketch_key(store, new)
    (tmp_path / "sketch_key").write_text("not hex")
    with pytest.raises(CheckpointError, match="64 hex"):
        store.existing_sketch_key()
