"""CPU engines side by side after `trm-export tune` (issue #41), in one run, rounds interleaved.

    python benchmarks/cpu_engines.py                       # both reference models, batch 1 and 64
    python benchmarks/cpu_engines.py --paper --batches 1,8 # the paper-size Maze-Hard shape (random weights)

For each model: a cpu bundle (fused graph + its standard-ops form) is exported into --work, `trm-export tune` runs
on it (record in a file of this run, not the user's), then every contender is timed at each batch size, in
rounds, their order rotating from round to round (one session alive at a time), median ms per step of each round:

- default: what `backend="auto"` runs after tune (ONNX Runtime on the fused graph, or OpenVINO where tune
  measured it faster);
- ONNX Runtime on the fused graph (the bundle's; `--backend onnxruntime`);
- `--backend openvino`: OpenVINO f32 through the runtime, on the standard-ops graph where the bundle has one;
- OpenVINO f32 through the runtime on the fused graph (our converters: the path before issue #41);
- ONNX Runtime on the standard-ops graph;
- OpenVINO as a user takes the standard export to it: its own API, compile_model(graph, "CPU", f32) and infer;
- PyTorch eager (float32, the reference's step).

Every contender computes the same step (checked on one step from the same state before timing). Result: the
table, the default's speed against the fastest contender (>= 1.0 is the bar), and the machine's description, in
benchmarks/results/cpu_engines.md and .json (or --name).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "tests"))


def machine_description() -> dict:
    from trm_export.runtime.cpu_engines import machine

    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[-1].split("\n", 1)[0] if Path(
        "/proc/cpuinfo").exists() else ""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "avx_vnni")
    return {"machine": machine(), "flags": [f for f in wanted if f" {f}" in flags + " "],
            "python": platform.python_version(), "torch": torch.__version__.split("+")[0],
            "onnxruntime": __import__("onnxruntime").__version__, "openvino": __import__("openvino").__version__,
            "load_average": os.getloadavg()}


def export(model: str, work: Path) -> tuple[Path, object]:
    """The cpu bundle of `model` (a reference model's name, or "paper-maze"), and the loaded checkpoint."""
    from trm_export.export.checkpoint import load_checkpoint
    from trm_export.export.pipeline import ExportOptions, export_bundle
    from trm_export.reference_models import reference_model_path

    if model == "paper-maze":
        from official_format import PAPER_VARIANTS, write_official_checkpoint

        path = work / "paper-maze-ckpt"
        if not path.exists():
            write_official_checkpoint(path, PAPER_VARIANTS["paper-trm-att-maze"])
        source = path
    else:
        source = reference_model_path(model)
    ck = load_checkpoint(source)
    bundle = work / f"{model}.bundle"
    if not bundle.exists():
        export_bundle(ck, bundle, ExportOptions(target="cpu", progress=False, parity_puzzles=4, check_steps=2))
    return bundle, ck


def contenders(bundle: Path, ck, batch: int, threads: int) -> dict[str, Callable[[], Callable[[], None]]]:
    """name -> a factory of one timed step (each factory builds its session; one alive at a time)."""
    from trm_export.runtime.manifest import member, read_manifest

    manifest = read_manifest(bundle)
    graph = manifest.graphs["fp32"]
    standard = graph.standard_file or graph.file

    def solver(**kw) -> Callable[[], Callable[[], None]]:
        return lambda: solver_step(bundle, batch, threads, **kw)

    def openvino_own() -> Callable[[], None]:
        import openvino as ov

        compiled = ov.Core().compile_model(str(member(bundle, standard)), "CPU",
                                           {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
        request = compiled.create_infer_request()
        s, d = read_state_shape(bundle)
        feed = {name: np.random.default_rng(0).standard_normal((batch, s, d)).astype(np.float32)
                for name in ("x", "z_H", "z_L")}
        return lambda: request.infer(feed)

    def eager() -> Callable[[], None]:
        torch.set_num_threads(threads)
        s, d = read_state_shape(bundle)
        state = [torch.randn(batch, s, d) for _ in range(3)]

        def step() -> None:
            with torch.no_grad():
                ck.model.step(*state)
        return step

    out = {DEFAULT: solver(),
           "ONNX Runtime, fused graph": solver(backend="onnxruntime"),
           "--backend openvino": solver(backend="openvino")}
    if graph.standard_file is not None:
        out["OpenVINO via runtime, fused graph"] = solver(backend="openvino", graph_form="fused")
        out["ONNX Runtime, standard-ops graph"] = solver(backend="onnxruntime", graph_form="standard")
    out["OpenVINO's own API, standard export"] = openvino_own
    out["PyTorch eager"] = eager
    return out


DEFAULT = "default (auto, after tune)"


def solver_step(bundle: Path, batch: int, threads: int, **solver_options) -> Callable[[], None]:
    """One step of a Solver's backend with every slot full (zero puzzles: the work does not depend on the values)."""
    from trm_export.runtime.solver import Solver

    s = Solver(bundle, batch_size=batch, threads=threads, verify=False, **solver_options)
    n = s.backend.capacity
    z = np.zeros((n, *s.embedder.state_shape), np.float32)
    s.backend.load(np.arange(n), s.embedder(np.zeros((n, s.task.seq_len), np.int64), np.zeros(n, np.int64)), z, z)
    return lambda: s.backend.step(n)


def engine_of(bundle: Path, batch: int, threads: int) -> str:
    """The contender that `auto` resolves to after tune (the same engine and graph form)."""
    from trm_export.runtime.solver import Solver

    name = Solver(bundle, batch_size=batch, threads=threads, verify=False).backend.name
    if name.startswith("openvino"):
        return "OpenVINO via runtime, fused graph" if name.endswith("fused graph") else "--backend openvino"
    return "ONNX Runtime, standard-ops graph" if name.endswith("standard-ops graph") else "ONNX Runtime, fused graph"


def read_state_shape(bundle: Path) -> tuple[int, int]:
    from trm_export.runtime.solver import Solver

    return Solver(bundle, batch_size=1, backend="onnxruntime", verify=False).embedder.state_shape


def time_round(make: Callable[[], Callable[[], None]], seconds: float) -> float:
    """Median ms of one step over `seconds` (at least 3 steps), after one warm-up step."""
    import time

    step = make()
    step()
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - t))
    del step
    return statistics.median(times)


def int8_rows(model: str, work: Path, batches: tuple[int, ...], threads: int, rounds: int, seconds: float) -> list:
    """`--target cpu --precision best` (the one command, its default work): the chosen variant against fp32 and
    every int8 form, at each batch, rounds interleaved; accuracy as the export measured it (held-out puzzles)."""
    import subprocess

    from trm_export.reference_models import reference_model_path
    from trm_export.runtime.manifest import read_manifest

    bundle = work / f"{model}-best.bundle"
    if not bundle.exists():
        subprocess.run([sys.executable, "-m", "trm_export.cli", str(reference_model_path(model)), "--target", "cpu",
                        "--precision", "best", "-o", str(bundle), "--threads", str(threads), "--no-report"],
                       check=True)
    manifest = read_manifest(bundle)
    choice = manifest.choice
    variants = ["fp32", *sorted(v for v in manifest.graphs if v.startswith("int8"))]
    rows = []
    for batch in batches:
        ms: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(rounds):
            for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                def make(v: str = v, batch: int = batch) -> Callable[[], None]:
                    return solver_step(bundle, batch, threads, variant=v, backend="onnxruntime")
                ms[v].append(time_round(make, seconds))
            print(f"{model}-best b{batch} round {r + 1}/{rounds}: "
                  + ", ".join(f"{v} {ms[v][-1]:.2f}" for v in variants), flush=True)
        speed = {v: statistics.median(f / t for f, t in zip(ms["fp32"], ms[v], strict=True)) for v in variants}
        rows.append({"model": model, "batch": batch, "chosen": manifest.default_variant,
                     "ms": {v: statistics.median(t) for v, t in ms.items()}, "speed_vs_fp32": speed,
                     "accuracy_drop_points": choice.get("accuracy_drop_points", {}), "puzzles": choice.get("puzzles"),
                     "timed_at_batch_for_choice": choice.get("timed_at_batch")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="maze_att,sudoku_mlpt")
    parser.add_argument("--paper", action="store_true", help="the paper-size Maze-Hard shape instead")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "trm-cpu-engines")
    parser.add_argument("--name", default=None, help="results file stem (default cpu_engines or cpu_engines_paper)")
    parser.add_argument("--engines-only", action="store_true",
                        help="leave out PyTorch eager and ONNX Runtime on the standard-ops graph (paper size: minutes "
                             "a step at batch 8)")
    parser.add_argument("--int8", action="store_true",
                        help="also: --target cpu --precision best per model, its int8 forms against fp32")
    args = parser.parse_args()
    from trm_export.report.tune import tune_cpu_engines

    args.work.mkdir(parents=True, exist_ok=True)
    os.environ["TRM_EXPORT_TUNE_FILE"] = str(args.work / "tune.json")  # this run's record, not the user's
    models = ["paper-maze"] if args.paper else args.models.split(",")
    batches = tuple(int(b) for b in args.batches.split(","))
    result = {"machine": machine_description(), "threads": args.threads, "rounds": args.rounds, "rows": []}
    for model in models:
        bundle, ck = export(model, args.work)
        rows, _ = tune_cpu_engines(bundle, None, batches, args.threads, args.seconds, 5, log=print)
        tuned = {row.batch: row.record() for row in rows}
        for batch in batches:
            makers = contenders(bundle, ck, batch, args.threads)
            if args.engines_only:
                makers = {n: m for n, m in makers.items()
                          if n not in ("PyTorch eager", "ONNX Runtime, standard-ops graph")}
            names = list(makers)
            ms: dict[str, list[float]] = {n: [] for n in names}
            for r in range(args.rounds):
                order = names[r % len(names):] + names[:r % len(names)]  # rotating: nobody always goes first
                for name in order:
                    ms[name].append(time_round(makers[name], args.seconds))
                print(f"{model} b{batch} round {r + 1}/{args.rounds}: "
                      + ", ".join(f"{n} {ms[n][-1]:.2f}" for n in names), flush=True)
            median = {n: statistics.median(v) for n, v in ms.items()}
            # Each contender against the default in the same round (a shared machine's load moves both alike),
            # the median over rounds; the default's own engine and form is the default, not a contender.
            same = engine_of(bundle, batch, args.threads)
            paired = {n: statistics.median(c / d for c, d in zip(ms[n], ms[DEFAULT], strict=True))
                      for n in names if n != DEFAULT and n != same}
            fastest = min(paired, key=paired.get)
            row = {"model": model, "batch": batch, "ms": median, "ms_per_round": ms, "tune": tuned[batch],
                   "default_runs": same, "paired_ratio": paired, "fastest_other": fastest,
                   "default_vs_fastest": paired[fastest]}
            result["rows"].append(row)
            print(json.dumps({k: row[k] for k in ("model", "batch", "fastest_other", "default_vs_fastest")}))
    if args.int8:
        result["int8"] = [row for model in models for row in int8_rows(model, args.work, batches, args.threads,
                                                                       args.rounds, args.seconds)]
    name = args.name or ("cpu_engines_paper" if args.paper else "cpu_engines")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, RESULTS / f"{name}.md")


def write_markdown(result: dict, path: Path) -> None:
    names = list(dict.fromkeys(n for row in result["rows"] for n in row["ms"]))
    m = result["machine"]
    lines = ["# CPU engines after `trm-export tune` (`benchmarks/cpu_engines.py`, issue #41)", "",
             f"{m['machine']} ({', '.join(m['flags'])}), {result['threads']} threads, {result['rounds']} rounds "
             f"interleaved, median ms per step; torch {m['torch']}, onnxruntime {m['onnxruntime']}, openvino "
             f"{m['openvino']}; load average at start {m['load_average'][0]:.2f}. default / fastest: the fastest "
             "other contender's time over the default's, per round (both timed in it), median over rounds (>= 1.0: "
             "the default is at least as fast); the default's own engine and graph form is not counted as another "
             "contender.", "",
             "| model, batch | " + " | ".join(names) + " | tune chose | default / fastest |",
             "|---|" + "---|" * (len(names) + 2)]
    for row in result["rows"]:
        cells = [f"{row['ms'][n]:.2f}" if n in row["ms"] else "-" for n in names]
        lines.append(f"| {row['model']} b{row['batch']} | " + " | ".join(cells) + f" | {row['tune']['engine']} "
                     f"(OpenVINO {row['tune']['speedup']:.2f}x) | **{row['default_vs_fastest']:.2f}** "
                     f"({row['fastest_other']}) |")
    if result.get("int8"):
        lines += ["", "`--target cpu --precision best` (the chosen variant marked), ms per step, and speed against "
                  "fp32 per round (median); accuracy drop in points of exact accuracy against fp32 as the export "
                  "measured it (int8-dynamic and the best calibration on all held-out puzzles, the others on the "
                  "screening sample):", "",
                  "| model, batch | variant | ms/step | speed vs fp32 | accuracy drop (points) |",
                  "|---|---|---|---|---|"]
        for row in result["int8"]:
            for v, t in row["ms"].items():
                mark = " (chosen)" if v == row["chosen"] else ""
                drop = row["accuracy_drop_points"].get(v)
                lines.append(f"| {row['model']} b{row['batch']} | {v}{mark} | {t:.2f} | "
                             f"{row['speed_vs_fp32'][v]:.2f}x | {'-' if drop is None else f'{drop:+.2f}'} |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
