"""Shared fixtures. Markers (slow, gpu, chain) are declared once, in pyproject.toml."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_MODE", "disabled")

pytest_plugins = [
    p
    for p in ("tests.fixtures_chain", "tests.fixtures_swarm")
    if (REPO / (p.replace(".", "/") + ".py")).exists()
]


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable
