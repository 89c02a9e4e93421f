"""Sparse Δs (peer.training.sparse): codec, strict layout, error feedback, checkpoint, wire parts."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from peer.config import load_run_config, override
from peer.data.model import build_model
from peer.net.layout import (
    SPARSE_DELTA_FORMAT,
    ArtifactLayouts,
    ArtifactRefused,
    check_blob_header,
    sparse_delta_layout,
)
from peer.net.outbox import encode_delta
from peer.training.diloco import DilocoState
from peer.training.sparse import (
    WIRE_DTYPE_V1,
    ErrorFeedback,
    TopK,
    WireRefused,
    decode_contribution,
    decode_sparse_delta,
    decode_wire_part,
    encode_sparse_delta,
    encode_wire_part,
    excess_entries,
    quantize_topk,
    sparsify,
    wire_roundtrip,
)
from tests.hostile_blobs import SHAPES

TOPK = TopK(chunk=1024, k=16)
LAYOUTS = ArtifactLayouts.from_shapes(SHAPES, topk=(TOPK.chunk, TOPK.k))


def _delta(seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * 0.01 for n, s in shapes.items()}


def _sparse(seed=0):
    return {n: sparsify(t, TOPK) for n, t in _delta(seed).items()}


def _split(blob):
    (n,) = struct.unpack_from("<Q", blob)
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def _rebuild(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# ---------------------------------------------------------------------------------------------------
# selection and the published format


def test_topk_keeps_the_largest_entries_of_every_chunk_as_int8_times_the_chunks_scale():
    t = torch.randn(2 * 1024 + 10, generator=torch.Generator().manual_seed(3))
    s = sparsify(t, TOPK)
    for lo in (0, 1024, 2048):
        chunk, kept = t[lo : lo + 1024], s[lo : lo + 1024]
        k = min(16, chunk.numel())
        top = chunk.abs().topk(k).indices
        assert not bool(kept[torch.ones(chunk.numel(), dtype=torch.bool).index_fill(0, top, False)].any())
        scale = float(chunk[top].abs().max()) / 127
        # round to nearest: at most half a step (plus the scale's 2⁻¹⁷ rounding up) from the true value
        assert float((kept[top] - chunk[top]).abs().max()) <= 0.5 * scale * (1 + 2**-15)
        codes = kept[top] / (float(kept[top].abs().max()) / 127)
        assert torch.allclose(codes, codes.round(), atol=1e-4)  # every kept value is an integer × step
    idx, codes, scales = quantize_topk(t, TOPK)
    assert idx.dtype == torch.int16 and codes.dtype == torch.int8 and scales.dtype == torch.float32
    assert idx.numel() == TOPK.entries(t.numel()) and scales.numel() == 3
    assert int(codes.abs().max()) == 127


def test_sparse_delta_round_trips_exactly_and_is_small():
    sp = _sparse()
    blob = encode_sparse_delta(sp, TOPK)
    for layout in (LAYOUTS.contribution, LAYOUTS.contribution.sparse, None):
        out = decode_contribution(blob, layout)
        assert all(torch.equal(out[n], sp[n]) for n in SHAPES)
    dense_fp32 = 4 * sum(t.numel() for t in sp.values())
    assert len(blob) < 0.06 * dense_fp32  # 16/1024 entries × 3 bytes, a scale per chunk, the header
    # the fetch path holds the header to the sparse layout the blob names
    header = check_blob_header(blob, kind="contribution", layout=LAYOUTS.contribution)
    assert header.metadata["format"] == SPARSE_DELTA_FORMAT
    # and 8-bit Δs still decode through the same entry point
    dense = encode_delta(_delta(1))
    assert set(decode_contribution(dense, LAYOUTS.contribution)) == set(SHAPES)


def test_layout_counts_exactly_k_entries_per_chunk():
    layout = sparse_delta_layout({"a": (3000,), "b": (5,)}, 1024, 16)
    assert layout.tensors["a::idx"].shape == (2 * 16 + 16,)  # 2 full chunks + a tail of 952 ≥ k
    assert layout.tensors["b::val"].shape == (5,)  # a tensor shorter than k keeps all of it
    assert layout.tensors["a::idx"].dtype == "I16" and layout.tensors["a::val"].dtype == "I8"
    assert layout.tensors["a::scale"].shape == (3,) and layout.tensors["a::scale"].dtype == "F32"
    assert layout.tensors["b::scale"].shape == (1,)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda h, d: h["__metadata__"].update(k="17"), "bad_metadata"),
        (lambda h, d: h["__metadata__"].update(chunk="2048"), "bad_metadata"),
        (lambda h, d: h["__metadata__"].update(format="gradswarm-delta-topk-v9"), None),
        (lambda h, d: h["__metadata__"].update(shapes=json.dumps({"x": [4]})), None),
    ],
)
def test_headers_other_than_the_runs_topk_are_refused(mutate, reason):
    header, data = _split(encode_sparse_delta(_sparse(), TOPK))
    mutate(header, data)
    with pytest.raises(ArtifactRefused) as e:
        decode_contribution(_rebuild(header, data), LAYOUTS.contribution)
    if reason:
        assert e.value.reason == reason


def _with_idx(blob: bytes, name: str, fn) -> bytes:
    """The blob with ``name``'s int16 index array rewritten by ``fn`` (same size)."""
    header, data = _split(blob)
    lo, hi = header[f"{name}::idx"]["data_offsets"]
    idx = torch.frombuffer(bytearray(data[lo:hi]), dtype=torch.int16).clone()
    idx = fn(idx)
    data = data[:lo] + idx.numpy().tobytes() + data[hi:]
    return _rebuild(header, data)


@pytest.mark.parametrize(
    "fn",
    [
        lambda i: i.index_fill(0, torch.tensor([3]), 1024),  # outside the chunk
        lambda i: i.index_fill(0, torch.tensor([3]), -1),  # negative
        lambda i: i.index_fill(0, torch.tensor([3]), int(i[2])),  # duplicate position
        lambda i: torch.cat([i[:16].flip(0), i[16:]]),  # not ascending
    ],
)
def test_bad_indices_are_refused(fn):
    blob = _with_idx(encode_sparse_delta(_sparse(), TOPK), "embed.weight", fn)
    for layout in (LAYOUTS.contribution, None):
        with pytest.raises(ArtifactRefused) as e:
            decode_sparse_delta(blob, layout)
        assert e.value.reason == "bad_index"


def test_a_run_without_sparse_layout_refuses_sparse_blobs_and_the_manifest_format_is_checked():
    blob = encode_sparse_delta(_sparse(), TOPK)
    with pytest.raises(ArtifactRefused):
        decode_contribution(blob, ArtifactLayouts.from_shapes(SHAPES).contribution)
    from validator.evaluation import check_declared_format

    check_declared_format(blob, SPARSE_DELTA_FORMAT)
    with pytest.raises(ArtifactRefused, match="manifest says"):
        check_declared_format(blob, "gradswarm-delta-int8-blockwise")


# ---------------------------------------------------------------------------------------------------
# error feedback


def test_error_feedback_loses_nothing_and_sends_what_accumulates():
    shapes = [torch.Size([4096]), torch.Size([10])]
    ef = ErrorFeedback(shapes, TOPK)
    g = torch.Generator().manual_seed(0)
    total_in = [torch.zeros(s) for s in shapes]
    total_sent = [torch.zeros(s) for s in shapes]
    for _ in range(5):
        delta = [torch.randn(s, generator=g) for s in shapes]
        sent = ef.step(delta)
        for a, d in zip(total_in, delta, strict=True):
            a += d
        for a, s in zip(total_sent, sent, strict=True):
            a += s
        assert int((sent[0] != 0).sum()) <= 4 * TOPK.k
    for i, s, e in zip(total_in, total_sent, ef.buffers, strict=True):
        assert torch.allclose(s + e, i, atol=1e-5)  # sent + still owed = everything trained
    # a constant small signal the top-k never picks at first is sent once it has accumulated
    ef = ErrorFeedback([torch.Size([1024])], TOPK)
    small = torch.zeros(1024)
    small[5] = 0.1
    big = torch.zeros(1024)
    big[100:116] = 1.0
    assert ef.step([big + small])[0][5] == 0
    for _ in range(20):
        sent = ef.step([small])[0]
    assert ef.buffers[0][5].abs() < 0.1 + 1e-6


def test_error_feedback_bounds_the_norm_and_ignores_non_finite_deltas():
    ef = ErrorFeedback([torch.Size([2048])], TOPK)
    sent = ef.step([torch.full((2048,), 10.0)], max_norm=1.0)
    assert float(sent[0].norm()) <= 1.0 + 1e-3
    before = ef.buffers[0].clone()
    nan = torch.full((2048,), float("nan"))
    ef.step([nan])
    assert torch.equal(ef.buffers[0], before)


def test_error_feedback_keeps_exactly_what_the_int8_rounding_did_not_send():
    ef = ErrorFeedback([torch.Size([4096])], TOPK, decay=0.9)
    g = torch.Generator().manual_seed(4)
    acc = torch.randn(4096, generator=g)
    (sent,) = ef.step([acc.clone()])
    kept = sent != 0
    idx, _, _ = quantize_topk(acc, TOPK)
    assert int(kept.sum()) <= TOPK.entries(4096)
    # e = what accumulated − exactly the decoded Δ̂: zero nowhere it was rounded, untouched elsewhere
    assert torch.equal(ef.buffers[0], acc - sent)
    assert float(ef.buffers[0][kept].abs().max()) > 0  # the rounding error of the sent values is owed
    assert torch.equal(ef.buffers[0][~kept], acc[~kept])
    # and the Δ̂ is exactly what the published blob and the wire carry
    blob = encode_sparse_delta({"w": sent}, TOPK)
    assert torch.equal(decode_sparse_delta(blob, None)["w"], sent)
    assert torch.equal(decode_wire_part(encode_wire_part(sent, TOPK), 4096, TOPK), sent)
    # next round: β·e + Δ, so the rounding residue is sent later
    delta = torch.randn(4096, generator=g)
    before = ef.buffers[0].clone()
    (sent2,) = ef.step([delta])
    assert torch.allclose(ef.buffers[0] + sent2, 0.9 * before + delta, atol=1e-6)


def _with_tensor(blob: bytes, key: str, dtype, fn) -> bytes:
    """The blob with tensor ``key`` rewritten in place by ``fn`` (same size)."""
    header, data = _split(blob)
    lo, hi = header[key]["data_offsets"]
    t = fn(torch.frombuffer(bytearray(data[lo:hi]), dtype=dtype).clone())
    return _rebuild(header, data[:lo] + t.numpy().tobytes() + data[hi:])


@pytest.mark.parametrize(
    "key, dtype, fn",
    [
        ("embed.weight::scale", torch.float32, lambda t: t.index_fill(0, torch.tensor([0]), float("nan"))),
        ("embed.weight::scale", torch.float32, lambda t: t.index_fill(0, torch.tensor([0]), float("inf"))),
        ("embed.weight::scale", torch.float32, lambda t: t.index_fill(0, torch.tensor([0]), -1e-3)),
        ("embed.weight::scale", torch.float32, lambda t: t.index_fill(0, torch.tensor([0]), 2.0**126)),
        ("embed.weight::scale", torch.float32, lambda t: t.index_fill(0, torch.tensor([0]), 0.1)),
        ("embed.weight::val", torch.int8, lambda t: t.index_fill(0, torch.tensor([0]), -128)),
    ],
)
def test_published_deltas_with_malformed_scales_or_codes_are_refused(key, dtype, fn):
    blob = _with_tensor(encode_sparse_delta(_sparse(), TOPK), key, dtype, fn)
    for layout in (LAYOUTS.contribution, None):
        with pytest.raises(ArtifactRefused) as e:
            decode_contribution(blob, layout)
        assert e.value.reason == "bad_value"


def test_retired_v1_blobs_are_refused_by_name():
    from safetensors.torch import save

    t = torch.randn(2048)
    idx, val = torch.arange(0, 2048, 64, dtype=torch.int16), t[::64].half()
    meta = {
        "format": "gradswarm-delta-topk-v1",
        "chunk": "1024",
        "k": "16",
        "shapes": json.dumps({"w": [2048]}),
    }
    blob = save({"w::idx": idx, "w::val": val}, metadata=meta)
    layouts = ArtifactLayouts.from_shapes({"w": (2048,)}, topk=(1024, 16))
    for layout in (layouts.contribution, None):
        with pytest.raises(ArtifactRefused, match="retired") as e:
            decode_contribution(blob, layout)
        assert e.value.reason == "bad_metadata"
    with pytest.raises(ArtifactRefused, match="retired"):
        check_blob_header(blob, kind="contribution", layout=layouts.contribution)


def test_error_feedback_is_checkpointed_and_reset_on_resync():
    run = load_run_config("debug")
    run = override(run, train=override(run.train, topk_density=1 / 64))
    model = build_model(run)
    state = DilocoState(model, run.train)
    state.enable_topk(TopK.from_train(run.train))
    state.begin_round()
    with torch.no_grad():
        for p in state.params:
            p.add_(torch.randn_like(p) * 0.01)
    sent = state.pseudo_gradient()
    assert sum(int((s != 0).sum()) for s in sent) < 0.1 * sum(s.numel() for s in sent)
    saved = {k: v.clone() for k, v in state.state_dict().items()}
    assert any(k.startswith("error_feedback/") for k in saved)
    owed = state.error_feedback.norm()
    assert owed > 0
    # a restart: a fresh peer loads the checkpoint and owes the same
    fresh = DilocoState(build_model(run), run.train)
    fresh.enable_topk(TopK.from_train(run.train))
    fresh.load_state_dict(saved)
    assert fresh.error_feedback.norm() == pytest.approx(owed)
    # a resync (the swarm's state downloaded): the residual belongs to the state left behind
    fresh.load_state_tensors(fresh.state_tensors())
    assert fresh.error_feedback.norm() == 0
    # an older checkpoint without error feedback loads with zeros
    old = {k: v for k, v in saved.items() if not k.startswith("error_feedback/")}
    fresh.load_state_dict(old)
    assert fresh.error_feedback.norm() == 0


# ---------------------------------------------------------------------------------------------------
# the wire format


def test_wire_parts_round_trip_and_refuse_what_no_honest_peer_sends():
    part = sparsify(torch.randn(70_000), TOPK)
    msg = encode_wire_part(part, TOPK)
    assert torch.equal(decode_wire_part(msg, part.numel(), TOPK), part)
    blocks = -(-70_000 // TOPK.chunk)
    assert len(msg.buffer) == 6 * blocks + 3 * int((part != 0).sum())  # count+scale a chunk, 3 B an entry
    with pytest.raises(WireRefused):
        decode_wire_part(msg, part.numel() + 1, TOPK)  # another size than the part we expect
    bad = type(msg)()
    bad.CopyFrom(msg)
    bad.buffer = msg.buffer[:-2]
    with pytest.raises(WireRefused):
        decode_wire_part(bad, part.numel(), TOPK)
    bad.buffer = struct.pack("<H", 1025) + msg.buffer[2:]  # count beyond its chunk
    with pytest.raises(WireRefused):
        decode_wire_part(bad, part.numel(), TOPK)
    bad.buffer = msg.buffer
    bad.dtype = "float32"
    with pytest.raises(WireRefused):
        decode_wire_part(bad, part.numel(), TOPK)
    bad.dtype = WIRE_DTYPE_V1
    with pytest.raises(WireRefused, match="retired"):
        decode_wire_part(bad, part.numel(), TOPK)
    wrapped = type(msg)()
    wrapped.CopyFrom(msg)
    del wrapped.size[:]
    wrapped.size.extend([2422082636, 201750124, 151])  # product = 70 000 + 4·2^64: wraps in int64
    with pytest.raises(WireRefused, match="expected 70000 values"):
        decode_wire_part(wrapped, part.numel(), TOPK)


def _wire_with(msg, blocks: int, *, scale=None, code=None, pos=None):
    """``msg`` with block 0's scale, entry 0's code or entry 1's position overwritten."""
    buf = bytearray(msg.buffer)
    m = (len(buf) - 6 * blocks) // 3
    if scale is not None:
        buf[2 * blocks : 2 * blocks + 4] = struct.pack("<f", scale)
    if code is not None:
        buf[6 * blocks + 2 * m] = code & 0xFF
    if pos is not None:
        buf[6 * blocks + 2 : 6 * blocks + 4] = struct.pack("<H", pos)
    out = type(msg)()
    out.CopyFrom(msg)
    out.buffer = bytes(buf)
    return out


@pytest.mark.parametrize(
    "change",
    [
        {"scale": float("nan")},
        {"scale": float("inf")},
        {"scale": -1.0},
        {"scale": 0.0},  # zero scale with entries
        {"scale": 2.0**125},  # 127 × it overflows fp32
        {"scale": 0.1},  # low mantissa bits set: no honest encoder writes it
        {"code": -128},
        {"code": 0},
        {"pos": 1024},  # outside the chunk
        {"pos": 0},  # not ascending after entry 0
    ],
)
def test_wire_parts_with_a_malformed_scale_code_or_position_are_refused(change):
    part = sparsify(torch.randn(5000, generator=torch.Generator().manual_seed(1)), TOPK)
    msg = encode_wire_part(part, TOPK)
    with pytest.raises(WireRefused):
        decode_wire_part(_wire_with(msg, 5, **change), part.numel(), TOPK)


def test_wire_is_lossless_for_a_delta_hat_at_any_part_offset_and_averages_round_once():
    ef = ErrorFeedback([torch.Size([20_000])], TOPK, decay=0.95)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        (sent,) = ef.step([torch.randn(20_000, generator=g) * 0.01], max_norm=0.3)
        for lo, hi in [(0, 20_000), (1000, 9000), (2048, 6144), (333, 19_999)]:
            part = sent[lo:hi]
            msg = encode_wire_part(part, TOPK, lo)  # chunks cut by the part's ends included
            assert torch.equal(decode_wire_part(msg, part.numel(), TOPK, lo), part)
            with pytest.raises(WireRefused):  # decoded at another offset, the blocks do not line up
                decode_wire_part(msg, part.numel(), TOPK, lo + 512)
    avg = sum(sparsify(torch.randn(20_000, generator=g), TOPK) for _ in range(4)) / 4
    once = wire_roundtrip(avg, TOPK)
    assert torch.equal(wire_roundtrip(once, TOPK), once)  # rounding is idempotent: the owner's own bytes
    support = avg != 0
    assert not bool(once[~support].any())
    step = torch.stack([c.abs().max() for c in avg.split(TOPK.chunk)]) / 127  # per-chunk step
    err = (once - avg).abs().split(TOPK.chunk)
    assert all(float(e.max()) <= 0.5 * float(s) * (1 + 2**-15) for e, s in zip(err, step, strict=True))
    nan = avg.clone()
    nan[7] = float("nan")
    assert bool(wire_roundtrip(nan, TOPK).isnan().all())  # receivers refuse it: the owner zeroes it too


def test_excess_entries_counts_per_chunk_of_the_tensor():
    from hivemind.compression import CompressionInfo

    t = torch.zeros(4096)
    info = CompressionInfo.from_tensor(t).get_part(1, 1000)  # values 1000..1999 of the tensor
    part = torch.zeros(1000)
    part[24:40] = 1.0  # 16 non-zeros in chunk 1 (values 1024..1039)
    assert not excess_entries(part, info, TOPK)
    part[50] = 1.0  # 17 in chunk 1
    assert excess_entries(part, info, TOPK)
    assert not excess_entries(part, info, TOPK, senders=2)


def test_without_a_layout_a_small_blob_cannot_claim_a_huge_dense_delta():
    huge = TopK(chunk=32768, k=1)
    n = 32768 * 4000  # 131M values (512 MB dense) from 4000 entries (~16 kB)
    idx = torch.zeros(4000, dtype=torch.int16)
    val = torch.ones(4000, dtype=torch.int8)
    from safetensors.torch import save

    blob = save(
        {"w::idx": idx, "w::val": val, "w::scale": torch.ones(4000)},
        metadata={
            "format": SPARSE_DELTA_FORMAT,
            "chunk": str(huge.chunk),
            "k": str(huge.k),
            "shapes": json.dumps({"w": [n]}),
        },
    )
    with pytest.raises(ArtifactRefused) as e:
        decode_sparse_delta(blob, None)
    assert e.value.reason == "too_large"
    with pytest.raises(ArtifactRefused):  # and the model's layout refuses it outright
        decode_contribution(blob, LAYOUTS.contribution)
