"""Loss parity: a DiLoCo swarm against one process trained on exactly the same samples.

    .venv/bin/python benchmarks/parity.py swarm [--config debug] [--peers 2,4] [--rounds 12]
        [--rounds-mode blocking|overlapped] [--outer-lr 0.7] [--outer-momentum 0.9] [--peer-args='…']
    .venv/bin/python benchmarks/parity.py sim [--config debug] [--peers 2,4] [--rounds 12] [--inner 60]
        [--rounds-mode blocking|overlapped] [--arms 0.7:0.9,0.4:0.9,1.0:0] [--warm-start 0]

``swarm``: for each swarm size k, k real ``peer join`` processes (8-bit all-reduce, DiLoCo rounds, one
thread each) and a bootstrap on 127.0.0.1 train ``--rounds`` rounds; after each round every peer logs the
held-out loss of its θ on the same 16 fixed held-out pages. ``--outer-lr`` /
``--outer-momentum`` run the peers on a copy of the config with those outer-optimizer values;
``--peer-args`` goes to every peer as is. A peer's samples are a pure function of what it logged (round
r's pages are ``assign_pages(hotkey, r, seed_r)``, their order ``round_batches(…, seed_r + hotkey)``, and it
trained the first ``inner_steps`` batches of that order, cycling): the benchmark rebuilds exactly those
batches for every peer and round (checked against the logged ``samples``); samples of rounds a peer
could not average (alone, failed) count too: the swarm spent them. Asserts bit-identical state hashes
after every averaged round.

``sim``: the same algorithm in one process, fast and deterministic, to tune the outer optimizer: k
peers train ``--inner`` AdamW steps per round on their ``assign_pages`` batches (inner optimizer kept across
rounds, Δ norm bound, the 8-bit blockwise codec's error, the swarm's robust rule, Nesterov outer step;
``overlapped``: the rule of ``peer/training/trainer.py`` — start point θ_r − w·Δ_{r−1} with w = 1, outer
step one round late; an arm's third field sets another w, ``auto`` = 1/k). Every arm trains on the same
batches from the same θ_0. ``--warm-start N``: θ_0 is first trained N plain AdamW steps on pages of its
own draw (never held-out ones), as DiLoCo's experiments start from a pre-trained model; baselines start
from the same θ_0.

Baselines: one process, the same samples, the peers' inner AdamW settings (lr, warm-up, clipping), the same
θ_0, held-out loss on the same pages after each round's samples:

* ``dp`` — synchronous data parallelism, the run a k-peer swarm replaces: step i of round r takes one
  gradient over the i-th batches of all peers that trained ≥ i steps that round (global batch k·b, as many
  sequential steps as one peer). DiLoCo's "k× batch size with data parallelism" baseline, OpenDiLoCo's
  DDP baseline with the swarm's global batch.
* ``seq`` — every peer batch is a step of its own (batch b, k× the sequential steps, k× the wall time):
  DiLoCo's "k× updates" baseline, the strongest one (which DiLoCo itself does not match).

Prints per round: cumulative samples, held-out loss of the swarm and the baselines, swarm ÷ baseline
(target ≤ 1.02), and a SUMMARY line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from wan import assert_identical, data_dir, run_swarm  # noqa: E402

HELDOUT_PAGES = 16
BASELINES = ("dp", "seq")


# -- the samples ---------------------------------------------------------------------------------------


def peer_round_batches(store, cfg, hotkey: str, r: int, seed: bytes, steps: int) -> list:
    """The batches a peer with ``hotkey`` trains in round r: the first ``steps`` of its round order."""
    from peer.data.pages import assign_pages, round_batches

    pages = assign_pages(hotkey, r, seed, store.train_pages, cfg.data.pages_per_round)
    order = round_batches(store.samples(pages), cfg.train.batch_size, seed + hotkey.encode())
    return [order[j % len(order)] for j in range(steps)]


def swarm_batches(result, config: str) -> dict[int, list[list]]:
    """round → per peer, the batches it trained in that round, rebuilt from the peers' logs."""
    from peer.config import load_run_config
    from peer.data.pages import PageStore
    from peer.training.clock import WallClock

    cfg = load_run_config(config)
    store = PageStore(data_dir(config), cfg.data)
    clock = WallClock(run_id=result.run_id, round_seconds=1.0)  # the seed depends on run id and round only
    out: dict[int, list[list]] = {}
    for hotkey, rounds in zip(result.hotkeys, result.rounds, strict=True):
        for x in rounds:
            r = x["round"]
            used = peer_round_batches(store, cfg, hotkey, r, clock.seed(r), x["inner_steps"])
            assert sum(len(b) for b in used) == x["samples"], (hotkey, r, x["samples"])
            out.setdefault(r, []).append(used)
    return out


def zip_longest_batches(per_peer: list[list]) -> list[list]:
    """Step i of a round: the i-th batch of every peer that trained ≥ i + 1 steps."""
    longest = max((len(p) for p in per_peer), default=0)
    return [[p[i] for p in per_peer if i < len(p)] for i in range(longest)]


def heldout_batches(store) -> list:
    from peer.data.pages import eval_pages

    return store.batches(eval_pages(0, b"heldout-curve", store.heldout_pages, HELDOUT_PAGES), 32)


# -- baselines -----------------------------------------------------------------------------------------


def inner_trainer(cfg, model):
    """One plain AdamW step function with the peers' settings (lr, linear warm-up, clipping)."""
    import torch

    from peer.data.model import lm_loss
    from peer.training.diloco import make_inner_optimizer

    train = cfg.train
    opt = make_inner_optimizer("adamw", model.parameters(), train)
    steps = [0]

    def step(batch) -> None:
        warm = train.warmup_steps
        lr = train.inner_lr * min(1.0, (steps[0] + 1) / warm) if warm else train.inner_lr
        for group in opt.param_groups:
            group["lr"] = lr
        lm_loss(model, batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps[0] += 1

    return step


def baseline_curve(cfg, theta0, batches: dict[int, list[list]], kind: str, heldout) -> dict[int, float]:
    """Held-out loss after each round's samples of the ``dp`` or ``seq`` baseline (module docstring)."""
    import torch

    from peer.data.model import build_model, evaluate_loss

    model = build_model(cfg)
    with torch.no_grad():
        for p, t in zip(model.parameters(), theta0, strict=True):
            p.copy_(t)
    step = inner_trainer(cfg, model)
    curve = {}
    for r in sorted(batches):
        model.train()
        for together in zip_longest_batches(batches[r]):
            if kind == "dp":
                step(torch.cat(together))  # one gradient over every peer's batch: mean over k·b samples
            else:
                for b in together:
                    step(b)
        curve[r] = evaluate_loss(model, heldout, "cpu")
    return curve


def compare(swarm: dict[int, float], baselines: dict[str, dict[int, float]], batches) -> list[dict]:
    """The curve: rounds where the swarm has a held-out loss, with cumulative samples and ratios."""
    samples, curve = 0, []
    for r in sorted(batches):
        samples += sum(len(b) for peer in batches[r] for b in peer)
        if r not in swarm:
            continue
        row = {"round": r, "samples": samples, "swarm": round(swarm[r], 4)}
        for kind, c in baselines.items():
            row[kind] = round(c[r], 4)
            row[f"swarm/{kind}"] = round(swarm[r] / c[r], 4)
        curve.append(row)
    return curve


def summary(curve: list[dict]) -> dict:
    last = curve[-1] if curve else {}
    return {f"final_swarm/{k}": last.get(f"swarm/{k}") for k in BASELINES}


# -- swarm ----------------------------------------------------------------------------------------------


def swarm_curve(result) -> dict[int, float]:
    """round → held-out loss of the first θ that includes round r's average (the first peer that logged)."""
    curve: dict[int, float] = {}
    for rounds in result.rounds:
        for x in rounds:
            if x.get("heldout_loss") is not None:
                curve.setdefault(x["round"], x["heldout_loss"])
    return curve


def variant_config(
    tmp: Path, config: str, outer_lr: float | None, outer_momentum: float | None
) -> Path | None:
    """A copy of ``config`` with other outer-optimizer values (same file stem: same run config name)."""
    import yaml

    from peer.config import CONFIG_DIR, load_run_config

    if outer_lr is None and outer_momentum is None:
        return None
    src = Path(config) if Path(config).suffix else CONFIG_DIR / f"{config}.yaml"
    raw = yaml.safe_load(src.read_text())
    train = raw.setdefault("train", {})
    if outer_lr is not None:
        train["outer_lr"] = outer_lr
        train["overlapped_outer_lr"] = None  # the given value holds in overlapped rounds too
    if outer_momentum is not None:
        train["outer_momentum"] = outer_momentum
        train["overlapped_outer_momentum"] = None
    path = tmp / "variant" / src.name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    load_run_config(str(path))  # validated like any shipped config
    return path


def run_swarm_parity(args) -> int:
    import signal

    import torch

    from peer.config import load_run_config
    from peer.data.model import build_model
    from peer.data.pages import PageStore

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: no stray peers
    torch.set_num_threads(1)  # what the baselines learn does not depend on threads; 1 is fastest here
    results = header(args)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        variant = variant_config(tmp, args.config, args.outer_lr, args.outer_momentum)
        cfg = load_run_config(str(variant) if variant else args.config)
        lr, mu = dataclasses.replace(cfg.train, rounds=args.rounds_mode).outer_settings()
        results["outer"] = {"lr": lr, "momentum": mu}  # what the peers' outer step uses in this mode
        round_s = args.round_seconds or cfg.train.round_seconds
        store = PageStore(data_dir(args.config), cfg.data)
        heldout = heldout_batches(store)
        theta0 = [p.detach().clone() for p in build_model(cfg).parameters()]  # the peers' θ_0 (same seed)
        for n in [int(x) for x in args.peers.split(",")]:
            extra = [
                *("--round-seconds", str(round_s), "--max-rounds", str(args.rounds)),
                *("--eval-pages", str(HELDOUT_PAGES), "--compression", "8bit"),
                *("--round-genesis", str(int(time.time())), "--rounds", args.rounds_mode),
                *(("--config", str(variant)) if variant else ()),  # the last --config wins
                *shlex.split(args.peer_args),
            ]
            res = run_swarm(tmp, name=f"parity{n}", config=args.config, peers=n, extra=extra)
            identical = assert_identical(res.rounds)
            # rounds every peer logged: the curve is compared there
            common = sorted(set.intersection(*({x["round"] for x in r} for r in res.rounds)))
            batches = {r: b for r, b in swarm_batches(res, args.config).items() if r <= common[-1]}
            baselines = {k: baseline_curve(cfg, theta0, batches, k, heldout) for k in BASELINES}
            curve = compare(swarm_curve(res), baselines, batches)
            statuses = [x["status"] for r in res.rounds for x in r]
            fig = {
                "peers": n,
                "samples": curve[-1]["samples"] if curve else 0,
                "rounds_averaged_identical": identical,
                "statuses": {s: statuses.count(s) for s in set(statuses)},
                "mean_inner_steps": round(
                    sum(x["inner_steps"] for r in res.rounds for x in r) / len(statuses), 1
                ),
                **summary(curve),
                "curve": curve,
            }
            results["swarms"][n] = fig
            print(json.dumps(fig), flush=True)
    results["load_after"] = os.getloadavg()
    print("SUMMARY " + json.dumps(results))
    return 0


# -- sim ------------------------------------------------------------------------------------------------


def sim_batches(store, cfg, peers: int, rounds: int, inner: int) -> dict[int, list[list]]:
    from peer.training.clock import WallClock

    clock = WallClock(run_id="parity-sim", round_seconds=1.0)
    return {
        r: [peer_round_batches(store, cfg, f"sim-peer-{i}", r, clock.seed(r), inner) for i in range(peers)]
        for r in range(rounds)
    }


def warm_start(cfg, store, steps: int) -> list:
    """θ_0: the seed's initial weights, then ``steps`` plain AdamW steps on pages of its own draw (never held-out ones)."""

    from peer.data.model import build_model
    from peer.data.pages import assign_pages, round_batches

    model = build_model(cfg)
    if steps:
        pages = assign_pages("parity-warm-start", 0, b"warm", store.train_pages, 4 * cfg.data.pages_per_round)
        order = round_batches(store.samples(pages), cfg.train.batch_size, b"warm-start")
        step = inner_trainer(cfg, model)
        model.train()
        for j in range(steps):
            step(order[j % len(order)])
    return [p.detach().clone() for p in model.parameters()]


EXTRAPOLATE = -1.0
"""An arm's eager field ``ext``: every peer starts round r+1 from x_{r+1} = θ_{r+1} + (θ_{r+1} − θ_r), the
swarm's last outer step taken once more (a start point every peer and validator can compute from public
states), instead of its own Δ_r."""


def simulate_swarm(
    cfg, theta0, batches, mode: str, lr: float, mu: float, heldout, eager: float | None = 1.0
) -> dict[int, float]:
    """DiLoCo over ``batches`` (round → per-peer batches) in one process: held-out loss of θ per round
    (blocking: θ_{r+1}; overlapped: the first θ that includes ḡ_r, i.e. θ_{r+2}, as the peers log it).
    ``eager``: w in the overlapped start point x_{r+1} = θ_{r+1} − w·Δ_r (1.0: the peers' rule; None:
    1/k, each peer's own share of the average, as "Eager updates" (Kale et al. 2025) weight the local
    outer gradient; RESULTS "Overlapped rounds: why validators refuse honest Δs")."""
    import torch
    from sparse import robust_average

    from peer.data.model import build_model, evaluate_loss
    from peer.net.outbox import dequantize_blockwise, quantize_blockwise

    bound = cfg.train.max_delta_norm
    theta = [t.clone() for t in theta0]
    momentum = [torch.zeros_like(t) for t in theta]
    peers = []
    for _ in batches[min(batches)]:
        model = build_model(cfg)
        peers.append({"model": model, "step": inner_trainer(cfg, model), "carry": None})
    eval_model = build_model(cfg)

    def outer_step(avg) -> None:
        for s, m, g in zip(theta, momentum, avg, strict=True):
            m.mul_(mu).add_(g)
            s.sub_(g.add(m, alpha=mu), alpha=lr)

    def loss_of_theta() -> float:
        with torch.no_grad():
            for p, s in zip(eval_model.parameters(), theta, strict=True):
                p.copy_(s)
        return evaluate_loss(eval_model, heldout, "cpu")

    curve, pending = {}, None
    for r in sorted(batches):
        deltas, raw = [], []
        for peer, peer_batches in zip(peers, batches[r], strict=True):
            model = peer["model"]
            with torch.no_grad():  # x_r = θ_r − c_r
                for p, s, c in zip(
                    model.parameters(), theta, peer["carry"] or [None] * len(theta), strict=True
                ):
                    p.copy_(s if c is None else s - c)
                start = [p.detach().clone() for p in model.parameters()]
            model.train()
            for b in peer_batches:
                peer["step"](b)
            with torch.no_grad():
                delta = [x - p.detach() for x, p in zip(start, model.parameters(), strict=True)]
            norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta))
            if norm > bound:
                delta = [d * (bound / norm) for d in delta]
            raw.append(delta)
            deltas.append([dequantize_blockwise(*quantize_blockwise(d), tuple(d.shape)) for d in delta])
        avg = robust_average(deltas)
        with torch.no_grad():
            if mode == "blocking":
                outer_step(avg)
                curve[r] = loss_of_theta()
            else:
                before = [t.clone() for t in theta] if eager == EXTRAPOLATE else None
                if pending is not None:  # θ_{r+1} = OuterStep(θ_r, ḡ_{r−1})
                    outer_step(pending)
                    curve[r - 1] = loss_of_theta()
                pending = avg
                if eager == EXTRAPOLATE:  # x_{r+1} = θ_{r+1} + (θ_{r+1} − θ_r): shared by every peer
                    step = [b - t for b, t in zip(before, theta, strict=True)]
                    for peer in peers:
                        peer["carry"] = step
                    continue
                w = 1.0 / len(peers) if eager is None else eager
                for peer, delta in zip(peers, raw, strict=True):
                    peer["carry"] = [d * w for d in delta]  # x_{r+1} = θ_{r+1} − w·Δ_r
    if pending is not None:  # the last all-reduce is applied when the peers stop (trainer.drain)
        with torch.no_grad():
            outer_step(pending)
        curve[max(batches)] = loss_of_theta()
    return curve


def parse_arms(text: str, cfg) -> list[tuple[float, float, float | None]]:
    """``lr:momentum[:eager]`` items; eager is a weight in [0, 1] (default 1.0, the peers' rule) or ``auto``
    (1/k)."""
    arms = []
    for item in text.split(","):
        bits = item.split(":")
        lr = float(bits[0]) if bits[0] else cfg.train.outer_lr
        mu = float(bits[1]) if len(bits) > 1 and bits[1] else cfg.train.outer_momentum
        w = bits[2] if len(bits) > 2 and bits[2] else "1.0"
        eager = None if w == "auto" else EXTRAPOLATE if w == "ext" else float(w)
        arms.append((lr, mu, eager))
    return arms


def run_sim(args) -> int:
    import torch

    from peer.config import load_run_config
    from peer.data.pages import PageStore

    torch.set_num_threads(args.threads)
    cfg = load_run_config(args.config)
    results = header(args)
    store = PageStore(data_dir(args.config), cfg.data)
    heldout = heldout_batches(store)
    theta0 = warm_start(cfg, store, args.warm_start)
    results.update(inner=args.inner, warm_start=args.warm_start)
    for n in [int(x) for x in args.peers.split(",")]:
        t0 = time.time()
        batches = sim_batches(store, cfg, n, args.rounds, args.inner)
        baselines = {k: baseline_curve(cfg, theta0, batches, k, heldout) for k in BASELINES}
        arms = []
        for lr, mu, eager in parse_arms(args.arms, cfg):
            swarm = simulate_swarm(cfg, theta0, batches, args.rounds_mode, lr, mu, heldout, eager)
            curve = compare(swarm, baselines, batches)
            fig = {
                "peers": n,
                "outer_lr": lr,
                "outer_momentum": mu,
                "eager_weight": "auto" if eager is None else "ext" if eager == EXTRAPOLATE else eager,
                **summary(curve),
                "curve": curve,
            }
            print(json.dumps(fig), flush=True)
            arms.append(fig)
        results["swarms"][n] = {"arms": arms, "seconds": round(time.time() - t0, 1)}
    results["load_after"] = os.getloadavg()
    print("SUMMARY " + json.dumps(results))
    return 0


# -- main -----------------------------------------------------------------------------------------------


def header(args) -> dict:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()}-core CPU box",
        "command": " ".join(sys.argv),
        "config": args.config,
        "rounds_mode": args.rounds_mode,
        "load_before": os.getloadavg(),
        "swarms": {},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default="debug")
    common.add_argument("--peers", default="2,4", help="swarm sizes, comma-separated")
    common.add_argument("--rounds", type=int, default=12)
    common.add_argument("--rounds-mode", choices=["blocking", "overlapped"], default="blocking")
    sw = sub.add_parser("swarm", parents=[common], help="real peer processes on 127.0.0.1")
    sw.add_argument("--round-seconds", type=float, default=None, help="default: the config's")
    sw.add_argument("--outer-lr", type=float, default=None, help="default: the config's")
    sw.add_argument("--outer-momentum", type=float, default=None, help="default: the config's")
    sw.add_argument("--peer-args", default="", help="extra `peer join` flags")
    sim = sub.add_parser("sim", parents=[common], help="the same algorithm in one process (tuning)")
    sim.add_argument("--inner", type=int, default=60, help="inner steps per peer per round (H)")
    sim.add_argument(
        "--arms",
        default="0.7:0.9",
        help="outer lr:momentum[:eager weight, overlapped] items, comma-separated",
    )
    sim.add_argument("--warm-start", type=int, default=0, help="plain AdamW steps that train θ_0 first")
    sim.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    return run_swarm_parity(args) if args.cmd == "swarm" else run_sim(args)


if __name__ == "__main__":
    sys.exit(main())
