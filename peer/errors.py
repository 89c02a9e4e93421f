"""User-facing errors: one readable line, a non-zero exit code, never a traceback.

Raise :class:`UserError` (or a subclass) for anything the person running a command can fix: a wrong
flag, a missing file, an unreachable peer, a corrupt checkpoint. :func:`run_cli` turns it into one line on
stderr and exit code 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """Something the user can fix. The message says what went wrong and how to fix it."""

    exit_code = 2


class ConfigError(UserError):
    """A config file or option is missing, malformed or out of range."""


class DataError(UserError):
    """The data directory or corpus is missing or inconsistent."""


class CheckpointError(UserError):
    """A checkpoint or state file is corrupt or does not match the model."""


class NetworkError(UserError):
    """A peer, bootstrap node or chain endpoint could not be reached."""


def run_cli(main: Callable[[], int | None], prog: str) -> int:
    """Run ``main``; print a :class:`UserError` as ``prog: error: message`` and return its exit code."""
    try:
        return int(main() or 0)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
