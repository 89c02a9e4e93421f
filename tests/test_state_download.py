"""What a peer accepts from other peers over hivemind (peer.training.state_download), with real DHTs and
averagers (each its own process) on 127.0.0.1: hostile state providers are refused with a reason before
their bytes are kept, and a late joiner still gets the honest state when liars are asked first."""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator  # noqa: UP035 - hivemind reads typing.AsyncIterator to tell a stream

import pytest
import torch
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2

from peer.data.model import hash_tensors
from peer.training.allreduce import ConsensusAverager
from peer.training.state_download import StateRefused, download_from, install_message_limit

SHAPES = [(300, 50), (50,)]
NAMES = ["w"]
"""The parameters' names: θ is the first tensor of SHAPES (the rest stands for the outer momentum)."""


def honest_state(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) for s in SHAPES]


WANT = hash_tensors(zip(NAMES, honest_state(), strict=False))
WANT_MOMENTUM = hash_tensors(zip(NAMES, honest_state()[1:], strict=True))


def _parts(tensors):
    from hivemind.compression import serialize_torch_tensor
    from hivemind.proto import runtime_pb2
    from hivemind.utils.streaming import split_for_streaming

    for t in tensors:
        yield from split_for_streaming(serialize_torch_tensor(t, runtime_pb2.CompressionType.NONE), 4096)


class Provider(ConsensusAverager):
    """Serves a crafted state stream (``kind``) instead of its real state."""

    kind = "honest"

    async def rpc_download_state(
        self, _request: averaging_pb2.DownloadRequest, _context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        from hivemind.proto import runtime_pb2

        meta = self.serializer.dumps({"state_hash": "b" * 64 if self.kind == "wrong-hash" else WANT})
        tensors = honest_state(seed=1 if self.kind == "lie" else 0)  # "lie": names WANT, sends another θ
        if self.kind == "nan":
            tensors[1][3] = float("nan")
        if self.kind == "momentum-lie":  # the swarm's θ, with a momentum that throws the joiner off
            tensors[1].fill_(1e30)
        if self.kind == "huge-shape":  # a header declaring 2^40 elements over a few bytes
            part = runtime_pb2.Tensor(buffer=bytes(64), size=[1 << 20, 1 << 20], dtype="float32")
            yield averaging_pb2.DownloadData(tensor_part=part, metadata=meta)
            return
        if self.kind == "trickle":  # metadata, then one small chunk now and then, never the end
            yield averaging_pb2.DownloadData(metadata=meta, tensor_part=next(iter(_parts(tensors))))
            while True:
                await asyncio.sleep(1.0)
                yield averaging_pb2.DownloadData(tensor_part=runtime_pb2.Tensor(buffer=bytes(4)))
        parts = list(_parts(tensors))
        if self.kind == "extra-bytes":  # the last tensor's chunks sent twice: more bytes than its shape
            parts += [p for p in parts[-2:] if not p.dtype]
        if self.kind == "extra-tensor":
            parts += list(_parts([torch.zeros(10)]))
        for i, part in enumerate(parts):
            yield averaging_pb2.DownloadData(tensor_part=part, metadata=meta if i == 0 else b"")


class Prober(ConsensusAverager):
    """Downloads from one given provider in its own process and reports the outcome."""

    def probe(self, peer_id, timeout: float = 30.0):
        from hivemind.utils.mpfuture import MPFuture

        future = MPFuture()
        self._outer_pipe.send(("_probe", [], dict(future=future, peer_id=peer_id)))
        return future.result(timeout)

    async def _probe(self, future, peer_id):
        try:
            meta, tensors = await asyncio.wait_for(download_from(self, peer_id, WANT, SHAPES, 2.0), 8.0)
            future.set_result(("ok", [t.clone() for t in tensors]))
        except StateRefused as e:
            future.set_result(("refused", str(e)))
        except TimeoutError:
            future.set_result(("timeout", ""))
        except BaseException:  # noqa: BLE001 - the test shows what else went wrong
            import traceback

            future.set_result(("error", traceback.format_exc()))
            raise


Prober.__name__ = "ConsensusAverager"

# 9 providers, more than load_verified_state's default max_providers (8, a random subset): the tests
# that need the honest provider among those asked pass max_providers=16
KINDS = [
    "honest",
    "wrong-hash",
    "nan",
    "huge-shape",
    "trickle",
    "extra-bytes",
    "extra-tensor",
    "lie",
    "momentum-lie",
]


@pytest.fixture(scope="module")
def providers():
    import hivemind

    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [first] + [
        hivemind.DHT(
            start=True, initial_peers=first.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"]
        )
        for _ in KINDS
    ]
    made = []
    try:
        for kind, dht in zip(KINDS, dhts[1:], strict=True):
            # hivemind names a handler by its class: every member of a swarm runs ConsensusAverager
            cls = type("ConsensusAverager", (Provider,), {"kind": kind})
            a = cls(
                [torch.zeros(*s) for s in SHAPES],
                dht=dht,
                prefix="st",
                start=True,
                allow_state_sharing=True,
                declare_state_period=30,  # a record that lapses under load would hide a provider
            )
            # the liars claim the top priority: stock hivemind would always ask them first
            a.state_sharing_priority = 0.0 if kind == "honest" else 100.0
            made.append(a)
        prober = Prober([torch.zeros(*s) for s in SHAPES], dht=first, prefix="st", start=True)
        made.append(prober)
        time.sleep(3.0)  # the providers declare themselves in the DHT
        yield {kind: a.peer_id for kind, a in zip(KINDS, made, strict=False)}, prober
    finally:
        for a in made:
            a.shutdown()
        for d in dhts:
            d.shutdown()


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("wrong-hash", "serves state bbbbbbbbbbbb"),
        ("nan", "NaN"),
        ("huge-shape", "declares shape"),
        ("extra-bytes", "more bytes than its shape"),
        ("extra-tensor", "more than the model's 2 tensors"),
    ],
)
def test_a_hostile_state_provider_is_refused_with_a_reason(providers, kind, reason):
    ids, prober = providers
    status, what = prober.probe(ids[kind])
    assert status == "refused" and reason in what, (status, what)


def test_a_trickling_provider_costs_at_most_the_deadline(providers):
    ids, prober = providers
    t0 = time.monotonic()
    status, _ = prober.probe(ids["trickle"])
    assert status == "timeout" and time.monotonic() - t0 < 15


def test_the_honest_state_arrives_although_liars_claim_the_top_priority(providers):
    ids, prober = providers
    status, tensors = prober.probe(ids["honest"])
    assert status == "ok" and all(torch.equal(a, b) for a, b in zip(tensors, honest_state(), strict=True))
    t0 = time.monotonic()
    got = prober.load_verified_state(
        WANT,
        SHAPES,
        deadline_s=30.0,
        chunk_timeout=2.0,
        names=NAMES,
        want_momentum=WANT_MOMENTUM,
        max_providers=16,
    ).result(60)
    assert got is not None, "no state although an honest provider serves it"
    meta, tensors = got
    assert meta["state_hash"] == WANT
    assert all(torch.equal(a, b) for a, b in zip(tensors, honest_state(), strict=True))
    assert time.monotonic() - t0 < 30


def _joiner_gets_the_honest_state(prober, tries: int = 3) -> None:
    """A joiner that checks θ and the momentum gets the honest state every time (providers are asked in
    a random order: a liar comes first in about half the tries)."""
    for _ in range(tries):
        _, got = prober.load_verified_state(
            WANT, SHAPES, deadline_s=30.0, chunk_timeout=2.0, names=NAMES, want_momentum=WANT_MOMENTUM,
            max_providers=16,
        ).result(60)  # fmt: skip
        assert all(torch.equal(a, b) for a, b in zip(got, honest_state(), strict=True))


def test_a_provider_naming_the_swarms_hash_over_another_state_is_skipped(providers):
    """The liar's metadata says WANT and its stream passes every check of the bytes (red-team finding:
    the peer adopted it, hashed it afterwards and exited). Its θ is hashed before anything is returned."""
    from peer.training.state_download import state_hash_problem

    ids, prober = providers
    status, tensors = prober.probe(ids["lie"])
    assert status == "ok"  # the stream itself is well-formed
    assert "θ hashes to" in state_hash_problem(tensors, NAMES, WANT)
    assert state_hash_problem(honest_state(), NAMES, WANT, WANT_MOMENTUM) is None
    _joiner_gets_the_honest_state(prober)


def test_a_provider_serving_the_swarms_theta_with_another_momentum_is_skipped(providers):
    """Red-team finding: the outer momentum was in no announced hash, so the swarm's θ with momentum
    1e30 was adopted (one outer step later θ was 5.7e29). The joiner now checks the momentum hash that
    the θ's voters announced (:func:`peer.training.swarm.momentum_choice`)."""
    from peer.training.state_download import state_hash_problem

    ids, prober = providers
    status, tensors = prober.probe(ids["momentum-lie"])
    assert status == "ok" and state_hash_problem(tensors, NAMES, WANT) is None  # θ alone: passes
    assert "outer momentum hashes to" in state_hash_problem(tensors, NAMES, WANT, WANT_MOMENTUM)
    _joiner_gets_the_honest_state(prober)


def test_stream_messages_declaring_more_than_the_limit_are_refused_before_reading():
    from hivemind.p2p.p2p_daemon import P2P

    install_message_limit(1 << 20)
    try:

        async def read(declared: int, body: bytes):
            reader = asyncio.StreamReader()
            reader.feed_data(declared.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + body)
            reader.feed_eof()
            return await P2P.receive_raw_data(reader)

        assert asyncio.run(read(5, b"hello")) == b"hello"
        with pytest.raises(ConnectionError, match="declared a 1099511627776-byte message"):
            asyncio.run(read(1 << 40, b"x" * 100))
    finally:
        install_message_limit()
