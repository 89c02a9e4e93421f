"""``peer data``: build a sharded token data set, or inspect and prefetch one.

    peer data build --source hf:HuggingFaceFW/fineweb-edu:sample-10BT@train \\
                    --tokenizer TinyLlama/TinyLlama-1.1B-Chat-v1.0 --config llama-125m --out /data/fw-125m
    peer data build --source ./my-texts --out ./my-data          # the debug config's own tokenizer, offline
    peer data info  --data https://host/path/manifest.json       # fingerprint, pages, shards
    peer data fetch --data https://host/path/manifest.json --pages heldout

Serve the output folder over HTTP(S) (or upload it to an HF dataset repo) and give every peer and
validator ``--data <URL of manifest.json>``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from peer.config import available_configs, load_run_config
from peer.errors import DataError


def register(sub) -> None:
    p = sub.add_parser(
        "data",
        help="build, inspect or prefetch a sharded token data set",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dsub = p.add_subparsers(dest="data_command", required=True, parser_class=type(p), metavar="ACTION")

    b = dsub.add_parser("build", help="tokenize a text source into shards + manifest (resumable)")
    b.add_argument(
        "--source",
        required=True,
        help="hf:<dataset>[:<config>][@<split>] or a folder of *.txt/*.md (a document per file) and *.jsonl",
    )
    b.add_argument(
        "--out", type=Path, required=True, help="output folder (manifest.json, tokenizer.json, shards/)"
    )
    b.add_argument(
        "--config",
        default="debug",
        help=f"model config the data is for ({', '.join(available_configs())}) or a YAML path",
    )
    b.add_argument(
        "--tokenizer",
        default=None,
        help="HF tokenizer name, tokenizer.json or folder (default: the config's own BPE, trained offline)",
    )
    b.add_argument(
        "--eos-token", default=None, help="end-of-text token after each document (default: the tokenizer's)"
    )
    b.add_argument(
        "--text-field", default="text", help="text field of jsonl lines and HF rows (default: text)"
    )
    b.add_argument("--pages-per-shard", type=int, default=None, help="pages per shard (default: ~--shard-mb)")
    b.add_argument("--shard-mb", type=float, default=64.0, help="target shard size in MiB (default 64)")
    b.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    b.add_argument("--batch-docs", type=int, default=256, help="documents per tokenizer batch (default 256)")
    b.add_argument("--data-dir", type=Path, default=None, help="where the config's own tokenizer is prepared")
    b.add_argument(
        "--corpus-dir", type=Path, default=None, help="offline corpus folder (for the default tokenizer)"
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_build)

    for name, helptext in (
        ("info", "print a data set's fingerprint, geometry and shards"),
        ("fetch", "download and verify pages of a data set into the cache ahead of time"),
    ):
        q = dsub.add_parser(name, help=helptext)
        q.add_argument("--data", required=True, help="manifest URL (http[s]://, file://) or path")
        q.add_argument("--config", default="debug", help="model config the data is for")
        q.add_argument(
            "--data-dir",
            type=Path,
            default=None,
            help="cache parent (default: ~/.cache/gradswarm/data/<config>; cache in <data-dir>/shard-cache)",
        )
        if name == "fetch":
            q.add_argument(
                "--pages",
                default="heldout",
                help="'heldout' (what validators read every round), 'all', or a range like 0:1000",
            )
        q.set_defaults(func=cmd_info if name == "info" else cmd_fetch)


def cmd_build(args) -> int:
    from peer.data.build import BuildConfig, build_dataset

    run = load_run_config(args.config)
    cfg = BuildConfig(
        source=args.source,
        out=args.out,
        data=run.data,
        config_name=run.name,
        tokenizer=args.tokenizer,
        eos_token=args.eos_token,
        pages_per_shard=args.pages_per_shard,
        shard_mb=args.shard_mb,
        max_tokens=args.max_tokens,
        text_field=args.text_field,
        batch_docs=args.batch_docs,
        data_dir=args.data_dir,
        corpus_dir=args.corpus_dir,
        progress=not args.no_progress and sys.stderr.isatty(),
    )
    t0 = time.monotonic()
    m = build_dataset(cfg)
    size = sum(s.bytes for s in m.shards)
    print(
        f"data set ready in {args.out}: {m.num_pages:,} pages ({m.num_pages * m.page_tokens:,} tokens), "
        f"{len(m.shards)} shards, {size / 2**20:.1f} MiB, {time.monotonic() - t0:.1f}s\n"
        f"fingerprint {m.fingerprint}\n"
        f"serve the folder and pass --data <URL>/manifest.json to peer join and validator run"
    )
    return 0


def _open(args):
    from peer.data.shards import ShardedPageStore

    run = load_run_config(args.config)
    data_dir = args.data_dir or Path.home() / ".cache" / "gradswarm" / "data" / run.name
    return ShardedPageStore(args.data, run.data, data_dir / "shard-cache")


def cmd_info(args) -> int:
    store = _open(args)
    m = store.manifest
    print(f"fingerprint   {m.fingerprint}")
    print(f"source        {m.source}")
    print(f"tokenizer     {m.tokenizer.name} ({m.tokenizer.vocab_size} tokens, eos {m.tokenizer.eos_id})")
    print(
        f"pages         {m.num_pages:,} of {m.page_tokens} tokens ({m.dtype}); "
        f"{len(store.train_pages):,} train, {len(store.heldout_pages):,} held out ({m.heldout_permille}‰)"
    )
    print(f"shards        {len(m.shards)}, {sum(s.bytes for s in m.shards) / 2**20:.1f} MiB")
    return 0


def cmd_fetch(args) -> int:
    store = _open(args)
    if args.pages == "heldout":
        pages = store.heldout_pages
    elif args.pages == "all":
        pages = list(range(store.num_pages))
    else:
        lo, sep, hi = args.pages.partition(":")
        if not (sep and lo.isdigit() and hi.isdigit() and int(lo) < int(hi) <= store.num_pages):
            raise DataError(
                f"--pages {args.pages!r}: use heldout, all or A:B with 0 <= A < B <= {store.num_pages}"
            )
        pages = list(range(int(lo), int(hi)))
    t0 = time.monotonic()
    for i in range(0, len(pages), 1024):
        store.prefetch(pages[i : i + 1024])
    f = store.fetcher
    print(
        f"{len(pages):,} pages verified in {time.monotonic() - t0:.1f}s: {store.shards_fetched} shards and "
        f"{store.pages_fetched} pages downloaded ({f.bytes_downloaded / 2**20:.1f} MiB) into {f.cache_dir}"
    )
    return 0
