"""A step that does not come back is stopped, with one line.

A bundle's step graph has no control flow (runtime.graph_file refuses Loop / Scan / If), but a resealed graph can
still ask for hours of arithmetic in one step. Each step of a backend runs under its StepWatch; the limit comes
from the graph's own timing on this machine:

- before any step of it has been timed: `first_step_seconds` (10 minutes: a paper-size model's first batch-64 step
  on a small CPU takes well under a minute), or $TRM_STEP_TIMEOUT;
- after that: `factor` (100) times the fastest time per puzzle measured so far, times the step's puzzles, at least
  `floor_seconds` (10 s). The first steps a bundle runs are its golden ones (`run` and `verify` check them first),
  so the bound is the golden steps' timing, and it only tightens as faster steps are seen.

$TRM_STEP_TIMEOUT (seconds) replaces both with a fixed limit. A step over its limit is stopped through the backend's
own cancel (ONNX Runtime's RunOptions.terminate, OpenVINO's InferRequest.cancel), which takes effect between two
operators, and the step raises StepTimeout. A single operator that never returns cannot be interrupted from Python:
a command-line run (see `exit_when_stuck`) then prints its one line and exits `grace_seconds` later.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from trm_export.errors import BundleError, printable

ENV_VARIABLE = "TRM_STEP_TIMEOUT"
_exit_when_stuck = False


class StepTimeout(BundleError):
    """A step ran past its limit and was stopped."""


def exit_when_stuck(enabled: bool = True) -> None:
    """For command-line tools: a step that stays stuck `grace_seconds` past its limit, deaf to the cancel, ends
    the process with the error line (exit status 1) instead of hanging it."""
    global _exit_when_stuck
    _exit_when_stuck = enabled


def fixed_limit() -> float | None:
    """$TRM_STEP_TIMEOUT as seconds, or None when unset; a value that is not a positive number is refused."""
    text = os.environ.get(ENV_VARIABLE)
    if text is None or not text.strip():
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise BundleError(f"${ENV_VARIABLE} must be a number of seconds above 0, got {text[:40]!r}")
    return value


class StepWatch:
    """Times a backend's steps and stops one that runs past its limit (see the module docstring).

    `cancel` is called from the watch's own thread when a step overruns; it must make the running step return
    (with any error). One step at a time: the backend's caller serialises steps (Solver holds its lock)."""

    def __init__(self, cancel: Callable[[], None], what: str, *, first_step_seconds: float = 600.0,
                 factor: float = 100.0, floor_seconds: float = 10.0, grace_seconds: float = 10.0):
        self.cancel, self.what = cancel, what
        self.first_step_seconds, self.factor, self.floor_seconds = first_step_seconds, factor, floor_seconds
        self.grace_seconds = grace_seconds
        self.fixed = fixed_limit()
        self.per_puzzle: float | None = None  # the fastest seconds per puzzle measured so far
        self._cond = threading.Condition()
        self._armed: tuple[float, float] | None = None  # (deadline, limit) of the step running now
        self._fired = False
        self._thread: threading.Thread | None = None

    def limit(self, n: int) -> float:
        if self.fixed is not None:
            return self.fixed
        if self.per_puzzle is None:
            return self.first_step_seconds
        return max(self.floor_seconds, self.factor * self.per_puzzle * max(n, 1))

    def _why(self, limit: float) -> str:
        if self.fixed is not None:
            return f"${ENV_VARIABLE}"
        if self.per_puzzle is None:
            return f"the limit for a graph's first step; ${ENV_VARIABLE} sets another"
        return (f"{self.factor:g}x this graph's fastest measured {self.per_puzzle * 1e3:.3g} ms per puzzle; "
                f"${ENV_VARIABLE} sets another")

    @contextmanager
    def step(self, n: int) -> Iterator[None]:
        """Run one step of `n` puzzles under the watch; raises StepTimeout (replacing the backend's own error
        about the cancel) when it was stopped."""
        limit = self.limit(n)
        start = time.monotonic()
        with self._cond:
            self._armed, self._fired = (start + limit, limit), False
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="trm-step-watch", daemon=True)
                self._thread.start()
            self._cond.notify()
        try:
            yield
        except BaseException:
            if self._disarm():
                raise StepTimeout(self.message(limit)) from None
            raise
        if self._disarm():  # stopped, yet it returned without an error
            raise StepTimeout(self.message(limit))
        per_puzzle = (time.monotonic() - start) / max(n, 1)
        self.per_puzzle = per_puzzle if self.per_puzzle is None else min(self.per_puzzle, per_puzzle)

    def _disarm(self) -> bool:
        """The step is over: stop watching it; whether the watch had stopped it."""
        with self._cond:
            self._armed = None
            self._cond.notify()
            return self._fired

    def message(self, limit: float) -> str:
        return (f"{self.what}: a step did not return within {limit:.3g} s ({self._why(limit)}) and was stopped; "
                "the step graph asks for far more work than this bundle's own steps (a damaged or hostile "
                "bundle: re-export it), or the machine is starved")

    def _watch(self) -> None:
        with self._cond:
            while True:
                if self._armed is None:
                    if not self._cond.wait(60.0) and self._armed is None:
                        self._thread = None  # idle for a minute: the next step starts a new watcher
                        return
                    continue
                deadline, limit = self._armed
                now = time.monotonic()
                if now < deadline:
                    self._cond.wait(deadline - now)
                    continue
                self._fired = True
                self.cancel()
                if not self._cond.wait_for(self._returned(self._armed), self.grace_seconds):
                    if _exit_when_stuck:  # the cancel did not reach it: an operator that does not return
                        sys.stderr.write(f"Error: {printable(self.message(limit))}\n")
                        sys.stderr.flush()
                        os._exit(1)
                    self._cond.wait_for(self._returned(self._armed))

    def _returned(self, armed: tuple[float, float] | None) -> Callable[[], bool]:
        return lambda: self._armed is not armed
