"""A bundle verifies itself: run its golden puzzles and compare with what the PyTorch reference computed.

Golden vectors (written at export, `golden/*.npy`): a few real puzzles, the reference's q_halt / q_continue at
every step of the trained step limit, its fixed-step predictions, and its adaptive halting steps and
predictions. This runs on the device with the runtime alone (`trm-export verify BUNDLE`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trm_export.errors import BundleError
from trm_export.runtime.embedding import load_array
from trm_export.runtime.manifest import GOLDEN_ARRAYS, member, unlisted_files
from trm_export.runtime.solver import MAX_STEPS, Solver


@dataclass
class CheckReport:
    """Truthy when every check passed; `str()` gives a 'Passed: x/y' summary, each check with its figure and bar."""

    variant: str
    backend: str
    checks: dict[str, bool] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    measured: dict[str, str] = field(default_factory=dict)  # check -> "figure (bar)"
    notes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return all(self.checks.values())

    def add(self, name: str, ok: bool, measured: str) -> None:
        self.checks[name], self.measured[name] = bool(ok), measured

    def __str__(self) -> str:
        passed = sum(self.checks.values())
        lines = [f"{'PASSED' if self else 'FAILED'} {self.variant} on {self.backend}: "
                 f"Passed: {passed}/{len(self.checks)}"]
        for name, ok in self.checks.items():
            lines.append(f"  [{'ok' if ok else 'FAIL'}] {name}: {self.measured.get(name, '')}".rstrip(": "))
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def load_golden(solver: Solver) -> dict[str, np.ndarray]:
    """The golden arrays, each checked for the shape the manifest implies before use."""
    n, seq_len = solver.manifest.golden["count"], solver.task.seq_len
    shapes = {"tokens": (n, seq_len), "puzzle_ids": (n,), "q_halt": (None, n), "q_continue": (None, n),
              "predictions": (n, seq_len), "adaptive_steps": (n,), "adaptive_predictions": (n, seq_len)}
    folder = solver.manifest.golden["folder"]
    golden = {name: load_array(member(solver.bundle, f"{folder}/{name}.npy"), shapes[name],
                               kinds="f" if name.startswith("q_") else "iu") for name in GOLDEN_ARRAYS}
    if golden["q_halt"].shape != golden["q_continue"].shape or not 1 <= len(golden["q_halt"]) <= MAX_STEPS:
        raise BundleError(f"{solver.bundle}: golden q_halt / q_continue shapes {golden['q_halt'].shape} / "
                          f"{golden['q_continue'].shape} do not fit; re-export the bundle")
    # The golden puzzles are the bundle's own: out of range they are a damaged bundle, not the user's bad input.
    limits = {"tokens": solver.task.vocab_size, "predictions": solver.task.vocab_size,
              "adaptive_predictions": solver.task.vocab_size, "puzzle_ids": solver.task.num_puzzle_identifiers,
              "adaptive_steps": max(len(golden["q_halt"]), solver.manifest.loop.halt_max_steps) + 1}
    for name, limit in limits.items():
        values = golden[name]
        low = 1 if name == "adaptive_steps" else 0
        if values.size and (values.min() < low or values.max() >= limit):
            raise BundleError(f"{solver.bundle}: {folder}/{name}.npy holds {int(values.min())}..{int(values.max())}, "
                              f"outside [{low}, {limit}): the bundle's golden vectors are damaged; re-export it")
    return golden


def golden_figures(solver: Solver) -> dict[str, float]:
    """Run the bundle's golden puzzles through `solver` and measure how close they come to the reference's values."""
    golden = load_golden(solver)
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


def verify_bundle(bundle: str | Path, variant: str | None = None, provider: str | None = None,
                  threads: int | None = None, backend: str = "auto") -> CheckReport:
    """Run the golden puzzles through `variant` and compare with the reference values in the bundle."""
    return golden_report(Solver(bundle, variant=variant, backend=backend, provider=provider, threads=threads,
                                verify=True))


def check_golden(solver: Solver) -> None:
    """Refuse to go on (BundleError) when the solver's graph misses its golden bars: a swapped or broken graph."""
    report = golden_report(solver)
    if not report:
        failed = "; ".join(f"{name}: {report.measured[name]}" for name, ok in report.checks.items() if not ok)
        raise BundleError(f"{solver.bundle}: the {solver.variant} graph fails the bundle's golden self-check "
                          f"({failed}); it does not compute what was exported. Run `trm-export verify "
                          f"{solver.bundle} --variant {solver.variant}` and re-export")


def golden_report(solver: Solver, figures: dict[str, float] | None = None) -> CheckReport:
    """The self-check of `solver`'s variant: its golden puzzles against the reference values in the manifest.

    `figures`: golden_figures of this solver's graph, already measured (the export does, to set the bars); else
    the golden puzzles are run now."""
    variant = solver.variant
    tolerances = solver.manifest.golden["tolerances"]
    tol = tolerances.get(variant, tolerances["fp32"])
    f = golden_figures(solver) if figures is None else figures
    report = CheckReport(variant, solver.backend.name)
    if solver.backend_note:  # a fall back from the bundle's engine is said where the verdict is
        report.notes.append(solver.backend_note)
    report.add("manifest digest and file checksums", True, f"{len(solver.manifest.files)} files")
    q_err = max(f["q_halt_abs"], f["q_continue_abs"])
    report.figures.update({"max |q_halt - reference|": f["q_halt_abs"],
                           "max |q_continue - reference|": f["q_continue_abs"]})
    report.add("Q values at every step", q_err <= tol["q_abs"], f"max error {q_err:.3g} (bar <= {tol['q_abs']:g})")
    checks = (("q_halt sign at every step", "q_sign_agreement", "q_sign_agreement", "agree"),
              ("fixed-step predictions", "fixed_identical", "predictions_identical", "identical"),
              ("adaptive halting steps", "adaptive_steps_identical", "predictions_identical", "identical"),
              ("adaptive predictions", "adaptive_identical", "predictions_identical", "identical"))
    for name, figure, bar, verb in checks:
        report.figures[f"{name} {verb}"] = f[figure]
        report.add(name, f[figure] >= tol[bar], f"{f[figure]:.3g} {verb} (bar >= {tol[bar]:.3g}, "
                   f"{f['puzzles']} golden puzzles)")
    extra = unlisted_files(solver.bundle, solver.manifest)
    if extra:
        report.notes.append(f"{len(extra)} file(s) in the bundle folder are not listed in the manifest (not "
                            f"checksummed, never read): {', '.join(extra[:10])}{' ...' if len(extra) > 10 else ''}")
    return report
