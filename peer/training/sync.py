"""Synchronous mode (``peer join --averaging sync``): hivemind's ``Optimizer``, per-step gradients.

The simpler alternative to DiLoCo: peers accumulate gradients until the swarm together has processed
``target_batch_size`` samples (an *epoch*), all-reduce the gradients (8-bit on the wire) and all take
the same AdamW step. Every step waits for the network, so it needs a fast, reliable link; DiLoCo
communicates once per round instead.

Per wall-clock round the peer still publishes a contribution for validators: its own accumulated
gradient as a pseudo-gradient Δ = lr · Σ g (what its data alone would have moved the model by), with
the usual signed manifest. Tune ``target_batch_size`` (``--sync.target-batch``, default 64 × batch size) from the symptom:
steps that wait long for matchmaking → raise it; loss that improves slowly per sample → lower it.
"""

from __future__ import annotations

import json
import logging
import time

import torch

from peer.data.model import build_model, lm_loss
from peer.data.pages import assign_pages
from peer.data.shards import open_page_store
from peer.net.outbox import Outbox, encode_delta, sha256_hex
from peer.net.records import BlobRef, ContributionManifest
from peer.tracking import Tracker
from peer.training.clock import RoundClock
from peer.training.swarm import make_compression

log = logging.getLogger("gradswarm.sync")


def run_sync(
    cfg, *, keypair, dht, tracker: Tracker, clock: RoundClock, target_batch_size: int | None = None
) -> list[dict]:
    """Train in sync mode until ``cfg.max_rounds`` rounds or ``cfg.max_seconds`` pass; returns per-round reports."""
    import bitsandbytes  # noqa: F401  (before the averagers, for blockwise 8-bit)
    import hivemind

    run = cfg.run
    if cfg.compression == "topk":
        from peer.errors import ConfigError

        raise ConfigError("--compression topk works with --averaging diloco only; use 8bit for sync")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    store = open_page_store(cfg.data, cfg.data_dir, run.data, cfg.corpus_dir)
    model = build_model(run, cfg.device)
    params = [p for _, p in model.named_parameters()]
    names = [n for n, _ in model.named_parameters()]
    batch = run.train.batch_size
    opt = hivemind.Optimizer(
        dht=dht,
        run_id=f"{cfg.run_id}_sync",
        params=params,
        optimizer=lambda ps: torch.optim.AdamW(
            ps, lr=run.train.inner_lr, weight_decay=run.train.inner_weight_decay
        ),
        batch_size_per_step=batch,
        target_batch_size=target_batch_size or 64 * batch,
        matchmaking_time=cfg.matchmaking_seconds,
        averaging_timeout=run.train.averaging_timeout,
        grad_compression=make_compression(cfg.compression),
        state_averaging_compression=make_compression("fp16"),
        use_local_updates=False,
        verbose=False,
    )
    opt.load_state_from_peers()
    outbox = Outbox(cfg.home / "outbox", keep_rounds=cfg.keep_rounds)
    reports = []
    start = time.time()
    try:
        while (cfg.max_rounds is None or len(reports) < cfg.max_rounds) and (
            cfg.max_seconds is None or time.time() - start < cfg.max_seconds
        ):
            r = clock.current_round()
            if reports and r <= reports[-1]["round"]:  # budget spent before the round's end: one per round
                time.sleep(max(0.0, clock.round_end(reports[-1]["round"]) - time.time()) + 0.01)
                continue
            pages = assign_pages(
                keypair.ss58_address, r, clock.seed(r), store.train_pages, run.data.pages_per_round
            )
            batches = store.batches(pages, batch)
            acc = [torch.zeros_like(p, device="cpu") for p in params]
            steps, tokens, t0, losses = 0, 0, time.time(), []
            while time.time() < clock.round_end(r) and steps < run.train.max_inner_steps:
                b = batches[steps % len(batches)].to(cfg.device)
                loss = lm_loss(model, b)
                loss.backward()
                for a, p in zip(acc, params, strict=True):
                    if p.grad is not None:
                        a.add_(p.grad.detach().cpu())
                opt.step()
                opt.zero_grad()
                steps += 1
                tokens += b[:, 1:].numel()
                losses.append(float(loss.detach()))
            delta = {n: a * run.train.inner_lr for n, a in zip(names, acc, strict=True)}
            blob = encode_delta(delta)
            manifest = ContributionManifest(
                run_id=cfg.run_id,
                round=r,
                hotkey=keypair.ss58_address,
                peer_id=dht.peer_id.to_base58(),
                base_state_hash="0" * 64,
                data_fingerprint=store.fingerprint,
                model_config_name=run.name,
                pages=pages,
                samples=steps * batch,
                tokens=tokens,
                inner_steps=steps,
                loss_before=losses[0] if losses else None,
                loss_after=losses[-1] if losses else None,
                blob=BlobRef(name="contribution.safetensors", sha256=sha256_hex(blob), size=len(blob)),
            ).signed(keypair)
            outbox.write_contribution(r, blob, json.loads(manifest.model_dump_json()))
            outbox.prune()
            seconds = time.time() - t0
            report = {
                "round": r,
                "steps": steps,
                "epoch": opt.local_epoch,
                "tokens": tokens,
                "tokens_per_s": tokens / max(seconds, 1e-9),
                "loss": sum(losses) / max(len(losses), 1),
            }
            reports.append(report)
            tracker.log(report, step=r)
            log.info(
                "sync round %d: %d steps, epoch %d, loss %.3f, %.0f tok/s",
                r,
                steps,
                opt.local_epoch,
                report["loss"],
                report["tokens_per_s"],
            )
            with open(cfg.home / "rounds.jsonl", "a") as fh:
                fh.write(json.dumps(report) + "\n")
    finally:
        opt.shutdown()
        tracker.finish()
    return reports
