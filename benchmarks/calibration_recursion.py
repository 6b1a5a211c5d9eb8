"""Recursion-aware INT8 calibration against generic step-1-only calibration, through the whole loop.

    python benchmarks/calibration_recursion.py BUNDLE_OR_CHECKPOINT [--methods minmax,entropy,percentile]
        [--calib-puzzles 256] [--eval-puzzles 1000] [--max-samples 512] [--threads N] [--json out.json]

For each calibration method, two INT8 graphs are built from the same calibration puzzles and the same sample
budget: one calibrated on the step graph's inputs at every step of the FP32 loop (what `trm-export` does),
one on the inputs of step 1 only (what a generic one-forward-pass PTQ sees). Both run the evaluation puzzles
(the task's held-out split) through the runtime's loop for the bundle's full step count and are compared with
FP32: exact and token accuracy, answers identical to FP32, and the z_H drift curve (relative error and cosine
similarity against FP32 at every step; the table shows its end values). Step 1 offers one sample per
puzzle, so with the same puzzles the step-1 variant has at most as many samples as there are puzzles.

A checkpoint (anything that is not a bundle folder) is first exported to a temporary bundle for the CPU
target (parity checked on 64 puzzles).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import onnx

from trm_export.calibration import (
    METHODS,
    CalibrationSettings,
    CompareOptions,
    Int8Options,
    RecordOptions,
    calibrate,
    compare_graph,
    quantize_int8,
    record_step_inputs,
    run_fp32,
    task_split,
)
from trm_export.calibration.graph import compact_graph, prepare_graph
from trm_export.runtime.manifest import MANIFEST_NAME, read_manifest


def _bundle(path: Path, work: Path) -> Path:
    if (path / MANIFEST_NAME).is_file():
        return path
    from trm_export.export.pipeline import ExportOptions, export_bundle

    out, _, _ = export_bundle(path, work / "bundle", ExportOptions(parity_puzzles=64, progress=False))
    return out


def run(source: Path, methods: list[str], calib_puzzles: int | None, eval_puzzles: int | None, max_samples: int,
        threads: int | None, quantize_attention: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="calib-bench.") as tmp:
        work = Path(tmp)
        bundle = _bundle(source, work)
        manifest = read_manifest(bundle)
        calib = task_split(manifest, "calibration", calib_puzzles)
        heldout = task_split(manifest, "heldout", eval_puzzles)
        compare = CompareOptions(threads=threads)
        start = time.perf_counter()
        reference = run_fp32(bundle, heldout, compare)
        prepared = prepare_graph(onnx.load(bundle / manifest.graphs["fp32"].file), threads=threads)
        results: dict = {"bundle": str(source), "calibration": calib.source, "evaluation": heldout.source,
                         "steps": reference.steps, "max_samples": max_samples, "rows": []}
        recordings = {
            "every step": record_step_inputs(bundle, calib, RecordOptions(max_samples=max_samples, threads=threads)),
            "step 1 only": record_step_inputs(bundle, calib, RecordOptions(steps=(1,), max_samples=max_samples,
                                                                           threads=threads)),
        }
        for method in methods:
            for name, samples in recordings.items():
                ranges = calibrate(prepared, samples, CalibrationSettings(method=method, threads=threads,
                                                                     attention=quantize_attention))
                graph = quantize_int8(prepared, ranges, Int8Options(quantize_attention=quantize_attention))
                cmp = compare_graph(bundle, compact_graph(graph.model), reference, f"int8-{method}", compare, work)
                results["rows"].append({"method": method, "calibration": name, "samples": len(samples),
                                        **cmp.to_dict()})
                print(f"{method:>10} | {name:<11} | {_fmt(cmp)}", flush=True)
        results["seconds"] = time.perf_counter() - start
        return results


def _pct(value: float | None) -> str:
    return "   n/a" if value is None else f"{100 * value:5.1f}%"


def _fmt(c) -> str:
    return (f"exact {_pct(c.exact_accuracy)} (fp32 {_pct(c.fp32_exact_accuracy)}) | token {_pct(c.token_accuracy)} "
            f"| same as fp32 {_pct(c.predictions_identical)} | z_H rel err step 1 {c.rel_error[0]:.2e} -> step "
            f"{c.steps} {c.rel_error[-1]:.2e} | cosine -> {c.cosine[-1]:.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a bundle folder, or a checkpoint to export first")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--calib-puzzles", type=int, default=None, help="first N of the calibration split")
    parser.add_argument("--eval-puzzles", type=int, default=None, help="first N of the held-out split")
    parser.add_argument("--max-samples", type=int, default=512, help="calibration samples (both variants)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quantize-attention", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results = run(args.model, methods, args.calib_puzzles, args.eval_puzzles, args.max_samples, args.threads,
                  args.quantize_attention)
    print(f"\n{results['evaluation']}, {results['steps']} fixed steps; calibration: {results['calibration']}, "
          f"{args.max_samples} samples at most ({results['seconds']:.0f} s)")
    print("| method | calibrated on | exact acc | fp32 exact | token acc | same answers as fp32 | "
          "z_H rel err (last step) | cosine (last step) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['method']} | {r['calibration']} ({r['samples']} samples) | {_pct(r['exact_accuracy'])} | "
              f"{_pct(r['fp32_exact_accuracy'])} | {_pct(r['token_accuracy'])} | {_pct(r['predictions_identical'])} "
              f"| {r['rel_error'][-1]:.2e} | {r['cosine'][-1]:.5f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
