"""Read and write the official HRM/TRM on-disk dataset layout.

Layout: ``<dir>/<split>/dataset.json`` plus ``all__{inputs,labels,puzzle_identifiers,
puzzle_indices,group_indices}.npy``. Writing it lets the official training code (and our
own trainers that mimic it) consume generated puzzles unchanged; reading it lets the
evaluation here run on datasets built by the official scripts (e.g. sudoku-extreme).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from trm_export.errors import InputError

from .base import TaskData, TaskSpec

__all__ = ["IGNORE_LABEL", "DatasetFolder", "DatasetFolderError", "folder_sample", "read_official_dataset",
           "write_official_dataset"]

_FIELDS = ("inputs", "labels", "puzzle_identifiers", "puzzle_indices", "group_indices")


def write_official_dataset(
    data: TaskData, spec: TaskSpec, directory: str | os.PathLike[str], split: str = "test"
) -> Path:
    """Write ``data`` as one official split (one example per puzzle, one puzzle per group).

    Returns the split folder. Augmented copies are not stored: our trainers augment on the
    fly, hence ``mean_puzzle_examples`` = 1.
    """
    if data.seq_len != spec.seq_len:
        raise ValueError(f"data seq_len {data.seq_len} != spec seq_len {spec.seq_len}")
    out = Path(directory) / split
    out.mkdir(parents=True, exist_ok=True)
    n = len(data)
    arrays = {
        "inputs": data.inputs,
        "labels": data.labels,
        "puzzle_identifiers": data.puzzle_ids,
        "puzzle_indices": np.arange(n + 1, dtype=np.int32),
        "group_indices": np.arange(n + 1, dtype=np.int32),
    }
    for key, value in arrays.items():
        np.save(out / f"all__{key}.npy", np.asarray(value, dtype=np.int32))
    meta = spec.dataset_json(total_groups=n, mean_puzzle_examples=1.0)
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def read_official_dataset(
    directory: str | os.PathLike[str], split: str = "test", set_name: str = "all"
) -> tuple[TaskData, dict[str, Any]]:
    """Load one official split as (TaskData, dataset.json dict).

    Every stored example becomes one row; ``puzzle_ids`` repeats each puzzle's identifier
    over its examples. No per-puzzle difficulty metadata exists in this format.
    """
    folder = Path(directory) / split
    meta_path = folder / "dataset.json"
    if not meta_path.is_file():
        raise ValueError(f"{meta_path}: missing (not an official dataset split folder)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    arrays = {}
    for key in _FIELDS:
        path = folder / f"{set_name}__{key}.npy"
        if not path.is_file():
            raise ValueError(f"{path}: missing")
        arrays[key] = np.load(path, allow_pickle=False)
    counts = np.diff(arrays["puzzle_indices"])
    if counts.sum() != len(arrays["inputs"]) or len(counts) != len(arrays["puzzle_identifiers"]):
        raise ValueError(f"{folder}: puzzle_indices do not match inputs / puzzle_identifiers")
    data = TaskData(
        inputs=arrays["inputs"],
        labels=arrays["labels"],
        puzzle_ids=np.repeat(arrays["puzzle_identifiers"], counts),
    )
    if data.seq_len != meta.get("seq_len", data.seq_len):
        raise ValueError(f"{folder}: inputs have seq_len {data.seq_len}, dataset.json says {meta['seq_len']}")
    return data, meta


#: Label value at positions the official evaluation does not score (its IGNORE_LABEL_ID): the folder's
#: dataset.json `ignore_label_id` (ARC's padding) is mapped to it when puzzles are read as a puzzle source.
IGNORE_LABEL = -100

#: Default sample sizes from a folder: a shipped task's held-out and calibration split sizes.
HELDOUT_PUZZLES = 1000
CALIBRATION_PUZZLES = 256

#: Which split plays which role: the official builders keep test puzzles out of train, so calibrating on train
#: and measuring on test never measures on what was calibrated on.
ROLES = {"heldout": "test", "calibration": "train"}

_HOW = ("an official dataset folder holds test/ (and train/ for calibration), each with dataset.json and "
        "all__{inputs,labels,puzzle_identifiers,puzzle_indices}.npy, as the official builders write them")


def _whole(value: object) -> bool:
    """A positive integer of a sane size (JSON true is not one; a 5000-digit one is refused above)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 40


class DatasetFolderError(InputError, ValueError):
    """An official dataset folder is missing a part or contradicts the model; the message names the file."""


@dataclass(frozen=True)
class DatasetFolder:
    """An official dataset folder as the puzzle source of every command (`--data DIR`).

    `DIR/test` gives the held-out puzzles (parity, evaluation, report, run), `DIR/train` the calibration ones.
    Arrays are memory-mapped: a sample reads only its rows, so a 400k-puzzle split costs no memory up front.
    """

    path: Path
    splits: Mapping[str, dict]  # split name -> its dataset.json

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> DatasetFolder:
        root = Path(path)
        if not root.is_dir():
            raise DatasetFolderError(f"{root}: not a folder; {_HOW}")
        splits = {}
        for split in ("test", "train"):
            meta_path = root / split / "dataset.json"
            if not meta_path.is_file():
                continue
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, a 5000-digit integer
                raise DatasetFolderError(f"{meta_path}: not readable JSON ({exc})") from None
            if not isinstance(meta, dict) or not _whole(meta.get("seq_len")) or not _whole(meta.get("vocab_size")):
                raise DatasetFolderError(f"{meta_path}: needs integer seq_len and vocab_size (the official "
                                         "PuzzleDatasetMetadata fields)")
            ignore = meta.get("ignore_label_id")
            if ignore is not None and not (isinstance(ignore, int) and not isinstance(ignore, bool)):
                # "0" would compare unequal to every label: every position scored, and the accuracy silently wrong
                raise DatasetFolderError(f"{meta_path}: ignore_label_id must be an integer or null, got "
                                         f"{json.dumps(ignore)[:40]}")
            splits[split] = meta
        if not splits:
            raise DatasetFolderError(f"{root}: no test/dataset.json or train/dataset.json; {_HOW}")
        return cls(root, MappingProxyType(splits))

    def has(self, role: str) -> bool:
        return ROLES[role] in self.splits

    def check_model(self, seq_len: int, vocab_size: int, num_puzzle_identifiers: int | None = None) -> DatasetFolder:
        """Each split's dataset.json must describe the model's puzzles: same seq_len and vocabulary. Returns self."""
        for split, meta in self.splits.items():
            where = self.path / split / "dataset.json"
            if meta["seq_len"] != seq_len:
                raise DatasetFolderError(f"{where}: seq_len {meta['seq_len']}, the model's is {seq_len}: this "
                                         "folder holds another task's puzzles")
            if meta["vocab_size"] != vocab_size:
                raise DatasetFolderError(f"{where}: vocab_size {meta['vocab_size']}, the model's is {vocab_size}: "
                                         "this folder holds another task's puzzles")
            count = meta.get("num_puzzle_identifiers")
            if num_puzzle_identifiers is not None and isinstance(count, int) and count > num_puzzle_identifiers:
                raise DatasetFolderError(f"{where}: {count} puzzle identifiers, the model's table has "
                                         f"{num_puzzle_identifiers} rows: not the folder it was trained on")
        return self

    def _array(self, split: str, key: str) -> np.ndarray:
        path = self.path / split / f"all__{key}.npy"
        if not path.is_file():
            raise DatasetFolderError(f"{path}: missing; {_HOW}")
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DatasetFolderError(f"{path}: not a readable .npy array ({exc})") from None
        if arr.dtype.kind not in "iu":
            raise DatasetFolderError(f"{path}: dtype {arr.dtype}, expected integers")
        if arr.ndim == 0:
            raise DatasetFolderError(f"{path}: a single number, expected an array; {_HOW}")
        return arr

    def rows(self, role: str) -> int:
        """Examples in the role's split (augmented copies count: the official test sets of ARC hold them)."""
        return int(self._array(self._split(role), "inputs").shape[0])

    def _split(self, role: str) -> str:
        split = ROLES[role]
        if split not in self.splits:
            raise DatasetFolderError(f"{self.path / split / 'dataset.json'}: missing, and the {role} puzzles come "
                                     f"from there; {_HOW}")
        return split

    def sample(self, role: str, size: int | None = None, num_puzzle_identifiers: int | None = None,
               only_ids: np.ndarray | None = None) -> tuple[TaskData, str]:
        """`size` examples of the role's split, spread evenly over it (all when None), and a description.
        `only_ids`: only the examples of these puzzle identifiers (a bundle that kept some rows of its table).

        Evenly spread, not the first rows: an official train split stores each puzzle's augmentations next to
        each other, so its first rows are one puzzle many times. The same rows every time. Labels at the
        split's `ignore_label_id` become IGNORE_LABEL (not scored, as the official evaluation does)."""
        split = self._split(role)
        folder, meta = self.path / split, self.splits[split]
        inputs, labels = self._array(split, "inputs"), self._array(split, "labels")
        identifiers, indices = self._array(split, "puzzle_identifiers"), self._array(split, "puzzle_indices")
        n = int(inputs.shape[0])
        if inputs.ndim != 2 or inputs.shape[1] != meta["seq_len"]:
            raise DatasetFolderError(f"{folder / 'all__inputs.npy'}: shape {inputs.shape}, dataset.json says "
                                     f"[N, {meta['seq_len']}]")
        if labels.shape != inputs.shape:
            raise DatasetFolderError(f"{folder / 'all__labels.npy'}: shape {labels.shape}, inputs have "
                                     f"{inputs.shape}")
        steps = np.diff(np.asarray(indices, dtype=np.int64)) if indices.ndim == 1 else None  # unsigned would wrap
        if indices.ndim != 1 or len(indices) != len(identifiers) + 1 or len(indices) < 2 or indices[0] != 0 \
                or indices[-1] != n or np.any(steps < 0):
            raise DatasetFolderError(f"{folder / 'all__puzzle_indices.npy'}: must run from 0 to {n} (the inputs' "
                                     f"rows), one more entry than all__puzzle_identifiers.npy has ({len(identifiers)})")
        if n == 0:
            raise DatasetFolderError(f"{folder / 'all__inputs.npy'}: no puzzles")
        pool = np.arange(n, dtype=np.int64)
        if only_ids is not None:
            of_row = np.asarray(identifiers)[np.searchsorted(np.asarray(indices), pool, side="right") - 1]
            pool = pool[np.isin(of_row, only_ids)]
            if not len(pool):
                raise DatasetFolderError(f"{folder}: none of its {n} examples belongs to the {len(only_ids)} puzzle "
                                         "identifiers this bundle kept (--keep-puzzles): give the dataset folder "
                                         "the kept puzzles come from")
        take = len(pool) if size is None else max(1, min(int(size), len(pool)))
        rows = pool[np.arange(take, dtype=np.int64) * len(pool) // take]  # exact integers: distinct, first included
        x, y = np.asarray(inputs[rows]), np.asarray(labels[rows])
        ids = np.asarray(identifiers)[np.searchsorted(np.asarray(indices), rows, side="right") - 1]
        vocab = meta["vocab_size"]
        if x.min() < 0 or x.max() >= vocab:
            raise DatasetFolderError(f"{folder / 'all__inputs.npy'}: tokens outside [0, {vocab}) "
                                     f"(found {int(x.min())}..{int(x.max())})")
        ignore = meta.get("ignore_label_id")
        scored = np.ones(y.shape, bool) if ignore is None else y != ignore
        if np.any(scored & ((y < 0) | (y >= vocab))):
            raise DatasetFolderError(f"{folder / 'all__labels.npy'}: labels outside [0, {vocab})")
        y = np.where(scored, y, IGNORE_LABEL)
        if num_puzzle_identifiers is not None and len(ids) and (ids.min() < 0 or ids.max() >= num_puzzle_identifiers):
            raise DatasetFolderError(f"{folder / 'all__puzzle_identifiers.npy'}: identifier {int(ids.max())} is "
                                     f"outside the model's table of {num_puzzle_identifiers} rows")
        what = "all" if take == n else f"{take} spread evenly over"
        return TaskData(x, y, ids), f"{self.path.name}/{split}: {what} {n} examples"


def folder_sample(folder: str | os.PathLike[str], role: str, seq_len: int, vocab_size: int,
                  num_puzzle_identifiers: int, size: int | None = None,
                  only_ids: np.ndarray | None = None) -> tuple[TaskData, str]:
    """`size` puzzles of a dataset folder's role ("heldout": test/, "calibration": train/), the folder first checked
    against the model's encoding: what every command's `--data` reads (see DatasetFolder.sample)."""
    return DatasetFolder.open(folder).check_model(seq_len, vocab_size, num_puzzle_identifiers).sample(
        role, size, num_puzzle_identifiers, only_ids)
