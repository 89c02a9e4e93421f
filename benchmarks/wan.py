"""Swarm utilisation behind capped links: a 2-peer swarm in the bandwidth lab ÷ plain torch, same run.

    .venv/bin/python benchmarks/wan.py [--config small] [--rates 20,50,0] [--inner-steps 10] [--repeats 3]
    .venv/bin/python benchmarks/wan.py --mode-args='--rounds overlapped'   # any peer join flags

Needs root and iproute2 (``launch/netlab.py``). Every figure is measured in one run:

* baseline: plain torch AdamW on the same config in one process with 1 and with 2 threads (the best is
  the baseline), samples/s — as ``benchmarks/utilization.py`` does for the debug model;
* swarm: a bootstrap and 2 ``peer join`` processes (one thread each, the same two cores), each in its own
  network namespace, every peer's link capped with ``tc tbf`` at each rate (0 = no cap), DiLoCo rounds of
  ~``--inner-steps`` inner steps. The round length is sized from the measured 1-thread step time and the
  time the 8-bit all-reduce needs at the rate (override with ``--round-seconds`` / ``--reserve``).
  ``--mode-args`` is passed to every ``peer join`` as is: the same command measures blocking rounds
  (the default) and, with ``--mode-args='--rounds overlapped'``, overlapped ones.

utilisation = aggregate swarm samples/s over whole rounds (first round skipped) ÷ baseline samples/s.
Also printed: mean averaging seconds (the all-reduce's wall time), its share of a round, bytes per peer
per round, and ``ideal_blocking`` = train s ÷ (train s + averaging s), what blocking rounds could reach
with a perfectly sized reserve. After every round that ≥ 2 peers averaged, their state hashes must be
bit-identical: the benchmark asserts it and fails otherwise. One JSON line per figure; SUMMARY at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from utilization import diloco_figures, env  # noqa: E402  (same figures as the loopback benchmark)

BENCH_DATA = REPO / ".cache" / "bench-data"


def data_dir(config: str) -> Path:
    from peer.config import load_run_config
    from peer.data.pages import prepare_data

    path = BENCH_DATA / (Path(config).stem if Path(config).suffix else config)  # a variant YAML: its stem
    prepare_data(load_run_config(config).data, path, REPO / ".cache" / "corpus")
    return path


def baseline_samples_per_s(config: str, seconds: float, threads: int) -> float:
    """Plain torch AdamW (the peers' inner optimizer settings, grad clipping) on ``config``, samples/s."""
    import torch

    from peer.config import load_run_config
    from peer.data.model import build_model, lm_loss
    from peer.data.pages import PageStore
    from peer.training.diloco import make_inner_optimizer

    torch.set_num_threads(threads)
    cfg = load_run_config(config)
    store = PageStore(data_dir(config), cfg.data)
    batches = store.batches(store.train_pages[:32], cfg.train.batch_size)
    model = build_model(cfg)
    opt = make_inner_optimizer("adamw", model.parameters(), cfg.train)

    def step(b):
        lm_loss(model, b).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad()

    step(batches[0])  # warm-up
    n, t0 = 0, time.time()
    while time.time() - t0 < seconds or n < 2:
        step(batches[n % len(batches)])
        n += 1
    return n * cfg.train.batch_size / (time.time() - t0)


def concurrent_baseline_samples_per_s(config: str, seconds: float, procs: int) -> float:
    """``procs`` plain-torch processes (1 thread each) training at once, aggregate samples/s: what the box
    does with the swarm's process layout and no communication at all. Two processes on two cores share
    the memory bandwidth and caches, which a single process measured alone does not see; this baseline
    separates that from the swarm's own overhead."""
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); from wan import baseline_samples_per_s; "
        f"print(json.dumps(baseline_samples_per_s({config!r}, {seconds!r}, 1)))"
    )
    children = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env(), cwd=REPO)
        for _ in range(procs)
    ]
    rates = []
    for child in children:
        out, _ = child.communicate(timeout=seconds * 4 + 300)
        if child.returncode != 0:
            raise RuntimeError(f"a baseline process exited with {child.returncode}")
        rates.append(float(out.strip().splitlines()[-1]))
    return sum(rates)


@dataclass
class SwarmResult:
    run_id: str
    homes: list[Path]
    rounds: list[list[dict]]
    hotkeys: list[str]
    wall_s: float
    caps_mbit: dict = field(default_factory=dict)


def start_bootstrap(tmp: Path, lab=None) -> tuple[subprocess.Popen, str]:
    ready = tmp / f"boot-{time.time_ns()}.json"
    host = f"/ip4/{lab.addr('bootstrap')}/tcp/0" if lab else "/ip4/127.0.0.1/tcp/0"
    argv = [sys.executable, "-m", "peer.cli", "bootstrap", "--host-maddrs", host, "--ready-file", str(ready)]
    kw = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(), cwd=REPO)
    proc = lab.spawn("bootstrap", argv, **kw) if lab else subprocess.Popen(argv, start_new_session=True, **kw)
    deadline = time.time() + 120
    while not ready.exists():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("the bootstrap did not start")
        time.sleep(0.1)
    return proc, json.loads(ready.read_text())["maddrs"][0]


def run_swarm(
    tmp: Path,
    *,
    name: str,
    config: str,
    peers: int,
    extra: list[str],
    lab=None,
    timeout: float = 3600,
) -> SwarmResult:
    """``peers`` ``peer join`` processes (in the lab's hosts ``peer-<i>`` if ``lab``, else on 127.0.0.1)
    with their own bootstrap; waits for all to exit (``--max-rounds`` in ``extra``)."""
    run_id = f"bench-{name}-{os.getpid()}"
    data = data_dir(config)
    boot_proc, boot = start_bootstrap(tmp, lab)
    procs, homes = [], []
    t0 = time.time()
    try:
        for i in range(peers):
            home = tmp / f"{name}-{i}"
            homes.append(home)
            addr = lab.addr(f"peer-{i}") if lab else "127.0.0.1"
            argv = [
                *(sys.executable, "-m", "peer.cli", "join", "--config", config, "--run-id", run_id),
                *("--home", str(home), "--data-dir", str(data), "--host-maddrs", f"/ip4/{addr}/tcp/0"),
                *("--no-chain", "--no-publish", "--threads", "1", "--wallet.path", str(tmp / "wallets")),
                *("--wallet.name", f"p{i}", "--wallet.create", "--eval-pages", "0"),
                *("--initial-peers", boot, *extra),
            ]
            log = open(tmp / f"{name}-{i}.log", "w")  # noqa: SIM115 - lives as long as the child
            kw = dict(stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=REPO)
            procs.append(
                lab.spawn(f"peer-{i}", argv, **kw)
                if lab
                else subprocess.Popen(argv, start_new_session=True, **kw)
            )
        for p in procs:
            p.wait(timeout=max(1.0, timeout - (time.time() - t0)))
    finally:
        for p in [*procs, boot_proc]:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    wall = time.time() - t0
    rounds, hotkeys = [], []
    for i, home in enumerate(homes):
        path = home / "rounds.jsonl"
        rounds.append([json.loads(x) for x in path.read_text().splitlines()] if path.exists() else [])
        status = home / "status.json"
        if not rounds[-1] or not status.exists():
            tail = (tmp / f"{name}-{i}.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"peer {i} of {name} recorded no round:\n{tail}")
        hotkeys.append(json.loads(status.read_text())["hotkey"])
    return SwarmResult(run_id=run_id, homes=homes, rounds=rounds, hotkeys=hotkeys, wall_s=wall)


def assert_identical(rounds: list[list[dict]]) -> int:
    """Every round that ≥ 2 peers averaged: the same state hash on all of them. Returns how many rounds."""
    by_round: dict[int, list[dict]] = {}
    for peer in rounds:
        for r in peer:
            if r["status"] == "averaged":
                by_round.setdefault(r["round"], []).append(r)
    checked = 0
    for r, reps in sorted(by_round.items()):
        if len(reps) >= 2:
            hashes = {x["state_hash"] for x in reps}
            assert len(hashes) == 1, f"round {r}: peers averaged to different states {sorted(hashes)}"
            checked += 1
    return checked


def round_plan(
    step_s: float, inner_steps: int, params: int, peers: int, rate_mbit: float, wire_fraction: float = 1.0
) -> tuple[float, float]:
    """(round seconds, averaging reserve) for ~``inner_steps`` steps and an 8-bit all-reduce at the rate.

    Bytes each peer sends in a butterfly all-reduce of an 8-bit Δ: 2·(n−1)/n·P (≈ 1 byte per value),
    × ``wire_fraction`` for other compressions (top-k at density 1/64 and 2 peers: ≈ 0.07).
    Reserve = matchmaking + 1.5× that at the rate + 2 s; rounds are estimates sized from measured steps."""
    wire_s = (
        2 * (peers - 1) / peers * params * 8 * wire_fraction / (rate_mbit * 1e6) if rate_mbit > 0 else 0.5
    )
    reserve = round(3.0 + 1.5 * wire_s + 2.0, 1)
    train_s = max(
        inner_steps * step_s * 1.15, 3.0
    )  # a peer must start training ≥ matchmaking before the stop
    return round(train_s + reserve, 1), reserve


def figure(res: SwarmResult, round_s: float, params: int, base: float) -> dict:
    keys = ("round", "inner_steps", "samples", "train_seconds", "status", "averaging_seconds", "bytes_sent")
    print(json.dumps({"raw_rounds": [[{k: x[k] for k in keys} for x in r] for r in res.rounds]}), flush=True)
    usable = [r[1:] for r in res.rounds]
    if min(len(r) for r in usable) == 0:
        raise RuntimeError("a peer finished fewer than 2 rounds (the first is skipped): raise --rounds")
    fig = diloco_figures(res.rounds, round_s, params)
    fig["utilisation"] = fig["aggregate_samples_per_s"] / base
    avg = [x["averaging_seconds"] for r in usable for x in r if x["status"] == "averaged"]
    train = [x["train_seconds"] for r in usable for x in r]
    fig["averaging_s_mean"] = statistics.mean(avg) if avg else None
    fig["averaging_share_of_round"] = (statistics.mean(avg) / round_s) if avg else None
    fig["ideal_blocking"] = (
        statistics.mean(train) / (statistics.mean(train) + statistics.mean(avg)) if avg and train else None
    )
    fig["statuses"] = [x["status"] for r in usable for x in r]
    fig["identical_rounds"] = assert_identical(res.rounds)
    return fig


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", help="model config (small, bench-5m, debug)")
    parser.add_argument(
        "--rates", default="20,50,0", help="per-peer caps in Mbit/s, comma-separated; 0 = none"
    )
    parser.add_argument("--inner-steps", type=int, default=10, help="target inner steps per round (H)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per swarm (one more runs)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per rate (report worst and median)")
    parser.add_argument("--round-seconds", type=float, help="fix the round length instead of sizing it")
    parser.add_argument("--reserve", type=float, help="fix the averaging reserve instead of sizing it")
    parser.add_argument(
        "--wire-fraction",
        type=float,
        default=1.0,
        help="bytes on the wire per value ÷ 8-bit's, to size the reserve (--compression topk: ~0.07)",
    )
    parser.add_argument("--baseline-seconds", type=float, default=30.0)
    parser.add_argument(
        "--baseline-threads", default="1,2", help="thread counts tried for the baseline (the best counts)"
    )
    parser.add_argument(
        "--baselines-only",
        action="store_true",
        help="measure the baselines only: 1 and 2 threads alone, and 2 one-thread processes at once",
    )
    parser.add_argument("--mode-args", default="", help="extra `peer join` flags (e.g. --rounds overlapped)")
    parser.add_argument("--label", default=None, help="name of the mode in the output (default: the args)")
    args = parser.parse_args()

    from launch.netlab import NetLab, lab_unavailable
    from peer.config import load_run_config
    from peer.data.model import build_model, count_parameters

    if args.baselines_only:
        for rep in range(args.repeats):
            row = {
                "repeat": rep,
                "load": os.getloadavg(),
                "one_thread": baseline_samples_per_s(args.config, args.baseline_seconds, 1),
                "two_threads": baseline_samples_per_s(args.config, args.baseline_seconds, 2),
                "two_procs_one_thread_each": concurrent_baseline_samples_per_s(
                    args.config, args.baseline_seconds, 2
                ),
            }
            print(json.dumps(row), flush=True)
        return 0
    reason = lab_unavailable()
    if reason:
        print(f"wan benchmark skipped: {reason}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: no stray netns
    cfg = load_run_config(args.config)
    params = count_parameters(build_model(cfg))
    mode_args = shlex.split(args.mode_args)
    label = args.label or (args.mode_args or "blocking (default)")
    rates = [float(x) for x in args.rates.split(",")]
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()}-core CPU box",
        "config": args.config,
        "params": params,
        "mode": label,
        "load_before": os.getloadavg(),
        "runs": [],
    }
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for rep in range(args.repeats):
            threads = [int(x) for x in args.baseline_threads.split(",")]
            bases = {n: baseline_samples_per_s(args.config, args.baseline_seconds, n) for n in threads}
            base = max(bases.values())
            step_s = cfg.train.batch_size / bases[min(threads)]
            print(json.dumps({"repeat": rep, "baseline_samples_per_s_by_threads": bases}), flush=True)
            for rate in rates:
                round_s, reserve = round_plan(step_s, args.inner_steps, params, 2, rate, args.wire_fraction)
                round_s = args.round_seconds or round_s
                reserve = args.reserve if args.reserve is not None else reserve
                extra = [
                    *("--round-seconds", str(round_s), "--averaging-reserve", str(reserve)),
                    *("--max-inner-steps", "100000", "--max-rounds", str(args.rounds + 1)),
                    *("--round-genesis", str(int(time.time()))),
                    *mode_args,
                ]
                caps = {"bootstrap": None, "peer-0": rate or None, "peer-1": rate or None}
                with NetLab(list(caps), rate_mbit=caps) as lab:
                    probe = lab.measure_mbit("peer-0", "bootstrap", seconds=2.0) if rate else None
                    res = run_swarm(
                        tmp, name=f"r{rep}-{int(rate)}", config=args.config, peers=2, extra=extra, lab=lab
                    )
                fig = figure(res, round_s, params, base)
                fig.update(
                    repeat=rep,
                    rate_mbit=rate or None,
                    measured_cap_mbit=probe,
                    round_seconds=round_s,
                    reserve=reserve,
                    baseline_samples_per_s=base,
                    load=os.getloadavg(),
                )
                results["runs"].append(fig)
                print(json.dumps(fig), flush=True)
    for rate in rates:
        util = sorted(f["utilisation"] for f in results["runs"] if (f["rate_mbit"] or 0) == rate)
        results[f"utilisation_{int(rate) or 'uncapped'}"] = {
            "worst": util[0],
            "median": statistics.median(util),
        }
    results["load_after"] = os.getloadavg()
    print("SUMMARY " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
