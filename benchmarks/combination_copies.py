"""Span margins of the combination copy test: how much of an honest Δ lies in the span of the others'?

    .venv/bin/python benchmarks/combination_copies.py                 # 3 trials, 3 rounds, 16 peers, ~3 min
    .venv/bin/python benchmarks/combination_copies.py --trials 1 --rounds 2

The validator refuses a Δ of which at least ``scoring.combination_fraction`` lies in the span of other
peers' Δs of the round (and of the earlier rounds' Δs); the threshold needs a margin above what honest
peers show. Honest Δs are trained with the real trainer (``DilocoState`` inner AdamW steps on each
hotkey's assigned pages of the debug model, 13–64 inner steps: a compute spread), round after round
from the swarm's averaged outer step; the round's Δs go through the publish format (8-bit dense, and
top-k with error feedback for the sparse figures) and the evaluator's sketch. Printed per peer count
(3, 5, 8, 16, and 32 with ``--peers 32``): the honest peers' explained fractions (max, median), against this round's others
only and with the earlier rounds' Δs too; then what the copies of the same round show (mean of 2 and
of 3, a weighted mix, 2A − B, a mix plus Gaussian noise of 10/20/30 % of its norm, a mix of earlier
rounds' Δs, a top-k of a mix of sparse Δs, and for sparse Δs the support mean of all the round's Δs,
which a ``topk_aggregation: support`` swarm applies). For sparse Δs every figure is also given in the
"support-mean" geometry (the others divided coordinate by coordinate by how many of them sent there:
``span_measurements``' ``support_mean_explained``). The figure: the smallest margin (threshold − honest
max) and the copies' explained fractions next to the default threshold.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

STEP_CYCLE = [40, 13, 64, 26, 40, 20, 64, 32]
"""Inner steps of the honest peers, cycled (a compute spread like benchmarks/incentive.py's budgets)."""
PEER_COUNTS = (3, 5, 8, 16, 32)
LOOKBACK = 3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=3, help="independent runs (other hotkeys → other pages)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--peers", type=int, default=16, help="honest peers a round (counts up to it are measured)"
    )
    ap.add_argument(
        "--sketch-key",
        default=None,
        metavar="HEX",
        help="sketch with this validator key (64 hex characters: the keyed plan `validator run` uses); "
        "default: the public strided plan of the earlier figures",
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    key = None if args.sketch_key is None else bytes.fromhex(args.sketch_key)

    from peer.config import load_run_config
    from peer.data.pages import PageStore, prepare_data
    from validator.evaluation import EvalConfig, Evaluator
    from validator.scoring import ScoringConfig

    run = load_run_config("debug")
    data_dir = Path(tempfile.mkdtemp(prefix="gradswarm-combination-")) / "data"
    prepare_data(run.data, data_dir)
    store = PageStore(data_dir, run.data)
    ev = Evaluator(EvalConfig(), run, store, sketch_key=key)
    print(f"sketch plan: {ev.sketch_plan_id}", flush=True)
    thr = ScoringConfig().combination_fraction
    honest: dict[str, list[float]] = {}
    copies: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for trial in range(args.trials):
        rounds = train_rounds(run, store, trial, args.rounds, args.peers)
        for dense in (True, False):
            measure(ev, run, rounds, dense, honest, copies, [c for c in PEER_COUNTS if c <= args.peers])
        print(f"trial {trial}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\nload average {os.getloadavg()}")
    print(f"default scoring.combination_fraction = {thr}")
    print("honest peers' explained fraction (max / median over peers, rounds and trials):")
    worst = 0.0
    for name, xs in sorted(honest.items()):
        worst = max(worst, max(xs))
        print(f"  {name:34s} max {max(xs):.3f}  median {statistics.median(xs):.3f}  (n={len(xs)})")
    print(f"margin: threshold {thr} − honest max {worst:.3f} = {thr - worst:+.3f}")
    print("copies' explained fraction (min / median):")
    for name, xs in sorted(copies.items()):
        flag = "caught" if min(xs) >= thr else "NOT always caught"
        print(f"  {name:34s} min {min(xs):.4f}  median {statistics.median(xs):.4f}  {flag}")
    return 0


def train_rounds(run, store, trial: int, n_rounds: int, n_peers: int) -> list[dict]:
    """Per round: {"deltas": name → Δ, "base": θ_r}; ``n_peers`` honest hotkeys, outer Nesterov between
    rounds."""
    from peer.data.model import build_model
    from peer.data.pages import assign_pages
    from tests.fixtures_validator import train_delta

    steps = [STEP_CYCLE[i % len(STEP_CYCLE)] for i in range(n_peers)]
    names = [f"trial{trial}-peer{i}" for i in range(n_peers)]
    base = {n: p.detach().clone() for n, p in build_model(run).named_parameters()}
    mom = {n: torch.zeros_like(t) for n, t in base.items()}
    mu, lr = run.train.outer_momentum, run.train.outer_lr
    out = []
    for r in range(n_rounds):
        seed = f"combination-{trial}-{r}".encode()
        deltas = {}
        for i, n in enumerate(names):
            pages = assign_pages(n, r, seed, store.train_pages, run.data.pages_per_round)
            deltas[n] = train_delta(run, store, base, pages, steps[i], seed=100 * r + i)
        out.append({"deltas": deltas, "base": base})
        avg = {t: sum(d[t] for d in deltas.values()) / len(deltas) for t in base}
        mom = {t: mu * mom[t] + avg[t] for t in base}
        base = {t: base[t] - lr * (avg[t] + mu * mom[t]) for t in base}
    return out


def measure(ev, run, rounds, dense: bool, honest: dict, copies: dict, counts: list[int]) -> None:
    from peer.net.outbox import encode_delta
    from peer.training.robust import PLAIN, robust_mean
    from peer.training.sparse import ErrorFeedback, TopK, encode_sparse_delta
    from validator.sketches import span_measurements

    kind = "dense" if dense else "top-k"
    names = list(rounds[0]["deltas"])
    tensor_names = list(rounds[0]["deltas"][names[0]])
    topk = TopK.from_train(run.train)
    efs = {
        n: ErrorFeedback(
            [rounds[0]["deltas"][n][t].shape for t in tensor_names], topk, run.train.topk_ef_decay
        )
        for n in names
    }

    def published(d: dict) -> dict:
        """What a validator decodes from the Δ a peer publishes (8-bit dense, or the sparse Δ̂ itself)."""
        if dense:
            return ev.decode(encode_delta(d))
        return ev.decode(encode_sparse_delta(d, topk))

    sent: list[dict] = []
    for r, rnd in enumerate(rounds):
        if dense:
            sent.append({n: published(d) for n, d in rnd["deltas"].items()})
        else:
            sent.append(
                {
                    n: published(
                        dict(
                            zip(
                                tensor_names,
                                efs[n].step([d[t] for t in tensor_names], run.train.max_delta_norm),
                                strict=True,
                            )
                        )
                    )
                    for n, d in rnd["deltas"].items()
                }
            )
        sk = {n: ev.sketch(d) for n, d in sent[r].items()}
        for count in counts:
            group = names[:count]
            earlier = [
                sk_e for rr in range(max(0, r - LOOKBACK), r) for sk_e in _sketches(ev, sent[rr], group)
            ]
            for with_earlier in (False, True):
                res = span_measurements(
                    {(i, n): sk[n] for i, n in enumerate(group)}, earlier if with_earlier else []
                )
                label = f"{kind} {count} peers" + (" +earlier" if with_earlier else "")
                honest.setdefault(label, []).extend(v["explained"] for v in res.values())
                if not dense:  # the support-mean geometry (a copy of a "support" swarm's average)
                    honest.setdefault(f"{label} support-mean", []).extend(
                        v["support_mean_explained"] for v in res.values()
                    )
        # copies among all the honest peers of this round
        a, b, c = (sent[r][n] for n in names[:3])
        rng = torch.Generator().manual_seed(r)
        mixes = {
            "mean of 2": {t: (a[t] + b[t]) / 2 for t in a},
            "mean of 3": {t: (a[t] + b[t] + c[t]) / 3 for t in a},
            "0.7·A + 0.3·B": {t: 0.7 * a[t] + 0.3 * b[t] for t in a},
            "2·A − B": {t: 2 * a[t] - b[t] for t in a},
        }
        for pct in (10, 20, 30):
            mix = mixes["mean of 2"]
            norm = sum(float(v.pow(2).sum()) for v in mix.values()) ** 0.5
            total = sum(v.numel() for v in mix.values())
            noise = {t: torch.randn(v.shape, generator=rng) for t, v in mix.items()}
            scale = pct / 100 * norm / (total**0.5)
            mixes[f"mean of 2 + {pct}% noise"] = {t: mix[t] + scale * noise[t] for t in mix}
        if not dense:  # the average a topk_aggregation "support" swarm applies, over all honest peers
            mixes["support mean of all"] = {
                t: robust_mean(
                    [sent[r][n][t] for n in names], [1.0] * len(names), PLAIN, aggregation="support"
                )[0]
                for t in a
            }
        if r > 0:
            old = sent[r - 1]
            mixes["mean of 2 of last round"] = {t: (old[names[3]][t] + old[names[4]][t]) / 2 for t in a}
        for name, mix in mixes.items():
            d = published(mix)  # a top-k copy is re-sparsified: it must send a valid top-k Δ
            group = {(i, n): sk[n] for i, n in enumerate(names)}
            group[(99, "copy")] = ev.sketch(d)
            earlier = [s for rr in range(max(0, r - LOOKBACK), r) for s in _sketches(ev, sent[rr], names)]
            res = span_measurements(group, earlier)
            copies.setdefault(f"{kind} {name}", []).append(res[(99, "copy")]["explained"])
            if not dense:
                copies.setdefault(f"{kind} {name} support-mean", []).append(
                    res[(99, "copy")]["support_mean_explained"]
                )


def _sketches(ev, deltas: dict, names: list[str]) -> list[torch.Tensor]:
    return [ev.sketch(deltas[n]) for n in names]


if __name__ == "__main__":
    sys.exit(main())
