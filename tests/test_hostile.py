"""A bundle, a checkpoint, a puzzle file from a stranger: refused in one clear line, nothing written outside the
output, no earlier output lost, never a traceback, never code run.

The table below is the hostile-input list: each case builds a bad input from a good bundle (or checkpoint, or
puzzle file), runs one CLI command on it in-process and asserts all of that. Cases named `resealed` recompute the
manifest's digest after the edit: an attacker who knows the format gets past the digest, so the schema, path and
file checks behind it must hold on their own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import SUDOKU_SHAPED
from official_format import COMPILED_PREFIX, write_official_checkpoint

from trm_export.cli import main as cli
from trm_export.errors import BundleError
from trm_export.runtime.manifest import MANIFEST_NAME, read_manifest, seal, sha256_file
from trm_export.runtime.solver import Solver
from trm_export.tasks import format_sudoku, get_task

TESTS = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------- helpers


def _manifest(b: Path) -> dict:
    return json.loads((b / MANIFEST_NAME).read_text())


def _write(b: Path, data: dict, reseal: bool = True, rehash: bool = True) -> None:
    """Write a manifest dict; `reseal` recomputes the digest, `rehash` the checksums of the listed files."""
    if reseal and rehash and isinstance(data.get("files"), dict):
        for rel in data["files"]:
            if (b / rel).is_file() and not (b / rel).is_symlink():
                data["files"][rel] = sha256_file(b / rel)
    if reseal:
        (b / MANIFEST_NAME).write_text(seal(data))
    else:
        (b / MANIFEST_NAME).write_text(json.dumps(data, indent=2, sort_keys=True))


def _edit(change: Callable[[dict], None], reseal: bool = True, rehash: bool = True) -> Callable[[Path, Path], None]:
    def mutate(b: Path, outside: Path) -> None:  # noqa: ARG001
        data = _manifest(b)
        change(data)
        _write(b, data, reseal, rehash)

    return mutate


def _set(path: str, value, reseal: bool = True) -> Callable[[Path, Path], None]:
    def change(data: dict) -> None:
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[last] = value

    return _edit(change, reseal)


def _rewrite_file(rel: str, make: Callable[[Path], None], reseal: bool = True) -> Callable[[Path, Path], None]:
    def mutate(b: Path, outside: Path) -> None:  # noqa: ARG001
        make(b / rel)
        data = _manifest(b)
        _write(b, data, reseal)

    return mutate


def _npy_claiming(elements: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        header = {"descr": "<f4", "fortran_order": False, "shape": (elements,)}
        buf = path.open("wb")
        np.lib.format.write_array_header_1_0(buf, header)
        buf.write(b"\0" * 64)
        buf.close()

    return make


def _npy(array_of: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        np.save(path, array_of(np.load(path)), allow_pickle=True)

    return make


def _symlink_out(rel: str) -> Callable[[Path, Path], None]:
    """Replace a listed file by a link to an identical copy outside: the checksum still matches."""

    def mutate(b: Path, outside: Path) -> None:
        target = outside / Path(rel).name
        shutil.copyfile(b / rel, target)
        (b / rel).unlink()
        (b / rel).symlink_to(target)

    return mutate


def _symlink_dir_out(folder: str) -> Callable[[Path, Path], None]:
    def mutate(b: Path, outside: Path) -> None:
        shutil.copytree(b / folder, outside / folder)
        shutil.rmtree(b / folder)
        (b / folder).symlink_to(outside / folder, target_is_directory=True)

    return mutate


def _swap_graph_weights(b: Path, outside: Path) -> None:  # noqa: ARG001
    """A different model's step graph of the same shapes (one weight scaled), the manifest resealed: only the golden
    vectors can tell."""
    import onnx
    from onnx import numpy_helper

    path = b / "graphs" / "step_fp32.onnx"
    model = onnx.load(path)
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 3.0, init.name))
    onnx.save(model, path)
    _write(b, _manifest(b))


def _unlisted_copy_of_graph(b: Path, outside: Path) -> None:  # noqa: ARG001
    shutil.copyfile(b / "graphs" / "step_fp32.onnx", b / "graphs" / "other.onnx")
    data = _manifest(b)
    data["graphs"]["fp32"]["file"] = "graphs/other.onnx"
    _write(b, data)


def _hostile_variant_name(b: Path, outside: Path) -> None:  # noqa: ARG001
    data = _manifest(b)
    data["graphs"]["x'; touch PWNED; echo '"] = data["graphs"]["fp32"]
    _write(b, data)


def _external_weights(via_link: bool) -> Callable[[Path, Path], None]:
    """The step graph's largest weight moved to external data: its exact bytes in outside/secret0.bin, named by a
    path that climbs out of the bundle, or by an unlisted link in graphs/ that leads there; manifest resealed. An
    engine that follows the path computes the right answers (ONNX Runtime 1.17 does, with golden vectors intact):
    only a check of the graph itself can tell. Both files of the fp32 step are poisoned where the bundle has two
    (the cpu target's fused graph, which ONNX Runtime reads, and its standard-ops twin, which OpenVINO reads)."""

    def mutate(b: Path, outside: Path) -> None:
        import onnx
        from onnx.external_data_helper import set_external_data

        graph = _manifest(b)["graphs"]["fp32"]
        for i, rel in enumerate(f for f in (graph["file"], graph.get("standard_file")) if f):
            path = b / rel
            model = onnx.load(path)
            init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
            (outside / f"secret{i}.bin").write_bytes(init.raw_data)
            if via_link:
                (b / "graphs" / f"weights{i}.bin").symlink_to(outside / f"secret{i}.bin")
                location = f"weights{i}.bin"
            else:
                location = os.path.relpath(outside / f"secret{i}.bin", path.parent)
            set_external_data(init, location, offset=0, length=len(init.raw_data))
            init.data_location = onnx.TensorProto.EXTERNAL
            init.ClearField("raw_data")
            path.write_bytes(model.SerializeToString())
        _write(b, _manifest(b))

    return mutate


def _endless_loop(b: Path, outside: Path) -> None:  # noqa: ARG001
    """A Loop node with no trip count whose condition stays true, added to the step graph; manifest resealed."""
    import onnx
    from onnx import TensorProto, helper

    path = b / "graphs" / "step_fp32.onnx"
    model = onnx.load(path)
    body = helper.make_graph([helper.make_node("Identity", ["cond_in"], ["cond_out"])], "forever",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])])
    model.graph.initializer.append(helper.make_tensor("always", TensorProto.BOOL, [], [True]))
    model.graph.node.insert(0, helper.make_node("Loop", ["", "always"], [], body=body))
    path.write_bytes(model.SerializeToString())
    _write(b, _manifest(b))


def _hours_of_arithmetic(b: Path, outside: Path) -> None:  # noqa: ARG001
    """No control flow, but 2000 chained [1024 x 1024] MatMuls fed from x into q_halt (a minute or more per step
    here, for the step watch to cut short: tests/test_runtime_oldest.py, on the newest and the oldest ONNX
    Runtime); manifest resealed."""
    import onnx
    from onnx import helper, numpy_helper

    path = b / "graphs" / "step_fp32.onnx"
    model = onnx.load(path)
    graph = model.graph
    producer = next(node for node in graph.node if "q_halt" in node.output)
    producer.output[list(producer.output).index("q_halt")] = "q_halt_before"
    n = 1024
    graph.initializer.extend([numpy_helper.from_array(np.eye(n, dtype=np.float32), "slow_w"),
                              numpy_helper.from_array(np.array([n, n], np.int64), "slow_shape"),
                              numpy_helper.from_array(np.zeros(1, np.float32), "slow_zero")])
    nodes = [helper.make_node("ReduceSum", ["x"], ["slow_0"], keepdims=0),
             helper.make_node("Expand", ["slow_0", "slow_shape"], ["slow_m0"])]
    for i in range(2000):
        nodes.append(helper.make_node("MatMul", [f"slow_m{i}", "slow_w"], [f"slow_m{i + 1}"]))
    nodes += [helper.make_node("ReduceMax", ["slow_m2000"], ["slow_max"], keepdims=0),
              helper.make_node("Mul", ["slow_max", "slow_zero"], ["slow_nothing"]),
              helper.make_node("Add", ["q_halt_before", "slow_nothing"], ["q_halt"])]
    graph.node.extend(nodes)
    path.write_bytes(model.SerializeToString())
    _write(b, _manifest(b))


def _folder_beside(name: str, files: dict[str, str]) -> Callable[[Path, Path], None]:
    """A user's folder next to the bundle (where a mistyped -o lands)."""

    def mutate(b: Path, outside: Path) -> None:  # noqa: ARG001
        (b.parent / name).mkdir()
        for rel, text in files.items():
            (b.parent / name / rel).write_text(text)

    return mutate


def _listed_outside(rel: str, link: bool) -> Callable[[Path, Path], None]:
    """`files` lists `rel`, a file outside the bundle: by '..' (quantize used to copy it) or through a folder link."""

    def mutate(b: Path, outside: Path) -> None:
        (outside / "evil").write_text("x")
        if link:
            (b / "up").symlink_to(outside, target_is_directory=True)
        data = _manifest(b)
        data["files"][rel] = sha256_file(outside / "evil")
        _write(b, data)

    return mutate


_files_entry_outside = _listed_outside("../outside/evil", link=False)
_link_through_folder = _listed_outside("up/evil", link=True)


def _replace_text(old: str, new: str) -> Callable[[Path, Path], None]:
    def mutate(b: Path, outside: Path) -> None:  # noqa: ARG001
        (b / MANIFEST_NAME).write_text((b / MANIFEST_NAME).read_text().replace(old, new))

    return mutate


def _raw_manifest(content: bytes) -> Callable[[Path, Path], None]:
    def mutate(b: Path, outside: Path) -> None:  # noqa: ARG001
        (b / MANIFEST_NAME).write_bytes(content)

    return mutate


def _puzzle_file(name: str, content: bytes | Callable[[Path], None]) -> Callable[[Path, Path], None]:
    def mutate(b: Path, outside: Path) -> None:  # noqa: ARG001
        path = b.parent / name
        if callable(content):
            content(path)
        else:
            path.write_bytes(content)

    return mutate


def _nothing(b: Path, outside: Path) -> None:  # noqa: ARG001
    pass


GOOD_PUZZLES = "puzzles.txt"
RUN = ["run", "{b}", "--input", "{p}"]
VERIFY = ["verify", "{b}"]
QUANTIZE = ["quantize", "{b}", "-o", "{o}", "--force", "--methods", "minmax", "--calib-puzzles", "8",
            "--eval-puzzles", "8", "--no-mixed"]

# (id, mutation of the bundle folder b (outside: a folder beside it), command, words the one error line contains)
CASES: list[tuple[str, Callable[[Path, Path], None], list[str], str]] = [
    # manifest digest: an edit without resealing
    ("loosened-tolerance", _set("golden.tolerances.fp32.q_abs", 1e30, reseal=False), VERIFY, "digest"),
    ("edited-loop", _set("loop.halt_max_steps", 3, reseal=False), RUN, "digest"),
    ("edited-path", _set("graphs.fp32.file", "../outside/evil.onnx", reseal=False), RUN, "digest"),
    ("digest-removed", _edit(lambda d: d.pop("digest"), reseal=False), VERIFY, "digest"),
    ("text-edit", _replace_text('"halt_max_steps": 8', '"halt_max_steps": 9'), RUN, "digest"),
    # manifest not a manifest
    ("not-json", _raw_manifest(b"{not json"), VERIFY, "not valid JSON"),
    ("empty-manifest", _raw_manifest(b""), VERIFY, "not valid JSON"),
    ("list-manifest", _raw_manifest(b"[]"), VERIFY, "JSON object"),
    ("bad-utf8", _raw_manifest(b'{"a": "\xff\xfe"}'), VERIFY, "not valid JSON"),
    ("huge-manifest", _raw_manifest(b" " * (17 << 20) + b"{}"), VERIFY, "at most"),
    ("nested-manifest", _raw_manifest(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), VERIFY, "not valid JSON"),
    # resealed: wrong types and ranges
    ("seq-len-string", _set("task.seq_len", "81"), RUN, "task.seq_len must be an integer"),
    ("seq-len-float", _set("task.seq_len", 2.5), RUN, "task.seq_len must be an integer"),
    ("seq-len-list", _set("task.seq_len", []), RUN, "task.seq_len must be an integer"),
    ("seq-len-1e11-float", _set("task.seq_len", 1e11), RUN, "task.seq_len must be an integer"),
    ("seq-len-1e11", _set("task.seq_len", 10**11), RUN, "outside"),
    ("vocab-zero", _set("task.vocab_size", 0), RUN, "task.vocab_size"),
    ("vocab-negative", _set("task.vocab_size", -1), RUN, "task.vocab_size"),
    ("ids-bool", _set("task.num_puzzle_identifiers", True), RUN, "must be an integer"),
    ("task-not-object", _set("task", "sudoku"), RUN, "task must be an object"),
    ("hidden-string", _set("embedding.hidden_size", "96"), RUN, "embedding.hidden_size"),
    ("scale-nan", _set("embedding.scale", float("nan")), RUN, "finite number"),
    ("scale-inf", _set("embedding.scale", float("inf")), RUN, "finite number"),
    ("steps-zero", _set("loop.halt_max_steps", 0), RUN, "loop.halt_max_steps"),
    ("steps-huge", _set("loop.halt_max_steps", 10**9), RUN, "loop.halt_max_steps"),
    ("rule-unknown", _set("loop.halting_rule", "rm -rf /"), RUN, "halting_rule"),
    ("continue-string", _set("loop.uses_q_continue", "yes"), RUN, "true or false"),
    ("graphs-list", _set("graphs", []), RUN, "graphs must be an object"),
    ("graphs-empty", _set("graphs", {}), RUN, "no 'fp32'"),
    ("graph-string", _set("graphs.fp32", "x"), RUN, "graphs.fp32 must be an object"),
    ("precision-unknown", _set("graphs.fp32.precision", "fp64"), RUN, "precision"),
    ("opset-string", _set("graphs.fp32.opset", "17"), RUN, "opset"),
    ("inputs-string", _set("graphs.fp32.inputs", "x"), RUN, "inputs"),
    ("golden-count-zero", _set("golden.count", 0), VERIFY, "golden.count"),
    ("golden-count-string", _set("golden.count", "8"), VERIFY, "golden.count"),
    ("tolerance-negative", _set("golden.tolerances.fp32.q_abs", -1), VERIFY, "q_abs"),
    ("tolerance-above-one", _set("golden.tolerances.fp32.predictions_identical", 2), VERIFY, "predictions_identical"),
    ("files-list", _set("files", []), VERIFY, "files must be an object"),
    ("files-bad-sha", _edit(lambda d: d["files"].update({"tables/H_init.npy": "abc"}), rehash=False), VERIFY,
     "sha256"),
    ("target-injection", _set("target", "cpu; rm -rf /"), VERIFY, "target"),
    ("format-version-1", _set("format_version", 1), VERIFY, "format version"),
    ("format-version-missing", _edit(lambda d: d.pop("format_version")), VERIFY, "format version"),
    ("engine-unknown-variant", _set("build", {"engines": {"nope": {"file": "engines/x.engine"}}}), RUN, "nope"),
    # resealed: paths
    ("graph-climbs-out", _set("graphs.fp32.file", "../outside/evil.onnx"), RUN, "not a plain relative path"),
    ("graph-absolute", _set("graphs.fp32.file", "/etc/passwd"), RUN, "not a plain relative path"),
    ("graph-dotdot-inside", _set("graphs.fp32.file", "graphs/../../x.onnx"), RUN, "not a plain relative path"),
    ("graph-backslash", _set("graphs.fp32.file", "graphs\\step_fp32.onnx"), RUN, "not a plain relative path"),
    ("graph-empty-path", _set("graphs.fp32.file", ""), RUN, "not a plain relative path"),
    ("graph-unlisted", _unlisted_copy_of_graph, RUN, "not listed in files"),
    ("token-table-passwd", _set("embedding.token_table", "../../../etc/passwd"), RUN, "not a plain relative path"),
    ("token-table-null", _set("embedding.token_table", None), RUN, "embedding.token_table must be a string"),
    ("golden-folder-out", _set("golden.folder", "../golden"), VERIFY, "not a plain relative path"),
    ("engine-climbs-out", _set("build", {"engines": {"fp32": {"file": "../e.engine"}}}), RUN, "relative path"),
    ("files-key-climbs-out", _files_entry_outside, VERIFY, "not a plain relative path"),
    ("files-through-linked-folder", _link_through_folder, VERIFY, "outside the bundle"),
    ("variant-injection", _hostile_variant_name, VERIFY, "does not match"),
    ("table-symlinked-out", _symlink_out("tables/embed_tokens.npy"), RUN, "outside the bundle"),
    ("folder-symlinked-out", _symlink_dir_out("golden"), VERIFY, "outside the bundle"),
    # resealed: file contents
    ("graph-missing", lambda b, o: (b / "graphs" / "step_fp32.onnx").unlink(), RUN, "missing"),
    ("graph-changed", lambda b, o: (b / "graphs" / "step_fp32.onnx").write_bytes(b"x"), RUN, "sha256 differs"),
    ("graph-not-onnx", _rewrite_file("graphs/step_fp32.onnx", lambda p: p.write_bytes(b"\0" * 100)), RUN,
     "ONNX Runtime cannot load"),
    ("graph-swapped", _swap_graph_weights, RUN, "golden self-check"),
    ("npy-claims-1e11", _rewrite_file("tables/embed_tokens.npy", _npy_claiming(10**11)), RUN, "shape"),
    ("npy-claims-more-than-file", _rewrite_file("tables/H_init.npy", _npy_claiming(32)), RUN, "header claims"),
    ("npy-pickle", _rewrite_file("tables/H_init.npy", _npy(lambda a: a.astype(object))), RUN, "dtype object"),
    ("table-wrong-shape", _rewrite_file("tables/embed_tokens.npy", _npy(lambda a: a[:, :5])), RUN, "expected"),
    ("table-nan", _rewrite_file("tables/L_init.npy", _npy(lambda a: a * np.nan)), RUN, "NaN"),
    ("table-not-npy", _rewrite_file("tables/H_init.npy", lambda p: p.write_bytes(b"hello")), RUN,
     "not a readable .npy"),
    ("golden-wrong-shape", _rewrite_file("golden/tokens.npy", _npy(lambda a: a[:3])), VERIFY, "shape"),
    ("golden-float-tokens", _rewrite_file("golden/tokens.npy", _npy(lambda a: a.astype(np.float32))), VERIFY,
     "dtype"),
    # the bundle path itself
    ("bundle-missing", lambda b, o: shutil.rmtree(b), VERIFY, "no such folder"),
    ("bundle-is-file", lambda b, o: (shutil.rmtree(b), b.write_text("x")), VERIFY, "a file"),
    ("no-manifest", lambda b, o: (b / MANIFEST_NAME).unlink(), VERIFY, "no manifest.json"),
    # puzzle files and options
    ("input-folder", _puzzle_file("dir.txt", lambda p: p.mkdir()), ["run", "{b}", "--input", "{d}/dir.txt"],
     "is a folder"),
    ("input-missing", _nothing, ["run", "{b}", "--input", "{d}/none.txt"], "no such file"),
    ("input-one-30-mb-line", _puzzle_file("long.txt", b"5" * (30 << 20) + b"\n"),
     ["run", "{b}", "--input", "{d}/long.txt"], "more characters"),
    ("grid-side-past-the-sequence", _set("task.grid_side", 1024), RUN, "does not fit task.seq_len"),
    # resealed: golden vectors out of range are the bundle's damage, not the user's input
    ("golden-token-outside-the-vocabulary", _rewrite_file("golden/tokens.npy", _npy(lambda a: a + 99)), VERIFY,
     "golden vectors are damaged"),
    ("golden-steps-zero", _rewrite_file("golden/adaptive_steps.npy", _npy(lambda a: a * 0)), VERIFY,
     "golden vectors are damaged"),
    ("input-binary", _puzzle_file("bin.txt", bytes(range(256)) * 4), ["run", "{b}", "--input", "{d}/bin.txt"],
     "bin.txt"),
    ("input-npy-pickle", _puzzle_file("p.npy", lambda p: np.save(p, np.array([{"a": 1}]), allow_pickle=True)),
     ["run", "{b}", "--input", "{d}/p.npy"], "not a plain numpy array"),
    ("input-npy-1e11", _puzzle_file("big.npy", _npy_claiming(10**11)), ["run", "{b}", "--input", "{d}/big.npy"],
     "not a plain numpy array"),
    ("input-npy-float", _puzzle_file("f.npy", lambda p: np.save(p, np.zeros((2, 81), np.float32))),
     ["run", "{b}", "--input", "{d}/f.npy"], "dtype"),
    ("input-npy-short", _puzzle_file("s.npy", lambda p: np.save(p, np.zeros((2, 80), np.int64))),
     ["run", "{b}", "--input", "{d}/s.npy"], "is not (N, 81)"),
    ("input-out-of-vocab", _puzzle_file("v.npy", lambda p: np.save(p, np.full((2, 81), 99, np.int64))),
     ["run", "{b}", "--input", "{d}/v.npy"], "is outside"),
    ("max-steps-zero", _nothing, RUN + ["--max-steps", "0"], "--max-steps"),
    ("max-steps-huge", _nothing, RUN + ["--mode", "fixed", "--max-steps", "100000"], "--max-steps"),
    ("min-over-max", _nothing, RUN + ["--min-steps", "5", "--max-steps", "2"], "min_steps"),
    ("batch-zero", _nothing, RUN + ["--batch-size", "0"], "--batch-size"),
    ("batch-1e8-text", _nothing, RUN + ["--batch-size", "1e8"], "--batch-size"),
    ("batch-1e6", _nothing, RUN + ["--batch-size", "1000000"], "smaller --batch-size"),
    ("threads-zero", _nothing, RUN + ["--threads", "0"], "--threads"),
    ("output-folder-missing", _nothing, RUN + ["-o", "{d}/nope/out.txt"], "does not exist"),
    ("output-is-folder", _nothing, RUN + ["-o", "{d}"], "is a folder"),
    ("output-exists", _puzzle_file("out.txt", b"keep"), RUN + ["-o", "{d}/out.txt"], "--force"),
    ("variant-unknown", _nothing, RUN + ["--variant", "nope"], "nope"),
    ("variant-path", _nothing, ["verify", "{b}", "--variant", "../x"], "../x"),
    # quantize: copies a stranger's bundle into a new one
    ("quantize-files-outside", _files_entry_outside, QUANTIZE, "not a plain relative path"),
    ("quantize-linked-folder", _link_through_folder, QUANTIZE, "outside the bundle"),
    ("quantize-output-under-file", _puzzle_file("afile", b"x"),
     ["quantize", "{b}", "-o", "{d}/afile/q.bundle", "--methods", "minmax"], "is a file"),
    ("quantize-output-not-bundle", _puzzle_file("plain", lambda p: p.mkdir()),
     ["quantize", "{b}", "-o", "{d}/plain", "--force", "--methods", "minmax"], "not a bundle"),
    ("quantize-no-force", _nothing, ["quantize", "{b}", "-o", "{o}", "--methods", "minmax"], "--force"),
    ("report-folder-linked-out", lambda b, o: (b / "report").symlink_to(o, target_is_directory=True),
     ["report", "{b}", "--puzzles", "4"], "symbolic link"),
    ("build-recipe-injection", _hostile_variant_name, ["build", "{b}", "--print-recipe"], "does not match"),
    # report -o: a mistyped folder is never emptied
    ("report-into-a-users-folder", _folder_beside("thesis", {"thesis.tex": "chapter 1"}),
     ["report", "{b}", "--puzzles", "4", "-o", "{d}/thesis"], "not a report"),
    ("report-into-a-users-folder-forced", _folder_beside("thesis", {"thesis.tex": "chapter 1"}),
     ["report", "{b}", "--puzzles", "4", "-o", "{d}/thesis", "--force"], "not a report"),
    ("report-into-an-earlier-bundle", _nothing, ["report", "{b}", "--puzzles", "4", "-o", "{o}", "--force"],
     "not a report"),
    ("report-over-a-report-without-force", _folder_beside("r", {"REPORT.md": "# earlier", "report.json": "{}"}),
     ["report", "{b}", "--puzzles", "4", "-o", "{d}/r"], "--force"),
    # resealed: step tensor shapes a recipe or a backend would misread
    ("input-shape-empty", _edit(lambda d: d["graphs"]["fp32"]["inputs"][0].update(shape=[])), RUN,
     "non-empty list of sizes"),
    ("input-shape-named-inner-axis", _edit(lambda d: d["graphs"]["fp32"]["inputs"][0]["shape"].__setitem__(1, "n")),
     ["build", "{b}", "--print-recipe"], "first of which may be an axis name"),
    # resealed: control flow in the step graph (a Loop without end would hang run and verify)
    ("endless-loop-run", _endless_loop, RUN, "control flow"),
    ("endless-loop-verify", _endless_loop, VERIFY, "control flow"),
    # terminal escapes in names that reach an error line (ESC [2J clears the screen, OSC 0 retitles the window)
    ("escape-in-a-missing-bundle-name", _nothing, ["verify", "{d}/\x1b[2J\x1b]0;PWNED\x07gone"], "no such folder"),
    ("escape-in-a-missing-checkpoint", _nothing, ["inspect", "{d}/\x1b[31mck\rpt"], "no such"),
    ("escape-in-a-listed-missing-file", _edit(lambda d: d["files"].update({"\x1b[31mx.npy": "0" * 64})), VERIFY,
     "missing"),
    ("escape-in-a-bad-option-value", _nothing, ["run", "{b}", "--input", "{p}", "--mode", "\x1b[31mfixed"],
     "invalid value"),
    # resealed: a graph whose weights live outside it (read by ONNX Runtime 1.17 and onnx.load if let through)
    *[(f"external-weights-{how}-{label}", _external_weights(how == "link"), command, "weights outside its file")
      for how in ("climbing", "link")
      for label, command in (("verify", VERIFY), ("run", RUN), ("check", ["check", "{b}"]), ("quantize", QUANTIZE),
                             ("run-openvino", [*RUN, "--backend", "openvino"]))],
]


@pytest.fixture(scope="module")
def good(sudoku_bundle, tmp_path_factory):
    """The session's Sudoku-shaped bundle, a quantized copy of it as an earlier output, and a puzzle file."""
    root = tmp_path_factory.mktemp("hostile")
    puzzles = root / GOOD_PUZZLES
    puzzles.write_text("\n".join(format_sudoku(p) for p in get_task("sudoku").split("heldout", size=4).inputs))
    return sudoku_bundle / "bundle", puzzles


def _tree(root: Path) -> dict[str, bytes | None]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink() or p.is_dir():
            out[p.relative_to(root).as_posix()] = None
        else:
            out[p.relative_to(root).as_posix()] = sha256_file(p).encode()
    return out


def test_the_table_is_long_enough():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_refused_in_one_line(good, tmp_path, case):
    name, mutate, command, words = case
    bundle, puzzles = good
    work = tmp_path / "work"
    outside = tmp_path / "outside"
    work.mkdir()
    outside.mkdir()
    b = work / "b.bundle"
    shutil.copytree(bundle, b)
    shutil.copyfile(puzzles, work / GOOD_PUZZLES)
    earlier = work / "earlier.bundle"  # an earlier output that a failed run must leave as it was
    shutil.copytree(bundle, earlier)
    mutate(b, outside)
    before_outside, before_earlier = _tree(outside), _tree(earlier)
    before_work = {k: v for k, v in _tree(work).items() if not k.startswith(("b.bundle", "earlier.bundle"))}
    args = [a.format(b=b, p=work / GOOD_PUZZLES, d=work, o=earlier) for a in command]
    cwd = os.getcwd()
    os.chdir(work)  # a PWNED file from a shell injection would land here
    try:
        result = CliRunner().invoke(cli, args)
    finally:
        os.chdir(cwd)
    out = result.output
    assert result.exit_code not in (0, None), out
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # a click error, not an exception
    assert "Traceback" not in out
    assert not any(c in out for c in "\x1b\x9b\r\x07"), repr(out)  # nothing from the input drives the terminal
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out
    assert words.lower() in errors[0].lower(), errors[0]
    assert len(errors[0]) < 1000, len(errors[0])  # whatever the input quotes, the line stays readable
    assert _tree(outside) == before_outside  # nothing written outside
    assert _tree(earlier) == before_earlier  # no earlier output lost or changed
    after_work = {k: v for k, v in _tree(work).items() if not k.startswith(("b.bundle", "earlier.bundle"))}
    assert after_work == before_work, set(after_work.items()) ^ set(before_work.items())  # no PWNED, nothing lost


# ------------------------------------------------------------------------ the findings, one test each


def test_build_script_quotes_what_it_echoes(tmp_path):
    """Finding 2: a variant name with shell syntax, were it to reach the script, is echoed, not run."""
    from trm_export.targets.recipe import BuildRecipe, build_script
    from trm_export.targets.registry import get_target

    name = "x'; touch PWNED; echo '"
    recipe = BuildRecipe(target="jetson-orin-nano", variant=name, onnx_file="graphs/a b.onnx",
                         engine_file="engines/$(touch PWNED2).engine", timing_cache="engines/t.cache",
                         tensorrt_major=10, precision="fp32", strongly_typed=False, precision_flags=(),
                         shapes={"x": ((1, 2), (1, 2), (1, 2))}, workspace_mb=None, dla_core=None)
    (tmp_path / "build").mkdir()
    script = tmp_path / "build" / "build_engines.sh"
    script.write_text(build_script([recipe], get_target("jetson-orin-nano")))
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "trtexec").write_text("#!/bin/sh\nexit 0\n")
    # The script ends with `trm-export build . --record` where trm-export is on PATH (an activated venv, or not):
    # a stand-in records the call, so the test is the same either way.
    (fake / "trm-export").write_text(f"#!/bin/sh\necho \"$@\" > {shlex.quote(str(tmp_path / 'recorded'))}\n")
    for tool in ("trtexec", "trm-export"):
        (fake / tool).chmod(0o755)
    out = subprocess.run(["sh", str(script)], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}, timeout=30)
    assert out.returncode == 0, out.stderr
    assert name in out.stdout
    assert (tmp_path / "recorded").read_text().strip() == "build . --record"
    assert not list(tmp_path.rglob("PWNED*"))


def test_recipes_refuse_a_name_outside_the_pattern():
    from trm_export.targets.recipe import RecipeError, make_recipe
    from trm_export.targets.registry import get_target

    with pytest.raises(RecipeError, match="does not match"):
        make_recipe(get_target("jetson-orin-nano"), "a'b", None)


def test_manifest_digest_covers_every_field(good, tmp_path):
    """Finding 3: a changed tolerance is refused like a changed graph; resealed, it reads again."""
    b = tmp_path / "b"
    shutil.copytree(good[0], b)
    data = _manifest(b)
    data["golden"]["tolerances"]["fp32"]["q_abs"] = 1e30
    _write(b, data, reseal=False)
    with pytest.raises(BundleError, match="digest does not match"):
        read_manifest(b)
    _write(b, data, reseal=True)
    assert read_manifest(b).golden["tolerances"]["fp32"]["q_abs"] == 1e30


def test_run_refuses_a_swapped_graph_that_verify_would_flag(good, tmp_path):
    """Finding 3: `run` checks the golden vectors first; a resealed bundle with another model's graph is refused."""
    b = tmp_path / "b"
    shutil.copytree(good[0], b)
    _swap_graph_weights(b, tmp_path)
    result = CliRunner().invoke(cli, ["run", str(b), "--input", str(good[1])])
    assert result.exit_code == 1 and "golden self-check" in result.output
    assert not CliRunner().invoke(cli, ["verify", str(b)]).exit_code == 0
    result = CliRunner().invoke(cli, ["run", str(b), "--input", str(good[1]), "--skip-selfcheck"])
    assert result.exit_code == 0  # the user's explicit choice


def test_verify_reports_files_the_manifest_does_not_list(good, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(good[0], b)
    (b / "graphs" / "extra.onnx").write_bytes(b"x")
    (b / "graphs" / "\x1b]0;PWNED\x07\x1b[2Jnote").write_bytes(b"x")  # retitles the window, clears the screen
    result = CliRunner().invoke(cli, ["verify", str(b)])
    assert result.exit_code == 0
    assert "not listed in the manifest" in result.output and "graphs/extra.onnx" in result.output
    assert "graphs/\\x1b]0;PWNED\\x07\\x1b[2Jnote" in result.output and "\x1b" not in result.output
    # each check prints its own figure beside its own bar
    assert "[ok] fixed-step predictions: 1 identical (bar >= 1," in result.output


@pytest.mark.parametrize("count", [128, pytest.param(1000, marks=pytest.mark.slow)])
def test_one_solver_shared_by_four_threads_gives_the_sequential_answers(good, count):
    """Finding 4: concurrent solves on one Solver equal sequential ones (1,000 puzzles per thread under -m slow)."""
    puzzles = get_task("sudoku").split("heldout", size=count).inputs
    solver = Solver(good[0], batch_size=64)
    want = solver.solve(puzzles, mode="adaptive")
    got: dict[int, object] = {}
    failures: list[BaseException] = []

    def work(k: int) -> None:
        try:
            got[k] = solver.solve(puzzles, mode="adaptive")
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not failures and len(got) == 4
    for result in got.values():
        assert np.array_equal(result.predictions, want.predictions)
        assert np.array_equal(result.steps_used, want.steps_used)


def _checkpoint_with(tmp_path: Path, value: float) -> Path:
    path = write_official_checkpoint(tmp_path / "ck", SUDOKU_SHAPED)
    state = torch.load(path, weights_only=True)
    state[COMPILED_PREFIX + "lm_head.weight"][0, 0] = value
    torch.save(state, path)
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load(tmp_path, value):
    """Finding 5: NaN / inf weights never reach an export."""
    path = _checkpoint_with(tmp_path, value)
    result = CliRunner().invoke(cli, [str(path), "--target", "cpu", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "NaN or infinite" in result.output and "lm_head.weight" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind, words", [
    ("complex64", "complex64"), ("bool", "bool"), ("int8", "int8"), ("sparse", "float32, sparse_coo"),
    ("meta", "float32, meta"),
])
def test_weights_that_are_not_dense_floats_are_refused_at_load(tmp_path, kind, words):
    """A complex, bool or integer weight would be cast to float32 and exported as if it were one; sparse and meta
    tensors cannot be read as weights: each is refused in one line naming the tensor, before anything is written."""
    path = write_official_checkpoint(tmp_path / "ck", SUDOKU_SHAPED)
    state = torch.load(path, weights_only=True)
    name = COMPILED_PREFIX + "lm_head.weight"
    weight = state[name]
    state[name] = {"complex64": lambda: weight.to(torch.complex64), "bool": lambda: weight > 0,
                   "int8": lambda: weight.to(torch.int8), "sparse": weight.to_sparse,
                   "meta": lambda: torch.empty_like(weight, device="meta")}[kind]()
    torch.save(state, path)
    for args in ([str(path), "--target", "cpu", "-o", str(tmp_path / "out")], ["inspect", str(path)]):
        result = CliRunner().invoke(cli, args)
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert result.exit_code == 1 and len(errors) == 1, result.output
        assert "not dense floating-point weights" in errors[0] and f"lm_head.weight ({words}" in errors[0], errors
    assert not (tmp_path / "out").exists()


def _checkpoint_folder(kind: str, root: Path) -> Path:
    """A checkpoint folder (or path) as a hostile or careless source hands it over."""
    if kind.startswith("fifo"):
        root.mkdir()
        os.mkfifo(root / "step_1")  # reading it blocks until a writer comes, which never does
        return root if kind == "fifo-in-folder" else root / "step_1"
    write_official_checkpoint(root, SUDOKU_SHAPED)
    config = root / "all_config.yaml"
    text = config.read_text()
    if kind == "yaml-alias-bomb":  # 9**9 leaves if walked: the billion laughs
        levels = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
        text = levels + text.replace("num_heads:", "num_heads: *i\n  was_num_heads:")
    else:
        text = text.replace("H_cycles: 2", "H_cycles: 1000000000")
    config.write_text(text)
    return root


@pytest.mark.parametrize("kind, words", [
    ("fifo-in-folder", "holds no checkpoint"), ("fifo-given", "not a regular file"),
    ("yaml-alias-bomb", "arch.num_heads must be an int, got list"), ("h-cycles", "H_cycles must be at most 256"),
])
def test_a_checkpoint_that_would_hang_or_blow_up_is_refused_at_once(tmp_path, kind, words):
    path = _checkpoint_folder(kind, tmp_path / "ck")
    if kind.startswith("fifo"):  # in a process of its own: a hang must fail the test, not stop the suite
        out = subprocess.run([sys.executable, "-m", "trm_export.cli", "inspect", str(path)], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 1 and words in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
        return
    for args in (["inspect", str(path)], [str(path), "--target", "cpu", "-o", str(tmp_path / "out")]):
        result = CliRunner().invoke(cli, args)
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert result.exit_code == 1 and len(errors) == 1 and words in errors[0], result.output
    assert not (tmp_path / "out").exists()


def test_non_finite_graph_outputs_fail_parity(tmp_path, monkeypatch):
    """Finding 5: a graph that computes NaN fails the export's parity check (NaN compares false with every bar)."""
    import copy

    from trm_export.export import pipeline
    from trm_export.export.pipeline import ExportOptions, ParityError, Puzzles, export_bundle

    original = pipeline.export_step_graph

    def broken(model, opset, **form):
        model = copy.deepcopy(model)
        with torch.no_grad():
            next(p for name, p in model.named_parameters() if "lm_head" in name)[0, 0] = float("nan")
        return original(model, opset, **form)

    monkeypatch.setattr(pipeline, "export_step_graph", broken)
    write_official_checkpoint(tmp_path / "ck", SUDOKU_SHAPED)
    p = get_task("sudoku").split("calibration", size=8)
    with pytest.raises((ParityError, BundleError), match="NaN"):
        export_bundle(tmp_path / "ck", tmp_path / "out", ExportOptions(progress=False, batch_size=8),
                      puzzles=Puzzles(p.inputs, p.puzzle_ids, p.labels, "calibration", "sudoku"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("protocol", [0, 1, 2, 4])
def test_pickle_payload_in_a_checkpoint_never_runs(tmp_path, protocol):
    """A checkpoint that would run code: refused, the code not run, torch's weights_only=False advice not passed on
    (finding 8: protocols 0 and 1 used to reach the user with torch's own message)."""
    import pickle

    marker = tmp_path / "RAN"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"w": Payload()}, protocol=protocol))
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 1 and "refused" in result.output and len(result.output.strip().splitlines()) == 1
    assert "False" not in result.output and not marker.exists()


# ---------------------------------------------------------------- finding 7: a kill at any instant of the commit

_KILL_SCRIPT = """
import dataclasses, os, shutil, sys
import trm_export.export.staging as staging
from trm_export.runtime.manifest import read_manifest
kill_at, exchange = int(sys.argv[1]), sys.argv[2] == "exchange"
events = []
def hook(name, fn):
    def wrapped(*args, **kwargs):
        events.append(name)
        if len(events) == kill_at:
            os._exit(9)
        return fn(*args, **kwargs)
    return wrapped
staging._exchange = hook("exchange", staging._exchange) if exchange else (lambda a, b: False)
staging.os.replace = hook("replace", os.replace)
staging.shutil.rmtree = hook("rmtree", staging.shutil.rmtree)
source = read_manifest({src!r})
with staging.StagedBundle({out!r}, force=True) as stage:  # what export and quantize do, minus the long work
    for rel in source.files:
        (stage.path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.join({src!r}, rel), stage.path / rel)
    stage.commit(dataclasses.replace(source, provenance={{**source.provenance, "created_at": "new"}}))
print("events", events)
"""


@pytest.mark.parametrize("mode", ["exchange", "two-renames"])
def test_a_kill_at_any_step_of_the_commit_keeps_a_bundle(good, tmp_path, mode):
    """Finding 7: whatever instant a kill lands, the output holds the old or the new bundle once the next run (or
    at once, with the atomic exchange) has tidied up; nothing is left beside it."""
    from trm_export.export.staging import recover

    out = tmp_path / "out.bundle"
    script = _KILL_SCRIPT.format(src=str(good[0]), out=str(out))
    shutil.copytree(good[0], out)
    old = read_manifest(out).provenance["created_at"]
    done = subprocess.run([sys.executable, "-c", script, "0", mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    events = done.stdout.strip().splitlines()[-1].removeprefix("events ")
    assert read_manifest(out).provenance["created_at"] == "new"
    assert ("exchange" in events) == (mode == "exchange") and ("replace" in events) == (mode != "exchange")
    seen = set()
    for kill_at in range(1, events.count("'") // 2 + 1):
        shutil.rmtree(out)
        shutil.copytree(good[0], out)
        killed = subprocess.run([sys.executable, "-c", script, str(kill_at), mode], capture_output=True, text=True,
                                timeout=120)
        assert killed.returncode == 9, killed.stderr
        if mode == "exchange":
            assert (out / MANIFEST_NAME).is_file()  # atomic: a bundle is there even before any tidying
        recover(out)
        assert (out / MANIFEST_NAME).is_file(), f"no bundle after a kill at event {kill_at} of {events}"
        seen.add(read_manifest(out).provenance["created_at"])  # complete and consistent, old or new
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.bundle.")]
    assert seen == {old, "new"}  # the kills fell both before and after the switch


# ---------------------------------------------------------------- finding 8: the smaller ones


def test_solutions_file_has_ordinary_permissions(good, tmp_path):
    out = tmp_path / "s.txt"
    old = os.umask(0o022)
    try:
        result = CliRunner().invoke(cli, ["run", str(good[0]), "--input", str(good[1]), "-o", str(out)])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o777 == 0o644


def test_a_utf8_bom_is_accepted(good, tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + good[1].read_bytes())
    plain = CliRunner().invoke(cli, ["run", str(good[0]), "--input", str(good[1])])
    bom = CliRunner().invoke(cli, ["run", str(good[0]), "--input", str(path)])
    assert bom.exit_code == 0, bom.output
    assert bom.output == plain.output


def test_fixed_mode_has_an_upper_step_limit(good):
    from trm_export.errors import InputError
    from trm_export.runtime.solver import MAX_STEPS

    solver = Solver(good[0], batch_size=2)
    puzzle = get_task("sudoku").split("heldout", size=1).inputs
    with pytest.raises(InputError, match=str(MAX_STEPS)):
        solver.solve(puzzle, mode="fixed", max_steps=MAX_STEPS + 1)
    with pytest.raises(InputError, match="min_steps"):
        solver.solve(puzzle, max_steps=0)  # 0 is refused, not taken as "the default"


def test_runtime_imports_without_click_for_the_api(good):
    """The API runs without click (a device app need not install the CLI's dependency) and its errors are
    TrmExportError subclasses (BundleError / InputError), never numpy's or ONNX Runtime's: each bad call is refused."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["click"] = None  # import click now fails
        import numpy as np
        from trm_export.errors import TrmExportError
        from trm_export.runtime import Solver
        s = Solver({str(good[0])!r})
        refused = []
        for bad in (np.zeros((2, 81), np.float32), np.full((1, 81), 99), "puzzle", np.zeros((0, 81), int)):
            try:
                s.solve(bad)
            except TrmExportError:
                refused.append(1)
        for kw in ({{"batch_size": 10**9}}, {{"batch_size": 2.5}}, {{"variant": "nope"}}):
            try:
                Solver({str(good[0])!r}, **kw)
            except TrmExportError:
                refused.append(1)
        print(len(refused), "click" in sys.modules and sys.modules["click"] is not None)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "7 False", (out.stdout, out.stderr)


def test_nothing_is_written_outside_the_output(good, tmp_path):
    """ONNX Runtime's telemetry (a device id and an event queue under $HOME/.cache and $TMPDIR) stays off: a
    `verify` and a `run` with a fresh home and temporary folder leave both empty, the solutions file aside."""
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), TMPDIR=str(tmp))
    solutions = tmp_path / "s.txt"
    for args in (["verify", str(good[0])], ["run", str(good[0]), "--input", str(good[1]), "-o", str(solutions)]):
        out = subprocess.run([sys.executable, "-m", "trm_export.cli", *args], capture_output=True, text=True,
                             env=env, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
    assert solutions.is_file()
    assert [p for p in home.rglob("*")] == [] and [p for p in tmp.rglob("*")] == []


def test_dataclass_manifest_round_trips_with_its_digest(good):
    m = read_manifest(good[0])
    again = json.loads(m.to_json())
    assert again["digest"] == json.loads((good[0] / MANIFEST_NAME).read_text())["digest"]
    assert dataclasses.asdict(m)["graphs"]["fp32"]["file"] == "graphs/step_fp32.onnx"


def test_digest_holds_for_what_json_changes(good, tmp_path):
    """Int keys become strings (and sort differently: 10 before 2) and tuples lists: the digest is of the JSON form."""
    b = tmp_path / "b"
    shutil.copytree(good[0], b)
    m = read_manifest(b)
    details = {"per_step": {2: 1, 10: 3, 1: 5}, "shape": (1, 2)}
    graphs = {**m.graphs, "fp32": dataclasses.replace(m.graphs["fp32"], details=details)}
    (b / MANIFEST_NAME).write_text(dataclasses.replace(m, graphs=graphs).to_json())
    assert read_manifest(b).graphs["fp32"].details == {"per_step": {"1": 5, "10": 3, "2": 1}, "shape": [1, 2]}


@pytest.mark.parametrize("edit", ["script", "recipe", "script-on-a-cpu-bundle"])
def test_a_build_script_that_is_not_the_manifests_is_refused(tmp_path, edit):
    """build/build_engines.sh is what a device owner runs: replaced (or a recipe edited) and resealed, `verify`,
    `check` and `build` refuse the bundle in one line, and nothing in it runs."""
    from test_export import export

    b, _ = export(tmp_path, target="cpu" if edit == "script-on-a-cpu-bundle" else "jetson-orin-nano")
    data = _manifest(b)
    if edit == "recipe":
        recipe = next(iter(data["build"]["recipes"].values()))
        recipe["trtexec"] += " ; touch PWNED"
    else:
        (b / "build").mkdir(exist_ok=True)
        (b / "build" / "build_engines.sh").write_text("#!/bin/sh\ntouch PWNED\n")
        data["files"]["build/build_engines.sh"] = ""
    _write(b, data)
    words = {"script": "not the script", "recipe": "recipes", "script-on-a-cpu-bundle": "no build script"}[edit]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for args in (["verify", str(b)], ["check", str(b)], ["build", str(b), "--print-recipe"]):
            result = CliRunner().invoke(cli, args)
            errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
            assert result.exit_code == 1 and len(errors) == 1 and words in errors[0], (args, result.output)
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "PWNED").exists()


def test_a_signed_bundle_verifies_against_its_author_and_a_resealed_one_does_not(good, tmp_path):
    """The digest detects edits, not a forger who reseals; a signature from the author's key does."""
    b = Path(shutil.copytree(good[0], tmp_path / "b"))
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(cli, [str(a) for a in args])
        assert "Traceback" not in result.output and isinstance(result.exception, (SystemExit, type(None)))
        return result.exit_code, result.output

    for who in ("author", "stranger"):
        assert run("keygen", tmp_path / who)[0] == 0
    assert (tmp_path / "author").stat().st_mode & 0o777 == 0o600
    assert "never overwritten" in run("keygen", tmp_path / "author")[1]
    assert "not signed" in run("verify", b, "--trust", tmp_path / "author.pub")[1]
    assert run("sign", b, "--key", tmp_path / "author")[0] == 0
    code, out = run("verify", b, "--trust", tmp_path / "author.pub")
    assert code == 0 and "signed by the trusted key" in out and "PASSED" in out, out
    code, out = run("verify", b)  # the signature is no unlisted stranger to a plain verify
    assert code == 0 and "not listed" not in out, out
    code, out = run("verify", b, "--trust", tmp_path / "stranger.pub")
    assert code == 1 and "signed with another key" in out, out
    # A stranger loosens a bar and reseals: the digest check passes, the author's signature does not.
    data = _manifest(b)
    data["golden"]["tolerances"]["fp32"]["q_abs"] = 1e30
    _write(b, data)
    assert run("verify", b)[0] == 0
    code, out = run("verify", b, "--trust", tmp_path / "author.pub")
    assert code == 1 and "changed and resealed after it was signed" in out, out
    assert run("sign", b, "--key", tmp_path / "stranger")[0] == 0  # and signs it with his own key
    code, out = run("verify", b, "--trust", tmp_path / "author.pub")
    assert code == 1 and "signed with another key" in out, out
    (b / "signature.json").write_text("{not json")
    code, out = run("verify", b, "--trust", tmp_path / "author.pub")
    assert code == 1 and "not a signature record" in out, out
    code, out = run("verify", b, "--trust", tmp_path / "author")  # a private key where the public one belongs
    assert code == 1 and "not an unencrypted PEM public key" in out, out


def test_a_checkpoint_that_inflates_far_beyond_its_size_is_refused_unread(tmp_path):
    """A small zip holding 512 MiB of zeros (a decompression bomb) is refused from its directory, before loading."""
    import resource
    import zipfile

    path = write_official_checkpoint(tmp_path / "ck", SUDOKU_SHAPED)
    with zipfile.ZipFile(path) as good:
        entries = [(info.filename, good.read(info)) for info in good.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as bomb:
        for name, data in entries:
            bomb.writestr(name, data)
        with bomb.open(entries[-1][0].rsplit("/", 1)[0] + "/data/zeros", "w", force_zip64=True) as f:
            block = bytes(1 << 24)
            for _ in range(32):  # 512 MiB
                f.write(block)
    assert path.stat().st_size < 8 << 20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 1 and "decompression bomb" in result.output, result.output
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 256 << 10  # KiB: nothing inflated


def test_a_killed_quantize_leaves_nothing_in_tmpdir_and_the_next_run_tidies_up(good, tmp_path):
    """SIGKILL in the middle of calibration: TMPDIR stays empty (every temporary file of the run lives in
    `.OUT.work-PID` beside the output), and the next run to the same output removes what was left (recover)."""
    tmp, out = tmp_path / "tmp", tmp_path / "q.bundle"
    tmp.mkdir()
    script = textwrap.dedent(f"""
        import os, signal, sys
        import trm_export.calibration.variants as variants
        real = variants.calibrate
        def calibrate(*args, **kwargs):
            real(*args, **kwargs)  # its temporary files written, then the kill lands
            os.kill(os.getpid(), signal.SIGKILL)
        variants.calibrate = calibrate
        from trm_export.cli import main
        sys.argv = ["trm-export", *{[a.format(b=good[0], o=out) for a in QUANTIZE]!r}]
        main()
    """)
    env = {**os.environ, "TMPDIR": str(tmp)}
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert list(tmp.iterdir()) == []
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".q.bundle."))
    assert any(name.startswith(".q.bundle.work-") for name in left), left
    from trm_export.export.staging import recover

    recover(out)  # what the next export or quantize to the same output does first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".q.bundle.")] == []
