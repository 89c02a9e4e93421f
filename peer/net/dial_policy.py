"""Which addresses a validator or a joining peer dials because a hotkey (or a remote) chose them.

A commitment is a multiaddr that any registered hotkey chooses. Before this module a validator dialled
whatever it named: ``127.0.0.1:22``, the validator's own LAN (``10.0.0.5:5432``), a cloud metadata
address (``169.254.169.254:80``) or a DNS name it then resolved. That made every validator on a public
subnet a port scanner of its own network for anyone who can register a hotkey (a server-side request
forgery). Public explanations say only ``dial_failed`` or ``timeout`` (:mod:`validator.fetching`), but
even that difference tells the attacker whether something answers at an address it cannot reach
itself, and a TCP service that accepts the connection sees the validator's bytes.

:func:`dial_refusal` is the rule (pure, table-tested in ``tests/test_dial_policy.py``): an address must
be ``/ip4/<ip>/tcp/<port>`` or ``/ip6/<ip>/tcp/<port>`` (no DNS name: the chain is public, the
resolution would be the validator's own, and commitments are written as IPs anyway) with a port in
1..65535, and, unless private addresses are allowed, a *global unicast* IP: not loopback, private
(RFC 1918, unique-local fc00::/7, site-local fec0::/10), link-local, carrier-grade NAT (100.64/10),
multicast, reserved, documentation or unspecified — also when an IPv6 address only wraps such an IPv4
one (IPv4-mapped or -compatible, SIIT, 6to4, Teredo, NAT64 ``64:ff9b::/96`` and ``64:ff9b:1::/48``: on
hosts with such a gateway they reach the IPv4 address). A refused address is never dialled; the uid is
refused with the reason (``commitment names a non-public address …``) and scores 0 like any
unreachable publisher.

It is applied where the address is read (the validator's metagraph step, discovery, ``peer doctor`` and
``peer status``) and again on the host itself (:func:`guard_dials`, installed by
:func:`peer.net.publisher.make_host`): py-libp2p stores the addresses a remote *advertises* in its
identify message and redials them later (its auto-connector, and ``new_stream`` after a dropped
connection), so a peer that passed the check with a public address could still make the host dial
``127.0.0.1`` a minute later (review finding, reproduced). The guard refuses every dial the rule refuses,
and the auto-connector is off (our hosts dial only what they were asked to).

Private addresses are allowed only on the embedded LocalLedger (``auto``; every peer of ``make demo``
runs on ``127.0.0.1``) or with ``--dial-private yes`` (Chopsticks, a lab chain whose peers share a
private network, the bandwidth lab). A subtensor endpoint on ``127.0.0.1`` is *not* a local chain: a
validator usually runs its own finney node there. ``peer join --initial-peers`` skips discovery (and
this rule) altogether, and ``peer fetch --from`` dials what its user typed.
"""

from __future__ import annotations

import ipaddress

DIAL_PRIVATE_CHOICES: tuple[str, ...] = ("auto", "yes", "no")
"""Values of ``--dial-private`` (``ChainConfig.dial_private``, validated there)."""


def dial_refusal(maddr: str, *, allow_private: bool) -> str | None:
    """Why ``maddr`` (a transport multiaddr, with or without ``/p2p/<id>``) must not be dialled, or None.

    Pure: parses the text, never resolves or connects."""
    import multiaddr

    try:
        protocols = [(p.name, v) for p, v in multiaddr.Multiaddr(maddr).items()]
    except (ValueError, TypeError, multiaddr.exceptions.Error) as e:
        return f"not a multiaddr ({e})"[:200]
    if protocols and protocols[-1][0] == "p2p":
        protocols = protocols[:-1]
    names = [name for name, _ in protocols]
    if names[:1] not in (["ip4"], ["ip6"]):
        first = names[0] if names else "nothing"
        return f"names /{first}, not an IP address: commit /ip4/<ip>/tcp/<port> or /ip6/<ip>/tcp/<port>"
    if names != [names[0], "tcp"]:
        return f"is not <ip>/tcp/<port> (it is /{'/'.join(names)}): the publisher listens on TCP only"
    try:
        ip = ipaddress.ip_address(protocols[0][1])
        port = int(protocols[1][1])
    except ValueError as e:
        return f"has an unreadable IP or port ({e})"[:200]
    if not 1 <= port <= 65535:
        return f"names port {port} (expected 1..65535)"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _SITE_LOCAL and not allow_private:
            return f"names a non-public address ({ip}: site-local)"
        ip = _embedded_ipv4(ip) or ip
    if allow_private:
        return None if not (ip.is_unspecified or ip.is_multicast) else f"names {ip}, which cannot be dialled"
    if not ip.is_global or ip.is_multicast:
        return (
            f"names a non-public address ({ip}: {_kind(ip)}); validators and joining peers of a public "
            "subnet dial global addresses only (announce the publisher's public IP)"
        )
    return None


def _kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """A word for why ``ip`` is not global (for the refusal's text)."""
    for attr, word in (
        ("is_loopback", "loopback"),
        ("is_unspecified", "unspecified"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_private", "private or reserved range"),
        ("is_reserved", "reserved"),
    ):
        if getattr(ip, attr):
            return word
    return "not globally routable"


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for, where a gateway or tunnel may route it there."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    value = int(ip)
    # ::a.b.c.d (IPv4-compatible, deprecated), ::ffff:0:a.b.c.d (SIIT), NAT64 prefixes
    if value >> 32 in (0, 0xFFFF0000) and value > 1 or any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    return None


_SITE_LOCAL = ipaddress.ip_network("fec0::/10")
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def private_allowed_for(chain_cfg) -> bool:
    """Whether committed private addresses may be dialled on the chain ``chain_cfg`` names
    (:class:`peer.chain.config.ChainConfig`, its ``dial_private``): ``yes``/``no`` as given, ``auto`` =
    the chain is the embedded LocalLedger. Pure."""
    if chain_cfg.dial_private != "auto":
        return chain_cfg.dial_private == "yes"
    return chain_cfg.is_local


def guard_dials(host, *, allow_private: bool) -> None:
    """Make the py-libp2p ``host`` refuse to dial any address :func:`dial_refusal` refuses, and never dial
    on its own (py-libp2p 0.8's auto-connector redials peers from the peerstore, where identify puts the
    addresses a remote advertises). Every outbound dial of py-libp2p 0.8.1 (``dial_addr``, ``dial_peer``,
    ``connect``, ``new_stream``'s redial, the auto-connector) goes through ``Swarm._dial_with_retry``:
    libp2p is pinned (pyproject.toml), and ``tests/test_dial_policy.py`` fails if that changes."""
    from libp2p.network.exceptions import SwarmException

    network = host.get_network()
    inner = network._dial_with_retry

    async def guarded(addr, peer_id, *args, **kwargs):
        why = dial_refusal(str(addr), allow_private=allow_private)
        if why is not None:
            raise SwarmException(f"refused to dial {addr}: it {why}")
        return await inner(addr, peer_id, *args, **kwargs)

    network._dial_with_retry = guarded

    async def no_candidates() -> list:
        return []

    network.auto_connector._get_candidate_peers = no_candidates
