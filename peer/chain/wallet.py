"""Bittensor wallets as btcli lays them out: ``<path>/<name>/hotkeys/<hotkey>``.

The hotkey (sr25519) is a peer's identity: it signs the peer's network identity, its manifests and its
chain extrinsics. We read wallets with the ``bittensor-wallet`` package and hand out a
``substrateinterface.Keypair`` so the same key signs for substrate-interface and for our records.
A hotkey is created only when the user asks for it (``--wallet.create``), never silently.

Coldkeys: only what must sign with the coldkey loads it (:func:`load_coldkey`: creating a subnet,
staking, paying a registration); everything else reads its address from ``coldkeypub.txt``
(:func:`coldkey_address`), so a btcli wallet with an encrypted coldkey (btcli's default) works for the
faucet, the metagraph and a registered peer. An encrypted key that must sign is unlocked with the
password bittensor-wallet reads from the environment: ``BT_PW_<key file path, '/' and '.' as '_',
upper case>`` holding base64(password XOR the variable's name) (what ``Keyfile.save_password_to_env``
stores; ``peer chain password-env`` prints the line to export), or typed at a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import io
import json
import os
import sys
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
    if not (cfg.root / cfg.name / "coldkeypub.txt").exists():
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
    return _keypair_from_file(
        cfg.hotkey_path, "hotkey file", "this command", _password_env_cmd(cfg, "hotkey")
    )


def coldkey_address(cfg: WalletConfig) -> str | None:
    """The wallet's coldkey ss58 address from ``coldkeypub.txt``, or None if there is none.

    Never reads the coldkey itself: use it wherever only the address is needed."""
    path = cfg.root / cfg.name / "coldkeypub.txt"
    if not path.exists():
        return None
    try:
        address = json.loads(path.read_text())["ss58Address"]
        Keypair(ss58_address=address)  # a valid ss58 address
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise WalletError(f"{path} is not a valid coldkeypub.txt") from None
    return address


def require_coldkey_address(cfg: WalletConfig) -> str:
    """The coldkey's address (``coldkeypub.txt``); with ``cfg.create`` the wallet is created if missing."""
    address = coldkey_address(cfg)
    if address is None:
        if cfg.create:
            create_wallet(cfg)
            address = coldkey_address(cfg)
        else:
            raise WalletError(
                f"{cfg.root / cfg.name / 'coldkeypub.txt'} not found: create the wallet with `btcli wallet "
                f"new_coldkey --wallet.name {cfg.name}` or pass --wallet.create"
            )
    return address


def _password_env_cmd(cfg: WalletConfig, key: str) -> str:
    """The `peer chain password-env` command line that unlocks this wallet's ``key``."""
    cmd = f"peer chain password-env --wallet.name {cfg.name}"
    if key == "hotkey":
        cmd += f" --key hotkey --wallet.hotkey {cfg.hotkey}"
    if cfg.path != DEFAULT_WALLET_PATH:
        cmd += f" --wallet.path {cfg.path}"
    return cmd


def password_env_var(key_path: Path) -> str:
    """The environment variable bittensor-wallet reads the password of ``key_path`` from."""
    from bittensor_wallet import Keyfile

    return Keyfile(str(key_path)).env_var_name()


def password_env_value(key_path: Path, password: str) -> str:
    """The value of :func:`password_env_var` for ``password``, encoded as bittensor-wallet does
    (``Keyfile.save_password_to_env``: base64 of the password's bytes XORed with the variable's name;
    computed here because that method also sets the variable in this process)."""
    import base64

    key = password_env_var(key_path).encode()
    xored = bytes(b ^ key[i % len(key)] for i, b in enumerate(password.encode()))
    return base64.b64encode(xored).decode()


def password_export_line(key_path: Path, password: str) -> str:
    """``export BT_PW_…='…'`` for an encrypted key file, after checking that ``password`` opens it."""
    import shlex

    try:
        raw = key_path.read_bytes()
    except OSError as e:
        raise WalletError(f"cannot read {key_path}: {e}") from None
    if not _is_encrypted(raw):
        raise WalletError(f"{key_path} is not encrypted: it needs no password")
    if _decrypt(raw, password) is None:
        raise WalletError(f"{key_path}: wrong password")
    return f"export {password_env_var(key_path)}={shlex.quote(password_env_value(key_path, password))}"


def _is_encrypted(raw: bytes) -> bool:
    from bittensor_wallet.keyfile import keyfile_data_is_encrypted

    return bool(keyfile_data_is_encrypted(raw))


def _decrypt(raw: bytes, password: str) -> bytes | None:
    """Decrypt key file data (any bittensor-wallet format); None if the password is wrong."""
    from bittensor_wallet.errors import KeyFileError
    from bittensor_wallet.keyfile import decrypt_keyfile_data

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Decrypting..."
        try:
            return bytes(decrypt_keyfile_data(raw, password=password))
        except KeyFileError:
            return None


def _unlock(path: Path, raw: bytes, what: str, purpose: str, helper: str) -> bytes:
    """The decrypted data of an encrypted key file: the password from bittensor-wallet's environment
    variable, else typed at a terminal; with neither, one line saying how to proceed."""
    from bittensor_wallet.errors import KeyFileError
    from bittensor_wallet.keyfile import get_password_from_environment

    var = password_env_var(path)
    try:
        password = get_password_from_environment(var)
    except KeyFileError as e:  # not base64
        raise WalletError(f"{var} is not a bittensor-wallet password variable ({e})") from None
    source = f"the password in {var}"
    if password is None:
        if not sys.stdin.isatty():
            raise WalletError(
                f"{what} {path} is encrypted and {purpose} must sign with it: set {var} "
                f'(`eval "$({helper})"` asks the password and prints it), run this on a terminal to type '
                "the password, or do this step with btcli"
            )
        password = getpass.getpass(f"password for {what} {path}: ")
        source = "the password"
    data = _decrypt(raw, password)
    if data is None:
        raise WalletError(f"{what} {path}: {source} does not decrypt it (wrong password)")
    return data


def _keypair_from_file(path: Path, what: str, purpose: str, helper: str) -> Keypair:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise WalletError(f"cannot read {what} {path}: {e}") from None
    if _is_encrypted(raw):
        raw = _unlock(path, raw, what, purpose, helper)
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


def coldkey_path(cfg: WalletConfig) -> Path:
    return cfg.root / cfg.name / "coldkey"


def load_coldkey(cfg: WalletConfig, purpose: str = "this command") -> Keypair:
    """The wallet's coldkey, to sign with. ``purpose`` names what signs (for the error line). An
    encrypted coldkey is unlocked with the password from bittensor-wallet's environment variable (or
    typed at a terminal). Call this only where the coldkey must sign; for its address use
    :func:`coldkey_address`."""
    path = coldkey_path(cfg)
    if not path.exists():
        if cfg.create and coldkey_address(cfg) is None:
            create_wallet(cfg)
        else:
            raise WalletError(
                f"coldkey {path} not found, and {purpose} must sign with it: create the wallet with btcli "
                "or pass --wallet.create"
            )
    return _keypair_from_file(path, "coldkey", purpose, _password_env_cmd(cfg, "coldkey"))


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


def default_peer_home(run_id: str, wallet: WalletConfig) -> Path:
    """Where a peer keeps its outbox, checkpoint and status unless ``--home`` says otherwise."""
    return Path.home() / ".gradswarm" / run_id / f"{wallet.name}-{wallet.hotkey}"
