"""Sudoku 9x9 in the official HRM/TRM encoding, with a unique-solution generator.

Encoding (matches ``build_sudoku_dataset.py`` of HRM/TRM): seq_len 81 (row-major),
vocab_size 11, token 0 = pad, token 1 = blank, tokens 2..10 = digits 1..9 (token = digit + 1).
``inputs`` are the puzzle tokens, ``labels`` the solution tokens; all 81 positions are scored.

Generation (why it looks like this):

1. A full grid is drawn by randomized backtracking (random candidate order, most-constrained
   cell first) instead of permuting one base grid, so puzzles are not all from a single
   equivalence class of grids.
2. Cells are removed in random order; a removal is kept only if the puzzle still has a
   unique solution, until a target blank count drawn uniformly from
   ``[min_blanks, max_blanks]`` is reached. Uniqueness after removing cell c (value v) from a
   unique puzzle is equivalent to "no solution has c != v", which is much cheaper to refute
   than counting two solutions of the whole puzzle; when c is a naked or hidden single in the
   new puzzle the answer is immediate and no search runs at all.
3. ``needs_search`` records whether naked + hidden singles alone fail to solve the puzzle --
   the useful split between "copy-and-propagate" puzzles and ones that need real search.

The solvers here are bitmask backtracking over Python ints: fast enough (~ms per puzzle) to
generate the 1000-puzzle held-out split in seconds without numba or C extensions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np

from .base import Task, TaskData, TaskSpec

__all__ = [
    "SUDOKU_SPEC",
    "SudokuTask",
    "count_solutions",
    "format_sudoku",
    "is_valid_solution",
    "parse_sudoku",
    "solve_sudoku",
    "solved_by_singles",
    "valid_sudoku_solutions",
]

SUDOKU_SPEC = TaskSpec(
    name="sudoku", seq_len=81, vocab_size=11, side=9, pad_id=0, blank_id=1, ignore_label_id=None
)

_BLANK_TOKEN = 1
_DIGIT_OFFSET = 1  # token = digit + 1

_ROW = tuple(i // 9 for i in range(81))
_COL = tuple(i % 9 for i in range(81))
_BOX = tuple((i // 27) * 3 + (i % 9) // 3 for i in range(81))
_POP = tuple(bin(m).count("1") for m in range(512))
_BITS = tuple(tuple(1 << d for d in range(9) if m >> d & 1) for m in range(512))
_DIGIT = {1 << d: d + 1 for d in range(9)}
_UNITS: tuple[tuple[int, ...], ...] = (
    tuple(tuple(r * 9 + c for c in range(9)) for r in range(9))
    + tuple(tuple(r * 9 + c for r in range(9)) for c in range(9))
    + tuple(
        tuple((br * 3 + r) * 9 + bc * 3 + c for r in range(3) for c in range(3))
        for br in range(3)
        for bc in range(3)
    )
)
_CELL_UNITS = tuple((_ROW[i], 9 + _COL[i], 18 + _BOX[i]) for i in range(81))


# --------------------------------------------------------------------------------------
# Core solver on a list of 81 digits (0 = blank)
# --------------------------------------------------------------------------------------
class _ConflictError(ValueError):
    """The givens repeat a digit in a row, column or box (so there is no solution)."""


class _Board:
    """Row/column/box digit bitmasks of a partial grid; cheap to update in place."""

    __slots__ = ("grid", "rows", "cols", "boxes")

    def __init__(self, digits: Sequence[int]) -> None:
        self.grid = list(digits)
        self.rows = [0] * 9
        self.cols = [0] * 9
        self.boxes = [0] * 9
        for i, d in enumerate(self.grid):
            if d:
                bit = 1 << (d - 1)
                if (self.rows[_ROW[i]] | self.cols[_COL[i]] | self.boxes[_BOX[i]]) & bit:
                    raise _ConflictError(f"givens conflict: digit {d} repeated in a unit of cell {i}")
                self.rows[_ROW[i]] |= bit
                self.cols[_COL[i]] |= bit
                self.boxes[_BOX[i]] |= bit

    def free(self, i: int) -> int:
        return 511 & ~(self.rows[_ROW[i]] | self.cols[_COL[i]] | self.boxes[_BOX[i]])

    def place(self, i: int, bit: int) -> None:
        self.grid[i] = _DIGIT[bit]
        self.rows[_ROW[i]] |= bit
        self.cols[_COL[i]] |= bit
        self.boxes[_BOX[i]] |= bit

    def clear(self, i: int) -> None:
        bit = 1 << (self.grid[i] - 1)
        self.grid[i] = 0
        self.rows[_ROW[i]] ^= bit
        self.cols[_COL[i]] ^= bit
        self.boxes[_BOX[i]] ^= bit

    def empties(self) -> list[int]:
        return [i for i, d in enumerate(self.grid) if d == 0]


def _search(
    board: _Board,
    empties: list[int],
    limit: int,
    found: list[list[int]],
    rng: np.random.Generator | None = None,
) -> int:
    """Count completions of ``board`` up to ``limit`` (most-constrained cell first).

    The first completion is appended to ``found``. ``board`` and ``empties`` are restored
    (as a multiset) before returning. With ``rng`` the candidate order is shuffled, which
    turns the solver into a random full-grid generator.
    """
    if not empties:
        if not found:
            found.append(list(board.grid))
        return 1
    rows, cols, boxes = board.rows, board.cols, board.boxes
    best_n = 10
    best_i = 0
    best_free = 0
    for k, i in enumerate(empties):
        free = 511 & ~(rows[_ROW[i]] | cols[_COL[i]] | boxes[_BOX[i]])
        n = _POP[free]
        if n < best_n:
            best_n, best_i, best_free = n, k, free
            if n < 2:
                break
    if best_n == 0:
        return 0
    cell = empties[best_i]
    empties[best_i] = empties[-1]
    empties.pop()
    r, c, b = _ROW[cell], _COL[cell], _BOX[cell]
    cands: Sequence[int] = _BITS[best_free]
    if rng is not None and len(cands) > 1:
        cands = [cands[j] for j in rng.permutation(len(cands))]
    total = 0
    grid = board.grid
    for bit in cands:
        rows[r] |= bit
        cols[c] |= bit
        boxes[b] |= bit
        grid[cell] = _DIGIT[bit]
        total += _search(board, empties, limit - total, found, rng)
        rows[r] ^= bit
        cols[c] ^= bit
        boxes[b] ^= bit
        grid[cell] = 0
        if total >= limit:
            break
    empties.append(cell)
    return total


def _propagate_singles(board: _Board) -> bool | None:
    """Apply naked and hidden singles to a fixpoint, in place.

    Returns True if solved, False on a contradiction, None if stuck (search needed).
    """
    grid = board.grid
    while True:
        progress = False
        for i in range(81):
            if grid[i] == 0:
                free = board.free(i)
                if free == 0:
                    return False
                if _POP[free] == 1:
                    board.place(i, free)
                    progress = True
        if progress:
            continue
        for unit in _UNITS:
            once = twice = present = 0
            for i in unit:
                d = grid[i]
                if d:
                    present |= 1 << (d - 1)
                else:
                    f = board.free(i)
                    twice |= once & f
                    once |= f
            missing = 511 & ~present
            if missing & ~once:
                return False  # some digit has no place left in this unit
            hidden = once & ~twice & missing
            for bit in _BITS[hidden]:
                for i in unit:
                    if grid[i] == 0 and board.free(i) & bit:
                        board.place(i, bit)
                        progress = True
                        break
        if not progress:
            return 0 not in grid or None


# --------------------------------------------------------------------------------------
# Public helpers on token arrays
# --------------------------------------------------------------------------------------
def _tokens_to_digits(tokens: Any) -> list[int]:
    arr = np.asarray(tokens).reshape(-1)
    if arr.shape != (81,):
        raise ValueError(f"a sudoku has 81 tokens, got {arr.size}")
    if arr.size and ((arr < _BLANK_TOKEN) | (arr > 10)).any():
        bad = int(np.flatnonzero((arr < _BLANK_TOKEN) | (arr > 10))[0])
        raise ValueError(f"sudoku token {int(arr[bad])} at position {bad} is not in 1..10")
    return [int(t) - _DIGIT_OFFSET for t in arr]


def count_solutions(tokens: Any, limit: int = 2) -> int:
    """Number of solutions of a puzzle (tokens), counting no further than ``limit``.

    ``count_solutions(p) == 1`` is the uniqueness test; conflicting givens give 0.
    """
    try:
        board = _Board(_tokens_to_digits(tokens))
    except _ConflictError:
        return 0
    return _search(board, board.empties(), limit, [])


def solve_sudoku(tokens: Any) -> np.ndarray | None:
    """A solution (int32 tokens, shape (81,)) of a puzzle, or None if it has none."""
    try:
        board = _Board(_tokens_to_digits(tokens))
    except _ConflictError:
        return None
    found: list[list[int]] = []
    if _search(board, board.empties(), 1, found) == 0:
        return None
    return np.asarray(found[0], dtype=np.int32) + _DIGIT_OFFSET


def solved_by_singles(tokens: Any) -> bool:
    """True if naked + hidden singles alone solve the puzzle (no guessing needed)."""
    try:
        board = _Board(_tokens_to_digits(tokens))
    except _ConflictError:
        return False
    return _propagate_singles(board) is True


def is_valid_solution(puzzle: Any, solution: Any) -> bool:
    """True if ``solution`` is a complete valid grid agreeing with the givens of ``puzzle``.

    This is the right correctness test for a model's answer if a puzzle might not be
    unique; for generated puzzles it is equivalent to exact match with the label.
    """
    p = np.asarray(puzzle).reshape(-1)
    s = np.asarray(solution).reshape(-1)
    if p.shape != (81,) or s.shape != (81,):
        return False
    if ((s < 2) | (s > 10)).any():
        return False
    givens = p != _BLANK_TOKEN
    if (p[givens] != s[givens]).any():
        return False
    g = s.reshape(9, 9)
    boxes = g.reshape(3, 3, 3, 3).transpose(0, 2, 1, 3).reshape(9, 9)
    want = np.arange(2, 11)
    return all((np.sort(x, axis=1) == want).all() for x in (g, g.T, boxes))


def valid_sudoku_solutions(puzzles: Any, predictions: Any) -> np.ndarray:
    """bool [N]: which predicted grids solve their puzzles (tokens [N, 81] each; one puzzle may be 1-D).

    A prediction is valid when it is a complete grid (every token a digit, 2..10), every row, column and 3x3 box
    holds each digit once, and it keeps every given of its puzzle (every input token that is not blank; a pad
    token in a puzzle can never be kept, so such a puzzle has no valid answer). This is ``is_valid_solution``
    for a batch; for the generated (unique) puzzles it is the same as an exact match with the label.
    """
    p, s = np.atleast_2d(np.asarray(puzzles)), np.atleast_2d(np.asarray(predictions))  # one puzzle: [L] -> [1, L]
    if p.ndim != 2 or p.shape[1] != 81 or p.shape != s.shape:
        raise ValueError(f"need puzzles and predictions of the same shape [N, 81], got {p.shape} and {s.shape}")
    n = p.shape[0]
    s = s.astype(np.int64)
    ok = ((s >= 2) & (s <= 10)).all(axis=1)
    ok &= ((p == _BLANK_TOKEN) | (p == s)).all(axis=1)
    g = s.reshape(n, 9, 9)
    boxes = g.reshape(n, 3, 3, 3, 3).transpose(0, 1, 3, 2, 4).reshape(n, 9, 9)
    want = np.arange(2, 11)
    for units in (g, g.transpose(0, 2, 1), boxes):
        ok &= (np.sort(units, axis=2) == want).all(axis=(1, 2))
    return ok


def parse_sudoku(text_line: str) -> np.ndarray:
    """Parse an 81-character line ('1'-'9' givens, '0' or '.' blanks) into int32 tokens.

    Surrounding whitespace is ignored. Errors say which line, the length found, or the
    offending character and its 0-based position, because these lines usually come from
    hand-edited files or other tools' dumps.
    """
    line = text_line.strip()
    if len(line) != 81:
        raise ValueError(f"sudoku line must have 81 characters, found {len(line)}: {line!r}")
    out = np.empty(81, dtype=np.int32)
    for pos, ch in enumerate(line):
        if ch in ".0":
            out[pos] = _BLANK_TOKEN
        elif "1" <= ch <= "9":
            out[pos] = ord(ch) - ord("0") + _DIGIT_OFFSET
        else:
            raise ValueError(
                f"bad character {ch!r} at position {pos} in sudoku line {line!r} "
                "(expected '1'-'9', '0' or '.')"
            )
    return out


def format_sudoku(tokens: Any, blank: str = ".", rows: bool = False) -> str:
    """Render 81 tokens as an 81-character line (``blank`` for token 1); inverse of parse.

    ``rows=True``: the grid as 9 lines of 9 characters instead, for people to read.
    """
    digits = _tokens_to_digits(tokens)
    line = "".join(str(d) if d else blank for d in digits)
    return "\n".join(line[i:i + 9] for i in range(0, 81, 9)) if rows else line


# --------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------
def _random_grid(rng: np.random.Generator) -> list[int]:
    board = _Board([0] * 81)
    found: list[list[int]] = []
    _search(board, board.empties(), 1, found, rng)
    return found[0]


def _digit_canonical_key(grid: Sequence[int]) -> bytes:
    """Grid bytes with digits renamed in order of first appearance.

    Used as the split family key: a digit-relabelled copy of a held-out grid (exactly what
    ``augment`` can produce) has the same key, so it can never be drawn for another split.
    """
    rename: dict[int, int] = {}
    for d in grid:
        if d not in rename:
            rename[d] = len(rename) + 1
            if len(rename) == 9:
                break
    return bytes(rename[d] for d in grid)


def _random_geometry(rng: np.random.Generator) -> np.ndarray:
    """A random validity-preserving cell permutation (source index for each target cell)."""
    bands = rng.permutation(3)
    rows = (bands[:, None] * 3 + np.array([rng.permutation(3) for _ in range(3)])).reshape(9)
    stacks = rng.permutation(3)
    cols = (stacks[:, None] * 3 + np.array([rng.permutation(3) for _ in range(3)])).reshape(9)
    src = rows[:, None] * 9 + cols[None, :]
    if rng.random() < 0.5:
        src = src.T
    return src.reshape(81)


def _is_forced(board: _Board, cell: int, bit: int) -> bool:
    """True if the blank ``cell`` can only take ``bit`` (naked or hidden single)."""
    if board.free(cell) == bit:
        return True
    grid = board.grid
    for u in _CELL_UNITS[cell]:
        for i in _UNITS[u]:
            if i != cell and grid[i] == 0 and board.free(i) & bit:
                break
        else:
            return True
    return False


def _has_other_solution(board: _Board, empties: list[int], cell: int, bit: int) -> bool:
    """Does the puzzle (with ``cell`` blank) have a solution where ``cell`` != ``bit``?"""
    free = board.free(cell) & ~bit
    if not free:
        return False
    others = [i for i in empties if i != cell]
    found: list[list[int]] = []
    for alt in _BITS[free]:
        board.place(cell, alt)
        hit = _search(board, others, 1, found)
        board.clear(cell)
        if hit:
            return True
    return False


def _carve(solution: Sequence[int], target_blanks: int, rng: np.random.Generator) -> list[int]:
    """Blank cells of ``solution`` in random order while the solution stays unique."""
    board = _Board(solution)
    empties: list[int] = []
    for cell in rng.permutation(81).tolist():
        if len(empties) >= target_blanks:
            break
        bit = 1 << (board.grid[cell] - 1)
        board.clear(cell)
        if _is_forced(board, cell, bit) or not _has_other_solution(board, empties, cell, bit):
            empties.append(cell)
        else:
            board.place(cell, bit)
    return board.grid


class SudokuTask(Task):
    """Sudoku 9x9: unique-solution puzzles with a spread of blank counts.

    Difficulty keywords of ``generate``: ``min_blanks`` (default 30), ``max_blanks``
    (default 55; above ~58 the greedy carving rarely reaches the target) and ``needs_search``
    (None = keep all, True = only puzzles singles cannot solve, False = only ones they can).
    """

    split_seeds = MappingProxyType({"train": 91_000_001, "calibration": 91_000_002, "heldout": 91_000_003})
    meta_fields = MappingProxyType({"blanks": np.int32, "needs_search": np.bool_})
    _difficulty_keys = ("min_blanks", "max_blanks", "needs_search")

    @property
    def spec(self) -> TaskSpec:
        return SUDOKU_SPEC

    def _check_difficulty(self, difficulty: Mapping[str, Any]) -> None:
        unknown = set(difficulty) - set(self._difficulty_keys)
        if unknown:
            raise ValueError(
                f"unknown sudoku difficulty parameter(s) {sorted(unknown)}; "
                f"valid: {', '.join(self._difficulty_keys)}"
            )
        lo = difficulty.get("min_blanks", 30)
        hi = difficulty.get("max_blanks", 55)
        if not (0 <= lo <= hi <= 64):
            raise ValueError(f"need 0 <= min_blanks <= max_blanks <= 64, got {lo}..{hi}")
        if difficulty.get("needs_search") not in (None, True, False):
            raise ValueError("needs_search must be None, True or False")

    def _draw(
        self,
        rng: np.random.Generator,
        accept_family: Callable[[bytes], bool],
        min_blanks: int = 30,
        max_blanks: int = 55,
        needs_search: bool | None = None,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any], bytes] | None:
        grid = _random_grid(rng)
        # Land in the requested split by re-arranging the grid's rows/columns (cheap) rather
        # than by drawing whole new grids; a re-arranged random grid is just as random.
        for _ in range(64):
            if accept_family(_digit_canonical_key(grid)):
                break
            src = _random_geometry(rng)
            grid = [grid[j] for j in src.tolist()]
        else:
            return None
        target = int(rng.integers(min_blanks, max_blanks + 1))
        puzzle = _carve(grid, target, rng)
        blanks = puzzle.count(0)
        if blanks < min_blanks:
            return None
        hard = _propagate_singles(_Board(puzzle)) is not True
        if needs_search is not None and hard != needs_search:
            return None
        inputs = np.asarray(puzzle, dtype=np.int32) + _DIGIT_OFFSET
        labels = np.asarray(grid, dtype=np.int32) + _DIGIT_OFFSET
        return inputs, labels, {"blanks": blanks, "needs_search": hard}, inputs.tobytes()

    def augment(self, data: TaskData, rng: np.random.Generator) -> TaskData:
        """One random Sudoku symmetry per puzzle, applied to inputs and labels alike.

        Digit relabelling, band and stack permutations, row/column permutations inside
        bands/stacks and an optional transpose: all map valid unique puzzles to valid unique
        puzzles with the same blank count and the same ``needs_search``. Vectorised over the
        batch, so it is cheap enough to run on every training step.
        """
        n = len(data)
        if n == 0:
            return data

        def lines() -> np.ndarray:  # (n, 9) source row (or column) for each target one
            outer = np.argsort(rng.random((n, 3)), axis=1)
            inner = np.argsort(rng.random((n, 3, 3)), axis=2)
            return (outer[:, :, None] * 3 + inner).reshape(n, 9)

        rows, cols = lines(), lines()
        src = rows[:, :, None] * 9 + cols[:, None, :]
        flip = rng.random(n) < 0.5
        src = np.where(flip[:, None, None], src.transpose(0, 2, 1), src).reshape(n, 81)
        digit_map = np.empty((n, 11), dtype=np.int32)
        digit_map[:, 0] = 0
        digit_map[:, 1] = _BLANK_TOKEN
        digit_map[:, 2:] = np.argsort(rng.random((n, 9)), axis=1) + 2

        def apply(tokens: np.ndarray) -> np.ndarray:
            moved = np.take_along_axis(tokens, src, axis=1)
            return np.take_along_axis(digit_map, moved, axis=1)

        return data.with_tokens(apply(data.inputs), apply(data.labels))

    def solve(self, inputs: np.ndarray) -> np.ndarray | None:
        if count_solutions(inputs, limit=2) != 1:
            return None
        return solve_sudoku(inputs)

    def parse(self, text: str) -> np.ndarray:
        return parse_sudoku(text)

    def format(self, tokens: np.ndarray) -> str:
        return format_sudoku(tokens)

    def valid_solutions(self, inputs: np.ndarray, predictions: np.ndarray) -> np.ndarray:
        return valid_sudoku_solutions(inputs, predictions)
