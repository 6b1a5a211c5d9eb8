"""Exact and token accuracy, computed the way the official HRM/TRM evaluation does.

The official loss head computes, per sequence, ``mask = labels != IGNORE``,
``count = mask.sum(-1)`` and ``correct = mask & (pred == labels)``; a sequence is exactly
correct when ``correct.sum(-1) == count``, and both metrics average only over sequences with
at least one scored token. ``token_accuracy`` is therefore the mean of per-puzzle token
accuracies (not a pooled token count) -- identical when every position is scored, as in
Sudoku and Maze. Keeping the same definition lets numbers from an exported/quantized model
be compared directly with the paper's and the PyTorch checkpoint's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["exact_accuracy", "per_puzzle_correct", "token_accuracy"]


def _prepare(predictions: Any, labels: Any, ignore_label_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return (token-correct matrix, scored mask), both bool (N, seq_len)."""
    pred = np.asarray(predictions)
    lab = np.asarray(labels)
    if pred.ndim == 3:
        raise ValueError(
            f"predictions have shape {pred.shape}: pass token ids (N, seq_len), e.g. logits.argmax(-1)"
        )
    if pred.ndim != 2 or lab.ndim != 2:
        raise ValueError(f"predictions and labels must be 2-D (N, seq_len), got {pred.shape} and {lab.shape}")
    if pred.shape != lab.shape:
        raise ValueError(f"predictions shape {pred.shape} != labels shape {lab.shape}")
    for name, arr in (("predictions", pred), ("labels", lab)):
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must be integer token ids, got dtype {arr.dtype}")
    scored = np.ones(lab.shape, dtype=bool) if ignore_label_id is None else lab != ignore_label_id
    return (pred == lab) & scored, scored


def per_puzzle_correct(predictions: Any, labels: Any, ignore_label_id: int | None = None) -> np.ndarray:
    """Bool array (N,): True where every scored token of the puzzle is predicted right.

    A puzzle with no scored token is vacuously True here; the averages below skip it.
    """
    correct, scored = _prepare(predictions, labels, ignore_label_id)
    return correct.sum(axis=1) == scored.sum(axis=1)


def _valid_rows(scored: np.ndarray) -> np.ndarray:
    valid = scored.any(axis=1)
    if not valid.any():
        raise ValueError("no puzzle has a scored token: accuracy is undefined")
    return valid


def exact_accuracy(predictions: Any, labels: Any, ignore_label_id: int | None = None) -> float:
    """Fraction of puzzles (with at least one scored token) solved completely."""
    correct, scored = _prepare(predictions, labels, ignore_label_id)
    valid = _valid_rows(scored)
    exact = correct.sum(axis=1) == scored.sum(axis=1)
    return float(exact[valid].mean())


def token_accuracy(predictions: Any, labels: Any, ignore_label_id: int | None = None) -> float:
    """Mean over puzzles of the fraction of scored tokens predicted right (official "accuracy")."""
    correct, scored = _prepare(predictions, labels, ignore_label_id)
    valid = _valid_rows(scored)
    per = correct.sum(axis=1)[valid] / scored.sum(axis=1)[valid]
    return float(per.mean())
