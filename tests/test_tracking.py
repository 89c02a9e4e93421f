"""W&B offline: a peer's run lands in the swarm's group with the metrics researchers need."""

from __future__ import annotations

import pytest

from peer.tracking import read_offline_run
from tests.fixtures_swarm import join_args, peer_env


@pytest.mark.slow
def test_peer_logs_offline_run_in_swarm_group(procs, debug_data, tmp_path):
    home = tmp_path / "p"
    args = join_args(
        home=home,
        data_dir=debug_data,
        wallet_path=tmp_path / "w",
        name="solo",
        run_id="trackme",
        initial_peers=[],
        extra=["--max-rounds", "2", "--wandb.mode", "offline"],
    )
    proc = procs.start("solo", args, env=peer_env(WANDB_MODE="offline"))
    assert proc.wait(timeout=120) == 0, proc.log()[-3000:]
    files = list(home.rglob("*.wandb"))
    assert len(files) == 1, files
    run = read_offline_run(files[0])
    assert run["run"]["group"] == "trackme"
    assert run["run"]["job_type"] == "peer"
    rows = [r for r in run["history"] if "heldout_loss" in r]
    assert len(rows) == 2
    for key in (
        "train/loss_first",
        "tokens_per_s",
        "round",
        "peers_in_group",
        "averaging/bytes_sent",
        "averaging/seconds",
        "inner_steps",
    ):
        assert key in rows[-1], key
    assert rows[-1]["tokens_per_s"] > 0

    # restart with the same home: resumes from its checkpoint instead of the initial weights
    again = procs.start(
        "solo-again", args[: args.index("--max-rounds")] + ["--max-rounds", "1"], env=peer_env()
    )
    assert again.wait(timeout=120) == 0, again.log()[-3000:]
    assert "resumed from checkpoint" in again.log()
    from tests.fixtures_swarm import read_rounds

    rounds = read_rounds(home)
    assert len(rounds) == 3
    # first training batch of the resumed round vs of the very first round (the probe loss is opt-in)
    assert rounds[2]["loss_first"] < rounds[0]["loss_first"] - 0.5
