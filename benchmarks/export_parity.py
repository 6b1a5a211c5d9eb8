"""Parity figures and graph sizes of the export, for every model variant and the shipped reference models.

    python benchmarks/export_parity.py [--variants] [--reference] [--json out.json]

Variants: small random-weight checkpoints written in the official format (tests/official_format.py, contractive
gain 0.5), 32 random puzzles, their trained step limit. Reference models: the task's full held-out split, 16
steps. Each export runs the pipeline's own verify stage; this prints what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from official_format import VARIANTS, write_official_checkpoint  # noqa: E402

from trm_export.export.pipeline import ExportOptions, Puzzles, export_bundle  # noqa: E402
from trm_export.reference_models import TASK_OF_MODEL, reference_model_path  # noqa: E402


def _row(name: str, path: Path, report) -> dict:
    graph = next(path.glob("graphs/*.onnx"))
    return {"model": name, "puzzles": report.puzzles, "steps": report.steps,
            "max_abs_z_H": max(report.max_abs_z_H), "max_abs_logits": max(report.max_abs_logits),
            "max_abs_q": report.max_abs_q, "q_halt_sign_agreement": report.q_halt_sign_agreement,
            "predictions_identical": report.predictions_identical,
            "adaptive_identical": min(report.adaptive_steps_identical, report.adaptive_predictions_identical),
            "graph_mb": graph.stat().st_size / 1e6,
            "bundle_mb": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6,
            "exact_accuracy": report.bundle_exact_accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", action="store_true")
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--target", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.variants:
            for name, variant in sorted(VARIANTS.items()):
                v = dataclasses.replace(variant, gain=0.5)
                write_official_checkpoint(tmp / name, v)
                rng = np.random.default_rng(0)
                puzzles = Puzzles(rng.integers(1, v.vocab_size, (32, v.seq_len)),
                                  rng.integers(0, v.num_puzzle_identifiers, 32), None, "random", None)
                path, _, report = export_bundle(tmp / name, tmp / f"{name}.bundle",
                                                ExportOptions(target=args.target, progress=False), puzzles=puzzles)
                rows.append(_row(name, path, report))
                print(json.dumps(rows[-1]), flush=True)
        if args.reference:
            for name in sorted(TASK_OF_MODEL):
                path, _, report = export_bundle(reference_model_path(name), tmp / f"{name}.bundle",
                                                ExportOptions(target=args.target, progress=True))
                rows.append(_row(name, path, report))
                print(json.dumps(rows[-1]), flush=True)
    print("\n| model | puzzles x steps | max abs z_H | max abs logits | max abs q | q_halt sign | fixed preds "
          "identical | adaptive identical | graph MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['puzzles']} x {r['steps']} | {r['max_abs_z_H']:.1e} | {r['max_abs_logits']:.1e} | "
              f"{r['max_abs_q']:.1e} | {100 * r['q_halt_sign_agreement']:.1f}% | "
              f"{100 * r['predictions_identical']:.1f}% | {100 * r['adaptive_identical']:.1f}% | {r['graph_mb']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
