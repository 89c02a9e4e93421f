"""Sparse Δ̂s through the consensus all-reduce: real hivemind DHTs and averagers on 127.0.0.1."""

from __future__ import annotations

import bitsandbytes  # noqa: F401  (before the averagers: blockwise 8-bit)
import torch

from peer.data.model import hash_tensors
from peer.training.sparse import TopK, sparsify, wire_roundtrip
from peer.training.swarm import make_compression
from tests.fixtures_swarm import run_allreduce

TOPK = TopK(chunk=1024, k=16)


def _run(dhts, tensors, classes=None, **kwargs):
    return run_allreduce(dhts, tensors, compression=make_compression("topk", TOPK), classes=classes, **kwargs)


def _sparse_inputs(seed: int, common_weight: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    common = [
        torch.randn(200_000, generator=g),
        torch.randn(3000, generator=g),
        torch.randn(7, 5, generator=g),
    ]
    return [
        [sparsify(c * common_weight + torch.randn(c.shape, generator=g), TOPK) for c in common]
        for _ in range(3)
    ]


def _hashes(results):
    return {hash_tensors((str(i), t) for i, t in enumerate(r)) for r in results}


def test_sparse_allreduce_is_bit_identical_mean_of_the_sent_entries_and_small(dhts):
    inputs = _sparse_inputs(0)
    results, counters = _run(dhts, [[t.clone() for t in ts] for ts in inputs])
    assert len(_hashes(results)) == 1, "all peers must hold bit-identical averages"
    # TopK.aggregation "support": each coordinate averaged over the senders that sent it
    mean = [
        torch.stack(ts).sum(0) / torch.stack([(t != 0).float() for t in ts]).sum(0).clamp(min=1)
        for ts in zip(*inputs, strict=True)
    ]
    for a, m, *ins in zip(results[0], mean, *inputs, strict=True):
        support = sum((t != 0).int() for t in ins) > 0
        assert not bool(a[~support].any()), "the average is zero outside the union of the senders' entries"
        # int8 rounding of the average, plus the robust rule's re-weighting of unrelated senders
        assert float((a - m).norm() / m.norm()) < 0.2, float((a - m).norm() / m.norm())
        # what every peer applied is exactly int8 code × its chunk's scale, as decoded from the wire
        assert torch.equal(wire_roundtrip(a.reshape(-1), TOPK).view(a.shape), a)
    total = sum(t.numel() for t in inputs[0])
    floor = 2 * (3 - 1) / 3 * total * 4
    for sent, received, rejected in counters:
        assert 0 < sent < 0.06 * floor, sent / floor  # 8-bit dense sends ~0.27 of the floor
        assert received > 0 and rejected == 0


def test_mean_aggregation_averages_over_every_sender(dhts):
    """``train.topk_aggregation: mean`` reaches the part owners: the plain mean over all senders."""
    topk = TopK(chunk=TOPK.chunk, k=TOPK.k, aggregation="mean")
    inputs = _sparse_inputs(3)
    results, _ = run_allreduce(
        dhts, [[t.clone() for t in ts] for ts in inputs], compression=make_compression("topk", topk)
    )
    assert len(_hashes(results)) == 1
    for a, *ins in zip(results[0], *inputs, strict=True):
        plain = torch.stack(ins).mean(0)
        assert float((a - plain).norm() / plain.norm()) < 0.2


def test_dense_or_non_finite_sparse_contributions_are_refused(dhts):
    inputs = _sparse_inputs(1)
    inputs[1] = [torch.randn(t.shape) for t in inputs[1]]  # dense: more than k entries per chunk
    inputs[2][0][5] = float("nan")
    results, counters = _run(dhts, inputs)
    assert len(_hashes(results)) == 1
    for r in results:
        assert all(torch.isfinite(t).all() for t in r)
    # the parts the two liars send to the honest owner are refused; the honest peer's part stays sparse
    own = inputs[0][0]
    honest_share = results[0][0][: own.numel() // 3]
    assert int((honest_share != 0).sum()) <= 3 * TOPK.k * (honest_share.numel() // TOPK.chunk + 1)
    assert sum(c[2] for c in counters) >= 2


def test_lying_owner_returning_a_dense_average_is_zeroed(dhts):
    """A part owner that returns a dense 'average' (far more entries than the senders sent)."""
    from peer.training.allreduce import ConsensusAllReduceRunner, ConsensusAverager

    class LyingRunner(ConsensusAllReduceRunner):
        def _screen(self, part, weight, part_index):
            return torch.full_like(self.parts_for_local_averaging[part_index], 1e-3), weight

        def _check_average(self, averaged):
            return averaged

    LyingAverager = type("ConsensusAverager", (ConsensusAverager,), {"runner_class": LyingRunner})
    inputs = _sparse_inputs(2)
    results, counters = _run(dhts, inputs, classes=[ConsensusAverager, ConsensusAverager, LyingAverager])
    assert len(_hashes(results[:2])) == 1
    flat = torch.cat([t.reshape(-1) for t in results[0]])
    assert int((flat != 0).sum()) < 0.1 * flat.numel()  # nothing dense got through
    assert counters[0][2] > 0 and counters[1][2] > 0
