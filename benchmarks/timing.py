"""Timing helper shared by the benchmarks (run as scripts: `python benchmarks/NAME.py`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def call_times(fn: Callable[[], object], repeats: int, warmup: bool = True) -> list[float]:
    """Wall time of each of `repeats` calls of `fn`, after one untimed warm-up call."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_time(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """Median wall time of `fn` over `repeats` calls, after one untimed warm-up call."""
    return statistics.median(call_times(fn, repeats, warmup))
