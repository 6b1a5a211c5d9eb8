"""ARC with a bundle: every trained view of each test input solved, the answers voted as the official evaluator
votes them (numpy only, so a device can do it).

A view is one (augmented) puzzle name of the checkpoint's identifiers.json: its augmentation is applied to the test
input, which is encoded at offset (0, 0) with that name's identifier. Each answer is cropped and un-augmented
(tasks.arc), and pooled with the other views' answers to the same test input. The ranking follows the official
TRM `evaluators/arc.py`: confidence sigmoid(q_halt) in float64; per distinct answer the number of votes and the mean
confidence; ranked by (votes, mean confidence), descending, equal keys in the order the answers first arrived;
pass@K: the true output among the top K; attempts: the top 2, the first repeated when there is only one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trm_export.errors import BundleError, InputError
from trm_export.runtime.manifest import Manifest, member
from trm_export.tasks.arc import ArcTask, Augmentation, crop, encode_grid, read_identifiers, views

__all__ = ["ArcResult", "Ballot", "Candidate", "bundle_views", "solve_arc"]

CHUNK_PUZZLES = 4096  # views encoded and solved at a time: 900 tokens each, memory stays bounded


@dataclass(frozen=True)
class Candidate:
    """One distinct answer to a test input: its votes and mean confidence."""

    grid: np.ndarray  # colours, uint8 [rows, cols]
    votes: int
    confidence: float


def _key(grid: np.ndarray) -> bytes:
    return bytes(grid.shape) + np.ascontiguousarray(grid, np.uint8).tobytes()  # sides <= 30: one byte each


@dataclass
class Ballot:
    """Votes per (task, test input). Not safe to fill from several threads at once: give each its own."""

    _polls: dict[tuple[str, bytes], dict[bytes, list]] = field(default_factory=dict)

    def add(self, task_id: str, test_input: np.ndarray, answer: np.ndarray, q_halt_logit: float) -> None:
        """One view's answer (already cropped and un-augmented) and the q_halt logit it halted with."""
        confidence = 1.0 / (1.0 + np.exp(-np.float64(q_halt_logit)))  # sigmoid in float64, as the official
        poll = self._polls.setdefault((task_id, _key(test_input)), {})
        entry = poll.setdefault(_key(answer), [answer, 0, 0.0])
        entry[1] += 1
        entry[2] += float(confidence)

    def ranked(self, task_id: str, test_input: np.ndarray) -> list[Candidate]:
        """Distinct answers by (votes, mean confidence), descending; a tie keeps arrival order (a stable sort)."""
        poll = self._polls.get((task_id, _key(test_input)), {})
        candidates = [Candidate(grid, votes, total / votes) for grid, votes, total in poll.values()]
        return sorted(candidates, key=lambda c: (c.votes, c.confidence), reverse=True)


@dataclass
class ArcResult:
    """Ranked answers per task and test input, and how many views voted."""

    ranked: dict[str, list[list[Candidate]]]  # task id -> per test input, candidates best first
    views: dict[str, int]  # task id -> views solved per test input
    mean_steps: float

    def submission(self, attempts: int = 2) -> dict[str, list[dict[str, list[list[int]]]]]:
        """The ARC Prize format: {task_id: [{"attempt_1": grid, "attempt_2": grid} per test input]}."""
        out = {}
        for task_id, per_input in self.ranked.items():
            entries = []
            for candidates in per_input:
                grids = [c.grid for c in candidates[:attempts]]
                grids += [grids[0]] * (attempts - len(grids))
                entries.append({f"attempt_{i + 1}": g.tolist() for i, g in enumerate(grids)})
            out[task_id] = entries
        return out

    def score(self, solutions: dict[str, list[np.ndarray]], ks: tuple[int, ...] = (1, 2)) -> dict[int, float]:
        """pass@K: per task the fraction of its test inputs whose true output is among the top K, averaged over the
        tasks (the official evaluator's number)."""
        totals = dict.fromkeys(ks, 0.0)
        for task_id, per_input in self.ranked.items():
            truth = solutions[task_id]
            for k in ks:
                hits = sum(any(_key(c.grid) == _key(t) for c in candidates[:k])
                           for candidates, t in zip(per_input, truth))  # noqa: B905 - same length (read_solutions)
                totals[k] += hits / len(per_input)
        return {k: totals[k] / max(len(self.ranked), 1) for k in ks}


def bundle_views(bundle: Path, manifest: Manifest) -> dict[str, list[tuple[int, Augmentation]]]:
    """task id -> its views, from the bundle's copy of identifiers.json (checksummed with the bundle)."""
    rel = manifest.task.identifiers
    if rel is None:
        raise InputError(f"{bundle}: this bundle has no puzzle names (identifiers.json), so the views of an ARC "
                         "task cannot be found: export it with --data DIR, the official ARC dataset folder it was "
                         "trained on")
    try:
        names = read_identifiers(member(bundle, rel))
    except InputError as exc:
        raise BundleError(f"{bundle}: {exc}") from None
    if len(names) != manifest.task.num_puzzle_identifiers:
        raise BundleError(f"{bundle}: {rel} names {len(names)} puzzles, the puzzle table has "
                          f"{manifest.task.num_puzzle_identifiers} rows; re-export the bundle")
    return views(names)


def solve_arc(solver, tasks: dict[str, ArcTask], views: dict[str, list[tuple[int, Augmentation]]],
              on_progress: Callable[[int, int], None] | None = None, **solve_options) -> ArcResult:
    """Solve every view of every test input of `tasks` with `solver` (a runtime Solver of an ARC bundle) and vote.

    `views`: task id -> (puzzle identifier, augmentation), from the bundle's identifiers (tasks.arc.views). A task
    with no view is refused before anything runs: the checkpoint was not trained on it. `solve_options` go to
    `Solver.solve` (mode, max_steps, halting, ...); the mode defaults to "fixed" at the trained step limit, the
    official evaluation's loop (mode="adaptive" halts on the Q head: other answers reach the vote).
    `on_progress(done, total)` after each chunk of views."""
    solve_options.setdefault("mode", "fixed")
    missing = [t for t in tasks if not views.get(t)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(f"{len(missing)} task(s) have no puzzle identifier in this bundle: {shown}. The checkpoint "
                         "was trained with the evaluation tasks' demonstrations under their own identifiers; a task "
                         "it never saw cannot be answered (export with the dataset folder the model was trained on)")
    jobs = [(task_id, i, identifier, aug) for task_id, task in tasks.items()
            for i in range(len(task.test_inputs)) for identifier, aug in views[task_id]]
    ballot, steps = Ballot(), 0
    for start in range(0, len(jobs), CHUNK_PUZZLES):
        chunk = jobs[start:start + CHUNK_PUZZLES]
        tokens = np.stack([encode_grid(aug.apply(tasks[t].test_inputs[i])) for t, i, _, aug in chunk])
        ids = np.array([identifier for _, _, identifier, _ in chunk], np.int64)
        result = solver.solve(tokens.astype(np.int64), ids, **solve_options)
        steps += int(result.steps_used.sum())
        for (task_id, i, _, aug), answer, q in zip(chunk, result.predictions, result.q_halt):  # noqa: B905
            ballot.add(task_id, tasks[task_id].test_inputs[i], aug.invert(crop(answer)), float(q))
        if on_progress is not None:
            on_progress(start + len(chunk), len(jobs))
    ranked = {t: [ballot.ranked(t, x) for x in task.test_inputs] for t, task in tasks.items()}
    return ArcResult(ranked, {t: len(views[t]) for t in tasks}, steps / max(len(jobs), 1))
