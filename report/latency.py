"""Step latency with its spread, and when one latency is faster than another beyond that spread.

A step is timed many times on a warm backend (a time budget, at least a few samples); the quartiles say how
much the machine moved while it was measured. A decision between two settings uses them: one is faster only
when its upper quartile is below the other's lower quartile (a shared, noisy machine flips a ranking decided
on medians alone; seen: int8 at 205 ms under load, fp32 at 78 ms when quieter). Each timing also records how
loaded the machine was (load average, and the cores this process kept busy), so a table measured on a busy
machine says so (`load_note`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

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
    load_average: float | None = None  # the machine's 1-minute load average when the timing ended
    own_cores: float | None = None  # this process's CPU time over the wall time of the timed steps
    cpus: int | None = None

    def scaled(self, factor: float) -> StepTiming:
        """The same spread for `factor` steps (a loop of k steps costs k steps)."""
        return replace(self, p25=self.p25 * factor, p50=self.p50 * factor, p75=self.p75 * factor,
                       p95=self.p95 * factor)

    @property
    def other_load(self) -> float | None:
        """Runnable work that was not this process: load average less the cores this process used."""
        if self.load_average is None or self.own_cores is None:
            return None
        return max(0.0, self.load_average - self.own_cores)

    @property
    def busy(self) -> bool:
        """Other work kept at least half the cores busy while this was timed: slower than this CPU runs quiet."""
        other = self.other_load
        return other is not None and bool(self.cpus) and other >= 0.5 * self.cpus


def load_note(timings: Iterable[StepTiming]) -> str | None:
    """One line for a table of timings taken while the machine was busy (None when it was quiet)."""
    busy = [t for t in timings if t.busy]
    if not busy:
        return None
    worst = max(busy, key=lambda t: t.other_load or 0.0)
    return (f"WARNING: timed while the machine was busy (load average {worst.load_average:.1f} on {worst.cpus} "
            f"cores, {worst.other_load:.1f} of it other work): these times are slower than this CPU runs when "
            "quiet; re-measure on a quiet machine (`trm-export report BUNDLE`) before comparing them")


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

    wall_start, cpu_start = start, time.process_time()
    while more():
        start = time.perf_counter()
        backend.step(n)
        times.append(1000.0 * (time.perf_counter() - start))
    own = (time.process_time() - cpu_start) / max(1e-9, time.perf_counter() - wall_start)
    p25, p50, p75, p95 = np.percentile(times, [25, 50, 75, 95])
    return StepTiming(n, len(times), float(p25), float(p50), float(p75), float(p95), _load_average(), own,
                      os.cpu_count())


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None
