"""Triton serving under load against the single-process runtime, in one run (issue #20).

The reference Sudoku model (mixed difficulty: its held-out puzzles halt after 1 to 16 steps) is exported once, then
served by a real tritonserver (nvidia-pytriton's, scripts/triton_env.sh) from `trm-export triton`'s repository.
The load: --clients concurrent clients x --requests requests of 1..4 distinct puzzles each, over HTTP and then
gRPC (trm_export.triton.load: every answer checked against the runtime's). The baseline: the same puzzles, in
the same order, through one `Solver.solve` with refill in this process (batch 64, the server's slots), measured
before and after the server rounds; the ratio is server throughput over the mean of the two.

    .venv/bin/python benchmarks/triton_load.py                  # 16 clients x 200 requests
Results: benchmarks/results/triton_load.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from trm_export.calibration.data import task_split
from trm_export.export.pipeline import ExportOptions, export_bundle
from trm_export.reference_models import reference_model_path
from trm_export.report.measure import cpu_model
from trm_export.runtime.solver import Solver
from trm_export.triton.load import run_load
from trm_export.triton.repository import TritonOptions, write_repository
from trm_export.triton.server import TritonServer
from trm_export.triton.serving import LoopParameters

REPO = Path(__file__).resolve().parent.parent


def baseline(bundle: Path, puzzles: np.ndarray, batch: int) -> float:
    """Puzzles per second of one Solver.solve (adaptive, refill) over all the load's puzzles."""
    solver = Solver(bundle, batch_size=batch)
    solver.solve(puzzles[:batch])  # warm-up
    began = time.perf_counter()
    solver.solve(puzzles)
    return len(puzzles) / (time.perf_counter() - began)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=200, help="per client")
    ap.add_argument("--pool", type=int, default=500, help="distinct held-out puzzles the requests draw from")
    ap.add_argument("--batch", type=int, default=64, help="the loop's slots (server and baseline)")
    ap.add_argument("--protocols", default="http,grpc")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/trm-triton-load"))
    ap.add_argument("--env", default=None, help="the nvidia-pytriton environment (default: .venv-triton)")
    ap.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "triton_load.md")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle = args.workdir / "sudoku_mlpt.bundle"
    if not (bundle / "manifest.json").exists():
        print(f"exporting sudoku_mlpt to {bundle}", flush=True)
        export_bundle(reference_model_path("sudoku_mlpt"), bundle, ExportOptions(
            force=True, progress=False, parity_puzzles=32))
    repository = write_repository(bundle, args.workdir / "repository", TritonOptions(
        loop=LoopParameters(batch_size=args.batch, max_puzzles=16), force=True))
    solver = Solver(bundle, batch_size=args.batch)
    pool = task_split(solver.manifest, "heldout", args.pool).tokens
    expected = solver.solve(pool)
    print(f"pool: {len(pool)} puzzles, steps {np.bincount(expected.steps_used).tolist()} (count per step)", flush=True)

    results: dict = {"measured": datetime.now(timezone.utc).isoformat(timespec="minutes"), "cpu": cpu_model(),
                     "cores": os.cpu_count(), "machine": platform.machine(), "load_at_start": os.getloadavg(),
                     "clients": args.clients, "requests_per_client": args.requests, "batch": args.batch,
                     "pool_steps": np.bincount(expected.steps_used).tolist(), "mean_steps":
                     float(expected.steps_used.mean()), "runs": []}
    rng = np.random.default_rng(0)
    order = pool[rng.integers(0, len(pool), size=args.clients * args.requests * 5 // 2)]  # the load's puzzle count
    base = [baseline(bundle, order, args.batch)]
    print(f"single-process runtime: {base[0]:.1f} puzzles/s", flush=True)
    with TritonServer(repository, args.env, log=args.workdir / "tritonserver.log") as server:
        for protocol in args.protocols.split(","):
            url = server.http_url if protocol == "http" else server.grpc_url
            load = run_load(url, "trm", protocol, args.clients, args.requests, pool, expected.predictions,
                            expected.steps_used, seed=len(results["runs"]))
            print(load.summary(), flush=True)
            results["runs"].append(load.to_dict())
    base.append(baseline(bundle, order, args.batch))
    print(f"single-process runtime again: {base[1]:.1f} puzzles/s", flush=True)
    results["baseline_puzzles_per_second"] = base
    for run in results["runs"]:
        run["ratio_to_runtime"] = run["puzzles_per_second"] / float(np.mean(base))
    results["load_at_end"] = os.getloadavg()
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    args.output.write_text(render(results))
    print(f"wrote {args.output}")


def render(r: dict) -> str:
    lines = [
        "# Triton serving under load (issue #20)",
        "",
        f"Measured {r['measured']} with `benchmarks/triton_load.py` on {r['cpu']} ({r['cores']} cores, "
        f"{r['machine']}); load average at start {[round(x, 2) for x in r['load_at_start']]}, at end "
        f"{[round(x, 2) for x in r['load_at_end']]}. Model: the reference Sudoku bundle (sudoku_mlpt, fp32), adaptive "
        f"halting on the Q head, {r['batch']} slots; its held-out pool halts after {r['mean_steps']:.2f} steps on "
        f"average (count per step 0..16: {r['pool_steps']}).",
        "",
        f"Load: {r['clients']} concurrent clients x {r['requests_per_client']} requests of 1-4 distinct puzzles, "
        "every answer and step count checked against the runtime's. Baseline: the same number of puzzles through one "
        "`Solver.solve` with refill in one process, before and after the server rounds "
        f"({', '.join(f'{b:.1f}' for b in r['baseline_puzzles_per_second'])} puzzles/s).",
        "",
        "| protocol | puzzles | seconds | puzzles/s | / runtime | p50 ms | p95 ms | p99 ms | answered | wrong "
        "| failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in r["runs"]:
        lines.append(f"| {run['protocol']} | {run['puzzles']} | {run['seconds']:.1f} | {run['puzzles_per_second']:.1f} "
                     f"| {100 * run['ratio_to_runtime']:.0f}% | {run['p50_ms']:.0f} | {run['p95_ms']:.0f} | "
                     f"{run['p99_ms']:.0f} | {run['answered']} | {run['wrong']} | {run['failed']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
