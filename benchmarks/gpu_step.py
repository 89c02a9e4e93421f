"""A GPU peer's inner steps and round boundary, per precision: the peer's own code on CUDA.

    python benchmarks/gpu_step.py [--configs llama-125m,llama-1b] [--steps 10] [--warmup 3]

Needs a CUDA GPU (exits 2 with one line without one); needs only torch, transformers, numpy and PyYAML
(no hivemind, no network), so it runs on a bare GPU machine with the repository on PYTHONPATH.

For each config, one process, the same random token batches (``batch_size`` × ``seq_len + 1`` of the
config; speed does not depend on the token values) and the peer's own step: :class:`DilocoState` with the
torch AdamW inner optimizer, ``lm_loss`` and ``inner_step`` (clipping, warm-up lr) as ``peer join`` runs
them. Arms, each from the same initial weights:

* ``fp32`` — full fp32 matmuls (what a 1-GPU peer ran before ``--precision``); the **baseline**;
* ``tf32`` — fp32 weights, TF32 tensor-core matmuls (``torch.backends.cuda.matmul.allow_tf32``);
* ``bf16`` — ``--precision bf16`` (the new ``auto`` on a GPU): autocast forward/backward, fp32 weights,
  gradients, AdamW state and Δ;
* ``bf16-fused`` — the same with ``AdamW(fused=True)``.

Per arm: samples/s and tokens/s over ``--steps`` timed steps after ``--warmup`` (CUDA synchronised),
speed ÷ the fp32 arm of the same run, model FLOP utilisation (6·P·tokens/s ÷ 989 TFLOP/s, the H100/H200
dense bf16 datasheet figure), peak GPU memory, and the loss after the timed steps (mixed precision must
train like fp32 on the same batches: the ratio is printed). Then the round boundary of the peer's code on
that GPU: ``pseudo_gradient()`` (GPU → CPU fp32 Δ) and ``begin_round()`` (θ_r back to the GPU), seconds.
Finally what a round costs on the wire: the 8-bit Δ (≈ P bytes) and a top-1/64 Δ (fp16 value + 2-byte
index per entry) at 100 Mbit/s and 1 Gbit/s, and the inner steps H a blocking round needs for ≥ 0.9
utilisation with the bf16 step time (H ≥ 9 × wire s ÷ step s); overlapped rounds need H × step s ≥ wire s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PEAK_BF16 = 989e12
"""Dense bf16 FLOP/s of an H100/H200 SXM by the datasheet (the MFU denominator)."""


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_arm(cfg, arm: str, batches, steps: int, warmup: int, device: str = "cuda") -> dict:
    import torch

    from peer.data.model import build_model, count_parameters, lm_loss
    from peer.training.diloco import DilocoState

    torch.backends.cuda.matmul.allow_tf32 = arm == "tf32"
    torch.backends.cudnn.allow_tf32 = arm == "tf32"
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(cfg, device)
    params = count_parameters(model)
    state = DilocoState(model, cfg.train, "adamw")
    if arm == "bf16-fused":
        state.inner = torch.optim.AdamW(
            state.params,
            lr=cfg.train.inner_lr,
            weight_decay=cfg.train.inner_weight_decay,
            betas=(0.9, 0.95),
            fused=cuda,
        )
    bf16 = arm.startswith("bf16") and cuda
    t0 = None
    for i in range(warmup + steps):
        if i == warmup:
            _sync()
            t0 = time.perf_counter()
        loss = lm_loss(model, batches[i % len(batches)], bf16=bf16)
        state.inner_step(loss)
    _sync()
    seconds = time.perf_counter() - t0
    loss_last = float(loss.detach())  # the last timed step's (read after timing: no sync inside the loop)
    batch = batches[0]
    samples = steps * batch.shape[0]
    tokens = samples * (batch.shape[1] - 1)
    t1 = time.perf_counter()
    delta = state.pseudo_gradient()
    _sync()
    pg_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    state.begin_round()
    _sync()
    begin_s = time.perf_counter() - t2
    out = {
        "config": cfg.name,
        "arm": arm,
        "params": params,
        "step_s": seconds / steps,
        "samples_per_s": samples / seconds,
        "tokens_per_s": tokens / seconds,
        "mfu": 6 * params * tokens / seconds / PEAK_BF16,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "loss_last": loss_last,
        "pseudo_gradient_s": pg_s,
        "begin_round_s": begin_s,
        "delta_norm": float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta))),
    }
    del state, model, delta
    if cuda:
        torch.cuda.empty_cache()
    return out


def wire(params: int, step_s: float) -> dict:
    """Bytes of one Δ and what a round needs at 100 Mbit/s and 1 Gbit/s (formulas, not measured)."""
    eight = params * (1 + 4 / 4096)  # 8-bit blockwise: a byte a value + an fp32 scale per 4096-block
    topk = params / 64 * 4  # fp16 value + 2-byte chunk-local index per kept entry
    out = {}
    for name, nbytes in (("8bit", eight), ("topk64", topk)):
        for mbit in (100, 1000):
            s = nbytes * 8 / (mbit * 1e6)
            out[f"{name}@{mbit}Mbit"] = {
                "MB": round(nbytes / 1e6, 1),
                "wire_s": round(s, 2),
                "H_blocking_0.9": int(-(-9 * s // step_s)),
                "H_overlapped": int(-(-s // step_s)),
            }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="llama-125m,llama-1b")
    ap.add_argument("--arms", default="fp32,tf32,bf16,bf16-fused")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=None, help="override the config's batch size")
    ap.add_argument("--device", default="cuda", help="cuda (the figure) or cpu (a smoke test of the script)")
    args = ap.parse_args(argv)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_step: needs a CUDA GPU; this machine has none", file=sys.stderr)
        return 2
    from peer.config import load_run_config

    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(json.dumps({"gpu": gpu, "torch": torch.__version__}), flush=True)
    summary = []
    for name in args.configs.split(","):
        cfg = load_run_config(name)
        if args.batch_size:
            from peer.config import override

            cfg = override(cfg, train=dataclasses.replace(cfg.train, batch_size=args.batch_size))
        g = torch.Generator().manual_seed(0)
        batches = [
            torch.randint(
                0, cfg.data.vocab_size, (cfg.train.batch_size, cfg.data.seq_len + 1), generator=g
            ).to(args.device)
            for _ in range(4)
        ]
        rows = {}
        for arm in args.arms.split(","):
            try:
                row = run_arm(cfg, arm, batches, args.steps, args.warmup, args.device)
            except torch.OutOfMemoryError as e:  # a figure too: this arm does not fit this GPU
                print(json.dumps({"config": name, "arm": arm, "oom": str(e).splitlines()[0]}), flush=True)
                summary.append(f"{name:11s} {arm:10s} OUT OF MEMORY at batch {cfg.train.batch_size}")
                import gc

                gc.collect()
                torch.cuda.empty_cache()
                continue
            rows[arm] = row
            print(json.dumps(row), flush=True)
        base = rows.get("fp32")
        for arm, row in rows.items():
            ratio = row["samples_per_s"] / base["samples_per_s"] if base else float("nan")
            loss_ratio = row["loss_last"] / base["loss_last"] if base else float("nan")
            summary.append(
                f"{name:11s} b{cfg.train.batch_size:<3d} {arm:10s} step {row['step_s'] * 1e3:8.1f} ms  {row['tokens_per_s']:9.0f} tok/s  "
                f"x fp32 {ratio:5.2f}  MFU {row['mfu']:.3f}  peak {row['peak_gib']:5.1f} GiB  "
                f"loss {row['loss_last']:.3f} (x fp32 {loss_ratio:.3f})  "
                f"pseudo_gradient {row['pseudo_gradient_s']:.2f} s  begin_round {row['begin_round_s']:.2f} s"
            )
        best = rows.get("bf16-fused") or rows.get("bf16") or next(iter(rows.values()))
        w = wire(best["params"], best["step_s"])
        print(json.dumps({"config": name, "wire": w, "step_s_used": best["step_s"]}), flush=True)
        summary.append(f"{name:11s} wire (step {best['step_s'] * 1e3:.0f} ms): {json.dumps(w)}")
    print("SUMMARY")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
