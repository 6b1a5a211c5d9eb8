"""Read and write the official HRM/TRM on-disk dataset layout.

Layout: ``<dir>/<split>/dataset.json`` plus ``all__{inputs,labels,puzzle_identifiers,
puzzle_indices,group_indices}.npy``. Writing it lets the official training code (and our
own trainers that mimic it) consume generated puzzles unchanged; reading it lets the
evaluation here run on datasets built by the official scripts (e.g. sudoku-extreme).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .base import TaskData, TaskSpec

__all__ = ["read_official_dataset", "write_official_dataset"]

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
