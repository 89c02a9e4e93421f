"""All-reduce that leaves every peer with *bit-identical* results under lossy wire compression.

hivemind's stock all-reduce sends each peer ``Q(average − Q(local_part))`` and adds it to the local
part, so with 8-bit (or fp16) compression every peer ends up with slightly different numbers, and the
owner of a part keeps its own uncompressed average. A swarm whose members must agree on one state hash
(validators evaluate *the* state θ_r) needs every peer, the owner included, to apply the same
dequantized values. :class:`ConsensusAllReduceRunner` therefore

* returns the **averaged part itself** (compressed once by its owner), not a delta;
* makes the owner apply ``dequantize(quantize(average))`` of its own part — the very bytes it sends;
* drops non-finite incoming parts (a NaN sender is averaged in with weight 0, never poisons the mean)
  and clips outsized ones (``clip_ratio`` × our own part's norm, and ``max_part_norm``), then — with
  every sender's part in hand — averages them with a robust rule (:class:`RobustPartReducer`,
  :mod:`peer.training.robust`: copies from a minority merged, size bounded to 2× the median norm, then
  the mean of the parts near a Tukey-biweight centre; far-off parts get weight 0), so one peer cannot
  steer the average of the parts we own;
* zeroes a returned average no honest group could produce (non-finite, or longer than
  ``max_part_norm``: honest peers clip their whole pseudo-gradient to it), so a lying part owner
  cannot blow up the model — every honest receiver makes the same decision and stays identical;
* counts payload bytes sent and received (shared-memory counters readable from the trainer);
* fails loudly if any part could not be averaged (a reducer died), instead of silently keeping the
  local values for that part the way hivemind does — the caller then decides what a failed round means.

With sparse Δs (``--compression topk``, :class:`peer.training.sparse.TopKWireCompression`) parts travel
as their non-zero entries and are decoded with the part size the runner expects (before allocating);
an incoming part with more non-zeros in a top-k chunk than k (an honest Δ̂ has at most k), or one that
is not in the sparse wire format, is refused like a non-finite one (weight 0); a returned average with
more than ``senders`` × k non-zeros in a chunk, or malformed, becomes zeros like an oversized one. The
robust rule runs on the densified parts, unchanged (cost: the owner holds every sender's part dense,
as with dense compression — memory ``senders`` × its share of the model, no extra bytes on the wire).

:class:`ConsensusAverager` is a ``DecentralizedAverager`` that uses this runner and *copies* results
into its tensors (instead of adding deltas), all at once after the all-reduce succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import multiprocessing as mp
import os
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode
from hivemind.averaging.averager import compute_schema_hash
from hivemind.averaging.partition import BannedException, TensorPartReducer
from hivemind.compression import (
    CompressionBase,
    CompressionInfo,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)
from hivemind.dht.routing import DHTID
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import get_logger
from hivemind.utils.asyncio import (
    aiter_with_timeout,
    amap_in_executor,
    attach_event_on_finished,
)
from hivemind.utils.timed_storage import get_dht_time

from peer.training.robust import PLAIN, RobustRule, robust_mean
from peer.training.sparse import (
    TopK,
    WireRefused,
    decode_wire_part,
    encode_wire_part,
    excess_entries,
    part_offset,
    wire_roundtrip,
)

logger = get_logger(__name__)


class TopKWireCompression(CompressionBase):
    """hivemind compression of sparse all-reduce parts: non-zero positions + int8 codes with a scale per
    top-k chunk (module doc).

    Lossless for a Δ̂ (its values are already code × scale); an average is rounded to int8 once. Its
    parts are decoded with :func:`decode_wire_part` (hivemind's ``deserialize_torch_tensor`` does not
    know this format: the consensus runner calls it, with the part size and offset it expects)."""

    compression_type = runtime_pb2.CompressionType.NONE

    def __init__(self, topk: TopK):
        self.topk = topk

    def compress(self, tensor: torch.Tensor, info: CompressionInfo, allow_inplace: bool = False):
        return encode_wire_part(tensor, self.topk, part_offset(info))

    def extract(self, serialized_tensor) -> torch.Tensor:  # a part at offset 0 (the runner passes its own)
        numel = math.prod(int(s) for s in serialized_tensor.size)
        return decode_wire_part(serialized_tensor, numel, self.topk)

    def estimate_compression_ratio(self, info: CompressionInfo) -> float:
        # shapes the part sizes (part_size_bytes / (4 · ratio) values): every peer must use the same
        return 0.25

    def __repr__(self) -> str:
        return f"TopKWireCompression(chunk={self.topk.chunk}, k={self.topk.k})"


class ByteCounters:
    """Payload bytes through the all-reduce, in shared memory (the averager runs in a child process)."""

    def __init__(self) -> None:
        self._sent = mp.Value(ctypes.c_longlong, 0)
        self._received = mp.Value(ctypes.c_longlong, 0)
        self._rejected_parts = mp.Value(ctypes.c_longlong, 0)

    def add(self, sent: int = 0, received: int = 0, rejected: int = 0) -> None:
        with self._sent.get_lock():
            self._sent.value += sent
            self._received.value += received
            self._rejected_parts.value += rejected

    def snapshot(self) -> tuple[int, int, int]:
        return int(self._sent.value), int(self._received.value), int(self._rejected_parts.value)


DEFAULT_RULE = RobustRule()
"""The rule every part owner applies unless told otherwise (peers of one swarm should agree on it)."""

_rule_executors: dict[int, ThreadPoolExecutor] = {}


def rule_executor() -> ThreadPoolExecutor:
    """The thread part owners reduce parts in, off the event loop: one per process (a forked averager
    child must not inherit its parent's thread), one thread (parts are reduced in part order and never
    compete with each other for the cores; the loop keeps receiving meanwhile). The thread runs torch with
    one intra-op thread (OpenMP's count is per thread; the rest of the process keeps its own): on a busy
    box two-thread kernels were 4–20× slower than one, and one thread makes the rule's float reductions
    the same whatever the machine's core count."""
    pid = os.getpid()
    if pid not in _rule_executors:
        _rule_executors[pid] = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="robust-rule", initializer=torch.set_num_threads, initargs=(1,)
        )
    return _rule_executors[pid]


def screen_part(
    part: torch.Tensor,
    weight: float,
    own_part: torch.Tensor | None,
    *,
    clip_ratio: float | None,
    max_part_norm: float | None,
) -> tuple[torch.Tensor, float, int]:
    """What a part owner does with one incoming part before the reducer sees it: ``(part, weight, rejected)``.

    Non-finite parts are dropped (weight 0); a part longer than ``clip_ratio`` × the norm of our own part
    (same slice of the same tensors) or than ``max_part_norm`` is scaled down to that bound.

    Our own part is a reference only when it is a contribution: ``own_part`` None (we average with
    weight 0), zero or non-finite gives no owner bound. An owner that contributes nothing (a free-rider,
    a peer that did not train) once scaled every sender's part to ~0 (4 × 0), so every part it owned
    lost the round: in a 9-peer swarm with 4 such peers, 4 of 10 rounds applied no average and the
    outer momentum alone drove held-out loss up (``tests/test_validator_swarm.py``). The robust rule's
    own bound (``RobustRule.norm_clip`` × the median norm of the contributing senders) still applies.

    The sender's declared ``weight`` is only a yes/no: 1 for any finite positive value, else 0 (an
    honest peer sends 1, or 0 when it only lurks). A declared 1e6 made the biweight centre the sender's
    part and the screen then refused every honest one; a negative one reversed and amplified the mean
    (−1.2 with a zero part: every honest peer applied 2.5× the honest mean); NaN zeroed the slice."""
    weight = 1.0 if math.isfinite(weight) and weight > 0 else 0.0
    if not bool(torch.isfinite(part).all()):
        return torch.zeros_like(part), 0.0, 1
    rejected = 0
    if clip_ratio is not None and own_part is not None:
        own_norm = float(own_part.norm())
        bound = clip_ratio * own_norm
        norm = float(part.norm())
        if math.isfinite(own_norm) and own_norm > 0 and norm > bound:
            rejected += 1
            part = part * (bound / norm)
    if max_part_norm is not None:
        norm = float(part.norm())
        if norm > max_part_norm:
            rejected += 1
            part = part * (max_part_norm / norm)
    return part, weight, rejected


def check_average(averaged: torch.Tensor, max_part_norm: float | None) -> tuple[torch.Tensor, int]:
    """A received average nobody honest could have produced becomes zeros: ``(tensor, rejected)``."""
    if not bool(torch.isfinite(averaged).all()) or (
        max_part_norm is not None and float(averaged.norm()) > max_part_norm * (1 + 1e-6)
    ):
        return torch.zeros_like(averaged), 1
    return averaged, 0


class RobustPartReducer(TensorPartReducer):
    """hivemind's reducer, but it keeps every sender's part and averages them only once all arrived.

    The average is :func:`peer.training.robust.robust_mean` under ``rule``: near-identical parts of a
    minority of senders merged, each part scaled down to ``rule.norm_clip`` × the median norm, then the
    weighted mean of the parts within ``rule.cutoff`` × the median distance of their Tukey-biweight
    centre (farther ones get weight 0). It runs in the rule thread (:func:`rule_executor`), off the event
    loop. Senders are taken in sender order and the iteration count is fixed, so the result does not
    depend on arrival order. ``rule=None`` (or :data:`peer.training.robust.PLAIN`) is the plain
    weighted mean.
    """

    def __init__(
        self,
        part_shapes,
        num_senders: int,
        *,
        rule: RobustRule | None,
        counters=None,
        aggregation: str = "mean",
    ):
        self.rule = rule
        self.counters = counters
        self.aggregation = aggregation
        """How the kept parts are combined (sparse Δs: ``TopK.aggregation``; :func:`robust_mean`)."""
        self._inputs: dict[int, tuple[torch.Tensor, float]] = {}
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self):
        self._inputs = {}
        super().reset_accumulators()

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        # hivemind's accumulate_part, storing the part instead of adding it to a running sum
        assert 0 <= sender_index < self.num_senders, "invalid sender index"
        assert 0 <= part_index < self.num_parts, "invalid part index"
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait(
                {self.current_part_future, asyncio.create_task(self.finished.wait())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self.finished.is_set():
                raise AllreduceException(
                    f"attempted to aggregate part in a finalized {self.__class__.__name__}"
                )
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        assert part_index == self.current_part_index
        current_part_future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self._inputs[sender_index] = (tensor_part, weight)
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        # the part's future holds the rule's executor future (see check_current_part_finished)
        return await (await current_part_future)

    def check_current_part_finished(self):
        """Once every sender's part is in: hand the rule to the rule thread and move to the next part.

        The rule runs in :func:`rule_executor` (one thread, so parts are reduced one after another in
        part order) while the event loop keeps receiving the next parts; the part's future is resolved
        at once with the executor's future, which the senders' handlers await. The inputs are taken in
        sender order here, so the result does not depend on arrival order or on when the thread runs."""
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            inputs = [self._inputs[i] for i in sorted(self._inputs)]
            shape = self.part_shapes[self.current_part_index]
            reduced = asyncio.get_event_loop().run_in_executor(rule_executor(), self._reduce, inputs, shape)
            self.current_part_future.set_result(reduced)
            self.reset_accumulators()

    def _reduce(self, inputs: list[tuple[torch.Tensor, float]], shape) -> torch.Tensor:
        """The rule on one part's inputs (sender order); runs in the rule thread."""
        if not inputs:
            return torch.zeros(shape)
        parts = [t for t, _ in inputs]
        weights = [w for _, w in inputs]
        averaged, rejected = robust_mean(
            parts, weights, self.rule if self.rule is not None else PLAIN, aggregation=self.aggregation
        )
        if rejected and self.counters is not None:
            self.counters.add(rejected=rejected)  # ByteCounters.add takes a lock: thread-safe
        return averaged


class ConsensusAllReduceRunner(AllReduceRunner):
    """See the module docstring. Same wire protocol as hivemind's runner (peers must all use this one)."""

    def __init__(
        self,
        *args,
        counters: ByteCounters | None = None,
        clip_ratio: float | None = 4.0,
        max_part_norm: float | None = None,
        rule: RobustRule | None = DEFAULT_RULE,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.counters = counters or ByteCounters()
        self.clip_ratio = clip_ratio
        self.max_part_norm = max_part_norm
        container = self.tensor_part_container
        self.topk = (
            container.compression.topk if isinstance(container.compression, TopKWireCompression) else None
        )
        """Sparse Δs: the swarm's top-k (parts are sparse on the wire and checked against it)."""
        stock = self.tensor_part_reducer
        stock.current_part_future.cancel()
        stock.finished.set()  # replaced unused: its __del__ would log "received 0.0% of input tensors"
        self.tensor_part_reducer = RobustPartReducer(
            stock.part_shapes,
            stock.num_senders,
            rule=rule,
            counters=self.counters,
            aggregation="mean" if self.topk is None else self.topk.aggregation,
        )
        container.return_deltas = (
            False  # a failed reducer's parts then fall back to local values (and we raise)
        )
        my_index = self._my_index = self.ordered_peer_ids.index(self.peer_id)
        self._failures: list[str] = []
        """Why parts could not be averaged (the owner's error), for the all-reduce's exception."""
        self._own_part_infos = [info for _, info in container._input_parts_by_peer[my_index]]
        self._part_infos = [[info for _, info in parts] for parts in container._input_parts_by_peer]
        self._part_numels = [[p.numel() for p, _ in parts] for parts in container._input_parts_by_peer]

    def _roundtrip(self, averaged_part: torch.Tensor, info) -> torch.Tensor:
        """Exactly what a remote peer reconstructs from the bytes we would send it."""
        if self.topk is not None:
            return wire_roundtrip(averaged_part, self.topk, part_offset(info))
        compression = self.tensor_part_container.compression
        serialized = compression.compress(averaged_part, info, allow_inplace=False)
        return deserialize_torch_tensor(serialized)

    async def run(self) -> AsyncIterator[torch.Tensor]:
        async for averaged in super().run():
            yield averaged
        failed = self.tensor_part_container.failed_size
        if failed:
            why = "; ".join(self._failures) or "a peer left"
            raise AllreduceException(
                f"{failed} of {self.tensor_part_container.total_size} values could not be averaged ({why})"
            )

    async def _communicate_with_peer(self, peer_id: PeerID):
        peer_index = self.ordered_peer_ids.index(peer_id)
        if peer_id == self.peer_id:
            sender_index = self.sender_peer_ids.index(peer_id)
            loop = asyncio.get_event_loop()
            for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
                weight = self.weight
                if not bool(
                    torch.isfinite(tensor_part).all()
                ):  # never let our own NaN into the sum (NaN·0 = NaN)
                    tensor_part, weight = torch.zeros_like(tensor_part), 0.0
                    self.counters.add(rejected=1)
                averaged_part = await self.tensor_part_reducer.accumulate_part(
                    sender_index, part_index, tensor_part, weight=weight
                )
                partial = self._partial_part(part_index)
                if partial is not None:  # our own result would mix parts with and without that sender
                    self._failures.append(partial)
                    self.tensor_part_container.register_failed_reducer(peer_index)
                    raise AllreduceException(partial)
                info = self._own_part_infos[part_index]
                result = await loop.run_in_executor(None, self._roundtrip, averaged_part, info)
                result = self._check_sparse_average(self._check_average(result), info)
                self.tensor_part_container.register_processed_part(peer_index, part_index, result)
            return
        try:
            done_sending = asyncio.Event()
            inputs_aiter = attach_event_on_finished(self._generate_input_for_peer(peer_index), done_sending)
            stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs_aiter)
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()
            part_index = 0

            numels = self._part_numels[peer_index]

            def _deserialize(numbered):
                index, msg = numbered
                if msg.code != averaging_pb2.AVERAGED_PART:
                    raise AllreduceException(f"{peer_id} sent {averaging_pb2.MessageCode.Name(msg.code)}")
                if self.topk is None:
                    return deserialize_torch_tensor(msg.tensor_part), msg
                if index >= len(numels):
                    raise AllreduceException(f"{peer_id} sent more than {len(numels)} parts")
                try:
                    offset = part_offset(self._part_infos[peer_index][index])
                    return decode_wire_part(msg.tensor_part, numels[index], self.topk, offset), msg
                except WireRefused:
                    return None, msg  # malformed average: zeros (see _check_average)

            async for averaged, msg in amap_in_executor(
                _deserialize,
                _numbered(aiter_with_timeout(stream, self.reducer_timeout)),
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                self.counters.add(received=msg.ByteSize())
                if averaged is None:
                    averaged = torch.full((numels[part_index],), float("nan"))
                averaged = self._check_sparse_average(
                    self._check_average(averaged), self._part_infos[peer_index][part_index]
                )
                self.tensor_part_container.register_processed_part(peer_index, part_index, averaged)
                part_index += 1
            if part_index != self.tensor_part_container.num_parts_by_peer[peer_index]:
                raise AllreduceException(
                    f"peer {peer_id} sent {part_index} parts, expected "
                    f"{self.tensor_part_container.num_parts_by_peer[peer_index]}"
                )
        except BaseException as e:
            if isinstance(e, Exception):
                logger.debug(f"Caught {e!r} when communicating to {peer_id}", exc_info=True)
                self._failures.append(f"the owner of parts {peer_index}: {e!r}"[:300])
            self.tensor_part_container.register_failed_reducer(peer_index)
            raise

    async def _generate_input_for_peer(self, peer_index: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        async for msg in super()._generate_input_for_peer(peer_index):
            self.counters.add(sent=msg.ByteSize())
            yield msg

    def _partial_part(self, part_index: int) -> str | None:
        """Why the average of our part ``part_index`` must not be used, or None.

        hivemind drops a sender that stops sending mid-way (``sender_timeout``, a broken stream) and goes
        on averaging the remaining parts without it. Then every peer that completes would hold a Δ whose
        parts before the drop include that sender and whose later parts do not, and with two peers the
        one that completes keeps an average the other never applies: their states part (seen in
        benchmarks/wan.py under load). So a part averaged without one of the group's senders is never
        handed out: every sender of the group gets an error for it and fails the all-reduce, which each
        peer then discards as a whole (all or nothing, for everyone)."""
        dropped = [
            i for i, after in enumerate(self.tensor_part_reducer.sender_failed_after) if after <= part_index
        ]
        if not dropped:
            return None
        return (
            f"sender(s) {dropped} of this group stopped sending before part {part_index}; "
            "the all-reduce fails for every peer rather than leave some with a partial average"
        )

    def _check_average(self, averaged: torch.Tensor) -> torch.Tensor:
        """An averaged part nobody honest could have produced becomes zeros (no update for that slice).

        Every honest peer clips its whole pseudo-gradient to ``max_part_norm``, so no slice of an honest
        average can be longer. The test depends only on the bytes received and the shared config, so all
        honest receivers of the same part decide the same way and stay bit-identical; only the part's
        (lying) owner ends up with another state, which the next round's state agreement corrects.

        Sparse Δs combined by ``support`` (:func:`peer.training.robust.weighted_mean`): an honest average
        is at most √senders × ``max_part_norm`` long (disjoint supports: each sender's values applied
        whole).
        """
        bound = self.max_part_norm
        if bound is not None and self.tensor_part_reducer.aggregation != "mean":
            bound *= math.sqrt(len(self.sender_peer_ids))
        averaged, rejected = check_average(averaged, bound)
        if rejected:
            self.counters.add(rejected=rejected)
        return averaged

    def _check_sparse_average(self, averaged: torch.Tensor, info) -> torch.Tensor:
        """Sparse Δs: an average with more non-zeros in a top-k chunk than ``senders`` × k (what the
        senders' Δ̂s can hold together) becomes zeros, like an oversized one (same decision everywhere)."""
        if self.topk is not None and excess_entries(
            averaged, info, self.topk, senders=len(self.sender_peer_ids)
        ):
            self.counters.add(rejected=1)
            return torch.zeros_like(averaged)
        return averaged

    def _screen(self, part: torch.Tensor, weight: float, part_index: int) -> tuple[torch.Tensor, float]:
        """Robust aggregation of an incoming part: drop non-finite parts, clip outsized ones.

        A part whose L2 norm exceeds ``clip_ratio`` × the norm of our own part (same slice of the same
        tensors) is scaled down to that bound, so one peer's ×100 pseudo-gradient cannot dominate.
        """
        if part is None or (
            self.topk is not None and excess_entries(part, self._own_part_infos[part_index], self.topk)
        ):  # malformed sparse part, or more non-zeros in a chunk than an honest top-k Δ̂ has
            self.counters.add(rejected=1)
            return torch.zeros(self._part_numels[self._my_index][part_index]), 0.0
        part, weight, rejected = screen_part(
            part,
            weight,
            self.parts_for_local_averaging[part_index] if self.weight > 0 else None,
            clip_ratio=self.clip_ratio,
            max_part_norm=self.max_part_norm,
        )
        if rejected:
            self.counters.add(rejected=rejected)
        return part, weight

    async def _accumulate_parts_streaming(self, stream, sender_index: int):
        part_index = 0
        try:
            loop = asyncio.get_event_loop()

            own_numels = self._part_numels[self._my_index]

            def _deserialize(numbered):
                index, msg = numbered
                if self.topk is None:
                    tensor = deserialize_torch_tensor(msg.tensor_part)
                else:
                    if index >= len(own_numels):
                        raise AllreduceException(
                            f"sender {sender_index} sent more than {len(own_numels)} parts"
                        )
                    try:
                        offset = part_offset(self._own_part_infos[index])
                        tensor = decode_wire_part(msg.tensor_part, own_numels[index], self.topk, offset)
                    except WireRefused:
                        tensor = None  # refused in _screen (weight 0)
                return tensor, msg.weight, msg.tensor_part.compression, msg.ByteSize()

            async for tensor_part, weight, part_compression, nbytes in amap_in_executor(
                _deserialize, _numbered(stream), max_prefetch=self.tensor_part_container.prefetch
            ):
                self.counters.add(received=nbytes)
                tensor_part, weight = self._screen(tensor_part, weight, part_index)
                try:
                    averaged_part = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, tensor_part, weight=weight
                    )
                except BannedException:
                    logger.debug(f"Sender {sender_index} is already banned")
                    break
                partial = self._partial_part(part_index)
                if partial is not None:  # the sender gets an error, its all-reduce fails: all or nothing
                    raise AllreduceException(partial)
                part_index += 1
                if self.topk is not None:
                    offset = part_offset(self._own_part_infos[part_index - 1])
                    serialized = await loop.run_in_executor(
                        None, encode_wire_part, averaged_part, self.topk, offset
                    )
                else:
                    serialized = await loop.run_in_executor(
                        None, serialize_torch_tensor, averaged_part, part_compression
                    )
                reply = averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=serialized)
                self.counters.add(sent=reply.ByteSize())
                yield reply
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])


async def _numbered(stream):
    """``(index, message)`` of an async stream: parts are decoded in a thread pool, possibly out of order."""
    index = 0
    async for msg in stream:
        yield index, msg
        index += 1


def throttle_group_lookups(key_manager, min_interval: float) -> None:
    """Space the matchmaking's DHT look-ups of the group key at least ``min_interval`` seconds apart.

    While a peer looks for a group, hivemind's ``PotentialLeaders._update_queue_periodically`` re-reads
    the group key (``GroupKeyManager.get_averagers`` → a DHT get through the DHT process's pipe) every
    time ``pop_next_leader`` finds the queue empty or its head not yet expired — which, for the group's
    leader waiting out its declared expiration, is *immediately*, so matchmaking spins at DHT-round-trip
    speed (about a core, split between the averager and DHT processes) for as long as it lasts. Spacing
    the look-ups costs at most ``min_interval`` of extra matchmaking latency. Idempotent (per instance).
    """
    if getattr(key_manager, "_gradswarm_throttled", False):
        return
    original = key_manager.get_averagers
    last = [0.0]

    async def get_averagers(group_key, only_active):
        wait = last[0] + min_interval - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        last[0] = time.monotonic()
        return await original(group_key, only_active)

    key_manager.get_averagers = get_averagers
    key_manager._gradswarm_throttled = True


FLAT_SCHEMA = "gradswarm-flat-v1"
"""Marks the schema hash of a flat-buffer averager (a peer that splits per tensor must not join its group)."""


def flat_offsets(numels: Sequence[int], align: int = 1) -> tuple[list[int], int]:
    """Start of each tensor in the one flat buffer the swarm averages, and the buffer's length.

    Tensors follow each other in the given (canonical: the model's parameter) order; each starts at a
    multiple of ``align`` (sparse Δs: the top-k chunk, so a chunk never straddles two tensors and the
    k-per-chunk checks hold on the flat buffer), the gap is zeros."""
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    offsets, end = [], 0
    for n in numels:
        offsets.append(end)
        end += -(-int(n) // align) * align
    return offsets, end


def flatten_tensors(tensors: Sequence[torch.Tensor], align: int = 1) -> torch.Tensor:
    """The tensors in one fp32 flat buffer laid out by :func:`flat_offsets` (a copy)."""
    offsets, total = flat_offsets([t.numel() for t in tensors], align)
    flat = torch.zeros(total, dtype=torch.float32)
    for t, o in zip(tensors, offsets, strict=True):
        flat[o : o + t.numel()].copy_(t.reshape(-1))
    return flat


def flat_views(flat: torch.Tensor, shapes: Sequence[torch.Size], align: int = 1) -> list[torch.Tensor]:
    """Views of ``flat`` with the given shapes, where :func:`flatten_tensors` put them."""
    numels = [math.prod(s) for s in shapes]
    offsets, total = flat_offsets(numels, align)
    if flat.numel() != total:
        raise ValueError(f"flat buffer has {flat.numel()} values, the layout needs {total}")
    return [flat[o : o + n].view(s) for o, n, s in zip(offsets, numels, shapes, strict=True)]


class ConsensusAverager(DecentralizedAverager):
    """A DecentralizedAverager whose all-reduce leaves every group member with identical tensors.

    ``state_provider`` (called in the trainer process) returns ``(metadata, tensors)`` that peers may
    download with :meth:`load_state_from_peers` — the swarm's shared state, not the averaged buffers.

    ``flat=True`` (default) averages **one flat buffer**: the given tensors, in the given order, laid
    end to end (:func:`flat_offsets`; aligned to the top-k chunk for sparse Δs). hivemind splits every
    averaged tensor into its own parts, so per tensor a 64-value norm or a small matrix is a part of its
    own, where a few honest Δs barely agree and the robust rule cannot tell a sign-flipped slice from an
    honest one; in the flat buffer every part is ``part_size_bytes`` of consecutive values across tensors
    (the debug model is one part) and carries the whole model's signal. :meth:`get_tensors` still yields
    tensors of the given shapes — views of the flat buffer, so nothing is copied. The given tensors'
    values are copied in once; the averager does not keep them. The schema hash names the flat layout,
    so flat and per-tensor peers never form one group.
    """

    runner_class: type[ConsensusAllReduceRunner] = ConsensusAllReduceRunner

    def __init__(
        self,
        averaged_tensors: Sequence[torch.Tensor],
        *,
        state_provider=None,
        clip_ratio: float | None = 4.0,
        max_part_norm: float | None = None,
        rule: RobustRule | None = DEFAULT_RULE,
        matchmaking_poll_interval: float = 0.25,
        flat: bool = True,
        **kwargs,
    ):
        self.counters = ByteCounters()
        self._state_provider = state_provider
        self.matchmaking_poll_interval = matchmaking_poll_interval
        self.clip_ratio = clip_ratio
        self.max_part_norm = max_part_norm
        self.rule = rule
        self._views: list[torch.Tensor] | None = None
        if not flat:
            super().__init__(averaged_tensors, **kwargs)
            return
        if kwargs.get("tensor_infos") is not None:
            raise ValueError("flat=True averages one buffer: per-tensor tensor_infos do not apply")
        compression = kwargs.get("compression")
        align = compression.topk.chunk if isinstance(compression, TopKWireCompression) else 1
        shapes = [t.shape for t in averaged_tensors]
        buffer = flatten_tensors([t.detach().to("cpu", torch.float32) for t in averaged_tensors], align)
        start = kwargs.pop("start", False)
        super().__init__([buffer], start=False, **kwargs)  # share_memory_() moves the buffer in place
        self._views = flat_views(self._averaged_tensors[0], shapes, align)
        self.schema_hash = DHTID.generate(
            source=[FLAT_SCHEMA, align, compute_schema_hash(self._views)]
        ).to_bytes()
        if start:
            self.run_in_background(await_ready=True)

    @contextlib.contextmanager
    def get_tensors(self):
        """The averaged tensors, in the shapes given (views of the flat buffer when ``flat``), locked."""
        with super().get_tensors() as tensors:
            yield tensors if self._views is None else self._views

    async def _shutdown(self, timeout: float | None) -> None:
        """hivemind's shutdown, then this process's replica of the DHT's p2p daemon client: hivemind never
        closes it, and each averager process left its ``/tmp/hivemind-p2pclient-*.sock`` behind."""
        try:
            await super()._shutdown(timeout)
        finally:
            replica = getattr(self, "_p2p", None)  # unset when the averager failed to start
            if replica is not None:
                await replica.shutdown()  # a replica: removes its socket; the daemon is the DHT's

    async def _step(self, *, step, future_for_init):
        throttle_group_lookups(self._matchmaking.group_key_manager, self.matchmaking_poll_interval)
        return await super()._step(step=step, future_for_init=future_for_init)

    async def _run_allreduce_inplace_(self, tensors, group_info, group_id=None, **kwargs):
        group_id = group_info.group_id if group_id is None else group_id
        if self._views is not None:  # hivemind hands us get_tensors(): the views; average their buffer
            tensors = list(self._averaged_tensors)
        runner = self.runner_class(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            counters=self.counters,
            clip_ratio=self.clip_ratio,
            max_part_norm=self.max_part_norm,
            rule=self.rule,
            **kwargs,
        )
        assert group_id in self._running_groups, f"group {group_id} was not registered"
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
            # all or nothing: results are copied in only after the whole all-reduce succeeded, so a failed
            # attempt never leaves half-averaged buffers behind for hivemind's retry with another group
            # drain the runner to its end (not azip, which stops pulling once the tensors run out and so
            # skips the runner's final check that every part was averaged): a part a dead peer owned, or a
            # reducer that failed mid-way, raises here, and nothing is copied
            results = [result async for result in runner]
            container = runner.tensor_part_container
            if container.failed_size:
                raise AllreduceException(
                    f"{container.failed_size} of {container.total_size} values could not be averaged"
                )
            for tensor, result in zip(tensors, results, strict=True):
                tensor.copy_(result)
            self.last_updated = get_dht_time()
            self._state_updated.set()
        else:
            async for _ in runner:
                raise ValueError("aux peers should not receive averaged tensors")

    def get_current_state(self):
        if self._state_provider is None:
            return super().get_current_state()
        metadata, tensors = self._state_provider()
        return metadata, tensors, None

    def load_verified_state(
        self,
        want_hash: str,
        shapes,
        *,
        deadline_s: float,
        chunk_timeout: float,
        names=None,
        want_momentum: str | None = None,
        max_providers: int = 8,
    ):
        """A future of ``(metadata, tensors)`` with ``want_hash`` from a peer, checked against ``shapes``
        as it streams in (and, given the parameters' ``names``, its θ against the hash and its momentum
        against ``want_momentum``), or None (:func:`peer.training.state_download.load_verified_state`)."""
        from hivemind.utils.mpfuture import MPFuture

        future = MPFuture()
        kwargs = dict(
            future=future,
            want_hash=want_hash,
            shapes=[tuple(s) for s in shapes],
            deadline_s=deadline_s,
            chunk_timeout=chunk_timeout,
            names=None if names is None else list(names),
            want_momentum=want_momentum,
            max_providers=max_providers,
        )
        self._outer_pipe.send(("_load_verified_state", [], kwargs))
        return future

    async def _load_verified_state(self, future, **kwargs):
        from peer.training.state_download import load_verified_state

        await load_verified_state(self, future, **kwargs)
