"""The wire protocol ``/gradswarm/artifact/1.0.0`` between a peer's publisher and anyone fetching from it.

One request per libp2p stream (noise + yamux, raw stream — never py-libp2p's request/response helper,
which breaks around 8 MiB). Every message is a *frame*: a 4-byte big-endian length, then that many bytes.

Client -> publisher: one request frame (msgpack map, at most :data:`MAX_REQUEST_BYTES`):

* ``{"op": "list", "round": r}`` — what the peer has for round ``r`` (``round: None``: only which rounds
  it has). Answer: one msgpack frame :class:`ListResponse` carrying the raw signed manifest JSON (the
  client verifies it; the publisher never vouches for anything) and the peer's signed identity record.
* ``{"op": "fetch", "sha256": hex, "round": r, "kind": "contribution"|"state"}`` — a blob by content
  hash, only if a manifest in the outbox names it (``round``/``kind`` say which manifest to look at first).
  Answer: a :class:`FetchHeader` frame with the size, then the bytes in frames of at most the chunk size,
  then an empty frame (end). The client hashes as it goes and keeps nothing unless the hash matches.
* ``{"op": "stats"}`` — the publisher's counters (served/refused, by reason).
* ``{"op": "explain", "round": r}`` — a validator's signed explanation of round ``r`` (``None``: the
  newest) as :class:`ExplainResponse`; a publisher without explanations answers ``explanation: None``.
  Publishers older than this op refuse it as ``bad_request``.
* ``{"op": "dialback", "addrs": [multiaddr, ...]}`` — "dial me back": the publisher dials ``addrs`` (1–4
  addresses of one peer id, ``/ip4|ip6/<ip>/tcp/<port>/p2p/<id>``) from its own machine with a fresh
  libp2p host and answers :class:`DialbackResponse` (answered or why not, and the IP it saw the request
  come from). It dials only the IP the request came from (:func:`dialback_problem`), so it cannot be
  used to probe or flood anyone else; ``peer doctor`` asks validators and peers to dial its publisher
  and DHT addresses, the only way to learn that the route from outside (NAT, firewall) works.

Any refusal is an :class:`ErrorResponse` frame ``{"ok": False, "reason": code, "error": one line}``.
Nothing is pickled: msgpack with no extension types, JSON inside, safetensors bytes as payload.

Decoding is bounded and total: a frame length is checked against the reader's limit before anything is
read (a 2^32 − 1 prefix is refused at once), msgpack is unpacked with per-type length limits
(:data:`MSGPACK_LIMITS`; so 1 MiB of nested empty arrays cannot become 50 MB of Python objects) and no
extension types, and every field of every message has a type and a range; any violation is a
:class:`ProtocolError` with a reason code.

This module imports py-libp2p only inside the stream helpers, so the publisher's parent (the trainer,
a hivemind process) can import :mod:`peer.net.publisher` safely.
"""

from __future__ import annotations

import struct
from typing import Annotated, Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from peer.errors import NetworkError

PROTOCOL_ID = "/gradswarm/artifact/1.0.0"
FRAME_HEADER = struct.Struct(">I")
MAX_REQUEST_BYTES = 4096
"""Largest request frame a publisher accepts (requests are tiny maps)."""
MAX_LISTING_BYTES = 1 << 20
"""Largest listing/header/error frame either side accepts (two manifests + identity are a few KB)."""
DEFAULT_CHUNK_BYTES = 1 << 20
"""Blob chunk size; also the largest data frame a client accepts unless told otherwise."""

MAX_RECORD_CHARS = 256 << 10
"""Longest signed record (manifest / identity JSON) carried in a listing."""
MSGPACK_LIMITS = dict(
    max_str_len=MAX_LISTING_BYTES, max_bin_len=0, max_array_len=2048, max_map_len=256, max_ext_len=0
)
"""Per-container limits for unpacking any message: listings carry two lists of <= 1024 rounds and maps of
<= 256 counters; nothing carries binary or extension values."""

Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Round = Annotated[int, Field(ge=0, le=2**40)]


class ProtocolError(NetworkError):
    """The other side broke the protocol: truncated or oversized frame, malformed message, refusal.

    ``reason`` is a short machine code (``truncated_frame``, ``oversized_frame``, ``bad_message``, ...)
    used to count rejections; the message says what happened in words.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ListRequest(_Msg):
    op: Literal["list"]
    round: int | None = Field(default=None, ge=0, le=2**40)


class FetchRequest(_Msg):
    op: Literal["fetch"]
    sha256: Hex64
    round: int | None = Field(default=None, ge=0, le=2**40)
    """Where the client saw the manifest naming the blob (looked at first; the hash decides)."""
    kind: Literal["contribution", "state"] | None = None


class StatsRequest(_Msg):
    op: Literal["stats"]


class ExplainRequest(_Msg):
    """A validator's signed explanation of a round (``round: None``: its newest)."""

    op: Literal["explain"]
    round: int | None = Field(default=None, ge=0, le=2**40)


class DialbackRequest(_Msg):
    """Dial ``addrs`` (one peer id, at the requester's own IP) and say whether it answered."""

    op: Literal["dialback"]
    addrs: list[Annotated[str, Field(max_length=300)]] = Field(min_length=1, max_length=4)


Request = Annotated[
    ListRequest | FetchRequest | StatsRequest | ExplainRequest | DialbackRequest, Field(discriminator="op")
]
_REQUEST = TypeAdapter(Request)


class ListResponse(_Msg):
    ok: Literal[True] = True
    peer_id: str = Field(max_length=128)
    identity: str | None = Field(default=None, max_length=MAX_RECORD_CHARS)
    """The peer's signed PeerIdentityRecord (JSON), if it wrote one."""
    rounds: list[Round] = Field(default_factory=list, max_length=1024)
    """Rounds with a contribution manifest."""
    state_rounds: list[Round] = Field(default_factory=list, max_length=1024)
    """Rounds with a state manifest."""
    contribution: str | None = Field(default=None, max_length=MAX_RECORD_CHARS)
    """Raw ContributionManifest JSON for the asked round."""
    state: str | None = Field(default=None, max_length=MAX_RECORD_CHARS)
    """Raw StateManifest JSON for the asked round."""


class ExplainResponse(_Msg):
    ok: Literal[True] = True
    peer_id: str
    identity: str | None = None
    """The validator's signed PeerIdentityRecord (JSON), if it wrote one."""
    rounds: list[int] = Field(default_factory=list, max_length=1024)
    """Rounds it has explanations for."""
    explanation: str | None = None
    """Raw ExplanationRecord JSON (peer.net.explanations) for the asked round (or the newest)."""


class DialbackResponse(_Msg):
    ok: Literal[True] = True
    peer_id: str = Field(max_length=128)
    """The dialler's peer id."""
    observed_ip: str = Field(max_length=64)
    """The IP the request came from, as the dialler saw it (your public IP, behind a NAT)."""
    reachable: bool
    detail: str = Field(max_length=1024)
    """``answered`` or why the dial failed (timeout, refused, another peer id answers, ...)."""
    seconds: float = Field(ge=0, le=3600)


def dialback_problem(addrs: list[str], observed_ip: str | None) -> str | None:
    """Why a publisher refuses to dial ``addrs`` back for a request from ``observed_ip`` (None: it
    dials). Each must be ``/ip4|ip6/<ip>/tcp/<port>/p2p/<id>`` with one peer id for all and the IP the
    request came from: a dial-back can only reach the requester's own machine. Pure."""
    import ipaddress

    import multiaddr

    if not observed_ip:
        return "cannot tell the IP this request came from"
    ids = set()
    for a in addrs:
        try:
            m = multiaddr.Multiaddr(a)
            protos = [p.name for p in m.protocols()]
            if protos[:2] not in (["ip4", "tcp"], ["ip6", "tcp"]) or protos[2:] != ["p2p"]:
                return f"{a!r} is not /ip4|ip6/<ip>/tcp/<port>/p2p/<peer id>"
            ip = m.value_for_protocol(protos[0])
            ids.add(m.value_for_protocol("p2p"))
            if ipaddress.ip_address(ip) != ipaddress.ip_address(observed_ip):
                return (
                    f"{a} is not at {observed_ip}, the IP your request came from (only that one is dialled)"
                )
        except (ValueError, TypeError, multiaddr.exceptions.Error) as e:
            return f"{a[:80]!r} is not a multiaddr ({str(e)[:100]})"
    if len(ids) != 1:
        return "the addresses name more than one peer id"
    return None


class FetchHeader(_Msg):
    ok: Literal[True] = True
    size: int = Field(ge=0, le=1 << 50)
    chunk_bytes: int = Field(ge=1, le=1 << 30)


class StatsResponse(_Msg):
    ok: Literal[True] = True
    peer_id: str = Field(max_length=128)
    counters: dict[Annotated[str, Field(max_length=128)], Annotated[int, Field(ge=0, le=1 << 62)]] = Field(
        max_length=256
    )


class ErrorResponse(_Msg):
    ok: Literal[False] = False
    reason: str = Field(max_length=64)
    error: str = Field(max_length=1024)


def encode_frame(payload: bytes) -> bytes:
    return FRAME_HEADER.pack(len(payload)) + payload


def pack(obj: BaseModel) -> bytes:
    """A message as one frame."""
    return encode_frame(msgpack.packb(obj.model_dump(mode="json"), use_bin_type=True))


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def unpack_map(raw: bytes, *, what: str) -> dict:
    """msgpack bytes -> dict, refusing extension types, oversized containers and non-map messages."""
    if len(raw) > MAX_LISTING_BYTES:
        raise ProtocolError("oversized_frame", f"{what}: {len(raw)} bytes > limit {MAX_LISTING_BYTES}")
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_no_ext, **MSGPACK_LIMITS)
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        raise ProtocolError("bad_message", f"{what}: not a msgpack message ({str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_message", f"{what}: expected a map, got {type(obj).__name__}")
    return obj


def parse_request(raw: bytes) -> ListRequest | FetchRequest | StatsRequest | ExplainRequest | DialbackRequest:
    obj = unpack_map(raw, what="request")
    try:
        return _REQUEST.validate_python(obj)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "request"
        raise ProtocolError("bad_request", f"request: invalid field {where}: {first['msg']}") from None


def parse_response(raw: bytes, model: type[_Msg], *, what: str) -> _Msg:
    """Parse an answer frame as ``model``; an ErrorResponse becomes a ProtocolError with its reason."""
    obj = unpack_map(raw, what=what)
    if obj.get("ok") is False:
        try:
            err = ErrorResponse.model_validate(obj)
        except ValidationError:
            raise ProtocolError("bad_message", f"{what}: malformed error answer") from None
        raise ProtocolError(f"refused_{err.reason}", f"{what}: publisher refused: {err.error}")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or what
        raise ProtocolError("bad_message", f"{what}: invalid field {where}: {first['msg']}") from None


# ---------------------------------------------------------------------------------------------------
# stream helpers (py-libp2p INetStream; imported lazily)


async def read_exactly(stream, n: int, *, what: str) -> bytes:
    """Read exactly ``n`` bytes; a stream that ends or resets first is a ``truncated_frame``."""
    from libp2p.network.stream.exceptions import StreamError

    parts: list[bytes] = []
    got = 0
    while got < n:
        try:
            chunk = await stream.read(n - got)
        except StreamError:
            chunk = b""
        if not chunk:
            raise ProtocolError("truncated_frame", f"{what}: stream ended after {got} of {n} bytes")
        parts.append(chunk)
        got += len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


async def read_frame(stream, max_bytes: int, *, what: str) -> bytes:
    """One frame; a length over ``max_bytes`` is refused before anything is read (``oversized_frame``)."""
    (length,) = FRAME_HEADER.unpack(await read_exactly(stream, FRAME_HEADER.size, what=f"{what} header"))
    check_frame_length(length, max_bytes, what=what)
    if length == 0:
        return b""
    return await read_exactly(stream, length, what=what)


def check_frame_length(length: int, max_bytes: int, *, what: str) -> None:
    """A frame's declared length against the reader's limit (``oversized_frame``), before any read."""
    if length > max_bytes:
        raise ProtocolError("oversized_frame", f"{what}: frame of {length} bytes > limit {max_bytes}")


def split_frame(buf: bytes, max_bytes: int, *, what: str) -> tuple[bytes, bytes]:
    """``(payload, rest)`` of the first frame in ``buf`` — the same checks as :func:`read_frame`, on bytes
    in memory (tests, and anyone holding a whole message)."""
    if len(buf) < FRAME_HEADER.size:
        raise ProtocolError("truncated_frame", f"{what} header: {len(buf)} of {FRAME_HEADER.size} bytes")
    (length,) = FRAME_HEADER.unpack_from(buf)
    check_frame_length(length, max_bytes, what=what)
    end = FRAME_HEADER.size + length
    if len(buf) < end:
        raise ProtocolError("truncated_frame", f"{what}: {len(buf) - FRAME_HEADER.size} of {length} bytes")
    return buf[FRAME_HEADER.size : end], buf[end:]
