"""Every shipped model config loads and validates; the debug model builds; bad configs fail clearly."""

from __future__ import annotations

import pytest
import torch

from peer.config import available_configs, load_run_config
from peer.data.model import build_model, count_parameters, state_hash
from peer.errors import ConfigError


@pytest.mark.parametrize("name", available_configs())
def test_every_shipped_config_loads(name):
    cfg = load_run_config(name)
    assert cfg.name == name
    assert cfg.data.seq_len <= cfg.model.max_position_embeddings
    with torch.device("meta"):
        model = build_model(cfg, "meta")
    assert count_parameters(model) > 0


def test_shipped_sizes():
    sizes = {}
    for name in ("debug", "llama-125m", "llama-1b"):
        cfg = load_run_config(name)
        with torch.device("meta"):
            sizes[name] = count_parameters(build_model(cfg, "meta"))
    assert sizes["debug"] < 1_000_000
    assert 90e6 < sizes["llama-125m"] < 160e6
    assert 0.9e9 < sizes["llama-1b"] < 1.3e9


def test_debug_model_builds_identically():
    cfg = load_run_config("debug")
    a, b = build_model(cfg), build_model(cfg)
    assert state_hash(a) == state_hash(b)
    out = a(input_ids=torch.zeros(2, 16, dtype=torch.long)).logits
    assert out.shape == (2, 16, cfg.data.vocab_size)


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: [1, 2]\ndata: {}\n", "expected a mapping"),
        ("model: {hidden_size: 64}\n", "missing section"),
        (
            "model: {hidden_size: 64, intermediate_size: 1, num_hidden_layers: 1, num_attention_heads: 3}\n"
            "data: {vocab_size: 1000, seq_len: 32}\n",
            "divisible",
        ),
        (
            "model: {hidden_size: 64, intermediate_size: 1, num_hidden_layers: 1, num_attention_heads: 4, typo: 1}\n"
            "data: {vocab_size: 1000, seq_len: 32}\n",
            "unknown key",
        ),
        (
            "model: {hidden_size: 64, intermediate_size: 1, num_hidden_layers: 1, num_attention_heads: 4}\n"
            "data: {vocab_size: 100, seq_len: 32}\n",
            "vocab_size",
        ),
        ("model: {: :\n", "not valid YAML"),
        (
            "model: {hidden_size: 64, intermediate_size: 1, num_hidden_layers: 1, num_attention_heads: 4}\n"
            "data: {vocab_size: 1000, seq_len: 32}\ntrain: {round_seconds: 5, averaging_reserve_seconds: 9}\n",
            "averaging_reserve_seconds",
        ),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_run_config(str(path))


def test_unknown_config_lists_shipped_ones():
    with pytest.raises(ConfigError, match="shipped: .*debug"):
        load_run_config("nope")
