#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU, TensorRT's Python package and cuda-python (not CI: it has neither).
#
#   bash scripts/gpu_check.sh [TARGET]        TARGET defaults to gpu-trt10 (gpu-trt11 for TensorRT 11;
#                                             a Jetson target on the Jetson itself)
#
# For each shipped reference model: export a bundle for TARGET (parity on the CPU against PyTorch), build a
# TensorRT engine for every graph variant in it, verify each engine against the bundle's golden vectors, then
# time the TensorRT loop: per-step latency at batch 1 and at the target's optimal batch, and per-puzzle latency
# (adaptive halting, batch 1). Prints one table; exits non-zero when a verification fails.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${1:-gpu-trt10}"
OUT="${OUT_DIR:-gpu_check}"
mkdir -p "$OUT"
python - "$TARGET" "$OUT" <<'PY'
import sys, time
from pathlib import Path
import numpy as np
from trm_export.export.pipeline import ExportOptions, export_bundle
from trm_export.reference_models import TASK_OF_MODEL, reference_model_path
from trm_export.runtime.selfcheck import verify_bundle
from trm_export.runtime.solver import Solver
from trm_export.targets.engines import build_bundle_engines
from trm_export.targets.registry import get_target
from trm_export.tasks import exact_accuracy, get_task

target, out = get_target(sys.argv[1]), Path(sys.argv[2])
failed = False
rows = []
for name, (task_name, params) in sorted(TASK_OF_MODEL.items()):
    bundle, _, _ = export_bundle(reference_model_path(name), out / f"{name}.{target.name}.bundle",
                                 ExportOptions(target=target.name, force=True, parity_puzzles=256))
    manifest = build_bundle_engines(bundle)
    data = get_task(task_name, **params).split("heldout")
    for variant in sorted(manifest.graphs):
        report = verify_bundle(bundle, variant=variant)
        print(report, flush=True)
        failed |= not report
        for batch in (1, target.batch.opt):
            solver = Solver(bundle, variant=variant, backend="tensorrt", batch_size=batch)
            solver.solve(data.inputs[:batch], mode="fixed")  # warm-up, CUDA graph capture
            steps = solver.manifest.loop.halt_max_steps
            start = time.perf_counter()
            result = solver.solve(data.inputs[:batch * 8], mode="fixed")
            per_step = (time.perf_counter() - start) / (8 * steps)
            rows.append((name, variant, batch, per_step * 1e3, exact_accuracy(result.predictions,
                                                                              data.labels[:batch * 8])))
        solver = Solver(bundle, variant=variant, backend="tensorrt", batch_size=1)
        times = []
        for tokens in data.inputs[:200]:
            start = time.perf_counter()
            solver.solve(tokens, mode="adaptive")
            times.append(time.perf_counter() - start)
        rows.append((name, variant, "adaptive b1 p50/p95", np.percentile(times, 50) * 1e3,
                     np.percentile(times, 95) * 1e3))
# The trtexec path: build_engines.sh builds, then records (trm-export build . --record); the runtime must pick it.
import shutil, subprocess
if shutil.which("trtexec") or Path("/usr/src/tensorrt/bin/trtexec").exists():
    name = sorted(TASK_OF_MODEL)[0]
    bundle, _, _ = export_bundle(reference_model_path(name), out / f"{name}.{target.name}.trtexec.bundle",
                                 ExportOptions(target=target.name, force=True, parity_puzzles=64))
    subprocess.run(["sh", str(bundle / "build" / "build_engines.sh")], check=True)
    solver = Solver(bundle)
    ok = solver.backend.name.startswith("tensorrt") and solver.backend_note is None
    print(f"build_engines.sh engine picked by the Solver: {ok} ({solver.backend.name})")
    failed |= not ok or not verify_bundle(bundle)
else:
    print("trtexec not found: the build_engines.sh path was not checked")
print("\nmodel | variant | batch | ms per step (or p50) | exact acc (or p95 ms)")
for row in rows:
    print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row))
sys.exit(1 if failed else 0)
PY
