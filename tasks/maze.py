"""Square mazes in the official HRM/TRM maze encoding, with unique shortest paths.

Encoding (matches ``build_maze_dataset.py`` of HRM/TRM): a side x side grid, row-major,
seq_len side*side, vocab_size 6: token 0 = pad and the characters ``"# SGo"`` -> 1..5
(``#`` wall, `` `` open, ``S`` start, ``G`` goal, ``o`` path). ``inputs`` is the maze with S
and G; ``labels`` is the same grid with every cell of the shortest path strictly between S
and G turned into ``o``. Every position is scored.

Generation (why it looks like this):

* Layout: a perfect maze from a randomized depth-first search on the lattice of odd
  coordinates inside a wall border (corridors one cell wide), then a fraction
  ``loop_fraction`` of the remaining lattice walls is knocked out to create loops. Loops
  matter: in a perfect maze the path is the only path and a model can learn dead-end
  filling; with loops it has to compare route lengths. For an even side the lattice stops
  one cell short, leaving a double wall on the bottom and right (the dihedral augmentation
  moves it around).
* Endpoints: S is a random open cell; a BFS from S counts shortest paths (capped at 2).
  G is picked among cells with exactly ONE shortest path from S (so the label is well
  defined) and a path length in ``[min_path, max_path]`` (default: at least ``side`` moves,
  so S->G is never a straight corridor and the model must search). To spread path lengths
  instead of piling up on the most common distance, a length is first drawn uniformly among
  the achievable ones, then a cell at that distance.
* ``path_length`` (metadata) is the number of moves from S to G; the label has
  ``path_length - 1`` ``o`` cells.
* Split family key: the wall layout up to the 8 symmetries of the square, so a rotated or
  mirrored held-out layout can never appear in train or calibration.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from .base import Task, TaskData, TaskSpec

__all__ = [
    "MAZE_CHARS",
    "MazeFormatError",
    "MazeTask",
    "dihedral_indices",
    "format_maze",
    "maze_spec",
    "parse_maze",
    "shortest_paths",
    "solve_maze",
    "valid_maze_solutions",
]

#: Official character set; token = index + 1 (token 0 is pad).
MAZE_CHARS = "# SGo"
WALL, OPEN, START, GOAL, PATH = 1, 2, 3, 4, 5
_CHAR_TO_TOKEN = {ch: i + 1 for i, ch in enumerate(MAZE_CHARS)}

MIN_SIDE = 7
_STARTS_PER_LAYOUT = 4
MAX_SIDE = 64


class MazeFormatError(ValueError):
    """A maze text that cannot be parsed; ``row`` is the 1-based row at fault (or None),
    so file loaders can point at the exact line of the file."""

    def __init__(self, message: str, row: int | None = None) -> None:
        super().__init__(message)
        self.row = row


def maze_spec(side: int) -> TaskSpec:
    """The TaskSpec of ``side`` x ``side`` mazes (seq_len side*side, vocab 6, no blank token)."""
    _check_side(side)
    return TaskSpec(name="maze", seq_len=side * side, vocab_size=6, side=side, blank_id=None)


def _check_side(side: int) -> None:
    if not isinstance(side, (int, np.integer)) or not MIN_SIDE <= side <= MAX_SIDE:
        raise ValueError(f"maze size must be an int in [{MIN_SIDE}, {MAX_SIDE}], got {side!r}")


def dihedral_indices(side: int) -> np.ndarray:
    """The 8 symmetries of the square as gather indices, shape (8, side*side).

    ``tokens[idx[k]]`` is transform k of a flattened grid; row 0 is the identity.
    """
    base = np.arange(side * side).reshape(side, side)
    out = []
    for flip in (False, True):
        g = base.T if flip else base
        for k in range(4):
            out.append(np.rot90(g, k).reshape(-1))
    return np.stack(out)


def _side_of(tokens: np.ndarray, side: int | None) -> int:
    n = tokens.size
    if side is None:
        side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"{n} maze tokens do not form a square grid" + (f" of side {side}" if side else ""))
    return side


def _neighbours(side: int) -> list[tuple[int, ...]]:
    nbrs = []
    for i in range(side * side):
        r, c = divmod(i, side)
        nbrs.append(
            tuple(
                (r + dr) * side + c + dc
                for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
                if 0 <= r + dr < side and 0 <= c + dc < side
            )
        )
    return nbrs


_NEIGHBOUR_CACHE: dict[int, list[tuple[int, ...]]] = {}


def _bfs(passable: list[bool], side: int, start: int) -> tuple[list[int], list[int]]:
    """Distances (-1 = unreachable) and shortest-path counts capped at 2 from ``start``."""
    nbrs = _NEIGHBOUR_CACHE.get(side)
    if nbrs is None:
        nbrs = _NEIGHBOUR_CACHE.setdefault(side, _neighbours(side))
    dist = [-1] * (side * side)
    ways = [0] * (side * side)
    dist[start] = 0
    ways[start] = 1
    queue = deque([start])
    while queue:
        u = queue.popleft()
        du = dist[u] + 1
        wu = ways[u]
        for v in nbrs[u]:
            if not passable[v]:
                continue
            if dist[v] < 0:
                dist[v] = du
                ways[v] = wu
                queue.append(v)
            elif dist[v] == du:
                ways[v] = min(2, ways[v] + wu)
    return dist, ways


def _trace_back(dist: list[int], side: int, goal: int) -> list[int]:
    """Cells strictly between start and ``goal`` on a shortest path (goal side first)."""
    nbrs = _NEIGHBOUR_CACHE[side]
    cells = []
    cur = goal
    while dist[cur] > 1:
        cur = next(v for v in nbrs[cur] if dist[v] == dist[cur] - 1)
        cells.append(cur)
    return cells


def _endpoints(tokens: np.ndarray) -> tuple[int, int]:
    starts = np.flatnonzero(tokens == START)
    goals = np.flatnonzero(tokens == GOAL)
    if starts.size != 1 or goals.size != 1:
        raise ValueError(f"a maze needs exactly one S and one G, found {starts.size} S and {goals.size} G")
    return int(starts[0]), int(goals[0])


def shortest_paths(tokens: Any, side: int | None = None) -> tuple[int, int]:
    """(moves from S to G, number of shortest paths capped at 2); (-1, 0) if unreachable.

    'o' cells count as open, so this works on inputs and labels alike.
    """
    arr = np.asarray(tokens).reshape(-1)
    side = _side_of(arr, side)
    s, g = _endpoints(arr)
    dist, ways = _bfs((arr != WALL).tolist(), side, s)
    return dist[g], ways[g]


def solve_maze(tokens: Any, side: int | None = None) -> np.ndarray | None:
    """The label of a maze (S->G shortest path drawn with 'o'), or None if there is no
    path or the shortest path is not unique (then no label is well defined)."""
    arr = np.asarray(tokens).reshape(-1).astype(np.int32)
    side = _side_of(arr, side)
    s, g = _endpoints(arr)
    dist, ways = _bfs((arr != WALL).tolist(), side, s)
    if dist[g] < 0 or ways[g] != 1:
        return None
    out = np.where(arr == PATH, OPEN, arr).astype(np.int32)
    out[_trace_back(dist, side, g)] = PATH
    return out


def valid_maze_solutions(puzzles: Any, predictions: Any, side: int | None = None) -> np.ndarray:
    """bool [N]: which predicted grids draw a shortest S->G path of their mazes (tokens [N, side*side] each).

    The task's answer (its label) is the maze with every cell of THE shortest path strictly between S and G
    turned into ``o``; a prediction is valid when it is such an answer, the one the label draws or, in a maze
    with several shortest paths (never generated here), any of them:

    * the maze is kept: walls, S and G exactly where the puzzle has them (one S, one G), every other cell open
      or ``o``, no pad token;
    * the ``o`` cells form one 4-neighbour chain from S to G: S and G each touch exactly one cell of S, G and
      the ``o`` cells (each other, when there are no ``o`` cells), every ``o`` cell exactly two -- so no gaps,
      no branches, no stray ``o`` and no loops;
    * it is shortest: ``o`` cells + 1 moves is the puzzle's S->G distance (``o`` cells of a puzzle count as open).

    For the generated mazes (unique shortest paths) this is the same as an exact match with the label.
    """
    p, s = np.atleast_2d(np.asarray(puzzles)), np.atleast_2d(np.asarray(predictions))  # one puzzle: [L] -> [1, L]
    if p.ndim != 2 or p.shape != s.shape:
        raise ValueError(f"need puzzles and predictions of the same shape [N, side*side], got {p.shape} and {s.shape}")
    n, length = p.shape
    side = _side_of(np.empty(length), side)
    p = p.astype(np.int64)
    s = s.astype(np.int64)
    ok = ((p >= WALL) & (p <= PATH) & (s >= WALL) & (s <= PATH)).all(axis=1)
    for kept in (WALL, START, GOAL):
        ok &= ((p == kept) == (s == kept)).all(axis=1)
    ok &= ((p == START).sum(axis=1) == 1) & ((p == GOAL).sum(axis=1) == 1)
    on = (s == PATH) | (s == START) | (s == GOAL)
    grid = np.pad(on.reshape(n, side, side), ((0, 0), (1, 1), (1, 1))).astype(np.int8)
    degree = (grid[:, :-2, 1:-1] + grid[:, 2:, 1:-1] + grid[:, 1:-1, :-2] + grid[:, 1:-1, 2:]).reshape(n, length)
    ok &= np.where(on, degree == np.where(s == PATH, 2, 1), True).all(axis=1)
    # A chain from S (degree 1) ends at the only other degree-1 cell, G, through open cells: a walk of at least
    # the shortest distance. Moves == that distance leaves no 'o' cell off it (no separate loop) and makes it shortest.
    moves = (s == PATH).sum(axis=1) + 1
    for i in np.flatnonzero(ok).tolist():
        start, goal = _endpoints(p[i])
        dist, _ = _bfs((p[i] != WALL).tolist(), side, start)
        ok[i] = dist[goal] == moves[i]
    return ok


def parse_maze(text: str | Iterable[str]) -> np.ndarray:
    """Parse a square maze drawn with ``"# SGo"`` into int32 tokens of shape (side*side,).

    Accepts one string (newline-separated rows) or a sequence of row strings. Spaces are
    open cells, so only line breaks are stripped -- never trailing spaces. Leading and
    trailing empty lines of a string are ignored. Errors name the 1-based row and column.
    """
    rows = text.splitlines() if isinstance(text, str) else [r.rstrip("\r\n") for r in text]
    if isinstance(text, str):
        while rows and rows[0] == "":
            rows.pop(0)
        while rows and rows[-1] == "":
            rows.pop()
    side = len(rows)
    if side == 0:
        raise MazeFormatError("empty maze text")
    out = np.empty((side, side), dtype=np.int32)
    for r, row in enumerate(rows):
        if len(row) != side:
            raise MazeFormatError(
                f"maze row {r + 1} has {len(row)} characters, expected {side} "
                f"(a maze of {side} rows must be square): {row!r}",
                row=r + 1,
            )
        for c, ch in enumerate(row):
            tok = _CHAR_TO_TOKEN.get(ch)
            if tok is None:
                raise MazeFormatError(
                    f"bad character {ch!r} at row {r + 1}, column {c + 1} of maze "
                    f"(expected one of {MAZE_CHARS!r})",
                    row=r + 1,
                )
            out[r, c] = tok
    flat = out.reshape(-1)
    try:
        _endpoints(flat)
    except ValueError as err:
        raise MazeFormatError(str(err)) from None
    return flat


def format_maze(tokens: Any, side: int | None = None) -> str:
    """Render maze tokens as ``side`` newline-separated rows of ``"# SGo"`` characters."""
    arr = np.asarray(tokens).reshape(-1)
    side = _side_of(arr, side)
    if ((arr < 1) | (arr > 5)).any():
        bad = int(np.flatnonzero((arr < 1) | (arr > 5))[0])
        raise ValueError(f"maze token {int(arr[bad])} at position {bad} is not in 1..5")
    chars = np.array(list(MAZE_CHARS))[arr - 1].reshape(side, side)
    return "\n".join("".join(row) for row in chars)


def _carve_layout(side: int, rng: np.random.Generator, loop_fraction: float) -> np.ndarray:
    """Open-cell mask (side, side) of a DFS maze with some extra walls removed."""
    hi = side - 2 if side % 2 else side - 3
    m = (hi + 1) // 2  # lattice cells per row/column, at grid coordinate 2*i + 1
    open_ = np.zeros((side, side), dtype=bool)
    visited = np.zeros((m, m), dtype=bool)
    start = (int(rng.integers(m)), int(rng.integers(m)))
    visited[start] = True
    open_[2 * start[0] + 1, 2 * start[1] + 1] = True
    stack = [start]
    steps = ((-1, 0), (1, 0), (0, -1), (0, 1))
    while stack:
        i, j = stack[-1]
        fresh = [
            (di, dj)
            for di, dj in steps
            if 0 <= i + di < m and 0 <= j + dj < m and not visited[i + di, j + dj]
        ]
        if not fresh:
            stack.pop()
            continue
        di, dj = fresh[int(rng.integers(len(fresh)))]
        ni, nj = i + di, j + dj
        visited[ni, nj] = True
        open_[2 * i + 1 + di, 2 * j + 1 + dj] = True
        open_[2 * ni + 1, 2 * nj + 1] = True
        stack.append((ni, nj))
    walls = [
        (r, c) for r in range(1, hi + 1) for c in range(1, hi + 1) if (r + c) % 2 == 1 and not open_[r, c]
    ]
    k = int(round(loop_fraction * len(walls)))
    if k:
        for w in rng.choice(len(walls), size=k, replace=False).tolist():
            open_[walls[w]] = True
    return open_


def _canonical_bytes(grid: np.ndarray, perms: np.ndarray) -> bytes:
    flat = np.ascontiguousarray(grid).reshape(-1).astype(np.uint8)
    return min(flat[p].tobytes() for p in perms)


class MazeTask(Task):
    """Mazes of a fixed side with a unique, non-trivial shortest S->G path.

    Difficulty keywords of ``generate``: ``min_path`` (moves, default = side), ``max_path``
    (default: no cap) and ``loop_fraction`` (share of removable lattice walls knocked out
    after the perfect maze, default 0.15; 0 gives perfect mazes).

    Splits need enough distinct layouts: use side >= 9 for them (side 7 has only a few dozen
    layouts up to symmetry).
    """

    split_seeds = MappingProxyType({"train": 92_000_001, "calibration": 92_000_002, "heldout": 92_000_003})
    meta_fields = MappingProxyType({"path_length": np.int32})
    _difficulty_keys = ("min_path", "max_path", "loop_fraction")

    def __init__(self, size: int) -> None:
        super().__init__()
        _check_side(size)
        self.size = int(size)
        self._spec = maze_spec(self.size)
        self._perms = dihedral_indices(self.size)

    @property
    def spec(self) -> TaskSpec:
        return self._spec

    def _check_difficulty(self, difficulty: Mapping[str, Any]) -> None:
        unknown = set(difficulty) - set(self._difficulty_keys)
        if unknown:
            raise ValueError(
                f"unknown maze difficulty parameter(s) {sorted(unknown)}; "
                f"valid: {', '.join(self._difficulty_keys)}"
            )
        lo = difficulty.get("min_path")
        lo = self.size if lo is None else lo
        hi = difficulty.get("max_path")
        if lo < 1 or (hi is not None and hi < lo):
            raise ValueError(f"need 1 <= min_path <= max_path, got {lo}..{hi}")
        frac = difficulty.get("loop_fraction", 0.15)
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"loop_fraction must be in [0, 1], got {frac}")

    def _draw(
        self,
        rng: np.random.Generator,
        accept_family: Callable[[bytes], bool],
        min_path: int | None = None,
        max_path: int | None = None,
        loop_fraction: float = 0.15,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any], bytes] | None:
        side = self.size
        lo = side if min_path is None else min_path
        hi = side * side if max_path is None else max_path
        layout = _carve_layout(side, rng, loop_fraction)
        if not accept_family(_canonical_bytes(layout, self._perms)):
            return None
        passable = layout.reshape(-1).tolist()
        cells = np.flatnonzero(layout)
        # Pool (S, G) candidates from a few starts, then draw the length first: uniform over
        # achievable lengths, so long paths (few pairs) are not drowned by short ones.
        starts = cells[rng.choice(cells.size, size=min(_STARTS_PER_LAYOUT, cells.size), replace=False)]
        pool_s: list[np.ndarray] = []
        pool_g: list[np.ndarray] = []
        pool_d: list[np.ndarray] = []
        for s in starts.tolist():
            d, ways = (np.asarray(a) for a in _bfs(passable, side, s))
            goals = np.flatnonzero((d >= lo) & (d <= hi) & (ways == 1))
            pool_s.append(np.full(goals.size, s))
            pool_g.append(goals)
            pool_d.append(d[goals])
        dists = np.concatenate(pool_d)
        if dists.size == 0:
            return None
        length = int(rng.choice(np.unique(dists)))
        pick = int(rng.choice(np.flatnonzero(dists == length)))
        s, g = int(np.concatenate(pool_s)[pick]), int(np.concatenate(pool_g)[pick])
        dist, _ = _bfs(passable, side, s)
        inputs = np.where(layout.reshape(-1), OPEN, WALL).astype(np.int32)
        inputs[s] = START
        inputs[g] = GOAL
        labels = inputs.copy()
        labels[_trace_back(dist, side, g)] = PATH
        return inputs, labels, {"path_length": length}, _canonical_bytes(inputs, self._perms)

    def augment(self, data: TaskData, rng: np.random.Generator) -> TaskData:
        """One of the 8 symmetries of the square per puzzle, on inputs and labels alike.

        Rotations and reflections keep walls, S, G and the (unique) shortest path intact.
        """
        n = len(data)
        if n == 0:
            return data
        src = self._perms[rng.integers(8, size=n)]
        return data.with_tokens(
            np.take_along_axis(data.inputs, src, axis=1), np.take_along_axis(data.labels, src, axis=1)
        )

    def solve(self, inputs: np.ndarray) -> np.ndarray | None:
        return solve_maze(inputs, self.size)

    def parse(self, text: str) -> np.ndarray:
        tokens = parse_maze(text)
        if tokens.size != self.spec.seq_len:
            raise ValueError(f"maze has side {int(round(tokens.size**0.5))}, this task expects {self.size}")
        return tokens

    def format(self, tokens: np.ndarray) -> str:
        return format_maze(tokens, self.size)

    def valid_solutions(self, inputs: np.ndarray, predictions: np.ndarray) -> np.ndarray:
        return valid_maze_solutions(inputs, predictions, self.size)
