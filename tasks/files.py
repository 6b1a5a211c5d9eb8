"""Loading puzzle files (.txt or .npy) into token arrays, with errors that point at the line.

Text formats: Sudoku files hold one 81-character puzzle per line ('0' or '.' for blanks);
empty lines and lines starting with '#' are skipped as comments. Maze files hold square
grids drawn with ``"# SGo"`` separated by empty lines -- there '#' is a wall, so comment
lines cannot exist and are not skipped. ``.npy`` files hold int token arrays, shape
(N, seq_len), (N, side, side) or a single (seq_len,) puzzle.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .base import Task
from .maze import MazeFormatError, MazeTask, parse_maze
from .registry import get_task
from .sudoku import SudokuTask, parse_sudoku

__all__ = ["load_puzzles"]


def _resolve(task: Task | str) -> Task | None:
    """A Task instance, or None for "maze" by name (the side is then read from the file)."""
    if isinstance(task, Task):
        return task
    if isinstance(task, str) and task.strip().lower() == "maze":
        return None
    return get_task(task)


def load_puzzles(path: str | os.PathLike[str], task: Task | str) -> np.ndarray:
    """Read puzzles from ``path`` and return their input tokens, int32 (N, seq_len).

    ``task`` is a Task or a task name; with the name "maze" the side is taken from the file.
    Every error is a ValueError naming the file (and the line for text files). Text files
    carry no labels; use ``task.solve`` to get reference labels for scoring.
    """
    p = Path(path)
    resolved = _resolve(task)
    suffix = p.suffix.lower()
    if suffix == ".npy":
        return _load_npy(p, resolved)
    if suffix == ".txt":
        text = p.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not part of the first puzzle
        if resolved is None or isinstance(resolved, MazeTask):
            return _load_maze_txt(p, text, resolved)
        if isinstance(resolved, SudokuTask):
            return _load_sudoku_txt(p, text)
        raise ValueError(f"{p}: no text format known for task {resolved.spec.name!r}")
    raise ValueError(f"{p}: unsupported file type {p.suffix!r}; use .txt or .npy")


def _load_sudoku_txt(path: Path, text: str) -> np.ndarray:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            rows.append(parse_sudoku(stripped))
        except ValueError as err:
            raise ValueError(f"{path}:{lineno}: {err}") from None
    if not rows:
        raise ValueError(f"{path}: no sudoku puzzles found")
    return np.stack(rows).astype(np.int32)


def _load_maze_txt(path: Path, text: str, task: MazeTask | None) -> np.ndarray:
    blocks: list[tuple[int, list[str]]] = []
    current: list[str] = []
    start = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line == "":
            if current:
                blocks.append((start, current))
                current = []
            continue
        if not current:
            start = lineno
        current.append(line)
    if current:
        blocks.append((start, current))
    if not blocks:
        raise ValueError(f"{path}: no mazes found")
    side = task.size if task is not None else len(blocks[0][1])
    mazes = []
    for start, rows in blocks:
        try:
            tokens = parse_maze(rows)
        except MazeFormatError as err:
            where = f"{start + err.row - 1}" if err.row else f"{start} (maze starting here)"
            raise ValueError(f"{path}:{where}: {err}") from None
        if tokens.size != side * side:
            raise ValueError(
                f"{path}:{start}: maze has side {len(rows)}, expected {side} "
                "(all mazes in a file must have the task's side)"
            )
        mazes.append(tokens)
    return np.stack(mazes).astype(np.int32)


def _load_npy(path: Path, task: Task | None) -> np.ndarray:
    try:
        # memory-mapped: a header that claims more elements than the file holds fails here, before any allocation
        arr = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise ValueError(f"{path}: not a plain numpy array file ({err})") from None
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path}: expected integer tokens, got dtype {arr.dtype}")
    arr = np.array(arr)  # off the file: small once the dtype is known to be plain integers
    if task is None:  # maze by name: infer the side from the array
        side = arr.shape[-1] if arr.ndim == 3 else int(round(arr.shape[-1] ** 0.5))
        task = get_task("maze", size=side)
    spec = task.spec
    if arr.ndim == 1 and arr.size == spec.seq_len:
        arr = arr[None, :]
    elif arr.ndim == 3 and arr.shape[1:] == (spec.side, spec.side):
        arr = arr.reshape(arr.shape[0], spec.seq_len)
    if arr.ndim != 2 or arr.shape[1] != spec.seq_len:
        raise ValueError(f"{path}: array of shape {arr.shape} is not (N, {spec.seq_len}) {spec.name} tokens")
    bad = (arr < 0) | (arr >= spec.vocab_size)
    if bad.any():
        row, col = (int(x[0]) for x in np.nonzero(bad))
        raise ValueError(
            f"{path}: token {int(arr[row, col])} at puzzle {row}, position {col} is outside "
            f"0..{spec.vocab_size - 1}"
        )
    return arr.astype(np.int32)
