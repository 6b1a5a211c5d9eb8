"""The model configuration every stage agrees on.

Field names follow the official `arch:` section of `all_config.yaml` so that a user can read one against the
other; the few derived quantities (prefix length, intermediate sizes) are properties, computed exactly as the
official layers compute them, so there is one place that knows the arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from trm_export.errors import ConfigError

Family = Literal["trm", "hrm"]
POS_ENCODINGS = ("rope", "learned", "none")
MAX_CYCLES = 256  # H_cycles, L_cycles
MAX_CALLS = 1024  # network calls in one step (the official TRM: 3 x 7 = 21)
MAX_STEPS = 4096  # halt_max_steps (the manifest's limit too)


def find_multiple(a: int, b: int) -> int:
    """Smallest multiple of b that is >= a (the official SwiGLU rounding)."""
    return -(a // -b) * b


def swiglu_intermediate(width: int, expansion: float) -> int:
    """Intermediate size of the official SwiGLU: multiple of 256 >= round(expansion * width * 2 / 3)."""
    return find_multiple(round(expansion * width * 2 / 3), 256)


def prefix_length(family: str, puzzle_emb_ndim: int, puzzle_emb_len: int, hidden_size: int) -> int:
    """Puzzle-embedding positions prepended to the tokens: TRM takes puzzle_emb_len (0 = the ceil below),
    HRM always ceil(puzzle_emb_ndim / hidden_size); none without a puzzle embedding."""
    if puzzle_emb_ndim == 0:
        return 0
    if family == "hrm" or puzzle_emb_len == 0:
        return math.ceil(puzzle_emb_ndim / hidden_size)
    return puzzle_emb_len


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and task shape of one TRM or HRM checkpoint."""

    family: Family
    # Task shape (from dataset.json or tensor shapes).
    vocab_size: int
    seq_len: int
    num_puzzle_identifiers: int
    # Network.
    hidden_size: int
    num_heads: int
    expansion: float
    L_layers: int
    H_cycles: int
    L_cycles: int
    H_layers: int = 0  # HRM only; TRM has a single network (its config field is ignored upstream)
    pos_encodings: str = "rope"
    puzzle_emb_ndim: int = 0
    puzzle_emb_len: int = 16  # TRM: 0 means ceil(puzzle_emb_ndim / hidden_size); HRM always uses the ceil
    mlp_t: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Adaptive computation time.
    halt_max_steps: int = 16
    no_ACT_continue: bool = True  # official name: halt on q_halt > 0 instead of q_halt > q_continue
    # The training arithmetic. Exported graphs and the parity reference compute in float32; export/bfloat16.py
    # computes as the official code does in bfloat16, for the accuracy a training run printed.
    forward_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        problems = []
        if self.family not in ("trm", "hrm"):
            problems.append(f"family must be 'trm' or 'hrm', got {self.family!r}")
        if self.pos_encodings not in POS_ENCODINGS:
            problems.append(f"pos_encodings must be one of {POS_ENCODINGS}, got {self.pos_encodings!r}")
        for name in ("vocab_size", "seq_len", "num_puzzle_identifiers", "hidden_size", "L_layers",
                     "H_cycles", "L_cycles", "halt_max_steps"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        # The step graph unrolls every network call of a step, and the loop runs halt_max_steps of them: bounds
        # far above any trained model's (paper TRM: 3 x 7 calls, 16 steps) that keep an export finite.
        for name, most in (("H_cycles", MAX_CYCLES), ("L_cycles", MAX_CYCLES), ("halt_max_steps", MAX_STEPS)):
            if int(getattr(self, name)) > most:
                problems.append(f"{name} must be at most {most}, got {getattr(self, name)}")
        if self.H_cycles <= MAX_CYCLES and self.L_cycles <= MAX_CYCLES and self.net_calls_per_step > MAX_CALLS:
            problems.append(f"H_cycles x (L_cycles + 1) = {self.net_calls_per_step} network calls per step; at most "
                            f"{MAX_CALLS} (each is unrolled into the step graph)")
        if self.family == "hrm" and self.H_layers < 1:
            problems.append(f"HRM needs H_layers >= 1, got {self.H_layers}")
        if self.family == "hrm" and self.mlp_t:
            problems.append("mlp_t exists only in TRM")
        if not self.mlp_t or self.family == "hrm":
            # The official Attention takes head_dim = hidden_size // num_heads (a floor: hidden 64 with 3 heads
            # runs, 3 heads of 21); it only needs at least one dimension per head.
            if not 1 <= self.num_heads <= self.hidden_size:
                problems.append(f"num_heads must be between 1 and hidden_size {self.hidden_size}, got "
                                f"{self.num_heads}")
        if self.pos_encodings == "rope" and self.num_heads >= 1 and (self.hidden_size // self.num_heads) % 2:
            problems.append(f"RoPE needs an even head_dim, got {self.hidden_size // max(self.num_heads, 1)}")
        if self.puzzle_emb_ndim < 0:
            problems.append(f"puzzle_emb_ndim must be >= 0, got {self.puzzle_emb_ndim}")
        if self.family == "trm" and self.puzzle_emb_ndim == 0 and self.puzzle_emb_len not in (0,):
            # Upstream sizes the state as seq_len + puzzle_emb_len but prepends nothing: that model cannot run.
            problems.append(
                f"puzzle_emb_ndim is 0 but puzzle_emb_len is {self.puzzle_emb_len}; the official TRM cannot run "
                "this combination (state and input lengths differ). Set puzzle_emb_len: 0"
            )
        if self.puzzle_emb_ndim > self.prefix_len * self.hidden_size:
            problems.append(
                f"puzzle_emb_ndim {self.puzzle_emb_ndim} does not fit in puzzle_emb_len {self.prefix_len} x "
                f"hidden_size {self.hidden_size}"
            )
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    # --- derived quantities, computed as the official code does ---------------------------------------
    @property
    def prefix_len(self) -> int:
        """Number of puzzle-embedding positions prepended to the tokens."""
        return prefix_length(self.family, self.puzzle_emb_ndim, self.puzzle_emb_len, self.hidden_size)

    @property
    def total_seq_len(self) -> int:
        """Length of the state z_H / z_L: puzzle prefix + tokens."""
        return self.seq_len + self.prefix_len

    @property
    def head_dim(self) -> int:
        """hidden_size // num_heads, as the official code computes it (a floor)."""
        return self.hidden_size // self.num_heads

    @property
    def attention_width(self) -> int:
        """Rows of each of q, k, v (and columns of o_proj): num_heads * head_dim, <= hidden_size."""
        return self.num_heads * self.head_dim

    @property
    def mlp_intermediate(self) -> int:
        return swiglu_intermediate(self.hidden_size, self.expansion)

    @property
    def mlp_t_intermediate(self) -> int:
        return swiglu_intermediate(self.total_seq_len, self.expansion)

    @property
    def halting_rule(self) -> str:
        """'q_halt>0' (TRM default) or 'q_halt>q_continue' (HRM, TRM trained with the continue head)."""
        if self.family == "trm" and self.no_ACT_continue:
            return "q_halt>0"
        return "q_halt>q_continue"

    @property
    def net_calls_per_step(self) -> int:
        """Network applications in one ACT step."""
        return self.H_cycles * (self.L_cycles + 1)

    @property
    def step_flops(self) -> int:
        """Floating-point operations (a multiply-add is two) of one recursion step of one puzzle: every matmul of
        every network call, the attention scores and the output head. Counted from the shapes, never timed: it
        sizes each export stage's sample (trm_export.planning). Matmuls are over 99% of the step; norms, rope and
        activations are left out."""
        s, d, a = self.total_seq_len, self.hidden_size, self.attention_width
        mlp = 2 * s * d * 3 * self.mlp_intermediate  # SwiGLU: gate and up projections, then down
        if self.mlp_t:
            mixer = 2 * d * s * 3 * self.mlp_t_intermediate  # the same SwiGLU across positions
        else:
            mixer = 2 * s * d * 3 * a + 2 * 2 * s * s * a + 2 * s * a * d  # q, k, v; scores and values; o
        if self.family == "hrm":
            layers = self.H_cycles * (self.L_cycles * self.L_layers + self.H_layers)
        else:
            layers = self.net_calls_per_step * self.L_layers
        return layers * (mixer + mlp) + 2 * s * d * self.vocab_size + 2 * d * 2  # lm head on every position; q head

    def replace(self, **changes: object) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config fields {unknown}; known: {sorted(known)}")
        return cls(**data)
