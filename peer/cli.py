"""``peer`` — the contributor's command line.

Each subcommand lives in its own module that exposes ``register(subparsers)``; the parser it adds sets
``func`` (called with the parsed args, returns an exit code). Options use btcli-style dotted names
(``--wallet.name``, ``--subtensor.network``) where Bittensor users expect them.

Some subcommand modules import torch or hivemind (seconds). ``peer <command> …`` therefore imports
first the module named like the command (``peer.chain.cli`` → ``chain``, ``peer.net.fetch_cli`` →
``fetch``), and all of them only for ``peer --help`` or when that guess does not register the command.
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
    "peer.net.fetch_cli",
    "peer.status",
    "peer.chain.cli",
    "peer.doctor",
    "peer.data.cli",
]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a wrong flag as one line and exit code 2 (its default), no usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _command_name(module: str) -> str:
    """The command a module is expected to add: its last name part (the one before ``.cli``), without a
    ``_cli`` suffix (``peer.net.fetch_cli`` adds ``fetch``)."""
    parts = module.split(".")
    name = parts[-2] if parts[-1] == "cli" and len(parts) > 1 else parts[-1]
    return name.removesuffix("_cli")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``peer`` parser; with ``command`` only the module that adds it, if the name guess holds."""
    parser = _Parser(
        prog="peer", description="Join a gradswarm swarm: train one shared model, get paid for it."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    guess = [m for m in SUBCOMMAND_MODULES if _command_name(m) == command]
    if guess:
        importlib.import_module(guess[0]).register(sub)
        if command in sub.choices:
            return parser
        parser = build_parser()  # the guess did not hold: every module
    else:
        for mod in SUBCOMMAND_MODULES:
            importlib.import_module(mod).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv and not argv[0].startswith("-") else None)
    args = parser.parse_args(argv)
    return run_cli(lambda: args.func(args), f"peer {args.command}")


if __name__ == "__main__":
    sys.exit(main())
