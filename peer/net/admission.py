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
idle socket is dropped sooner. It also ends py-libp2p's handler of an inbound connection once that
connection closes: py-libp2p 0.8 keeps it (and its slot) until the host shuts down, so every completed
handshake held a slot for good (review finding). Holding a publisher's slots now takes ~60 addresses,
each keeping 16 connections open, instead of one address. ``127.0.0.1`` and ``::1`` are exempt from the
cap (a local subnet runs every peer and validator there); other loopback addresses are not, which is how
the test attacks from ``127.0.0.2``.
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
"""Remote addresses (normalised: an IPv4-mapped IPv6 address as IPv4) that the per-address cap skips."""


def connection_config():
    """py-libp2p's ``ConnectionConfig`` with this module's limits."""
    from libp2p.network.config import ConnectionConfig

    return ConnectionConfig(
        max_connections=MAX_CONNECTIONS, inbound_upgrade_timeout=INBOUND_UPGRADE_TIMEOUT_S
    )


def address_key(host: str) -> str | None:
    """The unit the cap counts: an IPv4 address, or the /64 of an IPv6 one (a link-local IPv6 address
    alone: every host on a link has the same /64). None: not an IP. Pure."""
    ip = _ip(host)
    if ip is None:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and not ip.is_link_local:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass
class InboundLimit:
    """The live inbound connections of one host per remote address, and how many were turned away."""

    per_address: int
    exempt: frozenset = EXEMPT
    live: Counter = field(default_factory=Counter)
    refused: int = 0
    released: int = 0
    """Inbound connections whose py-libp2p handler was ended when the connection closed."""


def limit_inbound_per_address(host, per_address: int = MAX_INBOUND_PER_ADDRESS) -> InboundLimit:
    """Refuse inbound connections to ``host`` from an address that already holds ``per_address`` live ones,
    before py-libp2p's global slot is taken, and give both back when a connection closes.

    py-libp2p 0.8 keeps an upgraded inbound connection's handler (and its global slot) parked until the
    host shuts down, even after the connection closed: every completed handshake held a slot for good,
    so 250 of them over a publisher's life (validator reconnects, or anyone with throwaway keys) left it
    deaf. Here the handler is cancelled once its connection closes (``released``), which frees the slot
    and this address's count. Install it before the host listens (py-libp2p looks both methods up on
    each new connection)."""
    import trio

    swarm = host.get_network()
    handle = swarm._handle_inbound_connection
    upgrade = swarm.upgrade_inbound_raw_conn
    limit = InboundLimit(per_address=per_address)
    upgraded: dict[int, list] = {}  # id(raw socket) → [event, muxed connection]

    async def upgrade_and_note(raw_conn, maddr):
        muxed = await upgrade(raw_conn, maddr)
        slot = upgraded.get(id(getattr(raw_conn, "stream", None)))
        if slot is not None:
            slot[1] = muxed
            slot[0].set()
        return muxed

    async def handle_until_closed(read_write_closer, maddr) -> None:
        slot = upgraded[id(read_write_closer)] = [trio.Event(), None]
        try:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    await slot[0].wait()
                    closed = getattr(slot[1], "event_closed", None)
                    if closed is None:
                        return  # not a connection we can watch: py-libp2p keeps it as before
                    await closed.wait()
                    limit.released += 1
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                await handle(read_write_closer, maddr)
                nursery.cancel_scope.cancel()  # the handshake failed: nothing to watch
        finally:
            upgraded.pop(id(read_write_closer), None)

    async def admit(read_write_closer, maddr) -> None:
        remote = None
        with contextlib.suppress(Exception):  # a socket already gone has no address: py-libp2p decides
            remote = read_write_closer.get_remote_address()
        ip = _ip(str(remote[0])) if remote else None
        key = address_key(str(remote[0])) if remote else None
        if key is None or str(ip) in limit.exempt:
            await handle_until_closed(read_write_closer, maddr)
            return
        if limit.live[key] >= limit.per_address:
            limit.refused += 1
            with contextlib.suppress(Exception):
                await read_write_closer.close()
            return
        limit.live[key] += 1
        try:
            await handle_until_closed(read_write_closer, maddr)
        finally:
            limit.live[key] -= 1
            if limit.live[key] <= 0:
                del limit.live[key]

    swarm.upgrade_inbound_raw_conn = upgrade_and_note
    swarm._handle_inbound_connection = admit
    return limit
