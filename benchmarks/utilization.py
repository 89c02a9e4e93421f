"""Swarm utilisation on this machine: aggregate samples/s of a 2-peer swarm ÷ plain torch samples/s.

    .venv/bin/python benchmarks/utilization.py [--config debug] [--modes overlapped,blocking]
        [--round-seconds 12,4 | --inner-steps 50,10] [--rounds 4] [--skip-sync] [--skip-125m]

Baseline: one process, plain torch AdamW on the model (best of 1 and 2 threads), measured first in the
same run. Swarm: two `peer join` processes (one thread each, same two cores) + a bootstrap DHT on
127.0.0.1, for
  * DiLoCo in each round mode (``--rounds overlapped|blocking`` of ``peer join``) at each round length
    (``--round-seconds``, or ``--inner-steps H``: the round length that fits ~H steps of one peer at the
    1-thread baseline speed), reporting the mean H reached, and
  * sync mode (hivemind Optimizer, per-step gradient averaging; ``--skip-sync`` to leave out).
Per DiLoCo run it also reports the **background CPU** of each peer: CPU seconds of every process that is
not the training thread (DHT, p2pd, averager, publisher, the trainer's other threads) over the inner-step
phase ÷ that phase's wall time, in cores (target ≤ 0.05), with the per-process split; it asserts that
both peers' state hashes are bit-identical after every round they both averaged. Also: all-reduce bytes
sent per peer per round ÷ the fp32 ring floor 2(n−1)/n·P·4, and peak RSS per peer (and one ≈125M peer
for a single short round). Prints one JSON line per figure and a summary.
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


def baseline_samples_per_s(config: str, seconds: float = 15.0) -> dict:
    """Plain torch on the model in one process, with 1 and with 2 threads (the best is the baseline)."""
    return {n: _baseline(config, n, seconds) for n in (1, 2)}


def _baseline(config: str, threads: int, seconds: float) -> float:
    import torch

    from peer.config import load_run_config
    from peer.data.model import build_model, lm_loss
    from peer.data.pages import PageStore, prepare_data

    torch.set_num_threads(threads)
    cfg = load_run_config(config)
    data = prepare_data(cfg.data, data_dir(config), REPO / ".cache" / "corpus")
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
            f"bench-{name}-{os.getpid()}".replace(".", "_"),  # run ids: letters, digits, '_' or '-'
            "--home",
            str(home),
            "--data-dir",
            str(data_dir(config)),
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
    for i, p in enumerate(procs):
        if p.returncode != 0:  # say why, instead of "finished 0 rounds" later
            tail = (tmp / f"{name}-{i}.log").read_text()[-800:]
            print(f"{name}-{i}: peer join exited {p.returncode}: {tail.strip()}", file=sys.stderr, flush=True)
    out = []
    for home in homes:
        path = home / "rounds.jsonl"
        out.append([json.loads(line) for line in path.read_text().splitlines()] if path.exists() else [])
    return out


def diloco_figures(rounds: list[list[dict]], round_seconds: float, params: int) -> dict:
    # skip each peer's first round (start-up lands mid-round); count samples over whole rounds of wall time
    usable = [r[1:] for r in rounds]
    n_rounds = min(len(r) for r in usable)
    if n_rounds == 0:
        raise SystemExit(
            f"a peer finished only {min(len(r) for r in rounds)} round(s): nothing to measure "
            "(start-up took the run; pass more --rounds)"
        )
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
        "all_reduce_seconds_max": max(
            (x["averaging_seconds"] for r in usable for x in r[:n_rounds]), default=0
        ),
        "boundary_seconds_mean": sum(x.get("boundary_seconds", 0) for r in usable for x in r[:n_rounds])
        / max(1, sum(len(r[:n_rounds]) for r in usable)),
        **background_cpu(usable, n_rounds),
    }


def background_cpu(usable: list[list[dict]], n_rounds: int) -> dict:
    """Cores used by each peer's non-training processes over its inner-step phases: per peer (total) and,
    for the worst peer, per process."""
    per_peer = []
    for peer_rounds in usable:
        wall = sum(x.get("inner_seconds", 0.0) for x in peer_rounds[:n_rounds])
        split: dict[str, float] = {}
        for x in peer_rounds[:n_rounds]:
            for name, secs in x.get("background_cpu", {}).items():
                split[name] = split.get(name, 0.0) + secs
        if wall > 0:
            per_peer.append((sum(split.values()) / wall, {k: round(v / wall, 4) for k, v in split.items()}))
    if not per_peer:
        return {}
    worst = max(per_peer, key=lambda p: p[0])
    return {
        "background_cores_per_peer": [round(p[0], 4) for p in per_peer],
        "background_cores_worst_split": worst[1],
    }


def check_identical_states(rounds: list[list[dict]]) -> int:
    """Both peers' state hashes agree after every round both averaged (the swarm's invariant). Returns
    the number of rounds checked; raises if any differ."""
    a, b = ({x["round"]: x for x in peer} for peer in rounds)
    both = [r for r in a if r in b and a[r]["status"] == "averaged" and b[r]["status"] == "averaged"]
    for r in both:
        if a[r]["state_hash"] != b[r]["state_hash"]:
            raise AssertionError(f"round {r}: peers hold different states after averaging")
    return len(both)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--config", default="debug", help="model config (debug, bench-5m, ...)")
    parser.add_argument("--modes", default="overlapped,blocking", help="round modes to run, comma-separated")
    parser.add_argument("--round-seconds", default=None, help="round lengths, comma-separated (debug: 12,4)")
    parser.add_argument(
        "--inner-steps", default=None, help="target H per round instead of --round-seconds, comma-separated"
    )
    parser.add_argument("--reserve", type=float, default=0.6, help="averaging reserve of blocking rounds")
    parser.add_argument("--skip-sync", action="store_true")
    parser.add_argument("--skip-125m", action="store_true")
    args = parser.parse_args()
    from peer.config import load_run_config
    from peer.data.model import build_model, count_parameters

    run_cfg = load_run_config(args.config)
    params = count_parameters(build_model(run_cfg))
    results = {
        "machine": "2-core CPU box",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_start": os.getloadavg(),
        "config": args.config,
        "params": params,
    }
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally: no orphan bootstrap
    bases = baseline_samples_per_s(args.config)
    base = max(bases.values())
    results["baseline_samples_per_s_by_threads"] = bases
    results["baseline_samples_per_s"] = base
    print(json.dumps({"baseline_samples_per_s_by_threads": bases}), flush=True)
    if args.inner_steps:
        step_s = run_cfg.train.batch_size / bases[1]
        lengths = [max(4.0, round(int(h) * step_s, 1)) for h in args.inner_steps.split(",")]
    else:
        lengths = [float(x) for x in (args.round_seconds or "12,4").split(",")]
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        boot_proc, boot = start_bootstrap(tmp)
        try:
            for mode in args.modes.split(","):
                for secs in lengths:
                    label = f"diloco_{mode}_{secs:g}s"
                    rounds = run_swarm(
                        tmp,
                        boot,
                        label,
                        [
                            "--rounds",
                            mode,
                            "--round-seconds",
                            str(secs),
                            "--averaging-reserve",
                            str(min(args.reserve, secs / 4)),
                            "--max-inner-steps",
                            "100000",
                            "--max-rounds",
                            str(args.rounds + 1),
                            "--round-genesis",
                            "0",
                        ],
                        config=args.config,
                    )
                    fig = diloco_figures(rounds, secs, params)
                    fig["utilisation"] = fig["aggregate_samples_per_s"] / base
                    fig["identical_state_rounds"] = check_identical_states(rounds)
                    results[label] = fig
                    print(json.dumps({label: fig}), flush=True)
            if not args.skip_sync:
                results["sync"] = sync_figure(tmp, boot, args.rounds, base)
                print(json.dumps({"sync": results["sync"]}), flush=True)
            if not args.skip_125m:
                results["peak_rss_mb_125m"] = rss_125m(tmp, boot)
                print(json.dumps({"peak_rss_mb_125m": results["peak_rss_mb_125m"]}), flush=True)
        finally:
            os.killpg(boot_proc.pid, 9)
    results["load_average_end"] = os.getloadavg()
    print("SUMMARY " + json.dumps(results))
    return 0


def sync_figure(tmp: Path, boot: str, n_rounds: int, base: float) -> dict:
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
            str(n_rounds),
        ],
    )
    usable = [r[1:] for r in rounds]
    samples = sum(x["steps"] * 8 for r in usable for x in r)
    secs = sum(x["tokens"] / max(x["tokens_per_s"], 1e-9) for x in usable[0])
    fig = {"aggregate_samples_per_s": samples / max(secs, 1e-9), "wall_s": time.time() - t0}
    fig["utilisation"] = fig["aggregate_samples_per_s"] / base
    return fig


def rss_125m(tmp: Path, boot: str) -> float | None:
    """Peak RSS of one ≈125M peer over one short round (2 inner steps of batch 1; data prepared first)."""
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
    return max((x["peak_rss_mb"] for r in rounds for x in r), default=None)


def data_dir(config: str) -> Path:
    return REPO / ".cache" / "bench-data" / config


if __name__ == "__main__":
    sys.exit(main())
