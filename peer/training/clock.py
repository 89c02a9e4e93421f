"""Round clocks: which round it is, when it ends, and the round's seed.

Round ``r`` of a swarm has a seed that every peer and validator derives the same way, so the pages a
hotkey trains on and the pages a validator evaluates on are fixed by ``(hotkey, r, seed)``.

* :class:`WallClock` — rounds of fixed wall-clock length counted from a genesis time; seed =
  blake2b(run_id, r). Good for local swarms without a chain.
* A chain clock (``peer.chain``) — round = block // round_blocks, seed = hash of the round's first block.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@runtime_checkable
class RoundClock(Protocol):
    def current_round(self) -> int:
        """The round in progress now."""
        ...

    def round_end(self, round_: int) -> float:
        """Unix time at which ``round_`` ends (estimated for chains)."""
        ...

    def seed(self, round_: int) -> bytes:
        """The round's seed; blocks until it is known if the round has not started yet."""
        ...


class Clock(Protocol):
    """Time source (real or fake), so tests can drive time."""

    def time(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


@dataclass
class WallClock:
    """Fixed-length rounds since ``genesis`` (unix seconds) for swarm ``run_id``."""

    run_id: str
    round_seconds: float
    genesis: float = 0.0
    clock: Clock = SystemClock()

    def __post_init__(self) -> None:
        if self.round_seconds <= 0:
            raise ValueError("round_seconds must be > 0")

    def current_round(self) -> int:
        return int((self.clock.time() - self.genesis) // self.round_seconds)

    def round_end(self, round_: int) -> float:
        return self.genesis + (round_ + 1) * self.round_seconds

    def round_start(self, round_: int) -> float:
        return self.genesis + round_ * self.round_seconds

    def seed(self, round_: int) -> bytes:
        return hashlib.blake2b(f"{self.run_id}/{round_}".encode(), digest_size=32).digest()
