"""Builders of honest and hostile artifacts for the decoder tests and the hostile-decode benchmark.

Everything here is bytes a peer could send: safetensors blobs with crafted headers, frames, records.
The shapes are small synthetic "models" so the tests need no model build; ``peer.net.layout`` derives
the expected layout from them exactly as it does from a model config.
"""

from __future__ import annotations

import json
import struct

import torch

from peer.net.layout import DELTA_FORMAT, QUANT_BLOCK, ArtifactLayouts
from peer.net.outbox import encode_delta, encode_state

SHAPES = {"embed.weight": (64, 96), "layers.0.proj.weight": (96, 96), "norm.weight": (96,)}
"""A small "model": 6144 + 9216 + 96 parameters (several quantisation blocks, one partial)."""


def layouts(shapes=SHAPES) -> ArtifactLayouts:
    return ArtifactLayouts.from_shapes(shapes)


def honest_delta(shapes=SHAPES, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return encode_delta({n: torch.randn(s, generator=g) * 0.01 for n, s in shapes.items()})


def honest_state(shapes=SHAPES, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return encode_state(
        {n: torch.randn(s, generator=g) for n, s in shapes.items()},
        metadata={"round": "3", "state_hash": "a" * 64},
    )


def split(blob: bytes) -> tuple[dict, bytes]:
    """(header dict, data section) of a safetensors blob."""
    (n,) = struct.unpack_from("<Q", blob)
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def craft(header: dict | str | bytes, data: bytes = b"", *, declared_len: int | None = None) -> bytes:
    """A safetensors blob with this header (a dict is dumped compactly) and data section."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    raw = header.encode() if isinstance(header, str) else header
    n = len(raw) if declared_len is None else declared_len
    return struct.pack("<Q", n) + raw + data


def delta_header(shapes: dict, *, block: int = QUANT_BLOCK, extra_meta: dict | None = None) -> dict:
    """The header an honest writer would produce for these parameter shapes (offsets contiguous)."""
    import math

    meta = {
        "format": DELTA_FORMAT,
        "block": str(block),
        "shapes": json.dumps({n: list(s) for n, s in shapes.items()}),
    }
    meta.update(extra_meta or {})
    header: dict = {"__metadata__": meta}
    pos = 0
    for n, s in shapes.items():
        numel = math.prod(s)
        header[f"{n}::q"] = {"dtype": "I8", "shape": [numel], "data_offsets": [pos, pos + numel]}
        pos += numel
        k = -(-numel // block)
        header[f"{n}::scale"] = {"dtype": "F32", "shape": [k], "data_offsets": [pos, pos + 4 * k]}
        pos += 4 * k
    return header


def hostile_cases(shapes=SHAPES) -> dict[str, bytes]:
    """Named hostile Δ blobs (each ~1 KB or a mutation of an honest Δ of ``shapes``) — the regression
    corpus, and the inputs of benchmarks/hostile_decode.py."""
    good = honest_delta(shapes)
    h, data = split(good)
    cases: dict[str, bytes] = {}
    q_name = sorted(k for k in h if k.endswith("::q"))[0]
    scale_name = sorted(k for k in h if k.endswith("::scale"))[-1]
    # a ~1 KB Δ declaring a 10^12-element tensor (metadata and header agree; the data is not there)
    huge = {"embed.weight": (10**6, 10**6)}
    cases["tera_tensor"] = craft(delta_header(huge), b"\0" * 512)
    cases["header_len_2_63"] = struct.pack("<Q", 1 << 63) + good[8:]
    cases["header_claims_100MB"] = craft(b'{"__metadata__":{}}', b"\0" * 64, declared_len=100 << 20)
    bad = json.loads(json.dumps(h))
    first = next(k for k in bad if k != "__metadata__")
    bad[first]["data_offsets"] = [0, bad[first]["data_offsets"][1] + 16]
    cases["overlapping_offsets"] = craft(bad, data)
    bad = json.loads(json.dumps(h))
    last = max((k for k in bad if k != "__metadata__"), key=lambda k: bad[k]["data_offsets"][1])
    end = bad[last]["data_offsets"][1]
    bad[last]["data_offsets"] = [end + (1 << 40), end + (1 << 40) + (end - bad[last]["data_offsets"][0])]
    cases["offsets_out_of_range"] = craft(bad, data)
    for dtype in ("F64", "BOOL", "U8"):
        bad = json.loads(json.dumps(h))
        bad[q_name]["dtype"] = dtype
        cases[f"codes_dtype_{dtype}"] = craft(bad, data)
    bad = json.loads(json.dumps(h))
    bad["__metadata__"]["block"] = "1024"  # scales were made for 4096
    cases["block_mismatch"] = craft(bad, data)
    bad = json.loads(json.dumps(h))
    bad["__metadata__"]["block"] = "0"
    cases["block_zero"] = craft(bad, data)
    bad = json.loads(json.dumps(h))
    bad["__metadata__"]["shapes"] = "[" * 50_000 + "]" * 50_000
    cases["deep_nested_shapes"] = craft(bad, data)
    cases["deep_nested_header"] = craft("[" * 100_000 + "]" * 100_000, b"")
    bad = json.loads(json.dumps(h))
    bad["__metadata__"]["shapes"] = json.dumps({"embed.weight": [1e308, 2]})
    cases["float_shape"] = craft(bad, data)
    bad = json.loads(json.dumps(h))
    bad["__metadata__"]["shapes"] = "[]"
    cases["shapes_not_a_map"] = craft(bad, data)
    raw = json.dumps(h, separators=(",", ":")).replace('"I8"', "NaN", 1)
    cases["nan_in_header"] = craft(raw, data)
    bad = json.loads(json.dumps(h))
    bad["extra::q"] = {"dtype": "I8", "shape": [0], "data_offsets": [0, 0]}
    cases["extra_tensor"] = craft(bad, data)
    bad = json.loads(json.dumps(h))
    del bad[scale_name]
    cases["missing_tensor"] = craft(bad, data)
    cases["truncated"] = good[: len(good) // 2]
    cases["not_safetensors"] = b"\x80\x04not a safetensors file, a pickle" * 10
    cases["empty"] = b""
    return cases
