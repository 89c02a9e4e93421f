"""``peer fetch``: dial a peer's publisher by hand, verify its signed records and save what it serves.

The command around :class:`peer.net.fetch.FetchClient` (the same checks a validator makes), for a
miner checking what validators see of it, or anyone auditing a peer.
``python -m peer.net.fetch_cli ...`` is ``peer fetch ...``.
"""

from __future__ import annotations

import json
from pathlib import Path

from peer.errors import ConfigError
from peer.net.fetch import FetchClient, FetchConfig, Target


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fetch",
        help="fetch and verify a peer's published artifacts",
        description="Dial a peer's publisher, verify its signed identity and manifests, and save the "
        "round's contribution (and --state) into --out after checking their sha256.",
    )
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        help="/ip4/<ip>/tcp/<port>/p2p/<peer id>, or a 0x-hex commitment",
    )
    p.add_argument("--hotkey", required=True, help="ss58 hotkey the peer is registered with")
    p.add_argument("--run-id", default=None, help="only accept records of this run")
    p.add_argument("--round", type=int, default=None, help="round to fetch (default: list the rounds it has)")
    p.add_argument("--state", action="store_true", help="also fetch the state θ_r")
    p.add_argument("--out", type=Path, default=Path("fetched"), help="cache folder for verified blobs")
    p.add_argument("--no-identity", action="store_true", help="accept a publisher without an identity record")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=_cmd_fetch)


def _cmd_fetch(args) -> int:
    from peer.net.publisher import quiet_libp2p

    quiet_libp2p()
    source = args.source
    if source.startswith("0x"):
        try:
            target = Target.from_commitment(bytes.fromhex(source[2:]), args.hotkey)
        except ValueError:
            raise ConfigError(f"--from {source!r}: not hex") from None
    else:
        target = Target.from_commitment(source, args.hotkey)
    cfg = FetchConfig(cache_dir=args.out, run_id=args.run_id, require_identity=not args.no_identity)
    out: dict = {"peer_id": target.peer_id, "hotkey": target.hotkey}
    with FetchClient(cfg) as client:
        listing = client._call(client._counted, client.alist_round(target, args.round))
        out["rounds"], out["state_rounds"] = listing.rounds, listing.state_rounds
        if args.round is not None:
            kinds = ["contribution"] + (["state"] if args.state else [])
            for kind in kinds:
                f = client.fetch(target, args.round, kind)
                out[kind] = {
                    "path": str(f.path),
                    "sha256": f.sha256,
                    "size": f.size,
                    "round": f.manifest.round,
                }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"peer {target.peer_id} (hotkey {target.hotkey}): rounds {out['rounds']}, state rounds {out['state_rounds']}"
        )
        for kind in ("contribution", "state"):
            if kind in out:
                print(
                    f"  {kind} r{out[kind]['round']}: {out[kind]['path']} ({out[kind]['size']} bytes, sha256 {out[kind]['sha256'][:16]}…) verified"
                )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m peer.net.fetch_cli ...`` == ``peer fetch ...``."""
    from peer.cli import _Parser
    from peer.errors import run_cli

    parser = _Parser(prog="peer")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["fetch", *(argv if argv is not None else __import__("sys").argv[1:])])
    return run_cli(lambda: args.func(args), "peer fetch")


if __name__ == "__main__":
    raise SystemExit(main())
