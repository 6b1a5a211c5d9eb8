"""FP16 step graphs for GPU targets, with the numerically fragile parts kept in float32.

What must stay float32, and why:
- RMS-norm statistics (x*x, ReduceMean, + eps, Sqrt, the division): the residual stream of a trained TRM reaches
  magnitudes whose square overflows float16 (max 65504 = 256^2), and a mean of squares loses the small terms;
- softmax optionally (`keep_softmax_float32`): its exponentials are computed in float32 inside TensorRT's
  fused kernels anyway, and in ONNX Runtime a float16 softmax loses precision on flat score rows.
Graph inputs and outputs stay float32 (`keep_io_types`), so the runtime feeds and reads the same arrays as for
FP32; the recurrent state is rounded to float16 only inside the step.

The conversion is a small pass of our own. onnxconverter-common's `convert_float_to_float16` was tried first
and fails on this graph (1.16: a graph output that other nodes also read, z_L_out, gets float32 where float16
is expected, and its cast clean-up crashes on a tensor with several readers); the pass here is ~100 lines
and needs no dependency.

TensorRT 11 builds strongly typed networks only (no FP16 builder flag): precision is whatever the graph says.
This graph says float16 for everything but the blocked nodes, so it builds as FP16 on TensorRT 11 with
`--stronglyTyped` exactly as it runs in ONNX Runtime; on TensorRT 8.5/10.x it builds with or without the
FP16 flag (the flag then only lets TensorRT pick float16 for the float32 islands too).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from trm_export.calibration.data import CalibrationError

_NORM_CHAIN = ("Add", "Sqrt", "Reciprocal", "Div", "Mul")


@dataclass(frozen=True)
class Fp16Options:
    keep_norms_float32: bool = True
    keep_softmax_float32: bool = False


@dataclass(frozen=True)
class Fp16Graph:
    model: onnx.ModelProto
    float32_nodes: tuple[str, ...]  # nodes kept in float32
    float32_ops: tuple[str, ...]  # op types kept in float32 everywhere


def rms_norm_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes computing RMS-norm statistics: square, ReduceMean, + eps, Sqrt, 1/x or x/.."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type != "ReduceMean":
            continue
        square = producer.get(node.input[0])
        x = None
        if square is not None and square.op_type in ("Mul", "Pow"):
            if square.op_type == "Pow" or square.input[0] == square.input[1]:
                names.append(square.name)
                x = square.input[0]
        names.append(node.name)
        current = node
        for _ in range(len(_NORM_CHAIN)):
            nxt = consumers.get(current.output[0], [])
            if len(nxt) != 1 or nxt[0].op_type not in _NORM_CHAIN:
                break
            names.append(nxt[0].name)
            if x is not None and x in nxt[0].input:  # the normalisation x / rms itself: the chain ends
                break
            current = nxt[0]
    if any(not n for n in names):
        raise CalibrationError("the graph has unnamed norm nodes; cannot keep them in float32 by name")
    return names


_FLOAT, _HALF = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {i.name: i.data_type for i in model.graph.initializer}
    for vi in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
        types[vi.name] = vi.type.tensor_type.elem_type
    return types


def convert_fp16(prepared: onnx.ModelProto, options: Fp16Options = Fp16Options()) -> Fp16Graph:
    """Float16 graph of `prepared` (see `graph.prepare_graph`): float32 I/O, norms (and softmax) in float32.

    Every float tensor takes the precision of the node that computes it; a Cast is inserted where a node
    reads a tensor of the other precision (one per tensor and direction); float initializers read only by
    float16 nodes are stored in float16 (halving the file). Non-float tensors (shapes, indices) are untouched.
    """
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(prepared.SerializeToString())
    graph = model.graph
    blocked = set(rms_norm_nodes(model) if options.keep_norms_float32 else [])
    ops = ("Softmax",) if options.keep_softmax_float32 else ()
    blocked |= {n.name for n in graph.node if n.op_type in ops}
    # Ops outside the standard domain (the cpu target's ONNX Runtime attention, which holds a softmax, and rope)
    # stay in float32, where their CPU kernels were checked on onnxruntime 1.17 and 1.32.
    blocked |= {n.name for n in graph.node if n.domain not in ("", "ai.onnx")}
    types = _elem_types(model)
    unknown = sorted({t for n in graph.node for t in [*n.input, *n.output] if t and t not in types})
    if unknown:
        raise CalibrationError(f"cannot infer the type of {len(unknown)} tensors (e.g. {unknown[:3]}); "
                               "float16 conversion needs a fully typed graph")
    outputs = {o.name for o in graph.output}

    def is_float(name: str) -> bool:
        return types.get(name) == _FLOAT

    half_nodes = [n for n in graph.node if n.name not in blocked
                  and any(is_float(t) for t in [*n.input, *n.output] if t)]
    half_out = {t for n in half_nodes for t in n.output if is_float(t)}  # float tensors now in float16
    readers: dict[str, set[bool]] = {}
    half_names = {n.name for n in half_nodes}
    for node in graph.node:
        for t in node.input:
            if is_float(t):
                readers.setdefault(t, set()).add(node.name in half_names)

    # Initializers read only by float16 nodes become float16; others stay float32 (cast where needed).
    half_init = set()
    for init in graph.initializer:
        if init.data_type == _FLOAT and readers.get(init.name) == {True}:
            arr = np.clip(numpy_helper.to_array(init), -65504, 65504).astype(np.float16)
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
            half_init.add(init.name)
    in_half = half_out | half_init  # float tensors stored in float16

    new_nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            casts[key] = f"{name}_to{'16' if to == _HALF else '32'}"
            new_nodes.append(helper.make_node("Cast", [name], [casts[key]], to=to, name=f"{casts[key]}_cast"))
        return casts[key]

    renamed_outputs: dict[str, str] = {}
    for node in graph.node:
        half = node.name in half_names
        for i, t in enumerate(node.input):
            if not t or not is_float(t):
                continue
            stored_half = t in in_half
            if half and not stored_half:
                node.input[i] = cast(t, _HALF)
            elif not half and stored_half:
                node.input[i] = cast(renamed_outputs.get(t, t), _FLOAT)
            elif t in renamed_outputs:
                node.input[i] = renamed_outputs[t]
        if half:
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == _FLOAT:
                    attr.i = _HALF
            for i, t in enumerate(node.output):
                if t in outputs and is_float(t):  # graph outputs stay float32: compute t16, cast back
                    renamed_outputs[t] = f"{t}_fp16"
                    node.output[i] = renamed_outputs[t]
        new_nodes.append(node)
    for name, inner in renamed_outputs.items():
        new_nodes.append(helper.make_node("Cast", [inner], [name], to=_FLOAT, name=f"{name}_to32_cast"))
    # Later readers of a renamed graph output read its float16 twin (the loop above saw them before renaming).
    for node in new_nodes:
        for i, t in enumerate(node.input):
            if t in renamed_outputs and not node.name.endswith("_to32_cast"):
                node.input[i] = renamed_outputs[t]
    del graph.node[:]
    graph.node.extend(_topological(new_nodes, {i.name for i in graph.input} | {i.name for i in graph.initializer}))
    del graph.value_info[:]
    onnx.checker.check_model(model)
    return Fp16Graph(model, tuple(sorted(n for n in blocked)), ops)


def _topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Nodes in an order where every input is produced before it is read (inserted Casts included)."""
    ready = set(available) | {""}
    pending = list(nodes)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise CalibrationError(f"float16 conversion left a cycle or a dangling input at {rest[0].name}")
        pending = rest
    return ordered
