"""TRM and HRM as readable PyTorch modules, state-dict compatible with the official checkpoints.

Parameter and buffer names equal the official ones once the `_orig_mod.model.inner.` prefix is stripped, so a
checkpoint loads with `load_state_dict(strict=True)`. The math is the official math, written plainly:
attention is an explicit softmax(q k^T / sqrt(d)) v (no flash-attn), the reference runs in float32.

The recursion (one ACT step) is `RecursiveModel.step`; the loop over steps belongs to the caller.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from trm_export.export.config import ModelConfig, swiglu_intermediate
from trm_export.export.step_protocol import EmbeddingArrays


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS norm over the last axis, computed in float32."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return x.to(dtype)


def rms_norm_fusable(x: torch.Tensor, eps: float, unit: torch.Tensor) -> torch.Tensor:
    """rms_norm in the form ONNX Runtime fuses into one SimplifiedLayerNormalization kernel (x / sqrt(ms + eps)
    times a scale, here ones), used only when exporting the step graph; equal to rms_norm up to rounding."""
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * unit


def rotate_half(x: torch.Tensor, half: int | None = None) -> torch.Tensor:
    """NeoX-style rotation: [x1, x2] -> [-x2, x1] over the last axis (`half`: its length's half, when known: a
    traced size would export as Shape/Gather/Div feeding each Slice)."""
    half = x.shape[-1] // 2 if half is None else half
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [length, head_dim] with inv_freq = 1 / theta^(2i / head_dim), halves repeated."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


class Linear(nn.Module):
    """y = x W^T (+ b); named like the official CastedLinear (`weight`, `bias`).

    `left` (export form of mlp_t only): y = W x, the same map applied along axis -2 of x.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight, std=1.0 / math.sqrt(in_features), a=-2 / math.sqrt(in_features),
                              b=2 / math.sqrt(in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.left = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.left:
            y = torch.matmul(self.weight, x)
            return y if self.bias is None else y + self.bias[:, None]
        return F.linear(x, self.weight, self.bias)


class WeightHalf(nn.Module):
    """One half (rows) of a parent Linear's weight, applied like the parent (x W^T, or W x when `left`).

    It holds no parameter (the state dict keeps the official names); calling it as a module gives the exported
    MatMul a readable scope (`.../mlp/gate_proj/MatMul`), which quantization reports use as the layer name.
    """

    def __init__(self, parent: Linear, half: int):
        super().__init__()
        self._parent = [parent]  # a list, so it is not registered as a second owner of the weight
        self.half = half
        self.left = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._parent[0].weight
        rows = w.shape[0] // 2
        w = w[:rows] if self.half == 0 else w[rows:]
        return torch.matmul(w, x) if self.left else F.linear(x, w)


class Embedding(nn.Module):
    """Token / position table; named like the official CastedEmbedding (`embedding_weight`)."""

    def __init__(self, num: int, dim: int, init_std: float):
        super().__init__()
        self.embedding_weight = nn.Parameter(torch.empty(num, dim))
        nn.init.trunc_normal_(self.embedding_weight, std=init_std, a=-2 * init_std, b=2 * init_std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embedding_weight)


class PuzzleEmbedding(nn.Module):
    """Per-puzzle vectors (a buffer named `weights`, as the official sparse embedding stores it)."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.register_buffer("weights", torch.zeros(num, dim))

    def forward(self, puzzle_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(puzzle_ids, self.weights)


class SwiGLU(nn.Module):
    """down(silu(gate) * up), with gate and up the two halves of one projection."""

    def __init__(self, width: int, expansion: float):
        super().__init__()
        inter = swiglu_intermediate(width, expansion)
        self.gate_up_proj = Linear(width, 2 * inter)
        self.down_proj = Linear(inter, width)
        self.gate_proj, self.up_proj = WeightHalf(self.gate_up_proj, 0), WeightHalf(self.gate_up_proj, 1)
        self.export_form = False  # set while exporting (RecursiveModel.exporting)

    def set_export_form(self, on: bool, along_positions: bool = False) -> None:
        """Export form: gate and up as two MatMuls on the weight's halves (folded into two initializers):
        `chunk` exports as Shape/Gather/Div/Slice per call and the slices copy (measured 11-13% per step).
        along_positions (mlp_t): the SwiGLU takes h [B, S, D] and mixes along axis 1 as left products W @ h,
        instead of being given h transposed: ONNX Runtime runs the transposed form as FusedMatMul(transA)
        at half the speed of a plain MatMul (measured 4% per step at batch 1, 12% at batch 64)."""
        self.export_form = on
        for m in (self.gate_proj, self.up_proj, self.down_proj):
            m.left = on and along_positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.export_form:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Attention(nn.Module):
    """Non-causal multi-head self-attention; qkv rows are all q heads, then all k heads, then all v heads.

    As the official Attention: head_dim = hidden_size // num_heads (floor), and the heads are
    num_heads * head_dim wide, which is less than hidden_size when num_heads does not divide it.
    """

    def __init__(self, hidden_size: int, num_heads: int, seq_len: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.width = num_heads * self.head_dim
        self.seq_len = seq_len
        self.qkv_proj = Linear(hidden_size, 3 * self.width)
        self.o_proj = Linear(self.width, hidden_size)
        self.export_form = False  # set while exporting (RecursiveModel.exporting)
        self.onnxruntime_ops = False  # export form with ONNX Runtime's contrib ops (the cpu target)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        if self.onnxruntime_ops:
            return self._forward_onnxruntime(h, rope)
        batch, seq, _ = h.shape
        half = None
        if self.export_form:  # constant shapes: traced sizes export as Shape/Gather/Unsqueeze/Concat chains per call
            batch, seq, half = -1, self.seq_len, self.head_dim // 2
        qkv = self.qkv_proj(h).view(batch, seq, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(dim=2)  # each [B, S, heads, head_dim]
        if rope is not None:
            cos, sin = (t[:, None, :] for t in rope)  # [S, 1, head_dim]
            q = q * cos + rotate_half(q, half) * sin
            k = k * cos + rotate_half(k, half) * sin
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, S, head_dim]
        if self.export_form:  # the plain ops every ONNX consumer (TensorRT, the browser) reads
            scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
            out = torch.matmul(scores.softmax(dim=-1), v)
        else:  # as the official code computes it; PyTorch's fused kernel never holds the [S, S] scores (ARC's
            # 900 positions: 5-6x faster here, in float32 and in the float64 rounding checks)
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(self.head_dim))
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.width))

    def _forward_onnxruntime(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The same attention as two ONNX Runtime contrib nodes (export/onnxruntime_ops.py); `rope` holds the
        rotary caches (RecursiveModel.rope in this form)."""
        from trm_export.export import onnxruntime_ops as ort_ops  # it builds on this module (rotate_half)

        q, k, v = self.qkv_proj(h).split(self.width, dim=-1)  # each [B, S, heads * head_dim]
        if rope is not None:
            offset = torch.zeros(1, dtype=torch.long)  # positions 0..S-1
            q = ort_ops.RotaryEmbedding.apply(q, offset, *rope, self.num_heads)
            k = ort_ops.RotaryEmbedding.apply(k, offset, *rope, self.num_heads)
        out = ort_ops.MultiHeadAttention.apply(q, k, v, self.num_heads, 1.0 / math.sqrt(self.head_dim))
        return self.o_proj(out)


class Block(nn.Module):
    """Post-norm block: token mixing (attention, or an MLP across positions for mlp_t), then a SwiGLU."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.export_form = False  # set while exporting (RecursiveModel.exporting)
        if config.mlp_t:
            self.mlp_t = SwiGLU(config.total_seq_len, config.expansion)
        else:
            self.self_attn = Attention(config.hidden_size, config.num_heads, config.total_seq_len)
        self.mlp = SwiGLU(config.hidden_size, config.expansion)
        self.register_buffer("unit_d", torch.ones(config.hidden_size), persistent=False)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """RMS norm over the hidden axis (in the pattern ONNX Runtime fuses while exporting)."""
        return rms_norm_fusable(x, self.eps, self.unit_d) if self.export_form else rms_norm(x, self.eps)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        if hasattr(self, "mlp_t") and self.export_form:  # export form: mlp_t mixes h along axis 1 itself
            # The norm over positions is written on axis 1 directly: ONNX Runtime pushes transposes through it
            # and unfuses it anyway, so a transposed fusable form would only add a multiply by ones.
            x = h + self.mlp_t(h)
            h = x / torch.sqrt(x.pow(2).mean(1, keepdim=True) + self.eps)
        elif hasattr(self, "mlp_t"):
            t = h.transpose(1, 2)  # [B, D, S]: mix along positions
            h = rms_norm(t + self.mlp_t(t), self.eps).transpose(1, 2)
        else:
            h = self.norm(h + self.self_attn(h, rope))
        return self.norm(h + self.mlp(h))


class ReasoningStack(nn.Module):
    """net(h, injection) = blocks(h + injection)."""

    def __init__(self, config: ModelConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(Block(config) for _ in range(num_layers))

    def forward(self, h: torch.Tensor, injection: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        h = h + injection
        for layer in self.layers:
            h = layer(h, rope)
        return h


class RecursiveModel(nn.Module):
    """TRM (one network for both states) or HRM (an L network and an H network)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.embed_scale = math.sqrt(d)
        self.embed_tokens = Embedding(config.vocab_size, d, init_std=1.0 / self.embed_scale)
        self.lm_head = Linear(d, config.vocab_size)
        self.q_head = Linear(d, 2, bias=True)
        if config.puzzle_emb_ndim > 0:
            self.puzzle_emb = PuzzleEmbedding(config.num_puzzle_identifiers, config.puzzle_emb_ndim)
        if config.pos_encodings == "learned":
            self.embed_pos = Embedding(config.total_seq_len, d, init_std=1.0 / self.embed_scale)
        if config.pos_encodings == "rope":
            cos, sin = rope_tables(config.head_dim, config.total_seq_len, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
            # RotaryEmbedding's caches: one half of each table (its halves repeat), stored once for every layer.
            self.register_buffer("rope_cos_cache", cos[:, :config.head_dim // 2].clone(), persistent=False)
            self.register_buffer("rope_sin_cache", sin[:, :config.head_dim // 2].clone(), persistent=False)
        self.onnxruntime_ops = False  # set while exporting with ONNX Runtime's contrib ops (exporting)
        if config.family == "hrm":
            self.H_level = ReasoningStack(config, config.H_layers)
        self.L_level = ReasoningStack(config, config.L_layers)
        self.register_buffer("H_init", torch.empty(d))
        self.register_buffer("L_init", torch.empty(d))
        nn.init.trunc_normal_(self.H_init, std=1.0, a=-2.0, b=2.0)
        nn.init.trunc_normal_(self.L_init, std=1.0, a=-2.0, b=2.0)
        with torch.no_grad():  # Q starts near "never halt" so early training is plain deep supervision
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)

    @property
    def rope(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin tables [S, head_dim]; in the ONNX Runtime export form RotaryEmbedding's half-width caches."""
        if not hasattr(self, "rope_cos"):
            return None
        return (self.rope_cos_cache, self.rope_sin_cache) if self.onnxruntime_ops else (self.rope_cos, self.rope_sin)

    @property
    def high_net(self) -> ReasoningStack:
        """The network that updates z_H: TRM reuses L_level, HRM has its own H_level."""
        return self.H_level if hasattr(self, "H_level") else self.L_level

    def embed(self, tokens: torch.Tensor, puzzle_ids: torch.Tensor) -> torch.Tensor:
        """x [B, prefix + seq_len, D]: token rows, puzzle prefix, learned positions, times sqrt(D). Once per puzzle."""
        cfg = self.config
        x = self.embed_tokens(tokens.long())
        if cfg.puzzle_emb_ndim > 0:
            prefix = self.puzzle_emb(puzzle_ids.long())
            prefix = F.pad(prefix, (0, cfg.prefix_len * cfg.hidden_size - cfg.puzzle_emb_ndim))
            x = torch.cat((prefix.view(-1, cfg.prefix_len, cfg.hidden_size), x), dim=1)
        if cfg.pos_encodings == "learned":
            x = 0.707106781 * (x + self.embed_pos.embedding_weight)
        return self.embed_scale * x

    def initial_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (batch, self.config.total_seq_len, self.config.hidden_size)
        return self.H_init.expand(shape).clone(), self.L_init.expand(shape).clone()

    def cycle(self, x: torch.Tensor, z_H: torch.Tensor, z_L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One H cycle: L_cycles low-level updates fed by z_H + x, then one high-level update fed by z_L."""
        for _ in range(self.config.L_cycles):
            z_L = self.L_level(z_L, z_H + x, self.rope)
        z_H = self.high_net(z_H, z_L, self.rope)
        return z_H, z_L

    def heads(self, z_H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logits of the answer positions, q_halt and q_continue (read at position 0)."""
        logits = self.lm_head(z_H)[:, self.config.prefix_len:]
        q = self.q_head(z_H[:, 0]).float()
        return logits, q[:, 0], q[:, 1]

    @contextlib.contextmanager
    def exporting(self, onnxruntime_ops: bool = False) -> Iterator[RecursiveModel]:
        """Within this block the model takes its export form: the same function, written the way ONNX Runtime
        runs fastest (norms it fuses, see rms_norm_fusable; SwiGLUs as plain MatMuls, see SwiGLU). With
        `onnxruntime_ops`, attention and rope become ONNX Runtime's contrib nodes (export/onnxruntime_ops.py):
        only ONNX Runtime runs that graph."""
        blocks = [m for m in self.modules() if isinstance(m, Block)]

        def set_form(on: bool) -> None:
            self.onnxruntime_ops = on and onnxruntime_ops
            for b in blocks:
                b.export_form = on
                b.mlp.set_export_form(on)
                if hasattr(b, "mlp_t"):
                    b.mlp_t.set_export_form(on, along_positions=True)
                else:
                    b.self_attn.export_form = on
                    b.self_attn.onnxruntime_ops = on and onnxruntime_ops

        set_form(True)
        try:
            yield self
        finally:
            set_form(False)

    def embedding_arrays(self) -> EmbeddingArrays:
        """The tables the runtime applies before the first step (export/step_protocol.py). The model's float32
        tensors are viewed, not copied: an ARC puzzle table (~1M x 512) costs one copy of the kept rows at most."""
        sd = {k: v.detach().float().numpy() for k, v in self.state_dict().items()}
        cfg = self.config
        return EmbeddingArrays(token_table=sd["embed_tokens.embedding_weight"], scale=float(self.embed_scale),
                               H_init=sd["H_init"], L_init=sd["L_init"],
                               position_table=(sd["embed_pos.embedding_weight"] if cfg.pos_encodings == "learned"
                                               else None), position_scale=0.707106781,
                               puzzle_table=sd["puzzle_emb.weights"] if cfg.puzzle_emb_ndim > 0 else None)

    def step(self, x: torch.Tensor, z_H: torch.Tensor, z_L: torch.Tensor):
        """One ACT step: H_cycles cycles, then the heads. Returns z_H, z_L, logits, q_halt, q_continue."""
        for _ in range(self.config.H_cycles):
            z_H, z_L = self.cycle(x, z_H, z_L)
        return (z_H, z_L, *self.heads(z_H))
