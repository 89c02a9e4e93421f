"""A bootstrap DHT node: a stable entry point for a swarm (no training).

    peer bootstrap --host-maddrs /ip4/0.0.0.0/tcp/31337 [--identity FILE] [--ready-file FILE]

Prints (and writes to ``--ready-file``, atomically, as JSON) the multiaddrs peers pass to
``--initial-peers``. Runs until interrupted.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from peer.net.outbox import atomic_write_json


def register(sub) -> None:
    p = sub.add_parser(
        "bootstrap",
        help="run a bootstrap DHT node other peers join through",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host-maddrs", nargs="*", default=["/ip4/0.0.0.0/tcp/31337"], metavar="MADDR")
    p.add_argument("--announce-maddrs", nargs="*", default=[], metavar="MADDR")
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR")
    p.add_argument(
        "--identity", default=None, help="libp2p private key file (stable peer id across restarts)"
    )
    p.add_argument(
        "--ready-file", type=Path, default=None, help="write {peer_id, maddrs} here once listening"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from peer.training.swarm import start_dht

    dht = start_dht(
        initial_peers=args.initial_peers,
        host_maddrs=args.host_maddrs,
        announce_maddrs=args.announce_maddrs,
        identity_path=args.identity,
    )
    maddrs = [str(m) for m in dht.get_visible_maddrs()]
    if args.ready_file:
        atomic_write_json(args.ready_file, {"peer_id": dht.peer_id.to_base58(), "maddrs": maddrs})
    print(
        "bootstrap ready; peers join with: --initial-peers " + " ".join(maddrs), file=sys.stderr, flush=True
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        stop.wait()
    finally:
        dht.shutdown()
    return 0
