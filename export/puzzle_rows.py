"""Which rows of the puzzle-embedding table a deployment keeps (`--keep-puzzles`).

An ARC checkpoint's table has one row per augmented training puzzle (about a million x 512, 2 GB in float32), but a
deployment is only asked the tasks it will be evaluated on: their test inputs carry the identifiers their
demonstrations were trained with (../shared/reference/arc.md). Keeping only those rows makes the bundle a device
can hold. The bundle stores the kept original identifiers (`tables/puzzle_rows.npy`, ascending); the runtime maps an
incoming identifier to its row and refuses one that was not kept, so puzzles keep their original identifiers.

A selection is read from:
- an official dataset folder: the identifiers its test split uses (DIR/test/all__puzzle_identifiers.npy);
- an ARC challenge file (.json): every identifier whose name (the dataset folder's identifiers.json) is one of its
  tasks or an augmentation of one;
- a list (.txt): one identifier per line, as a number or a puzzle name; `#` starts a comment.
Identifier 0 (the blank puzzle) is always kept.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TypeVar

import numpy as np

from trm_export.errors import InputError

MAX_LIST_BYTES = 256 << 20

P = TypeVar("P")  # a puzzle dataclass with tokens, puzzle_ids, labels and source (export's Puzzles, a PuzzleSet)


def select_rows(spec: str | Path, num_identifiers: int, names: list[str] | None) -> np.ndarray:
    """The identifiers to keep (int64, ascending, 0 included), from `spec` (see the module docstring). `names`: the
    identifiers' puzzle names (identifiers.json), needed for a challenge file or names in a list."""
    path = Path(spec)
    if path.is_dir():
        ids = _folder_ids(path)
    elif path.suffix.lower() == ".json":
        ids = _challenge_ids(path, names)
    elif path.is_file():
        ids = _listed_ids(path, names)
    else:
        raise InputError(f"{path}: no such file or folder (--keep-puzzles takes a dataset folder, an ARC challenge "
                         "file or a list of identifiers)")
    ids = np.union1d(np.asarray(ids, np.int64), [0])
    if ids.min() < 0 or ids.max() >= num_identifiers:
        raise InputError(f"{path}: identifier {int(ids.max())} is outside the checkpoint's table of "
                         f"{num_identifiers} rows: not the dataset this model was trained on")
    return ids


def _folder_ids(folder: Path) -> np.ndarray:
    from trm_export.tasks.official import DatasetFolder

    data = DatasetFolder.open(folder)
    source = data.path / "test" / "all__puzzle_identifiers.npy"
    if not data.has("heldout") or not source.is_file():
        raise InputError(f"{source}: missing; --keep-puzzles DIR keeps the identifiers of DIR's test split")
    try:
        return np.unique(np.load(source, mmap_mode="r", allow_pickle=False))
    except (OSError, ValueError) as exc:
        raise InputError(f"{source}: not a readable .npy array ({exc})") from None


def _need_names(path: Path, names: list[str] | None) -> list[str]:
    if names is None:
        raise InputError(f"{path}: selecting by task or puzzle name needs the names of the table's rows: give the "
                         "dataset folder with them (--data DIR, its identifiers.json)")
    return names


def _challenge_ids(path: Path, names: list[str] | None) -> list[int]:
    from trm_export.tasks.arc import read_challenges, views

    tasks = read_challenges(path)
    index = views(_need_names(path, names))
    missing = [t for t in tasks if t not in index]
    if missing:
        raise InputError(f"{path}: {len(missing)} task(s) have no identifier in this checkpoint's table "
                         f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}): not trained on them")
    return [identifier for t in tasks for identifier, _ in index[t]]


def _listed_ids(path: Path, names: list[str] | None) -> list[int]:
    if path.stat().st_size > MAX_LIST_BYTES:
        raise InputError(f"{path}: larger than {MAX_LIST_BYTES >> 20} MiB; not a list of identifiers")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text (a list of identifiers, one per line)") from None
    by_name: dict[str, int] | None = None
    ids = []
    for number, line in enumerate(lines, 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if entry.isdigit():
            ids.append(int(entry))
            continue
        if by_name is None:
            by_name = {n: i for i, n in enumerate(_need_names(path, names))}
        if entry not in by_name:
            raise InputError(f"{path}:{number}: {entry!r} is neither an identifier nor a puzzle name of this table")
        ids.append(by_name[entry])
    if not ids:
        raise InputError(f"{path}: no identifiers listed")
    return ids


def only_kept(puzzles: P, keep: np.ndarray, what: str) -> P:
    """Those of `puzzles` whose identifiers the bundle keeps: the others cannot run on it. None kept: refused."""
    inside = np.isin(puzzles.puzzle_ids, keep)
    if inside.all():
        return puzzles
    if not inside.any():
        raise InputError(f"none of the {len(puzzles.tokens)} {what} puzzles ({puzzles.source}) has an identifier that "
                         "--keep-puzzles keeps: give puzzles of the kept tasks, or keep the tasks of these puzzles")
    return dataclasses.replace(puzzles, tokens=puzzles.tokens[inside], puzzle_ids=puzzles.puzzle_ids[inside],
                               labels=None if puzzles.labels is None else puzzles.labels[inside],
                               source=f"{puzzles.source}; the {int(inside.sum())} with kept identifiers")
