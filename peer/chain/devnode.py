"""Run the real subtensor runtime locally: a Chopsticks node from the ``../shared/chain`` kit.

Used by the chain tests (tests/fixtures_chain.py), ``benchmarks/chain.py`` and local demos that want
the real runtime instead of the LocalLedger. The kit folder may be read-only: it is copied into
``CHOPSTICKS_HOME`` (default ``.cache/chopsticks`` in the repository) and ``npm ci``-installed there
once by the kit's ``start.sh install`` (~100 s). The node listens on 127.0.0.1 only, on a free port,
and is started with PR_SET_PDEATHSIG so it dies with the process that started it.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KIT = Path(os.environ.get("GRADSWARM_CHAIN_KIT", REPO.parent / "shared" / "chain"))
CHOPSTICKS_HOME = Path(os.environ.get("GRADSWARM_CHOPSTICKS_HOME", REPO / ".cache" / "chopsticks"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pdeathsig() -> None:  # runs in the child: die with the parent (pytest), even on SIGKILL of pytest
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def kit_problem() -> str | None:
    if not (KIT / "start.sh").exists():
        return f"chain kit not found at {KIT} (../shared/chain)"
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            return f"{tool} not found: install Node.js >= 20 to run the chain tests"
    return None


@dataclass
class ChopsticksNode:
    url: str
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_chopsticks(name: str = "pytest", timeout: float = 120.0) -> ChopsticksNode:
    """Install the kit if needed (idempotent), start one node on a free loopback port, wait for it.

    ``name`` names the log file in CHOPSTICKS_HOME. Call ``.stop()`` when done (also on failure)."""
    env = {**os.environ, "CHOPSTICKS_HOME": str(CHOPSTICKS_HOME)}
    r = subprocess.run(
        [str(KIT / "start.sh"), "install"], env=env, capture_output=True, text=True, timeout=600
    )
    if r.returncode != 0:
        raise RuntimeError(f"chopsticks install failed: {r.stderr.strip()[-2000:]}")
    port = _free_port()
    log = CHOPSTICKS_HOME / f"{name}-{os.getpid()}.log"
    binary = CHOPSTICKS_HOME / "node_modules/@acala-network/chopsticks/chopsticks.cjs"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                "node",
                str(binary),
                "--config=localnet.yml",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--max-memory-block-count",
                "5000",
            ],
            cwd=CHOPSTICKS_HOME,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_pdeathsig,
        )
    node = ChopsticksNode(url="", proc=proc, log=log)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"chopsticks exited during startup:\n{log.read_text()[-3000:]}")
            m = re.search(r"ws://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
            if m:
                node.url = m.group(0)
                return node
            time.sleep(0.1)
        raise RuntimeError(f"chopsticks did not listen within {timeout}s:\n{log.read_text()[-3000:]}")
    except BaseException:
        node.stop()
        raise
