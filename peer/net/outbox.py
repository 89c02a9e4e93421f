"""The peer's outbox: what it publishes each round, written atomically for the publisher to serve.

Layout (``<peer_home>/outbox``)::

    rounds/<r>/contribution.safetensors   Δ_r = θ_start − θ_local, 8-bit blockwise (int8 codes + fp32 scales)
    rounds/<r>/manifest.json              ContributionManifest (peer.net.records), hotkey-signed
    state/<r>/state.safetensors           θ_r (fp32) — the averaged state at the *start* of round r
    state/<r>/manifest.json               StateManifest, hotkey-signed

Every file is written to a temp name in the same folder, fsynced and renamed, and a round folder's
manifest is written last, so a reader that sees a manifest sees complete blobs; a crash leaves at most
a stray ``.tmp`` file (ignored and cleaned up), never a torn one. Nothing here is pickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from peer.errors import CheckpointError
from peer.net.layout import DELTA_FORMAT, QUANT_BLOCK, ArtifactRefused, Layout, check_blob_header

CONTRIBUTION = "contribution.safetensors"
STATE = "state.safetensors"
MANIFEST = "manifest.json"


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Write ``data`` to a temp file, then rename it to ``path``. ``mode`` is the file's permission bits
    (before the umask), from creation on: 0o600 keeps a secret unreadable by others at every moment."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}


def write_safetensors_streamed(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> tuple[str, int]:
    """Write ``tensors`` as a safetensors file, tensor by tensor, to a temp file renamed into place.

    Unlike ``safetensors.torch.save`` (which builds the whole file as one ``bytes`` object, plus a
    per-tensor copy), this writes each CPU tensor's own memory straight to the file, so the peak extra
    memory is one tensor's worth at most (none for contiguous CPU tensors). Returns ``(sha256 hex,
    size in bytes)`` of the file, hashed while writing. The file is standard safetensors (read back
    with ``safetensors.torch.load``/``load_file``).
    """
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {name}: dtype {t.dtype} has no safetensors code here")
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * ((-len(head)) % 8)  # safetensors aligns the data to 8 bytes
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            for chunk in (len(head).to_bytes(8, "little"), head):
                fh.write(chunk)
                digest.update(chunk)
            for t in tensors.values():
                flat = t.detach().to("cpu").contiguous().reshape(-1)
                if flat.numel() == 0:
                    continue
                view = memoryview(flat.view(torch.uint8).numpy())
                fh.write(view)
                digest.update(view)
            fh.flush()
            os.fsync(fh.fileno())
        size = tmp.stat().st_size
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return digest.hexdigest(), size


def atomic_write_json(path: Path, obj: dict) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# 8-bit blockwise (absmax, linear) quantisation of pseudo-gradients for publication


def quantize_blockwise(t: torch.Tensor, block: int = QUANT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and one fp32 absmax scale per block of ``block`` values (deterministic, pure torch)."""
    flat = t.detach().float().reshape(-1).cpu()
    pad = (-flat.numel()) % block
    padded = torch.nn.functional.pad(flat, (0, pad)).view(-1, block)
    scale = padded.abs().amax(dim=1).clamp_min(1e-12)
    codes = torch.round(padded / scale[:, None] * 127).clamp(-127, 127).to(torch.int8)
    return codes.reshape(-1)[: flat.numel()].clone(), scale


def dequantize_blockwise(
    codes: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...], block: int = QUANT_BLOCK
) -> torch.Tensor:
    """fp32 values from int8 codes and per-block scales (checked: one scale per block, ``shape`` fits).

    Works in place on one fp32 copy of the codes: peak memory is the output plus the scale factors.
    """
    n = codes.numel()
    blocks = -(-n // block)
    if blocks != scale.numel() or math.prod(shape) != n:
        raise ArtifactRefused(
            "bad_shape",
            f"quantised tensor of {n} values has {scale.numel()} scales for block {block}, "
            f"shape {list(shape)[:8]}",
        )
    out = codes.reshape(-1).to(torch.float32)
    factor = scale.reshape(-1).to(torch.float32) / 127
    full = (n // block) * block
    if full:
        out[:full].view(-1, block).mul_(factor[: n // block, None])
    if full < n:
        out[full:].mul_(factor[-1])
    return out.view(shape)


def encode_delta(delta: dict[str, torch.Tensor]) -> bytes:
    """Serialise a pseudo-gradient as 8-bit blockwise safetensors bytes."""
    tensors: dict[str, torch.Tensor] = {}
    shapes = {}
    for name, t in delta.items():
        codes, scale = quantize_blockwise(t)
        tensors[f"{name}::q"] = codes
        tensors[f"{name}::scale"] = scale
        shapes[name] = list(t.shape)
    return save(
        tensors,
        metadata={
            "format": DELTA_FORMAT,
            "block": str(QUANT_BLOCK),
            "shapes": json.dumps(shapes),
        },
    )


def decode_delta(data: bytes, layout: Layout | None = None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`encode_delta`, total: any malformed blob raises :class:`ArtifactRefused`.

    The header is checked first (:func:`peer.net.layout.check_blob_header`): with ``layout`` (the
    model's, :func:`peer.net.layout.delta_layout`) every tensor must be exactly the model's, so nothing
    beyond an honest Δ's size is ever allocated; without it the codes and scales must match the Δ's own
    ``shapes`` metadata and the data must be in the blob (allocation ≤ 4× the blob).
    """
    from peer.net.layout import check_delta_header, parse_header

    header = parse_header(data, layout=layout)
    block, shapes = check_delta_header(header, layout)
    tensors = _load(data, "Δ")
    return {
        name: dequantize_blockwise(tensors[f"{name}::q"], tensors[f"{name}::scale"], shape, block)
        for name, shape in shapes.items()
    }


def encode_state(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata=metadata or {})


def decode_state(data: bytes, layout: Layout | None = None) -> dict[str, torch.Tensor]:
    """A state blob's tensors, total: the header is checked first (against ``layout``, e.g.
    :func:`peer.net.layout.state_layout`, when given; otherwise float tensors exactly filling the blob)."""
    check_blob_header(data, kind="state", layout=layout)
    return _load(data, "state")


def _load(data: bytes, what: str) -> dict[str, torch.Tensor]:
    """safetensors bytes whose header already passed the strict checks -> tensors (one copy of the data)."""
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:  # unreachable after the header checks
        raise ArtifactRefused("bad_header", f"malformed {what} blob: {e}") from None


# ---------------------------------------------------------------------------------------------------


class Outbox:
    """Per-round files the publisher serves. Keeps the last ``keep_rounds`` rounds."""

    def __init__(self, root: Path, keep_rounds: int = 8):
        self.root = Path(root)
        self.keep_rounds = keep_rounds

    def round_dir(self, round_: int) -> Path:
        return self.root / "rounds" / str(round_)

    def state_dir(self, round_: int) -> Path:
        return self.root / "state" / str(round_)

    def write_contribution(self, round_: int, blob: bytes, manifest: dict) -> Path:
        d = self.round_dir(round_)
        atomic_write_bytes(d / CONTRIBUTION, blob)
        atomic_write_json(d / MANIFEST, manifest)  # last: a visible manifest means complete blobs
        return d

    def write_state_tensors(
        self,
        round_: int,
        tensors: dict[str, torch.Tensor],
        metadata: dict[str, str],
        make_manifest: Callable[[str, int], dict],
    ) -> Path:
        """Stream θ_r to ``state/<r>/state.safetensors`` (:func:`write_safetensors_streamed`), then write
        the manifest ``make_manifest(sha256, size)`` returns — last, as in :meth:`write_state`."""
        d = self.state_dir(round_)
        digest, size = write_safetensors_streamed(d / STATE, tensors, metadata)
        atomic_write_json(d / MANIFEST, make_manifest(digest, size))
        return d

    def write_state(self, round_: int, blob: bytes, manifest: dict) -> Path:
        d = self.state_dir(round_)
        atomic_write_bytes(d / STATE, blob)
        atomic_write_json(d / MANIFEST, manifest)
        return d

    def rounds(self, kind: str = "rounds") -> list[int]:
        base = self.root / kind
        if not base.is_dir():
            return []
        return sorted(int(p.name) for p in base.iterdir() if p.name.isdigit() and (p / MANIFEST).exists())

    def prune(self) -> None:
        for kind in ("rounds", "state"):
            for r in self.rounds(kind)[: -self.keep_rounds]:
                shutil.rmtree(self.root / kind / str(r), ignore_errors=True)


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors checkpoint, turning corruption into a readable CheckpointError."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} not found") from None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"checkpoint {path} is corrupt ({e}); delete it to start from the swarm's state"
        ) from None
