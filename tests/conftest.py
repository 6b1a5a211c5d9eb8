"""Shared fixtures: small official-format models exported once per test session.

TRM_TEST_THREADS=N runs the whole suite with N intra-op threads in torch and in every ONNX Runtime session that
does not set its own count, so that a numeric bar can be checked under each thread count (see .ci/run). ONNX
Runtime's thread pools never spin-wait in tests (timing only). `backend="auto"` sees no `trm-export tune` record
of the machine running the tests (TRM_EXPORT_TUNE_FILE points to an empty folder).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from official_format import COMPILED_PREFIX, VARIANTS, write_official_checkpoint

from trm_export.export.checkpoint import load_checkpoint
from trm_export.export.pipeline import ExportOptions, Puzzles, export_bundle
from trm_export.export.reference import run_reference
from trm_export.tasks import get_task


def pytest_configure(config):
    import tempfile

    import onnxruntime as ort

    # `backend="auto"` follows this machine's `trm-export tune` record: tests see none unless they write one.
    os.environ["TRM_EXPORT_TUNE_FILE"] = os.path.join(tempfile.mkdtemp(prefix="trm-tune."), "none.json")

    threads = os.environ.get("TRM_TEST_THREADS")
    n = int(threads) if threads else None
    if n:
        torch.set_num_threads(n)
    plain = ort.SessionOptions

    def for_tests():
        options = plain()
        # Many sessions stay alive across a test session; idle ones spin-wait on their thread pools and slow the
        # one that runs on a 2-core machine. Spinning changes timing only, never a result.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if n:
            options.intra_op_num_threads = n
        return options

    ort.SessionOptions = for_tests  # the runtime may still set its own count on the object it gets


SUDOKU_SHAPED = dataclasses.replace(VARIANTS["trm-att-rope"], name="sudoku-shaped", seq_len=81, vocab_size=11,
                                    num_puzzle_identifiers=1, halt_max_steps=8, gain=0.5)


@pytest.fixture(scope="session")
def sudoku_bundle(tmp_path_factory):
    """A sudoku-shaped random model (so the Sudoku text format applies), exported once per session.

    Its trained step limit is 8. Layout: ROOT/ckpt (official checkpoint), ROOT/bundle (fp32 CPU bundle).
    """
    root = tmp_path_factory.mktemp("runtime")
    path = write_official_checkpoint(root / "ckpt", SUDOKU_SHAPED)
    # Shift the random Q head's bias so that puzzles halt at different steps (the point of these tests).
    state = torch.load(path, weights_only=True)
    q = run_reference(load_checkpoint(path).model, get_task("sudoku").split("heldout", size=40).inputs).q_halt
    state[COMPILED_PREFIX + "q_head.bias"][0] -= float(np.median(q[3]))
    torch.save(state, path)
    puzzles = get_task("sudoku").split("calibration", size=16)
    export_bundle(root / "ckpt", root / "bundle", ExportOptions(progress=False, batch_size=8),
                  puzzles=Puzzles(puzzles.inputs, puzzles.puzzle_ids, puzzles.labels, "calibration", "sudoku"))
    return root


