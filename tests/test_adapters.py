"""Looped models from elsewhere through the step protocol (#40): lucidrains' tiny-recursive-model, exported from
its own saved state_dict, answers as its own `predict()` does; descriptions that do not fit are one clear line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from trm_export.cli import main as cli
from trm_export.errors import BundleError
from trm_export.runtime.solver import Solver, halt_now, halting_threshold
from trm_export.tasks import get_task

pytest.importorskip("tiny_recursive_model")

NETWORK = {"dim": 16, "num_tokens": 11, "seq_len": 81, "depth": 2, "num_refinement_blocks": 2,
           "num_latent_refinements": 2, "num_register_tokens": 2, "max_deep_refinement_steps": 6}


def _trm(config: dict):
    from tiny_recursive_model import MLPMixer1D, TinyRecursiveModel

    network = MLPMixer1D(dim=config["dim"], depth=config["depth"],
                         seq_len=config["num_register_tokens"] + config["seq_len"])
    return TinyRecursiveModel(dim=config["dim"], num_tokens=config["num_tokens"], network=network,
                              num_refinement_blocks=config["num_refinement_blocks"],
                              num_latent_refinements=config["num_latent_refinements"],
                              num_register_tokens=config["num_register_tokens"])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A Sudoku-shaped TinyRecursiveModel saved as its README saves one, its halting threshold set where about
    half of the puzzles halt at the first step and the rest run to the limit (the halt head is zero at init: a
    trained one is what it would be)."""
    root = tmp_path_factory.mktemp("trm")
    torch.manual_seed(0)
    trm = _trm(NETWORK).eval()
    with torch.no_grad():
        trm.to_halt_pred[1].weight.normal_(0, 0.5)
        puzzles = torch.from_numpy(get_task("sudoku").split("heldout", size=64).inputs.copy()).long()
        inputs, _ = trm.embed_inputs_with_registers(puzzles)
        outputs, latents = trm.get_initial()
        outputs, _ = trm.deep_refinement(inputs, outputs.expand_as(inputs), latents.expand_as(inputs))
        first = trm.to_halt_pred(outputs).sigmoid()
    config = {**NETWORK, "halt_prob_thres": float(first.median())}
    torch.save(trm.state_dict(), root / "saved-trm.pt")
    (root / "trm.json").write_text(json.dumps(config))
    return root, trm, config


@pytest.fixture(scope="module")
def bundle(saved):
    root, _, _ = saved
    out = root / "bundle"
    result = CliRunner().invoke(cli, [str(root / "saved-trm.pt"), "--arch", "tiny-recursive-model", "--arch-config",
                                      str(root / "trm.json"), "--target", "cpu", "-o", str(out), "--parity-puzzles",
                                      "8", "--no-report", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "fixed predictions identical 100.0%, adaptive halting identical 100.0%" in result.output
    return out


def test_the_bundle_answers_as_the_packages_own_predict(saved, bundle):
    """The package's predict() (its halting rule sigmoid(halt) >= halt_prob_thres, its step limit) against the
    bundle's runtime with default flags: the same answers and the same exit steps, both kinds of exit present."""
    _, trm, config = saved
    puzzles = get_task("sudoku").split("heldout", size=64).inputs
    with torch.no_grad():
        preds, steps = trm.predict(torch.from_numpy(puzzles.copy()).long(), halt_prob_thres=config["halt_prob_thres"],
                                   max_deep_refinement_steps=config["max_deep_refinement_steps"])
    result = Solver(bundle, threads=1).solve(puzzles)
    np.testing.assert_array_equal(result.steps_used, steps.numpy())
    np.testing.assert_array_equal(result.predictions, preds.numpy())
    assert len(set(steps.tolist())) >= 2  # some puzzles halt early, others run to the limit
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["family"] == "tiny-recursive-model"
    assert manifest["model"]["config"]["description"]["num_register_tokens"] == 2
    assert manifest["loop"]["halt_max_steps"] == 6 and manifest["loop"]["halting_rule"].startswith("q_halt>=")
    assert manifest["task"]["prefix_len"] == 2  # the register tokens: a prefix every puzzle shares
    verify = CliRunner().invoke(cli, ["verify", str(bundle)])
    assert verify.exit_code == 0, verify.output


@pytest.mark.parametrize(("change", "message"), [
    ({"dim": 24}, "does not match the described network"),
    ({"depth": 3}, "does not match the described network"),
    ({"colour": 1}, r"unknown field\(s\) \['colour'\]"),
    ({"halt_prob_thres": 1.5}, r"halt_prob_thres must be in \(0, 1\)"),
    ({"depth": "two"}, "field depth must be int"),
    ({"network": "transformer"}, "network 'transformer' is not one this adapter builds"),
])
def test_a_description_that_does_not_fit_is_one_line(saved, tmp_path, change, message):
    root, _, config = saved
    (tmp_path / "trm.json").write_text(json.dumps({**config, **change}))
    result = CliRunner().invoke(cli, [str(root / "saved-trm.pt"), "--arch", "tiny-recursive-model", "--arch-config",
                                      str(tmp_path / "trm.json"), "-o", str(tmp_path / "b")])
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1, result.output
    assert re.search(message, result.output), result.output
    assert not (tmp_path / "b").exists()


def test_the_threshold_rule_and_its_refusals():
    """q_halt>=T: a halting logit against a threshold, compared in float64; junk in the manifest is refused."""
    q = np.array([-1.0, 2.1972244, 2.1972246, 5.0], np.float32)
    assert halting_threshold("q_halt>=2.1972245773362196") == pytest.approx(2.1972245773362196)
    assert halt_now(q, np.zeros(4, np.float32), "q_halt>=2.1972245773362196").tolist() == [False, False, True, True]
    assert halting_threshold("q_halt>0") is None
    with pytest.raises(BundleError, match="unknown halting rule"):
        halt_now(q, q, "q_halt>=1;rm -rf")


def test_the_browser_bundle_answers_as_predict_in_the_javascript_runtime(saved, tmp_path):
    """--target browser: the JavaScript runtime (onnxruntime-web, tests/runtime.mjs) on the bundle's golden puzzles
    passes the golden check and gives the Python runtime's answers and exit steps (equal to predict()'s, above) on
    puzzles that halt at different steps: the register prefix and the q_halt>=T rule in JavaScript."""
    from test_browser import NODE, _node, _ort_web_missing

    if NODE is None or _ort_web_missing():
        pytest.skip(_ort_web_missing() or "Node.js is not installed (CI: .ci/run installs it)")
    root, _, _ = saved
    out = tmp_path / "browser.bundle"
    result = CliRunner().invoke(cli, [str(root / "saved-trm.pt"), "--arch", "tiny-recursive-model", "--arch-config",
                                      str(root / "trm.json"), "--target", "browser", "-o", str(out),
                                      "--parity-puzzles", "8", "--no-report", "--threads", "1"])
    assert result.exit_code == 0, result.output
    js = _node("tests/runtime.mjs", str(out), "golden")
    assert js["passed"], js["checks"]
    puzzles = get_task("sudoku").split("heldout", size=64).inputs  # half halt at step 1 (the saved fixture)
    python = Solver(out).solve(puzzles)
    request = {"puzzles": puzzles.tolist(), "ids": [0] * len(puzzles), "options": {"mode": "adaptive"},
               "batchSize": 16}
    solved = _node("tests/runtime.mjs", str(out), "solve", stdin=json.dumps(request))
    assert solved["predictions"] == python.predictions.tolist()
    assert solved["steps"] == python.steps_used.tolist()
    assert len(set(python.steps_used.tolist())) >= 2, "both kinds of exit must be present"


def test_an_x_transformers_encoder_network_exports_and_answers_as_predict(tmp_path):
    """The README's other network: TinyRecursiveModel(network=x_transformers.Encoder(...)), described by
    "network": "x-transformers-encoder" with its heads; exported from its state_dict, the bundle gives predict()'s
    answers and exit steps."""
    from tiny_recursive_model import TinyRecursiveModel
    from x_transformers import Encoder

    config = {"dim": 16, "num_tokens": 11, "seq_len": 81, "network": "x-transformers-encoder", "depth": 1,
              "heads": 2, "attn_dim_head": 8, "num_refinement_blocks": 2, "num_latent_refinements": 1,
              "num_register_tokens": 1, "max_deep_refinement_steps": 4}
    torch.manual_seed(1)
    trm = TinyRecursiveModel(dim=16, num_tokens=11, network=Encoder(dim=16, depth=1, heads=2, attn_dim_head=8),
                             num_refinement_blocks=2, num_latent_refinements=1, num_register_tokens=1).eval()
    puzzles = get_task("sudoku").split("heldout", size=32).inputs
    tokens = torch.from_numpy(puzzles.copy()).long()
    with torch.no_grad():
        trm.to_halt_pred[1].weight.normal_(0, 0.5)
        inputs, _ = trm.embed_inputs_with_registers(tokens)
        outputs, latents = trm.get_initial()
        outputs, _ = trm.deep_refinement(inputs, outputs.expand_as(inputs), latents.expand_as(inputs))
        first = np.sort(trm.to_halt_pred(outputs).sigmoid().numpy())  # halting probabilities after step 1
        middle = np.arange(len(first) // 4, 3 * len(first) // 4)
        gap = middle[np.argmax(first[middle + 1] - first[middle])]  # the widest gap near the median: no puzzle on
        config["halt_prob_thres"] = float(first[gap] + first[gap + 1]) / 2  # the edge for float32 rounding
        preds, steps = trm.predict(tokens, halt_prob_thres=config["halt_prob_thres"], max_deep_refinement_steps=4)
    torch.save(trm.state_dict(), tmp_path / "saved-trm.pt")
    (tmp_path / "trm.json").write_text(json.dumps(config))
    out = tmp_path / "bundle"
    result = CliRunner().invoke(cli, [str(tmp_path / "saved-trm.pt"), "--arch", "tiny-recursive-model",
                                      "--arch-config", str(tmp_path / "trm.json"), "--target", "cpu", "-o", str(out),
                                      "--parity-puzzles", "8", "--no-report", "--threads", "1"])
    assert result.exit_code == 0, result.output
    solved = Solver(out, threads=1).solve(puzzles)
    np.testing.assert_array_equal(solved.steps_used, steps.numpy())
    np.testing.assert_array_equal(solved.predictions, preds.numpy())
    assert len(set(steps.tolist())) >= 2
