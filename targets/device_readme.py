"""The README.md inside every bundle: what it is and how to run it, for a device owner without this repository.

Text only. Every fact comes from the bundle's manifest and its target's record (targets/registry.py, whose facts
are NVIDIA's: JetPack, TensorRT, SM, DLA). The manifest is a stranger's file when this runs on a device, so every
string taken from it reaches the page through `md_text` or `md_code` (code in a table: `table=True`), numbers only
through `_num`: a hostile name can neither break a table or a code span nor put control characters into the
owner's terminal. Imports no torch or onnx: the export writes this file, on-device tools may render it again.
"""

from __future__ import annotations

import math
import re
import shlex
import unicodedata
from typing import Any

from trm_export.errors import TrmExportError
from trm_export.runtime.manifest import Manifest
from trm_export.targets.registry import Target, get_target

__all__ = ["RUNTIME_MIN_PYTHON", "md_code", "md_text", "render_bundle_readme"]

RUNTIME_MIN_PYTHON = (3, 8)  # pyproject.toml's requires-python (tests/test_device_readme.py keeps them equal)
_MAX_TEXT = 300  # characters of one manifest string shown; longer ones are cut (a README is not a dump)
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_\[\]<>|~&#!{}])")
_CUDA_RELEASE = r"""$(/usr/local/cuda/bin/nvcc --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"""


# ---- escaping: every manifest-derived string goes through one of these --------------------------------------------


def _line(value: object) -> str:
    """One printable line: control, format (bidi) and separator characters become spaces; cut to _MAX_TEXT."""
    text = str(value)[:_MAX_TEXT + 1]
    text = "".join(" " if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch for ch in text)
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT - 1] + "…"


def md_text(value: object) -> str:
    """`value` as inline Markdown text: one line, every character Markdown could act on backslash-escaped.

    Never used at the start of a line (callers put a fixed label first), so only inline syntax matters. `|` is
    escaped everywhere: a table cell needs it, and in plain text `\\|` renders as `|` all the same."""
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", _line(value))


def md_code(value: object, table: bool = False) -> str:
    """`value` as one inline code span that no content can close early (the fence outgrows any backtick run).

    In a table cell `|` must be written `\\|` even inside code (GitHub's table rule), which the table renders as `|`;
    outside a table the backslash would show, so it is added only with `table=True`."""
    text = _line(value)
    if table:
        text = text.replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") or not text.strip() else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _block(code: str, language: str = "") -> str:
    """A fenced code block whose fence is longer than any backtick run inside it."""
    longest = max((len(run) for run in re.findall(r"`+", code)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{code.rstrip()}\n{fence}"


def _commands(lines: list[tuple[str, str]], language: str = "sh") -> str:
    """A code block of shell commands, their `# comments` aligned (a long command keeps its comment close)."""
    width = min(max((len(cmd) for cmd, note in lines if note), default=0), 60)
    return _block("\n".join(f"{cmd.ljust(width)}  # {note}" if note else cmd for cmd, note in lines), language)


def _shell_word(value: str) -> str:
    """A shell word for a path: quoted, and printable (a name with control characters is shown flattened)."""
    return shlex.quote(value if value.isprintable() else _line(value))


def _num(value: Any) -> float | None:
    """A finite number from a stranger's field, or None (strings, booleans, NaN, objects are not figures)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float's range
        return None
    return number if math.isfinite(number) else None


def _count(value: Any) -> int | None:
    n = _num(value)
    return int(n) if n is not None and n >= 0 and n == int(n) else None


def _pct(value: Any) -> str | None:
    """A fraction in [0, 1] as a percentage, or None."""
    v = _num(value)
    return f"{100 * v:.1f}%" if v is not None and 0.0 <= v <= 1.0 else None


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


# ---- target facts ---------------------------------------------------------------------------------------------------


def tensorrt_text(target: Target) -> str | None:
    """The target's TensorRT versions in words: '10.3', '10.x', '11.4 or a later 11.x'; None for ONNX Runtime."""
    if target.tensorrt is None:
        return None
    lo, hi = target.tensorrt
    if lo == hi:
        return lo
    major = lo.split(".")[0]
    if hi == f"{major}.99":
        return f"{major}.x" if lo == f"{major}.0" else f"{lo} or a later {major}.x"
    return f"{lo} to {hi}"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _python_ok(target: Target) -> bool:
    """Whether the Python JetPack ships can run the runtime (True where the owner brings their own Python)."""
    return target.python is None or _version(target.python) >= RUNTIME_MIN_PYTHON


def _min_python() -> str:
    return ".".join(str(v) for v in RUNTIME_MIN_PYTHON)


def _target(manifest: Manifest) -> Target | None:
    try:
        return get_target(manifest.target)
    except TrmExportError:
        return None  # a target this trm-export does not know (a newer export): the page says so


# ---- sections -------------------------------------------------------------------------------------------------------


def _family(manifest: Manifest) -> str:
    family = _obj(manifest.model).get("family")
    return {"trm": "TRM", "hrm": "HRM"}.get(family, md_text(family)) if isinstance(family, str) else "TRM/HRM"


def _task_words(manifest: Manifest) -> str:
    task = manifest.task
    if task.name == "sudoku":
        return "Sudoku (9x9, 81 cells)"
    if task.name == "maze" and task.grid_side:
        return f"maze ({task.grid_side}x{task.grid_side})"
    name = md_code(task.name) if task.name else "a custom task"
    return f"{name} ({task.seq_len} tokens, vocabulary {task.vocab_size})"


def _heading(manifest: Manifest, bundle_name: str, target: Target | None) -> list[str]:
    runs_on = (f"{md_code(target.name)} ({md_text(target.description)})" if target
               else f"target {md_code(manifest.target)}")
    prov = _obj(manifest.provenance)
    made = [f"exported by {md_text(prov['toolchain'])}" if isinstance(prov.get("toolchain"), str) else "exported",
            f"from checkpoint {md_code(prov['checkpoint'])}" if isinstance(prov.get("checkpoint"), str) else "",
            f"on {md_text(prov['created_at'])}" if isinstance(prov.get("created_at"), str) else ""]
    return [f"# {md_text(bundle_name)}: {_family(manifest)} {_task_words(manifest)} solver", "",
            f"A self-verifying bundle for {runs_on}, {' '.join(m for m in made if m)}. It holds ONE recursion step "
            "of the model as ONNX graphs (one per precision); the small `trm-export` runtime drives the loop on the "
            "device with numpy and ONNX Runtime or TensorRT, never PyTorch.", "",
            f"Copy this folder to the device ({md_code(f'scp -r {_shell_word(bundle_name)} user@device:')}) and run "
            "every command below from inside it."]


def _about(manifest: Manifest, target: Target | None) -> list[str]:
    config = _obj(_obj(manifest.model).get("config"))
    shape = [f"{label} {n}" for label, key in (("hidden size", "hidden_size"), ("heads", "num_heads"),
                                                ("H-cycles", "H_cycles"), ("L-cycles", "L_cycles"))
             if (n := _count(config.get(key))) is not None]
    loop = manifest.loop
    lines = ["## What this bundle is", "",
             f"- Model: {_family(manifest)}{' (' + ', '.join(shape) + ' per step)' if shape else ''}; trained "
             f"step limit {loop.halt_max_steps}; adaptive halting stops a puzzle when {md_code(loop.halting_rule)}.",
             f"- Task: {_task_words(manifest)}.",
             f"- Variants: {', '.join(f'{md_code(n)} ({md_text(g.precision)})' for n, g in _ordered(manifest))}; "
             f"{md_code(manifest.default_variant)} runs by default.", ""]
    if target is None:
        return lines + [f"- Target: {md_code(manifest.target)}, which this version of `trm-export` does not know: "
                        "update it (`pip install -U trm-export`) for the device's facts.", ""]
    rows = [("target", f"{md_code(target.name, table=True)}: {md_text(target.description)}")]
    if target.decided_on_device:
        return lines + ["| fact | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows + _any_jetson_rows(target)
                                                             ] + [""]
    if target.jetpack:
        rows.append(("JetPack", f"{target.jetpack} (its Python {target.python or '3'}, TensorRT and TensorRT's Python "
                                "module come with it)"))
    trt = tensorrt_text(target)
    rows.append(("TensorRT", f"{trt} (engines are built on the device)" if trt else "none: ONNX Runtime on the CPU"))
    if target.sm:
        rows.append(("GPU compute capability (SM)", ", ".join(target.sm)))
    if target.is_jetson:
        rows.append(("DLA cores", str(target.dla_cores)))
    if target.memory_gb:
        rows.append(("memory", " or ".join(f"{g} GB" for g in target.memory_gb) + (
            " (shared by CPU and GPU)" if target.is_jetson else "")))
    rows.append(("target's default precision", target.default_precision))
    rows.append(("batch profile (min / opt / max)", f"{target.batch.min} / {target.batch.opt} / {target.batch.max}"))
    return lines + ["| fact | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""]


def _module_words(names: tuple[str, ...]) -> str:
    return ", ".join(md_text(get_target(m).description.split(" (")[0]) for m in names)


def _any_jetson_rows(target: Target) -> list[tuple[str, str]]:
    """The facts of a bundle whose module is decided on the device: what each module and JetPack gets."""
    modules = [get_target(m) for m in target.modules]
    batches: dict[str, list[str]] = {}
    for m in modules:
        batches.setdefault(f"{m.batch.min} / {m.batch.opt} / {m.batch.max}", []).append(m.name)
    return [("modules", f"{_module_words(target.modules)}: the build reads which one it is on (`/proc/device-tree/"
                        "model`) and uses that module's settings"),
            ("JetPack", "; ".join(f"{jp} (Python {py}, TensorRT {trt})" for jp, py, trt, _ in _jetpacks())),
            ("TensorRT", "the device's own, 8.5 or newer: the graphs are ONNX opset 17, which every one of them reads "
                         "(engines are built on the device)"),
            ("GPU compute capability (SM)", ", ".join(target.sm)),
            ("DLA cores", "; ".join(f"{_module_words((m.name,))} {m.dla_cores}" for m in modules)),
            ("target's default precision", target.default_precision),
            ("batch profile (min / opt / max)", "; ".join(f"{_module_words(tuple(names))} {profile}"
                                                          for profile, names in batches.items())),
            ("builder workspace", "the module's cap (" + ", ".join(f"{_module_words((m.name,))} {m.workspace_mb} MB"
                                                                  for m in modules)
             + ") or a quarter of the memory available when the build starts, whichever is less")]


def _jetpacks() -> list[tuple[str, str, str, str]]:
    """(JetPack, its Python, its TensorRT, the --wheelhouse platform) of each JetPack a `--target jetson` bundle may
    meet: the L4T releases the device's build decision knows (targets/jetson_device.py), then JetPack 7 on AGX Orin
    (its registry target; there the building TensorRT names its own version). Pythons are the registry's per JetPack."""
    from trm_export.targets.jetson_device import L4T_RELEASES
    from trm_export.targets.registry import TARGETS

    pythons = {t.jetpack.split(".")[0]: t.python for t in TARGETS if t.jetpack and t.python}
    rows = [(jetpack, pythons[jetpack[0]], ".".join(trt.split(".")[:2])) for _, jetpack, trt in L4T_RELEASES]
    jp7 = get_target("jetson-agx-orin-jp7")
    rows.append((f"{jp7.jetpack}+ on AGX Orin", jp7.python, f"{jp7.tensorrt[0]}+"))
    return [(jp, py, trt, f"linux_aarch64-cp{py.replace('.', '')}") for jp, py, trt in rows]


def _ordered(manifest: Manifest) -> list[tuple[str, Any]]:
    """Graphs: the default first, then fp32 (the baseline), then by name."""
    return sorted(manifest.graphs.items(), key=lambda item: (item[0] != manifest.default_variant, item[0] != "fp32",
                                                             item[0]))


def _why_default(manifest: Manifest, target: Target | None) -> list[str]:
    choice = _obj(manifest.choice)
    default = md_code(manifest.default_variant)
    if not choice:
        return [f"{default} runs by default: the precision this bundle was exported at (no comparison of variants "
                "was recorded)."]
    asked = choice.get("asked")
    budget = _num(choice.get("budget_points"))
    budget_words = f"within {budget:g} points of fp32's exact accuracy" if budget is not None else "within the budget"
    drops = _obj(choice.get("accuracy_drop_points"))
    drop = _num(drops.get(manifest.default_variant))
    lines = []
    if asked == "best":
        lines.append(f"{default} runs by default: asked for `best`, the fastest variant {budget_words}, timed on the "
                     "export machine's CPU (a device ranks them differently: `trm-export report .` measures here).")
    elif isinstance(asked, str):
        target_words = (" (the target's precision)" if target and asked == target.default_precision
                        else f" (the target's default is {target.default_precision})" if target else "")
        mixed = (" (`int8-mixed`, which keeps its most sensitive layers in float, only when no all-INT8 variant "
                 "meets it)" if asked == "int8" else "")
        lines.append(f"{default} runs by default: the export asked for {md_text(asked)}{target_words}, and the most "
                     f"accurate {md_text(asked)} variant {budget_words} is chosen{mixed}"
                     f"{_drop_words(manifest.default_variant, drop)}.")
    else:
        lines.append(f"{default} runs by default.")
    if isinstance(choice.get("fallback"), str):
        lines.append(f"Fallback: {md_text(choice['fallback'])}.")
    missed = {k: _num(v) for k, v in _obj(choice.get("missed_budget")).items()}
    if missed:
        lines.append("Missed the budget (never chosen): " + ", ".join(
            f"{md_code(k)}" + (f" (-{v:.2f} points)" if v is not None else "") for k, v in sorted(missed.items()))
                     + ".")
    lines.append("Any other variant runs with `--variant NAME` (`run`, `verify`) or `Solver(..., variant=NAME)`.")
    return [" ".join(lines)]


def _drop_words(variant: str, drop: float | None) -> str:
    """'; `v` loses 0.30 points' (or gains, or matches fp32); '' when there is no figure or `v` is fp32."""
    if drop is None or variant == "fp32":
        return ""
    if abs(drop) < 0.005:
        return f"; {md_code(variant)} matches fp32"
    return f"; {md_code(variant)} {'loses' if drop > 0 else 'gains'} {abs(drop):.2f} points"


def _fp32_reference(parity: dict[str, Any]) -> dict[str, Any] | None:
    """The reduced-precision entry that measured fp32 on the most puzzles (screened variants saw fewer)."""
    entries = [_obj(parity[name]) for name in sorted(parity) if name != "fp32"]
    entries = [e for e in entries if _num(e.get("fp32_exact_accuracy")) is not None]
    return max(entries, key=lambda e: _count(e.get("puzzles")) or 0, default=None)


def _puzzles_words(count: Any, source: Any, steps: Any) -> str:
    n, s = _count(count), _count(steps)
    if n is None:
        return "not recorded"
    where = f" {md_code(source, table=True)}" if isinstance(source, str) else ""
    return f"{n}{where}" + (f", {s} fixed steps" if s is not None else "")


def _accuracy(manifest: Manifest) -> list[str]:
    parity = _obj(manifest.parity)
    choice = _obj(manifest.choice)
    drops = _obj(choice.get("accuracy_drop_points"))
    ms = _obj(choice.get("ms_per_step_here"))
    missed = _obj(choice.get("missed_budget"))
    reference = _fp32_reference(parity)
    rows = []
    for name, graph in _ordered(manifest):
        entry = _obj(parity.get(name))
        if name == "fp32" and reference is not None:
            acc, where = reference.get("fp32_exact_accuracy"), (reference.get("puzzles"), reference.get("source"),
                                                                 reference.get("steps"))
        elif name == "fp32":
            acc, where = entry.get("bundle_exact_accuracy"), (entry.get("puzzles"), entry.get("puzzles_source"),
                                                              entry.get("steps"))
        else:
            acc, where = entry.get("exact_accuracy"), (entry.get("puzzles"), entry.get("source"), entry.get("steps"))
        shown = _pct(acc)
        if shown is None and _pct(entry.get("predictions_identical")) and name != "fp32":
            shown = f"answers identical to fp32: {_pct(entry.get('predictions_identical'))}"
        drop = _num(drops.get(name, entry.get("accuracy_drop_points")))
        change = "baseline" if name == "fp32" else f"{0.0 - drop:+.2f} points" if drop is not None else "-"
        step_ms = _num(ms.get(name))
        note = "default" if name == manifest.default_variant else "missed the budget" if name in missed else ""
        rows.append(f"| {md_code(name, table=True)} | {md_text(graph.precision)} | "
                    f"{shown or 'not measured'} | {change} | {_puzzles_words(*where)} | "
                    f"{f'{step_ms:.1f}' if step_ms is not None else '-'} | {note} |")
    host = _obj(manifest.provenance).get("host")
    host_words = f" ({md_code(host)})" if isinstance(host, str) else ""
    target = _target(manifest)
    again = ""
    if _has_text_format(manifest):  # `report` generates held-out puzzles of the shipped tasks only
        again = " Re-measure on this device with `trm-export report .`" + (
            " once the engines are built: TensorRT runs its own kernels (INT8 and FP16 above all)."
            if target is not None and target.tensorrt is not None else ".")
    lines = ["## Variants and their measured accuracy", "", *_why_default(manifest, target), "",
             "| variant | precision | exact accuracy | vs fp32 | puzzles (split, loop) | ms/step at export | |",
             "|---|---|---|---|---|---|---|", *rows, "",
             f"Every figure was measured on the export machine{host_words} with ONNX Runtime on the CPU, not on this "
             "device: exact accuracy is the share of puzzles whose every cell is right, after the fixed number of "
             f"steps shown; ms/step is at batch {_count(choice.get('timed_at_batch')) or 64} on that machine's CPU, "
             f"a hint only.{again}"]
    fp32 = _obj(parity.get("fp32"))
    identical, checked = _pct(fp32.get("predictions_identical")), _count(fp32.get("puzzles"))
    if identical is not None and checked is not None:
        offered = _count(fp32.get("offered"))
        sample = f"the first {checked} of {offered}" if offered else str(checked)
        adaptive = _pct(min((_num(fp32.get(k)) or 0.0) for k in ("adaptive_steps_identical",
                                                                     "adaptive_predictions_identical")))
        ref = _pct(fp32.get("reference_exact_accuracy"))
        source = fp32.get("puzzles_source")
        share, sensitive = _num(fp32.get("rounding_sensitive_share")), _count(fp32.get("rounding_sensitive_puzzles"))
        rounding = (f" **{sensitive} of the {checked} puzzles ({100 * share:.3g}%) are rounding-sensitive: float32 "
                    "cannot promise the reference's answers there (another rounding of the reference itself changes "
                    "them), so this device may answer them differently.**"
                    if share is not None and 0 < share <= 1 and sensitive else "")
        lines += ["", f"Parity of the fp32 graph with the PyTorch reference at export: {sample} puzzles"
                      f"{' of ' + md_code(source) if isinstance(source, str) else ''}, fixed-step answers identical "
                      f"{identical}, adaptive halting identical {adaptive}"
                      f"{', passed' if fp32.get('passed') is True else ''}"
                      f"{f'; the reference itself solves {ref} of them' if ref else ''}.{rounding}"]
    return lines + [""]


_WHEEL = re.compile(r"runtime/[A-Za-z0-9._+-]+\.whl")
_PLATFORM = re.compile(r"[a-z0-9_]+-cp3[0-9]{1,2}")


def bundled_runtime(manifest: Manifest) -> tuple[str | None, str | None]:
    """(the trm-export wheel the bundle carries, the platform its --wheelhouse is for), each only where it is what
    the export writes (a checksummed file under runtime/, a platform name): they go into commands a user types, and
    a manifest is a stranger's. (None, None) for a bundle from before the runtime travelled with it."""
    entry = manifest.build.get("runtime")
    if not isinstance(entry, dict):
        return None, None
    wheel, house = entry.get("wheel"), entry.get("wheelhouse")
    wheel = wheel if isinstance(wheel, str) and _WHEEL.fullmatch(wheel) and wheel in manifest.files else None
    house = house if wheel and isinstance(house, str) and _PLATFORM.fullmatch(house) else None
    return wheel, house


def _runtime(manifest: Manifest, no_deps: bool = False) -> str:
    """The pip argument that installs trm-export from this bundle: its wheelhouse offline, else its own wheel
    (dependencies from the index), else (a bundle from before wheels were carried) the index's."""
    wheel, house = bundled_runtime(manifest)
    if wheel is None:
        return "trm-export"
    if house and not no_deps:
        return "--no-index --find-links runtime trm-export"
    return wheel


def _onnxruntime_warning(manifest: Manifest) -> str:
    return ("**ONNX Runtime on a Jetson: install one of the two, never both.** The runtime's wheel pulls PyPI's "
            "`onnxruntime`, which on aarch64 is CPU-only: enough here, since the GPU work runs in the TensorRT "
            "engines. NVIDIA's Jetson `onnxruntime-gpu` wheel (CUDA and TensorRT providers) installs the same "
            "`onnxruntime` module, so the two overwrite each other. NVIDIA's wheels: for JetPack 6.1/6.2 "
            "`pip install onnxruntime-gpu --index-url https://pypi.jetson-ai-lab.io/jp6/cu126` (the Jetson AI Lab "
            "index); for JetPack 5.1 and 6.0 the wheel per JetPack listed at https://elinux.org/Jetson_Zoo (ONNX "
            "Runtime section). To use one, install it "
            f"first, then `pip install --no-deps {_runtime(manifest, no_deps=True)}` and `pip install click "
            "\"numpy>=1.24,<2\"` (NVIDIA's "
            "JetPack 6 wheel does not import under NumPy 2).")


def _install(manifest: Manifest, target: Target | None) -> list[str]:
    pip = _runtime(manifest)
    lines = ["## Install the runtime on the device", ""]
    if pip != "trm-export":
        lines += ["This bundle carries the runtime: `runtime/` holds trm-export as a wheel (pure Python, any device)"
                  + (f" and its dependencies' wheels for {md_code(bundled_runtime(manifest)[1])}, so the "
                     "install below needs no network" if "--no-index" in pip else
                     "; pip fetches numpy, onnxruntime and click from the package index (an offline device: export "
                     "with `--wheelhouse MACHINE-cp3X`, which puts them into `runtime/` too)")
                  + ". Run the commands in this folder.", ""]
    if target is not None and target.is_jetson and _python_ok(target):
        trt = tensorrt_text(target)
        if target.decided_on_device:
            trt = "of your JetPack"
            lines += ["Each JetPack ships its Python with TensorRT and TensorRT's Python module (not pip-installable "
                      "on a Jetson; `cat /etc/nv_tegra_release` shows the L4T release: R35 is JetPack 5.1, R36.3 6.0, "
                      "R36.4 6.1 / 6.2):", "",
                      "| JetPack | Python | TensorRT | `--wheelhouse` for an offline device |", "|---|---|---|---|",
                      *[f"| {jp} | {py} | {version} | `{house}` |" for jp, py, version, house in _jetpacks()], ""]
            intro = "A virtual environment"
        else:
            intro = (f"JetPack {target.jetpack} ships Python {target.python} with TensorRT {trt} and its Python "
                     "module (not pip-installable on a Jetson). A virtual environment")
        lines += [f"{intro} made with `--system-site-packages` sees "
                  "them; `trm-export` itself is the runtime only (numpy, onnxruntime, click; no PyTorch).", "",
                  _commands([
                      ("sudo apt install python3-venv", "if `python3 -m venv` is missing"),
                      ("python3 -m venv --system-site-packages ~/trm-venv", "sees JetPack's TensorRT module"),
                      (". ~/trm-venv/bin/activate", ""),
                      (f'pip install {pip} "numpy>=1.24,<2"', "numpy, onnxruntime, click; no PyTorch"),
                      (f'pip install "cuda-python=={_CUDA_RELEASE}.*"', ""),
                      ('python3 -c "import tensorrt; print(tensorrt.__version__)"',
                       f"expect {trt + '.x' if target.tensorrt[0] == target.tensorrt[1] else 'the one ' + trt}")]),
                  "",
                  "cuda-python gives the TensorRT backend the CUDA runtime (GPU buffers, streams, CUDA graphs) from "
                  "Python. Its version must match JetPack's CUDA: the line above reads the release from `nvcc` "
                  "(or see `/usr/local/cuda/version.json` and install `cuda-python==MAJOR.MINOR.*`). Where pip has "
                  "no wheel for this Python and CUDA it builds one from source against JetPack's CUDA toolkit "
                  "(`export CUDA_HOME=/usr/local/cuda` first). Skip the line if "
                  "`python3 -c \"from cuda import cudart\"` already works in the environment. Without `nvcc` (JetPack "
                  "installed without its CUDA toolkit) the line above asks for `cuda-python==.*`: read the release "
                  "from `/usr/local/cuda/version.json` instead, or install the toolkit (`sudo apt install "
                  "nvidia-jetpack`).", "",
                  _onnxruntime_warning(manifest), "",
                  "**Before building and measuring.** `sudo nvpmodel -q` shows the power mode (the modes differ per "
                  "module: `/etc/nvpmodel.conf` lists them; pick the highest your power supply allows), and `sudo "
                  "jetson_clocks` pins the clocks, so that latencies do not depend on what the governor did. Building "
                  "an engine takes minutes per variant (TensorRT times its tactics; `engines/` keeps a timing cache "
                  "that makes rebuilds faster) and much memory on boards that share 4-8 GB with the CPU: add swap "
                  "first (`sudo fallocate -l 8G /swapfile && sudo chmod 600 /swapfile && sudo mkswap /swapfile && "
                  "sudo swapon /swapfile`) and close other programs; `tegrastats` shows memory while it runs. How "
                  "long: not yet measured by trm-export on a Jetson; the smaller modules take longest, and "
                  "`--variant NAME` builds one variant only.", ""]
    elif target is not None and target.is_jetson:
        lines += [f"**JetPack {target.jetpack} ships Python {target.python}; the `trm-export` runtime needs Python "
                  f"{_min_python()} or newer.** `pip install trm-export` refuses JetPack's Python, and JetPack's "
                  f"TensorRT {tensorrt_text(target)} Python module exists only for that Python {target.python}. On "
                  "this target today: build and time the engines with trtexec (next section, no Python needed), "
                  f"and run the Python runtime from a Python {_min_python()}+ of your own (for example "
                  "`uv python install 3.10`, or the deadsnakes PPA) on ONNX Runtime's CPU provider:", "",
                  _commands([(f"python{_min_python()} -m venv ~/trm-venv && . ~/trm-venv/bin/activate", ""),
                             (f"pip install {pip}", "numpy, onnxruntime (CPU-only on aarch64), click")]), ""]
    elif target is not None and target.tensorrt is not None:
        lo, major = target.tensorrt[0], int(target.tensorrt[0].split(".")[0])
        lines += [f"Python {_min_python()} or newer and an NVIDIA driver. The `tensorrt` extra installs NVIDIA's "
                  f"TensorRT wheels; the pin keeps it at TensorRT {tensorrt_text(target)}, which this bundle's "
                  "recipes are for.", "",
                  _commands([
                      ("python3 -m venv ~/trm-venv && . ~/trm-venv/bin/activate", ""),
                      (f'pip install {pip} "tensorrt>={lo},<{major + 1}"', ""),
                      ("pip install cuda-python", 'match the CUDA that nvidia-smi reports, e.g. "cuda-python==12.*"'),
                      ('python3 -c "import tensorrt; print(tensorrt.__version__)"', "")]), "",
                  "PyPI's `onnxruntime` (a dependency) runs on the CPU; `onnxruntime-gpu` provides the same module "
                  "with CUDA, so install one of the two, not both. The TensorRT engines do not need either on the "
                  "GPU.", ""]
    else:
        lines += [f"Python {_min_python()} or newer; the runtime is numpy, onnxruntime and click (no PyTorch):", "",
                  _commands([("python3 -m venv ~/trm-venv && . ~/trm-venv/bin/activate", ""),
                             (f"pip install {pip}", "")]), ""]
    return lines


def _build(manifest: Manifest, target: Target | None) -> list[str]:
    if target is None or target.tensorrt is None:
        return []
    trt, sm = tensorrt_text(target), "/".join(target.sm)
    default = manifest.default_variant
    on = "this device" if target.decided_on_device else f"this device (TensorRT {trt}, SM {sm})"
    lines = ["## Build the TensorRT engines on the device", "",
             f"An engine is only valid for the TensorRT version and the GPU it was built with: build on {on}, and "
             f"again after {'a JetPack' if target.is_jetson else 'a TensorRT'} upgrade. The runtime refuses an engine "
             "built elsewhere and says so.", ""]
    if target.decided_on_device:
        lines += ["Both ways below first read what this device is (its module from `/proc/device-tree/model`, the "
                  "TensorRT that builds, else the one its L4T release ships, and the memory available now) and print "
                  "the settings they build with, before any work: `device: NVIDIA Jetson Orin Nano Developer Kit -> "
                  "jetson-orin-nano; JetPack 6.1/6.2, TensorRT 10.3 (...); workspace 512 MB, batch 1/16/64, DLA "
                  "cores 0`. A board whose name trm-export does not know gets the smallest Orin's settings and a "
                  "note; name its module with `trm-export build . --module jetson-orin-nx` (`--print-recipe` shows "
                  "the commands without building).", ""]
    python_cmds = _python_ok(target)
    commands = [("trm-export build .", "every variant, the default first; records each engine in manifest.json"),
                (f"trm-export build . --variant {_shell_word(default)}", "only the default variant (quicker)")]
    commands = (commands if python_cmds else []) + [("trm-export verify . && sh build/build_engines.sh",
                                                     "every variant with trtexec, then records them; verify "
                                                     "first: it refuses a script that is not the manifest's")]
    lines += [_commands(commands), ""]
    if python_cmds:
        lines += ["`run`, `verify` and `report` use an engine once it is recorded in manifest.json (`trm-export build "
                  ". --record` checks and records what the script built; the script runs it itself when trm-export is "
                  "installed) and `import tensorrt` works. Until then they run the ONNX graph on ONNX Runtime and say "
                  "so; `--backend tensorrt` refuses to fall back."]
    else:
        lines += ["The Python runtime cannot load these engines here (see above); time them with "
                  "`trtexec --loadEngine=engines/...`."]
    if target.strongly_typed:
        lines += ["", f"TensorRT {target.tensorrt[0].split('.')[0]} builds strongly typed networks: the precision is "
                      "the graph's own (Q/DQ nodes, FP16 tensors); there are no --fp16/--int8 flags."]
    if target.decided_on_device and python_cmds:
        lines += ["", "On a module with DLA cores (all but the Orin Nano): `trm-export build . --dla-core 0` builds "
                      "the FP16/INT8 variants for DLA (static batch, the module's opt; GPU fallback); DLA runs "
                      "attention poorly, so compare with `trm-export report .` before keeping it."]
    if target.dla_cores and python_cmds:
        lines += ["", f"This module has {target.dla_cores} DLA cores: `trm-export build . --dla-core 0` builds the "
                      f"FP16/INT8 variants for DLA (static batch {target.batch.opt}, GPU fallback); DLA runs "
                      "attention poorly, so compare with `trm-export report .` before keeping it."]
    return lines + [""]


SAMPLES = ("samples/puzzles.txt", "samples/puzzles.npy")


def sample_file(manifest: Manifest) -> str | None:
    """The bundle's own sample puzzles (export.pipeline writes them), which every command of the guide can use: text
    for a task with a text format, else tokens."""
    rel = SAMPLES[0] if _has_text_format(manifest) else SAMPLES[1]
    return rel if rel in manifest.files else None


def _has_text_format(manifest: Manifest) -> bool:
    """A shipped task (text puzzle files, held-out puzzles for `report`), as runtime/io.task_for_encoding decides."""
    return manifest.task.name == "sudoku" or (manifest.task.name == "maze" and bool(manifest.task.grid_side))


def _input_format(manifest: Manifest) -> str:
    task = manifest.task
    if task.name == "sudoku":
        return ("Sudoku: one puzzle per line, 81 characters row by row, `0` or `.` for a blank (empty lines and lines "
                "starting with `#` are skipped).")
    if task.name == "maze" and task.grid_side:
        side = task.grid_side
        return (f"mazes: square grids of {side} rows of {side} characters (`#` wall, space open, `S` start, `G` "
                "goal), one empty line between mazes; keep trailing spaces, they are open cells.")
    return f"this task has no text format: a `.npy` of integer tokens, shape [N, {task.seq_len}]."


def _check_and_run(manifest: Manifest, target: Target | None) -> list[str]:
    own_python = target is not None and not _python_ok(target)
    gpu = target is not None and target.tensorrt is not None and not own_python
    where = "from that Python environment" if own_python else "in the environment above"
    shipped = _has_text_format(manifest)
    puzzles = sample_file(manifest) or ("puzzles.txt" if shipped else "puzzles.npy")
    steps = manifest.loop.halt_max_steps
    commands = [("trm-export verify .", "checksums, then the golden puzzles through the default variant"),
                (f"trm-export run . --input {puzzles}", "adaptive halting on the model's own Q head"),
                (f"trm-export run . --input {puzzles} --mode fixed --max-steps {steps} --output solutions.txt", "")]
    if shipped:
        commands.append(("trm-export report . --quick", "accuracy vs latency of every variant, measured here"))
    backend = ("`verify` and `run` use the variant's TensorRT engine once one is built, ONNX Runtime until then; "
               if gpu else "")
    lines = ["## Check it, then solve puzzles", "", f"Run {where}:", "", _commands(commands), "",
             f"Puzzle files end in `.txt` or `.npy`. Text format, {_input_format(manifest)} `run` checks the golden "
             "puzzles first, then prints one line per puzzle: the answer in the input's format (maze rows joined by "
             "`|`), then, separated by tabs, the steps it took and whether the answer is a valid solution of its "
             f"puzzle. {backend}`--variant NAME` picks another variant; `trm-export run --help` lists the rest."]
    if shipped:
        lines += ["", "`trm-export report .` re-measures exact accuracy and latency of every variant and step budget "
                      "on this device (`--quick`: up to 100 held-out puzzles; without it up to 1,000, as many as its "
                      "work budget covers, counted from the model's size) with the runtime alone: ONNX "
                      f"Runtime for every variant{', and TensorRT for those with a recorded engine' if gpu else ''}. "
                      "It writes `report/REPORT.md` and `report/report.json`; the plots need `pip install matplotlib`."]
    return lines + [""]


def _browser(manifest: Manifest) -> list[str]:
    web = manifest.build.get("web")
    if not isinstance(web, dict) or "web/index.html" not in manifest.files:
        return []
    version = md_text(web.get("onnxruntime_web", ""))
    return ["## Open it in a browser", "",
            "`web/index.html` solves puzzles in the page: type or paste a puzzle, watch the answer after every step "
            "with the model's halting confidence, or paste many and solve them in batches. Everything it loads is in "
            f"this folder (onnxruntime-web {version}, WebAssembly); serve the folder and open the page:", "",
            _commands([("trm-export serve .", "prints the URL; WebAssembly threads on (cross-origin isolated)"),
                       ("python3 -m http.server --bind 127.0.0.1 --directory . 8000",
                        "without trm-export: http://127.0.0.1:8000/web/index.html, one thread")]), "",
            "The page checks every file it loads against `manifest.json`'s sha256 (browsers allow that on localhost "
            "or https only) and runs the golden puzzles before it lets you solve anything. To put it on a web "
            "server, copy the whole folder and send `Cross-Origin-Opener-Policy: same-origin` and "
            "`Cross-Origin-Embedder-Policy: require-corp` for threads, and `.mjs` as JavaScript.", ""]


def _python_example(manifest: Manifest, bundle_name: str) -> list[str]:
    puzzles, steps = ("puzzles.txt" if _has_text_format(manifest) else "puzzles.npy"), manifest.loop.halt_max_steps
    code = "\n".join([
        "from trm_export.runtime import Solver",
        "from trm_export.runtime.io import format_solutions, read_puzzles",
        "",
        f"solver = Solver({bundle_name!r})  # this folder; checks every checksum, runs the default variant",
        f"result = solver.solve(read_puzzles({puzzles!r}, solver.task))  # or mode=\"fixed\", max_steps={steps}",
        "print(format_solutions(result, solver.task))  # result.predictions: tokens [N, seq_len]; result.steps_used",
    ])
    return ["## Use it from Python", "",
            "The same runtime, embedded in an application (numpy and onnxruntime, TensorRT when an engine is built):",
            "", _block(code, "python"), "",
            "`Solver(path, variant=..., batch_size=64)` streams any number of puzzles through `batch_size` slots "
            "(a halted puzzle's slot takes the next one); answers come back in input order. A Solver may be shared "
            "between threads (its solves take turns); give each thread its own for parallel throughput.", ""]


_FOLDERS = {
    "graphs": "the ONNX step graphs, one per variant",
    "tables": "embedding tables (.npy) the runtime applies before the first step",
    "golden": "golden puzzles with the PyTorch reference's values at every step (`trm-export verify`)",
    "build": "`build_engines.sh`: the exact trtexec commands for the target's TensorRT version",
    "engines": "TensorRT engines and their timing cache, once `trm-export build .` has run here",
    "report": "the accuracy-versus-latency report, once `trm-export report .` has run (not checksummed)",
    "web": "the web page (`index.html`), its JavaScript runtime (`trm.mjs`) and onnxruntime-web (`ort/`)",
    "runtime": "trm-export as a wheel (and, with `--wheelhouse`, numpy, onnxruntime and click for the device)",
    "samples": "a few puzzles of the export's held-out set, in the input format `run` reads",
}


def _files(manifest: Manifest, target: Target | None) -> list[str]:
    present = {rel.split("/")[0] for rel in manifest.files if "/" in rel}
    present |= {g.file.split("/")[0] for g in manifest.graphs.values() if "/" in g.file}
    if target is not None and target.tensorrt is not None:
        present |= {"engines"}
    if _has_text_format(manifest):
        present |= {"report"}
    lines = ["## What is in this folder", "",
             "- `manifest.json`: what the bundle holds and how to run it (format: `docs/bundle.md` of trm-export)",
             "- `README.md`: this page"]
    for folder in [f for f in _FOLDERS if f in present] + sorted(present - set(_FOLDERS)):
        what = _FOLDERS.get(folder, "listed in manifest.json")
        if folder == "graphs":
            what += ": " + ", ".join(f"{md_code(g.file)} ({md_code(n)})" for n, g in _ordered(manifest))
        lines.append(f"- {md_code(folder + '/')}: {what}")
    return lines + ["", "`manifest.json` lists the sha256 of every other file and carries `digest`, the sha256 of its "
                        "own canonical form. The runtime checks both before anything in the bundle runs and refuses a "
                        "bundle whose files or manifest changed (`trm-export verify .` says which). Trust a bundle as "
                        "far as you trust where it came from: the digest detects edits, not a forger."]


def render_bundle_readme(manifest: Manifest, bundle_name: str) -> str:
    """The bundle's README.md (Markdown) for `manifest`: what the bundle is, how well each variant did at export,
    and how to install, build, check and run it on the device of the manifest's target."""
    target = _target(manifest)
    sections = [_heading(manifest, bundle_name, target), [""], _about(manifest, target), _accuracy(manifest),
                _browser(manifest), _install(manifest, target), _build(manifest, target),
                _check_and_run(manifest, target), _python_example(manifest, bundle_name), _files(manifest, target)]
    return "\n".join(line for section in sections for line in section).rstrip() + "\n"
