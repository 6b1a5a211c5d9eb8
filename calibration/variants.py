"""Add reduced-precision variants to a bundle: FP32 bundle in, new bundle out with int8 / fp16 graphs beside it.

One call does the whole job (`add_variants`):
1. puzzles: calibration puzzles (the user's `--calib` file, or the task's "calibration" split) and evaluation
   puzzles (the task's "heldout" split, disjoint from calibration);
2. record the step graph's inputs at every step of the FP32 loop on the calibration puzzles (`data`);
3. per calibration method: fit ranges, build the Q/DQ graph (`quantize`), check it against TensorRT's rules
   and the target (`qdq`), compare it with FP32 through the runtime's loop (`compare`);
4. mixed precision from the best method (`mixed`), FP16 for GPU targets (`fp16`);
5. golden tolerances per variant, measured on the bundle's golden puzzles, then the runtime's own self-check
   (`verify_bundle`) and `check_bundle` on the staged bundle; only a bundle that passes both is committed,
   atomically (export.staging), and an existing output is replaced only with `force`.

Each variant keeps the FP32 graph's input and output names and float32 I/O, so `Solver(bundle, variant=...)`
runs it unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from trm_export.calibration.choice import choose_variant, step_latency_ms
from trm_export.calibration.compare import CompareOptions, VariantComparison, compare_graph, run_fp32
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
from trm_export.calibration.graph import compact_graph, prepare_graph, weight_bytes
from trm_export.calibration.mixed import MixedOptions, MixedResult, select_float_layers
from trm_export.calibration.qdq import BundleCheck, check_bundle, validate_qdq
from trm_export.calibration.quantize import (
    METHODS,
    CalibrationSettings,
    Int8Options,
    QuantizedGraph,
    calibrate,
    quantize_int8,
)
from trm_export.export.staging import StagedBundle
from trm_export.runtime.manifest import GraphSpec, Manifest, member, read_manifest
from trm_export.runtime.selfcheck import golden_figures, verify_bundle
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

    methods: calibration methods, one `int8-<method>` graph each. mixed: also `int8-mixed` (best method,
    most sensitive layers in float until the drop is within `mixed_options.max_accuracy_drop`). fp16: None
    means "when the target runs TensorRT" (GPUs); True/False force it. calib_puzzles / eval_puzzles: use only
    the first N of the calibration / evaluation puzzles (None: all). threads: ONNX Runtime threads everywhere.
    """

    methods: tuple[str, ...] = METHODS
    mixed: bool = True
    fp16: bool | None = None
    record: RecordOptions = RecordOptions()
    calibration: CalibrationSettings = CalibrationSettings()
    int8: Int8Options = Int8Options()
    mixed_options: MixedOptions = MixedOptions()
    fp16_options: Fp16Options = Fp16Options()
    compare: CompareOptions = CompareOptions()
    calib_puzzles: int | None = None
    eval_puzzles: int | None = None
    force: bool = False
    threads: int | None = None
    progress: bool = True
    # The variant the bundle runs by default (calibration.choice): "int8", "fp16", "fp32" or "best", chosen within
    # mixed_options.max_accuracy_drop; None keeps the source bundle's.
    choose: str | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise CalibrationError(f"unknown calibration method(s) {unknown}; available: {', '.join(METHODS)}")
        if not self.methods and self.fp16 is False:
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

    def summary(self) -> str:
        lines = [f"bundle written: {self.path}"]
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


def _golden_figures(bundle: Path, variant: str, threads: int | None) -> dict[str, float]:
    """What `verify_bundle` measures, as numbers: the basis of the variant's golden tolerances."""
    f = golden_figures(Solver(bundle, variant=variant, provider="cpu", threads=threads))
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
    bundle = Path(bundle)
    manifest = read_manifest(bundle)  # verifies checksums before anything runs
    target = get_target(manifest.target)
    make_fp16 = options.fp16 if options.fp16 is not None else target.runtime == "tensorrt"
    if not options.methods and not make_fp16:
        raise CalibrationError(f"nothing to add for target {target.name}: no calibration method, and fp16 is only "
                               "made for GPU targets unless asked (fp16=True)")
    with StagedBundle(out, force=options.force) as stage, tempfile.TemporaryDirectory(prefix="trm-q.") as tmp:
        work = Path(tmp)
        for rel in manifest.files:  # copied as files: a puzzle table (ARC) can be larger than memory allows
            (stage.path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(member(bundle, rel), stage.path / rel)  # paths checked: inside, no links out
        fp32_spec = manifest.graphs["fp32"]
        fp32_model = onnx.load(bundle / fp32_spec.file)
        fp32_size = (bundle / fp32_spec.file).stat().st_size
        calib_set = _calibration_puzzles(manifest, calib, options.calib_puzzles)
        eval_set = _evaluation_puzzles(manifest, heldout, calib_set, options.eval_puzzles)

        say(f"FP32 loop on {len(eval_set)} evaluation puzzles ({eval_set.source})")
        reference = run_fp32(bundle, eval_set, options.compare)
        prepared = prepare_graph(fp32_model, threads=options.threads)
        graphs: dict[str, GraphSpec] = dict(manifest.graphs)
        comparisons: dict[str, VariantComparison] = {}
        quantized: dict[str, tuple[QuantizedGraph, object]] = {}
        samples: StepSamples | None = None

        def add_graph(variant: str, model: onnx.ModelProto, precision: str, details: dict[str, Any]) -> Path:
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
                                        list(fp32_spec.outputs), details)
            cmp = compare_graph(bundle, stage.path / rel, reference, variant, options.compare, work)
            comparisons[variant] = cmp
            say(f"  {cmp.summary()}, {100 * len(data) / fp32_size:.0f}% of fp32 size")
            return stage.path / rel

        if options.methods:
            samples = record_step_inputs(bundle, calib_set, options.record)
            say(f"recorded {len(samples)} step inputs of {samples.available} (steps {sorted(samples.step_counts())}) "
                f"from {len(calib_set)} calibration puzzles ({calib_set.source})")
        for method in options.methods:
            settings = dataclasses.replace(options.calibration, method=method)
            ranges = calibrate(prepared, samples, settings)
            graph = quantize_int8(prepared, ranges, options.int8)
            quantized[method] = (graph, ranges)
            add_graph(f"int8-{method}", graph.model, "int8", _int8_details(graph, settings, samples, options))

        best = None
        mixed_result = None
        if options.methods:
            best = max(options.methods, key=lambda m: _score(comparisons[f"int8-{m}"]))
            say(f"best calibration method: {best}")
        if options.mixed and best is not None:
            graph, ranges = quantized[best]
            sensitivity = run_fp32(bundle, eval_set.head(options.mixed_options.sensitivity_puzzles), options.compare)
            mixed_result = select_float_layers(bundle, prepared, ranges, reference, sensitivity,
                                               options.mixed_options, options.int8, options.compare, work,
                                               start=(graph, comparisons[f"int8-{best}"]), log=say)
            details = {**_int8_details(mixed_result.graph, dataclasses.replace(options.calibration, method=best),
                                       samples, options), "base": f"int8-{best}",
                       "mixed_precision": mixed_result.details(options.mixed_options)}
            add_graph("int8-mixed", mixed_result.graph.model, "mixed", details)
        if make_fp16:
            converted = convert_fp16(prepared, options.fp16_options)
            add_graph("fp16", converted.model, "fp16", {
                "float32_nodes": len(converted.float32_nodes), "float32_ops": list(converted.float32_ops),
                "keep_norms_float32": options.fp16_options.keep_norms_float32, "io": "float32 (keep_io_types)",
                "tensorrt_11": TENSORRT_11_NOTE["fp16"]})

        # Manifest with the new graphs, golden tolerances measured on the staged bundle, then the self-checks.
        tolerances = dict(manifest.golden["tolerances"])
        new_manifest = dataclasses.replace(manifest, graphs=graphs)
        if options.choose is not None:
            stage.write_manifest(dataclasses.replace(new_manifest, files=stage.checksums()))
            latency = step_latency_ms(stage.path, sorted(graphs), threads=options.threads)
            chosen, record = choose_variant(options.choose, comparisons, options.mixed_options.max_accuracy_drop,
                                            latency)
            new_manifest = dataclasses.replace(new_manifest, default_variant=chosen, choice=record)
            say(f"chosen: {chosen}" + (f" ({record['fallback']})" if "fallback" in record else ""))
        build = write_build_recipes(stage.path, new_manifest)  # TensorRT targets: recipes for the new graphs too
        if build:
            build["engines"] = dict(manifest.build.get("engines", {}))
        new_manifest = dataclasses.replace(new_manifest, build=build, files=stage.checksums())
        stage.write_manifest(new_manifest)
        parity = dict(manifest.parity)
        for variant, cmp in comparisons.items():
            figures = _golden_figures(stage.path, variant, options.threads)
            tolerances[variant] = golden_tolerances(figures)
            parity[variant] = {**cmp.to_dict(), "golden": figures}
        new_manifest = dataclasses.replace(new_manifest, golden={**manifest.golden, "tolerances": tolerances},
                                           parity=parity)
        stage.write_manifest(new_manifest)
        for variant in comparisons:
            report = verify_bundle(stage.path, variant=variant, provider="cpu", threads=options.threads)
            if not report:
                raise CalibrationError(f"{variant} fails the bundle's own self-check:\n{report}")
            parity[variant]["self_check"] = True
        check = check_bundle(stage.path)
        if not check:
            raise CalibrationError(f"the new bundle fails its checks:\n{check}")
        new_manifest = dataclasses.replace(new_manifest, parity=parity)
        path = stage.commit(new_manifest)
        check.bundle = str(path)
    result = QuantizeResult(path, new_manifest, comparisons, best, mixed_result, check,
                            samples.describe() if samples is not None else {})
    say(result.summary())
    return result


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
