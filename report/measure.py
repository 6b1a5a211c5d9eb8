"""Measure what each precision and step budget costs and loses, where the bundle sits now.

Runtime only (numpy + onnxruntime, TensorRT when its engines are built; tqdm and matplotlib when present):
`trm-export report BUNDLE` re-measures on a Jetson after `trm-export build`, so its owner gets real numbers.

Per variant: one fixed run of the largest budget gives the accuracy of every fixed budget and of adaptive
halting, by the Q head and by the policies that do not trust it (`stable:K`, `q+stable:K`; report.trajectory);
step latency is timed at batch 1 and at the target's batch with its spread (report.latency). A setting's
latency per puzzle is its mean steps times the measured step time (batch 1); its throughput, the target's batch
over the same product at that batch (halted slots refilled). Accuracy carries its sample size and a 95%
interval. A backend or target that is not present is listed as not measured.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from trm_export.errors import InputError
from trm_export.planning.plan import plan_report, step_flops_of, timing_batch
from trm_export.report.latency import StepTiming, load_note, time_steps
from trm_export.report.trajectory import Trajectory, puzzle_progress, run_trajectory, wilson_interval
from trm_export.runtime.backend import importable
from trm_export.runtime.cpu_engines import cpu_model
from trm_export.runtime.embedding import load_array
from trm_export.runtime.io import task_for_encoding
from trm_export.runtime.manifest import Manifest, member, read_manifest
from trm_export.runtime.solver import HaltingPolicy, Solver, parse_halting
from trm_export.tasks import TaskData, folder_sample

BUDGETS = (1, 2, 4, 8, 16)
# Halting policies beside the Q head's (runtime.solver), each capped at the largest budget.
HALTING_POLICIES = ("stable:1", "stable:2", "q+stable:2")
DRIFT_PUZZLES = 32
DRIFT_BYTES = 64 << 20  # fp32's z_H at every step of the drift puzzles is held in memory: bounded for large models


@dataclass(frozen=True)
class ReportOptions:
    quick: bool = False  # a small evaluation (100 puzzles, short latency samples)
    puzzles: int | None = None  # held-out puzzles; default: 1000 (the held-out split), 100 with quick
    # Work budget of the accuracy runs, all variants together, in seconds at planning.NOMINAL_FLOPS (the same
    # number of puzzles on any machine: counted from the model's FLOPs, never timed). None: every puzzle.
    work_seconds: float | None = None
    latency_seconds: float | None = None  # per variant and batch size; default 1 s, 0.25 s with quick
    budgets: tuple[int, ...] = BUDGETS
    threads: int | None = None
    backend: str = "auto"  # auto | onnxruntime | openvino | tensorrt (see Solver)
    progress: bool = True
    halting: tuple[str, ...] = HALTING_POLICIES  # measured beside fixed budgets and the Q head ("q")
    data: Path | None = None  # an official dataset folder: its test split (with labels) instead of the task's


@dataclass
class Measurement:
    """One (variant, backend, loop setting)."""

    variant: str
    precision: str
    backend: str
    mode: str  # fixed | adaptive (the Q head) | stable:K | q+stable:K (other halting policies)
    budget: int  # fixed: the steps; otherwise: the cap
    puzzles: int
    exact_accuracy: float
    exact_low: float  # 95% Wilson interval of exact_accuracy
    exact_high: float
    token_accuracy: float
    mean_steps: float
    latency_ms_p25: float  # per puzzle at batch 1: mean steps x measured ms per step (quartiles, p95)
    latency_ms_p50: float
    latency_ms_p75: float
    latency_ms_p95: float
    throughput: float  # puzzles/s at `batch`: batch / (mean steps x ms per step at that batch)
    batch: int
    size_mb: float
    peak_rss_mb: float | None  # peak resident memory of the process while measuring this variant


@dataclass
class TrainedRow:
    """One loop setting of the PyTorch reference in the arithmetic the model was trained in (bfloat16 for the
    official configs), measured at export (manifest.reference): the number the user's training printed."""

    compute_dtype: str
    mode: str  # fixed | adaptive
    budget: int
    puzzles: int
    exact_accuracy: float
    exact_low: float
    exact_high: float
    token_accuracy: float
    mean_steps: float
    source: str


@dataclass
class DriftCurve:
    variant: str
    relative_error: list[float]  # per step: ||z_H - z_H_fp32|| / ||z_H_fp32||, mean over puzzles
    cosine: list[float]  # per step: mean cosine similarity of z_H with FP32's


@dataclass
class ReportData:
    bundle: str
    target: str
    host: str  # where it was measured
    task: str
    puzzles: int
    source: str  # which puzzles
    measurements: list[Measurement] = field(default_factory=list)
    drift: list[DriftCurve] = field(default_factory=list)
    trained: list[TrainedRow] = field(default_factory=list)  # the training arithmetic's accuracy, from the export
    not_measured: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # The latencies are the target's own (measured where it runs). False for a report written at export for a target
    # whose engines run elsewhere (a Jetson's, a GPU's TensorRT): its settings are ranked by accuracy only.
    latency_is_the_targets: bool = True
    step_flops: int | None = None  # FLOPs of one puzzle-step (matmuls): the on-paper device floor of such a report

    def to_dict(self) -> dict:
        return asdict(self)


def host_description() -> str:
    """Where a figure was measured: machine, system, CPU model, cores."""
    cores = os.cpu_count()
    return ", ".join(x for x in (platform.machine(), platform.system(), cpu_model(), f"{cores} cores" if cores else "")
                     if x)


def rounding_notes(manifest: Manifest) -> list[str]:
    """The export's rounding-sensitive share (export.parity): puzzles float32 itself cannot promise, said first."""
    fp32 = manifest.parity.get("fp32", {})
    share, count, puzzles = (fp32.get("rounding_sensitive_share"), fp32.get("rounding_sensitive_puzzles"),
                             fp32.get("puzzles"))
    if not isinstance(share, (int, float)) or not share > 0:
        return []
    threshold = fp32.get("rounding_sensitive_threshold")
    loud = isinstance(threshold, (int, float)) and share > threshold
    return [f"{'**WARNING**: ' if loud else ''}{count} of {puzzles} parity puzzles ({100 * share:.2g}%) are "
            "rounding-sensitive at export: float32 itself cannot promise the reference's answers there (another "
            "rounding of the reference changes them), so accuracy differences between variants on such puzzles are "
            "not precision effects alone"]


def trained_rows(manifest: Manifest) -> tuple[list[TrainedRow], list[str]]:
    """manifest.reference as report rows (a stranger's bundle: every value checked; a malformed entry is left out
    with a note, never rendered)."""
    rows, notes = [], []
    for dtype, entry in sorted(manifest.reference.items()):
        try:
            puzzles = entry["puzzles"]
            if dtype not in ("bfloat16", "float16", "float32") or not isinstance(puzzles, int) or puzzles < 1:
                raise ValueError
            source = " ".join(str(entry.get("source", ""))[:200].replace("|", "/").split())
            for r in entry["rows"]:
                mode, budget, exact, token, steps = (r["mode"], r["budget"], float(r["exact_accuracy"]),
                                                     float(r["token_accuracy"]), float(r["mean_steps"]))
                if mode not in ("fixed", "adaptive") or not isinstance(budget, int) or not 0 <= exact <= 1 \
                        or not 0 <= token <= 1 or not 0 < steps <= budget:
                    raise ValueError
                low, high = wilson_interval(round(exact * puzzles), puzzles)
                rows.append(TrainedRow(dtype, mode, budget, puzzles, exact, low, high, token, steps, source))
        except (KeyError, TypeError, ValueError, AttributeError):
            notes.append(f"manifest.reference.{str(dtype)[:20]} is malformed and left out (re-export the bundle)")
    return rows, notes


def _peak_rss_reset() -> None:
    try:  # Linux: writing 5 resets the peak-RSS counter (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _data_for(bundle: Path, manifest: Manifest, count: int, folder: Path | None) -> tuple[TaskData, str]:
    """The labelled held-out puzzles: the dataset folder's test split (of a bundle that kept some rows of its
    puzzle table, only the puzzles of those rows), else the shipped task's held-out split."""
    enc = manifest.task
    if folder is not None:
        kept = None
        if manifest.embedding.puzzle_rows is not None:
            kept = load_array(member(bundle, manifest.embedding.puzzle_rows), (None,), kinds="i")
        data, source = folder_sample(folder, "heldout", enc.seq_len, enc.vocab_size, enc.num_puzzle_identifiers,
                                     count, kept)
        return data, source if kept is None else f"{source}, the puzzles of the {len(kept):,} rows this bundle kept"
    task = task_for_encoding(enc)
    if task is None:
        raise InputError("the report needs labelled puzzles and this bundle's task is not a shipped one: give the "
                         "official dataset folder the model was trained on (--data DIR)")
    data = task.split("heldout", size=min(count, 1000))
    return data, f"the {enc.name} held-out split"


def _backends(manifest: Manifest, variant: str, requested: str) -> list[str]:
    """What runs `variant`: as asked; for `auto`, ONNX Runtime and the bundle's TensorRT engine side by side where
    one is built for this machine, else what `auto` runs (ONNX Runtime, or OpenVINO where `trm-export tune`
    measured it faster here; each row names the engine and graph form that ran)."""
    if requested != "auto":
        return [requested]
    if variant in manifest.build.get("engines", {}) and importable("tensorrt"):
        return ["onnxruntime", "tensorrt"]
    return ["auto"]


def settings_of(variant: str, precision: str, backend: str, trajectory: Trajectory, budgets: tuple[int, ...],
                single: StepTiming, batched: StepTiming, size_mb: float,
                peak_rss_mb: float | None = None, halting: tuple[str, ...] = HALTING_POLICIES) -> list[Measurement]:
    """Every fixed budget, adaptive halting on the Q head and by each policy of `halting` (runtime.solver), each
    capped at the largest budget, from one trajectory and two step timings. A policy that cannot halt a puzzle
    before the cap (stable:K with K + 1 >= cap) is left out: it is fixed or Q halting by another name."""
    cap = max(budgets)
    policies = [parse_halting(p) for p in halting]
    outcomes = [trajectory.fixed(b) for b in budgets] + [trajectory.adaptive(cap)]
    if trajectory.changed is not None:
        outcomes += [trajectory.adaptive(cap, policy=p) for p in policies
                     if p != HaltingPolicy() and p.stable + 1 < cap]
    rows = []
    for o in outcomes:
        low, high = o.interval
        latency = single.scaled(o.mean_steps)
        rows.append(Measurement(
            variant, precision, backend, o.mode, o.budget, o.puzzles, o.exact_accuracy, low, high, o.token_accuracy,
            o.mean_steps, latency.p25, latency.p50, latency.p75, latency.p95,
            throughput=1000.0 * batched.batch / (batched.p50 * o.mean_steps), batch=batched.batch, size_mb=size_mb,
            peak_rss_mb=peak_rss_mb))
    return rows


def measure_bundle(bundle: str | Path, options: ReportOptions = ReportOptions()) -> ReportData:
    """Measure every variant of `bundle` here (see the module docstring)."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle, verify=True)
    count = options.puzzles or (100 if options.quick else 1000)
    latency_seconds = options.latency_seconds or (0.25 if options.quick else 1.0)
    data, source = _data_for(bundle, manifest, count, options.data)
    from trm_export.targets.registry import get_target

    target = get_target(manifest.target)
    steps = max(options.budgets)
    report = ReportData(str(bundle), target.name, host_description(), manifest.task.name or "custom", len(data),
                        source)
    report.notes += rounding_notes(manifest)
    report.trained, malformed = trained_rows(manifest)
    report.notes += malformed
    if target.runtime == "tensorrt" and not manifest.build.get("engines"):
        report.not_measured.append(f"TensorRT on {target.name}: no engine in this bundle (build it on the device "
                                   "with `trm-export build`, then re-run `trm-export report` there)")
    variants = sorted(manifest.graphs, key=lambda v: (v != "fp32", v))  # fp32 first: the drift reference
    jobs = [(v, b) for v in variants for b in _backends(manifest, v, options.backend)]
    fp32_states: dict[int, np.ndarray] = {}
    flops = step_flops_of(manifest)
    timings: list[StepTiming] = []
    for i, (variant, backend) in enumerate(jobs):
        _peak_rss_reset()
        single = Solver(bundle, variant=variant, backend=backend, batch_size=1, threads=options.threads,
                        verify=False)
        timing_1 = time_steps(single, latency_seconds)
        if i == 0:  # the target's batch, or a smaller one where a step there is too much work (paper size)
            batch = timing_batch(flops, target.batch.opt) if flops else target.batch.opt
            if batch < target.batch.opt:
                report.notes.append(f"throughput and accuracy runs at batch {batch}, not the target's "
                                    f"{target.batch.opt}: one step at batch {target.batch.opt} is "
                                    f"{target.batch.opt * flops / 1e12:.1f} TFLOP of work")
            if options.work_seconds is not None and flops:  # whole batches, sized from the work: all variants
                fit = plan_report(flops, steps, len(data), len(jobs), batch, options.work_seconds)
                if fit < len(data):
                    data = data.select(np.arange(fit))
                    report.puzzles, report.source = len(data), f"{source}; the first {len(data)} of them"
                    report.notes.append(
                        f"accuracy on the first {len(data)} held-out puzzles: as many as the report's work budget "
                        f"covers ({options.work_seconds:g} s at the nominal rate, counted from the model's FLOPs: the "
                        "same puzzles on any machine; `--puzzles N` measures N)")
        batched = Solver(bundle, variant=variant, backend=backend, batch_size=batch, threads=options.threads,
                         verify=False)
        timing_b = time_steps(batched, latency_seconds)
        timings += [timing_1, timing_b]
        s, d = batched.embedder.state_shape
        n_drift = max(1, min(DRIFT_PUZZLES, len(data), DRIFT_BYTES // (4 * steps * s * d)))
        drift = _DriftProbe(fp32_states, variant, n_drift)
        with puzzle_progress(f"report {variant} ({backend})", len(data), options.progress) as tick:
            trajectory = run_trajectory(batched, data.inputs, data.puzzle_ids, data.labels, steps, drift, tick)
        if variant != "fp32" and fp32_states:
            report.drift.append(drift.curve())
        size_mb = (bundle / manifest.graphs[variant].file).stat().st_size / 1e6
        report.measurements += settings_of(variant, manifest.graphs[variant].precision, batched.backend.name,
                                           trajectory, options.budgets, timing_1, timing_b, size_mb, _peak_rss_mb(),
                                           options.halting)
    note = load_note(timings)
    if note:
        report.notes.append(note)
    return report


class _DriftProbe:
    """z_H of the first few puzzles at every step: kept for fp32, compared with it for every other variant."""

    def __init__(self, fp32_states: dict[int, np.ndarray], variant: str, puzzles: int):
        self.reference, self.variant, self.puzzles = fp32_states, variant, puzzles
        self.rel: dict[int, np.ndarray] = {}
        self.cos: dict[int, np.ndarray] = {}

    def __call__(self, t: int, which: np.ndarray, solver: Solver) -> None:
        local = np.flatnonzero(which < self.puzzles)
        if not len(local):
            return
        rows = which[local]
        z_H = solver.backend.state(len(which))[0][local].reshape(len(local), -1).astype(np.float64)
        if self.variant == "fp32":
            self.reference.setdefault(t, np.zeros((self.puzzles, z_H.shape[1]), np.float32))[rows] = z_H
            return
        if t not in self.reference:
            return
        ref = self.reference[t][rows]
        ref_norm, norm = np.linalg.norm(ref, axis=1), np.linalg.norm(z_H, axis=1)
        self.rel.setdefault(t, np.zeros(self.puzzles))[rows] = (np.linalg.norm(z_H - ref, axis=1)
                                                               / np.maximum(ref_norm, 1e-30))
        self.cos.setdefault(t, np.zeros(self.puzzles))[rows] = np.sum(z_H * ref, axis=1) / np.maximum(
            ref_norm * norm, 1e-30)

    def curve(self) -> DriftCurve:
        return DriftCurve(self.variant, [float(self.rel[t].mean()) for t in sorted(self.rel)],
                          [float(self.cos[t].mean()) for t in sorted(self.cos)])
