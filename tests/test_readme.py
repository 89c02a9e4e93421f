"""The front door: every command in README.md's ```bash blocks works as written.

Each command is classified in ``COMMANDS`` by its program and subcommand words (``peer chain fund``,
``validator run``…), and a command nobody classified fails the test, so a new README line cannot go
unchecked. What each class checks:

* ``run``: run for real, in README order, in a temp folder that is also ``$HOME`` (wallets, ledger,
  runs land there, never in ~/.bittensor). The local subnet in five commands is such a block.
* ``help``: the README line itself with ``--help`` appended: argparse checks every choice and typed value
  up to the flag, prints the help and exits 0; every ``--flag`` the line uses must appear in that help
  (argparse would only complain about an unknown one after ``--help``). For commands that train, serve
  or run until stopped, or need a finished run or the network.
* ``dry-run``: ``make -n <target>``: the target exists and its recipe expands.
* ``shell``: a standard tool on a path of a finished run; nothing of ours to check.

Commands are run as a fresh clone has them: ``.venv/bin/<script>`` is the interpreter's own bin folder.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
VENV_BIN = Path(sys.executable).parent

COMMANDS: dict[str, tuple[str, str]] = {
    # key: (mode, why)
    "make test": ("dry-run", "runs the whole suite (minutes)"),
    "make demo": ("dry-run", "a whole local subnet for minutes (tests/test_launcher.py runs the launcher)"),
    "ls": ("shell", "lists a finished demo run's folder (a <time> placeholder)"),
    "validator replay": ("help", "needs the state dir of a validator that scored rounds"),
    "validator run": ("help", "follows the chain until stopped and needs publishing peers"),
    "python -m launch.local_subnet": ("help", "trains a subnet for minutes (tests/test_launcher.py runs it)"),
    "peer bootstrap": ("help", "a DHT node that serves until stopped"),
    "peer join": ("help", "trains until stopped; the example registers on finney"),
    "peer doctor": (
        "help",
        "diagnoses a running peer on finney (tests/test_doctor.py runs it on a LocalLedger)",
    ),
    "python -m peer.net.discovery": (
        "help",
        "dials a live subnet's publishers (tests/test_discovery.py runs it)",
    ),
    "peer data build": ("help", "needs a folder of texts or an HF dataset (tests/test_shards.py builds one)"),
    "peer data info": ("help", "needs a built data set (tests/test_shards.py reads one)"),
    "python3": ("shell", "a static file server for the shards (the standard library's http.server)"),
    "python -m launch.netlab check": ("help", "needs root; tests/test_wan.py runs the lab"),
    "python -m launch.netlab probe": ("help", "needs root; tests/test_wan.py measures the cap"),
    "python -m pytest": ("help", "the wan tests run in `make test` itself"),
    "python": ("help", "benchmarks (wan.py needs root; parity.py trains for minutes)"),
    "peer chain create-subnet": ("run", "the local subnet in five commands"),
    "peer chain fund": ("run", "the local subnet in five commands"),
    "peer chain register": ("run", "the local subnet in five commands"),
    "peer chain stake": ("run", "the local subnet in five commands"),
    "peer chain metagraph": ("run", "the local subnet in five commands"),
    "peer chain advance": ("run", "the local subnet in five commands"),
}
MODES = {"run", "help", "dry-run", "shell"}
WORD = re.compile(r"^[a-z][a-z0-9-]*$")  # a subcommand word (not a path, value or placeholder)


@dataclass(frozen=True)
class Command:
    line: int
    text: str
    argv: tuple[str, ...]
    key: str

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text}"


def _key(argv: list[str]) -> str:
    prog = argv[0].removeprefix(".venv/bin/")
    rest = argv[1:]
    if prog == "python" and rest[:1] == ["-m"]:
        prog, rest = f"python -m {rest[1]}", rest[2:]
    words = [prog]
    for tok in rest:
        if not WORD.match(tok):
            break
        words.append(tok)
    return " ".join(words)


def readme_commands(text: str) -> list[Command]:
    """Every command in the ```bash blocks: continuation lines joined, comments dropped, ``[--opt x]``
    (README's notation for optional flags) unbracketed."""
    out: list[Command] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```bash":
            i += 1
            continue
        i += 1
        pending, start = "", 0
        while i < len(lines) and lines[i].strip() != "```":
            raw = lines[i]
            if not pending:
                start = i + 1
            pending += raw.rstrip()
            i += 1
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            argv = [t.strip("[]") for t in shlex.split(pending, comments=True)]
            if argv:
                out.append(Command(line=start, text=pending.strip(), argv=tuple(argv), key=_key(argv)))
            pending = ""
    return out


COMMANDS_IN_README = readme_commands(README.read_text())


def _resolve(argv: tuple[str, ...]) -> list[str]:
    prog, rest = argv[0], list(argv[1:])
    if prog == ".venv/bin/python":
        return [sys.executable, *rest]
    if prog.startswith(".venv/bin/"):
        return [str(VENV_BIN / prog.removeprefix(".venv/bin/")), *rest]
    return [prog, *rest]


def _env(home: Path) -> dict[str, str]:
    return {
        "PYTHONPATH": str(REPO),
        "PATH": f"{VENV_BIN}:/usr/bin:/bin",
        "HOME": str(home),
        "WANDB_MODE": "disabled",
    }


def _run(argv: list[str], cwd: Path, home: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv,
        cwd=cwd,
        env=_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def by_mode(mode: str) -> list[Command]:
    return [c for c in COMMANDS_IN_README if COMMANDS.get(c.key, ("", ""))[0] == mode]


def test_readme_has_commands_and_every_one_is_classified():
    assert len(COMMANDS_IN_README) >= 15, [str(c) for c in COMMANDS_IN_README]
    unclassified = [str(c) for c in COMMANDS_IN_README if c.key not in COMMANDS]
    assert not unclassified, (
        f"README commands not classified in tests/test_readme.py COMMANDS (add each with a mode and why): "
        f"{unclassified}"
    )
    stale = set(COMMANDS) - {c.key for c in COMMANDS_IN_README}
    assert not stale, f"COMMANDS lists commands README no longer has: {sorted(stale)}"
    assert all(mode in MODES and why for mode, why in COMMANDS.values())


def test_readme_commands_run_from_a_fresh_clone():
    """Our programs are named as a fresh clone has them (.venv/bin/…), not as an activated venv would."""
    bare = [str(c) for c in COMMANDS_IN_README if c.argv[0] in ("peer", "validator", "python")]
    assert not bare, f"use .venv/bin/<program> (README has no step that activates the venv): {bare}"


def test_readme_local_subnet_runs_for_real(tmp_path):
    """The ``run`` commands, in README order, in an empty folder that is also $HOME."""
    cmds = by_mode("run")
    assert [c.key.split()[-1] for c in cmds][:6] == [
        "create-subnet",
        "fund",
        "register",
        "stake",
        "metagraph",
        "advance",
    ]
    outputs = {}
    for c in cmds:
        r = _run(_resolve(c.argv), cwd=tmp_path, home=tmp_path)
        assert r.returncode == 0 and "Traceback" not in r.stderr, f"{c}\n{r.stdout}\n{r.stderr}"
        outputs[c.key] = r.stdout
    assert "created subnet netuid=1" in outputs["peer chain create-subnet"]
    assert ": 1000 TAO" in outputs["peer chain fund"]
    assert "registered: netuid=1 uid=0" in outputs["peer chain register"]
    assert "staked 100 TAO" in outputs["peer chain stake"]
    assert re.search(r"│\s+0 │ .*│\s+100\.000 │\s+✓ │", outputs["peer chain metagraph"])
    assert outputs["peer chain advance"].startswith("head #")
    # where README says things land, and nothing outside the folder
    assert (tmp_path / ".cache" / "ledger" / "ledger.sqlite").exists()
    assert sorted(p.name for p in (tmp_path / ".bittensor" / "wallets").iterdir()) == ["alice", "owner"]


@pytest.mark.parametrize("cmd", by_mode("help"), ids=lambda c: f"{c.line}-{c.key.replace(' ', '_')}")
def test_readme_help_commands_parse(cmd, tmp_path):
    r = _run([*_resolve(cmd.argv), "--help"], cwd=REPO, home=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, f"{cmd}\n{r.stderr}"
    assert r.stdout.startswith("usage:"), f"{cmd}\n{r.stdout}"
    flags = {t.split("=", 1)[0] for t in cmd.argv if t.startswith("--")}
    missing = sorted(f for f in flags if not re.search(rf"(?<![\w.-]){re.escape(f)}(?![\w.-])", r.stdout))
    assert not missing, f"{cmd}: flags not in `--help`: {missing}"


@pytest.mark.parametrize("cmd", by_mode("dry-run"), ids=lambda c: f"{c.line}-{c.key.replace(' ', '_')}")
def test_readme_make_targets_exist(cmd, tmp_path):
    assert cmd.argv[0] == "make"
    r = _run(["make", "-n", *cmd.argv[1:]], cwd=REPO, home=tmp_path, timeout=60)
    assert r.returncode == 0 and r.stdout.strip(), f"{cmd}\n{r.stderr}"
    if cmd.key == "make demo":  # README says what it runs
        assert "-m launch.local_subnet --config launch/demo.yaml" in r.stdout


def test_readme_parser_handles_continuations_and_comments():
    text = "x\n```bash\n# only a comment\n.venv/bin/peer join --a 1 \\\n    --b 2   # why\nls runs/x\n```\n"
    cmds = readme_commands(text)
    assert [(c.key, c.argv, c.line) for c in cmds] == [
        ("peer join", (".venv/bin/peer", "join", "--a", "1", "--b", "2"), 4),
        ("ls", ("ls", "runs/x"), 6),
    ]
