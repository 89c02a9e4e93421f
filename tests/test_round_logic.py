"""Pure pieces of a round: state agreement, behaviours, the DiLoCo outer step."""

from __future__ import annotations

import pytest
import torch

from peer.config import load_run_config
from peer.data.model import build_model, lm_loss
from peer.errors import ConfigError
from peer.training import behaviour as bh
from peer.training.behaviour import Behaviour
from peer.training.diloco import DilocoState
from peer.training.swarm import choose_state, group_bits, sync_view


def test_choose_state_majority_and_deterministic_ties():
    assert choose_state({}) is None
    assert choose_state({"a": "h1", "b": "h1", "c": "h2"}) == "h1"
    assert choose_state({"a": "h2", "b": "h1"}) == "h1"  # tie: the smaller hash, the same on every peer
    assert choose_state({"a": "h9"}) == "h9"


def test_tied_state_votes_go_to_the_most_paid_announcer_not_the_smallest_hash():
    """An equivocating part owner leaves each honest peer alone on its own θ (one vote each); the attacker
    then announced a θ ground to a hash of zeros and won every tie (red team). Ties go to the state whose
    announcer validators paid most; a majority still wins outright, and without incentives (no chain,
    or nobody paid yet) the smallest hash decides as before."""
    votes = {"honest-1": "a1", "honest-2": "b2", "honest-3": "c3", "attacker": "0000"}
    paid = {"honest-1": 0.2, "honest-2": 0.5, "honest-3": 0.3, "attacker": 0.0}
    assert choose_state(votes) == "0000"  # the old tie-break
    assert choose_state(votes, paid) == "b2"
    assert choose_state({**votes, "honest-4": "a1"}, paid) == "a1"  # two votes beat any incentive
    assert (
        choose_state(votes, {p: 0.0 for p in votes}) == "0000"
    )  # nobody paid: the hash, the same everywhere
    assert sync_view({p: (5, h) for p, h in votes.items()}, 5, paid) == ("b2", False)


def test_one_vote_per_hotkey_whatever_peer_id_its_record_names():
    """Review finding: votes were keyed by the peer id a record names (a signed but free field), so a
    registered attacker signing an honest peer's id replaced that peer's vote: 2 keys beat 3 honest peers."""
    from substrateinterface import Keypair

    from peer.net.records import DHTAnnouncement
    from peer.training.swarm import tally

    def ann(uri, peer_id, h):
        kp = Keypair.create_from_uri(uri)
        rec = DHTAnnouncement(run_id="r", round=6, hotkey=kp.ss58_address, peer_id=peer_id, key="k",
                              value={"hash": h}, expires_at=1.0).signed(kp)  # fmt: skip
        return kp.ss58_address, rec

    records = dict(
        [ann(f"//honest{i}", f"QmHonest{i}", "aaaa") for i in range(3)]
        + [ann(f"//attacker{i}", f"QmHonest{i}", "ffff") for i in range(2)]
    )
    votes, weight = tally(records, {})
    assert len(votes) == 5 and set(weight) == set(votes)
    assert sync_view(votes, 6, weight) == ("aaaa", False)


def test_the_momentum_a_joiner_requires_is_the_one_most_voters_of_its_theta_announced():
    """Red-team finding: the outer momentum was in no announced hash, so a provider could serve the
    swarm's θ with momentum 1e30 and the joiner adopted it. Each announcement now names the momentum
    hash with θ's; the joiner requires the one most voters of the θ it downloads named."""
    from substrateinterface import Keypair

    from peer.net.records import DHTAnnouncement
    from peer.training.diloco import DilocoState
    from peer.training.swarm import momentum_choice

    def ann(uri, round_, value):
        kp = Keypair.create_from_uri(uri)
        rec = DHTAnnouncement(run_id="r", round=round_, hotkey=kp.ss58_address, peer_id="Qm" + uri[2:],
                              key="k", value=value, expires_at=1.0).signed(kp)  # fmt: skip
        return kp.ss58_address, rec

    th, m1, m2 = "a" * 64, "1" * 64, "2" * 64
    records = dict(
        [ann(f"//honest{i}", 6, {"hash": th, "momentum": m1}) for i in range(3)]
        + [ann("//liar", 6, {"hash": th, "momentum": m2})]
        + [ann(f"//other{i}", 6, {"hash": "b" * 64, "momentum": m2}) for i in range(3)]  # another θ
        + [ann("//old-round", 5, {"hash": th, "momentum": m2})]
    )
    assert momentum_choice(records, 6, th) == m1  # the θ's own voters decide, not the whole swarm
    # review finding: in a swarm of mostly older peers (no momentum named), one hotkey naming a made-up
    # hash decided what every joiner required, and no honest provider matched it. A strict majority of
    # the θ's voters must name it.
    old = [ann(f"//old{i}", 6, {"hash": th}) for i in range(3)]
    assert momentum_choice(dict([*old, ann("//zero", 6, {"hash": th, "momentum": "0" * 64})]), 6, th) is None
    honest = [ann(f"//honest{i}", 6, {"hash": th, "momentum": m1}) for i in range(3)]
    assert momentum_choice(dict([*old[:2], *honest]), 6, th) == m1  # 3 of 5
    assert (
        momentum_choice(dict([*old[:2], *honest[:2], ann("//liar", 6, {"hash": th, "momentum": m2})]), 6, th)
        is None
    )
    assert momentum_choice(records, 6, "c" * 64) is None  # nobody announced that θ
    assert momentum_choice(dict([ann("//a", 6, {"hash": th})]), 6, th) is None  # an older peer: no check
    junk = dict([ann("//a", 6, {"hash": th, "momentum": "zz"}), ann("//b", 6, {"hash": th, "momentum": 7})])
    assert momentum_choice(junk, 6, th) is None

    cfg = load_run_config("debug").train
    state = DilocoState(build_model(load_run_config("debug")), cfg)
    before = state.momentum_hash()
    state.momentum[0].add_(1.0)
    assert (
        state.momentum_hash() != before
        and state.state_hash() == DilocoState(build_model(load_run_config("debug")), cfg).state_hash()
    )


def test_sync_view_waits_while_a_peer_is_still_on_the_round_before():
    # (announced, round) -> (hash to hold, still averaging round-1)
    table = [
        ({}, 5, (None, False)),  # a new swarm: nothing to wait for
        ({"a": (4, "h4")}, 5, (None, True)),  # a is averaging round 4: θ_5 may yet come
        ({"a": (5, "h5"), "b": (4, "h4")}, 5, ("h5", True)),
        ({"a": (5, "h5"), "b": (5, "h5"), "c": (5, "h0")}, 5, ("h5", False)),
        ({"a": (6, "h6")}, 5, (None, False)),  # the swarm moved past θ_5: it will not be announced
        ({"a": (3, "h3")}, 5, (None, False)),  # a stale peer: not worth waiting for
        ({"a": (5, "h9"), "b": (5, "h1")}, 5, ("h1", False)),  # a tie: the smaller hash
    ]
    for announced, r, want in table:
        assert sync_view(announced, r) == want, (announced, r)


def test_group_bits_join_the_round_and_the_state():
    a, b = "0" * 64, "f" * 8 + "0" * 56
    assert group_bits(5, a) == format(5, "024b") + "0" * 32
    assert group_bits(5, b) == format(5, "024b") + "1" * 32
    assert group_bits(5, a) != group_bits(6, a)  # another round: another group
    assert group_bits(5, a) != group_bits(5, "0" * 7 + "1" + "0" * 56)  # another θ: another group
    assert group_bits((1 << 24) + 5, a) == group_bits(5, a)  # the round wraps at 24 bits
    for bad in ("", "xyz", "0123456"):
        with pytest.raises(ValueError):
            group_bits(1, bad)


def test_behaviours_change_only_what_they_say():
    d = [torch.ones(3), torch.full((2,), 2.0)]
    assert bh.averaging_input(Behaviour.HONEST, d) == (d, 1.0)
    zeros, w = bh.averaging_input(Behaviour.FREE_RIDER, d)
    assert w == 0.0 and all((z == 0).all() for z in zeros)
    assert bh.published_delta(Behaviour.HONEST, d, None, 3) is d
    assert bh.published_delta(Behaviour.COPYCAT, d, None, 1) is None  # publishes the average after averaging
    assert all(torch.isnan(t).all() for t in bh.published_delta(Behaviour.NAN, d, None, 1))
    assert torch.equal(bh.published_delta(Behaviour.SCALED, d, None, 1)[0], d[0] * 100)
    assert torch.equal(bh.published_delta(Behaviour.SIGN_FLIP, d, None, 1)[1], -d[1])
    # stale: trains in its first round and keeps that Δ to itself, then replays it in every later round
    old = [torch.zeros(3), torch.zeros(2)]
    assert bh.published_delta(Behaviour.STALE, d, d, 0) is None
    assert bh.published_delta(Behaviour.STALE, d, old, 1) is old
    assert bh.published_delta(Behaviour.STALE, d, old, 5) is old
    assert bh.averaging_input(Behaviour.STALE, d)[1] == 0.0
    assert bh.trains(Behaviour.HONEST, 5) and not bh.trains(Behaviour.FREE_RIDER, 0)
    assert [bh.trains(Behaviour.STALE, i) for i in range(4)] == [True, False, False, False]


def test_heldout_train_adds_unclaimed_heldout_pages_to_its_training_data():
    from types import SimpleNamespace

    from peer.data.pages import split_pages
    from peer.training.trainer import Trainer

    train_pages, heldout = split_pages(2000, 50)
    assigned = train_pages[:16]

    def trained(b: Behaviour) -> list[int]:
        fake = SimpleNamespace(
            cfg=SimpleNamespace(behaviour=b),
            clock=SimpleNamespace(seed=lambda r: b"seed%d" % r),
            store=SimpleNamespace(heldout_pages=heldout),
            hotkey="hk",
        )
        return Trainer.training_pages(fake, 3, assigned)

    assert trained(Behaviour.HONEST) == assigned and trained(Behaviour.RANDOM_DATA) == assigned
    half, full = trained(Behaviour.HELDOUT_TRAIN), trained(Behaviour.HELDOUT_TRAIN_FULL)
    assert half[:16] == assigned and len(half) == 24 and set(half[16:]) <= set(heldout)
    assert full[:16] == assigned and len(full) == 32 and set(full[16:]) <= set(heldout)
    assert not Behaviour.HELDOUT_TRAIN.is_honest and bh.trains(Behaviour.HELDOUT_TRAIN, 0)
    d = [torch.ones(3)]
    assert bh.published_delta(Behaviour.HELDOUT_TRAIN, d, None, 1) is d
    assert bh.averaging_input(Behaviour.HELDOUT_TRAIN, d) == (d, 1.0)


def test_outer_step_is_deterministic_nesterov():
    import dataclasses

    cfg = load_run_config("debug")
    train = dataclasses.replace(cfg.train, rounds="blocking")  # overlapped rounds take μ = 0
    a, b = DilocoState(build_model(cfg), train), DilocoState(build_model(cfg), train)
    assert a.state_hash() == b.state_hash()
    batch = torch.randint(0, cfg.data.vocab_size, (4, cfg.data.seq_len + 1))
    for s in (a, b):
        s.begin_round()
        s.inner_step(lm_loss(s.model, batch))
    delta = a.pseudo_gradient()
    assert any(float(d.abs().sum()) > 0 for d in delta)
    before = [t.clone() for t in a.snapshot]
    a.outer_step(delta)
    b.outer_step([d.clone() for d in delta])
    assert a.state_hash() == b.state_hash()  # same inputs, bit-identical θ_{r+1}
    lr, mu = cfg.train.outer_lr, cfg.train.outer_momentum
    expected = before[0] - lr * (delta[0] + mu * delta[0])  # first step: m = g, update = g + μ·m
    assert torch.allclose(a.snapshot[0], expected, atol=1e-6)
    # the live parameters follow the snapshot
    assert torch.equal(next(a.model.parameters()).detach(), a.snapshot[0])


def test_pseudo_gradient_norm_is_clipped():
    cfg = load_run_config("debug")
    s = DilocoState(build_model(cfg), cfg.train)
    with torch.no_grad():
        for p in s.params:
            p.add_(1.0)
    delta = s.pseudo_gradient()
    norm = torch.sqrt(sum((d.double() ** 2).sum() for d in delta))
    assert abs(float(norm) - cfg.train.max_delta_norm) < 1e-3


def test_overlapped_rule_delays_the_outer_step_and_carries_own_delta():
    """Two peers, three overlapped rounds, by hand: θ_{r+1} = OuterStep(θ_r, ḡ_{r−1}), x_{r+1} = θ_{r+1} − Δ_r,
    Δ_r = x_r − x_local; both peers hold bit-identical θ at every round start."""
    cfg = load_run_config("debug")
    peers = [DilocoState(build_model(cfg), cfg.train), DilocoState(build_model(cfg), cfg.train)]
    reference = DilocoState(build_model(cfg), cfg.train)  # replays the outer steps alone
    gen = torch.Generator().manual_seed(0)
    carries: list[list[torch.Tensor] | None] = [None, None]
    in_flight: list[torch.Tensor] | None = None  # ḡ of the previous round, "arriving" during this one
    for _ in range(3):
        assert peers[0].state_hash() == peers[1].state_hash() == reference.state_hash()
        deltas = []
        for i, s in enumerate(peers):
            s.begin_round(carries[i])
            start = [p.detach().clone() for p in s.params]
            carry = carries[i] or [torch.zeros_like(t) for t in s.snapshot]
            assert all(torch.equal(x, t - c) for x, t, c in zip(start, s.snapshot, carry, strict=True))
            batch = torch.randint(0, cfg.data.vocab_size, (4, cfg.data.seq_len + 1), generator=gen)
            s.inner_step(lm_loss(s.model, batch))
            d = s.pseudo_gradient()
            # Δ_r is relative to this round's start point x_r, not to θ_r
            assert torch.allclose(d[0], start[0] - s.params[0].detach(), atol=1e-6)
            deltas.append(d)
        averaged = [(a + b) / 2 for a, b in zip(*deltas, strict=True)]
        if in_flight is not None:  # the boundary: apply last round's average, one round late
            for s in (*peers, reference):
                s.outer_step(in_flight)
        in_flight = averaged
        carries = deltas
    assert peers[0].state_hash() == peers[1].state_hash() == reference.state_hash()


def test_a_kept_outer_step_is_the_state_change_and_leaves_the_state_bit_identical():
    """``train.overlapped_start: shared``: x_{r+1} = θ_{r+1} + (θ_{r+1} − θ_r). The kept step changes nothing
    of θ (bit-identical with and without it), equals θ_r − θ_{r+1}, and the start point it gives is the
    same on every peer whatever each trained."""
    import dataclasses

    cfg = load_run_config("debug")
    train = dataclasses.replace(
        cfg.train, rounds="overlapped", overlapped_start="shared", overlapped_outer_lr=0.5
    )
    plain, kept = DilocoState(build_model(cfg), train), DilocoState(build_model(cfg), train)
    gen = torch.Generator().manual_seed(1)
    g = [torch.randn(t.shape, generator=gen) * 1e-2 for t in plain.snapshot]
    before = [t.clone() for t in kept.snapshot]
    plain.outer_step(g)
    kept.outer_step(g, keep_step=True)
    assert plain.last_step is None and kept.state_hash() == plain.state_hash()
    for b, a, st in zip(before, kept.snapshot, kept.last_step, strict=True):
        assert torch.allclose(st, b - a, atol=1e-7)
    assert torch.allclose(kept.last_step[0], 0.5 * g[0], atol=1e-7)  # μ = 0 in overlapped rounds
    kept.begin_round(kept.last_step)
    x = [p.detach() for p in kept.params]
    assert all(
        torch.allclose(xi, 2 * a - b, atol=1e-6) for xi, a, b in zip(x, kept.snapshot, before, strict=True)
    )
    with pytest.raises(ConfigError, match="overlapped_start"):
        dataclasses.replace(cfg.train, overlapped_start="mine")


def test_streamed_safetensors_matches_and_hashes(tmp_path):
    from safetensors.torch import load_file

    from peer.net.outbox import file_sha256, write_safetensors_streamed

    tensors = {
        "w": torch.randn(33, 7),
        "t": torch.randn(4, 6).t(),  # not contiguous
        "q": torch.arange(-5, 5, dtype=torch.int8),
        "h": torch.randn(5).half(),
        "empty": torch.zeros(0),
    }
    digest, size = write_safetensors_streamed(tmp_path / "x.safetensors", tensors, {"round": "7"})
    assert (
        digest == file_sha256(tmp_path / "x.safetensors")
        and size == (tmp_path / "x.safetensors").stat().st_size
    )
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert not list(tmp_path.glob("*.tmp"))


def test_matchmaking_lookups_are_spaced():
    """The averager's DHT look-ups while it looks for a group come at most every min_interval seconds."""
    import asyncio
    import time

    from peer.training.allreduce import throttle_group_lookups

    class Keys:
        calls: list[float] = []

        async def get_averagers(self, key, only_active):
            self.calls.append(time.monotonic())
            return []

    keys = Keys()
    throttle_group_lookups(keys, 0.05)
    throttle_group_lookups(keys, 0.05)  # idempotent: not wrapped twice

    async def spin():
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.3:
            await keys.get_averagers("k", True)

    asyncio.run(spin())
    gaps = [b - a for a, b in zip(keys.calls, keys.calls[1:], strict=False)]
    assert 3 <= len(keys.calls) <= 8 and min(gaps) >= 0.045, gaps


def test_overlapped_rounds_take_the_plain_average_as_outer_step():
    """A one-round-late Nesterov step overshoots (TrainConfig.overlapped_outer_momentum): in overlapped
    rounds the outer step uses ``overlapped_outer_lr`` / ``_momentum`` (default: θ ← θ − 1.0·ḡ, no
    momentum); None falls back to ``outer_lr`` / ``outer_momentum``; blocking rounds are unchanged."""
    import dataclasses

    cfg = load_run_config("debug")
    ovl = dataclasses.replace(cfg.train, rounds="overlapped")
    blocking = dataclasses.replace(cfg.train, rounds="blocking")
    fallback = dataclasses.replace(ovl, overlapped_outer_lr=None, overlapped_outer_momentum=None)
    g = [torch.full_like(p, 0.01) for p in build_model(cfg).parameters()]
    results = {}
    for name, train in (("blocking", blocking), ("overlapped", ovl), ("fallback", fallback)):
        s = DilocoState(build_model(cfg), train)
        before = s.snapshot[0].clone()
        s.outer_step(g)
        s.outer_step(g)
        results[name] = before - s.snapshot[0]
    lr, mu = cfg.train.outer_lr, cfg.train.outer_momentum
    nesterov_two_steps = lr * (0.01 * (1 + mu) + 0.01 * (1 + mu * (1 + mu)))
    assert torch.allclose(results["blocking"], torch.full_like(g[0], nesterov_two_steps), atol=1e-6)
    assert torch.allclose(results["fallback"], results["blocking"], atol=1e-7)
    assert torch.allclose(results["overlapped"], torch.full_like(g[0], 2 * 0.01), atol=1e-6)


def test_a_stored_expiry_must_be_finite_and_no_later_than_signed():
    """The DHT record's expiration comes from whoever stored it; NaN compares false with everything."""
    from peer.net.dht_records import expiry_problem

    assert expiry_problem(100.0, 100.0) is None and expiry_problem(100.0, 100.5) is None
    assert expiry_problem(100.0, 102.0)[0] == "expiry_extended"
    assert expiry_problem(None, 100.0)[0] == "no_expiry"
    for bad in (float("nan"), float("inf")):
        assert expiry_problem(100.0, bad)[0] == "bad_expiry"
