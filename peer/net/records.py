"""Strict, versioned, hotkey-signed records: what peers publish and validators trust.

Every record carries ``spec_version``, the swarm's ``run_id`` and a ``round`` so it cannot be replayed
into another run or round, the publisher's libp2p ``peer_id`` and the ``hotkey`` (ss58) that signs it.
The signature is sr25519 over the canonical JSON of every other field (sorted keys, no spaces).

Records are pydantic models with ``extra="forbid"``: unknown fields, a wrong ``spec_version`` or a bad
signature are rejected with :class:`RecordError` saying why. Parsing is bounded: a raw record over
:data:`MAX_RECORD_BYTES` is refused before JSON is parsed, every string, list and integer has a range, and
floats must be finite.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer
from substrateinterface import Keypair, KeypairType

from peer.errors import UserError

SPEC_VERSION = 1
Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
MAX_RECORD_BYTES = 256 << 10
"""Largest raw record parsed (an honest manifest is ~1-5 KB; its ``pages`` list dominates)."""
MAX_PAGES = 1 << 14
"""Most pages a contribution manifest may list (model configs assign 64-512 a round)."""
MAX_ROUND = 1 << 40
MAX_COUNT = 1 << 62


class RecordError(UserError, ValueError):
    """A record is malformed, of another spec version, for another run/round, or badly signed.

    Also a ``ValueError``: code that refuses bad input with ``except ValueError`` refuses these too."""


class SignedRecord(BaseModel):
    """Base of every published record."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
    kind: ClassVar[str] = "record"

    spec_version: int = Field(default=SPEC_VERSION, ge=0, le=1 << 16)
    run_id: str = Field(min_length=1, max_length=128)
    round: int = Field(ge=0, le=MAX_ROUND)
    hotkey: str = Field(min_length=40, max_length=60)
    peer_id: str = Field(min_length=1, max_length=128)
    signature: str | None = Field(default=None, max_length=256)

    def signing_payload(self) -> bytes:
        body = self.model_dump(mode="json", exclude={"signature"})
        body["kind"] = self.kind
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def signed(self, keypair: Keypair) -> SignedRecord:
        if keypair.ss58_address != self.hotkey:
            raise RecordError(
                f"record names hotkey {self.hotkey} but is being signed by {keypair.ss58_address}"
            )
        return self.model_copy(update={"signature": "0x" + keypair.sign(self.signing_payload()).hex()})

    def verify(self, *, run_id: str | None = None, round_: int | None = None) -> None:
        """Check version, run, round and signature; raise RecordError with the reason otherwise."""
        if self.spec_version != SPEC_VERSION:
            raise RecordError(f"{self.kind}: spec_version {self.spec_version} != {SPEC_VERSION}")
        if run_id is not None and self.run_id != run_id:
            raise RecordError(f"{self.kind}: run_id {self.run_id!r} is not this swarm's ({run_id!r})")
        if round_ is not None and self.round != round_:
            raise RecordError(f"{self.kind}: round {self.round} where {round_} was asked for")
        if not self.signature:
            raise RecordError(f"{self.kind}: unsigned")
        try:
            kp = Keypair(ss58_address=self.hotkey, crypto_type=KeypairType.SR25519)
            ok = kp.verify(self.signing_payload(), bytes.fromhex(self.signature.removeprefix("0x")))
        except ValueError as e:
            raise RecordError(f"{self.kind}: bad hotkey or signature encoding ({e})") from None
        if not ok:
            raise RecordError(f"{self.kind}: signature does not match hotkey {self.hotkey}")

    @classmethod
    def parse(cls, raw: bytes | str | dict) -> SignedRecord:
        """Parse strictly; every problem becomes a RecordError (never a traceback)."""
        if not isinstance(raw, bytes | str | dict):
            raise RecordError(f"{cls.kind}: a record is JSON, not {type(raw).__name__}")
        if not isinstance(raw, dict) and len(raw) > MAX_RECORD_BYTES:
            raise RecordError(f"{cls.kind}: {len(raw)} bytes > limit {MAX_RECORD_BYTES}")
        try:
            if isinstance(raw, dict):
                return cls.model_validate(raw)
            return cls.model_validate_json(raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "record"
            raise RecordError(f"{cls.kind}: invalid field {where}: {first['msg']}") from None


class BlobRef(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    name: str = Field(max_length=64, pattern=r"^[a-z_]+\.safetensors$")
    sha256: Hex64
    size: int = Field(ge=0, le=1 << 50)


class ContributionManifest(SignedRecord):
    """A peer's pseudo-gradient for one round and how it was made."""

    kind: ClassVar[str] = "contribution"
    base_state_hash: Hex64
    data_fingerprint: Hex64
    model_config_name: str = Field(min_length=1, max_length=128)
    pages: list[Annotated[int, Field(ge=0, le=1 << 40)]] = Field(max_length=MAX_PAGES)
    samples: int = Field(ge=0, le=MAX_COUNT)
    tokens: int = Field(ge=0, le=MAX_COUNT)
    inner_steps: int = Field(ge=0, le=MAX_COUNT)
    loss_before: float | None
    loss_after: float | None
    blob: BlobRef
    behaviour: Literal["honest"] | str = Field(default="honest", max_length=64)
    delta_format: Literal[
        "gradswarm-delta-int8-blockwise", "gradswarm-delta-topk-v2", "gradswarm-delta-topk-v1"
    ] = "gradswarm-delta-int8-blockwise"
    """The blob's format (``peer.net.layout.DELTA_FORMAT`` / ``SPARSE_DELTA_FORMAT``); validators refuse a
    blob whose header says otherwise. ``-topk-v1`` (fp16 values, retired) still parses, so such a
    contribution is refused with the reason that names the upgrade rather than as a malformed record."""


class StateManifest(SignedRecord):
    """The averaged model state θ_r a peer holds at the start of round r."""

    kind: ClassVar[str] = "state"
    state_hash: Hex64
    model_config_name: str = Field(min_length=1, max_length=128)
    blob: BlobRef


# ---------------------------------------------------------------------------------------------------
# Identity: hotkey <-> libp2p peer id <-> addresses

Multiaddr = Annotated[str, Field(min_length=4, max_length=256, pattern=r"^/[A-Za-z0-9_./:\-]+$")]
JsonScalar = Annotated[str, Field(max_length=1024)] | int | float | bool | None


class PeerIdentityRecord(SignedRecord):
    """Binds a hotkey to the libp2p peer id and addresses of its publisher, signed by the hotkey.

    Served by the publisher (``identity.json`` in the outbox) with every listing, so a validator that
    dialled the peer id from the on-chain :class:`Commitment` can check that the hotkey it is about to
    reward really runs that peer id. ``round`` is the round it was issued in.
    """

    kind: ClassVar[str] = "identity"
    addrs: list[Multiaddr] = Field(min_length=1, max_length=16)
    protocol: Literal["/gradswarm/artifact/1.0.0"] = "/gradswarm/artifact/1.0.0"
    dht_addrs: list[Multiaddr] = Field(default_factory=list, max_length=16)
    """The peer's hivemind DHT multiaddrs (``…/p2p/<peer id>``), so a newcomer can join by netuid alone
    (:mod:`peer.net.discovery`). Optional: left out of the JSON and of the signed payload when empty,
    so records written before this field existed still parse and verify (and older readers accept
    records without DHT addresses, e.g. validators')."""

    @model_serializer(mode="wrap")
    def _omit_empty_dht_addrs(self, handler):
        data = handler(self)
        if not data.get("dht_addrs"):
            data.pop("dht_addrs", None)
        return data


class DHTAnnouncement(SignedRecord):
    """A value a peer stores in hivemind's DHT under ``key``, signed by its hotkey.

    Store it as ``dht.store(key, value=record.model_dump_json(), subkey=hotkey_subkey(hotkey), ...)``;
    :class:`peer.net.dht_records.HotkeyRecordValidator` makes every DHT node refuse it unless the signature,
    the key and the subkey's hotkey all match.
    """

    kind: ClassVar[str] = "dht"
    key: str = Field(min_length=1, max_length=256)
    value: dict[Annotated[str, Field(max_length=128)], JsonScalar] = Field(
        default_factory=dict, max_length=64
    )
    expires_at: float | None = Field(default=None, ge=0, le=1e11)
    """DHT time at which the record lapses, signed: nodes refuse it stored to expire any later
    (:class:`peer.net.dht_records.HotkeyRecordValidator`). hivemind keeps, per subkey, the value that
    expires last, so without it anyone could re-store a peer's genuine old record with an expiry a year
    away and every later announcement of that peer was refused: its θ votes were pinned (red team)."""


COMMITMENT_VERSION = 1
MAX_COMMITMENT_BYTES = 128
_MULTIADDR_TEXT = re.compile(r"/[A-Za-z0-9_./:\-]+")  # what the Multiaddr field allows


def _canonical_multiaddr(text: str) -> str:
    """``text`` parsed as a multiaddr and printed back (so the committed text is the canonical one)."""
    import multiaddr

    try:
        return str(multiaddr.Multiaddr(text))
    except (ValueError, multiaddr.exceptions.Error) as e:
        raise RecordError(f"commitment: {text!r} is not a valid multiaddr ({e})") from None


class Commitment(BaseModel):
    """What a peer commits on chain: its publisher's address and peer id (<= 128 bytes).

    On chain it is the multiaddr as ASCII text, ``/ip4/203.0.113.5/tcp/4001/p2p/<peer id>`` (77 bytes
    for IPv4 + an RSA peer id, 111 at most for IPv6 + an Ed25519 one), stored as the ``Raw<n>`` field of
    the Commitments pallet. That is what the Bittensor SDK (``Subtensor.get_commitment`` decodes the
    field's bytes as UTF-8), explorers and subnet tooling read. :meth:`from_bytes` also accepts the
    older binary form (version byte 1, then the multiaddr's binary encoding; :meth:`to_binary`) so
    commitments written by earlier releases still parse. The extrinsic that stores it is signed by the
    hotkey; the full :class:`PeerIdentityRecord` (all addresses, run id) comes from the publisher itself.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    addr: Multiaddr
    """Transport address without ``/p2p``, e.g. ``/ip4/203.0.113.5/tcp/4001``."""
    peer_id: str = Field(min_length=1, max_length=128)

    @property
    def multiaddr(self) -> str:
        return f"{self.addr}/p2p/{self.peer_id}"

    def _checked(self, raw: bytes) -> bytes:
        if len(raw) > MAX_COMMITMENT_BYTES:
            raise RecordError(
                f"commitment: {self.multiaddr!r} is {len(raw)} bytes > {MAX_COMMITMENT_BYTES}; announce a "
                "shorter address (IPv4/IPv6 + tcp, no DNS name)"
            )
        return raw

    def to_bytes(self) -> bytes:
        """The on-chain form: the canonical multiaddr text, ASCII (readable by SDK tools)."""
        return self._checked(_canonical_multiaddr(self.multiaddr).encode("ascii"))

    def to_binary(self) -> bytes:
        """The older compact form (version byte + binary multiaddr); still parsed, no longer written."""
        import multiaddr

        try:
            raw = bytes([COMMITMENT_VERSION]) + multiaddr.Multiaddr(self.multiaddr).to_bytes()
        except (ValueError, multiaddr.exceptions.Error) as e:
            raise RecordError(f"commitment: {self.multiaddr!r} is not a valid multiaddr ({e})") from None
        return self._checked(raw)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Commitment:
        """Parse what a chain holds (hostile bytes): the text form, or the older binary form."""
        import multiaddr

        if not raw or len(raw) > MAX_COMMITMENT_BYTES:
            raise RecordError(f"commitment: {len(raw)} bytes (expected 1..{MAX_COMMITMENT_BYTES})")
        if raw[:1] == b"/":  # the text form
            try:
                text = raw.decode("ascii")
            except UnicodeDecodeError:
                raise RecordError("commitment: text form is not ASCII") from None
            if not _MULTIADDR_TEXT.fullmatch(text):
                raise RecordError(f"commitment: {text!r} is not a valid multiaddr (characters)")
            return cls.from_multiaddr(_canonical_multiaddr(text))
        if raw[0] != COMMITMENT_VERSION:
            raise RecordError(
                f"commitment: neither a text multiaddr nor binary version {COMMITMENT_VERSION} "
                f"(first byte {raw[0]:#04x})"
            )
        try:
            text = str(multiaddr.Multiaddr(raw[1:]))
        except (ValueError, multiaddr.exceptions.Error) as e:
            raise RecordError(f"commitment: not a multiaddr ({e})") from None
        return cls.from_multiaddr(text)

    @classmethod
    def from_multiaddr(cls, text: str) -> Commitment:
        """Parse ``<addr>/p2p/<peer_id>`` (the text form, e.g. what `peer status` prints)."""
        if not isinstance(text, str) or len(text) > 512:
            raise RecordError("commitment: text form is not a string of at most 512 characters")
        addr, sep, peer_id = text.rpartition("/p2p/")
        if not sep or not addr or not peer_id or "/" in peer_id:
            raise RecordError(f"commitment: {text!r} is not of the form /ip4/<ip>/tcp/<port>/p2p/<peer id>")
        try:
            return cls(addr=addr, peer_id=peer_id)
        except ValidationError as e:
            raise RecordError(f"commitment: {text!r}: {e.errors()[0]['msg']}") from None
