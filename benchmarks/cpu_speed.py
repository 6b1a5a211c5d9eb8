"""CPU speed, side by side in one run: PyTorch eager reference vs the bundle on ONNX Runtime, and the GEMM peak.

    python benchmarks/cpu_speed.py [MODEL ...] [--threads 2] [--quantize] [--json out.json]
    python benchmarks/cpu_speed.py CHECKPOINT --bundle CPU_BUNDLE --batches 1,8 --no-end-to-end   # paper size

MODEL: a shipped reference model's name, or an official checkpoint (with the bundle exported from it).

For each reference model (default: both shipped ones), in one process and with the same thread count:
- this machine's float32 GEMM peak (the better of torch and ONNX Runtime on a 2048^3 matmul), GFLOP/s;
- one ACT step at batch 1 and batch 64: PyTorch eager (float32), every graph variant of the bundle on
  ONNX Runtime (CPU; --quantize adds int8-entropy and fp16 to the exported bundle first) and on OpenVINO (float32,
  where installed: the runtime's `--backend openvino`), median time,
  achieved GFLOP/s (analytic FLOPs of the step) and fraction of the peak;
- the same step in two more export forms, where they differ from the bundle's graph: standard ONNX ops only (no
  ONNX Runtime contrib ops: what TensorRT and the browser get) on ONNX Runtime and OpenVINO, and a plain
  torch.onnx export of model.step on ONNX Runtime; each checked to compute the same step first;
- the runtime's default (backend "auto": ONNX Runtime, or OpenVINO where `trm-export tune` recorded it faster)
  against OpenVINO's faster form;
- end to end on the held-out split: the official evaluation (PyTorch, 16 fixed steps, batch 64) against the
  runtime with adaptive halting (each of --halting) and continuous refill (batch 64): puzzles/s, exact accuracy,
  their ratio.
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
from step_profile import step_inputs  # benchmarks/ is on sys.path when run as a script
from timing import call_times, median_time

from trm_export.calibration.variants import QuantizeOptions, add_variants
from trm_export.export.accuracy import task_for_config
from trm_export.export.config import ModelConfig
from trm_export.export.pipeline import ExportOptions, export_bundle
from trm_export.export.reference import run_reference
from trm_export.reference_models import TASK_OF_MODEL, reference_model_path
from trm_export.runtime.manifest import member, read_manifest
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


def gemm_peak(threads: int, n: int = 2048, repeats: int = 10) -> dict[str, float]:
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
    # The best call, not the median: a peak is what the machine reaches when nothing else runs on it.
    result = {"torch": flop / min(call_times(lambda: torch.mm(a, b), repeats)),
              "onnxruntime": flop / min(call_times(lambda: session.run(None, feeds), repeats))}
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
    """One step of the runtime's backend on a bundle (ONNX Runtime, OpenVINO in float32, or "auto")."""
    solver = Solver(bundle, variant=variant, backend=backend, batch_size=len(tokens), threads=threads)
    solver.solve(tokens, mode="fixed", max_steps=1)  # loads the slots
    return lambda: solver.backend.step(len(tokens))


def graph_backend(path: Path, engine: str, state: dict[str, np.ndarray], cfg: ModelConfig, threads: int):
    """A bare graph file (another export form of the same step) in the runtime's backend class, loaded with
    `state`."""
    from trm_export.runtime.backend import OnnxRuntimeBackend
    from trm_export.runtime.openvino_backend import OpenVinoBackend

    n, s, d = state["x"].shape
    if engine == "onnxruntime":
        backend = OnnxRuntimeBackend(path, n, (s, d), cfg.seq_len, cfg.vocab_size, threads=threads)
    else:  # "openvino" (float32, as the runtime runs it) or "openvino_bf16"
        backend = OpenVinoBackend(path, n, (s, d), cfg.seq_len, cfg.vocab_size, threads=threads,
                                  inference_precision="bf16" if engine.endswith("bf16") else "f32")
    backend.load(np.arange(n), state["x"], state["z_H"], state["z_L"])
    return backend


def fixed_loop_accuracy(path: Path, engine: str, bundle: Path, data, cfg: ModelConfig, threads: int,
                        steps: int = 16, batch: int = 64) -> dict[str, object]:
    """The official evaluation's loop (fixed steps) on a bare graph file and engine: exact accuracy on `data` and
    the predictions (for agreement with another engine)."""
    embedder = Solver(bundle, verify=False).embedder
    predictions = []
    for start in range(0, len(data), batch):
        tokens, ids = data.inputs[start:start + batch], data.puzzle_ids[start:start + batch]
        x = embedder(tokens, ids)
        z_H, z_L = embedder.initial_state(len(tokens))
        backend = graph_backend(path, engine, {"x": x, "z_H": z_H, "z_L": z_L}, cfg, threads)
        for _ in range(steps):
            backend.step(len(tokens))
        predictions.append(backend.logits(np.arange(len(tokens))).argmax(-1))
    predictions = np.concatenate(predictions)
    return {"exact": exact_accuracy(predictions, data.labels), "predictions": predictions}


def graph_step(path: Path, engine: str, state: dict[str, np.ndarray], cfg: ModelConfig,
               threads: int) -> Callable[[], object]:
    backend = graph_backend(path, engine, state, cfg, threads)
    return lambda: backend.step(len(state["x"]))


def export_forms(model, folder: Path) -> dict[str, Path]:
    """The same step in two more export forms: standard ONNX ops only (our export form without ONNX Runtime's
    contrib ops: what TensorRT, the browser and OpenVINO get) and a plain torch.onnx export of model.step."""
    from trm_export.export.onnx_graph import export_step_graph

    forms = {"standard_ops": folder / "standard_ops.onnx", "plain_export": folder / "plain_export.onnx"}
    forms["standard_ops"].write_bytes(export_step_graph(model, 20).data)
    forms["plain_export"].write_bytes(export_step_graph(model, 20, export_form=False).data)
    return forms


def forms_agree(reference: Path, forms: dict[str, Path], state: dict[str, np.ndarray], cfg: ModelConfig,
                threads: int) -> dict[str, float]:
    """max |z_H| difference after one step from `state`: each contender (label -> graph file; "openvino*" labels
    on OpenVINO, the others on ONNX Runtime) against the bundle's fp32 graph on ONNX Runtime: they must compute
    the same step."""
    def z_H(path: Path, engine: str) -> np.ndarray:
        backend = graph_backend(path, engine, state, cfg, threads)
        backend.step(len(state["x"]))
        return backend.state(len(state["x"]))[0]

    expected = z_H(reference, "onnxruntime")
    return {label: float(np.abs(z_H(path, "openvino" if label.startswith("openvino") else "onnxruntime")
                                - expected).max()) for label, path in forms.items()}


def auto_engine(bundle: Path, batch: int, threads: int) -> str:
    """The engine `backend="auto"` runs for this bundle, batch and thread count here (a tune record may say
    OpenVINO)."""
    solver = Solver(bundle, backend="auto", batch_size=batch, threads=threads, verify=False)
    return "openvino" if solver.backend.name.startswith("openvino") else "onnxruntime"


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
    parser.add_argument("--halting", default="q,stable:1",
                        help="halting policies of the end-to-end runs, comma separated (Solver.solve's halting)")
    parser.add_argument("--bundle", type=Path, action="append", default=[],
                        help="Use this bundle for the model of the same index instead of exporting one.")
    parser.add_argument("--quantize", action="store_true",
                        help="add int8-entropy and fp16 graphs to each exported bundle and time them too")
    parser.add_argument("--openvino-variants", default="fp32",
                        help="variants also timed on OpenVINO (float32 inference), where it is installed")
    parser.add_argument("--batches", default="1,64", help="batch sizes of the per-step timings")
    parser.add_argument("--openvino-bf16", action="store_true",
                        help="also OpenVINO in bfloat16 (its default on CPUs with AVX512_BF16 / AMX): per-step "
                             "timings and its exact accuracy on the held-out puzzles (fixed 16 steps) beside f32's")
    parser.add_argument("--no-end-to-end", action="store_true", help="per-step timings only")
    parser.add_argument("--contenders", default="",
                        help="time only the contenders whose label starts with one of these (comma separated), "
                             "e.g. onnxruntime_fp32,onnxruntime_int8")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    openvino = importlib.util.find_spec("openvino") is not None
    chosen = tuple(args.contenders.split(",")) if args.contenders else ()

    def wanted(*labels: str) -> bool:
        """Some of these contenders are timed (a label or a prefix of one)."""
        return not chosen or any(c.startswith(label) or label.startswith(c) for c in chosen for label in labels)

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
            manifest = read_manifest(bundle)
            variants = sorted(manifest.graphs)
            fused = manifest.graphs["fp32"].onnxruntime_ops  # the cpu target's contrib ops, if any
            (Path(tmp) / f"{name}.forms").mkdir()
            forms = export_forms(ck.model, Path(tmp) / f"{name}.forms") if wanted("onnxruntime_plain_export",
                                                                                  "onnxruntime_standard_ops",
                                                                                  "openvino") else {}
            if not fused:
                forms.pop("standard_ops", None)  # the bundle's own graph is already in standard ops
            flops = step_flops(ck.config)
            model_result = {"step_gflop": flops / 1e9, "onnxruntime_ops": fused, "step": {}, "end_to_end": {},
                            "forms_max_abs_z_H": {}}
            bundle_graph = member(bundle, manifest.graphs["fp32"].file)
            if openvino and args.openvino_bf16:  # another arithmetic: its accuracy, beside float32's, same loop
                bf16 = {engine: fixed_loop_accuracy(bundle_graph, engine, bundle, data, ck.config, args.threads)
                        for engine in ("openvino", "openvino_bf16")}
                same = float(np.all(bf16["openvino"]["predictions"] == bf16["openvino_bf16"]["predictions"],
                                    axis=1).mean())
                model_result["openvino_bf16_accuracy"] = {
                    "puzzles": len(data), "steps": 16, "f32_exact": bf16["openvino"]["exact"],
                    "bf16_exact": bf16["openvino_bf16"]["exact"], "answers_identical": same}
                print(f"{name} OpenVINO bf16 inference, fixed 16 steps, {len(data)} held-out puzzles: "
                      f"{100 * bf16['openvino_bf16']['exact']:.1f}% exact against f32's "
                      f"{100 * bf16['openvino']['exact']:.1f}%, {100 * same:.1f}% of answers identical", flush=True)
            for batch in (int(b) for b in args.batches.split(",")):
                tokens = data.inputs[:batch]
                state = step_inputs(bundle, batch)
                checked = dict(forms)  # on ONNX Runtime
                if openvino and wanted("openvino"):  # the bundle's own graph (through runtime/openvino_ops.py)
                    checked["openvino_fp32"] = bundle_graph
                    if "standard_ops" in forms:
                        checked["openvino_standard_ops"] = forms["standard_ops"]
                if checked:
                    agree = forms_agree(bundle_graph, checked, state, ck.config, args.threads)
                    model_result["forms_max_abs_z_H"][batch] = agree
                    print(f"{name} batch {batch:>2}: one step from the same state, max |z_H - bundle fp32 on ONNX "
                          "Runtime|: " + ", ".join(f"{k} {v:.1e}" for k, v in agree.items()), flush=True)
                makers = {"pytorch_eager": partial(torch_step, ck.model, tokens)}
                for variant in variants:
                    makers[f"onnxruntime_{variant}"] = partial(ort_step, bundle, variant, tokens, args.threads)
                    if openvino and variant in args.openvino_variants.split(","):
                        makers[f"openvino_{variant}"] = partial(ort_step, bundle, variant, tokens, args.threads,
                                                                "openvino")
                for form, path in forms.items():
                    makers[f"onnxruntime_{form}"] = partial(graph_step, path, "onnxruntime", state, ck.config,
                                                            args.threads)
                    if openvino and form == "standard_ops":
                        makers[f"openvino_{form}"] = partial(graph_step, path, "openvino", state, ck.config,
                                                             args.threads)
                if openvino and args.openvino_bf16:
                    makers["openvino_bf16"] = partial(graph_step, bundle_graph, "openvino_bf16", state, ck.config,
                                                      args.threads)
                makers = {k: v for k, v in makers.items() if wanted(k)}
                row = interleaved_medians(makers, args.repeats, args.rounds)
                model_result["step"][batch] = row
                for label, seconds in row.items():
                    gflops = flops * batch / seconds / 1e9
                    eager = f"  {row['pytorch_eager'] / seconds:5.2f}x eager" if "pytorch_eager" in row else ""
                    print(f"{name} batch {batch:>2} {label:<28} {seconds * 1e3:9.2f} ms/step  {gflops:7.1f} GFLOP/s "
                          f"({100 * gflops / peak:5.1f}% of peak){eager}", flush=True)
                default = f"{auto_engine(bundle, batch, args.threads)}_fp32"  # a tune record may say OpenVINO
                ov = {k: v for k, v in row.items() if k in ("openvino_fp32", "openvino_standard_ops")}
                if default in row and ov:
                    best = min(ov, key=ov.get)
                    ratio = row[best] / row[default]
                    untuned = row[best] / row["onnxruntime_fp32"] if "onnxruntime_fp32" in row else None
                    model_result.setdefault("default_vs_openvino", {})[batch] = {
                        "default": default, "openvino": best, "ratio": ratio, "onnxruntime_ratio": untuned}
                    print(f"{name} batch {batch:>2}: the runtime's default ({default}) is {ratio:.2f}x the speed of "
                          f"OpenVINO f32's best ({best}) (>= 1: at least as fast)"
                          + (f"; ONNX Runtime (the default without a tune record) {untuned:.2f}x"
                             if untuned and default != "onnxruntime_fp32" else ""), flush=True)
            if args.no_end_to_end:
                results["models"][name] = model_result
                continue
            # End to end: official evaluation vs the runtime with adaptive halting and refill.
            start = time.perf_counter()
            ref = run_reference(ck.model, data.inputs, data.puzzle_ids, mode="fixed", max_steps=16, batch_size=64)
            t_official = time.perf_counter() - start
            official = {"puzzles_per_s": len(data) / t_official, "exact": exact_accuracy(ref.predictions, data.labels)}
            model_result["end_to_end"] = {"official_fixed16": official, "runtime": {}}
            print(f"{name} end to end ({len(data)} puzzles): official PyTorch fixed-16, batch 64: "
                  f"{official['puzzles_per_s']:.1f} puzzles/s, {100 * official['exact']:.1f}% exact", flush=True)
            solver = Solver(bundle, batch_size=64, threads=args.threads)
            for policy in args.halting.split(","):
                start = time.perf_counter()
                ours = solver.solve(data.inputs, data.puzzle_ids, mode="adaptive", min_steps=args.min_steps,
                                    halting=policy)
                seconds = time.perf_counter() - start
                run = {"puzzles_per_s": len(data) / seconds, "exact": exact_accuracy(ours.predictions, data.labels),
                       "mean_steps": float(ours.steps_used.mean()), "min_steps": args.min_steps,
                       "backend": solver.backend.name}
                run["speedup"] = run["puzzles_per_s"] / official["puzzles_per_s"]
                run["points_vs_official"] = 100 * (run["exact"] - official["exact"])
                model_result["end_to_end"]["runtime"][policy] = run
                print(f"{name} end to end: runtime adaptive ({policy}) + refill, batch 64, {solver.backend.name}: "
                      f"{run['puzzles_per_s']:.1f} puzzles/s, {100 * run['exact']:.1f}% exact "
                      f"({run['points_vs_official']:+.1f} points), {run['mean_steps']:.2f} mean steps: "
                      f"{run['speedup']:.2f}x the official evaluation", flush=True)
            results["models"][name] = model_result
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
