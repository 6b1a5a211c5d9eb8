"""Input embedding in numpy: runs once per puzzle, not once per step, so it stays out of the step graph.

The puzzle-embedding table is an array in the bundle (ARC tables have ~1M rows: never a graph constant);
rows are gathered here and may be stored in float16.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from trm_export.errors import BundleError
from trm_export.runtime.manifest import EmbeddingSpec, TaskEncoding, member


def load_array(path: Path, shape: tuple[int | None, ...] | None = None, kinds: str = "biuf") -> np.ndarray:
    """A plain .npy of a bundle, its header checked against `shape` (None: any size) and against the file's size
    before anything is allocated (a crafted header can claim 1e11 elements)."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            found, fortran, dtype = read_header(f)
            data_start = f.tell()
            size = f.seek(0, 2)
            if dtype.hasobject or dtype.fields is not None or dtype.kind not in kinds:
                raise BundleError(f"{path}: arrays of dtype {dtype} are not accepted here (expected kinds {kinds!r})")
            if shape is not None and (len(found) != len(shape) or any(  # no zip(strict=): the runtime runs on 3.8
                    shape[i] is not None and found[i] != shape[i] for i in range(len(shape)))):
                want = [s if s is not None else "any" for s in shape]
                raise BundleError(f"{path}: shape {list(found)}, expected {want}")
            needed = math.prod(found) * dtype.itemsize
            if size - data_start != needed:
                raise BundleError(f"{path}: header claims {list(found)} {dtype} ({needed} bytes) but the file holds "
                                  f"{size - data_start}; the file is damaged or crafted")
            f.seek(0)
            array = fmt.read_array(f, allow_pickle=False)
    except BundleError:
        raise
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None
    except (OSError, ValueError, EOFError) as exc:
        raise BundleError(f"{path}: not a readable .npy array ({exc})") from None
    return array


def _finite(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise BundleError(f"{path}: holds NaN or infinite values; the bundle is broken, re-export it")
    return array


class Embedder:
    """tokens [N, seq_len] (+ puzzle ids [N]) -> x [N, prefix_len + seq_len, hidden] float32."""

    def __init__(self, bundle: Path, spec: EmbeddingSpec, task: TaskEncoding):
        self.spec, self.task = spec, task
        d, total = spec.hidden_size, task.prefix_len + task.seq_len

        def table(rel: str, shape: tuple[int | None, ...]) -> np.ndarray:
            path = member(bundle, rel)
            return _finite(load_array(path, shape, kinds="f"), path)

        self.tokens = table(spec.token_table, (task.vocab_size, d)).astype(np.float32, copy=False)
        self.positions = table(spec.position_table, (total, d)) if spec.position_table else None
        self.puzzles = (table(spec.puzzle_table, (task.num_puzzle_identifiers, spec.puzzle_emb_ndim))
                        if spec.puzzle_table else None)
        if self.puzzles is not None and spec.puzzle_emb_ndim > task.prefix_len * d:
            raise BundleError(f"{bundle}: puzzle_emb_ndim {spec.puzzle_emb_ndim} does not fit the prefix "
                              f"({task.prefix_len} x {d}); the manifest is inconsistent")
        self.H_init = table(spec.H_init, (d,)).astype(np.float32, copy=False)
        self.L_init = table(spec.L_init, (d,)).astype(np.float32, copy=False)

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
