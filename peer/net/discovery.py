"""Join by netuid alone: find a swarm's live DHT entry points from the chain.

    python -m peer.net.discovery --netuid 1 --run-id my-swarm [--ledger.path …|--subtensor.network …] --json

The recipe, every step checked:

1. **commitments**: every registered hotkey's on-chain commitment (publisher address + libp2p peer id,
   written by the hotkey itself);
2. **identity records**: dial each publisher (noise verifies the peer id) and read its hotkey-signed
   :class:`~peer.net.records.PeerIdentityRecord`; it must be signed by the hotkey registered for that uid
   and belong to this run. Its ``dht_addrs`` are the peer's hivemind DHT multiaddrs;
3. **liveness**: dial each peer's DHT addresses from a fresh libp2p host (noise again: the peer id at
   that address must be the one the hotkey signed). Peers are tried concurrently; dead ones are skipped.

Prints (``--json``) ``{"initial_peers": [...], "candidates": n, "live": n, "skipped": [{hotkey, why}]}``.
It runs in its own short process because it uses py-libp2p, which cannot share a process with hivemind
(``peer join`` calls :func:`discover_in_subprocess`, then passes the addresses to its DHT).
``--initial-peers`` given to ``peer join`` always wins: discovery runs only without it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from peer.errors import NetworkError

log = logging.getLogger("gradswarm.discovery")

DEFAULT_MAX_CANDIDATES = 32
"""Publishers asked per discovery (a random sample of the subnet's commitments beyond that)."""
DEFAULT_MAX_PEERS = 8
"""Live peers returned (hivemind needs one; a few make the join robust to one dying)."""


@dataclass(kw_only=True)
class DiscoveryResult:
    initial_peers: list[str] = field(default_factory=list)
    """Live DHT multiaddrs (``…/p2p/<peer id>``), ready for ``--initial-peers``."""
    candidates: int = 0
    """Publishers asked (hotkeys with a readable commitment)."""
    live: int = 0
    """Peers whose DHT answered."""
    skipped: list[dict] = field(default_factory=list)
    """``{"hotkey", "why"}`` for every candidate not used."""
    seconds: float = 0.0


def _dialable(maddr: str) -> bool:
    return "/0.0.0.0/" not in maddr and "/ip6/::/" not in maddr and "/p2p/" in maddr


def discover(
    chain,
    netuid: int,
    *,
    run_id: str | None,
    exclude_hotkeys: tuple[str, ...] = (),
    timeout_s: float = 20.0,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    max_peers: int = DEFAULT_MAX_PEERS,
    cache_dir: Path | None = None,
    allow_private: bool = False,
) -> DiscoveryResult:
    """Live DHT multiaddrs of the swarm on ``netuid`` (py-libp2p: never call this in a hivemind process).
    ``allow_private`` False: commitments and DHT addresses naming loopback/private/link-local addresses
    are skipped undialled (:mod:`peer.net.dial_policy`; the caller derives it from the chain)."""
    import tempfile

    from peer.net.fetch import FetchClient, FetchConfig, Target
    from peer.net.publisher import quiet_libp2p

    quiet_libp2p()
    t0 = time.monotonic()
    res = DiscoveryResult()
    registered = {nr.hotkey for nr in chain.metagraph(netuid).neurons}
    targets: list[Target] = []
    for hotkey, raw in chain.commitments(netuid).items():
        if hotkey not in registered or hotkey in exclude_hotkeys:
            continue
        target, why = Target.from_chain(raw, hotkey, allow_private=allow_private)
        if target is None:
            res.skipped.append({"hotkey": hotkey, "why": why})
        else:
            targets.append(target)
    random.shuffle(targets)
    for t in targets[max_candidates:]:
        res.skipped.append({"hotkey": t.hotkey, "why": "not sampled"})
    targets = targets[:max_candidates]
    res.candidates = len(targets)
    if not targets:
        res.seconds = time.monotonic() - t0
        return res
    per_dial = max(2.0, timeout_s / 2)
    with tempfile.TemporaryDirectory(prefix="gradswarm-discovery-") as tmp:
        cfg = FetchConfig(
            cache_dir=Path(cache_dir or tmp),
            run_id=run_id,
            connect_timeout_s=per_dial,
            io_timeout_s=per_dial,
            allow_private=allow_private,
        )
        with FetchClient(cfg) as client:
            found = client._call(_adiscover, client, targets, per_dial, res, allow_private)
    # bounded, in a random order: sorted by peer id, Ed25519 ids (12D3…) came before RSA ones (Qm…), so a
    # few registered hotkeys with chosen ids could fill every joiner's initial peers (red team)
    live = list(found)
    random.shuffle(live)
    for peer_id in live[:max_peers]:
        res.initial_peers += found[peer_id]
    res.live = len(found)
    res.seconds = time.monotonic() - t0
    return res


async def _adiscover(
    client, targets, per_dial: float, res: DiscoveryResult, allow_private: bool
) -> dict[str, list[str]]:
    """Identity records from every publisher, then a dial of each peer's DHT, all concurrently."""
    import trio

    from peer.net.dial_policy import dial_refusal
    from peer.net.fetch import FetchError

    found: dict[str, list[str]] = {}

    async def one(t) -> None:
        try:
            listing = await client.alist_round(t, None)
        except FetchError as e:
            res.skipped.append({"hotkey": t.hotkey, "why": f"publisher: {e.reason}: {e}"[:300]})
            return
        named = [a for a in (listing.identity.dht_addrs if listing.identity else []) if _dialable(a)]
        # the DHT must be the peer id the hotkey signed (the DHT and the publisher share one key)
        named = [a for a in named if a.rsplit("/p2p/", 1)[-1] == t.peer_id]
        # the record is the peer's own words: its DHT addresses pass the same rule as its commitment
        addrs = [a for a in named if dial_refusal(a, allow_private=allow_private) is None]
        if not addrs:
            why = "its identity record names no DHT address"
            if named:
                why = f"its DHT address {dial_refusal(named[0], allow_private=allow_private)}"
            res.skipped.append({"hotkey": t.hotkey, "why": why[:300]})
            return
        why = await probe_dht(addrs, timeout_s=per_dial, allow_private=allow_private)
        if why is None:
            found[t.peer_id] = addrs
        else:
            res.skipped.append({"hotkey": t.hotkey, "why": f"DHT not reachable: {why}"[:300]})

    with trio.move_on_after(per_dial * 2 + 1):
        async with trio.open_nursery() as nursery:
            for t in targets:
                nursery.start_soon(one, t)
    return found


async def probe_dht(maddrs: list[str], *, timeout_s: float, allow_private: bool = False) -> str | None:
    """Dial a peer's DHT addresses (all one peer id) from a fresh libp2p host; None if it answered,
    else why not. Noise checks that the key at the address is that peer id."""
    import multiaddr
    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.exceptions import BaseLibp2pError
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo

    from peer.net.publisher import make_host

    try:
        pid = ID.from_base58(maddrs[0].rsplit("/p2p/", 1)[1])
        addrs = [multiaddr.Multiaddr(a.rsplit("/p2p/", 1)[0]) for a in maddrs]
    except (ValueError, IndexError, multiaddr.exceptions.Error) as e:
        return f"bad address ({e})"
    host = make_host(create_new_key_pair(), allow_private=allow_private)
    try:
        async with host.run(listen_addrs=[]):
            with trio.fail_after(timeout_s):
                await host.connect(PeerInfo(pid, addrs))
            return None
    except trio.TooSlowError:
        return f"no answer within {timeout_s:.0f}s"
    except (BaseLibp2pError, OSError, BaseExceptionGroup) as e:  # trio nurseries wrap dial errors
        from peer.net.fetch import _mentions_mismatch

        if _mentions_mismatch(e):
            return "another peer id answers at that address (stale or forged record)"
        return _leaf_message(e)


def _leaf_message(e: BaseException, depth: int = 0) -> str:
    """The innermost error's first line (py-libp2p and trio nest the cause several levels deep)."""
    inner = e.exceptions[0] if isinstance(e, BaseExceptionGroup) and e.exceptions else e.__cause__
    if inner is not None and depth < 12:
        return _leaf_message(inner, depth + 1)
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


# ------------------------------------------------------------------------------------------- the parent's side


def chain_flags(chain_cfg) -> list[str]:
    """The command-line flags that select ``chain_cfg`` (peer.chain.config.add_chain_args)."""
    flags = ["--subtensor.network", chain_cfg.network, "--netuid", str(chain_cfg.netuid)]
    flags += ["--ledger.path", str(chain_cfg.ledger_path), "--ledger.block-time", str(chain_cfg.block_time)]
    if chain_cfg.chain_endpoint:
        flags += ["--subtensor.chain_endpoint", chain_cfg.chain_endpoint]
    return flags + ["--dial-private", chain_cfg.dial_private]


def discover_in_subprocess(
    chain_cfg, *, run_id: str, exclude_hotkey: str | None = None, timeout_s: float = 20.0
) -> DiscoveryResult:
    """Run discovery in a short ``python -m peer.net.discovery`` process (safe to call from a hivemind
    process); NetworkError with the child's last line if it fails."""
    cmd = [sys.executable, "-m", "peer.net.discovery", *chain_flags(chain_cfg), "--run-id", run_id]
    cmd += ["--timeout", str(timeout_s), "--json"]
    if exclude_hotkey:
        cmd += ["--exclude-hotkey", exclude_hotkey]
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s * 2 + 60, env=env, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise NetworkError(f"peer discovery did not finish within {timeout_s * 2 + 60:.0f}s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise NetworkError(f"peer discovery failed: {last}")
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        return DiscoveryResult(**data)
    except (IndexError, ValueError, TypeError) as e:
        raise NetworkError(f"peer discovery printed something unreadable ({e})") from None


def main(argv: list[str] | None = None) -> int:
    from peer.chain.config import add_chain_args, chain_config_from_args, connect
    from peer.errors import run_cli

    p = argparse.ArgumentParser(
        prog="python -m peer.net.discovery",
        description="Find a swarm's live DHT entry points from the chain's commitments.",
    )
    add_chain_args(p)
    p.add_argument("--run-id", default=None, help="only accept identity records of this run")
    p.add_argument("--exclude-hotkey", action="append", default=[], help="skip this hotkey (yourself)")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds for the whole discovery (about)")
    p.add_argument("--max-peers", type=int, default=DEFAULT_MAX_PEERS)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    def run() -> int:
        from peer.net.dial_policy import private_allowed_for

        cfg = chain_config_from_args(args)
        if cfg.is_local and not Path(cfg.ledger_path).exists():
            raise NetworkError(f"no ledger at {cfg.ledger_path}: nothing to discover")
        chain = connect(cfg)
        try:
            res = discover(
                chain,
                cfg.netuid,
                run_id=args.run_id,
                exclude_hotkeys=tuple(args.exclude_hotkey),
                timeout_s=args.timeout,
                max_peers=args.max_peers,
                allow_private=private_allowed_for(cfg),
            )
        finally:
            chain.close()
        if args.json:
            print(json.dumps(asdict(res)), flush=True)
        else:
            print(f"{res.live} live of {res.candidates} asked in {res.seconds:.1f}s")
            print("--initial-peers " + " ".join(res.initial_peers))
            for s in res.skipped:
                print(f"  skipped {s['hotkey'][:12]}: {s['why']}")
        return 0

    return run_cli(run, "peer discovery")


if __name__ == "__main__":
    sys.exit(main())
