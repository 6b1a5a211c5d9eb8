"""Your own looped model (#40, item 3): examples/looped_model/looped_sudoku.py, trained briefly, goes through
`--step-module` export for a Jetson (INT8 calibrated, measured and chosen as for any model), verify, run and the
report; code or models that do not keep the step protocol are refused in one line naming what is wrong."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from trm_export.cli import main as cli
from trm_export.runtime.solver import Solver
from trm_export.tasks import get_task

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "looped_model"
SPEC = "looped_sudoku:make_step"


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(EXAMPLE))
    try:
        import looped_sudoku
    finally:
        sys.path.remove(str(EXAMPLE))
    return looped_sudoku


@pytest.fixture(scope="module")
def trained(example, tmp_path_factory):
    """Twenty optimizer steps of the example's own training (small settings), saved as it saves; the halting
    logit's bias then set at the median of the first step's, so that half of the puzzles halt at step 1 and the rest
    later (what a trained halting head does; twenty steps do not train one)."""
    root = tmp_path_factory.mktemp("looped")
    path = root / "looped-sudoku.pt"
    model = example.train(path, steps=20, batch=16, settings={"dim": 32, "layers": 1, "latent_updates": 2,
                                                                "max_steps": 6}, log=lambda line: None)
    puzzles = torch.from_numpy(get_task("sudoku").split("heldout", size=64).inputs.copy()).long()
    with torch.no_grad():
        z_H, z_L = model.initial_state(len(puzzles))
        q = model.step(model.embed(puzzles, puzzles[:, 0]), z_H, z_L)[3]
        model.halt.bias -= q.median()
    saved = torch.load(path, weights_only=True)
    saved["state_dict"] = model.state_dict()
    torch.save(saved, path)
    return root, path, model


@pytest.fixture(scope="module")
def bundle(trained):
    root, path, _ = trained
    out = root / "looped.bundle"
    with contextlib.chdir(EXAMPLE):
        result = CliRunner().invoke(cli, [str(path), "--step-module", SPEC, "--target", "jetson", "-o", str(out),
                                          "--parity-puzzles", "8", "--calib-puzzles", "32", "--eval-puzzles", "32",
                                          "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "fixed predictions identical 100.0%, adaptive halting identical 100.0%" in result.output
    return out


def test_the_example_goes_through_export_verify_run_and_report(trained, bundle, tmp_path):
    _, _, model = trained
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["family"] == "looped-sudoku"
    assert manifest["model"]["config"]["step_flops"] > 0  # counted by the loader: the example leaves it 0
    assert manifest["default_variant"].startswith("int8-"), manifest["default_variant"]
    # The bundle's fp32 loop against a plain PyTorch loop of the user's module: answers and exit steps.
    puzzles = get_task("sudoku").split("heldout", size=64).inputs
    tokens = torch.from_numpy(puzzles.copy()).long()
    steps = np.zeros(len(puzzles), np.int64)
    with torch.no_grad():
        x = model.embed(tokens, tokens[:, 0])
        z_H, z_L = model.initial_state(len(puzzles))
        answers, halted = np.zeros(puzzles.shape, np.int64), np.zeros(len(puzzles), bool)
        for step in range(1, model.config.halt_max_steps + 1):
            z_H, z_L, logits, q_halt, _ = model.step(x, z_H, z_L)
            now = ~halted & ((q_halt.numpy() > 0) | (step == model.config.halt_max_steps))
            answers[now], steps[now] = logits.argmax(-1).numpy()[now], step
            halted |= now
    result = Solver(bundle, variant="fp32", threads=1).solve(puzzles)
    np.testing.assert_array_equal(result.steps_used, steps)
    np.testing.assert_array_equal(result.predictions, answers)
    assert 1 in steps and len(set(steps.tolist())) >= 2  # both kinds of exit present
    for args in (["verify", str(bundle)], ["run", str(bundle), "--input", str(EXAMPLE.parent / "sudoku.txt")],
                 ["report", str(bundle), "--quick", "-o", str(tmp_path / "report")]):
        outcome = CliRunner().invoke(cli, args)
        assert outcome.exit_code == 0, (args, outcome.output)
    assert (tmp_path / "report" / "REPORT.md").is_file()


@pytest.mark.parametrize(("module_text", "spec", "message"), [
    ("", "nowhere_to_be_found:make_step", "cannot import nowhere_to_be_found"),
    ("", "mine:make", "mine has no function make"),
    ("", "mine:make_step; rm -rf", "expected MODULE:FUNCTION"),
    ("raise SystemError('boom')\n", "mine:make_step", "importing mine raised SystemError: boom"),
    ("def make_step(path):\n    raise ValueError('bad weights')\n", "mine:make_step",
     r"make_step\(.*\) raised ValueError: bad weights"),
    ("def make_step(path):\n    return 42\n", "mine:make_step", "returned int, not a torch.nn.Module"),
    ("import torch\ndef make_step(path):\n    return torch.nn.Linear(2, 2)\n", "mine:make_step",
     "the model lacks embed, initial_state, step, exporting, embedding_arrays"),
    ("CONFIG = dict(halting_rule='q_halt>=os.system')\n", "mine:make_step", "config.halting_rule must be"),
    ("CONFIG = dict(halt_max_steps=0)\n", "mine:make_step", "config.halt_max_steps must be a positive integer"),
    ("CONFIG = dict(family='trm')\n", "mine:make_step", "is the official models' name"),
])
def test_code_that_does_not_keep_the_protocol_is_one_line(trained, tmp_path, module_text, spec, message):
    """Each refusal: exit 1, one line naming what is wrong, no output folder."""
    _, path, _ = trained
    if module_text.startswith("CONFIG"):  # the example's model with one config field changed
        module_text = (f"import dataclasses, sys\nsys.path.insert(0, {str(EXAMPLE)!r})\nimport looped_sudoku\n"
                       f"{module_text}def make_step(path):\n    model = looped_sudoku.make_step(path)\n"
                       "    model.config = dataclasses.replace(model.config, **CONFIG)\n    return model\n")
    (tmp_path / "mine.py").write_text(module_text)
    sys.modules.pop("mine", None)
    with contextlib.chdir(tmp_path):
        result = CliRunner().invoke(cli, [str(path), "--step-module", spec, "-o", str(tmp_path / "b")])
    sys.modules.pop("mine", None)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "b").exists()
