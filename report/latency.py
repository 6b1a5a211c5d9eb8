"""Step latency with its spread, and when one latency is faster than another beyond that spread.

A step is timed many times on a warm backend (a time budget, at least a few samples); the quartiles say how
much the machine moved while it was measured. A decision between two settings uses them: one is faster only
when its upper quartile is below the other's lower quartile (a shared, noisy machine flips a ranking decided
on medians alone; seen: int8 at 205 ms under load, fp32 at 78 ms when quieter).
"""

from __future__ import annotations

import time
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
    the values), for `seconds` or at least `min_samples` steps, after two warm-up steps."""
    backend = solver.backend
    n = backend.capacity
    s, d = solver.embedder.state_shape
    zeros = np.zeros((n, s, d), np.float32)
    x = solver.embedder(np.zeros((n, solver.task.seq_len), np.int64), np.zeros(n, np.int64))
    backend.load(np.arange(n), x, zeros, zeros)
    for _ in range(2):
        backend.step(n)
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < max_samples and (len(times) < min_samples or time.perf_counter() < deadline):
        start = time.perf_counter()
        backend.step(n)
        times.append(1000.0 * (time.perf_counter() - start))
    p25, p50, p75, p95 = np.percentile(times, [25, 50, 75, 95])
    return StepTiming(n, len(times), float(p25), float(p50), float(p75), float(p95))
