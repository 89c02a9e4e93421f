"""Who may hold an inbound connection to a py-libp2p host: a cap per remote address, short handshakes.

py-libp2p 0.8 admits at most ``max_connections − min_connections`` inbound connections (250 by default)
and takes a slot the moment TCP connects, before the noise handshake, with no limit per remote address.
Red team (2026-12-06): 260 plain TCP sockets that never sent a byte took a publisher offline — an honest
validator's listing failed with ``dial_failed`` in 0.7 s — and reconnecting every ~30 s kept it offline.
Anyone could do that to chosen peers, without a key or stake, and their validators' scores (and the
explanation publishers of validators) drained to 0.

:func:`limit_inbound_per_address` makes a host refuse an inbound connection, before it takes a slot,
while :data:`MAX_INBOUND_PER_ADDRESS` connections from the same address are alive (an IPv4 address, or an
IPv6 /64: one subscriber's prefix). :func:`connection_config` gives the host more slots
(:data:`MAX_CONNECTIONS`) and a shorter handshake timeout (:data:`INBOUND_UPGRADE_TIMEOUT_S`), so an
idle socket is dropped sooner. Holding a publisher's slots now takes ~60 addresses instead of one.
``127.0.0.1`` and ``::1`` are exempt (a local subnet runs every peer and validator there); other loopback
addresses are not, which is how the test attacks from ``127.0.0.2``.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections import Counter
from dataclasses import dataclass, field

MAX_INBOUND_PER_ADDRESS = 16
"""Live inbound connections one remote address (IPv4, or IPv6 /64) may hold. Honest dialers hold a few
(py-libp2p keeps ≤ 3 per peer id; a validator, a peer checking reachability); raise it if several
validators share one public address (NAT) and are refused."""
MAX_CONNECTIONS = 1050
"""py-libp2p's ``max_connections`` (inbound slots = this − ``min_connections`` 50 = 1000)."""
INBOUND_UPGRADE_TIMEOUT_S = 5.0
"""Seconds an inbound connection may take to finish the noise + yamux handshake (py-libp2p: 10)."""
EXEMPT = frozenset({"127.0.0.1", "::1"})


def connection_config():
    """py-libp2p's ``ConnectionConfig`` with this module's limits."""
    from libp2p.network.config import ConnectionConfig

    return ConnectionConfig(
        max_connections=MAX_CONNECTIONS, inbound_upgrade_timeout=INBOUND_UPGRADE_TIMEOUT_S
    )


def address_key(host: str) -> str | None:
    """The unit the cap counts: an IPv4 address, or the /64 of an IPv6 one (None: not an IP). Pure."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


@dataclass
class InboundLimit:
    """The live inbound connections of one host per remote address, and how many were turned away."""

    per_address: int
    live: Counter = field(default_factory=Counter)
    refused: int = 0


def limit_inbound_per_address(host, per_address: int = MAX_INBOUND_PER_ADDRESS) -> InboundLimit:
    """Refuse inbound connections to ``host`` from an address that already holds ``per_address`` live ones,
    before py-libp2p's global slot is taken (install before the host listens, or at any time: py-libp2p
    looks the handler up on each new connection)."""
    swarm = host.get_network()
    handle = swarm._handle_inbound_connection
    limit = InboundLimit(per_address=per_address)

    async def admit(read_write_closer, maddr) -> None:
        remote = None
        with contextlib.suppress(Exception):  # a socket already gone has no address: py-libp2p decides
            remote = read_write_closer.get_remote_address()
        key = address_key(str(remote[0])) if remote else None
        if key is None or remote[0] in EXEMPT:
            await handle(read_write_closer, maddr)
            return
        if limit.live[key] >= limit.per_address:
            limit.refused += 1
            with contextlib.suppress(Exception):
                await read_write_closer.close()
            return
        limit.live[key] += 1
        try:
            await handle(read_write_closer, maddr)
        finally:
            limit.live[key] -= 1
            if limit.live[key] <= 0:
                del limit.live[key]

    swarm._handle_inbound_connection = admit
    return limit
