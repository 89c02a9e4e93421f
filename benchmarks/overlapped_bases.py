"""Where does an overlapped peer's Δ_r lower held-out loss? Re-evaluates a validator's kept rounds.

    # debug-overlapped.yaml: debug + `train.rounds: overlapped`
    .venv/bin/python -m launch.local_subnet --config launch/demo.yaml \\
        --model-config debug-overlapped.yaml --run-dir runs/ovl
    .venv/bin/python benchmarks/overlapped_bases.py runs/ovl/validators/* --config debug-overlapped.yaml

An overlapped peer trains Δ_r from its own start point x_r = θ_r − Δ_{r−1}; the validator scores it on
θ_{r+1} = θ_r − ḡ_{r−1} (``state_round``). A validator's state dir keeps, for every kept round, θ_{r+1}
and every fetched Δ_r (content-addressed blobs), so for each round r whose round r−1 is kept too this
script measures, on round r's held-out pages (the validator's own page draw), the held-out gain of each
non-zero Δ_r at α = 0.5 and 1 from:

* θ_{r+1} (what the validator scores), θ_r (the manifest's base), and x_r (the peer's own start point,
  from its Δ_{r−1} of the previous record);
* and of the mean of the round's non-zero Δs on θ_{r+1} (the swarm's own step, roughly),

plus the cosine of Δ_r with the same peer's Δ_{r−1}, and the held-out loss of x_r against θ_r. It prints
one line per peer-round and a summary of ranges (RESULTS "Overlapped rounds: why validators refuse
honest Δs"). Blocking swarms have x_r = θ_r: the script says so and stops.

``--assignment`` adds the validator's assignment test in both geometries: on each peer's own assigned
pages of round r (``Evaluator.assigned_page_ids``), its own per-page gains minus the mean gain of the
round's other Δs there, each other Δ measured (a) on θ_{r+1}, as the validator does, and (b) from *its
own* start point x_q: specificity and its one-sample t over pages (``validator.evidence.t_one``). It shows
whether scoring from own start points would keep the test's power.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peer.config import load_run_config  # noqa: E402
from peer.data.shards import open_page_store  # noqa: E402
from peer.net.outbox import decode_state  # noqa: E402
from validator.evaluation import Evaluator, page_pick  # noqa: E402
from validator.evidence import t_one  # noqa: E402
from validator.replay import configs_from_record  # noqa: E402
from validator.store import ValidatorStore  # noqa: E402

ALPHAS = (0.5, 1.0)


def moved(
    state: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], a: float
) -> dict[str, torch.Tensor]:
    """state − a·delta."""
    return {k: state[k] - a * delta[k] for k in state}


def flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([d[k].reshape(-1).double() for k in sorted(d)])


def nonzero_deltas(store: ValidatorStore, ev: Evaluator, rec) -> dict[int, dict[str, torch.Tensor]]:
    """The round's evaluated, decodable, non-zero Δs by uid (refused or malformed ones are left out)."""
    out = {}
    for c in rec.candidates:
        if c.rejected is None and c.blob_sha256 and store.blob_path(c.blob_sha256).exists():
            d = ev.decode(store.read_blob(c.blob_sha256))
            if float(flat(d).norm()) > 0:
                out[c.uid] = d
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state_dir", type=Path, help="a validator's --state-dir (validators/<name> of a run)")
    parser.add_argument("--config", required=True, help="the model config the swarm ran (name or YAML)")
    parser.add_argument("--data-dir", type=Path, default=None, help="default .cache/data/<config name>")
    parser.add_argument(
        "--assignment", action="store_true", help="also the assignment test in both geometries"
    )
    args = parser.parse_args()
    store = ValidatorStore(args.state_dir)
    recs = {r: store.load_round(r) for r in store.rounds()}
    if not recs:
        sys.exit(f"error: {args.state_dir} holds no round records; pass a validator's state dir")
    if all(rec.state_round in (None, rec.round) for rec in recs.values()):
        sys.exit("error: these rounds were scored blocking (Δ_r from θ_r): nothing to compare")
    run = load_run_config(args.config)
    ev_cfg, _ = configs_from_record(recs[max(recs)])
    data_dir = args.data_dir or Path(__file__).resolve().parents[1] / ".cache" / "data" / run.name
    ev = Evaluator(ev_cfg, run, open_page_store(None, data_dir, run.data))

    def loss(state, pages) -> float:
        return sum(page_losses(state, pages)) / len(pages)

    def page_losses(state, pages) -> list[float]:
        ev.load_base(state)
        return ev.page_losses(pages)

    def page_gains(start, delta, pages) -> list[float]:
        before, after = page_losses(start, pages), page_losses(moved(start, delta, ev_cfg.delta_scale), pages)
        return [b - a for b, a in zip(before, after, strict=True)]

    # each round's state and Δs are decoded once: round r's are round r+1's θ_r and Δ_{r−1}
    states = {r: decode_state(store.read_blob(rec.base_sha256)) for r, rec in recs.items()}
    decoded = {r: nonzero_deltas(store, ev, rec) for r, rec in recs.items()}
    rows = []
    for r in sorted(recs):
        if r - 1 not in recs or not decoded[r]:
            continue
        rec = recs[r]
        theta_next, theta = states[r], states[r - 1]  # θ_{r+1}, and θ_r (round r−1 was scored on it)
        pages = list(rec.measurements["heldout_page_ids"])  # what the validator measured (seed or page key)
        deltas, before = decoded[r], decoded[r - 1]
        starts = {u: moved(theta, before[u], 1.0) for u in deltas if u in before}  # x_r = θ_r − Δ_{r−1}
        l_next, l_theta = loss(theta_next, pages), loss(theta, pages)
        mean = {k: sum(d[k] for d in deltas.values()) / len(deltas) for k in theta_next}
        row = {"round": r, "loss_theta": l_theta, "loss_theta_next": l_next, "peers": {}}
        row["mean_on_theta_next"] = {a: l_next - loss(moved(theta_next, mean, a), pages) for a in ALPHAS}
        for uid, d in deltas.items():
            p = {"norm": float(flat(d).norm())}
            for a in ALPHAS:
                p[f"theta_next@{a}"] = l_next - loss(moved(theta_next, d, a), pages)
                p[f"theta@{a}"] = l_theta - loss(moved(theta, d, a), pages)
            if uid in starts:
                x = starts[uid]
                l_x = loss(x, pages)
                p["x_minus_theta"] = l_x - l_theta
                for a in ALPHAS:
                    p[f"own_start@{a}"] = l_x - loss(moved(x, d, a), pages)
                p["cos_prev"] = float(
                    torch.nn.functional.cosine_similarity(flat(d), flat(before[uid]), dim=0)
                )
            row["peers"][uid] = p
        if args.assignment:
            hotkeys = {c.uid: c.hotkey for c in rec.candidates}
            seed = bytes.fromhex(rec.seed_hex)
            key_hex = rec.measurements.get("page_key_hex")
            pick = page_pick(seed, bytes.fromhex(key_hex) if key_hex else None)
            for uid in starts:
                own_pages = ev.assigned_page_ids(hotkeys[uid], r, seed, pick)
                others = [q for q in starts if q != uid]
                for name, start_of in (
                    ("theta_next", dict.fromkeys(starts, theta_next)),
                    ("own_start", starts),
                ):
                    own = page_gains(start_of[uid], deltas[uid], own_pages)
                    ref = [page_gains(start_of[q], deltas[q], own_pages) for q in others]
                    diffs = [
                        g - sum(col) / len(col) for g, col in zip(own, zip(*ref, strict=True), strict=True)
                    ]
                    row["peers"][uid][f"specificity_{name}"] = sum(diffs) / len(diffs)
                    row["peers"][uid][f"t_{name}"] = t_one(diffs)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if not rows:
        sys.exit("error: no kept round has its previous round kept and a non-zero Δ: nothing to compare")
    keys = sorted({k for row in rows for p in row["peers"].values() for k in p})
    summary = {}
    for k in keys:
        xs = [p[k] for row in rows for p in row["peers"].values() if k in p]
        summary[k] = [round(min(xs), 3), round(max(xs), 3)]
    for a in ALPHAS:
        xs = [row["mean_on_theta_next"][a] for row in rows]
        summary[f"mean_on_theta_next@{a}"] = [round(min(xs), 3), round(max(xs), 3)]
    print("SUMMARY " + json.dumps({"rounds": [rows[0]["round"], rows[-1]["round"]], **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
