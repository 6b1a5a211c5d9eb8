"""Where one ACT step's time goes: per-operator profiles of a bundle's step graph on ONNX Runtime and OpenVINO.

    python benchmarks/step_profile.py BUNDLE [--batch 1 --batch 64] [--threads 2] [--steps 10] [--json out.json]

For each batch size, the same state (the bundle's embedding of held-out puzzles after one step) is stepped
`--steps` times on each engine with its profiler on:
- ONNX Runtime (ORT_ENABLE_ALL, as the runtime runs it): the JSON trace of `enable_profiling`, node events summed
  per operator type of the optimised graph (what ORT actually runs after its fusions), and the optimised graph's
  operator counts (`optimized_model_filepath`);
- OpenVINO (float32, latency mode, as `--backend openvino` runs it, contrib ops through runtime/openvino_ops.py):
  `PERF_COUNT` counters per executed layer, summed per layer type.
Shares, not absolute times, are the result; the wall time per step of each engine is printed beside them
(profiling adds overhead to both).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from trm_export.runtime import openvino_ops
from trm_export.runtime.io import task_for_encoding
from trm_export.runtime.manifest import member, read_manifest
from trm_export.runtime.solver import Solver


def step_inputs(bundle: Path, batch: int) -> dict[str, np.ndarray]:
    """x, z_H, z_L of `batch` held-out puzzles after one step (a realistic state, not zeros)."""
    solver = Solver(bundle, batch_size=batch, verify=False)
    tokens = task_for_encoding(solver.manifest.task).split("heldout", size=batch).inputs
    solver.solve(tokens, mode="fixed", max_steps=1)
    z_H, z_L = solver.backend.state(batch)
    return {"x": solver.backend.x[:batch].copy(), "z_H": z_H, "z_L": z_L}


def profile_onnxruntime(graph: Path, feeds: dict[str, np.ndarray], threads: int, steps: int,
                        work: Path) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.optimized_model_filepath = str(work / "optimized.onnx")
    options.log_severity_level = 3  # the optimised graph is read here only, on this machine: no warning about it
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)  # warm-up outside the profile
    start = time.perf_counter()
    for _ in range(steps):
        session.run(None, feeds)
    wall = (time.perf_counter() - start) / steps
    options.enable_profiling = True
    options.profile_file_prefix = str(work / "ort")
    profiled = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    profiled.run(None, feeds)
    for _ in range(steps):
        profiled.run(None, feeds)
    trace = json.loads(Path(profiled.end_profiling()).read_text())
    per_op: dict[str, float] = collections.Counter()
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    first_timed = sorted(runs, key=lambda e: e["ts"])[1]["ts"] if len(runs) > 1 else 0  # skip the warm-up run
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= first_timed:
            per_op[event["args"]["op_name"]] += event["dur"] / 1e3 / steps
    import onnx

    ops = collections.Counter(n.op_type for n in onnx.load(str(work / "optimized.onnx")).graph.node)
    return {"ms_per_step": 1e3 * wall, "per_op_ms": dict(per_op), "optimized_ops": dict(ops)}


def profile_openvino(graph: Path, feeds: dict[str, np.ndarray], threads: int, steps: int) -> dict:
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    core = ov.Core()
    openvino_ops.register(core)  # the cpu target's contrib ops, as the runtime's backend reads them
    request = core.compile_model(str(graph), "CPU", config).create_infer_request()
    request.infer(feeds)
    start = time.perf_counter()
    for _ in range(steps):
        request.infer(feeds)
    wall = (time.perf_counter() - start) / steps
    counted = core.compile_model(str(graph), "CPU", {**config, "PERF_COUNT": True}).create_infer_request()
    per_type: dict[str, float] = collections.Counter()
    counted.infer(feeds)
    for _ in range(steps):
        counted.infer(feeds)
        for info in counted.get_profiling_info():
            if info.status == info.Status.EXECUTED:
                per_type[info.node_type] += info.real_time.total_seconds() * 1e3 / steps
    return {"ms_per_step": 1e3 * wall, "per_op_ms": dict(per_type)}


def table(name: str, result: dict, top: int) -> str:
    total = sum(result["per_op_ms"].values()) or 1.0
    rows = sorted(result["per_op_ms"].items(), key=lambda kv: -kv[1])[:top]
    lines = [f"{name}: {result['ms_per_step']:.2f} ms per step (wall, profiler off); operators, profiler on:"]
    lines += [f"  {op:<28} {ms:9.3f} ms  {100 * ms / total:5.1f}%" for op, ms in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--batch", type=int, action="append", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="profiled steps per engine and batch")
    parser.add_argument("--variant", default="fp32")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    spec = read_manifest(args.bundle).graphs[args.variant]
    graph = member(args.bundle, spec.file)
    openvino = importlib.util.find_spec("openvino") is not None
    results: dict = {"bundle": str(args.bundle), "variant": args.variant, "threads": args.threads, "batches": {}}
    for batch in args.batch or [1, 64]:
        feeds = step_inputs(args.bundle, batch)
        with tempfile.TemporaryDirectory() as tmp:
            row = {"onnxruntime": profile_onnxruntime(graph, feeds, args.threads, args.steps, Path(tmp))}
        if openvino:
            row["openvino"] = profile_openvino(graph, feeds, args.threads, args.steps)
        results["batches"][batch] = row
        for engine, result in row.items():
            print(f"batch {batch}, " + table(engine, result, args.top), flush=True)
        print(f"batch {batch}: ONNX Runtime optimised graph: {row['onnxruntime']['optimized_ops']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
