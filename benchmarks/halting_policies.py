"""Halting policies on the shipped reference models: fixed budgets, the Q head, and answer-stability halting.

    python benchmarks/halting_policies.py [sudoku_mlpt maze_att] [--bundle PATH ...] [--puzzles 1000]
        [--threads N] [--verify-puzzles 256] [--json out.json] [--markdown out.md]

The official evaluation ignores the Q head and always runs 16 steps; `Solver.solve(halting=...)` offers "q" (the
trained Q head), "stable:K" (halt once the answer, the argmax of the logits, has not changed for K consecutive
steps) and "q+stable:K" (whichever says halt first). For each model (exported to a temporary CPU bundle, parity
checked on 64 puzzles, unless --bundle gives one) ONE fixed run of 16 steps over the held-out puzzles
(`report.trajectory.run_trajectory`) gives every setting: fixed 1/2/4/8/16, Q halting, stable:1/2/3 and
q+stable:2, each capped at 16: exact accuracy with its 95% Wilson interval, token accuracy and mean steps. Each
halting policy is then run for real through `Solver.solve` on the first --verify-puzzles puzzles, and its
steps and answers must be the trajectory's (the benchmark fails otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from trm_export.report.measure import host_description
from trm_export.report.trajectory import run_trajectory
from trm_export.runtime.io import task_for_encoding
from trm_export.runtime.solver import Solver

MODELS = ("sudoku_mlpt", "maze_att")
BUDGETS = (1, 2, 4, 8, 16)
POLICIES = ("q", "stable:1", "stable:2", "stable:3", "q+stable:2")
RESULTS = Path(__file__).resolve().parent / "results"


def _export(name: str, work: Path) -> Path:
    from trm_export.export.pipeline import ExportOptions, export_bundle
    from trm_export.reference_models import reference_model_path

    out, _, _ = export_bundle(reference_model_path(name), work / f"{name}.bundle",
                              ExportOptions(target="cpu", parity_puzzles=64, progress=False))
    return out


def measure(name: str, bundle: Path, puzzles: int, threads: int | None, verify_puzzles: int) -> dict:
    solver = Solver(bundle, batch_size=64, threads=threads)
    data = task_for_encoding(solver.manifest.task).split("heldout", size=puzzles)
    cap = max(BUDGETS)
    start = time.perf_counter()

    def progress(done: int) -> None:
        print(f"  {name}: trajectory {done}/{len(data)} puzzles, {time.perf_counter() - start:.0f} s", flush=True)

    trajectory = run_trajectory(solver, data.inputs, data.puzzle_ids, data.labels, cap, on_chunk=progress)
    rows = []
    for o in [trajectory.fixed(b) for b in BUDGETS] + [trajectory.adaptive(cap, 1, p) for p in POLICIES]:
        low, high = o.interval
        policy = "fixed" if o.mode == "fixed" else ("q" if o.mode == "adaptive" else o.mode)
        rows.append({"policy": policy, "budget": o.budget, "puzzles": o.puzzles, "solved": o.solved,
                     "exact_accuracy": o.exact_accuracy, "exact_low": low, "exact_high": high,
                     "token_accuracy": o.token_accuracy, "mean_steps": o.mean_steps})
    # What run longer does to an answer: right at some step, wrong after 16.
    ever = int(trajectory.exact.any(axis=0).sum())
    spoiled = int((trajectory.exact.any(axis=0) & ~trajectory.exact[-1]).sum())
    verified = {}
    n = min(verify_puzzles, len(data))
    for policy in POLICIES:  # the trajectory's figures are what the runtime does
        got = solver.solve(data.inputs[:n], data.puzzle_ids[:n], max_steps=cap, halting=policy)
        steps = trajectory.halting_steps(cap, 1, policy)[:n]
        same_steps = bool(np.array_equal(got.steps_used, steps))
        right = np.all(got.predictions == data.labels[:n], axis=1)
        same_right = bool(np.array_equal(right, trajectory.exact[steps - 1, np.arange(n)]))
        if not (same_steps and same_right):
            raise SystemExit(f"{name} {policy}: Solver.solve disagrees with the trajectory (steps identical: "
                             f"{same_steps}, correctness identical: {same_right})")
        verified[policy] = n
    print(f"  {name}: Solver.solve agrees with the trajectory on the first {n} puzzles for every policy", flush=True)
    return {"bundle": str(bundle), "variant": solver.variant, "halting_rule": trajectory.halting_rule,
            "puzzles": len(data), "steps": cap, "solved_at_some_step": ever, "right_at_some_step_wrong_at_16": spoiled,
            "seconds": time.perf_counter() - start, "verified_with_solver": verified, "rows": rows}


def _label(row: dict) -> str:
    if row["policy"] == "fixed":
        return f"fixed {row['budget']}"
    return f"{'q (Q head)' if row['policy'] == 'q' else row['policy']}, cap {row['budget']}"


def markdown(results: dict) -> str:
    lines = [f"# Halting policies (`benchmarks/halting_policies.py`, {results['date']})", "",
             f"Measured on {results['host']}, ONNX Runtime CPU, fp32 bundles exported from the shipped reference "
             "models; the held-out split. One fixed run of 16 steps per model gives every row; every halting "
             "policy was also run through `Solver.solve` on the first puzzles (the number is in each section) and "
             "matched it exactly: the same steps and the same correct answers.", ""]
    for name, m in results["models"].items():
        checked = min(m["verified_with_solver"].values())
        base = next(r for r in m["rows"] if r["policy"] == "fixed" and r["budget"] == m["steps"])
        lines += [f"## {name} ({m['puzzles']} puzzles, Q rule `{m['halting_rule']}`)", "",
                  "| policy | exact accuracy [95% CI] | vs fixed 16 | token accuracy | mean steps |",
                  "|---|---|---|---|---|"]
        for r in m["rows"]:
            drop = 100 * (r["exact_accuracy"] - base["exact_accuracy"])
            lines.append(f"| {_label(r)} | {100 * r['exact_accuracy']:.1f}% [{100 * r['exact_low']:.1f}, "
                         f"{100 * r['exact_high']:.1f}] | {drop:+.1f} | "
                         f"{100 * r['token_accuracy']:.2f}% | {r['mean_steps']:.2f} |")
        lines += ["", f"Right at some step of 16: {m['solved_at_some_step']} puzzles; of them right at some step but "
                  f"wrong after step 16: {m['right_at_some_step_wrong_at_16']}. Checked against `Solver.solve`: the "
                  f"first {checked} puzzles, every policy.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=list(MODELS))
    parser.add_argument("--bundle", type=Path, action="append", default=[],
                        help="An exported bundle per model, in order (default: export each to a temporary folder).")
    parser.add_argument("--puzzles", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--verify-puzzles", type=int, default=256)
    parser.add_argument("--json", type=Path, default=RESULTS / "halting_policies.json")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "halting_policies.md")
    args = parser.parse_args()
    results = {"date": time.strftime("%Y-%m-%d"), "host": host_description(), "budgets": list(BUDGETS),
               "policies": list(POLICIES), "models": {}}
    with tempfile.TemporaryDirectory(prefix="halting-bench.") as tmp:
        for i, name in enumerate(args.models):
            if i < len(args.bundle):
                bundle = args.bundle[i]
            else:
                print(f"{name}: exporting a CPU bundle (parity on 64 puzzles)", flush=True)
                bundle = _export(name, Path(tmp))
            results["models"][name] = measure(name, bundle, args.puzzles, args.threads, args.verify_puzzles)
            for r in results["models"][name]["rows"]:
                print(f"  {name}: {_label(r):<18} exact {100 * r['exact_accuracy']:5.1f}% "
                      f"[{100 * r['exact_low']:.1f}, {100 * r['exact_high']:.1f}], mean steps "
                      f"{r['mean_steps']:.2f}", flush=True)
            if i >= len(args.bundle):
                results["models"][name]["bundle"] = f"a temporary CPU export of reference_models/{name}"
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    args.markdown.write_text(markdown(results))
    print(f"wrote {args.json} and {args.markdown}", file=sys.stderr)


if __name__ == "__main__":
    main()
