"""What one fixed run tells about every loop setting: per puzzle and step, the answer's correctness and the Q values.

A puzzle's state after step t depends neither on when it would have halted nor on its batch neighbours (every op
of the step graph is per sample). So one fixed run of T steps holds the answer of every fixed budget k <= T (the
answer after step k) and of adaptive halting capped at any k <= T (the answer at the first step whose Q values
say halt, as `Solver` decides it). It records too whether each puzzle's answer changed at each step, so it holds
the halting policies that do not trust the Q head (`stable:K`, `q+stable:K`, see runtime.solver) at any cap.
Evaluating every setting costs one run instead of one per setting.

Accuracies come with their sample size and a 95% Wilson interval: a figure from 100 puzzles moves by a point per
puzzle, and a decision between two settings should not rest on less than that.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from trm_export.runtime.solver import HaltingPolicy, Solver, halt_now, parse_halting
from trm_export.runtime.validate import validate_puzzles
from trm_export.tasks.official import IGNORE_LABEL


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a proportion (Wilson score; sound at 0% and 100%, unlike the normal one)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At 0% or 100% the bound equals p analytically; in floats it can land a hair on the wrong side of it.
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


@dataclass(frozen=True)
class LoopOutcome:
    """Accuracy of one loop setting on a puzzle set."""

    mode: str  # fixed | adaptive (the Q head) | stable:K | q+stable:K (the halting policy's name)
    budget: int  # fixed: the steps; otherwise: the cap
    puzzles: int
    solved: int | None  # puzzles answered exactly right (None without labels)
    token_accuracy: float | None
    mean_steps: float

    @property
    def exact_accuracy(self) -> float | None:
        return None if self.solved is None else self.solved / self.puzzles

    @property
    def interval(self) -> tuple[float, float] | None:
        return None if self.solved is None else wilson_interval(self.solved, self.puzzles)


@dataclass
class Trajectory:
    """A fixed run of `steps` steps: per step t (0-based: after step t + 1) and puzzle."""

    steps: int
    halting_rule: str
    q_halt: np.ndarray  # [T, N] float32
    q_continue: np.ndarray  # [T, N] float32
    exact: np.ndarray | None  # [T, N] bool: answer exactly right (None without labels)
    token: np.ndarray | None  # [T, N] float32: share of tokens right
    final_predictions: np.ndarray  # [N, seq_len] after the last step
    changed: np.ndarray | None = None  # [T, N] bool: the answer differs from the previous step's (step 1: True)

    @property
    def puzzles(self) -> int:
        return self.q_halt.shape[1]

    def halting_steps(self, cap: int, min_steps: int = 1, policy: str | HaltingPolicy = "q") -> np.ndarray:
        """[N] the step (1-based) at which adaptive halting by `policy` ("q", "stable:K", "q+stable:K", as
        `Solver.solve(halting=...)`) stops each puzzle, capped at `cap`."""
        self._check_budget(cap)
        rule = parse_halting(policy)
        halt = np.zeros((cap, self.puzzles), bool)
        if rule.q:
            halt |= halt_now(self.q_halt[:cap], self.q_continue[:cap], self.halting_rule)
        if rule.stable:
            if self.changed is None:
                raise ValueError("this trajectory has no record of answer changes: it cannot tell stable halting")
            unchanged = np.zeros(self.puzzles, np.int64)  # steps in a row with the same answer, as Solver counts
            for t in range(cap):
                unchanged = np.where(self.changed[t], 0, unchanged + 1)
                halt[t] |= unchanged >= rule.stable
        halt[: min_steps - 1] = False
        halt[cap - 1] = True
        return halt.argmax(axis=0) + 1

    def fixed(self, budget: int) -> LoopOutcome:
        self._check_budget(budget)
        return self._outcome("fixed", budget, np.full(self.puzzles, budget))

    def adaptive(self, cap: int, min_steps: int = 1, policy: str | HaltingPolicy = "q") -> LoopOutcome:
        """Adaptive halting by `policy` capped at `cap`; its mode is "adaptive" for the Q head, else the policy."""
        rule = parse_halting(policy)
        mode = "adaptive" if rule == HaltingPolicy() else rule.name
        return self._outcome(mode, cap, self.halting_steps(cap, min_steps, rule))

    def _outcome(self, mode: str, budget: int, steps: np.ndarray) -> LoopOutcome:
        cols = np.arange(self.puzzles)
        solved = None if self.exact is None else int(self.exact[steps - 1, cols].sum())
        token = None if self.token is None else float(self.token[steps - 1, cols].mean())
        return LoopOutcome(mode, budget, self.puzzles, solved, token, float(steps.mean()))

    def _check_budget(self, budget: int) -> None:
        if not 1 <= budget <= self.steps:
            raise ValueError(f"a run of {self.steps} steps tells budgets 1..{self.steps}, not {budget}")

    @staticmethod
    def concat(parts: list[Trajectory]) -> Trajectory:
        """One trajectory of the puzzles of `parts`, in order (the same steps and rule)."""
        first = parts[0]

        def cat(name: str, axis: int) -> np.ndarray | None:
            arrays = [getattr(p, name) for p in parts]
            return None if any(a is None for a in arrays) else np.concatenate(arrays, axis=axis)

        return Trajectory(first.steps, first.halting_rule, cat("q_halt", 1), cat("q_continue", 1), cat("exact", 1),
                          cat("token", 1), cat("final_predictions", 0), cat("changed", 1))


def run_trajectory(solver: Solver, tokens: np.ndarray, puzzle_ids: np.ndarray | None, labels: np.ndarray | None,
                   steps: int, on_state: Callable[[int, np.ndarray, Solver], None] | None = None,
                   on_chunk: Callable[[int], None] | None = None) -> Trajectory:
    """Run every puzzle `steps` fixed steps through `solver`, in chunks of its batch, and record the trajectory.

    `on_state(t, puzzles, solver)` is called after each step with the indices of the puzzles in slots [0, n)
    (the backend's state and logits can be read there); `on_chunk(done)` after each chunk, for progress.
    """
    tokens, ids = validate_puzzles(tokens, puzzle_ids, solver.task)
    n = len(tokens)
    if labels is not None and np.shape(labels) != tokens.shape:
        raise ValueError(f"labels shape {np.shape(labels)} does not match the puzzles' {tokens.shape}")
    q = np.zeros((2, steps, n), np.float32)
    exact = None if labels is None else np.zeros((steps, n), bool)
    token = None if labels is None else np.zeros((steps, n), np.float32)
    final = np.zeros((n, solver.task.seq_len), np.int64)
    changed = np.zeros((steps, n), bool)
    capacity = solver.backend.capacity
    for start in range(0, n, capacity):
        idx = np.arange(start, min(start + capacity, n))
        previous = np.zeros((len(idx), solver.task.seq_len), np.int64)  # the chunk's answers after the last step

        def on_step(slots: np.ndarray, steps_done: np.ndarray, qh: np.ndarray, qc: np.ndarray, idx=idx,
                    previous=previous) -> None:
            t = int(steps_done[0]) - 1  # fixed mode, one chunk per solve: every slot at the same step, in order
            which = idx[slots]
            q[0, t, which], q[1, t, which] = qh, qc
            answers = solver.backend.logits(np.arange(len(slots))).argmax(-1)
            changed[t, which] = True if t == 0 else (answers != previous[slots]).any(axis=1)
            previous[slots] = answers
            if labels is not None:
                expected = labels[which]
                scored = expected != IGNORE_LABEL  # a dataset folder's unscored positions (ARC's padding)
                right = ((answers == expected) & scored).sum(axis=1)
                exact[t, which] = right == scored.sum(axis=1)
                token[t, which] = right / np.maximum(scored.sum(axis=1), 1)
            if on_state is not None:
                on_state(t, which, solver)

        result = solver.solve(tokens[idx], ids[idx], mode="fixed", max_steps=steps, on_step=on_step)
        final[idx] = result.predictions
        if on_chunk is not None:
            on_chunk(int(idx[-1]) + 1)
    return Trajectory(steps, solver.manifest.loop.halting_rule, q[0], q[1], exact, token, final, changed)


@contextlib.contextmanager
def puzzle_progress(name: str, total: int, enabled: bool = True, start: int = 0) -> Iterator[Callable[[int], None]]:
    """A progress bar with ETA over the puzzles of a run; yields `tick(done)` (puzzles done so far, absolute), the
    `on_chunk` of `run_trajectory`. Silent when disabled or where tqdm is not installed (a device's runtime)."""
    if not enabled or importlib.util.find_spec("tqdm") is None:
        yield lambda done: None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc=f"  {name}", unit="puzzle", leave=False)
    try:
        yield lambda done: bar.update(done - bar.n)
    finally:
        bar.close()
