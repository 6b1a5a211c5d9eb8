"""Parity of an exported bundle against the PyTorch reference, step by step, on real puzzles.

Two views, both on the bundle's own runtime path:
- the step graph, per step: fed the reference's state before step t, does it produce the reference's z_H, z_L,
  logits and q after step t? (max abs error, every step; bar: the tolerance, 1e-4 for fp32 on z_H and logits).
  This is what the export can guarantee: two float32 implementations of the same step differ by rounding only.
  Where a puzzle-step misses the bar, the exact answer decides: the same step in float64 on the same input. The
  graph must then be within the tolerance plus ROUNDING_FACTOR times float32's own error on that input (estimated
  from several roundings, see _ExactStep) of the float64 step; such puzzle-steps are counted as rounding-limited.
  On an ill-conditioned input float32 cannot reach 1e-4 at all (an early maze checkpoint, the test fixture
  tests/data/maze_ill_conditioned: its float32 reference is up to 5e-2 from float64 on a few of 16,000
  puzzle-steps). A broken graph still fails: it misses the bar where float32 is accurate, which is nearly
  everywhere (same checkpoint: median float32 error 5e-6).
- the loop, free running: q_halt sign agreement at every step, fixed-step predictions and adaptive halting steps
  and predictions identical (bar: 100% of the puzzles on which the reference is itself stable), and, for
  information, how far the free-running states drift apart. A recursive model amplifies float32 rounding from
  step to step (the Sudoku reference: 2e-5 after one step, up to O(1) on a few unsolved puzzles after 16), so
  the free-running state error is reported, not held to the per-step bar. A differing puzzle is
  rounding-sensitive, and no float32 implementation can promise its answer, when another rounding of the same
  model changes its loop outcome or q_halt signs, or drifts from the float32 reference by more than CHAOS_DRIFT,
  or when one of the loop's decisions (an answer's argmax, a halting sign) has a margin within ROUNDING_FACTOR x
  the drift those samples show (the rounding samples: the reference in float64, and in float32 in its export
  form, whose op order the graph follows). Those puzzles are counted and listed, not excused silently: the summary
  leads with their share of the checked puzzles, the manifest records it (rounding_sensitive_puzzles,
  rounding_sensitive_share), and above ROUNDING_SENSITIVE_THRESHOLD the export warns (and refuses with --strict).
  The share counts differing puzzles only (a puzzle on which the graph happens to land on the reference's answer is
  not traced again), so it is a lower bound on the answers float32 cannot promise.
The verify stage of the export runs this; its figures go into the manifest and the console, and a failure stops
the export.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from trm_export.export.model import RecursiveModel
from trm_export.export.reference import run_reference
from trm_export.runtime.solver import Solver, halting_threshold
from trm_export.tasks.metrics import per_puzzle_correct
from trm_export.tasks.official import IGNORE_LABEL

# How much of float32's own error on an input (against float64) the graph may add to the tolerance there.
ROUNDING_FACTOR = 4.0
# A free-running state this far (max abs, z_H) from the float32 reference's means the loop has amplified rounding
# (1e-6 to 1e-5 per step) at least a thousandfold on that puzzle: its outcome is no longer set by the model alone.
CHAOS_DRIFT = 1e-2
_GATED = ("z_H", "logits")  # the outputs held to the per-step bar (q only by its sign, in the loop view)
# Share of the checked puzzles that may be rounding-sensitive before the export warns (and --strict refuses). A
# trained, well-conditioned checkpoint shows none (every contractive test model: 0); a large sample of any model may
# hold an isolated near-tie (an argmax or halting margin within rounding), so 0 would warn on healthy models. 5% is
# not a chance tie (4 of the 64 puzzles of one default batch), and it is 10x the default accuracy budget of a
# reduced-precision variant (0.5 points): beyond it, which answers the model gives depends on the machine's float32
# rounding more than the precision choice is allowed to change them, so the user must know.
ROUNDING_SENSITIVE_THRESHOLD = 0.05


@dataclass
class ParityReport:
    puzzles: int
    steps: int
    tolerance: float
    max_abs_z_H: list[float] = field(default_factory=list)  # per step, max over puzzles, step graph fed the ref state
    max_abs_z_L: list[float] = field(default_factory=list)
    max_abs_logits: list[float] = field(default_factory=list)
    max_abs_q: float = 0.0
    free_running_max_abs_z_H: list[float] = field(default_factory=list)  # per step, whole loop on its own state
    free_running_max_abs_logits: list[float] = field(default_factory=list)
    q_halt_sign_agreement: float = 1.0
    predictions_identical: float = 1.0
    adaptive_steps_identical: float = 1.0
    adaptive_predictions_identical: float = 1.0
    reference_exact_accuracy: float | None = None
    bundle_exact_accuracy: float | None = None
    # Differing puzzles on which another rounding of the reference disagrees with it (see the module docstring): the
    # recursion amplifies rounding there, so no float32 implementation can promise the reference's answer.
    rounding_sensitive: list[int] = field(default_factory=list)
    differing: list[int] = field(default_factory=list)  # every puzzle whose outcome or any q_halt sign differs
    # Puzzle-steps (z_H or logits) beyond the tolerance against the float32 reference but within tolerance +
    # ROUNDING_FACTOR x float32's own error of the float64 step on that input; and their worst errors.
    rounding_limited: int = 0
    rounding_limited_max_abs_vs_float64: dict[str, float] = field(default_factory=dict)
    float32_rounding_max_abs: dict[str, float] = field(default_factory=dict)  # float32 torch vs float64, same inputs
    worst_rounding_ratio: float = 0.0  # max of (graph vs float64) / (float32's own error) over the judged puzzle-steps
    # Puzzle-steps beyond every bar: {"puzzle", "step" (1-based), "output", "vs_reference", "vs_float64", "bar"}.
    step_graph_violations: list[dict] = field(default_factory=list)
    # Puzzle-steps where the graph or the reference produced NaN or inf (NaN compares false with every bar).
    non_finite: int = 0
    offered: int | None = None  # puzzles offered when the export's plan took the first `puzzles` of them
    trained_steps: int | None = None  # the model's step limit, when only the first `steps` of it were checked

    @property
    def unexplained(self) -> list[int]:
        """Differing puzzles on which the reference is stable: real disagreements."""
        return sorted(set(self.differing) - set(self.rounding_sensitive))

    @property
    def passed(self) -> bool:
        return not self.step_graph_violations and not self.unexplained and not self.non_finite

    @property
    def rounding_sensitive_share(self) -> float:
        """Fraction of the checked puzzles that are rounding-sensitive (a lower bound: see the module docstring)."""
        return len(self.rounding_sensitive) / self.puzzles if self.puzzles else 0.0

    def rounding_sensitive_words(self) -> str:
        """'8 of 8 puzzles (100%)'."""
        return (f"{len(self.rounding_sensitive)} of {self.puzzles} puzzles "
                f"({_percent(self.rounding_sensitive_share)})")

    def rounding_warning(self, threshold: float = ROUNDING_SENSITIVE_THRESHOLD) -> str | None:
        """One WARNING line when the rounding-sensitive share exceeds `threshold` (a fraction), else None."""
        if self.rounding_sensitive_share <= threshold:
            return None
        return (f"WARNING: rounding-sensitive: {self.rounding_sensitive_words()}, above the {_percent(threshold)} "
                "threshold: float32 cannot reproduce this model's answers on them (another rounding of the reference "
                "itself changes them: the recursion is ill-conditioned), so another machine or engine may answer "
                "differently; the graph is not at fault. Check the checkpoint (a trained model rarely shows any); "
                "--strict refuses such an export")

    def failures(self) -> list[str]:
        out = []
        if self.non_finite:
            out.append(f"{self.non_finite} puzzle-steps produce NaN or infinite values (graph or reference): the "
                       "model overflows in float32")
        for name in _GATED:
            bad = [v for v in self.step_graph_violations if v["output"] == name]
            if bad:
                worst = max(bad, key=lambda v: v["vs_float64"] / v["bar"])
                out.append(f"max |{name} - ref| {max(getattr(self, 'max_abs_' + name)):.2e} > {self.tolerance:g} on "
                           f"{len(bad)} puzzle-steps, not explained by float32 rounding (worst: puzzle "
                           f"{worst['puzzle']} step {worst['step']}, {worst['vs_float64']:.2e} from the float64 step, "
                           f"bar {worst['bar']:.2e})")
        if self.unexplained:
            out.append(f"{len(self.unexplained)} puzzles end differently or flip a q_halt sign although the reference "
                       f"is stable on them (indices {self.unexplained[:10]}; q_halt sign agreement "
                       f"{100 * self.q_halt_sign_agreement:.2f}% over all puzzles)")
        return out

    def summary(self) -> str:
        sample = f" (the first {self.puzzles} of {self.offered}, as planned)" if self.offered else ""
        of = f" of {self.trained_steps}" if self.trained_steps else ""
        text = (f"{self.puzzles} puzzles{sample} x {self.steps}{of} steps: step graph max |z_H - ref| "
                f"{max(self.max_abs_z_H):.1e}, max |logits - ref| {max(self.max_abs_logits):.1e}, "
                f"max |q - ref| {self.max_abs_q:.1e}; loop "
                f"(free running) max |z_H - ref| {max(self.free_running_max_abs_z_H):.1e}, "
                f"q_halt sign agreement {100 * self.q_halt_sign_agreement:.1f}%, fixed predictions identical "
                f"{100 * self.predictions_identical:.1f}%, adaptive halting identical "
                f"{100 * min(self.adaptive_steps_identical, self.adaptive_predictions_identical):.1f}%")
        if self.rounding_limited:
            text += (f" ({self.rounding_limited} puzzle-steps over {self.tolerance:g} are rounding-limited: float32 "
                     f"itself is up to {max(self.float32_rounding_max_abs.values()):.1e} from float64 there, the graph "
                     f"{max(self.rounding_limited_max_abs_vs_float64.values()):.1e})")
        if self.differing:
            text += (f" ({len(self.differing)} differing puzzles, {len(self.rounding_sensitive)} of them rounding-"
                     "sensitive: another rounding of the reference disagrees with it there)")
        if self.bundle_exact_accuracy is not None:
            text += (f"; exact accuracy bundle {100 * self.bundle_exact_accuracy:.1f}% vs reference "
                     f"{100 * self.reference_exact_accuracy:.1f}%")
        if self.rounding_sensitive:  # first: the user must read this before the per-step figures
            text = (f"rounding-sensitive: {self.rounding_sensitive_words()}: float32 cannot promise these answers "
                    "(another rounding of the reference itself changes them: float64, or float32 with other "
                    "kernels); " + text)
        return text

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed, "rounding_sensitive_puzzles": len(self.rounding_sensitive),
                "rounding_sensitive_share": self.rounding_sensitive_share}


def _percent(fraction: float) -> str:
    """100% / 12.5% / 0.05%: three significant digits, never a share > 0 shown as 0%."""
    return f"{100 * fraction:.3g}%"


def check_parity(model: RecursiveModel, solver: Solver, tokens: np.ndarray, puzzle_ids: np.ndarray,
                 labels: np.ndarray | None = None, steps: int | None = None, tolerance: float = 1e-4,
                 progress: bool = False, offered: int | None = None) -> ParityReport:
    """Compare `solver` (any backend) with `model` on the given puzzles, chunk by chunk to bound memory.

    `offered`: how many puzzles the given ones were taken from (the export's plan took the first of them); the
    report says so."""
    steps = int(steps or model.config.halt_max_steps)
    n = len(tokens)
    zeros = [0.0] * steps
    trained = model.config.halt_max_steps
    report = ParityReport(puzzles=n, offered=offered, steps=steps, trained_steps=trained if steps < trained else None,
                          tolerance=tolerance, max_abs_z_H=list(zeros),
                          max_abs_z_L=list(zeros), max_abs_logits=list(zeros), free_running_max_abs_z_H=list(zeros),
                          free_running_max_abs_logits=list(zeros))
    chunk = max(1, min(solver.backend.capacity, _puzzles_per_chunk(model, steps, traces=1)))
    sign_flips = np.zeros(n, np.int64)
    same_pred = same_steps = same_adaptive = 0
    bundle_preds = np.zeros((n, model.config.seq_len), np.int64)
    ref_preds = np.zeros((n, model.config.seq_len), np.int64)
    exact = _ExactStep(model)
    starts = [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="parity vs PyTorch", unit="chunk")
    for sl in starts:
        start = sl.start
        ref = run_reference(model, tokens[sl], puzzle_ids[sl], mode="adaptive", max_steps=steps, record_states=True)
        _step_graph_errors(report, solver, ref, tokens[sl], puzzle_ids[sl], exact, first=start)

        def compare(puzzles: np.ndarray, steps_done: np.ndarray, q_halt: np.ndarray, q_cont: np.ndarray,
                    ref=ref, first=start) -> None:
            t = int(steps_done[0]) - 1  # fixed mode, one chunk per call: every slot is at the same step
            z_H, _ = solver.backend.state(len(puzzles))
            logits = solver.backend.logits(np.arange(len(puzzles)))
            report.free_running_max_abs_z_H[t] = max(report.free_running_max_abs_z_H[t],
                                                     float(np.abs(z_H - ref.z_H[t, puzzles]).max()))
            report.free_running_max_abs_logits[t] = max(report.free_running_max_abs_logits[t],
                                                        float(np.abs(logits - ref.logits[t, puzzles]).max()))
            sign_flips[first + puzzles] += (q_halt > 0) != (ref.q_halt[t, puzzles] > 0)

        fixed = solver.solve(tokens[sl], puzzle_ids[sl], mode="fixed", max_steps=steps, on_step=compare)
        adaptive = solver.solve(tokens[sl], puzzle_ids[sl], mode="adaptive", max_steps=steps)
        final_ref = ref.step_predictions[-1]
        fixed_same = np.all(fixed.predictions == final_ref, axis=1)
        adaptive_same = (adaptive.steps_used == ref.steps_used) & np.all(adaptive.predictions == ref.predictions, 1)
        same_pred += int(fixed_same.sum())
        same_steps += int(np.sum(adaptive.steps_used == ref.steps_used))
        same_adaptive += int(np.all(adaptive.predictions == ref.predictions, axis=1).sum())
        flipped = sign_flips[sl] > 0
        report.differing += [start + int(i) for i in np.flatnonzero(~(fixed_same & adaptive_same) | flipped)]
        bundle_preds[sl], ref_preds[sl] = fixed.predictions, final_ref
    if report.differing:
        report.rounding_sensitive = _rounding_sensitive(model, tokens, puzzle_ids, report.differing, steps)
    report.q_halt_sign_agreement = 1.0 - sign_flips.sum() / (n * steps)
    report.predictions_identical = same_pred / n
    report.adaptive_steps_identical = same_steps / n
    report.adaptive_predictions_identical = same_adaptive / n
    if labels is not None:
        report.reference_exact_accuracy = float(np.mean(per_puzzle_correct(ref_preds, labels, IGNORE_LABEL)))
        report.bundle_exact_accuracy = float(np.mean(per_puzzle_correct(bundle_preds, labels, IGNORE_LABEL)))
    return report


# Recorded states (z_H and z_L of every step, float32) that one chunk of a parity or rounding check may hold: a
# paper-size maze / ARC model's states are 60 MB per puzzle at 16 steps, so 64 puzzles would take 4 GB per trace.
STATE_BYTES_PER_CHUNK = 2 << 30


def _puzzles_per_chunk(model: RecursiveModel, steps: int, traces: int, most: int = 64) -> int:
    cfg = model.config
    per_puzzle = traces * steps * (2 * cfg.total_seq_len * cfg.hidden_size + cfg.seq_len * cfg.vocab_size) * 4
    return max(1, min(most, STATE_BYTES_PER_CHUNK // per_puzzle))


def _rounding_sensitive(model: RecursiveModel, tokens: np.ndarray, puzzle_ids: np.ndarray, indices: list[int],
                        steps: int) -> list[int]:
    """Those of `indices` on which another rounding of the reference changes the loop (see rounding_sensitive)."""
    idx = np.array(indices)
    return [int(i) for i in idx[rounding_sensitive(model, tokens[idx], puzzle_ids[idx], steps)]]


def rounding_sensitive(model: RecursiveModel, tokens: np.ndarray, puzzle_ids: np.ndarray,
                       steps: int | None = None, traces: list | None = None) -> np.ndarray:
    """Per puzzle: can float32 rounding change its loop? Yes when another rounding of the reference (float64, and
    float32 in the export form) changes its outcome or q_halt signs or drifts beyond CHAOS_DRIFT, or when a
    decision is closer than ROUNDING_FACTOR x the drift seen: an argmax margin (top two logits) at the fixed or
    the adaptive answer's step, or the halting margin at any step. `traces`: where given, the float32 reference
    trace of each chunk is appended to it (a caller that needs it need not run it again)."""
    steps = int(steps or model.config.halt_max_steps)
    chunk = _puzzles_per_chunk(model, steps, traces=3)  # three traces with every step's states: bound the memory
    if len(tokens) > chunk:
        return np.concatenate([rounding_sensitive(model, tokens[i:i + chunk], puzzle_ids[i:i + chunk], steps, traces)
                               for i in range(0, len(tokens), chunk)])
    n = len(tokens)

    def trace(m: RecursiveModel):
        return run_reference(m, tokens, puzzle_ids, mode="adaptive", max_steps=steps, record_states=True)

    f32 = trace(model)
    if traces is not None:
        traces.append(f32)
    with model.exporting() as form:
        form32 = trace(form)
    rule = model.config.halting_rule
    threshold = halting_threshold(rule) or 0.0

    def halting(tr) -> np.ndarray:  # [T, N] what the halting rule compares with 0
        return tr.q_halt - tr.q_continue if rule == "q_halt>q_continue" else tr.q_halt - threshold

    changed = np.zeros(n, bool)
    logit_drift, halting_drift, q_halt_drift = np.zeros(n), np.zeros(n), np.zeros(n)
    for other in (form32, _float64_trace(model, tokens, puzzle_ids, steps)):
        changed |= ~np.all(f32.step_predictions[-1] == other.step_predictions[-1], axis=1)
        changed |= (f32.steps_used != other.steps_used) | ~np.all(f32.predictions == other.predictions, axis=1)
        changed |= np.any((f32.q_halt > 0) != (other.q_halt > 0), axis=0)
        changed |= np.abs(f32.z_H - other.z_H).reshape(steps, n, -1).max(axis=(0, 2)) > CHAOS_DRIFT
        logit_drift = np.maximum(logit_drift, np.abs(f32.logits - other.logits).reshape(steps, n, -1).max(axis=(0, 2)))
        halting_drift = np.maximum(halting_drift, np.abs(halting(f32) - halting(other)).max(axis=0))
        q_halt_drift = np.maximum(q_halt_drift, np.abs(f32.q_halt - other.q_halt).max(axis=0))
    changed |= np.abs(halting(f32)).min(axis=0) < ROUNDING_FACTOR * halting_drift
    changed |= np.abs(f32.q_halt).min(axis=0) < ROUNDING_FACTOR * q_halt_drift  # its sign is checked too
    for deciding in (np.full(n, steps - 1), f32.steps_used - 1):
        top2 = np.sort(f32.logits[deciding, np.arange(n)], axis=-1)[..., -2:]
        changed |= (top2[..., 1] - top2[..., 0]).min(axis=1) < ROUNDING_FACTOR * logit_drift
    return changed


def float64_copy(model: RecursiveModel, puzzle_rows: np.ndarray | None = None) -> RecursiveModel:
    """A float64 copy of `model` for rounding checks, without copying its puzzle-embedding table: it keeps only
    `puzzle_rows` of it (none by default: the step itself never reads the table). An ARC table (~1M x 512) would
    otherwise be copied and widened to float64 (4 GB) for every check; callers then index the kept rows by their
    position in `puzzle_rows`."""
    memo = {}
    emb = getattr(model, "puzzle_emb", None)
    if emb is not None:
        table = emb.weights
        rows = np.zeros(0, np.int64) if puzzle_rows is None else np.asarray(puzzle_rows, np.int64)
        memo[id(table)] = table[torch.from_numpy(rows)].clone()
    return copy.deepcopy(model, memo).double()


def _float64_trace(model: RecursiveModel, tokens: np.ndarray, puzzle_ids: np.ndarray, steps: int):
    """run_reference of the float64 copy, which holds only the rows these puzzles use."""
    rows, local_ids = np.unique(np.asarray(puzzle_ids, np.int64), return_inverse=True)
    return run_reference(float64_copy(model, rows), tokens, local_ids.reshape(-1), mode="adaptive",
                         max_steps=steps, record_states=True)


class _ExactStep:
    """The step in float64, and float32's own error on the same inputs, estimated from several roundings: the
    reference's float32 result (given), the export form in float32, and float64 steps whose inputs or weights
    carry one float32 rounding (relative noise of 2^-24). One or two samples are not enough: on a moderately
    ill-conditioned input the float32 forms can land close to float64 by chance while the graph does not (the
    ill-conditioned maze fixture, puzzle 677 step 5: both torch forms 1e-5 from float64, the graph 1.6e-4, the perturbed
    samples 2e-6 to 6e-5)."""

    SAMPLES = 4  # of each perturbation kind; seeded, so an export is reproducible

    def __init__(self, model: RecursiveModel):
        self.model = model
        self._double: RecursiveModel | None = None
        self._perturbed: list[RecursiveModel] = []

    def _models(self) -> tuple[RecursiveModel, list[RecursiveModel]]:
        if self._double is None:
            self._double = float64_copy(self.model)  # the step reads no puzzle table: none is copied
            gen = torch.Generator().manual_seed(0)
            for _ in range(self.SAMPLES):
                m = copy.deepcopy(self._double)
                for p in m.parameters():
                    p.mul_(1 + 2.0 ** -24 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
                self._perturbed.append(m)
        return self._double, self._perturbed

    @torch.inference_mode()
    def __call__(self, x: np.ndarray, z_H: np.ndarray, z_L: np.ndarray,
                 ref32: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(float64 outputs {"z_H", "logits"}, per-row float32 rounding estimate {"z_H", "logits"})."""
        double, perturbed = self._models()
        inputs = [torch.from_numpy(np.ascontiguousarray(a)) for a in (x, z_H, z_L)]
        exact = _outputs(double.step(*(a.double() for a in inputs)))
        with self.model.exporting() as form:
            samples = [ref32, _outputs(form.step(*inputs))]
        gen = torch.Generator().manual_seed(1)
        for m in perturbed:
            samples.append(_outputs(m.step(*(a.double() for a in inputs))))
            noisy = [a.double() * (1 + 2.0 ** -24 * torch.randn(a.shape, generator=gen, dtype=torch.float64))
                     for a in inputs]
            samples.append(_outputs(double.step(*noisy)))
        rounding = {name: np.max([_per_puzzle_max(s[name] - exact[name]) for s in samples], axis=0)
                    for name in _GATED}
        return exact, rounding


def _outputs(step_out) -> dict[str, np.ndarray]:
    return {"z_H": step_out[0].numpy(), "logits": step_out[2].numpy()}


def _step_graph_errors(report: ParityReport, solver: Solver, ref, tokens: np.ndarray, puzzle_ids: np.ndarray,
                       exact: _ExactStep, first: int = 0) -> None:
    """Feed the step graph the reference's state before each step; compare its outputs with the reference's.

    Puzzle-steps over the tolerance are judged against the float64 step (see the module docstring)."""
    n = len(tokens)
    slots = np.arange(n)
    x = solver.embedder(tokens, puzzle_ids)
    z_H, z_L = solver.embedder.initial_state(n)
    for t in range(report.steps):
        solver.backend.load(slots, x, z_H, z_L)
        q_halt, q_cont = solver.backend.step(n)
        out_H, out_L = solver.backend.state(n)
        logits = solver.backend.logits(slots)
        graph = {"z_H": out_H, "logits": logits}
        finite = [np.isfinite(a).reshape(n, -1).all(axis=1) for a in (out_H, out_L, logits, q_halt[:, None],
                                                                        q_cont[:, None], ref.z_H[t], ref.logits[t])]
        report.non_finite += int(n - np.logical_and.reduce(finite).sum())
        errors = {name: _per_puzzle_max(graph[name] - getattr(ref, name)[t]) for name in _GATED}
        report.max_abs_z_H[t] = max(report.max_abs_z_H[t], float(errors["z_H"].max()))
        report.max_abs_z_L[t] = max(report.max_abs_z_L[t], float(np.abs(out_L - ref.z_L[t]).max()))
        report.max_abs_logits[t] = max(report.max_abs_logits[t], float(errors["logits"].max()))
        report.max_abs_q = max(report.max_abs_q, float(np.abs(q_halt - ref.q_halt[t]).max()),
                               float(np.abs(q_cont - ref.q_continue[t]).max()))
        over = np.flatnonzero(np.maximum(errors["z_H"], errors["logits"]) > report.tolerance)
        if len(over):
            _judge_against_float64(report, exact, t, over, first, graph, ref, x, z_H, z_L)
        z_H, z_L = ref.z_H[t], ref.z_L[t]


def _judge_against_float64(report: ParityReport, exact: _ExactStep, t: int, rows: np.ndarray, first: int,
                           graph: dict, ref, x: np.ndarray, z_H: np.ndarray, z_L: np.ndarray) -> None:
    """Rounding-limited or violation, for each puzzle-step of `rows` that missed the tolerance at step t."""
    ref32 = {name: getattr(ref, name)[t, rows] for name in _GATED}
    out64, rounding = exact(x[rows], z_H[rows], z_L[rows], ref32)
    for name in _GATED:
        vs_ref = _per_puzzle_max(graph[name][rows] - ref32[name])
        vs_64 = _per_puzzle_max(graph[name][rows] - out64[name])
        bar = report.tolerance + ROUNDING_FACTOR * rounding[name]
        for i in np.flatnonzero(vs_ref > report.tolerance):
            report.worst_rounding_ratio = max(report.worst_rounding_ratio, float(vs_64[i] / rounding[name][i]))
            if vs_64[i] <= bar[i]:
                report.rounding_limited += 1
                report.rounding_limited_max_abs_vs_float64[name] = max(
                    report.rounding_limited_max_abs_vs_float64.get(name, 0.0), float(vs_64[i]))
                report.float32_rounding_max_abs[name] = max(report.float32_rounding_max_abs.get(name, 0.0),
                                                            float(rounding[name][i]))
            else:
                report.step_graph_violations.append({
                    "puzzle": first + int(rows[i]), "step": t + 1, "output": name, "vs_reference": float(vs_ref[i]),
                    "vs_float64": float(vs_64[i]), "bar": float(bar[i])})


def _per_puzzle_max(diff: np.ndarray) -> np.ndarray:
    return np.abs(diff).reshape(len(diff), -1).max(axis=1)
