"""Parity of an exported bundle against the PyTorch reference, step by step, on real puzzles.

For every puzzle and every step: max |z_H - ref|, max |logits - ref|, q_halt sign agreement; at the end:
fixed-step predictions and adaptive halting (steps and predictions) identical. This is the verify stage of
the export; its figures go into the manifest and the console, and a failure stops the export.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from trm_export.export.model import RecursiveModel
from trm_export.export.reference import run_reference
from trm_export.runtime.solver import Solver


@dataclass
class ParityReport:
    puzzles: int
    steps: int
    tolerance: float
    max_abs_z_H: list[float] = field(default_factory=list)  # per step, max over puzzles
    max_abs_z_L: list[float] = field(default_factory=list)
    max_abs_logits: list[float] = field(default_factory=list)
    max_abs_q: float = 0.0
    q_halt_sign_agreement: float = 1.0
    predictions_identical: float = 1.0
    adaptive_steps_identical: float = 1.0
    adaptive_predictions_identical: float = 1.0
    reference_exact_accuracy: float | None = None
    bundle_exact_accuracy: float | None = None

    @property
    def passed(self) -> bool:
        return (max(self.max_abs_z_H) <= self.tolerance and max(self.max_abs_logits) <= self.tolerance
                and self.q_halt_sign_agreement == 1.0 and self.predictions_identical == 1.0
                and self.adaptive_steps_identical == 1.0 and self.adaptive_predictions_identical == 1.0)

    def failures(self) -> list[str]:
        out = []
        if max(self.max_abs_z_H) > self.tolerance:
            out.append(f"max |z_H - ref| {max(self.max_abs_z_H):.2e} > {self.tolerance:g}")
        if max(self.max_abs_logits) > self.tolerance:
            out.append(f"max |logits - ref| {max(self.max_abs_logits):.2e} > {self.tolerance:g}")
        for name in ("q_halt_sign_agreement", "predictions_identical", "adaptive_steps_identical",
                     "adaptive_predictions_identical"):
            if getattr(self, name) < 1.0:
                out.append(f"{name.replace('_', ' ')} {100 * getattr(self, name):.2f}% < 100%")
        return out

    def summary(self) -> str:
        text = (f"{self.puzzles} puzzles x {self.steps} steps: max |z_H - ref| {max(self.max_abs_z_H):.1e}, "
                f"max |logits - ref| {max(self.max_abs_logits):.1e}, max |q - ref| {self.max_abs_q:.1e}, "
                f"q_halt sign agreement {100 * self.q_halt_sign_agreement:.1f}%, fixed predictions identical "
                f"{100 * self.predictions_identical:.1f}%, adaptive halting identical "
                f"{100 * min(self.adaptive_steps_identical, self.adaptive_predictions_identical):.1f}%")
        if self.bundle_exact_accuracy is not None:
            text += (f"; exact accuracy bundle {100 * self.bundle_exact_accuracy:.1f}% vs reference "
                     f"{100 * self.reference_exact_accuracy:.1f}%")
        return text

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def check_parity(model: RecursiveModel, solver: Solver, tokens: np.ndarray, puzzle_ids: np.ndarray,
                 labels: np.ndarray | None = None, steps: int | None = None, tolerance: float = 1e-4,
                 progress: bool = False) -> ParityReport:
    """Compare `solver` (any backend) with `model` on the given puzzles, chunk by chunk to bound memory."""
    steps = int(steps or model.config.halt_max_steps)
    n = len(tokens)
    report = ParityReport(puzzles=n, steps=steps, tolerance=tolerance, max_abs_z_H=[0.0] * steps,
                          max_abs_z_L=[0.0] * steps, max_abs_logits=[0.0] * steps)
    chunk = solver.backend.capacity
    sign_agree = same_pred = same_steps = same_adaptive = 0
    bundle_preds = np.zeros((n, model.config.seq_len), np.int64)
    ref_preds = np.zeros((n, model.config.seq_len), np.int64)
    starts = range(0, n, chunk)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="parity vs PyTorch", unit="batch")
    for start in starts:
        sl = slice(start, min(start + chunk, n))
        ref = run_reference(model, tokens[sl], puzzle_ids[sl], mode="adaptive", max_steps=steps, record_states=True)

        def compare(puzzles: np.ndarray, steps_done: np.ndarray, q_halt: np.ndarray, q_cont: np.ndarray,
                    ref=ref) -> None:
            nonlocal sign_agree
            t = int(steps_done[0]) - 1  # fixed mode, one chunk per call: every slot is at the same step
            z_H, z_L = solver.backend.state(len(puzzles))
            logits = solver.backend.logits(np.arange(len(puzzles)))
            report.max_abs_z_H[t] = max(report.max_abs_z_H[t], float(np.abs(z_H - ref.z_H[t, puzzles]).max()))
            report.max_abs_z_L[t] = max(report.max_abs_z_L[t], float(np.abs(z_L - ref.z_L[t, puzzles]).max()))
            report.max_abs_logits[t] = max(report.max_abs_logits[t],
                                           float(np.abs(logits - ref.logits[t, puzzles]).max()))
            report.max_abs_q = max(report.max_abs_q, float(np.abs(q_halt - ref.q_halt[t, puzzles]).max()),
                                   float(np.abs(q_cont - ref.q_continue[t, puzzles]).max()))
            sign_agree += int(np.sum((q_halt > 0) == (ref.q_halt[t, puzzles] > 0)))

        fixed = solver.solve(tokens[sl], puzzle_ids[sl], mode="fixed", max_steps=steps, on_step=compare)
        adaptive = solver.solve(tokens[sl], puzzle_ids[sl], mode="adaptive", max_steps=steps)
        final_ref = ref.step_predictions[-1]
        same_pred += int(np.all(fixed.predictions == final_ref, axis=1).sum())
        same_steps += int(np.sum(adaptive.steps_used == ref.steps_used))
        same_adaptive += int(np.all(adaptive.predictions == ref.predictions, axis=1).sum())
        bundle_preds[sl], ref_preds[sl] = fixed.predictions, final_ref
    report.q_halt_sign_agreement = sign_agree / (n * steps)
    report.predictions_identical = same_pred / n
    report.adaptive_steps_identical = same_steps / n
    report.adaptive_predictions_identical = same_adaptive / n
    if labels is not None:
        report.reference_exact_accuracy = float(np.mean(np.all(ref_preds == labels, axis=1)))
        report.bundle_exact_accuracy = float(np.mean(np.all(bundle_preds == labels, axis=1)))
    return report
