"""CPU speed, side by side in one run: PyTorch eager reference vs the bundle on ONNX Runtime, and the GEMM peak.

    python benchmarks/cpu_speed.py [MODEL ...] [--threads 2] [--quantize] [--json out.json]
    python benchmarks/cpu_speed.py CHECKPOINT --bundle CPU_BUNDLE --batches 1,8 --no-end-to-end   # paper size

MODEL: a shipped reference model's name, or an official checkpoint (with the bundle exported from it).

For each reference model (default: both shipped ones), in one process and with the same thread count:
- this machine's float32 GEMM peak (the better of torch and ONNX Runtime on a 2048^3 matmul), GFLOP/s;
- one ACT step at batch 1 and batch 64: PyTorch eager (float32), every graph variant of the bundle on
  ONNX Runtime (CPU; --quantize adds int8-entropy and fp16 to the exported bundle first) and the fp32 graph on
  OpenVINO (float32, where installed: the runtime's `--backend openvino`), median time, achieved GFLOP/s
  (analytic FLOPs of the step) and fraction of the peak;
- end to end on the held-out split: the official evaluation (PyTorch, 16 fixed steps, batch 64) against the
  runtime with adaptive halting and continuous refill (batch 64): puzzles/s, exact accuracy, their ratio.
Ratios, not absolute times, are the result: the absolute numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from timing import median_time  # benchmarks/ is on sys.path when run as a script

from trm_export.calibration.variants import QuantizeOptions, add_variants
from trm_export.export.accuracy import task_for_config
from trm_export.export.config import ModelConfig
from trm_export.export.pipeline import ExportOptions, export_bundle
from trm_export.export.reference import run_reference
from trm_export.reference_models import TASK_OF_MODEL, reference_model_path
from trm_export.runtime.solver import Solver
from trm_export.tasks import exact_accuracy, get_task


def step_flops(cfg: ModelConfig) -> float:
    """Multiply-adds x 2 of one ACT step for one puzzle (matmuls only: they are >99% of the work)."""
    s, d, v = cfg.total_seq_len, cfg.hidden_size, cfg.vocab_size
    inter = cfg.mlp_intermediate
    mlp = 2 * s * d * 2 * inter + 2 * s * inter * d
    if cfg.mlp_t:
        inter_t = cfg.mlp_t_intermediate
        mixer = 2 * d * s * 2 * inter_t + 2 * d * inter_t * s
    else:
        mixer = 2 * s * d * 3 * d + 2 * 2 * s * s * d + 2 * s * d * d
    per_layer = mixer + mlp
    if cfg.family == "hrm":
        per_step = cfg.H_cycles * (cfg.L_cycles * cfg.L_layers + cfg.H_layers) * per_layer
    else:
        per_step = cfg.net_calls_per_step * cfg.L_layers * per_layer
    return float(per_step + 2 * cfg.seq_len * d * v)


def gemm_peak(threads: int, n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """float32 GFLOP/s of an n x n x n matmul in torch and in ONNX Runtime (MLAS): the machine's peak is the
    better of the two (on an AMD CPU torch's BLAS can be far below MLAS, which would inflate every fraction)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                              [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                                     ir_version=8).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feeds = {"a": a.numpy(), "b": b.numpy()}
    flop = 2 * n**3 / 1e9
    result = {"torch": flop / median_time(lambda: torch.mm(a, b), repeats),
              "onnxruntime": flop / median_time(lambda: session.run(None, feeds), repeats)}
    result["peak"] = max(result.values())
    return result


def torch_step(model, tokens: np.ndarray) -> Callable[[], object]:
    x = model.embed(torch.tensor(tokens, dtype=torch.long), torch.zeros(len(tokens), dtype=torch.long))
    z_H, z_L = model.initial_state(len(tokens))

    def step() -> object:
        with torch.inference_mode():
            return model.step(x, z_H, z_L)

    return step


def ort_step(bundle: Path, variant: str, tokens: np.ndarray, threads: int,
             backend: str = "onnxruntime") -> Callable[[], object]:
    """One step of the runtime's backend (ONNX Runtime, or OpenVINO in float32 on the same graph file)."""
    solver = Solver(bundle, variant=variant, backend=backend, batch_size=len(tokens), threads=threads)
    solver.solve(tokens, mode="fixed", max_steps=1)  # loads the slots
    return lambda: solver.backend.step(len(tokens))


def interleaved_medians(makers: dict[str, Callable[[], Callable[[], object]]], repeats: int,
                        rounds: int) -> dict[str, float]:
    """Median step time of each contender, measured in `rounds` alternating rounds so that a change in the shared
    machine's load hits every contender alike (the median of the round medians). Each contender is built afresh
    for its turn and dropped after it, so only one ONNX Runtime session is alive while it is timed: a session's
    intra-op threads spin after every run, and with several sessions alive on two cores the spinning pools slowed
    whichever one was timed, at random (the same int8 maze graph took 2.4 or 6.5 ms per step at batch 1 from one
    process to the next; 3.1-3.2 ms every time with spinning off)."""
    times: dict[str, list[float]] = {k: [] for k in makers}
    for _ in range(rounds):
        for label, make in makers.items():
            step = make()
            times[label].append(median_time(step, repeats))
            del step
            gc.collect()
    return {k: float(np.median(v)) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=sorted(TASK_OF_MODEL))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over the contenders")
    parser.add_argument("--end-to-end-puzzles", type=int, default=1000)
    parser.add_argument("--min-steps", type=int, default=1, help="runtime min_steps of the adaptive end-to-end run")
    parser.add_argument("--bundle", type=Path, action="append", default=[],
                        help="Use this bundle for the model of the same index instead of exporting one.")
    parser.add_argument("--quantize", action="store_true",
                        help="add int8-entropy and fp16 graphs to each exported bundle and time them too")
    parser.add_argument("--openvino-variants", default="fp32",
                        help="variants also timed on OpenVINO (float32 inference), where it is installed")
    parser.add_argument("--batches", default="1,64", help="batch sizes of the per-step timings")
    parser.add_argument("--no-end-to-end", action="store_true", help="per-step timings only")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    openvino = importlib.util.find_spec("openvino") is not None
    torch.set_num_threads(args.threads)
    gemm = gemm_peak(args.threads)
    peak = gemm["peak"]
    print(f"float32 GEMM 2048^3, {args.threads} threads: torch {gemm['torch']:.1f}, ONNX Runtime "
          f"{gemm['onnxruntime']:.1f} GFLOP/s; peak {peak:.1f}", flush=True)
    results = {"threads": args.threads, "gemm_peak_gflops": peak, "gemm_gflops": gemm, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(args.models):
            from trm_export.export.checkpoint import load_checkpoint

            if name in TASK_OF_MODEL:
                ck = load_checkpoint(reference_model_path(name))
                task_name, params = TASK_OF_MODEL[name]
                task = get_task(task_name, **params)
            else:  # a checkpoint path (a paper-size fixture: benchmarks/paper_size.py --keep writes them)
                ck = load_checkpoint(Path(name))
                task = task_for_config(ck.config)
                name = Path(name).parent.parent.name if Path(name).is_file() else Path(name).name
            data = task.split("heldout", size=args.end_to_end_puzzles)
            if i < len(args.bundle):
                bundle = args.bundle[i]
            else:
                bundle, _, _ = export_bundle(ck, Path(tmp) / f"{name}.bundle",
                                             ExportOptions(parity_puzzles=64, progress=False))
                if args.quantize:  # accuracy of these variants is measured in full by `trm-export quantize`
                    quantized = Path(tmp) / f"{name}.quantized"
                    add_variants(bundle, quantized, QuantizeOptions(methods=("entropy",), mixed=False, fp16=True,
                                                                    eval_puzzles=64, threads=args.threads,
                                                                    progress=False))
                    bundle = quantized
            variants = sorted(Solver(bundle).manifest.graphs)
            flops = step_flops(ck.config)
            model_result = {"step_gflop": flops / 1e9, "step": {}, "end_to_end": {}}
            for batch in (int(b) for b in args.batches.split(",")):
                tokens = data.inputs[:batch]
                makers = {"pytorch_eager": partial(torch_step, ck.model, tokens)}
                for variant in variants:
                    makers[f"onnxruntime_{variant}"] = partial(ort_step, bundle, variant, tokens, args.threads)
                    if openvino and variant in args.openvino_variants.split(","):
                        makers[f"openvino_{variant}"] = partial(ort_step, bundle, variant, tokens, args.threads,
                                                                "openvino")
                row = interleaved_medians(makers, args.repeats, args.rounds)
                model_result["step"][batch] = row
                for label, seconds in row.items():
                    gflops = flops * batch / seconds / 1e9
                    print(f"{name} batch {batch:>2} {label:<24} {seconds * 1e3:8.2f} ms/step  {gflops:7.1f} GFLOP/s "
                          f"({100 * gflops / peak:5.1f}% of peak)  {row['pytorch_eager'] / seconds:5.2f}x eager",
                          flush=True)
                if "openvino_fp32" in row:
                    ratio = row["openvino_fp32"] / row["onnxruntime_fp32"]
                    print(f"{name} batch {batch:>2} fp32: ONNX Runtime is {ratio:.2f}x OpenVINO's speed "
                          "(>= 1: at least as fast)", flush=True)
            if args.no_end_to_end:
                results["models"][name] = model_result
                continue
            # End to end: official evaluation vs the runtime with adaptive halting and refill.
            start = time.perf_counter()
            ref = run_reference(ck.model, data.inputs, data.puzzle_ids, mode="fixed", max_steps=16, batch_size=64)
            t_official = time.perf_counter() - start
            solver = Solver(bundle, batch_size=64, threads=args.threads)
            start = time.perf_counter()
            ours = solver.solve(data.inputs, data.puzzle_ids, mode="adaptive", min_steps=args.min_steps)
            t_ours = time.perf_counter() - start
            e2e = {"official_puzzles_per_s": len(data) / t_official,
                   "official_exact": exact_accuracy(ref.predictions, data.labels),
                   "runtime_adaptive_puzzles_per_s": len(data) / t_ours,
                   "runtime_adaptive_exact": exact_accuracy(ours.predictions, data.labels),
                   "runtime_mean_steps": float(ours.steps_used.mean()), "runtime_min_steps": args.min_steps}
            e2e["speedup"] = e2e["runtime_adaptive_puzzles_per_s"] / e2e["official_puzzles_per_s"]
            model_result["end_to_end"] = e2e
            print(f"{name} end to end ({len(data)} puzzles, runtime min_steps {args.min_steps}): official PyTorch "
                  f"fixed-16 {e2e['official_puzzles_per_s']:.1f} puzzles/s ({100 * e2e['official_exact']:.1f}% exact), "
                  "runtime "
                  f"adaptive+refill {e2e['runtime_adaptive_puzzles_per_s']:.1f} puzzles/s "
                  f"({100 * e2e['runtime_adaptive_exact']:.1f}% exact, {e2e['runtime_mean_steps']:.2f} steps): "
                  f"{e2e['speedup']:.2f}x", flush=True)
            results["models"][name] = model_result
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
