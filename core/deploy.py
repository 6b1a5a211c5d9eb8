"""The headline job, `trm-export MODEL --target T`: export, then the target's precision, in one call.

Before any work the plan is made and printed (trm_export.planning: every stage's sample sized from the model's
FLOPs and the data, never the clock, so a busy machine writes the same bundle as a quiet one), then the stages,
each timed: export (fp32 step graph, parity against PyTorch) -> for a target whose precision is not fp32:
recursion-aware calibration, every planned method measured, mixed precision, fp16, the variant chosen within the
accuracy budget (calibration.choice), fp32 and the others kept as fallbacks. The fp32 bundle of the first stage
is a hidden sibling of the output that is removed afterwards; the output itself is written atomically by the last
stage, so a failure leaves any earlier bundle at the output untouched.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trm_export.errors import TrmExportError
from trm_export.export.checkpoint import LoadedCheckpoint
from trm_export.export.pipeline import (
    ExportOptions,
    Puzzles,
    export_bundle,
    export_plan,
    parity_puzzles,
    puzzles_from_file,
    puzzles_from_folder,
)
from trm_export.export.staging import check_writable
from trm_export.planning.plan import NOMINAL_FLOPS, Plan, describe, plan_report, step_flops_of, timing_batch
from trm_export.runtime.manifest import Manifest, TaskEncoding, read_manifest
from trm_export.targets.floor import JetsonGpu, floor_us, gpus_for
from trm_export.targets.registry import get_target
from trm_export.tasks.official import HELDOUT_PUZZLES


@dataclass(frozen=True)
class DeployOptions:
    export: ExportOptions = ExportOptions()
    precision: str | None = None  # None: the target's default_precision; fp32 | fp16 | int8 | best
    max_accuracy_drop: float = 0.5  # points of exact accuracy below fp32
    calib: Path | None = None  # calibration puzzles file; None: the dataset folder's train split, or the task's
    data: Path | None = None  # an official dataset folder: held-out puzzles from test/, calibration from train/
    calib_puzzles: int | None = None  # the first N calibration puzzles (None: as the plan sizes it)
    eval_puzzles: int | None = None  # the first N held-out puzzles each variant is measured on (None: the plan's)
    threads: int | None = None
    report: bool = True  # write report/ (accuracy versus latency of every variant, measured here) into the bundle
    # A recorded plan's fields (planning.read_plan: `--plan FILE`), replayed; the count fields above override them.
    replay: dict | None = None


@dataclass
class DeployResult:
    path: Path
    manifest: Manifest
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        """variant, exact accuracy, puzzles, change against fp32 (points), size, ms/step here, chosen: a line each."""
        m = self.manifest
        choice = m.choice or {}
        drops = {**{v: r["accuracy_drop_points"] for v, r in choice.get("screened_only", {}).items()},
                 **choice.get("accuracy_drop_points", {})}
        ms = choice.get("ms_per_step_here", {})
        measured = [p for p in m.parity.values() if p.get("fp32_exact_accuracy") is not None]
        widest = max(measured, key=lambda p: p["puzzles"], default=None)  # fp32 on the most evaluation puzzles
        fp32_size = (self.path / m.graphs["fp32"].file).stat().st_size
        gpu, flops = _estimate_basis(m)
        estimate = f"{'device est.':>13}" if gpu else ""
        lines = [f"{'variant':<16}{'exact acc.':>11}{'puzzles':>9}{'vs fp32':>9}{'size':>7}{'ms/step here':>14}"
                 f"{estimate}  chosen"]
        for name in sorted(m.graphs, key=lambda v: (v != m.default_variant, v)):
            parity = m.parity.get(name, {})
            if name == "fp32":  # without labels, the count of the evaluation the choice was made on
                acc, n = ((widest["fp32_exact_accuracy"], widest["puzzles"]) if widest else
                          (parity.get("bundle_exact_accuracy"), choice.get("puzzles") or parity.get("puzzles")))
            else:
                acc, n = parity.get("exact_accuracy"), parity.get("puzzles")
            size = (self.path / m.graphs[name].file).stat().st_size
            change = f"{-drops[name] or 0.0:+.2f}" if name in drops else "-"  # "or": no "-0.00" for fp32
            floor = (f"{floor_us(flops, 1, m.graphs[name].precision, gpu):>10.1f} us" if gpu else "")
            lines.append(f"{name:<16}{f'{100 * acc:.1f}%' if acc is not None else '-':>11}{n or '-':>9}{change:>9}"
                         f"{f'{100 * size / fp32_size:.0f}%':>7}{f'{ms[name]:.2f}' if name in ms else '-':>14}"
                         f"{floor}  {'<-' if name == m.default_variant else ''}".rstrip())
        if choice.get("timing_load"):
            lines.append(choice["timing_load"])
        if gpu:
            lines.append(f"device est.: on-paper floor of one step on the {gpu.name}'s GPU (matmul FLOPs / its dense "
                         "peak in the variant's precision), an estimate: `trm-export report .` on the device measures "
                         "and recommends; ms/step here is this CPU's")
        return "\n".join(lines)


def _estimate_basis(manifest: Manifest) -> tuple[JetsonGpu | None, int]:
    """(the smallest GPU the bundle's engines may land on, FLOPs per puzzle-step) for a Jetson bundle's estimate
    column; (None, 0) for any other target or a model whose FLOPs are unknown."""
    gpus, flops = gpus_for(get_target(manifest.target)), step_flops_of(manifest)
    return (gpus[0], flops) if gpus and flops else (None, 0)


def resolve_precision(target: str, precision: str | None) -> str:
    resolved = precision or get_target(target).default_precision
    from trm_export.calibration.choice import PRECISIONS

    if resolved not in PRECISIONS:
        raise TrmExportError(f"unknown precision {resolved!r}; choose one of {', '.join(PRECISIONS)}")
    return resolved


def deploy(checkpoint: LoadedCheckpoint, out: Path, options: DeployOptions, puzzles: Puzzles | None = None,
           log: Callable[[str], None] = print) -> DeployResult:
    """Export `checkpoint` to `out` at the target's precision (see the module docstring)."""
    out = Path(out)
    precision = resolve_precision(options.export.target, options.precision)
    check_writable(out)
    if out.exists() and not options.export.force:
        raise TrmExportError(f"{out} already exists; pass --force to replace it")
    calib, heldout = options.calib, None
    if options.data is not None:  # read and checked before any work: a bad folder fails in a second
        options, puzzles, calib, heldout = _from_folder(checkpoint, options, puzzles, precision)
    elif precision != "fp32" and calib is None:
        _check_calibration_split(checkpoint)
    if isinstance(calib, Path):  # read once, before any work: its count sizes the plan
        from trm_export.calibration.data import PuzzleSet

        given = puzzles_from_file(calib, checkpoint.config)
        calib = PuzzleSet(given.tokens, given.puzzle_ids, None, given.source)
    export_options = dataclasses.replace(options.export, replay=options.replay)
    puzzles = parity_puzzles(checkpoint, puzzles, export_options)[0]
    plan = _plan(checkpoint, puzzles, precision, options, export_options, calib, heldout)
    for line in describe(plan, _seconds_here(checkpoint, puzzles, plan)):
        log(line)
    export_options = dataclasses.replace(export_options, plan=plan)
    times: dict[str, float] = {}
    start = time.perf_counter()
    if precision == "fp32":
        path, manifest, _ = export_bundle(checkpoint, out, export_options, puzzles=puzzles)
        times["export + parity"] = time.perf_counter() - start
        if options.report:
            start = time.perf_counter()
            _fp32_report(path, options, plan, log)
            times["report"] = time.perf_counter() - start
        return DeployResult(path, manifest, times)

    from trm_export.calibration import MixedOptions, QuantizeOptions, add_variants

    source = out.parent / f".{out.name}.source-{os.getpid()}"
    try:
        def fp32_log(message: str) -> None:  # the fp32 stage's own bundle is internal: not announced as written
            if options.export.progress:
                print(f"fp32 graph checked; adding the {precision} variants" if message.startswith("bundle written")
                      else message, flush=True)

        export_bundle(checkpoint, source, dataclasses.replace(export_options, force=True), puzzles=puzzles,
                      log=fp32_log)
        times["export + parity"] = time.perf_counter() - start
        start = time.perf_counter()
        log(f"{precision} for target {options.export.target}: calibrating on every step's state, every method "
            f"measured, chosen within {options.max_accuracy_drop:g} points of fp32")
        result = add_variants(source, out, QuantizeOptions(
            fp16=True, mixed_options=MixedOptions(max_accuracy_drop=options.max_accuracy_drop), choose=precision,
            force=options.export.force, threads=options.threads, progress=options.export.progress,
            report=options.report, plan=plan),
            calib=calib, heldout=heldout, log=log)
        times.update(result.stage_seconds)
    finally:
        shutil.rmtree(source, ignore_errors=True)
    return DeployResult(result.path, read_manifest(result.path), times)


def _plan(checkpoint: LoadedCheckpoint, puzzles: Puzzles, precision: str, options: DeployOptions,
          export_options: ExportOptions, calib, heldout) -> Plan:
    """The whole run's plan, before any work: the export's part, then the variants' (or an fp32 report's)."""
    plan = export_plan(checkpoint, puzzles, export_options)
    cfg, target = checkpoint.config, get_target(options.export.target)
    if precision == "fp32":
        if not options.report:
            return plan
        available = len(heldout) if heldout is not None else _split_size(checkpoint, "heldout")
        if not available:  # a custom task without --data: the report is skipped, said at its turn
            return plan
        batch = timing_batch(cfg.step_flops, target.batch.opt)
        fixed = (options.replay or {}).get("report_puzzles") or options.eval_puzzles
        return plan.replace(timing_batch=batch, report_puzzles=min(available, fixed or plan_report(
            cfg.step_flops, cfg.halt_max_steps, available, 1, batch)))
    from trm_export.calibration.variants import QuantizeOptions, quantize_plan

    n_calib = len(calib) if calib is not None else _split_size(checkpoint, "calibration")
    n_eval = len(heldout) if heldout is not None else _split_size(checkpoint, "heldout") or n_calib
    return quantize_plan(plan, n_eval, n_calib, QuantizeOptions(
        calib_puzzles=options.calib_puzzles, eval_puzzles=options.eval_puzzles, replay=options.replay),
        target.batch.opt)


def _split_size(checkpoint: LoadedCheckpoint, split: str) -> int:
    """Puzzles in the shipped task's fixed split (0 when the model's task has none)."""
    from trm_export.export.accuracy import task_for_config

    try:
        return int(task_for_config(checkpoint.config).split_sizes.get(split, 0))
    except ValueError:
        return 0


ESTIMATE_BATCH = 32  # the work runs in batches of 64-256 puzzles; one puzzle's step is all per-op overhead


def _seconds_here(checkpoint: LoadedCheckpoint, puzzles: Puzzles, plan: Plan) -> float:
    """The plan's work at this machine's rate, from the fastest of three timed reference steps of a batch (after
    one that warms up). Printed only: it decides nothing."""
    from trm_export.export.reference import run_reference

    batch = min(ESTIMATE_BATCH, len(puzzles.tokens))
    times = []
    for _ in range(4):
        start = time.perf_counter()
        run_reference(checkpoint.model, puzzles.tokens[:batch], puzzles.puzzle_ids[:batch], max_steps=1)
        times.append(time.perf_counter() - start)
    rate_here = plan.step_flops * batch / max(min(times[1:]), 1e-9)
    return plan.nominal_seconds() * NOMINAL_FLOPS / rate_here


def _fp32_report(path: Path, options: DeployOptions, plan: Plan, log: Callable[[str], None]) -> None:
    """The report of an fp32 bundle: its own accuracy run on the plan's puzzles (the export measured no variant)."""
    from trm_export.report import ReportOptions, measure_bundle, write_report
    from trm_export.runtime.io import task_for_encoding

    manifest = read_manifest(path)
    if task_for_encoding(manifest.task) is None and options.data is None:
        log("report skipped: it needs labelled puzzles (run `trm-export report BUNDLE --data DIR` with the official "
            "dataset folder)")
        return
    log(f"report: accuracy versus latency here, on {plan.report_puzzles} held-out puzzles (the plan's)")
    try:
        data = measure_bundle(path, ReportOptions(threads=options.threads, puzzles=plan.report_puzzles,
                                                  progress=options.export.progress, latency_seconds=0.5,
                                                  data=options.data))
        write_report(data, path / "report", options.max_accuracy_drop)
    except TrmExportError as exc:  # the bundle is written and verified: say what is missing, do not fail it
        log(f"WARNING: report not written ({exc}); the bundle at {path} is complete and verified; `trm-export "
            f"report {path}{' --data DIR' if options.data else ''}` writes it")


def _from_folder(checkpoint: LoadedCheckpoint, options: DeployOptions, puzzles: Puzzles | None, precision: str):
    """(options, parity puzzles, calibration puzzles, held-out puzzles) from the official dataset folder (--data):
    held-out ones with labels from test/ (parity unless --puzzles gave others, evaluation, report), calibration ones
    from train/ unless --calib gave others, and the puzzle table's row names from identifiers.json (ARC)."""
    from trm_export.calibration.data import PuzzleSet, folder_split
    from trm_export.tasks.official import CALIBRATION_PUZZLES

    folder = Path(options.data)
    if (folder / "identifiers.json").is_file():
        options = dataclasses.replace(options, export=dataclasses.replace(options.export,
                                                                          identifiers=folder / "identifiers.json"))
    tested = puzzles_from_folder(folder, checkpoint.config, options.eval_puzzles or HELDOUT_PUZZLES)
    heldout = PuzzleSet(tested.tokens, tested.puzzle_ids, tested.labels, tested.source)
    calib = options.calib
    if precision != "fp32" and calib is None:
        calib = folder_split(folder, "calibration", _encoding(checkpoint), options.calib_puzzles or CALIBRATION_PUZZLES)
    if options.export.keep_puzzles is not None:  # a bundle of a few rows can run only the puzzles of those rows
        from trm_export.export.puzzle_rows import only_kept

        keep = _kept_identifiers(checkpoint, options)
        heldout = only_kept(heldout, keep, "held-out")
        if isinstance(calib, PuzzleSet):
            calib = only_kept(calib, keep, "calibration")
    return options, puzzles or tested, calib, heldout


def _kept_identifiers(checkpoint: LoadedCheckpoint, options: DeployOptions):
    from trm_export.export.puzzle_rows import select_rows
    from trm_export.tasks.arc import read_identifiers

    names = read_identifiers(options.export.identifiers) if options.export.identifiers else None
    return select_rows(options.export.keep_puzzles, checkpoint.config.num_puzzle_identifiers, names)


def _encoding(checkpoint: LoadedCheckpoint) -> TaskEncoding:
    """The bundle's task encoding, before the bundle exists: what a dataset folder is checked against."""
    cfg = checkpoint.config
    return TaskEncoding(None, cfg.vocab_size, cfg.seq_len, 0, None, cfg.prefix_len, cfg.num_puzzle_identifiers, None)


def _check_calibration_split(checkpoint: LoadedCheckpoint) -> None:
    """Calibration puzzles must exist before the export starts: the task's split, or the user's file."""
    from trm_export.export.accuracy import task_for_config

    try:
        task_for_config(checkpoint.config)
    except ValueError as exc:
        raise TrmExportError(f"INT8/FP16 needs calibration puzzles and {exc}: give the official dataset folder "
                             "(--data DIR: its train split) or --calib FILE (real puzzles of the training "
                             "distribution, never the evaluation set), or --precision fp32") from None
