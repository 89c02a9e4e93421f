"""Which addresses a validator or a joining peer dials because a hotkey wrote them on chain.

A commitment is a multiaddr that any registered hotkey chooses. Before this module a validator dialled
whatever it named: ``127.0.0.1:22``, the validator's own LAN (``10.0.0.5:5432``), a cloud metadata
address (``169.254.169.254:80``) or a DNS name it then resolved. That makes every validator on a public
subnet a port scanner of its own network for anyone who can register a hotkey (a server-side request
forgery). Public explanations say only ``dial_failed`` or ``timeout`` (:mod:`validator.fetching`), but
even that difference tells the attacker whether something answers at an address it cannot reach
itself, and a TCP service that accepts the connection sees the validator's bytes.

:func:`dial_refusal` is the rule (pure, table-tested in ``tests/test_dial_policy.py``): a committed
address must be ``/ip4/<ip>/tcp/<port>`` or ``/ip6/<ip>/tcp/<port>`` (no DNS name: the chain is public,
the resolution would be the validator's own, and commitments are written as IPs anyway) with a port in
1..65535, and, unless private addresses are allowed, a *global unicast* IP: not loopback, private
(RFC 1918, unique-local fc00::/7), link-local, carrier-grade NAT (100.64/10), multicast, reserved,
documentation or unspecified. A refused address is never dialled; the uid is refused with the reason
(``commitment names a non-public address …``) and scores 0 like any unreachable publisher.

Private addresses are allowed exactly when the chain itself is local (:func:`private_allowed_for`):
the embedded LocalLedger, or a subtensor endpoint on a loopback or private host (Chopsticks,
``local-subtensor``, a lab chain). Those subnets run every peer on ``127.0.0.1`` or a private network
by design (``make demo``, the bandwidth lab's ``10.77.0.0/16``). On ``finney`` / ``test`` / any public
endpoint they are refused. ``--eval.dial-private yes|no`` on the validator overrides the rule (a public
test chain whose peers all sit on one private network), and ``peer join --initial-peers`` skips
discovery (and this rule) altogether.
"""

from __future__ import annotations

import ipaddress
from typing import Literal
from urllib.parse import urlsplit

DialPrivate = Literal["auto", "yes", "no"]
DIAL_PRIVATE_CHOICES: tuple[str, ...] = ("auto", "yes", "no")


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
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
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


def private_allowed_for(chain_cfg, override: DialPrivate = "auto") -> bool:
    """Whether committed private addresses may be dialled on the chain ``chain_cfg`` names
    (:class:`peer.chain.config.ChainConfig`): ``yes``/``no`` as given, ``auto`` = the chain is local (the
    LocalLedger, or an endpoint whose host is loopback, private, or ``localhost``). Pure."""
    if override not in DIAL_PRIVATE_CHOICES:
        raise ValueError(f"dial-private must be one of {DIAL_PRIVATE_CHOICES}, got {override!r}")
    if override != "auto":
        return override == "yes"
    if chain_cfg.is_local:
        return True
    host = urlsplit(chain_cfg.url or "").hostname or ""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not ip.is_global
