"""Bittensor wallets as btcli lays them out: ``<path>/<name>/hotkeys/<hotkey>``.

The hotkey (sr25519) is a peer's identity: it signs the peer's network identity, its manifests and its
chain extrinsics. We read wallets with the ``bittensor-wallet`` package and hand out a
``substrateinterface.Keypair`` so the same key signs for substrate-interface and for our records.
A hotkey is created only when the user asks for it (``--wallet.create``), never silently.
"""

from __future__ import annotations

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
    try:
        data = json.loads(cfg.hotkey_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WalletError(
            f"hotkey file {cfg.hotkey_path} is not readable JSON ({e}); encrypted hotkeys are not supported"
        ) from None
    try:
        if data.get("secretSeed"):
            kp = Keypair.create_from_seed(data["secretSeed"], ss58_format=42, crypto_type=KeypairType.SR25519)
        elif data.get("privateKey"):
            kp = Keypair.create_from_private_key(
                data["privateKey"], ss58_format=42, crypto_type=KeypairType.SR25519
            )
        else:
            raise WalletError(f"hotkey file {cfg.hotkey_path} has neither secretSeed nor privateKey")
    except ValueError as e:
        raise WalletError(f"hotkey file {cfg.hotkey_path} holds an invalid key: {e}") from None
    expected = data.get("ss58Address")
    if expected and expected != kp.ss58_address:
        raise WalletError(f"hotkey file {cfg.hotkey_path}: ss58Address does not match its secret key")
    return kp


def coldkey_address(cfg: WalletConfig) -> str | None:
    """The wallet's coldkey ss58 address from ``coldkeypub.txt``, or None if there is none."""
    path = cfg.root / cfg.name / "coldkeypub.txt"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())["ss58Address"]
    except (OSError, json.JSONDecodeError, KeyError):
        raise WalletError(f"{path} is not a valid coldkeypub.txt") from None


def load_coldkey(cfg: WalletConfig) -> Keypair:
    """Load an *unencrypted* coldkey (local runs); encrypted coldkeys need btcli-style unlocking."""
    wallet = _bt_wallet(cfg)
    try:
        ck = wallet.get_coldkey()
    except Exception as e:  # noqa: BLE001 - bittensor_wallet raises its own error types
        raise WalletError(f"cannot read coldkey of wallet {cfg.name!r}: {e}") from None
    return Keypair.create_from_private_key(
        "0x" + bytes(ck.private_key).hex() if not isinstance(ck.private_key, str) else ck.private_key,
        ss58_format=42,
        crypto_type=KeypairType.SR25519,
    )
