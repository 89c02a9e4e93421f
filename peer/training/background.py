"""The peer's background writer: the round's file and network chores, run in order off the training thread.

The trainer hands it the Δ's publication, θ's hash, checkpoint, state publication and announcement,
and the held-out loss (README, "How a round works"), so that none of them stalls an inner step.
"""

from __future__ import annotations

import logging
import queue
import threading

log = logging.getLogger("gradswarm.trainer")


class BackgroundWriter:
    """One worker thread that runs the round's file and network chores in order, off the training thread.

    A job that raises stops the peer: the error is re-raised in the training thread by the next
    :meth:`submit` or :meth:`wait_idle` (a checkpoint that cannot be written must not go unnoticed).
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="gradswarm-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    job()
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                log.exception("background job failed")
                self._error = e
            finally:
                self._jobs.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def submit(self, fn, *args) -> None:
        self._raise()
        self._jobs.put(lambda: fn(*args))

    def wait_idle(self) -> None:
        """Block until every submitted job has run (then re-raise a job's error, if any)."""
        self._jobs.join()
        self._raise()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=60)
