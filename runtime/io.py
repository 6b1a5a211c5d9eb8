"""Puzzle files in, solution files out, for the `run` command and device apps (numpy only)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from trm_export.errors import BundleError, InputError
from trm_export.runtime.embedding import load_array
from trm_export.runtime.manifest import TaskEncoding
from trm_export.runtime.solver import SolveResult

MAX_PUZZLE_FILE_BYTES = 4 << 30


def task_for_encoding(encoding: TaskEncoding):
    """The shipped task (generator with fixed splits and a text format) of a bundle, or None for a user's own."""
    from trm_export.tasks import get_task

    if encoding.name == "sudoku":
        return get_task("sudoku")
    if encoding.name == "maze" and encoding.grid_side:
        return get_task("maze", size=encoding.grid_side)
    return None


def read_puzzles(path: str | Path, encoding: TaskEncoding) -> np.ndarray:
    """Tokens [N, seq_len] from a .npy, or from the task's text format (Sudoku lines, maze grids)."""
    from trm_export.tasks import load_puzzles

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a puzzle file (.txt or .npy)")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.stat().st_size > MAX_PUZZLE_FILE_BYTES:
        raise InputError(f"{path}: {path.stat().st_size / 2**30:.1f} GiB; puzzle files are read whole, at most "
                         f"{MAX_PUZZLE_FILE_BYTES >> 30} GiB: split it")
    task = task_for_encoding(encoding)
    if task is None:
        if path.suffix.lower() != ".npy":
            raise InputError(f"{path}: this model's task has no text format; give a .npy of tokens "
                             f"[N, {encoding.seq_len}]")
        try:
            return load_array(path, kinds="iu")
        except BundleError as exc:
            raise InputError(f"cannot read tokens: {exc}") from None
    try:
        return load_puzzles(path, task)
    except (OSError, ValueError) as exc:
        raise InputError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None


def check_solutions(inputs: np.ndarray, predictions: np.ndarray, encoding: TaskEncoding) -> np.ndarray | None:
    """bool [N]: which predictions solve their puzzles by the task's rules (`Task.valid_solutions`), or None
    when the model's task is not a shipped one (nothing to check against)."""
    task = task_for_encoding(encoding)
    if task is None:
        return None
    try:
        return np.asarray(task.valid_solutions(np.asarray(inputs), np.asarray(predictions)), dtype=bool)
    except NotImplementedError:
        return None


def describe_run(result: SolveResult, valid: np.ndarray | None, mode: str, backend: str,
                 labels: np.ndarray | None = None) -> str:
    """The one summary line of a run: how many answers are valid solutions (and, with `labels`, equal to them:
    a dataset folder's), the mode, mean steps, the backend."""
    from trm_export.tasks import IGNORE_LABEL, per_puzzle_correct

    n = len(result)
    if valid is None:
        counted = "answers not checked (no checker for this model's task)" if labels is None else ""
    else:
        good = int(np.count_nonzero(valid))
        counted = f"{good} valid solution{'' if good == 1 else 's'}, {n - good} not"
    if labels is not None:
        right = int(np.count_nonzero(per_puzzle_correct(result.predictions, labels, IGNORE_LABEL)))
        exact = f"{right} of {n} exactly right ({100 * right / max(n, 1):.1f}%, against the labels)"
        counted = f"{counted}; {exact}" if counted else exact
    steps = f"mean {float(result.steps_used.mean()):.2f} steps" if n else "no steps"
    return f"{n} puzzle{'' if n == 1 else 's'}: {counted} ({mode}, {steps}, backend {backend})"


# Token -> character of the official encodings (0 is pad: '?', it should never be an answer).
TEXT_CHARSETS = {"sudoku": "?.123456789", "maze": "?# SGo"}


def format_solutions(result: SolveResult, encoding: TaskEncoding, valid: np.ndarray | None = None) -> str:
    """One line per puzzle, three tab-separated columns: the answer (Sudoku: 81 characters; maze: the grid's rows
    joined by '|'; other tasks: tokens separated by spaces), the steps used, and `valid` / `invalid` (a valid
    solution of its puzzle, `check_solutions`) or `-` where `valid` is None (not checked)."""
    charset = TEXT_CHARSETS.get(encoding.name)
    side = encoding.grid_side
    n = len(result.predictions)
    if len(result.steps_used) != n or (valid is not None and len(valid) != n):
        raise ValueError(f"{n} predictions, {len(result.steps_used)} step counts and "
                         f"{'no' if valid is None else len(valid)} validity flags do not match")
    marks = ["-"] * n if valid is None else ["valid" if v else "invalid" for v in valid]
    lines = []
    for prediction, steps, mark in zip(result.predictions, result.steps_used, marks):  # noqa: B905 - lengths checked above (zip(strict=) needs 3.10; the runtime runs on 3.8)
        if charset is None:
            body = " ".join(str(int(t)) for t in prediction)
        else:  # a model may predict any token, pad included: every token has a character
            body = "".join(charset[int(t)] for t in prediction)
            if encoding.name == "maze" and side:  # Sudoku stays one 81-character line, as it is read
                body = "|".join(body[i:i + side] for i in range(0, len(body), side))
        lines.append(f"{body}\t{int(steps)}\t{mark}")
    return "\n".join(lines) + "\n"


def check_output_file(output: Path, force: bool) -> None:
    """Before any work: the output file can be written (its folder exists and is writable, no file is lost)."""
    if output.is_dir():
        raise InputError(f"{output}: is a folder; give a file name for the solutions")
    if output.exists() and not force:
        raise InputError(f"{output} already exists; pass --force to replace it")
    _check_parent(output)


def _check_parent(output: Path) -> None:
    """The folder `output` goes into exists and is writable."""
    if not output.parent.is_dir():
        raise InputError(f"{output}: folder {output.parent} does not exist; create it or choose another --output")
    if not os.access(output.parent, os.W_OK | os.X_OK):
        raise InputError(f"{output}: folder {output.parent} is not writable; choose another --output")


def check_output_folder(folder: Path, force: bool, ours: Callable[[Path], bool], what: str,
                        replaceable: bool = False) -> None:
    """Before any work: `folder` can be written as a whole, and nothing that is not ours is lost.

    Absent: its parent must exist and be writable. Present: replaced only with `force` (or when `replaceable`: a
    command's own default place, such as a bundle's report/) and only when `ours(folder)` says it holds nothing
    but what the command writes, so a mistyped --output never removes a user's files; a link or a file is never
    replaced.
    """
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise InputError(f"{folder} is a symbolic link or a file; {what} must be a plain folder (remove it, or "
                         "choose another --output)")
    if folder.exists():
        if not ours(folder):
            raise InputError(f"{folder} exists and holds files that are not {what}; refusing to replace it, even "
                             "with --force (choose another --output)")
        if not (force or replaceable):
            raise InputError(f"{folder} already exists; pass --force to replace it")
    _check_parent(folder)


def write_solutions(result: SolveResult, encoding: TaskEncoding, output: str | Path | None,
                    valid: np.ndarray | None = None) -> str:
    """Format, and write atomically when `output` is given (.npz: arrays, with `valid` when it is given; anything
    else: text lines)."""
    text = format_solutions(result, encoding, valid)
    if output is None:
        return text
    output = Path(output)
    if output.suffix == ".npz":
        checked = {} if valid is None else {"valid": np.asarray(valid, dtype=bool)}
        _write_atomically(output, lambda f: np.savez(f, predictions=result.predictions, steps_used=result.steps_used,
                                                     q_halt=result.q_halt, q_continue=result.q_continue, **checked))
    else:
        write_text_atomically(output, text)
    return text


def write_text_atomically(output: str | Path, text: str) -> None:
    """`text` to `output` through a temporary file beside it: a reader never sees half of it, an error leaves
    nothing behind (and an earlier file untouched)."""
    _write_atomically(Path(output), lambda f: f.write(text.encode()))


def _write_atomically(output: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a solutions file is an ordinary file
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
