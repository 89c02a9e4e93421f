"""Property-based fuzzing (Hypothesis) of the sparse-Δ decoders: the published blob and the wire part.

Same pattern as tests/test_fuzz_decoders.py: each property is that the decoder returns a valid object or
raises its typed refusal (``ArtifactRefused`` for blobs, ``WireRefused`` for wire parts), never another
exception, and allocates at most a small multiple of what an honest input of the model's size needs.
Derandomized, no example database, sized to run in seconds.
"""

from __future__ import annotations

import json
import math
import struct
import tracemalloc

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer.net.layout import ArtifactLayouts, ArtifactRefused
from peer.training.sparse import (
    TopK,
    WireRefused,
    decode_contribution,
    decode_wire_part,
    encode_sparse_delta,
    encode_wire_part,
    sparsify,
)
from tests.hostile_blobs import SHAPES

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TOPK = TopK(chunk=1024, k=16)
LAYOUTS = ArtifactLayouts.from_shapes(SHAPES, topk=(TOPK.chunk, TOPK.k))
DENSE_BYTES = 4 * sum(math.prod(s) for s in SHAPES.values())
_g = torch.Generator().manual_seed(0)
BLOB = encode_sparse_delta({n: sparsify(torch.randn(s, generator=_g), TOPK) for n, s in SHAPES.items()}, TOPK)
PART = sparsify(torch.randn(70_000, generator=_g), TOPK)
WIRE = encode_wire_part(PART, TOPK).SerializeToString()


def bounded(fn, limit: int):
    """Run ``fn``; assert its peak allocation ≤ ``limit`` bytes. Returns the result or the refusal."""
    tracemalloc.start()
    try:
        try:
            result = fn()
        except (ArtifactRefused, WireRefused) as e:
            result = e
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= limit, (peak, limit)
    return result


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
            n = draw(st.one_of(st.integers(0, 1 << 16), st.sampled_from([2**63, 2**64 - 1, 100 << 20])))
            data[:8] = struct.pack("<Q", n)
    return bytes(data)


def _check_blob(blob: bytes) -> None:
    for layout in (LAYOUTS.contribution, None):
        # with the model's layout: the dense Δ (the output) plus the blob, a few times over
        limit = 3 * DENSE_BYTES + 6 * len(blob) + (256 << 10)
        out = bounded(lambda layout=layout: decode_contribution(blob, layout), limit)
        assert isinstance(out, dict | ArtifactRefused), repr(out)
        if isinstance(out, ArtifactRefused):
            assert out.reason and str(out)
        elif layout is not None:
            assert {n: tuple(t.shape) for n, t in out.items()} == dict(SHAPES)


@FUZZ
@given(mutated(BLOB))
def test_fuzz_mutated_sparse_delta(blob):
    _check_blob(blob)


@st.composite
def crafted_headers(draw):
    """Honest header structure, hostile values: sizes, k/chunk, shapes metadata, dtypes."""
    (n,) = struct.unpack_from("<Q", BLOB)
    header = json.loads(BLOB[8 : 8 + n])
    data = BLOB[8 + n :]
    meta = header["__metadata__"]
    field = draw(st.sampled_from(["k", "chunk", "shapes", "dtype", "shape", "offsets", "scale", "format"]))
    if field in ("k", "chunk"):
        meta[field] = draw(st.sampled_from(["0", "1", "32768", "99999999", "-1", "1e3", "16 ", ""]))
    elif field == "shapes":
        shapes = {k: v for k, v in json.loads(meta["shapes"]).items()}
        name = draw(st.sampled_from(sorted(shapes)))
        shapes[name] = draw(st.sampled_from([[1 << 40], [0], [10**6, 10**6], [], [-1]]))
        meta["shapes"] = json.dumps(shapes)
    elif field == "format":
        meta["format"] = draw(st.sampled_from(["gradswarm-delta-topk-v1", "gradswarm-delta-topk-v3", ""]))
    elif field == "scale":  # a hostile scale value: NaN, ±inf, negative, huge, subnormal, not canonical
        name = draw(st.sampled_from(sorted(k for k in header if k.endswith("::scale"))))
        lo, hi = header[name]["data_offsets"]
        i = draw(st.integers(0, (hi - lo) // 4 - 1))
        bad = draw(st.sampled_from([float("nan"), float("inf"), -float("inf"), -1.0, 3e38, 1e-45, 0.1, 0.0]))
        data = data[: lo + 4 * i] + struct.pack("<f", bad) + data[lo + 4 * i + 4 :]
    else:
        name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        if field == "dtype":
            header[name]["dtype"] = draw(st.sampled_from(["I32", "U16", "F32", "I8", "F16", "BF16"]))
        elif field == "shape":
            header[name]["shape"] = [draw(st.integers(0, 1 << 40))]
        else:
            header[name]["data_offsets"] = [0, draw(st.integers(0, 1 << 40))]
    raw = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@FUZZ
@given(crafted_headers())
def test_fuzz_crafted_sparse_headers(blob):
    _check_blob(blob)


@FUZZ
@given(
    mutated(WIRE),
    st.sampled_from([PART.numel(), 1, 65536, 200_000]),
    st.sampled_from([0, 1024, 100, 1023]),
)
def test_fuzz_mutated_wire_parts(raw, expected, offset):
    from google.protobuf.message import DecodeError
    from hivemind.proto import runtime_pb2

    msg = runtime_pb2.Tensor()
    try:
        msg.ParseFromString(raw)
    except DecodeError:
        return  # the RPC layer refuses it before the runner sees it
    limit = 3 * 4 * expected + 6 * len(raw) + (256 << 10)
    out = bounded(lambda: decode_wire_part(msg, expected, TOPK, offset), limit)
    assert isinstance(out, torch.Tensor | WireRefused), repr(out)
    if isinstance(out, torch.Tensor):
        assert out.numel() == expected


@st.composite
def crafted_wire_parts(draw):
    """Honest wire structure (count + scale per chunk, position + code per entry), hostile values:
    counts beyond the chunk, scales NaN/inf/negative/huge/subnormal/not canonical, codes 0 or -128,
    positions out of range or repeated."""
    part = encode_wire_part(PART, TOPK)
    blocks = -(-PART.numel() // TOPK.chunk)
    buf = bytearray(part.buffer)
    m = (len(buf) - 6 * blocks) // 3
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.sampled_from(["count", "scale", "code", "pos"]))
        if what == "count":
            i = draw(st.integers(0, blocks - 1))
            struct.pack_into("<H", buf, 2 * i, draw(st.sampled_from([0, 1, 17, 1024, 1025, 65535])))
        elif what == "scale":
            i = draw(st.integers(0, blocks - 1))
            bad = draw(st.sampled_from([float("nan"), float("inf"), -1.0, 3e38, 1e-45, 0.1, 0.0, 2.0**-20]))
            struct.pack_into("<f", buf, 2 * blocks + 4 * i, bad)
        elif what == "code":
            buf[6 * blocks + 2 * m + draw(st.integers(0, m - 1))] = draw(
                st.sampled_from([0, 0x80, 0x7F, 0x81])
            )
        else:
            i = draw(st.integers(0, m - 1))
            struct.pack_into("<H", buf, 6 * blocks + 2 * i, draw(st.sampled_from([0, 1023, 1024, 65535])))
    part.buffer = bytes(buf)
    return part


@FUZZ
@given(crafted_wire_parts())
def test_fuzz_crafted_wire_parts(msg):
    limit = 3 * 4 * PART.numel() + 6 * len(msg.buffer) + (256 << 10)
    out = bounded(lambda: decode_wire_part(msg, PART.numel(), TOPK), limit)
    assert isinstance(out, torch.Tensor | WireRefused), repr(out)
    if isinstance(out, torch.Tensor):  # whatever got through is finite and at most k a chunk
        assert bool(torch.isfinite(out).all())
        assert int((out != 0).sum()) <= int((PART != 0).sum()) + 3
