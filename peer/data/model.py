"""Build the swarm's model from a :class:`~peer.config.RunConfig` and fingerprint its state.

The model is an HF ``LlamaForCausalLM`` built from a ``LlamaConfig`` (no hub weights). Its initial
weights are seeded so every peer starts from the same state; :func:`state_hash` is how peers and
validators check that they hold bit-identical parameters.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

import torch

from peer.config import RunConfig

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def llama_config(cfg: RunConfig):
    from transformers import LlamaConfig

    m = cfg.model
    return LlamaConfig(
        vocab_size=cfg.data.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads or m.num_attention_heads,
        max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.rms_norm_eps,
        rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_word_embeddings,
        initializer_range=m.initializer_range,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def build_model(cfg: RunConfig, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A freshly initialised model; the same seed gives bit-identical weights on every peer."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.train.seed)
        model = LlamaForCausalLM(llama_config(cfg))
    return model.to(device)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def named_state(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Trainable parameters in a fixed order (tied weights appear once)."""
    return [(name, p) for name, p in model.named_parameters()]


def hash_tensors(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of each tensor: equal hash = bit-identical tensors."""
    h = hashlib.sha256()
    for name, t in items:
        t = t.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the buffer itself: no copy of a multi-GB state
    return h.hexdigest()


def state_hash(model: torch.nn.Module) -> str:
    """Fingerprint of the model's parameters (what validators evaluate and peers must agree on)."""
    return hash_tensors(named_state(model))


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, batches: Iterable[torch.Tensor], device: str | torch.device
) -> float:
    """Mean next-token cross-entropy over ``batches`` of token ids shaped [B, seq_len + 1]."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluate_loss needs at least one batch")
    return total / count


def uses_bf16(precision: str, device: str) -> bool:
    """Whether inner steps run under bf16 autocast for ``--precision`` on ``device``: ``bf16`` always,
    ``auto`` on a GPU that supports it (on a CPU, or where CUDA is missing, ``auto`` is fp32)."""
    if precision == "auto":
        return device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def lm_loss(model: torch.nn.Module, batch: torch.Tensor, *, bf16: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` [B, seq_len + 1]; the loss itself is taken in fp32.

    ``bf16``: run the forward (and so the backward) under CUDA autocast to bfloat16 — the weights,
    gradients and optimizer state stay fp32 (mixed precision, as the sharded peer's FSDP2 policy does)."""
    if bf16:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=batch[:, :-1]).logits
    else:
        logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1)
    )
