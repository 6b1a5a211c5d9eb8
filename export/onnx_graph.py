"""ONE recursion step as an ONNX graph; the loop stays outside, in the runtime.

Inputs x (embedded puzzle incl. the puzzle prefix), z_H, z_L, all [batch, S, D] float32; outputs the next
z_H, z_L, the answer logits [batch, seq_len, vocab] and q_halt, q_continue [batch]. All
H_cycles x (L_cycles + 1) network calls are unrolled; each weight is one initializer shared by every call.

The model is traced in its export form (`RecursiveModel.exporting`): the same function written the way ONNX
Runtime runs fastest (RMS norms in the pattern it fuses, SwiGLU gate/up as two MatMuls, mlp_t as left products
W @ h instead of transposes); parity with the reference form is checked on every export.

The TorchScript-based exporter is used on purpose: it reaches opset 17 (JetPack 5 / TensorRT 8.5), needs no
extra dependency, and writes byte-identical files for identical inputs.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import onnx
import torch
from torch import nn

from trm_export.errors import TrmExportError
from trm_export.export import onnxruntime_ops as ort_ops
from trm_export.export.model import RecursiveModel
from trm_export.runtime.backend import STEP_INPUTS, STEP_OUTPUTS
from trm_export.runtime.manifest import TensorSpec

# Export-time batch; the graph's batch axis is symbolic.
_TRACE_BATCH = 2


class GraphCheckError(TrmExportError):
    """An exported graph is not valid ONNX or does not fit the target."""


class StepGraph(nn.Module):
    """model.step as a module with flat tensor inputs and outputs (what an exported graph wants)."""

    def __init__(self, model: RecursiveModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, z_H: torch.Tensor, z_L: torch.Tensor):
        return self.model.step(x, z_H, z_L)


@dataclass(frozen=True)
class ExportedGraph:
    model: onnx.ModelProto
    data: bytes
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    onnxruntime_ops: list[str]

    @property
    def opset(self) -> int:
        return opset_of(self.model)


def opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def step_io_specs(model: RecursiveModel) -> tuple[list[TensorSpec], list[TensorSpec]]:
    cfg = model.config
    state = ["batch", cfg.total_seq_len, cfg.hidden_size]
    inputs = [TensorSpec(name, state, "float32") for name in STEP_INPUTS]
    outputs = [TensorSpec("z_H_out", state, "float32"), TensorSpec("z_L_out", state, "float32"),
               TensorSpec("logits", ["batch", cfg.seq_len, cfg.vocab_size], "float32"),
               TensorSpec("q_halt", ["batch"], "float32"), TensorSpec("q_continue", ["batch"], "float32")]
    return inputs, outputs


def export_step_graph(model: RecursiveModel, opset: int, onnxruntime_ops: bool = False,
                      export_form: bool = True) -> ExportedGraph:
    """Trace one ACT step and return the checked ONNX model and its serialized bytes. `onnxruntime_ops`: attention
    and rope as ONNX Runtime's contrib nodes (export/onnxruntime_ops.py), a graph for ONNX Runtime (and OpenVINO
    through runtime/openvino_ops.py).
    `export_form` False traces the reference form as it is (a plain torch.onnx export: benchmarks compare it)."""
    cfg = model.config
    example = torch.zeros(_TRACE_BATCH, cfg.total_seq_len, cfg.hidden_size)
    buffer = io.BytesIO()
    dynamic = {name: {0: "batch"} for name in (*STEP_INPUTS, *STEP_OUTPUTS)}
    form = model.exporting(onnxruntime_ops) if export_form else contextlib.nullcontext()
    # The contrib domain only where its nodes can appear (attention, rope): declaring an unused one makes the
    # exporter print a warning a user can do nothing about (#38).
    contrib = (onnxruntime_ops and export_form and cfg.family in ("trm", "hrm")
               and (not cfg.mlp_t or cfg.pos_encodings == "rope"))
    with torch.no_grad(), form:
        torch.onnx.export(StepGraph(model).eval(), (example, example, example), buffer, dynamo=False,
                          opset_version=opset, input_names=list(STEP_INPUTS), output_names=list(STEP_OUTPUTS),
                          dynamic_axes=dynamic, do_constant_folding=True,
                          custom_opsets={ort_ops.DOMAIN: 1} if contrib else None)
    proto = onnx.load_from_string(buffer.getvalue())
    proto.producer_name, proto.producer_version = "trm-export", ""  # no torch version: byte-identical re-exports
    proto.doc_string = f"{cfg.family} step: {cfg.net_calls_per_step} network calls"
    check_graph(proto)
    inputs, outputs = step_io_specs(model)
    return ExportedGraph(proto, proto.SerializeToString(), inputs, outputs, contrib_ops(proto))


def contrib_ops(proto: onnx.ModelProto) -> list[str]:
    """The ONNX Runtime contrib op types a graph uses (sorted): engines other than ONNX Runtime may not run them."""
    return sorted({n.op_type for n in proto.graph.node if n.domain == ort_ops.DOMAIN})


def check_graph(proto: onnx.ModelProto, max_opset: int | None = None, max_ir_version: int | None = None) -> None:
    """ONNX checker (full), strict shape inference, and the target's opset / IR limits."""
    try:
        onnx.checker.check_model(proto, full_check=True)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as exc:  # onnx raises several exception types; all mean "invalid graph"
        raise GraphCheckError(f"exported graph fails the ONNX checker: {exc}") from None
    opset = opset_of(proto)
    if max_opset is not None and opset > max_opset:
        raise GraphCheckError(f"graph uses opset {opset}; the target accepts at most {max_opset}")
    if max_ir_version is not None and proto.ir_version > max_ir_version:
        raise GraphCheckError(f"graph has IR version {proto.ir_version}; the target accepts at most {max_ir_version}")
