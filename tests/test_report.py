"""Accuracy-versus-latency report: measured numbers only, a recommendation that follows from them, readable output."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from trm_export.cli import main as cli
from trm_export.report import ReportOptions, measure_bundle, write_report
from trm_export.report.measure import Measurement, trained_rows
from trm_export.report.render import pareto_front, recommend
from trm_export.report.trajectory import run_trajectory, wilson_interval
from trm_export.runtime.manifest import read_manifest, seal
from trm_export.runtime.solver import Solver
from trm_export.tasks import get_task, per_puzzle_correct, token_accuracy

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def m(variant: str, precision: str, latency: float, acc: float, mode: str = "fixed", budget: int = 16,
      puzzles: int = 1000, spread: float = 0.01) -> Measurement:
    low, high = wilson_interval(round(acc * puzzles), puzzles)
    return Measurement(variant, precision, "onnxruntime", mode, budget, puzzles, acc, low, high, acc, float(budget),
                       latency * (1 - spread), latency, latency * (1 + spread), latency * (1 + 2 * spread),
                       1000 / latency, 16, 1.0, None)


def test_pareto_front_keeps_only_undominated_settings():
    rows = [m("fp32", "fp32", 10, 0.90), m("fp32", "fp32", 5, 0.80), m("int8", "int8", 4, 0.85),
            m("fp16", "fp16", 6, 0.84), m("fp32", "fp32", 20, 0.89)]
    assert [(r.variant, r.latency_ms_p50) for r in pareto_front(rows)] == [("int8", 4), ("fp32", 10)]


def test_recommendation_is_the_fastest_within_the_accuracy_budget():
    rows = [m("fp32", "fp32", 10, 0.900), m("int8", "int8", 4, 0.896), m("int8", "int8", 2, 0.880, budget=4)]
    rec = recommend(rows, max_drop_points=0.5)
    assert (rec.chosen.variant, rec.chosen.latency_ms_p50, rec.baseline.latency_ms_p50) == ("int8", 4, 10)
    assert recommend(rows, max_drop_points=3).chosen.budget == 4


def test_a_drop_of_exactly_the_budget_is_within_it():
    # The maze report (fp32 96.5% at 16 steps, 96.0% at 4): float subtraction made 0.5 points 0.50000000000000044.
    rows = [m("fp32", "fp32", 26, 0.965), m("fp32", "fp32", 7, 0.960, budget=4), m("fp16", "fp16", 16, 0.965)]
    rec = recommend(rows, max_drop_points=0.5)
    assert (rec.chosen.variant, rec.chosen.budget) == ("fp32", 4)


def test_a_latency_difference_within_the_noise_is_not_a_reason():
    # int8 looks 5% faster on medians, but the quartiles overlap: the more accurate fp32 is kept, int8 is named.
    rows = [m("fp32", "fp32", 10.0, 0.900, spread=0.1), m("int8", "int8", 9.5, 0.897, spread=0.1)]
    rec = recommend(rows, max_drop_points=0.5)
    assert rec.chosen.variant == "fp32" and [r.variant for r in rec.equivalent] == ["int8"]
    rows[1] = m("int8", "int8", 5.0, 0.897, spread=0.1)  # beyond the noise: int8 wins
    assert recommend(rows, max_drop_points=0.5).chosen.variant == "int8"


def test_a_small_sample_allows_one_puzzle_and_says_so():
    # 100 puzzles: 1 puzzle = 1 point, so a 0.5-point budget could never accept adaptive halting losing one puzzle.
    rows = [m("fp32", "fp32", 16.0, 0.90, puzzles=100), m("fp32", "fp32", 4.0, 0.89, "adaptive", puzzles=100)]
    rec = recommend(rows, max_drop_points=0.5)
    assert rec.chosen.mode == "adaptive" and rec.budget_points == 1.0
    assert "cannot resolve a 0.5-point budget" in rec.notes[0]


@pytest.fixture(scope="module")
def report_folder(sudoku_bundle, tmp_path_factory):
    options = ReportOptions(puzzles=24, latency_seconds=0.05, budgets=(1, 2, 8), threads=1, progress=False)
    data = measure_bundle(sudoku_bundle / "bundle", options)
    return data, write_report(data, tmp_path_factory.mktemp("report") / "report")


def test_the_report_folder_has_ordinary_permissions(report_folder):
    """Like every other folder of a bundle (it was 700: staged through mkdtemp)."""
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    assert report_folder[1].stat().st_mode & 0o777 == 0o777 & ~mask


def test_report_measures_every_setting(report_folder):
    data, folder = report_folder
    settings = [(r.mode, r.budget) for r in data.measurements]
    assert settings == [("fixed", 1), ("fixed", 2), ("fixed", 8), ("adaptive", 8), ("stable:1", 8), ("stable:2", 8),
                        ("q+stable:2", 8)]  # the halting policies that do not trust the Q head, from the same run
    for r in data.measurements:
        assert 0 <= r.exact_accuracy <= r.token_accuracy <= 1 and r.exact_low <= r.exact_accuracy <= r.exact_high
        assert 0 < r.latency_ms_p25 <= r.latency_ms_p50 <= r.latency_ms_p75 <= r.latency_ms_p95 and r.throughput > 0
        assert r.size_mb > 0 and r.batch == 16  # the cpu target's optimal batch
    assert data.measurements[-1].mean_steps <= 8
    saved = json.loads((folder / "report.json").read_text())
    assert len(saved["measurements"]) == 7 and saved["puzzles"] == 24


def test_report_markdown_and_plots(report_folder):
    data, folder = report_folder
    text = (folder / "REPORT.md").read_text()
    assert "## Recommendation" in text and "Measured on" in text and "95% interval" in text
    assert text.count("| fp32") == 7 and "| stable:2 8 |" in text and "`stable:K N` halts a puzzle" in text
    # The runtime alone measured its memory: a figure on every row (this process's VmHWM), never "n/a".
    rows = [line for line in text.splitlines() if line.startswith("| fp32")]
    assert "peak RSS MB |" in text and all(float(row.rsplit("|", 2)[1]) > 0 for row in rows)
    for name in ("pareto.png", "accuracy_vs_steps.png"):
        assert (folder / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in text


def test_no_invented_numbers_for_absent_hardware(sudoku_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(sudoku_bundle / "bundle", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["target"] = "jetson-orin-nano"
    (bundle / "manifest.json").write_text(seal(manifest))
    data = measure_bundle(bundle, ReportOptions(puzzles=4, latency_seconds=0.01, budgets=(1,), threads=1,
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


@pytest.mark.rounding
def test_one_fixed_run_tells_every_fixed_budget_and_adaptive_halting(sudoku_bundle):
    """The report's accuracy of each setting comes from one fixed run: it must be what running it gives."""
    data = get_task("sudoku").split("heldout", size=24)
    solver = Solver(sudoku_bundle / "bundle", batch_size=8, threads=1, verify=False)
    # Labels: the 8-step answers, so that "exact" is informative on a random model (its real answers are wrong).
    labels = solver.solve(data.inputs, data.puzzle_ids, mode="fixed", max_steps=8).predictions
    trajectory = run_trajectory(solver, data.inputs, data.puzzle_ids, labels, 8)
    assert trajectory.exact[-1].all()
    for k in (1, 3, 8):
        got = solver.solve(data.inputs, data.puzzle_ids, mode="fixed", max_steps=k).predictions
        assert trajectory.fixed(k).solved == int(per_puzzle_correct(got, labels).sum())
        assert trajectory.fixed(k).token_accuracy == pytest.approx(token_accuracy(got, labels), abs=1e-6)
    for cap, min_steps in ((3, 1), (8, 1), (8, 2)):
        result = solver.solve(data.inputs, data.puzzle_ids, mode="adaptive", max_steps=cap, min_steps=min_steps)
        assert np.array_equal(trajectory.halting_steps(cap, min_steps), result.steps_used)
        outcome = trajectory.adaptive(cap, min_steps)
        assert outcome.solved == int(per_puzzle_correct(result.predictions, labels).sum())
        assert outcome.mean_steps == pytest.approx(result.steps_used.mean())
    assert len(set(trajectory.halting_steps(8).tolist())) > 1  # the fixture's puzzles halt at different steps


def test_the_report_sizes_its_puzzles_from_the_work_not_the_clock(sudoku_bundle, monkeypatch):
    """`trm-export report`'s default sample is as many whole batches as its work budget covers, counted from the
    model's FLOPs: a step slowed down on purpose changes the times it prints and no count; a busy machine is said."""
    import time

    from trm_export.runtime.backend import OnnxRuntimeBackend

    options = ReportOptions(work_seconds=1e-9, latency_seconds=0.01, budgets=(1, 2), threads=1, progress=False,
                            halting=())
    quiet = measure_bundle(sudoku_bundle / "bundle", options)
    step = OnnxRuntimeBackend.step

    def slow_step(self, n):
        time.sleep(0.002)
        return step(self, n)

    monkeypatch.setattr(OnnxRuntimeBackend, "step", slow_step)
    monkeypatch.setattr("os.getloadavg", lambda: (64.0, 64.0, 64.0))
    busy = measure_bundle(sudoku_bundle / "bundle", options)
    batch = quiet.measurements[0].batch
    assert quiet.puzzles == busy.puzzles == batch  # one whole batch: the least the budget gives
    assert [m.exact_accuracy for m in quiet.measurements] == [m.exact_accuracy for m in busy.measurements]
    slowed = busy.measurements[0]  # each step slept 2 ms: its time says so, whatever else ran beside this test
    assert slowed.latency_ms_p25 >= 2.0 * slowed.mean_steps
    assert any(n.startswith("WARNING: timed while the machine was busy (load average 64.0") for n in busy.notes)


def test_wilson_interval():
    assert wilson_interval(0, 100)[0] == 0 and 0 < wilson_interval(0, 100)[1] < 0.04
    low, high = wilson_interval(975, 1000)
    assert low < 0.975 < high and high - low == pytest.approx(0.019, abs=0.002)


@pytest.mark.rounding
def test_the_accuracy_as_trained_is_measured_at_export_and_reported(sudoku_bundle, tmp_path):
    """A bfloat16-trained checkpoint: the export records its bfloat16 accuracy (what the training printed), the
    report shows it beside the variants; a device needs no PyTorch for that."""
    import dataclasses

    from trm_export.export.checkpoint import load_checkpoint
    from trm_export.export.reference import run_reference

    manifest = read_manifest(sudoku_bundle / "bundle")
    trained = manifest.reference["bfloat16"]
    data = get_task("sudoku").split("calibration", size=16)  # the fixture's export puzzles
    n = trained["puzzles"]
    assert 1 <= n <= 16
    trace = run_reference(load_checkpoint(sudoku_bundle / "ckpt").model, data.inputs[:n], data.puzzle_ids[:n],
                          mode="adaptive", compute_dtype="bfloat16")
    fixed8 = next(r for r in trained["rows"] if r["mode"] == "fixed" and r["budget"] == 8)
    assert fixed8["exact_accuracy"] == float(per_puzzle_correct(trace.step_predictions[7], data.labels[:n]).mean())
    rows, notes = trained_rows(manifest)
    assert [(r.mode, r.budget) for r in rows] == [("fixed", b) for b in (1, 2, 4, 8)] + [("adaptive", 8)]
    assert not notes
    report = measure_bundle(sudoku_bundle / "bundle", ReportOptions(puzzles=8, latency_seconds=0.05, threads=1,
                                                                    progress=False))
    text = (write_report(report, tmp_path / "r") / "REPORT.md").read_text()
    assert "## As trained: the PyTorch reference in bfloat16" in text and f"of {n} |" in text
    # A stranger's manifest with a malformed entry: left out with a note, never rendered.
    broken = dataclasses.replace(manifest, reference={"bfloat16": {"puzzles": 3, "rows": [{"mode": "<script>"}]}})
    rows, notes = trained_rows(broken)
    assert rows == [] and "malformed" in notes[0]


@pytest.mark.rounding
def test_the_bfloat16_figure_is_bfloat16s_not_float32s(sudoku_bundle, tmp_path):
    """Labels that the bfloat16 loop meets exactly and the float32 loop does not: the export's "as trained" row must
    say 100% at the trained limit, a float32 figure could not (float32 answers differ on some of these puzzles)."""
    from trm_export.export.checkpoint import load_checkpoint
    from trm_export.export.pipeline import ExportOptions, Puzzles, export_bundle
    from trm_export.export.reference import run_reference

    model = load_checkpoint(sudoku_bundle / "ckpt").model
    data = get_task("sudoku").split("heldout", size=24)
    bf16 = run_reference(model, data.inputs, data.puzzle_ids, mode="fixed", max_steps=8, compute_dtype="bfloat16")
    fp32 = run_reference(model, data.inputs, data.puzzle_ids, mode="fixed", max_steps=8)
    labels = bf16.step_predictions[7]
    differ = ~np.all(fp32.step_predictions[7] == labels, axis=1)
    assert differ.sum() >= 1, "no puzzle tells bfloat16 from float32 here: the test would prove nothing"
    first = float(per_puzzle_correct(bf16.step_predictions[0], labels).mean())  # an independent figure at step 1
    options = ExportOptions(progress=False, batch_size=8, parity_puzzles=8, golden_puzzles=2)
    _, manifest, _ = export_bundle(sudoku_bundle / "ckpt", tmp_path / "b", options,
                                   puzzles=Puzzles(data.inputs, data.puzzle_ids, labels, "bf16 labels", "sudoku"))
    rows = {(r["mode"], r["budget"]): r["exact_accuracy"] for r in manifest.reference["bfloat16"]["rows"]}
    assert manifest.reference["bfloat16"]["puzzles"] == len(labels)
    assert rows[("fixed", 8)] == 1.0 and rows[("fixed", 1)] == pytest.approx(first)


def test_a_device_targets_export_report_recommends_no_latency_from_this_cpu():
    """A Jetson bundle's report written at export: the CPU's latencies rank nothing (int8 is slower than fp32 on
    this CPU, faster on the device's tensor cores); the settings within the budget are listed by accuracy, and the
    latency recommendation is left to `trm-export report` on the device. A cpu bundle's report recommends as ever."""
    from trm_export.report.measure import ReportData
    from trm_export.report.render import markdown

    rows = [m("fp32", "fp32", 10.0, 0.90), m("int8", "int8", 30.0, 0.90), m("fp16", "fp16", 12.0, 0.80)]
    device = ReportData("b", "jetson-orin-nano", "the export machine", "sudoku", 1000, "heldout", rows,
                        latency_is_the_targets=False)
    text = markdown(device, 0.5)
    assert "## Recommendation: made on the device" in text and "\n## Recommendation\n" not in text
    listed = text.split("## Recommendation: made on the device")[1].split("\n## ")[0]
    assert "- fp32, fixed 16:" in listed and "- int8, fixed 16:" in listed and "fp16" not in listed
    assert "`trm-export report .`" in listed
    assert "estimate" not in listed  # no FLOPs recorded: no floor shown
    # With the model's FLOPs: the same settings ranked by the on-paper floor on the module's GPUs, INT8 first.
    device.step_flops = 400_000_000
    listed = markdown(device, 0.5).split("## Recommendation: made on the device")[1].split("\n## ")[0]
    assert "**an estimate, not a measurement**" in listed and "Fastest first on the Orin Nano 4 GB:" in listed
    table = [line for line in listed.splitlines() if line.startswith("| ")]
    assert table[0] == "| setting | exact acc | Orin Nano 4 GB |" and len(table) == 3
    # 0.4 GFLOP x 16 steps / (4 SMs x 0.625 GHz x 4096 INT8 ops): 625 us; TF32 x4 slower
    assert table[1].startswith("| int8, fixed 16 |") and table[1].endswith("| 625.0 us |")
    assert table[2].startswith("| fp32, fixed 16 |") and table[2].endswith("| 2.50 ms |")
    any_jetson = markdown(dataclasses.replace(device, target="jetson"), 0.5)
    assert "| setting | exact acc | Orin Nano 4 GB | Orin NX 8 GB | AGX Orin 32 GB | Xavier NX | AGX Xavier |" in \
        any_jetson
    here = markdown(ReportData("b", "cpu", "this machine", "sudoku", 1000, "heldout", rows), 0.5)
    assert "\n## Recommendation\n" in here and "made on the device" not in here


def test_the_interval_holds_its_proportion_at_0_and_100_percent():
    """At 0% or 100% the Wilson bound equals the proportion analytically; in floats it landed a hair outside it for
    787 sample sizes below 2000 (22 puzzles at 0%: a paper-size Jetson export's report then failed to plot)."""
    for n in range(1, 2000):
        for k in (0, n // 3, n):
            low, high = wilson_interval(k, n)
            assert 0.0 <= low <= k / n <= high <= 1.0, (k, n)
