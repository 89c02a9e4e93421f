"""The consensus all-reduce: real hivemind DHTs and averagers (each its own process) on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes  # noqa: F401  (before the averagers: blockwise 8-bit)
import torch

from peer.data.model import hash_tensors
from peer.training.swarm import make_compression
from tests.fixtures_swarm import run_allreduce, start_averagers


def _run(dhts, tensors, runner_cls, **kwargs):
    return run_allreduce(dhts, tensors, runner_cls, compression=make_compression("8bit"), **kwargs)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(200_000, generator=g), torch.randn(3000, generator=g), torch.randn(7, 5, generator=g)]
        for _ in range(3)
    ]


def _client_sockets() -> set[Path]:
    return set(Path("/tmp").glob("hivemind-p2pclient-*.sock"))


def test_consensus_allreduce_is_bit_identical_and_close_to_mean(dhts):
    from peer.training.allreduce import ConsensusAverager

    inputs = _inputs()
    sockets = _client_sockets()
    results, counters = _run(dhts, [[t.clone() for t in ts] for ts in inputs], ConsensusAverager)
    # each averager process's p2p client replica is closed at shutdown: no socket of theirs is left in /tmp
    left = _client_sockets() - sockets
    assert not left, sorted(left)
    hashes = {hash_tensors((str(i), t) for i, t in enumerate(r)) for r in results}
    assert len(hashes) == 1, "all peers must hold bit-identical averages"
    mean = [torch.stack(ts).mean(0) for ts in zip(*inputs, strict=True)]
    # 8-bit blockwise quantisation error, plus the robust rule's re-weighting: three unrelated random
    # senders sit at slightly different distances from their centre and get slightly unequal weights
    # (a few % on the 35-value tensor, well under 1 % on the large ones)
    for a, m in zip(results[0], mean, strict=True):
        assert float((a - m).norm() / m.norm()) < (0.2 if m.numel() < 100 else 0.03)
    total_values = sum(t.numel() for t in inputs[0])
    for sent, received, _ in counters:
        floor = 2 * (3 - 1) / 3 * total_values * 4  # fp32 ring all-reduce bytes per peer
        assert 0 < sent < 0.4 * floor
        assert received > 0


def test_stock_hivemind_allreduce_diverges_under_8bit(dhts):
    """Why the consensus runner exists: hivemind's own runner leaves peers with different numbers."""
    from hivemind.averaging import DecentralizedAverager

    inputs = _inputs(1)
    results, _ = _run(dhts, inputs, DecentralizedAverager)
    hashes = {hash_tensors((str(i), t) for i, t in enumerate(r)) for r in results}
    assert len(hashes) > 1


def test_non_finite_contributions_are_dropped(dhts):
    from peer.training.allreduce import ConsensusAverager

    inputs = _inputs(2)
    inputs[1] = [torch.full_like(t, float("nan")) for t in inputs[1]]
    results, counters = _run(dhts, inputs, ConsensusAverager)
    for r in results:
        assert all(torch.isfinite(t).all() for t in r)
    assert len({hash_tensors((str(i), t) for i, t in enumerate(r)) for r in results}) == 1
    assert sum(c[2] for c in counters) >= 1


def test_outsized_contributions_are_clipped(dhts):
    from peer.training.allreduce import ConsensusAverager

    inputs = _inputs(3)
    inputs[2] = [t * 1000 for t in inputs[2]]
    results, counters = _run(dhts, inputs, ConsensusAverager)
    # Parts owned by honest peers clip the x1000 input to 4x the owner's own norm; the part the attacker
    # owns itself it can still set at will (butterfly all-reduce trusts part owners), which is why
    # validators score such a peer zero. So about 2/3 of the values stay at the honest scale.
    honest_scale = float((results[0][0].abs() < 10).float().mean())
    assert honest_scale > 0.5
    assert sum(c[2] for c in counters) >= 2


def test_lying_part_owner_cannot_blow_up_honest_peers(dhts):
    """A part owner that returns a x1000 'average': honest receivers zero that part and stay identical."""
    from peer.training.allreduce import ConsensusAllReduceRunner, ConsensusAverager

    class LyingRunner(ConsensusAllReduceRunner):
        def _screen(self, part, weight, part_index):
            return part * 1000, weight  # poison every average it owns

        def _check_average(self, averaged):
            return averaged

    # same class name: hivemind namespaces its RPC handlers by the servicer's class name
    LyingAverager = type("ConsensusAverager", (ConsensusAverager,), {"runner_class": LyingRunner})

    inputs = _inputs(4)
    bound = 1.5 * max(float(torch.cat([t.reshape(-1) for t in ts]).norm()) for ts in inputs)
    results, counters = _run(
        dhts,
        inputs,
        ConsensusAverager,
        classes=[ConsensusAverager, ConsensusAverager, LyingAverager],
        max_part_norm=bound,
    )
    honest = results[:2]
    assert hash_tensors((str(i), t) for i, t in enumerate(honest[0])) == hash_tensors(
        (str(i), t) for i, t in enumerate(honest[1])
    )
    total = torch.cat([t.reshape(-1) for t in honest[0]])
    assert float(total.norm()) <= bound  # nothing outsized got through
    assert (total == 0).any()  # the liar's parts were zeroed
    assert counters[0][2] > 0 and counters[1][2] > 0


def _reduce(parts, weights, rule, order=None):
    """The owner's reducer on its own (no network): every sender submits part 0, in ``order``."""
    import asyncio

    from peer.training.allreduce import RobustPartReducer

    async def go():
        r = RobustPartReducer([parts[0].shape], len(parts), rule=rule)
        idx = order if order is not None else range(len(parts))
        outs = await asyncio.gather(*(r.accumulate_part(i, 0, parts[i], weight=weights[i]) for i in idx))
        assert all(torch.equal(o, outs[0]) for o in outs)  # every sender gets the same average back
        return outs[0]

    return asyncio.run(go())


def test_robust_reducer_plain_and_median_clip_rules():
    """Size bound only (the old rule) and the plain mean, as references for the robust rule."""
    from peer.training.robust import MEDIAN_NORM_CLIP, PLAIN

    honest = [torch.tensor([3.0, 4.0]), torch.tensor([0.0, 5.0]), torch.tensor([5.0, 0.0])]  # norms 5
    scaled = torch.tensor([300.0, 400.0])  # norm 500: clipped to 2 × median (5) = 10 → [6, 8]
    got = _reduce([*honest, scaled], [1.0] * 4, MEDIAN_NORM_CLIP, order=[3, 2, 1, 0])
    assert torch.allclose(got, (sum(honest) + torch.tensor([6.0, 8.0])) / 4)
    assert torch.allclose(_reduce([*honest, scaled], [1.0] * 4, PLAIN), (sum(honest) + scaled) / 4)
    assert torch.allclose(_reduce([*honest, scaled], [1.0] * 4, None), (sum(honest) + scaled) / 4)
    # a weight-0 sender (free-rider, NaN dropped upstream) neither counts for the median nor the mean
    got0 = _reduce([*honest, torch.zeros(2)], [1.0, 1.0, 1.0, 0.0], MEDIAN_NORM_CLIP)
    assert torch.allclose(got0, sum(honest) / 3)


def test_robust_reducer_ignores_a_sign_flipped_part_in_any_arrival_order():
    from peer.training.robust import RobustRule

    g = torch.Generator().manual_seed(0)
    common = torch.randn(5000, generator=g)
    honest = [common + 0.7 * torch.randn(5000, generator=g) for _ in range(4)]
    parts = [*honest, -3 * honest[0]]
    rule = RobustRule()
    first = _reduce(parts, [1.0] * 5, rule)
    for order in ([4, 3, 2, 1, 0], [2, 4, 0, 3, 1]):
        assert torch.equal(_reduce(parts, [1.0] * 5, rule, order=order), first)  # bit-identical
    mean = torch.stack(honest).mean(0)
    assert float((first - mean).norm()) < 0.02 * float(mean.norm())


def test_sign_flipped_sender_is_left_out_and_peers_stay_identical(dhts):
    """Real averagers, two honest senders and one sending −10 × its Δ: every part's owner (the attacker's
    own reducer runs honest code) averages with the robust rule, so all three end bit-identical and close
    to the honest senders' mean, not pulled toward the flipped one."""
    from peer.training.allreduce import ConsensusAverager

    g = torch.Generator().manual_seed(5)
    common = [torch.randn(60_000, generator=g), torch.randn(5000, generator=g)]
    honest = [[c + 0.6 * torch.randn(c.shape, generator=g) for c in common] for _ in range(3)]
    inputs = [honest[0], honest[1], [-10 * t for t in honest[2]]]
    results, counters = _run(dhts, [[t.clone() for t in ts] for ts in inputs], ConsensusAverager)
    hashes = {hash_tensors((str(i), t) for i, t in enumerate(r)) for r in results}
    assert len(hashes) == 1
    mean = [(a + b) / 2 for a, b in zip(honest[0], honest[1], strict=True)]
    got = torch.cat([t.reshape(-1) for t in results[0]])
    want = torch.cat([t.reshape(-1) for t in mean])
    assert float((got - want).norm() / want.norm()) < 0.05, float((got - want).norm() / want.norm())
    assert sum(c[2] for c in counters) >= 2  # the flipped parts were counted as rejected


def _model_like_deltas(seed: int, n: int) -> list[list[torch.Tensor]]:
    """``n`` Δs shaped like a small transformer's: two big matrices on which the senders agree (a shared
    direction, cosine ≈ 0.6) and norms / a small matrix on which they barely do (cosine ≈ 0.05), as
    measured on real debug-model Δs; entries of one scale (8-bit blocks mix tensors in the flat buffer)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(300, 64), (64,), (16, 64), (64,), (300, 64), (64,), (64,)]
    agree = [0.6 if len(s) == 2 and s[0] > 100 else 0.05 for s in shapes]
    common = [torch.randn(s, generator=g) for s in shapes]
    return [
        [
            c * a**0.5 + torch.randn(c.shape, generator=g) * (1 - a) ** 0.5
            for c, a in zip(common, agree, strict=True)
        ]
        for _ in range(n)
    ]


def test_sign_flip_among_three_honest_is_left_out_of_every_tensor_with_the_flat_buffer(dhts):
    """Four real averagers (three honest, one sending −1 × its own Δ) over a model with small tensors.

    With the flat buffer (default) every part mixes the big and the small tensors, so the flipped Δ is far
    from the honest ones in every part and is left out everywhere, the small tensors included: all four
    end bit-identical at the honest senders' mean. Split per tensor (``flat=False``, hivemind's way), a
    64-value norm is a part of its own where the honest Δs barely agree, the flipped slice lands inside
    the cut-off and pulls that tensor — the failure the flat buffer fixes."""
    import hivemind

    from peer.training.allreduce import ConsensusAverager

    deltas = _model_like_deltas(seed=11, n=4)
    honest, inputs = deltas[:3], [*deltas[:3], [-t for t in deltas[3]]]
    want = [torch.stack(ts).mean(0) for ts in zip(*honest, strict=True)]
    with_flip = [torch.stack(ts).mean(0) for ts in zip(*inputs, strict=True)]
    small = [i for i, t in enumerate(want) if t.numel() <= 1024]
    fourth = hivemind.DHT(
        start=True, initial_peers=dhts[0].get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"]
    )
    try:
        nodes = [*dhts, fourth]
        results, counters = _run(nodes, [[t.clone() for t in ts] for ts in inputs], ConsensusAverager)
        per_tensor, _ = _run(
            nodes,
            [[t.clone() for t in ts] for ts in inputs],
            ConsensusAverager,
            weights=(1.0,) * 4,
            flat=False,
        )
    finally:
        fourth.shutdown()
    assert len({hash_tensors((str(i), t) for i, t in enumerate(r)) for r in results}) == 1
    assert [t.shape for t in results[0]] == [t.shape for t in want]
    for i, (got, m, f) in enumerate(zip(results[0], want, with_flip, strict=True)):
        err = float((got - m).norm() / m.norm())
        assert err < 0.05, (i, err)  # the honest mean, up to 8-bit rounding (≤ 2.6 %): the flip is out
        assert float((got - f).norm() / f.norm()) > 0.2, i  # and not the mean with the flip in
    assert sum(c[2] for c in counters) >= 1  # the flipped sender counted as rejected
    # per tensor, the flip gets into the small tensors (measured 45–55 % off the honest mean there)
    assert len({hash_tensors((str(i), t) for i, t in enumerate(r)) for r in per_tensor}) == 1
    assert max(float((per_tensor[0][i] - want[i]).norm() / want[i].norm()) for i in small) > 0.1


def test_a_sender_that_stops_mid_way_fails_the_all_reduce_for_everyone(dhts):
    """hivemind drops a sender whose stream ends mid-way and averages the later parts without it. A peer
    that then completed would hold a Δ mixing parts with and without that sender, one the dropped peer
    never applies (two peers part ways: seen in benchmarks/wan.py). Every peer must fail instead and keep
    its tensors untouched (all or nothing)."""
    from peer.training.allreduce import ConsensusAllReduceRunner, ConsensusAverager

    class QuittingRunner(ConsensusAllReduceRunner):
        async def _generate_input_for_peer(self, peer_index):
            sent = 0
            async for msg in super()._generate_input_for_peer(peer_index):
                if sent == 2:
                    return  # the stream ends after 2 parts, as a dropped connection's would
                sent += 1
                yield msg

    Quitting = type("ConsensusAverager", (ConsensusAverager,), {"runner_class": QuittingRunner})
    inputs = _inputs(7)
    classes = [ConsensusAverager, ConsensusAverager, Quitting]
    averagers = start_averagers(
        dhts, [[t.clone() for t in ts] for ts in inputs], classes, compression=make_compression("8bit")
    )
    try:
        controls = [a.step(wait=False, timeout=30, allow_retries=False) for a in averagers]
        outcomes = []
        for c in controls:
            try:
                outcomes.append(c.result(timeout=90) is not None)
            except Exception:  # the all-reduce failed for this peer: what the test wants
                outcomes.append(False)
        assert outcomes == [False, False, False], outcomes
        for a, ts in zip(averagers, inputs, strict=True):
            with a.get_tensors() as got:
                assert all(torch.equal(g, t) for g, t in zip(got, ts, strict=True))
    finally:
        for a in averagers:
            a.shutdown()


def _plain_swarms(dhts, run_id: str) -> list:
    """One SwarmAveraging per DHT: 5000 fp32 values, no compression, no signing key, 2 s matchmaking."""
    from peer.training.swarm import SwarmAveraging

    return [
        SwarmAveraging(
            d,
            run_id=run_id,
            keypair=None,
            shapes=[torch.Size([5000])],
            compression="none",
            state_provider=lambda: ({}, []),
            matchmaking_seconds=2.0,
            allreduce_timeout=20.0,
        )
        for d in dhts
    ]


def test_peers_that_hold_different_states_never_average_together(dhts):
    """Two peers on θ ``aa…`` and one on ``bb…`` schedule the same round: the first two average, the
    third averages alone (before, all three averaged and the outer steps left two different θs, each
    reported as ``averaged``)."""
    import time

    bases = ["aa" * 32, "aa" * 32, "bb" * 32]
    swarms = _plain_swarms(dhts, "bases")
    try:
        start_at = time.time() + 3.0
        for s, base in zip(swarms, bases, strict=True):
            s.schedule(11, start_at=start_at, base=base, gather={"base": base})
        pending = [s.start([torch.full((5000,), 1.0 + i / 10)]) for i, s in enumerate(swarms)]
        outcomes = [p.result() for p in pending]
    finally:
        for s in swarms:
            s.shutdown()
    assert [o.status for o, _ in outcomes] == ["averaged", "averaged", "alone"], [o for o, _ in outcomes]
    assert [o.group_size for o, _ in outcomes] == [2, 2, 1]
    for o, avg in outcomes[:2]:
        assert {g["base"] for g in o.gathered.values()} == {bases[0]}
        assert torch.equal(avg[0], outcomes[0][1][0])
        assert abs(float(avg[0].mean()) - 1.05) < 1e-4
    assert torch.equal(outcomes[2][1][0], torch.full((5000,), 1.2))


def test_a_peer_off_the_majority_rebases_its_group_before_matchmaking(dhts):
    """The same three peers, but the one on ``bb…`` learns (the overlapped mid-round check) that the swarm
    holds ``aa…`` and rebases its scheduled group before matchmaking: all three average together. Without
    it a 2-peer overlapped swarm that once averaged alone went alone every other round for good (seen in
    a suite run: 'could not find a group' in every odd round, 300 s). A rebase after matchmaking began
    is refused."""
    import time

    bases = ["aa" * 32, "aa" * 32, "bb" * 32]
    swarms = _plain_swarms(dhts, "rebase")
    try:
        start_at = time.time() + 4.0
        for s, base in zip(swarms, bases, strict=True):
            s.schedule(12, start_at=start_at, base=base, gather={"base": base})
        assert not swarms[2].rebase(11, bases[0])  # another round: nothing to rebase
        assert not swarms[2].rebase(12, bases[2])  # the base it already has
        assert swarms[2].rebase(12, bases[0])
        time.sleep(max(0.0, start_at - 2.0 - time.time()) + 0.3)  # matchmaking has begun
        assert not swarms[2].rebase(12, bases[2])
        pending = [s.start([torch.full((5000,), 1.0 + i / 10)]) for i, s in enumerate(swarms)]
        outcomes = [p.result() for p in pending]
    finally:
        for s in swarms:
            s.shutdown()
    assert [o.status for o, _ in outcomes] == ["averaged"] * 3, [o for o, _ in outcomes]
    for o, avg in outcomes:
        assert o.group_size == 3 and {g["base"] for g in o.gathered.values()} == {bases[0]}
        assert torch.equal(avg[0], outcomes[0][1][0])
        assert abs(float(avg[0].mean()) - 1.1) < 1e-4


def test_screen_part_bounds_by_the_owners_part_only_when_it_is_a_contribution():
    from peer.training.allreduce import screen_part

    x = torch.full((100,), 1.0)  # norm 10
    own = torch.full((100,), 0.1)  # norm 1
    # (own part, clip ratio) -> norm of the screened part, parts rejected
    table = [
        (own, 4.0, 4.0, 1),  # a ×10 part is scaled to 4 × our norm
        (own * 100, 4.0, 10.0, 0),  # within the bound: unchanged
        (torch.zeros(100), 4.0, 10.0, 0),  # we sent nothing: no reference (was: scaled to ~0)
        (None, 4.0, 10.0, 0),  # we average with weight 0: no reference
        (torch.full((100,), float("nan")), 4.0, 10.0, 0),
        (own, None, 10.0, 0),
    ]
    for own_part, ratio, norm, rejected in table:
        got, weight, n = screen_part(x, 1.0, own_part, clip_ratio=ratio, max_part_norm=None)
        assert (round(float(got.norm()), 4), weight, n) == (norm, 1.0, rejected), (own_part, ratio)
    got, _, n = screen_part(x, 1.0, None, clip_ratio=4.0, max_part_norm=2.0)
    assert round(float(got.norm()), 4) == 2.0 and n == 1


def test_a_peer_that_contributes_nothing_does_not_zero_the_parts_it_owns(dhts):
    """A weight-0 peer with a zero Δ (a free-rider, a peer that did not train) owns a third of the parts.
    Before, it scaled every sender's part to 4 × its own norm, 0: those parts averaged to ~0."""
    from peer.training.allreduce import ConsensusAverager

    inputs = _inputs(11)
    inputs[2] = [torch.zeros_like(t) for t in inputs[2]]
    results, _ = run_allreduce(
        dhts, inputs, ConsensusAverager, compression=make_compression("none"), weights=[1.0, 1.0, 0.0]
    )
    mean = [(a + b) / 2 for a, b in zip(inputs[0], inputs[1], strict=True)]
    for got in results:
        for g, m in zip(got, mean, strict=True):
            assert float((g - m).norm() / m.norm()) < 1e-5
