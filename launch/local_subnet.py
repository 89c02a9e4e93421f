"""A whole local subnet in one command: ledger, wallets, bootstrap DHT, peers and validators.

    python -m launch.local_subnet --config launch/demo.yaml
    python -m launch.local_subnet --config launch/demo.yaml --peers 2 --behaviours free-rider,copycat \\
        --validators 1 --rounds 6 --run-dir runs/my-scenario

What it does, in order (everything real, every process separate, all on 127.0.0.1):

1. a run folder (``runs/<name>-<time>`` or ``--run-dir``) holding the ledger, the wallets, every
   process's home and log, ``summary.json`` and ``report.png``;
2. the model config's data prepared once (tokenizer + pages) so peers do not race on it;
3. a LocalLedger subnet (SQLite file, short block time), one unencrypted wallet per participant,
   validators registered and staked (funded by the ledger's dev faucet);
4. a bootstrap DHT (``peer bootstrap``), N ``peer join`` processes (each with its publisher) and M
   ``validator run`` processes;
5. live progress (one row per process; plain lines when stdout is not a terminal) until the validators
   scored ``rounds`` rounds (or, without validators, the peers trained them), then a clean shutdown, the
   table of peers and the report files. Ctrl-C stops everything the same way and keeps a partial summary.

``peers`` counts the honest peers; each entry of ``behaviours`` adds one more peer with that fault
injection (``peer join --behaviour``), a tool to study the incentive mechanism (see peer/training/behaviour.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from launch.config import BEHAVIOURS, REPO, WANDB_MODES, LaunchConfig, load_launch_config
from launch.procs import Child, proc_table, stop_all
from launch.report import (
    History,
    Row,
    build_summary,
    compact_validator_record,
    normalised_weights,
    plain_peer_table,
    read_json,
    render_peer_table,
    update_peer_row,
    write_report_png,
)
from peer.chain.base import ChainError
from peer.errors import ConfigError, UserError, run_cli
from peer.net.outbox import atomic_write_json


# ------------------------------------------------------------------------------------ participants
@dataclass(kw_only=True)
class Participant:
    name: str
    role: str
    behaviour: str
    home: Path
    hotkey: str = ""
    child: Child | None = None
    row: Row | None = None


def child_env(cfg: LaunchConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "WANDB_MODE": cfg.wandb_mode,
            "WANDB_SILENT": "true",
            "HIVEMIND_LOGLEVEL": "WARNING",
        }
    )
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def validator_available() -> bool:
    """Whether this checkout has ``validator run`` (validator/cli.py)."""
    return importlib.util.find_spec("validator.cli") is not None


class LocalSubnet:
    """Sets up and runs one local subnet. ``run()`` returns the process exit code."""

    def __init__(self, cfg: LaunchConfig, *, run_dir: Path, console=None):
        from rich.console import Console

        self.cfg = cfg
        self.run_dir = run_dir
        self.run_id = re.sub(r"[^A-Za-z0-9_-]", "-", run_dir.name)[:64] or "local"
        self.console = console or Console()
        self.tty = self.console.is_terminal
        self.data_dir = (
            Path(cfg.data_dir) if cfg.data_dir else REPO / ".cache" / "data" / Path(cfg.model_config).stem
        )
        self.ledger_path = run_dir / "ledger.sqlite"
        self.wallets = run_dir / "wallets"
        self.env = child_env(cfg)
        self.ledger = None
        self.netuid: int | None = None
        self.participants: list[Participant] = []
        self.bootstrap: Participant | None = None
        self.history = History()
        self.crashed: list[dict] = []
        self.peer_rounds: dict[str, list[dict]] = {}
        self.started = time.time()
        self.status = "starting"
        self.block = 0
        self._last_round_seen: dict[str, int] = {}
        self._stop_reason: str | None = None

    # -------------------------------------------------------------------------------- set-up
    def log(self, message: str, style: str = "") -> None:
        stamp = time.strftime("%H:%M:%S")
        if self.tty:  # Text, not markup: log tails may contain [brackets]
            from rich.text import Text

            self.console.print(Text.assemble((stamp, "dim"), " ", (message, style)), highlight=False)
        else:
            print(f"{stamp} {message}", flush=True)

    def prepare(self) -> None:
        from peer.chain.base import SubnetParams
        from peer.chain.local import LocalLedger
        from peer.chain.wallet import WalletConfig, create_wallet, load_coldkey
        from peer.config import load_run_config
        from peer.data.pages import prepare_data

        run_cfg = load_run_config(self.cfg.model_config)  # checked in run() already: cannot fail here
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs").mkdir(exist_ok=True)
        t = time.time()
        prepare_data(run_cfg.data, self.data_dir)
        self.log(f"data ready in {self.data_dir} ({time.time() - t:.1f}s)")

        self.ledger = LocalLedger(self.ledger_path, block_time=self.cfg.block_time)
        owner_cfg = WalletConfig(name="owner", hotkey="default", path=str(self.wallets), create=True)
        create_wallet(owner_cfg)
        owner = load_coldkey(owner_cfg)
        self.netuid = self.ledger.create_subnet(owner, SubnetParams(burn=0, tempo=self.cfg.tempo))
        self.log(f"ledger {self.ledger_path}: subnet {self.netuid}, block time {self.cfg.block_time}s")

        for i, behaviour in enumerate(self.cfg.peer_behaviours):
            name = f"peer-{i}"
            self.participants.append(
                Participant(name=name, role="peer", behaviour=behaviour, home=self.run_dir / "peers" / name)
            )
        for i in range(self.cfg.validators):
            name = f"validator-{i}"
            self.participants.append(
                Participant(
                    name=name, role="validator", behaviour="", home=self.run_dir / "validators" / name
                )
            )
        from peer.chain.base import RAO_PER_TAO

        stake = int(self.cfg.validator_stake_tao * RAO_PER_TAO)
        for p in self.participants:
            wcfg = WalletConfig(name=p.name, hotkey="default", path=str(self.wallets), create=True)
            hot = create_wallet(wcfg)
            p.hotkey = hot.ss58_address
            p.row = Row(name=p.name, role=p.role, hotkey=p.hotkey, behaviour=p.behaviour or "-")
            if p.role == "validator":
                cold = load_coldkey(wcfg)
                reg = self.ledger.register(self.netuid, hot, cold)
                self.ledger.fund(cold.ss58_address, stake)
                self.ledger.add_stake(self.netuid, hot.ss58_address, cold, stake)
                p.row.uid = reg.uid
                p.row.stake_tao = self.cfg.validator_stake_tao
        staked = f" (staked {self.cfg.validator_stake_tao:g} TAO each)" if self.cfg.validators else ""
        self.log(
            f"wallets in {self.wallets}: {sum(p.role == 'peer' for p in self.participants)} peer(s), "
            f"{self.cfg.validators} validator(s){staked}"
        )

    # -------------------------------------------------------------------------------- processes
    def _child(self, name: str, role: str, args: list[str]) -> Child:
        return Child(
            name=name,
            role=role,
            args=args,
            log_path=self.run_dir / "logs" / f"{name}.log",
            env=self.env,
            cwd=REPO,
        )

    def launch_bootstrap(self) -> None:
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        ready = self.run_dir / "bootstrap.ready.json"
        boot = Participant(name="bootstrap", role="bootstrap", behaviour="", home=self.run_dir)
        boot.row = Row(name="bootstrap", role="bootstrap", behaviour="-")
        boot.child = self._child(
            "bootstrap",
            "bootstrap",
            [
                sys.executable, "-m", "peer.cli", "bootstrap",
                "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--ready-file", str(ready),
            ],
        )  # fmt: skip
        self.bootstrap = boot
        boot.child.start()

    def wait_for_bootstrap(self) -> str:
        """The bootstrap's multiaddr once it is listening; LaunchFailed (with its log) if it never is."""
        boot = self.bootstrap
        assert boot is not None and boot.child is not None and boot.row is not None
        ready = self.run_dir / "bootstrap.ready.json"
        deadline = boot.child.started + self.cfg.startup_timeout_s
        while True:
            info = read_json(ready)
            if info is not None:
                boot.row.state = "running"
                self.log(f"bootstrap DHT up: {info['maddrs'][0]}")
                return info["maddrs"][0]
            if boot.child.poll() is not None or time.time() > deadline:
                raise LaunchFailed(
                    f"the bootstrap DHT did not start (exit {boot.child.exit_code}); "
                    f"log {boot.child.log_path}:\n{boot.child.tail()}"
                )
            time.sleep(0.2)

    def peer_args(self, p: Participant, bootstrap: str) -> list[str]:
        args = [
            sys.executable, "-m", "peer.cli", "join",
            "--config", self.cfg.model_config, "--run-id", self.run_id,
            "--home", str(p.home), "--data-dir", str(self.data_dir),
            "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--publisher.listen", "/ip4/127.0.0.1/tcp/0",
            "--wallet.path", str(self.wallets), "--wallet.name", p.name, "--wallet.hotkey", "default",
            "--threads", str(self.cfg.peer_threads),
            "--initial-peers", bootstrap,
            "--ledger.path", str(self.ledger_path), "--netuid", str(self.netuid),
            "--round-blocks", str(self.cfg.round_blocks), "--round-seconds", str(self.cfg.round_seconds),
            "--behaviour", p.behaviour, "--wandb.mode", self.cfg.wandb_mode,
        ]  # fmt: skip
        if self.cfg.validators == 0:
            args += ["--max-rounds", str(self.cfg.rounds)]
        return args + list(self.cfg.peer_args) + self.own_peer_args(p)

    def own_peer_args(self, p: Participant) -> list[str]:
        """``per_peer_args`` of this peer (entry i for ``peer-i``), e.g. its own inner-step budget."""
        i = int(p.name.removeprefix("peer-"))
        return list(self.cfg.per_peer_args[i]) if i < len(self.cfg.per_peer_args) else []

    def validator_args(self, p: Participant) -> list[str]:
        args = [
            sys.executable, "-m", "validator.cli", "run",
            "--config", self.cfg.model_config, "--run-id", self.run_id,
            "--state-dir", str(p.home), "--data-dir", str(self.data_dir),
            "--wallet.path", str(self.wallets), "--wallet.name", p.name, "--wallet.hotkey", "default",
            "--ledger.path", str(self.ledger_path), "--netuid", str(self.netuid),
            "--round-blocks", str(self.cfg.round_blocks),
            "--max-rounds", str(self.cfg.rounds), "--threads", str(self.cfg.validator_threads),
            "--wandb.mode", self.cfg.wandb_mode,
        ]  # fmt: skip
        return args + list(self.cfg.validator_args)

    def start_participants(self, bootstrap: str) -> None:
        for p in self.participants:
            args = self.peer_args(p, bootstrap) if p.role == "peer" else self.validator_args(p)
            p.child = self._child(p.name, p.role, args)
            p.child.start()
        self.log(
            f"started {len(self.participants)} process(es); logs in {self.run_dir / 'logs'} "
            f"(round = {self.cfg.round_blocks} blocks = {self.cfg.round_seconds:g}s)"
        )

    @property
    def children(self) -> list[Child]:
        everyone = ([self.bootstrap] if self.bootstrap else []) + self.participants
        return [p.child for p in everyone if p.child is not None]

    # -------------------------------------------------------------------------------- monitoring
    def current_round(self) -> int:
        return self.block // self.cfg.round_blocks

    def refresh(self, *, record_weights: bool = True) -> None:
        """Read every status file and the ledger; note finished rounds, weight changes and crashes."""
        assert self.ledger is not None and self.netuid is not None
        table = proc_table()
        for c in self.children:
            c.remember_descendants(table)
        meta = self.ledger.metagraph(self.netuid)
        self.block = meta.block
        by_hotkey = meta.by_hotkey()
        validator_uids = [
            by_hotkey[p.hotkey].uid
            for p in self.participants
            if p.role == "validator" and p.hotkey in by_hotkey
        ]
        shares = normalised_weights(self.ledger.weights(self.netuid), validator_uids)
        for p in self.participants:
            row = p.row
            assert row is not None and p.child is not None
            if p.role == "peer":
                self.peer_rounds[p.name] = update_peer_row(row, p.home)
            else:
                self._update_validator_row(p)
            nr = by_hotkey.get(p.hotkey)
            if nr is not None:
                row.uid = nr.uid
                row.incentive = nr.incentive if p.role == "peer" else nr.dividends
                row.stake_tao = nr.stake_tao
                if p.role == "peer":
                    row.weight = shares.get(nr.uid, 0.0 if shares else None)
            self._note_exit(p)
            if row.round is not None and self._last_round_seen.get(p.name) != row.round:
                self._last_round_seen[p.name] = row.round
                if not self.tty:
                    self.log(self._round_line(row))
        if self.bootstrap is not None:
            self._note_exit(self.bootstrap)
        names = {p.hotkey: p.name for p in self.participants if p.role == "peer"}
        if shares and record_weights:
            by_name = {names[nr.hotkey]: shares.get(nr.uid, 0.0) for nr in meta.neurons if nr.hotkey in names}
            if self.history.record_weights(self.current_round(), by_name) and not self.tty:
                self.log(
                    f"round {self.current_round()} weights: "
                    + " · ".join(f"{n} {w:.3f}" for n, w in sorted(by_name.items()))
                )

    def _update_validator_row(self, p: Participant) -> None:
        """A validator's progress from its round records (``<state dir>/rounds/<r>/record.json``)."""
        row = p.row
        assert row is not None
        recs = self.history.validator_rounds.setdefault(p.name, [])
        seen = {r["round"] for r in recs}
        base = p.home / "rounds"
        if base.is_dir():
            new = sorted(int(d.name) for d in base.iterdir() if d.name.isdigit() and int(d.name) not in seen)
            for r in new:
                rec = read_json(base / str(r) / "record.json")
                if rec is not None:
                    recs.append(compact_validator_record(rec))
            recs.sort(key=lambda x: x["round"])
        if recs:
            last = recs[-1]
            row.rounds = len(recs)
            row.round = last["round"]
            row.heldout_loss = last["heldout_loss_base"]
        scores = self._validator_scores()
        for q in self.participants:
            if q.role == "peer" and q.hotkey in scores and q.row is not None:
                q.row.score = scores[q.hotkey]

    def _validator_scores(self) -> dict[str, float]:
        """hotkey -> score of the latest scored round, averaged over validators."""
        acc: dict[str, list[float]] = {}
        for recs in self.history.validator_rounds.values():
            if recs:
                for hk, s in recs[-1]["scores"].items():
                    acc.setdefault(hk, []).append(s)
        return {hk: sum(v) / len(v) for hk, v in acc.items()}

    def _round_line(self, row: Row) -> str:
        def f(x, spec):
            return "-" if x is None else format(x, spec)

        if row.role == "peer":
            return (
                f"{row.name} ({row.behaviour}) round {row.round}: loss {f(row.loss, '.3f')} · held-out "
                f"{f(row.heldout_loss, '.3f')} · {f(row.tok_s, ',.0f')} tok/s · {row.rounds} rounds"
            )
        return f"{row.name} scored round {row.round} (held-out loss of the base {f(row.heldout_loss, '.3f')})"

    def _note_exit(self, p: Participant) -> None:
        c, row = p.child, p.row
        if c is None or row is None:
            return
        code = c.poll()
        if code is None:
            if row.state == "starting" and (
                row.round is not None or row.uid is not None and p.role == "peer"
            ):
                row.state = "running"
            return
        if row.state in ("done", "stopped") or row.state.startswith("crashed"):
            return
        if c.stopping:
            row.state = "stopped"
        elif code == 0:
            row.state = "done"
            self.log(f"{p.name} finished")
        else:
            how = f"exit {code}"
            if code < 0:
                try:
                    how = f"signal {signal.Signals(-code).name}"
                except ValueError:
                    how = f"signal {-code}"
            row.state = f"crashed ({how})"
            tail = c.tail()
            self.crashed.append({"name": p.name, "exit_code": code, "log": str(c.log_path), "tail": tail})
            self.log(f"{p.name} crashed ({how}); last lines of {c.log_path}:\n{tail}", style="red")

    def done_reason(self) -> str | None:
        """Why the run should end now, or None to go on."""
        if (
            self.bootstrap is not None
            and self.bootstrap.child is not None
            and self.bootstrap.child.poll() is not None
        ):
            return "the bootstrap DHT exited"
        peers = [p for p in self.participants if p.role == "peer"]
        vals = [p for p in self.participants if p.role == "validator"]
        if all(p.child is not None and p.child.poll() is not None for p in peers):
            return "every peer exited" if vals else "the peers trained every round"
        if vals and all(p.child is not None and p.child.poll() is not None for p in vals):
            if any(p.child is not None and p.child.exit_code == 0 for p in vals):
                return "the validators scored every round"
            return "every validator exited"
        if time.time() - self.started > self.cfg.effective_timeout:
            return f"timeout after {self.cfg.effective_timeout:.0f}s (timeout_s)"
        return None

    def live_table(self):
        from rich.table import Table

        t = Table(
            title=f"{self.run_id} · block {self.block} · round {self.current_round()} · "
            f"{time.time() - self.started:.0f}s",
            expand=False,
        )
        for col in (
            "process",
            "role",
            "hotkey",
            "behaviour",
            "state",
            "round",
            "loss",
            "tok/s",
            "score",
            "weight",
        ):
            t.add_column(
                col, justify="right" if col in ("round", "loss", "tok/s", "score", "weight") else "left"
            )

        def f(x, spec):
            return "-" if x is None else format(x, spec)

        everyone = ([self.bootstrap] if self.bootstrap else []) + self.participants
        for p in everyone:
            r = p.row
            if r is None:
                continue
            style = (
                "red" if r.state.startswith("crashed") else ("dim" if r.state in ("done", "stopped") else "")
            )
            t.add_row(
                r.name,
                r.role,
                (r.hotkey[:8] + "…") if r.hotkey else "-",
                r.behaviour,
                r.state,
                f(r.round, "d"),
                f(r.loss if r.role == "peer" else r.heldout_loss, ".3f"),
                f(r.tok_s, ",.0f"),
                f(r.score, ".4f"),
                f(r.weight, ".3f"),
                style=style,
            )
        return t

    # -------------------------------------------------------------------------------- report
    def summary(self) -> dict:
        rows = [
            p.row
            for p in ([self.bootstrap] if self.bootstrap else []) + self.participants
            if p.row is not None
        ]
        for p in ([self.bootstrap] if self.bootstrap else []) + self.participants:
            if p.row is not None and p.child is not None:
                p.row.log = str(p.child.log_path)
        meta = {
            "run_id": self.run_id,
            "run_dir": str(self.run_dir),
            "status": self.status,
            "stop_reason": self._stop_reason,
            "started": self.started,
            "duration_s": round(time.time() - self.started, 1),
            "netuid": self.netuid,
            "ledger": str(self.ledger_path),
            "block": self.block,
            "round": self.current_round(),
            "config": dataclasses.asdict(self.cfg),
            "killed": [c.name for c in self.children if c.killed],
        }
        return build_summary(
            meta=meta, rows=rows, peer_rounds=self.peer_rounds, history=self.history, crashed=self.crashed
        )

    def write_summary(self) -> dict:
        summary = self.summary()
        atomic_write_json(self.run_dir / "summary.json", summary)
        return summary

    # -------------------------------------------------------------------------------- main loop
    def run(self) -> int:
        interrupted = False
        live = None
        from peer.config import load_run_config

        load_run_config(self.cfg.model_config)  # a wrong model config fails before anything starts
        if self.cfg.validators and not validator_available():
            raise ConfigError(
                "`validator run` is not available in this checkout (validator/cli.py is missing), so no "
                "rewards can be computed: run with --validators 0 for a training-only swarm"
            )
        try:
            self.launch_bootstrap()  # its start-up (imports, DHT) overlaps with the set-up below
            self.prepare()
            bootstrap = self.wait_for_bootstrap()
            self.start_participants(bootstrap)
            self.status = "running"
            if self.tty:
                from rich.live import Live

                live = Live(self.live_table(), console=self.console, refresh_per_second=2, transient=False)
                live.start()
            last_summary = 0.0
            ledger_trouble = 0
            while True:
                try:
                    self.refresh()
                    ledger_trouble = 0
                except ChainError as e:  # e.g. the ledger file busy for longer than its busy timeout
                    ledger_trouble += 1
                    if ledger_trouble == 1:
                        self.log(f"cannot read the ledger ({e}); retrying", style="yellow")
                if live is not None:
                    live.update(self.live_table())
                if time.time() - last_summary > 10:
                    self.write_summary()
                    last_summary = time.time()
                reason = self.done_reason()
                if reason is not None:
                    self._stop_reason = reason
                    break
                time.sleep(1.0)
        except KeyboardInterrupt:
            interrupted = True
            self._stop_reason = "interrupted (Ctrl-C / SIGTERM)"
        finally:
            if live is not None:
                live.stop()
            if self.children:
                self.log(
                    f"stopping {sum(c.running for c in self.children)} process(es) ({self._stop_reason})…"
                )
                with _signals_ignored():
                    stop_all(self.children, self.cfg.grace_s)
            leftovers = sorted(pid for c in self.children for pid in c.leftovers())
            if leftovers:
                self.log(f"processes still alive after SIGKILL: {leftovers}", style="red")
        return self.finish(interrupted)

    def finish(self, interrupted: bool) -> int:
        if self.ledger is None or self.netuid is None:
            return 130 if interrupted else 1
        try:
            self.refresh(record_weights=False)  # the processes are gone: weights no longer change
        except UserError as e:
            self.log(f"could not read the ledger for the final table: {e}")
        timed_out = (self._stop_reason or "").startswith("timeout")
        if interrupted or timed_out:
            self.status = "interrupted" if interrupted else "timed out"
        elif self.crashed:
            self.status = "finished with crashes"
        else:
            self.status = "completed"
        summary = self.write_summary()
        png = self.run_dir / "report.png"
        write_report_png(summary, png)
        if self.tty:
            self.console.print(render_peer_table(summary))
        else:
            print(plain_peer_table(summary), flush=True)
        held = summary["heldout_loss"]
        if len(held) >= 2:
            self.log(
                f"held-out loss {held[0]['heldout_loss']:.3f} (round {held[0]['round']}) → "
                f"{held[-1]['heldout_loss']:.3f} (round {held[-1]['round']})"
            )
        self.log(f"{self.status} in {summary['duration_s']:.0f}s: {self.run_dir / 'summary.json'}, {png}")
        for c in self.crashed:
            self.log(f"crashed: {c['name']} (exit {c['exit_code']}), log {c['log']}")
        if interrupted:
            return 130
        return 1 if (self.crashed or timed_out) else 0


class LaunchFailed(UserError):
    """A part of the subnet could not start."""


class _signals_ignored:
    """Ignore SIGINT/SIGTERM while children are being stopped, so a second Ctrl-C can't orphan them."""

    def __enter__(self):
        self._old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# ------------------------------------------------------------------------------------ CLI
class _Parser(argparse.ArgumentParser):
    """argparse that reports a wrong flag as one line and exit code 2, no usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m launch.local_subnet",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add(
        "--config",
        type=Path,
        default=REPO / "launch" / "demo.yaml",
        metavar="FILE",
        help="launch YAML (default launch/demo.yaml); the flags below override it",
    )
    add("--peers", type=int, default=None, metavar="N", help="honest peers")
    add(
        "--behaviours",
        default=None,
        metavar="LIST",
        help=f"comma-separated behaviours of extra peers ({', '.join(BEHAVIOURS[1:])}); '' = none",
    )
    add("--validators", type=int, default=None, metavar="M", help="validators (0 = a training-only swarm)")
    add(
        "--rounds",
        type=int,
        default=None,
        metavar="R",
        help="rounds the validators score (without: peers train)",
    )
    add(
        "--model-config", default=None, metavar="NAME", help="model config name or YAML path (debug on a CPU)"
    )
    add("--round-blocks", type=int, default=None, metavar="K", help="ledger blocks per round")
    add("--block-time", type=float, default=None, metavar="S", help="ledger seconds per block")
    add("--wandb-mode", choices=WANDB_MODES, default=None, help="W&B mode for every process")
    add("--run-dir", default=None, metavar="DIR", help="run folder (default runs/<name>-<time>)")
    add("--data-dir", default=None, metavar="DIR", help="prepared data (default .cache/data/<model config>)")
    add("--timeout", type=float, default=None, dest="timeout_s", metavar="S", help="stop after S seconds")
    return p  # fmt: skip


def config_from_args(args: argparse.Namespace) -> LaunchConfig:
    """The launch config file named by ``--config`` with the other flags applied on top."""
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    if args.behaviours is not None:
        overrides["behaviours"] = [b.strip() for b in args.behaviours.split(",") if b.strip()]
    return load_launch_config(args.config, overrides)


def resolve_run_dir(cfg: LaunchConfig) -> Path:
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
    else:
        run_dir = REPO / "runs" / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"run folder {run_dir} exists and is not empty: pass another --run-dir or delete it"
        )
    return run_dir.resolve()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def go() -> int:
        cfg = config_from_args(args)
        run_dir = resolve_run_dir(cfg)
        signal.signal(signal.SIGTERM, _raise_interrupt)
        signal.signal(signal.SIGINT, _raise_interrupt)
        return LocalSubnet(cfg, run_dir=run_dir).run()

    return run_cli(go, "launch.local_subnet")


if __name__ == "__main__":
    sys.exit(main())
