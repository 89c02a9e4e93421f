"""Progress for humans: a rich status line on a terminal, plain log lines otherwise (logs, CI)."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("gradswarm.peer")


class Progress:
    """``update`` shows live training state; ``event`` prints a line that stays (round summaries)."""

    def __init__(self, name: str, enabled: bool = True):
        self.name = name
        self.tty = enabled and sys.stderr.isatty()
        self._status = None
        self._console = None
        self._last_plain = 0.0
        if self.tty:
            from rich.console import Console

            self._console = Console(stderr=True)
            self._status = self._console.status("starting…")
            self._status.start()

    def update(self, *, round_: int, step: int, loss: float | None, tok_s: float, peers: int) -> None:
        loss_s = f"{loss:.3f}" if loss is not None else "-"
        text = f"[bold]{self.name}[/] round {round_} · step {step} · loss {loss_s} · {tok_s:,.0f} tok/s · peers {peers}"
        if self._status is not None:
            self._status.update(text)
        elif time.time() - self._last_plain > 30:
            self._last_plain = time.time()
            log.info("round %d step %d loss %s tok/s %.0f peers %d", round_, step, loss_s, tok_s, peers)

    def event(self, message: str) -> None:
        if self._console is not None:
            self._console.log(message)
        else:
            log.info(message)

    def close(self) -> None:
        if self._status is not None:
            self._status.stop()
