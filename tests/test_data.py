"""Pages: a pure, deterministic assignment; held-out pages never assigned; reproducible preparation."""

from __future__ import annotations

import json

import pytest

from peer.data.pages import PageStore, assign_pages, eval_pages, parse_hf_spec, prepare_data, split_pages
from peer.errors import DataError


def test_split_is_disjoint_and_complete():
    train, held = split_pages(5000, 50)
    assert set(train).isdisjoint(held)
    assert sorted(train + held) == list(range(5000))
    assert 150 < len(held) < 350  # ~5%


def test_assignment_is_pure_and_nearly_disjoint():
    train, _ = split_pages(3000, 50)
    a1 = assign_pages("5Alice", 7, b"seed", train, 16)
    assert a1 == assign_pages("5Alice", 7, b"seed", train, 16)  # same inputs, same pages
    assert a1 != assign_pages("5Alice", 8, b"seed", train, 16)  # other round
    assert a1 != assign_pages("5Alice", 7, b"seed2", train, 16)  # other seed
    overlaps = [len(set(a1) & set(assign_pages(f"5Peer{i}", 7, b"seed", train, 16))) for i in range(50)]
    assert sum(overlaps) / len(overlaps) < 1.0  # expected k²/N ≈ 0.09
    assert len(set(a1)) == 16 and set(a1) <= set(train)


def test_eval_pages_same_for_everyone_and_from_given_pool():
    _, held = split_pages(3000, 50)
    e = eval_pages(3, b"s", held, 8)
    assert e == eval_pages(3, b"s", held, 8)
    assert set(e) <= set(held)
    assert eval_pages(3, b"s", held, 8, purpose="other") != e


def test_prepared_data(debug_data, debug_config):
    store = PageStore(debug_data, debug_config.data)
    assert set(store.train_pages).isdisjoint(store.heldout_pages)
    page = store.page(store.train_pages[0])
    assert page.shape == (debug_config.data.samples_per_page, debug_config.data.seq_len + 1)
    assert int(page.max()) < debug_config.data.vocab_size
    text = store.tokenizer().decode(page[0].tolist())
    assert len(text) > 50  # real text comes back


def test_preparation_is_reproducible(tmp_path, debug_data, debug_config, corpus_dir):
    other = prepare_data(debug_config.data, tmp_path / "again", corpus_dir)
    a = json.loads((debug_data / "meta.json").read_text())
    b = json.loads((other / "meta.json").read_text())
    assert a["fingerprint"] == b["fingerprint"]  # every peer derives the same tokenizer and pages


def test_truncated_tokens_file_is_detected(tmp_path, debug_data, debug_config):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(debug_data, copy)
    with open(copy / "tokens.bin", "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(DataError, match="truncated"):
        PageStore(copy, debug_config.data)


def test_hf_spec_parsing():
    assert parse_hf_spec("hf:HuggingFaceFW/fineweb-edu:sample-10BT@train") == (
        "HuggingFaceFW/fineweb-edu",
        "sample-10BT",
        "train",
    )
    assert parse_hf_spec("hf:wikitext") == ("wikitext", None, "train")
    with pytest.raises(DataError):
        parse_hf_spec("wikitext")
    with pytest.raises(DataError):
        parse_hf_spec("hf:")
