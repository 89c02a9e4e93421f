"""Sharded token data sets: one manifest + token shards, read lazily and verified page by page.

A data set is a folder (local, ``file://``, or any HTTP(S) URL — HF Hub ``…/resolve/main/`` URLs are
plain HTTPS)::

    manifest.json          canonical JSON (sorted keys, no spaces); its sha256 is the data fingerprint
    tokenizer.json         the HF ``tokenizers`` file every page was encoded with
    shards/00000.bin       tokens (uint16 or uint32, little-endian), whole pages back to back
    shards/00000.idx       sha256 of every page of that shard, 32 bytes each

A *page* is ``samples_per_page * (seq_len + 1)`` tokens, addressed by a global page id; shard ``i``
holds pages ``[first_page, first_page + num_pages)``. The manifest pins the sha256 of every shard, of
every shard's page index and of the tokenizer, so the fingerprint pins every token. The held-out split
rule is in the manifest (``heldout``) and is the same pure function of the page id as
:func:`peer.data.pages.is_heldout`; assignment stays :func:`peer.data.pages.assign_pages` over the
manifest's page ids.

:class:`ShardedPageStore` exposes :class:`~peer.data.pages.PageStore`'s interface. It downloads only the
shards (small ones whole) or pages (``Range`` requests into big shards) that are read, into a
content-addressed cache, and checks each page against its shard's index before use.
:func:`open_page_store` picks the store from a ``--data`` argument.

The manifest comes from the network: :func:`parse_manifest` bounds its size, checks every type, range
and name (no path traversal, hex digests, contiguous page ranges) before anything is allocated from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from peer.config import DataConfig
from peer.data.fetcher import Fetcher, FetchPolicy, RangeNotSupported, is_remote
from peer.data.pages import PageStore, prepare_data, split_pages
from peer.errors import DataError

MANIFEST_FORMAT = "gradswarm.shards"
MANIFEST_VERSION = 1
HELDOUT_RULE = "blake2b64-permille"
"""``is_heldout(page_id, permille)``: blake2b-64 of ("heldout", page id) mod 1000 < permille."""
MAX_MANIFEST_BYTES = 32 << 20
MAX_SHARDS = 100_000
MAX_PAGES_PER_SHARD = 1 << 24
MAX_PAGE_TOKENS = 1 << 24
MAX_PAGES = 1 << 34
MAX_SHARD_BYTES = 1 << 36
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
PAGE_HASH_BYTES = 32
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}(/[A-Za-z0-9_][A-Za-z0-9._-]{0,99}){0,3}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")

_TOP_KEYS = {
    "format",
    "version",
    "dtype",
    "seq_len",
    "samples_per_page",
    "page_tokens",
    "num_pages",
    "num_tokens",
    "heldout",
    "tokenizer",
    "source",
    "shards",
}
_TOKENIZER_KEYS = {"name", "file", "sha256", "bytes", "vocab_size", "eos_id"}
_SHARD_KEYS = {"name", "sha256", "bytes", "first_page", "num_pages", "index", "index_sha256"}


# ---------------------------------------------------------------------------------------------------
# the manifest


@dataclass(frozen=True, kw_only=True)
class ShardEntry:
    name: str
    """Shard file, relative to the manifest (``shards/00000.bin``)."""
    sha256: str
    bytes: int
    first_page: int
    num_pages: int
    index: str
    """Page index file: sha256 of each page, 32 bytes per page."""
    index_sha256: str

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True, kw_only=True)
class TokenizerEntry:
    name: str
    """Where the tokenizer came from (HF name, path or ``gradswarm-bpe:<config>``); informational."""
    file: str
    sha256: str
    bytes: int
    vocab_size: int
    eos_id: int

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True, kw_only=True)
class Manifest:
    dtype: str
    seq_len: int
    samples_per_page: int
    num_pages: int
    heldout_permille: int
    tokenizer: TokenizerEntry
    source: str
    shards: tuple[ShardEntry, ...]

    @property
    def page_tokens(self) -> int:
        return self.samples_per_page * (self.seq_len + 1)

    @property
    def page_bytes(self) -> int:
        return self.page_tokens * DTYPES[self.dtype].itemsize

    def to_json(self) -> dict:
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "dtype": self.dtype,
            "seq_len": self.seq_len,
            "samples_per_page": self.samples_per_page,
            "page_tokens": self.page_tokens,
            "num_pages": self.num_pages,
            "num_tokens": self.num_pages * self.page_tokens,
            "heldout": {"rule": HELDOUT_RULE, "permille": self.heldout_permille},
            "tokenizer": self.tokenizer.to_json(),
            "source": self.source,
            "shards": [s.to_json() for s in self.shards],
        }

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical manifest bytes: pins geometry, split rule, tokenizer and every token."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def shard_of(self, page_id: int) -> int:
        """Index of the shard holding ``page_id`` (shards are contiguous and in order)."""
        lo, hi = 0, len(self.shards)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.shards[mid].first_page <= page_id:
                lo = mid
            else:
                hi = mid
        return lo


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class ManifestError(DataError):
    """A manifest that is malformed, out of bounds or hostile."""


def _reject_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ManifestError(
            f"duplicate key in manifest object: {sorted({k for k in keys if keys.count(k) > 1})}"
        )
    return dict(pairs)


def _reject_constant(name):
    raise ManifestError(f"manifest holds {name}, which is not JSON")


def _obj(raw, keys: set[str], where: str) -> dict:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: expected an object, got {type(raw).__name__}")
    if set(raw) != keys:
        missing, extra = sorted(keys - set(raw)), sorted(set(raw) - keys)
        raise ManifestError(f"{where}: missing keys {missing}, unknown keys {extra}")
    return raw


def _int(raw, where: str, lo: int, hi: int) -> int:
    if type(raw) is not int or not lo <= raw <= hi:
        raise ManifestError(f"{where}: expected an integer in [{lo}, {hi}], got {raw!r:.40}")
    return raw


def _str(raw, where: str, max_len: int = 512) -> str:
    if not isinstance(raw, str) or len(raw) > max_len:
        raise ManifestError(f"{where}: expected a string of at most {max_len} characters")
    return raw


def _hex64(raw, where: str) -> str:
    if not isinstance(raw, str) or not _HEX64_RE.fullmatch(raw):
        raise ManifestError(f"{where}: expected a lowercase sha256 hex digest")
    return raw


def _name(raw, where: str) -> str:
    if not isinstance(raw, str) or not _NAME_RE.fullmatch(raw):
        raise ManifestError(
            f"{where}: {raw!r:.60} is not a relative file name (letters, digits, '._-', up to 3 folders)"
        )
    return raw


def parse_manifest(data: bytes) -> Manifest:
    """Check and parse manifest bytes from anywhere (the network included); raise ManifestError."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is {len(data)} bytes, more than the {MAX_MANIFEST_BYTES} allowed")
    try:
        raw = json.loads(data, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"manifest is not JSON ({e})") from None
    top = _obj(raw, _TOP_KEYS, "manifest")
    if top["format"] != MANIFEST_FORMAT:
        raise ManifestError(f"manifest format {top['format']!r:.40}, expected {MANIFEST_FORMAT!r}")
    if top["version"] != MANIFEST_VERSION or type(top["version"]) is not int:
        raise ManifestError(
            f"manifest version {top['version']!r:.20} is not supported (this peer reads version "
            f"{MANIFEST_VERSION}); update gradswarm"
        )
    if top["dtype"] not in DTYPES:
        raise ManifestError(f"manifest dtype {top['dtype']!r:.20}: expected one of {sorted(DTYPES)}")
    dtype = top["dtype"]
    seq_len = _int(top["seq_len"], "seq_len", 1, MAX_PAGE_TOKENS)
    spp = _int(top["samples_per_page"], "samples_per_page", 1, MAX_PAGE_TOKENS)
    page_tokens = _int(top["page_tokens"], "page_tokens", 1, MAX_PAGE_TOKENS)
    if page_tokens != spp * (seq_len + 1):
        raise ManifestError("page_tokens must be samples_per_page * (seq_len + 1)")
    num_pages = _int(top["num_pages"], "num_pages", 1, MAX_PAGES)
    if _int(top["num_tokens"], "num_tokens", 1, MAX_PAGES * MAX_PAGE_TOKENS) != num_pages * page_tokens:
        raise ManifestError("num_tokens must be num_pages * page_tokens")
    held = _obj(top["heldout"], {"rule", "permille"}, "heldout")
    if held["rule"] != HELDOUT_RULE:
        raise ManifestError(
            f"heldout.rule {held['rule']!r:.40} is unknown (this peer knows {HELDOUT_RULE!r})"
        )
    permille = _int(held["permille"], "heldout.permille", 1, 499)
    t = _obj(top["tokenizer"], _TOKENIZER_KEYS, "tokenizer")
    tok = TokenizerEntry(
        name=_str(t["name"], "tokenizer.name"),
        file=_name(t["file"], "tokenizer.file"),
        sha256=_hex64(t["sha256"], "tokenizer.sha256"),
        bytes=_int(t["bytes"], "tokenizer.bytes", 1, 256 << 20),
        vocab_size=_int(t["vocab_size"], "tokenizer.vocab_size", 2, np.iinfo(DTYPES[dtype]).max + 1),
        eos_id=_int(t["eos_id"], "tokenizer.eos_id", 0, 2**32),
    )
    if tok.eos_id >= tok.vocab_size:
        raise ManifestError("tokenizer.eos_id must be < tokenizer.vocab_size")
    source = _str(top["source"], "source")
    shards_raw = top["shards"]
    if not isinstance(shards_raw, list) or not 1 <= len(shards_raw) <= MAX_SHARDS:
        raise ManifestError(f"shards: expected a list of 1 to {MAX_SHARDS} shards")
    page_bytes = page_tokens * DTYPES[dtype].itemsize
    shards, names, next_page = [], set(), 0
    for i, s in enumerate(shards_raw):
        where = f"shards[{i}]"
        s = _obj(s, _SHARD_KEYS, where)
        entry = ShardEntry(
            name=_name(s["name"], f"{where}.name"),
            sha256=_hex64(s["sha256"], f"{where}.sha256"),
            bytes=_int(s["bytes"], f"{where}.bytes", 1, MAX_SHARD_BYTES),
            first_page=_int(s["first_page"], f"{where}.first_page", 0, MAX_PAGES),
            num_pages=_int(s["num_pages"], f"{where}.num_pages", 1, MAX_PAGES_PER_SHARD),
            index=_name(s["index"], f"{where}.index"),
            index_sha256=_hex64(s["index_sha256"], f"{where}.index_sha256"),
        )
        if entry.first_page != next_page:
            raise ManifestError(
                f"{where}: first_page {entry.first_page}, expected {next_page} (page ranges must be "
                "contiguous, in order, without overlap)"
            )
        if entry.bytes != entry.num_pages * page_bytes:
            raise ManifestError(f"{where}: bytes must be num_pages * page_tokens * {DTYPES[dtype].itemsize}")
        for n in (entry.name, entry.index):
            if n in names or n == tok.file:
                raise ManifestError(f"{where}: file {n!r} is named twice in the manifest")
            names.add(n)
        next_page += entry.num_pages
        shards.append(entry)
    if next_page != num_pages:
        raise ManifestError(f"shards hold {next_page} pages, num_pages says {num_pages}")
    return Manifest(
        dtype=dtype,
        seq_len=seq_len,
        samples_per_page=spp,
        num_pages=num_pages,
        heldout_permille=permille,
        tokenizer=tok,
        source=source,
        shards=tuple(shards),
    )


def check_compatible(m: Manifest, cfg: DataConfig, where: str) -> None:
    """Raise DataError unless a data set fits the model config (geometry, split rule, vocabulary)."""
    for field in ("seq_len", "samples_per_page", "heldout_permille"):
        if getattr(m, field) != getattr(cfg, field):
            raise DataError(
                f"{where} was built with {field}={getattr(m, field)}, the model config has "
                f"{getattr(cfg, field)}: rebuild it with `peer data build --config <this config>`"
            )
    if m.tokenizer.vocab_size > cfg.vocab_size:
        raise DataError(
            f"{where} uses a tokenizer of {m.tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size {cfg.vocab_size}: use a model config with a larger data.vocab_size"
        )


# ---------------------------------------------------------------------------------------------------
# locations: a manifest URL or path, and the files it names


def _resolve(base: str, name: str) -> str:
    """URL or path of ``name`` next to the manifest at ``base``; never outside the manifest's folder."""
    _name(name, "file name")
    if is_remote(base):
        url = urllib.parse.urljoin(base, name)
        root = urllib.parse.urljoin(base, ".")
        if not url.startswith(root):
            raise ManifestError(f"{name!r} resolves outside the manifest's folder")
        return url
    root = Path(base).parent.resolve()
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        raise ManifestError(f"{name!r} resolves outside the manifest's folder")
    return str(path)


def _local_path(source: str) -> str:
    if source.startswith("file://"):
        parsed = urllib.parse.urlparse(source)
        if parsed.netloc not in ("", "localhost"):
            raise DataError(f"--data {source}: file:// URLs must name a local file (file:///path)")
        return urllib.parse.unquote(parsed.path)
    return source


# ---------------------------------------------------------------------------------------------------
# reading pages


class ShardedPageStore:
    """Read-only view of a sharded data set, with :class:`~peer.data.pages.PageStore`'s interface.

    Pages are fetched on first use: shards up to ``whole_shard_bytes`` whole, bigger ones page by page
    with HTTP ``Range`` requests. Every page is checked against its shard's page index (itself pinned
    by the manifest) before it is used; a page that fails is an error and is never cached. Verified
    pages stay in memory up to ``memory_bytes`` (least recently used first out).

    Tune: many small requests in the logs (``pages_fetched`` high) on a fast link → raise
    ``whole_shard_bytes``; disk filling with whole shards on a slow link → lower it.
    """

    def __init__(
        self,
        source: str,
        cfg: DataConfig,
        cache_dir: Path,
        *,
        policy: FetchPolicy | None = None,
        whole_shard_bytes: int = 16 << 20,
        memory_bytes: int = 64 << 20,
        workers: int = 8,
    ):
        self.source = source
        self.remote = is_remote(source)
        self.base = source if self.remote else _local_path(source)
        self.fetcher = Fetcher(Path(cache_dir), policy or FetchPolicy())
        self.whole_shard_bytes = whole_shard_bytes
        self.memory_bytes = memory_bytes
        self.workers = workers
        raw = self._read_manifest()
        self.manifest = parse_manifest(raw)
        check_compatible(self.manifest, cfg, f"data set {source}")
        self.cfg = cfg
        self.meta = self.manifest.to_json()
        self.num_pages: int = self.manifest.num_pages
        self.fingerprint: str = self.manifest.fingerprint
        self.dtype = DTYPES[self.manifest.dtype]
        self.train_pages, self.heldout_pages = split_pages(self.num_pages, self.manifest.heldout_permille)
        self._lock = threading.Lock()
        self._shard_locks = [threading.Lock() for _ in self.manifest.shards]
        self._indexes: dict[int, bytes] = {}
        self._locations: dict[str, str] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._checked: set[str] = set()
        self._memory: OrderedDict[int, np.ndarray] = OrderedDict()
        self._memory_used = 0
        self.pages_fetched = 0
        """Pages downloaded one by one (Range requests) by this store."""
        self.shards_fetched = 0
        """Whole shards downloaded by this store."""

    # -- locations ------------------------------------------------------------------------------

    def _read_manifest(self) -> bytes:
        if self.remote:
            return self.fetcher.get_bytes(self.base, max_bytes=MAX_MANIFEST_BYTES, what="manifest")
        path = Path(self.base)
        if not path.is_file():
            raise DataError(f"--data {self.source}: no such manifest file")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"--data {self.source}: manifest is larger than {MAX_MANIFEST_BYTES} bytes")
        return path.read_bytes()

    def _where(self, name: str) -> str:
        where = self._locations.get(name)
        if where is None:
            where = self._locations[name] = _resolve(self.base, name)
        return where

    # -- verified objects -------------------------------------------------------------------------

    def _object(self, name: str, sha256: str, size: int, what: str) -> Path | str:
        """A whole file of the data set, verified: the local file itself, or the cached download."""
        where = self._where(name)
        if self.remote:
            path = self.fetcher.fetch(where, sha256=sha256, size=size, what=what)
            return path
        if where not in self._checked:
            if not os.path.isfile(where) or os.path.getsize(where) != size:
                raise DataError(
                    f"{what} {where} is missing or has the wrong size; the data set is incomplete"
                )
            self._checked.add(where)
        return where

    def _index(self, s: int) -> bytes:
        if s in self._indexes:
            return self._indexes[s]
        entry = self.manifest.shards[s]
        size = entry.num_pages * PAGE_HASH_BYTES
        path = self._object(entry.index, entry.index_sha256, size, f"page index of {entry.name}")
        data = Path(path).read_bytes()
        if len(data) != size or hashlib.sha256(data).hexdigest() != entry.index_sha256:
            raise DataError(f"page index {entry.index} of {self.source} does not match the manifest's sha256")
        self._indexes[s] = data
        return data

    def _page_sha(self, page_id: int) -> bytes:
        s = self.manifest.shard_of(page_id)
        i = page_id - self.manifest.shards[s].first_page
        return self._index(s)[i * PAGE_HASH_BYTES : (i + 1) * PAGE_HASH_BYTES]

    def _check_page(self, page_id: int, data: bytes, origin: str) -> np.ndarray:
        if len(data) != self.manifest.page_bytes or hashlib.sha256(data).digest() != self._page_sha(page_id):
            raise DataError(
                f"page {page_id} from {origin} does not match its sha256 in the data set's page index "
                "(tampered or corrupt; it was not used)"
            )
        arr = np.frombuffer(data, dtype=self.dtype)
        top = int(arr.max())
        if top >= self.cfg.vocab_size:
            raise DataError(f"page {page_id} holds token id {top}, outside the model's vocabulary")
        return arr

    def _read_page_bytes(self, page_id: int) -> tuple[bytes, str]:
        """The bytes of one page and where they came from, fetching (shard or page) if needed."""
        m = self.manifest
        s = m.shard_of(page_id)
        entry = m.shards[s]
        offset = (page_id - entry.first_page) * m.page_bytes
        if self.remote:
            shard_path = self.fetcher.cached(entry.sha256)
            if shard_path is None and entry.bytes <= self.whole_shard_bytes:
                with self._shard_locks[s]:
                    shard_path = self.fetcher.cached(entry.sha256)
                    if shard_path is None:
                        shard_path = self._fetch_shard(s)
            if shard_path is None:
                page_sha = self._page_sha(page_id).hex()
                page_path = self.fetcher.cached(page_sha)
                if page_path is None:
                    try:
                        page_path = self.fetcher.fetch(
                            self._where(entry.name),
                            sha256=page_sha,
                            size=m.page_bytes,
                            offset=offset,
                            what=f"page {page_id} of {entry.name}",
                        )
                        with self._lock:
                            self.pages_fetched += 1
                    except RangeNotSupported:
                        with self._shard_locks[s]:
                            shard_path = self.fetcher.cached(entry.sha256) or self._fetch_shard(s)
                if shard_path is None:
                    return _pread(page_path, 0, m.page_bytes), page_path
            return _pread(shard_path, offset, m.page_bytes), shard_path
        path = self._object(entry.name, entry.sha256, entry.bytes, f"shard {entry.name}")
        return _pread(path, offset, m.page_bytes), str(path)

    def _fetch_shard(self, s: int) -> Path:
        entry = self.manifest.shards[s]
        path = self.fetcher.fetch(
            self._where(entry.name), sha256=entry.sha256, size=entry.bytes, what=f"shard {entry.name}"
        )
        with self._lock:
            self.shards_fetched += 1
        return path

    def _page_array(self, page_id: int) -> np.ndarray:
        if not isinstance(page_id, int | np.integer) or not 0 <= page_id < self.num_pages:
            raise IndexError(f"page {page_id} out of range [0, {self.num_pages})")
        page_id = int(page_id)
        with self._lock:
            arr = self._memory.get(page_id)
            if arr is not None:
                self._memory.move_to_end(page_id)
                return arr
        data, origin = self._read_page_bytes(page_id)
        try:
            arr = self._check_page(page_id, data, origin)
        except DataError:
            if self.remote:  # a cache object changed on disk: drop it, the next read fetches it again
                Path(origin).unlink(missing_ok=True)
            raise
        with self._lock:
            if page_id not in self._memory and arr.nbytes <= self.memory_bytes:
                self._memory[page_id] = arr
                self._memory_used += arr.nbytes
                while self._memory_used > self.memory_bytes:
                    _, old = self._memory.popitem(last=False)
                    self._memory_used -= old.nbytes
        return arr

    # -- PageStore interface ----------------------------------------------------------------------

    def prefetch(self, page_ids: Sequence[int]) -> None:
        """Fetch and verify the given pages in parallel (``samples`` calls this)."""
        todo = sorted({int(p) for p in page_ids})
        if len(todo) <= 1 or self.workers <= 1:
            for p in todo:
                self._page_array(p)
            return
        if self._pool is None:  # kept: its threads keep their HTTP connections alive between rounds
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="pages")
        list(self._pool.map(self._page_array, todo))

    def page(self, page_id: int) -> torch.Tensor:
        """Token ids of a page as [samples_per_page, seq_len + 1] int64."""
        arr = self._page_array(page_id).astype(np.int64)
        return torch.from_numpy(arr.reshape(self.cfg.samples_per_page, self.cfg.seq_len + 1))

    def samples(self, page_ids: Sequence[int]) -> torch.Tensor:
        """All samples of the given pages, [len(page_ids) * samples_per_page, seq_len + 1]."""
        if not page_ids:
            return torch.empty(0, self.cfg.seq_len + 1)
        self.prefetch(page_ids)
        return torch.cat([self.page(p) for p in page_ids])

    def batches(self, page_ids: Sequence[int], batch_size: int) -> list[torch.Tensor]:
        data = self.samples(page_ids)
        return [data[i : i + batch_size] for i in range(0, len(data), batch_size)]

    def tokenizer(self):
        from tokenizers import Tokenizer

        t = self.manifest.tokenizer
        path = self._object(t.file, t.sha256, t.bytes, "tokenizer")
        data = Path(path).read_bytes()
        if hashlib.sha256(data).hexdigest() != t.sha256:
            raise DataError(f"tokenizer {t.file} of {self.source} does not match the manifest's sha256")
        return Tokenizer.from_str(data.decode())

    def close(self) -> None:
        """Stop the fetch threads (their kept-alive connections close with them)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.fetcher.close()


def _pread(path: Path | str, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise DataError(
            f"{path} is shorter than the manifest says (read {len(data)} of {size} bytes at {offset})"
        )
    return data


def open_page_store(
    data: str | None, data_dir: Path, cfg: DataConfig, corpus_dir: Path | None = None
) -> PageStore | ShardedPageStore:
    """The page store of a peer or validator: ``--data`` (a manifest URL or path) selects a sharded data
    set cached under ``data_dir/shard-cache``; without it, the built-in corpus is prepared in ``data_dir``."""
    if data:
        return ShardedPageStore(str(data), cfg, Path(data_dir) / "shard-cache")
    prepare_data(cfg, data_dir, corpus_dir)
    return PageStore(data_dir, cfg)
