"""Validator benchmark: cost of scoring a peer vs the forward passes it needs, throughput, and ranking quality.

    .venv/bin/python benchmarks/validator.py     # debug config (3 trials) + a real 125M round, ~7 min on 2 cores
    .venv/bin/python benchmarks/validator.py --skip-big --trials 1      # ~40 s
    .venv/bin/python benchmarks/validator.py --skip-big --skip-cost --trials 3 --sampled-rounds 6 --max-peers 4
    .venv/bin/python benchmarks/validator.py --trials 3 --fresh-rounds 4 --sparse --threads 2   # ~25 min

Prints, measured in this run:

1. **cost ratio** (debug config): seconds the validator spends on a round (decode, apply Δ in place,
   batched per-page losses, restore, cross evaluations, similarity, the shared base pass) ÷ seconds of
   ``peer.data.model.evaluate_loss`` (forward + cross-entropy) over exactly the same pages with the same batch
   size. Both are run three times, alternating, best of each. Target ≤ 1.5.
2. **peers scored per round**: round length ÷ seconds per peer, for the debug config (a full round of 10
   peers, measured) and the ≈125M config (a real validator round of 2 peers on real 125M pages with few
   pages each; seconds per page measured through the validator, then multiplied by the default page
   counts — the one scaled figure, stated as such).
3. **Spearman correlation** between round scores and a known ground truth on the debug model, in
   ``--trials`` independent rounds (other hotkeys, assignments and seeds): peers that trained
   5/10/20/40/80 inner steps on their own pages, and peers that trained 40 steps with 100/75/50/25/0 % of
   their batches from their own pages (the rest from unassigned pages). Target ≥ 0.9.
4. **the same with sampling on** (``--sampled-rounds R --max-peers K``): each trial's 10 peers scored by
   a validator that evaluates only K of them a round (validator.sampling, a fresh end-of-round key per
   round) for R rounds, EMA over evaluated rounds only; Spearman of the final *weights* with the truth.
   Worst and median over the trials. Target ≥ 0.9.
5. **fresh rounds** (``--fresh-rounds R``, alone): each trial's hotkeys over R rounds, each with fresh
   pages and Δs of the same qualities, every peer evaluated with its history (the pooled assignment
   evidence) and the EMA a validator keeps: Spearman of every round's scores and of the final weights.
   The single-round figures of 3. keep one round's page noise; this is what reaches the chain.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from peer.config import load_run_config  # noqa: E402
from peer.data.model import build_model, lm_loss  # noqa: E402
from peer.data.pages import PageStore, assign_pages, eval_pages, prepare_data, round_batches  # noqa: E402
from peer.net.outbox import encode_delta  # noqa: E402
from peer.training.diloco import DilocoState  # noqa: E402
from validator.evaluation import Candidate, EvalConfig, Evaluator  # noqa: E402
from validator.scoring import ScoringConfig, score_round  # noqa: E402

EVAL_OVERRIDES: dict[str, int | str] = {}
"""``--eval FIELD=INT``: EvalConfig fields the ranking figures use instead of the defaults."""


def encode_dense(run, delta: dict) -> bytes:
    return encode_delta(delta)


def encode_topk(run, delta: dict) -> bytes:
    """``--sparse``: the Δ as a ``--compression topk`` peer publishes it in its first round (error
    feedback starts at zero: top-k of Δ itself, the run's density)."""
    from peer.training.sparse import TopK, encode_sparse_delta, sparsify

    topk = TopK.from_train(run.train)
    return encode_sparse_delta({n: sparsify(t, topk) for n, t in delta.items()}, topk)


ENCODE = encode_dense
"""How the ground-truth peers' Δs are published (``--sparse``: :func:`encode_topk`)."""


def scratch_dir(prefix: str) -> Path:
    """A temp folder for generated data, removed when the benchmark exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def hotkey(name: str) -> str:
    from substrateinterface import Keypair

    return Keypair.create_from_uri(f"//bench-{name}").ss58_address


def train(run, store, base, own: list[int], other: list[int], steps: int, own_fraction: float, seed: int):
    """Δ of ``steps`` inner steps as a peer trains (``peer.data.round_batches``: samples shuffled across the
    pages, cycled), with a deterministic share ``own_fraction`` of the batches from its own pages (4 = 100 %,
    2 = 50 %, ...) and the rest from ``other`` pages."""
    model = build_model(run)
    st = DilocoState(model, run.train)
    st.load_state_tensors([base[n] for n in st.names] + [torch.zeros_like(base[n]) for n in st.names])
    st.begin_round()
    bs = run.train.batch_size
    own_b = round_batches(store.samples(own), bs, f"bench-own-{seed}".encode())
    other_b = round_batches(store.samples(other), bs, f"bench-other-{seed}".encode()) if other else []
    used = {"own": 0, "other": 0}
    model.train()
    for i in range(steps):
        kind = "own" if (i % 4) < round(own_fraction * 4) else "other"
        pool = own_b if kind == "own" else other_b
        st.inner_step(lm_loss(model, pool[used[kind] % len(pool)]))
        used[kind] += 1
    return dict(zip(st.names, st.pseudo_gradient(), strict=True))


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / den if den else 0.0


def plain_forward_seconds(model, store, page_lists: list[list[int]], batch_size: int) -> float:
    """peer.data.model.evaluate_loss (forward + cross-entropy, no_grad) over the same pages and batch size."""
    from peer.data.model import evaluate_loss

    t0 = time.perf_counter()
    for pages in page_lists:
        evaluate_loss(model, store.batches(pages, batch_size), "cpu")
    return time.perf_counter() - t0


def swarm_base(run, store, trial: int) -> dict:
    """A base that has seen one swarm round (4 honest peers of 40 steps, outer step), per trial."""
    k = run.data.pages_per_round
    tag = f"t{trial}-" if trial else ""  # trial 0 keeps the names (and so the numbers) of earlier runs
    seed0 = f"bench-round-0{tag}".encode()
    base0 = {n: p.detach().clone() for n, p in build_model(run).named_parameters()}
    ds = [
        train(
            run,
            store,
            base0,
            assign_pages(hotkey(f"{tag}r0-{i}"), 0, seed0, store.train_pages, k),
            [],
            40,
            1.0,
            1000 * trial + i,
        )
        for i in range(4)
    ]
    avg = {t: sum(d[t] for d in ds) / len(ds) for t in base0}
    return {t: base0[t] - run.train.outer_lr * (1 + run.train.outer_momentum) * avg[t] for t in base0}


def ground_truth_peers(run, store, base, trial: int, round_: int = 1):
    """The 10 peers of known quality of one round: fresh pages (the round's seed), fresh Δs from ``base``.

    Returns (peers, candidates, seed); a peer is (name, truth group, truth value, Δ). Round 1 is the
    single-round experiment; later rounds (``--fresh-rounds``) keep the trial's hotkeys."""
    k = run.data.pages_per_round
    tag = f"t{trial}-" if trial else ""
    seed = f"bench-round-{round_}{tag}".encode()
    salt = 1000 * trial + 100_000 * (round_ - 1)  # round 1: the training seeds of earlier runs
    peers = []  # (name, truth group, truth value, delta)
    for steps in (5, 10, 20, 40, 80):
        name = f"steps-{steps}"
        own = assign_pages(hotkey(tag + name), round_, seed, store.train_pages, k)
        peers.append((name, "steps", steps, train(run, store, base, own, [], steps, 1.0, salt + steps)))
    for frac in (1.0, 0.75, 0.5, 0.25, 0.0):
        name = f"own-{int(frac * 100)}"
        own = assign_pages(hotkey(tag + name), round_, seed, store.train_pages, k)
        others = [p for p in store.train_pages if p not in set(own)]
        other = eval_pages(round_, seed, others, k, purpose=f"bench/{name}")
        delta = train(run, store, base, own, other, 40, frac, salt + 100 + int(frac * 100))
        peers.append((name, "data", frac, delta))
    cands = [
        Candidate(uid=i, hotkey=hotkey(tag + n), delta_blob=ENCODE(run, d))
        for i, (n, _, _, d) in enumerate(peers)
    ]
    return peers, cands, seed


def spearman_round(run, store, trial: int):
    """One round of the ground-truth experiment: a base after one swarm round, then 10 peers of known quality.

    Returns (peers, evaluator, candidates, base, seed, round measurements, scores)."""
    base = swarm_base(run, store, trial)
    peers, cands, seed1 = ground_truth_peers(run, store, base, trial)
    ev = Evaluator(EvalConfig(**EVAL_OVERRIDES), run, store)
    rm, _ = ev.evaluate_round(1, seed1, base, cands)
    scores = score_round(rm, ScoringConfig())
    return peers, ev, cands, base, seed1, rm, scores


def spearman_by_group(peers, values: list[float]) -> dict[str, float]:
    out = {}
    for group in ("steps", "data"):
        idx = [i for i, p in enumerate(peers) if p[1] == group]
        out[group] = spearman([peers[i][2] for i in idx], [values[i] for i in idx])
    return out


def fresh_rounds_part(run, store, base, trial: int, rounds: int) -> dict:
    """The trial's 10 hotkeys over ``rounds`` rounds as a validator sees them: every round fresh pages and
    fresh Δs (same qualities), every peer evaluated, scored with the hotkeys' history (pooled assignment
    evidence) and an EMA; Spearman of each round's scores and of the final *weights* with the truth."""
    from validator.ema import EmaState, update_ema
    from validator.scoring import BurnPolicy, normalize_weights

    cfg = ScoringConfig()
    ev = Evaluator(EvalConfig(**EVAL_OVERRIDES), run, store)
    ema = EmaState()
    per_round, by_weight = [], []
    for r in range(1, rounds + 1):
        peers, cands, seed = ground_truth_peers(run, store, base, trial, r)
        rm, _ = ev.evaluate_round(r, seed, base, cands)
        scores = score_round(rm, cfg, history=ema)
        ema = update_ema(ema, r, scores, {c.uid: c.hotkey for c in cands}, cfg.ema_alpha)
        per_round.append(spearman_by_group(peers, [s.score for s in scores]))
        so_far = normalize_weights({u: e.value for u, e in ema.entries.items()}, BurnPolicy())
        by_weight.append(spearman_by_group(peers, [so_far.shares.get(c.uid, 0.0) for c in cands]))
        print(
            f"    trial {trial} round {r}: Spearman(score) steps {per_round[-1]['steps']:.3f}, data "
            f"{per_round[-1]['data']:.3f}; Spearman(weight so far) steps {by_weight[-1]['steps']:.3f}, "
            f"data {by_weight[-1]['data']:.3f}; refused "
            + (
                ", ".join(
                    f"{p[0]} ({s.reason[:60]})" for p, s in zip(peers, scores, strict=True) if s.score <= 0
                )
                or "none"
            ),
            flush=True,
        )
    weight = [so_far.shares.get(c.uid, 0.0) for c in cands]  # the weights after the last round
    return {
        "per_round": per_round,
        "weight_by_round": by_weight,
        "final": spearman_by_group(peers, weight),
        "weights": {p[0]: x for p, x in zip(peers, weight, strict=True)},
    }


def sampled_part(run, store, peers, cands, base, seed1, trial: int, rounds: int, k: int) -> dict:
    """The same 10 peers scored over ``rounds`` rounds by a validator that evaluates only ``k`` a round
    (validator.sampling: stalest first + keyed random slots, a fresh key per round), EMA over evaluated
    rounds only; returns Spearman(weight, truth) per group from the final weights (what goes on chain)."""
    from validator.ema import EmaState, last_evaluated, update_ema
    from validator.sampling import sampling_key, select_peers
    from validator.scoring import BurnPolicy, normalize_weights, not_sampled_scores

    cfg = ScoringConfig()
    ev = Evaluator(EvalConfig(**EVAL_OVERRIDES), run, store)
    uids = {c.uid: c.hotkey for c in cands}
    ema = EmaState()
    evaluated = {u: 0 for u in uids}
    for r in range(1, rounds + 1):
        key = sampling_key(hashlib.sha256(f"bench-end-block-{trial}-{r}".encode()).digest(), r)
        sel = select_peers(uids, last_evaluated(ema, uids), k, key)
        rm, _ = ev.evaluate_round(1, seed1, base, [c for c in cands if c.uid in set(sel.selected)])
        scores = score_round(rm, cfg, history=ema) + not_sampled_scores(sel.not_sampled, uids)
        ema = update_ema(ema, r, scores, uids, cfg.ema_alpha, not_sampled=sel.not_sampled)
        for u in sel.selected:
            evaluated[u] += 1
    w = normalize_weights({u: e.value for u, e in ema.entries.items()}, BurnPolicy())
    weight = [w.shares.get(c.uid, 0.0) for c in cands]
    out = {"weights": {p[0]: x for p, x in zip(peers, weight, strict=True)}, "evaluated": evaluated}
    for group in ("steps", "data"):
        idx = [i for i, p in enumerate(peers) if p[1] == group]
        out[f"spearman_{group}"] = spearman([peers[i][2] for i in idx], [weight[i] for i in idx])
    return out


def fresh_part(trials: int, rounds: int) -> int:
    """``--fresh-rounds``: :func:`fresh_rounds_part` per trial, then the worst and median over trials."""
    run = load_run_config("debug")
    data_dir = scratch_dir("gradswarm-bench-validator-")
    prepare_data(run.data, data_dir)
    store = PageStore(data_dir, run.data)
    out = []
    for trial in range(trials):
        out.append(fresh_rounds_part(run, store, swarm_base(run, store, trial), trial, rounds))
        print(f"  trial {trial} weights " + ", ".join(f"{n} {x:.3f}" for n, x in out[-1]["weights"].items()))
    for g in ("steps", "data"):
        rnd = [r[g] for t in out for r in t["per_round"]]
        fin = [t["final"][g] for t in out]
        print(
            f"Spearman(score, {g}), single rounds: worst {min(rnd):.3f}, median {statistics.median(rnd):.3f} "
            f"over {len(rnd)} rounds ({', '.join(f'{v:.3f}' for v in rnd)})"
        )
        for r in range(1, rounds):
            at = [t["weight_by_round"][r - 1][g] for t in out]
            print(
                f"Spearman(weight after {r} rounds, {g}): worst {min(at):.3f}, median {statistics.median(at):.3f} "
                f"({', '.join(f'{v:.3f}' for v in at)})"
            )
        print(
            f"Spearman(weight after {rounds} rounds, {g}): worst {min(fin):.3f}, median "
            f"{statistics.median(fin):.3f} over {len(fin)} trials ({', '.join(f'{v:.3f}' for v in fin)})"
        )
    return 0


def debug_part(
    threads: int, trials: int, sampled_rounds: int = 0, max_peers: int = 4, cost: bool = True
) -> dict:
    run = load_run_config("debug")
    data_dir = scratch_dir("gradswarm-bench-validator-")
    prepare_data(run.data, data_dir)
    store = PageStore(data_dir, run.data)
    out: dict = {"trials": []}
    for trial in range(trials):
        peers, ev, cands, base, seed1, rm, scores = spearman_round(run, store, trial)
        t = {
            "scores": {p[0]: s.score for p, s in zip(peers, scores, strict=True)},
            "reasons": {p[0]: s.reason for p, s in zip(peers, scores, strict=True)},
            "norms": {p[0]: m.delta_norm for p, m in zip(peers, rm.peers, strict=True)},
        }
        for group in ("steps", "data"):
            idx = [i for i, p in enumerate(peers) if p[1] == group]
            t[f"spearman_{group}"] = spearman([peers[i][2] for i in idx], [scores[i].score for i in idx])
        if sampled_rounds:
            t["sampled"] = sampled_part(
                run, store, peers, cands, base, seed1, trial, sampled_rounds, max_peers
            )
            print(
                f"  trial {trial}: sampled Spearman steps {t['sampled']['spearman_steps']:.3f}, data "
                f"{t['sampled']['spearman_data']:.3f} (every peer evaluated: {t['spearman_steps']:.3f}, "
                f"{t['spearman_data']:.3f})",
                flush=True,
            )
        out["trials"].append(t)
        if trial == 0 and cost:
            out.update(cost_part(run, store, peers, ev, cands, base, seed1, rm))
    for group in ("steps", "data"):
        vals = [t[f"spearman_{group}"] for t in out["trials"]]
        out[f"spearman_{group}"] = statistics.mean(vals)
        out[f"spearman_{group}_min"] = min(vals)
    return out


def cost_part(run, store, peers, ev, cands, base, seed1, rm) -> dict:
    """Validator round time vs plain forward passes over the same pages (best of 3, alternating)."""
    cfg = ev.cfg
    heldout = rm.heldout_page_ids
    base_pages = list(
        dict.fromkeys(heldout + rm.control_page_ids + [p for m in rm.peers for p in m.assigned_page_ids])
    )
    lists = [base_pages]
    for m in rm.peers:
        lists.append(heldout + m.assigned_page_ids + m.control_page_ids)
        if m.heldout_loss_opposite is not None:  # the direction test: held-out pages again at θ + αΔ
            lists.append(heldout)
        for _ in m.cross_gains:  # each cross reference evaluated m's assigned pages once
            lists.append(m.assigned_page_ids)
    model = build_model(run)
    model.load_state_dict({**model.state_dict(), **base})
    plain_forward_seconds(model, store, lists, cfg.batch_size)  # warm-up
    # alternate the two so that load from other processes hits both alike; keep the best of each
    totals, plains = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        ev.evaluate_round(1, seed1, base, cands)
        totals.append(time.perf_counter() - t0)
        plains.append(plain_forward_seconds(model, store, lists, cfg.batch_size))
    total, plain = min(totals), min(plains)
    n = len(peers)
    per_peer = total / n
    samples_per_peer = sum(len(x) for x in lists) * run.data.samples_per_page / n
    return {
        "peers": n,
        "validator_s_total": total,
        "forward_s_total": plain,
        "cost_ratio": total / plain,
        "per_peer_s": per_peer,
        "samples_per_peer": samples_per_peer,
        "round_seconds": run.train.round_seconds,
        "peers_per_round": run.train.round_seconds / per_peer,
    }


def big_part(config: str, data_dir: Path) -> dict:
    """A real validator round on ``config`` (real tokenizer and pages, random Δs of two peers), with few pages.

    Per peer the validator needs ``heldout + assigned + control + cross_peers × assigned`` pages after its
    Δ; the round here evaluates 2 + 2 + 2 of them per peer (no cross phase: random Δs are not plausible)
    and the shared base pass. Seconds per page through the validator (decode, apply, losses, restore) are
    measured, then multiplied by the default EvalConfig's page counts: the only scaled figure.
    """
    run = load_run_config(config)
    prepare_data(run.data, data_dir)
    store = PageStore(data_dir, run.data)
    small = EvalConfig(heldout_pages=2, assigned_pages=2, control_pages=2, cross_peers=1, batch_size=8)
    t0 = time.perf_counter()
    ev = Evaluator(small, run, store)
    build_s = time.perf_counter() - t0
    base = {n: p.detach().clone() for n, p in ev.params.items()}
    g = torch.Generator().manual_seed(0)
    cands = []
    for i in range(2):
        delta = {n: torch.randn(p.shape, generator=g) * 1e-4 for n, p in ev.params.items()}
        cands.append(Candidate(uid=i, hotkey=hotkey(f"big-{i}"), delta_blob=encode_delta(delta)))
    t0 = time.perf_counter()
    rm, _ = ev.evaluate_round(1, b"bench-big", base, cands)
    round_s = time.perf_counter() - t0
    base_pages = len(
        set(rm.heldout_page_ids + rm.control_page_ids + [p for m in rm.peers for p in m.assigned_page_ids])
    )
    per_page_base = rm.base_seconds / base_pages
    after_pages = [
        len(rm.heldout_page_ids) * (2 if m.heldout_loss_opposite is not None else 1)  # + the direction test
        + len(m.assigned_page_ids)
        + len(m.control_page_ids)
        for m in rm.peers
    ]
    per_peer_s = [m.seconds for m in rm.peers]
    per_page = sum(per_peer_s) / sum(after_pages)
    # the same pages, plain forward + cross-entropy (evaluate_loss), for the cost ratio at this size
    from peer.data.model import evaluate_loss

    plain_pages = rm.heldout_page_ids + rm.peers[0].assigned_page_ids + rm.peers[0].control_page_ids
    t0 = time.perf_counter()
    evaluate_loss(ev.model, store.batches(plain_pages, 8), "cpu")
    plain_per_page = (time.perf_counter() - t0) / len(plain_pages)
    d = EvalConfig()
    pages_default = (
        d.heldout_pages * (2 if d.direction_test else 1)
        + d.assigned_pages
        + d.control_pages
        + d.cross_peers * d.assigned_pages
    )
    per_peer_default = (
        pages_default * per_page + d.assigned_pages * per_page_base
    )  # + its share of the base pass
    return {
        "config": config,
        "params_m": sum(p.numel() for p in ev.params.values()) / 1e6,
        "tokens_per_page": run.data.samples_per_page * run.data.seq_len,
        "build_s": build_s,
        "round_s": round_s,
        "base_pages": base_pages,
        "base_s": rm.base_seconds,
        "per_peer_s": per_peer_s,
        "after_pages": after_pages,
        "per_page_s": per_page,
        "plain_per_page_s": plain_per_page,
        "cost_ratio": per_page / plain_per_page,
        "pages_default": pages_default + d.assigned_pages,
        "per_peer_default_s": per_peer_default,
        "round_seconds": run.train.round_seconds,
        "peers_per_round": run.train.round_seconds / per_peer_default,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--trials", type=int, default=3, help="independent ground-truth rounds for the Spearman figures"
    )
    ap.add_argument("--skip-big", action="store_true", help="skip the 125M round (~5 min on 2 CPU cores)")
    ap.add_argument("--skip-cost", action="store_true", help="skip the cost/throughput measurement")
    ap.add_argument(
        "--sampled-rounds",
        type=int,
        default=6,
        help="also score each trial's peers over this many rounds with sampling on (0 = skip)",
    )
    ap.add_argument("--max-peers", type=int, default=4, help="the sampling budget K of those rounds")
    ap.add_argument(
        "--fresh-rounds",
        type=int,
        default=0,
        help="instead: each trial's hotkeys over this many rounds of fresh pages and Δs, every peer evaluated, "
        "EMA; Spearman of each round's scores and of the final weights (only this part runs)",
    )
    ap.add_argument("--sparse", action="store_true", help="score sparse top-k Δs (#17) instead of 8-bit")
    ap.add_argument(
        "--eval",
        nargs="*",
        default=[],
        metavar="FIELD=INT",
        help="EvalConfig overrides for the ranking figures, e.g. assigned_pages=48 (integers) or "
        "gain_pages=heldout",
    )
    args = ap.parse_args()
    for kv in args.eval:
        field_name, _, value = kv.partition("=")
        if field_name == "gain_pages":  # the one text field: where the paid held-out pages come from
            EVAL_OVERRIDES[field_name] = value
            continue
        if field_name not in EvalConfig.__dataclass_fields__ or not value.lstrip("-").isdigit():
            ap.error(
                f"--eval {kv!r}: expected FIELD=INT with FIELD an EvalConfig field, or gain_pages=unseen|heldout"
            )
        EVAL_OVERRIDES[field_name] = int(value)
    if args.sparse:
        global ENCODE
        ENCODE = encode_topk
    torch.set_num_threads(args.threads)
    if args.fresh_rounds:
        return fresh_part(args.trials, args.fresh_rounds)
    d = debug_part(args.threads, args.trials, args.sampled_rounds, args.max_peers, cost=not args.skip_cost)
    if args.sampled_rounds:
        for g in ("steps", "data"):
            vals = [t["sampled"][f"spearman_{g}"] for t in d["trials"]]
            print(
                f"with sampling (K = {args.max_peers} of {len(d['trials'][0]['scores'])} peers a round, "
                f"{args.sampled_rounds} rounds, weights from the EMA): Spearman(weight, {g}) worst {min(vals):.3f}, "
                f"median {statistics.median(vals):.3f} over {len(vals)} trials: {', '.join(f'{v:.3f}' for v in vals)}"
            )
        for i, t in enumerate(d["trials"]):
            print(f"  trial {i}: evaluated per peer {t['sampled']['evaluated']}")
            print("    weights " + ", ".join(f"{n} {x:.3f}" for n, x in t["sampled"]["weights"].items()))
    if args.skip_cost:
        for g in ("steps", "data"):
            print(
                f"every peer evaluated (one round): Spearman(score, {g}) per trial "
                + ", ".join(f"{t[f'spearman_{g}']:.3f}" for t in d["trials"])
            )
        return 0
    print(f"debug config, {d['peers']} peers, {args.threads} threads:")
    print(
        f"  validator evaluation {d['validator_s_total']:.2f}s vs plain forward passes over the same samples "
        f"{d['forward_s_total']:.2f}s -> cost ratio {d['cost_ratio']:.2f} (target <= 1.5)"
    )
    print(
        f"  {d['per_peer_s']:.3f}s per peer ({d['samples_per_peer']:.0f} samples) -> "
        f"{d['peers_per_round']:.0f} peers per {d['round_seconds']:g}s round"
    )
    print(
        f"  Spearman(score, inner steps) = {d['spearman_steps']:.3f} mean, {d['spearman_steps_min']:.3f} min; "
        f"Spearman(score, own-data fraction) = {d['spearman_data']:.3f} mean, {d['spearman_data_min']:.3f} min "
        f"over {len(d['trials'])} trials (target >= 0.9)"
    )
    for i, t in enumerate(d["trials"]):
        print(f"  trial {i}: Spearman steps {t['spearman_steps']:.3f}, data {t['spearman_data']:.3f}")
        for name, s in t["scores"].items():
            print(f"    {name:10s} |Δ| {t['norms'][name]:6.2f}  score {s:.5f}  {t['reasons'][name]}")
    if not args.skip_big:
        data_dir = scratch_dir("gradswarm-bench-validator-125m-")
        b = big_part("llama-125m", data_dir)
        print(
            f"{b['config']} ({b['params_m']:.0f}M params), {args.threads} threads, a real validator round of 2 "
            f"peers with {b['after_pages'][0]} pages each after its Δ ({b['tokens_per_page']} tokens a page):"
        )
        print(
            f"  round {b['round_s']:.0f}s: base pass {b['base_pages']} pages {b['base_s']:.0f}s, peers "
            f"{', '.join(f'{x:.0f}s' for x in b['per_peer_s'])} -> {b['per_page_s']:.1f}s per page vs plain "
            f"forward {b['plain_per_page_s']:.1f}s -> cost ratio {b['cost_ratio']:.2f}"
        )
        print(
            f"  at the default eval counts ({b['pages_default']} pages per peer): {b['per_peer_default_s']:.0f}s "
            f"per peer -> {b['peers_per_round']:.2f} peers per {b['round_seconds']:g}s round on this CPU"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
