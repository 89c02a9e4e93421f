"""CPU spent by everything of a peer that is not training, measured over the inner-step phase, and the
peer's peak memory (:func:`peak_rss_mb`).

A peer is several processes: the trainer (its training thread plus helper threads: background writer,
matchmaking timer, hivemind's state-sharing thread), the hivemind DHT process and its ``p2pd`` daemon,
the averager process, and the publisher. :class:`BackgroundCpu` snapshots the CPU time (user + system)
of each of them, and of each trainer thread, at the start and the end of a round's inner steps; the
difference for everything but the training thread is the *background* cost of the peer while it trains
(README, "How a round works": the target is ≤ 5 % of one core in total).
"""

from __future__ import annotations

import threading
import time

import psutil


def _proc_cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


class BackgroundCpu:
    """Per-process (and per-thread, for the trainer) CPU seconds between :meth:`start` and :meth:`stop`.

    ``labels`` maps known child pids to names (``dht``, ``averager``, ``publisher``); other descendants
    are labelled by process name (``p2pd``). Call both methods from the training thread.
    """

    def __init__(self, labels: dict[int, str]):
        self.labels = dict(labels)
        self.me = psutil.Process()
        self._start: dict[str, float] | None = None
        self._t0 = 0.0
        self._train_tid = threading.get_native_id()

    def _sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        train_tid = self._train_tid
        other = 0.0
        for th in self.me.threads():
            if th.id != train_tid:
                other += th.user_time + th.system_time
        out["trainer-other-threads:0"] = other
        for child in self.me.children(recursive=True):
            try:
                name = self.labels.get(child.pid) or child.name()
                key = f"{name}:{child.pid}"
                out[key] = _proc_cpu(child)
            except psutil.Error:
                continue
        return out

    def start(self) -> None:
        self._train_tid = threading.get_native_id()
        self._start = self._sample()
        self._t0 = time.monotonic()

    def stop(self) -> tuple[float, dict[str, float]]:
        """Seconds since :meth:`start`, and CPU seconds per process spent in that time (≥ 0)."""
        assert self._start is not None, "start() first"
        end = self._sample()
        wall = time.monotonic() - self._t0
        used: dict[str, float] = {}
        for key, value in end.items():
            name = key.rsplit(":", 1)[0]
            used[name] = used.get(name, 0.0) + max(0.0, value - self._start.get(key, 0.0))
        self._start = None
        return wall, {k: round(v, 4) for k, v in used.items()}


def peak_rss_mb() -> float:
    """Peak RSS of this process plus the unique memory (USS) of its children (the averager), MiB."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = 0.0
    for child in psutil.Process().children(recursive=False):
        try:
            children += child.memory_full_info().uss / 2**20  # unique: the fork shares pages
        except psutil.Error:
            pass
    return own + children
