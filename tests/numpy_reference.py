"""A second, independent TRM / HRM forward pass in plain numpy float64, for parity tests.

Written from the equations in shared/reference/checkpoints.md ("TRM inference, exactly" and "HRM") and nothing
else from this project: it reads the official-format state dict itself, never imports `trm_export`, and keeps
every step of the math explicit and unfused, so a bug in the PyTorch reference cannot be mirrored here.

Config fields come from any object with the official names (e.g. `official_format.Variant`): family,
hidden_size, num_heads, H_cycles, L_cycles, seq_len, prefix_len, pos_encodings, mlp_t, puzzle_emb_ndim,
halt_max_steps, no_ACT_continue, and optionally rms_norm_eps (1e-5) and rope_theta (1e4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The three key prefixes a user's checkpoint may carry (compiled, plain, DataParallel), longest first.
KNOWN_PREFIXES = ("_orig_mod.model.inner.", "model.inner.", "module.")
LEARNED_POS_SCALE = 0.707106781  # the literal the official code uses, not 1/sqrt(2) to full precision


@dataclass
class NumpyTrace:
    z_H: np.ndarray  # [T, N, S, D] float64, state after each step
    z_L: np.ndarray  # [T, N, S, D]
    logits: np.ndarray  # [T, N, seq_len, vocab]
    q_halt: np.ndarray  # [T, N]
    q_continue: np.ndarray  # [T, N]
    step_predictions: np.ndarray  # [T, N, seq_len] argmax of each step's logits
    predictions: np.ndarray  # [N, seq_len] argmax at the halting step
    steps_used: np.ndarray  # [N] 1-based halting step


# ----------------------------------------------------------------------------------------------- loading


def strip_known_prefix(state: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    for prefix in KNOWN_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            return prefix, {k[len(prefix):]: v for k, v in state.items()}
    return "", dict(state)


def load_official_state(path: str | Path) -> tuple[str, dict[str, np.ndarray]]:
    """torch.load the checkpoint file, strip its prefix, convert every tensor to float64 numpy (exactly)."""
    raw = torch.load(Path(path), map_location="cpu", weights_only=True)
    prefix, state = strip_known_prefix(raw)
    return prefix, {k: v.detach().to(torch.float64).numpy() for k, v in state.items()}


def state_to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Unprefixed torch state dict (e.g. official_state_dict) -> float64 numpy."""
    return {k: v.detach().to(torch.float64).numpy() for k, v in state.items()}


# ------------------------------------------------------------------------------------------- primitives


def rms(x: np.ndarray, eps: float) -> np.ndarray:
    """RMS norm over the last axis, no weight."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """y = x W^T (+ b), W stored [out, in] as torch does."""
    y = np.matmul(x, weight.T)
    return y if bias is None else y + bias


def silu(x: np.ndarray) -> np.ndarray:
    # x * sigmoid(x), with sigmoid written through tanh so large |x| never overflows exp
    return x * 0.5 * (1.0 + np.tanh(0.5 * x))


def swiglu(x: np.ndarray, gate_up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """down(silu(gate) * up), gate / up = first / second half of gate_up(x) along the last axis."""
    gu = linear(x, gate_up)
    inter = gu.shape[-1] // 2
    gate, up = gu[..., :inter], gu[..., inter:]
    return linear(silu(gate) * up, down)


def rope_tables(positions: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin [S, head_dim] for rotate-half RoPE: frequencies 1/theta^(2i/head_dim), repeated twice."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(positions, dtype=np.float64), inv_freq)  # [S, head_dim/2]
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles), np.sin(angles)


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def attention(h: np.ndarray, qkv_w: np.ndarray, o_w: np.ndarray, num_heads: int,
              rope: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """Non-causal, unmasked multi-head attention; qkv rows = all q heads, then all k heads, then all v heads."""
    b, s, d = h.shape
    hd = d // num_heads
    qkv = linear(h, qkv_w).reshape(b, s, 3 * num_heads, hd)
    q = qkv[:, :, :num_heads]  # [B, S, H, hd]
    k = qkv[:, :, num_heads:2 * num_heads]
    v = qkv[:, :, 2 * num_heads:]
    if rope is not None:
        cos, sin = rope[0][None, :, None, :], rope[1][None, :, None, :]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    weights = softmax(scores, axis=-1)
    out = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, s, num_heads * hd)
    return linear(out, o_w)


# ----------------------------------------------------------------------------------------------- model


class NumpyRecursiveModel:
    """TRM (one network L_level for both z_L and z_H) or HRM (L_level for z_L, H_level for z_H)."""

    def __init__(self, state: dict[str, np.ndarray], cfg: Any):
        self.dtype = np.dtype(np.float64)  # the judge: float64, whose rounding is far below any bar
        self.w = {k: v.astype(self.dtype) for k, v in state.items()}
        self.family = cfg.family
        self.d = int(cfg.hidden_size)
        self.num_heads = int(cfg.num_heads)
        self.h_cycles = int(cfg.H_cycles)
        self.l_cycles = int(cfg.L_cycles)
        self.seq_len = int(cfg.seq_len)
        self.prefix = int(cfg.prefix_len)
        self.total = self.seq_len + self.prefix
        self.pos = cfg.pos_encodings
        self.mlp_t = bool(cfg.mlp_t)
        self.puzzle_ndim = int(cfg.puzzle_emb_ndim)
        self.halt_max_steps = int(cfg.halt_max_steps)
        self.eps = float(getattr(cfg, "rms_norm_eps", 1e-5))
        theta = float(getattr(cfg, "rope_theta", 10000.0))
        if self.family == "hrm" or not getattr(cfg, "no_ACT_continue", True):
            self.halting_rule = "q_halt>q_continue"
        else:
            self.halting_rule = "q_halt>0"
        self.rope = None
        if self.pos == "rope":
            cos, sin = rope_tables(self.total, self.d // self.num_heads, theta)
            self.rope = (cos.astype(self.dtype), sin.astype(self.dtype))
        self.levels = {name: self._layers(name) for name in ("L_level", "H_level")}
        if self.family == "hrm":
            assert self.levels["H_level"], "HRM checkpoint without H_level layers"
        assert self.levels["L_level"], "checkpoint without L_level layers"

    def _layers(self, level: str) -> list[dict[str, np.ndarray]]:
        layers = []
        i = 0
        while f"{level}.layers.{i}.mlp.gate_up_proj.weight" in self.w:
            p = f"{level}.layers.{i}."
            layers.append({k[len(p):]: v for k, v in self.w.items() if k.startswith(p)})
            i += 1
        return layers

    # embeddings -------------------------------------------------------------------------------------

    def embed(self, tokens: np.ndarray, puzzle_ids: np.ndarray) -> np.ndarray:
        x = self.w["embed_tokens.embedding_weight"][tokens]  # [B, seq_len, D]
        b = x.shape[0]
        if self.puzzle_ndim > 0:
            row = self.w["puzzle_emb.weights"][puzzle_ids]  # [B, ndim]
            padded = np.zeros((b, self.prefix * self.d), dtype=self.dtype)
            padded[:, :row.shape[1]] = row
            x = np.concatenate([padded.reshape(b, self.prefix, self.d), x], axis=1)
        assert x.shape[1] == self.total
        if self.pos == "learned":
            x = self.dtype.type(LEARNED_POS_SCALE) * (x + self.w["embed_pos.embedding_weight"][None])
        return x * self.dtype.type(math.sqrt(self.d))

    # block / networks -----------------------------------------------------------------------------

    def block(self, h: np.ndarray, lw: dict[str, np.ndarray]) -> np.ndarray:
        if self.mlp_t:
            ht = np.swapaxes(h, 1, 2)  # [B, D, S]: mix over positions, normalise over positions
            ht = rms(ht + swiglu(ht, lw["mlp_t.gate_up_proj.weight"], lw["mlp_t.down_proj.weight"]), self.eps)
            h = np.swapaxes(ht, 1, 2)
        else:
            a = attention(h, lw["self_attn.qkv_proj.weight"], lw["self_attn.o_proj.weight"], self.num_heads,
                          self.rope)
            h = rms(h + a, self.eps)
        return rms(h + swiglu(h, lw["mlp.gate_up_proj.weight"], lw["mlp.down_proj.weight"]), self.eps)

    def net(self, level: str, h: np.ndarray, injection: np.ndarray) -> np.ndarray:
        h = h + injection
        for lw in self.levels[level]:
            h = self.block(h, lw)
        return h

    def act_step(self, z_H: np.ndarray, z_L: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        high = "H_level" if self.family == "hrm" else "L_level"
        for _ in range(self.h_cycles):
            for _ in range(self.l_cycles):
                z_L = self.net("L_level", z_L, z_H + x)
            z_H = self.net(high, z_H, z_L)
        return z_H, z_L

    def heads(self, z_H: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        logits = linear(z_H, self.w["lm_head.weight"])[:, self.prefix:]
        q = linear(z_H[:, 0], self.w["q_head.weight"], self.w["q_head.bias"])
        return logits, q[:, 0], q[:, 1]

    def halts(self, q_halt: np.ndarray, q_continue: np.ndarray) -> np.ndarray:
        return q_halt > 0 if self.halting_rule == "q_halt>0" else q_halt > q_continue

    # the loop -------------------------------------------------------------------------------------

    def run(self, tokens: np.ndarray, puzzle_ids: np.ndarray, *, mode: str = "fixed",
            max_steps: int | None = None, min_steps: int = 1,
            given_states: tuple[np.ndarray, np.ndarray] | None = None,
            start: tuple[np.ndarray, np.ndarray] | None = None) -> NumpyTrace:
        """Run `max_steps` ACT steps (default halt_max_steps) from H_init / L_init, or from `start` = (z_H, z_L).

        `given_states` = (z_H, z_L) [T, N, S, D] from another implementation switches to one-step
        ("teacher-forced") mode: step t starts from given_states[.][t - 1] (step 1 from the init) instead of
        this model's own step t - 1, so each step's math is checked without float32 drift carried over from
        earlier steps.
        """
        tokens = np.asarray(tokens, dtype=np.int64)
        puzzle_ids = np.asarray(puzzle_ids, dtype=np.int64)
        steps = int(max_steps or self.halt_max_steps)
        b = tokens.shape[0]
        if given_states is not None:
            given_H = np.asarray(given_states[0], dtype=self.dtype)
            given_L = np.asarray(given_states[1], dtype=self.dtype)
            assert given_H.shape[:2] == given_L.shape[:2] == (steps, b), (given_H.shape, steps, b)
        x = self.embed(tokens, puzzle_ids)
        if start is not None:
            z_H, z_L = (np.asarray(z, dtype=self.dtype).copy() for z in start)
        else:
            z_H = np.broadcast_to(self.w["H_init"], (b, self.total, self.d)).copy()
            z_L = np.broadcast_to(self.w["L_init"], (b, self.total, self.d)).copy()
        zh, zl, lg, qh, qc = [], [], [], [], []
        for t in range(steps):
            if given_states is not None and t > 0:
                z_H, z_L = given_H[t - 1], given_L[t - 1]
            z_H, z_L = self.act_step(z_H, z_L, x)
            logits, q_halt, q_continue = self.heads(z_H)
            zh.append(z_H)
            zl.append(z_L)
            lg.append(logits)
            qh.append(q_halt)
            qc.append(q_continue)
        logits_t = np.stack(lg)
        q_halt_t, q_cont_t = np.stack(qh), np.stack(qc)
        step_preds = logits_t.argmax(-1)
        if mode == "fixed":
            steps_used = np.full(b, steps)
        elif mode == "adaptive":
            steps_used = np.full(b, steps)
            for n in range(b):
                for t in range(min_steps - 1, steps):
                    if self.halts(q_halt_t[t, n], q_cont_t[t, n]):
                        steps_used[n] = t + 1
                        break
        else:
            raise ValueError(mode)
        predictions = np.stack([step_preds[steps_used[n] - 1, n] for n in range(b)])
        return NumpyTrace(z_H=np.stack(zh), z_L=np.stack(zl), logits=logits_t, q_halt=q_halt_t,
                          q_continue=q_cont_t, step_predictions=step_preds, predictions=predictions,
                          steps_used=steps_used)


def run_numpy_reference(checkpoint_file: str | Path, cfg: Any, tokens: np.ndarray, puzzle_ids: np.ndarray,
                        **kwargs: Any) -> NumpyTrace:
    """Load an official-format checkpoint file and run the numpy model on it."""
    _, state = load_official_state(checkpoint_file)
    return NumpyRecursiveModel(state, cfg).run(tokens, puzzle_ids, **kwargs)
