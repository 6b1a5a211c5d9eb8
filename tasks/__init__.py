"""Deterministic puzzle generators in the official HRM/TRM token encodings (numpy only).

Used to train small reference models, calibrate quantization and measure exact accuracy::

    from trm_export.tasks import get_task, exact_accuracy
    task = get_task("sudoku")            # or get_task("maze", size=11)
    heldout = task.split("heldout")      # 1000 fixed puzzles, disjoint from train/calibration
    acc = exact_accuracy(predictions, heldout.labels)

Modules: ``base`` (TaskData, TaskSpec, Task, splits), ``sudoku``, ``maze``, ``metrics``,
``files`` (load_puzzles), ``official`` (official dataset folders), ``registry`` (get_task).
"""

from .base import SPLIT_NAMES, Task, TaskData, TaskSpec
from .files import load_puzzles
from .maze import MazeTask, format_maze, parse_maze, solve_maze, valid_maze_solutions
from .metrics import exact_accuracy, per_puzzle_correct, token_accuracy
from .official import (
    IGNORE_LABEL,
    DatasetFolder,
    DatasetFolderError,
    folder_sample,
    read_official_dataset,
    write_official_dataset,
)
from .registry import TASK_NAMES, get_task
from .sudoku import SudokuTask, count_solutions, format_sudoku, parse_sudoku, solve_sudoku, valid_sudoku_solutions

__all__ = [
    "IGNORE_LABEL",
    "DatasetFolder",
    "DatasetFolderError",
    "SPLIT_NAMES",
    "TASK_NAMES",
    "MazeTask",
    "SudokuTask",
    "Task",
    "TaskData",
    "TaskSpec",
    "count_solutions",
    "folder_sample",
    "exact_accuracy",
    "format_maze",
    "format_sudoku",
    "get_task",
    "load_puzzles",
    "parse_maze",
    "parse_sudoku",
    "per_puzzle_correct",
    "read_official_dataset",
    "solve_maze",
    "solve_sudoku",
    "token_accuracy",
    "valid_maze_solutions",
    "valid_sudoku_solutions",
    "write_official_dataset",
]
