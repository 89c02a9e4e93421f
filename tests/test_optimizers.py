"""Inner optimizers: bitsandbytes 8-bit AdamW follows torch AdamW's loss curve with ~¼ of the state memory."""

from __future__ import annotations

import pytest
import torch

from peer.data.model import build_model, lm_loss
from peer.data.pages import PageStore
from peer.training.diloco import make_inner_optimizer, optimizer_state_bytes


def _train(cfg, store, name: str, device: str, steps: int) -> tuple[list[float], int]:
    torch.manual_seed(0)
    model = build_model(cfg, device)
    opt = make_inner_optimizer(name, model.parameters(), cfg.train)
    batches = store.batches(store.train_pages[:16], cfg.train.batch_size)
    losses = []
    for i in range(steps):
        loss = lm_loss(model, batches[i % len(batches)].to(device))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, optimizer_state_bytes(opt)


def _compare(cfg, store, device: str, steps: int) -> None:
    ref, ref_bytes = _train(cfg, store, "adamw", device, steps)
    q, q_bytes = _train(cfg, store, "adamw8bit", device, steps)
    assert q[-1] < q[0] - 1.0  # it trains
    tail = slice(-10, None)
    mean_ref, mean_q = sum(ref[tail]) / 10, sum(q[tail]) / 10
    assert abs(mean_q - mean_ref) < 0.1 * mean_ref  # same curve within noise
    assert q_bytes < 0.35 * ref_bytes  # 8-bit moments (+ per-block scales; tiny tensors stay 32-bit)


def test_adamw8bit_on_cpu_matches_adamw(debug_data, debug_config):
    store = PageStore(debug_data, debug_config.data)
    _compare(debug_config, store, "cpu", 40)


@pytest.mark.gpu
def test_adamw8bit_on_cuda_matches_adamw(debug_data, debug_config):
    store = PageStore(debug_data, debug_config.data)
    _compare(debug_config, store, "cuda", 200)


@pytest.mark.gpu
def test_bf16_autocast_trains_like_fp32_on_cuda(debug_data, debug_config):
    """``--precision bf16`` (the GPU default): the same batches give the same loss curve as fp32 within
    bf16's rounding, and the weights stay fp32."""
    store = PageStore(debug_data, debug_config.data)
    batches = store.batches(store.train_pages[:16], debug_config.train.batch_size)
    curves = {}
    for bf16 in (False, True):
        torch.manual_seed(0)
        model = build_model(debug_config, "cuda")
        opt = make_inner_optimizer("adamw", model.parameters(), debug_config.train)
        losses = []
        for i in range(60):
            loss = lm_loss(model, batches[i % len(batches)].to("cuda"), bf16=bf16)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
        assert all(p.dtype == torch.float32 for p in model.parameters())
        curves[bf16] = losses
    assert curves[True][-1] < curves[True][0] - 1.0
    tail_fp32, tail_bf16 = sum(curves[False][-10:]) / 10, sum(curves[True][-10:]) / 10
    assert abs(tail_bf16 - tail_fp32) < 0.05 * tail_fp32
