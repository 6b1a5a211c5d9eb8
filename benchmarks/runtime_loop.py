"""Runtime loop benchmark: overhead over raw graph calls, and continuous refill vs wait-for-the-batch.

    python benchmarks/runtime_loop.py BUNDLE [--puzzles 1000] [--threads 2] [--json out.json]

1. Loop overhead: `Solver.solve(mode="fixed")` against the same number of bare `run_with_iobinding` calls on
   the same session and batch (what any hand-written loop must pay at least), at batch 1 and batch 64.
   Overhead = solve time / raw time - 1.
2. Adaptive halting on the bundle's held-out puzzles, two schedulers over the same slots: continuous refill
   (a halted puzzle's slot takes the next puzzle) and wait-for-the-whole-batch. Puzzles/s ratio, exact accuracy
   of both (they must be equal: scheduling never changes an answer).
Timings are medians of repeats in one process, reported as ratios.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from timing import median_time  # benchmarks/ is on sys.path when run as a script

from trm_export.runtime.io import task_for_encoding
from trm_export.runtime.solver import Solver
from trm_export.tasks import exact_accuracy


def loop_overhead(bundle: Path, tokens: np.ndarray, batch: int, threads: int | None, repeats: int) -> dict:
    solver = Solver(bundle, batch_size=batch, threads=threads)
    steps = solver.manifest.loop.halt_max_steps
    work = tokens[:batch]
    solver.solve(work, mode="fixed")  # warm-up
    backend = solver.backend

    def raw() -> None:
        for _ in range(steps):
            backend.step(batch)

    t_raw = median_time(raw, repeats)
    t_loop = median_time(lambda: solver.solve(work, mode="fixed"), repeats)
    return {"batch": batch, "steps": steps, "raw_s": t_raw, "loop_s": t_loop, "overhead": t_loop / t_raw - 1}


def refill_vs_wait(bundle: Path, data, batch: int, threads: int | None, repeats: int) -> dict:
    solver = Solver(bundle, batch_size=batch, threads=threads)
    out = {}
    for name, refill in (("refill", True), ("wait", False)):
        result = solver.solve(data.inputs, mode="adaptive", refill=refill)
        seconds = median_time(lambda r=refill: solver.solve(data.inputs, mode="adaptive", refill=r), repeats)
        out[name] = {"puzzles_per_s": len(data) / seconds, "exact_accuracy": exact_accuracy(result.predictions,
                                                                                            data.labels),
                     "mean_steps": float(result.steps_used.mean())}
    out["speedup"] = out["refill"]["puzzles_per_s"] / out["wait"]["puzzles_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--puzzles", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    manifest = Solver(args.bundle).manifest
    task = task_for_encoding(manifest.task)
    data = task.split("heldout", size=args.puzzles)
    results = {"bundle": str(args.bundle), "overhead": [], "scheduling": None}
    for batch in (1, 64):
        r = loop_overhead(args.bundle, data.inputs, batch, args.threads, args.repeats)
        results["overhead"].append(r)
        print(f"batch {batch:>3}: raw {r['raw_s'] * 1e3:8.1f} ms, loop {r['loop_s'] * 1e3:8.1f} ms for "
              f"{r['steps']} steps -> loop overhead {100 * r['overhead']:+.2f}%", flush=True)
    s = refill_vs_wait(args.bundle, data, 64, args.threads, max(1, args.repeats - 2))
    results["scheduling"] = s
    for name in ("refill", "wait"):
        print(f"adaptive, {name:>6}: {s[name]['puzzles_per_s']:7.1f} puzzles/s, exact accuracy "
              f"{100 * s[name]['exact_accuracy']:.1f}%, mean steps {s[name]['mean_steps']:.2f}")
    print(f"continuous refill / wait-for-batch: {s['speedup']:.2f}x puzzles/s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
