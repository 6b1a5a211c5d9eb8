"""`run` marks each answer valid or invalid by the task's own rules and counts them; the checkers behind it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from trm_export.cli import main as cli
from trm_export.runtime.io import check_solutions, describe_run, format_solutions, write_solutions
from trm_export.runtime.manifest import TaskEncoding
from trm_export.runtime.solver import SolveResult
from trm_export.tasks import (
    format_sudoku,
    get_task,
    parse_maze,
    solve_maze,
    valid_maze_solutions,
    valid_sudoku_solutions,
)
from trm_export.tasks.maze import GOAL, OPEN, PATH, START, WALL

SUDOKU = TaskEncoding("sudoku", 11, 81, 0, 1, 1, 1, grid_side=9)
SUMMARY = re.compile(r"^(\d+) puzzles?: (\d+) valid solutions?, (\d+) not \((adaptive|fixed), mean \d+\.\d\d steps, "
                     r"backend (.+)\)$")


# ------------------------------------------------------------------------------------------------ Sudoku checker


@pytest.fixture(scope="module")
def sudoku():
    return get_task("sudoku").split("heldout", size=50)


def test_sudoku_checker_accepts_the_labels(sudoku):
    assert valid_sudoku_solutions(sudoku.inputs, sudoku.labels).all()
    assert get_task("sudoku").valid_solutions(sudoku.inputs, sudoku.labels).all()
    assert valid_sudoku_solutions(sudoku.inputs[0], sudoku.labels[0]).tolist() == [True]  # one puzzle, 1-D


def test_sudoku_checker_rejects_broken_answers(sudoku):
    inputs, labels = sudoku.inputs, sudoku.labels
    blanks = np.flatnonzero(inputs[0] == 1)
    swapped = labels.copy()
    a, b = blanks[0], next(j for j in blanks[1:] if labels[0, j] != labels[0, blanks[0]])
    swapped[0, [a, b]] = swapped[0, [b, a]]  # two filled-in digits swapped: some unit now repeats one
    wrong_digit = labels.copy()
    wrong_digit[1, blanks[0]] = 2 + (labels[1, blanks[0]] - 1) % 9  # one digit changed
    relabelled = labels.copy()
    relabelled[2] = np.where(labels[2] == 2, 3, np.where(labels[2] == 3, 2, labels[2]))  # a valid grid, wrong clues
    changed_clue = inputs.copy()
    clue = np.flatnonzero(inputs[3] != 1)[0]
    changed_clue[3, clue] = 2 + (inputs[3, clue] - 1) % 9  # the label no longer agrees with this clue
    unfinished = labels.copy()
    unfinished[4, blanks[0]] = 1  # a blank left
    padded = labels.copy()
    padded[5, 0] = 0
    assert valid_sudoku_solutions(inputs, inputs).sum() == 0  # the puzzles themselves are not solutions
    assert valid_sudoku_solutions(inputs, swapped).tolist()[:1] == [False]
    assert valid_sudoku_solutions(inputs, wrong_digit).tolist()[:2] == [True, False]
    assert valid_sudoku_solutions(inputs, relabelled).tolist()[:3] == [True, True, False]
    assert valid_sudoku_solutions(changed_clue, labels).tolist()[:4] == [True, True, True, False]
    assert not valid_sudoku_solutions(inputs, unfinished)[4] and not valid_sudoku_solutions(inputs, padded)[5]
    with pytest.raises(ValueError, match="same shape"):
        valid_sudoku_solutions(inputs, labels[:3])


# ------------------------------------------------------------------------------------------------- maze checker

# Two routes from S to G: 8 moves down the left (the shortest, unique) or 12 moves round the right.
TWO_ROUTES = ["#######",
              "#S    #",
              "# ### #",
              "#   # #",
              "### # #",
              "#G    #",
              "#######"]
LONG_WAY = [(1, 2), (1, 3), (1, 4), (1, 5), (2, 5), (3, 5), (4, 5), (5, 5), (5, 4), (5, 3), (5, 2)]


@pytest.fixture(scope="module", params=[9, 12])
def mazes(request):
    return request.param, get_task("maze", size=request.param).split("heldout", size=30)


def test_maze_checker_accepts_the_labels(mazes):
    side, data = mazes
    assert valid_maze_solutions(data.inputs, data.labels).all()
    assert get_task("maze", size=side).valid_solutions(data.inputs, data.labels).all()
    assert not valid_maze_solutions(data.inputs, data.inputs).any()  # no path drawn


def _path_cells(label: np.ndarray) -> np.ndarray:
    return np.flatnonzero(label == PATH)


def test_maze_checker_rejects_broken_paths(mazes):
    side, data = mazes
    inputs, labels = data.inputs, data.labels
    broken = labels.copy()
    cells = _path_cells(labels[0])
    broken[0, cells[len(cells) // 2]] = OPEN  # a gap in the middle
    goal = int(np.flatnonzero(labels[1] == GOAL)[0])
    near_goal = [c for c in _path_cells(labels[1]) if abs(c - goal) in (1, side)]
    broken[1, near_goal] = OPEN  # stops one cell short of G
    beside_wall = next(int(c) for c in _path_cells(labels[2]) for d in (1, -1, side, -side)
                       if inputs[2, c + d] == WALL)  # path cells are inside the border: c + d is on the grid
    wall = next(beside_wall + d for d in (1, -1, side, -side) if inputs[2, beside_wall + d] == WALL)
    broken[2, wall] = PATH  # through a wall
    stray = next(int(c) for c in np.flatnonzero(labels[3] == OPEN)
                 if not any(0 <= c + d < side * side and labels[3, c + d] in (PATH, START, GOAL)
                            for d in (1, -1, side, -side)))
    broken[3, stray] = PATH  # an 'o' off the path
    broken[4, np.flatnonzero(labels[4] == GOAL)] = OPEN  # G removed
    broken[5, np.flatnonzero(labels[5] == WALL)[side + 1]] = OPEN  # a wall removed
    broken[6, 0] = 0  # a pad token
    got = valid_maze_solutions(inputs, broken)
    assert got.tolist()[:8] == [False] * 7 + [True]


def test_maze_checker_wants_a_shortest_path_and_takes_any_of_several():
    maze = parse_maze(TWO_ROUTES)
    best = solve_maze(maze)
    long_way = maze.copy()
    long_way[[r * 7 + c for r, c in LONG_WAY]] = PATH
    assert valid_maze_solutions(maze, best).tolist() == [True]
    assert valid_maze_solutions(maze, long_way).tolist() == [False]  # a path, not a shortest one
    open_room = parse_maze(["#######", "#S    #", "#     #", "#     #", "#     #", "#    G#", "#######"])
    down_then_right = open_room.copy()
    down_then_right[[2 * 7 + 1, 3 * 7 + 1, 4 * 7 + 1, 5 * 7 + 1, 5 * 7 + 2, 5 * 7 + 3, 5 * 7 + 4]] = PATH
    right_then_down = open_room.copy()
    right_then_down[[1 * 7 + 2, 1 * 7 + 3, 1 * 7 + 4, 1 * 7 + 5, 2 * 7 + 5, 3 * 7 + 5, 4 * 7 + 5]] = PATH
    both_and_a_ring = right_then_down.copy()
    both_and_a_ring[[3 * 7 + 2, 3 * 7 + 3, 4 * 7 + 2, 4 * 7 + 3]] = PATH  # a 2x2 block: each cell touches two
    assert valid_maze_solutions(np.stack([open_room] * 3), np.stack([down_then_right, right_then_down,
                                                                      both_and_a_ring])).tolist() == [True, True,
                                                                                                       False]


# -------------------------------------------------------------------------------------------- text and .npz output


def test_solution_lines_have_a_valid_column(sudoku):
    result = SolveResult(sudoku.labels[:3].astype(np.int64), np.array([2, 5, 16]), np.zeros(3), np.zeros(3))
    broken = result.predictions.copy()
    broken[1, 0] = 0
    valid = check_solutions(sudoku.inputs[:3], np.stack([broken[0], broken[1], broken[2]]), SUDOKU)
    assert valid.tolist() == [True, False, True]
    lines = format_solutions(result, SUDOKU, valid).splitlines()
    assert [line.split("\t") for line in lines] == [
        [format_sudoku(sudoku.labels[0]), "2", "valid"], [format_sudoku(sudoku.labels[1]), "5", "invalid"],
        [format_sudoku(sudoku.labels[2]), "16", "valid"]]
    with pytest.raises(ValueError, match="do not match"):
        format_solutions(result, SUDOKU, valid[:2])
    assert describe_run(result, valid, "adaptive", "onnxruntime (CPUExecutionProvider)") == (
        "3 puzzles: 2 valid solutions, 1 not (adaptive, mean 7.67 steps, backend onnxruntime (CPUExecutionProvider))")


def test_maze_lines_are_one_line_per_grid_with_the_valid_column():
    data = get_task("maze", size=9).split("heldout", size=2)
    encoding = TaskEncoding("maze", 6, 81, 0, None, 1, 1, grid_side=9)
    result = SolveResult(data.labels.astype(np.int64), np.array([4, 4]), np.zeros(2), np.zeros(2))
    valid = check_solutions(data.inputs, result.predictions, encoding)
    lines = format_solutions(result, encoding, valid).splitlines()
    assert len(lines) == 2 and all(line.endswith("\t4\tvalid") for line in lines)
    rows = lines[0].split("\t")[0].split("|")
    assert len(rows) == 9 and parse_maze(rows).tolist() == data.labels[0].tolist()


def test_a_custom_task_is_not_checked(tmp_path):
    encoding = TaskEncoding(None, 7, 4, 0, None, 1, 1)
    result = SolveResult(np.array([[1, 2, 3, 6]]), np.array([3]), np.zeros(1), np.zeros(1))
    assert check_solutions(np.zeros((1, 4), int), result.predictions, encoding) is None
    assert format_solutions(result, encoding, None) == "1 2 3 6\t3\t-\n"
    assert describe_run(result, None, "fixed", "x") == (
        "1 puzzle: answers not checked (no checker for this model's task) (fixed, mean 3.00 steps, backend x)")
    write_solutions(result, encoding, tmp_path / "a.npz", None)
    assert "valid" not in np.load(tmp_path / "a.npz").files


# --------------------------------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def puzzle_file(sudoku_bundle, tmp_path_factory):
    path = tmp_path_factory.mktemp("run-output") / "puzzles.txt"
    puzzles = get_task("sudoku").split("heldout", size=6).inputs
    path.write_text("\n".join(format_sudoku(p) for p in puzzles) + "\n")
    return sudoku_bundle / "bundle", path, puzzles


def _valid_of_lines(lines: list[str], puzzles: np.ndarray) -> list[bool]:
    predictions = np.array([[".123456789".find(ch) + 1 if ch != "?" else 0 for ch in line.split("\t")[0]]
                            for line in lines])
    return valid_sudoku_solutions(puzzles, predictions).tolist()


def test_run_prints_solutions_on_stdout_and_the_count_on_stderr(puzzle_file):
    bundle, path, puzzles = puzzle_file
    result = CliRunner().invoke(cli, ["run", str(bundle), "--input", str(path), "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 6 and all(len(line.split("\t")) == 3 for line in lines)
    marks = [line.split("\t")[2] for line in lines]
    assert set(marks) <= {"valid", "invalid"}
    assert marks == ["valid" if v else "invalid" for v in _valid_of_lines(lines, puzzles)]
    summary = SUMMARY.match(result.stderr.strip().splitlines()[-1])
    assert summary, result.stderr
    assert summary.group(1, 2, 3, 4) == ("6", str(marks.count("valid")), str(marks.count("invalid")), "adaptive")
    assert summary.group(5) == "onnxruntime (CPUExecutionProvider), fused graph"  # the cpu bundle has two forms


def test_run_with_output_puts_the_count_on_the_summary_line(puzzle_file, tmp_path):
    bundle, path, _ = puzzle_file
    out = tmp_path / "s.txt"
    result = CliRunner().invoke(cli, ["run", str(bundle), "-i", str(path), "-o", str(out), "--mode", "fixed"])
    assert result.exit_code == 0, result.output
    line = result.stdout.strip()
    assert line.endswith(f" -> {out}") and SUMMARY.match(line[:-len(f" -> {out}")]), line
    assert SUMMARY.match(line[:-len(f" -> {out}")]).group(4) == "fixed"
    assert all(len(row.split("\t")) == 3 for row in out.read_text().splitlines())
    npz = tmp_path / "s.npz"
    result = CliRunner().invoke(cli, ["run", str(bundle), "-i", str(path), "-o", str(npz), "--skip-selfcheck"])
    assert result.exit_code == 0, result.output
    saved = np.load(npz)
    assert saved["valid"].dtype == bool
    assert saved["valid"].tolist() == valid_sudoku_solutions(puzzle_file[2], saved["predictions"]).tolist()


def test_backend_choice_and_the_fallback_note(puzzle_file, monkeypatch):
    bundle, path, _ = puzzle_file
    result = CliRunner().invoke(cli, ["run", str(bundle), "-i", str(path), "--backend", "tensorrt"])
    assert result.exit_code != 0 and "no TensorRT engine" in result.output
    result = CliRunner().invoke(cli, ["verify", str(bundle), "--backend", "onnxruntime"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["verify", str(bundle), "--backend", "tensorrt"])
    assert result.exit_code != 0 and "no TensorRT engine" in result.output

    import trm_export.runtime.solver as solver_module

    note = "no usable TensorRT engine here: ran ONNX Runtime"  # what Solver.backend_note says on a fall back
    monkeypatch.setattr(solver_module, "select_backend", lambda *args: ("onnxruntime", note))
    result = CliRunner().invoke(cli, ["run", str(bundle), "-i", str(path), "--skip-selfcheck"])
    assert result.exit_code == 0, result.output
    assert note in result.stderr and note not in result.stdout


def test_the_run_page_lists_every_run_option():
    readme = (Path(__file__).resolve().parents[1] / "docs" / "run.md").read_text()
    section = readme.split("<!-- run-options -->")[1]
    documented = set(re.findall(r"^\| (?:`-[a-z]`, )?`(--[a-z-]+)", section, flags=re.M))
    command = cli.commands["run"]
    options = {max(p.opts, key=len) for p in command.params if p.opts[0].startswith("-")}
    assert documented == options | {"--help"}
