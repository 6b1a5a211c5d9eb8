"""Name -> task lookup, so CLIs and configs can say ``sudoku`` or ``maze`` with a size."""

from __future__ import annotations

from typing import Any

from .base import Task
from .maze import MazeTask
from .sudoku import SudokuTask

__all__ = ["TASK_NAMES", "get_task"]

#: Valid names for :func:`get_task`.
TASK_NAMES: tuple[str, ...] = ("sudoku", "maze")


def get_task(name: str, **params: Any) -> Task:
    """Build a task by name: ``get_task("sudoku")`` or ``get_task("maze", size=11)``.

    The maze size is required (no default) because a model only works at the grid side it
    was trained on and a silent default would hide that mismatch. Unknown names or
    parameters raise ValueError listing what is valid.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key == "sudoku":
        if params:
            raise ValueError(f"task 'sudoku' takes no parameters, got {sorted(params)}")
        return SudokuTask()
    if key == "maze":
        extra = set(params) - {"size"}
        if extra:
            raise ValueError(f"task 'maze' takes only 'size', got {sorted(extra)}")
        if "size" not in params:
            raise ValueError("task 'maze' needs size=<grid side>, e.g. get_task('maze', size=11)")
        return MazeTask(params["size"])
    raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASK_NAMES)}")
