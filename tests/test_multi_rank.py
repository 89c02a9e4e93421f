"""Multi-rank peers (``peer join --nproc-per-node N``): FSDP2 over gloo on CPU, debug model, 2 ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch

from tests.fixtures_swarm import REPO, join_args, peer_env, read_rounds, wait_for

STEPS = 6


def delta_main(nproc: int, data_dir: str, out: str, optimizer: str = "adamw") -> None:
    """Run in a subprocess: ``STEPS`` inner steps of round 0 on the debug config's assigned pages with
    ``nproc`` ranks (1 = the plain DilocoState), then write Δ, the losses and the loaded-θ hash to ``out``."""
    from safetensors.torch import save_file

    from peer.config import load_run_config
    from peer.data.model import build_model, lm_loss
    from peer.data.pages import assign_pages, round_batches
    from peer.data.shards import open_page_store
    from peer.training.diloco import DilocoState

    torch.set_num_threads(1)
    run = load_run_config("debug")
    store = open_page_store(None, Path(data_dir), run.data, None)
    pages = assign_pages("5Fhotkey", 0, b"seed", store.train_pages, run.data.pages_per_round)
    batches = round_batches(store.samples(pages), run.train.batch_size, b"seed5Fhotkey")
    model = build_model(run, "cpu")
    ranks = None
    if nproc == 1:
        state = DilocoState(model, run.train, optimizer)
    else:
        from peer.training.fsdp import ShardedDilocoState
        from peer.training.ranks import PeerRanks

        ranks = PeerRanks.start(run, nproc=nproc, device="cpu", optimizer=optimizer, threads=1)
        state = ShardedDilocoState(model, run.train, optimizer, ranks=ranks)
    losses = []
    state.begin_round()
    for batch in batches[:STEPS]:
        if nproc == 1:
            loss = lm_loss(model, batch)
            state.inner_step(loss)
            losses.append(float(loss))
        else:
            losses.append(state.train_step(batch))
    delta = state.pseudo_gradient()
    state.outer_step(delta)
    state.begin_round(delta)  # an overlapped round's start x = θ_1 − Δ (the carry), then a probe loss
    if nproc == 1:
        from peer.data.model import evaluate_loss

        probe = evaluate_loss(model, [batches[STEPS]], "cpu")
    else:
        probe = state.eval_loss(batches[STEPS])
    save_file({n: d.contiguous() for n, d in zip(state.names, delta, strict=True)}, out)
    Path(out).with_suffix(".json").write_text(json.dumps({"losses": losses, "probe": probe}))
    if ranks is not None:
        ranks.close(clean=True, stop=state.sharded.stop)


def _run_delta(nproc: int, data_dir: Path, out: Path, optimizer: str = "adamw") -> tuple[dict, list[float]]:
    from safetensors.torch import load_file

    code = f"from tests.test_multi_rank import delta_main; delta_main({nproc}, {str(data_dir)!r}, {str(out)!r}, {optimizer!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=peer_env(), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(out.with_suffix(".json").read_text())
    return load_file(out), [*info["losses"], info["probe"]]


def test_two_ranks_give_the_one_rank_delta(debug_data, tmp_path):
    one, losses_one = _run_delta(1, debug_data, tmp_path / "one.safetensors")
    two, losses_two = _run_delta(2, debug_data, tmp_path / "two.safetensors")
    assert one.keys() == two.keys()
    norm = torch.sqrt(sum((d.double() ** 2).sum() for d in one.values()))
    diff = torch.sqrt(sum(((one[k] - two[k]).double() ** 2).sum() for k in one))
    assert norm > 0.1, norm  # the steps moved the model
    assert diff / norm < 1e-3, (float(diff), float(norm))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-3, atol=1e-5)
    # the inner losses, then the loss after an outer step and an overlapped start (θ − carry)
    assert losses_two == pytest.approx(losses_one, rel=1e-4)


def _start(procs, tmp_path, bootstrap, debug_data, run_id, name, nproc, extra, tag=None):
    home = tmp_path / name
    args = join_args(
        home=home,
        data_dir=debug_data,
        wallet_path=tmp_path / "wallets",
        name=name,
        run_id=run_id,
        initial_peers=[bootstrap],
        extra=["--nproc-per-node", str(nproc), "--eval-pages", "2", *extra],
    )
    return procs.start(tag or name, args), home


def _agreeing(rounds_a: list[dict], rounds_b: list[dict]) -> list[tuple[dict, dict]]:
    by_round = {r["round"]: r for r in rounds_a}
    return [
        (by_round[r["round"]], r)
        for r in rounds_b
        if r["status"] == "averaged" and by_round.get(r["round"], {}).get("status") == "averaged"
    ]


def _run_pair(procs, tmp_path, bootstrap, debug_data, run_id, n_a, n_b, tag, agreeing):
    """Peers ``a`` (n_a ranks) and ``b`` (n_b ranks) run until they averaged ``agreeing`` rounds from the
    same θ, then get Ctrl-C. Returns the rounds each recorded in this run and the peers' logs.

    Whichever peer starts first (a 2-rank peer starts slower) trains alone for a while; the other joins
    late and, as any late joiner, may average once from an older θ before it resyncs. From the first
    round both averaged from the same θ on, they must stay bit-identical."""
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    before = len(read_rounds(home_a)), len(read_rounds(home_b))
    a, _ = _start(procs, tmp_path, bootstrap, debug_data, run_id, "a", n_a, [], tag=f"a{tag}")
    b, _ = _start(procs, tmp_path, bootstrap, debug_data, run_id, "b", n_b, [], tag=f"b{tag}")

    def rounds() -> tuple[list[dict], list[dict]]:
        return read_rounds(home_a)[before[0] :], read_rounds(home_b)[before[1] :]

    def same() -> list[tuple[dict, dict]]:
        return [(x, y) for x, y in _agreeing(*rounds()) if x["state_hash"] == y["state_hash"]]

    wait_for(lambda: len(same()) >= agreeing, 300, f"{agreeing} agreeing rounds", [a, b])
    multi = a if n_a > 1 else b
    followers = _follower_pids(multi.pid)
    assert len(followers) == max(n_a, n_b) - 1
    for p in (a, b):
        os.kill(p.pid, signal.SIGINT)  # Ctrl-C: the peer (and its ranks) stop
    assert a.wait(timeout=60) == 130, a.log()[-3000:]
    assert b.wait(timeout=60) == 130, b.log()[-3000:]
    wait_for(lambda: not any(psutil.pid_exists(pid) for pid in followers), 15, "rank 1 to exit", [multi])
    rounds_a, rounds_b = rounds()
    first = min(x["round"] for x, _ in same())
    for ra, rb in _agreeing(rounds_a, rounds_b):
        if ra["round"] >= first:
            assert ra["state_hash"] == rb["state_hash"], (ra["round"], rounds_a, rounds_b)
            assert ra["group_size"] == 2
            assert abs(ra["heldout_loss"] - rb["heldout_loss"]) < 1e-4  # same θ, one model copy each
    return rounds_a, rounds_b, a.log(), b.log()


@pytest.mark.slow
def test_two_rank_and_one_rank_peer_agree_and_restart_with_other_n(procs, bootstrap, debug_data, tmp_path):
    """A 2-rank and a 1-rank peer average together bit-identically and held-out loss falls; then each
    restarts from its checkpoint with the other N and they go on agreeing."""
    run_id = f"ranks-{uuid.uuid4().hex[:8]}"
    first_a, _, log_a, _ = _run_pair(procs, tmp_path, bootstrap, debug_data, run_id, 2, 1, "", agreeing=3)
    assert "RuntimeError" not in log_a, log_a[-3000:]
    assert first_a[-1]["heldout_loss"] < first_a[0]["heldout_loss"] - 0.2, [
        r["heldout_loss"] for r in first_a
    ]

    # restart with the other N: each resumes θ and momentum from its own (full) checkpoint
    ckpt = [json.loads((tmp_path / h / "checkpoint" / "state.json").read_text()) for h in "ab"]
    second_a, _, log_a, log_b = _run_pair(
        procs, tmp_path, bootstrap, debug_data, run_id, 1, 2, "2", agreeing=2
    )
    assert f"resumed from checkpoint: round {ckpt[0]['round']}" in log_a
    assert f"resumed from checkpoint: round {ckpt[1]['round']}" in log_b
    assert second_a[-1]["heldout_loss"] < first_a[0]["heldout_loss"] - 0.2


def _follower_pids(pid: int) -> list[int]:
    return [
        c.pid
        for c in psutil.Process(pid).children(recursive=False)
        if "peer.training.ranks" in " ".join(c.cmdline())
    ]


def _session_alive(sid: int) -> list[int]:
    alive = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return alive


@pytest.mark.slow
def test_a_killed_rank_takes_the_peer_down_cleanly(procs, bootstrap, debug_data, tmp_path):
    from peer.net.outbox import load_checkpoint
    from peer.training.diloco import DilocoState

    run_id = f"ranks-{uuid.uuid4().hex[:8]}"
    a, home = _start(procs, tmp_path, bootstrap, debug_data, run_id, "a", 2, ["--max-rounds", "40"])
    wait_for(lambda: len(read_rounds(home)) >= 1, 180, "the 2-rank peer to finish a round", [a])
    (follower,) = _follower_pids(a.pid)
    time.sleep(1.0)  # mid-round: inner steps in flight
    os.kill(follower, signal.SIGKILL)
    assert a.wait(timeout=60) == 3, a.log()[-3000:]
    log = a.log()
    last = log.strip().splitlines()[-1]
    assert last.startswith(f"peer join: error: rank 1 (pid {follower}) died (signal 9)"), log[-2000:]
    assert "RuntimeError" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    wait_for(
        lambda: not _session_alive(a.pid), 20, "the peer's processes to exit", [a]
    )  # DHT, averager, publisher

    # nothing torn: the checkpoint loads and matches its recorded hash; no temp files
    assert not list(home.rglob("*.tmp"))
    meta = json.loads((home / "checkpoint" / "state.json").read_text())
    from peer.config import load_run_config
    from peer.data.model import build_model

    run = load_run_config("debug")
    state = DilocoState(build_model(run), run.train)
    state.load_state_dict(load_checkpoint(home / "checkpoint" / "state.safetensors"))
    assert state.state_hash() == meta["state_hash"]


@pytest.mark.slow
def test_a_killed_rank_zero_takes_its_ranks_down(procs, bootstrap, debug_data, tmp_path):
    run_id = f"ranks-{uuid.uuid4().hex[:8]}"
    a, home = _start(procs, tmp_path, bootstrap, debug_data, run_id, "a", 2, ["--max-rounds", "40"])
    wait_for(lambda: len(read_rounds(home)) >= 1, 180, "the 2-rank peer to finish a round", [a])
    (follower,) = _follower_pids(a.pid)
    os.kill(a.pid, signal.SIGKILL)  # rank 0 only, not its process group
    wait_for(
        lambda: not psutil.pid_exists(follower) or psutil.Process(follower).status() == psutil.STATUS_ZOMBIE,
        20,
        "rank 1 to exit after rank 0 died",
        [a],
    )


def test_bad_nproc_is_one_line(tmp_path):
    for flag, why in (("0", "must be >= 1"), ("9", "train.batch_size 8")):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "peer.cli",
                "join",
                "--no-chain",
                "--home",
                str(tmp_path),
                "--wallet.path",
                str(tmp_path / "w"),
                "--wallet.create",
                "--no-publish",
                "--nproc-per-node",
                flag,
            ],
            env=peer_env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert why in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs 2 CUDA GPUs (NCCL, bf16, 8-bit AdamW); this machine has none",
)
def test_two_gpu_ranks_nccl_bf16_adamw8bit(procs, bootstrap, debug_data, tmp_path):
    run_id = f"ranks-{uuid.uuid4().hex[:8]}"
    a, home = _start(
        procs,
        tmp_path,
        bootstrap,
        debug_data,
        run_id,
        "a",
        2,
        ["--max-rounds", "3", "--device", "cuda", "--optimizer", "adamw8bit"],
    )
    assert a.wait(timeout=300) == 0, a.log()[-3000:]
    rounds = read_rounds(home)
    assert len(rounds) == 3 and all(r["inner_steps"] > 0 for r in rounds)
    assert rounds[-1]["heldout_loss"] < rounds[0]["heldout_loss"]


def test_two_ranks_with_8bit_adamw_on_local_shards(debug_data, tmp_path):
    """bitsandbytes' 8-bit AdamW refuses FSDP2's DTensors: it runs on each rank's local shards. Same Δ as
    one rank up to the quantisation blocks that end at shard boundaries."""
    pytest.importorskip("bitsandbytes", reason="8-bit AdamW needs bitsandbytes")
    one, _ = _run_delta(1, debug_data, tmp_path / "one.safetensors", "adamw8bit")
    two, _ = _run_delta(2, debug_data, tmp_path / "two.safetensors", "adamw8bit")
    norm = torch.sqrt(sum((d.double() ** 2).sum() for d in one.values()))
    diff = torch.sqrt(sum(((one[k] - two[k]).double() ** 2).sum() for k in one))
    assert norm > 0.1 and diff / norm < 0.05, (float(diff), float(norm))
