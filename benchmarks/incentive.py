"""Incentive benchmark: are rewards proportional to compute, fair among equals and sybil-neutral?

    .venv/bin/python benchmarks/incentive.py --trials 3                      # 15 runs, ~35 min on 2 cores
    .venv/bin/python benchmarks/incentive.py --scenarios compute --trials 1  # one run, ~2 min
    .venv/bin/python benchmarks/incentive.py --analyse runs/incentive        # re-score recorded runs

Every run is a real local subnet (``launch.local_subnet``: LocalLedger, bootstrap DHT, ``peer join``
processes that train the debug model and average with hivemind, one ``validator run`` that fetches,
evaluates, scores and sets weights). The ground truth is each peer's inner-step budget per round
(``peer join --max-inner-steps`` through the launcher's ``per_peer_args``); the steps every peer really
ran are read back from its ``rounds.jsonl`` and printed, so a peer that could not reach its budget on a
loaded box shows up as such. Scenarios:

* ``compute``: three peers with 1×, 2× and 4× the unit budget. Figures: weight(2×) ÷ weight(1×) and
  weight(4×) ÷ weight(1×). Targets ≥ 1.7 and ≥ 3.2.
* ``sybil2``, ``sybil3``, ``sybil5``: one peer with the full budget (4 units) and k peers splitting the
  same budget (each 4/k units, each a hotkey of its own, so each trains on its own assigned pages).
  Figure: Σ weight(sybils) ÷ weight(single). Target ≤ 1.1.
* ``equal``: four peers with the same budget (2 units). Figure: max ÷ min weight. Target ≤ 1.25.
* every honest peer-round of every scenario that the validator evaluated: the share refused by the
  assignment test ("not shown to have trained" / "not trained on its assigned pages"). Target ≤ 2 %.

Weights are the validator's normalised EMA after the last scored round. A peer-round whose Δ the
validator could not fetch (``rejected``: a transport failure on a loaded box, not a scoring decision)
makes the replay leave that round out for every peer (scoring the others without it would skew the
comparison); such peer-rounds are counted as "not fetched". Because scoring is a pure
function of the recorded measurements (``rounds/<r>/record.json``), every run is scored twice from the
same measurements: with the scoring defaults before issue #18 (``BEFORE``: held-out gain × assignment
factor) and with today's defaults (``AFTER``: validator.scoring), so "before" and "after" see the same
rounds, the same Δs and the same noise. The live validator's own weights (on the ledger) are printed
as well; they match the replay of the rule it ran with (the records keep its config). A third column,
``1-round``, is today's rule with the single-round assignment test (``evidence_rounds = 1``), and
``--analyse`` ends with a Monte Carlo of what a peer that never (or only sometimes) trains would earn
under each rule, from the honest per-page t's measured in the runs (``non_trainer_pay``). What a replay
cannot show is a change of the *averaging* weights (the swarm's dynamics): this benchmark changes only
the reward.

Cheap by design (the box has 2 cores shared with others): debug model, one validator, 3–6 peers, one
torch thread each, 10 s rounds, 6 scored rounds, budgets of 13–64 inner steps a round at
``--unit-steps 16`` (at most ~4 s of one core a round): ~2 minutes a run, ~35 minutes for 15 runs at load
10–18. With ``--unit-steps 8`` the 1× peer (8 steps) fails the assignment test in about half its rounds.
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

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from validator.ema import EmaState, update_ema  # noqa: E402
from validator.evaluation import RoundMeasurements  # noqa: E402
from validator.evidence import assignment_test  # noqa: E402
from validator.scoring import (  # noqa: E402
    ScoringConfig,
    normalize_weights,
    not_sampled_scores,
    score_round,
)

ASSIGNMENT_REFUSALS = ("not shown to have trained", "not trained on its assigned pages")
TARGETS = {"2x": 1.7, "4x": 3.2, "sybil": 1.1, "equal": 1.25, "refusals": 0.02}


def scenario_budgets(name: str, unit: int) -> list[tuple[str, int]]:
    """(label, inner-step budget) of every peer of a scenario, peer-0 first."""
    if name == "compute":
        return [("1x", unit), ("2x", 2 * unit), ("4x", 4 * unit)]
    if name.startswith("sybil"):
        k = int(name.removeprefix("sybil"))
        full = 4 * unit
        return [("single", full)] + [("sybil", round(full / k))] * k
    if name == "equal":
        return [("equal", 2 * unit)] * 4
    raise SystemExit(f"unknown scenario {name!r}: compute, sybil2, sybil3, sybil5, equal")


# ------------------------------------------------------------------------------------------- running


def launch_config(name: str, budgets: list[tuple[str, int]], args, run_dir: Path) -> dict:
    return {
        "name": f"incentive-{name}",
        "run_dir": str(run_dir),
        "model_config": args.model_config,
        "peers": len(budgets),
        "behaviours": [],
        "validators": 1,
        "rounds": args.rounds,
        "block_time": args.block_time,
        "round_blocks": args.round_blocks,
        "peer_threads": 1,
        "validator_threads": 1,
        "per_peer_args": [["--max-inner-steps", str(steps), "--eval-pages", "0"] for _, steps in budgets],
        "validator_args": list(args.validator_args),
    }


def run_scenario(name: str, trial: int, args) -> Path:
    budgets = scenario_budgets(name, args.unit_steps)
    run_dir = Path(args.out).resolve() / f"{name}-{trial}"
    if (run_dir / "summary.json").exists():
        print(f"{run_dir} exists: analysed as recorded", flush=True)
        return run_dir
    cfg_path = Path(args.out).resolve() / "configs" / f"{name}-{trial}.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(yaml.safe_dump(launch_config(name, budgets, args, run_dir)))
    log = Path(args.out).resolve() / "configs" / f"{name}-{trial}.log"
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(
            [sys.executable, "-m", "launch.local_subnet", "--config", str(cfg_path)],
            cwd=REPO,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            check=False,
        ).returncode
    load = os.getloadavg()
    (run_dir / "bench.json").write_text(
        json.dumps({"rc": rc, "seconds": time.time() - t0, "loadavg": load, "budgets": budgets})
    )
    print(
        f"{name}-{trial}: exit {rc} in {time.time() - t0:.0f}s (load {load[0]:.1f} {load[1]:.1f})", flush=True
    )
    return run_dir


# ------------------------------------------------------------------------------------------- analysis


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


BEFORE = ScoringConfig(
    reward="heldout", max_norm_ratio=5.0, min_specificity_t=2.0, max_reference_scale=float("inf")
)
"""The scoring defaults before issue #18: held-out gain × assignment factor, norm ≤ 5× median, t ≥ 2,
references scaled by any held-out ratio."""
ONE_ROUND = ScoringConfig(evidence_rounds=1)
"""Today's rule with the single-round assignment test (t ≥ 1.5 in the round itself), as before the
pooled evidence of ``evidence_rounds``."""
AFTER = ScoringConfig()
"""The scoring defaults now (validator.scoring)."""
PRE_THIN = ScoringConfig(cap_median_of_passers=False)
"""Today's rule without the guard of the red team of thin rounds (2026-12-06, benchmarks/thin_rounds.py):
the memorisation cap's median over every peer past the solo gates. The column shows what it costs
honest peers."""


def replay(records: list[dict], cfg: ScoringConfig) -> tuple[dict[int, float], list[tuple]]:
    """Final weight shares (uid → share) and every (round, hotkey, reason, specificity t) under ``cfg``
    (the EMA state, with its assignment-test evidence, carried from round to round as the validator
    does)."""
    ema = EmaState()
    shares: dict[int, float] = {}
    reasons = []
    for rec in records:
        rm = RoundMeasurements.from_json(rec["measurements"])
        uids = {int(u): e["hotkey"] for u, e in rec["ema_after"]["entries"].items()}
        ns = {int(u): r for u, r in rec.get("sampling", {}).get("not_sampled", {}).items() if int(u) in uids}
        # a Δ the validator could not fetch says nothing about the reward rule, and scoring the others
        # without it skews the comparison: such a round is left out for everyone (and counted)
        unreached = {p.uid for p in rm.peers if p.status == "rejected"}
        if unreached:
            reasons += [(rm.round, p.hotkey, "unreached", None) for p in rm.peers if p.uid in unreached]
            continue
        scores = score_round(rm, cfg, history=ema) + not_sampled_scores(ns, uids)
        ema = update_ema(ema, rm.round, scores, uids, cfg.ema_alpha, not_sampled=ns)
        shares = normalize_weights({u: e.value for u, e in ema.entries.items()}, cfg.burn).shares
        reasons += [
            (rm.round, s.hotkey, s.reason, s.terms.get("specificity_t"))
            for s in scores
            if s.terms.get("status") == "ok"
        ]
    return shares, reasons


def analyse_run(run_dir: Path, rules: dict[str, ScoringConfig]) -> dict | None:
    summary_path = run_dir / "summary.json"
    bench_path = run_dir / "bench.json"
    if not summary_path.exists() or not bench_path.exists():
        return None
    summary = json.loads(summary_path.read_text())
    bench = json.loads(bench_path.read_text())
    vdir = run_dir / "validators" / "validator-0" / "rounds"
    records = sorted(
        (json.loads((d / "record.json").read_text()) for d in vdir.iterdir() if (d / "record.json").exists()),
        key=lambda r: r["round"],
    )
    peers = sorted(summary["peers"], key=lambda p: int(p["name"].removeprefix("peer-")))
    labels = {p["name"]: lab for p, (lab, _) in zip(peers, bench["budgets"], strict=True)}
    out = {
        "run": run_dir.name,
        "rc": bench["rc"],
        "seconds": round(bench["seconds"]),
        "loadavg": bench["loadavg"],
        "rounds_scored": [r["round"] for r in records],
        "peers": [],
        "rules": {},
    }
    for p, (label, budget) in zip(peers, bench["budgets"], strict=True):
        steps = [r["inner_steps"] for r in read_jsonl(run_dir / "peers" / p["name"] / "rounds.jsonl")]
        out["peers"].append(
            {
                "name": p["name"],
                "label": label,
                "budget": budget,
                "steps_mean": statistics.fmean(steps) if steps else None,
                "steps_min": min(steps) if steps else None,
                "uid": p["uid"],
                "hotkey": p["hotkey"],
                "ledger_weight": p.get("weight"),
            }
        )
    for rule_name, rule in rules.items():
        shares, reasons = replay(records, rule)
        w = {p["name"]: shares.get(p["uid"], 0.0) for p in out["peers"]}
        unreached = [r for r in reasons if r[2] == "unreached"]
        reasons = [r for r in reasons if r[2] != "unreached"]
        refused = [r for r in reasons if r[2].startswith(ASSIGNMENT_REFUSALS)]
        zero = [r for r in reasons if r[2] != "scored"]
        budget = {p["hotkey"]: p["budget"] for p in out["peers"]}
        by_budget: dict[int, list[int]] = {}
        t_by_budget: dict[int, list[float]] = {}
        for _, hk, why, st in reasons:
            if st is not None:
                t_by_budget.setdefault(budget[hk], []).append(st)
            b = by_budget.setdefault(budget[hk], [0, 0])
            b[0] += why.startswith(ASSIGNMENT_REFUSALS)
            b[1] += 1
        out["rules"][rule_name] = {
            "refusals_by_budget": by_budget,
            "t_by_budget": t_by_budget,
            "weights": w,
            "figures": figures(w, labels),
            "peer_rounds": len(reasons),
            "assignment_refusals": len(refused),
            "not_fetched": len(unreached),
            "zero_scores": len(zero),
            "zero_reasons": sorted({r[2][:90] for r in zero}),
        }
    return out


PATTERNS = {"never": (False,), "1 in 4": (True, False, False, False), "3 in 4": (True, True, True, False)}
"""Which rounds a simulated peer trains in (repeating): never (a copier, random pages, a lazy peer),
or intermittently (trains, then coasts on its evidence)."""


def non_trainer_pay(
    cfg: ScoringConfig, honest_t: list[float], pattern: tuple[bool, ...], rounds: int = 100_000, seed: int = 0
) -> dict[str, float]:
    """Expected pay of a peer that trains only in ``pattern``'s rounds, relative to an honest peer of the
    same size that trains every round, under ``cfg``'s assignment test (Monte Carlo, pure).

    Model: a training round's per-page t is drawn from ``honest_t`` (measured, this budget); a round
    without training has t ~ N(0, 1) (its page differences are noise around 0: the generic reference
    fits its pages as well as its own Δ); its specificity is t × the page noise, which both share, so
    the pay is t^q × the evidence factor when the test passes (same held-out gain assumed: a copier of
    the average has at least an honest peer's). Returns the pass rate and pay of its non-training
    rounds and its income per round over the pattern, each ÷ the honest peer's per-round pay.
    """
    import random

    rng = random.Random(seed)

    def run(pat: tuple[bool, ...]) -> tuple[float, float, float, int]:
        hist: list[float] = []
        paid_off = passed_off = total = 0.0
        n_off = 0
        for i in range(rounds):
            trains = pat[i % len(pat)]
            t = rng.choice(honest_t) if trains else rng.gauss(0.0, 1.0)
            pay = 0.0
            if t > 0:
                ok, factor, _, _ = assignment_test(
                    hist[-(cfg.evidence_rounds - 1) :] if cfg.evidence_rounds > 1 else [], t, cfg
                )
                pay = t**cfg.reward_exponent * factor if ok else 0.0
            total += pay
            if not trains:
                n_off += 1
                paid_off += pay
                passed_off += pay > 0
            hist.append(max(-cfg.evidence_t_clip, min(cfg.evidence_t_clip, t)))
        return paid_off, passed_off, total, n_off

    _, _, honest_total, _ = run((True,))
    unit = honest_total / rounds
    paid_off, passed_off, total, n_off = run(pattern)
    return {
        "off_pass_rate": passed_off / n_off if n_off else 0.0,
        "off_round_pay": paid_off / n_off / unit if n_off else 0.0,
        "income": total / rounds / unit,
    }


def print_non_trainers(results: list[dict], rules: dict[str, ScoringConfig]) -> None:
    """What a peer that does not train (or trains only some rounds) is expected to earn under each rule,
    using the honest t's measured in ``results`` for the smallest and the largest budget."""
    print(
        "\nnon-training peers (Monte Carlo on the measured honest t's; pay ÷ an honest peer's of that budget):"
    )
    for rule, cfg in rules.items():
        if cfg.reward != "specificity":
            continue
        t_by: dict[int, list[float]] = {}
        for res in results:
            for b, ts in res["rules"][rule]["t_by_budget"].items():
                t_by.setdefault(int(b), []).extend(ts)
        for b in sorted({min(t_by), max(t_by)} if t_by else ()):
            parts = []
            for name, pat in PATTERNS.items():
                r = non_trainer_pay(cfg, t_by[b], pat)
                parts.append(
                    f"{name}: off-rounds pass {r['off_pass_rate']:.1%}, paid {r['off_round_pay']:.1%}, "
                    f"income {r['income']:.1%}"
                )
            print(f"  {rule:>8} {b} steps ({len(t_by[b])} t's): " + " · ".join(parts))


def figures(w: dict[str, float], labels: dict[str, str]) -> dict[str, float | None]:
    by: dict[str, list[float]] = {}
    for name, lab in labels.items():
        by.setdefault(lab, []).append(w[name])

    def ratio(a: float, b: float) -> float | None:
        return a / b if b > 0 else (None if a == 0 else float("inf"))

    if "1x" in by:
        return {"2x": ratio(by["2x"][0], by["1x"][0]), "4x": ratio(by["4x"][0], by["1x"][0])}
    if "single" in by:
        return {"sybil": ratio(sum(by["sybil"]), by["single"][0])}
    if "equal" in by:
        return {"equal": ratio(max(by["equal"]), min(by["equal"]))}
    return {}


def worst(vals: list[float | None], key: str) -> float | None:
    xs = [v if v is not None else (0.0 if key in ("2x", "4x") else float("inf")) for v in vals]
    if not xs:
        return None
    return min(xs) if key in ("2x", "4x") else max(xs)


def report(results: list[dict], rules: list[str]) -> dict:
    table: dict = {}
    for rule in rules:
        per: dict[str, list] = {}
        refusals = peer_rounds = 0
        for res in results:
            r = res["rules"][rule]
            for k, v in r["figures"].items():
                per.setdefault(k, []).append(v)
            refusals += r["assignment_refusals"]
            peer_rounds += r["peer_rounds"]
        table[rule] = {
            k: {
                "worst": worst(v, k),
                "median": statistics.median([x for x in v if x is not None] or [0.0]),
                "all": v,
            }
            for k, v in per.items()
        }
        by_budget: dict[int, list[int]] = {}
        for res in results:
            for b, (n, d) in res["rules"][rule]["refusals_by_budget"].items():
                acc = by_budget.setdefault(int(b), [0, 0])
                acc[0] += n
                acc[1] += d
        table[rule]["refusals_by_budget"] = {b: by_budget[b] for b in sorted(by_budget)}
        table[rule]["refusals"] = {
            "rate": refusals / peer_rounds if peer_rounds else None,
            "refused": refusals,
            "peer_rounds": peer_rounds,
        }
    return table


def print_report(results: list[dict], table: dict) -> None:
    for res in results:
        steps = " ".join(
            f"{p['label']}:{p['budget']}→{p['steps_mean']:.1f}" if p["steps_mean"] is not None else p["label"]
            for p in res["peers"]
        )
        ledger = " ".join(
            f"{p['ledger_weight']:.3f}" if p["ledger_weight"] is not None else "-" for p in res["peers"]
        )
        print(
            f"\n{res['run']}: exit {res['rc']}, {res['seconds']}s, load {res['loadavg'][0]:.1f}, "
            f"rounds {res['rounds_scored']}; steps (budget→mean) {steps}; ledger weights {ledger}"
        )
        for rule, r in res["rules"].items():
            ws = " ".join(f"{w:.3f}" for w in r["weights"].values())
            figs = " ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in r["figures"].items())
            print(
                f"  {rule:>8}: weights {ws} · {figs} · refused {r['assignment_refusals']}/{r['peer_rounds']}"
                + (f" · zero: {r['zero_reasons']}" if r["zero_reasons"] else "")
            )
    print(f"\nworst (median) of runs; load average now {os.getloadavg()[0]:.1f}:")
    for rule, figs in table.items():
        parts = []
        for k, v in figs.items():
            if k == "refusals_by_budget":
                parts.append("by steps " + ", ".join(f"{b}: {n}/{d}" for b, (n, d) in v.items()))
            elif k == "refusals":
                rate = v["rate"]
                parts.append(
                    f"refusals {v['refused']}/{v['peer_rounds']}"
                    + (f" = {rate:.1%}" if rate is not None else "")
                    + f" (target ≤ {TARGETS['refusals']:.0%})"
                )
            else:
                w = v["worst"]
                cmp = "≥" if k in ("2x", "4x") else "≤"
                parts.append(f"{k} {w:.2f} ({v['median']:.2f}) [target {cmp} {TARGETS[k]}]")
        print(f"  {rule:>8}: " + " · ".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="compute,sybil2,sybil3,sybil5,equal")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=6, help="rounds the validator scores per run")
    ap.add_argument(
        "--model-config",
        default="debug",
        help="the swarm's model config, a name or a YAML path (e.g. debug with train.rounds: overlapped)",
    )
    ap.add_argument("--unit-steps", type=int, default=16, help="inner-step budget of 1× compute")
    ap.add_argument("--round-blocks", type=int, default=20)
    ap.add_argument("--block-time", type=float, default=0.5)
    ap.add_argument("--validator-args", nargs="*", default=[])
    ap.add_argument("--out", default=str(REPO / "runs" / "incentive"))
    ap.add_argument("--analyse", default=None, metavar="DIR", help="only re-score the runs in DIR")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write every figure as JSON")
    args = ap.parse_args()
    rules = {"before": BEFORE, "1-round": ONE_ROUND, "pre-thin": PRE_THIN, "after": AFTER}
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for n in names:
        scenario_budgets(n, args.unit_steps)  # unknown names fail before anything runs
    if args.analyse:
        run_dirs = sorted(p for p in Path(args.analyse).iterdir() if (p / "bench.json").exists())
    else:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        run_dirs = []
        for trial in range(args.trials):  # interleaved, so load drifts hit every scenario alike
            for n in names:
                run_dirs.append(run_scenario(n, trial, args))
    results = [r for r in (analyse_run(d, rules) for d in run_dirs) if r is not None]
    table = report(results, list(rules))
    print_report(results, table)
    print_non_trainers(results, rules)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": results, "table": table}, indent=1))


if __name__ == "__main__":
    main()
