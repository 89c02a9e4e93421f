"""Chain benchmark: LocalLedger vs SubstrateChain on the real runtime (Chopsticks), same calls.

    .venv/bin/python -m benchmarks.chain [--uids 256] [--big 1024] [--local-ops 300] [--chain-ops 10]

Measures, on both implementations through the public ``Chain`` API:
* ``set_weights`` ops/s with a weight vector over all ``--uids`` uids (signed, verified, stored);
* ``metagraph`` reads/s at ``--uids`` uids, and metagraph read latency at ``--uids`` and ``--big``.
Prints LocalLedger / Chopsticks ratios measured in this run.

LocalLedger neurons are registered through signed calls. On Chopsticks, registering 1,024 neurons
one extrinsic each would take ~12 minutes, so after one real ``register_network`` the neurons are
written into the runtime's storage with ``dev_setStorage`` (Keys, Uids, Owner, per-uid vectors);
``set_weights`` then runs the real runtime checks against them. Chopsticks builds one block per
extrinsic (~0.4 s of wasm), so its ``set_weights`` rate is a block-production rate, not what a
real node's transaction pool would accept.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from substrateinterface import Keypair

from peer.chain.base import SubnetParams
from peer.chain.local import LocalLedger

TAO = 10**9


def _timeit(fn, k: int) -> list[float]:
    out = []
    for _ in range(k):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _fmt(ts: list[float]) -> str:
    return f"median {statistics.median(ts) * 1e3:.2f} ms (min {min(ts) * 1e3:.2f}, n={len(ts)})"


def bench_local(uids: int, big: int, ops: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="chainbench-"))
    led = LocalLedger(tmp / "ledger.sqlite", block_time=10_000.0)
    alice, val = Keypair.create_from_uri("//Alice"), Keypair.create_from_uri("//bench-validator")
    netuid = led.create_subnet(alice, SubnetParams(max_uids=big, tempo=10_000), owner_hotkey=val)
    keys = [Keypair.create_from_uri(f"//bench{i}") for i in range(1, big)]
    t = time.perf_counter()
    for kp in keys[: uids - 1]:
        led.register(netuid, kp)
    reg_s = (time.perf_counter() - t) / (uids - 1)
    led.fund(alice.ss58_address, 1000 * TAO)
    led.add_stake(netuid, val.ss58_address, alice, 100 * TAO)
    dests, w = list(range(uids)), [1 + (i * 37) % 65535 for i in range(uids)]
    sw = _timeit(lambda: led.set_weights(netuid, val, dests, w, 0), ops)
    mg_small = _timeit(lambda: led.metagraph(netuid), 50)
    assert led.metagraph(netuid).n == uids
    for kp in keys[uids - 1 :]:
        led.register(netuid, kp)
    mg_big = _timeit(lambda: led.metagraph(netuid), 20)
    assert led.metagraph(netuid).n == big
    led.close()
    return {"register_s": reg_s, "set_weights": sw, "mg_small": mg_small, "mg_big": mg_big}


def _inject_neurons(chain, netuid: int, n: int, owner: str) -> None:
    """Write ``n`` neurons (uid 0 already exists) straight into the runtime's storage (Chopsticks)."""
    hks = [Keypair.create_from_uri(f"//bench{i}").ss58_address for i in range(1, n)]
    chain.advance(1)  # dev_setStorage edits the head in place: build a fresh block first
    vec = {
        item: [[[netuid], [default] * n]]
        for item, default in (
            ("ValidatorPermit", True),
            ("Active", True),
            ("LastUpdate", 0),
            ("Incentive", 0),
            ("Dividends", 0),
            ("Consensus", 0),
            ("Emission", 0),
            ("Trust", 0),
            ("Rank", 0),
            ("PruningScores", 0),
            ("ValidatorTrust", 0),
        )
    }
    storage = {
        "Keys": [[[netuid, i + 1], hk] for i, hk in enumerate(hks)],
        "Uids": [[[netuid, hk], i + 1] for i, hk in enumerate(hks)],
        "Owner": [[[hk], owner] for hk in hks],
        "BlockAtRegistration": [[[netuid, i + 1], 1] for i in range(len(hks))],
        "SubnetworkN": [[[netuid], n]],
        **vec,
    }
    chain.s.rpc_request("dev_setStorage", [{"SubtensorModule": storage}])


def bench_chopsticks(uids: int, big: int, ops: int) -> dict:
    from peer.chain.devnode import kit_problem, start_chopsticks
    from peer.chain.substrate import SubstrateChain

    problem = kit_problem()
    if problem:
        raise SystemExit(f"cannot run the Chopsticks half: {problem}")
    t = time.perf_counter()
    node = start_chopsticks("bench")
    try:
        chain = SubstrateChain(node.url)
        startup = time.perf_counter() - t
        alice, val = Keypair.create_from_uri("//Alice"), Keypair.create_from_uri("//bench-validator")
        params = SubnetParams(tempo=10_000, weights_rate_limit=0, max_uids=big)
        netuid = chain.create_subnet(alice, params, owner_hotkey=val, sudo_key=alice)
        _inject_neurons(chain, netuid, uids, alice.ss58_address)
        assert chain.metagraph(netuid).n == uids
        dests, w = list(range(uids)), [1 + (i * 37) % 65535 for i in range(uids)]
        sw = _timeit(lambda: chain.set_weights(netuid, val, dests, w, 0), ops)
        assert len(chain.weights(netuid)[0]) == uids
        mg_small = _timeit(lambda: chain.metagraph(netuid), 10)
        _inject_neurons(chain, netuid, big, alice.ss58_address)
        assert chain.metagraph(netuid).n == big
        mg_big = _timeit(lambda: chain.metagraph(netuid), 5)
        chain.close()
    finally:
        node.stop()
    return {"startup_s": startup, "set_weights": sw, "mg_small": mg_small, "mg_big": mg_big}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uids", type=int, default=256)
    ap.add_argument("--big", type=int, default=1024)
    ap.add_argument("--local-ops", type=int, default=300)
    ap.add_argument("--chain-ops", type=int, default=10)
    a = ap.parse_args()
    loc = bench_local(a.uids, a.big, a.local_ops)
    sub = bench_chopsticks(a.uids, a.big, a.chain_ops)
    loc_sw, sub_sw = 1 / statistics.median(loc["set_weights"]), 1 / statistics.median(sub["set_weights"])
    loc_mg, sub_mg = 1 / statistics.median(loc["mg_small"]), 1 / statistics.median(sub["mg_small"])
    print(f"LocalLedger register: {loc['register_s'] * 1e3:.2f} ms per signed registration")
    print(f"Chopsticks startup + metadata: {sub['startup_s']:.1f} s")
    print(f"set_weights ({a.uids} uids)   LocalLedger {_fmt(loc['set_weights'])} -> {loc_sw:.0f} ops/s")
    print(f"set_weights ({a.uids} uids)   Chopsticks  {_fmt(sub['set_weights'])} -> {sub_sw:.2f} ops/s")
    print(f"set_weights ratio LocalLedger/Chopsticks: {loc_sw / sub_sw:.0f}x")
    print(f"metagraph ({a.uids} uids)     LocalLedger {_fmt(loc['mg_small'])} -> {loc_mg:.0f} reads/s")
    print(f"metagraph ({a.uids} uids)     Chopsticks  {_fmt(sub['mg_small'])} -> {sub_mg:.2f} reads/s")
    print(f"metagraph ratio LocalLedger/Chopsticks: {loc_mg / sub_mg:.0f}x")
    print(f"metagraph ({a.big} uids)    LocalLedger {_fmt(loc['mg_big'])}")
    print(f"metagraph ({a.big} uids)    Chopsticks  {_fmt(sub['mg_big'])}")


if __name__ == "__main__":
    main()
