"""Input checks before anything runs: a wrong puzzle gets a sentence, not a stack trace from a graph."""

from __future__ import annotations

import numpy as np

from trm_export.errors import InputError
from trm_export.runtime.manifest import TaskEncoding


def validate_puzzles(tokens: object, puzzle_ids: object, task: TaskEncoding) -> tuple[np.ndarray, np.ndarray]:
    """Return (tokens int64 [N, seq_len], puzzle_ids int64 [N]) or raise InputError saying what is wrong.

    A single puzzle may be given as a 1-D array. Tokens must be integers in [0, vocab_size); puzzle ids in
    [0, num_puzzle_identifiers).
    """
    arr = np.asarray(tokens)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise InputError(f"puzzle tokens must be integers, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise InputError(f"puzzles must be [N, {task.seq_len}] (or one puzzle of {task.seq_len}), "
                         f"got shape {list(arr.shape)}")
    if arr.shape[0] == 0:
        raise InputError("no puzzles given (empty input)")
    if arr.shape[1] != task.seq_len:
        raise InputError(f"each puzzle must have {task.seq_len} tokens, got {arr.shape[1]}")
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high >= task.vocab_size:
        bad = np.argwhere((arr < 0) | (arr >= task.vocab_size))[0]
        raise InputError(f"token {int(arr[tuple(bad)])} at puzzle {bad[0]}, position {bad[1]} is outside the "
                         f"vocabulary [0, {task.vocab_size})")
    n = arr.shape[0]
    if puzzle_ids is None:
        ids = np.zeros(n, np.int64)
    else:
        ids = np.asarray(puzzle_ids)
        if ids.ndim == 0:
            ids = np.full(n, ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"puzzle ids must be integers, got dtype {ids.dtype}")
        if ids.shape != (n,):
            raise InputError(f"need one puzzle id per puzzle: {n} puzzles, got puzzle ids of shape {list(ids.shape)}")
        if ids.min() < 0 or ids.max() >= task.num_puzzle_identifiers:
            bad = int(ids[(ids < 0) | (ids >= task.num_puzzle_identifiers)][0])
            raise InputError(f"unknown puzzle id {bad}: the model knows ids 0..{task.num_puzzle_identifiers - 1}")
    return arr.astype(np.int64, copy=False), ids.astype(np.int64, copy=False)
