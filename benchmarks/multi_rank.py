"""Multi-rank peers (#12): per-rank memory of the sharded model, and a 2-rank CPU peer's speed.

    .venv/bin/python benchmarks/multi_rank.py [--mem-config small] [--speed-config bench-5m]
                                              [--ranks 1,2,4] [--runs 3] [--steps 20]

(a) Memory per rank of parameters + gradients + inner AdamW state.
    *Measured* on this CPU for ``--mem-config`` with N in ``--ranks`` (real ranks over gloo, FSDP2
    shards; N = 1 is the plain 1-process peer): rank 0's local bytes of parameters, of gradients (read in
    an optimizer pre-step hook, when they exist) and of AdamW state after two inner steps.
    *Computed* for ``llama-1b`` with N = 1, 2, 4, 8 from its exact parameter count P (built on the
    meta device): 4P/N (fp32 master weights) + 4P/N (fp32 gradients; bf16 compute, fp32 reduction) +
    8P/N (AdamW: two fp32 moments) or ≈2P/N (8-bit AdamW). Not included: activations, and the FSDP unit
    held unsharded during its forward/backward (the largest is the root: embeddings + LM head; ~8 bytes
    per parameter for bf16 weights and gradients and the fp32 reduction buffer, an estimate listed
    separately); rank 0's host memory for θ, momentum and Δ (3 × 4P, as on a 1-rank peer).
    The measured ratio (measured ÷ formula) says how far the formula is from what FSDP2 really holds.

(b) Speed: samples/s of inner steps of a 2-rank CPU peer (1 torch thread per rank) vs a 1-rank peer
    with 2 threads, on ``--speed-config`` with random tokens (speed does not depend on their values),
    ``--steps`` timed steps after 3 warm-up steps. Baseline and 2-rank runs alternate, ``--runs`` of each;
    worst and median printed, with the load average before and after (the box is shared). A 1-rank peer
    with 1 thread runs in each run too: on a loaded box two threads of one process can be slower than one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _state(run, nproc: int, threads: int):
    import torch

    from peer.data.model import build_model

    torch.set_num_threads(threads)
    model = build_model(run, "cpu")
    if nproc == 1:
        from peer.training.diloco import DilocoState

        return DilocoState(model, run.train, "adamw"), None
    from peer.training.fsdp import ShardedDilocoState
    from peer.training.ranks import PeerRanks

    ranks = PeerRanks.start(run, nproc=nproc, device="cpu", optimizer="adamw", threads=threads)
    return ShardedDilocoState(model, run.train, "adamw", ranks=ranks), ranks


def _step(state, batch) -> None:
    from peer.data.model import lm_loss

    if hasattr(state, "train_step"):
        state.train_step(batch)
    else:
        state.inner_step(lm_loss(state.model, batch))


def _batch(run):
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, run.data.vocab_size, (run.train.batch_size, run.data.seq_len + 1), generator=gen)


def child_memory(config: str, nproc: int) -> dict:
    import resource

    from peer.config import load_run_config
    from peer.training.fsdp import local_shard_bytes

    run = load_run_config(config)
    state, ranks = _state(run, nproc, 1)
    seen = {}
    model = state.sharded.model if ranks is not None else state.model
    state.inner.register_step_pre_hook(lambda opt, *_: seen.update(local_shard_bytes(model, opt)))
    state.begin_round()
    for _ in range(2):
        _step(state, _batch(run))
    after = local_shard_bytes(model, state.inner)
    out = {
        "nproc": nproc,
        "params": after["params"],
        "grads": seen["grads"],
        "optimizer": after["optimizer"],
        "rank0_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if ranks is not None:
        ranks.close(clean=True, stop=state.sharded.stop)
    return out


def child_speed(config: str, nproc: int, threads: int, steps: int) -> dict:
    from peer.config import load_run_config

    run = load_run_config(config)
    state, ranks = _state(run, nproc, threads)
    batch = _batch(run)
    state.begin_round()
    for _ in range(3):
        _step(state, batch)
    t0 = time.perf_counter()
    for _ in range(steps):
        _step(state, batch)
    seconds = time.perf_counter() - t0
    if ranks is not None:
        ranks.close(clean=True, stop=state.sharded.stop)
    return {"nproc": nproc, "threads": threads, "samples_per_s": steps * run.train.batch_size / seconds}


def _spawn(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def formula_bytes(p: int, n: int, optimizer_bytes_per_param: float) -> dict:
    return {"params": 4 * p / n, "grads": 4 * p / n, "optimizer": optimizer_bytes_per_param * p / n}


def llama_counts(config: str) -> tuple[int, int]:
    """Exact parameter count of ``config`` and of its largest FSDP unit: a decoder layer, or the root
    (embeddings, final norm, LM head), which FSDP2 keeps unsharded from its forward to its backward."""
    import torch
    from transformers import LlamaForCausalLM

    from peer.config import load_run_config
    from peer.data.model import llama_config

    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(load_run_config(config)))
    total = sum(p.numel() for p in model.parameters())
    layers = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    return total, max(max(layers), total - sum(layers))


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mem-config", default="small")
    ap.add_argument("--speed-config", default="bench-5m")
    ap.add_argument("--ranks", default="1,2,4", help="N measured for memory")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-memory", action="store_true", help="only (b), the speed runs")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        kind, config, *rest = args.child
        if kind == "mem":
            print(json.dumps(child_memory(config, int(rest[0]))))
        else:
            print(json.dumps(child_speed(config, int(rest[0]), int(rest[1]), int(rest[2]))))
        return 0

    print(f"load average before: {_load()} ({os.cpu_count()} cores, shared with other sessions)")
    if not args.skip_memory:
        memory_tables(args)
    speed_table(args)
    print(f"load average after: {_load()}")
    return 0


def memory_tables(args) -> None:
    gib, mib = 2**30, 2**20
    p_small, _ = llama_counts(args.mem_config)
    print(f"\n(a) measured, {args.mem_config} ({p_small / 1e6:.1f}M parameters), rank 0's local bytes (MiB):")
    print("  N  params  grads  AdamW  total  formula 16P/N  measured/formula  rank0 peak RSS")
    for n in [int(x) for x in args.ranks.split(",")]:
        m = _spawn("mem", args.mem_config, str(n))
        total = m["params"] + m["grads"] + m["optimizer"]
        f = sum(formula_bytes(p_small, n, 8).values())
        print(
            f"  {n}  {m['params'] / mib:6.1f} {m['grads'] / mib:6.1f} {m['optimizer'] / mib:6.1f} "
            f"{total / mib:6.1f}  {f / mib:13.1f}  {total / f:16.3f}  {m['rank0_peak_rss_mb']:8.0f} MiB"
        )
    p, layer = llama_counts("llama-1b")
    print(
        f"\n(a) computed, llama-1b ({p / 1e9:.3f}B parameters; largest FSDP unit {layer / 1e6:.1f}M), GiB per rank:"
    )
    print(
        "  N  params  grads  AdamW  total(AdamW)  AdamW8bit  total(8bit)  +largest unit unsharded (est. 8 B/param)"
    )
    for n in (1, 2, 4, 8):
        f32, f8 = formula_bytes(p, n, 8), formula_bytes(p, n, 2)
        print(
            f"  {n}  {f32['params'] / gib:6.2f} {f32['grads'] / gib:6.2f} {f32['optimizer'] / gib:6.2f} "
            f"{sum(f32.values()) / gib:12.2f}  {f8['optimizer'] / gib:9.2f}  {sum(f8.values()) / gib:11.2f}"
            f"  {8 * layer / gib if n > 1 else 0:.2f}"
        )
    print(f"  rank 0 host memory (θ, momentum, Δ in fp32; any N): {12 * p / gib:.1f} GiB")


def speed_table(args) -> None:
    print(f"\n(b) samples/s on {args.speed_config}, {args.steps} steps, random tokens:")
    base, multi, single = [], [], []
    for i in range(args.runs):
        b = _spawn("speed", args.speed_config, "1", "2", str(args.steps))["samples_per_s"]
        m = _spawn("speed", args.speed_config, "2", "1", str(args.steps))["samples_per_s"]
        o = _spawn("speed", args.speed_config, "1", "1", str(args.steps))["samples_per_s"]
        base.append(b)
        multi.append(m)
        single.append(o)
        print(
            f"  run {i + 1}: 1 rank x 2 threads {b:7.2f}   2 ranks x 1 thread {m:7.2f}   ratio {m / b:.3f}"
            f"   (1 rank x 1 thread {o:7.2f}; load {_load()})"
        )
    ratios = [m / b for m, b in zip(multi, base, strict=True)]
    print(
        f"  1-rank x 2 threads median {statistics.median(base):.2f} worst {min(base):.2f}; 2-rank median "
        f"{statistics.median(multi):.2f} worst {min(multi):.2f}; ratio 2-rank/1-rank median "
        f"{statistics.median(ratios):.3f} worst {min(ratios):.3f}; 1 rank x 1 thread median "
        f"{statistics.median(single):.2f} worst {min(single):.2f}"
    )


if __name__ == "__main__":
    sys.exit(main())
