"""A bandwidth lab: hosts in Linux network namespaces behind one bridge, each link capped with ``tc tbf``.

::

    with NetLab(["bootstrap", "peer-0", "peer-1"], rate_mbit={"peer-0": 20, "peer-1": 20}) as lab:
        proc = subprocess.Popen(lab.wrap("peer-0", ["python", "-m", "peer.cli", "join", ...]))
        lab.addr("bootstrap")          # 10.213.0.2: only reachable from inside the lab
        lab.measure_mbit("peer-0", "bootstrap")   # a TCP transfer through the caps, Mbit/s

Layout: a *hub* namespace holds a bridge ``br0``; every host gets its own namespace with one veth pair
into the bridge (``gs0`` on the host side, ``p<i>`` on the hub side) and an address from
``10.213.0.0/24`` that exists only inside these namespaces, so nothing touches the machine's own
interfaces and no lab traffic can leave the machine. A capped host has a ``tbf`` qdisc on both ends of
its link: egress of ``gs0`` (its upload) and egress of ``p<i>`` in the hub (its download). Commands run
in a host with ``ip netns exec <ns> …`` (:meth:`NetLab.wrap`).

What this cannot emulate: latency, jitter and loss (the kernel here has no ``netem``), NAT and
firewalls (no iptables/nft). Only bandwidth.

Cleanup: namespace names carry the creating process's pid (``gsw<pid>-<n>…``), so concurrent labs do not
collide. Leaving the ``with`` block — normally, on an exception, on KeyboardInterrupt, or on SIGTERM
(turned into SystemExit while the lab is open) — kills what :meth:`NetLab.spawn` started and deletes
every namespace (their veths go with them). A lab whose owner was SIGKILLed is removed by the next lab
that starts (:func:`cleanup_stale`), or by ``python -m launch.netlab cleanup``.

Needs root and iproute2; :func:`lab_unavailable` says in one line why a lab cannot run here.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

PREFIX = "gsw"
"""Namespace name prefix; names are ``gsw<pid>-<n>hub`` and ``gsw<pid>-<n>h<i>`` (n-th lab of the process)."""
SUBNET = "10.213.0"
"""The lab's /24. Addresses exist only inside the lab's namespaces."""
_NAME = re.compile(rf"^{PREFIX}(\d+)-[A-Za-z0-9]+$")


class LabError(RuntimeError):
    """Setting up the lab failed (the message carries the failing command and its stderr)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def _tc(*args: str) -> None:
    proc = subprocess.run(["tc", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LabError(f"`tc {' '.join(args)}` failed: {proc.stderr.strip()}")


def list_namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def lab_unavailable() -> str | None:
    """None if a lab can run on this machine, else one line saying why not (for a pytest skip)."""
    if os.name != "posix" or not sys.platform.startswith("linux"):
        return "the bandwidth lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the bandwidth lab needs root (ip netns, veth, tc): run as root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"the bandwidth lab needs iproute2 ({', '.join(missing)} not found): apt-get install iproute2"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
        link = _ip("-n", probe, "link", "add", "d0", "type", "veth", "peer", "name", "d1", check=False)
        if link.returncode != 0:
            return f"cannot create links in a network namespace: {link.stderr.strip()}"
        tbf = subprocess.run(
            ["tc", "-n", probe, "qdisc", "add", "dev", "d0", "root", "tbf"]
            + ["rate", "20mbit", "burst", "32kbit", "latency", "100ms"],
            capture_output=True,
            text=True,
        )
        if tbf.returncode != 0:
            return f"`tc qdisc … tbf` is not available: {tbf.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> list[str]:
    """Delete lab namespaces whose creating process is gone; returns their names."""
    removed = []
    for ns in list_namespaces():
        m = _NAME.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            _ip("netns", "del", ns, check=False)
            removed.append(ns)
    return removed


@dataclass(kw_only=True)
class LinkShape:
    """A ``tbf`` cap on one host's link, applied in both directions."""

    rate_mbit: float
    """Link rate in Mbit/s (10^6 bit/s), each direction."""
    latency_ms: float = 100.0
    """tbf's queue bound: the longest a packet may wait in the queue (not added delay: no netem here)."""

    def __post_init__(self) -> None:
        if not self.rate_mbit > 0:
            raise ValueError(f"rate_mbit must be > 0, got {self.rate_mbit}")

    def tbf_args(self) -> list[str]:
        rate_bytes = self.rate_mbit * 1e6 / 8
        burst = max(int(rate_bytes / 100), 8 * 1514)  # ~10 ms of traffic, at least a few full frames
        return [
            "tbf",
            "rate",
            f"{self.rate_mbit}mbit",
            "burst",
            str(burst),
            "latency",
            f"{self.latency_ms}ms",
        ]


class NetLab:
    """Namespaces, bridge, veths and caps for ``hosts``; a context manager that always cleans up."""

    _count = 0

    def __init__(self, hosts: Sequence[str], rate_mbit: Mapping[str, float | None] | float | None = None):
        if len(set(hosts)) != len(hosts) or not hosts:
            raise ValueError("hosts must be distinct names")
        if len(hosts) > 250:
            raise ValueError("at most 250 hosts")
        self.hosts = list(hosts)
        if not isinstance(rate_mbit, Mapping):
            rate_mbit = dict.fromkeys(hosts, rate_mbit)
        unknown = set(rate_mbit) - set(hosts)
        if unknown:
            raise ValueError(f"rate for unknown host(s) {sorted(unknown)}")
        self.shapes = {h: LinkShape(rate_mbit=r) for h, r in rate_mbit.items() if r is not None}
        NetLab._count += 1  # two labs of one process get different names too
        tag = f"{PREFIX}{os.getpid()}-{NetLab._count}"
        self.hub = f"{tag}hub"
        self.ns = {h: f"{tag}h{i}" for i, h in enumerate(self.hosts)}
        self._addr = {h: f"{SUBNET}.{i + 2}" for i, h in enumerate(self.hosts)}
        self._created: list[str] = []
        self._children: list[subprocess.Popen] = []
        self._old_sigterm = None

    # -- lifecycle ----------------------------------------------------------------------------------

    def __enter__(self) -> NetLab:
        cleanup_stale()
        self._trap_sigterm()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _trap_sigterm(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def on_term(signum, frame):
            raise SystemExit(128 + signum)

        self._old_sigterm = signal.signal(signal.SIGTERM, on_term)

    def _build(self) -> None:
        self._add_ns(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts):
            ns, port = self.ns[host], f"p{i}"
            self._add_ns(ns)
            _ip("link", "add", "gs0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.hub)
            _ip("-n", self.hub, "link", "set", port, "master", "br0")
            _ip("-n", self.hub, "link", "set", port, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{self._addr[host]}/24", "dev", "gs0")
            _ip("-n", ns, "link", "set", "gs0", "up")
            shape = self.shapes.get(host)
            if shape is not None:
                _tc("-n", ns, "qdisc", "add", "dev", "gs0", "root", *shape.tbf_args())  # upload
                _tc("-n", self.hub, "qdisc", "add", "dev", port, "root", *shape.tbf_args())  # download

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)

    def close(self) -> None:
        """Kill what :meth:`spawn` started, delete every namespace (their links go with them). Idempotent."""
        for child in self._children:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._children.clear()
        for ns in reversed(self._created):
            _ip("netns", "del", ns, check=False)
        self._created.clear()
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    # -- using it -----------------------------------------------------------------------------------

    def addr(self, host: str) -> str:
        """The host's IPv4 address inside the lab."""
        return self._addr[host]

    def wrap(self, host: str, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.ns[host], *argv]

    def spawn(self, host: str, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """Start ``argv`` in ``host`` in its own process group; killed (the group) when the lab closes."""
        popen_kwargs.setdefault("start_new_session", True)
        child = subprocess.Popen(self.wrap(host, argv), **popen_kwargs)
        self._children.append(child)
        return child

    def qdisc_stats(self, host: str) -> str:
        """``tc -s qdisc`` of the host's side of its link (sent bytes, drops, overlimits)."""
        return subprocess.run(
            ["tc", "-n", self.ns[host], "-s", "qdisc", "show", "dev", "gs0"], capture_output=True, text=True
        ).stdout

    def measure_mbit(self, src: str, dst: str, seconds: float = 3.0, port: int = 5201) -> float:
        """Goodput of one TCP stream from ``src`` to ``dst`` (Mbit/s, measured by the receiver)."""
        recv = self.spawn(
            dst,
            [sys.executable, "-c", _RECEIVER, self.addr(dst), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 10
        send = None
        while time.time() < deadline:
            send = subprocess.run(
                self.wrap(src, [sys.executable, "-c", _SENDER, self.addr(dst), str(port), str(seconds)]),
                capture_output=True,
                text=True,
            )
            if send.returncode == 0:
                break
            time.sleep(0.2)  # receiver not listening yet
        if send is None or send.returncode != 0:
            raise LabError(f"TCP probe {src}→{dst} failed: {send.stderr.strip() if send else 'no attempt'}")
        out, err = recv.communicate(timeout=seconds + 15)
        if recv.returncode != 0:
            raise LabError(f"TCP probe receiver in {dst} failed: {err.strip()}")
        return float(out.strip())


_RECEIVER = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); s.settimeout(30)
    c, _ = s.accept(); c.settimeout(30)
    first = c.recv(1 << 16); t0 = time.time(); n = 0
    while True:
        d = c.recv(1 << 16)
        if not d:
            break
        n += len(d)
    print(n * 8 / max(time.time() - t0, 1e-9) / 1e6)
    """
)
_SENDER = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    buf = b"x" * (1 << 16); t0 = time.time()
    while time.time() - t0 < float(sys.argv[3]):
        s.sendall(buf)
    s.close()
    """
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.netlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="say whether a lab can run here")
    sub.add_parser("cleanup", help="delete namespaces left by dead labs")
    probe = sub.add_parser("probe", help="two hosts, measure a TCP transfer under a cap")
    probe.add_argument("--rate-mbit", type=float, default=20.0)
    probe.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.cmd == "check":
        reason = lab_unavailable()
        print(reason or "ok: network namespaces, veth, bridge and tc tbf work here")
        return 1 if reason else 0
    if args.cmd == "cleanup":
        for ns in cleanup_stale():
            print(f"deleted {ns}")
        return 0
    reason = lab_unavailable()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    with NetLab(["a", "b"], rate_mbit={"a": args.rate_mbit, "b": None}) as lab:
        up = lab.measure_mbit("a", "b", args.seconds)
        down = lab.measure_mbit("b", "a", args.seconds)
    print(f"cap {args.rate_mbit} Mbit/s: a→b {up:.1f} Mbit/s, b→a {down:.1f} Mbit/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["NetLab", "LinkShape", "LabError", "lab_unavailable", "cleanup_stale"]
