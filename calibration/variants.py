"""Add reduced-precision variants to a bundle: FP32 bundle in, new bundle out with int8 / fp16 graphs beside it.

One call does the whole job (`add_variants`):
1. puzzles: calibration puzzles (the user's `--calib` file, or the task's "calibration" split) and evaluation
   puzzles (the task's "heldout" split, disjoint from calibration);
2. record the step graph's inputs at every step of the FP32 loop on the calibration puzzles (`data`);
3. per calibration method: fit ranges, build the Q/DQ graph (`quantize`), check it against TensorRT's rules
   and the target (`qdq`), compare it with FP32 through the runtime's loop (`compare`);
4. mixed precision from the best method (`mixed`), FP16 for GPU targets (`fp16`);
5. golden tolerances per variant, measured on the bundle's golden puzzles, then the runtime's own self-check
   verdict (`golden_report`, on those figures, through the final manifest and checksums) and `check_bundle` on the
   staged bundle; only a bundle that passes both is committed,
   atomically (export.staging), and an existing output is replaced only with `force`.

Each variant keeps the FP32 graph's input and output names and float32 I/O, so `Solver(bundle, variant=...)`
runs it unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from trm_export.calibration.choice import PRECISIONS, choose_variant, step_timings
from trm_export.calibration.compare import CompareOptions, Fp32Run, VariantComparison, compare_graph, run_fp32
from trm_export.calibration.data import (
    CalibrationError,
    PuzzleSet,
    RecordOptions,
    StepSamples,
    load_calibration_puzzles,
    record_step_inputs,
    task_split,
)
from trm_export.calibration.fp16 import Fp16Options, convert_fp16
from trm_export.calibration.graph import compact_graph, prepare_graph, quantizable_groups, weight_bytes
from trm_export.calibration.mixed import MixedOptions, MixedResult, select_float_layers
from trm_export.calibration.qdq import BundleCheck, check_bundle, validate_qdq
from trm_export.calibration.quantize import (
    METHODS,
    CalibrationSettings,
    Int8Options,
    QuantizedGraph,
    calibrate,
    quantize_dynamic_int8,
    quantize_int8,
)
from trm_export.export.onnx_graph import contrib_ops
from trm_export.export.onnxruntime_ops import MULTI_HEAD_ATTENTION
from trm_export.export.staging import StagedBundle
from trm_export.planning.plan import (
    SAMPLE_FIELDS,
    Plan,
    check_replay,
    describe,
    plan_quantize,
    recorded_fields,
    step_flops_of,
)
from trm_export.report.latency import StepTiming, faster_beyond_noise, load_note
from trm_export.report.measure import (
    BUDGETS,
    DriftCurve,
    ReportData,
    host_description,
    rounding_notes,
    settings_of,
    trained_rows,
)
from trm_export.report.render import write_report
from trm_export.report.trajectory import Trajectory, puzzle_progress
from trm_export.runtime.graph_file import read_graph
from trm_export.runtime.manifest import MANIFEST_NAME, GraphSpec, Manifest, member, read_manifest
from trm_export.runtime.selfcheck import golden_figures, golden_report
from trm_export.runtime.solver import Solver
from trm_export.targets.engines import write_build_recipes
from trm_export.targets.registry import get_target

TENSORRT_11_NOTE = {
    "int8": "explicit Q/DQ: builds on TensorRT 8.5/10.x (INT8 flag) and 11.x (strongly typed, --stronglyTyped); "
            "in a strongly typed build the ops outside Q/DQ run in the graph's float32",
    "fp16": "float16 tensors in the graph: builds as FP16 on TensorRT 11.x (strongly typed) without builder flags; "
            "norm statistics stay float32 there too",
}


@dataclass(frozen=True)
class QuantizeOptions:
    """Everything `add_variants` can be asked; every field has a working default.

    methods: calibration methods, one `int8-<method>` graph each. mixed: `int8-mixed`, the best method with its
    most sensitive layers in float until the drop is within `mixed_options.max_accuracy_drop`; None builds it
    only when the best method misses that budget (else it would duplicate that graph), True always, False never.
    fp16: None
    means "when the target runs TensorRT" (GPUs); True/False force it. calib_puzzles / eval_puzzles: use only
    the first N of the calibration / evaluation puzzles (None: all). threads: ONNX Runtime threads everywhere.
    """

    methods: tuple[str, ...] | None = None  # None: as many of METHODS as the plan's work budget covers, in order
    mixed: bool | None = None
    fp16: bool | None = None
    # int8-dynamic (calibration.quantize.quantize_dynamic_int8: ONNX Runtime's integer MatMuls, activations
    # quantized per step): None builds it where the target runs ONNX Runtime and int8 is asked for.
    dynamic: bool | None = None
    record: RecordOptions = RecordOptions()
    calibration: CalibrationSettings = CalibrationSettings()
    int8: Int8Options = Int8Options()
    mixed_options: MixedOptions = MixedOptions()
    fp16_options: Fp16Options = Fp16Options()
    compare: CompareOptions = CompareOptions()
    # The first N calibration / evaluation puzzles; None: as many as the plan's work budgets cover
    # (trm_export.planning: counted from the model's FLOPs, never timed). Every variant is measured on the same
    # evaluation puzzles; when the plan cuts them, the screening sample is a fifth of them.
    calib_puzzles: int | None = None
    eval_puzzles: int | None = None
    # The whole plan (the one command sizes it before any work); None: this stage's part is sized here, on top of
    # the source bundle's recorded plan, with `replay`'s fields (a recorded plan) and the fields above taking
    # precedence.
    plan: Plan | None = None
    replay: dict[str, Any] | None = None
    # Every graph is first measured on at most this many evaluation puzzles; the best calibration method (unless
    # its answers there already put it past the accuracy budget on all), and any variant the choice may fall back
    # to, then on all of them (None: every graph on all).
    screen_puzzles: int | None = 200
    force: bool = False
    threads: int | None = None
    progress: bool = True
    # The variant the bundle runs by default (calibration.choice): "int8", "fp16", "fp32" or "best", chosen within
    # mixed_options.max_accuracy_drop; None keeps the source bundle's.
    choose: str | None = None
    # Write report/ (accuracy versus latency of every variant, from the measurements above) into the bundle.
    report: bool = False

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods or () if m not in METHODS]
        if unknown:
            raise CalibrationError(f"unknown calibration method(s) {unknown}; available: {', '.join(METHODS)}")
        if self.methods == () and self.fp16 is False:
            raise CalibrationError("nothing to add: no calibration method and fp16=False")


@dataclass
class QuantizeResult:
    path: Path
    manifest: Manifest
    comparisons: dict[str, VariantComparison]
    best_method: str | None
    mixed: MixedResult | None
    check: BundleCheck
    samples: dict[str, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    not_built: list[str] = field(default_factory=list)  # calibration methods the plan left out

    def summary(self) -> str:
        lines = [f"bundle written: {self.path}"]
        if self.not_built:
            lines.append(f"  {_not_built_words(self.not_built)}")
        for variant, cmp in self.comparisons.items():
            size = self.manifest.graphs[variant].details.get("size_ratio_fp32")
            lines.append(f"  {cmp.summary()}" + (f", {100 * size:.0f}% of the fp32 graph's size" if size else ""))
        if self.mixed is not None:
            lines.append(f"  int8-mixed float layers: {list(self.mixed.float_layers) or 'none'}")
        return "\n".join(lines)


def _threads(options: QuantizeOptions) -> QuantizeOptions:
    if options.threads is None:
        return options
    t = options.threads
    return dataclasses.replace(options, record=dataclasses.replace(options.record, threads=t),
                               calibration=dataclasses.replace(options.calibration, threads=t),
                               compare=dataclasses.replace(options.compare, threads=t))


def _calibration_puzzles(manifest: Manifest, calib: PuzzleSet | str | Path | None, n: int | None) -> PuzzleSet:
    if isinstance(calib, PuzzleSet):
        return calib.head(n)
    if calib is not None:
        return load_calibration_puzzles(calib, manifest).head(n)
    return task_split(manifest, "calibration", n)


def _evaluation_puzzles(manifest: Manifest, heldout: PuzzleSet | None, calib: PuzzleSet, n: int | None) -> PuzzleSet:
    if heldout is not None:
        return heldout.head(n)
    try:
        return task_split(manifest, "heldout", n)
    except CalibrationError:
        return dataclasses.replace(calib.head(n), source=f"{calib.source} (no held-out split for this task: "
                                                         "compared on the calibration puzzles)")


def _tolerance_figures(f: dict[str, float]) -> dict[str, float]:
    """What `verify_bundle` measures (selfcheck.golden_figures), as the variant's golden tolerances read it."""
    return {"puzzles": f["puzzles"], "steps": f["steps"], "q_abs": max(f["q_halt_abs"], f["q_continue_abs"]),
            "q_sign_agreement": f["q_sign_agreement"],
            "predictions_identical": min(f["fixed_identical"], f["adaptive_steps_identical"], f["adaptive_identical"])}


def golden_tolerances(figures: dict[str, float]) -> dict[str, float]:
    """Tolerances a correct graph of this variant meets: what it measured here, with room for other hardware.

    q_abs: twice the measured error (at least 1e-3); sign agreement and identical answers: the measured
    fraction less one value / one puzzle (int8 kernels round differently on ARM, VNNI or a GPU). A wrong graph
    (wrong scales, a broken weight) misses them by far more than that.
    """
    q_abs = max(1e-3, 2.0 * figures["q_abs"])
    unit = 10.0 ** (math.floor(math.log10(q_abs)) - 1)  # round up to two significant digits
    return {"q_abs": math.ceil(q_abs / unit) * unit,
            "q_sign_agreement": max(0.0, figures["q_sign_agreement"] - 1.0 / (figures["steps"] * figures["puzzles"])),
            "predictions_identical": max(0.0, figures["predictions_identical"] - 1.0 / figures["puzzles"])}


def add_variants(bundle: str | Path, out: str | Path, options: QuantizeOptions = QuantizeOptions(),
                 calib: PuzzleSet | str | Path | None = None, heldout: PuzzleSet | None = None,
                 log: Callable[[str], None] | None = None) -> QuantizeResult:
    """Write a new bundle at `out`: the bundle at `bundle` plus int8 / int8-mixed / fp16 step graphs.

    `calib`: calibration puzzles (a PuzzleSet, or a file: .npy tokens or the task's text format); default the
    task's calibration split. `heldout`: evaluation puzzles; default the task's held-out split. Raises
    (and writes nothing) when a graph breaks the Q/DQ rules or fails the bundle's self-check.
    """
    options = _threads(options)
    say = log or ((lambda m: print(m, flush=True)) if options.progress else (lambda m: None))
    clock = _StageClock()
    bundle = Path(bundle)
    manifest = read_manifest(bundle)  # verifies checksums before anything runs
    target = get_target(manifest.target)
    make_fp16 = options.fp16 if options.fp16 is not None else target.runtime == "tensorrt"
    if options.methods == () and not make_fp16:
        raise CalibrationError(f"nothing to add for target {target.name}: no calibration method, and fp16 is only "
                               "made for GPU targets unless asked (fp16=True)")
    if options.int8.quantize_attention and MULTI_HEAD_ATTENTION in manifest.graphs["fp32"].onnxruntime_ops:
        raise CalibrationError("--quantize-attention: this bundle's attention is ONNX Runtime's fused "
                               "MultiHeadAttention (cpu target), whose products stay float; re-export with "
                               "--standard-ops to quantize them")
    budget = options.mixed_options.max_accuracy_drop
    with StagedBundle(out, force=options.force) as stage, stage.work_dir() as work:
        for rel in manifest.files:  # copied as files: a puzzle table (ARC) can be larger than memory allows
            (stage.path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(member(bundle, rel), stage.path / rel)  # paths checked: inside, no links out
        fp32_spec = manifest.graphs["fp32"]
        fp32_model = onnx.load_from_string(read_graph(bundle / fp32_spec.file))  # every weight inside it
        fp32_size = (bundle / fp32_spec.file).stat().st_size
        calib_set = _calibration_puzzles(manifest, calib, None)
        eval_set = _evaluation_puzzles(manifest, heldout, calib_set, None)
        plan = options.plan or quantize_plan(recorded_plan(manifest), len(eval_set), len(calib_set), options,
                                             target.batch.opt)
        if options.plan is None:
            for line in describe(plan, export=False):
                say(line)
        methods = plan.methods or ()
        calib_set, eval_set = calib_set.head(plan.calib_puzzles), eval_set.head(plan.eval_puzzles)
        n_eval, screen = len(eval_set), plan.screen_puzzles
        say(f"FP32 loop on {n_eval} evaluation puzzles ({eval_set.source}): the reference of every variant")
        with puzzle_progress("fp32", n_eval, options.progress) as tick:
            reference = run_fp32(bundle, eval_set, options.compare, on_chunk=tick)
        clock.lap("fp32 reference")
        prepared = prepare_graph(fp32_model, threads=options.threads)
        graphs: dict[str, GraphSpec] = dict(manifest.graphs)
        comparisons: dict[str, VariantComparison] = {}
        paths: dict[str, Path] = {}
        quantized: dict[str, tuple[QuantizedGraph, object]] = {}
        samples: StepSamples | None = None
        not_built = [m for m in (options.methods or METHODS) if m not in methods]  # the plan left them out
        skipped_notes: list[str] = []  # what else the plan left out, in words (report, choice record)

        def measure(variant: str, puzzles: int) -> VariantComparison:
            """Compare `variant` with fp32 on the first `puzzles` (extending an earlier, smaller comparison)."""
            previous = comparisons.get(variant)
            done = previous.puzzles if previous else 0
            with puzzle_progress(variant, puzzles, options.progress, start=done) as tick:
                cmp = compare_graph(bundle, paths[variant], reference, variant, options.compare, work,
                                    puzzles=puzzles, previous=previous, on_chunk=tick)
            comparisons[variant] = cmp
            size = graphs[variant].details["size_ratio_fp32"]
            say(f"  {cmp.summary()}, {100 * size:.0f}% of fp32 size")
            return cmp

        def add_graph(variant: str, model: onnx.ModelProto, precision: str, details: dict[str, Any]) -> None:
            model = compact_graph(model)
            report = validate_qdq(model, target, name=variant)
            if not report:
                raise CalibrationError(f"{variant} graph breaks the rules for target {target.name}:\n{report}")
            rel = f"graphs/step_{variant}.onnx"
            data = model.SerializeToString()
            stage.write_bytes(rel, data)
            details = {**details, "size_bytes": len(data), "size_ratio_fp32": len(data) / fp32_size,
                       "weight_bytes": weight_bytes(model), "fp32_weight_bytes": weight_bytes(fp32_model)}
            graphs[variant] = GraphSpec(rel, precision, fp32_spec.opset, model.ir_version, list(fp32_spec.inputs),
                                        list(fp32_spec.outputs), details, onnxruntime_ops=contrib_ops(model))
            paths[variant] = stage.path / rel

        if methods:
            samples = record_step_inputs(bundle, calib_set, options.record)
            say(f"recorded {len(samples)} step inputs of {samples.available} (steps {sorted(samples.step_counts())}) "
                f"from {len(calib_set)} calibration puzzles ({calib_set.source})")
            clock.lap("record calibration inputs")
            if screen < n_eval:
                say(f"each calibration method measured on the first {screen} evaluation puzzles; the best then on "
                    f"all {n_eval}")
        if not_built:
            say(_not_built_words(not_built))
        built: list[str] = []
        for method in methods:
            built.append(method)
            started = time.perf_counter()
            settings = dataclasses.replace(options.calibration, method=method,
                                           attention=options.int8.quantize_attention)
            ranges = calibrate(prepared, samples, settings)
            graph = quantize_int8(prepared, ranges, options.int8)
            quantized[method] = (graph, ranges)
            add_graph(f"int8-{method}", graph.model, "int8", _int8_details(graph, settings, samples, options))
            say(f"int8-{method}: calibrated and quantized in {time.perf_counter() - started:.0f} s; measuring")
            measure(f"int8-{method}", screen)
        best = None
        mixed_result = None
        if built:
            best = max(built, key=lambda m: _score(comparisons[f"int8-{m}"]))
            say(f"best calibration method: {best}")
            if screen < n_eval:
                floor = lowest_drop(comparisons[f"int8-{best}"], reference.trajectory)
                if floor > budget:
                    say(f"int8-{best}: not measured on the other {n_eval - screen} evaluation puzzles: its answers on "
                        f"the first {screen} already put it at least {floor:.1f} points below fp32 on all {n_eval}, "
                        f"past the {budget:g}-point budget")
                else:
                    measure(f"int8-{best}", n_eval)
            clock.lap("calibrate + quantize + measure int8")
        missed = best is not None and comparisons[f"int8-{best}"].accuracy_drop > budget
        mixed_work = 0 if best is None else _mixed_puzzle_steps(prepared, options, n_eval, reference.steps)
        if options.mixed is None and missed and mixed_work > (plan.mixed_puzzle_steps or 0):
            skipped_notes.append(
                f"int8-mixed not built: int8-{best} misses the {budget:g}-point budget, and ranking its layers by "
                f"end-of-loop sensitivity takes {mixed_work:,} puzzle-steps (one loop per layer group), past the "
                f"{plan.mixed_puzzle_steps:,} the plan gives mixed precision at this model's size; `trm-export "
                "quantize BUNDLE --mixed` builds it whatever the work")
            say(skipped_notes[-1])
        elif best is not None and (options.mixed is True or (options.mixed is None and missed)):
            graph, ranges = quantized[best]
            if comparisons[f"int8-{best}"].puzzles < n_eval:  # mixed precision starts from its full measurement
                measure(f"int8-{best}", n_eval)
            sensitivity = run_fp32(bundle, eval_set.head(options.mixed_options.sensitivity_puzzles), options.compare)
            mixed_result = select_float_layers(bundle, prepared, ranges, reference, sensitivity,
                                               options.mixed_options, options.int8, options.compare, work,
                                               start=(graph, comparisons[f"int8-{best}"]), log=say)
            details = {**_int8_details(mixed_result.graph, dataclasses.replace(options.calibration, method=best),
                                       samples, options), "base": f"int8-{best}",
                       "mixed_precision": mixed_result.details(options.mixed_options)}
            add_graph("int8-mixed", mixed_result.graph.model, "mixed", details)
            comparisons["int8-mixed"] = dataclasses.replace(mixed_result.comparison, variant="int8-mixed")
            clock.lap("mixed precision")
        elif options.mixed is None and best is not None:
            say(f"int8-mixed not built: int8-{best} is within {budget:g} points of fp32 with every layer in int8")
        make_dynamic = options.dynamic if options.dynamic is not None else (
            target.runtime == "onnxruntime" and bool(methods))
        if make_dynamic:
            started = time.perf_counter()
            add_graph("int8-dynamic", quantize_dynamic_int8(prepared), "int8", {
                "method": "dynamic", "weights": "int8 per output channel, symmetric",
                "activations": "int8 from each tensor's own range at every step (DynamicQuantizeLinear)",
                "runs_on": "ONNX Runtime's integer MatMul kernels (VNNI / AMX where the CPU has them)"})
            say(f"int8-dynamic: quantized in {time.perf_counter() - started:.0f} s (no calibration); measuring")
            measure("int8-dynamic", n_eval)
            clock.lap("int8-dynamic")
        if make_fp16:
            converted = convert_fp16(prepared, options.fp16_options)
            add_graph("fp16", converted.model, "fp16", {
                "float32_nodes": len(converted.float32_nodes), "float32_ops": list(converted.float32_ops),
                "keep_norms_float32": options.fp16_options.keep_norms_float32, "io": "float32 (keep_io_types)",
                "tensorrt_11": TENSORRT_11_NOTE["fp16"]})
            measure("fp16", screen)
            clock.lap("fp16")

        # Manifest with the new graphs, golden tolerances measured on the staged bundle, then the self-checks.
        tolerances = dict(manifest.golden["tolerances"])
        new_manifest = dataclasses.replace(manifest, graphs=graphs)
        timings: dict[str, tuple[StepTiming, StepTiming]] = {}
        if options.choose is not None or options.report:
            stage.write_manifest(dataclasses.replace(new_manifest, files=stage.checksums()))
            batch = plan.timing_batch or target.batch.opt
            slow = "" if batch == target.batch.opt else (
                f"; batch {batch}, not the target's {target.batch.opt}: a step there is "
                f"{target.batch.opt * plan.step_flops / 1e12:.1f} TFLOP of work")
            say(f"timing one step of each variant here (batch 1 and {batch}{slow})")
            timings = step_timings(stage.path, sorted(graphs), batch, threads=options.threads, seconds=0.5)
            clock.lap("step latency")
        if options.choose is not None:
            extend = _ChoiceBudget(plan.choice_puzzles or 0, n_eval, say)
            chosen, record = _choose(options.choose, comparisons, budget, timings, n_eval, measure, extend)
            if extend is not None and extend.skipped:
                skipped_notes.extend(extend.skipped)
            if not_built:
                record["methods_not_built"] = {"methods": not_built, "why": _not_built_words(not_built)}
            if skipped_notes:
                record["not_built"] = skipped_notes
            note = load_note(t for pair in timings.values() for t in pair)
            if note:
                record["timing_load"] = note
            new_manifest = dataclasses.replace(new_manifest, default_variant=chosen, choice=record)
            say(f"chosen: {chosen}" + (f" ({record['fallback']})" if "fallback" in record else ""))
        # TensorRT targets: recipes for the new graphs too, engines kept; a browser bundle keeps its page entry
        build = {**manifest.build, **write_build_recipes(stage.path, new_manifest)}
        if "engines" in manifest.build:
            build["engines"] = dict(manifest.build["engines"])
        new_manifest = dataclasses.replace(new_manifest, build=build, files=stage.checksums(), plan=plan.to_dict())
        stage.write_manifest(new_manifest)
        parity = dict(manifest.parity)
        measured: dict[str, dict[str, float]] = {}
        for variant, cmp in comparisons.items():
            measured[variant] = golden_figures(Solver(stage.path, variant=variant, provider="cpu",
                                                      threads=options.threads))
            figures = _tolerance_figures(measured[variant])
            tolerances[variant] = golden_tolerances(figures)
            parity[variant] = {**cmp.to_dict(), "golden": figures}
        new_manifest = dataclasses.replace(new_manifest, golden={**manifest.golden, "tolerances": tolerances},
                                           parity=parity)
        stage.write_manifest(new_manifest)
        for variant in comparisons:
            # The bundle as committed (manifest digest, every checksum) against its bars, on the figures just
            # measured from these same files: running the golden puzzles again would only repeat them.
            solver = Solver(stage.path, variant=variant, provider="cpu", threads=options.threads)
            report = golden_report(solver, measured[variant])
            if not report:
                raise CalibrationError(f"{variant} fails the bundle's own self-check:\n{report}")
            parity[variant]["self_check"] = True
        check = check_bundle(stage.path)
        if not check:
            raise CalibrationError(f"the new bundle fails its checks:\n{check}")
        new_manifest = dataclasses.replace(new_manifest, parity=parity)
        clock.lap("golden tolerances + self-check")
        if options.report:
            data = report_data(stage.path, new_manifest, reference, comparisons, timings)
            if not_built:
                data.notes.append(_not_built_words(not_built))
            data.notes += skipped_notes
            data.bundle = str(stage.out)  # where it will be, not the staging folder
            write_report(data, stage.path / "report", budget)
            clock.lap("report")
        path = stage.commit(new_manifest)
        check.bundle = str(path)
    result = QuantizeResult(path, new_manifest, comparisons, best, mixed_result, check,
                            samples.describe() if samples is not None else {}, clock.seconds, not_built)
    if options.choose is None:  # a chosen variant's caller prints its own table
        say(result.summary())
    return result


def report_data(bundle: Path, manifest: Manifest, reference: Fp32Run, comparisons: dict[str, VariantComparison],
                timings: dict[str, tuple[StepTiming, StepTiming]]) -> ReportData:
    """The accuracy-versus-latency report of the variants just measured (no second run): every setting's
    accuracy from each comparison's trajectory, latency from the step timings, drift from the comparisons."""
    steps = reference.steps
    budgets = tuple(sorted({b for b in BUDGETS if b <= steps} | {steps}))
    data = ReportData(str(bundle), manifest.target, f"the export machine ({host_description()}), ONNX Runtime CPU",
                      manifest.task.name or "custom", reference.trajectory.puzzles, reference.puzzles.source,
                      latency_is_the_targets=get_target(manifest.target).tensorrt is None,
                      step_flops=step_flops_of(manifest))
    data.drift = [DriftCurve(v, c.rel_error, c.cosine) for v, c in comparisons.items()]  # needs no labels
    if reference.trajectory.exact is None:
        data.not_measured.append("accuracy: the evaluation puzzles have no labels")
        return data
    data.notes += rounding_notes(manifest)
    data.trained, malformed = trained_rows(manifest)
    data.notes += malformed
    trajectories = {"fp32": reference.trajectory, **{v: c.trajectory for v, c in comparisons.items()}}
    for variant, trajectory in trajectories.items():
        size_mb = (bundle / manifest.graphs[variant].file).stat().st_size / 1e6
        single, batched = timings[variant]
        data.measurements += settings_of(variant, manifest.graphs[variant].precision, "onnxruntime (CPU)",
                                         trajectory, budgets, single, batched, size_mb)
    screened = sorted(v for v, c in comparisons.items() if c.puzzles < reference.trajectory.puzzles)
    if screened:
        data.notes.append(f"{', '.join(screened)}: measured on the first {comparisons[screened[0]].puzzles} puzzles "
                          "only (screening: a variant is measured on all only where it could still be the best "
                          "method or the chosen one)")
    data.not_measured.append(f"TensorRT on {manifest.target}: measured on the device after `trm-export build`, with "
                             "`trm-export report` there" if get_target(manifest.target).tensorrt else
                             "other hosts: re-run `trm-export report` where the bundle runs")
    return data


def _level(variant: str) -> str:
    return variant.split("-", 1)[0]  # int8-minmax, int8-mixed -> int8; fp16; fp32


class _ChoiceBudget:
    """The plan's choice_puzzles: evaluation puzzles the choice may add to screened variants, all together. A variant
    whose remaining puzzles would pass it is not measured further and not chosen (said)."""

    def __init__(self, puzzles: int, n_eval: int, say: Callable[[str], None]) -> None:
        self.puzzles, self.n_eval, self.say = puzzles, n_eval, say
        self.spent = 0
        self.skipped: list[str] = []

    def allows(self, variant: str, done: int) -> bool:
        cost = self.n_eval - done
        if self.spent + cost <= self.puzzles:
            self.spent += cost
            return True
        self.skipped.append(
            f"{variant} not chosen: within the budget on the first {done} evaluation puzzles, but measuring it on "
            f"the other {self.n_eval - done} is past the {self.puzzles - self.spent} puzzles the plan gives the "
            "choice at this model's size (a variant is chosen only on every evaluation puzzle); `trm-export "
            "quantize BUNDLE --eval-puzzles N` with a smaller N measures it on all of them")
        self.say(self.skipped[-1])
        return False


def _choose(precision: str, comparisons: dict[str, VariantComparison], budget: float,
            timings: dict[str, tuple[StepTiming, StepTiming]], n_eval: int,
            measure: Callable[[str, int], VariantComparison],
            extend: _ChoiceBudget | None = None) -> tuple[str, dict[str, Any]]:
    """choose_variant on the variants measured on every evaluation puzzle; a variant measured on the screening
    puzzles only is measured on all first when it could be chosen over the current choice (and, with `extend`,
    when that fits the plan's choice_puzzles)."""
    at_batch = {v: t[1] for v, t in timings.items()}
    refused: set[str] = set()
    while True:
        # Measured on every puzzle, or already past the budget on the screening ones (never chosen either way).
        full = {v: c for v, c in comparisons.items() if c.puzzles == n_eval or c.accuracy_drop > budget + 1e-9}
        chosen, record = choose_variant(precision, full, budget, at_batch)
        order = (list(PRECISIONS[:3]) if precision == "best" else
                 list(PRECISIONS[PRECISIONS.index(precision)::-1]))  # preferred levels first
        rank = order.index(_level(chosen)) if _level(chosen) in order else len(order)
        pending = [v for v, c in comparisons.items() if c.puzzles < n_eval and c.accuracy_drop <= budget + 1e-9
                   and v not in refused
                   and (order.index(_level(v)) < rank if precision != "best" else
                        v in at_batch and chosen in at_batch and faster_beyond_noise(at_batch[v], at_batch[chosen]))]
        if not pending:
            break
        for variant in pending:
            if extend is None or extend.allows(variant, comparisons[variant].puzzles):
                measure(variant, n_eval)
            else:
                refused.add(variant)
    record["puzzles"] = n_eval  # the FP32 reference's: every variant chosen from was measured on all of them
    screened = {v: {"puzzles": c.puzzles, "accuracy_drop_points": round(c.accuracy_drop, 3)}
                for v, c in comparisons.items() if c.puzzles < n_eval}
    if screened:
        record["screened_only"] = screened  # measured on the first puzzles only: never chosen from those
    return chosen, record


def lowest_drop(cmp: VariantComparison, reference: Trajectory) -> float:
    """The smallest accuracy drop (points) `cmp`, measured on the first cmp.puzzles of the reference's, can have on
    all of them, whatever it answers on the rest: with labels, it can at most solve every puzzle fp32 fails there;
    without labels, a changed answer stays changed."""
    n, done = reference.puzzles, cmp.puzzles
    if cmp.trajectory is None:
        return 0.0
    if cmp.trajectory.exact is not None and reference.exact is not None:
        deficit = int(reference.exact[-1, :done].sum()) - int(cmp.trajectory.exact[-1].sum())
        fp32_fails_rest = int((~reference.exact[-1, done:]).sum())
        return max(0.0, 100.0 * (deficit - fp32_fails_rest) / n)
    changed = round((1.0 - cmp.predictions_identical) * done)
    return 100.0 * changed / n


def recorded_plan(manifest: Manifest) -> Plan:
    """The plan a bundle's export recorded; for a bundle written before plans were, one from its shapes."""
    if "step_flops" in (manifest.plan or {}):
        return Plan.from_dict(recorded_fields(manifest.plan, f"{MANIFEST_NAME}: plan"))
    flops = step_flops_of(manifest)
    if flops is None:
        raise CalibrationError("this bundle records no plan and its model config is not one trm-export knows: "
                               "re-export it with this trm-export")
    return Plan.from_dict({"step_flops": flops, "trained_steps": manifest.loop.halt_max_steps})


def quantize_plan(base: Plan, eval_available: int, calib_available: int, options: QuantizeOptions,
                  target_batch: int) -> Plan:
    """This stage's plan (planning.plan_quantize) on top of `base` (the export's): the flags' fields first, then a
    replayed plan's (options.replay), then what the work budgets cover."""
    fixed = dict(options.replay or {})
    if fixed:
        check_replay(fixed, base.step_flops, base.trained_steps, "FILE")
    set_by = {k: "--plan" for k in fixed if k in SAMPLE_FIELDS}
    for name, value, flag in (("eval_puzzles", options.eval_puzzles, "--eval-puzzles"),
                              ("calib_puzzles", options.calib_puzzles, "--calib-puzzles"),
                              ("methods", options.methods, "--methods")):
        if value is not None:
            available = {"eval_puzzles": eval_available, "calib_puzzles": calib_available}.get(name)
            fixed[name], set_by[name] = (value if available is None else min(value, available)), flag
    return plan_quantize(base, eval_available, calib_available, METHODS, options.record.max_samples, target_batch,
                         fixed=fixed, set_by=set_by, screen_most=options.screen_puzzles)


def _mixed_puzzle_steps(prepared, options: QuantizeOptions, n_eval: int, steps: int) -> int:
    """What select_float_layers takes, at least: a loop per ranked group on the sensitivity puzzles, then one try
    on the evaluation puzzles."""
    groups = sum(1 for g in quantizable_groups(prepared) if options.int8.quantize_attention or g.kind == "weight")
    sensitivity = min(options.mixed_options.sensitivity_puzzles, n_eval)
    return (groups * sensitivity + n_eval) * steps


def _not_built_words(methods: list[str]) -> str:
    return (f"{', '.join(f'int8-{m}' for m in methods)} not built: past the plan's work budget for calibration "
            f"methods at this model's size; `trm-export quantize BUNDLE --methods {','.join(methods)}` builds them")


class _StageClock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._start
        self._start = now


def _score(cmp: VariantComparison) -> tuple[float, float]:
    """Higher is better: exact accuracy (or identical answers without labels), then less final drift."""
    primary = cmp.exact_accuracy if cmp.exact_accuracy is not None else cmp.predictions_identical
    return primary, -cmp.final_rel_error


def _int8_details(graph: QuantizedGraph, settings: CalibrationSettings, samples: StepSamples | None,
                  options: QuantizeOptions) -> dict[str, Any]:
    import onnxruntime

    details: dict[str, Any] = {
        "format": "QDQ", "tool": f"onnxruntime.quantization {onnxruntime.__version__}",
        "calibration_method": settings.method, "activations": "int8 symmetric per-tensor",
        "weights": "int8 symmetric per-channel (output channels)", "quantized_ops": ["MatMul", "Gemm"],
        "quantize_attention": options.int8.quantize_attention, "quantized_layers": len(graph.quantized),
        "float_layers": list(graph.float_layers), "tensorrt_11": TENSORRT_11_NOTE["int8"]}
    if settings.method == "percentile":
        details["percentile"] = settings.percentile
    if samples is not None:
        details["calibration"] = {**samples.describe(), "per_step": samples.step_counts()}
    return details
