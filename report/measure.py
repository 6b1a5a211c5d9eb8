"""Measure what each precision and step budget costs and loses, where the bundle sits now.

Runtime only (numpy + onnxruntime, TensorRT when its engines are built): `trm-export report BUNDLE` re-measures
on a Jetson after `trm-export build`, so its owner gets real numbers. Nothing is estimated here: a backend or
target that is not present is listed as not measured.
"""

from __future__ import annotations

import importlib.util
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from trm_export.runtime.io import task_for_encoding
from trm_export.runtime.manifest import Manifest, read_manifest
from trm_export.runtime.solver import Solver
from trm_export.tasks import TaskData, exact_accuracy, token_accuracy

BUDGETS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class ReportOptions:
    quick: bool = False  # a small evaluation (100 puzzles, fewer latency samples)
    puzzles: int | None = None  # default: 1000 (the held-out split), 100 with quick
    latency_samples: int | None = None  # puzzles timed one by one per setting; default 50, 10 with quick
    budgets: tuple[int, ...] = BUDGETS
    threads: int | None = None
    progress: bool = True


@dataclass
class Measurement:
    """One (variant, backend, loop setting)."""

    variant: str
    precision: str
    backend: str
    mode: str  # fixed | adaptive
    budget: int
    exact_accuracy: float
    token_accuracy: float
    mean_steps: float
    latency_ms_p50: float  # per puzzle, batch 1
    latency_ms_p95: float
    throughput: float  # puzzles/s at `batch`
    batch: int
    size_mb: float
    peak_rss_mb: float | None  # peak resident memory of the process while measuring this variant


@dataclass
class DriftCurve:
    variant: str
    relative_error: list[float]  # per step: ||z_H - z_H_fp32|| / ||z_H_fp32||, mean over puzzles
    cosine: list[float]  # per step: mean cosine similarity of z_H with FP32's


@dataclass
class ReportData:
    bundle: str
    target: str
    host: str
    task: str
    puzzles: int
    measurements: list[Measurement] = field(default_factory=list)
    drift: list[DriftCurve] = field(default_factory=list)
    not_measured: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


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


def _data_for(manifest: Manifest, count: int) -> TaskData:
    task = task_for_encoding(manifest.task)
    if task is None:
        raise ValueError("the report needs labelled puzzles: this bundle's task is not a shipped one")
    return task.split("heldout", size=min(count, 1000))


def _backends(manifest: Manifest, variant: str) -> list[str]:
    backends = ["onnxruntime"]
    if variant in manifest.build.get("engines", {}) and importlib.util.find_spec("tensorrt") is not None:
        backends.append("tensorrt")
    return backends


def measure_setting(solver: Solver, data: TaskData, mode: str, budget: int, latency_samples: int,
                    batch_solver: Solver) -> dict:
    """Accuracy and throughput at the target batch, latency at batch 1, for one loop setting."""
    start = time.perf_counter()
    result = batch_solver.solve(data.inputs, data.puzzle_ids, mode=mode, max_steps=budget)
    throughput = len(data) / (time.perf_counter() - start)
    times = []
    for i in range(min(latency_samples, len(data))):
        t0 = time.perf_counter()
        solver.solve(data.inputs[i:i + 1], data.puzzle_ids[i:i + 1], mode=mode, max_steps=budget)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"exact_accuracy": exact_accuracy(result.predictions, data.labels),
            "token_accuracy": token_accuracy(result.predictions, data.labels),
            "mean_steps": float(result.steps_used.mean()), "latency_ms_p50": statistics.median(times),
            "latency_ms_p95": float(np.percentile(times, 95)), "throughput": throughput}


def drift_curve(bundle: Path, variant: str, data: TaskData, steps: int, threads: int | None) -> DriftCurve:
    """z_H of `variant` against fp32 at every step of the fixed loop, on the same puzzles."""
    states = {}
    for name in ("fp32", variant):
        solver = Solver(bundle, variant=name, batch_size=len(data), threads=threads, verify=False)
        per_step = []
        solver.solve(data.inputs, data.puzzle_ids, mode="fixed", max_steps=steps,
                     on_step=lambda idx, st, qh, qc, s=solver, out=per_step: out.append(s.backend.state(len(idx))[0]))
        states[name] = per_step
    rel, cos = [], []
    for ref, other in zip(states["fp32"], states[variant], strict=True):
        a, b = ref.reshape(len(ref), -1), other.reshape(len(other), -1)
        rel.append(float(np.mean(np.linalg.norm(b - a, axis=1) / np.linalg.norm(a, axis=1))))
        cos.append(float(np.mean(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))))
    return DriftCurve(variant, rel, cos)


def measure_bundle(bundle: str | Path, options: ReportOptions = ReportOptions()) -> ReportData:
    bundle = Path(bundle)
    manifest = read_manifest(bundle, verify=True)
    count = options.puzzles or (100 if options.quick else 1000)
    samples = options.latency_samples or (10 if options.quick else 50)
    data = _data_for(manifest, count)
    from trm_export.targets.registry import get_target

    target = get_target(manifest.target)
    batch = target.batch.opt
    report = ReportData(str(bundle), target.name, f"{platform.machine()}, {platform.system()}",
                        manifest.task.name or "custom", len(data))
    if target.runtime == "tensorrt" and not manifest.build.get("engines"):
        report.not_measured.append(f"TensorRT on {target.name}: no engine in this bundle (build it on the device "
                                   "with `trm-export build`, then re-run `trm-export report` there)")
    settings = [("fixed", b) for b in options.budgets] + [("adaptive", max(options.budgets))]
    jobs = [(v, b) for v in sorted(manifest.graphs) for b in _backends(manifest, v)]
    progress = None
    if options.progress:
        from tqdm import tqdm

        progress = tqdm(total=len(jobs) * len(settings), desc="report", unit="setting")
    for variant, backend in jobs:
        _peak_rss_reset()
        single = Solver(bundle, variant=variant, backend=backend, batch_size=1, threads=options.threads,
                        verify=False)
        batched = Solver(bundle, variant=variant, backend=backend, batch_size=batch, threads=options.threads,
                         verify=False)
        size_mb = (bundle / manifest.graphs[variant].file).stat().st_size / 1e6
        for mode, budget in settings:
            figures = measure_setting(single, data, mode, budget, samples, batched)
            report.measurements.append(Measurement(variant, manifest.graphs[variant].precision, single.backend.name,
                                                   mode, budget, batch=batch, size_mb=size_mb,
                                                   peak_rss_mb=_peak_rss_mb(), **figures))
            if progress is not None:
                progress.update()
    if progress is not None:
        progress.close()
    steps = max(options.budgets)
    drift_data = data.select(np.arange(min(len(data), 64)))
    for variant in sorted(manifest.graphs):
        if variant != "fp32":
            report.drift.append(drift_curve(bundle, variant, drift_data, steps, options.threads))
    return report
