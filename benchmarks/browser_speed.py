"""Milliseconds per step in headless Chromium (onnxruntime-web, WebAssembly, threads on and off) against the
Python runtime (ONNX Runtime, native) on the same machine, same bundle, same batch (issue #19).

    .venv/bin/python benchmarks/browser_speed.py                    # both reference models, ~10 minutes
    .venv/bin/python benchmarks/browser_speed.py --models sudoku_mlpt --rounds 1 --seconds 1

Each model is exported once with --target browser (small parity and golden budgets: only the graph is timed),
then rounds interleave: Python at 1 and 2 threads, the page at 1 and 2 threads, each at batch 1 and 64. A page
round is a fresh Chromium on `trm-export serve`'s server, so that WebAssembly threads are on (cross-origin
isolated); it times the step through the page's own runtime (window.trm.timeSteps: the session run, feeds and
state copies, not the embedding). Python times Solver.backend.step, the same work. The result is the ratio
per round; the medians go to benchmarks/results/browser_speed.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from trm_export.export.pipeline import ExportOptions, export_bundle
from trm_export.reference_models import reference_model_path
from trm_export.report.measure import cpu_model
from trm_export.runtime.selfcheck import load_golden
from trm_export.runtime.solver import Solver
from trm_export.web.bundle import WEB_DIR, pinned_version
from trm_export.web.serve import make_server, start_in_thread

REPO = Path(__file__).resolve().parent.parent


def python_ms(bundle: Path, batch: int, threads: int, seconds: float) -> float:
    solver = Solver(bundle, batch_size=batch, threads=threads)
    golden = load_golden(solver)
    tokens = golden["tokens"][[0] * batch]
    solver.backend.load(np.arange(batch), solver.embedder(tokens, golden["puzzle_ids"][[0] * batch]),
                        *solver.embedder.initial_state(batch))
    solver.backend.step(batch)
    start, steps = time.perf_counter(), 0
    while steps < 3 or time.perf_counter() - start < seconds:
        solver.backend.step(batch)
        steps += 1
    return 1000 * (time.perf_counter() - start) / steps


def page_ms(url: str, batches: list[int], threads: int, seconds: float) -> dict[int, float]:
    done = subprocess.run(["node", "tests/page.mjs", f"{url}?threads={threads}", "--bench",
                           ",".join(map(str, batches)), "--bench-seconds", str(seconds)],
                          capture_output=True, text=True, cwd=WEB_DIR, timeout=1800)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if out.get("status") != "ready" or "bench" not in out:
        raise SystemExit(f"page failed: {out}")
    if out["threads"] != threads:
        raise SystemExit(f"page ran {out['threads']} threads, asked for {threads} (not cross-origin isolated?)")
    return {b["batch"]: b["ms_per_step"] for b in out["bench"]}


def cpu_flags() -> str:
    """The SIMD the two engines can use here: native ONNX Runtime takes AVX-512 where it exists, WebAssembly's
    SIMD is 128 bits wide on any CPU."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split())
    except (OSError, IndexError):
        return "unknown"
    return ", ".join(f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="sudoku_mlpt,maze_att")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0, help="per timing")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/trm-browser-speed"))
    ap.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "browser_speed.md")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    results: dict = {"measured": datetime.now(timezone.utc).isoformat(timespec="minutes"), "cpu": cpu_model(),
                     "cores": os.cpu_count(), "cpu_flags": cpu_flags(), "onnxruntime_web": pinned_version(),
                     "load_at_start": os.getloadavg(),
                     "machine": platform.machine(), "seconds": args.seconds, "rounds": args.rounds, "models": {}}
    chromium = subprocess.run(["/usr/bin/chromium", "--version"], capture_output=True, text=True).stdout.strip()
    results["chromium"] = chromium
    for name in args.models.split(","):
        bundle = args.workdir / f"{name}.bundle"
        if not (bundle / "manifest.json").exists():
            print(f"exporting {name} --target browser to {bundle}", flush=True)
            export_bundle(reference_model_path(name), bundle, ExportOptions(
                target="browser", force=True, progress=False, parity_puzzles=16))
        server = make_server(bundle, port=0)
        url = start_in_thread(server)
        rows: dict[str, dict[str, list[float]]] = {}
        try:
            for r in range(args.rounds):
                for threads in (1, 2):
                    for b in batches:
                        rows.setdefault(f"python t{threads}", {}).setdefault(str(b), []).append(
                            python_ms(bundle, b, threads, args.seconds))
                    for b, ms in page_ms(url, batches, threads, args.seconds).items():
                        rows.setdefault(f"chromium t{threads}", {}).setdefault(str(b), []).append(ms)
                print(f"{name} round {r + 1}/{args.rounds}: " + json.dumps(
                    {k: {b: round(v[-1], 2) for b, v in row.items()} for k, row in rows.items()}), flush=True)
        finally:
            server.shutdown()
            server.server_close()
        results["models"][name] = rows
    results["load_at_end"] = os.getloadavg()
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    args.output.write_text(render(results, batches))
    print(f"wrote {args.output}")


def render(results: dict, batches: list[int]) -> str:
    lines = ["# The step in the browser against the Python runtime (issue #19)", "",
             f"Measured {results['measured']} with `benchmarks/browser_speed.py` on {results['cpu']} "
             f"({results['cores']} cores, {results.get('cpu_flags', 'flags not recorded')}; load average "
             f"{results['load_at_start'][0]:.1f} at start, "
             f"{results['load_at_end'][0]:.1f} at the end); {results['chromium']} headless, onnxruntime-web "
             f"{results['onnxruntime_web']} (WebAssembly, SIMD; threads when cross-origin isolated) against ONNX "
             "Runtime's native CPU build in the Python runtime. Milliseconds per step of the fp32 step graph, median "
             f"of {results['rounds']} interleaved rounds of {results['seconds']:g} s each; the ratio is the page's "
             "time over Python's at the same threads (lower is better for the page).", ""]
    for name, rows in results["models"].items():
        lines += [f"## {name}", "", "| batch | threads | Python (ms/step) | Chromium (ms/step) | page / Python |",
                  "|---|---|---|---|---|"]
        for b in map(str, batches):
            for t in (1, 2):
                py = statistics.median(rows[f"python t{t}"][b])
                web = statistics.median(rows[f"chromium t{t}"][b])
                ratios = [w / p for w, p in zip(rows[f"chromium t{t}"][b], rows[f"python t{t}"][b], strict=True)]
                lines.append(f"| {b} | {t} | {py:.2f} | {web:.2f} | {statistics.median(ratios):.2f}x |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
