"""A client of the served loop model: puzzles in the runtime's text formats in, answers in the same format out.

The server speaks tokens ([N, seq_len] INT64, the bundle's `task` encoding). This client encodes puzzles as the
runtime does (runtime.io.read_puzzles: Sudoku lines, maze grids, or a .npy of tokens), checks their shape and
vocabulary before anything is sent, splits them into requests the model accepts (its `max_puzzles`), and turns
the answers back into `trm-export run`'s lines (answer, steps, valid), checked by the task's rules.

    client = LoopClient.for_bundle("localhost:8000", "trm/1/bundle")   # the repository's copy of the bundle
    print(client.solve_file("puzzles.txt"), end="")

Needs tritonclient (`pip install "tritonclient[http,grpc]"`), imported when a client is made.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trm_export.errors import InputError
from trm_export.runtime.io import check_solutions, format_solutions, read_puzzles
from trm_export.runtime.manifest import TaskEncoding, read_manifest
from trm_export.runtime.solver import SolveResult


class LoopClient:
    """One connection to the loop model `model` at `url` (HTTP "host:8000" or gRPC "host:8001")."""

    def __init__(self, url: str, encoding: TaskEncoding, model: str = "trm", protocol: str = "http",
                 max_puzzles: int = 256, timeout: float = 600.0):
        from trm_export.triton.load import client_module, connect

        if max_puzzles < 1:
            raise InputError(f"max_puzzles must be at least 1, got {max_puzzles}")
        self.encoding, self.model, self.max_puzzles, self.timeout = encoding, model, max_puzzles, timeout
        self._module = client_module(protocol)
        self._client = connect(self._module, url, timeout)

    @classmethod
    def for_bundle(cls, url: str, bundle: str | Path, **options) -> LoopClient:
        """A client that encodes puzzles as `bundle` (the one the server runs, or a copy) says; checksums checked."""
        return cls(url, read_manifest(bundle).task, **options)

    def check(self, tokens: np.ndarray) -> np.ndarray:
        """`tokens` as the model takes them (INT64 [N, seq_len], every token in the vocabulary), or InputError
        naming the first thing wrong: the server would refuse it too, after the upload."""
        tokens = np.asarray(tokens)
        seq_len, vocab = self.encoding.seq_len, self.encoding.vocab_size
        if tokens.ndim != 2 or tokens.shape[1] != seq_len or tokens.shape[0] == 0:
            raise InputError(f"puzzles must be [N, {seq_len}] tokens with N >= 1, got shape {list(tokens.shape)}")
        if tokens.dtype.kind not in "iu":
            raise InputError(f"puzzles must be integer tokens, got {tokens.dtype}")
        bad = np.argwhere((tokens < 0) | (tokens >= vocab))
        if len(bad):
            row, col = (int(v) for v in bad[0])
            raise InputError(f"token {int(tokens[row, col])} at puzzle {row}, position {col} is outside the "
                             f"vocabulary (0..{vocab - 1})")
        return tokens.astype(np.int64)

    def solve(self, tokens: np.ndarray) -> SolveResult:
        """Answers, steps and Q values of `tokens`, in requests of at most `max_puzzles` puzzles."""
        tokens = self.check(tokens)
        from trm_export.triton.load import infer

        parts = [infer(self._client, self._module, self.model, tokens[i:i + self.max_puzzles], self.timeout)
                 for i in range(0, len(tokens), self.max_puzzles)]
        return SolveResult(*(np.concatenate([p[name] for p in parts])
                             for name in ("predictions", "steps", "q_halt", "q_continue")))

    def solve_file(self, path: str | Path) -> str:
        """`trm-export run`'s lines for the puzzles in `path` (.txt in the task's format, or .npy): the answer,
        the steps it took, and whether it is a valid solution of its puzzle."""
        tokens = read_puzzles(path, self.encoding)
        result = self.solve(tokens)
        return format_solutions(result, self.encoding, check_solutions(tokens, result.predictions, self.encoding))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> LoopClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
