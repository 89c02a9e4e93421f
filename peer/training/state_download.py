"""What a peer accepts from other peers over hivemind: bounded messages and a verified state download.

hivemind trusts its peers. Two places let one hostile peer stop or bloat an honest one:

* **Stream messages.** ``P2P.receive_raw_data`` reads an 8-byte length and then that many bytes, so a peer
  answering a streaming RPC (the all-reduce's parts, a state download) can declare any size and keep
  sending: memory grows with what it sends, without limit. :func:`install_message_limit` caps one message at
  :data:`MAX_MESSAGE_BYTES` (honest messages are ≤ a part or a streaming chunk: ≤ 1 MiB at our settings);
  a longer declaration closes the stream before a byte of the body is read. (Unary RPCs and the DHT go
  through the p2p daemon's persistent connection, which already caps a message at 4 MiB.)
* **State downloads.** ``DecentralizedAverager.load_state_from_peers`` asks peers in the order of a
  *priority they announce themselves* (so a liar announcing the top priority is always asked first), waits
  per chunk with no total deadline (a peer trickling one chunk per timeout holds it forever), collects
  every tensor part in memory whatever its declared shape or count, and returns the first state it gets
  whatever its hash — a late joiner then refuses it, asks again, and gets the same liar.
  :func:`load_verified_state` (run in the averager's process, :meth:`ConsensusAverager.load_verified_state`)
  asks the declared providers in a random order, gives each a total deadline, reads the metadata first
  and drops a peer whose state is not the wanted hash before any tensor arrives, checks every tensor's
  declared dtype, shape and count against the model before keeping its bytes, caps the bytes at the
  model's state size (+ slack), and returns only a state with the wanted hash.

Every refusal is logged with its reason and the next provider is tried.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Sequence

import torch

log = logging.getLogger("gradswarm.swarm")

MAX_MESSAGE_BYTES = 32 << 20
"""Largest single message accepted on a hivemind stream. Honest ones are ≤ 1 MiB (a 512 KiB all-reduce
part, 64 KiB state chunks); raise it only if you raise hivemind's part size past it."""
MAX_METADATA_BYTES = 4096
"""A state's metadata is a small dict (round, state hash, config name)."""
STATE_SLACK_BYTES = 1 << 20
"""Bytes allowed above the model's exact state size (protobuf framing of the chunks)."""


class StateRefused(Exception):
    """A provider's state download broke a rule (the reason is the message)."""


def install_message_limit(max_bytes: int = MAX_MESSAGE_BYTES) -> None:
    """Cap hivemind's stream messages at ``max_bytes`` (idempotent; patches ``P2P.receive_raw_data`` in
    this process, so call it before an averager starts — its process is forked with the patch)."""
    from hivemind.p2p.p2p_daemon import P2P

    if getattr(P2P.receive_raw_data, "_gradswarm_limit", None) == max_bytes:
        return

    async def receive_raw_data(reader: asyncio.StreamReader) -> bytes:
        header = await reader.readexactly(P2P.HEADER_LEN)
        content_length = int.from_bytes(header, P2P.BYTEORDER)
        if content_length > max_bytes:
            raise ConnectionError(
                f"a peer declared a {content_length}-byte message (limit {max_bytes}); closing the stream"
            )
        return await reader.readexactly(content_length)

    receive_raw_data._gradswarm_limit = max_bytes
    P2P.receive_raw_data = staticmethod(receive_raw_data)


def state_bytes(shapes: Sequence[Sequence[int]]) -> int:
    """Exact fp32 bytes of a state whose tensors have ``shapes``."""
    return sum(4 * math.prod(s) for s in shapes)


def metadata_problem(metadata, want_hash: str) -> str | None:
    """Why a provider's state metadata is not the state we want (None: it is). Pure."""
    if not isinstance(metadata, dict):
        return f"metadata is a {type(metadata).__name__}, not a dict"
    got = metadata.get("state_hash")
    if got != want_hash:
        return f"it serves state {str(got)[:12]}, not {want_hash[:12]}"
    return None


def state_hash_problem(
    tensors: Sequence, names: Sequence[str], want_hash: str, want_momentum: str | None = None
) -> str | None:
    """Why a downloaded state is not the one the swarm announced, or None: its θ (the first
    ``len(names)`` tensors) must hash to ``want_hash`` (:meth:`peer.training.diloco.DilocoState.state_hash`)
    and, given ``want_momentum``, its outer momentum (the next ``len(names)``) to that
    (:meth:`~peer.training.diloco.DilocoState.momentum_hash`). A provider controls its metadata as much
    as its bytes: one that named the swarm's hash over junk passed every other check, the peer adopted
    the junk and only then hashed it, and exited on the mismatch; one that served the swarm's θ with a
    momentum of 1e30 was adopted, and its next outer step threw the peer off the swarm (red-team
    findings). ``want_momentum`` None (announcements of older peers name none): the momentum is not
    checked."""
    from peer.data.model import hash_tensors

    n = len(names)
    if len(tensors) < (2 * n if want_momentum is not None else n):
        return f"{len(tensors)} tensors where θ{' and its momentum' if want_momentum else ''} need more"
    got = hash_tensors(zip(names, tensors[:n], strict=True))
    if got != want_hash:
        return f"its θ hashes to {got[:12]}, not to the {want_hash[:12]} it named"
    if want_momentum is not None:
        got = hash_tensors(zip(names, tensors[n : 2 * n], strict=True))
        if got != want_momentum:
            return f"its outer momentum hashes to {got[:12]}, the swarm announced {want_momentum[:12]}"
    return None


def part_header_problem(part, index: int, shapes: Sequence[Sequence[int]]) -> str | None:
    """Why the first chunk of tensor ``index`` (a ``runtime_pb2.Tensor`` header) does not match the
    model's state (None: it does): it must be uncompressed float32 with the ``index``-th shape. Pure."""
    from hivemind.proto import runtime_pb2

    if index >= len(shapes):
        return f"more than the model's {len(shapes)} tensors"
    if part.dtype != "float32" or part.compression != runtime_pb2.CompressionType.NONE:
        return f"tensor {index} is {part.dtype or '?'} (compression {part.compression}), not plain float32"
    if tuple(part.size) != tuple(shapes[index]):
        return f"tensor {index} declares shape {list(part.size)[:8]}, the model's is {list(shapes[index])}"
    return None


async def download_from(
    averager, peer, want_hash: str, shapes: Sequence[Sequence[int]], chunk_timeout: float
) -> tuple[dict, list[torch.Tensor]]:
    """One provider's state, checked as it streams in (see the module docstring); raises StateRefused."""
    from hivemind.compression import deserialize_torch_tensor
    from hivemind.proto import averaging_pb2, runtime_pb2
    from hivemind.utils.asyncio import aiter_with_timeout

    budget = state_bytes(shapes) + STATE_SLACK_BYTES
    stub = averager.get_stub(averager._p2p, peer, namespace=averager.prefix)
    stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
    metadata, tensors, parts, received, filled, expected = None, [], [], 0, 0, 0

    def finish() -> None:
        if filled != expected:
            raise StateRefused(f"tensor {len(tensors)} has {filled} bytes, its shape needs {expected}")
        combined = runtime_pb2.Tensor()
        combined.CopyFrom(parts[0])
        combined.buffer = b"".join(p.buffer for p in parts)
        tensors.append(deserialize_torch_tensor(combined))

    async for message in aiter_with_timeout(stream, timeout=chunk_timeout):
        received += message.ByteSize()
        if received > budget:
            raise StateRefused(f"sent more than {budget} bytes, the model's whole state")
        if metadata is None:
            if not message.metadata or len(message.metadata) > MAX_METADATA_BYTES:
                raise StateRefused("the first message carries no (or oversized) metadata")
            metadata = averager.serializer.loads(message.metadata)
            problem = metadata_problem(metadata, want_hash)
            if problem is not None:
                raise StateRefused(problem)
        elif message.metadata:
            raise StateRefused("sent metadata twice")
        part = message.tensor_part
        if part.dtype:  # the first chunk of the next tensor
            if parts:
                finish()
            problem = part_header_problem(part, len(tensors), shapes)
            if problem is not None:
                raise StateRefused(problem)
            parts, filled, expected = [], 0, 4 * math.prod(shapes[len(tensors)])
        elif not parts:
            raise StateRefused("a tensor chunk arrived before any tensor header")
        filled += len(part.buffer)
        if filled > expected:
            raise StateRefused(f"tensor {len(tensors)} has more bytes than its shape ({expected})")
        parts.append(part)
    if metadata is None:
        raise StateRefused("it sent nothing (not sharing its state)")
    if parts:
        finish()
    if len(tensors) != len(shapes):
        raise StateRefused(f"sent {len(tensors)} tensors, the model's state has {len(shapes)}")
    for i, t in enumerate(tensors):
        if not bool(torch.isfinite(t).all()):
            raise StateRefused(f"tensor {i} holds NaN or infinite values")
    return metadata, tensors


async def load_verified_state(
    averager,
    future,
    *,
    want_hash: str,
    shapes: Sequence[Sequence[int]],
    deadline_s: float,
    chunk_timeout: float,
    max_providers: int = 8,
    names: Sequence[str] | None = None,
    want_momentum: str | None = None,
) -> None:
    """Set ``future`` to ``(metadata, tensors)`` of the first provider whose state has ``want_hash`` and
    passes every check, or None. With the parameters' ``names``, "has ``want_hash``" means the θ it
    sent hashes to it, and its outer momentum to ``want_momentum`` when given (:func:`state_hash_problem`),
    not merely that its metadata says so. Runs in the
    averager's process. Providers are the peers that declared their state for download, in a random
    order (not their self-declared priority), at most ``max_providers``, each within its fair share of
    what is left of ``deadline_s`` (the time left ÷ the providers not yet asked). Symptom → knob: late joiners that time out on honest providers of a big
    model need a longer ``deadline_s`` (the swarm's averaging timeout scales it)."""
    from google.protobuf.message import DecodeError
    from hivemind.p2p import PeerID
    from hivemind.p2p.p2p_daemon_bindings.control import P2PDaemonError, P2PHandlerError
    from hivemind.utils.timed_storage import ValueWithExpiration

    t_end = time.monotonic() + deadline_s
    try:
        key_manager = averager._matchmaking.group_key_manager
        found = averager.dht.get(f"{key_manager.prefix}.all_averagers", latest=True)
        declared = found.value if found is not None and isinstance(found.value, dict) else {}
        providers = []
        for peer_id, info in declared.items():
            if not isinstance(info, ValueWithExpiration):
                continue
            try:
                pid = PeerID(peer_id) if not isinstance(peer_id, PeerID) else peer_id
            except (TypeError, ValueError):
                continue
            if pid != averager.peer_id:
                providers.append(pid)
        random.shuffle(providers)
        providers = providers[:max_providers]
        for i, peer in enumerate(providers):
            left = t_end - time.monotonic()
            if left <= 0:
                break
            try:  # a fair share of the time left: a staller cannot take the next providers' time
                result = await asyncio.wait_for(
                    download_from(averager, peer, want_hash, [tuple(s) for s in shapes], chunk_timeout),
                    timeout=left / (len(providers) - i),
                )
            except StateRefused as e:
                log.warning("state download from %s refused: %s", str(peer)[-8:], e)
                continue
            except (TimeoutError, ConnectionError, OSError, P2PDaemonError, P2PHandlerError) as e:
                log.warning("state download from %s failed: %s", str(peer)[-8:], repr(e)[:200])
                continue
            except (DecodeError, ValueError, TypeError, RuntimeError, KeyError) as e:
                # a provider's bytes broke a decoder (protobuf, msgpack, tensor): its state is refused
                log.warning("state download from %s refused (%s): %s", str(peer)[-8:], type(e).__name__, e)
                continue
            problem = (  # hashing a big θ takes seconds: off the averager's event loop
                None
                if names is None
                else await asyncio.get_running_loop().run_in_executor(
                    None, state_hash_problem, result[1], names, want_hash, want_momentum
                )
            )
            if problem is not None:  # its metadata named the swarm's hash, its bytes are another state
                log.warning("state download from %s refused: %s", str(peer)[-8:], problem)
                continue
            future.set_result(result)
            return
    finally:
        if not future.done():
            future.set_result(None)
