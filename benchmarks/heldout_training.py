"""Does training on the public held-out split pay? The same Δs scored with the paid pages drawn from unseen
training pages (today) and from the public held-out split (the rule before).

    .venv/bin/python benchmarks/heldout_training.py                              # 12 rounds, ~6 min
    .venv/bin/python benchmarks/heldout_training.py --behaviour heldout-train-full --rounds 14
    .venv/bin/python benchmarks/heldout_training.py --analyse runs/heldout-train  # score a recorded run

A real local subnet (``launch.local_subnet`` with ``launch/demo.yaml``: LocalLedger, bootstrap DHT, 3
honest ``peer join`` processes training the debug model, one validator) plus one attacker: a peer that
trains on its assigned pages *and* on held-out pages (``heldout-train``: k/2 of them a round, drawn
anew each round; ``heldout-train-full``: k, which on the debug corpus is all 62), shuffled together, and
whose manifest claims only its assignment (peer/training/behaviour.py). It publishes and averages like an
honest peer. The held-out split is public by design (a hash of the page id), so nothing stops a peer
from doing this.

The validator runs with today's rule (``EvalConfig.gain_pages = "unseen"``). Every round it recorded is
then measured again from its stored blobs with the rule before (``gain_pages = "heldout"``,
``validator.replay.replay_round(what_if=...)``): the same Δs, the same page key, the same assignment
test. For each rule the script prints, per round, the attacker's share of the round's scores and the
honest peers' mean share, and the weights of an EMA over the rounds (the validator's α), from zero,
with the ratio attacker ÷ honest mean. Ground truth: the attacker did the honest work *plus* memorised
public pages; a rule that cannot be gamed pays it about what an honest peer earns (ratio ≈ 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from validator.ema import EmaState, update_ema  # noqa: E402
from validator.replay import replay_round  # noqa: E402
from validator.scoring import PeerScore, ScoringConfig  # noqa: E402
from validator.store import ValidatorStore  # noqa: E402

RULES = ("unseen", "heldout")


def run_subnet(behaviour: str, rounds: int, run_dir: Path) -> None:
    cmd = [
        sys.executable, "-m", "launch.local_subnet", "--config", str(REPO / "launch" / "demo.yaml"),
        "--behaviours", behaviour, "--rounds", str(rounds), "--run-dir", str(run_dir),
    ]  # fmt: skip
    t0 = time.time()
    log = run_dir.parent / f"{run_dir.name}.launch.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    print(f"local subnet: exit {rc} after {time.time() - t0:.0f}s (log {log})")
    if rc != 0:
        raise SystemExit(f"the local subnet failed: see {log}")


def roles(run_dir: Path) -> dict[str, str]:
    """hotkey → behaviour, from the launcher's summary."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return {p["hotkey"]: p["behaviour"] for p in summary["peers"]}


def scores_by_rule(run_dir: Path, data_dir: Path) -> dict[str, list[tuple[int, list[PeerScore]]]]:
    store = ValidatorStore(run_dir / "validators" / "validator-0")
    out: dict[str, list] = {r: [] for r in RULES}
    for r in store.rounds():
        rec = store.load_round(r)
        logged = rec.measurements.get("gain_pages", "heldout")
        for rule in RULES:
            if rule == logged:
                scores = [PeerScore(**s) for s in rec.scores]
            else:
                res = replay_round(store, r, data_dir, what_if={"gain_pages": rule})
                scores = [PeerScore(**s) for s in res.replayed.scores]
            out[rule].append((r, scores))
    return out


def summarise(rule: str, rounds: list[tuple[int, list[PeerScore]]], role: dict[str, str]) -> float | None:
    alpha = ScoringConfig().ema_alpha
    ema = EmaState()
    print(f"\n== paid pages: {rule}")
    print("round  attacker share  honest mean share  attacker reason")
    for r, scores in rounds:
        total = sum(s.score for s in scores)
        att = [s for s in scores if role.get(s.hotkey, "").startswith("heldout-train")]
        hon = [s for s in scores if role.get(s.hotkey) == "honest"]
        if total > 0 and att and hon:
            share_a = att[0].score / total
            share_h = statistics.mean(s.score / total for s in hon)
            print(f"{r:5d}  {share_a:14.3f}  {share_h:17.3f}  {att[0].reason[:70]}")
        uids = {s.uid: s.hotkey for s in scores}
        ema = update_ema(ema, r, scores, uids, alpha)
    w = {e.hotkey: e.value for e in ema.entries.values()}
    total = sum(w.values()) or 1.0
    att = [x / total for hk, x in w.items() if role.get(hk, "").startswith("heldout-train")]
    hon = [x / total for hk, x in w.items() if role.get(hk) == "honest"]
    if not att or not hon or statistics.mean(hon) == 0:
        print("final weights: not enough peers scored")
        return None
    ratio = att[0] / statistics.mean(hon)
    print(
        f"final EMA weights: attacker {att[0]:.3f}, honest {', '.join(f'{x:.3f}' for x in hon)} "
        f"-> attacker / honest mean = {ratio:.2f}"
    )
    return ratio


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--behaviour", default="heldout-train", choices=["heldout-train", "heldout-train-full"])
    ap.add_argument("--rounds", type=int, default=12, help="rounds the validator scores")
    ap.add_argument(
        "--run-dir", type=Path, default=None, help="where the run goes (default runs/<behaviour>-<t>)"
    )
    ap.add_argument("--analyse", type=Path, default=None, help="score a recorded run instead of running one")
    ap.add_argument("--data-dir", type=Path, default=REPO / ".cache" / "data" / "debug")
    args = ap.parse_args()
    run_dir = args.analyse
    if run_dir is None:
        run_dir = args.run_dir or REPO / "runs" / f"{args.behaviour}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_subnet(args.behaviour, args.rounds, run_dir)
    role = roles(run_dir)
    by_rule = scores_by_rule(run_dir, args.data_dir)
    ratios = {rule: summarise(rule, by_rule[rule], role) for rule in RULES}
    print(
        "\nattacker / honest mean weight: "
        + ", ".join(f"{rule} {r:.2f}" if r is not None else f"{rule} -" for rule, r in ratios.items())
        + " (1 = paid like an honest peer)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
