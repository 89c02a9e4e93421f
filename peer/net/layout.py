"""What an honest artifact of a model looks like, to the byte, and a strict safetensors header parser.

Every Δ and state a peer publishes is a safetensors file whose tensors are fixed by the model config:

* a **Δ** (``contribution.safetensors``, see :func:`peer.net.outbox.encode_delta`): for each parameter
  ``n`` (in ``model.named_parameters()`` order, tied weights once) ``n::q`` — int8 codes, shape
  ``[numel]`` — and ``n::scale`` — fp32, one absmax scale per block of :data:`QUANT_BLOCK` values, shape
  ``[ceil(numel / block)]``; ``__metadata__`` = ``{"format", "block", "shapes"}`` where ``shapes`` is the
  JSON of every parameter's shape;
* a **published state** (``state.safetensors``): each parameter fp32 under its own name, metadata
  ``{"round", "state_hash"}``; a **checkpoint** also holds the outer momentum (``param/n``,
  ``momentum/n``).

:func:`delta_layout` / :func:`state_layout` turn the parameter shapes into a :class:`Layout`: the exact
tensor set (names, dtypes, shapes), the exact data size, and the largest header an honest writer produces
(plus slack), hence :attr:`Layout.max_bytes`, the size limit for fetching that kind of blob.

:func:`parse_header` reads a safetensors header itself, before anything is allocated: the 8-byte
length against a cap, strict JSON (no NaN/floats/duplicate keys, bounded size and number of containers),
a dtype whitelist, every shape (exactly the layout's when one is given), ``data_offsets`` contiguous, in
range and equal to dtype × shape, the data section exactly filling the blob, ``__metadata__`` a small
map of strings. Anything else raises :class:`ArtifactRefused` (a :class:`~peer.errors.CheckpointError`)
with a ``reason`` code. Only a header that passed is handed to the safetensors loader, so decoding never
allocates more than the blob (or, with a layout, the model) says.

A **sparse Δ** (``--compression topk``, format :data:`SPARSE_DELTA_FORMAT`, see
:mod:`peer.training.sparse`) holds per parameter ``n::idx`` (int16 positions inside each chunk) and
``n::val`` (int8 codes), exactly ``k`` per full chunk of ``chunk`` values and ``min(k, rest)`` for a
tensor's last chunk, and ``n::scale`` (fp32, one per chunk); ``__metadata__`` = ``{"format", "chunk",
"k", "shapes"}``. :func:`sparse_delta_layout` is its exact layout for a model and a run's top-k; the model's contribution layout carries it as
:attr:`Layout.sparse`, and :func:`check_blob_header` holds a Δ to the one its ``format`` names.

Reason codes: ``truncated``, ``too_large``, ``header_too_large``, ``bad_header``, ``bad_dtype``,
``bad_shape``, ``bad_offsets``, ``wrong_tensors``, ``bad_metadata``, ``bad_index`` (a sparse Δ's
position outside its chunk or not ascending), ``bad_value`` (a sparse Δ's scale not finite or not
canonical, or an int8 code of −128).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from peer.errors import CheckpointError

QUANT_BLOCK = 4096
"""Values per absmax scale in a published Δ."""
DELTA_FORMAT = "gradswarm-delta-int8-blockwise"
SPARSE_DELTA_FORMAT = "gradswarm-delta-topk-v2"
"""A sparse Δ (chunk-wise top-k, int16 positions, int8 codes, one fp32 scale per chunk); the version is
part of the name."""
SPARSE_DELTA_FORMAT_V1 = "gradswarm-delta-topk-v1"
"""The retired sparse Δ (fp16 values): refused with a reason that says so."""
MAX_TOPK_CHUNK = 32768
"""Largest top-k chunk (positions are int16)."""
MAX_BLOCK = 1 << 20
"""Largest block size a Δ without an expected layout may declare."""

DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
"""safetensors dtypes this parser knows (the spec's others are refused as ``bad_dtype``)."""
STATE_DTYPES = frozenset({"F32", "F16", "BF16"})
"""dtypes a state without an expected layout may hold."""

MAX_NAME_CHARS = 512
MAX_NDIM = 8
MAX_DIM = 1 << 40
MAX_TENSORS = 1 << 16
"""Tensors a header without an expected layout may declare."""
MAX_GENERIC_HEADER = 8 << 20
"""Header bytes accepted without an expected layout (safetensors itself allows 100 MB)."""
MAX_METADATA_ENTRIES = 16
MAX_METADATA_KEY = 64
HEADER_SLACK = 4096
"""Bytes an honest header may exceed the estimate by (other writers format the JSON differently)."""

SAFETENSORS_LEN = struct.Struct("<Q")


class ArtifactRefused(CheckpointError):
    """A Δ/state blob (or its header) is malformed, oversized or not what the model allows.

    ``reason`` is a short code (see the module docstring); the message says what, in one line.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------------
# expected layouts


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return DTYPE_BYTES[self.dtype] * math.prod(self.shape)


@dataclass(frozen=True, kw_only=True)
class Layout:
    """The exact tensors of an honest blob of one kind, for one model."""

    kind: str
    """``contribution``, ``state`` or ``checkpoint`` (for messages)."""
    tensors: Mapping[str, TensorSpec]
    required_metadata: frozenset[str] = frozenset()
    allowed_metadata: frozenset[str] = frozenset()
    max_metadata_value: int = 256
    """Longest ``__metadata__`` value accepted."""
    block: int | None = None
    """Δ only: values per scale."""
    param_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    """Δ only: the parameter shapes its ``shapes`` metadata must name."""
    max_header_bytes: int = 0
    topk: tuple[int, int] | None = None
    """Sparse Δ only: ``(chunk, k)``."""
    sparse: Layout | None = None
    """A contribution layout only: the sparse Δ of the same model a peer may publish instead (the run's
    top-k), or None when the run allows only the 8-bit Δ."""

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def max_bytes(self) -> int:
        """Largest honest blob: 8 + the header cap + the exact data size."""
        return 8 + self.max_header_bytes + self.data_bytes


def _header_estimate(tensors: Mapping[str, TensorSpec], metadata: Mapping[str, str]) -> int:
    """Bytes of the compact JSON header safetensors writes for these tensors (offsets at their widest)."""
    total = sum(t.nbytes for t in tensors.values())
    doc: dict = {"__metadata__": dict(metadata)} if metadata else {}
    for name, t in tensors.items():
        doc[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [total, total]}
    return len(json.dumps(doc, separators=(",", ":")).encode()) + 8


def delta_layout(param_shapes: Mapping[str, tuple[int, ...]], block: int = QUANT_BLOCK) -> Layout:
    """The Δ of a model with these parameter shapes (see the module docstring)."""
    shapes = {n: tuple(int(d) for d in s) for n, s in param_shapes.items()}
    tensors: dict[str, TensorSpec] = {}
    for n, s in shapes.items():
        numel = math.prod(s)
        tensors[f"{n}::q"] = TensorSpec("I8", (numel,))
        tensors[f"{n}::scale"] = TensorSpec("F32", (-(-numel // block),))
    shapes_json = json.dumps({n: list(s) for n, s in shapes.items()})
    meta = {"format": DELTA_FORMAT, "block": str(block), "shapes": shapes_json}
    est = _header_estimate(tensors, meta)
    keys = frozenset(meta)
    return Layout(
        kind="contribution",
        tensors=tensors,
        required_metadata=keys,
        allowed_metadata=keys,
        max_metadata_value=2 * len(shapes_json) + 64,
        block=block,
        param_shapes=shapes,
        max_header_bytes=2 * est + HEADER_SLACK,
    )


def topk_entries(numel: int, chunk: int, k: int) -> int:
    """Entries a sparse Δ keeps of a tensor of ``numel`` values: k per full chunk, min(k, rest) of the last."""
    full, rest = divmod(numel, chunk)
    return full * k + min(k, rest)


def sparse_delta_layout(param_shapes: Mapping[str, tuple[int, ...]], chunk: int, k: int) -> Layout:
    """The sparse Δ of a model with these parameter shapes, top-``k`` of every ``chunk`` values."""
    if not 1 <= k <= chunk <= MAX_TOPK_CHUNK:
        raise ValueError(f"top-k needs 1 <= k <= chunk <= {MAX_TOPK_CHUNK}, got k={k}, chunk={chunk}")
    shapes = {n: tuple(int(d) for d in s) for n, s in param_shapes.items()}
    tensors: dict[str, TensorSpec] = {}
    for n, s in shapes.items():
        e = topk_entries(math.prod(s), chunk, k)
        tensors[f"{n}::idx"] = TensorSpec("I16", (e,))
        tensors[f"{n}::val"] = TensorSpec("I8", (e,))
        tensors[f"{n}::scale"] = TensorSpec("F32", (-(-math.prod(s) // chunk),))
    shapes_json = json.dumps({n: list(s) for n, s in shapes.items()})
    meta = {"format": SPARSE_DELTA_FORMAT, "chunk": str(chunk), "k": str(k), "shapes": shapes_json}
    est = _header_estimate(tensors, meta)
    keys = frozenset(meta)
    return Layout(
        kind="contribution",
        tensors=tensors,
        required_metadata=keys,
        allowed_metadata=keys,
        max_metadata_value=2 * len(shapes_json) + 64,
        param_shapes=shapes,
        max_header_bytes=2 * est + HEADER_SLACK,
        topk=(chunk, k),
    )


def state_layout(param_shapes: Mapping[str, tuple[int, ...]], *, momentum: bool = False) -> Layout:
    """A published state (fp32 parameters), or with ``momentum`` a checkpoint (``param/`` + ``momentum/``)."""
    shapes = {n: tuple(int(d) for d in s) for n, s in param_shapes.items()}
    if momentum:
        tensors = {f"param/{n}": TensorSpec("F32", s) for n, s in shapes.items()}
        tensors.update({f"momentum/{n}": TensorSpec("F32", s) for n, s in shapes.items()})
    else:
        tensors = {n: TensorSpec("F32", s) for n, s in shapes.items()}
    meta = {"round": "9" * 20, "state_hash": "f" * 64}
    est = _header_estimate(tensors, meta)
    return Layout(
        kind="checkpoint" if momentum else "state",
        tensors=tensors,
        allowed_metadata=frozenset(meta),
        max_metadata_value=128,
        max_header_bytes=2 * est + HEADER_SLACK,
    )


def model_param_shapes(run) -> dict[str, tuple[int, ...]]:
    """``name → shape`` of the model a :class:`~peer.config.RunConfig` builds, in parameter order.

    Built on the ``meta`` device: exact names and shapes, no memory, no initialisation.
    """
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from peer.data.model import llama_config

    hf_logging.set_verbosity_error()
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(run))
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def run_topk(run) -> tuple[int, int]:
    """``(chunk, k)`` of the sparse Δs of a :class:`~peer.config.RunConfig` (``train.topk_*``)."""
    return run.train.topk_chunk, run.train.topk_k


@dataclass(frozen=True, kw_only=True)
class ArtifactLayouts:
    """The two blob kinds a publisher serves, for one model: what fetch and decode hold them to."""

    contribution: Layout
    state: Layout

    @classmethod
    def from_shapes(
        cls, param_shapes: Mapping[str, tuple[int, ...]], topk: tuple[int, int] | None = None
    ) -> ArtifactLayouts:
        """``topk`` = ``(chunk, k)``: a contribution may also be a sparse Δ of that top-k."""
        contribution = delta_layout(param_shapes)
        if topk is not None:
            contribution = replace(contribution, sparse=sparse_delta_layout(param_shapes, *topk))
        return cls(contribution=contribution, state=state_layout(param_shapes))

    @classmethod
    def for_run(cls, run) -> ArtifactLayouts:
        return cls.from_shapes(model_param_shapes(run), topk=run_topk(run))

    def for_kind(self, kind: str) -> Layout:
        if kind == "contribution":
            return self.contribution
        if kind == "state":
            return self.state
        raise ValueError(f"unknown artifact kind {kind!r}")


# ---------------------------------------------------------------------------------------------------
# strict header parsing


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True, kw_only=True)
class Header:
    """A checked safetensors header: tensors by name, metadata, where the data section starts."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    size: int


class _Refuse(Exception):
    pass


def _no_float(s: str):
    raise _Refuse(f"number {s[:20]!r} (headers hold integers only)")


def _no_constant(s: str):
    raise _Refuse(f"{s} is not JSON")


def _bounded_int(s: str) -> int:
    if len(s) > 20:
        raise _Refuse(f"integer of {len(s)} digits")
    return int(s)


def _no_duplicates(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _Refuse("duplicate key")
    return out


def strict_json(raw: bytes | str, *, max_bytes: int, max_containers: int, what: str):
    """JSON with integers and strings only (floats, NaN, duplicate keys refused), at most ``max_bytes``
    and ``max_containers`` objects/arrays (counted before parsing, so nesting and size stay bounded)."""
    if len(raw) > max_bytes:
        raise ArtifactRefused("bad_header", f"{what}: {len(raw)} bytes of JSON > limit {max_bytes}")
    b = raw.encode() if isinstance(raw, str) else raw
    containers = b.count(b"[") + b.count(b"{")
    if containers > max_containers:
        raise ArtifactRefused("bad_header", f"{what}: {containers} JSON containers > limit {max_containers}")
    try:
        text = b.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(
            text,
            parse_float=_no_float,
            parse_int=_bounded_int,
            parse_constant=_no_constant,
            object_pairs_hook=_no_duplicates,
        )
    except _Refuse as e:
        raise ArtifactRefused("bad_header", f"{what}: {e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactRefused("bad_header", f"{what}: not JSON ({_short(e)})") from None


def _short(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:160]


def header_length(prefix: bytes, size: int, max_header: int) -> int:
    """The declared header length from the first 8 bytes, checked against ``max_header`` and ``size``."""
    if size < 8 or len(prefix) < 8:
        raise ArtifactRefused("truncated", f"blob of {size} bytes is shorter than a safetensors header")
    (n,) = SAFETENSORS_LEN.unpack_from(prefix)
    if n > max_header:
        raise ArtifactRefused("header_too_large", f"safetensors header claims {n} bytes > limit {max_header}")
    if 8 + n > size:
        raise ArtifactRefused("truncated", f"safetensors header claims {n} bytes, the blob has {size - 8}")
    if n < 2:
        raise ArtifactRefused("bad_header", f"safetensors header of {n} bytes")
    return n


def parse_header(data: bytes, size: int | None = None, *, layout: Layout | None = None) -> Header:
    """Check a safetensors blob's header (``data`` = at least its first ``8 + header`` bytes, ``size`` =
    the blob's total size, default ``len(data)``) strictly, against ``layout`` when given.

    Raises :class:`ArtifactRefused`; never allocates more than the header's own bytes.
    """
    size = len(data) if size is None else size
    if layout is not None and size > layout.max_bytes:
        raise ArtifactRefused(
            "too_large", f"{layout.kind} blob of {size} bytes > the model's {layout.max_bytes}"
        )
    max_header = layout.max_header_bytes if layout is not None else MAX_GENERIC_HEADER
    n = header_length(data[:8], size, max_header)
    raw = data[8 : 8 + n]
    if len(raw) < n:
        raise ArtifactRefused("truncated", f"header of {n} bytes but only {len(raw)} given")
    max_tensors = len(layout.tensors) if layout is not None else MAX_TENSORS
    doc = strict_json(raw, max_bytes=n, max_containers=4 * max_tensors + 8, what="safetensors header")
    if not isinstance(doc, dict):
        raise ArtifactRefused("bad_header", f"safetensors header is a {type(doc).__name__}, not a map")
    metadata = _metadata(doc.pop("__metadata__", {}), layout)
    if len(doc) > max_tensors:
        raise ArtifactRefused("wrong_tensors", f"header declares {len(doc)} tensors > limit {max_tensors}")
    tensors = {name: _entry(name, info, layout) for name, info in doc.items()}
    if layout is not None:
        _match_names(tensors, layout)
    data_start = 8 + n
    _check_offsets(tensors, size - data_start)
    return Header(tensors=tensors, metadata=metadata, data_start=data_start, size=size)


def _metadata(meta, layout: Layout | None) -> dict[str, str]:
    if not isinstance(meta, dict):
        raise ArtifactRefused("bad_metadata", "__metadata__ is not a map")
    if len(meta) > MAX_METADATA_ENTRIES:
        raise ArtifactRefused(
            "bad_metadata", f"__metadata__ has {len(meta)} entries > {MAX_METADATA_ENTRIES}"
        )
    longest = layout.max_metadata_value if layout is not None else MAX_GENERIC_HEADER
    for k, v in meta.items():
        if not isinstance(v, str) or len(k) > MAX_METADATA_KEY or len(v) > longest:
            raise ArtifactRefused("bad_metadata", f"__metadata__ entry {k[:40]!r} is not a short string")
    if layout is not None:
        missing = layout.required_metadata - set(meta)
        extra = set(meta) - layout.allowed_metadata
        if missing or extra:
            raise ArtifactRefused(
                "bad_metadata",
                f"__metadata__ lacks {sorted(missing)[:3]} / has unexpected {sorted(extra)[:3]}",
            )
    return meta


def _entry(name: str, info, layout: Layout | None) -> TensorEntry:
    if len(name) > MAX_NAME_CHARS:
        raise ArtifactRefused("wrong_tensors", f"tensor name of {len(name)} characters")
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ArtifactRefused(
            "bad_header", f"tensor {name[:80]!r}: entry is not {{dtype, shape, data_offsets}}"
        )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise ArtifactRefused("bad_dtype", f"tensor {name[:80]!r}: dtype {str(dtype)[:20]!r} is not allowed")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)
    ):
        raise ArtifactRefused("bad_shape", f"tensor {name[:80]!r}: shape {str(shape)[:80]} is not allowed")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise ArtifactRefused("bad_offsets", f"tensor {name[:80]!r}: data_offsets {str(offsets)[:80]}")
    entry = TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])
    if layout is not None:
        want = layout.tensors.get(name)
        if want is None:
            raise ArtifactRefused("wrong_tensors", f"{layout.kind} has no tensor {name[:80]!r}")
        if dtype != want.dtype:
            raise ArtifactRefused(
                "bad_dtype", f"tensor {name[:80]!r} is {dtype}, the model's is {want.dtype}"
            )
        if entry.shape != want.shape:
            raise ArtifactRefused(
                "bad_shape",
                f"tensor {name[:80]!r} has shape {list(shape)[:8]}, the model's is {list(want.shape)}",
            )
    if math.prod(entry.shape) * DTYPE_BYTES[dtype] != entry.end - entry.begin:
        raise ArtifactRefused(
            "bad_offsets",
            f"tensor {name[:80]!r}: {entry.end - entry.begin} bytes do not hold {dtype}{list(shape)}",
        )
    return entry


def _match_names(tensors: Mapping[str, TensorEntry], layout: Layout) -> None:
    missing = set(layout.tensors) - set(tensors)
    if missing:
        raise ArtifactRefused(
            "wrong_tensors",
            f"{layout.kind} lacks {len(missing)} of the model's tensors, e.g. {sorted(missing)[0]!r}",
        )


def _check_offsets(tensors: Mapping[str, TensorEntry], data_len: int) -> None:
    """Tensors tile ``[0, data_len)`` exactly: sorted by start, each begins where the previous ended."""
    pos = 0
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if t.begin != pos:
            kind = "overlaps" if t.begin < pos else "leaves a gap before"
            raise ArtifactRefused("bad_offsets", f"tensor {name[:80]!r} {kind} byte {pos} of the data")
        pos = t.end
    if pos != data_len:
        raise ArtifactRefused("bad_offsets", f"tensors fill {pos} bytes, the data section is {data_len}")


# ---------------------------------------------------------------------------------------------------
# kind-specific checks


def check_delta_header(
    header: Header, layout: Layout | None = None
) -> tuple[int, dict[str, tuple[int, ...]]]:
    """A Δ header's metadata and tensors agree (and match ``layout``); returns ``(block, shapes)``.

    Without a layout the expected tensors are derived from the Δ's own ``shapes`` metadata, so codes
    and scales must still match it exactly (block size included).
    """
    meta = header.metadata
    if meta.get("format") != DELTA_FORMAT:
        raise ArtifactRefused("bad_metadata", "not a gradswarm Δ (format metadata missing or wrong)")
    raw_block = meta.get("block", "")
    if not (raw_block.isascii() and raw_block.isdigit() and len(raw_block) <= 8):
        raise ArtifactRefused("bad_metadata", f"Δ block size {raw_block[:20]!r} is not a number")
    block = int(raw_block)
    if not 1 <= block <= MAX_BLOCK or (layout is not None and block != layout.block):
        want = layout.block if layout is not None else f"1..{MAX_BLOCK}"
        raise ArtifactRefused("bad_metadata", f"Δ block size {block}, expected {want}")
    shapes = _shapes_metadata(header, layout, "Δ")
    _match_tensors(header, delta_layout(shapes, block), "Δ", f"block {block}", " (codes + scales)")
    return block, shapes


def _shapes_metadata(header: Header, layout: Layout | None, what: str) -> dict[str, tuple[int, ...]]:
    """The ``shapes`` metadata of a Δ header (``what``: "Δ" or "sparse Δ"): strict JSON, a map of name →
    list of at most MAX_NDIM sizes ≤ MAX_DIM, the model's parameters exactly when ``layout`` is given."""
    raw_shapes = header.metadata.get("shapes", "")
    shapes = strict_json(
        raw_shapes,
        max_bytes=len(raw_shapes),
        max_containers=len(header.tensors) // 2 + 2,
        what=f"{what} shapes metadata",
    )
    if not isinstance(shapes, dict) or not all(
        isinstance(s, list) and len(s) <= MAX_NDIM and all(type(d) is int and 0 <= d <= MAX_DIM for d in s)
        for s in shapes.values()
    ):
        raise ArtifactRefused("bad_metadata", f"{what} shapes metadata is not a map of name → list of sizes")
    shapes = {n: tuple(s) for n, s in shapes.items()}
    if layout is not None and shapes != dict(layout.param_shapes):
        raise ArtifactRefused(
            "bad_shape", f"{what} shapes metadata does not name the model's parameters and shapes"
        )
    return shapes


def _match_tensors(header: Header, expected: Layout, what: str, needs: str, which: str = "") -> None:
    """Every tensor of ``header`` is exactly one of ``expected`` (names, dtypes, shapes)."""
    if set(expected.tensors) != set(header.tensors):
        raise ArtifactRefused("wrong_tensors", f"{what} tensors do not match its shapes metadata{which}")
    for name, spec in expected.tensors.items():
        t = header.tensors[name]
        if t.dtype != spec.dtype or t.shape != spec.shape:
            code = "bad_dtype" if t.dtype != spec.dtype else "bad_shape"
            raise ArtifactRefused(
                code,
                f"{what} tensor {name[:80]!r} is {t.dtype}{list(t.shape)[:4]}, {needs} needs "
                f"{spec.dtype}{list(spec.shape)}",
            )


def check_state_header(header: Header, layout: Layout | None = None) -> None:
    """Without a layout: only float dtypes (the layout, when given, was checked by :func:`parse_header`)."""
    if layout is None:
        for name, t in header.tensors.items():
            if t.dtype not in STATE_DTYPES:
                raise ArtifactRefused("bad_dtype", f"state tensor {name[:80]!r} is {t.dtype}, not a float")


def _peek_format(data: bytes, size: int | None, layouts: list[Layout]) -> str | None:
    """The ``format`` a Δ header declares, read under the largest header cap of ``layouts``."""
    size = len(data) if size is None else size
    cap = max(v.max_header_bytes for v in layouts)
    n = header_length(data[:8], size, cap)
    raw = data[8 : 8 + n]
    if len(raw) < n:
        raise ArtifactRefused("truncated", f"header of {n} bytes but only {len(raw)} given")
    containers = 4 * max(len(v.tensors) for v in layouts) + 8
    doc = strict_json(raw, max_bytes=n, max_containers=containers, what="safetensors header")
    meta = doc.get("__metadata__") if isinstance(doc, dict) else None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    return fmt if isinstance(fmt, str) else None


def delta_layout_for(data: bytes, size: int | None, layout: Layout | None) -> Layout | None:
    """The layout a Δ blob is held to: ``layout.sparse`` when its header says it is sparse (and the run
    allows sparse Δs), else ``layout`` itself."""
    if layout is None or layout.sparse is None:
        return layout
    fmt = _peek_format(data, size, [layout, layout.sparse])
    if fmt == SPARSE_DELTA_FORMAT_V1:
        raise ArtifactRefused("bad_metadata", _V1_RETIRED)
    if fmt == SPARSE_DELTA_FORMAT:
        return layout.sparse
    return layout


_V1_RETIRED = (
    f"sparse Δ format {SPARSE_DELTA_FORMAT_V1} (fp16 values) is retired; this version publishes and "
    f"scores {SPARSE_DELTA_FORMAT} (int8 values): upgrade the peer that published it"
)


def check_sparse_delta_header(
    header: Header, layout: Layout | None = None
) -> tuple[tuple[int, int], dict[str, tuple[int, ...]]]:
    """A sparse Δ header's metadata and tensors agree (and match ``layout``); returns
    ``((chunk, k), shapes)``. Without a layout the tensors are derived from its own metadata."""
    meta = header.metadata
    if meta.get("format") == SPARSE_DELTA_FORMAT_V1:
        raise ArtifactRefused("bad_metadata", _V1_RETIRED)
    if meta.get("format") != SPARSE_DELTA_FORMAT:
        raise ArtifactRefused("bad_metadata", "not a gradswarm sparse Δ (format metadata missing or wrong)")
    nums = []
    for key in ("chunk", "k"):
        raw = meta.get(key, "")
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 6):
            raise ArtifactRefused("bad_metadata", f"sparse Δ {key} {raw[:20]!r} is not a number")
        nums.append(int(raw))
    chunk, k = nums
    if not 1 <= k <= chunk <= MAX_TOPK_CHUNK or (layout is not None and (chunk, k) != layout.topk):
        want = layout.topk if layout is not None else f"1 <= k <= chunk <= {MAX_TOPK_CHUNK}"
        raise ArtifactRefused("bad_metadata", f"sparse Δ chunk/k {chunk}/{k}, expected {want}")
    shapes = _shapes_metadata(header, layout, "sparse Δ")
    _match_tensors(header, sparse_delta_layout(shapes, chunk, k), "sparse Δ", f"top-{k} of {chunk}")
    return (chunk, k), shapes


def check_blob_header(data: bytes, size: int | None = None, *, kind: str, layout: Layout | None) -> Header:
    """Parse + check a blob of ``kind`` (``contribution``/``state``) from its first bytes. A contribution
    is held to the layout its ``format`` names (:func:`delta_layout_for`)."""
    if kind == "contribution":
        layout = delta_layout_for(data, size, layout)
    header = parse_header(data, size, layout=layout)
    if kind == "contribution":
        if header.metadata.get("format") in (SPARSE_DELTA_FORMAT, SPARSE_DELTA_FORMAT_V1):
            check_sparse_delta_header(header, layout)
        else:
            check_delta_header(header, layout)
    else:
        check_state_header(header, layout)
    return header
