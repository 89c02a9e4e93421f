"""Sharded data sets: page read rate of a peer and build rate, each against a baseline of the same run.

    .venv/bin/python benchmarks/data_shards.py [--runs 3] [--seq-len 1024] [--samples-per-page 8]

Data: the offline corpus (``.cache/corpus``) tokenized with the debug config's BPE into pages of the
125M config's size by default (8 × 1025 uint16 tokens = 16 KiB), 16 pages per shard. Per run:

1. *raw*: every page read once, in a random order, straight from the shard files (``os.pread`` →
   int64 tensor): the baseline, no verification, no cache.
2. *warm cache*: a fresh :class:`~peer.data.shards.ShardedPageStore` (empty memory cache) over a disk
   cache that already holds every page: ``store.page(p)`` per page (read + sha256 against the page
   index + token-range check) — what a peer does after its first round. Ratio vs raw.
3. *local HTTP, cold*: a fresh store with an empty cache against a real ``ThreadingHTTPServer`` on
   127.0.0.1 (its own process) that serves ``Range`` requests; pages fetched one by one (``Range``, 8 threads) in
   groups of 16 via ``store.samples`` as a round's assignment is, verified, cached. Ratio vs raw.
4. *build*: ``peer data build`` of the whole corpus (tokenize, cut, hash, write) in tokens/s vs
   the tokenizer alone (``encode_batch_fast`` on the same documents, same batches). Ratio.

Prints one JSON line per run and a summary (worst and median over runs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from peer.config import DataConfig, load_run_config  # noqa: E402
from peer.data.build import BuildConfig, build_dataset, iter_documents, load_tokenizer  # noqa: E402
from peer.data.fetcher import FetchPolicy  # noqa: E402
from peer.data.pages import default_corpus_dir  # noqa: E402
from peer.data.shards import ShardedPageStore  # noqa: E402


def raw_pages_per_s(out: Path, manifest, order: list[int]) -> float:
    fds = {s.name: os.open(out / s.name, os.O_RDONLY) for s in manifest.shards}
    shape = (manifest.samples_per_page, manifest.seq_len + 1)
    t = time.perf_counter()
    for p in order:
        s = manifest.shards[manifest.shard_of(p)]
        data = os.pread(fds[s.name], manifest.page_bytes, (p - s.first_page) * manifest.page_bytes)
        torch.from_numpy(np.frombuffer(data, dtype=np.uint16).astype(np.int64).reshape(shape))
    dt = time.perf_counter() - t
    for fd in fds.values():
        os.close(fd)
    return len(order) / dt


def one_run(args, data: DataConfig, debug_data: Path, work: Path, run: int) -> dict:
    out = work / f"set-{run}"
    corpus = args.corpus or default_corpus_dir() / "texts"
    bcfg = BuildConfig(
        source=str(corpus),
        out=out,
        data=data,
        config_name="debug",
        tokenizer=str(debug_data / "tokenizer.json"),
        pages_per_shard=16,
        progress=False,
        batch_docs=args.batch_docs,
    )
    # tokenizer alone: same documents, same batches
    tok = load_tokenizer(bcfg)
    docs = list(iter_documents(bcfg))
    t = time.perf_counter()
    n_tok = 0
    for i in range(0, len(docs), args.batch_docs):
        for enc in tok.tok.encode_batch_fast(docs[i : i + args.batch_docs], add_special_tokens=False):
            n_tok += len(enc.ids) + 1
    tok_rate = n_tok / (time.perf_counter() - t)
    t = time.perf_counter()
    m = build_dataset(bcfg)
    build_s = time.perf_counter() - t
    build_rate = n_tok / build_s

    order = list(range(m.num_pages))
    random.Random(run).shuffle(order)
    raw = raw_pages_per_s(out, m, order)
    policy = FetchPolicy(retries=2, backoff_s=0.1)
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.shard_server", str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        url = f"{server.stdout.readline().strip()}/manifest.json"
        cold = ShardedPageStore(url, data, work / f"cache-{run}", policy=policy, whole_shard_bytes=0)
        t = time.perf_counter()
        for i in range(0, len(order), 16):
            cold.samples(order[i : i + 16])
        http_rate = len(order) / (time.perf_counter() - t)
        assert cold.pages_fetched == len(order)
        warm = ShardedPageStore(url, data, work / f"cache-{run}", policy=policy, whole_shard_bytes=0)
        warm._index(0)  # the page indexes are read once per store; load them outside the timing
        for s in range(len(m.shards)):
            warm._index(s)
        t = time.perf_counter()
        for p in order:
            warm.page(p)
        warm_rate = len(order) / (time.perf_counter() - t)
        requests = cold.fetcher.requests
    finally:
        server.kill()
        server.wait()
    shutil.rmtree(work / f"cache-{run}")
    shutil.rmtree(out)
    return {
        "run": run,
        "pages": m.num_pages,
        "page_kib": m.page_bytes / 1024,
        "tokens": n_tok,
        "raw_pages_per_s": round(raw),
        "warm_pages_per_s": round(warm_rate),
        "warm_ratio": round(warm_rate / raw, 3),
        "http_pages_per_s": round(http_rate),
        "http_ratio": round(http_rate / raw, 4),
        "http_requests": requests,
        "tokenizer_tok_per_s": round(tok_rate),
        "build_tok_per_s": round(build_rate),
        "build_ratio": round(build_rate / tok_rate, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--samples-per-page", type=int, default=8)
    ap.add_argument("--batch-docs", type=int, default=64)
    ap.add_argument("--corpus", type=Path, default=None, help="folder of texts (default: the offline corpus)")
    ap.add_argument("--data-dir", type=Path, default=REPO / ".cache" / "data" / "debug")
    args = ap.parse_args()
    from peer.data.pages import prepare_data

    debug = load_run_config("debug")
    prepare_data(debug.data, args.data_dir)  # the debug config's BPE (shared, file-locked)
    data = DataConfig(
        vocab_size=debug.data.vocab_size,
        seq_len=args.seq_len,
        samples_per_page=args.samples_per_page,
        heldout_permille=debug.data.heldout_permille,
    )
    print(f"load average before: {os.getloadavg()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        for run in range(args.runs):
            row = one_run(args, data, args.data_dir, Path(tmp), run)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"load average after: {os.getloadavg()}")
    for key in (
        "warm_ratio",
        "http_ratio",
        "build_ratio",
        "raw_pages_per_s",
        "warm_pages_per_s",
        "http_pages_per_s",
        "tokenizer_tok_per_s",
        "build_tok_per_s",
    ):
        vals = [r[key] for r in rows]
        print(f"{key:22s} worst {min(vals):>12,}  median {statistics.median(vals):>12,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
