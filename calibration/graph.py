"""Graph passes shared by the INT8 and FP16 variants: prepare, group, compact.

prepare: the TorchScript exporter feeds a weight shared by several unrolled network calls to all but the first
call through an Identity node. A quantizer sees an Identity output as an activation (per-tensor, calibrated),
not a weight (per-channel, int8 initializer), so those Identities must go. ONNX Runtime's *basic* offline
optimisation (constant folding, Identity / no-op Cast elimination; standard ONNX ops only, opset unchanged)
does that and folds the exporter's Constant nodes; the result is checked to hold only default-domain ops.

weights on the right: the export form of mlp_t multiplies with its weight on the left (W @ h, faster in ONNX
Runtime). Quantizers and TensorRT's Q/DQ rules expect the weight as a MatMul's B, per-channel along B's output
axis, so preparation rewrites W @ h as (h^T @ W^T)^T before any quantizer sees the graph.

groups: quantizable MatMul/Gemm nodes gathered per layer (all unrolled calls of one weight, or of one
attention product), the unit mixed precision keeps in float. A weight shared by a float call and an int8 call
would have to be stored twice; per-layer groups keep it once.

compact: the unrolled graph repeats long exporter tensor names thousands of times; for a small model they
outweigh the int8 weights. Renaming intermediate tensors to short names (node names, graph inputs and outputs
kept) shrinks the file without touching the computation.
"""

from __future__ import annotations

import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from trm_export.calibration.data import CalibrationError

QUANTIZABLE_OPS = ("MatMul", "Gemm")


def prepare_graph(model: onnx.ModelProto, threads: int | None = 1) -> onnx.ModelProto:
    """FP32 graph ready for quantization / fp16 conversion: ONNX Runtime basic optimisation, computation unchanged."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="trm-prepare.") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, src)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(dst)
        if threads:
            options.intra_op_num_threads = threads
        ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
        prepared = onnx.load(dst)
    # The cpu target's graph has ONNX Runtime's contrib attention and rope already; nothing else may appear.
    def contrib(m: onnx.ModelProto) -> set[tuple[str, str]]:
        return {(n.domain, n.op_type) for n in m.graph.node if n.domain not in ("", "ai.onnx")}

    foreign = sorted(op for _, op in contrib(prepared) - contrib(model))
    if foreign:
        raise CalibrationError(f"graph preparation introduced non-standard ops {foreign}; cannot continue")
    # ONNX Runtime lists every domain it knows; keep the ones the graph uses.
    used = {"", "ai.onnx"} | {domain for domain, _ in contrib(prepared)}
    keep = [o for o in prepared.opset_import if o.domain in used]
    del prepared.opset_import[:]
    prepared.opset_import.extend(keep)
    prepared.ir_version = model.ir_version
    prepared.producer_name, prepared.producer_version = model.producer_name, model.producer_version
    prepared.doc_string = model.doc_string
    return dedupe_initializers(weights_on_the_right(prepared))


def weights_on_the_right(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every MatMul(W, x) with a constant 2-D W becomes Transpose(MatMul(Transpose(x), W^T)); the MatMul keeps its
    name (its layer label). A W shared by several calls gets one transposed copy."""
    inits = {i.name: i for i in model.graph.initializer}
    left = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[0] in inits
            and n.input[1] not in inits and len(inits[n.input[0]].dims) == 2]
    if not left:
        return model
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
             if v.type.tensor_type.HasField("shape")}
    transposed: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    left_ids = {id(n) for n in left}
    for node in model.graph.node:
        if id(node) not in left_ids:
            nodes.append(node)
            continue
        weight, x = node.input
        rank = ranks.get(x)
        if rank is None or rank < 2:
            raise CalibrationError(f"MatMul {node.name!r}: the rank of its input {x!r} is unknown or < 2; cannot move "
                                   "its weight to the right for quantization")
        if weight not in transposed:
            w_t = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(inits[weight]).T), f"{weight}_T")
            model.graph.initializer.append(w_t)
            transposed[weight] = w_t.name
        perm = [*range(rank - 2), rank - 1, rank - 2]
        x_t, y_t = f"{node.name}/input_T", f"{node.name}/output_T"
        nodes += [onnx.helper.make_node("Transpose", [x], [x_t], name=f"{node.name}/Transpose_in", perm=perm),
                  onnx.helper.make_node("MatMul", [x_t, transposed[weight]], [y_t], name=node.name),
                  onnx.helper.make_node("Transpose", [y_t], list(node.output), name=f"{node.name}/Transpose_out",
                                        perm=perm)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model


def dedupe_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Initializers with equal type, shape and bytes stored once.

    The exporter writes a constant (the RoPE cos/sin tables, scalars) once per unrolled call; constant folding
    turns each into its own initializer. For a small model the copies weigh more than the weights.
    """
    graph = model.graph
    keep_names = {v.name for v in graph.input} | {v.name for v in graph.output}
    canonical: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    unique = []
    for init in graph.initializer:
        key = (init.data_type, tuple(init.dims), numpy_helper.to_array(init).tobytes())
        if init.name not in keep_names and key in canonical:
            rename[init.name] = canonical[key]
            continue
        canonical.setdefault(key, init.name)
        unique.append(init)
    if not rename:
        return model
    del graph.initializer[:]
    graph.initializer.extend(unique)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    infos = [vi for vi in graph.value_info if vi.name not in rename]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return model


@dataclass(frozen=True)
class QuantGroup:
    """MatMul/Gemm nodes that are quantized or kept in float together.

    label: a readable layer name (`L_level.layers.0.mlp.down_proj`, `L_level.layers.1.self_attn.scores`);
    kind: "weight" (x @ W: per-channel weight, per-tensor activation) or "activation" (q @ k^T, softmax @ v:
    two per-tensor activations).
    """

    label: str
    kind: str
    nodes: tuple[str, ...]
    weight: str | None = None


_CALL_SUFFIX = re.compile(r"_\d+$")


_ATTENTION_NAMES = {"MatMul": "scores", "MatMul_1": "mix"}  # q @ k^T, softmax(.) @ v


def _layer_label(node_name: str, weighted: bool) -> str:
    """'/L_level/layers.0/mlp/down_proj_2/MatMul' -> 'L_level.layers.0.mlp.down_proj' (call index dropped);
    '/L_level/layers.0/self_attn_2/MatMul_1' -> 'L_level.layers.0.self_attn.mix' (an attention product)."""
    parts = [p for p in node_name.split("/") if p]
    if not parts:
        return node_name
    *scopes, op = parts
    scopes = [_CALL_SUFFIX.sub("", p) for p in scopes]
    if weighted and scopes:  # x @ W: the scope names the layer
        return ".".join(scopes)
    return ".".join([*scopes, _ATTENTION_NAMES.get(op, op)])


def quantizable_groups(model: onnx.ModelProto) -> list[QuantGroup]:
    """Every MatMul/Gemm of the graph in per-layer groups, in graph order of first appearance."""
    initializers = {i.name for i in model.graph.initializer}
    by_key: dict[tuple[str, str], list[str]] = defaultdict(list)
    labels: dict[tuple[str, str], str] = {}
    for node in model.graph.node:
        if node.op_type not in QUANTIZABLE_OPS:
            continue
        if len(node.input) > 1 and node.input[1] in initializers:
            key = ("weight", node.input[1])
            labels.setdefault(key, _layer_label(node.name, True) or node.input[1])
        else:
            label = _layer_label(node.name, False)
            key = ("activation", label)
            labels.setdefault(key, label)
        by_key[key].append(node.name)
    groups = [QuantGroup(labels[k], k[0], tuple(v), k[1] if k[0] == "weight" else None) for k, v in by_key.items()]
    seen: dict[str, int] = defaultdict(int)
    unique = []
    for g in groups:  # two weights under one scope (unlikely) still get distinct labels
        seen[g.label] += 1
        unique.append(g if seen[g.label] == 1 else QuantGroup(f"{g.label}#{seen[g.label]}", g.kind, g.nodes,
                                                                 g.weight))
    return unique


def resolve_groups(groups: list[QuantGroup], names: tuple[str, ...]) -> list[QuantGroup]:
    """Groups named by label (or by one of their node names); unknown names list the valid labels."""
    by_label = {g.label: g for g in groups}
    by_node = {n: g for g in groups for n in g.nodes}
    chosen: list[QuantGroup] = []
    for name in names:
        group = by_label.get(name) or by_node.get(name)
        if group is None:
            raise CalibrationError(f"unknown layer {name!r} to keep in float; quantizable layers: "
                                   f"{', '.join(by_label)}")
        if group not in chosen:
            chosen.append(group)
    return chosen


def compact_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """Short names for intermediate tensors and initializers.

    Graph inputs and outputs and node names stay as they are (the runtime feeds by name; reports name nodes);
    intermediate shape annotations are dropped.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    rename: dict[str, str] = {}

    for i, init in enumerate(graph.initializer):
        if init.name not in keep:
            rename[init.name] = f"w{i}"
            init.name = rename[init.name]

    counter = 0
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name and name not in keep and name not in rename:
                rename[name] = f"t{counter}"
                counter += 1
            node.output[i] = rename.get(name, name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        node.doc_string = ""
    del graph.value_info[:]  # intermediate shapes: every consumer (ONNX Runtime, TensorRT) infers them again
    return model


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the matrices (2-D initializers) in the graph: what quantization shrinks."""
    total = 0
    for init in model.graph.initializer:
        if len(init.dims) == 2:
            total += int(np.prod(init.dims)) * numpy_helper.to_array(init).itemsize
    return total
