"""``peer chain …``: create a local subnet, fund, register, stake, and show the metagraph.

    peer chain create-subnet --wallet.name owner --wallet.create         # LocalLedger subnet (netuid 1)
    peer chain fund --wallet.name alice --tao 1000                       # LocalLedger faucet
    peer chain register --wallet.name alice --wallet.hotkey h0 --wallet.create
    peer chain stake --wallet.name alice --wallet.hotkey h0 --tao 100
    peer chain metagraph                                                 # a rich table
    peer chain advance 20                                                # LocalLedger/Chopsticks only
    eval "$(peer chain password-env --wallet.name alice)"               # unlock an encrypted coldkey

Every command (but ``password-env``) takes the chain flags (``--subtensor.network``, ``--subtensor.chain_endpoint``,
``--netuid``, ``--ledger.path``, ``--ledger.block-time``). On a real chain, ``register`` burns TAO
only with ``--register.burn``. ``--coldkey.uri //Bob`` signs with a dev key instead of the wallet's
coldkey (Chopsticks / local test chains).

Only commands that sign with the coldkey read it: ``create-subnet``, ``stake`` and a ``register`` that
sends a registration. ``fund`` and the rest use its address (``coldkeypub.txt``), so a btcli wallet with
an encrypted coldkey works for them as it is; where it must sign, the password comes from
bittensor-wallet's ``BT_PW_…`` variable (``password-env`` prints it) or is typed at a terminal.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from rich.console import Console
from rich.table import Table
from substrateinterface import Keypair

from peer.chain.base import RAO_PER_TAO, Chain, ChainError, SubnetParams
from peer.chain.config import add_chain_args, chain_config_from_args, connect
from peer.chain.membership import ensure_registered
from peer.chain.wallet import (
    WalletConfig,
    coldkey_address,
    coldkey_path,
    load_coldkey,
    load_hotkey,
    password_export_line,
    require_coldkey_address,
)
from peer.errors import ConfigError, run_cli
from peer.net.records import Commitment, RecordError


def _add_wallet_args(p: argparse.ArgumentParser) -> None:
    d = WalletConfig()
    g = p.add_argument_group("wallet")
    g.add_argument("--wallet.name", dest="wallet_name", default=d.name)
    g.add_argument("--wallet.hotkey", dest="wallet_hotkey", default=d.hotkey)
    g.add_argument("--wallet.path", dest="wallet_path", default=d.path)
    g.add_argument("--wallet.create", dest="wallet_create", action="store_true", help="create missing keys")
    g.add_argument(
        "--coldkey.uri", dest="coldkey_uri", default=None, help="dev key such as //Bob (test chains)"
    )


def _wallet(args) -> WalletConfig:
    return WalletConfig(
        name=args.wallet_name, hotkey=args.wallet_hotkey, path=args.wallet_path, create=args.wallet_create
    )


def _hotkey(args) -> Keypair:
    return load_hotkey(_wallet(args))


def _coldkey(args, purpose: str) -> Keypair:
    """The coldkey, to sign ``purpose`` with (``--coldkey.uri`` or the wallet's, unlocked if encrypted)."""
    if args.coldkey_uri:
        return Keypair.create_from_uri(args.coldkey_uri)
    return load_coldkey(_wallet(args), purpose)


def _coldkey_ss58(args) -> str:
    """The coldkey's address, without reading its secret (``--coldkey.uri`` or ``coldkeypub.txt``)."""
    if args.coldkey_uri:
        return Keypair.create_from_uri(args.coldkey_uri).ss58_address
    return require_coldkey_address(_wallet(args))


def _tao(x: float) -> int:
    if x < 0:
        raise ConfigError(f"--tao must be >= 0, got {x}")
    return int(round(x * RAO_PER_TAO))


def _local_only(chain: Chain, what: str):
    from peer.chain.local import LocalLedger

    if not isinstance(chain, LocalLedger):
        raise ChainError(f"`peer chain {what}` works on the local ledger only (--subtensor.network local)")
    return chain


def cmd_create_subnet(args) -> int:
    chain = connect(chain_config_from_args(args))
    owner = _coldkey(args, "`peer chain create-subnet`")
    params = SubnetParams(
        tempo=args.tempo,
        weights_rate_limit=args.weights_rate_limit,
        commit_reveal_enabled=True if args.commit_reveal else None,
        max_uids=args.max_uids,
        burn=None if args.burn_tao is None else _tao(args.burn_tao),
    )
    hotkey = _hotkey(args) if args.owner_hotkey else None
    if args.sudo_uri:
        netuid = chain.create_subnet(owner, params, hotkey, sudo_key=Keypair.create_from_uri(args.sudo_uri))
    else:
        netuid = _local_only(chain, "create-subnet").create_subnet(owner, params, hotkey)
    print(f"created subnet netuid={netuid} owner={owner.ss58_address}")
    return 0


def cmd_fund(args) -> int:
    ledger = _local_only(connect(chain_config_from_args(args)), "fund")
    address = args.address or _coldkey_ss58(args)
    bal = ledger.fund(address, _tao(args.tao))
    print(f"{address}: {bal / RAO_PER_TAO:g} TAO")
    return 0


def cmd_register(args) -> int:
    cfg = chain_config_from_args(args)
    chain = connect(cfg)
    hk = _hotkey(args)

    def signer() -> Keypair | None:  # called only if a registration is sent
        if args.register_burn or args.coldkey_uri or coldkey_address(_wallet(args)):
            return _coldkey(args, "`peer chain register`")
        return None  # no coldkey at all: the hotkey registers itself (LocalLedger, no burn)

    reg = ensure_registered(chain, cfg.netuid, hk, signer, burn=args.register_burn)
    state = "registered" if reg.new else "already registered"
    print(f"{state}: netuid={reg.netuid} uid={reg.uid} hotkey={reg.hotkey} coldkey={reg.coldkey}")
    return 0


def cmd_stake(args) -> int:
    cfg = chain_config_from_args(args)
    chain = connect(cfg)
    hotkey = args.hotkey or _hotkey(args).ss58_address
    netuid = cfg.netuid if args.stake_netuid is None else args.stake_netuid
    tx = chain.add_stake(netuid, hotkey, _coldkey(args, "`peer chain stake`"), _tao(args.tao))
    print(f"staked {args.tao:g} TAO to {hotkey} on netuid {netuid} at block {tx.block}")
    return 0


def cmd_advance(args) -> int:
    chain = connect(chain_config_from_args(args))
    if not hasattr(chain, "advance"):
        raise ChainError("advance works on the local ledger and on Chopsticks only")
    print(f"head #{chain.advance(args.blocks)}")
    return 0


def cmd_metagraph(args) -> int:
    cfg = chain_config_from_args(args)
    chain = connect(cfg)
    mg = chain.metagraph(cfg.netuid)
    hp = chain.hyperparameters(cfg.netuid)
    commitments = chain.commitments(cfg.netuid)
    table = Table(
        title=f"subnet {mg.netuid} at block {mg.block} (tempo {hp.tempo}, {mg.n}/{hp.max_uids} uids)"
    )
    for col in (
        "uid",
        "hotkey",
        "coldkey",
        "stake τ",
        "vpermit",
        "incentive",
        "dividends",
        "emission τ",
        "updated",
        "commitment",
    ):
        table.add_column(col, justify="right" if col not in ("hotkey", "coldkey", "commitment") else "left")
    for nr in mg.neurons:
        c = commitments.get(nr.hotkey)
        table.add_row(
            str(nr.uid),
            nr.hotkey[:10] + "…",
            nr.coldkey[:10] + "…",
            f"{nr.stake_tao:,.3f}",
            "✓" if nr.validator_permit else "",
            f"{nr.incentive:.4f}",
            f"{nr.dividends:.4f}",
            f"{nr.emission / RAO_PER_TAO:,.3f}",
            str(nr.last_update),
            _show_commitment(c),
        )
    Console(width=args.width).print(table)
    return 0


def _show_commitment(raw: bytes | None) -> str:
    """A commitment as the table shows it: the multiaddr (peer id shortened), or what is wrong with it."""
    if raw is None:
        return ""
    try:
        c = Commitment.from_bytes(raw)
    except RecordError:
        return f"(not a multiaddr: {len(raw)} bytes)"
    return f"{c.addr}/p2p/{c.peer_id[:10]}…"


def cmd_password_env(args) -> int:
    cfg = _wallet(args)
    path = coldkey_path(cfg) if args.key == "coldkey" else cfg.hotkey_path
    if sys.stdin.isatty():
        password = getpass.getpass(f"password for {path}: ")
    else:  # piped: the first line of stdin
        password = sys.stdin.readline().removesuffix("\n")
    print(password_export_line(path, password))
    return 0


def register(subparsers) -> None:
    """Add ``chain`` to the ``peer`` command (see peer/cli.py)."""
    p = subparsers.add_parser("chain", help="local ledger / chain tools: subnet, register, stake, metagraph")
    sub = p.add_subparsers(dest="chain_command", required=True, metavar="CHAIN_COMMAND")

    def add(name: str, func, help_: str, *, chain: bool = True) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=help_)
        if chain:
            add_chain_args(q)
        _add_wallet_args(q)
        q.set_defaults(func=func)
        return q

    q = add(
        "create-subnet", cmd_create_subnet, "create a subnet (LocalLedger; or a dev chain with --sudo.uri)"
    )
    q.add_argument("--tempo", type=int, default=None, help="blocks per epoch - 1 (local default 10)")
    q.add_argument("--weights-rate-limit", type=int, default=None, help="blocks between weight sets")
    q.add_argument("--commit-reveal", action="store_true", help="require commit-reveal for weights")
    q.add_argument("--max-uids", type=int, default=None)
    q.add_argument("--burn-tao", type=float, default=None, help="registration burn (local default 0)")
    q.add_argument("--owner-hotkey", action="store_true", help="register the wallet hotkey as uid 0")
    q.add_argument(
        "--sudo.uri", dest="sudo_uri", default=None, help="sudo dev key (e.g. //Alice on Chopsticks)"
    )
    q = add("fund", cmd_fund, "LocalLedger faucet: credit TAO to the wallet coldkey's address or --address")
    q.add_argument("--tao", type=float, required=True)
    q.add_argument("--address", default=None)
    q = add("register", cmd_register, "register the wallet hotkey on --netuid (idempotent)")
    q.add_argument("--register.burn", dest="register_burn", action="store_true", help="allow paying the burn")
    q = add("stake", cmd_stake, "stake TAO from the wallet coldkey to a hotkey")
    q.add_argument("--tao", type=float, required=True)
    q.add_argument("--hotkey", default=None, help="hotkey ss58 (default: the wallet hotkey)")
    q.add_argument("--stake-netuid", type=int, default=None, help="stake on this netuid (root: 0) instead")
    q = add("metagraph", cmd_metagraph, "show the subnet's neurons as a table")
    q.add_argument("--width", type=int, default=160)
    q = add("advance", cmd_advance, "dev: build N blocks now (LocalLedger, Chopsticks)")
    q.add_argument("blocks", type=int)
    q = add(
        "password-env",
        cmd_password_env,
        "print the `export BT_PW_…=…` line that unlocks an encrypted key (bittensor-wallet's variable)",
        chain=False,
    )
    q.add_argument("--key", choices=("coldkey", "hotkey"), default="coldkey", help="which key file")


def main(argv: list[str] | None = None) -> int:
    """``python -m peer.chain.cli chain …`` (the same commands without the rest of ``peer``)."""
    from peer.cli import _Parser

    parser = _Parser(prog="peer")
    register(parser.add_subparsers(dest="command", required=True, parser_class=_Parser))
    args = parser.parse_args(argv)
    return run_cli(lambda: args.func(args), f"peer chain {args.chain_command}")


if __name__ == "__main__":
    sys.exit(main())
