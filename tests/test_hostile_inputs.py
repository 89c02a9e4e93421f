"""Hostile bytes from peers become typed refusals with a reason, never another exception or a big allocation.

The regression corpus of the decoders (see tests/test_fuzz_decoders.py for the property-based side):
crafted safetensors Δs and states, frames, msgpack messages, signed records, DHT values, commitments and
states downloaded over hivemind. Each case asserts the refusal's type and reason code, and that decoding
it allocated at most a small multiple of its own size (tracemalloc sees torch's CPU allocations too).
"""

from __future__ import annotations

import json
import struct
import tracemalloc

import msgpack
import pytest
import torch

from peer.errors import CheckpointError
from peer.net.artifact_protocol import (
    MAX_LISTING_BYTES,
    FetchHeader,
    ListResponse,
    ProtocolError,
    encode_frame,
    parse_request,
    parse_response,
    split_frame,
    unpack_map,
)
from peer.net.layout import ArtifactRefused, parse_header, state_layout
from peer.net.outbox import decode_delta, decode_state, dequantize_blockwise, quantize_blockwise
from peer.net.records import MAX_RECORD_BYTES, Commitment, ContributionManifest, RecordError
from tests.hostile_blobs import SHAPES, craft, honest_delta, honest_state, hostile_cases, layouts, split

EXPECTED = {
    # case: (reason with the model's layout, reason without one)
    "tera_tensor": ("bad_shape", "bad_offsets"),
    "header_len_2_63": ("header_too_large", "header_too_large"),
    "header_claims_100MB": ("header_too_large", "header_too_large"),
    "overlapping_offsets": ("bad_offsets", "bad_offsets"),
    "offsets_out_of_range": ("bad_offsets", "bad_offsets"),
    "codes_dtype_F64": ("bad_dtype", "bad_offsets"),
    "codes_dtype_BOOL": ("bad_dtype", "bad_dtype"),
    "codes_dtype_U8": ("bad_dtype", "bad_dtype"),
    "block_mismatch": ("bad_metadata", "bad_shape"),
    "block_zero": ("bad_metadata", "bad_metadata"),
    "deep_nested_shapes": ("too_large", "bad_header"),
    "deep_nested_header": ("too_large", "bad_header"),
    "float_shape": ("bad_header", "bad_header"),
    "shapes_not_a_map": ("bad_metadata", "bad_metadata"),
    "nan_in_header": ("bad_header", "bad_header"),
    "extra_tensor": ("wrong_tensors", "wrong_tensors"),
    "missing_tensor": ("wrong_tensors", "bad_offsets"),
    "truncated": ("bad_offsets", "bad_offsets"),
    "not_safetensors": ("header_too_large", "header_too_large"),
    "empty": ("truncated", "truncated"),
}

CASES = hostile_cases()


def peak_bytes(fn) -> tuple[int, object]:
    """Peak traced allocation while ``fn`` runs, and what it returned or raised."""
    tracemalloc.start()
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - the caller asserts on the exception
        result = e
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, result


def test_corpus_is_complete():
    assert set(CASES) == set(EXPECTED)


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_hostile_delta_is_refused_with_reason_and_bounded_memory(case):
    blob = CASES[case]
    with_layout, without = EXPECTED[case]
    for layout, reason in ((layouts().contribution, with_layout), (None, without)):
        peak, result = peak_bytes(lambda layout=layout: decode_delta(blob, layout))
        assert isinstance(result, ArtifactRefused), (case, layout is not None, repr(result))
        assert isinstance(result, CheckpointError)
        assert result.reason == reason, (case, layout is not None, result.reason, str(result))
        assert str(result) and "\n" not in str(result)
        # never more than a small multiple of what was sent (the 100 KB nested header: its JSON parse)
        assert peak <= 4 * len(blob) + (256 << 10), (case, peak, len(blob))


def test_tera_tensor_delta_is_about_a_kilobyte():
    assert len(CASES["tera_tensor"]) < 2048


def test_honest_delta_and_state_round_trip_with_and_without_the_layout():
    L = layouts()
    blob = honest_delta()
    assert len(blob) <= L.contribution.max_bytes
    assert len(blob) - L.contribution.data_bytes < L.contribution.max_header_bytes
    a, b = decode_delta(blob, L.contribution), decode_delta(blob)
    assert set(a) == set(SHAPES) and all(tuple(a[n].shape) == SHAPES[n] for n in SHAPES)
    assert all(torch.equal(a[n], b[n]) for n in SHAPES)
    state = honest_state()
    assert len(state) <= L.state.max_bytes
    s = decode_state(state, L.state)
    assert all(tuple(s[n].shape) == SHAPES[n] for n in SHAPES)
    with pytest.raises(ArtifactRefused) as e:  # a state is not a Δ, and a Δ not a state
        decode_delta(state, L.contribution)
    assert e.value.reason == "too_large"
    with pytest.raises(ArtifactRefused) as e:
        decode_state(blob, L.state)
    assert e.value.reason in ("wrong_tensors", "bad_metadata", "bad_dtype", "bad_header")


def test_dequantize_matches_the_reference_formula():
    t = torch.randn(3 * 4096 + 17)
    codes, scale = quantize_blockwise(t)
    ref = torch.nn.functional.pad(codes.float(), (0, (-codes.numel()) % 4096)).view(-1, 4096)
    ref = (ref * (scale[:, None] / 127)).reshape(-1)[: codes.numel()]
    assert torch.equal(dequantize_blockwise(codes, scale, tuple(t.shape)), ref)
    with pytest.raises(ArtifactRefused):
        dequantize_blockwise(codes, scale[:-1], tuple(t.shape))


def test_layout_of_the_debug_model_matches_what_peers_publish():
    from peer.config import load_run_config
    from peer.data.model import build_model
    from peer.net.layout import ArtifactLayouts, model_param_shapes
    from peer.net.outbox import encode_delta, encode_state

    run = load_run_config("debug")
    model = build_model(run)
    shapes = model_param_shapes(run)
    assert shapes == {n: tuple(p.shape) for n, p in model.named_parameters()}
    L = ArtifactLayouts.for_run(run)
    delta = encode_delta({n: p.detach() * 0.01 for n, p in model.named_parameters()})
    state = encode_state(
        {n: p.detach() for n, p in model.named_parameters()}, metadata={"round": "12", "state_hash": "b" * 64}
    )
    for blob, layout in ((delta, L.contribution), (state, L.state)):
        parse_header(blob, layout=layout)
        # the data size is exact; the header estimate is within a few bytes of what safetensors writes
        assert len(blob) - parse_header(blob).data_start == layout.data_bytes
        assert len(blob) <= layout.max_bytes < len(blob) + 2 * parse_header(blob).data_start + 8192


def test_state_without_layout_accepts_floats_only():
    h, data = split(honest_state())
    h["norm.weight"]["dtype"] = "I32"
    with pytest.raises(ArtifactRefused) as e:
        decode_state(craft(h, data))
    assert e.value.reason == "bad_dtype"
    ckpt = state_layout(SHAPES, momentum=True)
    assert set(ckpt.tensors) == {f"param/{n}" for n in SHAPES} | {f"momentum/{n}" for n in SHAPES}


def test_header_json_rules():
    good_h, data = split(honest_delta())
    raw = json.dumps(good_h, separators=(",", ":"))
    dup = raw[:-1] + ',"norm.weight::q":' + json.dumps(good_h["norm.weight::q"]) + "}"
    for text, reason in (
        (dup, "bad_header"),  # duplicate key
        ('{"__metadata__":{"a":1}}', "bad_metadata"),  # metadata values are strings
        ('{"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}}', "bad_shape"),
        ('{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"more":1}}', "bad_header"),
        ('{"x":{"dtype":"F32","shape":[' + "9" * 30 + '],"data_offsets":[0,4]}}', "bad_header"),
        ("\xff\xfe", "bad_header"),
    ):
        with pytest.raises(ArtifactRefused) as e:
            parse_header(craft(text, data))
        assert e.value.reason == reason, (text[:60], e.value.reason)


# ---------------------------------------------------------------------------------------------------
# frames and msgpack messages


def test_frame_length_prefix_2_32_minus_1_is_refused_before_reading():
    with pytest.raises(ProtocolError) as e:
        split_frame(struct.pack(">I", 2**32 - 1) + b"x" * 16, MAX_LISTING_BYTES, what="listing")
    assert e.value.reason == "oversized_frame"
    assert split_frame(encode_frame(b"abc") + b"rest", 16, what="x") == (b"abc", b"rest")
    with pytest.raises(ProtocolError) as e:
        split_frame(encode_frame(b"abcdef")[:-1], 16, what="x")
    assert e.value.reason == "truncated_frame"


@pytest.mark.parametrize(
    "raw",
    [
        b"\xdd\x00\x0f\xff\xff" + b"\x90" * 1000,  # a 1M-element array of empty arrays (container limit)
        b"\x91" * 100_000,  # nesting
        msgpack.packb({"op": "list", "round": 1, "x": b"\0" * 100}),  # binary values: none are allowed
        msgpack.packb({"op": "list"}) + b"\x00",  # trailing bytes
        b"\xc7\x01\x05x",  # an extension type
        msgpack.packb([1, 2]),  # not a map
        msgpack.packb({1: 2}),  # non-string keys
        b"\xc1",  # never-used byte
        b"\xdf\xff\xff\xff\xff",  # a 4G-entry map header
        b"\xdb\xff\xff\xff\xff",  # a 4 GB string header
    ],
)
def test_malformed_msgpack_is_a_protocol_error(raw):
    with pytest.raises(ProtocolError) as e:
        unpack_map(raw, what="answer")
    assert e.value.reason == "bad_message"


def test_message_fields_have_ranges():
    for obj in (
        {"op": "list", "round": -1},
        {"op": "list", "round": 2**41},
        {"op": "fetch", "sha256": "A" * 64},
        {"op": "fetch", "sha256": "a" * 64, "kind": "secrets"},
    ):
        with pytest.raises(ProtocolError) as e:
            parse_request(msgpack.packb(obj))
        assert e.value.reason == "bad_request"
    for model, obj in (
        (FetchHeader, {"ok": True, "size": 1 << 60, "chunk_bytes": 1024}),
        (ListResponse, {"ok": True, "peer_id": "x", "rounds": list(range(1025))}),
        (ListResponse, {"ok": True, "peer_id": "x", "rounds": [-5]}),
        (ListResponse, {"ok": True, "peer_id": "p" * 200}),
    ):
        with pytest.raises(ProtocolError) as e:
            parse_response(msgpack.packb(obj), model, what="answer")
        assert e.value.reason == "bad_message"
    with pytest.raises(ProtocolError) as e:
        parse_response(msgpack.packb({"ok": False, "reason": "x" * 100, "error": "e"}), FetchHeader, what="a")
    assert e.value.reason == "bad_message"


# ---------------------------------------------------------------------------------------------------
# signed records, commitments, DHT values


def _manifest_body(**over) -> dict:
    body = {
        "spec_version": 1, "run_id": "r", "round": 1, "hotkey": "5" * 48, "peer_id": "p", "signature": None,
        "base_state_hash": "0" * 64, "data_fingerprint": "1" * 64, "model_config_name": "debug",
        "pages": [1, 2, 3], "samples": 1, "tokens": 1, "inner_steps": 1, "loss_before": 1.0,
        "loss_after": 0.5, "blob": {"name": "contribution.safetensors", "sha256": "2" * 64, "size": 10},
        "behaviour": "honest",
    }  # fmt: skip
    body.update(over)
    return body


def test_manifest_bounds():
    ContributionManifest.parse(json.dumps(_manifest_body()))
    for over in (
        {"pages": list(range(20_000))},  # a huge pages list
        {"pages": [-1]},
        {"round": 2**60},
        {"samples": 10**30},
        {"behaviour": "x" * 1000},
        {"blob": {"name": "contribution.safetensors", "sha256": "2" * 64, "size": 1 << 60}},
        {"model_config_name": ""},
    ):
        with pytest.raises(RecordError):
            ContributionManifest.parse(json.dumps(_manifest_body(**over)))
    raw = json.dumps(_manifest_body()).replace("1.0", "NaN")
    with pytest.raises(RecordError):
        ContributionManifest.parse(raw)
    with pytest.raises(RecordError, match="limit"):
        ContributionManifest.parse(" " * (MAX_RECORD_BYTES + 1))
    with pytest.raises(RecordError):
        ContributionManifest.parse("[" * 100_000)
    with pytest.raises(RecordError):
        ContributionManifest.parse(12)  # type: ignore[arg-type]


def test_record_error_is_a_value_error():
    """The validator loop refuses an unreadable commitment by catching ValueError."""
    with pytest.raises(ValueError):
        Commitment.from_bytes(b"\x01\xff\xff\xff")
    with pytest.raises(RecordError):
        Commitment.from_multiaddr("/ip4/1.2.3.4/tcp/1/p2p/" + "Q" * 10_000)


def test_dht_values_are_bounded():
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord
    from hivemind.utils import MSGPackSerializer

    from peer.net.dht_records import HotkeyRecordValidator, hotkey_subkey, read_announcements, unpack_small

    v = HotkeyRecordValidator(run_id="r", protected_keys=["k"])
    key = DHTID.generate(source="k").to_bytes()
    subkey = MSGPackSerializer.dumps(hotkey_subkey("5" * 48))
    for value in (
        MSGPackSerializer.dumps("x" * 100_000),  # huge
        b"\xdd\x00\x0f\xff\xff" + b"\x90" * 100,  # nested arrays
        b"\xc7\x01\x05x",  # extension type
        b"\x91" * 3000,
        b"",
        MSGPackSerializer.dumps(json.dumps({"a": [[[[1]]]]})),
    ):
        assert v.validate(DHTRecord(key=key, subkey=subkey, value=value, expiration_time=1e12)) is False
    assert v.rejections["malformed"] >= 4
    with pytest.raises(ValueError):
        unpack_small(b"\x91" * 10, 4)
    assert read_announcements({hotkey_subkey("5" * 48): "{" * 100_000}, key="k", run_id="r") == {}
    assert read_announcements([1, 2], key="k", run_id="r") == {}  # type: ignore[arg-type]


def test_downloaded_state_is_checked_against_the_model():
    from peer.training.swarm import downloaded_state_problem

    shapes = [torch.Size(s) for s in SHAPES.values()]
    good = [torch.zeros(s) for s in shapes] * 2
    assert downloaded_state_problem(good, shapes) is None
    assert "tensors" in downloaded_state_problem(good[:-1], shapes)
    assert "float32" in downloaded_state_problem([good[0].double(), *good[1:]], shapes)
    assert "float32" in downloaded_state_problem([torch.zeros(10**3), *good[1:]], shapes)
    bad = [t.clone() for t in good]
    bad[-1][0] = float("nan")
    assert "NaN" in downloaded_state_problem(bad, shapes)
    assert downloaded_state_problem(None, shapes) is not None


# ---------------------------------------------------------------------------------------------------
# fetch-side checks (no network)


def test_fetch_checks_blob_sizes_from_the_model(tmp_path):
    from peer.net.fetch import FetchConfig, FetchError, check_safetensors

    L = layouts()
    cfg = FetchConfig(cache_dir=tmp_path, layouts=L)
    assert cfg.max_bytes("contribution") == L.contribution.max_bytes < 64 << 10
    assert FetchConfig(cache_dir=tmp_path).max_bytes("state") == 16 << 30
    good = tmp_path / "good"
    good.write_bytes(honest_delta())
    check_safetensors(good, good.stat().st_size, kind="contribution", layout=L.contribution)
    for case, blob in CASES.items():
        p = tmp_path / case
        p.write_bytes(blob)
        with pytest.raises(FetchError) as e:
            check_safetensors(p, len(blob), kind="contribution", layout=L.contribution)
        want = EXPECTED[case][0]
        assert e.value.reason == (
            "not_safetensors" if want in ("truncated", "header_too_large", "bad_header") else want
        ), case


def test_evaluator_records_a_reason_for_a_hostile_delta(validator_world):  # noqa: F811
    from tests.fixtures_validator import HONEST
    from validator.evaluation import Candidate, EvalConfig, Evaluator

    w = validator_world
    ev = Evaluator(
        EvalConfig(cross_peers=0, heldout_pages=2, assigned_pages=2, control_pages=2), w.run, w.store
    )
    blobs = [CASES["tera_tensor"], CASES["block_zero"], honest_delta()]  # the last: another model's Δ
    cands = [Candidate(uid=i, hotkey=w.hotkeys[HONEST[i]], delta_blob=b) for i, b in enumerate(blobs)]
    rm, _ = ev.evaluate_round(1, w.seeds[1], w.bases[1], cands)
    assert [p.status for p in rm.peers] == ["malformed"] * 3
    assert [p.reason.split(":")[0] for p in rm.peers] == ["wrong_tensors"] * 3


from tests.fixtures_validator import validator_world  # noqa: E402, F401
