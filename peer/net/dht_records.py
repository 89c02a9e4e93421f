"""Hotkey-signed DHT records: a hivemind record validator so the DHT itself refuses forged values.

hivemind's :class:`~hivemind.dht.crypto.RSASignatureValidator` protects records whose subkey names an
RSA owner key. This is the same idea with the peer's Bittensor hotkey (sr25519):

* a peer stores ``dht.store(key, value=announcement_json, subkey=hotkey_subkey(hotkey), ...)`` where the
  value is a :class:`~peer.net.records.DHTAnnouncement` signed by that hotkey (run id, round, peer id, the
  DHT key it belongs to, and the payload);
* every node running :class:`HotkeyRecordValidator` (pass it in ``hivemind.DHT(record_validators=[...])``)
  refuses to store — and refuses to accept in answers — a record whose subkey is a hotkey marker unless
  the signature verifies, the signer is that hotkey, the record names this DHT key and this run (and,
  optionally, the hotkey is in ``allowed_hotkeys``);
* keys listed in ``protected_keys`` accept nothing *but* such records, so an unsigned value cannot be
  slipped in under another subkey.

Each refusal is logged with its reason and counted (:func:`validator_rejections`). hivemind hashes DHT
keys before validators see them, which is why protection is by explicit key names (keep per-round data
under a fixed key and put the round in the signed record) and why the record repeats its key.

Decoding is bounded: a subkey over :data:`MAX_SUBKEY_BYTES` or a value over :data:`MAX_VALUE_BYTES` is
refused before it is unpacked, msgpack is unpacked with small container limits and no extension types,
and the announcement JSON has a range for every field (``peer.net.records``); every malformed input is a
counted refusal (``malformed``, ``unsigned``, ...), never an exception in the DHT node.

This module is the hivemind side: it never imports py-libp2p.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Collection, Iterable

import msgpack
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord, RecordValidatorBase
from substrateinterface import Keypair

from peer.net.records import DHTAnnouncement, JsonScalar, RecordError

log = logging.getLogger("gradswarm.dht_records")

SUBKEY_PREFIX = "[hotkey:"
MAX_SUBKEY_BYTES = 128
"""A hotkey subkey is ``[hotkey:<ss58>]`` (~57 bytes) packed as msgpack."""
MAX_VALUE_BYTES = 4096
"""A signed announcement is ~500 bytes of JSON; anything much bigger is not ours."""
EXPIRY_SLACK_S = 1.0
"""A record may be stored to expire at most this much after the expiry its hotkey signed."""


def unpack_small(raw: bytes, max_bytes: int):
    """One msgpack value of at most ``max_bytes``, with no extension types and small containers;
    raises ValueError for anything else (never another exception type)."""
    if not isinstance(raw, bytes | bytearray | memoryview) or len(raw) > max_bytes:
        raise ValueError(f"not bytes of at most {max_bytes}")
    try:
        return msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            ext_hook=_no_ext,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=64,
            max_map_len=64,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        raise ValueError(f"not msgpack ({str(e)[:120]})") from None


def _no_ext(code: int, data: bytes):
    raise ValueError(f"msgpack extension type {code} is not allowed")


def hotkey_subkey(hotkey: str) -> str:
    """The DHT subkey under which ``hotkey`` stores its signed value."""
    return f"{SUBKEY_PREFIX}{hotkey}]"


def dht_key(run_id: str, name: str) -> str:
    """A gradswarm DHT key, namespaced by run (e.g. ``dht_key(run_id, "state_hash")``)."""
    return f"gradswarm/{run_id}/{name}"


def sign_announcement(
    keypair: Keypair,
    *,
    key: str,
    run_id: str,
    round_: int,
    peer_id: str,
    value: dict[str, JsonScalar],
    expires_at: float,
) -> tuple[str, str]:
    """``(subkey, value)`` to pass to ``dht.store(key, value=..., subkey=..., expiration_time=expires_at)``
    (a later expiration is refused: :data:`EXPIRY_SLACK_S`)."""
    record = DHTAnnouncement(
        run_id=run_id,
        round=round_,
        hotkey=keypair.ss58_address,
        peer_id=peer_id,
        key=key,
        value=value,
        expires_at=expires_at,
    ).signed(keypair)
    return hotkey_subkey(keypair.ss58_address), record.model_dump_json()


def read_announcements(
    entries: dict | None,
    *,
    key: str,
    run_id: str,
    round_: int | None = None,
    allowed: Collection[str] | None = None,
) -> dict[str, DHTAnnouncement]:
    """Verified announcements (by hotkey) from a ``dht.get(key)`` dictionary value; bad entries skipped,
    and with ``allowed`` (the subnet's registered hotkeys) every other hotkey's too.

    The validator already refused forged records on the way in; this re-checks (cheap) so a node
    without the validator, or a cached value, cannot slip anything through.
    """
    out: dict[str, DHTAnnouncement] = {}
    if not isinstance(entries, dict):
        return out
    for subkey, item in entries.items():
        if (
            not isinstance(subkey, str)
            or len(subkey) > MAX_SUBKEY_BYTES
            or not subkey.startswith(SUBKEY_PREFIX)
            or not subkey.endswith("]")
        ):
            continue
        value = getattr(item, "value", item)
        if not isinstance(value, str | bytes) or len(value) > MAX_VALUE_BYTES:
            continue
        try:
            ann = DHTAnnouncement.parse(value)
            ann.verify(run_id=run_id, round_=round_)
        except RecordError:
            continue
        expiration = getattr(item, "expiration_time", None)
        if expiration is not None and expiry_problem(ann.expires_at, expiration) is not None:
            continue
        if (
            ann.key == key
            and hotkey_subkey(ann.hotkey) == subkey
            and (allowed is None or ann.hotkey in allowed)
        ):
            out[ann.hotkey] = ann
    return out


def expiry_problem(signed: float | None, stored: float, where: str = "record") -> tuple[str, str] | None:
    """Why a record stored to expire at ``stored`` breaks the expiry its hotkey ``signed``, or None. No
    clock is read: hivemind drops a whole dictionary answer when one entry fails validation, so a check
    against the local clock would let anyone store an entry that only slower clocks refuse, and those
    readers would lose every honest entry beside it (review finding). A hotkey that signs a far expiry
    pins only its own vote, for a round that no longer counts."""
    if signed is None:
        return "no_expiry", f"{where}: the announcement signs no expiry (anyone could pin it in the DHT)"
    if not math.isfinite(stored):  # NaN is never "later" than anything: it passed the test below
        return "bad_expiry", f"{where}: stored to expire at {stored}"
    if stored > signed + EXPIRY_SLACK_S:
        return "expiry_extended", (
            f"{where}: stored to expire at {stored:.0f}, after the {signed:.0f} its hotkey signed "
            "(a genuine record re-stored to pin it)"
        )
    return None


class HotkeyRecordValidator(RecordValidatorBase):
    """Refuse DHT records under hotkey subkeys (or protected keys) unless hotkey-signed for this run."""

    def __init__(
        self,
        *,
        run_id: str,
        protected_keys: Iterable[str] = (),
        allowed_hotkeys: Iterable[str] | None = None,
    ):
        """
        :param run_id: only records signed for this run are accepted.
        :param protected_keys: DHT keys (as passed to ``dht.store``) that accept hotkey-signed records
            only. Without it, unsigned values under other subkeys of the same key are allowed.
        :param allowed_hotkeys: if given, only these hotkeys (e.g. the subnet's registered ones) may
            store; update by creating a new DHT validator (the DHT runs in its own process).
        """
        self.run_id = run_id
        self.protected: dict[bytes, str] = {DHTID.generate(source=k).to_bytes(): k for k in protected_keys}
        self.allowed = frozenset(allowed_hotkeys) if allowed_hotkeys is not None else None
        self.rejections: Counter = Counter()

    @staticmethod
    def _subkey_hotkey(subkey: bytes) -> str | None:
        if not isinstance(subkey, bytes) or not subkey or b"[hotkey:" not in subkey:
            return None
        try:
            text = unpack_small(subkey, MAX_SUBKEY_BYTES)
        except ValueError:
            return None
        if isinstance(text, str) and text.startswith(SUBKEY_PREFIX) and text.endswith("]"):
            return text[len(SUBKEY_PREFIX) : -1]
        return None

    def validate(self, record: DHTRecord) -> bool:
        hotkey = self._subkey_hotkey(record.subkey)
        protected = self.protected.get(record.key)
        if hotkey is None and protected is None:
            return True  # not ours (hivemind's own matchmaking/averaging records)
        reason = self._check(record, hotkey, protected)
        if reason is None:
            return True
        code, detail = reason
        self.rejections[code] += 1
        log.warning("DHT refused a record (%s): %s", code, detail)
        return False

    def _check(self, record: DHTRecord, hotkey: str | None, protected: str | None) -> tuple[str, str] | None:
        where = f"key {protected!r}" if protected else f"key id {record.key.hex()[:12]}"
        if hotkey is None:
            return "unsigned", f"{where} only accepts hotkey-signed records under a [hotkey:<ss58>] subkey"
        try:
            value = unpack_small(record.value, MAX_VALUE_BYTES)
        except ValueError as e:
            return "malformed", f"{where}: value {e}"
        if not isinstance(value, str | bytes):
            return "unsigned", f"{where}: value from {hotkey} is not a signed announcement"
        try:
            ann = DHTAnnouncement.parse(value)
        except RecordError as e:
            return "unsigned", f"{where}: value from {hotkey} is not a signed announcement ({e})"
        if not ann.signature:
            return "unsigned", f"{where}: announcement from {hotkey} carries no signature"
        if ann.hotkey != hotkey:
            return "wrong_hotkey", f"{where}: subkey names {hotkey} but the record is {ann.hotkey}'s"
        try:
            ann.verify(run_id=self.run_id)
        except RecordError as e:
            code = "wrong_run" if "run_id" in str(e) else "bad_signature"
            return code, f"{where}: {e}"
        if DHTID.generate(source=ann.key).to_bytes() != record.key:
            return "wrong_key", f"{where}: record was signed for key {ann.key!r} (replayed under another key)"
        if self.allowed is not None and hotkey not in self.allowed:
            return "not_registered", f"{where}: hotkey {hotkey} is not registered on the subnet"
        return expiry_problem(ann.expires_at, record.expiration_time, where)

    @property
    def priority(self) -> int:
        return 5

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, HotkeyRecordValidator) or other.run_id != self.run_id:
            return False
        if other.allowed != self.allowed:
            return False
        self.protected.update(other.protected)
        return True


async def _rejections(dht, node) -> dict[str, int]:
    out: Counter = Counter()
    validator = node.protocol.record_validator
    validators = validator._validators if isinstance(validator, CompositeValidator) else [validator]
    for v in validators:
        if isinstance(v, HotkeyRecordValidator):
            out.update(v.rejections)
    return dict(out)


def validator_rejections(dht) -> dict[str, int]:
    """Refusal counts (by reason) of the HotkeyRecordValidator running inside ``dht``'s process."""
    return dht.run_coroutine(_rejections)
