"""PyTorch reference inference: the yardstick every exported graph and every precision is measured against.

Two loop modes, as the runtime offers them:
- fixed: every puzzle runs `max_steps` ACT steps (default halt_max_steps), the official evaluation;
- adaptive: a puzzle halts at the first step k >= min_steps where the trained Q head says so
  (q_halt > 0, or q_halt > q_continue for checkpoints trained with the continue head), or at max_steps.

For comparison step by step, every step's heads are recorded and, on request, every step's z_H / z_L / logits.

compute_dtype "float32" (default) runs the model's own float32 function, the one every exported graph computes;
"bfloat16" computes as the official code does with forward_dtype bfloat16 (export/bfloat16.py), the number the
user's training printed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trm_export.export.bfloat16 import for_compute_dtype
from trm_export.export.model import RecursiveModel
from trm_export.runtime.solver import halt_now


@dataclass
class ReferenceTrace:
    """What the reference computed for N puzzles over `num_steps` steps.

    Arrays are [num_steps, N, ...]; `predictions` and `steps_used` are the loop's answer (the halting step's
    argmax in adaptive mode, the last step's in fixed mode).
    """

    mode: str
    predictions: np.ndarray  # [N, seq_len] int32
    steps_used: np.ndarray  # [N] int32
    q_halt: np.ndarray  # [T, N] float32
    q_continue: np.ndarray  # [T, N] float32
    step_predictions: np.ndarray  # [T, N, seq_len] int32
    compute_dtype: str = "float32"  # the reference's arithmetic (recorded arrays are float32 either way)
    z_H: np.ndarray | None = None  # [T, N, S, D] float32, when record_states
    z_L: np.ndarray | None = None
    logits: np.ndarray | None = None  # [T, N, seq_len, vocab]

    @property
    def num_steps(self) -> int:
        return int(self.q_halt.shape[0])


@torch.inference_mode()
def run_reference(model: RecursiveModel, tokens: np.ndarray, puzzle_ids: np.ndarray | None = None, *,
                  mode: str = "fixed", max_steps: int | None = None, min_steps: int = 1,
                  batch_size: int = 256, record_states: bool = False, progress: bool = False,
                  compute_dtype: str = "float32") -> ReferenceTrace:
    """Run the recursion on `tokens` [N, seq_len] and trace it, in `compute_dtype` ("float32" or "bfloat16").

    Adaptive mode still runs all `max_steps` steps for every puzzle (so per-step values are comparable across
    modes); a puzzle's answer is frozen at its halting step, which is exactly what a real early exit returns.
    """
    if mode not in ("fixed", "adaptive"):
        raise ValueError(f"mode must be 'fixed' or 'adaptive', got {mode!r}")
    net = for_compute_dtype(model, compute_dtype)
    cfg = model.config
    steps = int(max_steps or cfg.halt_max_steps)
    if steps < 1 or not 1 <= min_steps <= steps:
        raise ValueError(f"need 1 <= min_steps ({min_steps}) <= max_steps ({steps})")
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != cfg.seq_len:
        raise ValueError(f"tokens must be [N, {cfg.seq_len}], got {list(tokens.shape)}")
    n = tokens.shape[0]
    puzzle_ids = np.zeros(n, dtype=np.int64) if puzzle_ids is None else np.asarray(puzzle_ids)

    q_halt = np.zeros((steps, n), np.float32)
    q_cont = np.zeros((steps, n), np.float32)
    step_preds = np.zeros((steps, n, cfg.seq_len), np.int32)
    states = {}
    if record_states:
        s, d = cfg.total_seq_len, cfg.hidden_size
        states = {"z_H": np.zeros((steps, n, s, d), np.float32), "z_L": np.zeros((steps, n, s, d), np.float32),
                  "logits": np.zeros((steps, n, cfg.seq_len, cfg.vocab_size), np.float32)}

    batches = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"reference ({mode}, {steps} steps, {compute_dtype})", unit="batch")
    for start in batches:
        sl = slice(start, min(start + batch_size, n))
        x = net.embed(torch.tensor(tokens[sl], dtype=torch.long), torch.tensor(puzzle_ids[sl], dtype=torch.long))
        z_H, z_L = net.initial_state(x.shape[0])
        for t in range(steps):
            z_H, z_L, logits, qh, qc = net.step(x, z_H, z_L)
            q_halt[t, sl], q_cont[t, sl] = qh.numpy(), qc.numpy()
            step_preds[t, sl] = logits.argmax(-1).numpy()  # in the compute dtype: bfloat16 ties as officially
            if record_states:  # .float(): exact for bfloat16 values
                states["z_H"][t, sl], states["z_L"][t, sl] = z_H.float().numpy(), z_L.float().numpy()
                states["logits"][t, sl] = logits.float().numpy()

    if mode == "fixed":
        steps_used = np.full(n, steps, np.int32)
    else:
        halt = halt_now(q_halt, q_cont, cfg.halting_rule)
        halt[: min_steps - 1] = False
        halt[-1] = True
        steps_used = (halt.argmax(axis=0) + 1).astype(np.int32)
    predictions = step_preds[steps_used - 1, np.arange(n)]
    return ReferenceTrace(mode=mode, predictions=predictions, steps_used=steps_used, q_halt=q_halt,
                          q_continue=q_cont, step_predictions=step_preds, compute_dtype=compute_dtype, **states)
