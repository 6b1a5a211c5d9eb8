"""Input embedding in numpy: runs once per puzzle, not once per step, so it stays out of the step graph.

The puzzle-embedding table is an array in the bundle (ARC tables have ~1M rows: never a graph constant);
rows are gathered here and may be stored in float16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trm_export.runtime.manifest import EmbeddingSpec, TaskEncoding


def load_array(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


class Embedder:
    """tokens [N, seq_len] (+ puzzle ids [N]) -> x [N, prefix_len + seq_len, hidden] float32."""

    def __init__(self, bundle: Path, spec: EmbeddingSpec, task: TaskEncoding):
        self.spec, self.task = spec, task
        self.tokens = load_array(bundle / spec.token_table).astype(np.float32, copy=False)
        self.positions = load_array(bundle / spec.position_table) if spec.position_table else None
        self.puzzles = load_array(bundle / spec.puzzle_table) if spec.puzzle_table else None
        self.H_init = load_array(bundle / spec.H_init).astype(np.float32, copy=False)
        self.L_init = load_array(bundle / spec.L_init).astype(np.float32, copy=False)

    @property
    def state_shape(self) -> tuple[int, int]:
        return self.task.prefix_len + self.task.seq_len, self.spec.hidden_size

    def __call__(self, tokens: np.ndarray, puzzle_ids: np.ndarray) -> np.ndarray:
        x = self.tokens[tokens]
        if self.puzzles is not None:
            d, prefix = self.spec.hidden_size, self.task.prefix_len
            rows = self.puzzles[puzzle_ids].astype(np.float32)
            padded = np.zeros((len(tokens), prefix * d), np.float32)
            padded[:, : rows.shape[1]] = rows
            x = np.concatenate([padded.reshape(len(tokens), prefix, d), x], axis=1)
        if self.positions is not None:
            x = np.float32(self.spec.position_scale) * (x + self.positions)
        return np.float32(self.spec.scale) * x

    def initial_state(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (batch, *self.state_shape)
        return np.broadcast_to(self.H_init, shape).copy(), np.broadcast_to(self.L_init, shape).copy()
