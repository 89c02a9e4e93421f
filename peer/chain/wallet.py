"""Bittensor wallets as btcli lays them out: ``<path>/<name>/hotkeys/<hotkey>``.

The hotkey (sr25519) is a peer's identity: it signs the peer's network identity, its manifests and its
chain extrinsics. We read wallets with the ``bittensor-wallet`` package and hand out a
``substrateinterface.Keypair`` so the same key signs for substrate-interface and for our records.
A hotkey is created only when the user asks for it (``--wallet.create``), never silently.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from substrateinterface import Keypair, KeypairType

from peer.errors import UserError

DEFAULT_WALLET_PATH = "~/.bittensor/wallets"


class WalletError(UserError):
    """The wallet or hotkey is missing or unreadable."""


@dataclass(kw_only=True)
class WalletConfig:
    name: str = "default"
    """Wallet (coldkey) name: the folder under ``path``."""
    hotkey: str = "default"
    """Hotkey name: the file ``<path>/<name>/hotkeys/<hotkey>``."""
    path: str = DEFAULT_WALLET_PATH
    """Folder holding wallets, as btcli uses it."""
    create: bool = field(default=False)
    """Create the coldkey/hotkey (unencrypted hotkey, as btcli does) if missing. Off by default."""

    def __post_init__(self) -> None:
        for key in ("name", "hotkey"):
            value = getattr(self, key)
            if not value or "/" in value or value.startswith("."):
                raise WalletError(f"--wallet.{key} {value!r} is not a valid name (no '/', not empty)")

    @property
    def root(self) -> Path:
        return Path(os.path.expanduser(self.path))

    @property
    def hotkey_path(self) -> Path:
        return self.root / self.name / "hotkeys" / self.hotkey


def _bt_wallet(cfg: WalletConfig):
    from bittensor_wallet import Wallet

    return Wallet(name=cfg.name, hotkey=cfg.hotkey, path=str(cfg.root))


def create_wallet(cfg: WalletConfig) -> Keypair:
    """Create the coldkey (unencrypted) and hotkey if they do not exist yet; return the hotkey."""
    wallet = _bt_wallet(cfg)
    coldkey_path = cfg.root / cfg.name / "coldkeypub.txt"
    if not coldkey_path.exists():
        wallet.create_new_coldkey(use_password=False, overwrite=False, suppress=True)
    if not cfg.hotkey_path.exists():
        wallet.create_new_hotkey(use_password=False, overwrite=False, suppress=True)
    return load_hotkey(cfg)


def load_hotkey(cfg: WalletConfig) -> Keypair:
    """Load the hotkey as an sr25519 ``Keypair``; with ``cfg.create`` make it first if it is missing."""
    if not cfg.hotkey_path.exists():
        if cfg.create:
            return create_wallet(cfg)
        raise WalletError(
            f"hotkey file {cfg.hotkey_path} not found: create it with `btcli wallet new_hotkey "
            f"--wallet.name {cfg.name} --wallet.hotkey {cfg.hotkey}` or pass --wallet.create"
        )
    return _keypair_from_file(cfg.hotkey_path, "hotkey file")


def coldkey_address(cfg: WalletConfig) -> str | None:
    """The wallet's coldkey ss58 address from ``coldkeypub.txt``, or None if there is none."""
    path = cfg.root / cfg.name / "coldkeypub.txt"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())["ss58Address"]
    except (OSError, json.JSONDecodeError, KeyError):
        raise WalletError(f"{path} is not a valid coldkeypub.txt") from None


def _keypair_from_file(path: Path, what: str) -> Keypair:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise WalletError(f"cannot read {what} {path}: {e}") from None
    if raw.startswith((b"$NACL", b"$BT")):
        raise WalletError(
            f"{what} {path} is encrypted: unlock it with btcli, or use an unencrypted local wallet"
        )
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise WalletError(f"{what} {path} is not readable JSON") from None
    try:
        if data.get("secretSeed"):
            kp = Keypair.create_from_seed(data["secretSeed"], ss58_format=42, crypto_type=KeypairType.SR25519)
        elif data.get("privateKey"):
            kp = Keypair.create_from_private_key(
                data["privateKey"], ss58_format=42, crypto_type=KeypairType.SR25519
            )
        else:
            raise WalletError(f"{what} {path} has neither secretSeed nor privateKey")
    except ValueError as e:
        raise WalletError(f"{what} {path} holds an invalid key: {e}") from None
    expected = data.get("ss58Address")
    if expected and expected != kp.ss58_address:
        raise WalletError(f"{what} {path}: ss58Address does not match its secret key")
    return kp


def load_coldkey(cfg: WalletConfig) -> Keypair:
    """The wallet's *unencrypted* coldkey (local runs and test chains); encrypted ones need btcli."""
    path = cfg.root / cfg.name / "coldkey"
    if not path.exists():
        if cfg.create:
            create_wallet(cfg)
        else:
            raise WalletError(
                f"coldkey {path} not found: create the wallet with btcli or pass --wallet.create"
            )
    return _keypair_from_file(path, "coldkey")


# CLI helpers shared by `peer join`, `peer status`, `peer chain` and `validator run`.
def add_wallet_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("wallet (btcli layout: <path>/<name>/hotkeys/<hotkey>)")
    g.add_argument("--wallet.name", dest="wallet_name", default="default", help="wallet (coldkey) name")
    g.add_argument("--wallet.hotkey", dest="wallet_hotkey", default="default", help="hotkey name")
    g.add_argument("--wallet.path", dest="wallet_path", default=DEFAULT_WALLET_PATH, help="wallets folder")
    g.add_argument(
        "--wallet.create",
        dest="wallet_create",
        action="store_true",
        help="create the coldkey/hotkey if missing (never done silently)",
    )


def wallet_config_from_args(args) -> WalletConfig:
    return WalletConfig(
        name=args.wallet_name, hotkey=args.wallet_hotkey, path=args.wallet_path, create=args.wallet_create
    )
