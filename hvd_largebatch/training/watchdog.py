"""A per-rank watchdog that ends the job when this rank stops making progress.

A rank that is frozen (``kill -STOP``, a hung file system, a wedged GPU) leaves the other ranks
waiting in their next collective. Under Gloo that wait ends after Gloo's own timeout; under MPI
it never ends. The trainer therefore reports its progress to a :class:`Watchdog` (``mark(what)``
before every phase that may wait on other ranks or on storage: an iteration's forward/backward,
the gradient allreduce, a metrics allreduce, the BN-statistics allreduce, an evaluation batch, a
checkpoint); a daemon thread checks it every ``timeout_s / 10`` seconds (at most every 5 s) and,
when the same mark has been held for more than ``timeout_s`` seconds, prints one line naming the
rank, the mark and how long it has waited, and ends the process with :data:`EXIT_STALLED`
(``os._exit``: a thread cannot interrupt a native collective). The launcher (mpirun,
horovodrun, srun) then tears the whole job down.

The frozen rank's own watchdog cannot run; the others name what they were waiting for. Marks cost
one ``time.monotonic()`` call and one attribute store. ``pause()`` stops the clock (e.g. while
Horovod elastic re-forms the world); the next ``mark`` restarts it.
"""
from __future__ import annotations

import os
import sys
import threading
import time

#: exit status of a process ended by its watchdog
EXIT_STALLED = 4
#: longest sleep between two checks, seconds
MAX_POLL_S = 5.0


class Watchdog:
    """See the module docstring. ``timeout_s`` <= 0 disables it (``mark`` still records)."""

    def __init__(self, timeout_s: float, rank: int, *, name: str = "hvd-largebatch train"):
        self.timeout_s = float(timeout_s)
        self.rank = rank
        self.name = name
        self._mark: tuple[str, float] | None = None  # (what, since), replaced atomically
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> "Watchdog":
        if self.timeout_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="hvdlb-watchdog", daemon=True)
            self._thread.start()
        return self

    def mark(self, what: str) -> None:
        """This rank starts ``what`` now (a phase that should end within ``timeout_s``)."""
        self._mark = (what, time.monotonic())

    def pause(self) -> None:
        self._mark = None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def stalled(self, now: float) -> str | None:
        """The message to print when the current mark is older than ``timeout_s`` at ``now``."""
        current = self._mark
        if current is None or now - current[1] <= self.timeout_s:
            return None
        what, since = current
        return (f"{self.name}: error: rank {self.rank}: no progress for {now - since:.0f} s in "
                f"{what} (train.stall_timeout_s = {self.timeout_s:g}): another rank is frozen, "
                f"dead or much slower, or this rank is stuck; ending the job")

    def _watch(self) -> None:
        poll = min(self.timeout_s / 10, MAX_POLL_S)
        while not self._stop.wait(poll):
            message = self.stalled(time.monotonic())
            if message is not None:
                print(message, file=sys.stderr, flush=True)
                os._exit(EXIT_STALLED)
