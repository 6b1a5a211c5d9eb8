"""Exact accuracy of the PyTorch reference per step budget, on a task's puzzles.

One fixed run of the largest budget gives every smaller fixed budget (the prefix of the same computation) and
the adaptive result (its halting step read off the recorded Q values), so a whole table costs one loop.

compute_dtype "bfloat16" computes as the official code does with forward_dtype bfloat16 (export/bfloat16.py): the
accuracy the user's training printed. `format_table` puts float32 and bfloat16 rows side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trm_export.export.config import ModelConfig
from trm_export.export.model import RecursiveModel
from trm_export.export.reference import run_reference
from trm_export.tasks import IGNORE_LABEL, Task, TaskData, exact_accuracy, get_task, token_accuracy


@dataclass(frozen=True)
class BudgetResult:
    """Accuracy of one loop setting: `budget` fixed steps, or adaptive halting capped at `budget`."""

    mode: str
    budget: int
    exact_accuracy: float
    token_accuracy: float
    mean_steps: float
    compute_dtype: str = "float32"  # the reference's arithmetic: "float32" (what exports compute) or "bfloat16"


def task_for_config(config: ModelConfig) -> Task:
    """The shipped task whose encoding matches the model (Sudoku: vocab 11 x 81; maze: vocab 6 x n*n)."""
    if config.vocab_size == 11 and config.seq_len == 81:
        return get_task("sudoku")
    side = round(config.seq_len ** 0.5)
    if config.vocab_size == 6 and side * side == config.seq_len:
        return get_task("maze", size=side)
    raise ValueError(f"no shipped task matches vocab_size={config.vocab_size}, seq_len={config.seq_len}; "
                     "known: sudoku (11 x 81), maze (6 x n*n)")


def training_compute_dtypes(config: ModelConfig) -> tuple[str, ...]:
    """The reference dtypes worth showing for a checkpoint: float32 (what every export computes), and bfloat16
    beside it when the model was trained in bfloat16 (forward_dtype, the official default)."""
    return ("float32", "bfloat16") if config.forward_dtype == "bfloat16" else ("float32",)


def accuracy_by_budget(model: RecursiveModel, data: TaskData, budgets: tuple[int, ...] = (1, 2, 4, 8, 16),
                       adaptive: bool = True, batch_size: int = 256, progress: bool = False,
                       compute_dtype: str = "float32") -> list[BudgetResult]:
    """One row per fixed budget (and one adaptive row), the reference computing in `compute_dtype`."""
    longest = max(budgets)
    trace = run_reference(model, data.inputs, data.puzzle_ids, mode="adaptive" if adaptive else "fixed",
                          max_steps=longest, batch_size=batch_size, progress=progress, compute_dtype=compute_dtype)
    rows = []
    for budget in sorted(budgets):
        preds = trace.step_predictions[budget - 1]
        rows.append(BudgetResult("fixed", budget, exact_accuracy(preds, data.labels, IGNORE_LABEL),
                                 token_accuracy(preds, data.labels, IGNORE_LABEL), float(budget), compute_dtype))
    if adaptive:
        rows.append(BudgetResult("adaptive", longest, exact_accuracy(trace.predictions, data.labels, IGNORE_LABEL),
                                 token_accuracy(trace.predictions, data.labels, IGNORE_LABEL),
                                 float(np.mean(trace.steps_used)), compute_dtype))
    return rows


def accuracy_by_budget_and_dtype(model: RecursiveModel, data: TaskData, budgets: tuple[int, ...] = (1, 2, 4, 8, 16),
                                 adaptive: bool = True, batch_size: int = 256, progress: bool = False,
                                 compute_dtypes: tuple[str, ...] | None = None) -> list[BudgetResult]:
    """accuracy_by_budget once per compute dtype (default: training_compute_dtypes(model.config)), rows of all
    dtypes in one list for format_table."""
    rows = []
    for dtype in compute_dtypes or training_compute_dtypes(model.config):
        rows += accuracy_by_budget(model, data, budgets, adaptive=adaptive, batch_size=batch_size,
                                   progress=progress, compute_dtype=dtype)
    return rows


def format_table(rows: list[BudgetResult]) -> str:
    """Markdown table; rows of several compute dtypes become one line per loop setting, the dtypes side by side."""
    dtypes = list(dict.fromkeys(r.compute_dtype for r in rows))
    if len(dtypes) > 1:
        return _format_side_by_side(rows, dtypes)
    lines = ["| loop | steps | exact accuracy | token accuracy | mean steps |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.mode} | {r.budget} | {100 * r.exact_accuracy:.1f}% | {100 * r.token_accuracy:.2f}% "
                     f"| {r.mean_steps:.2f} |")
    return "\n".join(lines)


def _format_side_by_side(rows: list[BudgetResult], dtypes: list[str]) -> str:
    by_key = {(r.mode, r.budget, r.compute_dtype): r for r in rows}
    settings = list(dict.fromkeys((r.mode, r.budget) for r in rows))
    columns = ["exact accuracy", "token accuracy", "mean steps"]
    header = ["loop", "steps"] + [f"{c} ({d})" for c in columns for d in dtypes]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for mode, budget in settings:
        cells = [mode, str(budget)]
        for fmt in (lambda r: f"{100 * r.exact_accuracy:.1f}%", lambda r: f"{100 * r.token_accuracy:.2f}%",
                    lambda r: f"{r.mean_steps:.2f}"):
            cells += [fmt(by_key[mode, budget, d]) if (mode, budget, d) in by_key else "-" for d in dtypes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


TRAINED_BUDGETS = (1, 2, 4, 8, 16)


def trained_dtype_accuracy(model: RecursiveModel, tokens: np.ndarray, puzzle_ids: np.ndarray, labels: np.ndarray,
                           source: str, batch: int = 64) -> dict | None:
    """The accuracy in the arithmetic the model was trained in, for the bundle (manifest.reference): a device has
    no PyTorch to compute it, and it is the number the user's training printed. None for a float32-trained model.

    On every given puzzle (the export's plan sizes them: on a CPU without AVX512_BF16 / AMX PyTorch emulates
    bfloat16 GEMMs at 5-30x float32's cost): fixed budgets up to halt_max_steps and the Q head's halting, each
    puzzle's loop run once, `batch` at a time."""
    dtype = model.config.forward_dtype
    if dtype != "bfloat16":
        return None
    steps = model.config.halt_max_steps
    budgets = sorted({b for b in TRAINED_BUDGETS if b <= steps} | {steps})
    traces = [run_reference(model, tokens[i:i + batch], puzzle_ids[i:i + batch], mode="adaptive", compute_dtype=dtype)
              for i in range(0, len(tokens), batch)]
    done = sum(len(t.predictions) for t in traces)
    step_predictions = np.concatenate([t.step_predictions for t in traces], axis=1)
    adaptive = np.concatenate([t.predictions for t in traces])
    steps_used = np.concatenate([t.steps_used for t in traces])
    expected = labels[:done]
    rows = [{"mode": "fixed", "budget": b, "exact_accuracy": exact_accuracy(step_predictions[b - 1], expected,
                                                                            IGNORE_LABEL),
             "token_accuracy": token_accuracy(step_predictions[b - 1], expected, IGNORE_LABEL), "mean_steps": float(b)}
            for b in budgets]
    rows.append({"mode": "adaptive", "budget": steps,
                 "exact_accuracy": exact_accuracy(adaptive, expected, IGNORE_LABEL),
                 "token_accuracy": token_accuracy(adaptive, expected, IGNORE_LABEL),
                 "mean_steps": float(steps_used.mean())})
    return {"puzzles": done, "source": f"{source}, the first {done} (the export's plan)", "rows": rows}
