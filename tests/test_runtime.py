"""Runtime: the torch-free loop. Exactness of batched adaptive halting with refill, modes, validation, CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trm_export.cli import main as cli
from trm_export.errors import InputError
from trm_export.export.checkpoint import load_checkpoint
from trm_export.export.reference import run_reference
from trm_export.runtime.solver import Solver
from trm_export.tasks import format_sudoku, get_task


@pytest.fixture(scope="module")
def bundle(sudoku_bundle):
    return sudoku_bundle


@pytest.fixture(scope="module")
def puzzles():
    return get_task("sudoku").split("heldout", size=40).inputs


@pytest.fixture(scope="module")
def reference(bundle, puzzles):
    model = load_checkpoint(bundle / "ckpt").model
    return run_reference(model, puzzles, mode="adaptive", max_steps=8)


def test_runtime_imports_and_runs_without_torch_or_onnx(bundle):
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "onnx", "yaml", "click"):
                    raise ImportError("blocked for this test: " + name)
        sys.meta_path.insert(0, Block())
        from trm_export.runtime import Solver
        from trm_export.runtime.selfcheck import verify_bundle
        from trm_export.tasks import get_task
        solver = Solver({str(bundle / 'bundle')!r})
        result = solver.solve(get_task("sudoku").split("heldout", size=3).inputs)
        assert bool(verify_bundle({str(bundle / 'bundle')!r}))
        assert not any(m.split(".")[0] in ("torch", "onnx") for m in sys.modules)
        print("steps", list(result.steps_used))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("steps [")


@pytest.mark.rounding
def test_fixed_mode_equals_the_reference(bundle, puzzles, reference):
    result = Solver(bundle / "bundle", batch_size=16).solve(puzzles, mode="fixed")
    assert np.array_equal(result.predictions, reference.step_predictions[-1])
    assert (result.steps_used == 8).all()


@pytest.mark.rounding
def test_adaptive_mode_equals_the_reference_halting(bundle, puzzles, reference):
    result = Solver(bundle / "bundle", batch_size=16).solve(puzzles, mode="adaptive")
    assert len(set(reference.steps_used.tolist())) > 2  # halting really varies between puzzles
    assert np.array_equal(result.steps_used, reference.steps_used)
    assert np.array_equal(result.predictions, reference.predictions)
    np.testing.assert_allclose(result.q_halt, reference.q_halt[reference.steps_used - 1, np.arange(len(puzzles))],
                               atol=1e-4)


@pytest.mark.rounding
def test_result_does_not_depend_on_batch_neighbours(bundle, puzzles):
    alone = [Solver(bundle / "bundle", batch_size=1).solve(p[None]) for p in puzzles[:12]]
    batched = Solver(bundle / "bundle", batch_size=5).solve(puzzles[:12])
    for i, single in enumerate(alone):
        assert batched.steps_used[i] == single.steps_used[0]
        assert np.array_equal(batched.predictions[i], single.predictions[0])
        assert batched.q_halt[i] == single.q_halt[0]  # bitwise


@pytest.mark.rounding
def test_refill_and_wait_for_batch_give_the_same_answers(bundle, puzzles):
    solver = Solver(bundle / "bundle", batch_size=8)
    refill = solver.solve(puzzles, mode="adaptive", refill=True)
    waves = solver.solve(puzzles, mode="adaptive", refill=False)
    assert np.array_equal(refill.predictions, waves.predictions)
    assert np.array_equal(refill.steps_used, waves.steps_used)


@pytest.mark.rounding
def test_step_budget_beyond_training_and_min_steps(bundle, puzzles):
    solver = Solver(bundle / "bundle", batch_size=8)
    model = load_checkpoint(bundle / "ckpt").model
    ref = run_reference(model, puzzles[:10], mode="adaptive", max_steps=12, min_steps=3)
    result = solver.solve(puzzles[:10], mode="adaptive", max_steps=12, min_steps=3)
    assert np.array_equal(result.steps_used, ref.steps_used) and result.steps_used.min() >= 3
    fixed = solver.solve(puzzles[:10], mode="fixed", max_steps=12)
    assert (fixed.steps_used == 12).all()
    assert np.array_equal(fixed.predictions, run_reference(model, puzzles[:10], max_steps=12).predictions)


@pytest.mark.parametrize(("puzzle", "ids", "message"), [
    (np.ones((2, 80), np.int64), None, "each puzzle must have 81 tokens, got 80"),
    (np.full((1, 81), 11), None, "token 11 at puzzle 0, position 0 is outside the vocabulary"),
    (np.ones((1, 81), np.float32), None, "puzzle tokens must be integers, got dtype float32"),
    (np.ones((0, 81), np.int64), None, "no puzzles given"),
    (np.ones((2, 81), np.int64), np.array([0, 1]), "unknown puzzle id 1: the model knows ids 0..0"),
    (np.ones((2, 81), np.int64), np.array([0]), "need one puzzle id per puzzle"),
    (np.ones((2, 3, 81), np.int64), None, "puzzles must be"),
])
def test_bad_input_is_a_clear_error(bundle, puzzle, ids, message):
    with pytest.raises(InputError, match=message):
        Solver(bundle / "bundle").solve(puzzle, ids)


def test_bad_loop_settings(bundle, puzzles):
    solver = Solver(bundle / "bundle")
    with pytest.raises(InputError, match="mode must be one of"):
        solver.solve(puzzles[:1], mode="greedy")
    with pytest.raises(InputError, match=r"need 1 <= min_steps \(5\) <= max_steps \(3\)"):
        solver.solve(puzzles[:1], max_steps=3, min_steps=5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tokens=st.lists(st.lists(st.integers(-3, 14), min_size=79, max_size=83), min_size=0, max_size=3))
def test_validator_accepts_exactly_the_valid_puzzles(bundle, tokens):
    solver = Solver(bundle / "bundle", verify=False)
    arr = np.array(tokens, dtype=np.int64) if tokens and len({len(t) for t in tokens}) == 1 else None
    valid = arr is not None and arr.shape[1] == 81 and arr.min() >= 0 and arr.max() < 11
    if valid:
        from trm_export.runtime.validate import validate_puzzles

        out, ids = validate_puzzles(arr, None, solver.task)
        assert out.shape == arr.shape and (ids == 0).all()
    else:
        with pytest.raises(InputError):
            from trm_export.runtime.validate import validate_puzzles

            validate_puzzles(arr if arr is not None else np.array(tokens, dtype=object), None, solver.task)


@pytest.mark.rounding
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 9), order=st.permutations(list(range(10))), refill=st.booleans(),
       min_steps=st.integers(1, 3))
def test_loop_answers_do_not_depend_on_batch_order_or_refill(bundle, puzzles, reference, batch, order, refill,
                                                             min_steps):
    solver = Solver(bundle / "bundle", batch_size=batch, verify=False)
    chosen = np.array(order)
    result = solver.solve(puzzles[chosen], mode="adaptive", refill=refill, min_steps=min_steps)
    expected_steps = reference.steps_used[chosen]
    if min_steps == 1:
        assert np.array_equal(result.steps_used, expected_steps)
        assert np.array_equal(result.predictions, reference.predictions[chosen])
    assert (result.steps_used >= min_steps).all()
    again = Solver(bundle / "bundle", batch_size=1, verify=False).solve(puzzles[chosen], mode="adaptive",
                                                                         min_steps=min_steps)
    assert np.array_equal(result.steps_used, again.steps_used)
    assert np.array_equal(result.predictions, again.predictions)


def test_run_cli_reads_sudoku_text_and_writes_solutions(bundle, puzzles, reference, tmp_path):
    src = tmp_path / "puzzles.txt"
    src.write_text("# three puzzles\n" + "\n".join(format_sudoku(p).replace(".", "0") for p in puzzles[:3]) + "\n")
    out = tmp_path / "solutions.txt"
    result = CliRunner().invoke(cli, ["run", str(bundle / "bundle"), "--input", str(src), "--output", str(out)])
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    assert len(lines) == 3
    for line, pred, steps in zip(lines, reference.predictions[:3], reference.steps_used[:3], strict=True):
        solution, used, mark = line.split("\t")
        assert solution == "".join("?.123456789"[t] for t in pred) and int(used) == steps
        assert mark in ("valid", "invalid")
    again = CliRunner().invoke(cli, ["run", str(bundle / "bundle"), "--input", str(src), "--output", str(out)])
    assert again.exit_code != 0 and "already exists; pass --force" in again.output
    bad = tmp_path / "bad.txt"
    bad.write_text("12345\n")
    result = CliRunner().invoke(cli, ["run", str(bundle / "bundle"), "--input", str(bad)])
    assert result.exit_code != 0 and "bad.txt" in result.output


def test_sudoku_solutions_are_written_as_they_are_read():
    from trm_export.runtime.io import format_solutions
    from trm_export.runtime.manifest import TaskEncoding
    from trm_export.runtime.solver import SolveResult

    tokens = get_task("sudoku").split("heldout", size=2).labels
    encoding = TaskEncoding("sudoku", 11, 81, 0, 1, 1, 1, grid_side=9)
    result = SolveResult(tokens.astype(np.int64), np.array([3, 16]), np.zeros(2), np.zeros(2))
    lines = format_solutions(result, encoding, np.array([True, False])).splitlines()
    assert [line.split("\t")[0] for line in lines] == [format_sudoku(t) for t in tokens]
    assert [line.split("\t")[1] for line in lines] == ["3", "16"]
    assert [line.split("\t")[2] for line in lines] == ["valid", "invalid"]
    assert [line.split("\t")[2] for line in format_solutions(result, encoding).splitlines()] == ["-", "-"]


def test_run_cli_npy_in_npz_out(bundle, puzzles, reference, tmp_path):
    src = tmp_path / "puzzles.npy"
    np.save(src, puzzles[:5])
    out = tmp_path / "answers.npz"
    result = CliRunner().invoke(cli, ["run", str(bundle / "bundle"), "-i", str(src), "-o", str(out), "--mode", "fixed",
                                      "--max-steps", "8"])
    assert result.exit_code == 0, result.output
    saved = np.load(out)
    assert np.array_equal(saved["predictions"], reference.step_predictions[-1][:5])
    assert (saved["steps_used"] == 8).all() and not list(tmp_path.glob(".answers.npz.*"))
    assert saved["valid"].dtype == bool and saved["valid"].shape == (5,)


def test_a_containers_cpu_quota_caps_the_threads(bundle, tmp_path, monkeypatch):
    """#39: ONNX Runtime's default takes every core the machine has, whatever a pod's CPU limit: the backends take
    the cgroup's quota (v2 cpu.max, v1 cfs) when no thread count is given, and nothing else changes without one."""
    import onnxruntime

    from trm_export.runtime import cpus

    v2 = tmp_path / "v2"
    v2.mkdir()
    monkeypatch.setattr(cpus, "affinity_cpus", lambda: 64)
    for text, quota, threads in (("150000 100000\n", 1.5, 2), ("max 100000\n", None, None),
                                 ("6400000 100000\n", 64.0, None), ("junk\n", None, None)):
        (v2 / "cpu.max").write_text(text)
        assert (cpus.cpu_quota(v2), cpus.quota_threads(v2)) == (quota, threads), text
    v1 = tmp_path / "v1" / "cpu,cpuacct"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus.quota_threads(v1.parent) == 2
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus.quota_threads(v1.parent) is None

    seen = []
    real = onnxruntime.InferenceSession

    def session(graph, options, providers=None):
        seen.append(options.intra_op_num_threads)
        return real(graph, options, providers=providers)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    (v2 / "cpu.max").write_text("150000 100000\n")
    monkeypatch.setattr(cpus, "CGROUP_ROOT", v2)
    monkeypatch.setattr("trm_export.runtime.backend.quota_threads", lambda: cpus.quota_threads(v2))
    Solver(bundle / "bundle", batch_size=1, verify=False)
    Solver(bundle / "bundle", batch_size=1, verify=False, threads=3)
    assert seen[-2:] == [2, 3]  # the quota's 2 (of 1.5 CPUs), and an explicit count as given
