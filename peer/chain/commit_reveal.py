"""Commit-reveal for weights: the runtime's exact commit hash and reveal window (pure functions).

The subtensor runtime (spec 218) stores ``blake2b-256(SCALE((AccountId, u16 netuid, Vec<u16> uids,
Vec<u16> values, Vec<u16> salt, u64 version_key)))`` at commit time and recomputes it at reveal time.
SCALE here is plain concatenation: the 32-byte public key, the u16 little-endian, each vector as a
compact length prefix followed by its u16 little-endian items, and the u64 little-endian.

A commit made at block ``b`` can be revealed only in epoch ``epoch(b) + reveal_period_epochs``, where
``epoch(b) = (b + netuid + 1) // (tempo + 1)``. Earlier gives ``RevealTooEarly``, later the commit has
expired. Both :class:`peer.chain.local.LocalLedger` and the real runtime use these functions' rules.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

U16_MAX = 65535


def _compact(n: int) -> bytes:
    """SCALE compact encoding of a non-negative integer (vector length prefix)."""
    if n < 0:
        raise ValueError("compact encoding needs n >= 0")
    if n < 1 << 6:
        return bytes([n << 2])
    if n < 1 << 14:
        return ((n << 2) | 1).to_bytes(2, "little")
    if n < 1 << 30:
        return ((n << 2) | 2).to_bytes(4, "little")
    raise ValueError("vector too long for this encoder (>= 2**30 items)")


def _u16(x: int) -> bytes:
    x = int(x)
    if not 0 <= x <= U16_MAX:
        raise ValueError(f"{x} is not a u16 (0..65535)")
    return x.to_bytes(2, "little")


def _vec_u16(xs: Sequence[int]) -> bytes:
    return _compact(len(xs)) + b"".join(_u16(x) for x in xs)


def commit_payload(
    hotkey_public_key: bytes,
    netuid: int,
    uids: Sequence[int],
    values: Sequence[int],
    salt: Sequence[int],
    version_key: int,
) -> bytes:
    """SCALE bytes of ``(AccountId, u16, Vec<u16>, Vec<u16>, Vec<u16>, u64)``."""
    pub = bytes(hotkey_public_key)
    if len(pub) != 32:
        raise ValueError(f"hotkey public key must be 32 bytes, got {len(pub)}")
    if not 0 <= int(version_key) < 1 << 64:
        raise ValueError(f"version_key {version_key} is not a u64")
    return (
        pub
        + _u16(netuid)
        + _vec_u16(uids)
        + _vec_u16(values)
        + _vec_u16(salt)
        + int(version_key).to_bytes(8, "little")
    )


def commit_hash(
    hotkey_public_key: bytes,
    netuid: int,
    uids: Sequence[int],
    values: Sequence[int],
    salt: Sequence[int],
    version_key: int,
) -> str:
    """The runtime's commit hash as ``0x`` + 64 hex digits."""
    data = commit_payload(hotkey_public_key, netuid, uids, values, salt, version_key)
    return "0x" + hashlib.blake2b(data, digest_size=32).hexdigest()


def make_salt(n: int = 8) -> list[int]:
    """A fresh random salt of ``n`` u16 values (keep it until the reveal)."""
    if n < 1:
        raise ValueError("salt needs at least one value")
    return [secrets.randbelow(U16_MAX + 1) for _ in range(n)]


def epoch_of(block: int, netuid: int, tempo: int) -> int:
    """Epoch index of ``block`` on ``netuid``: ``(block + netuid + 1) // (tempo + 1)``."""
    return (block + netuid + 1) // (tempo + 1)


def epoch_first_block(epoch: int, netuid: int, tempo: int) -> int:
    """First block of ``epoch`` (may be negative for epoch 0 on small blocks)."""
    return epoch * (tempo + 1) - netuid - 1


def reveal_window(commit_block: int, netuid: int, tempo: int, reveal_period_epochs: int) -> tuple[int, int]:
    """``(first_reveal_block, last_reveal_block)`` for a commit landed at ``commit_block``."""
    e = epoch_of(commit_block, netuid, tempo) + reveal_period_epochs
    first = epoch_first_block(e, netuid, tempo)
    return first, first + tempo


def max_upscale(values: Sequence[int]) -> list[int]:
    """Scale u16 weights so the largest becomes 65535 (what the runtime stores), rounding to nearest."""
    vals = [int(v) for v in values]
    top = max(vals, default=0)
    if top == 0:
        return vals
    return [(v * U16_MAX + top // 2) // top for v in vals]
