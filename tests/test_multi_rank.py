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


def delta_main(nproc: int, data_dir: str, out: str) -> None:
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
        state = DilocoState(model, run.train, "adamw")
    else:
        from peer.training.fsdp import ShardedDilocoState
        from peer.training.ranks import PeerRanks

        ranks = PeerRanks.start(run, nproc=nproc, device="cpu", optimizer="adamw", threads=1)
        state = ShardedDilocoState(model, run.train, "adamw", ranks=ranks)
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
    state.outer_step(delta)  # θ_1 on the rank-0 side; its hash must not depend on N for equal inputs
    save_file({n: d.contiguous() for n, d in zip(state.names, delta, strict=True)}, out)
    Path(out).with_suffix(".json").write_text(json.dumps({"losses": losses}))
    if ranks is not None:
        ranks.close(clean=True, stop=state.sharded.stop)


def _run_delta(nproc: int, data_dir: Path, out: Path) -> tuple[dict, list[float]]:
    from safetensors.torch import load_file

    code = (
        f"from tests.test_multi_rank import delta_main; delta_main({nproc}, {str(data_dir)!r}, {str(out)!r})"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=peer_env(), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out), json.loads(out.with_suffix(".json").read_text())["losses"]


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
    assert losses_two == pytest.approx(losses_one, rel=1e-4)
