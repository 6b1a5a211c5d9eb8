"""Shared containers and the split machinery for the puzzle tasks.

Everything here is numpy-only on purpose: the generators run on device boxes and in CI
where torch is not installed, and calibration / evaluation code only needs token arrays.

Splits are kept disjoint *by construction* rather than by comparing against previously
generated data: every puzzle has a "family key" (sudoku: its solution grid; maze: its wall
layout up to the 8 dihedral symmetries) and a stable hash of that key decides which split
the family belongs to. A generator drawing for split X simply rejects candidates of other
families. So the held-out split never has to be generated to build a training split, any
prefix of a split is itself reproducible, and no held-out puzzle -- not even one with the
same solution grid or a rotated maze layout -- can ever show up in training or calibration.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

__all__ = [
    "SPLIT_NAMES",
    "Task",
    "TaskData",
    "TaskSpec",
    "family_split",
]

#: Fixed split names. Fractions of the family-hash space owned by each split are in
#: ``_SPLIT_BUCKETS`` below (held-out 1/4, calibration 1/8, train 5/8).
SPLIT_NAMES: tuple[str, ...] = ("train", "calibration", "heldout")

_SPLIT_BUCKETS: dict[str, frozenset[int]] = {
    "heldout": frozenset({0, 1}),
    "calibration": frozenset({2}),
    "train": frozenset({3, 4, 5, 6, 7}),
}


def family_split(key: bytes) -> str:
    """Return the split ("train", "calibration" or "heldout") that owns a family key.

    A keyed BLAKE2 digest is used instead of Python's ``hash`` so the assignment is the
    same on every machine, Python version and process (``PYTHONHASHSEED``).
    """
    bucket = hashlib.blake2b(key, digest_size=8, person=b"trm-split").digest()[0] & 7
    for name, buckets in _SPLIT_BUCKETS.items():
        if bucket in buckets:
            return name
    raise AssertionError("unreachable: every bucket belongs to a split")


def _as_int32_2d(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 2:
        raise ValueError(f"TaskData.{name} must be 2-D (N, seq_len), got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"TaskData.{name} must hold integer tokens, got dtype {arr.dtype}")
    out = np.array(arr, dtype=np.int32, copy=True)
    out.setflags(write=False)
    return out


# The calibration and held-out splits, per task class and spec, generated once per process: every export, report
# and test asks for (a prefix of) the same fixed puzzles, and generating 1,000 Sudoku puzzles takes seconds. The
# arrays are read-only (TaskData), so sharing them is safe.
_EVALUATION_SPLITS: dict[tuple, TaskData] = {}


@dataclass(frozen=True)
class TaskData:
    """A batch of puzzles in the official token encoding.

    ``inputs``/``labels`` are ``int32 (N, seq_len)``; ``puzzle_ids`` is ``int32 (N,)`` and is
    all zeros because the official Sudoku/Maze datasets use a single puzzle identifier.
    ``meta`` holds per-puzzle arrays of length N (sudoku: ``blanks``, ``needs_search``;
    maze: ``path_length``) so evaluation can be broken down by difficulty.

    All arrays are copied and made read-only: splits are cached and shared, and an in-place
    edit by one consumer must not silently change what another one measures.
    """

    inputs: np.ndarray
    labels: np.ndarray
    puzzle_ids: np.ndarray
    meta: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        inputs = _as_int32_2d("inputs", self.inputs)
        labels = _as_int32_2d("labels", self.labels)
        if inputs.shape != labels.shape:
            raise ValueError(f"inputs shape {inputs.shape} != labels shape {labels.shape}")
        n = inputs.shape[0]
        ids = np.array(np.asarray(self.puzzle_ids), dtype=np.int32, copy=True).reshape(-1)
        if ids.shape != (n,):
            raise ValueError(f"puzzle_ids must have shape ({n},), got {ids.shape}")
        ids.setflags(write=False)
        meta: dict[str, np.ndarray] = {}
        for key, value in dict(self.meta).items():
            arr = np.array(value, copy=True)
            if arr.shape[:1] != (n,):
                raise ValueError(f"meta[{key!r}] must have length {n}, got shape {arr.shape}")
            arr.setflags(write=False)
            meta[key] = arr
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "puzzle_ids", ids)
        object.__setattr__(self, "meta", MappingProxyType(meta))

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.inputs.shape[1])

    def select(self, index: Any) -> TaskData:
        """Return the puzzles picked by a numpy index (slice, int array or bool mask).

        Typical use: ``data.select(data.meta["needs_search"])`` to score only hard puzzles.
        """
        if isinstance(index, (int, np.integer)):
            index = [index]
        return TaskData(
            inputs=self.inputs[index],
            labels=self.labels[index],
            puzzle_ids=self.puzzle_ids[index],
            meta={k: v[index] for k, v in self.meta.items()},
        )

    def with_tokens(self, inputs: np.ndarray, labels: np.ndarray) -> TaskData:
        """Same puzzles' ids and metadata with new token arrays (used by augmentation)."""
        return TaskData(inputs=inputs, labels=labels, puzzle_ids=self.puzzle_ids, meta=self.meta)


@dataclass(frozen=True)
class TaskSpec:
    """Static description of a task's token encoding (what a model and an export need).

    ``blank_id`` is the *token* meaning "cell to fill in" (sudoku 1, maze has none).
    ``ignore_label_id`` is None because every position is scored in these tasks.
    ``side`` is the grid side (sudoku 9, maze the requested size).
    """

    name: str
    seq_len: int
    vocab_size: int
    side: int
    pad_id: int = 0
    blank_id: int | None = None
    ignore_label_id: int | None = None
    num_puzzle_identifiers: int = 1

    def dataset_json(
        self, total_groups: int = 1, mean_puzzle_examples: float = 1.0, total_puzzles: int | None = None
    ) -> dict[str, Any]:
        """The official ``dataset.json`` fields (TRM/HRM ``PuzzleDatasetMetadata``), in its order.

        ``blank_identifier_id`` is the blank *puzzle identifier* of the official loader
        (always 0 here), not the blank cell token. ``total_groups`` should be the number of
        original puzzles in the set, ``total_puzzles`` the number of puzzles stored in it
        (default: ``total_groups``, one puzzle per group, as the official Sudoku and maze
        builders write it; the official TRM loader requires the field) and
        ``mean_puzzle_examples`` the examples per puzzle (1.0 when augmentation is done on
        the fly rather than stored).
        """
        if total_groups < 0:
            raise ValueError(f"total_groups must be >= 0, got {total_groups}")
        if total_puzzles is None:
            total_puzzles = total_groups
        if total_puzzles < total_groups:
            raise ValueError(f"total_puzzles ({total_puzzles}) must be >= total_groups ({total_groups})")
        return {
            "pad_id": self.pad_id,
            "ignore_label_id": self.ignore_label_id,
            "blank_identifier_id": 0,
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "num_puzzle_identifiers": self.num_puzzle_identifiers,
            "total_groups": int(total_groups),
            "mean_puzzle_examples": float(mean_puzzle_examples),
            "total_puzzles": int(total_puzzles),
            "sets": ["all"],
        }


class Task(ABC):
    """A puzzle family: deterministic generation, fixed splits, augmentation, text I/O.

    Subclasses implement ``_draw`` (one candidate puzzle from an rng) and the text hooks;
    this base class turns that into reproducible batches and disjoint fixed splits.
    """

    #: Seeds of the fixed splits. Subclasses override with their own constants.
    split_seeds: Mapping[str, int] = MappingProxyType({})
    #: Fixed sizes of the evaluation splits; "train" defaults to ``default_train_size``.
    split_sizes: Mapping[str, int] = MappingProxyType({"heldout": 1000, "calibration": 256})
    default_train_size: int = 20000
    #: Per-puzzle metadata produced by ``_draw``: name -> numpy dtype.
    meta_fields: Mapping[str, Any] = MappingProxyType({})

    def __init__(self) -> None:
        self._split_cache: dict[tuple[str, int, tuple], TaskData] = {}

    # --- hooks ------------------------------------------------------------------------
    @property
    @abstractmethod
    def spec(self) -> TaskSpec:
        """The token encoding of this task."""

    @abstractmethod
    def _draw(
        self, rng: np.random.Generator, accept_family: Callable[[bytes], bool], **difficulty: Any
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any], bytes] | None:
        """Draw one candidate: (inputs, labels, meta, dedup_key) or None to retry.

        ``accept_family`` must be called with the family key as soon as it is known (before
        the expensive part) and the draw abandoned when it returns False.
        """

    @abstractmethod
    def _check_difficulty(self, difficulty: Mapping[str, Any]) -> None:
        """Raise ValueError for unknown or inconsistent difficulty parameters."""

    @abstractmethod
    def augment(self, data: TaskData, rng: np.random.Generator) -> TaskData:
        """Apply one random validity-preserving transform per puzzle."""

    @abstractmethod
    def solve(self, inputs: np.ndarray) -> np.ndarray | None:
        """Reference label for one puzzle's input tokens, or None if it has no unique answer.

        Lets puzzles loaded from text (which carry no labels) be scored.
        """

    @abstractmethod
    def parse(self, text: str) -> np.ndarray:
        """Parse one puzzle in the task's text format into tokens."""

    @abstractmethod
    def format(self, tokens: np.ndarray) -> str:
        """Render one puzzle's tokens in the task's text format."""

    def valid_solutions(self, inputs: np.ndarray, predictions: np.ndarray) -> np.ndarray:
        """bool [N]: which predictions ([N, seq_len] tokens) solve their puzzles (inputs [N, seq_len]).

        Judged by the task's rules, not by comparison with a label, so answers to puzzles read from files (no
        labels) are checked too. A task that cannot check answers raises NotImplementedError.
        """
        raise NotImplementedError(f"task {self.spec.name!r} cannot check answers")

    # --- generation -------------------------------------------------------------------
    def generate(self, n: int, seed: int, **difficulty: Any) -> TaskData:
        """Generate ``n`` distinct puzzles, deterministically from ``seed``.

        The same (n, seed, difficulty) gives identical arrays on every run, and a shorter
        ``n`` with the same seed gives a prefix of a longer one.
        """
        return self._generate(n, seed, split=None, **difficulty)

    def split(self, name: str, size: int | None = None, **train_difficulty: Any) -> TaskData:
        """A fixed split: "train" (``size`` puzzles, default 20000), "calibration" (256) or
        "heldout" (1000).

        ``train_difficulty`` (train split only) takes ``generate``'s difficulty keywords, e.g. the
        short mazes of a training curriculum; the puzzles still come from train's families only.

        Splits use fixed seeds and disjoint puzzle families, so every user measures on the
        same held-out puzzles and none of them (nor their solution grid / maze layout) is
        in train or calibration. For "calibration"/"heldout", ``size`` may only shrink the
        split and returns a prefix of it (handy for quick checks).
        """
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; valid splits: {', '.join(SPLIT_NAMES)}")
        if name == "train":
            count = self.default_train_size if size is None else size
        elif train_difficulty:
            raise ValueError(f"split {name!r} has a fixed difficulty; only 'train' takes difficulty keywords")
        else:
            fixed = self.split_sizes[name]
            count = fixed if size is None else size
            if count > fixed:
                raise ValueError(f"split {name!r} has a fixed size of {fixed}; asked for {count}")
        if count < 0:
            raise ValueError(f"split size must be >= 0, got {count}")
        key = (name, count, tuple(sorted(train_difficulty.items())))
        if key in self._split_cache:
            return self._split_cache[key]
        if name == "train":
            data = self._generate(count, self.split_seeds[name], split=name, **train_difficulty)
        else:  # a prefix of the fixed split, generated once per process (every caller asks for the same puzzles)
            shared = _EVALUATION_SPLITS.get((type(self), self.spec, name))
            if shared is None or len(shared) < count:
                shared = self._generate(count, self.split_seeds[name], split=name)
                _EVALUATION_SPLITS[(type(self), self.spec, name)] = shared
            data = shared if len(shared) == count else TaskData(
                shared.inputs[:count], shared.labels[:count], shared.puzzle_ids[:count],
                {k: v[:count] for k, v in shared.meta.items()})
        self._split_cache[key] = data
        return data

    def _generate(self, n: int, seed: int, split: str | None, **difficulty: Any) -> TaskData:
        if not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        self._check_difficulty(difficulty)
        rng = np.random.default_rng(seed)
        if split is None:

            def accept(key: bytes) -> bool:
                return True

        else:

            def accept(key: bytes) -> bool:
                return family_split(key) == split

        seen: set[bytes] = set()
        inputs: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        metas: list[dict[str, Any]] = []
        failures = 0
        while len(inputs) < n:
            drawn = self._draw(rng, accept, **difficulty)
            if drawn is None or drawn[3] in seen:
                failures += 1
                if failures > 200 * (n + 10):
                    raise RuntimeError(
                        f"{self.spec.name}: could not generate {n} puzzles with {difficulty} "
                        f"(only {len(inputs)} after {failures} rejected draws); relax the difficulty, "
                        "or ask for fewer puzzles (small grids have few distinct ones)"
                    )
                continue
            inp, lab, meta, dedup = drawn
            seen.add(dedup)
            inputs.append(inp)
            labels.append(lab)
            metas.append(meta)
        seq_len = self.spec.seq_len
        meta_arrays = {k: np.array([m[k] for m in metas], dtype=dt) for k, dt in self.meta_fields.items()}
        return TaskData(
            inputs=np.array(inputs, dtype=np.int32).reshape(n, seq_len),
            labels=np.array(labels, dtype=np.int32).reshape(n, seq_len),
            puzzle_ids=np.zeros(n, dtype=np.int32),
            meta=meta_arrays,
        )
