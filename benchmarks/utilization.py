"""Swarm utilisation on this machine: aggregate samples/s of a 2-peer swarm ÷ plain torch samples/s.

    .venv/bin/python benchmarks/utilization.py [--rounds 4] [--skip-125m]

Baseline: one process, plain torch AdamW on the debug model using both cores. Swarm: two `peer join`
processes (one thread each, same two cores) + a bootstrap DHT on 127.0.0.1, for
  * DiLoCo at two round lengths (H = mean inner steps per round, reported), and
  * sync mode (hivemind Optimizer, per-step gradient averaging).
Also: all-reduce bytes sent per peer per round ÷ the fp32 ring floor 2(n−1)/n·P·4, and peak RSS per peer
(debug, and one ≈125M peer for a single short round). Prints one JSON line per figure and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def baseline_samples_per_s(seconds: float = 15.0) -> dict:
    """Plain torch on the debug model in one process, with 1 and with 2 threads (the best is the baseline)."""
    return {n: _baseline(n, seconds) for n in (1, 2)}


def _baseline(threads: int, seconds: float) -> float:
    import torch

    from peer.config import load_run_config
    from peer.data.model import build_model, lm_loss
    from peer.data.pages import PageStore, prepare_data

    torch.set_num_threads(threads)
    cfg = load_run_config("debug")
    data = prepare_data(cfg.data, DATA, REPO / ".cache" / "corpus")
    store = PageStore(data, cfg.data)
    batches = store.batches(store.train_pages[:64], cfg.train.batch_size)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for b in batches[:10]:  # warm-up
        lm_loss(model, b).backward()
        opt.step()
        opt.zero_grad()
    n, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        b = batches[n % len(batches)]
        lm_loss(model, b).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        n += 1
    return n * cfg.train.batch_size / (time.time() - t0)


def env() -> dict:
    e = dict(os.environ)
    e.update(
        WANDB_MODE="disabled",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        GRADSWARM_CORPUS=str(REPO / ".cache" / "corpus"),
    )
    return e


def start_bootstrap(tmp: Path) -> tuple[subprocess.Popen, str]:
    ready = tmp / "boot.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "peer.cli",
            "bootstrap",
            "--host-maddrs",
            "/ip4/127.0.0.1/tcp/0",
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env(),
        cwd=REPO,
        start_new_session=True,
    )
    while not ready.exists():
        time.sleep(0.1)
    return proc, json.loads(ready.read_text())["maddrs"][0]


def run_swarm(
    tmp: Path, boot: str, name: str, extra: list[str], peers: int = 2, config: str = "debug"
) -> list[list[dict]]:
    procs, homes = [], []
    for i in range(peers):
        home = tmp / f"{name}-{i}"
        homes.append(home)
        args = [
            sys.executable,
            "-m",
            "peer.cli",
            "join",
            "--config",
            config,
            "--run-id",
            f"bench-{name}-{os.getpid()}",
            "--home",
            str(home),
            "--data-dir",
            str(DATA if config == "debug" else tmp / f"data-{config}"),
            "--host-maddrs",
            "/ip4/127.0.0.1/tcp/0",
            "--no-chain",
            "--no-publish",
            "--threads",
            "1",
            "--wallet.path",
            str(tmp / "wallets"),
            "--wallet.name",
            f"p{i}",
            "--wallet.create",
            "--eval-pages",
            "0",
            "--initial-peers",
            boot,
            *extra,
        ]
        log = open(tmp / f"{name}-{i}.log", "w")  # noqa: SIM115 - lives as long as the child
        procs.append(
            subprocess.Popen(args, stdout=log, stderr=log, env=env(), cwd=REPO, start_new_session=True)
        )
    for p in procs:
        p.wait(timeout=1800)
    out = []
    for home in homes:
        path = home / "rounds.jsonl"
        out.append([json.loads(line) for line in path.read_text().splitlines()] if path.exists() else [])
    return out


def diloco_figures(rounds: list[list[dict]], round_seconds: float, params: int) -> dict:
    # skip each peer's first round (start-up lands mid-round); count samples over whole rounds of wall time
    usable = [r[1:] for r in rounds]
    n_rounds = min(len(r) for r in usable)
    samples = sum(x["samples"] for r in usable for x in r[:n_rounds])
    agg = samples / (n_rounds * round_seconds)
    steps = [x["inner_steps"] for r in usable for x in r[:n_rounds]]
    sent = [x["bytes_sent"] for r in usable for x in r[:n_rounds] if x["status"] == "averaged"]
    floor = 2 * (2 - 1) / 2 * params * 4
    return {
        "aggregate_samples_per_s": agg,
        "mean_H": sum(steps) / len(steps),
        "rounds": n_rounds,
        "averaged_rounds": len(sent) // 2,
        "bytes_sent_per_round": sum(sent) / max(len(sent), 1),
        "bytes_ratio_to_fp32_floor": (sum(sent) / max(len(sent), 1)) / floor,
        "peak_rss_mb": max(x.get("peak_rss_mb", 0) for r in rounds for x in r),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-125m", action="store_true")
    args = parser.parse_args()
    from peer.config import load_run_config
    from peer.data.model import build_model, count_parameters

    params = count_parameters(build_model(load_run_config("debug")))
    results = {"machine": "2-core CPU box", "date": time.strftime("%Y-%m-%d"), "params_debug": params}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally: no orphan bootstrap
    bases = baseline_samples_per_s()
    base = max(bases.values())
    results["baseline_samples_per_s_by_threads"] = bases
    results["baseline_samples_per_s"] = base
    print(json.dumps({"baseline_samples_per_s_by_threads": bases}), flush=True)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        boot_proc, boot = start_bootstrap(tmp)
        try:
            for label, secs, reserve in (("diloco_long", 12.0, 0.6), ("diloco_short", 4.0, 0.6)):
                rounds = run_swarm(
                    tmp,
                    boot,
                    label,
                    [
                        "--round-seconds",
                        str(secs),
                        "--averaging-reserve",
                        str(reserve),
                        "--max-inner-steps",
                        "100000",
                        "--max-rounds",
                        str(args.rounds + 1),
                        "--round-genesis",
                        "0",
                    ],
                )
                fig = diloco_figures(rounds, secs, params)
                fig["utilisation"] = fig["aggregate_samples_per_s"] / base
                results[label] = fig
                print(json.dumps({label: fig}), flush=True)
            t0 = time.time()
            rounds = run_swarm(
                tmp,
                boot,
                "sync",
                [
                    "--averaging",
                    "sync",
                    "--round-seconds",
                    "10",
                    "--sync.target-batch",
                    "512",
                    "--max-rounds",
                    str(args.rounds),
                ],
            )
            usable = [r[1:] for r in rounds]
            samples = sum(x["steps"] * 8 for r in usable for x in r)
            secs = sum(x["tokens"] / max(x["tokens_per_s"], 1e-9) for x in usable[0])
            fig = {"aggregate_samples_per_s": samples / max(secs, 1e-9), "wall_s": time.time() - t0}
            fig["utilisation"] = fig["aggregate_samples_per_s"] / base
            results["sync"] = fig
            print(json.dumps({"sync": fig}), flush=True)
            if not args.skip_125m:
                rounds = run_swarm(
                    tmp,
                    boot,
                    "rss125m",
                    [
                        "--round-seconds",
                        "240",
                        "--averaging-reserve",
                        "30",
                        "--max-inner-steps",
                        "2",
                        "--batch-size",
                        "1",
                        "--max-rounds",
                        "1",
                    ],
                    peers=1,
                    config="llama-125m",
                )
                results["peak_rss_mb_125m"] = max((x["peak_rss_mb"] for r in rounds for x in r), default=None)
                print(json.dumps({"peak_rss_mb_125m": results["peak_rss_mb_125m"]}), flush=True)
        finally:
            os.killpg(boot_proc.pid, 9)
    print("SUMMARY " + json.dumps(results))
    return 0


DATA = REPO / ".cache" / "bench-data" / "debug"

if __name__ == "__main__":
    sys.exit(main())
