"""On-paper floor per puzzle on each Jetson module, beside this machine's measured CPU figures (issue #22).

    python benchmarks/jetson_floor.py [--cpu-json benchmarks/results/cpu_engines_reference.json]
                                      [--paper-json benchmarks/results/cpu_engines_paper_maze.json]

floor per puzzle = FLOPs of one step (analytic, matmuls: cpu_speed.step_flops) x mean steps / the module GPU's
dense tensor-core throughput, in INT8 and in FP16. It is a floor, not a prediction: it assumes every matmul runs
at the tensor cores' peak, and ignores softmax, norms, memory traffic and launch overheads (on a CPU the same
kind of figure, the GEMM peak, is reached to 60-100% by the step graph; on a GPU small batches reach far less).
The DLA cores are left out: TensorRT's DLA does not run attention.

Mean steps: the reference models' halting policies over 1000 held-out puzzles (halting_policies.json): the
official fixed 16, the trained Q head, and stable:1 (halts when the answer repeats; same accuracy as 16 steps on
both models). The paper-size maze has random weights: 16 steps, the official evaluation.

CPU beside it: this machine's measured ms per puzzle-step of the runtime's default engine at its largest batch
(cpu_speed.py's JSON), times the same mean steps.

Module throughput: trm_export.targets.floor.GPUS (SMs x GPU max clock x dense ops per SM per clock; Ampere sm_87:
4096 INT8, 2048 FP16; Volta sm_72: 2048 INT8, 1024 FP16). These reproduce NVIDIA's published module figures
(sparse INT8 = 2x dense; GPU + DLA totals): Orin Nano 8 GB 20.5 dense (40 TOPS sparse; 33.4 / 67 with the JetPack
6.1 "super" clocks), Orin NX 16 GB 30.1 dense GPU (100 TOPS with its DLAs), AGX Orin 64 GB 85.2 dense GPU (170
sparse GPU, 275 with its DLAs), AGX Xavier 22.6 INT8 / 11.3 FP16 GPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cpu_speed import step_flops  # benchmarks/ is on sys.path when run as a script

from trm_export.export.checkpoint import load_checkpoint
from trm_export.reference_models import reference_model_path
from trm_export.targets.floor import GPUS

RESULTS = Path(__file__).parent / "results"


MODULES = GPUS  # one table, in the package: the export-time report of a Jetson bundle shows the same floor


def mean_steps(model: str) -> dict[str, float]:
    rows = json.loads((RESULTS / "halting_policies.json").read_text())["models"][model]["rows"]
    steps = {"fixed 16": 16.0}
    for row in rows:
        if row["policy"] in ("q", "stable:1"):
            steps[row["policy"]] = row["mean_steps"]
    return steps


def measured_models(path: Path) -> dict:
    """cpu_speed.py's JSON: model name -> its measurements ({} when the file is absent)."""
    return json.loads(path.read_text())["models"] if path.is_file() else {}


def cpu_ms_per_puzzle_step(entry: dict | None) -> tuple[float, int, str] | None:
    """(ms per puzzle-step, batch, engine label) of the runtime's default engine at the largest measured batch."""
    if entry is None:
        return None
    batch = max(entry["step"], key=int)
    label = entry.get("default_vs_openvino", {}).get(batch, {}).get("default", "onnxruntime_fp32")
    return entry["step"][batch][label] * 1e3 / int(batch), int(batch), label


def table(name: str, gflop: float, steps: dict[str, float], cpu: tuple[float, int, str] | None) -> list[str]:
    policies = list(steps)
    head = ["module", "dense INT8 TOPS / FP16 TFLOPS"] + [f"floor INT8 / FP16, {p} ({steps[p]:.2f} steps)"
                                                        for p in policies]
    lines = [f"### {name}: {gflop:.3f} GFLOP per puzzle-step", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for m in MODULES:
        cells = [m.name, f"{m.peak('int8') / 1e12:.1f} / {m.peak('fp16') / 1e12:.1f}"]
        for p in policies:
            floor = [gflop * 1e9 * steps[p] / m.peak(prec) * 1e3 for prec in ("int8", "fp16")]
            cells.append(f"{_ms(floor[0])} / {_ms(floor[1])}")
        lines.append("| " + " | ".join(cells) + " |")
    if cpu is not None:
        ms, batch, label = cpu
        cells = [f"this CPU, measured ({label}, batch {batch})", "-"]
        cells += [_ms(ms * steps[p]) for p in policies]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _ms(ms: float) -> str:
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-json", type=Path, default=RESULTS / "cpu_engines_reference.json")
    parser.add_argument("--paper-json", type=Path, default=RESULTS / "cpu_engines_paper_maze.json")
    parser.add_argument("--paper-checkpoint", type=Path, default=None,
                        help="the paper-size maze checkpoint (benchmarks/paper_size.py --keep); its FLOPs otherwise "
                             "come from --paper-json")
    parser.add_argument("--output", type=Path, default=RESULTS / "jetson_floor.md")
    args = parser.parse_args()
    lines = ["# Jetson on-paper floor per puzzle vs this CPU (`benchmarks/jetson_floor.py`)", "",
             "Floor = FLOPs per step x mean steps / dense tensor-core throughput of the module's GPU (see the "
             "script's docstring for the sources). The CPU row is measured; the module rows are arithmetic.", ""]
    cpu = measured_models(args.cpu_json)
    for model in ("maze_att", "sudoku_mlpt"):
        gflop = step_flops(load_checkpoint(reference_model_path(model)).config) / 1e9
        lines += table(f"{model} (reference model)", gflop, mean_steps(model), cpu_ms_per_puzzle_step(cpu.get(model)))
    paper = next(iter(measured_models(args.paper_json).values()), None)
    if args.paper_checkpoint is not None:
        gflop = step_flops(load_checkpoint(args.paper_checkpoint).config) / 1e9
    else:
        gflop = None if paper is None else paper["step_gflop"]
    if gflop is not None:
        lines += table("paper-size Maze-Hard attention (random weights)", gflop, {"fixed 16": 16.0},
                       cpu_ms_per_puzzle_step(paper))
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
