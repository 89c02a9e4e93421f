"""A peer's place on the chain: registration (hotkey → uid) and its publisher commitment.

* :func:`ensure_registered` gives the hotkey a uid if it has none. On a real chain that burns TAO from
  the coldkey, so it happens only with ``--register.burn``; without it a clear error says what to do.
  The coldkey is loaded (and, if encrypted, unlocked) only then: a registered hotkey needs no coldkey.
* :func:`ensure_commitment` commits the publisher's address + libp2p peer id (the multiaddr as text, see
  :class:`peer.net.records.Commitment`) unless the chain already holds exactly that, so restarts do not
  trip the commitment rate limit.
* :class:`RegisteredHotkeys` is the set of hotkeys whose θ votes a peer counts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from substrateinterface import Keypair

from peer.chain.base import Chain, RateLimited, Registration
from peer.errors import ConfigError
from peer.net.records import Commitment, RecordError

log = logging.getLogger("gradswarm.membership")


def ensure_registered(
    chain: Chain,
    netuid: int,
    hotkey: Keypair,
    coldkey: Keypair | Callable[[], Keypair | None] | None,
    *,
    burn: bool,
) -> Registration:
    """Register ``hotkey`` on ``netuid`` if it has no uid. ``coldkey`` may be a loader (called only when
    a registration is actually sent: an encrypted coldkey is not unlocked for a registered hotkey)."""
    if callable(coldkey) and chain.uid_of(netuid, hotkey.ss58_address) is None:
        coldkey = coldkey()
    elif callable(coldkey):
        coldkey = None  # already registered: register() only reads the registration back
    reg = chain.register(netuid, hotkey, coldkey, burn=burn)
    if reg.new:
        log.info("registered hotkey %s on subnet %d as uid %d", hotkey.ss58_address, netuid, reg.uid)
    return reg


def commit_address(addrs: list[str], announce: str | None, *, local: bool) -> str:
    """The publisher address to commit: ``announce`` if given, else a dialable listen address."""
    if announce:
        return announce
    for addr in addrs:
        if "/0.0.0.0/" not in addr and "/::/" not in addr:
            return addr
    if local:  # a local subnet: every participant is on this machine
        return addrs[0].replace("/0.0.0.0/", "/127.0.0.1/")
    raise ConfigError(
        f"the publisher listens on {addrs[0]}, which validators cannot dial: pass "
        "--publisher.announce /ip4/<your public ip>/tcp/<forwarded port>"
    )


def ensure_commitment(chain: Chain, netuid: int, hotkey: Keypair, commitment: Commitment) -> bool:
    """Commit ``commitment`` unless the chain already holds it. Returns True if a new commitment was set.

    A commitment of an older release (the binary form) naming the same address is rewritten in the text
    form; if the rate limit does not allow that yet, the binary one stays (validators read both).
    """
    data = commitment.to_bytes()
    current = chain.commitments(netuid).get(hotkey.ss58_address)
    if current == data:
        return False
    try:
        chain.set_commitment(netuid, hotkey, data)
    except RateLimited as e:
        if current is not None and _parses_to(current, commitment):
            log.info("the chain holds this address in the older binary form; rewriting it later (%s)", e)
            return False
        raise ConfigError(
            f"cannot update the on-chain address yet ({e}); validators will not reach this peer until then — "
            "restart with the same --publisher.listen port to keep the committed address valid"
        ) from None
    log.info("committed publisher address %s", commitment.multiaddr)
    return True


def _parses_to(raw: bytes, commitment: Commitment) -> bool:
    try:
        return Commitment.from_bytes(raw) == commitment
    except RecordError:
        return False


class RegisteredHotkeys:
    """The subnet's registered hotkeys, read from the metagraph at most every ``ttl_s`` seconds: whose
    state announcements a peer counts (``SwarmAveraging.votes``). Unregistered hotkeys cost
    nothing to make, so without this filter four fresh keys outvoted three honest peers and chose the
    swarm's θ (red team). A failed read keeps the last set and is retried after ``retry_s``; before the
    first good read there is no filter (None: every signed vote counts, as without a chain)."""

    def __init__(self, chain: Chain, netuid: int, ttl_s: float, retry_s: float = 10.0):
        self.chain, self.netuid, self.ttl_s, self.retry_s = chain, netuid, ttl_s, retry_s
        self._hotkeys: frozenset[str] | None = None
        self._read_at = -float("inf")
        self.incentive: dict[str, float] = {}
        """hotkey → incentive at the last read: what validators paid it (breaks ties of θ votes)."""

    def __call__(self) -> frozenset[str] | None:
        if time.monotonic() - self._read_at >= self.ttl_s:
            try:
                neurons = self.chain.metagraph(self.netuid).neurons
                self._hotkeys = frozenset(n.hotkey for n in neurons)
                self.incentive = {n.hotkey: float(n.incentive) for n in neurons}
                self._read_at = time.monotonic()
            except Exception as e:  # noqa: BLE001 - any transport error: keep the last set, retry later
                self._read_at = time.monotonic() - self.ttl_s + self.retry_s
                log.warning("could not read the metagraph (%r); counting the last registered set", e)
        return self._hotkeys
