"""The launch config: what a local subnet run is made of (``launch/demo.yaml`` is one).

A YAML file of :class:`LaunchConfig` keys; command-line flags of ``python -m launch.local_subnet``
override it. Unknown keys and bad values are refused with one line saying what is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import get_type_hints

import yaml

from peer.errors import ConfigError
from peer.training.behaviour import Behaviour

REPO = Path(__file__).resolve().parent.parent
BEHAVIOURS = tuple(b.value for b in Behaviour)
"""What ``behaviours`` may hold (``peer join --behaviour``; see peer/training/behaviour.py)."""
WANDB_MODES = ("online", "offline", "disabled")


@dataclass(kw_only=True)
class LaunchConfig:
    """One local subnet run. Loaded from YAML (``launch/demo.yaml``); command-line flags override it."""

    name: str = "local"
    """Run name: the run folder is ``runs/<name>-<YYYYmmdd-HHMMSS>`` unless ``run_dir`` is given."""
    run_dir: str | None = None
    """Run folder (must not exist or be empty). Holds ledger, wallets, homes, logs and the report."""
    model_config: str = "debug"
    """Model config name (model_configs/<name>.yaml) or YAML path, passed to every peer and validator.
    Only ``debug`` trains fast enough on a CPU for a demo."""
    data_dir: str | None = None
    """Prepared data folder shared by all processes (default: .cache/data/<model config>)."""
    peers: int = 3
    """Honest peers."""
    behaviours: list[str] = field(default_factory=list)
    """One extra peer per entry, with that behaviour (free-rider, copycat, random-data, nan, scaled,
    sign-flip, stale): fault injection to watch the validators pay honest work only."""
    validators: int = 1
    """Validators (``validator run``), each registered and staked. 0 = a training swarm without rewards."""
    rounds: int = 8
    """Rounds the validators score before the run ends (without validators: rounds the peers train).
    Run time ≈ start-up (~1 min on 2 cores) + rounds × round_blocks × block_time (+ a round of lag)."""
    block_time: float = 0.5
    """Ledger seconds per block. Rounds and epochs are counted in blocks."""
    round_blocks: int = 16
    """Blocks per training round (round length = round_blocks × block_time). If peers report few inner
    steps or validators fall behind (rows lag a round), raise it."""
    tempo: int = 10
    """Subnet tempo: an epoch (incentive from weights) runs every tempo + 1 blocks."""
    validator_stake_tao: float = 1000.0
    """Stake given to each validator's hotkey (dev faucet), so it holds a validator permit."""
    peer_threads: int = 1
    """torch CPU threads per peer. On a small box keep peers × threads ≤ cores."""
    validator_threads: int = 1
    """torch CPU threads per validator."""
    wandb_mode: str = "disabled"
    """online | offline | disabled, passed to every process (offline runs land in each home)."""
    peer_args: list[str] = field(default_factory=list)
    """Extra flags for every ``peer join`` (e.g. ``[--compression, fp16]``)."""
    validator_args: list[str] = field(default_factory=list)
    """Extra flags for every ``validator run``."""
    per_peer_args: list[list[str]] = field(default_factory=list)
    """Extra flags for single peers: entry i goes to ``peer-i`` (honest peers first, then one per
    ``behaviours`` entry), after ``peer_args``. E.g. ``[[--max-inner-steps, "8"], [--max-inner-steps, "32"]]``
    gives peer-0 a quarter of peer-1's compute (benchmarks/incentive.py uses it for ground truth)."""
    timeout_s: float | None = None
    """Stop the run (as if interrupted) after this many seconds. Default: generous, from rounds."""
    grace_s: float = 20.0
    """Seconds children get to exit after SIGTERM before SIGKILL. Raise it if the summary lists kills."""
    startup_timeout_s: float = 120.0
    """How long the bootstrap DHT may take to come up."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,40}", self.name):
            raise ConfigError(f"name {self.name!r}: use 1-40 letters, digits, '_' or '-'")
        for key in ("peers", "validators"):
            if not 0 <= getattr(self, key) <= 64:
                raise ConfigError(f"{key} = {getattr(self, key)}: use 0..64")
        if self.peers + len(self.behaviours) < 1:
            raise ConfigError("a subnet needs at least one peer (peers + behaviours ≥ 1)")
        bad = [b for b in self.behaviours if b not in BEHAVIOURS]
        if bad:
            raise ConfigError(f"unknown behaviour(s) {bad}: choose from {', '.join(BEHAVIOURS)}")
        if self.rounds < 1:
            raise ConfigError(f"rounds = {self.rounds}: must be ≥ 1")
        if self.block_time <= 0 or self.round_blocks < 1 or self.tempo < 1:
            raise ConfigError("block_time must be > 0, round_blocks ≥ 1, tempo ≥ 1")
        if self.round_blocks * self.block_time < 3:
            raise ConfigError(
                f"a round of {self.round_blocks} × {self.block_time}s is too short to train and average: "
                "make round_blocks × block_time ≥ 3 s"
            )
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"wandb_mode {self.wandb_mode!r}: choose from {', '.join(WANDB_MODES)}")
        if self.peer_threads < 1 or self.validator_threads < 1:
            raise ConfigError("peer_threads and validator_threads must be ≥ 1")
        if self.validator_stake_tao <= 0 or self.grace_s <= 0 or self.startup_timeout_s <= 0:
            raise ConfigError("validator_stake_tao, grace_s and startup_timeout_s must be > 0")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ConfigError("timeout_s must be > 0")
        self._check_per_peer_args()

    def _check_per_peer_args(self) -> None:
        n = self.peers + len(self.behaviours)
        if len(self.per_peer_args) > n:
            raise ConfigError(f"per_peer_args has {len(self.per_peer_args)} entries for {n} peer(s)")
        for i, a in enumerate(self.per_peer_args):
            if not isinstance(a, list) or not all(isinstance(x, str) for x in a):
                raise ConfigError(f"per_peer_args[{i}]: expected a list of strings (flags), got {a!r}")

    @property
    def round_seconds(self) -> float:
        return self.round_blocks * self.block_time

    @property
    def effective_timeout(self) -> float:
        """Default: start-up allowance + 3 × the rounds' nominal length."""
        if self.timeout_s is not None:
            return self.timeout_s
        return 300.0 + 3 * (self.rounds + 2) * self.round_seconds

    @property
    def peer_behaviours(self) -> list[str]:
        return ["honest"] * self.peers + list(self.behaviours)


def load_launch_config(path: Path | None, overrides: dict) -> LaunchConfig:
    """The YAML file's values (unknown keys are errors), then the non-None ``overrides``."""
    raw: dict = {}
    if path is not None:
        if not path.exists():
            raise ConfigError(f"launch config {path} not found (the default is launch/demo.yaml)")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of launch settings")
        raw.update(loaded)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(LaunchConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{path or 'launch config'}: unknown key(s) {unknown}; known: {sorted(known)}")
    hints = get_type_hints(LaunchConfig)
    for key, value in raw.items():
        hint = hints[key]
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            raw[key] = float(value)
        if key in ("behaviours", "peer_args", "validator_args", "per_peer_args") and not isinstance(
            value, list
        ):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if hint is int and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    return LaunchConfig(**raw)
