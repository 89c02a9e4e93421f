"""``peer`` — the contributor's command line.

Each subcommand lives in its own module that exposes ``register(subparsers)``; the parser it adds sets
``func`` (called with the parsed args, returns an exit code). Options use btcli-style dotted names
(``--wallet.name``, ``--subtensor.network``) where Bittensor users expect them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from peer.errors import run_cli

# modules that add a subcommand: each has register(subparsers)
SUBCOMMAND_MODULES = [
    "peer.join",
    "peer.net.bootstrap",
    "peer.net.fetch",
    "peer.status",
    "peer.data.cli",
]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a wrong flag as one line and exit code 2 (its default), no usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="peer", description="Join a gradswarm swarm: train one shared model, get paid for it."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    for mod in SUBCOMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_cli(lambda: args.func(args), f"peer {args.command}")


if __name__ == "__main__":
    sys.exit(main())
