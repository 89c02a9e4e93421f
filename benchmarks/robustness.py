"""Robust averaging benchmark: how much one (or two) poisoning peers slow a swarm, and what the rule costs.

    .venv/bin/python benchmarks/robustness.py --honest 3 --runs 3              # the scenario table
    .venv/bin/python benchmarks/robustness.py --only-timing                    # all-reduce seconds only
    .venv/bin/python benchmarks/robustness.py --only-timing --timing-config small   # a ~30M model's shapes

Prints, measured in this run:

1. **held-out loss ratios** (in-process DiLoCo simulation, the debug config): a swarm of ``--honest``
   peers plus attackers ÷ the same swarm without them, after ``--rounds`` rounds, for every scenario;
   and an honest-only swarm with the robust rule ÷ the same swarm with plain averaging. ``--runs``
   independent runs (other round seeds, so other pages), paired: run k of a scenario and run k of its
   baseline see the same seeds. Worst and median over runs. Targets: ≤ 1.02 and ≤ 1.01.
2. **all-reduce seconds**, robust rule ÷ plain mean, on the real consensus all-reduce (three
   ``ConsensusAverager`` processes with their DHTs on 127.0.0.1, 8-bit wire, default part size), alternating
   the two, ``--timing-reps`` times each, of ``--timing-values`` values or of a model config's parameter
   shapes (``--timing-config``); plus the rule's own time on one default-size part (3 and 5 senders) and
   the load average before and after (the timing is load-sensitive). Target ≤ 1.2.

The simulation is faithful where it matters and says where it is not:

* every simulated peer is a real :class:`peer.training.diloco.DilocoState` (its own AdamW state across
  rounds, warm-up, grad clip, Δ bounded to ``train.max_delta_norm``, Nesterov outer step) training the
  debug model for ``--steps`` inner steps on its own pages (``assign_pages`` with its hotkey and the
  round seed, ``round_batches`` order) — the trainer's code path without the wall clock;
* attackers train as well and send what ``peer.training.behaviour`` makes of their Δ (``sign-flip``,
  ``sign-flip-3/10/100``, ``scaled``, ``noise``); ``collude-flip`` is two attackers sending one identical
  vector (−Δ of the first attacker), ``collude`` two ``collude`` peers (one seeded direction);
* the all-reduce is the real one minus the network: every sender's Δ is laid out as one flat buffer
  (:func:`peer.training.allreduce.flatten_tensors`, as ``ConsensusAverager`` does; ``--per-tensor``: the
  old split, every tensor its own parts), hivemind's ``TensorPartContainer`` splits it into the same
  parts with the same 8-bit/fp16 wire compression, each part's owner screens
  the dequantized parts (``screen_part``: 4× its own part, ``max_part_norm``), feeds them in a shuffled
  arrival order to the real ``RobustPartReducer``, and every peer applies ``check_average`` of the owner's
  dequantized result. Owners (attackers included) run honest reducer code, as ``peer join --behaviour``
  does; a lying part owner is not simulated (see README, open gap).
* Every simulated peer applies the outer step itself and the benchmark asserts that all of them hold
  the same state hash after every round. Here that holds by construction (one owner computes each part);
  the bit-identity across real processes is what ``tests/test_allreduce.py`` and the swarm tests check.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import multiprocessing as mp
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peer.config import RunConfig, load_run_config  # noqa: E402
from peer.data.model import build_model, evaluate_loss, lm_loss  # noqa: E402
from peer.data.pages import PageStore, assign_pages, eval_pages, prepare_data, round_batches  # noqa: E402
from peer.training import behaviour as bh  # noqa: E402
from peer.training.behaviour import Behaviour  # noqa: E402
from peer.training.diloco import DilocoState  # noqa: E402
from peer.training.robust import MEDIAN_NORM_CLIP, PLAIN, RobustRule  # noqa: E402

RULES = {
    "robust": RobustRule(),
    "plain": PLAIN,
    "median-clip": MEDIAN_NORM_CLIP,
    "robust-nodir": RobustRule(direction_screen=False),  # the rule before the direction screen
    "robust-dir": RobustRule(direction_screen=True),  # = robust (the default since round 3)
}
ATTACKS = {  # scenario → behaviours of the extra peers
    "sign-flip": ["sign-flip"],
    "sign-flip-3": ["sign-flip-3"],
    "sign-flip-10": ["sign-flip-10"],
    "sign-flip-100": ["sign-flip-100"],
    "scaled": ["scaled"],
    "noise": ["noise"],
    "collude-flip": ["sign-flip", "copy-of-first"],
    "collude": ["collude", "collude"],
}


@dataclass(frozen=True, kw_only=True)
class Sim:
    honest: int
    attack: str | None  # a key of ATTACKS, None: honest only
    rule: str  # a key of RULES
    run: int
    rounds: int
    steps: int
    eval_pages: int
    flat: bool = True  # one flat buffer (ConsensusAverager's default) or per-tensor parts


def _seed(run: int, r: int) -> bytes:
    return hashlib.blake2b(f"robustness/{run}/{r}".encode(), digest_size=16).digest()


# ----------------------------------------------------------------------------------- the all-reduce


def _split(tensors, n_owners, compression):
    from hivemind.averaging.partition import TensorPartContainer

    container = TensorPartContainer(tensors, [1.0] * n_owners, compression=compression)
    return [list(container._input_parts_by_peer[j]) for j in range(n_owners)]


class _Counter:
    def __init__(self) -> None:
        self.rejected = 0

    def add(self, rejected: int = 0, **_) -> None:
        self.rejected += rejected


def consensus_average(
    inputs, weights, rule: RobustRule, max_part_norm: float, rng: random.Random, flat: bool = True
):
    """The consensus all-reduce of ``inputs`` (one list of tensors per sender), without the network.

    ``flat``: average one flat buffer of all tensors, as :class:`ConsensusAverager` does by default
    (False: every tensor split into its own parts, as before). Returns the tensors every peer ends with
    and the number of parts the owners clipped or dropped."""
    from hivemind.compression import deserialize_torch_tensor

    from peer.training.allreduce import RobustPartReducer, check_average, flatten_tensors, screen_part
    from peer.training.swarm import make_compression

    compression = make_compression("8bit")
    n = len(inputs)
    tensor_shapes = [t.shape for t in inputs[0]]
    if flat:
        inputs = [[flatten_tensors(tensors)] for tensors in inputs]
    split = [_split(tensors, n, compression) for tensors in inputs]  # [sender][owner] → [(part, info)]
    rejected = 0
    counter = _Counter()
    flat_out: list[torch.Tensor] = []
    for owner in range(n):
        own_parts = split[owner][owner]
        shapes = [p.shape for p, _ in own_parts]
        received = []
        for sender in range(n):
            parts = []
            for k, (part, info) in enumerate(split[sender][owner]):
                if sender == owner:  # the owner's own part goes in raw, as in ConsensusAllReduceRunner
                    parts.append((part, weights[sender]))
                    continue
                wire = deserialize_torch_tensor(compression.compress(part, info))
                p, w, rej = screen_part(
                    wire, weights[sender], own_parts[k][0], clip_ratio=4.0, max_part_norm=max_part_norm
                )
                rejected += rej
                parts.append((p, w))
            received.append(parts)

        async def reduce_all(shapes=shapes, received=received):
            reducer = RobustPartReducer(
                shapes, n, rule=rule, counters=counter
            )  # in the loop: it makes futures
            results = []
            for k in range(len(shapes)):
                order = list(range(n))
                rng.shuffle(order)  # arrival order must not matter
                outs = await asyncio.gather(
                    *(
                        reducer.accumulate_part(i, k, received[i][k][0], weight=received[i][k][1])
                        for i in order
                    )
                )
                results.append(outs[0])
            return results

        averaged = asyncio.run(reduce_all())
        for k, avg in enumerate(averaged):
            info = own_parts[k][1]
            wire = deserialize_torch_tensor(compression.compress(avg, info))
            out, rej = check_average(wire, max_part_norm)
            rejected += rej
            flat_out.append(out.reshape(-1))
    rejected += counter.rejected
    out = torch.cat(flat_out)
    result, offset = [], 0
    for shape in tensor_shapes:
        numel = math.prod(shape)
        result.append(out[offset : offset + numel].view(shape).clone())
        offset += numel
    return result, rejected


# ------------------------------------------------------------------------------------- one swarm


def simulate(sim: Sim, data_dir: str) -> dict:
    torch.set_num_threads(1)
    run: RunConfig = load_run_config("debug")
    store = PageStore(Path(data_dir), run.data)
    behaviours = ["honest"] * sim.honest + (ATTACKS[sim.attack] if sim.attack else [])
    hotkeys = [f"{b}-{i}" for i, b in enumerate(behaviours)]
    states = [DilocoState(build_model(run), run.train) for _ in behaviours]
    heldout = eval_pages(0, b"heldout-curve", store.heldout_pages, sim.eval_pages)
    heldout_batches = store.batches(heldout, 32)
    rule = RULES[sim.rule]
    rng = random.Random(sim.run)
    curve, rejected_total, t0 = [], 0, time.time()
    for r in range(sim.rounds):
        seed = _seed(sim.run, r)
        inputs, weights = [], []
        for b, hk, st in zip(behaviours, hotkeys, states, strict=True):
            if b == "copy-of-first":  # the second colluder sends the first attacker's vector, bit for bit
                inputs.append([t.clone() for t in inputs[sim.honest]])
                weights.append(1.0)
                continue
            pages = assign_pages(hk, r, seed, store.train_pages, run.data.pages_per_round)
            batches = round_batches(store.samples(pages), run.train.batch_size, seed + hk.encode())
            st.begin_round()
            st.model.train()
            for i in range(sim.steps):
                st.inner_step(lm_loss(st.model, batches[i % len(batches)]))
            tensors, w = bh.averaging_input(Behaviour(b), st.pseudo_gradient())
            inputs.append(tensors)
            weights.append(w)
        averaged, rejected = consensus_average(
            inputs, weights, rule, run.train.max_delta_norm, rng, flat=sim.flat
        )
        rejected_total += rejected
        for st in states:
            st.outer_step(averaged)
        hashes = {st.state_hash() for st in states}
        assert len(hashes) == 1, f"round {r}: simulated peers disagree"
        curve.append(evaluate_loss(states[0].model, heldout_batches, "cpu"))
    return {
        **asdict(sim),
        "final_loss": curve[-1],
        "curve": curve,
        "rejected": rejected_total,
        "seconds": time.time() - t0,
    }


def _simulate_star(args):
    return simulate(*args)


# ---------------------------------------------------------------------------------- timing part


def model_shapes(config: str) -> list[torch.Size]:
    """Parameter shapes of a shipped model config, in the model's order (built on the meta device)."""
    from peer.data.model import llama_config

    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(llama_config(load_run_config(config)))
    return [p.shape for p in model.parameters()]


def allreduce_timing(reps: int, values: int, config: str | None = None, flat: bool = True) -> dict:
    """Seconds of the real consensus all-reduce (3 averagers), robust rule vs plain mean, alternating.

    Inputs: one tensor of ``values`` values, or (``config``) one tensor per parameter of that model
    config, averaged as one flat buffer (``flat``, the default) or split per tensor."""
    import os

    import bitsandbytes  # noqa: F401  (before the averagers: blockwise 8-bit)
    import hivemind

    from peer.training.allreduce import ConsensusAverager, rule_executor
    from peer.training.robust import robust_mean
    from peer.training.swarm import make_compression

    g = torch.Generator().manual_seed(0)
    shapes = model_shapes(config) if config else [torch.Size([values])]
    values = sum(math.prod(s) for s in shapes)
    common = [torch.randn(s, generator=g) for s in shapes]
    inputs = [[c + torch.randn(c.shape, generator=g) for c in common] for _ in range(3)]
    load_before = os.getloadavg()
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [first] + [
        hivemind.DHT(
            start=True, initial_peers=first.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"]
        )
        for _ in range(2)
    ]
    times: dict[str, list[float]] = {"robust": [], "plain": []}
    try:
        for rep in range(reps):
            for name in ("plain", "robust") if rep % 2 == 0 else ("robust", "plain"):
                averagers = [
                    ConsensusAverager(
                        [t.clone() for t in ts],
                        dht=d,
                        prefix=f"timing{rep}{name}",
                        compression=make_compression("8bit"),
                        start=True,
                        min_matchmaking_time=4.0,
                        request_timeout=2.0,  # < min_matchmaking_time (hivemind warns otherwise)
                        rule=RULES[name],
                        flat=flat,
                    )
                    for ts, d in zip(inputs, dhts, strict=True)
                ]
                try:
                    controls = [a.step(wait=False, timeout=120, require_trigger=True) for a in averagers]
                    time.sleep(8.0)  # matchmaking done: time the all-reduce itself
                    t0 = time.perf_counter()
                    for c in controls:
                        c.allow_allreduce()
                    for c in controls:
                        assert c.result(timeout=120) is not None
                    times[name].append(time.perf_counter() - t0)
                finally:
                    for a in averagers:
                        a.shutdown()
    finally:
        for d in dhts:
            d.shutdown()
    load_after = os.getloadavg()
    # the rule alone on one default-size part (2^19 bytes of 8-bit wire = 524,288 values), 3 and 5 senders
    base = torch.randn(2**19, generator=g)
    rule_s = {}
    for n in (3, 5):
        parts = [base + torch.randn(2**19, generator=g) for _ in range(n)]
        for name in ("plain", "robust"):
            best = float("inf")
            for _ in range(10):
                t0 = time.perf_counter()
                rule_executor().submit(
                    robust_mean, parts, [1.0] * n, RULES[name]
                ).result()  # as the reducer runs it
                best = min(best, time.perf_counter() - t0)
            rule_s[f"{name}/{n}"] = best
    ratios = [r / p for r, p in zip(times["robust"], times["plain"], strict=True)]
    return {
        "values": values,
        "tensors": len(shapes),
        "config": config,
        "flat": flat,
        "seconds": times,
        "ratios": ratios,
        "rule_seconds_one_part": rule_s,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }


# ------------------------------------------------------------------------------- real swarm part


def _read_swarm(run_dir: Path) -> dict:
    """Per round: status, hash and held-out loss of every peer of a ``launch.local_subnet`` run."""
    rounds: dict[int, dict[str, dict]] = {}
    for f in sorted((run_dir / "peers").glob("*/rounds.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rounds.setdefault(r["round"], {})[f.parent.name] = r
    return rounds


def _check_hashes(per_round: dict) -> tuple[int, int, int]:
    """(rounds checked, rounds where peers that started from the same θ_r and averaged in one group ended
    with different θ_{r+1}, rounds whose group mixed peers that started from different θ_r).

    A peer's θ_r is its previous round's hash, or the majority's if it downloaded the state this round.
    Peers that averaged from different θ_r end apart by construction (the same average applied to
    different states); that is the sync step's business, not the all-reduce's, and is counted apart."""
    checked = split = mixed = 0
    previous: dict[str, str] = {}
    for r in sorted(per_round):
        peers = per_round[r]
        majority = max(set(previous.values()), key=list(previous.values()).count) if previous else None
        averaged = {name: p for name, p in peers.items() if p["status"] == "averaged"}
        bases = {
            name: (majority if p["synced_from_peer"] else previous.get(name)) for name, p in averaged.items()
        }
        if averaged:
            checked += 1
            if len(set(bases.values())) > 1:
                mixed += 1
            by_base: dict = {}
            for name, p in averaged.items():
                by_base.setdefault(bases[name], set()).add(p["state_hash"])
            if any(len(h) > 1 for h in by_base.values()):
                split += 1
        previous = {name: p["state_hash"] for name, p in peers.items()}
    return checked, split, mixed


def real_swarm(pairs: int, rounds: int, honest: int, attack: str) -> dict:
    """Real ``peer join`` processes via ``python -m launch.local_subnet --validators 0``: ``honest`` honest
    peers with and without one ``attack`` peer, alternating, ``pairs`` times. Checks that every peer that
    averaged in a round holds the same state hash, and compares held-out loss after ``rounds`` rounds
    (the ``rounds``-th round each run trained; wall-clock rounds, so inner steps vary between runs)."""
    out = []
    for k in range(pairs):
        pair = {}
        for with_attack in (True, False) if k % 2 == 0 else (False, True):
            run_dir = Path(tempfile.mkdtemp(prefix="gradswarm-bench-robust-swarm-"))
            cmd = [
                sys.executable, "-m", "launch.local_subnet", "--config", str(REPO / "launch" / "demo.yaml"),
                "--peers", str(honest), "--behaviours", attack if with_attack else "", "--validators", "0",
                "--rounds", str(rounds), "--run-dir", str(run_dir / "run"),
            ]  # fmt: skip
            t0 = time.time()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60 * rounds + 600)
            if proc.returncode != 0:
                raise RuntimeError(f"launcher failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            per_round = _read_swarm(run_dir / "run")
            checked, split, mixed = _check_hashes(per_round)
            honest_curve = [
                peers["peer-0"]["heldout_loss"] for _, peers in sorted(per_round.items()) if "peer-0" in peers
            ]
            pair["attack" if with_attack else "clean"] = {
                "rounds_checked": checked,
                "rounds_with_different_hashes_in_one_group": split,
                "rounds_whose_group_mixed_bases": mixed,
                "curve": honest_curve,
                "seconds": time.time() - t0,
                "inner_steps": [r["inner_steps"] for peers in per_round.values() for r in peers.values()],
            }
        n = min(len(pair["attack"]["curve"]), len(pair["clean"]["curve"]), rounds)
        pair["ratio"] = pair["attack"]["curve"][n - 1] / pair["clean"]["curve"][n - 1]
        pair["at_round_index"] = n
        print(
            f"  real swarm pair {k}: {honest} honest + {attack} ÷ {honest} honest after {n} rounds: "
            f"{pair['attack']['curve'][n - 1]:.4f} / {pair['clean']['curve'][n - 1]:.4f} = {pair['ratio']:.4f}; "
            f"rounds checked {pair['attack']['rounds_checked']} + {pair['clean']['rounds_checked']}, "
            f"rounds with split hashes (same base) {pair['attack']['rounds_with_different_hashes_in_one_group']} + "
            f"{pair['clean']['rounds_with_different_hashes_in_one_group']}, rounds with mixed bases "
            f"{pair['attack']['rounds_whose_group_mixed_bases']} + {pair['clean']['rounds_whose_group_mixed_bases']}",
            flush=True,
        )
        out.append(pair)
    return {"pairs": out, "ratios": [p["ratio"] for p in out]}


# -------------------------------------------------------------------------------------------- main


def _summary(results: list[dict], honest: int) -> list[tuple[str, list[float]]]:
    by = {}
    for res in results:
        if res["honest"] != honest:
            continue
        by[(res["attack"], res["rule"], res["run"])] = res["final_loss"]
    runs = sorted({k[2] for k in by})
    rows = []
    base = {k: by[(None, "robust", k)] for k in runs if (None, "robust", k) in by}
    plain = {k: by[(None, "plain", k)] for k in runs if (None, "plain", k) in by}
    if base and plain:
        rows.append(("honest only: robust ÷ plain", [base[k] / plain[k] for k in runs if k in plain]))
    for rule in RULES:
        if rule.startswith("robust-"):
            vals = [by[(None, rule, k)] / base[k] for k in runs if (None, rule, k) in by and k in base]
            if vals:
                rows.append((f"honest only: {rule} ÷ robust", vals))
    for attack in ATTACKS:
        for rule in RULES:
            vals = [by[(attack, rule, k)] / base[k] for k in runs if (attack, rule, k) in by and k in base]
            if vals:
                rows.append((f"{attack} ({rule}) ÷ honest only (robust)", vals))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--honest", default="3", help="comma-separated honest peer counts (3-5)")
    p.add_argument("--attacks", default=",".join(ATTACKS), help="comma-separated scenarios (see ATTACKS)")
    p.add_argument(
        "--extra-rules", default="", help="also run the attacks with these rules (plain,median-clip)"
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--steps", type=int, default=30, help="inner steps per round")
    p.add_argument("--eval-pages", type=int, default=8)
    p.add_argument("--jobs", type=int, default=2, help="simulations in parallel (one thread each)")
    p.add_argument("--timing-reps", type=int, default=3)
    p.add_argument("--timing-values", type=int, default=8_000_000, help="values all-reduced in the timing")
    p.add_argument(
        "--per-tensor",
        action="store_true",
        help="simulate the old split: every tensor in its own parts (default: one flat buffer)",
    )
    p.add_argument("--no-baseline", action="store_true", help="skip the honest-only plain-mean runs")
    p.add_argument(
        "--skip-robust-attacks",
        action="store_true",
        help="run the attacks with --extra-rules only (the robust ones were measured before: same seeds)",
    )
    p.add_argument(
        "--timing-config",
        default=None,
        help="time a model config's parameter shapes (e.g. small: ~30M values) instead of --timing-values",
    )
    p.add_argument("--only-timing", action="store_true")
    p.add_argument("--real-swarm", type=int, default=0, metavar="PAIRS", help="also run real swarms (pairs)")
    p.add_argument("--real-rounds", type=int, default=12)
    p.add_argument("--real-attack", default="sign-flip-10")
    p.add_argument("--skip-sim", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--out", default=None, help="write all results as JSON here")
    args = p.parse_args()

    out: dict = {"args": vars(args)}
    if args.real_swarm:
        out["real_swarm"] = real_swarm(args.real_swarm, args.real_rounds, 3, args.real_attack)
        r = out["real_swarm"]["ratios"]
        print(f"real swarm ratio worst {max(r):.4f} median {statistics.median(r):.4f} ({len(r)} pairs)")
    if not args.only_timing and not args.skip_sim:
        data_dir = Path(tempfile.gettempdir()) / "gradswarm-bench-robustness-data"
        prepare_data(load_run_config("debug").data, data_dir)
        honest_counts = [int(x) for x in args.honest.split(",")]
        attacks = [a for a in args.attacks.split(",") if a]
        extra = [r for r in args.extra_rules.split(",") if r]
        attack_rules = ["robust", *extra] if not args.skip_robust_attacks else extra
        sims = []
        for h in honest_counts:
            for k in range(args.runs):
                common = dict(
                    honest=h,
                    run=k,
                    rounds=args.rounds,
                    steps=args.steps,
                    eval_pages=args.eval_pages,
                    flat=not args.per_tensor,
                )
                sims.append(Sim(attack=None, rule="robust", **common))
                if not args.no_baseline:
                    sims.append(Sim(attack=None, rule="plain", **common))
                for rule in extra:
                    if rule.startswith("robust-"):  # a robust variant: its honest-only cost too
                        sims.append(Sim(attack=None, rule=rule, **common))
                for a in attacks:
                    for rule in attack_rules:
                        sims.append(Sim(attack=a, rule=rule, **common))
        t0 = time.time()
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            results = []
            for res in pool.imap_unordered(_simulate_star, [(s, str(data_dir)) for s in sims]):
                results.append(res)
                print(
                    f"  [{len(results)}/{len(sims)} {time.time() - t0:.0f}s] honest={res['honest']} "
                    f"attack={res['attack']} rule={res['rule']} run={res['run']}: "
                    f"loss {res['curve'][0]:.3f} → {res['final_loss']:.4f}, rejected {res['rejected']}",
                    flush=True,
                )
                if args.out:
                    Path(args.out).write_text(json.dumps({**out, "sims": results}, indent=1))
        out["sims"] = results
        for h in honest_counts:
            print(f"\nheld-out loss ratios, {h} honest peers, {args.rounds} rounds × {args.steps} steps:")
            for name, vals in _summary(results, h):
                print(
                    f"  {name:55s} worst {max(vals):.4f}  median {statistics.median(vals):.4f}  ({len(vals)} runs)"
                )
    if not args.skip_timing:
        timing = allreduce_timing(
            args.timing_reps, args.timing_values, args.timing_config, flat=not args.per_tensor
        )
        out["timing"] = timing
        fmt = lambda xs: " ".join(f"{x:.3f}" for x in xs)  # noqa: E731
        print(
            f"\nall-reduce of {timing['values']:,} values in {timing['tensors']} tensors "
            f"({'flat buffer' if timing['flat'] else 'per tensor'}), 3 peers, load average "
            f"{fmt(timing['loadavg_before'])} → {fmt(timing['loadavg_after'])}:\n"
            f"  robust {fmt(timing['seconds']['robust'])} s\n  plain  {fmt(timing['seconds']['plain'])} s\n"
            f"  ratio per rep {fmt(timing['ratios'])}: worst {max(timing['ratios']):.3f} "
            f"median {statistics.median(timing['ratios']):.3f}"
        )
        rs = timing["rule_seconds_one_part"]
        print(
            "rule alone on one 524,288-value part (best of 10): "
            + ", ".join(f"{k} senders {v * 1e3:.2f} ms" for k, v in rs.items())
        )
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
