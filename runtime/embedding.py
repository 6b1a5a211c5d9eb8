"""Input embedding in numpy: runs once per puzzle, not once per step, so it stays out of the step graph.

The puzzle-embedding table is an array in the bundle (ARC tables have ~1M rows: never a graph constant);
rows are gathered here and may be stored in float16.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from trm_export.errors import BundleError, InputError
from trm_export.runtime.manifest import EmbeddingSpec, TaskEncoding, member


def load_array(path: Path, shape: tuple[int | None, ...] | None = None, kinds: str = "biuf",
               mmap: bool = False) -> np.ndarray:
    """A plain .npy of a bundle, its header checked against `shape` (None: any size) and against the file's size
    before anything is allocated (a crafted header can claim 1e11 elements). `mmap`: a read-only memory map instead
    of a copy in memory (a large puzzle table: only the rows a run gathers are ever read)."""
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
            if mmap and not fortran:
                return np.memmap(path, dtype=dtype, mode="r", offset=data_start, shape=tuple(found))
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

        self._puzzle_path = member(bundle, spec.puzzle_table) if spec.puzzle_table else None

        self.tokens = table(spec.token_table, (task.vocab_size, d)).astype(np.float32, copy=False)
        self.positions = table(spec.position_table, (total, d)) if spec.position_table else None
        # The puzzle table (ARC: ~1M x 512) is memory-mapped, not read: every Solver of a process (quantize opens
        # several) would otherwise hold its own copy, and loading it would cost seconds each time. Its rows are
        # checked for NaN / inf where they are gathered; the manifest's checksum already covers the whole file.
        # --keep-puzzles: the table holds the rows of these original identifiers only (ascending).
        self.rows = None
        if spec.puzzle_rows is not None:
            self.rows = load_array(member(bundle, spec.puzzle_rows), (None,), kinds="i").astype(np.int64)
            if len(self.rows) == 0 or np.any(np.diff(self.rows) <= 0) or self.rows[0] < 0 \
                    or self.rows[-1] >= task.num_puzzle_identifiers:
                raise BundleError(f"{bundle}: {spec.puzzle_rows} must hold ascending identifiers below "
                                  f"{task.num_puzzle_identifiers}; the bundle is broken, re-export it")
        rows = task.num_puzzle_identifiers if self.rows is None else len(self.rows)
        self.puzzles = (load_array(self._puzzle_path, (rows, spec.puzzle_emb_ndim), kinds="f", mmap=True)
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
            rows = _finite(np.asarray(self.puzzles[self.table_rows(puzzle_ids)], dtype=np.float32), self._puzzle_path)
            padded = np.zeros((len(tokens), prefix * d), np.float32)
            padded[:, : rows.shape[1]] = rows
            x = np.concatenate([padded.reshape(len(tokens), prefix, d), x], axis=1)
        if self.positions is not None:
            x = np.float32(self.spec.position_scale) * (x + self.positions)
        return np.float32(self.spec.scale) * x

    def table_rows(self, puzzle_ids: np.ndarray) -> np.ndarray:
        """The table rows of (original) puzzle identifiers; one the bundle did not keep is refused."""
        if self.rows is None:
            return puzzle_ids
        at = np.minimum(np.searchsorted(self.rows, puzzle_ids), len(self.rows) - 1)
        missing = self.rows[at] != puzzle_ids
        if missing.any():
            raise InputError(f"puzzle identifier {int(np.asarray(puzzle_ids)[missing][0])} is not in this bundle's "
                             f"puzzle table: it keeps {len(self.rows):,} of {self.task.num_puzzle_identifiers:,} rows "
                             "(exported with --keep-puzzles); export again keeping it")
        return at

    def initial_state(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (batch, *self.state_shape)
        return np.broadcast_to(self.H_init, shape).copy(), np.broadcast_to(self.L_init, shape).copy()
