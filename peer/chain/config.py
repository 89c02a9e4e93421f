"""Which chain to use: ``ChainConfig``, btcli-style flags, and ``connect(cfg) -> Chain``.

``--subtensor.network local`` (the default) is the embedded :class:`LocalLedger` at ``--ledger.path``;
``finney`` / ``test`` / ``archive`` / ``local-subtensor`` or ``--subtensor.chain_endpoint ws://…``
select :class:`SubstrateChain` on a real subtensor.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from peer.chain.base import Chain, UnknownNetwork
from peer.errors import ConfigError
from peer.net.dial_policy import DIAL_PRIVATE_CHOICES

DEFAULT_LEDGER_PATH = ".cache/ledger/ledger.sqlite"
LOCAL = "local"


@dataclass(kw_only=True)
class ChainConfig:
    """Where peers and validators meet."""

    network: str = LOCAL
    """``local`` = the embedded LocalLedger (SQLite file at ``ledger_path``, shared by local processes);
    ``finney``, ``test``, ``archive``, ``local-subtensor`` = a subtensor node (like btcli)."""
    chain_endpoint: str | None = None
    """ws:// or wss:// URL of a subtensor node; overrides ``network`` (Chopsticks: ws://127.0.0.1:9944)."""
    ledger_path: str = DEFAULT_LEDGER_PATH
    """LocalLedger file. Every process of one local swarm must point at the same file."""
    netuid: int = 1
    """Subnet id. LocalLedger numbers its subnets from 1 (`peer chain create-subnet`)."""
    block_time: float = 1.0
    """LocalLedger seconds per block, used when the ledger file is created (an existing file keeps its
    own). Smaller = faster rounds and epochs; the real chain has 12 s."""
    timeout: float = 120.0
    """SubstrateChain websocket timeout (s): a call waiting longer fails instead of hanging."""
    dial_private: str = "auto"
    """Whether addresses that hotkeys committed on this chain may be dialled when they are loopback,
    private or link-local (:mod:`peer.net.dial_policy`): ``auto`` = only on the embedded LocalLedger,
    ``yes`` = always (Chopsticks, a lab chain whose peers sit on one private network), ``no`` = never.
    Symptom → knob: on a test chain every peer is refused with ``commitment names a non-public
    address`` → ``--dial-private yes``."""

    def __post_init__(self) -> None:
        from peer.chain.substrate import NETWORKS

        if self.chain_endpoint is not None and not self.chain_endpoint.startswith(("ws://", "wss://")):
            raise ConfigError(
                f"--subtensor.chain_endpoint {self.chain_endpoint!r} must start with ws:// or wss://"
            )
        if self.chain_endpoint is None and self.network != LOCAL and self.network not in NETWORKS:
            raise UnknownNetwork(
                f"--subtensor.network {self.network!r} is not a known network: use one of "
                f"{[LOCAL, *NETWORKS]} or pass --subtensor.chain_endpoint ws://HOST:PORT"
            )
        if not 0 <= self.netuid <= 65535:
            raise ConfigError(f"--netuid {self.netuid} must be in 0..65535")
        if self.block_time <= 0:
            raise ConfigError(f"--ledger.block-time must be > 0 seconds, got {self.block_time}")
        if self.timeout <= 0:
            raise ConfigError(f"chain timeout must be > 0 seconds, got {self.timeout}")
        if self.dial_private not in DIAL_PRIVATE_CHOICES:
            raise ConfigError(
                f"--dial-private {self.dial_private!r} must be one of {', '.join(DIAL_PRIVATE_CHOICES)}"
            )

    @property
    def is_local(self) -> bool:
        return self.chain_endpoint is None and self.network == LOCAL

    @property
    def url(self) -> str | None:
        from peer.chain.substrate import NETWORKS

        return None if self.is_local else (self.chain_endpoint or NETWORKS[self.network])


def connect(cfg: ChainConfig) -> Chain:
    """Open the chain the config names (LocalLedger or SubstrateChain); raises a UserError if it can't."""
    if cfg.is_local:
        from peer.chain.local import LocalLedger

        return LocalLedger(cfg.ledger_path, block_time=cfg.block_time)
    from peer.chain.substrate import SubstrateChain

    url = cfg.url
    assert url is not None
    return SubstrateChain(url, timeout=cfg.timeout, block_time=12.0)


def add_chain_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--subtensor.network``, ``--subtensor.chain_endpoint``, ``--netuid``, ``--ledger.path``,
    ``--ledger.block-time`` (dests: subtensor_network, subtensor_chain_endpoint, netuid, ledger_path,
    ledger_block_time)."""
    d = ChainConfig()
    g = parser.add_argument_group("chain")
    g.add_argument(
        "--subtensor.network",
        dest="subtensor_network",
        default=d.network,
        help="local (embedded ledger, default), finney, test, archive, local-subtensor",
    )
    g.add_argument(
        "--subtensor.chain_endpoint",
        dest="subtensor_chain_endpoint",
        default=None,
        help="ws:// URL of a subtensor node (overrides --subtensor.network)",
    )
    g.add_argument("--netuid", type=int, default=d.netuid, help=f"subnet id (default {d.netuid})")
    g.add_argument("--ledger.path", dest="ledger_path", default=d.ledger_path, help="LocalLedger SQLite file")
    g.add_argument(
        "--ledger.block-time",
        dest="ledger_block_time",
        type=float,
        default=d.block_time,
        help="LocalLedger seconds per block (used when the ledger is created)",
    )
    g.add_argument(
        "--dial-private",
        dest="dial_private",
        choices=DIAL_PRIVATE_CHOICES,
        default=d.dial_private,
        help="dial committed loopback/private/link-local addresses: auto (default) = only on the "
        "LocalLedger; yes for Chopsticks or a lab chain on a private network (peer.net.dial_policy)",
    )


def chain_config_from_args(args: argparse.Namespace) -> ChainConfig:
    return ChainConfig(
        network=args.subtensor_network,
        chain_endpoint=args.subtensor_chain_endpoint,
        netuid=args.netuid,
        ledger_path=args.ledger_path,
        block_time=args.ledger_block_time,
        dial_private=getattr(args, "dial_private", "auto"),
    )
