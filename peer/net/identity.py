"""A peer's libp2p identity: one private-key file that hivemind's p2pd and py-libp2p both load.

The trainer (hivemind: ``hivemind.DHT(..., identity_path=...)``, i.e. p2pd ``-id``) and the publisher
(py-libp2p) of one peer use the *same* key file, so the peer id the swarm sees in the DHT is the peer id
validators dial. The file is a protobuf-marshalled ``crypto.pb.PrivateKey`` — exactly what go-libp2p's
``crypto.UnmarshalPrivateKey`` reads and what hivemind's ``P2P.generate_identity`` writes:

* key type **RSA-2048**, data = PKCS#1 DER. RSA because hivemind reads the file itself too
  (``P2P.is_identity_taken`` turns it into a peer id with an RSA-only parser whenever ``identity_path`` is
  given together with ``initial_peers``); an Ed25519 file would make ``hivemind.DHT`` fail to start there.
* Ed25519 files written by go-libp2p (64 bytes: seed || public key) are read as well, for users who bring
  their own key (then pass ``check_if_identity_free=False`` to hivemind).

Nothing here imports hivemind or py-libp2p (they cannot share a process): the protobuf is encoded by hand
(two fields) and the peer id is computed from the key with ``cryptography`` + ``base58``, the libp2p spec
way (sha2-256 multihash of the marshalled public key; identity multihash when that is <= 42 bytes).
:func:`libp2p_keypair` imports py-libp2p lazily and is only called in the publisher/validator process.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import base58
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from peer.errors import UserError

IDENTITY_FILE = "p2p_identity.key"
"""File name of the identity key inside a peer's home folder (see :func:`identity_path`)."""

KEY_TYPE_RSA = 0
KEY_TYPE_ED25519 = 1
RSA_BITS = 2048
_MAX_KEY_FILE = 16 << 10  # an RSA-4096 key is ~2.4 KB; anything bigger is not a key file
_MAX_INLINE_KEY_LENGTH = 42  # libp2p spec: public keys up to 42 bytes are inlined (identity multihash)


class IdentityError(UserError):
    """The libp2p identity key file is missing, unreadable or not a supported key."""


@dataclass(frozen=True, kw_only=True)
class Identity:
    """A loaded identity key file."""

    path: Path
    """Where the key lives."""
    key_type: int
    """``crypto.pb.KeyType``: 0 = RSA, 1 = Ed25519."""
    key_data: bytes
    """The key's ``data`` field (PKCS#1 DER for RSA, seed || public key for Ed25519)."""
    peer_id: str
    """The libp2p peer id, base58 (``Qm...`` for RSA, ``12D3KooW...`` for Ed25519)."""


# ---------------------------------------------------------------------------------------------------
# protobuf, by hand: message PrivateKey/PublicKey { required KeyType key_type = 1; required bytes data = 2; }


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def encode_key_pb(key_type: int, data: bytes) -> bytes:
    """Marshal a ``crypto.pb.PrivateKey`` / ``PublicKey`` (same wire shape) — go-libp2p byte order."""
    return b"\x08" + _varint(key_type) + b"\x12" + _varint(len(data)) + data


def decode_key_pb(raw: bytes) -> tuple[int, bytes]:
    """Parse a ``crypto.pb.PrivateKey``/``PublicKey``; raise ValueError if it is anything else."""
    key_type: int | None = None
    data: bytes | None = None
    pos = 0
    while pos < len(raw):
        tag, pos = _read_varint(raw, pos)
        if tag == 0x08:
            key_type, pos = _read_varint(raw, pos)
        elif tag == 0x12:
            length, pos = _read_varint(raw, pos)
            if pos + length > len(raw):
                raise ValueError("truncated key data")
            data, pos = raw[pos : pos + length], pos + length
        else:
            raise ValueError(f"unexpected protobuf field tag {tag}")
    if key_type is None or data is None:
        raise ValueError("key_type or data missing")
    return key_type, data


# ---------------------------------------------------------------------------------------------------
# peer ids


def public_key_pb(key_type: int, key_data: bytes) -> bytes:
    """The marshalled public key a peer id is derived from."""
    if key_type == KEY_TYPE_RSA:
        key = serialization.load_der_private_key(key_data, password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("RSA key type but the data is not an RSA private key")
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return encode_key_pb(KEY_TYPE_RSA, spki)
    if key_type == KEY_TYPE_ED25519:
        if len(key_data) not in (32, 64, 96):
            raise ValueError(f"Ed25519 key data must be 64 bytes (seed || public key), got {len(key_data)}")
        pub = (
            ed25519.Ed25519PrivateKey.from_private_bytes(key_data[:32])
            .public_key()
            .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )
        if len(key_data) >= 64 and key_data[32:64] != pub:
            raise ValueError("Ed25519 key data: public half does not match the seed")
        return encode_key_pb(KEY_TYPE_ED25519, pub)
    raise ValueError(f"key type {key_type} is not supported (RSA or Ed25519 only)")


def peer_id_bytes_from_public_key_pb(pub_pb: bytes) -> bytes:
    if len(pub_pb) <= _MAX_INLINE_KEY_LENGTH:
        return b"\x00" + _varint(len(pub_pb)) + pub_pb  # identity multihash
    return b"\x12\x20" + hashlib.sha256(pub_pb).digest()  # sha2-256 multihash


def peer_id_to_bytes(peer_id: str) -> bytes:
    """base58 peer id -> its multihash bytes; raise IdentityError if it is not a peer id."""
    try:
        raw = base58.b58decode(peer_id)
    except ValueError:
        raise IdentityError(f"{peer_id!r} is not a base58 libp2p peer id") from None
    if not _is_peer_id_multihash(raw):
        raise IdentityError(
            f"{peer_id!r} is not a libp2p peer id (expected a sha2-256 or identity multihash)"
        )
    return raw


def peer_id_from_bytes(raw: bytes) -> str:
    if not _is_peer_id_multihash(raw):
        raise IdentityError("bytes are not a libp2p peer id multihash")
    return base58.b58encode(raw).decode()


def _is_peer_id_multihash(raw: bytes) -> bool:
    if len(raw) == 34 and raw[:2] == b"\x12\x20":
        return True
    return len(raw) >= 2 and raw[0] == 0 and raw[1] == len(raw) - 2 and raw[1] <= _MAX_INLINE_KEY_LENGTH


# ---------------------------------------------------------------------------------------------------
# key files


def generate_identity_bytes() -> bytes:
    """A fresh RSA-2048 identity, marshalled exactly as hivemind's ``P2P.generate_identity`` does."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return encode_key_pb(KEY_TYPE_RSA, der)


def parse_identity(raw: bytes, path: Path) -> Identity:
    """Parse key-file bytes; every problem is an IdentityError naming the file and the fix."""
    fix = f"move {path} away to create a new identity (the peer id changes), or restore the original"
    if len(raw) > _MAX_KEY_FILE:
        raise IdentityError(f"identity file {path} is {len(raw)} bytes, too big for a key; {fix}")
    try:
        key_type, data = decode_key_pb(raw)
        peer_id = peer_id_from_bytes(peer_id_bytes_from_public_key_pb(public_key_pb(key_type, data)))
    except (ValueError, TypeError) as e:
        raise IdentityError(f"identity file {path} is not a libp2p private key ({e}); {fix}") from None
    return Identity(path=path, key_type=key_type, key_data=data, peer_id=peer_id)


def load_identity(path: Path) -> Identity:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"identity file {path} not found (it is created by `peer join`)") from None
    except OSError as e:
        raise IdentityError(f"identity file {path} is not readable: {e}") from None
    return parse_identity(raw, path)


def create_identity(path: Path) -> Identity:
    """Write a new key to ``path`` (mode 0600) unless one appears there first; return what is there.

    The key is written to a temp file and hard-linked into place, so two processes starting at once end up
    with the same identity and nobody ever reads a half-written key.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = generate_identity_bytes()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # someone else created it first: theirs wins
    finally:
        tmp.unlink(missing_ok=True)
    return load_identity(path)


def load_or_create_identity(path: Path) -> str:
    """Load the identity key at ``path`` (creating it if missing); return the peer id (base58).

    Hand the same ``path`` to ``hivemind.DHT(identity_path=...)`` and to the publisher: both then run as
    this peer id.
    """
    path = Path(path)
    if path.exists():
        return load_identity(path).peer_id
    return create_identity(path).peer_id


def identity_path(home: Path) -> Path:
    """Where a peer keeps its identity key inside its home folder."""
    return Path(home) / IDENTITY_FILE


def libp2p_keypair(path: Path):
    """The identity as a py-libp2p ``KeyPair`` (imports py-libp2p: publisher/validator processes only)."""
    from libp2p.crypto.ed25519 import Ed25519PrivateKey
    from libp2p.crypto.keys import KeyPair
    from libp2p.crypto.rsa import RSAPrivateKey

    ident = load_identity(path)
    if ident.key_type == KEY_TYPE_RSA:
        private = RSAPrivateKey.from_bytes(ident.key_data)
    else:
        # py-libp2p marshals Ed25519 as the 32-byte seed only; the file holds go-libp2p's 64 bytes
        private = Ed25519PrivateKey.from_bytes(ident.key_data[:32])
    return KeyPair(private, private.get_public_key())
