"""lucidrains' tiny-recursive-model through trm-export, end to end (issue #40): train one on Sudoku with the
package's own Trainer on the CPU for a bounded number of optimizer steps, save it as its README does, export it for
a Jetson (INT8 chosen as for any model) and for a browser, and compare the bundle's answers and exit steps with the
package's own `predict()` on held-out puzzles: the 1,000 of the held-out split (30-55 blanks), and the same 1,000
with all but 5-15 of their blanks filled in from their solutions (the training's difficulty, on puzzles it never
saw: the puzzles a briefly trained model solves, and where its halting head says "done" before the step limit).

    .venv/bin/python benchmarks/lucidrains_trm.py [--puzzles 65536] [--epochs 1] [--out /tmp/trm-lucidrains]

Results: benchmarks/results/lucidrains_trm.md (and .json). The training is bounded by its work (puzzles x
epochs x recurrent steps), never by the clock; the seconds it took are printed beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from trm_export.export.adapters.tiny_recursive_model import TinyRecursiveConfig, build

RESULTS = Path(__file__).parent / "results"
CONFIG = {"dim": 64, "num_tokens": 11, "seq_len": 81, "depth": 2, "num_refinement_blocks": 2,
          "num_latent_refinements": 2, "num_register_tokens": 2, "halt_prob_thres": 0.5,
          "max_deep_refinement_steps": 8}
BLANKS = (5, 15)  # the training's difficulty: blanks per puzzle


def train(out: Path, puzzles: int, epochs: int, batch: int, recurrent_steps: int) -> float:
    from tiny_recursive_model import Trainer
    from torch.utils.data import TensorDataset

    from trm_export.tasks import get_task

    torch.manual_seed(0)
    data = get_task("sudoku").split("train", size=puzzles, min_blanks=BLANKS[0], max_blanks=BLANKS[1])
    dataset = TensorDataset(torch.from_numpy(data.inputs.astype(np.int64)),
                            torch.from_numpy(data.labels.astype(np.int64)))
    c = CONFIG
    trm = build(TinyRecursiveConfig(**CONFIG))  # the package's own classes, as the adapter builds them
    # The package divides its learning rate by batch x recurrent steps and warms up over 2,000 steps (settings
    # for long GPU runs); a short CPU run asks for an effective 1e-3 from the start.
    trainer = Trainer(trm, dataset, epochs=epochs, batch_size=batch, max_recurrent_steps=recurrent_steps,
                      learning_rate=1e-3 * batch * recurrent_steps, weight_decay=0.1, warmup_steps=20, cpu=True,
                      halt_prob_thres=c["halt_prob_thres"])
    start = time.perf_counter()
    trainer()
    seconds = time.perf_counter() - start
    torch.save(trm.state_dict(), out / "saved-trm.pt")
    (out / "trm.json").write_text(json.dumps(CONFIG))
    return seconds


def export(out: Path, target: str) -> Path:
    bundle = out / f"sudoku-{target}.bundle"
    subprocess.run([sys.executable, "-m", "trm_export.cli", str(out / "saved-trm.pt"), "--arch",
                    "tiny-recursive-model", "--arch-config", str(out / "trm.json"), "--target", target, "-o",
                    str(bundle), "--force"], check=True)
    return bundle


def held_out_sets() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(inputs, labels) of the held-out split, and of the same puzzles with all but 5-15 blanks filled in from
    their solutions (seeded: the same puzzles on every run)."""
    from trm_export.tasks import get_task

    held = get_task("sudoku").split("heldout")
    rng = np.random.default_rng(0)
    easy = held.labels.copy()
    for i in range(len(easy)):
        blanks = np.flatnonzero(held.inputs[i] != held.labels[i])
        left = rng.choice(blanks, size=min(len(blanks), int(rng.integers(BLANKS[0], BLANKS[1] + 1))), replace=False)
        easy[i, left] = held.inputs[i, left]
    return {"held-out (30-55 blanks)": (held.inputs, held.labels),
            f"held-out, {BLANKS[0]}-{BLANKS[1]} blanks left": (easy, held.labels)}


def compare(out: Path, bundles: dict[str, Path]) -> dict:
    from trm_export.runtime import Solver
    from trm_export.runtime.manifest import read_manifest

    c = CONFIG
    trm = build(TinyRecursiveConfig(**CONFIG))  # the package's own classes, as the adapter builds them
    trm.load_state_dict(torch.load(out / "saved-trm.pt", weights_only=True))
    trm.eval()
    rows = {}
    for set_name, (inputs, labels) in held_out_sets().items():
        with torch.no_grad():
            preds, steps = trm.predict(torch.from_numpy(inputs.copy()).long(), halt_prob_thres=c["halt_prob_thres"],
                                       max_deep_refinement_steps=c["max_deep_refinement_steps"])
        preds, steps = preds.numpy(), steps.numpy()
        rows[f"{set_name}: predict"] = {"exact": float((preds == labels).all(axis=1).mean()),
                                        "token": float((preds == labels).mean()), "mean_steps": float(steps.mean()),
                                        "early": float((steps < c["max_deep_refinement_steps"]).mean())}
        for target, bundle in bundles.items():
            manifest = read_manifest(bundle)
            for variant in sorted(manifest.graphs):
                r = Solver(bundle, variant=variant).solve(inputs)
                rows[f"{set_name}: {target} {variant}"] = {
                    "exact": float((r.predictions == labels).all(axis=1).mean()),
                    "token": float((r.predictions == labels).mean()), "mean_steps": float(r.steps_used.mean()),
                    "early": float((r.steps_used < c["max_deep_refinement_steps"]).mean()),
                    "answers_equal_predict": float((r.predictions == preds).all(axis=1).mean()),
                    "steps_equal_predict": float((r.steps_used == steps).mean()),
                    "default": variant == manifest.default_variant}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--puzzles", type=int, default=65536)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--recurrent-steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("/tmp/trm-lucidrains"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seconds = train(args.out, args.puzzles, args.epochs, args.batch, args.recurrent_steps)
    bundles = {target: export(args.out, target) for target in ("jetson", "browser")}
    rows = compare(args.out, bundles)
    result = {"config": CONFIG, "train": {"puzzles": args.puzzles, "epochs": args.epochs, "batch": args.batch,
                                          "recurrent_steps": args.recurrent_steps, "seconds": seconds},
              "rows": rows}
    (RESULTS / "lucidrains_trm.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# lucidrains' tiny-recursive-model through trm-export (`benchmarks/lucidrains_trm.py`)", "",
             f"Trained with the package's Trainer on this CPU: {args.puzzles} Sudoku puzzles of the train split "
             f"({BLANKS[0]}-{BLANKS[1]} blanks), {args.epochs} epoch(s), batch {args.batch}, at most "
             f"{args.recurrent_steps} recurrent steps per batch ({seconds:.0f} s here). Network: "
             f"{json.dumps(CONFIG)}. Measured on the 1,000 held-out puzzles as they are (30-55 blanks, harder than "
             f"training) and with all but {BLANKS[0]}-{BLANKS[1]} of their blanks filled in from their solutions "
             "(the training's difficulty, on puzzles it never saw), each bundle's variants through the Python "
             "runtime (the browser bundle's page runs the same graph on onnxruntime-web). `early`: puzzles halted "
             "by the halting head before the step limit.", "",
             "| puzzles: run | exact | token | mean steps | early | answers = predict() | exit steps = predict() |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        same = (f"{100 * r['answers_equal_predict']:.1f}% | {100 * r['steps_equal_predict']:.1f}%"
                if "answers_equal_predict" in r else "- | -")
        lines.append(f"| {name}{' (default)' if r.get('default') else ''} | {100 * r['exact']:.1f}% | "
                     f"{100 * r['token']:.2f}% | {r['mean_steps']:.2f} | {100 * r['early']:.1f}% | {same} |")
    (RESULTS / "lucidrains_trm.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
