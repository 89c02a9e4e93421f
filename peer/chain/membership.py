"""A peer's place on the chain: registration (hotkey → uid) and its publisher commitment.

* :func:`ensure_registered` gives the hotkey a uid if it has none. On a real chain that burns TAO from
  the coldkey, so it happens only with ``--register.burn``; without it a clear error says what to do.
* :func:`ensure_commitment` commits the publisher's address + libp2p peer id (compact bytes, see
  :class:`peer.net.records.Commitment`) unless the chain already holds exactly that, so restarts do not
  trip the commitment rate limit.
"""

from __future__ import annotations

import logging

from substrateinterface import Keypair

from peer.chain.base import Chain, RateLimited, Registration
from peer.chain.base import ensure_commitment as chain_ensure_commitment
from peer.errors import ConfigError
from peer.net.records import Commitment

log = logging.getLogger("gradswarm.membership")


def ensure_registered(
    chain: Chain, netuid: int, hotkey: Keypair, coldkey: Keypair | None, *, burn: bool
) -> Registration:
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
    """Commit ``commitment`` unless the chain already holds it. Returns True if a new commitment was set."""
    try:
        sent = chain_ensure_commitment(chain, netuid, hotkey, commitment.to_bytes())
    except RateLimited as e:
        raise ConfigError(
            f"cannot update the on-chain address yet ({e}); validators will not reach this peer until then — "
            "restart with the same --publisher.listen port to keep the committed address valid"
        ) from None
    if sent:
        log.info("committed publisher address %s", commitment.multiaddr)
    return sent
