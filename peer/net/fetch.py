"""Fetch a peer's artifacts from its publisher and keep them only if they are provably that peer's.

Used by the validator (a py-libp2p process, never hivemind) and by ``peer fetch`` for humans. The
client dials the address + peer id a peer committed on chain; noise authenticates the remote peer id
during the handshake, so a commitment whose peer id is not the one listening there is refused
(``peer_id_mismatch``). Then, for a round:

1. the signed :class:`~peer.net.records.PeerIdentityRecord` must name the hotkey we expect (the one
   registered for that uid), this run, and the peer id of the connection (``require_identity``);
2. each manifest must parse strictly, have this run id and round, the expected hotkey, the connection's
   peer id, and a valid sr25519 signature;
3. the blob is streamed into a temp file in the cache while being hashed; it is renamed to
   ``<cache>/<sha256>.safetensors`` only if size and sha256 match the manifest and the file is a
   well-formed safetensors container (header checked strictly without deserialising any tensor; with
   :attr:`FetchConfig.layouts` every tensor must be exactly the model's, see :mod:`peer.net.layout`).

Sizes come from the model: with ``layouts`` a manifest declaring a blob bigger than an honest one of its
kind is refused before any byte is fetched (``too_large``), and a stream running past the declared size is
cut (``oversized``). A sender that stops for ``io_timeout_s`` is cut (``stalled``), and one slower than
``min_throughput_bytes_s`` over the whole blob too (``too_slow``), so a trickling peer cannot hold a
fetch slot for long.

Nothing is deserialised before that, and nothing is ever unpickled. Each rejection raises
:class:`FetchError` with a one-line reason and is counted in :attr:`FetchClient.rejections`.

The client runs py-libp2p on trio in a background thread, so its methods are plain blocking calls
usable from any (non-hivemind) process; one libp2p host and its connections are reused across calls.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from peer.errors import ConfigError, NetworkError
from peer.net.artifact_protocol import (
    DEFAULT_CHUNK_BYTES,
    MAX_LISTING_BYTES,
    PROTOCOL_ID,
    FetchHeader,
    FetchRequest,
    ListRequest,
    ListResponse,
    ProtocolError,
    StatsRequest,
    StatsResponse,
    pack,
    parse_response,
    read_frame,
)
from peer.net.layout import (
    ArtifactLayouts,
    ArtifactRefused,
    Layout,
    check_blob_header,
    header_length,
    parse_header,
)
from peer.net.records import (
    BlobRef,
    Commitment,
    ContributionManifest,
    PeerIdentityRecord,
    RecordError,
    SignedRecord,
    StateManifest,
)

MAX_SAFETENSORS_HEADER = 8 << 20
"""Largest safetensors header read from a blob when no model layout is known."""
FORMAT_REASONS = frozenset({"truncated", "header_too_large", "bad_header"})
"""Header refusals reported as ``not_safetensors`` (the others keep their own code: ``bad_dtype``, ...)."""


class FetchError(NetworkError):
    """An artifact was refused or could not be fetched; ``reason`` is a short code for counting."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(kw_only=True)
class FetchConfig:
    """How a client fetches and what it accepts."""

    cache_dir: Path
    """Verified blobs land here as ``<sha256>.safetensors`` (temp file + rename)."""
    run_id: str | None = None
    """Only records of this run are accepted (None: any run — for humans poking at a peer)."""
    max_blob_bytes: int = 16 << 30
    """Manifests naming a bigger blob are refused before any byte is fetched. With ``layouts`` the limit
    of each kind is the model's honest size (:attr:`peer.net.layout.Layout.max_bytes`) when smaller."""
    layouts: ArtifactLayouts | None = None
    """The model's expected Δ and state layouts (``ArtifactLayouts.for_run(run)``): per-kind size limits
    and exact tensor checks of every fetched blob. None (humans poking at a peer): generic strict checks."""
    min_throughput_bytes_s: float = 512 << 10
    """A blob must arrive at least this fast on average (after ``deadline_grace_s``), or it is cut
    (``too_slow``). Lower it for peers on slow links that show ``too_slow``; raise it to drop tricklers
    sooner."""
    deadline_grace_s: float = 10.0
    """Seconds added to each blob's deadline (``size / min_throughput_bytes_s``) for the first bytes."""
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES
    """Largest data frame accepted; must be >= the publisher's chunk size."""
    connect_timeout_s: float = 15.0
    """Dial + noise handshake limit. Raise it for peers far away / behind slow links."""
    io_timeout_s: float = 30.0
    """Limit for one frame to arrive; a publisher that stalls longer is dropped (``timeout``)."""
    receive_window_bytes: int = 16 << 20
    """yamux window granted to a publisher for each blob (at most 16 MiB, yamux's limit). Bigger = fewer
    stalls of the sender; lower it only if many parallel fetches use too much memory."""
    max_parallel: int = 16
    """Peers fetched at the same time by :meth:`FetchClient.fetch_many`. Raise it when a round has many
    peers and the link is idle; lower it if publishers answer ``busy`` or time out."""
    require_identity: bool = True
    """Refuse a publisher that serves no signed PeerIdentityRecord for the expected hotkey."""
    identity_path: Path | None = None
    """This client's own libp2p key file (None: a fresh random key per client)."""
    allow_private: bool = True
    """Whether this client's host may dial loopback/private/link-local addresses at all
    (:func:`peer.net.dial_policy.guard_dials`). Clients that dial what a chain or a remote names on a
    public chain set it False (validator, discovery, doctor, status: from ``--dial-private``); ``peer
    fetch --from`` dials what its user typed."""

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir)
        if self.max_chunk_bytes < 1024 or self.max_blob_bytes < 1:
            raise ConfigError("fetch max_chunk_bytes must be >= 1024 and max_blob_bytes >= 1")
        if self.max_parallel < 1:
            raise ConfigError("fetch max_parallel must be >= 1")
        if self.connect_timeout_s <= 0 or self.io_timeout_s <= 0:
            raise ConfigError("fetch timeouts must be > 0")
        if self.min_throughput_bytes_s <= 0 or self.deadline_grace_s < 0:
            raise ConfigError("fetch min_throughput_bytes_s must be > 0 and deadline_grace_s >= 0")

    def layout(self, kind: str) -> Layout | None:
        return self.layouts.for_kind(kind) if self.layouts is not None else None

    def max_bytes(self, kind: str) -> int:
        """Largest blob of ``kind`` accepted: the model's honest size (with layouts), at most max_blob_bytes."""
        layout = self.layout(kind)
        return min(self.max_blob_bytes, layout.max_bytes) if layout is not None else self.max_blob_bytes

    def deadline_s(self, size: int) -> float:
        """Seconds a blob of ``size`` bytes may take in all."""
        return self.deadline_grace_s + size / self.min_throughput_bytes_s


@dataclass(frozen=True, kw_only=True)
class Target:
    """Whom to fetch from: a committed address + peer id, and the hotkey registered for it."""

    addr: str
    peer_id: str
    hotkey: str

    @classmethod
    def from_commitment(cls, commitment: Commitment | bytes | str, hotkey: str) -> Target:
        if isinstance(commitment, bytes):
            commitment = Commitment.from_bytes(commitment)
        elif isinstance(commitment, str):
            commitment = Commitment.from_multiaddr(commitment)
        return cls(addr=commitment.addr, peer_id=commitment.peer_id, hotkey=hotkey)

    @classmethod
    def from_chain(cls, raw: bytes, hotkey: str, *, allow_private: bool) -> tuple[Target | None, str | None]:
        """(target, None) for the commitment bytes ``raw`` a chain holds for ``hotkey``, or (None, why): it
        is unreadable, or it names an address :func:`peer.net.dial_policy.dial_refusal` refuses (never
        dialled)."""
        from peer.net.dial_policy import dial_refusal

        try:
            commitment = Commitment.from_bytes(raw)
        except ValueError as e:
            return None, f"unreadable commitment ({e})"
        why = dial_refusal(commitment.addr, allow_private=allow_private)
        if why is not None:
            return None, f"commitment {why}"
        return cls.from_commitment(commitment, hotkey), None


@dataclass(kw_only=True)
class RoundListing:
    """What a peer serves for a round, every record already verified."""

    peer_id: str
    hotkey: str
    identity: PeerIdentityRecord | None
    rounds: list[int]
    state_rounds: list[int]
    contribution: ContributionManifest | None = None
    state: StateManifest | None = None

    @property
    def manifests(self) -> list[ContributionManifest | StateManifest]:
        return [m for m in (self.contribution, self.state) if m is not None]


@dataclass(kw_only=True)
class Fetched:
    """A verified blob in the cache."""

    manifest: ContributionManifest | StateManifest
    path: Path
    sha256: str
    size: int

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()


# ---------------------------------------------------------------------------------------------------
# pure checks (no network): used by the client and testable on their own


def verify_manifest(
    raw: str | bytes,
    model: type[ContributionManifest] | type[StateManifest],
    *,
    hotkey: str,
    peer_id: str,
    run_id: str | None,
    round_: int,
    max_blob_bytes: int,
) -> ContributionManifest | StateManifest:
    """Parse + verify a manifest from the network; FetchError with the reason if anything is off."""
    try:
        m = model.parse(raw)
    except RecordError as e:
        raise FetchError("bad_manifest", str(e)) from None
    if m.hotkey != hotkey:
        raise FetchError("wrong_hotkey", f"{m.kind} manifest is for hotkey {m.hotkey}, expected {hotkey}")
    if m.round != round_:
        raise FetchError("wrong_round", f"{m.kind} manifest is for round {m.round}, asked for round {round_}")
    if run_id is not None and m.run_id != run_id:
        raise FetchError("wrong_run", f"{m.kind} manifest is for run {m.run_id!r}, this is run {run_id!r}")
    _verify_signature(m, run_id=run_id, round_=round_)
    if m.peer_id != peer_id:
        raise FetchError("wrong_peer_id", f"{m.kind} manifest names peer {m.peer_id}, served by {peer_id}")
    if m.blob.size > max_blob_bytes:
        raise FetchError("too_large", f"{m.kind} blob is {m.blob.size} bytes > limit {max_blob_bytes}")
    return m


def verify_identity(raw: str, *, hotkey: str, peer_id: str, run_id: str | None) -> PeerIdentityRecord:
    try:
        rec = PeerIdentityRecord.parse(raw)
    except RecordError as e:
        raise FetchError("bad_identity", str(e)) from None
    if rec.hotkey != hotkey:
        raise FetchError("wrong_hotkey", f"identity record is for hotkey {rec.hotkey}, expected {hotkey}")
    if run_id is not None and rec.run_id != run_id:
        raise FetchError("wrong_run", f"identity record is for run {rec.run_id!r}, this is run {run_id!r}")
    _verify_signature(rec, run_id=run_id, round_=None)
    if rec.peer_id != peer_id:
        raise FetchError(
            "peer_id_mismatch", f"hotkey {hotkey} signed peer id {rec.peer_id}, but {peer_id} answered"
        )
    return rec


def _verify_signature(rec: SignedRecord, *, run_id: str | None, round_: int | None) -> None:
    try:
        rec.verify(run_id=run_id, round_=round_)
    except RecordError as e:
        raise FetchError("bad_signature", str(e)) from None


def check_safetensors(path: Path, size: int, *, kind: str = "state", layout: Layout | None = None) -> None:
    """The file is a safetensors container of ``kind`` whose tensors exactly fill it (and, with
    ``layout``, are exactly the model's). Reads only the header; never deserialises a tensor."""
    if layout is not None and size > layout.max_bytes:
        raise FetchError("too_large", f"{kind} blob of {size} bytes > the model's {layout.max_bytes}")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            cap = layout.max_header_bytes if layout is not None else MAX_SAFETENSORS_HEADER
            n = header_length(head, size, cap)
            if layout is None:  # no model known: the container only (decoding checks the rest)
                parse_header(head + fh.read(n), size)
            else:
                check_blob_header(head + fh.read(n), size, kind=kind, layout=layout)
    except ArtifactRefused as e:
        reason = "not_safetensors" if e.reason in FORMAT_REASONS else e.reason
        raise FetchError(reason, f"blob refused: {e}") from None


# ---------------------------------------------------------------------------------------------------


class FetchClient:
    """Blocking client; ``with FetchClient(FetchConfig(cache_dir=...)) as c: c.fetch_contribution(...)``."""

    def __init__(self, cfg: FetchConfig):
        self.cfg = cfg
        self.rejections: Counter = Counter()
        """Refusals by reason code (``wrong_hotkey``, ``hash_mismatch``, ``peer_id_mismatch``, ...)."""
        self._thread: threading.Thread | None = None
        self._token = None
        self._host = None
        self._stop = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._dialing: dict[tuple[str, str], object] = {}
        """(peer id, address) → trio.Event of a dial in flight (see :meth:`_connect`)."""

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> FetchClient:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        if self._thread is not None:
            return
        self.cfg.cache_dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="gradswarm-fetch", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        import trio

        try:
            trio.run(self._main)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread by start()
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        import trio

        from peer.net.publisher import make_host

        if self.cfg.identity_path is not None:
            from peer.net.identity import libp2p_keypair

            keypair = libp2p_keypair(self.cfg.identity_path)
        else:
            from libp2p.crypto.ed25519 import create_new_key_pair

            keypair = create_new_key_pair()
        self._host = make_host(keypair, allow_private=self.cfg.allow_private)
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with self._host.run(listen_addrs=[]):
            self._ready.set()
            await self._stop.wait()

    def close(self) -> None:
        if self._thread is None:
            return
        import trio

        if self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(10)
        self._thread = None

    def _call(self, afn, *args):
        import trio

        self.start()
        return trio.from_thread.run(afn, *args, trio_token=self._token)

    # -- public blocking API ---------------------------------------------------------------------

    def list_round(self, addr: str, peer_id: str, round_: int, *, hotkey: str) -> RoundListing:
        """Verified listing of ``round_`` from the peer at ``addr``/``peer_id`` run by ``hotkey``."""
        return self._call(
            self._counted, self.alist_round(Target(addr=addr, peer_id=peer_id, hotkey=hotkey), round_)
        )

    def fetch_contribution(self, addr: str, peer_id: str, round_: int, *, hotkey: str) -> Fetched:
        return self.fetch(Target(addr=addr, peer_id=peer_id, hotkey=hotkey), round_, "contribution")

    def fetch_state(self, addr: str, peer_id: str, round_: int, *, hotkey: str) -> Fetched:
        return self.fetch(Target(addr=addr, peer_id=peer_id, hotkey=hotkey), round_, "state")

    def fetch(self, target: Target, round_: int, kind: str = "contribution") -> Fetched:
        return self._call(self._counted, self.afetch(target, round_, kind))

    def fetch_many(
        self, targets: Iterable[Target], round_: int, kind: str = "contribution"
    ) -> dict[Target, Fetched | FetchError]:
        """Fetch one kind of artifact from many peers concurrently; failures are returned, not raised."""
        return self._call(self._afetch_many, list(targets), round_, kind)

    def explanation(self, target: Target, round_: int | None = None):
        """``(rounds it explains, record)``: the validator ``target.hotkey``'s signed explanation of
        ``round_`` (None: its newest), verified (identity, hotkey, run, signature, peer id), or None as
        record if it serves none. FetchError (``bad_explanation``, ...) otherwise."""
        return self._call(self._counted, self.aexplanation(target, round_))

    def dialback(self, target: Target, addrs: list[str]):
        """Ask ``target``'s publisher to dial ``addrs`` (ours, at the IP it sees us at) from its machine:
        a DialbackResponse (answered or why not), or FetchError (``refused_bad_dialback``, ``timeout``, …;
        ``refused_bad_request`` from a publisher older than the op)."""
        return self._call(self._counted, self._adialback(target, addrs))

    def stats(self, addr: str, peer_id: str) -> dict[str, int]:
        """The publisher's own counters (what it served and refused)."""
        return self._call(self._counted, self._astats(Target(addr=addr, peer_id=peer_id, hotkey="")))

    # -- async (trio) implementation -------------------------------------------------------------

    async def _counted(self, coro):
        try:
            return await coro
        except FetchError as e:
            self.rejections[e.reason] += 1
            raise

    async def _afetch_many(self, targets: list[Target], round_: int, kind: str):
        import trio

        results: dict[Target, Fetched | FetchError] = {}
        limiter = trio.CapacityLimiter(self.cfg.max_parallel)

        async def one(t: Target) -> None:
            try:
                async with limiter:
                    results[t] = await self._counted(self.afetch(t, round_, kind))
            except FetchError as e:
                results[t] = e

        async with trio.open_nursery() as nursery:
            for t in targets:
                nursery.start_soon(one, t)
        return results

    async def _open(self, target: Target):
        """A stream to ``target`` on our protocol, on a connection whose peer id noise verified."""
        import multiaddr
        import trio
        from libp2p.custom_types import TProtocol
        from libp2p.exceptions import BaseLibp2pError
        from libp2p.peer.id import ID

        try:
            pid = ID.from_base58(target.peer_id)
            maddr = multiaddr.Multiaddr(target.addr)
        except (ValueError, multiaddr.exceptions.Error) as e:
            raise FetchError(
                "bad_commitment", f"cannot dial {target.addr}/p2p/{target.peer_id}: {e}"
            ) from None
        try:
            with trio.fail_after(self.cfg.connect_timeout_s):
                await self._connect(pid, maddr, target)
                stream = await self._host.new_stream(pid, [TProtocol(PROTOCOL_ID)])
        except trio.TooSlowError:
            raise FetchError(
                "timeout", f"{target.addr}: no connection within {self.cfg.connect_timeout_s:.0f}s"
            ) from None
        except (BaseLibp2pError, OSError) as e:
            if _mentions_mismatch(e):
                raise FetchError(
                    "peer_id_mismatch",
                    f"the peer listening at {target.addr} is not {target.peer_id} (commitment is stale or forged)",
                ) from None
            raise FetchError(
                "dial_failed", f"cannot reach {target.addr}/p2p/{target.peer_id}: {_first_line(e)}"
            ) from None
        remote = str(stream.muxed_conn.peer_id)
        if remote != target.peer_id:
            await _reset(stream)
            raise FetchError(
                "peer_id_mismatch", f"{target.addr} answered as {remote}, expected {target.peer_id}"
            )
        return stream

    async def _connect(self, pid, maddr, target: Target) -> None:
        """A live connection to ``pid``: the one we have, or a dial of exactly ``target``'s address.

        Not ``host.connect``: py-libp2p's ``dial_peer`` makes a dial wait for any dial in flight to the
        same peer id, whatever its address, so a uid committing a victim's peer id at a tarpit (accepts
        TCP, never answers) held the victim's own dial until our timeout whenever its dial went first. A
        dial here waits only for a dial in flight to the same peer id *and* address; a connection to the
        peer id made from any address serves every target naming it (noise proved who answers; the
        signed identity record then says whose publisher it is)."""
        network = self._host.get_network()
        key = (target.peer_id, target.addr)
        while True:
            if _live(network.get_connections(pid)):
                return
            pending = self._dialing.get(key)
            if pending is None:
                break
            await pending.wait()
        import trio

        done = self._dialing[key] = trio.Event()
        try:
            network.unblock_peer(pid)  # py-libp2p's 60 s "recently failed" block (new_stream checks it)
            conn = await network.dial_addr(maddr, pid)
            started = getattr(conn, "event_started", None)
            if started is not None:
                await started.wait()
            # new_stream redials from the peerstore if the connection drops: keep only the address that
            # answered as this peer id, none a stale or forged commitment left there
            self._host.get_peerstore().clear_addrs(pid)
            self._host.get_peerstore().add_addrs(pid, [maddr], 120)
        finally:
            done.set()
            del self._dialing[key]

    async def _request(self, target: Target, request, model, *, what: str):
        """Open a stream, send ``request``, parse the answer frame; returns (stream, answer)."""
        import trio
        from libp2p.io.exceptions import IOException

        stream = await self._open(target)
        try:
            with trio.fail_after(self.cfg.io_timeout_s):
                await stream.write(pack(request))
                raw = await read_frame(stream, MAX_LISTING_BYTES, what=what)
            return stream, parse_response(raw, model, what=what)
        except ProtocolError as e:
            await _reset(stream)
            raise FetchError(e.reason, f"{target.peer_id[:12]}: {e}") from None
        except trio.TooSlowError:
            await _reset(stream)
            raise FetchError(
                "timeout", f"{target.peer_id[:12]}: {what} took over {self.cfg.io_timeout_s:.0f}s"
            ) from None
        except IOException as e:
            await _reset(stream)
            raise FetchError("stream_error", f"{target.peer_id[:12]}: {what}: {_first_line(e)}") from None
        except trio.Cancelled:  # the round's deadline: do not leave the stream open for the remote to fill
            await _abort(stream)
            raise

    async def _adialback(self, target: Target, addrs: list[str]):
        from peer.net.artifact_protocol import DialbackRequest, DialbackResponse

        stream, resp = await self._request(
            target, DialbackRequest(op="dialback", addrs=list(addrs)), DialbackResponse, what="dial-back"
        )
        await _finish(stream)
        return resp

    async def _astats(self, target: Target) -> dict[str, int]:
        stream, resp = await self._request(target, StatsRequest(op="stats"), StatsResponse, what="stats")
        await _finish(stream)
        return dict(resp.counters)

    async def aexplanation(self, target: Target, round_: int | None = None):
        from peer.net.artifact_protocol import ExplainRequest, ExplainResponse
        from peer.net.explanations import verify_explanation

        stream, resp = await self._request(
            target, ExplainRequest(op="explain", round=round_), ExplainResponse, what="explanation"
        )
        await _finish(stream)
        if resp.identity is not None:
            verify_identity(
                resp.identity, hotkey=target.hotkey, peer_id=target.peer_id, run_id=self.cfg.run_id
            )
        elif self.cfg.require_identity:
            raise FetchError(
                "no_identity", f"{target.peer_id[:12]} serves no signed identity record for {target.hotkey}"
            )
        if resp.explanation is None:
            return resp.rounds, None
        try:
            return resp.rounds, verify_explanation(
                resp.explanation,
                hotkey=target.hotkey,
                peer_id=target.peer_id,
                run_id=self.cfg.run_id,
                round_=round_,
            )
        except RecordError as e:
            raise FetchError("bad_explanation", str(e)) from None

    async def alist_round(self, target: Target, round_: int | None) -> RoundListing:
        stream, resp = await self._request(
            target, ListRequest(op="list", round=round_), ListResponse, what="listing"
        )
        await _finish(stream)
        cfg = self.cfg
        identity = None
        if resp.identity is not None:
            identity = verify_identity(
                resp.identity, hotkey=target.hotkey, peer_id=target.peer_id, run_id=cfg.run_id
            )
        elif cfg.require_identity:
            raise FetchError(
                "no_identity", f"{target.peer_id[:12]} serves no signed identity record for {target.hotkey}"
            )
        kw = dict(hotkey=target.hotkey, peer_id=target.peer_id, run_id=cfg.run_id, round_=round_)
        return RoundListing(
            peer_id=target.peer_id,
            hotkey=target.hotkey,
            identity=identity,
            rounds=resp.rounds,
            state_rounds=resp.state_rounds,
            contribution=verify_manifest(
                resp.contribution, ContributionManifest, max_blob_bytes=cfg.max_bytes("contribution"), **kw
            )
            if resp.contribution and round_ is not None
            else None,
            state=verify_manifest(resp.state, StateManifest, max_blob_bytes=cfg.max_bytes("state"), **kw)
            if resp.state and round_ is not None
            else None,
        )

    async def afetch(self, target: Target, round_: int, kind: str = "contribution") -> Fetched:
        if kind not in ("contribution", "state"):
            raise ConfigError(f"kind {kind!r} must be 'contribution' or 'state'")
        listing = await self.alist_round(target, round_)
        manifest = listing.contribution if kind == "contribution" else listing.state
        if manifest is None:
            have = listing.rounds if kind == "contribution" else listing.state_rounds
            raise FetchError(
                "missing",
                f"{target.peer_id[:12]} has no {kind} for round {round_} (it has rounds {have[-8:] or 'none'})",
            )
        path = await self.afetch_blob(target, manifest.blob, round_=round_, kind=kind)
        return Fetched(manifest=manifest, path=path, sha256=manifest.blob.sha256, size=manifest.blob.size)

    async def afetch_blob(
        self, target: Target, blob: BlobRef, *, round_: int | None = None, kind: str | None = None
    ) -> Path:
        """Stream ``blob`` into the cache, verifying size and sha256 as it arrives, within its deadline."""
        import trio
        from libp2p.io.exceptions import IOException

        limit = self.cfg.max_bytes(kind) if kind is not None else self.cfg.max_blob_bytes
        if blob.size > limit:
            raise FetchError("too_large", f"{kind or 'blob'} of {blob.size} bytes > limit {limit}")
        final = self.cfg.cache_dir / f"{blob.sha256}.safetensors"
        if final.exists() and final.stat().st_size == blob.size:
            return final  # only verified blobs are ever renamed to their hash
        stream, header = await self._request(
            target,
            FetchRequest(op="fetch", sha256=blob.sha256, round=round_, kind=kind),
            FetchHeader,
            what="blob header",
        )
        who = target.peer_id[:12]
        if header.size != blob.size:
            await _reset(stream)
            raise FetchError(
                "size_mismatch",
                f"{who}: blob {blob.sha256[:12]} is {header.size} bytes, manifest says {blob.size}",
            )
        tmp = self.cfg.cache_dir / f".{blob.sha256}.{os.getpid()}.{threading.get_ident()}.{id(stream)}.tmp"
        got = 0
        budget = self.cfg.deadline_s(blob.size)
        deadline = time.monotonic() + budget
        writer = _HashingWriter(tmp)
        try:
            await _widen_receive_window(stream, self.cfg.receive_window_bytes)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FetchError(
                        "too_slow",
                        f"{who}: blob {blob.sha256[:12]} got {got} of {blob.size} bytes in {budget:.0f}s "
                        f"(< {self.cfg.min_throughput_bytes_s / 1024:.0f} KiB/s)",
                    )
                with trio.fail_after(min(self.cfg.io_timeout_s, left)):
                    chunk = await read_frame(stream, self.cfg.max_chunk_bytes, what="blob chunk")
                if not chunk:
                    break
                got += len(chunk)
                if got > blob.size:
                    raise FetchError(
                        "oversized", f"{who}: blob {blob.sha256[:12]} runs past its {blob.size} bytes"
                    )
                await writer.put(chunk)
            if got != blob.size:
                raise FetchError(
                    "truncated", f"{who}: blob {blob.sha256[:12]} ended at {got} of {blob.size} bytes"
                )
            digest = await trio.to_thread.run_sync(writer.finish)
            if digest != blob.sha256:
                raise FetchError(
                    "hash_mismatch",
                    f"{who}: blob's sha256 is {digest[:12]}, manifest says {blob.sha256[:12]}",
                )
            check_safetensors(tmp, got, kind=kind or "state", layout=self.cfg.layout(kind) if kind else None)
            os.replace(tmp, final)
        except ProtocolError as e:
            await _reset(stream)
            raise FetchError(e.reason, f"{who}: {e}") from None
        except trio.TooSlowError:
            await _reset(stream)
            if time.monotonic() >= deadline:
                raise FetchError(
                    "too_slow", f"{who}: blob got {got} of {blob.size} bytes in its {budget:.0f}s deadline"
                ) from None
            raise FetchError(
                "stalled", f"{who}: blob stalled for {self.cfg.io_timeout_s:.0f}s at {got} bytes"
            ) from None
        except IOException as e:
            await _reset(stream)
            raise FetchError(
                "stream_error", f"{who}: blob transfer failed at {got} bytes: {_first_line(e)}"
            ) from None
        except FetchError:
            await _reset(stream)
            raise
        except trio.Cancelled:  # the round's deadline (or a won race): reset, or the remote may fill the
            await _abort(stream)  # stream's 16 MiB window and keep it for the connection's life
            raise
        finally:
            writer.close()
            tmp.unlink(missing_ok=True)
        await _finish(stream)
        return final


class _HashingWriter:
    """sha256 + write of a blob's chunks in a worker thread, so the trio loop keeps receiving meanwhile
    (hashlib and file writes release the GIL). Holds at most ``depth`` chunks in flight."""

    def __init__(self, path: Path, depth: int = 8):
        self._q: queue.Queue[bytes | None] = queue.Queue(maxsize=depth)
        self._fh = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._h = hashlib.sha256()
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="gradswarm-fetch-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._q.get()) is not None:
            if self._error is None:
                try:
                    self._h.update(chunk)
                    self._fh.write(chunk)
                except OSError as e:
                    self._error = e

    async def put(self, chunk: bytes) -> None:
        import trio

        if self._q.full():  # one producer: only the worker empties the queue, so this cannot race
            await trio.to_thread.run_sync(self._q.put, chunk)
        else:
            self._q.put_nowait(chunk)

    def finish(self) -> str:
        """Wait for every chunk, fsync; the hex sha256 (blocking: call from a thread)."""
        self._stop()
        if self._error is not None:
            raise FetchError("disk_error", f"cannot write the blob to the cache: {self._error}")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        return self._h.hexdigest()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()

    def close(self) -> None:
        self._stop()
        self._fh.close()


async def _widen_receive_window(stream, nbytes: int) -> None:
    """Grant the sender a ``nbytes`` yamux window on this stream right away.

    py-libp2p 0.8 starts every stream at yamux's 256 KiB and its sender polls every 10 ms while the
    window is exhausted, which caps a bulk transfer at a fraction of what the link does; its receive
    auto-tuning grows the window only slowly. A receiver may grant more at any time (yamux spec), so for
    blob streams we do it up front. Streams of other muxers are left alone.
    """
    from libp2p.stream_muxer.yamux.yamux import MAX_WINDOW_SIZE, YamuxStream

    muxed = stream.muxed_stream
    if not isinstance(muxed, YamuxStream):
        return
    target = min(nbytes, MAX_WINDOW_SIZE)
    async with muxed.window_lock:
        grant = target - muxed.recv_window
        if grant <= 0:
            return
        muxed.target_recv_window = max(muxed.target_recv_window, target)
        muxed.recv_window += grant
    await muxed.send_window_update(grant)


def _live(connections) -> bool:
    return any(not getattr(c, "is_closed", False) for c in connections)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _mentions_mismatch(e: BaseException, depth: int = 0) -> bool:
    """Whether a dial failed because the remote's key is not the peer id we asked for (noise check)."""
    if depth > 12:
        return False
    if "Mismatch" in type(e).__name__ or "mismatch" in str(e).lower():
        return True
    nested: list[BaseException] = []
    if isinstance(e, BaseExceptionGroup):
        nested += list(e.exceptions)
    for arg in e.args:  # py-libp2p's MultiError carries its errors as a list argument
        if isinstance(arg, list):
            nested += [x for x in arg if isinstance(x, BaseException)]
    nested += [x for x in (e.__cause__, e.__context__) if x is not None]
    return any(_mentions_mismatch(x, depth + 1) for x in nested)


async def _close(stream) -> None:
    from libp2p.io.exceptions import IOException

    try:
        await stream.close()
    except IOException:
        pass


async def _reset(stream) -> None:
    from libp2p.io.exceptions import IOException

    try:
        await stream.reset()
    except IOException:
        pass


async def _finish(stream) -> None:
    """End a stream whose answer was read in full (one request per stream): FIN, then a reset if the
    publisher has not ended its side. A remote that never does would otherwise keep the stream — and up
    to its receive window of bytes it pushes into it — for the life of the (reused) connection."""
    await _close(stream)
    if not getattr(getattr(stream, "muxed_stream", None), "recv_closed", True):
        await _reset(stream)


async def _abort(stream) -> None:
    """Reset ``stream`` while the calling task is being cancelled (shielded, at most 2 s)."""
    import trio

    with trio.CancelScope(shield=True), trio.move_on_after(2):
        await _reset(stream)


__all__ = [
    "FetchClient",
    "FetchConfig",
    "FetchError",
    "Fetched",
    "RoundListing",
    "Target",
    "check_safetensors",
    "verify_identity",
    "verify_manifest",
]
