"""Artifact plane throughput: the py-libp2p publisher (noise + yamux) vs plain TCP on loopback.

    .venv/bin/python benchmarks/artifact_plane.py [--size-mb 100] [--peers 8] [--peer-mb 12.5] [--repeat 3]

1. One blob of ``--size-mb`` MB (a safetensors file with a signed manifest in a real outbox) fetched
   with :class:`peer.net.fetch.FetchClient` from a publisher process: listing, signature checks, streaming,
   sha256, fsync, rename into the cache. Baseline, same run: a plain-TCP server process sending the same
   file in the same 1 MiB length-prefixed frames to a client that does the same hashing + fsync + rename.
   Ratio = publisher MB/s / TCP MB/s (best of ``--repeat``).
2. One round's contributions (``--peer-mb`` MB each) from ``--peers`` publisher processes, fetched
   concurrently by one client: wall time from the first dial to the last verified file.

Run it on an otherwise idle machine; the client, the server and the hashing share the CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RUN = "bench"
CHUNK = 1 << 20

TCP_SERVER = r"""
import os, socket, struct, sys
path = sys.argv[1]
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(8)
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    with conn, open(path, "rb") as fh:
        conn.recv(64)  # the request: a sha256
        size = os.fstat(fh.fileno()).st_size
        conn.sendall(struct.pack(">Q", size))
        while True:
            data = fh.read(1 << 20)
            conn.sendall(struct.pack(">I", len(data)) + data)
            if not data:
                break
"""


def make_outbox(home: Path, mb: float, seed: int):
    """An outbox with one signed contribution of ~``mb`` MB; returns (outbox, key, peer id, manifest)."""
    import torch
    from safetensors.torch import save
    from substrateinterface import Keypair

    from peer.net.identity import load_or_create_identity
    from peer.net.outbox import Outbox
    from peer.net.records import BlobRef, ContributionManifest

    key = home / "p2p_identity.key"
    pid = load_or_create_identity(key)
    kp = Keypair.create_from_uri("//Alice")
    n = int(mb * 1e6 / 4)
    blob = save({"delta": torch.randn(n, generator=torch.Generator().manual_seed(seed))})
    m = ContributionManifest(
        run_id=RUN, round=1, hotkey=kp.ss58_address, peer_id=pid, base_state_hash="0" * 64,
        data_fingerprint="0" * 64, model_config_name="bench", pages=[0], samples=1, tokens=1, inner_steps=1,
        loss_before=None, loss_after=None,
        blob=BlobRef(name="contribution.safetensors", sha256=hashlib.sha256(blob).hexdigest(), size=len(blob)),
    ).signed(kp)  # fmt: skip
    ob = Outbox(home / "outbox")
    ob.write_contribution(1, blob, json.loads(m.model_dump_json()))
    return ob.root, key, pid, m


def tcp_fetch(port: int, sha: str, cache: Path) -> float:
    """Same work as the libp2p client minus libp2p: frames -> sha256 -> temp file -> fsync -> rename."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(sha.encode())
        f = s.makefile("rb", buffering=1 << 20)
        (size,) = struct.unpack(">Q", f.read(8))
        h = hashlib.sha256()
        tmp = cache / f".{sha}.tmp"
        with open(tmp, "wb") as out:
            while True:
                (n,) = struct.unpack(">I", f.read(4))
                if n == 0:
                    break
                data = f.read(n)
                h.update(data)
                out.write(data)
            out.flush()
            os.fsync(out.fileno())
        assert h.hexdigest() == sha
        os.replace(tmp, cache / f"{sha}.tcp")
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float, default=100.0)
    p.add_argument("--peers", type=int, default=8)
    p.add_argument("--peer-mb", type=float, default=12.5)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--chunk-kb", type=int, default=1024, help="publisher data frame size (KiB)")
    p.add_argument("--skip-round", action="store_true", help="only the single-blob comparison")
    args = p.parse_args()

    from peer.net.fetch import FetchClient, FetchConfig, Target
    from peer.net.publisher import PublisherConfig, quiet_libp2p, start_publisher

    quiet_libp2p()
    work = Path(tempfile.mkdtemp(prefix="gs-bench-"))
    handles, tcp = [], None
    try:
        outbox, key, pid, manifest = make_outbox(work / "big", args.size_mb, 0)
        size = manifest.blob.size
        blob_path = outbox / "rounds" / "1" / "contribution.safetensors"
        from substrateinterface import Keypair

        alice = Keypair.create_from_uri("//Alice")
        chunk = args.chunk_kb << 10
        pcfg = PublisherConfig(chunk_bytes=chunk)
        fcfg = dict(run_id=RUN, max_chunk_bytes=max(chunk, 1 << 20))
        handles.append(start_publisher(outbox, key, cfg=pcfg))
        handles[0].publish_identity(alice, run_id=RUN, round_=1)
        tcp = subprocess.Popen(
            [sys.executable, "-c", TCP_SERVER, str(blob_path)], stdout=subprocess.PIPE, text=True
        )
        port = int(tcp.stdout.readline())
        hotkey = manifest.hotkey

        p2p_times, tcp_times = [], []
        for i in range(args.repeat):
            cache = work / f"cache{i}"
            cache.mkdir()
            tcp_times.append(tcp_fetch(port, manifest.blob.sha256, cache))
            with FetchClient(FetchConfig(cache_dir=cache, **fcfg)) as client:
                t0 = time.perf_counter()
                got = client.fetch_contribution(handles[0].addrs[0], pid, 1, hotkey=hotkey)
                p2p_times.append(time.perf_counter() - t0)
                assert got.size == size
            shutil.rmtree(cache)
        best_p2p, best_tcp = min(p2p_times), min(tcp_times)
        mbps = lambda t: size / t / 1e6  # noqa: E731
        print(f"blob {size / 1e6:.1f} MB, publisher frames of {args.chunk_kb} KiB, best of {args.repeat}")
        print(
            f"  plain TCP   {best_tcp:6.2f} s  {mbps(best_tcp):7.1f} MB/s   (all: {', '.join(f'{t:.2f}' for t in tcp_times)})"
        )
        print(
            f"  publisher   {best_p2p:6.2f} s  {mbps(best_p2p):7.1f} MB/s   (all: {', '.join(f'{t:.2f}' for t in p2p_times)})"
        )
        print(f"  ratio publisher/TCP = {best_tcp / best_p2p:.3f}  (target >= 0.3; 100 MB target < 5 s)")

        if args.skip_round:
            return 0
        # one round from N publishers
        targets = []
        for i in range(args.peers):
            ob, k, peer_id, m = make_outbox(work / f"peer{i}", args.peer_mb, i + 1)
            h = start_publisher(ob, k, cfg=pcfg)
            h.publish_identity(alice, run_id=RUN, round_=1)
            handles.append(h)
            targets.append(Target(addr=h.addrs[0], peer_id=peer_id, hotkey=m.hotkey))
        cache = work / "round"
        cache.mkdir()
        with FetchClient(FetchConfig(cache_dir=cache, **fcfg)) as client:
            t0 = time.perf_counter()
            results = client.fetch_many(targets, 1, "contribution")
            dt = time.perf_counter() - t0
        ok = [r for r in results.values() if not isinstance(r, Exception)]
        total = sum(r.size for r in ok)
        print(
            f"round from {args.peers} publishers: {len(ok)}/{args.peers} verified, {total / 1e6:.1f} MB in "
            f"{dt:.2f} s ({total / dt / 1e6:.1f} MB/s aggregate)"
        )
        if len(ok) != args.peers:
            print("  failures:", [str(r) for r in results.values() if isinstance(r, Exception)])
    finally:
        for h in handles:
            h.stop()
        if tcp is not None:
            tcp.kill()
            tcp.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
