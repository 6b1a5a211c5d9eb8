"""The runtime, for real, on the oldest Python, numpy, onnxruntime and click that pyproject.toml claims.

scripts/oldest_runtime_check.sh runs this file in a Python 3.8 venv holding exactly those versions and no torch
or onnx, with `--noconftest` (tests/conftest.py needs torch), on a bundle that the main venv exported:
TRM_RUNTIME_BUNDLE names it, TRM_EXPECT_VERSIONS the versions it installed. In the main suite the bundle is the
session's `sudoku_bundle` (tests/conftest.py). Nothing here imports torch or onnx.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pkgutil
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trm_export.errors import BundleError
from trm_export.runtime.manifest import MANIFEST_NAME, read_manifest, sha256_file
from trm_export.runtime.selfcheck import load_golden, verify_bundle
from trm_export.runtime.solver import Solver
from trm_export.tasks import format_sudoku

SUDOKU_CHARS = "?.123456789"  # token -> character of `trm-export run`'s Sudoku lines


@pytest.fixture(scope="module")
def bundle(request) -> Path:
    given = os.environ.get("TRM_RUNTIME_BUNDLE")
    if given:
        return Path(given)
    if importlib.util.find_spec("torch") is None:
        pytest.skip("no bundle: set TRM_RUNTIME_BUNDLE (scripts/oldest_runtime_check.sh); no torch here to export one")
    return request.getfixturevalue("sudoku_bundle") / "bundle"


@pytest.fixture(scope="module")
def solver(bundle) -> Solver:
    return Solver(bundle, batch_size=3)  # fewer slots than golden puzzles: halted slots are refilled


@pytest.fixture(scope="module")
def golden(solver) -> dict[str, np.ndarray]:
    return load_golden(solver)


@pytest.fixture()
def copy(bundle, tmp_path) -> Path:
    """A copy of the bundle to damage."""
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"python": platform.python_version(), **{name: version(name) for name in ("numpy", "onnxruntime", "click")}}


def cli(*args: object, timeout: float = 180, **env_vars: str) -> subprocess.CompletedProcess:
    """`trm-export ARGS` through the installed console script, as a device runs it."""
    script = Path(sys.executable).with_name("trm-export")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "trm_export.cli"]
    env = {**{k: v for k, v in os.environ.items() if k != "TRM_EXPORT_TRACEBACK"}, **env_vars}
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def test_versions_in_use(capsys):
    versions = _versions()
    with capsys.disabled():
        print("\nruntime tested on " + ", ".join(f"{name} {v}" for name, v in versions.items()))
    expected = os.environ.get("TRM_EXPECT_VERSIONS")  # "python=3.8 numpy=1.24.0 ...": what the script installed
    for item in (expected or "").split():
        name, _, want = item.partition("=")
        assert versions[name] == want or versions[name].startswith(want + "."), (name, versions[name], want)


@pytest.mark.parametrize("package", ["trm_export.runtime", "trm_export.tasks", "trm_export.targets",
                                     "trm_export.report"])
def test_device_side_modules_import(package):
    """Every module the runtime commands may load imports here (runtime-evaluated 3.9+ constructs fail here)."""
    importlib.import_module("trm_export.cli")
    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{package}.{info.name}")


def test_manifest_and_checksums(bundle):
    manifest = read_manifest(bundle)  # digest and every listed file's sha256
    assert manifest.default_variant in manifest.graphs
    assert manifest.files and all(sha256_file(bundle / rel) == digest for rel, digest in manifest.files.items())
    assert all(graph.file in manifest.files for graph in manifest.graphs.values())


def test_fixed_and_adaptive_solve_reproduce_the_golden_values(solver, golden):
    tol = solver.manifest.golden["tolerances"].get(solver.variant, solver.manifest.golden["tolerances"]["fp32"])
    steps, n = golden["q_halt"].shape
    fixed = solver.solve(golden["tokens"], golden["puzzle_ids"], mode="fixed", max_steps=steps)
    assert (fixed.steps_used == steps).all()
    assert np.all(fixed.predictions == golden["predictions"], axis=1).mean() >= tol["predictions_identical"]
    assert np.abs(fixed.q_halt - golden["q_halt"][-1]).max() <= tol["q_abs"]

    adaptive = solver.solve(golden["tokens"], golden["puzzle_ids"], mode="adaptive", max_steps=steps)
    assert np.mean(adaptive.steps_used == golden["adaptive_steps"]) >= tol["predictions_identical"]
    assert np.all(adaptive.predictions == golden["adaptive_predictions"], axis=1).mean() >= tol["predictions_identical"]
    at_halt = golden["q_halt"][adaptive.steps_used - 1, np.arange(n)]
    assert np.abs(adaptive.q_halt - at_halt).max() <= tol["q_abs"]
    assert verify_bundle(solver.bundle)  # the same through the self-check every device runs


def test_cli_verify(bundle):
    out = cli("verify", bundle)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("PASSED"), out.stdout


def test_cli_run_text_and_npz(solver, golden, tmp_path):
    steps = golden["q_halt"].shape[0]
    assert solver.task.name == "sudoku"
    puzzles = tmp_path / "puzzles.txt"
    puzzles.write_text("".join(format_sudoku(t) + "\n" for t in golden["tokens"]))
    out = cli("run", solver.bundle, "--input", puzzles, "--max-steps", steps, "--batch-size", 3)
    assert out.returncode == 0, out.stderr
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    assert [row[0] for row in rows] == ["".join(SUDOKU_CHARS[t] for t in p) for p in golden["adaptive_predictions"]]
    assert [int(row[1]) for row in rows] == golden["adaptive_steps"].tolist()

    out = cli("run", solver.bundle, "-i", puzzles, "--mode", "fixed", "--max-steps", steps, "-o", tmp_path / "s.npz")
    assert out.returncode == 0, out.stderr
    with np.load(tmp_path / "s.npz") as saved:
        assert np.array_equal(saved["predictions"], golden["predictions"])
        assert (saved["steps_used"] == steps).all()


def test_edited_manifest_is_refused(copy):
    path = copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    for tol in data["golden"]["tolerances"].values():
        tol["q_abs"] = 1e9  # loosen a bar: the digest no longer matches
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="digest"):
        read_manifest(copy)
    out = cli("verify", copy)
    assert out.returncode != 0 and "digest" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_changed_graph_and_bad_puzzles_are_refused(copy, golden, tmp_path):
    puzzles = tmp_path / "short.txt"
    puzzles.write_text(format_sudoku(golden["tokens"][0])[:80] + "\n")
    out = cli("run", copy, "--input", puzzles)
    assert out.returncode != 0 and "81" in out.stderr and "Traceback" not in out.stderr, out.stderr

    graph = copy / read_manifest(copy).graphs[read_manifest(copy).default_variant].file
    blob = bytearray(graph.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    graph.write_bytes(bytes(blob))
    with pytest.raises(BundleError, match="sha256"):
        Solver(copy)
    puzzles.write_text(format_sudoku(golden["tokens"][0]) + "\n")
    out = cli("run", copy, "--input", puzzles)
    assert out.returncode != 0 and "sha256" in out.stderr and "Traceback" not in out.stderr, out.stderr


def _hostile_copy(bundle: Path, tmp_path: Path, variable: str, mutation: Callable[[Any], Callable]) -> Path:
    """A resealed copy of the bundle made hostile by the mutation `mutation(test_hostile)` returns. scripts/
    oldest_runtime_check.sh makes it with the main venv (no onnx here) and names it in $`variable`; in the main
    suite it is made here."""
    given = os.environ.get(variable)
    if given:
        return Path(given)
    if importlib.util.find_spec("onnx") is None:
        pytest.skip(f"set {variable} (scripts/oldest_runtime_check.sh); no onnx here to make one")
    import test_hostile

    (tmp_path / "outside").mkdir()
    copy = Path(shutil.copytree(bundle, tmp_path / "b.bundle"))
    mutation(test_hostile)(copy, tmp_path / "outside")
    return copy


@pytest.fixture()
def external_weights(bundle, tmp_path) -> Path:
    """The step graph keeps its largest weight in ../outside/secret0.bin (the hostile table's
    external-weights-climbing case). ONNX Runtime 1.17 follows such a path; newer releases refuse it themselves."""
    return _hostile_copy(bundle, tmp_path, "TRM_EXTERNAL_WEIGHTS_BUNDLE",
                         lambda hostile: hostile._external_weights(via_link=False))


@pytest.fixture()
def slow_step(bundle, tmp_path) -> Path:
    """A step graph without control flow that asks for minutes of arithmetic per step (the hostile table's
    hours-of-arithmetic case): stopped through ONNX Runtime's RunOptions.terminate, which 1.17 has too."""
    return _hostile_copy(bundle, tmp_path, "TRM_SLOW_STEP_BUNDLE", lambda hostile: hostile._hours_of_arithmetic)


def test_a_graph_whose_weights_lie_outside_the_bundle_is_refused_unread(external_weights, golden, tmp_path):
    with pytest.raises(BundleError, match="weights outside its file"):
        Solver(external_weights)
    puzzles = tmp_path / "puzzles.txt"
    puzzles.write_text(format_sudoku(golden["tokens"][0]) + "\n")
    for args in (("verify", external_weights), ("run", external_weights, "--input", puzzles)):
        out = cli(*args)
        assert out.returncode != 0 and "weights outside its file" in out.stderr, out.stdout + out.stderr
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_step_that_would_run_for_hours_is_stopped_in_one_line(slow_step, golden, tmp_path):
    puzzles = tmp_path / "puzzles.txt"
    puzzles.write_text(format_sudoku(golden["tokens"][0]) + "\n")
    out = cli("run", slow_step, "--input", puzzles, timeout=60, TRM_STEP_TIMEOUT="2")
    assert out.returncode == 1 and "did not return within 2 s" in out.stderr, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
