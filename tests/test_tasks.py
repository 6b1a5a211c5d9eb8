"""Tests of trm_export.tasks: puzzles are valid, unique, reproducible and split cleanly.

The checkers below (sudoku solver, singles propagation, maze BFS) are written
independently of the package on purpose: a bug shared by generator and checker would
otherwise go unnoticed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from trm_export.tasks import (
    SPLIT_NAMES,
    TASK_NAMES,
    MazeTask,
    SudokuTask,
    TaskData,
    TaskSpec,
    count_solutions,
    exact_accuracy,
    format_maze,
    format_sudoku,
    get_task,
    load_puzzles,
    parse_maze,
    parse_sudoku,
    per_puzzle_correct,
    read_official_dataset,
    solve_maze,
    solve_sudoku,
    token_accuracy,
    write_official_dataset,
)
from trm_export.tasks.base import family_split
from trm_export.tasks.maze import shortest_paths
from trm_export.tasks.sudoku import is_valid_solution, solved_by_singles

MAZE_SIDE = 9


# ----------------------------------------------------------------------------------------
# Independent checkers
# ----------------------------------------------------------------------------------------
def _grid_from_tokens(tokens: np.ndarray) -> list[list[int]]:
    """Sudoku tokens -> 9x9 digit lists, 0 for blank (token = digit + 1)."""
    return [[int(tokens[r * 9 + c]) - 1 for c in range(9)] for r in range(9)]


def _candidates(grid: list[list[int]], r: int, c: int) -> set[int]:
    used = set(grid[r]) | {grid[i][c] for i in range(9)}
    br, bc = 3 * (r // 3), 3 * (c // 3)
    used |= {grid[br + i][bc + j] for i in range(3) for j in range(3)}
    return set(range(1, 10)) - used


def _count_sudoku_solutions(grid: list[list[int]], limit: int = 2) -> int:
    """Plain recursive backtracking on the emptiest-choice cell; counts up to ``limit``."""
    best = None
    for r in range(9):
        for c in range(9):
            if grid[r][c] == 0:
                cands = _candidates(grid, r, c)
                if best is None or len(cands) < len(best[2]):
                    best = (r, c, cands)
    if best is None:
        return 1
    r, c, cands = best
    total = 0
    for d in sorted(cands):
        grid[r][c] = d
        total += _count_sudoku_solutions(grid, limit - total)
        grid[r][c] = 0
        if total >= limit:
            break
    return total


def _is_complete_valid_grid(grid: list[list[int]]) -> bool:
    full = set(range(1, 10))
    rows = all(set(row) == full for row in grid)
    cols = all({grid[r][c] for r in range(9)} == full for c in range(9))
    boxes = all(
        {grid[br + i][bc + j] for i in range(3) for j in range(3)} == full for br in (0, 3, 6) for bc in (0, 3, 6)
    )
    return rows and cols and boxes


def _solved_by_singles(grid: list[list[int]]) -> bool:
    """Naked + hidden singles with plain sets, repeated until nothing changes."""
    grid = [row[:] for row in grid]
    units = [[(r, c) for c in range(9)] for r in range(9)]
    units += [[(r, c) for r in range(9)] for c in range(9)]
    units += [[(br + i, bc + j) for i in range(3) for j in range(3)] for br in (0, 3, 6) for bc in (0, 3, 6)]
    changed = True
    while changed:
        changed = False
        for r in range(9):
            for c in range(9):
                if grid[r][c] == 0:
                    cands = _candidates(grid, r, c)
                    if len(cands) == 1:
                        grid[r][c] = cands.pop()
                        changed = True
        for unit in units:
            for d in range(1, 10):
                if any(grid[r][c] == d for r, c in unit):
                    continue
                spots = [(r, c) for r, c in unit if grid[r][c] == 0 and d in _candidates(grid, r, c)]
                if len(spots) == 1:
                    grid[spots[0][0]][spots[0][1]] = d
                    changed = True
    return all(all(row) for row in grid)


def _check_sudoku(inputs: np.ndarray, labels: np.ndarray) -> None:
    puzzle, solution = _grid_from_tokens(inputs), _grid_from_tokens(labels)
    assert _is_complete_valid_grid(solution)
    for r in range(9):
        for c in range(9):
            if puzzle[r][c]:
                assert puzzle[r][c] == solution[r][c], "label disagrees with a given"
    assert _count_sudoku_solutions(puzzle) == 1, "puzzle is not uniquely solvable"


def _check_maze(inputs: np.ndarray, labels: np.ndarray, side: int) -> int:
    """Independent BFS check of a maze label; returns the path length in moves."""
    inp = format_maze(inputs, side).split("\n")
    lab = format_maze(labels, side).split("\n")
    cells = {(r, c): inp[r][c] for r in range(side) for c in range(side)}
    (start,) = [p for p, ch in cells.items() if ch == "S"]
    (goal,) = [p for p, ch in cells.items() if ch == "G"]
    assert "o" not in "".join(inp), "inputs must not show the path"
    for r in range(side):
        for c in range(side):
            a, b = inp[r][c], lab[r][c]
            assert a == b or (a == " " and b == "o"), f"label changes ({r},{c}) from {a!r} to {b!r}"

    def open_nbrs(p: tuple[int, int]) -> list[tuple[int, int]]:
        r, c = p
        out = []
        for q in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if q in cells and cells[q] != "#":
                out.append(q)
        return out

    dist = {start: 0}
    count = {start: 1}
    queue = deque([start])
    while queue:
        p = queue.popleft()
        for q in open_nbrs(p):
            if q not in dist:
                dist[q] = dist[p] + 1
                count[q] = count[p]
                queue.append(q)
            elif dist[q] == dist[p] + 1:
                count[q] += count[p]
    assert goal in dist, "goal unreachable"
    assert count[goal] == 1, f"{count[goal]} shortest paths, label not unique"
    path = {(r, c) for r in range(side) for c in range(side) if lab[r][c] == "o"}
    assert len(path) == dist[goal] - 1
    # Walk the 'o' cells from S: each step must be the single unvisited path neighbour.
    cur, prev, steps = start, None, 0
    while cur != goal:
        nxt = [q for q in open_nbrs(cur) if q != prev and (q in path or q == goal)]
        assert len(nxt) == 1, f"path branches or breaks at {cur}"
        prev, cur = cur, nxt[0]
        steps += 1
    assert steps == dist[goal], "labelled path is not a shortest path"
    return steps


# ----------------------------------------------------------------------------------------
# Fixtures (generation is shared across tests to keep the file fast)
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sudoku() -> SudokuTask:
    task = get_task("sudoku")
    assert isinstance(task, SudokuTask)
    return task


@pytest.fixture(scope="module")
def maze() -> MazeTask:
    task = get_task("maze", size=MAZE_SIDE)
    assert isinstance(task, MazeTask)
    return task


@pytest.fixture(scope="module")
def sudoku_batch(sudoku: SudokuTask) -> TaskData:
    return sudoku.generate(60, seed=7)


@pytest.fixture(scope="module")
def maze_batch(maze: MazeTask) -> TaskData:
    return maze.generate(200, seed=7)


# ----------------------------------------------------------------------------------------
# Registry and spec
# ----------------------------------------------------------------------------------------
def test_get_task_names_and_errors() -> None:
    assert set(TASK_NAMES) == {"sudoku", "maze"}
    assert get_task("maze", size=11).spec.seq_len == 121
    with pytest.raises(ValueError, match="sudoku.*maze|valid tasks"):
        get_task("chess")
    with pytest.raises(ValueError, match="size"):
        get_task("maze")
    with pytest.raises(ValueError, match="size"):
        get_task("maze", size=3)
    with pytest.raises(ValueError):
        get_task("sudoku", size=9)


def test_specs_match_official_encoding(sudoku: SudokuTask, maze: MazeTask) -> None:
    s = sudoku.spec
    assert (s.name, s.seq_len, s.vocab_size, s.pad_id, s.blank_id, s.ignore_label_id, s.side) == (
        "sudoku",
        81,
        11,
        0,
        1,
        None,
        9,
    )
    m = maze.spec
    assert (m.seq_len, m.vocab_size, m.blank_id, m.side, m.num_puzzle_identifiers) == (81, 6, None, 9, 1)
    meta = s.dataset_json(total_groups=1000)
    assert meta == {
        "pad_id": 0,
        "ignore_label_id": None,
        "blank_identifier_id": 0,
        "vocab_size": 11,
        "seq_len": 81,
        "num_puzzle_identifiers": 1,
        "total_groups": 1000,
        "mean_puzzle_examples": 1.0,
        "total_puzzles": 1000,
        "sets": ["all"],
    }
    json.dumps(meta)  # must be JSON-serialisable as is
    with pytest.raises(AttributeError):
        s.seq_len = 5  # type: ignore[misc]


# ----------------------------------------------------------------------------------------
# Sudoku generation
# ----------------------------------------------------------------------------------------
def test_sudoku_arrays_and_token_ranges(sudoku_batch: TaskData) -> None:
    d = sudoku_batch
    assert d.inputs.shape == d.labels.shape == (60, 81)
    assert d.inputs.dtype == d.labels.dtype == d.puzzle_ids.dtype == np.int32
    assert (d.puzzle_ids == 0).all()
    assert d.inputs.min() >= 1 and d.inputs.max() <= 10
    assert d.labels.min() >= 2 and d.labels.max() <= 10  # labels never contain a blank
    blanks = d.meta["blanks"]
    assert ((d.inputs == 1).sum(axis=1) == blanks).all()
    assert blanks.min() >= 30 and blanks.max() <= 55
    assert blanks.max() - blanks.min() >= 10, "default difficulty should spread blank counts"


def test_sudoku_labels_are_unique_solutions(sudoku_batch: TaskData) -> None:
    for i in range(0, 60, 3):
        _check_sudoku(sudoku_batch.inputs[i], sudoku_batch.labels[i])


def test_sudoku_needs_search_flag_matches_independent_propagation(sudoku: SudokuTask) -> None:
    data = sudoku.generate(30, seed=11, min_blanks=52, max_blanks=60)
    flags = data.meta["needs_search"]
    assert flags.any() and not flags.all(), "expected a mix of easy and hard puzzles"
    for inp, flag in zip(data.inputs, flags, strict=True):
        assert flag == (not _solved_by_singles(_grid_from_tokens(inp)))


def test_sudoku_difficulty_filters(sudoku: SudokuTask) -> None:
    hard = sudoku.generate(8, seed=3, needs_search=True)
    assert hard.meta["needs_search"].all()
    narrow = sudoku.generate(8, seed=3, min_blanks=40, max_blanks=41)
    assert set(narrow.meta["blanks"].tolist()) <= {40, 41}
    with pytest.raises(ValueError, match="min_blanks"):
        sudoku.generate(2, seed=0, min_blanks=50, max_blanks=40)
    with pytest.raises(ValueError, match="unknown sudoku difficulty"):
        sudoku.generate(2, seed=0, blanks=40)


def test_sudoku_determinism(sudoku: SudokuTask, sudoku_batch: TaskData) -> None:
    again = sudoku.generate(60, seed=7)
    np.testing.assert_array_equal(again.inputs, sudoku_batch.inputs)
    np.testing.assert_array_equal(again.labels, sudoku_batch.labels)
    np.testing.assert_array_equal(again.meta["blanks"], sudoku_batch.meta["blanks"])
    prefix = sudoku.generate(10, seed=7)
    np.testing.assert_array_equal(prefix.inputs, sudoku_batch.inputs[:10])
    other = sudoku.generate(10, seed=8)
    assert not np.array_equal(other.inputs, prefix.inputs)
    assert len({row.tobytes() for row in sudoku_batch.inputs}) == 60


def test_sudoku_package_solver_agrees(sudoku_batch: TaskData) -> None:
    inp, lab = sudoku_batch.inputs[0], sudoku_batch.labels[0]
    assert count_solutions(inp) == 1
    np.testing.assert_array_equal(solve_sudoku(inp), lab)
    empty = np.ones(81, dtype=np.int32)
    assert count_solutions(empty, limit=2) == 2
    conflicting = lab.copy()
    conflicting[1] = conflicting[0]  # same digit twice in row 0
    assert count_solutions(conflicting) == 0 and solve_sudoku(conflicting) is None
    assert is_valid_solution(inp, lab)
    assert not is_valid_solution(inp, conflicting)
    swapped = lab.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    assert not is_valid_solution(inp, swapped)
    for tokens, flag in zip(sudoku_batch.inputs, sudoku_batch.meta["needs_search"], strict=True):
        assert solved_by_singles(tokens) == (not flag)


def test_sudoku_augment_keeps_validity(sudoku: SudokuTask, sudoku_batch: TaskData) -> None:
    rng = np.random.default_rng(0)
    aug = sudoku.augment(sudoku_batch, rng)
    assert aug.inputs.shape == sudoku_batch.inputs.shape
    assert not np.array_equal(aug.inputs, sudoku_batch.inputs)
    np.testing.assert_array_equal(aug.meta["blanks"], sudoku_batch.meta["blanks"])
    np.testing.assert_array_equal((aug.inputs == 1).sum(1), sudoku_batch.meta["blanks"])
    for i in range(0, 60, 6):
        _check_sudoku(aug.inputs[i], aug.labels[i])
        assert aug.meta["needs_search"][i] == (not _solved_by_singles(_grid_from_tokens(aug.inputs[i])))
    # The same rng state gives the same augmentation (training runs are reproducible).
    again = sudoku.augment(sudoku_batch, np.random.default_rng(0))
    np.testing.assert_array_equal(again.inputs, aug.inputs)


def test_sudoku_augment_covers_transpose_and_digit_permutation(sudoku: SudokuTask) -> None:
    base = sudoku.generate(1, seed=1)
    many = TaskData(
        inputs=np.repeat(base.inputs, 64, axis=0),
        labels=np.repeat(base.labels, 64, axis=0),
        puzzle_ids=np.zeros(64, dtype=np.int32),
    )
    aug = sudoku.augment(many, np.random.default_rng(5))
    assert len({row.tobytes() for row in aug.labels}) == 64
    first_digit = aug.labels[:, 0]
    assert len(set(first_digit.tolist())) > 3, "digits should be relabelled"


# ----------------------------------------------------------------------------------------
# Maze generation
# ----------------------------------------------------------------------------------------
def test_maze_arrays_and_token_ranges(maze_batch: TaskData) -> None:
    d = maze_batch
    assert d.inputs.shape == d.labels.shape == (200, MAZE_SIDE * MAZE_SIDE)
    assert d.inputs.dtype == np.int32 and (d.puzzle_ids == 0).all()
    assert d.inputs.min() >= 1 and d.inputs.max() <= 4  # no path marks in inputs
    assert d.labels.min() >= 1 and d.labels.max() <= 5
    assert ((d.inputs == 3).sum(1) == 1).all() and ((d.inputs == 4).sum(1) == 1).all()


def test_maze_labels_are_unique_shortest_paths(maze_batch: TaskData) -> None:
    lengths = [_check_maze(inp, lab, MAZE_SIDE) for inp, lab in zip(maze_batch.inputs, maze_batch.labels, strict=True)]
    np.testing.assert_array_equal(lengths, maze_batch.meta["path_length"])
    assert min(lengths) >= MAZE_SIDE, "paths must be non-trivial"
    assert max(lengths) >= 2 * MAZE_SIDE, "expected a spread of path lengths"
    assert len(set(lengths)) >= 8


def test_maze_has_loops_so_it_is_not_just_a_tree(maze_batch: TaskData) -> None:
    # A tree on k open cells has k-1 adjacencies; loops add more.
    extra = 0
    for inp in maze_batch.inputs[:50]:
        g = inp.reshape(MAZE_SIDE, MAZE_SIDE) != 1
        edges = (g[1:] & g[:-1]).sum() + (g[:, 1:] & g[:, :-1]).sum()
        extra += int(edges - (g.sum() - 1))
    assert extra > 0


def test_maze_determinism_and_difficulty(maze: MazeTask, maze_batch: TaskData) -> None:
    again = maze.generate(200, seed=7)
    np.testing.assert_array_equal(again.inputs, maze_batch.inputs)
    np.testing.assert_array_equal(again.labels, maze_batch.labels)
    assert not np.array_equal(maze.generate(20, seed=8).inputs, maze_batch.inputs[:20])
    long = maze.generate(20, seed=1, min_path=20, max_path=24)
    pl = long.meta["path_length"]
    assert pl.min() >= 20 and pl.max() <= 24
    perfect = maze.generate(20, seed=1, loop_fraction=0.0)
    for inp, lab in zip(perfect.inputs, perfect.labels, strict=True):
        _check_maze(inp, lab, MAZE_SIDE)
    with pytest.raises(ValueError, match="unknown maze difficulty"):
        maze.generate(2, seed=0, walls=0.3)


def test_maze_even_side_works() -> None:
    task = get_task("maze", size=10)
    data = task.generate(20, seed=0)
    for inp, lab in zip(data.inputs, data.labels, strict=True):
        _check_maze(inp, lab, 10)


def test_maze_augment_keeps_validity(maze: MazeTask, maze_batch: TaskData) -> None:
    aug = maze.augment(maze_batch, np.random.default_rng(1))
    assert not np.array_equal(aug.inputs, maze_batch.inputs)
    for inp, lab, pl in zip(aug.inputs, aug.labels, aug.meta["path_length"], strict=True):
        assert _check_maze(inp, lab, MAZE_SIDE) == pl
    # All 8 symmetries of one maze are distinct puzzles (a random layout has no symmetry).
    one = maze_batch.select(slice(0, 1))
    copies = TaskData(np.repeat(one.inputs, 200, 0), np.repeat(one.labels, 200, 0), np.zeros(200, np.int32))
    seen = {row.tobytes() for row in maze.augment(copies, np.random.default_rng(2)).inputs}
    assert len(seen) == 8


def test_solve_maze_reproduces_labels(maze_batch: TaskData) -> None:
    for inp, lab in zip(maze_batch.inputs[:20], maze_batch.labels[:20], strict=True):
        np.testing.assert_array_equal(solve_maze(inp), lab)
        assert shortest_paths(lab) == (int((lab == 5).sum()) + 1, 1)
    ambiguous = parse_maze(["#######", "#S    #", "# # # #", "#     #", "# # # #", "#    G#", "#######"])
    assert shortest_paths(ambiguous) == (8, 2)
    assert solve_maze(ambiguous) is None  # many shortest paths across the open grid


# ----------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------
def _keys(data: TaskData) -> set[bytes]:
    return {row.tobytes() for row in data.inputs}


def test_sudoku_splits_fixed_and_disjoint(sudoku: SudokuTask) -> None:
    held = sudoku.split("heldout")
    calib = sudoku.split("calibration")
    train = sudoku.split("train", size=300)
    assert (len(held), len(calib), len(train)) == (1000, 256, 300)
    assert not _keys(held) & _keys(calib)
    assert not _keys(held) & _keys(train)
    assert not _keys(calib) & _keys(train)
    # Stronger: no solution grid is shared either.
    held_solutions = {row.tobytes() for row in held.labels}
    assert not held_solutions & {row.tobytes() for row in train.labels}
    assert not held_solutions & {row.tobytes() for row in calib.labels}
    # Fixed: a fresh task object gives the same held-out puzzles; prefixes are stable.
    fresh = get_task("sudoku")
    np.testing.assert_array_equal(fresh.split("heldout", size=20).inputs, held.inputs[:20])
    np.testing.assert_array_equal(fresh.split("train", size=50).inputs, train.inputs[:50])
    assert sudoku.split("heldout") is held  # cached
    b = held.meta["blanks"]
    assert b.min() == 30 and b.max() == 55


def test_split_validation(sudoku: SudokuTask) -> None:
    assert SPLIT_NAMES == ("train", "calibration", "heldout")
    with pytest.raises(ValueError, match="train, calibration, heldout"):
        sudoku.split("test")
    with pytest.raises(ValueError, match="fixed size"):
        sudoku.split("heldout", size=5000)


def test_maze_splits_disjoint_up_to_symmetry(maze: MazeTask) -> None:
    held = maze.split("heldout")
    calib = maze.split("calibration")
    train = maze.split("train", size=2000)
    assert (len(held), len(calib), len(train)) == (1000, 256, 2000)
    perms = [np.rot90(np.arange(81).reshape(9, 9), k) for k in range(4)]
    perms += [p.T for p in perms]

    def layouts(data: TaskData) -> set[bytes]:
        walls = (data.inputs == 1).astype(np.uint8)
        return {min(w[p.reshape(-1)].tobytes() for p in perms) for w in walls}

    held_layouts = layouts(held)
    assert not held_layouts & layouts(train)
    assert not held_layouts & layouts(calib)
    assert not _keys(held) & _keys(train)
    for inp, lab in zip(held.inputs[:100], held.labels[:100], strict=True):
        _check_maze(inp, lab, MAZE_SIDE)


def test_short_maze_train_split_keeps_train_families(maze: MazeTask) -> None:
    """A curriculum's short mazes come from train layouts only, and evaluation splits refuse difficulty."""
    held = maze.split("heldout")
    short = maze.split("train", size=300, min_path=2, max_path=6)
    assert short.meta["path_length"].min() >= 2 and short.meta["path_length"].max() <= 6
    assert held.meta["path_length"].min() >= MAZE_SIDE
    walls = {w.tobytes() for w in (held.inputs == 1).astype(np.uint8)}
    perms = [np.rot90(np.arange(81).reshape(9, 9), k) for k in range(4)]
    perms += [p.T for p in perms]
    for w in (short.inputs == 1).astype(np.uint8):
        assert not {w[p.reshape(-1)].tobytes() for p in perms} & walls
    for inp, lab in zip(short.inputs[:50], short.labels[:50], strict=True):
        _check_maze(inp, lab, MAZE_SIDE)
    with pytest.raises(ValueError, match="fixed difficulty"):
        maze.split("heldout", min_path=2)


def test_family_split_is_stable() -> None:
    # Pinned values: changing the hash would silently reshuffle every split.
    assert [family_split(bytes([i])) for i in range(8)] == [
        "train",
        "train",
        "heldout",
        "train",
        "train",
        "train",
        "train",
        "calibration",
    ]
    counts = {name: 0 for name in SPLIT_NAMES}
    for i in range(4000):
        counts[family_split(i.to_bytes(4, "little"))] += 1
    assert 800 < counts["heldout"] < 1200 and 350 < counts["calibration"] < 650


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------
def test_metrics_hand_made() -> None:
    labels = np.array([[2, 3, 4], [5, 6, 7], [2, 2, 2], [9, 9, 9]], dtype=np.int32)
    preds = np.array([[2, 3, 4], [5, 6, 0], [3, 3, 3], [9, 9, 9]], dtype=np.int32)
    np.testing.assert_array_equal(per_puzzle_correct(preds, labels), [True, False, False, True])
    assert exact_accuracy(preds, labels) == pytest.approx(0.5)
    assert token_accuracy(preds, labels) == pytest.approx((3 + 2 + 0 + 3) / 12)
    assert exact_accuracy(labels, labels) == 1.0 and token_accuracy(labels, labels) == 1.0


def test_metrics_ignore_label_matches_official_definition() -> None:
    ign = -100
    labels = np.array([[2, ign, ign], [5, 6, ign], [ign, ign, ign]], dtype=np.int64)
    preds = np.array([[2, 9, 9], [5, 0, 1], [1, 1, 1]], dtype=np.int64)
    np.testing.assert_array_equal(per_puzzle_correct(preds, labels, ign), [True, False, True])
    # The all-ignored row is excluded from the averages, as in the official loss head.
    assert exact_accuracy(preds, labels, ign) == pytest.approx(0.5)
    assert token_accuracy(preds, labels, ign) == pytest.approx((1.0 + 0.5) / 2)
    with pytest.raises(ValueError, match="no puzzle"):
        exact_accuracy(preds[2:], labels[2:], ign)


def test_metrics_reject_bad_shapes() -> None:
    labels = np.zeros((2, 3), dtype=np.int32)
    with pytest.raises(ValueError, match="shape"):
        exact_accuracy(np.zeros((2, 4), dtype=np.int32), labels)
    with pytest.raises(ValueError, match="argmax"):
        token_accuracy(np.zeros((2, 3, 5), dtype=np.float32), labels)
    with pytest.raises(ValueError, match="integer"):
        exact_accuracy(np.zeros((2, 3), dtype=np.float32), labels)


# ----------------------------------------------------------------------------------------
# Text formats and files
# ----------------------------------------------------------------------------------------
PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"


def test_parse_and_format_sudoku() -> None:
    tokens = parse_sudoku(PUZZLE)
    assert tokens.dtype == np.int32 and tokens[0] == 6 and tokens[2] == 1
    assert format_sudoku(tokens) == PUZZLE
    np.testing.assert_array_equal(parse_sudoku(PUZZLE.replace(".", "0") + "\n"), tokens)
    assert format_sudoku(tokens, blank="0") == PUZZLE.replace(".", "0")
    solution = solve_sudoku(tokens)
    assert solution is not None
    _check_sudoku(tokens, solution)


def test_parse_sudoku_errors_are_specific() -> None:
    with pytest.raises(ValueError, match="81 characters, found 80"):
        parse_sudoku(PUZZLE[:-1])
    bad = PUZZLE[:10] + "x" + PUZZLE[11:]
    with pytest.raises(ValueError, match=r"'x' at position 10"):
        parse_sudoku(bad)
    with pytest.raises(ValueError, match="not in 1..10"):
        format_sudoku(np.zeros(81, dtype=np.int32))


MAZE_TEXT = "#######\n#S    #\n##### #\n#     #\n# #####\n#    G#\n#######"


def test_parse_and_format_maze() -> None:
    tokens = parse_maze(MAZE_TEXT)
    assert tokens.shape == (49,) and tokens[8] == 3 and tokens[0] == 1
    assert format_maze(tokens) == MAZE_TEXT
    np.testing.assert_array_equal(parse_maze(MAZE_TEXT.split("\n")), tokens)
    np.testing.assert_array_equal(parse_maze("\n" + MAZE_TEXT + "\n\n"), tokens)
    label = solve_maze(tokens)
    assert label is not None
    assert format_maze(label).count("o") == 15
    np.testing.assert_array_equal(parse_maze(format_maze(label)), label)


def test_parse_maze_errors_are_specific() -> None:
    with pytest.raises(ValueError, match="row 2 has 6 characters, expected 7"):
        parse_maze(MAZE_TEXT.replace("#S    #", "#S    "))
    with pytest.raises(ValueError, match=r"'x' at row 4, column 2"):
        parse_maze(MAZE_TEXT.replace("#     #", "#x    #"))
    with pytest.raises(ValueError, match="one S and one G"):
        parse_maze(MAZE_TEXT.replace("G", " "))


def test_load_sudoku_txt(tmp_path: Path, sudoku: SudokuTask) -> None:
    path = tmp_path / "puzzles.txt"
    path.write_text(f"# comment line\n\n{PUZZLE}\n  {PUZZLE.replace('.', '0')}  \n")
    tokens = load_puzzles(path, "sudoku")
    assert tokens.shape == (2, 81) and tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens[0], tokens[1])
    np.testing.assert_array_equal(load_puzzles(path, sudoku), tokens)
    path.write_text(f"{PUZZLE}\n\n{PUZZLE[:-3]}\n")
    with pytest.raises(ValueError, match=r"puzzles\.txt:3: .*found 78"):
        load_puzzles(path, "sudoku")


def test_load_maze_txt_keeps_wall_lines(tmp_path: Path, maze: MazeTask, maze_batch: TaskData) -> None:
    path = tmp_path / "mazes.txt"
    grids = [format_maze(row, MAZE_SIDE) for row in maze_batch.inputs[:3]]
    path.write_text("\n\n".join(grids) + "\n")
    tokens = load_puzzles(path, maze)
    np.testing.assert_array_equal(tokens, maze_batch.inputs[:3])
    np.testing.assert_array_equal(load_puzzles(path, "maze"), tokens)  # side read from the file
    broken = grids[1].split("\n")
    broken[4] = broken[4][:-1] + "?"
    path.write_text(grids[0] + "\n\n" + "\n".join(broken) + "\n")
    # Maze 2 starts on line 11; its row 5 is line 15.
    with pytest.raises(ValueError, match=r"mazes\.txt:15: bad character '\?'"):
        load_puzzles(path, maze)
    path.write_text(grids[0] + "\n")
    with pytest.raises(ValueError, match=r"mazes\.txt:1: maze has side 9, expected 11"):
        load_puzzles(path, get_task("maze", size=11))


def test_load_npy(tmp_path: Path, sudoku_batch: TaskData, maze_batch: TaskData) -> None:
    path = tmp_path / "inputs.npy"
    np.save(path, sudoku_batch.inputs.astype(np.int64))
    loaded = load_puzzles(path, "sudoku")
    assert loaded.dtype == np.int32
    np.testing.assert_array_equal(loaded, sudoku_batch.inputs)
    np.save(path, maze_batch.inputs.reshape(-1, MAZE_SIDE, MAZE_SIDE))
    np.testing.assert_array_equal(load_puzzles(path, "maze"), maze_batch.inputs)
    np.save(path, np.zeros((3, 80), dtype=np.int32))
    with pytest.raises(ValueError, match=r"inputs\.npy.*\(3, 80\)"):
        load_puzzles(path, "sudoku")
    np.save(path, np.full((2, 81), 11, dtype=np.int32))
    with pytest.raises(ValueError, match=r"inputs\.npy: token 11 at puzzle 0"):
        load_puzzles(path, "sudoku")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_puzzles(tmp_path / "x.csv", "sudoku")


def test_official_dataset_round_trip(tmp_path: Path, sudoku: SudokuTask, sudoku_batch: TaskData) -> None:
    folder = write_official_dataset(sudoku_batch, sudoku.spec, tmp_path, split="test")
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["total_groups"] == 60 and meta["seq_len"] == 81 and meta["sets"] == ["all"]
    np.testing.assert_array_equal(np.load(folder / "all__puzzle_indices.npy"), np.arange(61))
    data, meta2 = read_official_dataset(tmp_path, "test")
    assert meta2 == meta
    np.testing.assert_array_equal(data.inputs, sudoku_batch.inputs)
    np.testing.assert_array_equal(data.labels, sudoku_batch.labels)


# ----------------------------------------------------------------------------------------
# Containers and packaging
# ----------------------------------------------------------------------------------------
def test_taskdata_is_read_only_and_validated(sudoku_batch: TaskData) -> None:
    with pytest.raises(ValueError):
        sudoku_batch.inputs[0, 0] = 5
    hard = sudoku_batch.select(sudoku_batch.meta["needs_search"])
    assert len(hard) == int(sudoku_batch.meta["needs_search"].sum())
    with pytest.raises(ValueError, match="shape"):
        TaskData(np.zeros((2, 81), np.int32), np.zeros((2, 80), np.int32), np.zeros(2, np.int32))
    with pytest.raises(ValueError, match="meta"):
        TaskData(np.zeros((2, 3), np.int32), np.zeros((2, 3), np.int32), np.zeros(2, np.int32), {"x": [1]})
    assert isinstance(TaskSpec("t", 4, 3, 2).dataset_json(), dict)
    empty = SudokuTask().generate(0, seed=0)
    assert empty.inputs.shape == (0, 81) and empty.meta["blanks"].shape == (0,)


def test_tasks_import_without_torch() -> None:
    code = "import sys, trm_export.tasks; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
