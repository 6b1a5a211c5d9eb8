"""Which variant a bundle runs by default: the target's precision, as measured, within the accuracy budget.

A variant that misses the budget is never chosen; the record says which missed and by how much, and what was
chosen instead (the next wider precision that meets it: int8 -> fp16 -> fp32). `best` picks the fastest variant
within the budget by the step latency measured where the export runs (labelled as such: a device's ranking can
differ, and `trm-export report` re-measures there).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from trm_export.calibration.compare import VariantComparison
from trm_export.runtime.solver import Solver

PRECISIONS = ("fp32", "fp16", "int8", "best")


def step_latency_ms(bundle: Path, variants: list[str], batch: int = 64, samples: int = 5,
                    threads: int | None = None) -> dict[str, float]:
    """Median ms per step at `batch`, per variant, on this machine's CPU (one session alive at a time)."""
    out = {}
    for variant in variants:
        solver = Solver(bundle, variant=variant, provider="cpu", batch_size=batch, threads=threads, verify=False)
        n = solver.backend.capacity
        s, d = solver.embedder.state_shape
        zeros = np.zeros((n, s, d), np.float32)
        solver.backend.load(np.arange(n), solver.embedder(np.zeros((n, solver.task.seq_len), np.int64),
                                                          np.zeros(n, np.int64)), zeros, zeros)
        solver.backend.step(n)  # warm-up
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            solver.backend.step(n)
            times.append(1000 * (time.perf_counter() - start))
        out[variant] = statistics.median(times)
        del solver
    return out


def choose_variant(precision: str, comparisons: dict[str, VariantComparison], budget: float,
                   ms_per_step: dict[str, float]) -> tuple[str, dict[str, Any]]:
    """(variant, record) for `precision` in PRECISIONS; `budget` in points of exact accuracy below fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    drops = {"fp32": 0.0, **{v: c.accuracy_drop for v, c in comparisons.items()}}
    within = [v for v, drop in drops.items() if drop <= budget + 1e-9]  # float noise must not drop a tie
    score = {v: (-drops[v], -comparisons[v].final_rel_error if v in comparisons else 0.0) for v in drops}
    if precision == "best":
        chosen = min(within, key=lambda v: (ms_per_step.get(v, float("inf")), drops[v]))
    else:  # int8 -> fp16 -> fp32: the first level with a variant within the budget (fp32 always is)
        for level in PRECISIONS[PRECISIONS.index(precision)::-1]:
            pool = [v for v in within if v == level or v.startswith(f"{level}-")]
            pure = [v for v in pool if v != "int8-mixed"]  # a graph with no float layers is the faster int8
            if pool:
                chosen = max(pure or pool, key=lambda v: score[v])
                break
    missed = {v: round(drops[v], 3) for v in drops if v not in within}
    record = {"asked": precision, "chosen": chosen, "budget_points": budget,
              "accuracy_drop_points": {v: round(d, 3) for v, d in drops.items()}, "missed_budget": missed,
              "ms_per_step_here": {v: round(ms, 3) for v, ms in ms_per_step.items()},
              "puzzles": next((c.puzzles for c in comparisons.values()), None),
              "source": next((c.source for c in comparisons.values()), None)}
    if precision != "best" and not chosen.startswith(precision):
        record["fallback"] = (f"no {precision} variant is within {budget:g} points of fp32 "
                              f"({', '.join(f'{v} -{d:.2f}' for v, d in missed.items()) or 'none built'}): "
                              f"{chosen} chosen instead")
    return chosen, record
