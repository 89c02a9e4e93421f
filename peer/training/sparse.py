"""Sparse pseudo-gradients: chunk-wise top-k with error feedback (``--compression topk``).

The rule (SparseLoCo, Sarfi et al. 2025, without its 2-bit values; see README "Sparse Δs"): each peer
keeps an error-feedback buffer e (fp32, one per parameter tensor) and at the end of round r

    e ← β·e + Δ_r                   (β = ``train.topk_ef_decay``)
    Δ̂_r = fp16(top-k of e per chunk) (k = ``train.topk_density`` × ``train.topk_chunk`` largest |values|
                                     of every chunk of ``topk_chunk`` consecutive values of a flattened
                                     tensor; a tensor's last, shorter chunk keeps min(k, its length))
    e ← e − Δ̂_r                     (what was not sent — and the fp16 rounding — is sent later)

Δ̂_r is what the peer both averages and publishes. As fp32 tensors it is zero outside the chosen
entries, and its values are exactly fp16 numbers, so:

* **on the wire** (:class:`peer.training.allreduce.TopKWireCompression`, a hivemind compression) a part is sent as its non-zero
  entries: positions (uint16 within blocks of 65 536, plus an int32 count per block) and fp16 values —
  lossless for a peer's Δ̂, so the owner averages exactly the published values. The owner's average
  (the robust rule runs on the densified parts, unchanged) is sent back the same way: its support is the
  union of the senders' supports, its values rounded to fp16 once — the owner applies that rounded
  average itself (``ConsensusAllReduceRunner._roundtrip``), so every peer stays bit-identical.
* **published** (:func:`encode_sparse_delta`) it is a safetensors file of its own format
  (:data:`peer.net.layout.SPARSE_DELTA_FORMAT`): per parameter ``n::idx`` (int16 positions inside each
  chunk, ascending) and ``n::val`` (fp16), exactly ``entries(numel)`` of each — the layout is fixed by
  the model and the run config, so a validator checks it before allocating
  (:func:`peer.net.layout.sparse_delta_layout`) and :func:`decode_sparse_delta` checks every index.

Everything here is deterministic and pure torch on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from peer.net.layout import SPARSE_DELTA_FORMAT, ArtifactRefused, Layout

if TYPE_CHECKING:  # hivemind only where the all-reduce runs: validators import this module too
    from hivemind.compression import CompressionInfo

WIRE_DTYPE = "gradswarm-topk-wire-v1"
"""``runtime_pb2.Tensor.dtype`` of a sparse all-reduce part (hivemind's own codecs never write it)."""
WIRE_BLOCK = 1 << 16
"""Values per position block on the wire: positions are uint16 offsets inside a block."""
FP16_MAX = 65504.0
MAX_EXPANSION = 1024
"""Without a model layout, a sparse Δ may expand to at most this × its bytes (density ≥ ~1/256)."""


@dataclass(frozen=True)
class TopK:
    """Which entries a sparse Δ keeps: the ``k`` largest |values| of every ``chunk`` consecutive values."""

    chunk: int
    k: int

    def __post_init__(self) -> None:
        if not 1 <= self.k <= self.chunk <= 32768:  # int16 positions inside a chunk
            raise ValueError(f"top-k needs 1 <= k <= chunk <= 32768, got k={self.k}, chunk={self.chunk}")

    @classmethod
    def from_train(cls, train) -> TopK:
        """The swarm's top-k from a :class:`peer.config.TrainConfig` (``topk_density``, ``topk_chunk``)."""
        return cls(chunk=train.topk_chunk, k=train.topk_k)

    @property
    def density(self) -> float:
        return self.k / self.chunk

    def entries(self, numel: int) -> int:
        """Entries a tensor of ``numel`` values keeps: k per full chunk, min(k, rest) of the last one."""
        full, rest = divmod(numel, self.chunk)
        return full * self.k + min(self.k, rest)


# ---------------------------------------------------------------------------------------------------
# selection


def select_topk(flat: torch.Tensor, topk: TopK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx int16, val fp16)`` of the top-k entries of each chunk of a flat tensor, chunk after chunk,
    positions ascending inside each chunk (so equal Δs give equal bytes)."""
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
        return torch.zeros(0, dtype=torch.int16), torch.zeros(0, dtype=torch.float16)
    return torch.cat(idx_parts).to(torch.int16), torch.cat(val_parts).to(torch.float16)


def densify(idx: torch.Tensor, val: torch.Tensor, numel: int, topk: TopK) -> torch.Tensor:
    """fp32 flat tensor of ``numel`` values from :func:`select_topk`'s output, checked first: exactly
    ``topk.entries(numel)`` entries, every position inside its chunk, strictly ascending per chunk.
    Raises :class:`ArtifactRefused` (``bad_index`` / ``bad_shape``); allocates only the output."""
    want = topk.entries(numel)
    if idx.numel() != want or val.numel() != want:
        raise ArtifactRefused("bad_shape", f"sparse tensor of {numel} values needs {want} entries")
    out = torch.zeros(numel, dtype=torch.float32)
    if want == 0:
        return out
    c, k = topk.chunk, topk.k
    pos = idx.reshape(-1).to(torch.int64)
    full_chunks = numel // c
    nfull = full_chunks * k
    tail_len = numel - full_chunks * c
    chunk_of = torch.empty(want, dtype=torch.int64)
    chunk_of[:nfull] = torch.arange(full_chunks).repeat_interleave(k)
    chunk_of[nfull:] = full_chunks
    limit = torch.full((want,), c, dtype=torch.int64)
    limit[nfull:] = tail_len
    if bool(((pos < 0) | (pos >= limit)).any()):
        raise ArtifactRefused("bad_index", "sparse Δ index outside its chunk")
    if want > 1:
        same_chunk = chunk_of[1:] == chunk_of[:-1]
        if bool((same_chunk & (pos[1:] <= pos[:-1])).any()):
            raise ArtifactRefused("bad_index", "sparse Δ indices not strictly ascending inside a chunk")
    out[chunk_of * c + pos] = val.reshape(-1).to(torch.float32)
    return out


def sparsify(t: torch.Tensor, topk: TopK) -> torch.Tensor:
    """``t`` with everything but its per-chunk top-k zeroed and the kept values rounded to fp16."""
    idx, val = select_topk(t, topk)
    return densify(idx, val, t.numel(), topk).view(t.shape)


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
        """Δ̂ = top-k(β·e + Δ), norm-bounded by ``max_norm``; e ← β·e + Δ − Δ̂ (new tensors: a checkpoint
        being written from the old buffers is not torn). A non-finite Δ leaves e alone and is returned
        sparsified as is (the all-reduce drops it)."""
        if not all(bool(torch.isfinite(d).all()) for d in delta):
            return [sparsify(d, self.topk) for d in delta]
        acc = [e * self.decay + d.to(torch.float32) for e, d in zip(self.buffers, delta, strict=True)]
        sent = [sparsify(a, self.topk) for a in acc]
        norm = math.sqrt(sum(float(s.double().pow(2).sum()) for s in sent))
        if max_norm is not None and norm > max_norm:
            scale = max_norm / norm
            sent = [(s * scale).to(torch.float16).to(torch.float32) for s in sent]
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
    """A Δ̂ (fp32 tensors, at most k non-zeros per chunk) as sparse safetensors bytes (module docstring).
    A tensor with more non-zeros per chunk (e.g. an average) is re-sparsified to its top-k."""
    import json

    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    shapes = {}
    for name, t in delta.items():
        idx, val = select_topk(t, topk)
        tensors[f"{name}::idx"] = idx
        tensors[f"{name}::val"] = val
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
    when given: exact tensors, chunk and k of the run); then every tensor's indices
    (:func:`densify`). Memory: the blob's tensors plus the dense fp32 Δ of the shapes the header names
    (with a layout: the model's; without one at most :data:`MAX_EXPANSION` × the blob)."""
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
        flat = densify(tensors[f"{name}::idx"], tensors[f"{name}::val"], math.prod(shape), topk)
        out[name] = flat.view(shape)
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

    return parse_header(data).metadata.get("format") == SPARSE_DELTA_FORMAT


# ---------------------------------------------------------------------------------------------------
# the all-reduce wire format


def encode_wire_part(tensor: torch.Tensor):
    """``runtime_pb2.Tensor`` of a part's non-zero entries: int32 count per block of :data:`WIRE_BLOCK`,
    uint16 position inside the block, fp16 value (a value beyond fp16 becomes ±inf: refused downstream)."""
    from hivemind.proto import runtime_pb2

    flat = tensor.detach().reshape(-1).to("cpu", torch.float32)
    n = flat.numel()
    blocks = -(-n // WIRE_BLOCK)
    pos = torch.nonzero(flat).view(-1)  # NaN counts as non-zero: the receiver sees it and drops the part
    counts = torch.bincount(pos // WIRE_BLOCK, minlength=blocks)[:blocks] if blocks else pos[:0]
    buffer = b"".join(
        (
            counts.numpy().astype("<i4").tobytes(),
            (pos % WIRE_BLOCK).numpy().astype("<u2").tobytes(),
            flat[pos].numpy().astype("<f2").tobytes(),
        )
    )
    return runtime_pb2.Tensor(
        buffer=buffer,
        size=list(tensor.shape),
        requires_grad=False,
        dtype=WIRE_DTYPE,
        compression=runtime_pb2.CompressionType.NONE,
    )


class WireRefused(ValueError):
    """A sparse all-reduce part that is not what an honest peer sends (the runner drops or fails it)."""


def decode_wire_part(msg, expected_numel: int) -> torch.Tensor:
    """A sparse wire part as a dense fp32 tensor of ``expected_numel`` values, checked before allocating:
    our format, the expected size, counts within their blocks, the buffer exactly as long as the counts
    say, positions inside their block and strictly ascending. Raises :class:`WireRefused`."""
    if msg.dtype != WIRE_DTYPE:
        raise WireRefused(f"part in format {msg.dtype[:40]!r}, the swarm sends {WIRE_DTYPE}")
    if len(msg.size) > 8 or int(np.prod([int(s) for s in msg.size])) != expected_numel:
        raise WireRefused(f"part of shape {list(msg.size)[:8]}, expected {expected_numel} values")
    n = expected_numel
    blocks = -(-n // WIRE_BLOCK)
    buf = msg.buffer
    if len(buf) < 4 * blocks:
        raise WireRefused("part shorter than its block counts")
    counts = np.frombuffer(buf, dtype="<i4", count=blocks).astype(np.int64)
    block_len = np.full(blocks, WIRE_BLOCK, dtype=np.int64)
    if blocks:
        block_len[-1] = n - (blocks - 1) * WIRE_BLOCK
    if (counts < 0).any() or (counts > block_len).any():
        raise WireRefused("block count outside [0, block length]")
    m = int(counts.sum())
    if len(buf) != 4 * blocks + 4 * m:
        raise WireRefused(f"part of {len(buf)} bytes, its counts say {4 * blocks + 4 * m}")
    low = np.frombuffer(buf, dtype="<u2", count=m, offset=4 * blocks).astype(np.int64)
    vals = np.frombuffer(buf, dtype="<f2", count=m, offset=4 * blocks + 2 * m)
    block_of = np.repeat(np.arange(blocks, dtype=np.int64), counts)
    if m and (low >= block_len[block_of]).any():
        raise WireRefused("position outside its block")
    if m > 1 and ((block_of[1:] == block_of[:-1]) & (low[1:] <= low[:-1])).any():
        raise WireRefused("positions not strictly ascending")
    out = torch.zeros(n, dtype=torch.float32)
    if m:
        out[torch.from_numpy(block_of * WIRE_BLOCK + low)] = torch.from_numpy(vals.astype(np.float32))
    return out.view([int(s) for s in msg.size])
