"""INT8 step graphs with explicit Q/DQ, the form TensorRT 8.5, 10.x and 11.x all build.

The rules (shared/reference/targets.md, checked by `calibration.qdq`): symmetric int8 with zero points 0;
per-channel weights along the output channels (axis 1 of a MatMul's B, axis 0 of a Gemm's B with transB=1);
per-tensor activations; Q/DQ only on the inputs of MatMul/Gemm, so RMS norms, softmax and the residual adds stay
float and TensorRT's fusions stay intact. Weights are stored as int8 initializers (a DQ each), which is what
shrinks the file to about a quarter.

The tool is ONNX Runtime's own quantizer (`quantize_static`, QDQ format), configured for those rules.
NVIDIA's ModelOpt was considered and rejected on dependency weight: its default install pulls several GB of
CUDA wheels into an environment that otherwise needs numpy, onnx and onnxruntime.

Calibration is separated from quantization: the recorded step inputs run through ONNX Runtime's calibrator
once per method (`calibrate`), and the resulting ranges are reused for every quantized graph built from them
(`quantize_int8`; mixed precision builds many). Options are typed here; ONNX Runtime's string-keyed
`extra_options` never leave this module.

Attention products (q @ k^T, softmax @ v) have two activation inputs. The rules allow quantizing them (both
per-tensor), but softmax outputs in [0, 1] get only 7 bits of a symmetric int8 grid; `quantize_attention`
defaults to False (measured: see calibration/__init__.py).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx

from trm_export.calibration.data import CalibrationDataReader, CalibrationError, StepSamples
from trm_export.calibration.graph import QUANTIZABLE_OPS, QuantGroup, quantizable_groups, resolve_groups

METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class CalibrationSettings:
    """How activation ranges are fitted from recorded samples.

    method: "minmax" (the extremes), "entropy" (KL-divergence threshold on a histogram, TensorRT's classic
    calibrator) or "percentile" (clip at `percentile` of |x|). `chunk_samples` bounds memory: the calibrator
    holds every collected tensor of that many samples at once (fewer for a large model: CHUNK_BYTES).
    """

    method: str = "minmax"
    percentile: float = 99.999
    num_bins: int | None = None  # histogram bins; None: ONNX Runtime's default per method (128 / 2048)
    chunk_samples: int = 8
    batch_size: int = 8
    threads: int | None = None
    # Also fit the attention products' inputs (q, k^T, softmax, v): Int8Options.quantize_attention needs them. Off,
    # only what a weighted MatMul/Gemm reads is collected: a paper-size maze's [8, 916, 916] attention tensors
    # made the calibrator hold 24 GB for 8 samples.
    attention: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CalibrationError(f"unknown calibration method {self.method!r}; available: {', '.join(METHODS)}")
        if not 0 < self.percentile <= 100:
            raise CalibrationError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.chunk_samples < 1 or self.batch_size < 1:
            raise CalibrationError("chunk_samples and batch_size must be >= 1")


@dataclass(frozen=True)
class ActivationRanges:
    """Calibrated ranges of every MatMul/Gemm input (ONNX Runtime's TensorsData), for one method."""

    method: str
    samples: int
    data: object  # onnxruntime.quantization.calibrate.TensorsData
    attention: bool = False  # the attention products' inputs were fitted too (CalibrationSettings.attention)

    def save(self, path: Path) -> Path:
        from onnxruntime.quantization import save_tensors_data

        save_tensors_data(self.data, path)
        return path


def _ort_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


@contextlib.contextmanager
def _quiet_ort_logging() -> Iterator[None]:
    """ONNX Runtime's quantizer logs advice through the root logger and prints progress to stdout; keep our
    output to our messages."""
    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    drop = _Drop()
    root.addFilter(drop)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeFilter(drop)


class _Chunk:
    """One collection round: a feed already taken from `reader`, then at most `batches - 1` more.

    ONNX Runtime's calibrators keep every intermediate tensor of a round in memory; rounds bound that. The
    first feed is fetched before the round starts because a round without data is an error there.
    """

    def __init__(self, first: dict, reader: CalibrationDataReader, batches: int):
        self.pending: dict | None = first
        self.reader, self.left, self.samples = reader, batches, 0

    def get_next(self) -> dict | None:
        if self.left <= 0:
            return None
        if self.pending is not None:
            feed, self.pending = self.pending, None
        else:
            feed = self.reader.get_next()
        if feed is None:
            self.left = 0
            return None
        self.left -= 1
        self.samples += len(feed["x"])
        return feed


def calibrate(prepared: onnx.ModelProto, data: StepSamples | CalibrationDataReader,
              settings: CalibrationSettings = CalibrationSettings()) -> ActivationRanges:
    """Fit the activation ranges of every MatMul/Gemm input with ONNX Runtime's calibrator.

    `data`: recorded `StepSamples`, or any reader with `get_next() -> dict | None` (ONNX Runtime's protocol)
    feeding x, z_H, z_L. Either is consumed `chunk_samples` samples at a time.
    """
    import onnxruntime as ort

    if isinstance(data, StepSamples) and len(data) == 0:
        raise CalibrationError("no calibration samples recorded")
    with tempfile.TemporaryDirectory(prefix="trm-calib.") as tmp, _quiet_ort_logging():
        path = Path(tmp) / "model.onnx"
        onnx.save(prepared, path)
        needed = _inputs_to_fit(prepared, settings.attention)
        calibrator = _calibrator(path, Path(tmp) / "aug.onnx", settings, needed)
        # Its own session would use every core; ours takes the caller's thread count.
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if settings.threads:
            options.intra_op_num_threads = settings.threads
            options.inter_op_num_threads = 1
        calibrator.infer_session = ort.InferenceSession(calibrator.augmented_model_path, options,
                                                        providers=["CPUExecutionProvider"])
        chunk = _chunk_samples(prepared, settings, len(needed))
        batch = min(settings.batch_size, chunk)
        reader = data.reader(batch) if isinstance(data, StepSamples) else data
        batches = max(1, chunk // batch)
        count = 0
        while (first := reader.get_next()) is not None:
            chunk = _Chunk(first, reader, batches)
            calibrator.collect_data(chunk)
            count += chunk.samples
        if count == 0:
            raise CalibrationError("the calibration reader gave no data (get_next() returned None at once)")
        ranges = calibrator.compute_data()
        del calibrator
    return ActivationRanges(settings.method, count, ranges, settings.attention)


# What the collected activations of one chunk may take: the calibrator holds them all until the chunk ends (a
# paper-size maze's 122 MatMul inputs are up to 0.7 GB per sample; 8-sample chunks peaked at 11 GB).
CHUNK_BYTES = 1 << 30


def _chunk_samples(model: onnx.ModelProto, settings: CalibrationSettings, tensors: int) -> int:
    """settings.chunk_samples, fewer where `tensors` activations per sample would pass CHUNK_BYTES (each at most
    [positions, 3 x hidden] float32: the widest MatMul input is the MLP's down projection)."""
    x = next((i for i in model.graph.input if i.name == "x"), None)
    dims = [] if x is None else [d.dim_value for d in x.type.tensor_type.shape.dim]
    if len(dims) != 3 or not dims[1] or not dims[2]:
        return settings.chunk_samples  # not a step graph of known shape: as configured
    per_sample = max(1, tensors) * dims[1] * 3 * dims[2] * 4
    return max(1, min(settings.chunk_samples, CHUNK_BYTES // per_sample))


def _inputs_to_fit(model: onnx.ModelProto, attention: bool) -> set[str]:
    """The activations a quantized graph needs ranges for: the non-constant inputs of weighted MatMul/Gemm nodes,
    and of the attention products when those are quantized too (outputs never are: Q/DQ on inputs only)."""
    constants = {i.name for i in model.graph.initializer}
    needed: set[str] = set()
    for node in model.graph.node:
        if node.op_type in QUANTIZABLE_OPS and (attention or (len(node.input) > 1 and node.input[1] in constants)):
            needed.update(t for t in node.input[:2] if t and t not in constants)
    return needed


def _calibrator(model: Path, augmented: Path, settings: CalibrationSettings, needed: set[str]):
    """ONNX Runtime's calibrator for `settings.method` (its create_calibrator's settings, symmetric), collecting
    only `needed`: by default it makes every input and output of every MatMul/Gemm a graph output."""
    from onnxruntime.quantization.calibrate import EntropyCalibrater, MinMaxCalibrater, PercentileCalibrater

    common = {"op_types_to_calibrate": list(QUANTIZABLE_OPS), "augmented_model_path": str(augmented),
              "symmetric": True}
    if settings.method == "minmax":
        calibrator = MinMaxCalibrater(str(model), **common)
    elif settings.method == "entropy":
        calibrator = EntropyCalibrater(str(model), num_bins=settings.num_bins or 128, num_quantized_bins=128, **common)
    else:
        calibrator = PercentileCalibrater(str(model), num_bins=settings.num_bins or 2048,
                                          percentile=settings.percentile, **common)
    select = calibrator.select_tensors_to_calibrate

    def only_needed(graph: onnx.ModelProto) -> tuple[set[str], dict]:
        tensors, value_infos = select(graph)
        return tensors & needed, value_infos

    calibrator.select_tensors_to_calibrate = only_needed
    calibrator.augment_graph()
    return calibrator


@dataclass(frozen=True)
class Int8Options:
    """What the INT8 graph quantizes.

    keep_float: layer labels (see `quantizable_groups`) or node names left in float (mixed precision).
    quantize_attention: also quantize q @ k^T and softmax @ v (two per-tensor activation inputs).
    """

    keep_float: tuple[str, ...] = ()
    quantize_attention: bool = False


@dataclass(frozen=True)
class QuantizedGraph:
    model: onnx.ModelProto
    method: str
    quantized: tuple[str, ...]  # group labels in int8
    float_layers: tuple[str, ...]  # group labels left in float (attention products included when not quantized)


def quantize_int8(prepared: onnx.ModelProto, ranges: ActivationRanges, options: Int8Options = Int8Options()
                  ) -> QuantizedGraph:
    """Explicit Q/DQ INT8 graph of `prepared` (see `graph.prepare_graph`) with calibrated `ranges`."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if options.quantize_attention and not ranges.attention:
        raise CalibrationError("quantize_attention needs the attention products' ranges: calibrate with "
                               "CalibrationSettings(attention=True)")
    groups = quantizable_groups(prepared)
    keep = resolve_groups(groups, options.keep_float)
    if not options.quantize_attention:
        keep += [g for g in groups if g.kind == "activation" and g not in keep]
    excluded = [n for g in keep for n in g.nodes]
    quantized = [g for g in groups if g not in keep]
    if not quantized:
        raise CalibrationError("nothing left to quantize: every MatMul/Gemm is kept in float")
    extra = {
        "ActivationSymmetric": True,  # zero points 0: TensorRT takes symmetric int8 only
        "WeightSymmetric": True,
        "MatMulConstBOnly": not options.quantize_attention,
        "QuantizeBias": False,  # an int32 bias DQ is not TensorRT's Q/DQ; the (tiny Q head) bias stays float
        "OpTypesToExcludeOutputQuantization": list(QUANTIZABLE_OPS),  # Q/DQ on inputs only
        "DedicatedQDQPair": False,
    }
    with tempfile.TemporaryDirectory(prefix="trm-quant.") as tmp, _quiet_ort_logging():
        src, dst, cache = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx", Path(tmp) / "ranges.json"
        onnx.save(prepared, src)
        ranges.save(cache)
        quantize_static(str(src), str(dst), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZABLE_OPS), per_channel=True, reduce_range=False,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                        calibrate_method=_ort_method(ranges.method), extra_options=extra,
                        calibration_cache_path=str(cache))
        model = onnx.load(dst)
    model = restore_float_paths(model)
    model.producer_name, model.producer_version = prepared.producer_name, prepared.producer_version
    return QuantizedGraph(model, ranges.method, tuple(g.label for g in quantized), tuple(g.label for g in keep))


def restore_float_paths(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give float consumers of a quantized tensor the float tensor back; Q/DQ stays on MatMul/Gemm inputs only.

    ONNX Runtime quantizes a tensor for all its readers: the block input that feeds both a MatMul and the
    residual Add (or a Shape) reaches the Add through Q/DQ, and a graph output that a MatMul also reads (z_H_out
    feeds the LM head) is *replaced* by its dequantized copy, which would round the recurrent state to int8 at
    every step. TensorRT's rules (and accuracy) want Q/DQ only in front of the weighted op.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    for dq in graph.node:
        if dq.op_type != "DequantizeLinear" or dq.output[0] not in outputs:
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        out = dq.output[0]
        dq.output[0] = f"{out}_DequantizeLinear_Output"
        for node in graph.node:
            if node.op_type in QUANTIZABLE_OPS:
                for i, t in enumerate(node.input):
                    if t == out:
                        node.input[i] = dq.output[0]
        rename[q.input[0]] = out  # the float source takes the graph output's name back
    for node in graph.node:
        for i, t in enumerate(node.output):
            node.output[i] = rename.get(t, t)
        for i, t in enumerate(node.input):
            node.input[i] = rename.get(t, t)
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type in QUANTIZABLE_OPS or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, t in enumerate(node.input):
            dq = producer.get(t)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
    infos = [vi for vi in graph.value_info if vi.name not in rename]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return model


def group_labels(groups: list[QuantGroup]) -> list[str]:
    return [g.label for g in groups]


def quantize_dynamic_int8(prepared: onnx.ModelProto) -> onnx.ModelProto:
    """The CPU's INT8 form of `prepared` (ONNX Runtime's `quantize_dynamic`): int8 weights per output channel,
    activations quantized at every step from their own range (DynamicQuantizeLinear), MatMulInteger on the CPU's
    integer dot products (VNNI / AMX where present). No calibration: nothing is fitted, so nothing can be fitted
    wrongly. Not a TensorRT form (no explicit Q/DQ): built for targets that run ONNX Runtime (issue #41)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="trm-quant.") as tmp, _quiet_ort_logging():
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(prepared, src)
        quantize_dynamic(str(src), str(dst), per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
                         op_types_to_quantize=list(QUANTIZABLE_OPS), extra_options={"MatMulConstBOnly": True})
        model = onnx.load(dst)
    model.producer_name, model.producer_version = prepared.producer_name, prepared.producer_version
    return model
