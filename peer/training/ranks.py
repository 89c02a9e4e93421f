"""The ranks of one multi-rank peer: this process is rank 0, ranks 1..N−1 are its child processes.

``peer join --nproc-per-node N`` starts N−1 copies of ``python -m peer.training.ranks`` with a JSON
spec (what torchrun passes in RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT), meets them through a
``TCPStore`` on 127.0.0.1 that rank 0 opens on a free port, and forms one process group: NCCL for CUDA
tensors with gloo for CPU ones on GPUs, gloo alone on CPUs. Rank i uses ``cuda:i`` (or the CPU).

A peer is one unit, up or down:

* rank 0 dies (any signal, SIGKILL included): each child asked the kernel for SIGTERM on its
  parent's death (``PR_SET_PDEATHSIG``), and a child whose parent is already gone exits at start.
* a child dies: rank 0's next collective with it fails (gloo: at once, on the closed connection; the
  trainer issues one every inner step and at every round's start and end, so at the latest after the
  all-reduce in flight); ``peer join`` then stops its trainer, averager, DHT and publisher the usual
  way and exits with one line naming the rank (:class:`RankError`, from the watchdog thread's record of
  which child died and how). On GPUs the watchdog also aborts the NCCL communicators, whose
  collectives would otherwise wait for the group timeout. No exception is ever injected into the main
  thread: an asynchronous one could land in the middle of the cleanup and skip part of it. Files are only ever written by rank 0, to temp files then renamed, so nothing
  is torn; the next ``peer join`` resumes from the checkpoint, with any N.
* Ctrl-C reaches the whole terminal process group: children ignore SIGINT and are stopped by rank 0
  (a "stop" command after a clean finish, SIGTERM then SIGKILL otherwise).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import torch

from peer.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from peer.errors import ConfigError, UserError

log = logging.getLogger("gradswarm.ranks")


class RankError(UserError):
    """A rank of this peer died or could not start; the whole peer stopped."""

    exit_code = 3


def default_nproc(device: str) -> int:
    """Every visible GPU for ``--device cuda``; 1 for a CPU or one named GPU (``cuda:i``)."""
    if device == "cuda" and torch.cuda.is_available():
        return max(1, torch.cuda.device_count())
    return 1


def check_nproc(nproc: int, device: str, batch_size: int) -> None:
    """Refuse what cannot run, before anything starts (one line, what to change)."""
    if nproc < 1:
        raise ConfigError(f"--nproc-per-node must be >= 1, got {nproc}")
    if nproc > 1 and device.startswith("cuda"):
        if device != "cuda":
            raise ConfigError(
                f"--device {device} names one GPU; use --device cuda with --nproc-per-node {nproc}"
            )
        if nproc > torch.cuda.device_count():
            raise ConfigError(
                f"--nproc-per-node {nproc}: only {torch.cuda.device_count()} GPU(s) visible (one rank per GPU)"
            )
    if nproc > batch_size:
        raise ConfigError(
            f"--nproc-per-node {nproc} > train.batch_size {batch_size}: every rank needs a row of each batch "
            "(raise --batch-size or lower --nproc-per-node)"
        )


def group_timeout(run: RunConfig) -> timedelta:
    """How long a rank waits in a collective: ranks 1..N−1 wait for rank 0's next command through a
    whole round, its all-reduce and a state download."""
    t = run.train
    return timedelta(seconds=max(1800.0, 2 * t.round_seconds + 2 * t.averaging_timeout + 600))


def run_config_to_json(run: RunConfig) -> dict:
    return dataclasses.asdict(run)


def run_config_from_json(raw: dict) -> RunConfig:
    return RunConfig(
        name=raw["name"],
        model=ModelConfig(**raw["model"]),
        data=DataConfig(**raw["data"]),
        train=TrainConfig(**raw["train"]),
    )


class PeerRanks:
    """Rank 0's handle on the peer's process group and its child ranks."""

    def __init__(self, *, world: int, device: torch.device, mesh, children: list[subprocess.Popen]):
        self.world = world
        self.device = device
        self.mesh = mesh
        self.children = children
        self.rank = 0
        self.failure: str | None = None
        """Why the peer stopped: which rank died, how (set by the watchdog)."""
        self._closing = False
        self._lock = threading.Lock()
        self._watchdog = threading.Thread(target=self._watch, name="gradswarm-ranks", daemon=True)
        self._watchdog.start()

    @classmethod
    def start(
        cls,
        run: RunConfig,
        *,
        nproc: int,
        device: str,
        optimizer: str,
        threads: int | None,
        start_timeout: float = 300.0,
    ) -> PeerRanks:
        """Start ranks 1..nproc−1 and form the process group with them (this process is rank 0)."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        timeout = group_timeout(run)
        store = dist.TCPStore(
            "127.0.0.1", 0, world_size=nproc, is_master=True, wait_for_workers=False, timeout=timeout
        )
        spec = {
            "world": nproc,
            "port": store.port,
            "parent": os.getpid(),
            "device": device,
            "optimizer": optimizer,
            "threads": threads,
            "run": run_config_to_json(run),
        }
        children = []
        try:
            for rank in range(1, nproc):
                children.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "peer.training.ranks",
                            "--rank",
                            str(rank),
                            "--spec",
                            json.dumps(spec),
                        ],
                        stdin=subprocess.DEVNULL,
                    )
                )
            _wait_ready(store, children, start_timeout)
            backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"
            dev = torch.device("cuda:0") if device.startswith("cuda") else torch.device("cpu")
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group(backend, store=store, rank=0, world_size=nproc, timeout=timeout)
            mesh = init_device_mesh(dev.type, (nproc,))
        except BaseException:
            _stop_children(children)
            raise
        log.info("peer ranks: %d (%s), children %s", nproc, backend, [c.pid for c in children])
        return cls(world=nproc, device=dev, mesh=mesh, children=children)

    def _dead(self) -> str | None:
        for rank, child in enumerate(self.children, start=1):
            code = child.poll()
            if code is not None:
                how = f"signal {-code}" if code < 0 else f"exit code {code}"
                return f"rank {rank} (pid {child.pid}) died ({how})"
        return None

    def _watch(self) -> None:
        while True:
            with self._lock:
                if self._closing:
                    return
                self.failure = self._dead()
                if self.failure is not None:
                    log.error("%s: stopping the peer at its next command to its ranks", self.failure)
                    self._abort_nccl()
                    return
            time.sleep(0.5)

    def _abort_nccl(self) -> None:
        """A NCCL collective with a dead rank waits for the group timeout: abort it so it fails now (gloo
        fails by itself). Untested here (no GPU); uses torch's private ``_abort_process_group``."""
        import torch.distributed as dist

        if self.device.type != "cuda":
            return
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is None:
            log.warning("this torch cannot abort NCCL: the peer stops when the group times out")
            return
        try:
            abort()
        except RuntimeError as e:
            log.warning("aborting NCCL failed (%s): the peer stops when the group times out", e)

    def error(self) -> RankError | None:
        """Called as the peer stops on an exception: the rank that died, if one did (None: it was not a rank,
        e.g. Ctrl-C). A collective with a dead rank can fail before the child's exit shows: wait up to 2 s."""
        with self._lock:
            self._closing = True
        deadline = time.time() + 2.0
        while self.failure is None and time.time() < deadline:
            self.failure = self._dead()
            if self.failure is None:
                time.sleep(0.1)
        if self.failure is None:
            return None
        return RankError(
            f"{self.failure}; the peer stopped. Run `peer join` again to resume from its checkpoint"
        )

    def close(self, *, clean: bool, stop=None) -> None:
        """Stop the child ranks: ``stop()`` (the "stop" command) after a clean finish, else SIGTERM/SIGKILL."""
        import torch.distributed as dist

        with self._lock:
            self._closing = True
        if clean and self.failure is None and stop is not None:
            try:
                stop()
                for c in self.children:
                    c.wait(timeout=30)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                log.warning("ranks did not stop on command (%s): terminating them", e)
        _stop_children(self.children)
        if clean and self.failure is None and dist.is_initialized():
            dist.destroy_process_group()


def _wait_ready(store, children: list[subprocess.Popen], timeout: float) -> None:
    keys = [f"ready/{rank}" for rank in range(1, len(children) + 1)]
    deadline = time.time() + timeout
    while not store.check(keys):
        for rank, c in enumerate(children, start=1):
            if c.poll() is not None:
                raise RankError(
                    f"rank {rank} exited with code {c.returncode} while starting (see the log above)"
                )
        if time.time() > deadline:
            raise RankError(f"ranks did not start within {timeout:.0f}s")
        time.sleep(0.1)


def _stop_children(children: list[subprocess.Popen]) -> None:
    for c in children:
        if c.poll() is None:
            c.terminate()
    deadline = time.time() + 10
    for c in children:
        try:
            c.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            c.kill()
            c.wait(timeout=10)


def _die_with_parent(parent: int) -> None:
    """SIGTERM this process when its parent (rank 0) dies; exit now if it already has."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:
        sys.exit(3)


def follower_main(rank: int, spec: dict) -> int:
    """Ranks 1..N−1: join the group, build the sharded model, run rank 0's commands until "stop"."""
    _die_with_parent(spec["parent"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is rank 0's to handle
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(message)s")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from peer.training.fsdp import build_follower

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    run = run_config_from_json(spec["run"])
    world = spec["world"]
    cuda = spec["device"].startswith("cuda")
    device = torch.device(f"cuda:{rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    store = dist.TCPStore(
        "127.0.0.1", spec["port"], world_size=world, is_master=False, timeout=group_timeout(run)
    )
    store.set(f"ready/{rank}", "1")
    dist.init_process_group(
        "cpu:gloo,cuda:nccl" if cuda else "gloo",
        store=store,
        rank=rank,
        world_size=world,
        timeout=group_timeout(run),
    )
    mesh = init_device_mesh(device.type, (world,))
    if spec["optimizer"] == "adamw8bit":
        import bitsandbytes  # noqa: F401 - before CUDA kernels are chosen, as on rank 0
    sharded = build_follower(
        run, optimizer=spec["optimizer"], rank=rank, world=world, device=device, mesh=mesh
    )
    try:
        sharded.serve()
    except RuntimeError as e:  # gloo/NCCL: rank 0 went away mid-collective
        log.error("rank %d: the peer's process group broke (%s); exiting", rank, str(e).splitlines()[0])
        return 3
    dist.destroy_process_group()
    return 0


def _main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m peer.training.ranks",
        description="One follower rank of a multi-rank peer (started by peer join).",
    )
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--spec", required=True, help="JSON from rank 0")
    args = parser.parse_args()
    return follower_main(args.rank, json.loads(args.spec))


if __name__ == "__main__":
    sys.exit(_main())
