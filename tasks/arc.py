"""ARC-AGI in the official TRM encoding: grids to tokens and back, the official augmentations and their inverses,
challenge files and the identifiers of a dataset folder (numpy only: a device runs it).

Each rule follows the official TRM repository (SamsungSAILMontreal/TinyRecursiveModels, commit e7b68717), named at
the function that implements it; ../shared/reference/arc.md says the same in words:
- encoding: `dataset/build_arc_dataset.py` `np_grid_to_seq_translational_augment` (PAD 0, EOS 1, colour c -> c + 2
  in a 30 x 30 canvas, EOS on the row below and the column right of the grid, no corner token);
- augmentations: `aug` / `inverse_aug` there and `dataset/common.py` `dihedral_transform` (a colour permutation
  that keeps colour 0, then one of 8 dihedral transforms; the name `TASK|||t{id}|||{ten digits}`);
- crop: `evaluators/arc.py` `_crop` (the largest top-left rectangle of colour tokens).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trm_export.errors import InputError

__all__ = [
    "ARC_SEQ_LEN", "ARC_VOCAB", "MAX_SIDE", "ArcTask", "Augmentation", "crop", "decode_grid", "dihedral",
    "encode_grid", "read_challenges", "read_identifiers", "read_solutions", "views",
]

MAX_SIDE = 30
ARC_SEQ_LEN = MAX_SIDE * MAX_SIDE
ARC_VOCAB = 12  # PAD, EOS, colours 0..9
PAD, EOS, COLOUR_OFFSET = 0, 1, 2
SEPARATOR = "|||"  # augmented puzzle names: TASK|||t{transform}|||{colour mapping of 0..9}
DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)  # dataset/common.py: the transform that undoes transform i


def dihedral(grid: np.ndarray, transform: int) -> np.ndarray:
    """One of the 8 symmetries of the square, numbered as dataset/common.py `dihedral_transform` numbers them."""
    if transform == 0:
        return grid
    if transform in (1, 2, 3):
        return np.rot90(grid, k=transform)
    if transform == 4:
        return np.fliplr(grid)
    if transform == 5:
        return np.flipud(grid)
    if transform == 6:
        return grid.T
    if transform == 7:
        return np.fliplr(np.rot90(grid, k=1))
    raise ValueError(f"dihedral transform {transform} is not one of 0..7")


@dataclass(frozen=True)
class Augmentation:
    """A colour permutation (colour 0, the background, stays 0) applied first, then a dihedral transform."""

    transform: int = 0
    colours: tuple[int, ...] = tuple(range(10))  # colours[c]: what colour c becomes

    @classmethod
    def from_name(cls, name: str) -> tuple[str, Augmentation]:
        """(task id, augmentation) of an (augmented) puzzle name; a name without the separator is the original."""
        if SEPARATOR not in name:
            return name, cls()
        parts = name.split(SEPARATOR)
        transform, digits = parts[-2], parts[-1]
        if len(parts) != 3 or not (len(transform) == 2 and transform[0] == "t" and transform[1] in "01234567") \
                or sorted(digits) != list("0123456789") or digits[0] != "0":
            raise ValueError(f"{name!r} is not an augmented ARC puzzle name (TASK|||t<0-7>|||<a permutation of "
                             "0-9 starting with 0>)")
        return parts[0], cls(int(transform[1]), tuple(int(d) for d in digits))

    def name(self, task: str) -> str:
        if self.is_identity:
            return task
        return f"{task}{SEPARATOR}t{self.transform}{SEPARATOR}{''.join(str(c) for c in self.colours)}"

    @property
    def is_identity(self) -> bool:
        return self.transform == 0 and self.colours == tuple(range(10))

    def apply(self, grid: np.ndarray) -> np.ndarray:
        """build_arc_dataset.py `aug`: mapping[grid], then the transform."""
        return np.ascontiguousarray(dihedral(np.asarray(self.colours, np.uint8)[grid], self.transform))

    def invert(self, grid: np.ndarray) -> np.ndarray:
        """build_arc_dataset.py `inverse_aug`: the inverse transform, then the inverse colour map (argsort)."""
        inverse = np.argsort(np.asarray(self.colours)).astype(np.uint8)
        return np.ascontiguousarray(inverse[dihedral(grid, DIHEDRAL_INVERSE[self.transform])])


def encode_grid(grid: np.ndarray, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """A grid (colours 0..9, at most 30 x 30) as 900 tokens at `offset` (test examples: always (0, 0))."""
    grid = np.asarray(grid)
    rows, cols = grid.shape
    r0, c0 = offset
    canvas = np.full((MAX_SIDE, MAX_SIDE), PAD, np.uint8)
    canvas[r0:r0 + rows, c0:c0 + cols] = grid + COLOUR_OFFSET
    if r0 + rows < MAX_SIDE:
        canvas[r0 + rows, c0:c0 + cols] = EOS
    if c0 + cols < MAX_SIDE:
        canvas[r0:r0 + rows, c0 + cols] = EOS
    return canvas.reshape(-1)


def crop(tokens: np.ndarray) -> np.ndarray:
    """evaluators/arc.py `_crop`: the largest top-left rectangle of colour tokens, as colours (uint8).

    Row by row from the top, the usable width shrinks to just before the row's first non-colour token (never
    grows again); the (rows, width) of largest area wins, the first one on a tie. No colour at the top-left: an
    empty grid."""
    grid = np.asarray(tokens).reshape(MAX_SIDE, MAX_SIDE)
    colour = (grid >= COLOUR_OFFSET) & (grid < COLOUR_OFFSET + 10)
    width, best, size = MAX_SIDE, 0, (0, 0)
    for rows in range(1, MAX_SIDE + 1):
        stops = np.flatnonzero(~colour[rows - 1, :width])
        if len(stops):
            width = int(stops[0])
        if rows * width > best:
            best, size = rows * width, (rows, width)
    return (grid[:size[0], :size[1]] - COLOUR_OFFSET).astype(np.uint8)


def decode_grid(tokens: np.ndarray) -> np.ndarray:
    """The grid of a test example's tokens (offset (0, 0)): `crop`."""
    return crop(tokens)


@dataclass(frozen=True)
class ArcTask:
    """One task of a challenge file: demonstration pairs and test inputs (grids as uint8 arrays)."""

    task_id: str
    train: tuple[tuple[np.ndarray, np.ndarray], ...]
    test_inputs: tuple[np.ndarray, ...]


def _grid(value: object, where: str) -> np.ndarray:
    """A grid of the public JSON format: a non-empty list of equal-length lists of integers 0..9, at most 30 x 30."""
    if not isinstance(value, list) or not value or not all(isinstance(row, list) and row for row in value):
        raise InputError(f"{where}: a grid must be a non-empty list of non-empty rows")
    width = len(value[0])
    if any(len(row) != width for row in value):
        raise InputError(f"{where}: rows of different lengths ({sorted({len(row) for row in value})})")
    if len(value) > MAX_SIDE or width > MAX_SIDE:
        raise InputError(f"{where}: {len(value)} x {width} grid; ARC grids are at most {MAX_SIDE} x {MAX_SIDE}")
    if not all(type(c) is int and 0 <= c <= 9 for row in value for c in row):
        raise InputError(f"{where}: colours must be integers 0..9")
    return np.asarray(value, np.uint8)


def _load_json(path: Path, what: str, max_bytes: int = 1 << 30) -> object:
    if not path.is_file():
        raise InputError(f"{path}: no such file ({what})")
    if path.stat().st_size > max_bytes:
        raise InputError(f"{path}: {path.stat().st_size >> 20} MiB, more than a {what} can be ({max_bytes >> 20} MiB)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # bad JSON, a 5000-digit number, nesting
        raise InputError(f"{path}: not a JSON {what} ({str(exc)[:200]})") from None


def read_challenges(path: str | os.PathLike[str]) -> dict[str, ArcTask]:
    """The public challenge format: {task_id: {"train": [{"input", "output"}...], "test": [{"input"}...]}}."""
    path = Path(path)
    data = _load_json(path, "ARC challenge file")
    if not isinstance(data, dict) or not data:
        raise InputError(f"{path}: expected an object {{task_id: {{\"train\": [...], \"test\": [...]}}}}")
    tasks = {}
    for task_id, task in data.items():
        where = f"{path}: task {task_id!r}"
        if SEPARATOR in task_id or not task_id.strip():
            raise InputError(f"{where}: not a task id")
        if not isinstance(task, dict) or not isinstance(task.get("test"), list) or not task["test"] \
                or not isinstance(task.get("train", []), list):
            raise InputError(f"{where}: needs a non-empty \"test\" list (and a \"train\" list)")
        train = []
        for i, pair in enumerate(task.get("train", [])):
            if not isinstance(pair, dict):
                raise InputError(f"{where} train[{i}]: expected {{\"input\": grid, \"output\": grid}}")
            train.append((_grid(pair.get("input"), f"{where} train[{i}].input"),
                          _grid(pair.get("output"), f"{where} train[{i}].output")))
        tests = []
        for i, pair in enumerate(task["test"]):
            if not isinstance(pair, dict):
                raise InputError(f"{where} test[{i}]: expected {{\"input\": grid}}")
            tests.append(_grid(pair.get("input"), f"{where} test[{i}].input"))
        tasks[task_id] = ArcTask(task_id, tuple(train), tuple(tests))
    return tasks


def read_solutions(path: str | os.PathLike[str], tasks: dict[str, ArcTask]) -> dict[str, list[np.ndarray]]:
    """The public solutions format: {task_id: [output grid per test input]}, checked against `tasks`."""
    path = Path(path)
    data = _load_json(path, "ARC solutions file")
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected an object {{task_id: [grid, ...]}}")
    solutions = {}
    for task_id, task in tasks.items():
        grids = data.get(task_id)
        if not isinstance(grids, list) or len(grids) != len(task.test_inputs):
            raise InputError(f"{path}: task {task_id!r} needs {len(task.test_inputs)} solution grid(s), one per "
                             "test input")
        solutions[task_id] = [_grid(g, f"{path}: task {task_id!r} solution {i}") for i, g in enumerate(grids)]
    return solutions


def read_identifiers(path: str | os.PathLike[str]) -> list[str]:
    """identifiers.json of an official ARC dataset folder: position = puzzle identifier, value = puzzle name."""
    path = Path(path)
    if path.is_dir():
        path = path / "identifiers.json"
    data = _load_json(path, "identifiers.json")
    if not isinstance(data, list) or not data or not all(isinstance(n, str) for n in data):
        raise InputError(f"{path}: expected a list of puzzle names (position = identifier), as the official "
                         "build_arc_dataset.py writes it")
    return data


def views(identifiers: list[str]) -> dict[str, list[tuple[int, Augmentation]]]:
    """task id -> (identifier, augmentation) of every view of it the checkpoint was trained with, from the names
    of identifiers.json (each parsed once: an ARC table has about a million), in identifier order. Names that are
    not ARC puzzle names (`<blank>`, other datasets') are skipped."""
    index: dict[str, list[tuple[int, Augmentation]]] = {}
    for identifier, name in enumerate(identifiers):
        if name in ("<blank>", ""):  # "": a row the bundle did not keep (--keep-puzzles)
            continue
        try:
            task_id, augmentation = Augmentation.from_name(name)
        except ValueError:
            continue
        index.setdefault(task_id, []).append((identifier, augmentation))
    return index
