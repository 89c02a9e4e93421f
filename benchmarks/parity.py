"""Loss parity: a DiLoCo swarm vs one process that trains on exactly the same samples.

    .venv/bin/python benchmarks/parity.py [--config debug] [--peers 2,4] [--rounds 8] [--peer-args='…']

(b) For each swarm size n: n real ``peer join`` processes (8-bit all-reduce, DiLoCo rounds, one thread
each) and a bootstrap on 127.0.0.1 train ``--rounds`` rounds; ``--peer-args`` is passed to every peer as
is (e.g. the overlapped-rounds flag). After each round every peer logs the held-out loss of θ_{r+1} on
the same fixed held-out pages (``--eval-pages``).

(a) "The same N samples": a peer's samples are a pure function of what it logged — round r's pages are
``assign_pages(hotkey, r, seed_r)``, their order is ``round_batches(…, seed_r + hotkey)``, and it trained
the first ``inner_steps`` batches of that order (cycling). The benchmark rebuilds exactly those batches
for every peer and round (and checks their count against the logged ``samples``), and a single process
(the peers' inner AdamW settings, warm-up and clipping, the same initial weights) trains on all of them,
round by round, the peers' batches interleaved. After each round's samples it evaluates on the same
held-out pages. Samples of rounds a peer could not average (alone, failed) count too: the swarm spent them.

Prints the curve (per round: cumulative samples, swarm and single held-out loss, ratio) and the final
ratio swarm ÷ single (target ≤ 1.02). Asserts bit-identical state hashes after every averaged round.
"""

from __future__ import annotations

import argparse
import json
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


def swarm_batches(result, config: str) -> dict[int, list]:
    """round → the batches every peer trained in that round (peers interleaved), rebuilt from the logs."""
    from peer.config import load_run_config
    from peer.data.pages import PageStore, assign_pages, round_batches
    from peer.training.clock import WallClock

    cfg = load_run_config(config)
    store = PageStore(data_dir(config), cfg.data)
    clock = WallClock(run_id=result.run_id, round_seconds=1.0)  # the seed depends on run id and round only
    out: dict[int, list] = {}
    for hotkey, rounds in zip(result.hotkeys, result.rounds, strict=True):
        for x in rounds:
            r, seed = x["round"], clock.seed(x["round"])
            pages = assign_pages(hotkey, r, seed, store.train_pages, cfg.data.pages_per_round)
            order = round_batches(store.samples(pages), cfg.train.batch_size, seed + hotkey.encode())
            used = [order[j % len(order)] for j in range(x["inner_steps"])]
            assert sum(len(b) for b in used) == x["samples"], (hotkey, r, x["samples"])
            out.setdefault(r, []).append(used)
    return {r: [b for step in zip_longest_batches(per_peer) for b in step] for r, per_peer in out.items()}


def zip_longest_batches(per_peer: list[list]) -> list[list]:
    longest = max((len(p) for p in per_peer), default=0)
    return [[p[i] for p in per_peer if i < len(p)] for i in range(longest)]


def single_process_curve(
    config: str, batches_by_round: dict[int, list], eval_pages_n: int
) -> dict[int, float]:
    """Train one process on the rounds' batches in order; held-out loss after each round's samples."""
    import torch

    from peer.config import load_run_config
    from peer.data.model import build_model, evaluate_loss, lm_loss
    from peer.data.pages import PageStore, eval_pages
    from peer.training.diloco import make_inner_optimizer

    torch.set_num_threads(1)  # what it learns does not depend on threads; 1 is fastest on a shared box
    cfg = load_run_config(config)
    train = cfg.train
    store = PageStore(data_dir(config), cfg.data)
    heldout = store.batches(eval_pages(0, b"heldout-curve", store.heldout_pages, eval_pages_n), 32)
    model = build_model(cfg)
    opt = make_inner_optimizer("adamw", model.parameters(), train)
    steps, curve = 0, {}
    for r in sorted(batches_by_round):
        model.train()
        for b in batches_by_round[r]:
            for group in opt.param_groups:
                group["lr"] = (
                    train.inner_lr * min(1.0, (steps + 1) / train.warmup_steps)
                    if train.warmup_steps
                    else train.inner_lr
                )
            lm_loss(model, b).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
        curve[r] = evaluate_loss(model, heldout, "cpu")
    return curve


def swarm_curve(result) -> dict[int, float]:
    """round → held-out loss of θ_{r+1} (the peers agree where they averaged; the first peer's value)."""
    curve: dict[int, float] = {}
    for rounds in result.rounds:
        for x in rounds:
            if x.get("heldout_loss") is not None:
                curve.setdefault(x["round"], x["heldout_loss"])
    return curve


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="debug")
    parser.add_argument("--peers", default="2,4", help="swarm sizes, comma-separated")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--round-seconds", type=float, default=None, help="default: the config's")
    parser.add_argument("--eval-pages", type=int, default=16)
    parser.add_argument("--peer-args", default="", help="extra `peer join` flags, e.g. overlapped rounds")
    args = parser.parse_args()
    import signal

    from peer.config import load_run_config

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: no stray peers

    cfg = load_run_config(args.config)
    round_s = args.round_seconds or cfg.train.round_seconds
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()}-core CPU box",
        "config": args.config,
        "peer_args": args.peer_args,
        "load_before": os.getloadavg(),
        "swarms": {},
    }
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for n in [int(x) for x in args.peers.split(",")]:
            extra = [
                *("--round-seconds", str(round_s), "--max-rounds", str(args.rounds)),
                *("--eval-pages", str(args.eval_pages), "--compression", "8bit"),
                *("--round-genesis", str(int(time.time()))),
                *shlex.split(args.peer_args),
            ]
            res = run_swarm(tmp, name=f"parity{n}", config=args.config, peers=n, extra=extra)
            identical = assert_identical(res.rounds)
            # rounds every peer logged: the curve is compared there
            common = sorted(set.intersection(*({x["round"] for x in r} for r in res.rounds)))
            batches = swarm_batches(res, args.config)
            batches = {r: b for r, b in batches.items() if r <= common[-1]}
            single = single_process_curve(args.config, batches, args.eval_pages)
            swarm = swarm_curve(res)
            samples, curve = 0, []
            for r in sorted(batches):
                samples += sum(len(b) for b in batches[r])
                if r in common and r in swarm:
                    curve.append(
                        {
                            "round": r,
                            "samples": samples,
                            "swarm": swarm[r],
                            "single": single[r],
                            "ratio": swarm[r] / single[r],
                        }
                    )
            statuses = [x["status"] for r in res.rounds for x in r]
            fig = {
                "peers": n,
                "samples": samples,
                "rounds_averaged_identical": identical,
                "statuses": {s: statuses.count(s) for s in set(statuses)},
                "mean_inner_steps": sum(x["inner_steps"] for r in res.rounds for x in r) / len(statuses),
                "final_ratio": curve[-1]["ratio"] if curve else None,
                "curve": curve,
            }
            results["swarms"][n] = fig
            print(json.dumps(fig), flush=True)
    results["load_after"] = os.getloadavg()
    print("SUMMARY " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
