"""A bundle verifies itself: run its golden puzzles and compare with what the PyTorch reference computed.

Golden vectors (written at export, `golden/*.npy`): a few real puzzles, the reference's q_halt / q_continue at
every step of the trained step limit, its fixed-step predictions, and its adaptive halting steps and
predictions. This runs on the device with the runtime alone (`trm-export verify BUNDLE`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trm_export.runtime.embedding import load_array
from trm_export.runtime.solver import Solver

GOLDEN_FILES = ("tokens", "puzzle_ids", "q_halt", "q_continue", "predictions", "adaptive_steps",
                "adaptive_predictions")


@dataclass
class CheckReport:
    """Truthy when every check passed; `str()` gives a 'Passed: x/y' summary with the failures."""

    variant: str
    backend: str
    checks: dict[str, bool] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return all(self.checks.values())

    def __str__(self) -> str:
        passed = sum(self.checks.values())
        lines = [f"{'PASSED' if self else 'FAILED'} {self.variant} on {self.backend}: "
                 f"Passed: {passed}/{len(self.checks)}"]
        for name, ok in self.checks.items():
            lines.append(f"  [{'ok' if ok else 'FAIL'}] {name}")
        for name, value in self.figures.items():
            lines.append(f"  {name}: {value:.3g}")
        return "\n".join(lines)


def load_golden(bundle: Path, folder: str) -> dict[str, np.ndarray]:
    return {name: load_array(bundle / folder / f"{name}.npy") for name in GOLDEN_FILES}


def verify_bundle(bundle: str | Path, variant: str = "fp32", provider: str | None = None,
                  threads: int | None = None) -> CheckReport:
    """Run the golden puzzles through `variant` and compare with the reference values in the bundle."""
    solver = Solver(bundle, variant=variant, provider=provider, threads=threads, verify=True)
    golden_spec = solver.manifest.golden
    golden = load_golden(solver.bundle, golden_spec["folder"])
    tol = golden_spec["tolerances"].get(variant, golden_spec["tolerances"]["fp32"])
    steps = golden["q_halt"].shape[0]
    n = len(golden["tokens"])
    q_halt = np.zeros((steps, n), np.float32)
    q_cont = np.zeros((steps, n), np.float32)

    def record(puzzles: np.ndarray, steps_done: np.ndarray, qh: np.ndarray, qc: np.ndarray) -> None:
        live = puzzles >= 0
        q_halt[steps_done[live] - 1, puzzles[live]] = qh[live]
        q_cont[steps_done[live] - 1, puzzles[live]] = qc[live]

    fixed = solver.solve(golden["tokens"], golden["puzzle_ids"], mode="fixed", max_steps=steps, on_step=record)
    adaptive = solver.solve(golden["tokens"], golden["puzzle_ids"], mode="adaptive", max_steps=steps)
    report = CheckReport(variant, solver.backend.name)
    err_halt = float(np.abs(q_halt - golden["q_halt"]).max())
    err_cont = float(np.abs(q_cont - golden["q_continue"]).max())
    report.figures["max |q_halt - reference|"] = err_halt
    report.figures["max |q_continue - reference|"] = err_cont
    report.checks[f"q values at every step within {tol['q_abs']:g} of the reference"] = max(err_halt, err_cont) <= \
        tol["q_abs"]
    sign_agree = float(np.mean((q_halt > 0) == (golden["q_halt"] > 0)))
    report.figures["q_halt sign agreement"] = sign_agree
    report.checks["q_halt sign agrees at every step"] = sign_agree >= tol["q_sign_agreement"]
    same_fixed = float(np.mean(np.all(fixed.predictions == golden["predictions"], axis=1)))
    report.figures["fixed-step predictions identical"] = same_fixed
    report.checks["fixed-step predictions identical"] = same_fixed >= tol["predictions_identical"]
    same_steps = float(np.mean(adaptive.steps_used == golden["adaptive_steps"]))
    same_adaptive = float(np.mean(np.all(adaptive.predictions == golden["adaptive_predictions"], axis=1)))
    report.figures["adaptive halting steps identical"] = same_steps
    report.checks["adaptive halting steps and predictions identical"] = (
        same_steps >= tol["predictions_identical"] and same_adaptive >= tol["predictions_identical"])
    return report
