"""The publisher: a py-libp2p host per peer that serves the peer's outbox to validators.

It runs as its own process (py-libp2p and hivemind cannot share one), started by the trainer with
:func:`start_publisher` and tied to it: it polls its parent and exits within ``parent_poll_s`` (+ a
moment) when the parent is gone, SIGKILL included, so no orphan keeps serving. Command line::

    python -m peer.net.publisher --outbox DIR --identity KEYFILE --listen /ip4/127.0.0.1/tcp/0 \\
        --parent-pid PID --ready-file FILE

Once listening it writes ``{"peer_id", "addrs", "pid", "protocol"}`` to the ready file (temp + rename).
It speaks :mod:`peer.net.artifact_protocol` on ``/gradswarm/artifact/1.0.0`` over noise + yamux only (the
security and muxer options are given explicitly; py-libp2p's defaults include plaintext).

What it serves is decided by the outbox's manifests: a blob is served only if a parseable manifest in
``rounds/<r>/`` or ``state/<r>/`` names it by sha256, it is a regular file inside the outbox (symlinks
pointing out and names with ``/`` are refused) and its size matches the manifest. It never vouches for
content: clients verify hashes and hotkey signatures themselves. Every refusal is logged with its reason
and counted (``{"op": "stats"}`` returns the counters).

This module does not import py-libp2p at import time, so the trainer can call :func:`start_publisher`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from substrateinterface import Keypair

from peer.errors import ConfigError, NetworkError, UserError, run_cli
from peer.net.artifact_protocol import (
    DEFAULT_CHUNK_BYTES,
    MAX_REQUEST_BYTES,
    PROTOCOL_ID,
    DialbackRequest,
    DialbackResponse,
    ErrorResponse,
    ExplainRequest,
    ExplainResponse,
    FetchHeader,
    FetchRequest,
    ListRequest,
    ListResponse,
    ProtocolError,
    StatsResponse,
    dialback_problem,
    encode_frame,
    pack,
    parse_request,
    read_frame,
)
from peer.net.identity import load_identity
from peer.net.records import Commitment, ContributionManifest, PeerIdentityRecord, RecordError, StateManifest

log = logging.getLogger("gradswarm.publisher")

IDENTITY_RECORD = "identity.json"
"""The signed PeerIdentityRecord, at the top of the outbox (see :meth:`PublisherHandle.publish_identity`)."""
MANIFEST = "manifest.json"
KINDS = {"rounds": ContributionManifest, "state": StateManifest}
MAX_MANIFEST_BYTES = 256 << 10
FAULTS = {"trickle", "stall", "stall-listing"}
"""Hostile behaviours a test publisher can simulate (:attr:`PublisherConfig.fault`)."""


@dataclass(kw_only=True)
class PublisherConfig:
    """Limits of one publisher. Defaults suit a peer serving a few validators per round."""

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    """Size of each data frame of a blob. Larger = fewer frames (a little faster); clients refuse frames
    over their own limit (1 MiB by default), so raise both together."""
    max_blob_bytes: int = 16 << 30
    """Blobs larger than this are never served (refused as ``too_large``)."""
    requests_per_second: float = 20.0
    """Sustained requests per remote peer; over it requests are refused as ``rate_limited``. Raise it if
    honest validators see ``rate_limited`` (each round costs them ~3 requests per peer)."""
    burst: int = 40
    """Requests a remote peer may make at once before the per-second rate applies."""
    max_fetches_per_peer: int = 4
    """Blob transfers one remote peer may run at the same time (``busy`` beyond that)."""
    max_fetches: int = 32
    """Blob transfers in flight in total (``busy`` beyond that). Lower it if uploads starve training."""
    io_timeout_s: float = 30.0
    """A request frame, or one data frame of a blob, that takes longer than this ends the stream (a
    stalled or malicious reader cannot hold a transfer slot forever)."""
    parent_poll_s: float = 0.5
    """How often the parent process is checked; the publisher exits this long after the parent died."""
    max_dialbacks: int = 4
    """Dial-backs (``peer doctor`` of another node asking "can you reach me?") running at once, one per
    remote peer; ``busy`` beyond. Each is one libp2p handshake to the requester's own IP."""
    dialback_timeout_s: float = 10.0
    """How long one dial-back may take before it is reported as not answering."""
    fault: str | None = None
    """Tests only (refused unless ``GRADSWARM_TEST_FAULTS=1``): misbehave like a hostile publisher —
    ``trickle`` (blobs in 1 KiB frames, one every 0.5 s), ``stall`` (half a blob, then silence),
    ``stall-listing`` (never answers a listing). Validators must survive all three."""

    def __post_init__(self) -> None:
        if self.fault is not None:
            if self.fault not in FAULTS:
                raise ConfigError(f"publisher fault {self.fault!r} is not one of {sorted(FAULTS)}")
            if os.environ.get("GRADSWARM_TEST_FAULTS") != "1":
                raise ConfigError(
                    "publisher faults are for tests only (set GRADSWARM_TEST_FAULTS=1 in a test)"
                )
        if not 1024 <= self.chunk_bytes <= 16 << 20:
            raise ConfigError(f"publisher chunk_bytes {self.chunk_bytes} must be within 1 KiB..16 MiB")
        for name in ("max_blob_bytes", "burst", "max_fetches_per_peer", "max_fetches", "max_dialbacks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"publisher {name} must be >= 1")
        for name in ("requests_per_second", "io_timeout_s", "parent_poll_s", "dialback_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"publisher {name} must be > 0")


# ---------------------------------------------------------------------------------------------------
# outbox index (pure file reads; no libp2p)


@dataclass
class _Cached:
    key: tuple[int, int]
    raw: bytes
    parsed: ContributionManifest | StateManifest | None


class OutboxIndex:
    """Reads the outbox's manifests (cached by mtime/size) and finds blobs by content hash, safely."""

    def __init__(self, root: Path, *, max_blob_bytes: int, counters: Counter):
        self.root = Path(root).resolve()
        self.max_blob_bytes = max_blob_bytes
        self.counters = counters
        self._cache: dict[Path, _Cached] = {}

    def rounds(self, kind: str) -> list[int]:
        base = self.root / kind
        if not base.is_dir():
            return []
        out = []
        for p in base.iterdir():
            if p.name.isdigit() and len(p.name) < 16 and (p / MANIFEST).is_file():
                out.append(int(p.name))
        return sorted(out)

    def manifest(self, kind: str, round_: int) -> _Cached | None:
        """The manifest of ``kind`` for ``round_`` if present and well-formed (else counted and None)."""
        path = self.root / kind / str(round_) / MANIFEST
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        key = (st.st_mtime_ns, st.st_size)
        cached = self._cache.get(path)
        if cached is not None and cached.key == key:
            return cached if cached.parsed is not None else None
        parsed = None
        raw = b""
        if st.st_size > MAX_MANIFEST_BYTES:
            self._refuse_manifest(path, "manifest_too_large", f"{st.st_size} bytes")
        else:
            raw = self._read_inside(path, MAX_MANIFEST_BYTES)
            if raw is not None:
                try:
                    parsed = KINDS[kind].parse(raw)
                except RecordError as e:
                    self._refuse_manifest(path, "bad_manifest", str(e))
        if len(self._cache) > 256:  # forget pruned rounds
            self._cache = {p: c for p, c in self._cache.items() if p.exists()}
        self._cache[path] = _Cached(key, raw or b"", parsed)
        return self._cache[path] if parsed is not None else None

    def _refuse_manifest(self, path: Path, reason: str, detail: str) -> None:
        self.counters[f"outbox_{reason}"] += 1
        log.warning("not serving %s (%s): %s", path.relative_to(self.root), reason, detail)

    def _inside(self, path: Path) -> Path | None:
        real = path.resolve()
        if not real.is_relative_to(self.root) or not real.is_file():
            self.counters["outbox_outside_path"] += 1
            log.warning("refusing %s: resolves outside the outbox or is not a regular file", path)
            return None
        return real

    def _read_inside(self, path: Path, limit: int) -> bytes | None:
        real = self._inside(path)
        if real is None:
            return None
        with open(real, "rb") as fh:
            return fh.read(limit + 1)[:limit]

    def identity(self) -> str | None:
        path = self.root / IDENTITY_RECORD
        if not path.exists():
            return None
        raw = self._read_inside(path, MAX_MANIFEST_BYTES)
        return raw.decode("utf-8", "replace") if raw else None

    def find_blob(self, sha256: str, hint: tuple[str, int] | None = None) -> tuple[Path, int]:
        """Path and size of the blob a manifest names by ``sha256``; ProtocolError saying why not.

        ``hint`` = (kind folder, round) of the manifest the client read: checked first, so two rounds
        holding the same hash cannot make the publisher serve the other round's file.
        """
        candidates = [hint] if hint is not None else []
        candidates += [(kind, r) for kind in KINDS for r in reversed(self.rounds(kind)) if (kind, r) != hint]
        for kind, r in candidates:
            m = self.manifest(kind, r)
            if m is None or m.parsed.blob.sha256 != sha256:
                continue
            blob = m.parsed.blob
            if blob.size > self.max_blob_bytes:
                raise ProtocolError("too_large", f"blob {sha256[:12]} is {blob.size} bytes > limit")
            real = self._inside(self.root / kind / str(r) / blob.name)
            if real is None:
                raise ProtocolError("not_found", f"blob {sha256[:12]} is not a file inside the outbox")
            size = real.stat().st_size
            if size != blob.size:
                raise ProtocolError(
                    "not_found", f"blob {sha256[:12]} is {size} bytes on disk, manifest says {blob.size}"
                )
            return real, size
        raise ProtocolError("not_found", f"no manifest in this outbox names blob {sha256[:12]}")


class RateLimiter:
    """Token bucket per remote peer id."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, peer: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(peer, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if len(self._buckets) > 10_000:  # forget idle peers
            self._buckets = {p: v for p, v in self._buckets.items() if now - v[1] < 60}
        if tokens < 1:
            self._buckets[peer] = (tokens, now)
            return False
        self._buckets[peer] = (tokens - 1, now)
        return True


# ---------------------------------------------------------------------------------------------------
# the server (py-libp2p, trio): imported lazily


def quiet_libp2p() -> None:
    """py-libp2p logs every closed stream and failed dial itself; we report failures with reasons.

    Set ``GRADSWARM_LIBP2P_LOG=DEBUG`` (or INFO, WARNING, ...) to see its own logs when debugging.
    """
    level = os.environ.get("GRADSWARM_LIBP2P_LOG", "CRITICAL").upper()
    for name in ("libp2p", "multiaddr", "async_service"):
        logging.getLogger(name).setLevel(level)


def make_host(keypair, listen_addrs: list | None = None, *, allow_private: bool = True):
    """A py-libp2p host with noise + yamux only (never plaintext, never mplex), yamux receive windows
    enforced (:mod:`peer.net.muxer`), inbound connections capped per remote address
    (:mod:`peer.net.admission`), and outbound dials limited to what :mod:`peer.net.dial_policy` allows
    (``allow_private`` False: no loopback/private/link-local address, whoever advertised it; no dial
    on py-libp2p's own initiative in any case)."""
    quiet_libp2p()
    from libp2p import new_host
    from libp2p.crypto.x25519 import create_new_key_pair as x25519_keypair
    from libp2p.custom_types import TProtocol
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID

    from peer.net.admission import connection_config, limit_inbound_per_address
    from peer.net.dial_policy import guard_dials
    from peer.net.muxer import WindowedYamux, install  # py-libp2p's yamux does not enforce windows

    install()

    host = new_host(
        key_pair=keypair,
        sec_opt={TProtocol(NOISE_ID): NoiseTransport(keypair, noise_privkey=x25519_keypair().private_key)},
        muxer_opt={TProtocol(YAMUX_ID): WindowedYamux},
        listen_addrs=listen_addrs,
        connection_config=connection_config(),
    )
    host.inbound_limit = limit_inbound_per_address(host)  # one address cannot hold every inbound slot
    guard_dials(host, allow_private=allow_private)  # identify-advertised addresses are the remote's words
    quiet_libp2p()
    return host


@dataclass(kw_only=True)
class _Server:
    index: OutboxIndex
    cfg: PublisherConfig
    peer_id: str
    counters: Counter
    limiter: RateLimiter = field(init=False)
    active: Counter = field(default_factory=Counter)
    dialing: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.limiter = RateLimiter(self.cfg.requests_per_second, self.cfg.burst)

    async def handle(self, stream) -> None:
        import trio
        from libp2p.io.exceptions import IOException

        remote = str(stream.muxed_conn.peer_id)
        try:
            with trio.fail_after(self.cfg.io_timeout_s):
                raw = await read_frame(stream, MAX_REQUEST_BYTES, what="request")
            req = parse_request(raw)
            if not self.limiter.allow(remote):
                raise ProtocolError("rate_limited", f"more than {self.cfg.requests_per_second}/s; slow down")
            if isinstance(req, ListRequest):
                if self.cfg.fault == "stall-listing":
                    await trio.sleep_forever()
                await self._list(stream, req)
            elif isinstance(req, FetchRequest):
                await self._fetch(stream, req, remote)
            elif isinstance(req, ExplainRequest):
                await self._explain(stream, req)
            elif isinstance(req, DialbackRequest):
                await self._dialback(stream, req, remote)
            else:
                await stream.write(pack(StatsResponse(peer_id=self.peer_id, counters=dict(self.counters))))
            await stream.close()
        except ProtocolError as e:
            self.counters[f"refused_{e.reason}"] += 1
            log.info("refused %s from %s: %s", e.reason, remote[:16], e)
            await self._answer_error(stream, e)
        except trio.TooSlowError:
            self.counters["refused_timeout"] += 1
            log.info("request from %s timed out after %.0fs", remote[:16], self.cfg.io_timeout_s)
            await _reset(stream)
        except IOException as e:  # the remote reset or dropped the connection
            self.counters["stream_error"] += 1
            log.info("stream from %s failed: %s", remote[:16], e)
            await _reset(stream)
        except OSError as e:  # a blob vanished or became unreadable (pruned mid-request, disk error)
            self.counters["outbox_read_error"] += 1
            log.warning("outbox read failed while serving %s: %s", remote[:16], e)
            await _reset(stream)

    async def _answer_error(self, stream, e: ProtocolError) -> None:
        import trio
        from libp2p.io.exceptions import IOException

        try:
            with trio.fail_after(5):
                await stream.write(pack(ErrorResponse(reason=e.reason, error=str(e)[:1000])))
                await stream.close()
        except (IOException, trio.TooSlowError):
            await _reset(stream)

    async def _list(self, stream, req: ListRequest) -> None:
        resp = ListResponse(
            peer_id=self.peer_id,
            identity=self.index.identity(),
            rounds=self.index.rounds("rounds")[-1024:],
            state_rounds=self.index.rounds("state")[-1024:],
        )
        if req.round is not None:
            c = self.index.manifest("rounds", req.round)
            s = self.index.manifest("state", req.round)
            resp = resp.model_copy(
                update={
                    "contribution": c.raw.decode() if c else None,
                    "state": s.raw.decode() if s else None,
                }
            )
        self.counters["served_list"] += 1
        await stream.write(pack(resp))

    async def _explain(self, stream, req: ExplainRequest) -> None:
        """A validator's signed explanation record (peer.net.explanations), raw; clients verify it."""
        from peer.net.explanations import MAX_EXPLANATION_BYTES, explanation_path, explanation_rounds

        rounds = explanation_rounds(self.index.root)
        round_ = req.round if req.round is not None else (rounds[-1] if rounds else None)
        raw = None
        if round_ is not None and round_ in rounds:
            raw = self.index._read_inside(explanation_path(self.index.root, round_), MAX_EXPLANATION_BYTES)
        resp = ExplainResponse(
            peer_id=self.peer_id,
            identity=self.index.identity(),
            rounds=rounds[-1024:],
            explanation=raw.decode("utf-8", "replace") if raw else None,
        )
        self.counters["served_explain"] += 1
        await stream.write(pack(resp))

    async def _dialback(self, stream, req: DialbackRequest, remote: str) -> None:
        """Dial the requester's own addresses from here (a fresh host) and say whether they answered."""
        from peer.net.discovery import probe_dht

        try:
            observed = stream.muxed_conn.get_remote_address()
        except (AttributeError, OSError):
            observed = None
        observed_ip = observed[0] if observed else None
        problem = dialback_problem(list(req.addrs), observed_ip)
        if problem is not None:
            raise ProtocolError("bad_dialback", problem)
        if self.dialing[remote] or sum(self.dialing.values()) >= self.cfg.max_dialbacks:
            raise ProtocolError("busy", "dial-backs already running (one per peer at a time); retry shortly")
        self.dialing[remote] += 1
        t0 = time.monotonic()
        try:
            # only the requester's own IP (dialback_problem above), private or not: it asked to be dialled
            why = await probe_dht(list(req.addrs), timeout_s=self.cfg.dialback_timeout_s, allow_private=True)
        finally:
            self.dialing[remote] -= 1
        self.counters["served_dialback"] += 1
        resp = DialbackResponse(
            peer_id=self.peer_id,
            observed_ip=observed_ip,
            reachable=why is None,
            detail="answered" if why is None else why[:1000],
            seconds=min(3600.0, time.monotonic() - t0),
        )
        await stream.write(pack(resp))

    async def _fetch(self, stream, req: FetchRequest, remote: str) -> None:
        import trio

        if self.active[remote] >= self.cfg.max_fetches_per_peer:
            raise ProtocolError("busy", f"{self.cfg.max_fetches_per_peer} transfers already running for you")
        if sum(self.active.values()) >= self.cfg.max_fetches:
            raise ProtocolError("busy", f"{self.cfg.max_fetches} transfers running; retry shortly")
        hint = None
        if req.round is not None and req.kind is not None:
            hint = ("rounds" if req.kind == "contribution" else "state", req.round)
        path, size = self.index.find_blob(req.sha256, hint)
        self.active[remote] += 1
        try:
            with open(path, "rb") as fh:
                chunk = self.cfg.chunk_bytes
                with trio.fail_after(self.cfg.io_timeout_s):
                    await stream.write(pack(FetchHeader(size=size, chunk_bytes=chunk)))
                sent = 0
                fault = self.cfg.fault
                if fault == "trickle":
                    chunk = 1024
                elif fault == "stall":
                    chunk = max(1024, min(chunk, size // 4))
                while sent < size:
                    if fault == "stall" and sent >= size // 2:
                        await trio.sleep_forever()
                    if fault == "trickle" and sent:
                        await trio.sleep(0.5)
                    data = fh.read(min(chunk, size - sent))
                    if not data:
                        raise ProtocolError("not_found", f"blob {req.sha256[:12]} shrank while being served")
                    with trio.fail_after(self.cfg.io_timeout_s):
                        await stream.write(encode_frame(data))
                    sent += len(data)
                with trio.fail_after(self.cfg.io_timeout_s):
                    await stream.write(encode_frame(b""))
            self.counters["served_blob"] += 1
            self.counters["served_bytes"] += size
        finally:
            self.active[remote] -= 1
            if self.active[remote] <= 0:
                del self.active[remote]


async def _reset(stream) -> None:
    from libp2p.io.exceptions import IOException

    try:
        await stream.reset()
    except IOException:
        pass


def _parent_alive(parent_pid: int, was_parent: bool) -> bool:
    if was_parent:
        return os.getppid() == parent_pid  # reparented => parent died (robust to pid reuse)
    try:
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _atomic_write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as fh:
            json.dump(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


async def serve(
    *,
    outbox: Path,
    identity: Path,
    listen: str,
    ready_file: Path | None,
    parent_pid: int | None,
    cfg: PublisherConfig,
) -> None:
    """Run the publisher until SIGTERM/SIGINT or until the parent process is gone."""
    import multiaddr
    import trio

    from peer.net.identity import libp2p_keypair

    keypair = libp2p_keypair(identity)
    try:
        maddr = multiaddr.Multiaddr(listen)
    except (ValueError, multiaddr.exceptions.Error) as e:
        raise ConfigError(
            f"--listen {listen!r} is not a multiaddr ({e}); e.g. /ip4/0.0.0.0/tcp/4001"
        ) from None
    host = make_host(keypair, [maddr])
    peer_id = host.get_id().to_base58()
    counters: Counter = Counter()
    server = _Server(
        index=OutboxIndex(outbox, max_blob_bytes=cfg.max_blob_bytes, counters=counters),
        cfg=cfg,
        peer_id=peer_id,
        counters=counters,
    )
    from libp2p.custom_types import TProtocol

    host.set_stream_handler(TProtocol(PROTOCOL_ID), server.handle)
    was_parent = parent_pid is not None and os.getppid() == parent_pid
    async with host.run(listen_addrs=[maddr]), trio.open_nursery() as nursery:
        addrs = sorted({str(a).split("/p2p/")[0] for a in host.get_addrs()})
        if ready_file is not None:
            _atomic_write_json(
                ready_file, {"peer_id": peer_id, "addrs": addrs, "pid": os.getpid(), "protocol": PROTOCOL_ID}
            )
        log.info("publisher %s serving %s on %s", peer_id, outbox, ", ".join(addrs))

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("publisher: signal %d, stopping", signum)
                    nursery.cancel_scope.cancel()
                    return

        async def watch_parent() -> None:
            if parent_pid is None:
                return
            while _parent_alive(parent_pid, was_parent):
                await trio.sleep(cfg.parent_poll_s)
            log.info("publisher: parent %d is gone, stopping", parent_pid)
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch_signals)
        nursery.start_soon(watch_parent)


# ---------------------------------------------------------------------------------------------------
# the parent's side


@dataclass(kw_only=True)
class PublisherHandle:
    """A running publisher process, as seen by the trainer that started it."""

    peer_id: str
    addrs: list[str]
    """Transport addresses without ``/p2p/...``, e.g. ``/ip4/127.0.0.1/tcp/40417``."""
    process: subprocess.Popen
    outbox: Path
    ready_file: Path
    log_file: Path

    @property
    def multiaddrs(self) -> list[str]:
        return [f"{a}/p2p/{self.peer_id}" for a in self.addrs]

    def alive(self) -> bool:
        return self.process.poll() is None

    def commitment(self, addr: str | None = None) -> Commitment:
        """The compact on-chain commitment for ``addr`` (default: the first listen address).

        Pass the address validators can dial (your public IP and the forwarded port) when the publisher
        listens on a wildcard address such as ``/ip4/0.0.0.0/tcp/4001``.
        """
        addr = addr or self.addrs[0]
        if "/0.0.0.0/" in addr or "/::/" in addr:
            raise ConfigError(
                f"publisher listens on {addr}, which nobody can dial: pass the public address, e.g. "
                "commitment('/ip4/<your public ip>/tcp/<port>')"
            )
        return Commitment(addr=addr, peer_id=self.peer_id)

    def publish_identity(
        self,
        keypair: Keypair,
        *,
        run_id: str,
        round_: int,
        addrs: list[str] | None = None,
        dht_addrs: list[str] | None = None,
    ) -> PeerIdentityRecord:
        """Sign the hotkey <-> peer id <-> addresses binding and put it in the outbox for clients.

        ``dht_addrs``: the peer's DHT multiaddrs, for newcomers joining by netuid (peer.net.discovery).
        """
        record = PeerIdentityRecord(
            run_id=run_id,
            round=round_,
            hotkey=keypair.ss58_address,
            peer_id=self.peer_id,
            addrs=addrs or self.addrs,
            dht_addrs=list(dht_addrs or [])[:16],
        ).signed(keypair)
        write_identity_record(self.outbox, record)
        return record

    def stop(self, timeout: float = 5.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def write_identity_record(outbox: Path, record: PeerIdentityRecord) -> None:
    _atomic_write_json(Path(outbox) / IDENTITY_RECORD, json.loads(record.model_dump_json()))


def add_publisher_args(
    parser: argparse.ArgumentParser, *, serves: str, dialled_by: str, no_publish_help: str
) -> None:
    """``--publisher.listen``, ``--publisher.announce`` and ``--no-publish`` for a command that runs a
    publisher (``peer join``: contributions for validators; ``validator run``: explanations for miners)."""
    g = parser.add_argument_group(f"publisher (serves {serves} over py-libp2p)")
    g.add_argument(
        "--publisher.listen",
        dest="publisher_listen",
        default="/ip4/0.0.0.0/tcp/0",
        metavar="MADDR",
        help="address the publisher listens on (default: all interfaces, a free port)",
    )
    g.add_argument(
        "--publisher.announce",
        dest="publisher_announce",
        default=None,
        metavar="MADDR",
        help=f"address committed on chain for {dialled_by} to dial (needed behind NAT / on 0.0.0.0)",
    )
    g.add_argument("--no-publish", action="store_true", help=no_publish_help)


def start_publisher(
    outbox: Path,
    identity_path: Path,
    listen: str = "/ip4/127.0.0.1/tcp/0",
    *,
    parent_pid: int | None = None,
    timeout: float = 30,
    ready_file: Path | None = None,
    log_file: Path | None = None,
    cfg: PublisherConfig | None = None,
) -> PublisherHandle:
    """Spawn ``python -m peer.net.publisher`` for ``outbox`` and wait until it listens.

    ``parent_pid`` (default: this process) is the process whose death ends the publisher. The identity
    key must exist (:func:`peer.net.identity.load_or_create_identity`). Its log goes to ``log_file``
    (default ``<outbox>/../publisher.log``). Raises NetworkError with the log's tail if it fails to start.
    """
    outbox = Path(outbox)
    outbox.mkdir(parents=True, exist_ok=True)
    expected_peer_id = load_identity(identity_path).peer_id
    ready_file = Path(ready_file or outbox.parent / "publisher.ready.json")
    log_file = Path(log_file or outbox.parent / "publisher.log")
    ready_file.unlink(missing_ok=True)
    cfg = cfg or PublisherConfig()
    cmd = [
        sys.executable, "-m", "peer.net.publisher",
        "--outbox", str(outbox), "--identity", str(identity_path), "--listen", listen,
        "--parent-pid", str(parent_pid if parent_pid is not None else os.getpid()),
        "--ready-file", str(ready_file),
        "--chunk-bytes", str(cfg.chunk_bytes), "--max-blob-bytes", str(cfg.max_blob_bytes),
        "--requests-per-second", str(cfg.requests_per_second), "--burst", str(cfg.burst),
        "--max-fetches-per-peer", str(cfg.max_fetches_per_peer), "--max-fetches", str(cfg.max_fetches),
        "--io-timeout", str(cfg.io_timeout_s), "--parent-poll", str(cfg.parent_poll_s),
    ] + (["--fault", cfg.fault] if cfg.fault else [])  # fmt: skip
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log_fh:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=log_fh, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready_file.exists():
            info = json.loads(ready_file.read_text())
            if info["peer_id"] != expected_peer_id:
                proc.kill()
                raise NetworkError(f"publisher came up as {info['peer_id']}, expected {expected_peer_id}")
            return PublisherHandle(
                peer_id=info["peer_id"], addrs=info["addrs"], process=proc, outbox=outbox,
                ready_file=ready_file, log_file=log_file,
            )  # fmt: skip
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    tail = log_file.read_text(errors="replace").strip().splitlines()[-3:] if log_file.exists() else []
    raise NetworkError(
        f"publisher did not start within {timeout:.0f}s (exit {proc.returncode}); log {log_file}: "
        + (" | ".join(tail) or "empty")
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m peer.net.publisher", description="Serve a peer's outbox over libp2p."
    )
    p.add_argument("--outbox", type=Path, required=True)
    p.add_argument(
        "--identity", type=Path, required=True, help="libp2p identity key file (peer.net.identity)"
    )
    p.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    p.add_argument("--ready-file", type=Path, default=None)
    d = PublisherConfig()
    p.add_argument("--chunk-bytes", type=int, default=d.chunk_bytes)
    p.add_argument("--max-blob-bytes", type=int, default=d.max_blob_bytes)
    p.add_argument("--requests-per-second", type=float, default=d.requests_per_second)
    p.add_argument("--burst", type=int, default=d.burst)
    p.add_argument("--max-fetches-per-peer", type=int, default=d.max_fetches_per_peer)
    p.add_argument("--max-fetches", type=int, default=d.max_fetches)
    p.add_argument("--io-timeout", type=float, default=d.io_timeout_s)
    p.add_argument("--parent-poll", type=float, default=d.parent_poll_s)
    p.add_argument("--fault", default=None, help=argparse.SUPPRESS)  # tests only, see PublisherConfig.fault
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s publisher %(levelname)s %(message)s")

    def run() -> int:
        import trio

        cfg = PublisherConfig(
            chunk_bytes=args.chunk_bytes, max_blob_bytes=args.max_blob_bytes,
            requests_per_second=args.requests_per_second, burst=args.burst,
            max_fetches_per_peer=args.max_fetches_per_peer, max_fetches=args.max_fetches,
            io_timeout_s=args.io_timeout, parent_poll_s=args.parent_poll, fault=args.fault,
        )  # fmt: skip
        if not args.outbox.is_dir():
            raise UserError(f"--outbox {args.outbox} is not a directory")
        trio.run(
            lambda: serve(
                outbox=args.outbox, identity=args.identity, listen=args.listen,
                ready_file=args.ready_file, parent_pid=args.parent_pid, cfg=cfg,
            )
        )  # fmt: skip
        return 0

    return run_cli(run, "publisher")


if __name__ == "__main__":
    sys.exit(main())
