"""The local-subnet launcher: what every completed run must show, Ctrl-C, and its pure parts.

The end-to-end tests run ``python -m launch.local_subnet`` as a real process (which starts a real
bootstrap DHT, ``peer join`` processes and a ``validator run`` on a LocalLedger) and watch every
process it ever spawned through /proc, so "no child remains" is checked on pids, not on the launcher's word.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from launch.config import load_launch_config
from launch.local_subnet import build_parser, config_from_args
from launch.procs import alive, descendants
from launch.report import (
    History,
    Row,
    build_summary,
    heldout_by_round,
    normalised_weights,
    plain_peer_table,
    write_report_png,
)
from peer.errors import ConfigError
from tests.fixtures_swarm import REPO, peer_env

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Launcher:
    """The launcher process in its own group, with a thread recording every descendant it ever had."""

    def __init__(self, args: list[str], log: Path):
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.log_path = log
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "launch.local_subnet", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=peer_env(),
            cwd=REPO,
            start_new_session=True,
        )
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set() and self.popen.poll() is None:
            self.seen |= descendants(self.popen.pid)
            time.sleep(0.3)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout=timeout)
        finally:
            self._stop.set()
            self._thread.join(timeout=5)

    def stop(self) -> None:
        """Teardown, also on failure: kill the launcher's group and every descendant seen."""
        self._stop.set()
        for pid in [self.popen.pid, *self.seen]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.popen.wait(timeout=10)
        self._log.close()


@pytest.fixture
def launcher_factory():
    started: list[Launcher] = []

    def start(args: list[str], log: Path) -> Launcher:
        launcher = Launcher(args, log)
        started.append(launcher)
        return launcher

    try:
        yield start
    finally:
        for launcher in started:
            launcher.stop()


def _wait_gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    deadline = time.time() + timeout
    left = alive(pids)
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = alive(pids)
    return left


def assert_completed_run(launcher: Launcher, run_dir: Path, validators: int) -> dict:
    """What every completed launcher run must show, whatever its scenario; returns the summary. Checked on
    the subnets of ``tests/test_validator_swarm.py`` (2 honest peers, 7 dishonest ones, 2 validators).

    The run completed with nobody killed or crashed; every peer registered and finished rounds; honest
    peers trained tokens and a free-rider none, and it is paid less than them; every validator scored
    the rounds asked for; the table the user sees names every peer; the report and every process's log
    are written; and every process the launcher ever started (peers, p2pd daemons, publishers,
    validators) is gone."""
    out = launcher.output()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary["stop_reason"]
    assert summary["killed"] == [] and summary["crashed"] == []
    peers = summary["peers"]
    for p in peers:
        assert p["uid"] is not None and p["rounds"] >= 1, p
        assert p["name"] in out
    honest = [p for p in peers if p["behaviour"] == "honest"]
    assert honest and all(p["tokens"] > 0 for p in honest), peers
    for rider in (p for p in peers if p["behaviour"] == "free-rider"):
        assert rider["tokens"] == 0 and all(h["incentive"] >= rider["incentive"] for h in honest), peers
    rounds = launch_rounds(launcher)
    for v in range(validators):
        assert len(summary["validator_rounds"][f"validator-{v}"]) == rounds, summary["validator_rounds"]
    assert summary["heldout_loss"] and summary["weights"]

    png = (run_dir / "report.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    names = ["bootstrap", *(p["name"] for p in peers), *(f"validator-{v}" for v in range(validators))]
    for name in names:
        assert (run_dir / "logs" / f"{name}.log").stat().st_size > 0, name

    assert len(launcher.seen) >= len(names) + len(peers)  # the children + at least a p2pd per peer
    assert _wait_gone(launcher.seen, timeout=5) == set()
    return summary


def launch_rounds(launcher: Launcher) -> int:
    """The ``--rounds`` the launcher was started with."""
    args = launcher.popen.args
    return int(args[args.index("--rounds") + 1])


@pytest.mark.slow
def test_ctrl_c_stops_every_child_and_keeps_a_partial_summary(launcher_factory, debug_data, tmp_path):
    run_dir = tmp_path / "run"
    launcher = launcher_factory(
        [
            "--peers", "1", "--behaviours", "", "--validators", "1", "--rounds", "50",
            "--round-blocks", "12", "--run-dir", str(run_dir), "--data-dir", str(debug_data),
            "--wandb-mode", "disabled",
        ],
        tmp_path / "launcher.log",
    )  # fmt: skip
    rounds = run_dir / "peers" / "peer-0" / "rounds.jsonl"
    deadline = time.time() + 240
    while not (rounds.exists() and rounds.read_text().strip()):
        assert launcher.popen.poll() is None, launcher.output()[-4000:]
        assert time.time() < deadline, launcher.output()[-4000:]
        time.sleep(0.5)
    children = set(launcher.seen)
    assert len(children) >= 4  # bootstrap, peer, validator, p2pd daemons, publisher

    t0 = time.time()
    launcher.popen.send_signal(signal.SIGINT)
    code = launcher.wait(timeout=90)
    stop_seconds = time.time() - t0
    out = launcher.output()
    assert code == 130, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert _wait_gone(launcher.seen | children, timeout=5) == set()
    assert stop_seconds < 60

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["stop_reason"].startswith("interrupted")
    assert summary["peers"][0]["rounds"] >= 1
    assert summary["heldout_loss"]
    assert (run_dir / "report.png").read_bytes().startswith(PNG_MAGIC)
    for name in ("bootstrap", "peer-0", "validator-0"):
        assert (run_dir / "logs" / f"{name}.log").stat().st_size > 0
    assert (run_dir / "peers" / "peer-0" / "status.json").exists()


# ------------------------------------------------------------------------------------ fast, no processes
def test_demo_config_loads_and_overrides_apply():
    cfg = load_launch_config(REPO / "launch" / "demo.yaml", {"peers": 2, "behaviours": ["copycat"]})
    assert cfg.peer_behaviours == ["honest", "honest", "copycat"]
    demo = load_launch_config(REPO / "launch" / "demo.yaml", {})
    assert demo.peer_behaviours == ["honest"] * 3 + ["free-rider"] and demo.validators == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"peerz": 3}, "unknown key"),
        ({"behaviours": ["lazy"]}, "unknown behaviour"),
        ({"peers": 0, "behaviours": []}, "at least one peer"),
        ({"round_blocks": 2}, "too short"),
        ({"wandb_mode": "loud"}, "wandb_mode"),
        ({"peers": "three"}, "expected an integer"),
    ],
)
def test_bad_launch_config_is_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_launch_config(None, overrides)


def test_cli_refuses_a_non_empty_run_dir_in_one_line(tmp_path):
    (tmp_path / "old.txt").write_text("keep me")
    out = subprocess.run(
        [sys.executable, "-m", "launch.local_subnet", "--run-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=peer_env(),
    )
    assert out.returncode != 0
    assert "exists and is not empty" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert (tmp_path / "old.txt").read_text() == "keep me"


def test_weights_are_row_normalised_and_averaged_over_validators():
    rows = {0: [(2, 30000), (3, 10000)], 1: [(2, 1), (3, 1)], 5: [(2, 7)]}
    shares = normalised_weights(rows, validator_uids=[0, 1, 9])  # 9 has not set weights: left out
    assert shares == pytest.approx({2: (0.75 + 0.5) / 2, 3: (0.25 + 0.5) / 2})
    assert normalised_weights({}, [0]) == {}


def test_summary_table_and_png_from_a_synthetic_run(tmp_path):
    rows = [
        Row(name="peer-0", role="peer", hotkey="5F" + "a" * 46, behaviour="honest", uid=1, rounds=3,
            tokens=1000, score=0.2, weight=0.9, incentive=0.9),
        Row(name="peer-1", role="peer", hotkey="5G" + "b" * 46, behaviour="free-rider", uid=2, rounds=3,
            weight=0.1, incentive=0.1),
        Row(name="validator-0", role="validator", hotkey="5H" + "c" * 46, uid=0),
    ]  # fmt: skip
    peer_rounds = {
        "peer-0": [{"round": 4, "heldout_loss": 6.0}, {"round": 5, "heldout_loss": 5.5}],
        "peer-1": [{"round": 4, "heldout_loss": 6.0}, {"round": 5, "heldout_loss": float("nan")}],
    }
    history = History()
    history.record_weights(5, {"peer-0": 0.9, "peer-1": 0.1})
    summary = build_summary(
        meta={"run_id": "t", "status": "completed"},
        rows=rows,
        peer_rounds=peer_rounds,
        history=history,
        crashed=[],
    )
    assert [p["name"] for p in summary["peers"]] == ["peer-0", "peer-1"]  # ranked by weight
    assert summary["heldout_loss"] == heldout_by_round(peer_rounds)
    assert summary["heldout_loss"][1] == {"round": 5, "heldout_loss": 5.5, "by_peer": {"peer-0": 5.5}}
    table = plain_peer_table(summary)
    assert table.splitlines()[0].split() == [
        "uid", "peer", "hotkey", "behaviour", "rounds", "tokens", "score", "weight", "incentive"
    ]  # fmt: skip
    assert "free-rider" in table and "1,000" in table
    json.dumps(summary)  # serialisable as is
    write_report_png(summary, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes().startswith(PNG_MAGIC)
    assert not list(tmp_path.glob("*.tmp*"))


def _readme_sections(*titles: str) -> str:
    text = (REPO / "README.md").read_text()
    parts = text.split("\n## ")
    found = [p for p in parts if p.startswith(titles)]
    assert len(found) == len(titles), f"README sections {titles} not found"
    return "\n".join(found)


def test_readme_launch_commands_are_valid_configs():
    """Docs don't rot: every launcher command in the README's quickstart/scenario sections parses into a
    valid config (the same code path as a real run, up to starting processes), and `make demo` runs the
    command the README says it runs."""
    text = _readme_sections("Quickstart: a local subnet in one command", "Run a scenario")
    commands = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("make demo"):
            line = line.split("# = ", 1)[1]
        if "-m launch.local_subnet" in line:
            commands.append(shlex.split(line.split(" # ")[0]))
    assert len(commands) >= 4
    for argv in commands:
        assert argv[:3] == [".venv/bin/python", "-m", "launch.local_subnet"], argv
        cfg = config_from_args(build_parser().parse_args(argv[3:]))
        assert cfg.peers + len(cfg.behaviours) >= 1
    assert "-m launch.local_subnet --config launch/demo.yaml" in (REPO / "Makefile").read_text()
    assert (REPO / "launch" / "demo-report.png").read_bytes().startswith(PNG_MAGIC)


@pytest.mark.slow
def test_a_crashing_child_is_reported_with_its_log_tail(launcher_factory, debug_data, tmp_path):
    cfg = tmp_path / "crash.yaml"
    cfg.write_text("name: crash\npeers: 1\nvalidators: 0\nrounds: 2\npeer_args: [--no-such-flag]\n")
    run_dir = tmp_path / "run"
    launcher = launcher_factory(
        ["--config", str(cfg), "--run-dir", str(run_dir), "--data-dir", str(debug_data)],
        tmp_path / "launcher.log",
    )
    assert launcher.wait(timeout=120) == 1
    out = launcher.output()
    assert "peer-0 crashed (exit 2)" in out and "--no-such-flag" in out, out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished with crashes"
    (crash,) = summary["crashed"]
    assert crash["name"] == "peer-0" and crash["exit_code"] == 2 and "--no-such-flag" in crash["tail"]
    assert summary["peers"][0]["state"] == "crashed (exit 2)"
    assert _wait_gone(launcher.seen, timeout=5) == set()


def test_cli_refuses_an_unknown_model_config_before_starting_anything(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "launch.local_subnet", "--model-config", "nope", "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=peer_env(),
    )
    assert out.returncode == 2
    assert "model config 'nope' not found" in out.stderr and "Traceback" not in out.stderr
    assert not run_dir.exists()
