"""Child processes of the launcher: each in its own process group, its output in a log file.

Why process groups: a ``peer join`` process spawns a p2pd daemon (hivemind) and a publisher process
(py-libp2p); a validator may spawn helpers too. Each child is the leader of a new session, so one
``killpg`` reaches the whole family, also after the leader itself died. On top of that the launcher
remembers every descendant it ever saw (``/proc`` scan) and kills those that left the group, so nothing
outlives a run. Children also get ``PR_SET_PDEATHSIG`` = SIGTERM: if the launcher itself is killed with
SIGKILL, they stop cleanly instead of running on as orphans.

Stopping is two-phase: SIGTERM to every group at once (peers stop cleanly: publisher, DHT, W&B), wait up
to ``grace`` seconds, then SIGKILL whatever is left. If SIGKILLs show up in the summary, raise ``grace``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux / no glibc: process groups still stop the children with the launcher


def proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) of every process on this machine (Linux /proc)."""
    table: dict[int, tuple[int, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue  # exited while we looked
        rest = stat[stat.rfind(")") + 2 :].split()  # the command name may contain spaces and ')'
        if len(rest) > 3 and rest[0] != "Z":
            table[int(entry.name)] = (int(rest[1]), int(rest[2]))
    return table


def descendants(pid: int, table: dict[int, tuple[int, int]] | None = None) -> set[int]:
    """Live (non-zombie) descendants of ``pid``."""
    table = table if table is not None else proc_table()
    children: dict[int, list[int]] = {}
    for p, (pp, _) in table.items():
        children.setdefault(pp, []).append(p)
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pids: set[int] | list[int]) -> set[int]:
    """Which of ``pids`` are still running (zombies count as gone)."""
    table = proc_table()
    return {p for p in pids if p in table}


def group_members(pgid: int) -> set[int]:
    return {p for p, (_, g) in proc_table().items() if g == pgid}


@dataclass(kw_only=True)
class Child:
    """One launched process (bootstrap, peer or validator)."""

    name: str
    """Display name, also the log file's stem (``peer-0``, ``validator-0``, ``bootstrap``)."""
    role: str
    args: list[str]
    log_path: Path
    env: dict[str, str]
    cwd: Path
    popen: subprocess.Popen | None = None
    started: float = 0.0
    ended: float | None = None
    exit_code: int | None = None
    stopping: bool = False
    """True once the launcher asked it to stop: its exit is then expected, whatever the code."""
    killed: bool = False
    """True if it had to be SIGKILLed after the grace period."""
    seen_pids: set[int] = field(default_factory=set)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_fh:
            self.popen = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.started = time.time()
        self.seen_pids.add(self.popen.pid)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def poll(self) -> int | None:
        """The exit code once it exited (recorded once), else None."""
        if self.popen is None:
            return None
        if self.exit_code is None:
            code = self.popen.poll()
            if code is not None:
                self.exit_code = code
                self.ended = time.time()
        return self.exit_code

    @property
    def running(self) -> bool:
        return self.popen is not None and self.poll() is None

    def remember_descendants(self, table: dict[int, tuple[int, int]]) -> None:
        if self.popen is not None:
            self.seen_pids |= descendants(self.popen.pid, table)

    def signal_group(self, sig: int) -> None:
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def leftovers(self) -> set[int]:
        """Processes of this child (its group, or descendants seen earlier) that still run."""
        if self.popen is None:
            return set()
        return alive(self.seen_pids | group_members(self.popen.pid))

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(log {self.log_path} unreadable: {e})"
        return "\n".join(text.rstrip().splitlines()[-lines:])


def stop_all(children: list[Child], grace: float) -> None:
    """SIGTERM every child's group, wait up to ``grace`` s, SIGKILL what is left (groups and strays)."""
    table = proc_table()
    for c in children:
        c.remember_descendants(table)
    for c in children:
        if c.popen is not None and (c.running or c.leftovers()):
            c.stopping = True
            c.signal_group(signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and any(c.running or c.leftovers() for c in children):
        time.sleep(0.2)
    for c in children:
        rest = c.leftovers()
        if c.running or rest:
            c.killed = c.killed or c.running
            c.signal_group(signal.SIGKILL)
            for pid in rest:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
    for c in children:
        if c.popen is not None:
            try:
                c.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            c.poll()
