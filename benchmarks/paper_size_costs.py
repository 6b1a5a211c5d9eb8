"""Seconds per puzzle-step of the paper-size models (issue #17): the unit every time budget is sized with.

For each paper-size model (random weights, official shapes; ARC costs what Maze costs) and batch size: one ACT
step of the float32 PyTorch reference, of its float64 copy (what parity's rounding checks run) and of the exported
ONNX step graph on ONNX Runtime (what verify / run / report / calibration measure). Prints a table and writes
benchmarks/results/paper_size_costs.json.

    .venv/bin/python benchmarks/paper_size_costs.py [--models sudoku-mlpt,hrm-sudoku,maze-att] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from official_format import paper_variant, write_paper_checkpoint  # noqa: E402

MODELS = {"sudoku-mlpt": "paper-trm-mlpt-sudoku", "hrm-sudoku": "paper-hrm-sudoku", "maze-att": "paper-trm-att-maze"}
BATCHES = {"sudoku-mlpt": (1, 16), "hrm-sudoku": (1, 16), "maze-att": (1, 4)}


def timed(fn, *args, repeats: int = 2) -> tuple[float, float]:
    """Best (wall seconds, CPU seconds of this process) of `repeats` calls after a warm-up. With one thread the CPU
    time is what a quiet core would take: on a shared machine the wall time also counts waiting for a core."""
    fn(*args)  # warm-up
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        fn(*args)
        best = min(best, (time.perf_counter() - start, time.process_time() - cpu))
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-float64", action="store_true")
    ap.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "paper_size_costs.json")
    args = ap.parse_args()
    import onnxruntime as ort

    from trm_export.export.checkpoint import load_checkpoint
    from trm_export.export.onnx_graph import export_step_graph

    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        v = paper_variant(MODELS[name])
        with tempfile.TemporaryDirectory() as tmp:
            model = load_checkpoint(write_paper_checkpoint(Path(tmp), v.name)).model
        cfg = model.config
        graph = export_step_graph(model, 20)
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        session = ort.InferenceSession(graph.data, so, providers=["CPUExecutionProvider"])
        model64 = None if args.no_float64 else __import__("copy").deepcopy(model).double()
        for batch in BATCHES[name]:
            shape = (batch, cfg.total_seq_len, cfg.hidden_size)
            x, z_H, z_L = (torch.randn(shape) for _ in range(3))
            with torch.inference_mode():
                t32, c32 = timed(model.step, x, z_H, z_L)
                t64, c64 = (timed(model64.step, x.double(), z_H.double(), z_L.double(), repeats=1)
                            if model64 is not None and batch <= BATCHES[name][1] else (None, None))
            feeds = {"x": x.numpy(), "z_H": z_H.numpy(), "z_L": z_L.numpy()}
            tort, cort = timed(session.run, None, feeds)
            row = {"model": name, "batch": batch, "torch_fp32_s_per_puzzle_step": t32 / batch,
                   "torch_fp64_s_per_puzzle_step": None if t64 is None else t64 / batch,
                   "ort_fp32_s_per_puzzle_step": tort / batch, "threads": args.threads,
                   "cpu_s_per_puzzle_step": {"torch_fp32": c32 / batch, "torch_fp64": None if c64 is None else
                                             c64 / batch, "ort_fp32": cort / batch},
                   "loadavg": os.getloadavg()[0], "positions": cfg.total_seq_len}
            rows.append(row)
            print(f"{name:12s} batch {batch:3d}: torch fp32 {t32 / batch:.3f} s/puzzle-step, "
                  f"fp64 {'-' if t64 is None else f'{t64 / batch:.3f}'}, ORT fp32 {tort / batch:.3f} "
                  f"(load {row['loadavg']:.1f}); CPU s: {c32 / batch:.3f}, "
                  f"{'-' if c64 is None else f'{c64 / batch:.3f}'}, {cort / batch:.3f}", flush=True)
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
