"""Validator round seconds at 4, 16 and 64 peers with a budget of K = 8 (debug model): does it stay flat?

    .venv/bin/python benchmarks/validator_scale.py                   # 4/16/64 peers, K=8, 3 runs each
    .venv/bin/python benchmarks/validator_scale.py --peers 4 16 --runs 1

Synthetic publishers serve precomputed Δs: two real Δs trained on the debug model (40 inner steps from
the same θ_1 on two hotkeys' pages), and for each synthetic peer one of them scaled by (1 + 5 % noise), so
every peer has a distinct, plausible Δ of the real size and format. Each peer has its own hotkey (sr25519,
signed manifests and identity record), its own libp2p identity and listening port, and its commitment on
a real LocalLedger. To keep 64 publishers affordable on a 2-core box they run as libp2p hosts in 2
server processes (``--server-procs``): each host is the real publisher server (peer.net.publisher's
_Server over its own OutboxIndex), only the process is shared.

A round is :func:`validator.loop.run_round` of a real Validator (FetchClient, BudgetedEvaluator, store,
WeightSetter on the ledger), with a fresh state dir per run so every Δ is fetched over the network. Printed
per peer count: round seconds (worst, median of ``--runs``), fetch and evaluate seconds, peers evaluated;
then the ratio of the 64-peer round to the 16-peer round, measured in the same run (target ≤ 1.3).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ROUND_BLOCKS = 10
TAO = 10**9
GENESIS = "5ca1e" + "0" * 27


# ----------------------------------------------------------------------------------------- server process


def serve(spec_path: Path) -> int:
    """Run every host listed in ``spec_path`` (outbox + identity key) in this one trio process."""
    import trio

    spec = json.loads(spec_path.read_text())

    async def main() -> None:
        from collections import Counter
        from contextlib import AsyncExitStack

        import multiaddr
        from libp2p.custom_types import TProtocol

        from peer.net.artifact_protocol import PROTOCOL_ID
        from peer.net.identity import libp2p_keypair
        from peer.net.publisher import OutboxIndex, PublisherConfig, _Server, make_host

        cfg = PublisherConfig()
        ready = []
        async with AsyncExitStack() as stack:
            for peer in spec["peers"]:
                maddr = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")
                host = make_host(libp2p_keypair(Path(peer["identity"])), [maddr])
                counters: Counter = Counter()
                server = _Server(
                    index=OutboxIndex(
                        Path(peer["outbox"]), max_blob_bytes=cfg.max_blob_bytes, counters=counters
                    ),
                    cfg=cfg,
                    peer_id=host.get_id().to_base58(),
                    counters=counters,
                )
                host.set_stream_handler(TProtocol(PROTOCOL_ID), server.handle)
                await stack.enter_async_context(host.run(listen_addrs=[maddr]))
                addr = sorted({str(a).split("/p2p/")[0] for a in host.get_addrs()})[0]
                ready.append({"name": peer["name"], "peer_id": server.peer_id, "addr": addr})
            tmp = Path(spec["ready"]).with_suffix(".tmp")
            tmp.write_text(json.dumps(ready))
            os.replace(tmp, spec["ready"])
            while os.getppid() == spec["parent"]:
                await trio.sleep(0.5)

    trio.run(main)
    return 0


# ----------------------------------------------------------------------------------------- the world


def build(root: Path, n_max: int, threads: int) -> dict:
    """Data, θ_1, two real Δs, and ``n_max`` peers' outboxes with signed manifests."""
    import torch
    from substrateinterface import Keypair

    from peer.config import load_run_config
    from peer.data.model import build_model, hash_tensors
    from peer.data.pages import PageStore, assign_pages, prepare_data
    from peer.net.identity import load_or_create_identity
    from peer.net.outbox import Outbox, encode_delta, encode_state, sha256_hex
    from peer.net.publisher import write_identity_record
    from peer.net.records import BlobRef, ContributionManifest, PeerIdentityRecord, StateManifest
    from tests.fixtures_validator import train_delta

    torch.set_num_threads(threads)
    run = load_run_config("debug")
    data_dir = root / "data"
    prepare_data(run.data, data_dir)
    store = PageStore(data_dir, run.data)
    base = {n: p.detach().clone() for n, p in build_model(run).named_parameters()}
    from peer.chain.local import LocalLedger

    ledger = LocalLedger(root / "ledger.sqlite", block_time=10_000.0, genesis_id=GENESIS)
    ledger.advance(2 * ROUND_BLOCKS + 5 - ledger.block())
    seed1 = bytes.fromhex(ledger.block_hash(ROUND_BLOCKS).removeprefix("0x"))
    ledger.close()
    k = run.data.pages_per_round
    kps = [Keypair.create_from_uri(f"//scale-{i}") for i in range(n_max)]
    deltas = []
    for i in range(2):
        pages = assign_pages(kps[i].ss58_address, 1, seed1, store.train_pages, k)
        deltas.append(train_delta(run, store, base, pages, 40, seed=i))
    base_hash = hash_tensors(base.items())
    state_blob = encode_state(base)
    peers = []
    for i, kp in enumerate(kps):
        home = root / "peers" / str(i)
        peer_id = load_or_create_identity(home / "identity.key")
        g = torch.Generator().manual_seed(i)
        d = {t: v * (1 + 0.05 * torch.randn(v.shape, generator=g)) for t, v in deltas[i % 2].items()}
        blob = encode_delta(d)
        box = Outbox(home / "outbox")
        sm = StateManifest(
            run_id="scale", round=1, hotkey=kp.ss58_address, peer_id=peer_id, state_hash=base_hash,
            model_config_name=run.name,
            blob=BlobRef(name="state.safetensors", sha256=sha256_hex(state_blob), size=len(state_blob)),
        )  # fmt: skip
        box.write_state(1, state_blob, json.loads(sm.signed(kp).model_dump_json()))
        cm = ContributionManifest(
            run_id="scale", round=1, hotkey=kp.ss58_address, peer_id=peer_id, base_state_hash=base_hash,
            data_fingerprint=store.fingerprint, model_config_name=run.name,
            pages=assign_pages(kp.ss58_address, 1, seed1, store.train_pages, k), samples=320, tokens=20480,
            inner_steps=40, loss_before=None, loss_after=None,
            blob=BlobRef(name="contribution.safetensors", sha256=sha256_hex(blob), size=len(blob)),
            behaviour="honest",
        )  # fmt: skip
        box.write_contribution(1, blob, json.loads(cm.signed(kp).model_dump_json()))
        rec = PeerIdentityRecord(
            run_id="scale", round=1, hotkey=kp.ss58_address, peer_id=peer_id, addrs=["/ip4/127.0.0.1/tcp/1"]
        )
        write_identity_record(home / "outbox", rec.signed(kp))
        peers.append({"name": str(i), "outbox": str(home / "outbox"), "identity": str(home / "identity.key")})
    return {"data_dir": data_dir, "peers": peers, "kps": kps, "run": run, "store": store}


def start_servers(root: Path, peers: list[dict], procs: int) -> tuple[list[subprocess.Popen], dict]:
    handles, ready = [], {}
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    files = []
    for p in range(procs):
        part = peers[p::procs]
        if not part:
            continue
        spec = root / f"serve-{p}.json"
        rf = root / f"serve-{p}.ready.json"
        rf.unlink(missing_ok=True)
        spec.write_text(json.dumps({"peers": part, "ready": str(rf), "parent": os.getpid()}))
        handles.append(
            subprocess.Popen(
                [sys.executable, __file__, "--serve", str(spec)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=open(root / f"serve-{p}.log", "ab"),  # noqa: SIM115
            )
        )
        files.append(rf)
    deadline = time.monotonic() + 300
    for rf in files:
        while not rf.exists():
            if time.monotonic() > deadline or any(h.poll() is not None for h in handles):
                raise RuntimeError(f"server did not start; see {root}/serve-*.log")
            time.sleep(0.1)
        for r in json.loads(rf.read_text()):
            ready[r["name"]] = r
    return handles, ready


def one_round(root: Path, w: dict, ready: dict, n: int, k: int, run_no: int, threads: int) -> dict:
    """A real validator round over the first ``n`` peers (their own subnet), with a fresh state dir."""
    import torch
    from substrateinterface import Keypair

    from peer.chain import ChainClock, SubnetParams
    from peer.chain.local import LocalLedger
    from peer.net.fetch import FetchClient, FetchConfig
    from peer.net.records import Commitment
    from peer.tracking import NullTracker
    from validator.evaluation import EvalConfig
    from validator.loop import BudgetedEvaluator, LoopConfig, Validator, run_round
    from validator.sampling import SamplingConfig
    from validator.scoring import ScoringConfig
    from validator.store import ValidatorStore
    from validator.weights import WeightsConfig, WeightSetter

    torch.set_num_threads(threads)
    ledger = LocalLedger(root / "ledger.sqlite", block_time=10_000.0, genesis_id=GENESIS)
    owner, coldkey = Keypair.create_from_uri("//Alice"), Keypair.create_from_uri("//Bob")
    ledger.fund(coldkey.ss58_address, 100_000 * TAO)
    netuid = ledger.create_subnet(owner, SubnetParams(burn=0, weights_rate_limit=0, max_uids=256))
    val = Keypair.create_from_uri(f"//scale-validator-{n}-{run_no}")
    ledger.register(netuid, val, coldkey)
    ledger.add_stake(netuid, val.ss58_address, coldkey, 100 * TAO)
    for i in range(n):
        kp = w["kps"][i]
        ledger.register(netuid, kp, coldkey)
        r = ready[str(i)]
        ledger.set_commitment(netuid, kp, Commitment(addr=r["addr"], peer_id=r["peer_id"]).to_bytes())
    state = root / f"state-{n}-{run_no}"
    store = ValidatorStore(state)
    eval_cfg = EvalConfig(device="cpu")
    client = FetchClient(FetchConfig(cache_dir=store.blobs, run_id="scale"))
    client.start()
    try:
        v = Validator(
            cfg=LoopConfig(
                run_id="scale",
                netuid=netuid,
                round_blocks=ROUND_BLOCKS,
                sampling=SamplingConfig(max_peers=k),
                fetch_deadline_s=120.0,
                dial_private=True,  # every publisher of this benchmark is on 127.0.0.1
            ),
            run=w["run"],
            hotkey=val,
            chain=ledger,
            clock=ChainClock(chain=ledger, round_blocks=ROUND_BLOCKS),
            client=client,
            evaluator=BudgetedEvaluator(eval_cfg, w["run"], w["store"]),
            store=store,
            pages=w["store"],
            setter=WeightSetter(ledger, netuid, val, state, WeightsConfig()),
            tracker=NullTracker(),
            eval_cfg=eval_cfg,
            scoring_cfg=ScoringConfig(),
            weights_cfg=WeightsConfig(),
        )
        t0 = time.perf_counter()
        rec = run_round(v, 1)
        wall = time.perf_counter() - t0
    finally:
        client.close()
        ledger.close()
    evaluated = sum(1 for s in rec.scores if s["terms"].get("status") == "ok")
    return {
        "round_s": wall,
        "fetch_s": rec.timings["fetch_s"],
        "evaluate_s": rec.timings["evaluate_s"],
        "evaluated": evaluated,
        "not_sampled": len(rec.sampling.get("not_sampled", {})),
        "earned": sum(1 for s in rec.scores if s["score"] > 0),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--peers", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--max-peers", type=int, default=8, help="the validator's budget K")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the validator")
    ap.add_argument("--server-procs", type=int, default=2, help="processes hosting the publishers")
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve)
    from peer.net.publisher import quiet_libp2p

    quiet_libp2p()
    root = Path(tempfile.mkdtemp(prefix="gradswarm-bench-scale-"))
    t0 = time.perf_counter()
    w = build(root, max(args.peers), args.threads)
    print(f"built {max(args.peers)} peers' outboxes in {time.perf_counter() - t0:.0f}s ({root})", flush=True)
    handles, ready = start_servers(root, w["peers"], args.server_procs)
    results: dict[int, list[dict]] = {n: [] for n in args.peers}
    try:
        for run_no in range(args.runs):  # interleaved: every peer count sees the same load
            for n in args.peers:
                r = one_round(root, w, ready, n, args.max_peers, run_no, args.threads)
                results[n].append(r)
                print(
                    f"  run {run_no} n={n:3d}: round {r['round_s']:.2f}s (fetch {r['fetch_s']:.2f}s, evaluate "
                    f"{r['evaluate_s']:.2f}s), evaluated {r['evaluated']}, not sampled {r['not_sampled']}, "
                    f"earned {r['earned']}",
                    flush=True,
                )
    finally:
        for h in handles:
            h.terminate()
        for h in handles:
            try:
                h.wait(10)
            except subprocess.TimeoutExpired:
                h.kill()
    print(
        f"validator round seconds, debug model, K = {args.max_peers}, {args.runs} runs, load {os.getloadavg()}:"
    )
    for n in args.peers:
        rs = [r["round_s"] for r in results[n]]
        print(
            f"  {n:3d} peers: worst {max(rs):.2f}s, median {statistics.median(rs):.2f}s "
            f"(fetch median {statistics.median(r['fetch_s'] for r in results[n]):.2f}s, evaluate median "
            f"{statistics.median(r['evaluate_s'] for r in results[n]):.2f}s)"
        )
    if 16 in results and 64 in results:
        med = {n: statistics.median(r["round_s"] for r in results[n]) for n in (16, 64)}
        worst = {n: max(r["round_s"] for r in results[n]) for n in (16, 64)}
        per_run = [a["round_s"] / b["round_s"] for a, b in zip(results[64], results[16], strict=True)]
        print(
            f"  64 vs 16 peers: median ratio {med[64] / med[16]:.2f}, worst-vs-worst {worst[64] / worst[16]:.2f}, "
            f"per run {', '.join(f'{x:.2f}' for x in per_run)} (target <= 1.3)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
