"""Property-based fuzzing (Hypothesis) of every decoder of peer-controlled bytes.

Each property: the decoder returns a valid object or raises its typed refusal (``ArtifactRefused`` /
``ProtocolError`` / ``RecordError`` / ``ValueError`` for DHT values), never another exception, and decoding
allocates at most a small multiple of the input (tracemalloc). Strategies mutate valid encodings (flip,
truncate, extend, splice bytes), and craft headers with huge shapes/offsets/counts, other dtypes, nested
JSON, NaN/inf. Runs are derandomized (same examples every run, no example database) and sized so the
whole file takes well under a minute; interesting finds are kept in tests/test_hostile_inputs.py.
"""

from __future__ import annotations

import json
import struct
import tracemalloc

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer.net.artifact_protocol import (
    MAX_LISTING_BYTES,
    FetchHeader,
    ListResponse,
    ProtocolError,
    parse_request,
    parse_response,
    split_frame,
)
from peer.net.layout import DTYPE_BYTES, ArtifactRefused, parse_header
from peer.net.outbox import decode_delta, decode_state
from peer.net.records import (
    Commitment,
    ContributionManifest,
    DHTAnnouncement,
    PeerIdentityRecord,
    RecordError,
    StateManifest,
)
from tests.hostile_blobs import delta_header, honest_delta, honest_state, layouts, split

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LAYOUTS = layouts()
DELTA = honest_delta()
STATE = honest_state()
DELTA_HEADER, DELTA_DATA = split(DELTA)


def bounded(fn, input_len: int, slack: int = 256 << 10, factor: int = 6):
    """Run ``fn``; assert its peak allocation ≤ factor × input + slack. Returns result or exception."""
    tracemalloc.start()
    try:
        try:
            result = fn()
        except (ArtifactRefused, ProtocolError, RecordError, ValueError) as e:
            result = e
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= factor * input_len + slack, (peak, input_len)
    return result


# ---------------------------------------------------------------------------------------------------
# byte mutations of valid encodings


@st.composite
def mutated(draw, base: bytes):
    data = bytearray(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "extend", "splice", "header_len"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif op == "extend":
            data += draw(st.binary(max_size=64))
        elif op == "splice" and data:
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=32))
        elif op == "header_len" and len(data) >= 8:
            n = draw(
                st.one_of(st.integers(0, 1 << 16), st.sampled_from([2**63, 2**64 - 1, 100 << 20, 2**32 - 1]))
            )
            data[:8] = struct.pack("<Q", n)
    return bytes(data)


def _check_delta(blob: bytes) -> None:
    for layout in (LAYOUTS.contribution, None):
        out = bounded(lambda layout=layout: decode_delta(blob, layout), len(blob))
        assert isinstance(out, dict | ArtifactRefused), repr(out)
        if isinstance(out, ArtifactRefused):
            assert out.reason and str(out)
        elif layout is not None:
            assert {n: tuple(t.shape) for n, t in out.items()} == dict(LAYOUTS.contribution.param_shapes)


def _check_state(blob: bytes) -> None:
    for layout in (LAYOUTS.state, None):
        out = bounded(lambda layout=layout: decode_state(blob, layout), len(blob), factor=3)
        assert isinstance(out, dict | ArtifactRefused), repr(out)


@FUZZ
@given(mutated(DELTA))
def test_fuzz_mutated_delta(blob):
    _check_delta(blob)


@FUZZ
@given(mutated(STATE))
def test_fuzz_mutated_state(blob):
    _check_state(blob)


# ---------------------------------------------------------------------------------------------------
# crafted headers

huge_int = st.one_of(
    st.integers(-(2**70), 2**70), st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**40, 2**63, 10**12])
)
json_leaf = st.one_of(
    st.none(), st.booleans(), huge_int, st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12)
)
json_value = st.recursive(
    json_leaf,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=20,
)


@st.composite
def crafted_delta(draw):
    h = json.loads(json.dumps(DELTA_HEADER))
    names = [k for k in h if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        field = draw(
            st.sampled_from(["dtype", "shape", "data_offsets", "entry", "meta", "shapes", "block", "new"])
        )
        if not isinstance(h.get(name), dict):
            h[name] = {}
        if not isinstance(h.get("__metadata__"), dict):
            h["__metadata__"] = {}
        if field == "dtype":
            h[name]["dtype"] = draw(st.sampled_from([*DTYPE_BYTES, "F8_E4M3", "X", ""]) | json_value)
        elif field == "shape":
            h[name]["shape"] = draw(st.lists(huge_int, max_size=10) | json_value)
        elif field == "data_offsets":
            h[name]["data_offsets"] = draw(st.lists(huge_int, min_size=0, max_size=3) | json_value)
        elif field == "entry":
            h[name] = draw(json_value)
        elif field == "meta":
            h["__metadata__"] = draw(json_value)
        elif field == "shapes":
            sh = draw(
                st.dictionaries(
                    st.sampled_from(["embed.weight", "norm.weight", "x"]), st.lists(huge_int, max_size=4)
                )
            )
            h["__metadata__"] = {**h.get("__metadata__", {}), "shapes": json.dumps(sh)}
        elif field == "block":
            h["__metadata__"] = {
                **h.get("__metadata__", {}),
                "block": draw(st.text(max_size=10) | st.just("0")),
            }
        else:
            h[draw(st.text(max_size=20))] = draw(json_value)
    text = json.dumps(h, separators=(",", ":"))  # NaN/Infinity from floats are written as such
    data = DELTA_DATA if draw(st.booleans()) else draw(st.binary(max_size=256))
    return struct.pack("<Q", len(text.encode())) + text.encode() + data


@FUZZ
@given(crafted_delta())
def test_fuzz_crafted_delta_headers(blob):
    _check_delta(blob)


@FUZZ
@given(
    st.dictionaries(st.text(max_size=6), st.lists(st.integers(0, 2**41), max_size=3), min_size=1, max_size=4),
    st.integers(0, 2**21),
)
def test_fuzz_delta_claiming_huge_tensors(shapes, block):
    """A Δ whose header and metadata agree on arbitrary (huge) shapes but carries ~no data."""
    try:
        header = delta_header(shapes, block=max(block, 1))
    except (ValueError, OverflowError):
        return
    blob = (
        struct.pack("<Q", len(json.dumps(header, separators=(",", ":"))))
        + json.dumps(header, separators=(",", ":")).encode()
        + b"\0" * 64
    )
    _check_delta(blob)


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes_as_blobs(blob):
    _check_delta(blob)
    _check_state(blob)
    out = bounded(lambda: parse_header(blob), len(blob))
    assert not isinstance(out, Exception) or isinstance(out, ArtifactRefused)


@FUZZ
@given(st.integers(1, 30_000), st.sampled_from(["[", '{"a":']))
def test_fuzz_nested_json_headers(depth, opener):
    closer = "]" if opener == "[" else "}"
    text = opener * depth + "1" + closer * depth
    blob = struct.pack("<Q", len(text)) + text.encode()
    # JSON nesting is cut by the container count or Python's recursion limit: a constant bound
    for layout in (LAYOUTS.contribution, LAYOUTS.state, None):
        out = bounded(lambda layout=layout: parse_header(blob, layout=layout), len(blob), slack=2 << 20)
        assert isinstance(out, ArtifactRefused), repr(out)


# ---------------------------------------------------------------------------------------------------
# frames and messages


@FUZZ
@given(st.binary(max_size=64), st.integers(0, 2**32 - 1), st.integers(0, MAX_LISTING_BYTES))
def test_fuzz_frames(tail, length, limit):
    buf = struct.pack(">I", length) + tail
    try:
        payload, rest = split_frame(buf, limit, what="frame")
    except ProtocolError as e:
        assert e.reason in ("oversized_frame", "truncated_frame")
        return
    assert len(payload) == length <= limit and payload + rest == tail


msgpack_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=8), c, max_size=5),
    max_leaves=30,
)
REQUEST = msgpack.packb({"op": "fetch", "sha256": "a" * 64, "round": 3, "kind": "state"})
LISTING = msgpack.packb(
    {"ok": True, "peer_id": "p", "rounds": [1, 2], "state_rounds": [2], "contribution": "{}"}
)


@FUZZ
@given(st.one_of(mutated(REQUEST), mutated(LISTING), msgpack_value.map(lambda v: msgpack.packb(v))))
def test_fuzz_msgpack_messages(raw):
    out = bounded(lambda: parse_request(raw), len(raw))
    assert not isinstance(out, Exception) or isinstance(out, ProtocolError), repr(out)
    for model in (ListResponse, FetchHeader):
        out = bounded(lambda model=model: parse_response(raw, model, what="answer"), len(raw))
        assert not isinstance(out, Exception) or isinstance(out, ProtocolError), repr(out)


@FUZZ
@given(st.dictionaries(st.text(max_size=10), msgpack_value, max_size=6).map(lambda d: {"op": "list", **d}))
def test_fuzz_request_fields(obj):
    raw = msgpack.packb(obj)
    out = bounded(lambda: parse_request(raw), len(raw))
    assert not isinstance(out, Exception) or isinstance(out, ProtocolError), repr(out)


# ---------------------------------------------------------------------------------------------------
# signed records, commitments, DHT values

MANIFEST = json.dumps(
    {
        "spec_version": 1,
        "run_id": "r",
        "round": 1,
        "hotkey": "5" * 48,
        "peer_id": "p",
        "signature": "0x00",
        "base_state_hash": "0" * 64,
        "data_fingerprint": "1" * 64,
        "model_config_name": "debug",
        "pages": [1, 2, 3],
        "samples": 1,
        "tokens": 1,
        "inner_steps": 1,
        "loss_before": 1.0,
        "loss_after": 0.5,
        "blob": {"name": "contribution.safetensors", "sha256": "2" * 64, "size": 10},
        "behaviour": "honest",
    }  # fmt: skip
).encode()


@FUZZ
@given(
    st.one_of(mutated(MANIFEST), json_value.map(lambda v: json.dumps(v).encode()), st.binary(max_size=512))
)
def test_fuzz_records(raw):
    for model in (ContributionManifest, StateManifest, PeerIdentityRecord, DHTAnnouncement):
        out = bounded(lambda model=model: model.parse(raw), len(raw))
        assert not isinstance(out, Exception) or isinstance(out, RecordError), repr(out)
        if isinstance(out, RecordError):
            continue
        try:
            out.verify(run_id="r")  # signature checks are total too
        except RecordError:
            pass


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=140),
        st.binary(max_size=80).map(lambda b: b"\x01" + b),
        st.text(max_size=120).map(lambda t: ("/" + t).encode(errors="ignore")),
    )
)
def test_fuzz_commitments(raw):
    try:
        c = Commitment.from_bytes(raw)
    except RecordError:
        return
    assert c.peer_id and c.addr


@FUZZ
@given(
    st.one_of(st.binary(max_size=300), msgpack_value.map(lambda v: msgpack.packb(v))), st.binary(max_size=80)
)
def test_fuzz_dht_record_validator(value, subkey):
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils import MSGPackSerializer

    from peer.net.dht_records import HotkeyRecordValidator, hotkey_subkey

    v = HotkeyRecordValidator(run_id="r", protected_keys=["k"])
    key = DHTID.generate(source="k").to_bytes()
    for sk in (subkey, MSGPackSerializer.dumps(hotkey_subkey("5" * 48)), b"\xa8[hotkey:" + subkey[:8]):
        ok = bounded(
            lambda sk=sk: v.validate(DHTRecord(key=key, subkey=sk, value=value, expiration_time=1e12)), 400
        )
        assert ok is False
