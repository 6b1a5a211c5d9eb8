"""The plan (trm_export.planning): what an export covers comes from the work, never the clock (issue #36)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SUDOKU_SHAPED
from official_format import VARIANTS, write_official_checkpoint

import trm_export.planning.plan as planning
from trm_export.cli import main as cli
from trm_export.deploy import DeployOptions, deploy
from trm_export.export.checkpoint import load_checkpoint
from trm_export.export.pipeline import ExportOptions
from trm_export.runtime.backend import OnnxRuntimeBackend
from trm_export.runtime.manifest import read_manifest

# Measured times and when: what may differ between two runs of the same export (issue #36's bar).
MEASURED = {("provenance", "created_at"), ("choice", "ms_per_step_here"), ("choice", "ms_per_step_quartiles_here"),
            ("choice", "timing_load")}


def _decisions(bundle) -> dict:
    """The manifest without measured times and timestamps, and the digests of the files that print them."""
    data = json.loads((bundle / "manifest.json").read_text())
    for section, key in MEASURED:
        data.get(section, {}).pop(key, None)
    # the report and the device README print the export's date and its measured ms per step
    data["files"] = {k: v for k, v in data["files"].items() if not k.startswith("report/") and k != "README.md"}
    data.pop("digest")
    return data


@pytest.mark.rounding
def test_a_busy_machine_writes_the_same_bundle_as_a_quiet_one(tmp_path, monkeypatch):
    """Two one-command Jetson exports of the same checkpoint: one as is, one on a machine made to look busy and
    slow (a clock that jumps 1000 s at every reading, every ONNX Runtime step slept, a load average of 64). The
    budgets are scaled so that this small model is planned as a large one is (samples cut, one calibration
    method): the plan, the variants, the default, every sample size, step coverage and accuracy are the same;
    only the measured times differ, and the busy run's table says it was busy."""
    path = write_official_checkpoint(tmp_path / "ck", SUDOKU_SHAPED)
    ck = load_checkpoint(path)
    cfg = ck.config
    # One parity puzzle's 8 steps = 45/8 nominal seconds: parity 8 puzzles, evaluation ~100, one method.
    monkeypatch.setattr(planning, "NOMINAL_FLOPS", cfg.step_flops * cfg.halt_max_steps * planning.PARITY_STEP * 8 / 45)
    options = DeployOptions(export=ExportOptions(target="jetson-orin-nano", progress=False), threads=1)
    quiet_log: list[str] = []
    deploy(ck, tmp_path / "quiet" / "sudoku.bundle", options, log=quiet_log.append)

    clock = [time.perf_counter()]

    def jumping_clock() -> float:
        clock[0] += 1000.0
        return clock[0]

    step = OnnxRuntimeBackend.step

    def slow_step(self, n):
        time.sleep(0.001)
        return step(self, n)

    monkeypatch.setattr(time, "perf_counter", jumping_clock)
    monkeypatch.setattr(OnnxRuntimeBackend, "step", slow_step)
    monkeypatch.setattr("os.getloadavg", lambda: (64.0, 64.0, 64.0))
    busy_log: list[str] = []
    result = deploy(load_checkpoint(path), tmp_path / "busy" / "sudoku.bundle", options, log=busy_log.append)

    quiet, busy = _decisions(tmp_path / "quiet" / "sudoku.bundle"), _decisions(tmp_path / "busy" / "sudoku.bundle")
    assert quiet == busy
    plan = quiet["plan"]
    assert (plan["parity_puzzles"], plan["check_steps"], plan["methods"]) == (8, 8, ["minmax"])
    assert 8 < plan["eval_puzzles"] < 1000 and plan["set_by"] == {}
    assert quiet["default_variant"] == busy["default_variant"]
    printed = ("plan,", "  parity", "  golden", "  evaluation", "  calibration")
    plan_lines = [line for line in quiet_log if line.startswith(printed)]
    assert plan_lines == [line for line in busy_log if line.startswith(printed)] and len(plan_lines) == 5
    assert "WARNING: timed while the machine was busy (load average 64.0" in result.table()
    # a Jetson's engines run elsewhere: the export's report ranks by accuracy, recommends no latency (#37)
    assert "## Recommendation: made on the device" in (result.path / "report" / "REPORT.md").read_text()


def test_replaying_a_plan_gives_the_same_samples_and_flags_override_single_fields(tmp_path):
    path = write_official_checkpoint(tmp_path / "ck", SUDOKU_SHAPED)
    runner = CliRunner()
    first = runner.invoke(cli, [str(path), "--target", "cpu", "-o", str(tmp_path / "a"), "--no-report",
                                "--parity-puzzles", "5", "--threads", "1"])
    assert first.exit_code == 0, first.output
    recorded = read_manifest(tmp_path / "a").plan
    assert recorded["parity_puzzles"] == 5 and recorded["set_by"] == {"parity_puzzles": "--parity-puzzles"}
    again = runner.invoke(cli, [str(path), "--target", "cpu", "-o", str(tmp_path / "b"), "--no-report",
                                "--plan", str(tmp_path / "a"), "--check-steps", "3", "--threads", "1"])
    assert again.exit_code == 0, again.output
    replayed = read_manifest(tmp_path / "b").plan
    assert replayed["parity_puzzles"] == 5 and replayed["check_steps"] == 3
    assert replayed["set_by"] == {"parity_puzzles": "--plan", "golden_candidates": "--plan",
                                  "trained_dtype_puzzles": "--plan", "check_steps": "--check-steps"}
    assert {k: v for k, v in replayed.items() if k not in ("check_steps", "set_by")} == {
        k: v for k, v in recorded.items() if k not in ("check_steps", "set_by")}
    # a plan made for another model is refused in one line, before any work
    other = write_official_checkpoint(tmp_path / "other", VARIANTS["trm-mlpt"])
    refused = runner.invoke(cli, [str(other), "--target", "cpu", "-o", str(tmp_path / "c"),
                                  "--plan", str(tmp_path / "a" / "manifest.json")])
    assert refused.exit_code == 1 and not (tmp_path / "c").exists()
    assert "made for a model of" in refused.output and "Traceback" not in refused.output
    (tmp_path / "junk.json").write_text("[1, 2]")
    junk = runner.invoke(cli, [str(path), "-o", str(tmp_path / "d"), "--plan", str(tmp_path / "junk.json")])
    assert junk.exit_code == 1 and "no recorded plan in it" in junk.output


@pytest.mark.parametrize("name", ["trm-att-rope", "trm-mlpt", "hrm", "hrm-learned-3heads", "trm-att-rope-nopuzzle"])
def test_step_flops_are_what_pytorch_counts(tmp_path, name):
    """The count every plan is sized from: PyTorch's own FLOP counter on one step, plus the attention scores and
    values it does not see on a CPU (4 x positions^2 x width per attention layer)."""
    from torch.utils.flop_counter import FlopCounterMode

    from trm_export.export.reference import run_reference

    cfg = load_checkpoint(write_official_checkpoint(tmp_path, VARIANTS[name])).config
    model = load_checkpoint(tmp_path / "step_1000").model
    with FlopCounterMode(display=False) as counter:
        run_reference(model, np.ones((1, cfg.seq_len), np.int64), np.zeros(1, np.int64), max_steps=1)
    layers = (cfg.H_cycles * (cfg.L_cycles * cfg.L_layers + cfg.H_layers) if cfg.family == "hrm"
              else cfg.net_calls_per_step * cfg.L_layers)
    unseen = 0 if cfg.mlp_t else layers * 4 * cfg.total_seq_len ** 2 * cfg.attention_width
    assert cfg.step_flops == counter.get_total_flops() + unseen


def test_a_recorded_plan_is_a_strangers_input(sudoku_bundle):
    """A plan comes from a bundle's manifest or a --plan file: a field of the wrong kind is one line naming it, never
    a traceback later; a replayed timed batch never exceeds the target's (no [2**40, ...] allocation)."""
    import dataclasses

    from trm_export.calibration.variants import recorded_plan
    from trm_export.errors import InputError

    manifest = read_manifest(sudoku_bundle / "bundle")
    good = recorded_plan(manifest)
    assert good.step_flops == manifest.plan["step_flops"] and good.parity_puzzles == manifest.plan["parity_puzzles"]
    for junk, field in (({"step_flops": "many"}, "step_flops"), ({"parity_puzzles": -1}, "parity_puzzles"),
                        ({"methods": "minmax"}, "methods"), ({"trained_steps": True}, "trained_steps")):
        strange = dataclasses.replace(manifest, plan={**manifest.plan, **junk})
        with pytest.raises(InputError, match=rf"^manifest\.json: plan: {field} must be"):
            recorded_plan(strange)
    odd = recorded_plan(dataclasses.replace(manifest, plan={**manifest.plan, "set_by": ["x"], "available": "all"}))
    assert (odd.set_by, odd.available) == ({}, {})
    huge = planning.plan_quantize(good, 1000, 256, ("minmax",), 512, 64, fixed={"timing_batch": 1 << 40})
    assert huge.timing_batch == 64
