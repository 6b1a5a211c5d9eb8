"""Check a graph against TensorRT's explicit-quantization (Q/DQ) rules and a target's opset / IR limits.

Rules (shared/reference/targets.md), each reported under its own name:
- `opset`, `ir_version`: at most the target's (`Target.max_opset`, `Target.max_ir_version`);
- `onnx-checker`: the graph is valid ONNX;
- `int8`: Q outputs and DQ inputs are int8 (an absent zero point means uint8; int32 bias DQs are not allowed);
- `zero-point`: zero points present, constant, int8 and all 0 (symmetric only);
- `scale`: scales constant initializers (build-time constants), finite and strictly positive, float;
- `per-tensor-activation`: an activation's scale is a scalar;
- `per-channel-weight`: a weight's scale is a scalar or 1-D along the output channels (axis 1 of a MatMul's B,
  axis 0 of a Gemm's B with transB=1), one scale per channel;
- `placement`: every DQ output feeds only MatMul/Gemm (A or B, never a bias), every Q feeds only DQs, every
  DQ reads a Q or an int8 initializer, no DQ output is a graph output; a DQ feeding Add, ReduceMean or Softmax
  is a stray pair that breaks TensorRT's fusions (norms, softmax, residual adds stay float);
- `qdq-format`: no QOperator-format ops (QLinearMatMul, MatMulInteger, ...): TensorRT parses Q/DQ only;
- `no-blocked-quantization`: no block_size (opset 21 blocked quantization is not TensorRT's INT8).

The report is truthy when every rule passed and lists violations with the node that broke them.
`check_bundle` applies this to every graph of a bundle against the bundle's target and also checks that each
graph keeps the runtime's float32 inputs and outputs and holds the precision its manifest entry claims.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from trm_export.runtime.graph_file import read_graph
from trm_export.runtime.manifest import read_manifest
from trm_export.targets.engines import check_build_recipes
from trm_export.targets.registry import Target, get_target

RULES = ("onnx-checker", "opset", "ir_version", "qdq-format", "int8", "zero-point", "scale",
         "per-tensor-activation", "per-channel-weight", "placement", "no-blocked-quantization")
QDQ_CONSUMERS = ("MatMul", "Gemm")
QOPERATOR_OPS = ("QLinearMatMul", "MatMulInteger", "QLinearConv", "ConvInteger", "QGemm", "QLinearAdd",
                 "DynamicQuantizeLinear", "DynamicQuantizeMatMul")
# ONNX Runtime's dynamic INT8 form (calibration.quantize.quantize_dynamic_int8): integer MatMuls on activations
# quantized per step. Right for targets that run ONNX Runtime (the cpu target's int8-dynamic), not TensorRT's form.
DYNAMIC_INT8_OPS = ("MatMulInteger", "DynamicQuantizeLinear")


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"


@dataclass
class QdqReport:
    """Truthy when the graph follows every rule; `str()` gives a 'Passed: x/y' summary with the violations."""

    graph: str
    target: str
    quantized_nodes: int = 0  # MatMul/Gemm nodes with at least one DQ input
    qdq_nodes: int = 0
    violations: list[Violation] = field(default_factory=list)
    rules: tuple[str, ...] = RULES

    def __bool__(self) -> bool:
        return not self.violations

    def add(self, rule: str, node: str, message: str) -> None:
        self.violations.append(Violation(rule, node or "<unnamed>", message))

    def failed_rules(self) -> list[str]:
        return sorted({v.rule for v in self.violations})

    def __str__(self) -> str:
        failed = set(self.failed_rules())
        rules = set(self.rules) | failed
        lines = [f"{'PASSED' if self else 'FAILED'} {self.graph} for target {self.target}: "
                 f"Passed: {len(rules) - len(failed)}/{len(rules)} rules "
                 f"({self.quantized_nodes} quantized MatMul/Gemm, {self.qdq_nodes} Q/DQ nodes)"]
        shown = self.violations[:20]
        lines += [f"  {v}" for v in shown]
        if len(self.violations) > len(shown):
            lines.append(f"  ... and {len(self.violations) - len(shown)} more")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"graph": self.graph, "target": self.target, "passed": bool(self), "quantized_nodes":
                self.quantized_nodes, "qdq_nodes": self.qdq_nodes, "violations": [str(v) for v in self.violations]}


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _attr(node: onnx.NodeProto, name: str, default: int | None = None) -> int | None:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def validate_qdq(model: onnx.ModelProto | str | Path, target: Target | str = "cpu",
                 name: str | None = None) -> QdqReport:
    """Check `model` (a ModelProto or a path) against the Q/DQ rules and `target`'s opset and IR limits."""
    if not isinstance(model, onnx.ModelProto):
        name = name or Path(model).name
        model = onnx.load(model)
    target = get_target(target) if isinstance(target, str) else target
    report = QdqReport(name or model.graph.name or "graph", target.name)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises several types; all mean "invalid graph"
        report.add("onnx-checker", model.graph.name, str(exc).splitlines()[0])
    opset = _opset(model)
    if opset > target.max_opset:
        report.add("opset", model.graph.name, f"opset {opset} > {target.max_opset}, the most {target.name} accepts")
    if model.ir_version > target.max_ir_version:
        report.add("ir_version", model.graph.name,
                   f"IR version {model.ir_version} > {target.max_ir_version}, the most {target.name} accepts")

    nodes = list(model.graph.node)
    consts = _constants(model)
    initializers = {i.name for i in model.graph.initializer}
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for n in nodes:
        for i, t in enumerate(n.input):
            consumers[t].append((n, i))
    graph_outputs = {o.name for o in model.graph.output}

    dynamic_allowed = target.runtime == "onnxruntime"
    for node in nodes:
        if node.op_type in QOPERATOR_OPS and not (dynamic_allowed and node.op_type in DYNAMIC_INT8_OPS):
            report.add("qdq-format", node.name, f"{node.op_type} is a QOperator-format op; TensorRT takes "
                                                "QuantizeLinear/DequantizeLinear pairs only"
                       + ("" if target.runtime == "tensorrt" else " (and this target ONNX Runtime's dynamic form)"))
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        report.qdq_nodes += 1
        _check_qdq_node(report, node, consts, initializers, producer, consumers, graph_outputs, opset)

    quantized = 0
    for node in nodes:
        if node.op_type in QDQ_CONSUMERS and any(
                producer.get(t) is not None and producer[t].op_type == "DequantizeLinear" for t in node.input):
            quantized += 1
        elif dynamic_allowed and node.op_type == "MatMulInteger":
            quantized += 1
    report.quantized_nodes = quantized
    return report


def _check_qdq_node(report: QdqReport, node: onnx.NodeProto, consts: dict[str, np.ndarray], initializers: set[str],
                    producer: dict[str, onnx.NodeProto], consumers: dict, graph_outputs: set[str],
                    opset: int) -> None:
    is_dq = node.op_type == "DequantizeLinear"
    if _attr(node, "block_size", 0):
        report.add("no-blocked-quantization", node.name, "blocked quantization (block_size) is not TensorRT's INT8")
    scale_name = node.input[1] if len(node.input) > 1 else ""
    zp_name = node.input[2] if len(node.input) > 2 else ""

    # Types: int8 values, int8 zero point.
    if zp_name == "":
        report.add("int8", node.name, "no zero point: the type defaults to uint8; TensorRT needs int8 with zero "
                                      "point 0")
    elif zp_name not in consts:
        report.add("zero-point", node.name, f"zero point {zp_name!r} is not a constant initializer")
    else:
        zp = consts[zp_name]
        if zp.dtype != np.int8:
            report.add("int8", node.name, f"zero point type {zp.dtype}, expected int8")
        if np.any(zp != 0):
            report.add("zero-point", node.name, f"zero point {zp.ravel()[:4].tolist()} is not 0 (symmetric only)")
    output_dtype = _attr(node, "output_dtype", 0)
    if not is_dq and output_dtype not in (0, TensorProto.INT8):
        report.add("int8", node.name, f"output_dtype {TensorProto.DataType.Name(output_dtype)}, expected INT8")
    if is_dq and node.input[0] in consts and consts[node.input[0]].dtype != np.int8:
        report.add("int8", node.name, f"dequantizes a {consts[node.input[0]].dtype} constant (e.g. an int32 bias); "
                                      "only int8 is allowed")

    # Scale: constant, float, finite, > 0.
    scale = consts.get(scale_name)
    if scale is None:
        report.add("scale", node.name, f"scale {scale_name!r} is not a constant initializer (must be known at build "
                                       "time)")
    else:
        if not np.issubdtype(scale.dtype, np.floating):
            report.add("scale", node.name, f"scale type {scale.dtype}, expected float")
        elif not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            report.add("scale", node.name, f"scale must be finite and > 0, got min {float(np.min(scale)):g}")

    # Weight or activation, and placement.
    weight_dq = is_dq and node.input[0] in initializers
    if is_dq:
        src = producer.get(node.input[0])
        if not weight_dq and (src is None or src.op_type != "QuantizeLinear"):
            report.add("placement", node.name, "a DequantizeLinear must read a QuantizeLinear or an int8 weight "
                                               f"initializer, reads {src.op_type if src else node.input[0]!r}")
        if node.output[0] in graph_outputs:
            report.add("placement", node.name, "a DequantizeLinear output is a graph output")
        readers = consumers.get(node.output[0], [])
        for reader, index in readers:
            if reader.op_type not in QDQ_CONSUMERS:
                report.add("placement", node.name, f"feeds {reader.op_type} {reader.name!r}: Q/DQ belongs only on "
                                                   "MatMul/Gemm inputs (norms, softmax, residual adds stay float)")
            elif index > 1:
                report.add("placement", node.name, f"feeds input {index} (the bias) of {reader.op_type} "
                                                   f"{reader.name!r}; biases stay float")
        if scale is not None:
            _check_granularity(report, node, scale, weight_dq, consts, readers)
    else:
        readers = consumers.get(node.output[0], [])
        if not readers:
            report.add("placement", node.name, "a QuantizeLinear with no reader")
        for reader, _ in readers:
            if reader.op_type != "DequantizeLinear":
                report.add("placement", node.name, f"feeds {reader.op_type} {reader.name!r}; a QuantizeLinear must "
                                                   "feed DequantizeLinear only")
        if scale is not None and scale.ndim != 0:
            report.add("per-tensor-activation", node.name,
                       f"activation scale has shape {list(scale.shape)}; activations are per-tensor (scalar scale)")


def _check_granularity(report: QdqReport, node: onnx.NodeProto, scale: np.ndarray, weight_dq: bool,
                       consts: dict[str, np.ndarray], readers: list) -> None:
    if not weight_dq:
        if scale.ndim != 0:
            report.add("per-tensor-activation", node.name,
                       f"activation scale has shape {list(scale.shape)}; activations are per-tensor (scalar scale)")
        return
    if scale.ndim == 0:
        return  # per-tensor weight: allowed
    weight = consts[node.input[0]]
    if scale.ndim != 1:
        report.add("per-channel-weight", node.name, f"weight scale has shape {list(scale.shape)}; expected a scalar "
                                                    "or 1-D (one scale per output channel)")
        return
    axis = _attr(node, "axis", 1)
    axis = axis + weight.ndim if axis < 0 else axis
    for reader, index in readers:
        if reader.op_type not in QDQ_CONSUMERS or index != 1:
            continue
        if reader.op_type == "MatMul":
            expected = weight.ndim - 1
        else:
            expected = 0 if _attr(reader, "transB", 0) else 1
        if axis != expected:
            report.add("per-channel-weight", node.name,
                       f"per-channel axis {axis}, but the output channels of {reader.op_type} {reader.name!r} are "
                       f"axis {expected}")
    if 0 <= axis < weight.ndim and scale.shape[0] != weight.shape[axis]:
        report.add("per-channel-weight", node.name, f"{scale.shape[0]} scales for {weight.shape[axis]} channels "
                                                    f"(axis {axis} of a {list(weight.shape)} weight)")


@dataclass
class BundleCheck:
    """`check_bundle`'s answer: one QdqReport per graph of the bundle plus bundle-level problems."""

    bundle: str
    target: str
    graphs: dict[str, QdqReport] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return not self.problems and all(self.graphs.values())

    def __str__(self) -> str:
        passed = sum(bool(r) for r in self.graphs.values())
        lines = [f"{'PASSED' if self else 'FAILED'} {self.bundle} (target {self.target}): "
                 f"Passed: {passed}/{len(self.graphs)} graphs"]
        for variant, report in self.graphs.items():
            lines.append(f"{variant}: " + str(report).replace("\n", "\n  "))
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


def _io_types(model: onnx.ModelProto) -> dict[str, str]:
    """Input/output name -> numpy dtype name ("float32"), the manifest's spelling."""
    return {v.name: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name
            for v in [*model.graph.input, *model.graph.output]}


def check_bundle(path: str | Path) -> BundleCheck:
    """Check every graph of a bundle against its target (`trm-export check BUNDLE`).

    Besides the Q/DQ rules: each graph's inputs and outputs are the manifest's (float32, same names), an int8
    graph has quantized MatMuls, an fp16 graph has float16 tensors, an fp32 graph has neither.
    """
    path = Path(path)
    manifest = read_manifest(path)  # verifies checksums first
    check_build_recipes(path, manifest)  # and that the build script is the manifest's own
    target = get_target(manifest.target)
    result = BundleCheck(str(path), target.name)
    for variant, spec in manifest.graphs.items():
        model = onnx.load_from_string(read_graph(path / spec.file))  # refused if it refers to outside weights
        report = validate_qdq(model, target, name=spec.file)
        result.graphs[variant] = report
        io = _io_types(model)
        for tensor in [*spec.inputs, *spec.outputs]:
            got = io.get(tensor.name)
            if got is None:
                report.add("io", spec.file, f"manifest lists {tensor.name!r}, the graph has no such input/output")
            elif got != tensor.dtype:
                report.add("io", spec.file, f"{tensor.name} is {got}, the manifest says {tensor.dtype}")
        has_half = any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer) or any(
            a.name == "to" and a.i == TensorProto.FLOAT16 for n in model.graph.node for a in n.attribute
            if n.op_type == "Cast")
        if spec.precision in ("int8", "mixed") and report.quantized_nodes == 0:
            report.add("precision", spec.file, f"manifest says {spec.precision}, but no MatMul/Gemm is quantized")
        if spec.precision == "fp16" and not has_half:
            report.add("precision", spec.file, "manifest says fp16, but the graph holds no float16 tensor")
        if spec.precision == "fp32" and (report.qdq_nodes or has_half):
            report.add("precision", spec.file, "manifest says fp32, but the graph holds Q/DQ or float16 tensors")
        if _opset(model) != spec.opset or model.ir_version != spec.ir_version:
            report.add("manifest", spec.file, f"manifest says opset {spec.opset} / IR {spec.ir_version}, the graph "
                                              f"has {_opset(model)} / {model.ir_version}")
    return result
