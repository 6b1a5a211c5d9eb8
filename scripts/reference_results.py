"""Measure the shipped reference models on their held-out splits and write reference_models/RESULTS.md.

    python scripts/reference_results.py [--threads 2]

For each model: exact and token accuracy of the float32 PyTorch reference after 1, 2, 4, 8 and 16 fixed steps
and with adaptive halting (its Q head, capped at 16), on the task's 1,000 held-out puzzles; the issue's bars
checked; the training curve (from training_history.json beside the checkpoint) plotted to a PNG.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from trm_export.export.accuracy import BudgetResult, accuracy_by_budget, format_table, task_for_config
from trm_export.export.checkpoint import load_checkpoint
from trm_export.reference_models import HERE, TASK_OF_MODEL

BUDGETS = (1, 2, 4, 8, 16)


def bars(rows) -> list[tuple[str, bool, str]]:
    fixed = {r.budget: r for r in rows if r.mode == "fixed"}
    adaptive = next(r for r in rows if r.mode == "adaptive")
    acc16, acc1 = fixed[16].exact_accuracy, fixed[1].exact_accuracy
    return [
        ("exact accuracy at 16 steps >= 85%", acc16 >= 0.85, f"{100 * acc16:.1f}%"),
        ("1 step at least 20 points below 16 steps", acc16 - acc1 >= 0.20, f"{100 * (acc16 - acc1):.1f} points"),
        ("adaptive loses <= 2 points vs 16 fixed, with fewer steps",
         acc16 - adaptive.exact_accuracy <= 0.02 and adaptive.mean_steps < 16,
         f"{100 * (acc16 - adaptive.exact_accuracy):+.1f} points lost, {adaptive.mean_steps:.2f} mean steps"),
    ]


def plot_history(name: str, history: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [h["minutes"] for h in history]
    fig, (ax, loss) = plt.subplots(1, 2, figsize=(11, 4))
    for step in (1, 2, 4, 8, 16):
        ax.plot(minutes, [100 * h["exact_by_step"][step - 1] for h in history], marker="o", label=f"{step} steps")
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("exact accuracy, calibration split (%)")
    ax.set_title("exact accuracy by fixed step count (EMA weights)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(title="ACT steps", fontsize=8)
    loss.plot(minutes, [h["lm_loss"] for h in history], marker="o", label="answer cross-entropy (per token)")
    loss.plot(minutes, [h["q_loss"] for h in history], marker="o", label="Q head BCE (halt = answer right)")
    loss.set_xlabel("training time (minutes)")
    loss.set_ylabel("training loss (mean since previous point)")
    loss.set_yscale("log")
    loss.set_title("training losses")
    loss.grid(alpha=0.3, which="both")
    loss.legend(fontsize=8)
    fig.suptitle(f"{name}: training on a 2-core CPU")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=sorted(TASK_OF_MODEL),
                        help="models to measure again; the others keep their rows from results.json")
    parser.add_argument("--render-only", action="store_true", help="rewrite RESULTS.md from results.json")
    args = parser.parse_args()
    results_file = HERE / "results.json"
    published = json.loads(results_file.read_text()) if results_file.is_file() else {}
    torch.set_num_threads(args.threads)

    sections = ["# Reference models: measured results", "",
                "Float32 PyTorch reference (`trm-export evaluate`), task held-out split (1,000 puzzles, never seen in "
                "training or calibration). Exact accuracy = every token of the answer right (the official metric). "
                "Adaptive = halt when the trained Q head says q_halt > 0, capped at 16 steps.", ""]
    summary = {}
    for name in sorted(TASK_OF_MODEL):
        folder = HERE / name
        ck = load_checkpoint(folder)
        task = task_for_config(ck.config)
        if args.render_only or name not in args.models:
            if name not in published:
                raise SystemExit(f"{name} has no rows in {results_file}; measure it (--models {name})")
            rows = [BudgetResult(**r) for r in published[name]]
        else:
            rows = accuracy_by_budget(ck.model, task.split("heldout"), BUDGETS, adaptive=True, progress=True)
        cfg = ck.config
        params = sum(p.numel() for p in ck.model.parameters())
        size = ck.path.stat().st_size / 1e6
        history_file = folder / "training_history.json"
        history = json.loads(history_file.read_text()) if history_file.is_file() else []
        minutes = history[-1]["minutes"] if history else float("nan")
        sections += [f"## `{name}`: TRM {'mlp_t' if cfg.mlp_t else 'attention'} on {task.spec.name}"
                     f"{f' {task.spec.side}x{task.spec.side}' if task.spec.side else ''}", "",
                     f"{params:,} parameters, hidden {cfg.hidden_size}, {cfg.L_layers} layers, H_cycles "
                     f"{cfg.H_cycles}, L_cycles {cfg.L_cycles}, pos {cfg.pos_encodings}, checkpoint {ck.path.name} "
                     f"({size:.1f} MB, float32), trained {minutes:.0f} min (`scripts/train_reference.py`).", "",
                     format_table(rows), "", "| bar | met | measured |", "|---|---|---|"]
        for text, ok, figure in bars(rows):
            sections.append(f"| {text} | {'yes' if ok else 'NO'} | {figure} |")
        notes = folder / "NOTES.md"  # how it was trained, what fell short: kept beside the model, quoted here
        if notes.is_file():
            sections += ["", notes.read_text().strip()]
        if history:
            plot_history(name, history, folder / "training_curve.png")
            sections += ["", f"![training curve]({name}/training_curve.png)"]
        sections.append("")
        summary[name] = [r.__dict__ for r in rows]
        print(f"{name}:\n{format_table(rows)}", flush=True)
    (HERE / "RESULTS.md").write_text("\n".join(sections))
    (HERE / "results.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
