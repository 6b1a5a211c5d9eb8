"""The loop as a service: many callers, one batch, continuous refill across their requests.

    stream = SolverStream("bundle/", batch_size=64)        # starts its loop thread
    future = stream.submit(puzzle_tokens)                  # any thread; returns at once
    future.result().predictions                            # the same SolveResult as Solver.solve
    stream.close()

`Solver.solve` runs one caller's puzzles to the end; a server that did that per request would step a whole batch
until its slowest puzzle halts while other requests wait. Here every submitted puzzle joins one queue, and the
loop thread (`Solver.run_loop`) takes the next queued puzzle into a slot as soon as one halts, whoever sent it. A
puzzle's answer does not depend on its batch neighbours (every op of the step graph is per sample), so each request
gets exactly what `Solver.solve` would give it, with the same settings. Slots go to the requests waiting in
turn, one puzzle each (round robin), so a one-puzzle request sent after a flood of large ones waits for one round
of them, not for every puzzle they hold.

Thread safety: `submit` and `close` may be called from any thread. The stream owns its Solver (its backend holds
the batch); answers are delivered by completing each request's `concurrent.futures.Future` on the loop thread,
so a done-callback should be short.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from trm_export.errors import InputError
from trm_export.runtime.solver import HaltingPolicy, Solver, SolveResult
from trm_export.runtime.validate import validate_puzzles


class _Request:
    def __init__(self, n: int, seq_len: int):
        self.future: Future[SolveResult] = Future()
        self.predictions = np.zeros((n, seq_len), np.int64)
        self.steps = np.zeros(n, np.int32)
        self.q = np.zeros((2, n), np.float32)
        self.remaining = n

    def result(self) -> SolveResult:
        return SolveResult(self.predictions, self.steps, self.q[0], self.q[1])


class SolverStream:
    """A Solver's loop on its own thread, fed by `submit` from any thread; see the module docstring.

    `max_puzzles` bounds one request (a larger one is refused with InputError); `mode`, `max_steps`, `min_steps`
    and `halting` are `Solver.solve`'s and hold for every request."""

    def __init__(self, bundle: str | Path, *, variant: str | None = None, backend: str = "auto",
                 provider: str | None = None, batch_size: int = 64, threads: int | None = None,
                 mode: str = "adaptive", max_steps: int | None = None, min_steps: int = 1,
                 halting: str | HaltingPolicy = "q", max_puzzles: int = 1024):
        self.solver = Solver(bundle, variant=variant, backend=backend, provider=provider, batch_size=batch_size,
                             threads=threads)
        self.settings = self.solver.loop_settings(mode, max_steps, min_steps, halting)
        if isinstance(max_puzzles, bool) or not isinstance(max_puzzles, int) or max_puzzles < 1:
            raise InputError(f"max_puzzles must be an integer >= 1, got {max_puzzles!r}")
        self.max_puzzles = max_puzzles
        self._cond = threading.Condition()
        # Per request with puzzles still queued, in turn order: its (key, tokens, puzzle id, queued at) rows.
        self._turns: deque[deque[tuple[int, np.ndarray, int, float]]] = deque()
        self._owner: dict[int, tuple[_Request, int]] = {}  # key -> (request, row in it), while queued or running
        self._keys = itertools.count()
        self._closed = False
        self._failure: BaseException | None = None
        self._queued_seconds = 0.0  # summed over puzzles: from submit to a slot
        self._thread = threading.Thread(target=self._run, name="trm-solver-stream", daemon=True)
        self._thread.start()

    @property
    def task(self):
        return self.solver.task

    def submit(self, puzzles: object, puzzle_ids: object = None) -> Future[SolveResult]:
        """Queue puzzles ([N, seq_len] tokens, or one puzzle); the future's result is their answers in order.
        A bad request raises InputError here, before anything is queued."""
        tokens, ids = validate_puzzles(puzzles, puzzle_ids, self.task)
        if len(tokens) > self.max_puzzles:
            raise InputError(f"{len(tokens)} puzzles in one request; at most {self.max_puzzles} are taken per request "
                             "(max_puzzles): split it")
        request = _Request(len(tokens), self.task.seq_len)
        if not len(tokens):
            request.future.set_result(request.result())
            return request.future
        with self._cond:
            if self._closed or self._failure is not None:
                raise RuntimeError(f"the solver stream is closed{self._failure_words()}")
            now = time.monotonic()
            rows: deque[tuple[int, np.ndarray, int, float]] = deque()
            for row in range(len(tokens)):
                key = next(self._keys)
                self._owner[key] = (request, row)
                rows.append((key, tokens[row], int(ids[row]), now))
            self._turns.append(rows)
            self._cond.notify()
        return request.future

    def close(self, timeout: float | None = None) -> None:
        """Stop after the puzzles already queued; requests still unanswered after that get an error."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def __enter__(self) -> SolverStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def pending(self) -> int:
        """Puzzles queued or in the batch, not yet answered."""
        with self._cond:
            return len(self._owner)

    def queued_seconds(self) -> float:
        """Seconds puzzles waited in the queue for a slot, summed over every puzzle taken so far (a counter: its
        growth over an interval, divided by the puzzles taken in it, is the mean queue wait)."""
        with self._cond:
            return self._queued_seconds

    # The feed that Solver.run_loop reads (runtime.solver.PuzzleFeed); called on the loop thread only.
    def take(self, n: int, wait: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with self._cond:
            while wait and not self._turns and not self._closed:
                self._cond.wait()
            rows = []
            while len(rows) < n and self._turns:  # one puzzle per waiting request in turn
                request = self._turns.popleft()
                rows.append(request.popleft())
                if request:
                    self._turns.append(request)
            now = time.monotonic()
            self._queued_seconds += sum(now - r[3] for r in rows)
        seq_len = self.task.seq_len
        if not rows:
            return np.zeros((0, seq_len), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        keys = np.array([r[0] for r in rows], np.int64)
        return np.stack([r[1] for r in rows]), np.array([r[2] for r in rows], np.int64), keys

    def finish(self, keys, predictions, steps, q_halt, q_continue) -> None:
        complete = []
        with self._cond:
            for i, key in enumerate(keys.tolist()):
                request, row = self._owner.pop(key)
                request.predictions[row], request.steps[row] = predictions[i], steps[i]
                request.q[0, row], request.q[1, row] = q_halt[i], q_continue[i]
                request.remaining -= 1
                if not request.remaining:
                    complete.append(request)
        for request in complete:  # outside the lock: a done-callback may submit again
            request.future.set_result(request.result())

    def _run(self) -> None:
        try:
            self.solver.run_loop(self, self.settings, refill=True)
        except BaseException as exc:  # a broken graph (NaN), out of memory: every waiting request hears of it
            with self._cond:
                self._failure = exc
                waiting = {id(request): request for request, _ in self._owner.values()}
                self._owner.clear()
                self._turns.clear()
        else:
            with self._cond:
                waiting = {id(request): request for request, _ in self._owner.values()}
                self._owner.clear()
        error = RuntimeError(f"the solver stream stopped before answering{self._failure_words()}")
        for request in waiting.values():
            if not request.future.done():
                request.future.set_exception(error)

    def _failure_words(self) -> str:
        return f": {type(self._failure).__name__}: {self._failure}" if self._failure is not None else ""
