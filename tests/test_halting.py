"""Halting policies that do not trust the Q head (issue #17): `stable:K` and `q+stable:K`, in the runtime loop, in
the report's one-run trajectory, and at the command line."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from trm_export.cli import main as cli
from trm_export.errors import InputError
from trm_export.report.latency import StepTiming
from trm_export.report.measure import settings_of
from trm_export.report.trajectory import Trajectory, run_trajectory
from trm_export.runtime.manifest import read_manifest
from trm_export.runtime.solver import HaltingPolicy, Solver, halt_now, parse_halting
from trm_export.tasks import format_sudoku, get_task, per_puzzle_correct, token_accuracy

POLICIES = ("q", "stable:1", "stable:2", "stable:3", "q+stable:1", "q+stable:2")


@pytest.fixture(scope="module")
def data():
    return get_task("sudoku").split("heldout", size=24)


@pytest.fixture(scope="module")
def solver(sudoku_bundle):
    return Solver(sudoku_bundle / "bundle", batch_size=8, threads=1, verify=False)


@pytest.fixture(scope="module")
def fixed_run(solver, data):
    """Every puzzle's answer [T=16, N, seq_len] and Q values [T, N] (halt, continue) after every step of a fixed
    run (batch 1: nothing shared), from which each policy's halting step follows by its definition."""
    one = Solver(solver.bundle, batch_size=1, threads=1, verify=False)
    out = np.zeros((16, len(data.inputs), solver.task.seq_len), np.int64)
    q = np.zeros((2, 16, len(data.inputs)), np.float32)
    for i in range(len(data.inputs)):
        def on_step(slots, steps, qh, qc, i=i):
            out[steps[0] - 1, i] = one.backend.logits(np.arange(1)).argmax(-1)[0]
            q[:, steps[0] - 1, i] = qh[0], qc[0]
        one.solve(data.inputs[i:i + 1], data.puzzle_ids[i:i + 1], mode="fixed", max_steps=16, on_step=on_step)
    return out, q


@pytest.fixture(scope="module")
def answers(fixed_run):
    return fixed_run[0]


def test_parse_halting():
    assert parse_halting("q") == HaltingPolicy(True, 0) == HaltingPolicy()
    assert parse_halting("stable:3") == HaltingPolicy(False, 3)
    assert parse_halting("q+stable:2") == HaltingPolicy(True, 2)
    assert parse_halting(" stable:02 ").name == "stable:2" and parse_halting("q+stable:7").name == "q+stable:7"
    assert parse_halting(HaltingPolicy(False, 1)) == HaltingPolicy(False, 1)
    for bad in ("stable:0", "stable:x", "stable:", "stable:-1", "stable:1.5", "stable:4097", "stable:²", "Q",
                "q+", "q+q", "stable:2+q", "stable", "", "adaptive", None, 3, HaltingPolicy(False, 0)):
        with pytest.raises(InputError, match="halting|not a halting policy"):
            parse_halting(bad)


def test_solve_validates_the_policy_and_keeps_the_default(solver, data):
    for bad in ("stable:0", "stable:x"):
        for mode in ("adaptive", "fixed"):
            with pytest.raises(InputError, match="halting must be one of"):
                solver.solve(data.inputs[:2], mode=mode, halting=bad)
    before = solver.solve(data.inputs, data.puzzle_ids, max_steps=8)  # no halting argument: the trained rule
    q = solver.solve(data.inputs, data.puzzle_ids, max_steps=8, halting="q")
    for name in ("predictions", "steps_used", "q_halt", "q_continue"):
        assert np.array_equal(getattr(before, name), getattr(q, name))
    fixed = solver.solve(data.inputs, data.puzzle_ids, mode="fixed", max_steps=5, halting="stable:1")
    assert (fixed.steps_used == 5).all()  # fixed ignores the policy


def _by_definition(answers: np.ndarray, k: int, cap: int, min_steps: int) -> np.ndarray:
    """The first step t >= min_steps whose answer equals the answers after steps t-1, ..., t-k; else the cap."""
    steps = np.full(answers.shape[1], cap)
    for n in range(answers.shape[1]):
        for t in range(max(min_steps, k + 1), cap + 1):  # 1-based; answers[t - 1] is the answer after step t
            if all(np.array_equal(answers[t - 1, n], answers[t - 1 - j, n]) for j in range(1, k + 1)):
                steps[n] = t
                break
    return steps


def test_stable_halting_is_its_definition(solver, data, answers):
    seen = set()
    # Caps beyond the trained 8 steps: this random model's answers take 8-16 steps to settle for two steps.
    for k, cap, min_steps in ((1, 16, 1), (2, 16, 1), (3, 16, 1), (2, 12, 9), (1, 6, 5), (1, 2, 1)):
        result = solver.solve(data.inputs, data.puzzle_ids, max_steps=cap, min_steps=min_steps,
                              halting=f"stable:{k}")
        want = _by_definition(answers, k, cap, min_steps)
        assert np.array_equal(result.steps_used, want), (k, cap, min_steps)
        assert np.array_equal(result.predictions, answers[want - 1, np.arange(len(want))])
        seen |= set(result.steps_used.tolist())
    assert len(seen) >= 6  # the fixture's answers settle at different steps: the test tells something


def test_combined_policy_halts_when_either_says_so(solver, data, fixed_run):
    """Each policy against its definition on the recorded per-step answers and Q values, not against the solver:
    q halts at the first step whose Q values say halt (the bundle's rule), stable:2 by _by_definition, and
    q+stable:2 at whichever comes first."""
    answers, (q_halt, q_continue) = fixed_run
    says_halt = halt_now(q_halt, q_continue, solver.manifest.loop.halting_rule)  # [T, N]
    q = np.where(says_halt.any(0), says_halt.argmax(0) + 1, 16)
    stable = _by_definition(answers, 2, 16, 1)
    for policy, want in (("q", q), ("stable:2", stable), ("q+stable:2", np.minimum(q, stable))):
        got = solver.solve(data.inputs, data.puzzle_ids, max_steps=16, halting=policy).steps_used
        assert np.array_equal(got, want), policy
    both = np.minimum(q, stable)
    assert (both < q).any() and (both < stable).any()  # each halts some puzzle first: the test tells something


@pytest.mark.rounding
@pytest.mark.parametrize("policy", ["stable:2", "q+stable:2"])
def test_stable_halting_does_not_depend_on_batch_order_or_refill(sudoku_bundle, data, policy, fixed_run):
    bundle = sudoku_bundle / "bundle"
    want = Solver(bundle, batch_size=1, threads=1, verify=False).solve(data.inputs, data.puzzle_ids, max_steps=16,
                                                                       halting=policy)
    answers, (q_halt, q_continue) = fixed_run  # the reference point is the definition, not the solver itself
    by_definition = _by_definition(answers, 2, 16, 1)
    if policy.startswith("q+"):
        says_halt = halt_now(q_halt, q_continue, read_manifest(bundle).loop.halting_rule)
        by_definition = np.minimum(by_definition, np.where(says_halt.any(0), says_halt.argmax(0) + 1, 16))
    assert np.array_equal(want.steps_used, by_definition)
    assert np.array_equal(want.predictions, answers[by_definition - 1, np.arange(len(by_definition))])
    order = np.random.default_rng(0).permutation(len(data.inputs))
    for batch in (3, 32):
        for refill in (True, False):
            got = Solver(bundle, batch_size=batch, threads=1, verify=False).solve(
                data.inputs[order], data.puzzle_ids[order], max_steps=16, halting=policy, refill=refill)
            assert np.array_equal(got.steps_used, want.steps_used[order]), (batch, refill)
            assert np.array_equal(got.predictions, want.predictions[order]), (batch, refill)
            assert np.array_equal(got.q_halt, want.q_halt[order]), (batch, refill)


@pytest.mark.rounding
def test_one_fixed_run_tells_every_halting_policy(solver, data):
    """Mirror of test_report's test for fixed budgets and Q halting: each policy's halting steps and solved count
    from the trajectory must be what `Solver.solve(halting=policy)` does."""
    labels = solver.solve(data.inputs, data.puzzle_ids, mode="fixed", max_steps=8).predictions  # informative labels
    trajectory = run_trajectory(solver, data.inputs, data.puzzle_ids, labels, 16)
    assert trajectory.changed.shape == (16, len(data.inputs)) and trajectory.changed[0].all()
    for policy in POLICIES:
        for cap, min_steps in ((3, 1), (16, 1), (12, 9)):
            result = solver.solve(data.inputs, data.puzzle_ids, mode="adaptive", max_steps=cap, min_steps=min_steps,
                                  halting=policy)
            assert np.array_equal(trajectory.halting_steps(cap, min_steps, policy), result.steps_used), (policy, cap)
            outcome = trajectory.adaptive(cap, min_steps, policy)
            assert outcome.solved == int(per_puzzle_correct(result.predictions, labels).sum())
            assert outcome.token_accuracy == pytest.approx(token_accuracy(result.predictions, labels), abs=1e-6)
            assert outcome.mean_steps == pytest.approx(result.steps_used.mean())
            assert outcome.mode == ("adaptive" if policy == "q" else policy) and outcome.budget == cap
    for policy in POLICIES:  # the fixture's puzzles halt at different steps under each policy
        assert len(set(trajectory.halting_steps(16, 1, policy).tolist())) > 2, policy
    assert 0 < trajectory.adaptive(16, 1, "stable:2").solved < len(labels)  # "exact" tells something too
    # Trajectories split in parts (calibration screening) keep the record; without it, stable halting is refused.
    half = run_trajectory(solver, data.inputs[:12], data.puzzle_ids[:12], labels[:12], 16)
    rest = run_trajectory(solver, data.inputs[12:], data.puzzle_ids[12:], labels[12:], 16)
    joined = Trajectory.concat([half, rest])
    assert np.array_equal(joined.changed, trajectory.changed)
    old = Trajectory(16, trajectory.halting_rule, trajectory.q_halt, trajectory.q_continue, trajectory.exact,
                     trajectory.token, trajectory.final_predictions)
    assert np.array_equal(old.halting_steps(8), trajectory.halting_steps(8))
    with pytest.raises(ValueError, match="answer changes"):
        old.halting_steps(8, 1, "stable:2")


def test_the_report_lists_the_policies(solver, data):
    trajectory = run_trajectory(solver, data.inputs, data.puzzle_ids, data.labels, 8)
    timing = StepTiming(batch=8, samples=5, p25=1.0, p50=1.0, p75=1.0, p95=1.0)
    rows = settings_of("fp32", "fp32", "onnxruntime", trajectory, (1, 2, 8), timing, timing, 1.0)
    assert [(r.mode, r.budget) for r in rows] == [("fixed", 1), ("fixed", 2), ("fixed", 8), ("adaptive", 8),
                                                  ("stable:1", 8), ("stable:2", 8), ("q+stable:2", 8)]
    assert rows[4].mean_steps == pytest.approx(trajectory.halting_steps(8, 1, "stable:1").mean())
    short = settings_of("fp32", "fp32", "onnxruntime", trajectory, (1, 2), timing, timing, 1.0)
    assert [r.mode for r in short] == ["fixed", "fixed", "adaptive"]  # stable:1 cannot halt before a cap of 2


def test_halt_now_is_still_the_q_rule():
    assert halt_now(np.array([1.0, -1.0]), np.array([2.0, -2.0]), "q_halt>0").tolist() == [True, False]


def test_run_cli_halting(sudoku_bundle, data, tmp_path):
    src = tmp_path / "puzzles.txt"
    src.write_text("\n".join(format_sudoku(p).replace(".", "0") for p in data.inputs[:6]) + "\n")
    bundle = str(sudoku_bundle / "bundle")
    want = Solver(bundle, batch_size=4, verify=False).solve(data.inputs[:6], halting="stable:2")
    out = tmp_path / "solutions.txt"
    result = CliRunner().invoke(cli, ["run", bundle, "-i", str(src), "-o", str(out), "--halting", "stable:2",
                                      "--skip-selfcheck"])
    assert result.exit_code == 0, result.output
    assert "halting stable:2" in result.output
    assert [int(line.split("\t")[1]) for line in out.read_text().splitlines()] == want.steps_used.tolist()
    bad = CliRunner().invoke(cli, ["run", bundle, "-i", str(src), "--halting", "stable:0"])
    assert bad.exit_code != 0 and "halting must be one of" in bad.output and len(bad.output.strip().splitlines()) == 1
    fixed = CliRunner().invoke(cli, ["run", bundle, "-i", str(src), "--mode", "fixed", "--max-steps", "3",
                                     "--halting", "stable:1", "--skip-selfcheck"])
    assert fixed.exit_code == 0 and "ignored with --mode fixed" in fixed.output
    assert "--halting" in CliRunner().invoke(cli, ["run", "--help"]).output
