"""Sparse Δs (#17): loss and bytes of top-k + error feedback against the 8-bit dense Δ, same run.

    .venv/bin/python benchmarks/sparse.py sim   [--config debug] [--peers 4] [--rounds 10] [--inner 50]
                                                [--arms 8bit,topk:0.015625,...]
    .venv/bin/python benchmarks/sparse.py swarm [--config debug] [--peers 2] [--rounds 6] [--max-inner-steps H]

``sim``: n DiLoCo peers in one process, every arm from the same initial weights on exactly the same
batches (peer i trains ``--inner`` AdamW steps on ``assign_pages(hotkey_i, r, seed_r)`` each round,
its inner optimizer kept across rounds like a real peer's): only the communicated Δ differs.

* ``8bit``: each Δ through the published 8-bit blockwise codec (int8 + absmax per 4096 values — the
  same error class as the all-reduce's bitsandbytes blockwise 8-bit), averaged, Nesterov outer step;
* ``topk:<density>[:<β>[:<μ>[:<lr>[:<support|mean>]]]]``: Δ̂ = top-k(β·e + Δ) per 4096-value chunk with error feedback
  (:class:`peer.training.sparse.ErrorFeedback`, int8 values with one fp32 scale per chunk), averaged,
  the average rounded exactly as the wire rounds it (:func:`peer.training.sparse.wire_roundtrip`), outer
  step with momentum μ and learning rate lr (default: the config's). The last field is how the
  average is formed (default: the config's ``train.topk_aggregation``; see
  :func:`peer.training.robust.weighted_mean`). SparseLoCo's variant is β = 0.95,
  μ = 0.

Averages use the swarm's robust rule (:func:`peer.training.robust.robust_mean`, the default rule) on
parts of 2¹⁷ values. After each round: held-out loss of θ on 16 fixed held-out pages. Bytes: every
peer's Δ̂ and the averages are encoded with the real wire codec over an n-way butterfly split of the
chunk-aligned flat buffer the swarm averages (:func:`peer.training.sparse.encode_wire_part`, parts of
2¹⁷ values at their offsets), so "sent per peer per round ÷ fp32 floor
2(n−1)/n·4P" is exact for the sparse arms; the published blob (:func:`encode_sparse_delta`) ÷ the
dense fp32 Δ (4P) is the validator's download; "average outside span" is the largest share (over
rounds) of the average's norm outside the span of the peers' Δs — a copy of the average must stay a
linear combination of them for the validator's combination test. Prints one JSON line per arm and a
SUMMARY.

``swarm``: real ``peer join`` swarms on 127.0.0.1 (``--compression 8bit`` then ``topk``), the peers'
own byte counters, contribution blob sizes and held-out losses; asserts identical state hashes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

PART = 1 << 17


def parse_arm(text: str, cfg) -> dict:
    bits = text.split(":")
    if bits[0] == "8bit":
        return {
            "name": "8bit",
            "kind": "8bit",
            "momentum": cfg.train.outer_momentum,
            "lr": cfg.train.outer_lr,
        }
    if bits[0] != "topk":
        raise SystemExit(f"unknown arm {text!r}")
    density = float(bits[1]) if len(bits) > 1 else cfg.train.topk_density
    decay = float(bits[2]) if len(bits) > 2 else 1.0
    momentum = float(bits[3]) if len(bits) > 3 else cfg.train.outer_momentum
    lr = float(bits[4]) if len(bits) > 4 else cfg.train.outer_lr
    from peer.training.robust import AGGREGATIONS

    aggregation = bits[5] if len(bits) > 5 else cfg.train.topk_aggregation
    if aggregation not in AGGREGATIONS:
        raise SystemExit(f"arm {text!r}: aggregation must be one of {AGGREGATIONS}")
    return {
        "name": text,
        "kind": "topk",
        "density": density,
        "decay": decay,
        "momentum": momentum,
        "lr": lr,
        "aggregation": aggregation,
    }


def wire_bytes(deltas, averaged, n: int, topk) -> float:
    """Bytes each peer sends in an n-way butterfly of sparse Δ̂s (mean over peers): its parts for the
    other owners, and its own part's average to the other n−1 peers (protobuf framing left out). The
    flat buffer is laid out as the swarm lays it out (every tensor on a chunk boundary); owners' ranges
    start on chunk boundaries (hivemind assigns whole parts)."""
    from peer.training.allreduce import flatten_tensors
    from peer.training.sparse import encode_wire_part

    flats = [flatten_tensors(d, topk.chunk) for d in deltas]
    avg = flatten_tensors(averaged, topk.chunk)
    total = avg.numel()
    bounds = [min(total, round(total * i / n / topk.chunk) * topk.chunk) for i in range(n + 1)]
    bounds[-1] = total
    sent = [0] * n
    for owner in range(n):
        lo, hi = bounds[owner], bounds[owner + 1]
        for start in range(lo, hi, PART):
            end = min(hi, start + PART)
            for peer in range(n):
                if peer != owner:
                    sent[peer] += len(encode_wire_part(flats[peer][start:end], topk, start).buffer)
            sent[owner] += (n - 1) * len(encode_wire_part(avg[start:end], topk, start).buffer)
    return sum(sent) / n


def outside_span(deltas, averaged) -> float:
    """Share of the average's norm outside the span of the peers' Δs (least squares over the whole
    flat vectors): ~0 when a copy of the average is a linear combination of the Δs, which the
    validator's combination test needs to catch a copier of the average."""
    import torch

    basis = torch.stack([torch.cat([t.reshape(-1) for t in d]).double() for d in deltas], dim=1)
    v = torch.cat([t.reshape(-1) for t in averaged]).double()
    if float(v.norm()) == 0:
        return 0.0
    coef = torch.linalg.lstsq(basis, v.unsqueeze(1)).solution
    return float((basis @ coef).squeeze(1).sub(v).norm() / v.norm())


def robust_average(deltas, aggregation: str = "mean"):
    """The swarm's default robust rule, part by part (parts of 2¹⁷ values of the flat vector);
    ``aggregation``: how the kept Δs are combined (:func:`peer.training.robust.weighted_mean`)."""
    import torch

    from peer.training.allreduce import DEFAULT_RULE
    from peer.training.robust import robust_mean

    flats = [torch.cat([t.reshape(-1) for t in d]) for d in deltas]
    out = torch.empty_like(flats[0])
    for start in range(0, out.numel(), PART):
        parts = [f[start : start + PART] for f in flats]
        out[start : start + PART], _ = robust_mean(
            parts, [1.0] * len(parts), DEFAULT_RULE, aggregation=aggregation
        )
    shaped, pos = [], 0
    for t in deltas[0]:
        shaped.append(out[pos : pos + t.numel()].view(t.shape))
        pos += t.numel()
    return shaped


def simulate(args, arm: dict) -> dict:
    import torch
    from wan import data_dir

    from peer.config import load_run_config
    from peer.data.model import build_model, evaluate_loss, lm_loss
    from peer.data.pages import PageStore, assign_pages, eval_pages, round_batches
    from peer.net.outbox import dequantize_blockwise, encode_delta, quantize_blockwise
    from peer.training.clock import WallClock
    from peer.training.diloco import make_inner_optimizer
    from peer.training.sparse import ErrorFeedback, TopK, encode_sparse_delta, wire_roundtrip

    torch.set_num_threads(args.threads)
    cfg = load_run_config(args.config)
    train = cfg.train
    store = PageStore(data_dir(args.config), cfg.data)
    heldout = store.batches(eval_pages(0, b"heldout-curve", store.heldout_pages, 16), 32)
    clock = WallClock(run_id="sparse-bench", round_seconds=1.0)
    theta_model = build_model(cfg)
    theta = [p.detach().clone() for p in theta_model.parameters()]
    names = [n for n, _ in theta_model.named_parameters()]
    momentum = [torch.zeros_like(t) for t in theta]
    params = sum(t.numel() for t in theta)
    peers = []
    topk = None
    if arm["kind"] == "topk":
        topk = TopK(chunk=train.topk_chunk, k=max(1, round(arm["density"] * train.topk_chunk)))
    for i in range(args.peers):
        model = build_model(cfg)
        opt = make_inner_optimizer("adamw", model.parameters(), train)
        ef = ErrorFeedback([t.shape for t in theta], topk, arm["decay"]) if topk else None
        peers.append({"hotkey": f"peer-{i}", "model": model, "opt": opt, "ef": ef, "steps": 0})
    curve, sent_ratio, blob_ratio, outside, t0 = [], [], [], [], time.time()
    for r in range(args.rounds):
        seed = clock.seed(r)
        deltas = []
        for p in peers:
            model, opt = p["model"], p["opt"]
            with torch.no_grad():
                for q, t in zip(model.parameters(), theta, strict=True):
                    q.copy_(t)
            pages = assign_pages(p["hotkey"], r, seed, store.train_pages, cfg.data.pages_per_round)
            order = round_batches(store.samples(pages), train.batch_size, seed + p["hotkey"].encode())
            model.train()
            for j in range(args.inner):
                for g in opt.param_groups:
                    g["lr"] = train.inner_lr * min(1.0, (p["steps"] + 1) / max(1, train.warmup_steps))
                lm_loss(model, order[j % len(order)]).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                p["steps"] += 1
            with torch.no_grad():
                delta = [t - q.detach() for t, q in zip(theta, model.parameters(), strict=True)]
            norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta))
            if norm > train.max_delta_norm:
                delta = [d * (train.max_delta_norm / norm) for d in delta]
            if topk is None:
                delta = [
                    dequantize_blockwise(*quantize_blockwise(d), tuple(d.shape)) for d in delta
                ]  # the 8-bit error of a dense Δ
                if r == 0:
                    blob_ratio.append(len(encode_delta(dict(zip(names, delta, strict=True)))) / (4 * params))
            else:
                delta = p["ef"].step(delta, max_norm=train.max_delta_norm)
                blob = encode_sparse_delta(dict(zip(names, delta, strict=True)), topk)
                blob_ratio.append(len(blob) / (4 * params))
            deltas.append(delta)
        avg = robust_average(deltas, aggregation=arm.get("aggregation", "mean"))
        if topk is not None:
            # the wire rounds averages to int8 × a scale per chunk (tensors start on chunk boundaries)
            avg = [wire_roundtrip(a.reshape(-1), topk).view(a.shape) for a in avg]
            floor = 2 * (args.peers - 1) / args.peers * params * 4
            sent_ratio.append(wire_bytes(deltas, avg, args.peers, topk) / floor)
            outside.append(outside_span(deltas, avg))
        with torch.no_grad():
            for s, m, g in zip(theta, momentum, avg, strict=True):
                m.mul_(arm["momentum"]).add_(g)
                s.sub_(g.add(m, alpha=arm["momentum"]), alpha=arm["lr"])
            for q, t in zip(theta_model.parameters(), theta, strict=True):
                q.copy_(t)
        curve.append(round(evaluate_loss(theta_model, heldout, "cpu"), 4))
    return {
        **arm,
        "config": args.config,
        "params": params,
        "peers": args.peers,
        "rounds": args.rounds,
        "inner_steps": args.inner,
        "heldout_curve": curve,
        "final_heldout": curve[-1],
        "sent_per_peer_round_over_fp32_floor": (sum(sent_ratio) / len(sent_ratio)) if sent_ratio else None,
        "blob_over_dense_fp32": sum(blob_ratio) / len(blob_ratio) if blob_ratio else None,
        "average_outside_span_max": max(outside) if outside else None,
        "seconds": round(time.time() - t0, 1),
    }


def run_sim(args) -> int:
    from peer.config import load_run_config

    cfg = load_run_config(args.config)
    arms = [parse_arm(a, cfg) for a in args.arms.split(",")]
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": os.getloadavg()}
    out = []
    for arm in arms:
        res = simulate(args, arm)
        print(json.dumps(res), flush=True)
        out.append(res)
    base = next((x for x in out if x["kind"] == "8bit"), None)
    if base is not None:
        for x in out:
            x["final_over_8bit"] = round(x["final_heldout"] / base["final_heldout"], 4)
    results.update(arms=out, load_after=os.getloadavg())
    print("SUMMARY " + json.dumps(results))
    return 0


def run_real_swarm(args) -> int:
    import signal

    from wan import assert_identical, run_swarm

    from peer.config import load_run_config
    from peer.net.outbox import CONTRIBUTION

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cfg = load_run_config(args.config)
    from peer.data.model import build_model, count_parameters

    params = count_parameters(build_model(cfg))
    floor = 2 * (args.peers - 1) / args.peers * params * 4
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": args.config,
        "peers": args.peers,
        "params": params,
        "load_before": os.getloadavg(),
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for compression in args.compressions.split(","):
            extra = [
                *("--max-rounds", str(args.rounds), "--compression", compression, "--eval-pages", "16"),
                *("--round-genesis", str(int(time.time()))),
            ]
            if args.round_seconds:
                extra += ["--round-seconds", str(args.round_seconds)]
            if args.max_inner_steps:
                extra += ["--max-inner-steps", str(args.max_inner_steps)]
            res = run_swarm(
                tmp, name=f"sparse-{compression}", config=args.config, peers=args.peers, extra=extra
            )
            identical = assert_identical(res.rounds)
            averaged = [x for peer in res.rounds for x in peer if x["status"] == "averaged"]
            blobs = [
                p.stat().st_size
                for h in res.homes
                for p in (h / "outbox" / "rounds").glob(f"*/{CONTRIBUTION}")
            ]
            losses = [x["heldout_loss"] for x in res.rounds[0] if x.get("heldout_loss") is not None]
            fig = {
                "compression": compression,
                "rounds_averaged_identical": identical,
                "averaged_peer_rounds": len(averaged),
                "sent_per_peer_round_over_fp32_floor": (
                    sum(x["bytes_sent"] for x in averaged) / len(averaged) / floor if averaged else None
                ),
                "blob_over_dense_fp32": (sum(blobs) / len(blobs) / (4 * params)) if blobs else None,
                "mean_inner_steps": sum(x["inner_steps"] for x in averaged) / max(1, len(averaged)),
                "heldout_curve_peer0": losses,
            }
            results["runs"][compression] = fig
            print(json.dumps(fig), flush=True)
    results["load_after"] = os.getloadavg()
    print("SUMMARY " + json.dumps(results))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sim = sub.add_parser("sim")
    sim.add_argument("--config", default="debug")
    sim.add_argument("--peers", type=int, default=4)
    sim.add_argument("--rounds", type=int, default=10)
    sim.add_argument("--inner", type=int, default=50)
    sim.add_argument("--threads", type=int, default=1)
    sim.add_argument("--arms", default="8bit,topk:0.03125,topk:0.015625,topk:0.0078125,topk:0.015625:0.95:0")
    sw = sub.add_parser("swarm")
    sw.add_argument("--config", default="debug")
    sw.add_argument("--peers", type=int, default=2)
    sw.add_argument("--rounds", type=int, default=6)
    sw.add_argument("--round-seconds", type=float, default=None)
    sw.add_argument(
        "--max-inner-steps", type=int, default=None, help="cap inner steps a round (H), as in `sim --inner`"
    )
    sw.add_argument("--compressions", default="8bit,topk")
    args = parser.parse_args()
    return run_sim(args) if args.cmd == "sim" else run_real_swarm(args)


if __name__ == "__main__":
    sys.exit(main())
