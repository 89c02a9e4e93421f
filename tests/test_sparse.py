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
    ErrorFeedback,
    TopK,
    WireRefused,
    decode_contribution,
    decode_sparse_delta,
    decode_wire_part,
    encode_sparse_delta,
    encode_wire_part,
    excess_entries,
    select_topk,
    sparsify,
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


def test_topk_keeps_the_largest_entries_of_every_chunk_and_rounds_to_fp16():
    t = torch.randn(2 * 1024 + 10)
    s = sparsify(t, TOPK)
    for lo in (0, 1024, 2048):
        chunk, kept = t[lo : lo + 1024], s[lo : lo + 1024]
        k = min(16, chunk.numel())
        assert int((kept != 0).sum()) == k
        top = chunk.abs().topk(k).indices
        assert torch.equal(kept[top], chunk[top].half().float())
    idx, val = select_topk(t, TOPK)
    assert idx.dtype == torch.int16 and val.dtype == torch.float16 and idx.numel() == TOPK.entries(t.numel())


def test_sparse_delta_round_trips_exactly_and_is_small():
    sp = _sparse()
    blob = encode_sparse_delta(sp, TOPK)
    for layout in (LAYOUTS.contribution, LAYOUTS.contribution.sparse, None):
        out = decode_contribution(blob, layout)
        assert all(torch.equal(out[n], sp[n]) for n in SHAPES)
    dense_fp32 = 4 * sum(t.numel() for t in sp.values())
    assert len(blob) < 0.1 * dense_fp32  # 16/1024 entries × 4 bytes, plus the header
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
    assert layout.tensors["a::idx"].dtype == "I16" and layout.tensors["a::val"].dtype == "F16"


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
    msg = encode_wire_part(part)
    assert torch.equal(decode_wire_part(msg, part.numel()), part)
    assert len(msg.buffer) == 4 * 2 + 4 * int((part != 0).sum())
    with pytest.raises(WireRefused):
        decode_wire_part(msg, part.numel() + 1)  # another size than the part we expect
    bad = type(msg)()
    bad.CopyFrom(msg)
    bad.buffer = msg.buffer[:-2]
    with pytest.raises(WireRefused):
        decode_wire_part(bad, part.numel())
    bad.buffer = struct.pack("<ii", 70_000, 0) + msg.buffer[8:]  # count beyond its block
    with pytest.raises(WireRefused):
        decode_wire_part(bad, part.numel())
    bad.buffer = msg.buffer
    bad.dtype = "float32"
    with pytest.raises(WireRefused):
        decode_wire_part(bad, part.numel())


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
    val = torch.ones(4000, dtype=torch.float16)
    from safetensors.torch import save

    blob = save(
        {"w::idx": idx, "w::val": val},
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
