"""Engine build recipes: the exact TensorRT build a target needs, as data, as a trtexec command, as a script.

An engine is only valid for the TensorRT version and GPU (SM) it was built on, and the build host usually is
not the Jetson. So every bundle for a TensorRT target carries the recipe, and the same recipe drives the
Python builder (targets/tensorrt_build.py) when TensorRT is present. What differs by version:
- TensorRT 8.5 (JetPack 5): explicit-batch flag, precision by builder flags (--fp16 / --int8), opset <= 17;
- TensorRT 10.x: explicit batch implied, precision by builder flags, opset <= 20;
- TensorRT 11.x: strongly typed networks only, precision comes from the graph; no --fp16 / --int8 / --best.
DLA (Xavier, Orin NX / AGX) runs fp16/int8 with static shapes only (min = opt = max) and GPU fallback.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from trm_export.errors import TrmExportError
from trm_export.runtime.manifest import NAME_PATTERN, GraphSpec
from trm_export.targets.registry import Target


class RecipeError(TrmExportError):
    """The requested build does not fit the target."""


@dataclass(frozen=True)
class BuildRecipe:
    """Everything a TensorRT build of one graph for one target needs."""

    target: str
    variant: str  # bundle graph name: fp32, fp16, int8-entropy, ...
    onnx_file: str
    engine_file: str
    timing_cache: str
    tensorrt_major: int
    precision: str  # fp32 | fp16 | int8 | mixed
    strongly_typed: bool
    precision_flags: tuple[str, ...]  # ("fp16",), ("int8",), ("int8", "fp16") on DLA, () fp32 / strongly typed
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)
    workspace_mb: int | None
    dla_core: int | None
    builder_optimization_level: int = 3

    def trtexec_args(self) -> list[str]:
        def dims(which: int) -> str:
            return ",".join(f"{name}:{'x'.join(str(d) for d in shape[which])}" for name, shape in self.shapes.items())

        args = ["trtexec", f"--onnx={self.onnx_file}", f"--saveEngine={self.engine_file}",
                f"--minShapes={dims(0)}", f"--optShapes={dims(1)}", f"--maxShapes={dims(2)}",
                f"--timingCacheFile={self.timing_cache}"]
        if self.tensorrt_major >= 10:
            args.append(f"--builderOptimizationLevel={self.builder_optimization_level}")
        if self.workspace_mb:
            args.append(f"--memPoolSize=workspace:{self.workspace_mb}")
        if self.strongly_typed:
            args.append("--stronglyTyped")
        args += [f"--{flag}" for flag in self.precision_flags]
        if self.dla_core is not None:
            args += [f"--useDLACore={self.dla_core}", "--allowGPUFallback"]
        return args

    def trtexec_command(self) -> str:
        return shlex.join(self.trtexec_args())


def _major(version: str) -> int:
    return int(version.split(".")[0])


def graph_stem(graph_file: str) -> str:
    """The name an engine of `graph_file` starts with: the file name without `.onnx`."""
    stem = graph_file.rsplit("/", 1)[-1]
    return stem[:-len(".onnx")] if stem.endswith(".onnx") else stem  # no str.removesuffix: runs on 3.8


def make_recipe(target: Target, variant: str, graph: GraphSpec, dla_core: int | None = None,
                batch: tuple[int, int, int] | None = None) -> BuildRecipe:
    """The build of `graph` (a bundle graph) for `target`. Raises RecipeError when the target cannot take it."""
    if not NAME_PATTERN.fullmatch(variant):
        raise RecipeError(f"variant name {variant!r} does not match {NAME_PATTERN.pattern}")
    if target.tensorrt is None:
        raise RecipeError(f"target {target.name!r} runs ONNX Runtime; there is no TensorRT engine to build")
    if graph.opset > target.max_opset:
        raise RecipeError(f"graph {graph.file} has opset {graph.opset}; {target.name} (TensorRT {target.tensorrt[0]}) "
                          f"accepts at most {target.max_opset}: re-export with --target {target.name}")
    if graph.ir_version > target.max_ir_version:
        raise RecipeError(f"graph {graph.file} has IR version {graph.ir_version}; {target.name} accepts at most "
                          f"{target.max_ir_version}: re-export with --target {target.name}")
    major = _major(target.tensorrt[0])
    strongly_typed = target.strongly_typed
    if strongly_typed or graph.precision == "fp32":
        flags: tuple[str, ...] = ()
    elif graph.precision == "fp16":
        flags = ("fp16",)
    elif dla_core is not None:  # DLA runs no float32: the float layers between Q/DQ pairs run in half there
        flags = ("int8", "fp16")
    else:  # int8 / mixed: explicit Q/DQ graph, float layers in float32 as measured (INT8+FP16 was never measured)
        flags = ("int8",)
    if dla_core is not None:
        if target.dla_cores == 0:
            raise RecipeError(f"{target.name} has no DLA cores")
        if not 0 <= dla_core < target.dla_cores:
            raise RecipeError(f"{target.name} has DLA cores 0..{target.dla_cores - 1}, asked for {dla_core}")
        if graph.precision == "fp32":
            raise RecipeError("DLA runs fp16 or int8 only; build a fp16 or int8 variant for DLA")
    lo, opt, hi = batch or (target.batch.min, target.batch.opt, target.batch.max)
    if dla_core is not None:
        lo = hi = opt  # DLA needs static shapes
    if not 1 <= lo <= opt <= hi:
        raise RecipeError(f"batch profile must satisfy 1 <= min <= opt <= max, got {lo}/{opt}/{hi}")
    shapes = {}
    for spec in graph.inputs:
        rest = tuple(int(d) for d in spec.shape[1:])
        shapes[spec.name] = ((lo, *rest), (opt, *rest), (hi, *rest))
    stem = graph_stem(graph.file)
    suffix = f"{target.name}.dla{dla_core}" if dla_core is not None else target.name
    return BuildRecipe(target=target.name, variant=variant, onnx_file=graph.file,
                       engine_file=f"engines/{stem}.{suffix}.engine", timing_cache="engines/timing.cache",
                       tensorrt_major=major, precision=graph.precision, strongly_typed=strongly_typed,
                       precision_flags=flags, shapes=shapes, workspace_mb=target.workspace_mb, dla_core=dla_core)


# The lines every build script starts from (in the bundle folder, trtexec found) and ends with (the engines recorded).
_START = ["set -eu", 'cd "$(dirname "$0")/.."', "mkdir -p engines",
          'command -v trtexec >/dev/null 2>&1 || PATH="$PATH:/usr/src/tensorrt/bin"  # JetPack location']
_RECORD = ["if command -v trm-export >/dev/null 2>&1; then",
           "  trm-export build . --record",
           "else",
           '  echo "engines built; record them with: trm-export build . --record (until then the runtime does not '
           'use them)"',
           "fi"]


def build_script(recipes: list[BuildRecipe], target: Target) -> str:
    """A POSIX shell script that builds every recipe on the device with trtexec (run from the bundle folder)."""
    lines = ["#!/bin/sh",
             f"# Build TensorRT engines for {target.description}.",
             f"# Run on the device itself (TensorRT {target.tensorrt[0]}"
             f"{'+' if target.tensorrt[0] != target.tensorrt[1] else ''}, SM {'/'.join(target.sm)}): engines do not "
             "move across GPUs or TensorRT versions.",
             "# The engines are then checked and recorded in manifest.json (`trm-export build . --record`), so that",
             "# `trm-export verify .`, `run` and `report` use them (`trm-export build .` builds and records at once).",
             *_START, ""]
    for r in recipes:  # names come from a manifest (a stranger's file): quoted, and checked on read
        lines += [shlex.join(["echo", f"building {r.variant} -> {r.engine_file}"]), r.trtexec_command(), ""]
    return "\n".join(lines + _RECORD)


# ---- a script that decides on the device: `--target jetson` ------------------------------------------------------


class _Var(str):
    """A shell variable inside a word: rendered as "$name" (its value is a number or a module name the script set)."""


def _word(*parts: str) -> str:
    """One shell word from literal parts (single-quoted where needed) and _Var parts (double-quoted expansions)."""
    return "".join(f'"${{{p}}}"' if isinstance(p, _Var) else shlex.quote(p) for p in parts if p)


def _shape_word(flag: str, graph: GraphSpec, which: str) -> str:
    parts: list[str] = [f"--{flag}="]
    for i, spec in enumerate(graph.inputs):
        parts += [("," if i else "") + f"{spec.name}:", _Var(which)]
        parts += ["".join(f"x{int(d)}" for d in spec.shape[1:])]
    return _word(*parts)


def device_settings_shell(modules: Sequence[Target]) -> list[str]:
    """Shell lines that set module, batch (lo, opt, hi), workspace (ws, MB), the TensorRT version (trt_major,
    trt_minor) and the flag variables from what the device reports: targets/jetson_device.py's rules, in sh."""
    from trm_export.targets.jetson_device import FALLBACK_MODULE, L4T_RELEASES, MODULES, TOO_OLD, WORKSPACE_FLOOR_MB

    by_name = {t.name: t for t in modules}

    def assign(name: str, known: str) -> str:
        t = by_name[name]
        return (f"module={name}; known={known}; lo={t.batch.min}; opt={t.batch.opt}; hi={t.batch.max}; "
                f"cap={t.workspace_mb}; dla={t.dla_cores}")

    lines = ['root="${TRM_DEVICE_ROOT:-}"  # the device is read under this root (empty: this machine)',
             "model=$(tr -d '\\000' < \"$root/proc/device-tree/model\" 2>/dev/null || true)",
             'case "$model" in']
    lines += [f"  *{shlex.quote(words)}*) {assign(name, 'yes')} ;;" for words, name in MODULES if name in by_name]
    lines += [f"  *{shlex.quote(words)}*) echo \"this device is a $model: TensorRT 8.5 or newer (JetPack 5.1+, an "
              "Orin or Xavier module) is needed; its JetPack 4.6 stops at TensorRT 8.2\" >&2; exit 1 ;;"
              for words in TOO_OLD]
    lines += [f"  *) {assign(FALLBACK_MODULE, 'no')} ;;", "esac"]
    lines += [
        "# The TensorRT that builds: trtexec's banner says it ([TensorRT v8502] is 8.5.2, v100300 is 10.3.0);",
        "# else the one the L4T release ships (/etc/nv_tegra_release; the last row it reaches wins).",
        "trt_v=$(trtexec 2>&1 | sed -n 's/.*\\[TensorRT v\\([0-9][0-9]*\\)\\].*/\\1/p' | head -n 1)",
        "l4t=$(sed -n 's/^# R\\([0-9][0-9]*\\) (release), REVISION: \\([0-9][0-9]*\\).*/\\1 \\2/p' "
        '"$root/etc/nv_tegra_release" 2>/dev/null | head -n 1)',
        'l4t_major=${l4t% *}; l4t_rev=${l4t#* }; l4t_trt=; jetpack=unknown',
        'if [ -n "$l4t" ]; then']
    for (major, minor), jetpack, trt in L4T_RELEASES:
        lines.append(f'  if [ "$l4t_major" -eq {major} ] && [ "$l4t_rev" -ge {minor} ]; then '
                     f'l4t_trt={".".join(trt.split(".")[:2])}; jetpack={shlex.quote(jetpack)}; fi')
    lines.append("fi")
    lines += [
        'if [ -n "$trt_v" ]; then',
        '  if [ "$trt_v" -ge 100000 ]; then trt_major=$((trt_v / 10000)); trt_minor=$((trt_v / 100 % 100))',
        "  else trt_major=$((trt_v / 1000)); trt_minor=$((trt_v / 100 % 10)); fi",
        '  trt_from="trtexec"',
        'elif [ -n "$l4t_trt" ]; then',
        '  trt_major=${l4t_trt%.*}; trt_minor=${l4t_trt#*.}; trt_from="L4T R$l4t_major.$l4t_rev ships it"',
        "else",
        '  echo "cannot tell the TensorRT version of this device: trtexec prints none and /etc/nv_tegra_release names '
        'no JetPack 5.1+ release; install the TensorRT of JetPack (sudo apt install nvidia-jetpack)" >&2',
        "  exit 1",
        "fi",
        'if [ "$trt_major" -lt 8 ] || { [ "$trt_major" -eq 8 ] && [ "$trt_minor" -lt 5 ]; }; then',
        '  echo "TensorRT $trt_major.$trt_minor is too old for these graphs (opset 17 needs TensorRT 8.5+, JetPack '
        '5.1+)" >&2',
        "  exit 1",
        "fi",
        "avail_kb=$(sed -n 's/^MemAvailable: *\\([0-9]*\\) kB$/\\1/p' \"$root/proc/meminfo\" 2>/dev/null | head -n 1)",
        "ws=$cap  # the module's cap, or a quarter of the memory available now (CPU and GPU share it)",
        'if [ -n "$avail_kb" ]; then',
        f"  quarter=$((avail_kb / 1024 / 4 / 256 * 256)); [ \"$quarter\" -ge {WORKSPACE_FLOOR_MB} ] || "
        f"quarter={WORKSPACE_FLOOR_MB}",
        '  [ "$quarter" -ge "$ws" ] || ws=$quarter',
        "fi",
        'if [ "$trt_major" -ge 11 ]; then typed=--stronglyTyped; fp16=; int8=  # strongly typed: no precision flags',
        "else typed=; fp16=--fp16; int8=--int8; fi",
        'if [ "$trt_major" -ge 10 ]; then level=--builderOptimizationLevel=3; else level=; fi',
        '[ "$known" = yes ] || echo "note: ${model:-this device} is not a module this bundle knows; using the settings '
        'of $module"',
        'echo "device: ${model:-unknown} -> $module; JetPack $jetpack, TensorRT $trt_major.$trt_minor ($trt_from); '
        'workspace $ws MB, batch $lo/$opt/$hi, DLA cores $dla"',
    ]
    return lines


def device_build_script(graphs: Sequence[tuple[str, GraphSpec]], target: Target, modules: Sequence[Target]) -> str:
    """The build script of a bundle whose module is decided on the device: it reads what the device is, prints the
    settings, then builds every graph with trtexec (the same commands `trm-export build .` would run there)."""
    for variant, _ in graphs:
        if not NAME_PATTERN.fullmatch(variant):
            raise RecipeError(f"variant name {variant!r} does not match {NAME_PATTERN.pattern}")
    lines = ["#!/bin/sh",
             f"# Build TensorRT engines for {target.description}.",
             "# Run on the device itself: what it reports (module, TensorRT version, memory available) decides the",
             "# workspace and batch profile, as `trm-export build .` does; engines do not move across devices.",
             "# The engines are then checked and recorded in manifest.json (`trm-export build . --record`).",
             *_START, *device_settings_shell(modules), ""]
    for variant, graph in graphs:
        engine = _word(f"engines/{graph_stem(graph.file)}.", _Var("module"), ".engine")
        precision = "" if graph.precision == "fp32" else "$fp16" if graph.precision == "fp16" else "$int8"
        words = ["trtexec", _word(f"--onnx={graph.file}"), _word("--saveEngine=") + engine,
                 _shape_word("minShapes", graph, "lo"), _shape_word("optShapes", graph, "opt"),
                 _shape_word("maxShapes", graph, "hi"), _word("--timingCacheFile=engines/timing.cache"),
                 "$level", _word("--memPoolSize=workspace:", _Var("ws")), "$typed", precision]
        lines += [f"echo {shlex.quote(f'building {variant} -> ')}{engine}", " ".join(w for w in words if w), ""]
    return "\n".join(lines + _RECORD)
