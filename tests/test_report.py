"""Accuracy-versus-latency report: measured numbers only, a recommendation that follows from them, readable output."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from trm_export.cli import main as cli
from trm_export.report import ReportOptions, measure_bundle, write_report
from trm_export.report.measure import Measurement
from trm_export.report.render import pareto_front, recommend
from trm_export.runtime.manifest import seal

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def m(variant: str, precision: str, latency: float, acc: float, mode: str = "fixed", budget: int = 16) -> Measurement:
    return Measurement(variant, precision, "onnxruntime", mode, budget, acc, acc, float(budget), latency, latency,
                       1000 / latency, 16, 1.0, None)


def test_pareto_front_keeps_only_undominated_settings():
    rows = [m("fp32", "fp32", 10, 0.90), m("fp32", "fp32", 5, 0.80), m("int8", "int8", 4, 0.85),
            m("fp16", "fp16", 6, 0.84), m("fp32", "fp32", 20, 0.89)]
    assert [(r.variant, r.latency_ms_p50) for r in pareto_front(rows)] == [("int8", 4), ("fp32", 10)]


def test_recommendation_is_the_fastest_within_the_accuracy_budget():
    rows = [m("fp32", "fp32", 10, 0.900), m("int8", "int8", 4, 0.896), m("int8", "int8", 2, 0.880, budget=4)]
    best, base = recommend(rows, max_drop_points=0.5)
    assert (best.variant, best.latency_ms_p50, base.latency_ms_p50) == ("int8", 4, 10)
    best, _ = recommend(rows, max_drop_points=3)
    assert best.budget == 4


def test_a_drop_of_exactly_the_budget_is_within_it():
    # The maze report (fp32 96.5% at 16 steps, 96.0% at 4): float subtraction made 0.5 points 0.50000000000000044.
    rows = [m("fp32", "fp32", 26, 0.965), m("fp32", "fp32", 7, 0.960, budget=4), m("fp16", "fp16", 16, 0.965)]
    best, _ = recommend(rows, max_drop_points=0.5)
    assert (best.variant, best.budget) == ("fp32", 4)


@pytest.fixture(scope="module")
def report_folder(sudoku_bundle, tmp_path_factory):
    options = ReportOptions(puzzles=24, latency_samples=3, budgets=(1, 2, 8), threads=1, progress=False)
    data = measure_bundle(sudoku_bundle / "bundle", options)
    return data, write_report(data, tmp_path_factory.mktemp("report") / "report")


def test_report_measures_every_setting(report_folder):
    data, folder = report_folder
    settings = [(r.mode, r.budget) for r in data.measurements]
    assert settings == [("fixed", 1), ("fixed", 2), ("fixed", 8), ("adaptive", 8)]
    for r in data.measurements:
        assert 0 <= r.exact_accuracy <= r.token_accuracy <= 1
        assert r.latency_ms_p50 > 0 and r.latency_ms_p95 >= r.latency_ms_p50 and r.throughput > 0
        assert r.size_mb > 0 and r.batch == 16  # the cpu target's optimal batch
    assert data.measurements[-1].mean_steps <= 8
    saved = json.loads((folder / "report.json").read_text())
    assert len(saved["measurements"]) == 4 and saved["puzzles"] == 24


def test_report_markdown_and_plots(report_folder):
    data, folder = report_folder
    text = (folder / "REPORT.md").read_text()
    assert "## Recommendation" in text and "nothing is estimated" in text
    assert text.count("| fp32") == 4
    for name in ("pareto.png", "accuracy_vs_steps.png"):
        assert (folder / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in text


def test_no_invented_numbers_for_absent_hardware(sudoku_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(sudoku_bundle / "bundle", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["target"] = "jetson-orin-nano"
    (bundle / "manifest.json").write_text(seal(manifest))
    data = measure_bundle(bundle, ReportOptions(puzzles=4, latency_samples=1, budgets=(1,), threads=1,
                                                progress=False))
    assert any("no engine in this bundle" in item for item in data.not_measured)
    assert {r.backend.split()[0] for r in data.measurements} == {"onnxruntime"}  # only what ran here
    text = (write_report(data, tmp_path / "r") / "REPORT.md").read_text()
    assert "## Not measured here" in text and "jetson-orin-nano" in text


def test_report_cli(sudoku_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(sudoku_bundle / "bundle", bundle)
    result = CliRunner().invoke(cli, ["report", str(bundle), "--quick", "--puzzles", "8", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert (bundle / "report" / "REPORT.md").is_file()
    from trm_export.runtime.manifest import read_manifest

    read_manifest(bundle)  # the report does not break the bundle's checksums
