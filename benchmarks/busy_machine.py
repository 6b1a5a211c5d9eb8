"""The same export on a quiet and on a busy machine: are the bundles' decisions the same? (issue #36)

Runs `trm-export MODEL ARGS... -o quiet/NAME` as is, then again with BURNERS processes spinning on every core
(`-o busy/NAME`), and compares the two manifests without what is measured (step times, their load note, the
creation date) and without the files that print those (report/, the device README). Writes the wall time of each
run and every difference to benchmarks/results/busy_machine.md (and .json).

    .venv/bin/python benchmarks/busy_machine.py --target jetson                    # the bundled Sudoku model
    .venv/bin/python benchmarks/busy_machine.py CHECKPOINT --target cpu --name maze   # a paper-size fixture
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MEASURED = {("provenance", "created_at"), ("choice", "ms_per_step_here"), ("choice", "ms_per_step_quartiles_here"),
            ("choice", "timing_load")}


def decisions(bundle: Path) -> dict:
    data = json.loads((bundle / "manifest.json").read_text())
    for section, key in MEASURED:
        data.get(section, {}).pop(key, None)
    data["files"] = {k: v for k, v in data["files"].items() if not k.startswith("report/") and k != "README.md"}
    data.pop("digest", None)
    return data


def differences(a, b, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += differences(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if a == b else [f"{path}: {json.dumps(a)[:200]} != {json.dumps(b)[:200]}"]


def burn(stop: multiprocessing.Event) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10000))


def export(args: list[str], out: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "trm-export"), *args, "-o", str(out), "--force"],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"export failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="checkpoint (default: the bundled Sudoku model)")
    ap.add_argument("--target", default="jetson")
    ap.add_argument("--name", default="sudoku")
    ap.add_argument("--burners", type=int, default=2 * (os.cpu_count() or 1), help="spinning processes (busy run)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/trm-busy-machine"))
    ap.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "busy_machine.md")
    args = ap.parse_args()
    common = ([args.model] if args.model else []) + ["--target", args.target]
    quiet_s = export(common, args.workdir / "quiet" / f"{args.name}.bundle")
    stop = multiprocessing.Event()
    burners = [multiprocessing.Process(target=burn, args=(stop,)) for _ in range(args.burners)]
    for p in burners:
        p.start()
    try:
        busy_s = export(common, args.workdir / "busy" / f"{args.name}.bundle")
        load = os.getloadavg()
    finally:
        stop.set()
        for p in burners:
            p.join()
    diff = differences(decisions(args.workdir / "quiet" / f"{args.name}.bundle"),
                       decisions(args.workdir / "busy" / f"{args.name}.bundle"))
    plan = decisions(args.workdir / "quiet" / f"{args.name}.bundle").get("plan", {})
    result = {"command": " ".join(["trm-export", *common]), "quiet_seconds": round(quiet_s, 1),
              "busy_seconds": round(busy_s, 1), "burners": args.burners, "cpus": os.cpu_count(),
              "load_average_at_end_of_busy_run": [round(x, 2) for x in load], "differences": diff,
              "plan": {k: plan.get(k) for k in ("parity_puzzles", "check_steps", "golden_candidates", "eval_puzzles",
                                                "calib_puzzles", "methods")}}
    args.output.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = ["# The same export on a quiet and a busy machine (`benchmarks/busy_machine.py`, issue #36)", "",
             f"`{result['command']}`: quiet {quiet_s:.0f} s; busy ({args.burners} spinning processes on "
             f"{os.cpu_count()} cores, load average {load[0]:.1f} at its end) {busy_s:.0f} s.", "",
             f"Plan (both): {json.dumps(result['plan'])}", "",
             "Differences in the manifests, apart from measured times, their load note and the date (and the files "
             "that print them: report/, README.md):", ""]
    lines += [f"- {d}" for d in diff] or ["none."]
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
