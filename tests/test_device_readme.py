"""The README.md inside a bundle (targets/device_readme.py): the target's facts, each variant's measured accuracy,
the install / build / run steps per kind of target, hostile manifest strings, and the Python snippet users copy.

A jetson manifest is the session's fp32 CPU bundle's manifest with the target, variants, choice and parity an INT8
export writes (no second export); the snippet runs against the real fp32 bundle.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trm_export.runtime.manifest import Manifest, read_manifest
from trm_export.targets.device_readme import RUNTIME_MIN_PYTHON, md_code, md_text, render_bundle_readme
from trm_export.targets.registry import TARGETS, get_target

REPO = Path(__file__).resolve().parents[1]
JETSONS = [t.name for t in TARGETS if t.is_jetson and not t.decided_on_device]


@pytest.fixture(scope="module")
def fp32_manifest(sudoku_bundle) -> Manifest:
    return read_manifest(sudoku_bundle / "bundle")


def _entry(acc: float, drop: float, puzzles: int = 1000) -> dict:
    """A variant's parity record as calibration/variants.py writes it (VariantComparison.to_dict, trimmed)."""
    return {"puzzles": puzzles, "steps": 16, "source": "heldout", "exact_accuracy": acc, "fp32_exact_accuracy": 0.874,
            "predictions_identical": 0.97, "accuracy_drop_points": drop, "self_check": True}


def int8_manifest(manifest: Manifest, target: str = "jetson-agx-orin", **choice_changes) -> Manifest:
    """What `trm-export --target jetson` writes: int8 variants beside fp32 and fp16, int8-entropy chosen."""
    fp32 = manifest.graphs["fp32"]
    graphs = {"fp32": fp32, **{name: dataclasses.replace(fp32, file=f"graphs/step_{name}.onnx", precision=precision)
                               for name, precision in (("int8-entropy", "int8"), ("int8-minmax", "int8"),
                                                       ("int8-mixed", "mixed"), ("fp16", "fp16"))}}
    parity = {**manifest.parity, "int8-entropy": _entry(0.871, 0.3), "int8-minmax": _entry(0.843, 3.1),
              "int8-mixed": _entry(0.873, 0.1), "fp16": _entry(0.874, 0.0)}
    choice = {"asked": "int8", "chosen": "int8-entropy", "budget_points": 0.5,
              "accuracy_drop_points": {"fp32": 0.0, "int8-entropy": 0.3, "int8-minmax": 3.1, "int8-mixed": 0.1,
                                       "fp16": 0.0},
              "missed_budget": {"int8-minmax": 3.1}, "puzzles": 1000, "source": "heldout",
              "ms_per_step_here": {"fp32": 41.2, "int8-entropy": 48.9, "int8-minmax": 48.1, "int8-mixed": 52.0,
                                   "fp16": 60.3}, **choice_changes}
    return dataclasses.replace(manifest, target=target, graphs=graphs, parity=parity, choice=choice,
                               default_variant=choice["chosen"])


def section(text: str, title: str) -> str:
    """The body of the `## title` section ('' when there is none)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    return match.group(1) if match else ""


def table_row(text: str, variant: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| `{variant}` |"))
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(info, body) of every fenced block; asserts each closes with its own fence and nothing closes one early."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^(`{3,})(.*)$", lines[i])
        if opening:
            fence, body = opening.group(1), []
            i += 1
            while lines[i] != fence:
                assert i + 1 < len(lines), f"a {fence} block never closes"
                assert not lines[i].startswith(fence), f"a line inside a block closes it early: {lines[i]!r}"
                body.append(lines[i])
                i += 1
            blocks.append((opening.group(2), "\n".join(body)))
        i += 1
    return blocks


def inline_code_spans(line: str) -> list[str]:
    """The contents of a line's inline code spans, asserting that every backtick run opens a span that closes
    (CommonMark: a backslash escapes a backtick outside code; a span closes at the next run of its own length)."""
    spans, i = [], 0
    while i < len(line):
        if line[i] == "\\":
            i += 2
        elif line[i] == "`":
            run = re.match(r"`+", line[i:]).group(0)
            start = i + len(run)
            close = next((m for m in re.finditer(r"`+", line[start:]) if len(m.group(0)) == len(run)), None)
            assert close is not None, f"a code span never closes: {line!r}"
            spans.append(line[start:start + close.start()])
            i = start + close.end()
        else:
            i += 1
    return spans


def check_markdown(text: str) -> list[str]:
    """Structure a hostile string must not break: printable lines, fenced blocks closed by their own fence, every
    inline code span closed. Returns the inline code spans' contents."""
    assert all(ch.isprintable() for line in text.splitlines() for ch in line)
    fenced_blocks(text)
    outside = re.sub(r"^(`{3,})[^\n]*\n.*?^\1$", "", text, flags=re.M | re.S)
    return [span for line in outside.splitlines() for span in inline_code_spans(line)]


def code_span(text: str) -> str:
    """The content of the inline code span `text` is (CommonMark: the closing run has the opening's length)."""
    fence = re.match(r"`+", text).group(0)
    rest = text[len(fence):]
    close = next(m for m in re.finditer(r"`+", rest) if len(m.group(0)) == len(fence))
    assert close.end() == len(rest), f"{text!r} is not one code span"
    content = rest[:close.start()]
    return content[1:-1] if content.startswith(" ") and content.endswith(" ") and content.strip() else content


def test_runtime_python_matches_pyproject():
    spec = re.search(r'^requires-python = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert spec == ">=" + ".".join(map(str, RUNTIME_MIN_PYTHON))


@pytest.mark.parametrize("name", JETSONS)
def test_jetson_readme_states_the_targets_facts(fp32_manifest, name):
    target = get_target(name)
    text = render_bundle_readme(int8_manifest(fp32_manifest, name), "sudoku-jetson.bundle")
    facts = section(text, "What this bundle is")
    assert f"| JetPack | {target.jetpack} (its Python {target.python}," in facts
    assert f"| GPU compute capability (SM) | {target.sm[0]} |" in facts
    assert f"| DLA cores | {target.dla_cores} |" in facts
    assert f"| target's default precision | {target.default_precision} |" in facts
    trt = target.tensorrt[0] if target.tensorrt[0] == target.tensorrt[1] else f"{target.tensorrt[0]} or a later"
    assert f"| TensorRT | {trt}" in facts
    build = section(text, "Build the TensorRT engines on the device")
    assert f"(TensorRT {trt}" in build and f"SM {target.sm[0]})" in build
    assert "only valid for the TensorRT version and the GPU it was built with" in build
    assert "sh build/build_engines.sh" in build
    install = section(text, "Install the runtime on the device")
    assert f"JetPack {target.jetpack} ships Python {target.python} with TensorRT {trt}" in install
    assert "python3 -m venv --system-site-packages ~/trm-venv" in install  # the runtime beside JetPack's TensorRT
    assert re.search(r"^pip install runtime/trm_export-[0-9.]+-py3-none-any\.whl ", install, re.M)  # the bundle's
    assert "cuda-python==" in install and "/usr/local/cuda/bin/nvcc" in install
    assert "on aarch64 is CPU-only" in install and "`onnxruntime-gpu`" in install and "never both" in install
    # measured on pinned clocks, built with room: power mode, clocks, swap, and cuda-python without nvcc
    assert "sudo nvpmodel -q" in install and "sudo jetson_clocks" in install and "sudo swapon /swapfile" in install
    assert "/usr/local/cuda/version.json" in install
    assert "trm-export build ." in build and "records each engine in manifest.json" in build


def test_an_any_jetson_readme_covers_every_module_and_jetpack(fp32_manifest):
    """`--target jetson`: one page for every module; what differs is decided on the device, and the page says how."""
    from trm_export.targets.jetson_device import L4T_RELEASES

    target = get_target("jetson")
    text = render_bundle_readme(int8_manifest(fp32_manifest, "jetson"), "b")
    check_markdown(text)
    facts = section(text, "What this bundle is")
    for module in target.modules:
        m = get_target(module)
        assert f"{m.description.split(' (')[0]} {m.dla_cores}" in facts and f"{m.workspace_mb} MB" in facts
    install = section(text, "Install the runtime on the device")
    for (_, _), jetpack, tensorrt in L4T_RELEASES:  # each JetPack the device may report, with its TensorRT
        assert re.search(rf"^\| {re.escape(jetpack)} \| 3\.\d+ \| "
                         rf"{re.escape(tensorrt.rsplit('.', 1)[0])} \| `linux_aarch64-cp3\d+` \|$", install, re.M)
    assert "pypi.jetson-ai-lab.io/jp6/cu126" in install and "elinux.org/Jetson_Zoo" in install
    build = section(text, "Build the TensorRT engines on the device")
    assert "`/proc/device-tree/model`" in build and "--module jetson-orin-nx" in build
    assert "(TensorRT 8.5 to" not in build and "This module has" not in build  # no single module's facts


def test_a_jetpack_python_below_the_runtimes_floor_is_said_plainly(fp32_manifest, monkeypatch):
    """JetPack 5.1's Python 3.8 meets today's floor; were the floor 3.10, the page must say so, not fail on-device."""
    from trm_export.targets import device_readme

    monkeypatch.setattr(device_readme, "RUNTIME_MIN_PYTHON", (3, 10))
    text = render_bundle_readme(int8_manifest(fp32_manifest, "jetson-xavier-nx"), "b")
    install = section(text, "Install the runtime on the device")
    assert "JetPack 5.1 ships Python 3.8; the `trm-export` runtime needs Python 3.10 or newer" in install
    assert "--system-site-packages" not in install and "python3.10 -m venv ~/trm-venv" in install
    build = section(text, "Build the TensorRT engines on the device")
    assert "trm-export build ." not in build and "sh build/build_engines.sh" in build


def test_jetson_readme_variants_and_accuracy(fp32_manifest):
    text = render_bundle_readme(int8_manifest(fp32_manifest), "sudoku-jetson.bundle")
    check_markdown(text)
    assert re.findall(r"^## (.*)$", text, re.M) == PAGE_SECTIONS
    variants = section(text, "Variants and their measured accuracy")
    assert variants.lstrip().startswith("`int8-entropy` runs by default: the export asked for int8 (the target's "
                                        "precision), and the most accurate int8 variant within 0.5 points")
    assert "`int8-entropy` loses 0.30 points" in variants
    assert "Missed the budget (never chosen): `int8-minmax` (-3.10 points)" in variants
    host = fp32_manifest.provenance["host"]
    assert f"measured on the export machine (`{host}`) with ONNX Runtime on the CPU, not on this device" in variants
    expected = {"int8-entropy": ("int8", "87.1%", "-0.30 points", "default"),
                "fp32": ("fp32", "87.4%", "baseline", ""),  # fp32 on the variants' own puzzles: comparable
                "fp16": ("fp16", "87.4%", "+0.00 points", ""),
                "int8-minmax": ("int8", "84.3%", "-3.10 points", "missed the budget"),
                "int8-mixed": ("mixed", "87.3%", "-0.10 points", "")}
    for variant, (precision, accuracy, change, note) in expected.items():
        row = table_row(variants, variant)
        assert row[1:4] == [precision, accuracy, change] and row[6] == note, row
        assert row[4] == "1000 `heldout`, 16 fixed steps"
    rows = [line for line in variants.splitlines() if line.startswith("| `")]
    assert rows[0].startswith("| `int8-entropy` |") and rows[1].startswith("| `fp32` |")  # default, then baseline
    assert "Parity of the fp32 graph with the PyTorch reference at export: 16 puzzles of `calibration`" in variants
    assert "Re-measure on this device with `trm-export report .` once the engines are built" in variants
    assert "trm-export build . --variant int8-entropy" in text


def test_fallback_and_best_are_explained(fp32_manifest):
    fallback = ("no int8 variant is within 0.5 points of fp32 (int8-minmax -3.10): fp16 chosen instead")
    text = render_bundle_readme(int8_manifest(fp32_manifest, chosen="fp16", fallback=fallback), "b")
    assert "`fp16` runs by default" in text and f"Fallback: {md_text(fallback)}." in text
    best = render_bundle_readme(int8_manifest(fp32_manifest, asked="best"), "b")
    assert "asked for `best`, the fastest variant within 0.5 points" in best and "timed on the export machine" in best


def test_cpu_readme_has_no_tensorrt_steps(fp32_manifest):
    text = render_bundle_readme(fp32_manifest, "sudoku-cpu.bundle")
    min_python = ".".join(map(str, RUNTIME_MIN_PYTHON))
    check_markdown(text)
    assert fp32_manifest.target == "cpu"
    assert re.findall(r"^## (.*)$", text, re.M) == [title for title in PAGE_SECTIONS if title != BUILD]
    assert "## Build the TensorRT engines" not in text and "build_engines.sh" not in text
    assert "--system-site-packages" not in text and "cuda-python" not in text and "JetPack" not in text
    assert "| TensorRT | none: ONNX Runtime on the CPU |" in text
    install = section(text, "Install the runtime on the device")
    assert re.search(r"^pip install runtime/trm_export-[0-9.]+-py3-none-any\.whl$", install, re.M)
    assert "This bundle carries the runtime" in install and f"Python {min_python} or newer" in install
    legacy = dataclasses.replace(fp32_manifest, build={})  # a bundle from before the runtime travelled with it
    assert "pip install trm-export" in section(render_bundle_readme(legacy, "b"), "Install the runtime on the device")
    parity = fp32_manifest.parity["fp32"]
    row = table_row(text, "fp32")
    assert row[2] == f"{100 * parity['bundle_exact_accuracy']:.1f}%" and row[3] == "baseline"
    assert row[4] == f"{parity['puzzles']} `calibration`, {parity['steps']} fixed steps" and row[6] == "default"
    assert "`fp32` runs by default: the precision this bundle was exported at" in text
    for command in ("trm-export verify .", "trm-export run . --input samples/puzzles.txt",
                    "trm-export report . --quick"):
        assert command in text
    assert "81 characters row by row, `0` or `.` for a blank" in text


def test_desktop_gpu_readme(fp32_manifest):
    text = render_bundle_readme(int8_manifest(fp32_manifest, "gpu-trt10"), "b")
    install = section(text, "Install the runtime on the device")
    assert re.search(r'^pip install runtime/trm_export-[0-9.]+-py3-none-any\.whl "tensorrt>=10.0,<11"', install, re.M)
    assert "--system-site-packages" not in install
    assert "trm-export build ." in section(text, "Build the TensorRT engines on the device")
    assert "strongly typed" in render_bundle_readme(int8_manifest(fp32_manifest, "gpu-trt11"), "b")


def test_other_tasks_and_unknown_targets(fp32_manifest):
    maze = dataclasses.replace(fp32_manifest, task=dataclasses.replace(fp32_manifest.task, name="maze",
                                                                       grid_side=11, seq_len=121, vocab_size=6))
    text = render_bundle_readme(maze, "maze.bundle")
    assert "maze (11x11)" in text and "square grids of 11 rows of 11 characters" in text
    custom = dataclasses.replace(fp32_manifest, task=dataclasses.replace(fp32_manifest.task, name=None))
    text = render_bundle_readme(custom, "custom.bundle")
    assert "a `.npy` of integer tokens, shape [N, 81]" in text and "--input puzzles.npy" in text
    assert "trm-export report" not in section(text, "Check it, then solve puzzles")
    text = render_bundle_readme(dataclasses.replace(fp32_manifest, target="jetson-thor-2030"), "b")
    assert "`jetson-thor-2030`, which this version of `trm-export` does not know" in text


BUILD = "Build the TensorRT engines on the device"
PAGE_SECTIONS = ["What this bundle is", "Variants and their measured accuracy", "Install the runtime on the device",
                 BUILD, "Check it, then solve puzzles", "Use it from Python", "What is in this folder"]
HOSTILE = ["in`t8|x\ny", "``", "a | b ` c", "|", "x\x1b[31mred\u202e", "# heading\n## two", "*[link](http://x)*"]


@pytest.mark.parametrize("value", HOSTILE)
def test_escaping_helpers(value):
    flat = re.sub(r"[\x00-\x1f\x7f\u202e]", " ", value)
    assert code_span(md_code(value)) == flat
    assert code_span(md_code(value, table=True)) == flat.replace("|", "\\|")  # GFM turns \| back into | in tables
    for out in (md_code(value), md_text(value)):
        assert "\n" not in out and all(ch.isprintable() for ch in out)
    assert not re.search(r"(?<!\\)[|`*\[\]<>#]", md_text(value)), md_text(value)


def test_hostile_manifest_strings_stay_text(fp32_manifest):
    base = int8_manifest(fp32_manifest)
    bad_variant, bad_target = "in`t8|x\ny", "jet``son|\n# x"
    graphs = {**base.graphs, bad_variant: base.graphs["int8-minmax"]}
    parity = {**base.parity, bad_variant: {**_entry(0.5, 37.4), "source": "held|out`\n| x |"}}
    manifest = dataclasses.replace(
        base, graphs=graphs, parity=parity, target=bad_target, default_variant=bad_variant,
        choice={**base.choice, "chosen": bad_variant, "fallback": "`x | y`\n## z \x1b[2J",
                "ms_per_step_here": {bad_variant: "fast"}},
        provenance={**base.provenance, "toolchain": "evil\x1b]0;title\x07", "checkpoint": "``a|b``",
                    "host": "x\n|"})
    name = "my`bundle\n# head|"
    text = render_bundle_readme(manifest, name)
    spans = check_markdown(text)
    assert "in`t8|x y" in spans and "in`t8\\|x y" in spans  # whole, as text and as a table cell
    assert "jet``son| # x" in spans and " ``a|b`` " in spans and "scp -r 'my`bundle # head|' user@device:" in spans
    assert "Fallback: \\`x \\| y\\` \\#\\# z  \\[2J." in text  # text, not code, heading or escape sequence
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings == [text.splitlines()[0]] + [f"## {title}" for title in PAGE_SECTIONS if title != BUILD]
    assert text.startswith("# my\\`bundle \\# head\\|: TRM")  # the name is text, not a second heading
    header = next(line for line in text.splitlines() if line.startswith("| variant |"))
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == 6
    for line in rows:
        assert len(re.split(r"(?<!\\)\|", line)) == len(header.split("|")), line
    row = [cell.strip() for cell in re.split(r"(?<!\\)\|", rows[0])[1:-1]]  # the default (hostile) variant first
    assert code_span(row[0]) == "in`t8\\|x y" and row[5] == "-" and row[6] == "default"
    assert code_span(md_code(bad_variant)) == "in`t8|x y"
    for info, body in fenced_blocks(text):  # shell words quoted, python literals escaped, fences never closed early
        if info == "python":
            compile(body, "snippet", "exec")
    assert f"Solver({name!r})" in text


def test_python_snippet_runs_against_the_bundle(fp32_manifest, sudoku_bundle, tmp_path):
    """The block users copy: extracted from the README, pointed at the bundle, run in a fresh interpreter without
    torch (a runtime-only install has none)."""
    bundle = sudoku_bundle / "bundle"
    text = render_bundle_readme(fp32_manifest, "sudoku-cpu.bundle")
    [code] = [body for info, body in fenced_blocks(text) if info == "python"]
    assert "'sudoku-cpu.bundle'" in code
    code = code.replace("'sudoku-cpu.bundle'", repr(str(bundle)))
    (tmp_path / "puzzles.txt").write_text((REPO / "examples" / "sudoku.txt").read_text())
    guard = "import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None\n"
    out = subprocess.run([sys.executable, "-c", guard + code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    answers = [line for line in out.stdout.splitlines() if line]
    puzzles = [line for line in (tmp_path / "puzzles.txt").read_text().splitlines() if line and line[0] != "#"]
    assert len(answers) == len(puzzles) and all(len(line.split("\t")[0]) == 81 for line in answers)


def test_renderer_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None\n"
            "import trm_export.targets.device_readme")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_the_device_page_gives_the_same_jetson_steps(fp32_manifest):
    """docs/device.md and a Jetson bundle's own README must not drift apart: the same commands."""
    top = (REPO / "docs" / "device.md").read_text()
    [block] = [body for info, body in fenced_blocks(top) if info == "bash"]
    commands = [line.split("  #")[0].rstrip() for line in block.splitlines()]
    page = render_bundle_readme(int8_manifest(fp32_manifest), "sudoku-jetson.bundle")
    for command in commands:
        if not command.startswith("cd "):
            assert command in page, command
    assert "never both" in top and "on aarch64" in top and "trm-export build" in top


def test_the_runtime_entry_of_a_strangers_manifest_reaches_no_command(fp32_manifest):
    """build.runtime goes into commands a user types (pip install, the Dockerfile, the Triton recipes): only a
    checksummed wheel under runtime/ with a plain name, and a platform name, are taken; anything else is as if the
    bundle carried no runtime (never a crash, never a shell word from the manifest)."""
    from trm_export.targets.device_readme import bundled_runtime

    wheel, house = bundled_runtime(fp32_manifest)
    assert wheel is not None and wheel.startswith("runtime/trm_export-") and house is None
    for runtime in ("runtime/x.whl", {"wheel": "runtime/a b;touch PWNED.whl"}, {"wheel": ["runtime/x.whl"]},
                    {"wheel": "../outside.whl"}, {"wheel": "runtime/unlisted.whl"}):
        strange = dataclasses.replace(fp32_manifest, build={"runtime": runtime})
        assert bundled_runtime(strange) == (None, None), runtime
        assert "PWNED" not in render_bundle_readme(strange, "b")
    hostile_house = dataclasses.replace(fp32_manifest, build={"runtime": {"wheel": wheel, "wheelhouse": "x; rm -rf ~"}})
    assert bundled_runtime(hostile_house) == (wheel, None)
    assert "rm -rf" not in render_bundle_readme(hostile_house, "b")
