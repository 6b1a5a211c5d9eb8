"""Step latency with its spread, and when one latency is faster than another beyond that spread.

A step is timed many times on a warm backend (a time budget, at least a few samples); the quartiles say how
much the machine moved while it was measured. A decision between two settings uses them: one is faster only
when its upper quartile is below the other's lower quartile (a shared, noisy machine flips a ranking decided
on medians alone; seen: int8 at 205 ms under load, fp32 at 78 ms when quieter).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from trm_export.runtime.solver import Solver


@dataclass(frozen=True)
class StepTiming:
    """Milliseconds per step of a backend at `batch`, from `samples` timed steps."""

    batch: int
    samples: int
    p25: float
    p50: float
    p75: float
    p95: float

    def scaled(self, factor: float) -> StepTiming:
        """The same spread for `factor` steps (a loop of k steps costs k steps)."""
        return StepTiming(self.batch, self.samples, self.p25 * factor, self.p50 * factor, self.p75 * factor,
                          self.p95 * factor)


def faster_beyond_noise(a: StepTiming, b: StepTiming) -> bool:
    """`a` is faster than `b` by more than either's spread (interquartile ranges apart)."""
    return a.p75 < b.p25


def time_steps(solver: Solver, seconds: float = 1.0, min_samples: int = 5, max_samples: int = 500) -> StepTiming:
    """Time single steps of `solver`'s backend with every slot full (zero puzzles: the work does not depend on
    the values), for `seconds` or at least `min_samples` steps, after two warm-up steps.

    A step slower than the budget (a paper-size model at a large batch) gets one warm-up step, and `min_samples`
    holds only while the time spent stays within four budgets: at least one sample, never minutes of them."""
    backend = solver.backend
    n = backend.capacity
    s, d = solver.embedder.state_shape
    zeros = np.zeros((n, s, d), np.float32)
    x = solver.embedder(np.zeros((n, solver.task.seq_len), np.int64), np.zeros(n, np.int64))
    backend.load(np.arange(n), x, zeros, zeros)
    start = time.perf_counter()
    backend.step(n)
    if time.perf_counter() - start < seconds:
        backend.step(n)
    times: list[float] = []
    start = time.perf_counter()
    deadline, hard = start + seconds, start + 4 * seconds

    def more() -> bool:
        now = time.perf_counter()
        return not times or (len(times) < max_samples and (now < deadline or (len(times) < min_samples and
                                                                             now < hard)))

    while more():
        start = time.perf_counter()
        backend.step(n)
        times.append(1000.0 * (time.perf_counter() - start))
    p25, p50, p75, p95 = np.percentile(times, [25, 50, 75, 95])
    return StepTiming(n, len(times), float(p25), float(p50), float(p75), float(p95))


def budget_chunks(total: int, capacity: int, seconds: float | None) -> Iterator[slice]:
    """Consecutive slices of `total` items to process within `seconds` (None: all of them, `capacity` at a time).

    With a budget the first slice is one item, each next one as many as the rate so far says still fit (at most
    `capacity`), and none starts unless one more item does: a paper-size model, where one item can take a minute,
    stays within it too (one item at least). The caller times nothing; the slices it was given cover what was done."""
    started, start = time.perf_counter(), 0
    while start < total:
        size = capacity
        if seconds is not None:
            spent = time.perf_counter() - started
            fit = 1 if not start else int(min(capacity, (seconds - spent) / (spent / start)))
            if fit < 1:
                return
            size = fit
        stop = min(start + size, total)
        yield slice(start, stop)
        start = stop


TIMING_STEP_SECONDS = 0.5  # the largest batch timed: the target's, or what one step does in about this long here


def affordable_batch(target_batch: int, seconds_per_puzzle_step: float) -> int:
    """The target's batch, or the largest power of two whose step takes about TIMING_STEP_SECONDS here: timing a
    paper-size model at batch 64 on a CPU would take minutes per sample."""
    if target_batch * seconds_per_puzzle_step <= TIMING_STEP_SECONDS:
        return target_batch
    return max(1, 1 << int(np.log2(max(1.0, TIMING_STEP_SECONDS / seconds_per_puzzle_step))))
