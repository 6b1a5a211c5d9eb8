"""What keeps the suite honest: in CI a skip for a missing tool fails and names it (tests/ci_skips.py), hardware
skips stay skips; the mutation table of scripts/mutation_check.py still matches the code."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _run(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess:
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    tensorrt: needs TensorRT\n")
    (tmp_path / "test_tools.py").write_text(textwrap.dedent("""
        import pytest

        def test_needs_a_tool():
            pytest.skip("no tritonserver: create it with scripts/triton_env.sh")

        @pytest.mark.tensorrt
        def test_needs_hardware():
            pytest.skip("TensorRT is not installed")

        def test_runs():
            pass
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env.update(PYTHONPATH=str(TESTS), **({"CI": "true"} if ci else {}))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "ci_skips", "-p", "no:cacheprovider", "-q", "-rA",
                           "-c", str(tmp_path / "pytest.ini"), str(tmp_path / "test_tools.py")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_in_ci_a_skipped_tool_fails_and_names_what_is_missing(tmp_path):
    out = _run(tmp_path, ci=True)
    assert out.returncode == 1, out.stdout
    failure = out.stdout.replace("\n", " ")
    assert "skipped in CI, which must run it: no tritonserver: create it with scripts/triton_env.sh" in failure, failure
    assert "1 failed, 1 passed, 1 skipped" in out.stdout, out.stdout


def test_outside_ci_skips_stay_skips(tmp_path):
    out = _run(tmp_path, ci=False)
    assert out.returncode == 0 and "1 passed, 2 skipped" in out.stdout, out.stdout


def test_the_mutation_table_matches_the_code():
    """scripts/mutation_check.py (run on demand: TRM_MUTATIONS=1 .ci/run) breaks each claim's code at a snippet that
    must occur exactly once in its file, and must be reversible: a stale table would test nothing."""
    sys.path.insert(0, str(TESTS.parent / "scripts"))
    try:
        from mutation_check import MUTATIONS, ROOT
    finally:
        sys.path.pop(0)
    assert len({m.name for m in MUTATIONS}) == len(MUTATIONS) >= 8
    for m in MUTATIONS:
        text = (ROOT / m.file).read_text()
        assert text.count(m.old) == 1 and m.new != m.old and m.tests, m.name
        for test in m.tests:
            assert (ROOT / test.split(" -k ", 1)[0]).is_file(), (m.name, test)


def test_the_tests_the_default_run_leaves_out_run_in_ci():
    """pyproject's addopts deselect the `slow` tests from the default run; .ci/run must run them in a pass of their
    own (a marker the default run leaves out and CI never selects is a test that runs nowhere)."""
    import re

    import tomllib

    root = TESTS.parent
    addopts = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    left_out = re.findall(r"-m '([^']*)'", addopts)
    assert left_out == ["not slow"], addopts
    ci = (root / ".ci" / "run").read_text()
    assert re.search(r"^\.venv/bin/pytest -m slow$", ci, re.MULTILINE), "no CI pass runs the slow tests"
