"""The reference computed the way the official code computes with `forward_dtype: bfloat16`, its default.

The official configs train and evaluate in bfloat16, so the accuracy a user's training printed is the bfloat16
one; `RecursiveModel` (and every exported graph) computes in float32. `Bfloat16Reference` runs a loaded
`RecursiveModel`'s own parameters with the official cast points, one by one (official repositories: TRM
SamsungSAILMontreal/TinyRecursiveModels e7b68717, files `models/layers.py`, `models/recursive_reasoning/trm.py`;
HRM sapientinc/HRM 42410daa, `models/layers.py`, `models/hrm/hrm_act_v1.py`):

- parameters stay float32; every linear layer casts its weight (and bias) to its input's dtype (`CastedLinear`);
- embeddings are cast to bfloat16 before use (`CastedEmbedding`, `CastedSparseEmbedding` in eval mode), so the
  learned-position sum, its 0.707106781 scale and the sqrt(D) scale are bfloat16 ops with float scalars;
- H_init / L_init are bfloat16 buffers (the checkpoint stores them so; our float32 copies hold the same values);
- RMS norm computes in float32 and casts back (`rms_norm`), RoPE tables are float32 and q, k are rotated in
  float32 then cast back (`RotaryEmbedding`, `apply_rotary_pos_emb`);
- attention is `scaled_dot_product_attention` on bfloat16 [B, heads, S, head_dim] (TRM; HRM calls flash-attn,
  whose CUDA kernel does not run here: SDPA with the same layout stands in, as in the HRM comparison script);
- SwiGLU, the residual adds and the injection adds are bfloat16 ops;
- lm_head's logits stay bfloat16 and the argmax is taken on them (`ACTLossHead`), ties included;
  the Q head's output is cast to float32 (`q_head(...).to(torch.float32)`) and halting compares those values.

Nothing here is exported: the ONNX step graph is always `RecursiveModel`'s float32 function.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from trm_export.export.config import ModelConfig
from trm_export.export.model import (
    Attention,
    Block,
    Linear,
    ReasoningStack,
    RecursiveModel,
    SwiGLU,
    rms_norm,
    rotate_half,
)

COMPUTE_DTYPES = ("float32", "bfloat16")


class Stepper(Protocol):
    """What the reference loop needs of a model: RecursiveModel itself (float32) or Bfloat16Reference."""

    config: ModelConfig

    def embed(self, tokens: torch.Tensor, puzzle_ids: torch.Tensor) -> torch.Tensor: ...

    def initial_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def step(self, x: torch.Tensor, z_H: torch.Tensor, z_L: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]: ...


def for_compute_dtype(model: RecursiveModel, compute_dtype: str) -> Stepper:
    """`model` itself for "float32", a Bfloat16Reference over its parameters for "bfloat16"."""
    if compute_dtype == "float32":
        return model
    if compute_dtype == "bfloat16":
        return Bfloat16Reference(model)
    raise ValueError(f"requested compute_dtype {compute_dtype!r}; available: {', '.join(COMPUTE_DTYPES)}")


def casted_linear(x: torch.Tensor, layer: Linear) -> torch.Tensor:
    # CastedLinear.forward: weight and bias cast to the input's dtype, one F.linear (bias fused as there).
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    return F.linear(x, layer.weight.to(x.dtype), bias)


def swiglu(x: torch.Tensor, mlp: SwiGLU) -> torch.Tensor:
    # layers.SwiGLU.forward: one gate_up projection chunked in two, silu and product in the input dtype.
    gate, up = casted_linear(x, mlp.gate_up_proj).chunk(2, dim=-1)
    return casted_linear(F.silu(gate) * up, mlp.down_proj)


def attention(h: torch.Tensor, attn: Attention, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Self-attention with the official cast points (layers.Attention, apply_rotary_pos_emb)."""
    batch, seq, _ = h.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    # layers.Attention.forward: q, k, v are slices of one [B, S, 3 * heads, head_dim] view.
    qkv = casted_linear(h, attn.qkv_proj).view(batch, seq, 3 * heads, head_dim)
    q, k, v = qkv[:, :, :heads], qkv[:, :, heads:2 * heads], qkv[:, :, 2 * heads:]
    if rope is not None:
        # layers.apply_rotary_pos_emb: q and k cast to the (float32) table dtype, rotated, cast back.
        cos, sin = (t.unsqueeze(-2) for t in rope)  # [S, 1, head_dim]
        q32, k32 = q.to(cos.dtype), k.to(cos.dtype)
        q = (q32 * cos + rotate_half(q32) * sin).to(h.dtype)
        k = (k32 * cos + rotate_half(k32) * sin).to(h.dtype)
    # TRM: SDPA on the [B, heads, S, head_dim] transposes (einops' rearrange is the same strided view).
    # HRM: flash_attn_func(q, k, v) on [B, S, heads, head_dim]; this SDPA on the transposes stands in for it.
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(query=q, key=k, value=v, is_causal=False)
    return casted_linear(out.transpose(1, 2).reshape(batch, seq, heads * head_dim), attn.o_proj)


def block(h: torch.Tensor, layer: Block, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """One post-norm block (trm.py / hrm_act_v1.py Block.forward): residual adds in the input dtype, rms_norm in
    float32 and cast back; mlp_t mixes positions on the transpose."""
    eps = layer.eps
    if hasattr(layer, "mlp_t"):
        t = h.transpose(1, 2)  # [B, D, S]
        h = rms_norm(t + swiglu(t, layer.mlp_t), eps).transpose(1, 2)
    else:
        h = rms_norm(h + attention(h, layer.self_attn, rope), eps)
    return rms_norm(h + swiglu(h, layer.mlp), eps)


def reasoning_stack(h: torch.Tensor, injection: torch.Tensor, stack: ReasoningStack,
                    rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    # ReasoningModule.forward: injection added in the carry's dtype, then the blocks.
    h = h + injection
    for layer in stack.layers:
        h = block(h, layer, rope)
    return h


class Bfloat16Reference:
    """A RecursiveModel's recursion in the official bfloat16 arithmetic; same interface as the model's own
    `embed` / `initial_state` / `step`. States and logits are bfloat16 tensors, q_halt / q_continue float32."""

    dtype = torch.bfloat16

    def __init__(self, model: RecursiveModel):
        self.model = model
        self.config = model.config

    def embed(self, tokens: torch.Tensor, puzzle_ids: torch.Tensor) -> torch.Tensor:
        # _input_embeddings: rows cast to bfloat16 first (CastedEmbedding; the sparse puzzle embedding casts the
        # gathered rows), so padding, concatenation and both scales happen in bfloat16.
        m, cfg = self.model, self.config
        x = F.embedding(tokens.long(), m.embed_tokens.embedding_weight.to(self.dtype))
        if cfg.puzzle_emb_ndim > 0:
            prefix = m.puzzle_emb.weights[puzzle_ids.long()].to(self.dtype)
            prefix = F.pad(prefix, (0, cfg.prefix_len * cfg.hidden_size - cfg.puzzle_emb_ndim))
            x = torch.cat((prefix.view(-1, cfg.prefix_len, cfg.hidden_size), x), dim=-2)
        if cfg.pos_encodings == "learned":
            x = 0.707106781 * (x + m.embed_pos.embedding_weight.to(self.dtype))
        return m.embed_scale * x

    def initial_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        # H_init / L_init are forward_dtype buffers; reset_carry broadcasts them over [B, S, D].
        shape = (batch, self.config.total_seq_len, self.config.hidden_size)
        return (self.model.H_init.to(self.dtype).expand(shape).clone(),
                self.model.L_init.to(self.dtype).expand(shape).clone())

    def step(self, x: torch.Tensor, z_H: torch.Tensor, z_L: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One ACT step in the official order (H_cycles x {L_cycles low updates, one high update}), then the
        heads: logits [B, seq_len, vocab] bfloat16, q_halt and q_continue float32."""
        m, cfg = self.model, self.config
        rope = m.rope  # float32 tables, equal to RotaryEmbedding's cos_cached / sin_cached
        x, z_H, z_L = x.to(self.dtype), z_H.to(self.dtype), z_L.to(self.dtype)
        for _ in range(cfg.H_cycles):
            for _ in range(cfg.L_cycles):
                z_L = reasoning_stack(z_L, z_H + x, m.L_level, rope)
            z_H = reasoning_stack(z_H, z_L, m.high_net, rope)
        return (z_H, z_L, *self.heads(z_H))

    def heads(self, z_H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """bfloat16 logits of the answer positions (lm_head output, argmax taken on it as ACTLossHead does), and
        q_halt, q_continue: the bfloat16 q_head output cast to float32 (`.to(torch.float32)` in trm.py)."""
        logits = casted_linear(z_H, self.model.lm_head)[:, self.config.prefix_len:]
        q = casted_linear(z_H[:, 0], self.model.q_head).to(torch.float32)
        return logits, q[:, 0], q[:, 1]


def kernel_probe() -> str:
    """sha256 of a few bfloat16 matrix products: which GEMM kernels this machine's torch runs. ATen's capability
    setting does not say: with ATEN_CPU_CAPABILITY=avx2 on a CPU with AVX-512 BF16, oneDNN still multiplies with
    the native bfloat16 instructions, which round differently from the AVX2 path (ONEDNN_MAX_CPU_ISA=AVX2 limits
    it). Bit-exact comparisons with a bfloat16 recording hold only where this probe equals the recording's."""
    import hashlib

    generator = torch.Generator().manual_seed(0)
    digest = hashlib.sha256()
    for m, k, n in ((64, 32, 128), (256, 64, 256), (16, 128, 32), (512, 128, 384)):
        a = torch.randn(m, k, generator=generator).bfloat16()
        w = torch.randn(n, k, generator=generator).bfloat16()
        digest.update(F.linear(a, w).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()
