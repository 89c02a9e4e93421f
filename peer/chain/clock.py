"""ChainClock: rounds counted in blocks. round = block // round_blocks; seed = hash of its first block.

Implements :class:`peer.training.clock.RoundClock` on any :class:`peer.chain.base.Chain`, so every peer and
validator (and anyone replaying) derives the same round number and the same seed from the chain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from peer.chain.base import Chain, ChainError
from peer.errors import ConfigError


@dataclass(kw_only=True)
class ChainClock:
    chain: Chain
    round_blocks: int
    """Blocks per round. Round length in seconds = round_blocks * chain.block_time."""
    poll: float = 0.25
    """Seconds between head polls while waiting for a round to start."""
    max_wait: float = 3600.0
    """Longest :meth:`seed` waits for a future round to start before raising."""

    def __post_init__(self) -> None:
        if self.round_blocks < 1:
            raise ConfigError(f"round_blocks must be >= 1, got {self.round_blocks}")

    def current_round(self) -> int:
        return self.chain.block() // self.round_blocks

    def round_start_block(self, round_: int) -> int:
        return round_ * self.round_blocks

    def round_end(self, round_: int) -> float:
        """Estimated unix time at which ``round_`` ends (head + remaining blocks * block_time)."""
        head = self.chain.block()
        return time.time() + ((round_ + 1) * self.round_blocks - head) * self.chain.block_time

    def seed(self, round_: int) -> bytes:
        """32-byte hash of the round's first block; waits (up to ``max_wait``) for it to exist."""
        return self.block_seed(self.round_start_block(round_), f"round {round_} (block {{n}}) did not start")

    def block_seed(self, n: int, what: str = "block {n} was not produced") -> bytes:
        """32-byte hash of block ``n``; waits (up to ``max_wait``) for it to exist."""
        deadline = time.monotonic() + self.max_wait
        while self.chain.block() < n:
            if time.monotonic() > deadline:
                raise ChainError(what.format(n=n) + f" within {self.max_wait:.0f}s")
            time.sleep(self.poll)
        return bytes.fromhex(self.chain.block_hash(n).removeprefix("0x"))
