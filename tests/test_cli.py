"""The command line as a user meets it: help, targets, inspect, evaluate, and errors as one line."""

from __future__ import annotations

from click.testing import CliRunner

from trm_export.cli import main as cli


def test_help_lists_every_command():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("export", "verify", "run", "quantize", "check", "report", "build", "targets", "inspect",
                    "evaluate", "sign", "keygen"):
        assert command in result.output
    assert "trm-export MODEL --target jetson -o b/" in result.output


def test_targets_lists_the_registry():
    result = CliRunner().invoke(cli, ["targets"])
    assert result.exit_code == 0
    assert "jetson-xavier-nx" in result.output and "8.5" in result.output and "agx-orin, orin" in result.output
    jetson = next(line for line in result.output.splitlines() if line.startswith("jetson "))
    assert jetson.split()[1:8] == ["tensorrt", "8.5+", "17", "8", "7.2+", "*", "int8"] and "decided on the device" in \
        result.output


def test_inspect_and_evaluate_a_checkpoint(sudoku_bundle):
    result = CliRunner().invoke(cli, ["inspect", str(sudoku_bundle / "ckpt")])
    assert result.exit_code == 0, result.output
    assert "key prefix '_orig_mod.model.inner.'" in result.output and "bfloat16" in result.output
    result = CliRunner().invoke(cli, ["evaluate", str(sudoku_bundle / "ckpt"), "--limit", "4", "--steps", "1,2",
                                      "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "| fixed | 2 |" in result.output and "| adaptive | 2 |" in result.output


def test_errors_are_one_line_without_a_traceback(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_text("not weights")
    result = CliRunner().invoke(cli, ["inspect", str(bad)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "model.pt: not a PyTorch checkpoint" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["evaluate", str(bad), "--steps", "a,b"])
    assert result.exit_code == 2 and "expected comma-separated integers" in result.output


def test_export_takes_the_users_puzzles_and_names_a_bad_file(sudoku_bundle, tmp_path):
    from trm_export.tasks import format_sudoku, get_task

    good = tmp_path / "mine.txt"
    good.write_text("\n".join(format_sudoku(p) for p in get_task("sudoku").split("calibration", size=6).inputs))
    result = CliRunner().invoke(cli, [str(sudoku_bundle / "ckpt"), "-o", str(tmp_path / "b"), "--puzzles", str(good),
                                      "--threads", "1", "--no-report"])  # the report: test_deploy
    assert result.exit_code == 0, result.output
    assert "6 puzzles x 8 steps" in result.output and "mine.txt" in result.output
    assert not (tmp_path / "b" / "report").exists()  # --no-report
    bad = tmp_path / "bad.txt"
    bad.write_text("12345\n")
    result = CliRunner().invoke(cli, [str(sudoku_bundle / "ckpt"), "-o", str(tmp_path / "c"), "--puzzles", str(bad)])
    assert result.exit_code == 1 and "bad.txt:1: sudoku line must have 81 characters" in result.output
    assert not (tmp_path / "c").exists()
