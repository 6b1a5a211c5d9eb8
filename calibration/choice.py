"""Which variant a bundle runs by default: the target's precision, as measured, within the accuracy budget.

A variant that misses the budget is never chosen; the record says which missed and by how much, and what was
chosen instead (the next wider precision that meets it: int8 -> fp16 -> fp32). `best` picks the fastest variant
within the budget by the step latency measured where the export runs (labelled as such: a device's ranking can
differ, and `trm-export report` re-measures there); variants whose timing spreads overlap count as equally fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trm_export.calibration.compare import VariantComparison
from trm_export.report.latency import StepTiming, faster_beyond_noise, time_steps
from trm_export.runtime.solver import Solver

PRECISIONS = ("fp32", "fp16", "int8", "best")


def step_timings(bundle: Path, variants: list[str], batch: int, threads: int | None = None,
                 seconds: float = 1.0) -> dict[str, tuple[StepTiming, StepTiming]]:
    """(batch 1, batch `batch`) step timings per variant on this machine's CPU, one session alive at a time."""
    out = {}
    for variant in variants:
        timing = []
        for size in sorted({1, batch}):  # a paper-size model is timed at batch 1 only: once
            solver = Solver(bundle, variant=variant, provider="cpu", batch_size=size, threads=threads, verify=False)
            timing.append(time_steps(solver, seconds))
            del solver
        out[variant] = (timing[0], timing[-1])
    return out


def _timing(value: StepTiming | float) -> StepTiming:
    if isinstance(value, StepTiming):
        return value
    return StepTiming(0, 1, float(value), float(value), float(value), float(value))


def choose_variant(precision: str, comparisons: dict[str, VariantComparison], budget: float,
                   ms_per_step: dict[str, StepTiming | float]) -> tuple[str, dict[str, Any]]:
    """(variant, record) for `precision` in PRECISIONS; `budget` in points of exact accuracy below fp32.

    `ms_per_step`: step timings here (or plain milliseconds). `best` takes the fastest variant within the budget;
    where variants cannot be told apart by their timing spread, the most accurate of them."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    drops = {"fp32": 0.0, **{v: c.accuracy_drop for v, c in comparisons.items()}}
    within = [v for v, drop in drops.items() if drop <= budget + 1e-9]  # float noise must not drop a tie
    score = {v: (-drops[v], -comparisons[v].final_rel_error if v in comparisons else 0.0) for v in drops}
    timings = {v: _timing(t) for v, t in ms_per_step.items()}
    equivalent: list[str] = []
    if precision == "best":
        timed = [v for v in within if v in timings] or within
        fastest = min(timed, key=lambda v: (timings[v].p50 if v in timings else float("inf"), drops[v]))
        tied = [v for v in timed if v == fastest or (fastest in timings and v in timings
                                                     and not faster_beyond_noise(timings[fastest], timings[v]))]
        chosen = min(tied, key=lambda v: (drops[v], timings[v].p50 if v in timings else float("inf")))
        equivalent = [v for v in tied if v != chosen]
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
              "ms_per_step_here": {v: round(t.p50, 3) for v, t in timings.items()},
              "ms_per_step_quartiles_here": {v: [round(t.p25, 3), round(t.p75, 3)] for v, t in timings.items()},
              "timed_at_batch": next((t.batch for t in timings.values()), None),
              "puzzles": next((c.puzzles for c in comparisons.values()), None),
              "source": next((c.source for c in comparisons.values()), None)}
    if equivalent:
        record["equivalent_speed"] = equivalent  # timing spreads overlap: chosen among them by accuracy
    if precision != "best" and not chosen.startswith(precision):
        record["fallback"] = (f"no {precision} variant is within {budget:g} points of fp32 "
                              f"({', '.join(f'{v} -{d:.2f}' for v, d in missed.items()) or 'none built'}): "
                              f"{chosen} chosen instead")
    return chosen, record
