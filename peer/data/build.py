"""``peer data build``: stream a text source, tokenize it, write token shards and their manifest.

The recipe: load the tokenizer → stream documents → tokenize them in batches (HF ``tokenizers``, Rust,
multi-threaded) with an end-of-text token after each → cut the token stream into pages and the pages
into shards → write each shard, its page index and a checkpoint → write the tokenizer and the manifest.

Deterministic: the same source, tokenizer and geometry give the same bytes (and so the same
fingerprint) on any machine, however often the build was interrupted. Resumable: a checkpoint
(``<out>/.build/``) records the finished shards, the documents consumed and the tokens carried over to
the next shard; a rerun with the same arguments checks the finished shards and continues.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from peer.config import DataConfig
from peer.data.pages import iter_hf_texts, parse_hf_spec, prepare_data
from peer.data.shards import (
    DTYPES,
    MANIFEST_VERSION,
    MAX_PAGES_PER_SHARD,
    Manifest,
    ShardEntry,
    TokenizerEntry,
    parse_manifest,
)
from peer.errors import DataError
from peer.net.outbox import atomic_write_bytes, file_sha256

EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"
MIN_PAGES = 20


@dataclass(kw_only=True)
class BuildConfig:
    """One ``peer data build`` run."""

    source: str
    """``hf:<dataset>[:<config>][@<split>]`` or a folder of ``*.txt``/``*.md`` (one document per file) and
    ``*.jsonl`` (one document per line, in ``text_field``) files, read in sorted path order."""
    out: Path
    """Output folder: manifest.json, tokenizer.json, shards/."""
    data: DataConfig
    """Page geometry and split rule of the model config the data set is for."""
    config_name: str
    tokenizer: str | None = None
    """HF tokenizer name, tokenizer.json file or folder; None = the model config's own BPE (offline)."""
    eos_token: str | None = None
    """End-of-text token appended after each document (default: the tokenizer's own)."""
    pages_per_shard: int | None = None
    """Pages per shard; None = as many as fit in ``shard_mb``."""
    shard_mb: float = 64.0
    """Target shard size in MiB when ``pages_per_shard`` is None. Peers fetch big shards page by page,
    so size mostly trades file count against per-file overhead."""
    max_tokens: int | None = None
    """Stop after this many tokens (quick builds, tests). None = the whole source."""
    text_field: str = "text"
    """Field holding the text in jsonl files and HF datasets."""
    batch_docs: int = 256
    """Documents tokenized per batch. Raise it for throughput on many small documents."""
    data_dir: Path | None = None
    """Where the model config's own tokenizer is prepared (default ~/.cache/gradswarm/data/<config>)."""
    corpus_dir: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.pages_per_shard is not None and not 1 <= self.pages_per_shard <= MAX_PAGES_PER_SHARD:
            raise DataError(f"--pages-per-shard must be in [1, {MAX_PAGES_PER_SHARD}]")
        if self.shard_mb <= 0:
            raise DataError("--shard-mb must be > 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise DataError("--max-tokens must be >= 1")
        if self.batch_docs < 1:
            raise DataError("--batch-docs must be >= 1")


# ---------------------------------------------------------------------------------------------------
# tokenizer


@dataclass(kw_only=True)
class LoadedTokenizer:
    tok: object
    """A ``tokenizers.Tokenizer``."""
    name: str
    json_bytes: bytes
    eos_id: int
    vocab_size: int


def load_tokenizer(cfg: BuildConfig) -> LoadedTokenizer:
    """The build's tokenizer as a fast ``tokenizers.Tokenizer`` (HF names go through AutoTokenizer)."""
    from tokenizers import Tokenizer

    auto_eos = None
    if cfg.tokenizer is None:
        data_dir = cfg.data_dir or Path.home() / ".cache" / "gradswarm" / "data" / cfg.config_name
        prepare_data(cfg.data, data_dir, cfg.corpus_dir)
        tok = Tokenizer.from_file(str(Path(data_dir) / "tokenizer.json"))
        name = f"gradswarm-bpe:{cfg.config_name}"
    else:
        name = cfg.tokenizer
        path = Path(cfg.tokenizer)
        file = path / "tokenizer.json" if path.is_dir() else path
        if file.is_file():
            try:
                tok = Tokenizer.from_file(str(file))
            except Exception as e:  # tokenizers raises a bare Exception for a malformed file
                raise DataError(f"--tokenizer {cfg.tokenizer}: not a tokenizers file ({e})") from None
        else:
            tok, auto_eos = _auto_tokenizer(cfg.tokenizer)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if cfg.eos_token is not None:
        eos = tok.token_to_id(cfg.eos_token)
        if eos is None:
            raise DataError(f"--eos-token {cfg.eos_token!r} is not in the tokenizer's vocabulary")
    elif auto_eos is not None:
        eos = auto_eos
    else:
        eos = next((tok.token_to_id(t) for t in EOS_CANDIDATES if tok.token_to_id(t) is not None), None)
        if eos is None:
            raise DataError(f"tokenizer {name} has no end-of-text token I know: pass --eos-token")
    return LoadedTokenizer(tok=tok, name=name, json_bytes=tok.to_str().encode(), eos_id=eos, vocab_size=vocab)


def _auto_tokenizer(name: str):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError("--tokenizer <HF name> needs the `transformers` package") from None
    try:
        auto = AutoTokenizer.from_pretrained(name, use_fast=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"--tokenizer {name}: could not load it ({first}); give a tokenizer.json path, a local "
            "folder, or an HF name with network access"
        ) from None
    if not getattr(auto, "is_fast", False):
        raise DataError(
            f"--tokenizer {name}: no fast tokenizer available; convert it to tokenizer.json first"
        )
    return auto.backend_tokenizer, auto.eos_token_id


# ---------------------------------------------------------------------------------------------------
# sources


def _folder_files(folder: Path) -> list[Path]:
    files = [
        p
        for p in folder.rglob("*")
        if p.is_file()
        and (p.suffix in TEXT_SUFFIXES or p.suffix == JSONL_SUFFIX)
        and not p.name.startswith(".")
    ]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def describe_source(cfg: BuildConfig) -> str:
    """A deterministic name of the source for the manifest (a folder is named by its content hash)."""
    if cfg.source.startswith("hf:"):
        parse_hf_spec(cfg.source)
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise DataError(
                "--source hf:… needs the `datasets` package: pip install 'gradswarm[hf]'"
            ) from None
        return f"{cfg.source} field={cfg.text_field}"
    folder = Path(cfg.source)
    if not folder.is_dir():
        raise DataError(f"--source {cfg.source}: not a folder and not hf:<dataset>[:<config>][@<split>]")
    files = _folder_files(folder)
    if not files:
        raise DataError(f"--source {cfg.source}: no *.txt, *.md or *.jsonl files in it")
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(folder).as_posix().encode() + b"\0" + bytes.fromhex(file_sha256(p)))
    return f"folder sha256:{h.hexdigest()} files={len(files)} field={cfg.text_field}"


def iter_documents(cfg: BuildConfig) -> Iterator[str]:
    if cfg.source.startswith("hf:"):
        yield from iter_hf_texts(cfg.source, cfg.text_field)
        return
    folder = Path(cfg.source)
    for path in _folder_files(folder):
        if path.suffix == JSONL_SUFFIX:
            with open(path, encoding="utf-8", errors="replace") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        raise DataError(f"{path}:{n}: not a JSON line") from None
                    text = row.get(cfg.text_field) if isinstance(row, dict) else None
                    if not isinstance(text, str):
                        raise DataError(f"{path}:{n}: no string field {cfg.text_field!r} (set --text-field)")
                    yield text
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------
# writing shards


def _write_shard(out: Path, i: int, tokens: np.ndarray, first_page: int, page_tokens: int) -> ShardEntry:
    name, index = f"shards/{i:05d}.bin", f"shards/{i:05d}.idx"
    data = tokens.tobytes()
    page_bytes = page_tokens * tokens.itemsize
    hashes = b"".join(
        hashlib.sha256(data[o : o + page_bytes]).digest() for o in range(0, len(data), page_bytes)
    )
    atomic_write_bytes(out / name, data)
    atomic_write_bytes(out / index, hashes)
    return ShardEntry(
        name=name,
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
        first_page=first_page,
        num_pages=len(data) // page_bytes,
        index=index,
        index_sha256=hashlib.sha256(hashes).hexdigest(),
    )


class _Checkpoint:
    """``<out>/.build/state.json`` + ``carry.bin``: what a rerun needs to continue a build."""

    def __init__(self, out: Path, identity: dict, dtype: np.dtype):
        self.dir = out / ".build"
        self.identity = identity
        self.dtype = dtype

    def load(self) -> tuple[int, int, list[ShardEntry], np.ndarray] | None:
        """(docs done, stream tokens, finished shards, carried tokens) of a valid checkpoint, or None."""
        state_path = self.dir / "state.json"
        if not state_path.is_file():
            return None
        state = json.loads(state_path.read_text())
        if state.get("identity") != self.identity:
            raise DataError(
                f"{self.dir.parent} holds a partial build of another source, tokenizer or geometry: "
                f"choose another --out or delete {self.dir}"
            )
        shards = [ShardEntry(**s) for s in state["shards"]]
        carry_path = self.dir / "carry.bin"
        ok = carry_path.is_file() and file_sha256(carry_path) == state["carry_sha256"]
        for s in shards:
            ok = ok and all(
                (self.dir.parent / n).is_file() and file_sha256(self.dir.parent / n) == h
                for n, h in ((s.name, s.sha256), (s.index, s.index_sha256))
            )
        if not ok:
            print(
                f"{self.dir}: checkpoint does not match the files on disk; building from the start",
                file=sys.stderr,
            )
            shutil.rmtree(self.dir)
            return None
        carry = np.fromfile(carry_path, dtype=self.dtype)
        return state["docs_done"], state["stream_tokens"], shards, carry

    def save(self, docs_done: int, stream_tokens: int, shards: list[ShardEntry], carry: np.ndarray) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = carry.astype(self.dtype).tobytes()
        atomic_write_bytes(self.dir / "carry.bin", data)
        state = {
            "identity": self.identity,
            "docs_done": docs_done,
            "stream_tokens": stream_tokens,
            "shards": [s.to_json() for s in shards],
            "carry_sha256": hashlib.sha256(data).hexdigest(),
        }
        atomic_write_bytes(self.dir / "state.json", json.dumps(state).encode())

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _progress(enabled: bool):
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TextColumn("{task.fields[docs]:,} docs  {task.completed:,.0f} tokens  {task.fields[rate]}"),
        TextColumn("{task.fields[shards]} shards"),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=False,
    )


def build_dataset(cfg: BuildConfig, on_shard: Callable[[ShardEntry], None] | None = None) -> Manifest:
    """Build (or continue building) the data set in ``cfg.out``; returns its manifest.

    ``on_shard`` is called after each shard and checkpoint are written (tests interrupt the build there).
    """
    source = describe_source(cfg)  # first: a wrong source fails before any tokenizer work
    tok = load_tokenizer(cfg)
    data = cfg.data
    if tok.vocab_size > data.vocab_size:
        raise DataError(
            f"tokenizer {tok.name} has {tok.vocab_size} tokens, more than vocab_size {data.vocab_size} of "
            f"config {cfg.config_name}: pick a config whose data.vocab_size is at least {tok.vocab_size}"
        )
    dtype_name = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    dtype = DTYPES[dtype_name]
    page_tokens = data.page_tokens
    pages_per_shard = cfg.pages_per_shard or max(
        1, int(cfg.shard_mb * 2**20) // (page_tokens * dtype.itemsize)
    )
    pages_per_shard = min(pages_per_shard, MAX_PAGES_PER_SHARD)
    shard_tokens = pages_per_shard * page_tokens
    tokenizer = TokenizerEntry(
        name=tok.name,
        file="tokenizer.json",
        sha256=hashlib.sha256(tok.json_bytes).hexdigest(),
        bytes=len(tok.json_bytes),
        vocab_size=tok.vocab_size,
        eos_id=tok.eos_id,
    )
    identity = {
        "manifest_version": MANIFEST_VERSION,
        "source": source,
        "tokenizer": tokenizer.to_json(),
        "dtype": dtype_name,
        "seq_len": data.seq_len,
        "samples_per_page": data.samples_per_page,
        "heldout_permille": data.heldout_permille,
        "pages_per_shard": pages_per_shard,
        "max_tokens": cfg.max_tokens,
    }
    out = cfg.out
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        existing = parse_manifest(manifest_path.read_bytes())
        same = (
            existing.source == source
            and existing.tokenizer == tokenizer
            and (existing.seq_len, existing.samples_per_page, existing.heldout_permille)
            == (data.seq_len, data.samples_per_page, data.heldout_permille)
        )
        if not same:
            raise DataError(
                f"{out} already holds another data set (fingerprint {existing.fingerprint[:16]}…): "
                "choose another --out or delete it"
            )
        return existing
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = _Checkpoint(out, identity, dtype)
    resumed = checkpoint.load()
    docs_done, stream_tokens, shards, carry = resumed or (0, 0, [], np.empty(0, dtype))
    if resumed:
        print(f"resuming {out}: {len(shards)} shards done, skipping {docs_done:,} documents", file=sys.stderr)
    pending: list[np.ndarray] = [carry] if len(carry) else []
    pending_len = len(carry)
    t0, new_tokens = time.monotonic(), 0

    def flush(final: bool) -> bool:
        nonlocal pending, pending_len
        wrote = False
        while pending_len >= shard_tokens or (final and pending_len >= page_tokens):
            buf = np.concatenate(pending) if len(pending) > 1 else pending[0]
            take = shard_tokens if pending_len >= shard_tokens else (pending_len // page_tokens) * page_tokens
            first = shards[-1].first_page + shards[-1].num_pages if shards else 0
            shards.append(_write_shard(out, len(shards), buf[:take], first, page_tokens))
            rest = buf[take:]
            pending, pending_len = ([rest] if len(rest) else []), len(rest)
            wrote = True
        return wrote

    docs = itertools.islice(iter_documents(cfg), docs_done, None)
    exhausted = cfg.max_tokens is not None and stream_tokens >= cfg.max_tokens
    with _progress(cfg.progress) as bar:
        task = bar.add_task(f"building {out.name}", total=None, docs=docs_done, rate="", shards=len(shards))
        bar.update(task, completed=stream_tokens)
        while not exhausted:
            batch = list(itertools.islice(docs, cfg.batch_docs))
            if not batch:
                break
            for enc in tok.tok.encode_batch_fast(batch, add_special_tokens=False):
                ids = np.asarray(enc.ids, dtype=dtype)
                arrays = [ids, np.asarray([tok.eos_id], dtype=dtype)]
                for arr in arrays:
                    if cfg.max_tokens is not None and stream_tokens + len(arr) >= cfg.max_tokens:
                        arr = arr[: cfg.max_tokens - stream_tokens]
                        exhausted = True
                    pending.append(arr)
                    pending_len += len(arr)
                    stream_tokens += len(arr)
                    new_tokens += len(arr)
                    if exhausted:
                        break
                if exhausted:
                    break
            docs_done += len(batch)
            if flush(final=False):
                carry = np.concatenate(pending) if pending else np.empty(0, dtype)
                pending = [carry] if len(carry) else []
                checkpoint.save(docs_done, stream_tokens, shards, carry)
                if on_shard is not None:
                    on_shard(shards[-1])
            rate = new_tokens / max(time.monotonic() - t0, 1e-9)
            bar.update(
                task, completed=stream_tokens, docs=docs_done, rate=f"{rate:,.0f} tok/s", shards=len(shards)
            )
        flush(final=True)
    num_pages = shards[-1].first_page + shards[-1].num_pages if shards else 0
    if num_pages < MIN_PAGES:
        raise DataError(
            f"--source {cfg.source} gives only {stream_tokens} tokens, {num_pages} pages of {page_tokens}: "
            f"at least {MIN_PAGES} are needed (training and held-out pages)"
        )
    manifest = Manifest(
        dtype=dtype_name,
        seq_len=data.seq_len,
        samples_per_page=data.samples_per_page,
        num_pages=num_pages,
        heldout_permille=data.heldout_permille,
        tokenizer=tokenizer,
        source=source,
        shards=tuple(shards),
    )
    atomic_write_bytes(out / "tokenizer.json", tok.json_bytes)
    atomic_write_bytes(manifest_path, manifest.canonical_bytes())
    checkpoint.clear()
    return manifest
