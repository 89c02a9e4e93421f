"""A small, real world for validator tests: prepared data, a debug model, and real Δs of each behaviour.

The world is a *blocking* swarm (``train.rounds: blocking``, ``World.config_path``): round 1's Δs are
evaluated on θ_1. Validators run in these tests take ``--config w.config_path``.

Δs are made the way peers make them (``peer.training.diloco.DilocoState``: inner AdamW steps, Δ = θ_r − θ_local,
norm-clipped) on the debug model, for two rounds: round 0 from the initial weights (four honest peers,
averaged and applied with the outer Nesterov step), then round 1 with every behaviour. Built once per
test session (``world()`` is cached) in ~10 s on a 2-core CPU.

Import the fixture in a test module: ``from tests.fixtures_validator import validator_world  # noqa: F401``.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from peer.chain.local import LocalLedger
from peer.config import load_run_config
from peer.data.model import build_model, lm_loss
from peer.data.pages import PageStore, assign_pages, eval_pages, prepare_data, round_batches
from peer.net.outbox import encode_delta
from peer.training.diloco import DilocoState
from tests.fixtures_swarm import debug_config_file

INNER_STEPS = 40
ROUND_BLOCKS = 10
GENESIS_ID = hashlib.blake2b(
    os.environ.get("GRADSWARM_FIXTURE_GENESIS", "validator-fixture-1").encode(), digest_size=16
).hexdigest()
HONEST = ["hk-honest-a", "hk-honest-b", "hk-honest-c"]


PAGE_WAIT = re.compile(r"waiting for block (\d+), whose hash draws the evaluated pages")
"""What ``validator run`` logs once it holds every Δ (validator.loop.PAGE_WAIT)."""


def run_validators(
    cmds: list[list[str]],
    ledger_path: Path,
    *,
    cwd: Path,
    env: dict,
    timeout: float = 240.0,
    produced: dict[int, str] | None = None,
) -> list[subprocess.CompletedProcess]:
    """Run ``validator run`` processes side by side on the world's ledger, whose head stands still: once
    every one still running waits for the block whose hash draws its evaluated pages (it logs
    :data:`PAGE_WAIT`), that block is produced. Validators started together therefore draw the same
    pages. Afterwards the head is put back where it was, so every test sees the same rounds; ``produced``
    receives the hashes of the blocks that existed meanwhile (block → hash)."""
    ledger = LocalLedger(ledger_path)
    head0 = ledger.block()
    with tempfile.TemporaryDirectory(prefix="gradswarm-validators-") as d:
        logs = [(Path(d) / f"{i}.out", Path(d) / f"{i}.err") for i in range(len(cmds))]
        procs = []
        try:
            for cmd, (out, err) in zip(cmds, logs, strict=True):
                with open(out, "wb") as o, open(err, "wb") as e:
                    procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=o, stderr=e))
            deadline = time.monotonic() + timeout
            while any(p.poll() is None for p in procs):
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(cmds[0], timeout)
                waits = [
                    max((int(n) for n in PAGE_WAIT.findall(err.read_text(errors="replace"))), default=None)
                    for p, (_, err) in zip(procs, logs, strict=True)
                    if p.poll() is None
                ]
                head = ledger.block()
                if waits and all(w is not None and w > head for w in waits):
                    ledger.advance(max(waits) - head)
                    if produced is not None:
                        produced.update({n: ledger.block_hash(n) for n in range(head + 1, max(waits) + 1)})
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
            _put_head_back(ledger, head0)
            ledger.close()
        return [
            subprocess.CompletedProcess(
                cmd, p.returncode, out.read_text(errors="replace"), err.read_text(errors="replace")
            )
            for cmd, p, (out, err) in zip(cmds, procs, logs, strict=True)
        ]


def _put_head_back(ledger: LocalLedger, n: int) -> None:
    """The dev ledger's head is a function of its genesis time (LocalLedger.advance moves it forward)."""
    with ledger._tx() as db:
        db.execute(
            "UPDATE meta SET value=? WHERE key='genesis_time'",
            (repr(time.time() - (n + 0.5) * ledger.block_time),),
        )
    assert ledger.block() == n


def keypair(name: str):
    """A real sr25519 hotkey derived from a name (deterministic)."""
    from substrateinterface import Keypair, KeypairType

    return Keypair.create_from_uri(f"//{name}", crypto_type=KeypairType.SR25519)


def _hotkey(name: str) -> str:
    return keypair(name).ss58_address


@dataclass
class World:
    run: object
    store: PageStore
    data_dir: Path
    seeds: dict[int, bytes]
    bases: dict[int, dict[str, torch.Tensor]]
    """round → θ_r (name → fp32 tensor)."""
    hotkeys: dict[str, str]
    """behaviour name → ss58 hotkey (``keypair(name)`` is its key)."""
    config_path: Path
    """The debug config with ``rounds: blocking`` (named ``debug``): pass it to a validator's ``--config``."""
    ledger_path: Path
    """A LocalLedger (block time 10,000 s: its head stays at block 15) whose block hashes are the seeds
    of rounds 0 and 1 (``ROUND_BLOCKS`` blocks per round)."""
    deltas: dict[int, dict[str, dict[str, torch.Tensor]]] = field(default_factory=dict)
    """round → behaviour name → Δ."""
    pages: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    """round → behaviour name → pages it trained on."""

    def blob(self, round_: int, name: str) -> bytes:
        return encode_delta(self.deltas[round_][name])


def train_delta(
    run, store: PageStore, base: dict[str, torch.Tensor], pages: list[int], steps: int, seed: int
) -> dict[str, torch.Tensor]:
    """Δ of ``steps`` inner steps on ``pages`` from ``base``, exactly as a peer computes it."""
    model = build_model(run)
    state = DilocoState(model, run.train)
    state.load_state_tensors(
        [base[n] for n in state.names] + [torch.zeros_like(base[n]) for n in state.names]
    )
    state.begin_round()
    batches = round_batches(store.samples(pages), run.train.batch_size, f"fixture-{seed}".encode())
    model.train()
    for i in range(steps):
        state.inner_step(lm_loss(model, batches[i % len(batches)]))
    return dict(zip(state.names, state.pseudo_gradient(), strict=True))


def _remove_world_files(data_dir: Path) -> None:
    """The session's world lives in the temp folder: its data, config folder and ledger go at exit."""
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.rmtree(data_dir.parent / f"{data_dir.name}-config", ignore_errors=True)
    for suffix in ("", "-wal", "-shm", "-journal"):
        (data_dir.parent / f"{data_dir.name}-ledger.sqlite{suffix}").unlink(missing_ok=True)


@functools.lru_cache(maxsize=1)
def world() -> World:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    data_dir = Path(tempfile.mkdtemp(prefix="gradswarm-validator-data-"))
    atexit.register(_remove_world_files, data_dir)
    config_path = debug_config_file(data_dir.parent / f"{data_dir.name}-config", "blocking")
    run = load_run_config(str(config_path))
    prepare_data(run.data, data_dir)
    store = PageStore(data_dir, run.data)
    k = run.data.pages_per_round
    names = [*HONEST, "free-rider", "copycat", "random-data", "nan", "scaled", "sign-flip", "stale", "dup"]
    hotkeys = {n: _hotkey(n) for n in names}
    model = build_model(run)
    base0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    # the seeds are the chain's: hashes of the rounds' first blocks on a LocalLedger whose head stands still
    ledger_path = data_dir.parent / f"{data_dir.name}-ledger.sqlite"
    # a fixed genesis: the same seeds, pages and Δs in every run (the benchmark measures the spread over seeds)
    ledger = LocalLedger(ledger_path, block_time=10_000.0, genesis_id=GENESIS_ID)
    ledger.advance(ROUND_BLOCKS + ROUND_BLOCKS // 2)
    seeds = {r: bytes.fromhex(ledger.block_hash(r * ROUND_BLOCKS).removeprefix("0x")) for r in range(2)}
    ledger.close()
    w = World(
        run=run,
        store=store,
        data_dir=data_dir,
        seeds=seeds,
        bases={0: base0},
        hotkeys=hotkeys,
        config_path=config_path,
        ledger_path=ledger_path,
    )

    # round 0: the honest peers and the stale peer train; the swarm averages. The stale peer's Δ of round 0
    # stands for its first replay (published in an earlier round); round 1 is a later replay of it
    w.deltas[0], w.pages[0] = {}, {}
    for i, n in enumerate([*HONEST, "stale"]):
        pages = assign_pages(hotkeys[n], 0, seeds[0], store.train_pages, k)
        w.pages[0][n] = pages
        w.deltas[0][n] = train_delta(run, store, base0, pages, INNER_STEPS, seed=i)
    avg = {t: sum(d[t] for d in w.deltas[0].values()) / len(w.deltas[0]) for t in base0}
    mu, lr = run.train.outer_momentum, run.train.outer_lr
    w.bases[1] = {t: base0[t] - lr * (avg[t] + mu * avg[t]) for t in base0}  # Nesterov from zero momentum

    # round 1: every behaviour
    base1, d1, p1 = w.bases[1], {}, {}
    for i, n in enumerate(HONEST):
        p1[n] = assign_pages(hotkeys[n], 1, seeds[1], store.train_pages, k)
        d1[n] = train_delta(run, store, base1, p1[n], INNER_STEPS, seed=10 + i)
    own = set(assign_pages(hotkeys["random-data"], 1, seeds[1], store.train_pages, k))
    others = [p for p in store.train_pages if p not in own]
    p1["random-data"] = eval_pages(1, seeds[1], others, k, purpose="random-data")
    d1["random-data"] = train_delta(run, store, base1, p1["random-data"], INNER_STEPS, seed=20)
    a = d1[HONEST[0]]
    d1["free-rider"] = {t: torch.zeros_like(v) for t, v in a.items()}
    d1["copycat"] = {t: sum(d1[n][t] for n in HONEST) / len(HONEST) for t in a}  # the swarm's average
    d1["dup"] = {t: v.clone() for t, v in a.items()}  # a verbatim copy of honest-a's Δ
    d1["nan"] = {t: torch.full_like(v, float("nan")) for t, v in a.items()}
    # scaled and sign-flip: a real trained Δ of another peer's kind, misused (saves two trainings)
    d1["scaled"] = {t: 100 * v for t, v in d1[HONEST[2]].items()}
    d1["sign-flip"] = {t: -v for t, v in d1[HONEST[1]].items()}
    d1["stale"] = w.deltas[0]["stale"]
    for n in ("free-rider", "copycat", "dup", "nan", "scaled", "sign-flip", "stale"):
        p1[n] = assign_pages(hotkeys[n], 1, seeds[1], store.train_pages, k)
    w.deltas[1], w.pages[1] = d1, p1
    return w


@pytest.fixture(scope="session")
def validator_world() -> World:
    return world()
