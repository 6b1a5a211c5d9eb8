"""Exact accuracy of the PyTorch reference per step budget, on a task's puzzles.

One fixed run of the largest budget gives every smaller fixed budget (the prefix of the same computation) and
the adaptive result (its halting step read off the recorded Q values), so a whole table costs one loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trm_export.export.config import ModelConfig
from trm_export.export.model import RecursiveModel
from trm_export.export.reference import run_reference
from trm_export.tasks import Task, TaskData, exact_accuracy, get_task, token_accuracy


@dataclass(frozen=True)
class BudgetResult:
    """Accuracy of one loop setting: `budget` fixed steps, or adaptive halting capped at `budget`."""

    mode: str
    budget: int
    exact_accuracy: float
    token_accuracy: float
    mean_steps: float


def task_for_config(config: ModelConfig) -> Task:
    """The shipped task whose encoding matches the model (Sudoku: vocab 11 x 81; maze: vocab 6 x n*n)."""
    if config.vocab_size == 11 and config.seq_len == 81:
        return get_task("sudoku")
    side = round(config.seq_len ** 0.5)
    if config.vocab_size == 6 and side * side == config.seq_len:
        return get_task("maze", size=side)
    raise ValueError(f"no shipped task matches vocab_size={config.vocab_size}, seq_len={config.seq_len}; "
                     "known: sudoku (11 x 81), maze (6 x n*n)")


def accuracy_by_budget(model: RecursiveModel, data: TaskData, budgets: tuple[int, ...] = (1, 2, 4, 8, 16),
                       adaptive: bool = True, batch_size: int = 256, progress: bool = False) -> list[BudgetResult]:
    longest = max(budgets)
    trace = run_reference(model, data.inputs, data.puzzle_ids, mode="adaptive" if adaptive else "fixed",
                          max_steps=longest, batch_size=batch_size, progress=progress)
    rows = []
    for budget in sorted(budgets):
        preds = trace.step_predictions[budget - 1]
        rows.append(BudgetResult("fixed", budget, exact_accuracy(preds, data.labels),
                                 token_accuracy(preds, data.labels), float(budget)))
    if adaptive:
        rows.append(BudgetResult("adaptive", longest, exact_accuracy(trace.predictions, data.labels),
                                 token_accuracy(trace.predictions, data.labels), float(np.mean(trace.steps_used))))
    return rows


def format_table(rows: list[BudgetResult]) -> str:
    lines = ["| loop | steps | exact accuracy | token accuracy | mean steps |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.mode} | {r.budget} | {100 * r.exact_accuracy:.1f}% | {100 * r.token_accuracy:.2f}% "
                     f"| {r.mean_steps:.2f} |")
    return "\n".join(lines)
