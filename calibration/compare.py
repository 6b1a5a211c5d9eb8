"""A reduced-precision graph against FP32, through the runtime's own loop, step by step.

A per-graph error (one forward pass) says little about a model applied 16 times per puzzle: what matters is
where the state ends up. So both graphs run the same puzzles through `Solver` (fixed steps, the official
evaluation) and the comparison reports, at each step, the drift of z_H from the FP32 loop (relative error
||z - z_fp32|| / ||z_fp32|| and cosine similarity per puzzle, averaged), and at the end the exact and token
accuracy of both, the fraction of puzzles whose answer is identical, and the Q-head agreement.

The FP32 run is recorded once (`Fp32Run`) and reused by every comparison against it (mixed precision runs
many); per-step states are kept only for the first `drift_puzzles` puzzles, to bound memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from trm_export.calibration.data import PuzzleSet
from trm_export.report.trajectory import Trajectory, run_trajectory
from trm_export.runtime.backend import OnnxRuntimeBackend
from trm_export.runtime.solver import Solver


@dataclass(frozen=True)
class CompareOptions:
    steps: int | None = None  # None: the bundle's halt_max_steps (16 for the official models)
    drift_puzzles: int = 128
    batch_size: int = 64
    threads: int | None = None


def make_solver(bundle: str | Path, graph: str | Path | onnx.ModelProto | None = None, *, batch_size: int = 64,
                threads: int | None = None, work_dir: Path | None = None) -> Solver:
    """A CPU `Solver` over `bundle` that runs `graph` (a file or a model not yet in the bundle) instead of fp32.

    The solver's loop and embedding are the bundle's; only the backend's graph differs, so a candidate graph
    is measured exactly as it will run once it is in a bundle.
    """
    solver = Solver(bundle, variant="fp32", provider="cpu", batch_size=batch_size, threads=threads)
    if graph is None:
        return solver
    if isinstance(graph, onnx.ModelProto):
        if work_dir is None:
            raise ValueError("a graph given as a model needs a work_dir to be written to")
        path = Path(work_dir) / "candidate.onnx"
        onnx.save(graph, path)
        graph = path
    task = solver.manifest.task
    solver.backend = OnnxRuntimeBackend(Path(graph), solver.backend.capacity, solver.embedder.state_shape,
                                        task.seq_len, task.vocab_size, provider="cpu", threads=threads)
    return solver


@dataclass
class Fp32Run:
    """What FP32 computed on a puzzle set: the trajectory (answers' correctness and Q per step), z_H per step for
    the drift subset, and the last step's logits there."""

    puzzles: PuzzleSet
    steps: int
    trajectory: Trajectory
    z_H: np.ndarray  # [T, n_drift, S, D]
    logits: np.ndarray  # [n_drift, seq_len, vocab] at the last step

    @property
    def predictions(self) -> np.ndarray:
        return self.trajectory.final_predictions

    @property
    def q_halt(self) -> np.ndarray:
        return self.trajectory.q_halt


def _run(solver: Solver, puzzles: PuzzleSet, steps: int, drift_puzzles: int, on_state,
         on_chunk: Callable[[int], None] | None = None) -> Trajectory:
    def hook(t: int, which: np.ndarray, s: Solver) -> None:
        local = np.flatnonzero(which < drift_puzzles)
        if len(local):
            z_H, _ = s.backend.state(len(which))
            logits = s.backend.logits(local) if t == steps - 1 else None
            on_state(t, which[local], z_H[local], logits)

    return run_trajectory(solver, puzzles.tokens, puzzles.puzzle_ids, puzzles.labels, steps, hook, on_chunk)


def run_fp32(bundle: str | Path, puzzles: PuzzleSet, options: CompareOptions = CompareOptions(),
             on_chunk: Callable[[int], None] | None = None) -> Fp32Run:
    """The FP32 loop on `puzzles`."""
    solver = make_solver(bundle, batch_size=min(options.batch_size, len(puzzles)), threads=options.threads)
    steps = int(options.steps or solver.manifest.loop.halt_max_steps)
    n_drift = min(options.drift_puzzles, len(puzzles))
    s, d = solver.embedder.state_shape
    states = np.zeros((steps, n_drift, s, d), np.float32)
    task = solver.manifest.task
    final_logits = np.zeros((n_drift, task.seq_len, task.vocab_size), np.float32)

    def keep(t: int, which: np.ndarray, z_H: np.ndarray, logits: np.ndarray | None) -> None:
        states[t, which] = z_H
        if logits is not None:
            final_logits[which] = logits

    trajectory = _run(solver, puzzles, steps, n_drift, keep, on_chunk)
    return Fp32Run(puzzles, steps, trajectory, states, final_logits)


@dataclass(frozen=True)
class VariantComparison:
    """One variant against FP32 on the same puzzles and steps (fixed steps)."""

    variant: str
    puzzles: int
    steps: int
    source: str
    drift_puzzles: int
    predictions_identical: float  # fraction of puzzles whose answer equals FP32's
    q_halt_sign_agreement: float  # over puzzles x steps
    rel_error: list[float] = field(default_factory=list)  # per step: mean ||z_H - fp32|| / ||fp32||
    cosine: list[float] = field(default_factory=list)  # per step: mean cosine similarity of z_H with fp32
    logits_rel_error: float = 0.0  # last step: mean ||logits - fp32|| / ||fp32|| (the answer's drift)
    max_abs_q_halt: float = 0.0  # over puzzles x steps
    exact_accuracy: float | None = None
    fp32_exact_accuracy: float | None = None
    token_accuracy: float | None = None
    fp32_token_accuracy: float | None = None
    # Every loop setting's accuracy comes from this (report.trajectory); not written to the manifest.
    trajectory: Trajectory | None = field(default=None, repr=False, compare=False)

    @property
    def accuracy_drop(self) -> float:
        """Exact-accuracy drop from FP32 in percentage points; without labels, the share of changed answers
        (an upper bound of the drop: an answer that did not change cannot have become wrong)."""
        if self.exact_accuracy is not None and self.fp32_exact_accuracy is not None:
            return 100.0 * (self.fp32_exact_accuracy - self.exact_accuracy)
        return 100.0 * (1.0 - self.predictions_identical)

    @property
    def final_rel_error(self) -> float:
        return self.rel_error[-1] if self.rel_error else 0.0

    def summary(self) -> str:
        acc = ""
        if self.exact_accuracy is not None:
            acc = (f"exact accuracy {100 * self.exact_accuracy:.1f}% (fp32 {100 * self.fp32_exact_accuracy:.1f}%), "
                   f"token accuracy {100 * self.token_accuracy:.2f}% (fp32 {100 * self.fp32_token_accuracy:.2f}%), ")
        return (f"{self.variant}: {acc}answers identical to fp32 {100 * self.predictions_identical:.1f}%, "
                f"z_H drift after step 1 / {self.steps}: rel {self.rel_error[0]:.2e} / {self.final_rel_error:.2e}, "
                f"cosine {self.cosine[0]:.5f} / {self.cosine[-1]:.5f} ({self.puzzles} puzzles)")

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "trajectory"}
        out["accuracy_drop_points"] = self.accuracy_drop
        if self.trajectory is not None and self.trajectory.exact is not None:
            t = self.trajectory  # the answer after each step, and adaptive halting capped at the last one
            adaptive = t.adaptive(t.steps)
            out["exact_accuracy_by_steps"] = [round(float(v), 5) for v in t.exact.mean(axis=1)]
            out["adaptive"] = {"cap": t.steps, "exact_accuracy": adaptive.exact_accuracy,
                               "mean_steps": round(adaptive.mean_steps, 4)}
        return out


def compare_graph(bundle: str | Path, graph: str | Path | onnx.ModelProto, reference: Fp32Run, variant: str,
                  options: CompareOptions = CompareOptions(), work_dir: Path | None = None,
                  puzzles: int | None = None, previous: VariantComparison | None = None,
                  on_chunk: Callable[[int], None] | None = None) -> VariantComparison:
    """Run `graph` through the bundle's loop on the reference's puzzles and compare with the FP32 run.

    `puzzles`: only the first N of the reference's (None: all). `previous`: this graph's comparison on a first
    part of them, extended here to N (a variant screened on a few puzzles, then measured on all).
    """
    total = reference.trajectory.puzzles if puzzles is None else min(puzzles, reference.trajectory.puzzles)
    done = 0 if previous is None else previous.puzzles
    if previous is not None and (previous.trajectory is None or done > total):
        raise ValueError("previous must be this graph's comparison on fewer puzzles, with its trajectory")
    subset = reference.puzzles.head(total)
    part = dataclasses.replace(subset, tokens=subset.tokens[done:], puzzle_ids=subset.puzzle_ids[done:],
                               labels=None if subset.labels is None else subset.labels[done:])
    solver = make_solver(bundle, graph, batch_size=max(1, min(options.batch_size, total - done)),
                         threads=options.threads, work_dir=work_dir)
    steps = reference.steps
    n_drift = min(reference.z_H.shape[1], total) if previous is None else previous.drift_puzzles
    rel = np.zeros((steps, n_drift), np.float64)
    cos = np.zeros((steps, n_drift), np.float64)
    logit_err = np.zeros(n_drift, np.float64)

    def measure(t: int, which: np.ndarray, z_H: np.ndarray, logits: np.ndarray | None) -> None:
        if logits is not None:
            ref_l = reference.logits[which].reshape(len(which), -1).astype(np.float64)
            diff = logits.reshape(len(which), -1).astype(np.float64) - ref_l
            logit_err[which] = np.linalg.norm(diff, axis=1) / np.maximum(np.linalg.norm(ref_l, axis=1), 1e-30)
        ref = reference.z_H[t, which].reshape(len(which), -1).astype(np.float64)
        got = z_H.reshape(len(which), -1).astype(np.float64)
        ref_norm = np.linalg.norm(ref, axis=1)
        got_norm = np.linalg.norm(got, axis=1)
        rel[t, which] = np.linalg.norm(got - ref, axis=1) / np.maximum(ref_norm, 1e-30)
        cos[t, which] = np.sum(got * ref, axis=1) / np.maximum(ref_norm * got_norm, 1e-30)

    if previous is None:
        trajectory = _run(solver, part, steps, n_drift, measure, on_chunk)
        drift = ([float(v) for v in rel.mean(axis=1)], [float(v) for v in cos.mean(axis=1)], float(logit_err.mean()))
    else:  # the drift puzzles come first: the previous part measured them
        new = _run(solver, part, steps, 0, lambda *a: None,
                   None if on_chunk is None else (lambda k: on_chunk(done + k)))
        trajectory = Trajectory.concat([previous.trajectory, new])
        drift = (previous.rel_error, previous.cosine, previous.logits_rel_error)
    ref = reference.trajectory
    same = float(np.mean(np.all(trajectory.final_predictions == ref.final_predictions[:total], axis=1)))
    sign = float(np.mean((trajectory.q_halt > 0) == (ref.q_halt[:, :total] > 0)))
    accuracies: dict[str, float] = {}
    if trajectory.exact is not None:
        accuracies = {"exact_accuracy": trajectory.exact[-1].mean(), "token_accuracy": trajectory.token[-1].mean(),
                      "fp32_exact_accuracy": ref.exact[-1, :total].mean(),
                      "fp32_token_accuracy": ref.token[-1, :total].mean()}
    return VariantComparison(variant, total, steps, subset.source, n_drift, same, sign, *drift,
                             float(np.abs(trajectory.q_halt - ref.q_halt[:, :total]).max()),
                             **{k: float(v) for k, v in accuracies.items()}, trajectory=trajectory)
