"""Sharded data sets: deterministic, resumable build; lazy, verified, resumable reads over real HTTP;
hostile manifests and tampered shards refused with one line."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peer.config import DataConfig
from peer.data.build import BuildConfig, build_dataset
from peer.data.fetcher import FetchPolicy
from peer.data.pages import assign_pages, eval_pages, is_heldout
from peer.data.shards import ManifestError, ShardedPageStore, canonical_json, open_page_store, parse_manifest
from peer.errors import DataError, NetworkError
from tests.fixtures_swarm import join_args, read_rounds, wait_for
from tests.shard_server import ShardServer

TEXTS = ("sonnets_gut.txt", "hamlet_gut.txt", "macbeth_gut.txt")
PAGES_PER_SHARD = 8
MAX_TOKENS = 60_000  # ~115 pages of 520 tokens, 15 shards
FAST = FetchPolicy(retries=3, backoff_s=0.05, timeout_s=10)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory, corpus_dir) -> Path:
    """A folder source: one play as a .txt document, two more cut into 2,000-character jsonl documents."""
    d = tmp_path_factory.mktemp("texts")
    texts = corpus_dir / "texts"
    shutil.copy(texts / TEXTS[0], d / "a.txt")
    with open(d / "b.jsonl", "w") as fh:
        for name in TEXTS[1:]:
            body = (texts / name).read_text(encoding="utf-8", errors="replace")
            for i in range(0, len(body), 2000):
                fh.write(json.dumps({"text": body[i : i + 2000]}) + "\n")
    return d


def _build(text_dir, out, debug_config, debug_data, **kw):
    cfg = BuildConfig(
        source=str(text_dir),
        out=out,
        data=debug_config.data,
        config_name="debug",
        pages_per_shard=PAGES_PER_SHARD,
        max_tokens=MAX_TOKENS,
        data_dir=debug_data,
        progress=False,
        batch_docs=4,
    )
    return build_dataset(cfg, **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, text_dir, debug_config, debug_data) -> Path:
    out = tmp_path_factory.mktemp("ds") / "set"
    _build(text_dir, out, debug_config, debug_data)
    return out


def _shard_paths(log) -> set[str]:
    return {p for p in log.paths() if p.endswith(".bin")}


def _shards_of(store, pages) -> set[str]:
    m = store.manifest
    return {"/" + m.shards[m.shard_of(p)].name for p in pages}


# ---------------------------------------------------------------------------------------------------
# build


def test_build_is_deterministic_and_fingerprint_is_manifest_hash(
    tmp_path, dataset, text_dir, debug_config, debug_data
):
    again = _build(text_dir, tmp_path / "again", debug_config, debug_data)
    raw = (dataset / "manifest.json").read_bytes()
    assert raw == (tmp_path / "again" / "manifest.json").read_bytes()  # same input, same bytes
    assert again.fingerprint == hashlib.sha256(raw).hexdigest()  # `sha256sum manifest.json`
    m = parse_manifest(raw)
    assert len(m.shards) > 5 and m.num_pages == sum(s.num_pages for s in m.shards)
    assert m.tokenizer.name == "gradswarm-bpe:debug"
    for s in m.shards:
        assert (tmp_path / "again" / s.name).read_bytes() == (dataset / s.name).read_bytes()


def test_build_resumes_after_interrupt(tmp_path, dataset, text_dir, debug_config, debug_data):
    out = tmp_path / "resumed"
    seen = []

    def stop_after_three(entry):
        seen.append(entry)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _build(text_dir, out, debug_config, debug_data, on_shard=stop_after_three)
    assert not (out / "manifest.json").exists() and (out / ".build" / "state.json").exists()
    done = json.loads((out / ".build" / "state.json").read_text())["shards"]
    assert len(done) >= 3
    kept = {s["name"]: (out / s["name"]).stat().st_ino for s in done}
    m = _build(text_dir, out, debug_config, debug_data)
    assert m.fingerprint == parse_manifest((dataset / "manifest.json").read_bytes()).fingerprint
    assert {n: (out / n).stat().st_ino for n in kept} == kept  # finished shards were kept, not rewritten
    assert not (out / ".build").exists()


def test_build_refuses_mismatched_tokenizer_and_reports_existing(tmp_path, dataset, text_dir, debug_data):
    small = DataConfig(vocab_size=300, seq_len=64)
    cfg = BuildConfig(
        source=str(text_dir),
        out=tmp_path / "x",
        data=small,
        config_name="debug",
        tokenizer=str(debug_data / "tokenizer.json"),
        progress=False,
    )
    with pytest.raises(DataError, match="vocab_size"):
        build_dataset(cfg)
    other = BuildConfig(
        source=str(text_dir),
        out=dataset,
        data=DataConfig(vocab_size=2048, seq_len=32),
        config_name="debug",
        tokenizer=str(debug_data / "tokenizer.json"),
        progress=False,
    )
    with pytest.raises(DataError, match="already holds another data set"):
        build_dataset(other)


def test_cli_build_bad_input_is_one_line_exit_2(tmp_path):
    for argv in (
        ["--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
        ["--source", "hf:", "--out", str(tmp_path / "o")],
        ["--source", str(tmp_path), "--out", str(tmp_path / "o")],  # a folder without texts
        ["--source", str(tmp_path), "--out", str(tmp_path / "o"), "--pages-per-shard", "0"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "peer.cli", "data", "build", *argv],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("peer data: error:"), proc.stderr


# ---------------------------------------------------------------------------------------------------
# lazy, verified reads


def test_two_peers_and_a_validator_read_identical_pages_lazily(tmp_path, dataset, debug_config):
    cfg = debug_config.data
    local = ShardedPageStore(str(dataset / "manifest.json"), cfg, tmp_path / "unused")
    with ShardServer(dataset) as srv:
        url = f"{srv.url}/manifest.json"
        # peers fetch big shards page by page (Range), the validator whole shards
        a = ShardedPageStore(url, cfg, tmp_path / "peer-a", policy=FAST, whole_shard_bytes=0)
        b = ShardedPageStore(url, cfg, tmp_path / "peer-b", policy=FAST, whole_shard_bytes=0)
        v = ShardedPageStore(url, cfg, tmp_path / "validator", policy=FAST)
        assert a.fingerprint == b.fingerprint == v.fingerprint == local.fingerprint
        assert a.train_pages == v.train_pages and a.heldout_pages == v.heldout_pages
        assert all(is_heldout(p, cfg.heldout_permille) for p in v.heldout_pages)
        assert srv.log.paths() == ["/manifest.json"] * 3  # nothing but the manifest before a read
        pages_a = assign_pages("5PeerA", 3, b"seed", a.train_pages, 4)
        pages_b = assign_pages("5PeerB", 3, b"seed", b.train_pages, 4)
        x_a = a.samples(pages_a)
        ranges = [r for p, r in srv.log.requests if p.endswith(".bin")]
        assert len(ranges) == 4 and all(r and r.startswith("bytes=") for r in ranges)  # 4 pages, 4 Ranges
        assert _shard_paths(srv.log) == _shards_of(a, pages_a)
        x_b = b.samples(pages_b)
        held = eval_pages(3, b"seed", v.heldout_pages, 3, "heldout")
        before = set(_shard_paths(srv.log))
        x_v = v.samples(pages_a + pages_b + held)
        assert _shard_paths(srv.log) - before <= _shards_of(v, pages_a + pages_b + held)
        total = sum(s.bytes for s in v.manifest.shards)
        assert a.fetcher.bytes_downloaded < total / 10  # lazily: 4 pages, not the data set
        text = v.tokenizer().decode(x_v[0].tolist())
    assert torch.equal(x_a, local.samples(pages_a)) and torch.equal(x_b, local.samples(pages_b))
    assert torch.equal(x_v, torch.cat([x_a, x_b, local.samples(held)]))
    assert a.pages_fetched == 4 and a.shards_fetched == 0 and v.shards_fetched >= 1
    # a second store on peer A's cache reads without the server
    again = ShardedPageStore(str(dataset / "manifest.json"), cfg, tmp_path / "peer-a")
    assert torch.equal(again.samples(pages_a), x_a)
    assert len(text) > 50 and " the " in text.lower()  # real text comes back


def test_tampered_shard_is_refused_and_not_cached(tmp_path, dataset, debug_config):
    cfg = debug_config.data
    m = parse_manifest((dataset / "manifest.json").read_bytes())
    shard = m.shards[2]
    data = bytearray((dataset / shard.name).read_bytes())
    data[10] ^= 0x01  # one token changed
    with ShardServer(dataset) as srv:
        srv.replace["/" + shard.name] = bytes(data)
        url = f"{srv.url}/manifest.json"
        whole = ShardedPageStore(url, cfg, tmp_path / "whole", policy=FAST)
        with pytest.raises(DataError, match="does not match the sha256") as e:
            whole.page(shard.first_page)
        assert "\n" not in str(e.value)
        assert whole.fetcher.cached(shard.sha256) is None
        assert not list((tmp_path / "whole" / "tmp").glob("*.part"))
        paged = ShardedPageStore(url, cfg, tmp_path / "paged", policy=FAST, whole_shard_bytes=0)
        with pytest.raises(DataError, match="does not match"):
            paged.page(shard.first_page)  # the changed token is in the shard's first page
        assert paged.fetcher.cached(paged._page_sha(shard.first_page).hex()) is None
        assert not list((tmp_path / "paged" / "tmp").glob("*.part"))
        paged.page(shard.first_page + 1)  # the other pages of that shard are fine
        # a cached page altered on disk is refused too
        page_obj = paged.fetcher.path_of(paged._page_sha(shard.first_page + 1).hex())
        page_obj.write_bytes(b"\0" * page_obj.stat().st_size)
        fresh = ShardedPageStore(
            f"{srv.url}/manifest.json", cfg, tmp_path / "paged", policy=FAST, whole_shard_bytes=0
        )
        with pytest.raises(DataError, match="does not match"):
            fresh.page(shard.first_page + 1)
        assert not page_obj.exists()  # dropped from the cache: the next read fetches it again
        assert torch.equal(fresh.page(shard.first_page + 1), paged.page(shard.first_page + 1))


def test_interrupted_download_resumes_with_range(tmp_path, dataset, debug_config):
    m = parse_manifest((dataset / "manifest.json").read_bytes())
    shard = m.shards[1]
    with ShardServer(dataset) as srv:
        srv.cut_once["/" + shard.name] = 1000
        store = ShardedPageStore(f"{srv.url}/manifest.json", debug_config.data, tmp_path / "c", policy=FAST)
        page = store.page(shard.first_page + 1)
        reqs = [r for p, r in srv.log.requests if p == "/" + shard.name]
    assert reqs == [None, f"bytes=1000-{shard.bytes - 1}"]  # whole file, cut, then the rest
    assert store.fetcher.cached(shard.sha256) is not None
    local = ShardedPageStore(str(dataset / "manifest.json"), debug_config.data, tmp_path / "u")
    assert torch.equal(page, local.page(shard.first_page + 1))


def test_server_without_range_support_falls_back_to_whole_shards(tmp_path, dataset, debug_config):
    with ShardServer(dataset, ranges=False) as srv:
        store = ShardedPageStore(
            f"{srv.url}/manifest.json", debug_config.data, tmp_path / "c", policy=FAST, whole_shard_bytes=0
        )
        store.page(20)
    assert store.shards_fetched == 1 and store.pages_fetched == 0


def test_redirects_are_followed_with_range(tmp_path, dataset, debug_config):
    with ShardServer(dataset) as srv:
        store = ShardedPageStore(
            f"{srv.url}/r/manifest.json", debug_config.data, tmp_path / "c", policy=FAST, whole_shard_bytes=0
        )
        page = store.page(30)
        shard = "/" + store.manifest.shards[store.manifest.shard_of(30)].name
        reqs = [(p, r) for p, r in srv.log.requests if p.endswith(shard)]
    assert [p for p, _ in reqs] == ["/r" + shard, shard] and reqs[0][1] == reqs[1][1] is not None
    local = ShardedPageStore(str(dataset / "manifest.json"), debug_config.data, tmp_path / "u")
    assert torch.equal(page, local.page(30))


def test_unreachable_or_missing_data_is_one_line(tmp_path, dataset, debug_config):
    with ShardServer(dataset) as srv, pytest.raises(DataError, match="HTTP 404"):
        ShardedPageStore(f"{srv.url}/nope/manifest.json", debug_config.data, tmp_path / "c", policy=FAST)
    with pytest.raises(NetworkError, match="after 2 attempts"):
        ShardedPageStore(
            srv.url + "/manifest.json",
            debug_config.data,
            tmp_path / "c",
            policy=FetchPolicy(retries=1, backoff_s=0.01, timeout_s=2),
        )
    with pytest.raises(DataError, match="no such manifest"):
        open_page_store(str(tmp_path / "missing.json"), tmp_path, debug_config.data)
    other = DataConfig(vocab_size=2048, seq_len=32)
    with pytest.raises(DataError, match="seq_len=64"):
        ShardedPageStore(str(dataset / "manifest.json"), other, tmp_path / "c")


# ---------------------------------------------------------------------------------------------------
# hostile manifests


def _mutations(raw: dict):
    def m(fn):
        d = json.loads(json.dumps(raw))
        fn(d)
        return canonical_json(d)

    s0 = raw["shards"][0]
    yield "not json", b"{nope"
    yield "too big", b" " * (33 << 20)
    yield "duplicate key", canonical_json(raw)[:-1] + b',"source":"x"}'
    yield "NaN", canonical_json(raw).replace(b'"seq_len":64', b'"seq_len":NaN')
    yield "unknown key", m(lambda d: d.update(extra=1))
    yield "missing key", m(lambda d: d.pop("heldout"))
    yield "version", m(lambda d: d.update(version=2))
    yield "bool as int", m(lambda d: d.update(seq_len=True))
    yield "float", m(lambda d: d.update(seq_len=64.0))
    yield "negative", m(lambda d: d["shards"][0].update(num_pages=-1))
    yield "bad sha", m(lambda d: d["shards"][0].update(sha256="G" * 64))
    yield "short sha", m(lambda d: d["shards"][0].update(sha256="ab"))
    for bad in (
        "../../etc/passwd",
        "/etc/passwd",
        "shards/../../x",
        "http://evil.example/x",
        "a\\b",
        "",
        "%2e%2e/x",
    ):
        yield f"name {bad!r}", m(lambda d, bad=bad: d["shards"][0].update(name=bad))
    yield "tokenizer traversal", m(lambda d: d["tokenizer"].update(file="../tokenizer.json"))
    yield "gap", m(lambda d: d["shards"][1].update(first_page=s0["num_pages"] + 1))
    yield "overlap", m(lambda d: d["shards"][1].update(first_page=s0["num_pages"] - 1))
    yield (
        "count",
        m(
            lambda d: d.update(
                num_pages=d["num_pages"] + 1, num_tokens=(d["num_pages"] + 1) * d["page_tokens"]
            )
        ),
    )
    yield "bytes", m(lambda d: d["shards"][0].update(bytes=s0["bytes"] + 2))
    yield "page tokens", m(lambda d: d.update(page_tokens=d["page_tokens"] + 1))
    yield "huge pages", m(lambda d: d.update(num_pages=1 << 60))
    yield "no shards", m(lambda d: d.update(shards=[]))
    yield "shards not a list", m(lambda d: d.update(shards={"a": 1}))
    yield "same file twice", m(lambda d: d["shards"][1].update(name=s0["name"]))
    yield "split rule", m(lambda d: d["heldout"].update(rule="mod10"))
    yield "permille", m(lambda d: d["heldout"].update(permille=1000))
    yield "eos", m(lambda d: d["tokenizer"].update(eos_id=d["tokenizer"]["vocab_size"]))
    yield "vocab over dtype", m(lambda d: d["tokenizer"].update(vocab_size=70000))


def test_hostile_manifests_are_refused_with_one_line(dataset):
    raw = json.loads((dataset / "manifest.json").read_bytes())
    parse_manifest(canonical_json(raw))
    cases = list(_mutations(raw))
    assert len(cases) > 30
    for what, data in cases:
        with pytest.raises(ManifestError) as e:
            parse_manifest(data)
        assert "\n" not in str(e.value), what


def test_hostile_manifest_over_http_is_refused(tmp_path, dataset, debug_config):
    raw = json.loads((dataset / "manifest.json").read_bytes())
    raw["shards"][0]["name"] = "../../secret.bin"
    with ShardServer(dataset) as srv:
        srv.replace["/manifest.json"] = canonical_json(raw)
        with pytest.raises(ManifestError, match="not a relative file name"):
            ShardedPageStore(f"{srv.url}/manifest.json", debug_config.data, tmp_path / "c", policy=FAST)
        srv.replace["/manifest.json"] = b"x" * (33 << 20)
        with pytest.raises(DataError, match="more than the"):
            ShardedPageStore(f"{srv.url}/manifest.json", debug_config.data, tmp_path / "c", policy=FAST)


# ---------------------------------------------------------------------------------------------------
# a real peer


@pytest.mark.slow
def test_peer_join_trains_on_a_served_data_set(procs, tmp_path, dataset, debug_config):
    """One real ``peer join --data http://…/manifest.json`` process for two rounds."""
    with ShardServer(dataset) as srv:
        home = tmp_path / "peer"
        args = join_args(
            home=home,
            data_dir=tmp_path / "data",
            wallet_path=tmp_path / "wallets",
            name="p0",
            run_id="shards",
            initial_peers=[],
            extra=[
                "--data",
                f"{srv.url}/manifest.json",
                "--max-rounds",
                "2",
                "--round-seconds",
                "6",
                "--no-publish",
                "--eval-pages",
                "2",
            ],
        )
        args.remove("--initial-peers")
        p = procs.start("peer", args)
        wait_for(lambda: len(read_rounds(home)) >= 2 or p.popen.poll() is not None, 240, "two rounds", [p])
        assert p.wait(60) == 0, p.log()[-3000:]
        requested = _shard_paths(srv.log)
    store = ShardedPageStore(str(dataset / "manifest.json"), debug_config.data, tmp_path / "u")
    manifests = [json.loads(f.read_text()) for f in (home / "outbox" / "rounds").glob("*/manifest.json")]
    assert manifests and all(mf["data_fingerprint"] == store.fingerprint for mf in manifests)
    used = {p for mf in manifests for p in mf["pages"]} | set(
        eval_pages(0, b"heldout-curve", store.heldout_pages, 2)
    )
    assert requested and requested <= _shards_of(store, used)  # only the shards of the pages it used


def test_replay_refuses_other_data_than_the_round_used():
    from validator.replay import _check_same_data
    from validator.store import CandidateRecord, ReplayError, RoundRecord

    def rec(*cands):
        return RoundRecord(
            run_id="r",
            config_name="debug",
            netuid=None,
            round=5,
            seed_hex="00",
            base_sha256="0" * 64,
            base_state_hash="0" * 64,
            candidates=list(cands),
        )

    used = CandidateRecord(uid=1, hotkey="a", manifest={"data_fingerprint": "a" * 64})
    refused = CandidateRecord(
        uid=2, hotkey="b", manifest={"data_fingerprint": "b" * 64}, rejected="fingerprint"
    )
    _check_same_data(rec(used, refused), "a" * 64)
    _check_same_data(
        rec(CandidateRecord(uid=3, hotkey="c")), "c" * 64
    )  # nothing accepted: nothing to compare
    with pytest.raises(ReplayError, match="pass the validator's --data"):
        _check_same_data(rec(used, refused), "b" * 64)  # a refused peer's data does not count
