"""Sparse pseudo-gradients: chunk-wise top-k, int8 values, error feedback (``--compression topk``).

The rule (SparseLoCo, Sarfi et al. 2025, with 8-bit instead of 2-bit values; see README "Sparse Δs"):
each peer keeps an error-feedback buffer e (fp32, one per parameter tensor) and at the end of round r

    e ← β·e + Δ_r                   (β = ``train.topk_ef_decay``)
    Δ̂_r = Q(top-k of e per chunk)   (k = ``train.topk_density`` × ``train.topk_chunk`` largest |values|
                                     of every chunk of ``topk_chunk`` consecutive values of a flattened
                                     tensor; a tensor's last, shorter chunk keeps min(k, its length);
                                     Q: int8 code × one fp32 scale per chunk, scale = absmax / 127)
    e ← e − Δ̂_r                     (what was not sent — and the int8 rounding — is sent later)

Δ̂_r is what the peer both averages and publishes. Its values are exactly ``code × scale`` with scales
whose low 7 mantissa bits are clear (:func:`round_scale`), so the product is exact in fp32 and
re-encoding a decoded chunk gives the same bytes:

* **on the wire** (:class:`peer.training.allreduce.TopKWireCompression`, a hivemind compression) a
  part is sent block by block, one block per top-k chunk of the tensor it is a slice of: uint16 count
  and fp32 scale per block, uint16 position and int8 code per entry (:data:`WIRE_DTYPE`, v2) —
  lossless for a peer's Δ̂, so the owner averages exactly the published values. The owner's average
  (the robust rule runs on the densified parts, unchanged) is sent back the same way: its support is the
  union of the senders' supports, its values rounded to int8 × a per-chunk scale once — the owner
  applies that rounded average itself (:func:`wire_roundtrip`, ``ConsensusAllReduceRunner._roundtrip``),
  so every peer stays bit-identical.
* **published** (:func:`encode_sparse_delta`) it is a safetensors file of its own format
  (:data:`peer.net.layout.SPARSE_DELTA_FORMAT`, v2): per parameter ``n::idx`` (int16 positions inside
  each chunk, ascending), ``n::val`` (int8 codes), exactly ``entries(numel)`` of each, and ``n::scale``
  (fp32, one per chunk) — the layout is fixed by the model and the run config, so a validator checks it
  before allocating (:func:`peer.net.layout.sparse_delta_layout`) and :func:`decode_sparse_delta` checks
  every index, code and scale. The v1 formats (fp16 values) are refused by name: a swarm runs one wire
  format, and a v1 Δ was never averaged by a v2 swarm.

Everything here is deterministic and pure torch on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from peer.net.layout import SPARSE_DELTA_FORMAT, SPARSE_DELTA_FORMAT_V1, ArtifactRefused, Layout
from peer.training.robust import AGGREGATIONS

if TYPE_CHECKING:  # hivemind only where the all-reduce runs: validators import this module too
    from hivemind.compression import CompressionInfo

WIRE_DTYPE = "gradswarm-topk-wire-v2"
"""``runtime_pb2.Tensor.dtype`` of a sparse all-reduce part (hivemind's own codecs never write it)."""
WIRE_DTYPE_V1 = "gradswarm-topk-wire-v1"
"""The retired fp16-value wire format (refused with a reason that names the upgrade)."""
QMAX = 127
"""Largest |int8 code|: values are code × scale, scale = absmax / 127 per chunk."""
SCALE_FREE_BITS = 7
"""Low fp32 mantissa bits every scale has cleared (17 significant bits + 7-bit codes = exact products)."""
MAX_SCALE = 2.0**120
"""Largest scale a decoder accepts (127 × it is finite in fp32)."""
MAX_EXPANSION = 1024
"""Without a model layout, a sparse Δ may expand to at most this × its bytes (3 bytes an entry and a
4-byte scale a chunk: density ≥ ~1/700)."""


@dataclass(frozen=True)
class TopK:
    """Which entries a sparse Δ keeps: the ``k`` largest |values| of every ``chunk`` consecutive values."""

    chunk: int
    k: int
    aggregation: str = "support"
    """How a part owner combines the senders' Δ̂s (``TrainConfig.topk_aggregation``): ``support`` or
    ``mean`` (:func:`peer.training.robust.weighted_mean`)."""

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.chunk <= 32768:  # int16 positions inside a chunk
            raise ValueError(f"top-k needs 1 <= k <= chunk <= 32768, got k={self.k}, chunk={self.chunk}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"top-k aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")

    @classmethod
    def from_train(cls, train) -> TopK:
        """The swarm's top-k from a :class:`peer.config.TrainConfig` (``topk_density``, ``topk_chunk``,
        ``topk_aggregation``)."""
        return cls(chunk=train.topk_chunk, k=train.topk_k, aggregation=train.topk_aggregation)

    @property
    def density(self) -> float:
        return self.k / self.chunk

    def entries(self, numel: int) -> int:
        """Entries a tensor of ``numel`` values keeps: k per full chunk, min(k, rest) of the last one."""
        full, rest = divmod(numel, self.chunk)
        return full * self.k + min(self.k, rest)


# ---------------------------------------------------------------------------------------------------
# int8 values with one fp32 scale per chunk


def round_scale(scale: torch.Tensor, up: bool = True) -> torch.Tensor:
    """fp32 scales with their low :data:`SCALE_FREE_BITS` mantissa bits cleared (rounded up or down):
    17 significant bits, so ``code × scale`` is exact in fp32 for every |code| ≤ 127 and
    ``round_scale(127 × s / 127) == s`` — a decoded chunk re-encodes to the same bytes. Non-finite
    scales become NaN (never a small number: the bit trick must not hide them)."""
    s = scale.to(torch.float32).contiguous()
    finite = torch.isfinite(s) & (s >= 0)
    low = (1 << SCALE_FREE_BITS) - 1
    bits = torch.where(finite, s, torch.zeros_like(s)).view(torch.int32)
    bits = ((bits + low) if up else bits) & ~low
    return torch.where(finite, bits.view(torch.float32), torch.full_like(s, float("nan")))


def canonical_scale(scale: torch.Tensor) -> torch.Tensor:
    """True where a scale is one an honest encoder writes: finite, ≥ 0, low mantissa bits clear, and
    127 × scale finite."""
    s = scale.to(torch.float32).contiguous()
    ok = torch.isfinite(s) & (s >= 0) & (s <= MAX_SCALE)
    low = (1 << SCALE_FREE_BITS) - 1
    return ok & ((torch.where(ok, s, torch.zeros_like(s)).view(torch.int32) & low) == 0)


def quantize_blocks(
    val: torch.Tensor, block_of: torch.Tensor, blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes int8, scales fp32)`` of fp32 values grouped into ``blocks`` blocks (``block_of``: each
    value's block, non-decreasing or not): scale = absmax / 127 rounded up (:func:`round_scale`), code =
    round(value / scale) ∈ [−127, 127]. A block holding a non-finite value gets a NaN scale (decoders
    refuse it). Values already of the form code × canonical scale come back exactly."""
    val = val.reshape(-1).to(torch.float32)
    block_of = block_of.reshape(-1).to(torch.int64)
    if blocks == 0:
        return torch.zeros(0, dtype=torch.int8), torch.zeros(0, dtype=torch.float32)
    bad = ~torch.isfinite(val)
    safe = torch.where(bad, torch.zeros_like(val), val)
    absmax = torch.zeros(blocks, dtype=torch.float32).scatter_reduce_(
        0, block_of, safe.abs(), reduce="amax", include_self=True
    )
    scales = round_scale(absmax / QMAX)
    if bool(bad.any()):
        scales[block_of[bad]] = float("nan")
    s = scales[block_of]
    ok = torch.isfinite(s) & (s > 0)
    codes = torch.where(ok, torch.round(safe / torch.where(ok, s, torch.ones_like(s))), torch.zeros_like(s))
    return codes.clamp_(-QMAX, QMAX).to(torch.int8), scales


def dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor, block_of: torch.Tensor) -> torch.Tensor:
    """fp32 ``code × scale`` (exact: see :func:`round_scale`)."""
    return codes.reshape(-1).to(torch.float32) * scales[block_of.reshape(-1).to(torch.int64)]


# ---------------------------------------------------------------------------------------------------
# selection


def select_topk(flat: torch.Tensor, topk: TopK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx int16, val fp32)`` of the top-k entries of each chunk of a flat tensor, chunk after chunk,
    positions ascending inside each chunk (so equal Δs give equal bytes). Values are not rounded."""
    flat = flat.detach().reshape(-1).to("cpu", torch.float32)
    n, c, k = flat.numel(), topk.chunk, topk.k
    full = (n // c) * c
    idx_parts, val_parts = [], []
    if full:
        x = flat[:full].view(-1, c)
        _, idx = x.abs().topk(k, dim=1, sorted=False)
        idx, _ = idx.sort(dim=1)
        idx_parts.append(idx.reshape(-1))
        val_parts.append(x.gather(1, idx).reshape(-1))
    if full < n:
        tail = flat[full:]
        kk = min(k, tail.numel())
        _, idx = tail.abs().topk(kk, sorted=False)
        idx, _ = idx.sort()
        idx_parts.append(idx)
        val_parts.append(tail[idx])
    if not idx_parts:
        return torch.zeros(0, dtype=torch.int16), torch.zeros(0, dtype=torch.float32)
    return torch.cat(idx_parts).to(torch.int16), torch.cat(val_parts)


def entry_chunks(numel: int, topk: TopK) -> torch.Tensor:
    """The chunk (int64) of every entry of a sparse tensor of ``numel`` values: k per full chunk, then
    min(k, rest) in the last one."""
    c, k = topk.chunk, topk.k
    full_chunks = numel // c
    chunk_of = torch.empty(topk.entries(numel), dtype=torch.int64)
    chunk_of[: full_chunks * k] = torch.arange(full_chunks).repeat_interleave(k)
    chunk_of[full_chunks * k :] = full_chunks
    return chunk_of


def chunks_of(numel: int, topk: TopK) -> int:
    """Chunks (hence scales) of a tensor of ``numel`` values."""
    return -(-numel // topk.chunk)


def quantize_topk(flat: torch.Tensor, topk: TopK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(idx int16, codes int8, scales fp32)``: the top-k entries of every chunk, their values as int8
    codes with one scale per chunk (:func:`quantize_blocks`) — the published sparse Δ's tensors."""
    n = flat.numel()
    idx, val = select_topk(flat, topk)
    codes, scales = quantize_blocks(val, entry_chunks(n, topk), chunks_of(n, topk))
    return idx, codes, scales


def densify(
    idx: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, numel: int, topk: TopK
) -> torch.Tensor:
    """fp32 flat tensor of ``numel`` values from :func:`quantize_topk`'s output, checked first: exactly
    ``topk.entries(numel)`` entries and one scale per chunk, every position inside its chunk, strictly
    ascending per chunk, codes in [−127, 127], scales canonical (:func:`canonical_scale`). Raises
    :class:`ArtifactRefused` (``bad_index`` / ``bad_shape`` / ``bad_value``); allocates only the output."""
    want = topk.entries(numel)
    if idx.numel() != want or codes.numel() != want or scales.numel() != chunks_of(numel, topk):
        raise ArtifactRefused("bad_shape", f"sparse tensor of {numel} values needs {want} entries")
    if codes.dtype != torch.int8 or scales.dtype != torch.float32:
        raise ArtifactRefused("bad_dtype", "sparse Δ values must be int8 codes with fp32 scales")
    out = torch.zeros(numel, dtype=torch.float32)
    if want == 0:
        return out
    if not bool(canonical_scale(scales).all()):
        raise ArtifactRefused("bad_value", "sparse Δ scale not finite, negative, too large or not canonical")
    if bool((codes.reshape(-1) == -128).any()):
        raise ArtifactRefused("bad_value", "sparse Δ code -128 (codes are in [-127, 127])")
    c = topk.chunk
    pos = idx.reshape(-1).to(torch.int64)
    chunk_of = entry_chunks(numel, topk)
    limit = torch.clamp(numel - chunk_of * c, max=c)
    if bool(((pos < 0) | (pos >= limit)).any()):
        raise ArtifactRefused("bad_index", "sparse Δ index outside its chunk")
    if want > 1:
        same_chunk = chunk_of[1:] == chunk_of[:-1]
        if bool((same_chunk & (pos[1:] <= pos[:-1])).any()):
            raise ArtifactRefused("bad_index", "sparse Δ indices not strictly ascending inside a chunk")
    out[chunk_of * c + pos] = dequantize_blocks(codes, scales, chunk_of)
    return out


def sparsify(t: torch.Tensor, topk: TopK) -> torch.Tensor:
    """``t`` with everything but its per-chunk top-k zeroed and the kept values rounded to int8 × the
    chunk's scale (exactly what the published Δ and the wire carry). A chunk with a non-finite value
    comes back all NaN (the all-reduce refuses it)."""
    n = t.numel()
    idx, codes, scales = quantize_topk(t, topk)
    if not bool(torch.isfinite(scales).all()):
        out = sparsify(torch.nan_to_num(t.detach().float(), nan=0.0, posinf=0.0, neginf=0.0), topk).reshape(
            -1
        )
        bad = ~torch.isfinite(scales)
        out.view(-1)[bad.repeat_interleave(topk.chunk)[:n]] = float("nan")
        return out.view(t.shape)
    return densify(idx, codes, scales, n, topk).view(t.shape)


def chunk_counts(flat: torch.Tensor, offset: int, chunk: int) -> torch.Tensor:
    """Non-zero entries of ``flat`` (a slice starting at value ``offset`` of a flattened tensor) in each
    of the tensor's chunks it overlaps."""
    pos = torch.nonzero(flat.reshape(-1)).view(-1) + offset
    if pos.numel() == 0:
        return torch.zeros(0, dtype=torch.int64)
    return torch.bincount(pos // chunk - offset // chunk)


def excess_entries(part: torch.Tensor, info: CompressionInfo | None, topk: TopK, senders: int = 1) -> bool:
    """True if a part (of the tensor ``info`` describes) holds more non-zeros in some chunk than
    ``senders`` honest top-k Δs can: k per chunk each (min(k, length) for a tensor's last chunk)."""
    flat = part.reshape(-1)
    offset = 0
    if info is not None and info.part_size is not None:
        offset = info.part_index * info.part_size
    counts = chunk_counts(flat, offset, topk.chunk)
    return bool(counts.numel()) and int(counts.max()) > senders * topk.k


# ---------------------------------------------------------------------------------------------------
# error feedback


class ErrorFeedback:
    """Per-peer error-feedback buffers (fp32, one per parameter tensor) and the top-k step."""

    def __init__(self, shapes: Sequence[torch.Size], topk: TopK, decay: float = 1.0):
        self.topk = topk
        self.decay = decay
        self.buffers = [torch.zeros(s, dtype=torch.float32) for s in shapes]

    def step(self, delta: Sequence[torch.Tensor], max_norm: float | None = None) -> list[torch.Tensor]:
        """Δ̂ = Q(top-k(β·e + Δ)), norm-bounded by ``max_norm``; e ← β·e + Δ − Δ̂, where Δ̂ is exactly
        what the published Δ and the wire decode to (int8 codes × the chunk's scale), so the
        quantisation error stays owed too. New tensors: a checkpoint being written from the old buffers
        is not torn. A non-finite Δ leaves e alone and is returned sparsified as is (NaN chunks: the
        all-reduce drops it)."""
        if not all(bool(torch.isfinite(d).all()) for d in delta):
            return [sparsify(d, self.topk) for d in delta]
        acc = [e * self.decay + d.to(torch.float32) for e, d in zip(self.buffers, delta, strict=True)]
        quantized = [quantize_topk(a, self.topk) for a in acc]
        sent = [densify(*q, a.numel(), self.topk).view(a.shape) for q, a in zip(quantized, acc, strict=True)]
        norm = math.sqrt(sum(float(s.double().pow(2).sum()) for s in sent))
        if max_norm is not None and norm > max_norm:
            factor = max_norm / norm  # scales rounded down: the bound holds, codes unchanged
            sent = [
                densify(idx, codes, round_scale(scales * factor, up=False), a.numel(), self.topk).view(
                    a.shape
                )
                for (idx, codes, scales), a in zip(quantized, acc, strict=True)
            ]
        self.buffers = [a - s for a, s in zip(acc, sent, strict=True)]
        return sent

    def reset(self) -> None:
        """Forget what was not sent (after adopting another state: the residual belongs to the old one)."""
        self.buffers = [torch.zeros_like(b) for b in self.buffers]

    def norm(self) -> float:
        return math.sqrt(sum(float(b.double().pow(2).sum()) for b in self.buffers))


# ---------------------------------------------------------------------------------------------------
# the published format


def encode_sparse_delta(delta: Mapping[str, torch.Tensor], topk: TopK) -> bytes:
    """A Δ̂ (fp32 tensors, at most k non-zeros per chunk) as sparse safetensors bytes (module docstring):
    per parameter ``n::idx`` (int16), ``n::val`` (int8 codes), ``n::scale`` (fp32, one per chunk).
    Lossless for a Δ̂ from :class:`ErrorFeedback` (its values are already code × canonical scale); a
    tensor with more non-zeros per chunk (e.g. an average) is re-sparsified to its top-k and rounded."""
    import json

    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    shapes = {}
    for name, t in delta.items():
        idx, codes, scales = quantize_topk(t, topk)
        tensors[f"{name}::idx"] = idx
        tensors[f"{name}::val"] = codes
        tensors[f"{name}::scale"] = scales
        shapes[name] = list(t.shape)
    meta = {
        "format": SPARSE_DELTA_FORMAT,
        "chunk": str(topk.chunk),
        "k": str(topk.k),
        "shapes": json.dumps(shapes),
    }
    return save(tensors, metadata=meta)


def decode_sparse_delta(data: bytes, layout: Layout | None = None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_sparse_delta`, total: any malformed blob raises :class:`ArtifactRefused`.

    The header is checked first (:func:`peer.net.layout.check_sparse_delta_header`, against ``layout``
    when given: exact tensors, chunk and k of the run; a retired v1 blob is refused by name); then every
    tensor's indices, codes and scales (:func:`densify`). Memory: the blob's tensors plus the dense fp32
    Δ of the shapes the header names (with a layout: the model's; without one at most
    :data:`MAX_EXPANSION` × the blob)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    from peer.net.layout import check_sparse_delta_header, delta_layout_for, parse_header

    layout = delta_layout_for(data, None, layout)
    if layout is not None and layout.topk is None:
        raise ArtifactRefused("bad_metadata", "this run's Δs are 8-bit, not sparse")
    header = parse_header(data, layout=layout)
    topk_raw, shapes = check_sparse_delta_header(header, layout)
    topk = TopK(chunk=topk_raw[0], k=topk_raw[1])
    dense = 4 * sum(math.prod(s) for s in shapes.values())
    if layout is None and dense > MAX_EXPANSION * len(data) + (1 << 20):
        raise ArtifactRefused(
            "too_large", f"sparse Δ of {len(data)} bytes would expand to {dense} (> {MAX_EXPANSION}×)"
        )
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:  # unreachable after the header checks
        raise ArtifactRefused("bad_header", f"malformed sparse Δ blob: {e}") from None
    out = {}
    for name, shape in shapes.items():
        t = [tensors[f"{name}::{part}"] for part in ("idx", "val", "scale")]
        out[name] = densify(*t, math.prod(shape), topk).view(shape)
    return out


def decode_contribution(data: bytes, layout: Layout | None = None) -> dict[str, torch.Tensor]:
    """Any published Δ — 8-bit dense or sparse, as its ``format`` says — as fp32 tensors; ``layout`` is
    the model's contribution layout (its :attr:`~peer.net.layout.Layout.sparse` the run's sparse one)."""
    from peer.net.layout import delta_layout_for
    from peer.net.outbox import decode_delta

    chosen = delta_layout_for(data, None, layout)
    if chosen is not None and chosen.topk is not None:
        return decode_sparse_delta(data, chosen)
    if layout is None and _declares_sparse(data):
        return decode_sparse_delta(data, None)
    return decode_delta(data, chosen)


def _declares_sparse(data: bytes) -> bool:
    """Without a model layout: does the (generically checked) header say ``format`` = sparse?"""
    from peer.net.layout import parse_header

    return parse_header(data).metadata.get("format") in (SPARSE_DELTA_FORMAT, SPARSE_DELTA_FORMAT_V1)


# ---------------------------------------------------------------------------------------------------
# the all-reduce wire format


def part_offset(info: CompressionInfo | None) -> int:
    """Where a hivemind part starts in its (flat) tensor: ``part_index × part_size`` (0 without info)."""
    if info is None or info.part_size is None:
        return 0
    return int(info.part_index) * int(info.part_size)


def _wire_blocks(n: int, offset: int, chunk: int) -> tuple[int, int]:
    """``(r, blocks)``: the part starts ``r`` values into a top-k chunk and overlaps ``blocks`` chunks."""
    r = offset % chunk
    return r, (-(-(r + n) // chunk) if n else 0)


def encode_wire_part(tensor: torch.Tensor, topk: TopK, offset: int = 0):
    """``runtime_pb2.Tensor`` of a part's non-zero entries, block by block, where the blocks are the
    top-k chunks of the tensor the part is a slice of (the part starts at value ``offset`` of it):

        uint16 count per block | fp32 scale per block | uint16 position in the chunk per entry |
        int8 code per entry

    Values are code × scale (:func:`quantize_blocks`), so a Δ̂ from :class:`ErrorFeedback` travels
    exactly and an average is rounded once. Zero codes are left out; a block with a non-finite value
    gets a NaN scale and no entries (the receiver refuses the part)."""
    from hivemind.proto import runtime_pb2

    flat = tensor.detach().reshape(-1).to("cpu", torch.float32)
    n, c = flat.numel(), topk.chunk
    r, blocks = _wire_blocks(n, offset, c)
    pos = torch.nonzero(flat).view(-1)  # NaN counts as non-zero: its block's scale becomes NaN
    block_of = (pos + r) // c
    codes, scales = quantize_blocks(flat[pos], block_of, blocks)
    partial = set()  # chunks cut by the part's boundaries: their absmax may lie in the neighbour part
    if blocks and r:
        partial.add(0)
    if blocks and (r + n) % c:
        partial.add(blocks - 1)
    for b in sorted(partial):
        sel = block_of == b
        scale = _exact_scale(flat[pos[sel]])
        if scale is not None:
            scales[b] = scale
            codes[sel] = torch.round(flat[pos[sel]] / scale).to(torch.int8) if scale > 0 else 0
    keep = codes != 0
    pos, block_of, codes = pos[keep], block_of[keep], codes[keep]
    counts = torch.bincount(block_of, minlength=blocks)[:blocks] if blocks else block_of[:0]
    buffer = b"".join(
        (
            counts.numpy().astype("<u2").tobytes(),
            scales.numpy().astype("<f4").tobytes(),
            (pos + r - block_of * c).numpy().astype("<u2").tobytes(),
            codes.numpy().astype("i1").tobytes(),
        )
    )
    return runtime_pb2.Tensor(
        buffer=buffer,
        size=list(tensor.shape),
        requires_grad=False,
        dtype=WIRE_DTYPE,
        compression=runtime_pb2.CompressionType.NONE,
    )


def _exact_scale(val: torch.Tensor) -> torch.Tensor | None:
    """A canonical scale that represents every value of a (small) block exactly as code × scale, or None
    (then the block is rounded). A chunk of a Δ̂ cut by a part boundary holds values q·s whose largest
    |q| may be below 127: s = absmax / |q| for that q, found by trying them (≤ 127 tries, 2 blocks a
    part)."""
    if val.numel() == 0 or not bool(torch.isfinite(val).all()):
        return None
    absmax = val.abs().max().reshape(1)
    for q in range(QMAX, 0, -1):
        scale = absmax / q
        if not bool(canonical_scale(scale).all()) or float(scale) == 0:
            continue
        codes = torch.round(val / scale)
        if float(codes.abs().max()) <= QMAX and torch.equal(codes * scale, val):
            return scale[0]
    return None


class WireRefused(ValueError):
    """A sparse all-reduce part that is not what an honest peer sends (the runner drops or fails it)."""


def decode_wire_part(msg, expected_numel: int, topk: TopK, offset: int = 0) -> torch.Tensor:
    """A sparse wire part (:func:`encode_wire_part`) as a dense fp32 tensor of ``expected_numel`` values,
    the slice at ``offset`` of its tensor, checked before allocating: our format, the expected size,
    counts within their chunk's share of the part, the buffer exactly as long as the counts say, every
    scale canonical (finite, ≥ 0, not beyond :data:`MAX_SCALE`, low bits clear; 0 exactly for an empty
    block), codes in [−127, 127] and non-zero, positions inside the part's share of their chunk and
    strictly ascending. Raises :class:`WireRefused`."""
    if msg.dtype == WIRE_DTYPE_V1:
        raise WireRefused(f"part in the retired format {WIRE_DTYPE_V1} (fp16 values): upgrade the peer")
    if msg.dtype != WIRE_DTYPE:
        raise WireRefused(f"part in format {msg.dtype[:40]!r}, the swarm sends {WIRE_DTYPE}")
    # exact Python ints: an int64 product wraps, and a crafted shape would pass as the expected size
    if len(msg.size) > 8 or math.prod(int(s) for s in msg.size) != expected_numel:
        raise WireRefused(f"part of shape {list(msg.size)[:8]}, expected {expected_numel} values")
    n, c = expected_numel, topk.chunk
    r, blocks = _wire_blocks(n, offset, c)
    buf = msg.buffer
    if len(buf) < 6 * blocks:
        raise WireRefused("part shorter than its block counts and scales")
    counts = np.frombuffer(buf, dtype="<u2", count=blocks).astype(np.int64)
    scales = torch.from_numpy(
        np.frombuffer(buf, dtype="<f4", count=blocks, offset=2 * blocks).astype(np.float32)
    )
    starts = np.maximum(np.arange(blocks, dtype=np.int64) * c, r)  # in chunk coordinates from block 0
    ends = np.minimum(np.arange(1, blocks + 1, dtype=np.int64) * c, r + n)
    if (counts > ends - starts).any():
        raise WireRefused("block count beyond the part's share of its chunk")
    if not bool(canonical_scale(scales).all()):
        raise WireRefused("block scale not finite, negative, too large or not canonical")
    if ((counts > 0) != (scales.numpy() > 0)).any():
        raise WireRefused("a block's scale is 0 with entries, or non-zero without")
    m = int(counts.sum())
    if len(buf) != 6 * blocks + 3 * m:
        raise WireRefused(f"part of {len(buf)} bytes, its counts say {6 * blocks + 3 * m}")
    low = np.frombuffer(buf, dtype="<u2", count=m, offset=6 * blocks).astype(np.int64)
    codes = np.frombuffer(buf, dtype="i1", count=m, offset=6 * blocks + 2 * m)
    block_of = np.repeat(np.arange(blocks, dtype=np.int64), counts)
    absolute = block_of * c + low  # position from the start of block 0's chunk
    if m and ((absolute < starts[block_of]) | (absolute >= ends[block_of])).any():
        raise WireRefused("position outside the part's share of its chunk")
    if m > 1 and ((block_of[1:] == block_of[:-1]) & (low[1:] <= low[:-1])).any():
        raise WireRefused("positions not strictly ascending")
    if m and ((codes == 0) | (codes == -128)).any():
        raise WireRefused("code 0 or -128 (an honest part sends non-zero codes in [-127, 127])")
    out = torch.zeros(n, dtype=torch.float32)
    if m:
        values = dequantize_blocks(torch.from_numpy(codes.copy()), scales, torch.from_numpy(block_of))
        out[torch.from_numpy(absolute - r)] = values
    return out.view([int(s) for s in msg.size])


def wire_roundtrip(tensor: torch.Tensor, topk: TopK, offset: int = 0) -> torch.Tensor:
    """Exactly what a receiver reconstructs from :func:`encode_wire_part`'s bytes; NaN where it would
    refuse them (a non-finite average), so the owner makes the receivers' decision
    (``ConsensusAllReduceRunner._check_average`` zeroes it)."""
    try:
        return decode_wire_part(encode_wire_part(tensor, topk, offset), tensor.numel(), topk, offset)
    except WireRefused:
        return torch.full_like(tensor, float("nan"), dtype=torch.float32)
