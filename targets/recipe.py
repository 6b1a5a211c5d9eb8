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
    stem = graph.file.rsplit("/", 1)[-1]
    stem = stem[:-len(".onnx")] if stem.endswith(".onnx") else stem  # no str.removesuffix: runs on 3.8
    suffix = f"{target.name}.dla{dla_core}" if dla_core is not None else target.name
    return BuildRecipe(target=target.name, variant=variant, onnx_file=graph.file,
                       engine_file=f"engines/{stem}.{suffix}.engine", timing_cache="engines/timing.cache",
                       tensorrt_major=major, precision=graph.precision, strongly_typed=strongly_typed,
                       precision_flags=flags, shapes=shapes, workspace_mb=target.workspace_mb, dla_core=dla_core)


def build_script(recipes: list[BuildRecipe], target: Target) -> str:
    """A POSIX shell script that builds every recipe on the device with trtexec (run from the bundle folder)."""
    lines = ["#!/bin/sh",
             f"# Build TensorRT engines for {target.description}.",
             f"# Run on the device itself (TensorRT {target.tensorrt[0]}"
             f"{'+' if target.tensorrt[0] != target.tensorrt[1] else ''}, SM {'/'.join(target.sm)}): engines do not "
             "move across GPUs or TensorRT versions.",
             "# The engines are then checked and recorded in manifest.json (`trm-export build . --record`), so that",
             "# `trm-export verify .`, `run` and `report` use them (`trm-export build .` builds and records at once).",
             "set -eu", 'cd "$(dirname "$0")/.."', "mkdir -p engines",
             'command -v trtexec >/dev/null 2>&1 || PATH="$PATH:/usr/src/tensorrt/bin"  # JetPack location', ""]
    for r in recipes:  # names come from a manifest (a stranger's file): quoted, and checked on read
        lines += [shlex.join(["echo", f"building {r.variant} -> {r.engine_file}"]), r.trtexec_command(), ""]
    lines += ["if command -v trm-export >/dev/null 2>&1; then",
              "  trm-export build . --record",
              "else",
              '  echo "engines built; record them with: trm-export build . --record (until then the runtime does not '
              'use them)"',
              "fi"]
    return "\n".join(lines)
