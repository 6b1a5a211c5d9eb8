"""Official dataset folders (`--data DIR`) as the puzzle source of every command, for tasks we ship and tasks we
do not (an ARC-like encoding), with the folder's labels scored the way the official evaluation scores them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from official_format import VARIANTS, official_dataset_json, write_official_checkpoint

from trm_export.cli import main as cli
from trm_export.export.checkpoint import load_checkpoint
from trm_export.export.reference import run_reference
from trm_export.runtime.manifest import read_manifest
from trm_export.runtime.solver import Solver
from trm_export.tasks import (
    IGNORE_LABEL,
    DatasetFolder,
    DatasetFolderError,
    get_task,
    per_puzzle_correct,
    write_official_dataset,
)

# No shipped task has 16 tokens: the bundle's task is a custom one, known only through the folder.
CUSTOM = dataclasses.replace(VARIANTS["trm-att-rope"], name="custom-task", gain=0.5)


def write_folder(root: Path, split: str, inputs: np.ndarray, labels: np.ndarray, ids: np.ndarray,
                 meta: dict) -> Path:
    """One split as the official builders write it: one example per puzzle here."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    n = len(inputs)
    arrays = {"inputs": inputs, "labels": labels, "puzzle_identifiers": ids,
              "puzzle_indices": np.arange(n + 1), "group_indices": np.arange(n + 1)}
    for key, value in arrays.items():
        np.save(folder / f"all__{key}.npy", np.asarray(value, np.int32))
    (folder / "dataset.json").write_text(json.dumps({**meta, "total_puzzles": n, "total_groups": n}))
    return folder


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    """A custom-task checkpoint and its folder. Test labels: the reference's own 8-step answers on even puzzles
    (with some positions unscored: label 0, the folder's ignore_label_id), one wrong scored token on odd ones;
    so exactly half of the test puzzles are right, whatever the random weights."""
    root = tmp_path_factory.mktemp("folder")
    ckpt = write_official_checkpoint(root / "ck", CUSTOM)
    rng = np.random.default_rng(0)
    meta = official_dataset_json(CUSTOM)
    tokens = rng.integers(1, CUSTOM.vocab_size, (128, CUSTOM.seq_len))
    ids = rng.integers(0, CUSTOM.num_puzzle_identifiers, 128)
    answers = run_reference(load_checkpoint(ckpt).model, tokens, ids, mode="fixed", max_steps=8).predictions
    # Where the model answers the pad token 0 the position is not scored either; keep 32 puzzles whose answer at
    # position 1 is not 0, so that every puzzle has a scored token there.
    keep = np.flatnonzero(answers[:, 1] != 0)[:32]
    assert len(keep) == 32
    tokens, ids, answers = tokens[keep], ids[keep], answers[keep]
    labels = answers.copy()
    labels[:, ::5] = 0  # not scored, whatever the model answers there
    labels[1::2, 1] = np.where(answers[1::2, 1] == 1, 2, 1)  # odd puzzles: one scored token wrong
    write_folder(root / "data", "test", tokens, labels, ids, meta)
    train = rng.integers(1, CUSTOM.vocab_size, (64, CUSTOM.seq_len))
    write_folder(root / "data", "train", train, train, rng.integers(0, CUSTOM.num_puzzle_identifiers, 64), meta)
    return root


def test_a_sample_is_spread_evenly_over_the_split_and_maps_unscored_labels(custom):
    folder = DatasetFolder.open(custom / "data").check_model(16, 11, 3)
    data, source = folder.sample("heldout", 8, 3)
    everything, _ = folder.sample("heldout", None, 3)
    assert np.array_equal(data.inputs, everything.inputs[::4])  # rows 0, 4, ..., 28 of 32: not the first 8
    assert "8 spread evenly over 32 examples" in source and "test" in source
    assert (everything.labels[:, ::5] == IGNORE_LABEL).all() and (everything.labels[1::2, 1] > 0).all()
    again, _ = folder.sample("heldout", 8, 3)
    assert np.array_equal(again.inputs, data.inputs)  # the same rows every time


def test_evaluate_and_run_score_against_the_folder_labels(custom, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["evaluate", str(custom / "ck"), "--data", str(custom / "data"), "--steps", "8",
                                 "--no-adaptive"])
    assert result.exit_code == 0, result.output
    assert "| fixed | 8 | 50.0% |" in result.output and "32 puzzles" in result.output

    result = runner.invoke(cli, [str(custom / "ck"), "--target", "cpu", "--data", str(custom / "data"),
                                 "--threads", "1", "--parity-puzzles", "8", "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "b")
    assert manifest.task.name is None and "data/test" in manifest.parity["fp32"]["puzzles_source"]
    # The report of a task we do not ship, with the folder's labels: its fixed-8 row is the same 50%.
    report = json.loads((tmp_path / "b" / "report" / "report.json").read_text())
    row = next(m for m in report["measurements"] if m["mode"] == "fixed" and m["budget"] == 8)
    assert row["exact_accuracy"] == pytest.approx(0.5) and row["puzzles"] == 32

    result = runner.invoke(cli, ["run", str(tmp_path / "b"), "--data", str(custom / "data"), "--mode", "fixed",
                                 "--max-steps", "8"])
    assert result.exit_code == 0, result.output
    assert "16 of 32 exactly right (50.0%, against the labels)" in result.output
    result = runner.invoke(cli, ["run", str(tmp_path / "b"), "--data", str(custom / "data"), "--limit", "4",
                                 "--mode", "fixed", "--max-steps", "8", "-o", str(tmp_path / "s.txt")])
    # rows 0, 8, 16, 24 (spread evenly, all even): the first four rows would have given 2 of 4
    assert result.exit_code == 0 and "4 of 4 exactly right" in result.output, result.output
    result = runner.invoke(cli, ["run", str(tmp_path / "b")])
    assert result.exit_code != 0 and "--input FILE or --data DIR" in result.output


def test_int8_calibrates_on_train_and_measures_on_test(custom, tmp_path):
    result = CliRunner().invoke(cli, [str(custom / "ck"), "--target", "jetson", "--data", str(custom / "data"),
                                      "--threads", "1", "--parity-puzzles", "8", "--no-report", "-o",
                                      str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "b")
    int8 = next(g for name, g in manifest.graphs.items() if name.startswith("int8-"))
    assert "data/train: all 64 examples" in int8.details["calibration"]["source"]
    assert "data/test" in result.output  # the evaluation puzzles, named in the log
    # A Jetson's table: the CPU's ms/step beside an on-paper device figure, labelled as the estimate it is.
    header = next(line for line in result.output.splitlines() if line.startswith("variant "))
    assert "ms/step here" in header and "device est." in header
    assert "on-paper floor of one step on the Orin Nano 4 GB's GPU" in result.output and "an estimate" in result.output


@pytest.mark.rounding
def test_a_folder_of_a_shipped_task_gives_that_task_s_accuracy(tmp_path, sudoku_bundle):
    """A Sudoku split written as an official folder, with labels that a third of its puzzles meet (the model's own
    8-step answers there, the real solutions elsewhere, which a random model never meets): the report measures
    exactly that share at 8 steps, so labels paired with the wrong rows cannot pass."""
    task = get_task("sudoku")
    data = task.split("heldout", size=40)
    own = Solver(sudoku_bundle / "bundle", batch_size=8, threads=1, verify=False).solve(
        data.inputs, data.puzzle_ids, mode="fixed", max_steps=8).predictions
    labels = np.where((np.arange(len(own)) % 3 == 0)[:, None], own, data.labels)
    expected = float(per_puzzle_correct(own, labels).mean())
    assert 0.3 < expected < 0.4  # 14 of 40: informative both ways
    write_official_dataset(dataclasses.replace(data, labels=labels), task.spec, tmp_path / "data", "test")
    result = CliRunner().invoke(cli, ["report", str(sudoku_bundle / "bundle"), "--puzzles", "40", "--threads", "1",
                                      "--backend", "onnxruntime", "--data", str(tmp_path / "data"),
                                      "-o", str(tmp_path / "folder")])
    assert result.exit_code == 0, result.output
    folder = json.loads((tmp_path / "folder" / "report.json").read_text())
    assert "test: all 40 examples" in folder["source"]
    fixed8 = next(m for m in folder["measurements"] if m["mode"] == "fixed" and m["budget"] == 8)
    assert fixed8["exact_accuracy"] == expected


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "test" / "all__labels.npy").unlink(), "all__labels.npy: missing"),
    (lambda d: (d / "test" / "dataset.json").write_text("{"), "dataset.json: not readable JSON"),
    (lambda d: _edit_meta(d, seq_len=81), "seq_len 81, the model's is 16"),
    (lambda d: _edit_meta(d, vocab_size=12), "vocab_size 12, the model's is 11"),
    (lambda d: np.save(d / "test" / "all__puzzle_indices.npy", np.array([0, 3])), "must run from 0 to 32"),
    (lambda d: np.save(d / "test" / "all__inputs.npy", np.full((32, 16), 11, np.int32)), "outside [0, 11)"),
    (lambda d: np.save(d / "test" / "all__puzzle_identifiers.npy", np.full(32, 7, np.int32)),
     "identifier 7 is outside the model's table of 3 rows"),
    (lambda d: np.save(d / "test" / "all__inputs.npy", np.zeros((32, 16), np.float32)), "expected integers"),
    (lambda d: [p.unlink() for p in (d / "test").iterdir()] and (d / "test").rmdir(), "test/dataset.json: missing"),
    # "0" would compare unequal to every label: every position scored, the accuracy silently wrong
    (lambda d: _edit_meta(d, ignore_label_id="0"), "ignore_label_id must be an integer or null, got \"0\""),
    (lambda d: _edit_meta(d, ignore_label_id=[0]), "ignore_label_id must be an integer or null"),
    (lambda d: (d / "test" / "dataset.json").write_text('{"seq_len": 1' + "0" * 5000 + "}"), "not readable JSON"),
    (lambda d: _edit_meta(d, seq_len=True), "needs integer seq_len"),
    (lambda d: np.save(d / "test" / "all__inputs.npy", np.array(5)), "a single number, expected an array"),
    # unsigned indices out of order: their differences wrap around instead of going negative
    (lambda d: _unsigned_out_of_order(d / "test" / "all__puzzle_indices.npy"), "must run from 0 to 32"),
])
def test_a_bad_folder_is_one_clear_line(custom, tmp_path, damage, message):
    data = tmp_path / "data"
    for split in ("test", "train"):
        (data / split).mkdir(parents=True)
        for f in (custom / "data" / split).iterdir():
            (data / split / f.name).write_bytes(f.read_bytes())
    damage(data)
    result = CliRunner().invoke(cli, ["evaluate", str(custom / "ck"), "--data", str(data), "--steps", "1"])
    assert result.exit_code != 0 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def _unsigned_out_of_order(path: Path) -> None:
    indices = np.load(path).astype(np.uint32)
    assert len(indices) >= 4 and indices[1] < indices[2]
    indices[1], indices[2] = indices[2], indices[1]  # 0, b, a, ..., n: a row counted twice, one never
    np.save(path, indices)


def _edit_meta(data: Path, **changes) -> None:
    path = data / "test" / "dataset.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_no_folder_at_all(tmp_path):
    with pytest.raises(DatasetFolderError, match="not a folder"):
        DatasetFolder.open(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetFolderError, match="no test/dataset.json or train/dataset.json"):
        DatasetFolder.open(tmp_path / "empty")
