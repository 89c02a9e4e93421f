"""Experiment tracking: a small Tracker interface with a W&B and a no-op implementation.

One W&B run per process; all processes of a swarm share the group ``run_id``; ``job_type`` is
``peer`` or ``validator``; the run name is the hotkey's short form. ``WANDB_MODE=offline`` works
without login (files under ``<dir>/wandb``); ``disabled`` turns tracking off.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from peer.errors import ConfigError

WANDB_MODES = ("online", "offline", "disabled")


@dataclass(kw_only=True)
class TrackingConfig:
    mode: str | None = None
    """W&B mode: online (needs `wandb login`), offline (files only) or disabled. Default: $WANDB_MODE, else disabled."""
    project: str = "gradswarm"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); default: your default entity."""
    dir: str | None = None
    """Folder for W&B files (default: the peer's home folder)."""

    def __post_init__(self) -> None:
        if self.mode is None:
            self.mode = os.environ.get("WANDB_MODE", "disabled")
        if self.mode not in WANDB_MODES:
            raise ConfigError(f"--wandb.mode must be one of {', '.join(WANDB_MODES)}, got {self.mode!r}")


class Tracker(Protocol):
    def log(self, metrics: dict[str, Any], step: int | None = None) -> None: ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


class NullTracker:
    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker:
    def __init__(
        self, cfg: TrackingConfig, *, run_id: str, job_type: str, name: str, config: dict, default_dir: Path
    ):
        import wandb

        directory = Path(cfg.dir) if cfg.dir else Path(default_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=run_id,
            job_type=job_type,
            name=name,
            config=config,
            mode=cfg.mode,
            dir=str(directory),
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def finish(self) -> None:
        self.run.finish()


def make_tracker(
    cfg: TrackingConfig, *, run_id: str, job_type: str, name: str, config: dict, default_dir: Path
) -> Tracker:
    if cfg.mode == "disabled":
        return NullTracker()
    return WandbTracker(
        cfg, run_id=run_id, job_type=job_type, name=name, config=config, default_dir=default_dir
    )


def add_tracking_args(parser) -> None:
    g = parser.add_argument_group("Weights & Biases")
    g.add_argument(
        "--wandb.mode",
        dest="wandb_mode",
        choices=WANDB_MODES,
        default=None,
        help="online | offline | disabled (default: $WANDB_MODE, else disabled)",
    )
    g.add_argument("--wandb.project", dest="wandb_project", default="gradswarm", help="W&B project")
    g.add_argument("--wandb.entity", dest="wandb_entity", default=None, help="W&B entity (team/user)")
    g.add_argument("--wandb.dir", dest="wandb_dir", default=None, help="folder for W&B files")


def tracking_config_from_args(args) -> TrackingConfig:
    return TrackingConfig(
        mode=args.wandb_mode, project=args.wandb_project, entity=args.wandb_entity, dir=args.wandb_dir
    )


# ---------------------------------------------------------------------------------------------------
# reading offline runs back (tests, and researchers without a W&B server)

_WANDB_HEADER = b":W&B\xe1\xbe\x00"
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_records(path: Path):
    """Records of an offline ``.wandb`` file (a LevelDB-style log of ``wandb_internal_pb2.Record``)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if not data.startswith(_WANDB_HEADER):
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, pending = len(_WANDB_HEADER), b""
    while pos + 7 <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < 7:
            pos += left_in_block
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind in (_FULL, _FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def read_offline_run(path: Path) -> dict:
    """``{"run": {group, job_type, name}, "history": [{key: value, ...}, ...]}`` of an offline run file."""
    run: dict[str, Any] = {}
    history = []
    for record in read_wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = {
                "group": record.run.run_group,
                "job_type": record.run.job_type,
                "name": record.run.display_name,
            }
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            history.append(row)
    return {"run": run, "history": history}
