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


def golden_figures(solver: Solver) -> dict[str, float]:
    """Run the bundle's golden puzzles through `solver` and measure how close they come to the reference's values."""
    golden = load_golden(solver.bundle, solver.manifest.golden["folder"])
    steps, n = golden["q_halt"].shape
    q_halt = np.zeros((steps, n), np.float32)
    q_cont = np.zeros((steps, n), np.float32)

    def record(puzzles: np.ndarray, steps_done: np.ndarray, qh: np.ndarray, qc: np.ndarray) -> None:
        live = puzzles >= 0
        q_halt[steps_done[live] - 1, puzzles[live]] = qh[live]
        q_cont[steps_done[live] - 1, puzzles[live]] = qc[live]

    fixed = solver.solve(golden["tokens"], golden["puzzle_ids"], mode="fixed", max_steps=steps, on_step=record)
    adaptive = solver.solve(golden["tokens"], golden["puzzle_ids"], mode="adaptive", max_steps=steps)
    return {
        "puzzles": n,
        "steps": steps,
        "q_halt_abs": float(np.abs(q_halt - golden["q_halt"]).max()),
        "q_continue_abs": float(np.abs(q_cont - golden["q_continue"]).max()),
        "q_sign_agreement": float(np.mean((q_halt > 0) == (golden["q_halt"] > 0))),
        "fixed_identical": float(np.mean(np.all(fixed.predictions == golden["predictions"], axis=1))),
        "adaptive_steps_identical": float(np.mean(adaptive.steps_used == golden["adaptive_steps"])),
        "adaptive_identical": float(np.mean(np.all(adaptive.predictions == golden["adaptive_predictions"], axis=1))),
    }


def verify_bundle(bundle: str | Path, variant: str = "fp32", provider: str | None = None,
                  threads: int | None = None) -> CheckReport:
    """Run the golden puzzles through `variant` and compare with the reference values in the bundle."""
    solver = Solver(bundle, variant=variant, provider=provider, threads=threads, verify=True)
    tolerances = solver.manifest.golden["tolerances"]
    tol = tolerances.get(variant, tolerances["fp32"])
    f = golden_figures(solver)
    report = CheckReport(variant, solver.backend.name)
    report.figures["max |q_halt - reference|"] = f["q_halt_abs"]
    report.figures["max |q_continue - reference|"] = f["q_continue_abs"]
    report.checks[f"q values at every step within {tol['q_abs']:g} of the reference"] = \
        max(f["q_halt_abs"], f["q_continue_abs"]) <= tol["q_abs"]
    report.figures["q_halt sign agreement"] = f["q_sign_agreement"]
    report.checks["q_halt sign agrees at every step"] = f["q_sign_agreement"] >= tol["q_sign_agreement"]
    report.figures["fixed-step predictions identical"] = f["fixed_identical"]
    report.checks["fixed-step predictions identical"] = f["fixed_identical"] >= tol["predictions_identical"]
    report.figures["adaptive halting steps identical"] = f["adaptive_steps_identical"]
    report.checks["adaptive halting steps and predictions identical"] = (
        f["adaptive_steps_identical"] >= tol["predictions_identical"]
        and f["adaptive_identical"] >= tol["predictions_identical"])
    return report
