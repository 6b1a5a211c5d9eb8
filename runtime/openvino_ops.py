"""ONNX Runtime's contrib ops of the cpu target's graph, written in OpenVINO's own ops for its ONNX reader.

The cpu target's step graph has attention and rope as ONNX Runtime's `com.microsoft` MultiHeadAttention and
RotaryEmbedding (export/onnxruntime_ops.py). OpenVINO's ONNX reader knows both, but 2026.4 computes
RotaryEmbedding with a one-element position offset (the form the graph uses) wrongly: up to 0.07 off on one layer.
So the backend registers these converters, which replace OpenVINO's own for the two ops: rope as the reference
math (x cos + rotate_half(x) sin per head) and attention as OpenVINO's ScaledDotProductAttention, the op its CPU
plugin runs as one fused kernel. Measured against ONNX Runtime on the same file, each step is within float32
rounding (tests/test_openvino.py), and as fast as OpenVINO on the same step written in standard ops
(benchmarks/results/README.md, "CPU engines side by side").

Only the forms the cpu target writes are taken: 3-D [batch, positions, heads * head_dim] tensors, NeoX (not
interleaved) rope over the whole head, no bias, mask, past or causal flag. Anything else in a graph (bundles are
untrusted) fails to compile, with the reason in the backend's one-line error.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from trm_export.runtime.manifest import MULTI_HEAD_ATTENTION, ROTARY_EMBEDDING
from trm_export.runtime.manifest import ONNXRUNTIME_DOMAIN as DOMAIN


class UnsupportedContribOp(ValueError):
    """A contrib node in a form the cpu target never writes."""


def _opset() -> Any:
    """OpenVINO's opset 13 (ScaledDotProductAttention's): openvino.opset13 since 2024.x, openvino.runtime.opset13
    before (2024.0)."""
    try:
        import openvino.opset13 as ops
    except ImportError:
        import openvino.runtime.opset13 as ops
    return ops


def _attribute(context: Any, name: str, default: Any) -> Any:
    return context.get_attribute(name) if context.has_attribute(name) else default


def _refuse(op: str, what: str) -> None:
    raise UnsupportedContribOp(f"{DOMAIN}.{op} with {what} is not a form trm-export writes")


def _rank(x: Any, rank: int) -> bool:
    """True unless `x`'s rank is known and is not `rank` (shapes can be unknown while a graph is read)."""
    r = x.get_partial_shape().rank
    return r.is_dynamic or r.get_length() == rank


def _constant(x: Any) -> np.ndarray | None:
    """The value of an input that is a constant (an initializer or a Constant node), else None."""
    node = x.get_node()
    return np.array(node.get_data()) if node.get_type_name() == "Constant" else None


def _split_heads(ops: Any, x: Any, heads: int, head_dim: int) -> Any:
    """[B, S, heads * head_dim] -> [B, S, heads, head_dim] (0 in the shape keeps the input's batch and length)."""
    return ops.reshape(x, ops.constant([0, 0, heads, head_dim], dtype=np.int64), special_zero=True)


def rotary_embedding(context: Any) -> list[Any]:
    """input [B, S, heads * head_dim]; position offset [1] and cos / sin caches [max positions, head_dim / 2], all
    constants (as exported): the tables become constants, so OpenVINO fuses the rotation as in a standard graph."""
    ops = _opset()
    op = ROTARY_EMBEDDING
    if context.get_input_size() != 4:
        _refuse(op, f"{context.get_input_size()} inputs")
    if _attribute(context, "interleaved", 0) != 0 or _attribute(context, "is_packed_batching", 0) != 0:
        _refuse(op, "interleaved or packed rotation")
    if _attribute(context, "scale", 1.0) != 1.0:
        _refuse(op, "a scale")
    x = context.get_input(0)
    heads = int(_attribute(context, "num_heads", 0))
    shape = x.get_partial_shape()
    if heads <= 0 or shape.rank.is_dynamic or shape.rank.get_length() != 3 or not shape[1].is_static:
        _refuse(op, "an input other than [batch, positions, num_heads * head_dim] of known length")
    constants = [_constant(context.get_input(i)) for i in (1, 2, 3)]
    if any(c is None for c in constants):
        _refuse(op, "positions or caches that are not constants")
    offset, cos_cache, sin_cache = constants
    start, length = (int(offset.flat[0]) if offset.size == 1 else -1), shape[1].get_length()
    if cos_cache.ndim != 2 or cos_cache.shape != sin_cache.shape or not 0 <= start <= cos_cache.shape[0] - length:
        _refuse(op, "positions other than one offset within the caches")
    half = cos_cache.shape[1]
    if _attribute(context, "rotary_embedding_dim", 0) not in (0, 2 * half):
        _refuse(op, "a partial rotary dimension")
    if shape[2].is_dynamic or shape[2].get_length() != 2 * half * heads:
        _refuse(op, "an input width other than num_heads * 2 * the caches' width")
    rows = slice(start, start + length)
    cos, sin = (ops.constant(np.concatenate([t[rows], t[rows]], -1)[:, None, :].astype(np.float32))
                for t in (cos_cache, sin_cache))  # [S, 1, head_dim]: the halves repeat
    x4 = _split_heads(ops, x, heads, 2 * half)
    first, second = (ops.slice(x4, ops.constant([lo], dtype=np.int64), ops.constant([hi], dtype=np.int64),
                               ops.constant([1], dtype=np.int64), ops.constant([-1], dtype=np.int64))
                     for lo, hi in ((0, half), (half, 2 * half)))  # the head's two halves
    # x cos + rotate_half(x) sin, rotate_half(x) = [-second, first]: the pattern OpenVINO fuses into its RoPE kernel
    rotated = ops.add(ops.multiply(x4, cos), ops.multiply(ops.concat([ops.negative(second), first], -1), sin))
    return [ops.reshape(rotated, ops.constant([0, 0, 2 * half * heads], dtype=np.int64), special_zero=True).output(0)]


def multi_head_attention(context: Any) -> list[Any]:
    """softmax(q k^T * scale) v per head; query, key, value [B, S, heads * head_dim], nothing else."""
    ops = _opset()
    op = MULTI_HEAD_ATTENTION
    if context.get_input_size() != 3:
        _refuse(op, f"{context.get_input_size()} inputs (bias, mask, past)")
    if _attribute(context, "unidirectional", 0) != 0:
        _refuse(op, "a causal mask")
    query, key, value = (context.get_input(i) for i in range(3))
    heads = int(_attribute(context, "num_heads", 0))
    scale = float(_attribute(context, "scale", 0.0))
    if heads <= 0 or scale <= 0.0 or not all(_rank(t, 3) for t in (query, key, value)):
        _refuse(op, "an input other than [batch, positions, num_heads * head_dim], or no scale")
    order = ops.constant([0, 2, 1, 3], dtype=np.int64)
    q, k, v = (ops.transpose(_split_heads(ops, t, heads, -1), order) for t in (query, key, value))
    out = ops.scaled_dot_product_attention(q, k, v, scale=ops.constant(scale, dtype=np.float32), causal=False)
    out = ops.transpose(out, order)  # [B, S, heads, head_dim]
    return [ops.reshape(out, ops.constant([0, 0, -1], dtype=np.int64), special_zero=True).output(0)]


def reason(exc: BaseException) -> str:
    """The line that says why, in OpenVINO's multi-line report of a graph it could not read or compile: our
    converter's refusal, else the first Python-style "SomeError: message" line, else the first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    marker = f"{UnsupportedContribOp.__name__}: "
    ours = next((line.split(marker, 1)[1] for line in lines if marker in line), None)
    named = next((m.group(0) for line in lines if (m := re.search(r"\w+(Error|Exception): \S.*", line))), None)
    return (ours or named or (lines[0] if lines else type(exc).__name__))[:300]


def register(core: Any) -> None:
    """Make `core`'s ONNX reader use these converters for the cpu target's contrib ops."""
    from openvino.frontend.onnx import ConversionExtension

    core.add_extension(ConversionExtension(ROTARY_EMBEDDING, DOMAIN, rotary_embedding))
    core.add_extension(ConversionExtension(MULTI_HEAD_ATTENTION, DOMAIN, multi_head_attention))
