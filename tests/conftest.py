"""Shared fixtures: small official-format models exported once per test session.

TRM_TEST_THREADS=N runs the whole suite with N intra-op threads in torch and in every ONNX Runtime session that
does not set its own count, so that a numeric bar can be checked under each thread count (see .ci/run); without
it, each pytest-xdist worker takes its share of the cores (one each on two cores) and a single process the
libraries' default. ONNX
Runtime's thread pools never spin-wait in tests (timing only). `backend="auto"` sees no `trm-export tune` record
of the machine running the tests (TRM_EXPORT_TUNE_FILE points to an empty folder).

The suite runs on both cores with pytest-xdist (`-n 2`, see pyproject.toml). A bundle that tests in several modules
read is built once per run for all workers (`build_once`) and is read-only: a test that must change it copies it,
and a worker's session fails at its end if a shared bundle was changed. The modules in ONE_WORKER_MODULES run
whole on one worker each; every other test goes to whichever worker is free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from official_format import COMPILED_PREFIX, VARIANTS, write_official_checkpoint

from trm_export.export.checkpoint import load_checkpoint
from trm_export.export.pipeline import ExportOptions, Puzzles, export_bundle
from trm_export.export.reference import run_reference
from trm_export.tasks import get_task

pytest_plugins = ["ci_skips"]  # in CI, a skip for a missing tool is a failure


def pytest_configure(config):
    import tempfile

    import onnxruntime as ort

    # `backend="auto"` follows this machine's `trm-export tune` record: tests see none unless they write one.
    os.environ["TRM_EXPORT_TUNE_FILE"] = os.path.join(tempfile.mkdtemp(prefix="trm-tune."), "none.json")

    threads = os.environ.get("TRM_TEST_THREADS")
    n = int(threads) if threads else _share_of_the_cores()
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


# Modules whose tests share a costly module fixture, a server or a browser: each runs whole on one worker, so that
# it is built or started once. (xdist's own `--dist loadgroup` silently stopped grouping with pytest 9.2, which no
# longer reads the node ids that xdist rewrites; this scheduler groups by file and needs no rewriting.)
ONE_WORKER_MODULES = {
    "tests/test_arc_bundle.py": "its ARC bundle, the suite's costliest fixture",
    "tests/test_browser.py": "one browser bundle, one Chromium and the page server",
    "tests/test_triton.py": "one tritonserver process and its ports",
}


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "load":
        return None  # a distribution mode asked for on the command line is followed as asked
    from xdist.scheduler import LoadScopeScheduling

    class ModulesTogether(LoadScopeScheduling):
        """Each ONE_WORKER_MODULES file is one work unit, every other test a unit of its own; bigger units first."""

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in ONE_WORKER_MODULES else nodeid

    return ModulesTogether(config, log)


def _share_of_the_cores() -> int | None:
    """Under pytest-xdist, each worker's share of the cores (2 cores, 2 workers: 1 thread each), so that workers do
    not oversubscribe the machine (measured: 4:12 with each worker on both cores, 3:37 with one each); None: the
    libraries' own default."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if not workers:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // workers)


SUDOKU_SHAPED = dataclasses.replace(VARIANTS["trm-att-rope"], name="sudoku-shaped", seq_len=81, vocab_size=11,
                                    num_puzzle_identifiers=1, halt_max_steps=8, gain=0.5)


def tree_digest(root: Path) -> str:
    """SHA-256 over every file's relative path and bytes under root: what "unchanged" means for a shared bundle."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def build_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Iterator[Path]:
    """Yield ROOT/name, built by `build(path)` once per test run and shared by every xdist worker.

    The first worker to ask builds it under a file lock; the others wait and read it. After the worker's last test
    the tree must be byte for byte what was built: a test that writes into a shared bundle fails the run here
    instead of changing what the tests after it see.
    """
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this run's folder, holding every worker's own
    shared = base / "shared"
    shared.mkdir(exist_ok=True)
    root, record = shared / name, shared / f"{name}.sha256"
    with FileLock(str(shared / f"{name}.lock")):
        if not record.exists():
            build(root)
            record.write_text(tree_digest(root))
    yield root
    if tree_digest(root) != record.read_text():
        pytest.fail(f"a test changed the shared {name} under {root}: copy it before changing it", pytrace=False)


def _build_sudoku_bundle(root: Path) -> None:
    path = write_official_checkpoint(root / "ckpt", SUDOKU_SHAPED)
    # Shift the random Q head's bias so that puzzles halt at different steps (the point of these tests).
    state = torch.load(path, weights_only=True)
    q = run_reference(load_checkpoint(path).model, get_task("sudoku").split("heldout", size=40).inputs).q_halt
    state[COMPILED_PREFIX + "q_head.bias"][0] -= float(np.median(q[3]))
    torch.save(state, path)
    puzzles = get_task("sudoku").split("calibration", size=16)
    export_bundle(root / "ckpt", root / "bundle", ExportOptions(progress=False, batch_size=8),
                  puzzles=Puzzles(puzzles.inputs, puzzles.puzzle_ids, puzzles.labels, "calibration", "sudoku"))


@pytest.fixture(scope="session")
def sudoku_bundle(tmp_path_factory):
    """A sudoku-shaped random model (so the Sudoku text format applies), exported once per run; read-only.

    Its trained step limit is 8. Layout: ROOT/ckpt (official checkpoint), ROOT/bundle (fp32 CPU bundle).
    """
    yield from build_once(tmp_path_factory, "sudoku", _build_sudoku_bundle)
