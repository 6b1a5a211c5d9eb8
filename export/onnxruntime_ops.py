"""ONNX Runtime's fused attention and rotary ops (domain com.microsoft), for the cpu target's export form.

Written with standard ops, one attention layer is about 25 nodes: rope's Slice / Neg / Concat / Mul on q and k,
transposes, two MatMuls, a scale and a Softmax; ONNX Runtime fuses none of it on the CPU. Its contrib ops
MultiHeadAttention (flash attention on the CPU) and RotaryEmbedding do the same work in three kernels. Whole steps,
against the same step in standard ops, 2 threads, interleaved (benchmarks/cpu_speed.py; benchmarks/results):
1.18-1.30x on the maze reference model at batch 1 and 64 (two runs), 1.13x / 1.06x on the paper-size maze at
batch 1 / 8.

Each op is a torch.autograd.Function: its forward is the reference math (so the PyTorch export form, parity and
golden vectors compute exactly what the standard form computes), its symbolic is the contrib node. TensorRT cannot
parse these graphs, so TensorRT and browser targets keep the standard form. Both ops run correctly on onnxruntime
1.17 (the runtime's floor) and 1.32 as used here; RotaryEmbedding takes its positions as one offset ([0]):
onnxruntime 1.17 computes full [batch, position] ids wrongly. OpenVINO 2026.4's own converter computes the offset
form wrongly, so the openvino backend reads both ops through ours (runtime/openvino_ops.py).
"""

from __future__ import annotations

import torch

from trm_export.export.model import rotate_half
from trm_export.runtime.manifest import MULTI_HEAD_ATTENTION, ROTARY_EMBEDDING
from trm_export.runtime.manifest import ONNXRUNTIME_DOMAIN as DOMAIN


class MultiHeadAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v per head; q, k, v and the output [batch, positions, heads * head_dim]."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
        batch, seq, width = q.shape
        q, k, v = (t.view(batch, seq, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        out = torch.matmul((torch.matmul(q, k.transpose(-1, -2)) * scale).softmax(dim=-1), v)
        return out.transpose(1, 2).reshape(batch, seq, width)

    @staticmethod
    def symbolic(g, q, k, v, heads: int, scale: float):
        out = g.op(f"{DOMAIN}::{MULTI_HEAD_ATTENTION}", q, k, v, num_heads_i=heads, scale_f=scale)
        out.setType(q.type())  # typed output: onnx shape inference has no schema for contrib ops
        return out


class RotaryEmbedding(torch.autograd.Function):
    """NeoX-style rope on x [batch, positions, heads * head_dim]; cos / sin caches [positions, head_dim / 2]
    (one half of the repeated tables), positions from `offset` ([0])."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, offset: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                heads: int) -> torch.Tensor:
        batch, seq, width = x.shape
        cos = torch.cat((cos_cache, cos_cache), dim=-1)[:seq, None, :]  # [S, 1, head_dim]
        sin = torch.cat((sin_cache, sin_cache), dim=-1)[:seq, None, :]
        x = x.view(batch, seq, heads, width // heads)
        return (x * cos + rotate_half(x) * sin).reshape(batch, seq, width)

    @staticmethod
    def symbolic(g, x, offset, cos_cache, sin_cache, heads: int):
        out = g.op(f"{DOMAIN}::{ROTARY_EMBEDDING}", x, offset, cos_cache, sin_cache, num_heads_i=heads,
                   interleaved_i=0)
        out.setType(x.type())
        return out
