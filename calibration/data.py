"""Calibration data that a recursive model really sees: step-graph inputs recorded at every step of the loop.

Generic post-training quantization calibrates on one forward pass. A TRM applies the same step graph 16 times
per puzzle (and the network inside it H_cycles x (L_cycles + 1) times per step), and the recurrent state it
sees at step 12 has other ranges than at step 1: scales fitted to step 1 clip or waste the int8 grid later, and
the error compounds through the loop. So the FP32 bundle is run through the runtime (`Solver`, fixed steps) on
real puzzles and the step graph's inputs (x, z_H, z_L) are recorded at every step, sampled evenly across steps
so memory stays bounded (`RecordOptions.max_samples`). Recording only step 1 (`steps=(1,)`) is the generic
baseline, kept for comparison (benchmarks/calibration_recursion.py).

Readers follow ONNX Runtime's protocol: anything with `get_next() -> dict | None` feeds its calibrators.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from trm_export.errors import InputError, TrmExportError
from trm_export.runtime.io import task_for_encoding
from trm_export.runtime.manifest import Manifest, TaskEncoding, read_manifest
from trm_export.runtime.validate import validate_puzzles
from trm_export.tasks.official import folder_sample


class CalibrationError(TrmExportError):
    """Calibration or quantization cannot proceed as asked."""


class CalibrationDataReader(Protocol):
    """ONNX Runtime's calibration-data protocol: one feed dict per call, None when exhausted."""

    def get_next(self) -> dict[str, np.ndarray] | None: ...


@dataclass(frozen=True)
class PuzzleSet:
    """Real puzzles for calibration or evaluation, with where they came from (for the manifest)."""

    tokens: np.ndarray  # [N, seq_len] int64
    puzzle_ids: np.ndarray  # [N] int64
    labels: np.ndarray | None  # [N, seq_len] or None (a user's file carries no answers)
    source: str

    def __len__(self) -> int:
        return len(self.tokens)

    def head(self, n: int | None) -> PuzzleSet:
        """The first `n` puzzles (all when n is None): splits are fixed, so a prefix is reproducible."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise InputError(f"need at least one puzzle, asked for {n}")
        return PuzzleSet(self.tokens[:n], self.puzzle_ids[:n], None if self.labels is None else self.labels[:n],
                         f"{self.source}, first {n}")


def task_split(manifest: Manifest, split: str, size: int | None = None) -> PuzzleSet:
    """A fixed split of the bundle's task: "calibration" (calibration data) or "heldout" (evaluation).

    The two are disjoint by construction (tasks.base), so calibrating on one and measuring on the other never
    measures on what was calibrated on.
    """
    task = task_for_encoding(manifest.task)
    if task is None:
        raise CalibrationError(f"this bundle's task ({manifest.task.name or 'a custom task'}) has no built-in "
                               f"{split} split; give puzzles from a file (--calib FILE: .npy tokens "
                               f"[N, {manifest.task.seq_len}])")
    if size is not None and split in task.split_sizes:
        size = min(size, task.split_sizes[split])  # a prefix of the fixed split, never more than it has
    data = task.split(split, size)
    return PuzzleSet(data.inputs.astype(np.int64), data.puzzle_ids.astype(np.int64), data.labels.astype(np.int64),
                     f"{task.spec.name} {split} split ({len(data)} puzzles)")


def folder_split(folder: str | Path, role: str, task: TaskEncoding, size: int | None = None) -> PuzzleSet:
    """`size` puzzles of an official dataset folder (`--data`): role "calibration" from train/, "heldout" from
    test/, spread evenly over the split, with labels. Errors name the file that does not fit `task`."""
    data, source = folder_sample(folder, role, task.seq_len, task.vocab_size, task.num_puzzle_identifiers, size)
    return PuzzleSet(data.inputs.astype(np.int64), data.puzzle_ids.astype(np.int64), data.labels.astype(np.int64),
                     source)


def load_calibration_puzzles(path: str | Path, manifest: Manifest) -> PuzzleSet:
    """A user's calibration puzzles (`--calib`): .npy tokens [N, seq_len], or the task's text format.

    Errors name the file and say what does not fit: no puzzles, wrong length, tokens outside the vocabulary.
    """
    from trm_export.runtime.io import read_puzzles

    path = Path(path)
    tokens = read_puzzles(path, manifest.task)  # InputError for a missing / unreadable file
    try:
        tokens, ids = validate_puzzles(tokens, None, manifest.task)
    except InputError as exc:
        raise InputError(f"{path}: {exc}; calibration data must be puzzles of this model's task "
                         f"([N, {manifest.task.seq_len}] tokens in [0, {manifest.task.vocab_size}))") from None
    return PuzzleSet(tokens, ids, None, f"{path.name} ({len(tokens)} puzzles)")


@dataclass(frozen=True)
class RecordOptions:
    """How step inputs are recorded.

    steps: which steps' inputs to keep (1 = the first step); None = every step 1..halt_max_steps.
    max_samples: at most this many (puzzle, step) samples, spread evenly over the steps (each sample is three
    [S, D] float32 arrays); None = keep everything (puzzles x steps).
    """

    steps: tuple[int, ...] | None = None
    max_samples: int | None = 512
    seed: int = 0
    batch_size: int = 64
    threads: int | None = None


@dataclass(frozen=True)
class StepSamples:
    """Recorded inputs of the step graph: row i is (x, z_H, z_L) of puzzle `puzzles[i]` before step `steps[i]`."""

    x: np.ndarray  # [n, S, D] float32
    z_H: np.ndarray
    z_L: np.ndarray
    steps: np.ndarray  # [n] int, 1-based
    puzzles: np.ndarray  # [n] int, index into the recorded PuzzleSet
    available: int  # (puzzle, step) pairs before sampling
    source: str

    def __len__(self) -> int:
        return len(self.steps)

    def step_counts(self) -> dict[int, int]:
        values, counts = np.unique(self.steps, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}

    def reader(self, batch_size: int = 8, start: int = 0, stop: int | None = None) -> StepInputReader:
        return StepInputReader(self, batch_size, start, stop)

    def describe(self) -> dict:
        return {"samples": len(self), "available": self.available, "steps": sorted(self.step_counts()),
                "puzzles": int(len(np.unique(self.puzzles))), "source": self.source}


class StepInputReader:
    """Feeds recorded step inputs to an ONNX Runtime calibrator in batches of `batch_size` samples."""

    def __init__(self, samples: StepSamples, batch_size: int = 8, start: int = 0, stop: int | None = None):
        if batch_size < 1:
            raise CalibrationError(f"batch_size must be >= 1, got {batch_size}")
        self.samples = samples
        self.batch_size = batch_size
        self.start = start
        self.stop = len(samples) if stop is None else min(stop, len(samples))
        self._next = start

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self.stop:
            return None
        sl = slice(self._next, min(self._next + self.batch_size, self.stop))
        self._next = sl.stop
        return {"x": self.samples.x[sl], "z_H": self.samples.z_H[sl], "z_L": self.samples.z_L[sl]}

    def rewind(self) -> None:
        self._next = self.start

    def __len__(self) -> int:
        return -(-(self.stop - self.start) // self.batch_size)


def first_step_inputs(bundle: str | Path, puzzles: PuzzleSet, options: RecordOptions = RecordOptions()
                      ) -> StepSamples:
    """Step 1's inputs only (embedding + initial state): what generic one-pass calibration sees. The baseline."""
    return record_step_inputs(bundle, puzzles, dataclasses.replace(options, steps=(1,)))


def _plan(n_puzzles: int, steps: list[int], max_samples: int | None, seed: int) -> dict[int, np.ndarray]:
    """Puzzle indices to keep per step: the sample budget split evenly over the steps, random puzzles each."""
    total = n_puzzles * len(steps)
    budget = total if max_samples is None else min(max_samples, total)
    if budget < 1:
        raise CalibrationError(f"max_samples must be >= 1, got {max_samples}")
    rng = np.random.default_rng(seed)
    per_step, extra = divmod(budget, len(steps))
    plan = {}
    for i, step in enumerate(steps):
        k = per_step + (1 if i < extra else 0)
        plan[step] = np.sort(rng.choice(n_puzzles, size=k, replace=False)) if k < n_puzzles else \
            np.arange(n_puzzles)
    return plan


def record_step_inputs(bundle: str | Path, puzzles: PuzzleSet, options: RecordOptions = RecordOptions()
                       ) -> StepSamples:
    """Run the bundle's FP32 graph through the runtime loop and record the step graph's inputs at each step.

    The loop is the runtime's own (`Solver`, fixed steps), so the recorded states are exactly what the
    deployed loop feeds the graph; step k's inputs are the states after step k-1 (step 1: the embedding and
    the initial state).
    """
    from trm_export.runtime.solver import Solver

    if len(puzzles) == 0:
        raise InputError("no calibration puzzles given (empty input)")
    manifest = read_manifest(bundle)
    tokens, ids = validate_puzzles(puzzles.tokens, puzzles.puzzle_ids, manifest.task)
    steps = sorted(set(options.steps)) if options.steps is not None else \
        list(range(1, manifest.loop.halt_max_steps + 1))
    if not steps or steps[0] < 1:
        raise CalibrationError(f"steps must be 1-based step numbers, got {options.steps}")
    n = len(tokens)
    plan = _plan(n, steps, options.max_samples, options.seed)
    rows: dict[int, dict[int, int]] = {}  # step -> puzzle -> row
    count = 0
    for step in steps:
        rows[step] = {}
        for p in plan[step]:
            rows[step][int(p)] = count
            count += 1

    solver = Solver(bundle, variant="fp32", provider="cpu", batch_size=min(options.batch_size, n),
                    threads=options.threads)
    s, d = solver.embedder.state_shape
    x_out = np.zeros((count, s, d), np.float32)
    zh_out = np.zeros((count, s, d), np.float32)
    zl_out = np.zeros((count, s, d), np.float32)
    step_of = np.zeros(count, np.int64)
    puzzle_of = np.zeros(count, np.int64)

    def keep(step: int, chunk_puzzles: np.ndarray, x: np.ndarray, z_H: np.ndarray, z_L: np.ndarray) -> None:
        wanted = rows.get(step)
        if not wanted:
            return
        for local, p in enumerate(chunk_puzzles):
            row = wanted.get(int(p))
            if row is not None:
                x_out[row], zh_out[row], zl_out[row] = x[local], z_H[local], z_L[local]
                step_of[row], puzzle_of[row] = step, p

    last = steps[-1]
    chunk = solver.backend.capacity
    for start in range(0, n, chunk):
        idx = np.arange(start, min(start + chunk, n))
        x = solver.embedder(tokens[idx], ids[idx])
        z_H, z_L = solver.embedder.initial_state(len(idx))
        keep(1, idx, x, z_H, z_L)
        if last == 1:
            continue

        def on_step(slot_puzzles: np.ndarray, steps_done: np.ndarray, q_halt: np.ndarray, q_cont: np.ndarray,
                    idx=idx, x=x) -> None:
            # Fixed mode, one chunk per call: every slot is at the same step and slots hold puzzles in order.
            t = int(steps_done[0])
            z_H, z_L = solver.backend.state(len(slot_puzzles))
            keep(t + 1, idx[slot_puzzles], x[slot_puzzles], z_H, z_L)

        solver.solve(tokens[idx], ids[idx], mode="fixed", max_steps=last - 1, on_step=on_step)
    return StepSamples(x_out, zh_out, zl_out, step_of, puzzle_of, n * len(steps),
                       f"{puzzles.source}; steps {steps[0]}..{last}" if len(steps) > 1 else
                       f"{puzzles.source}; step {last} only")
