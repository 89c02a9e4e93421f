"""Getting weights onto the chain, once per interval, surviving refusals, outages and restarts.

Each round the loop hands :class:`WeightSetter` a weight vector for that round (the *interval*). The
setter puts it in a queue persisted as JSON in the validator's state dir (temp file + rename) and then
tries to send it:

* commit-reveal off: ``set_weights``;
* commit-reveal on: ``commit_weights`` with a fresh salt — the salt is written to disk *before* the
  commit is sent, so a restarted validator can still reveal — and, once the reveal window opens,
  ``reveal_weights``.

A refusal or an outage (rate limit, unreachable endpoint, locked ledger, ...) leaves the entry queued
with exponential backoff; it is retried on every later :meth:`WeightSetter.process` until it lands. A
newer interval supersedes an older one that was not sent yet (newer scores are better scores), but a
commit already on chain is always revealed. Intervals that landed are remembered, so a restarted
validator never sets weights twice for one interval; after a crash between sending and recording, the
chain itself is asked (our stored weights, our pending commits) before sending again.

The version key comes from the package version (``major*1000 + minor*10 + patch``, Bittensor's
``spec_version`` convention): a subnet owner can refuse outdated validators by raising
``weights_version_key``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from peer.chain import ChainError, RevealTooEarly, RevealTooLate, commit_hash, make_salt
from peer.chain.base import Chain
from peer.chain.commit_reveal import max_upscale
from peer.errors import ConfigError
from peer.net.outbox import atomic_write_json

log = logging.getLogger("gradswarm.validator.weights")

QUEUE_FORMAT = 1


def package_version() -> str:
    """The installed ``gradswarm`` version (pyproject's when running from a source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradswarm")
    except PackageNotFoundError:
        import tomllib

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]


def version_key(ver: str | None = None) -> int:
    """``major*1000 + minor*10 + patch`` of a version string like ``0.1.0`` (suffixes ignored)."""
    ver = ver or package_version()
    nums = []
    for part in ver.split(".")[:3]:
        digits = ""
        for ch in part:  # leading digits only: "3rc1" -> 3
            if not ch.isdigit():
                break
            digits += ch
        nums.append(int(digits or "0"))
    while len(nums) < 3:
        nums.append(0)
    major, minor, patch = nums
    return major * 1000 + minor * 10 + patch


@dataclass(kw_only=True)
class WeightsConfig:
    """How the validator sends weights and retries."""

    retry_base_s: float = 2.0
    """First retry delay after a failure; doubles with every further failure of the same entry."""
    retry_max_s: float = 120.0
    """Longest delay between two retries. Lower it on a local ledger with short rounds."""
    keep_done: int = 64
    """Intervals remembered as done (guards against setting twice after a restart)."""

    def __post_init__(self) -> None:
        if self.retry_base_s <= 0 or self.retry_max_s < self.retry_base_s:
            raise ConfigError("weights retry delays must satisfy 0 < retry_base_s <= retry_max_s")
        if self.keep_done < 1:
            raise ConfigError("weights keep_done must be >= 1")


@dataclass(kw_only=True)
class QueueEntry:
    interval: int
    uids: list[int]
    weights: list[int]
    version_key: int
    state: str = "pending"
    """``pending`` (to send), ``committed`` (waiting for its reveal window)."""
    salt: list[int] | None = None
    commit_hash: str | None = None
    first_reveal_block: int | None = None
    last_reveal_block: int | None = None
    attempts: int = 0
    next_attempt: float = 0.0
    last_error: str | None = None
    created: float = field(default_factory=time.time)


@dataclass(kw_only=True)
class Outcome:
    """What :meth:`WeightSetter.process` did with one entry (for logs and tracking)."""

    interval: int
    action: str
    """``set``, ``committed``, ``revealed``, ``waiting``, ``retry``, ``superseded``, ``expired``, ``already_on_chain``."""
    detail: str = ""
    block: int | None = None


class WeightSetter:
    """The persistent weight queue of one validator hotkey on one subnet."""

    def __init__(
        self,
        chain: Chain,
        netuid: int,
        hotkey,
        state_dir: Path,
        cfg: WeightsConfig | None = None,
        *,
        version: int | None = None,
    ):
        self.chain = chain
        self.netuid = netuid
        self.hotkey = hotkey
        self.cfg = cfg or WeightsConfig()
        self.version = version_key() if version is None else version
        self.path = Path(state_dir) / "weights_queue.json"
        self.entries: list[QueueEntry] = []
        self.done: dict[int, dict] = {}
        self._load()

    # ---- persistence
    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            raw = json.loads(self.path.read_text())
            if raw.get("format") != QUEUE_FORMAT:
                raise ValueError(f"format {raw.get('format')!r}")
            self.entries = [QueueEntry(**e) for e in raw["entries"]]
            self.done = {int(k): v for k, v in raw["done"].items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                f"weight queue {self.path} is unreadable ({e}); move it away to start a new queue"
            ) from None

    def _save(self) -> None:
        keep = sorted(self.done)[-self.cfg.keep_done :]
        self.done = {k: self.done[k] for k in keep}
        atomic_write_json(
            self.path,
            {
                "format": QUEUE_FORMAT,
                "entries": [asdict(e) for e in self.entries],
                "done": {str(k): v for k, v in self.done.items()},
            },
        )

    # ---- API
    def is_done(self, interval: int) -> bool:
        return interval in self.done

    def enqueue(self, interval: int, uids: list[int], weights: list[int]) -> bool:
        """Queue the weights of ``interval``; False if that interval is already done or queued."""
        if interval in self.done or any(e.interval == interval for e in self.entries):
            return False
        if not uids:
            return False
        self.entries.append(
            QueueEntry(
                interval=interval,
                uids=[int(u) for u in uids],
                weights=[int(w) for w in weights],
                version_key=self.version,
            )
        )
        self._save()
        return True

    def pending(self) -> list[QueueEntry]:
        return list(self.entries)

    def process(self, now: float | None = None) -> list[Outcome]:
        """Send what is due; never raises for chain trouble (it is recorded and retried)."""
        now = time.time() if now is None else now
        outcomes: list[Outcome] = []
        newest_pending = max((e.interval for e in self.entries if e.state == "pending"), default=None)
        for e in list(self.entries):
            if e.state == "pending" and newest_pending is not None and e.interval < newest_pending:
                self.entries.remove(e)
                outcomes.append(
                    Outcome(
                        interval=e.interval,
                        action="superseded",
                        detail=f"interval {newest_pending} has newer weights",
                    )
                )
                continue
            if e.next_attempt > now:
                outcomes.append(
                    Outcome(
                        interval=e.interval,
                        action="waiting",
                        detail=f"retry in {e.next_attempt - now:.1f}s ({e.last_error})",
                    )
                )
                continue
            try:
                outcomes.append(self._advance(e))
            except ChainError as err:
                e.attempts += 1
                delay = min(self.cfg.retry_max_s, self.cfg.retry_base_s * 2 ** (e.attempts - 1))
                e.next_attempt = now + delay
                e.last_error = f"{type(err).__name__}: {err}"
                outcomes.append(
                    Outcome(
                        interval=e.interval,
                        action="retry",
                        detail=f"attempt {e.attempts} failed ({e.last_error}); retry in {delay:.0f}s",
                    )
                )
                log.warning("weights for interval %d: %s", e.interval, outcomes[-1].detail)
            self._save()
        return outcomes

    # ---- one step of one entry
    def _finish(self, e: QueueEntry, how: str, block: int | None) -> None:
        self.entries.remove(e)
        self.done[e.interval] = {
            "how": how,
            "block": block,
            "uids": e.uids,
            "weights": e.weights,
            "version_key": e.version_key,
            "attempts": e.attempts + 1,
        }

    def _advance(self, e: QueueEntry) -> Outcome:
        hp = self.chain.hyperparameters(self.netuid)
        if e.state == "pending":
            if hp.commit_reveal_enabled:
                return self._commit(e)
            if self._already_set(e):
                self._finish(e, "already_on_chain", None)
                return Outcome(interval=e.interval, action="already_on_chain")
            tx = self.chain.set_weights(self.netuid, self.hotkey, e.uids, e.weights, e.version_key)
            self._finish(e, "set_weights", tx.block)
            return Outcome(interval=e.interval, action="set", block=tx.block)
        return self._reveal(e)

    def _already_set(self, e: QueueEntry) -> bool:
        uid = self.chain.uid_of(self.netuid, self.hotkey.ss58_address)
        if uid is None:
            return False
        stored = sorted(self.chain.weights(self.netuid).get(uid, []))
        mine = sorted(zip(e.uids, max_upscale(e.weights), strict=True))
        return bool(stored) and [(u, w) for u, w in stored if w] == [(u, w) for u, w in mine if w]

    def _hash(self, e: QueueEntry) -> str:
        return commit_hash(
            self.hotkey.public_key, self.netuid, e.uids, e.weights, e.salt or [], e.version_key
        )

    def _commit(self, e: QueueEntry) -> Outcome:
        if e.salt is None:
            e.salt = make_salt()
            e.commit_hash = self._hash(e)
            self._save()  # the salt is on disk before the commit is on chain
        else:  # a previous attempt may have landed before we could record it
            for c in self.chain.pending_commits(self.netuid, self.hotkey.ss58_address):
                if c.hash == e.commit_hash:
                    self._committed(e, c)
                    return Outcome(
                        interval=e.interval, action="committed", detail="found on chain", block=c.commit_block
                    )
        c = self.chain.commit_weights(self.netuid, self.hotkey, e.uids, e.weights, e.salt, e.version_key)
        self._committed(e, c)
        return Outcome(
            interval=e.interval,
            action="committed",
            detail=f"reveal in blocks [{c.first_reveal_block}, {c.last_reveal_block}]",
            block=c.commit_block,
        )

    def _committed(self, e: QueueEntry, c) -> None:
        e.state, e.first_reveal_block, e.last_reveal_block = (
            "committed",
            c.first_reveal_block,
            c.last_reveal_block,
        )
        e.attempts, e.next_attempt, e.last_error = 0, 0.0, None

    def _reveal(self, e: QueueEntry) -> Outcome:
        head = self.chain.block()
        if e.first_reveal_block is not None and head < e.first_reveal_block:
            e.next_attempt = time.time() + max(
                0.0, (e.first_reveal_block - head) * self.chain.block_time * 0.5
            )
            return Outcome(
                interval=e.interval, action="waiting", detail=f"reveal opens at block {e.first_reveal_block}"
            )
        try:
            tx = self.chain.reveal_weights(
                self.netuid, self.hotkey, e.uids, e.weights, e.salt or [], e.version_key
            )
        except RevealTooEarly as err:
            e.next_attempt = time.time() + self.chain.block_time
            return Outcome(interval=e.interval, action="waiting", detail=str(err))
        except RevealTooLate as err:
            if not any(
                c.hash == e.commit_hash
                for c in self.chain.pending_commits(self.netuid, self.hotkey.ss58_address)
            ):
                self.entries.remove(e)
                return Outcome(interval=e.interval, action="expired", detail=str(err))
            raise
        self._finish(e, "commit_reveal", tx.block)
        return Outcome(interval=e.interval, action="revealed", block=tx.block)


def backoff_delays(cfg: WeightsConfig, attempts: int) -> list[float]:
    """The retry delays after 1..attempts failures (for docs and tests)."""
    return [min(cfg.retry_max_s, cfg.retry_base_s * 2 ** (i - 1)) for i in range(1, attempts + 1)]
