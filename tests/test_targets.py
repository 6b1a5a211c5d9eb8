"""Targets: the registry against the documented facts, build recipes per TensorRT version, recipe in bundles.

TensorRT itself cannot be installed on CI machines; its builder and backend tests skip with the reason.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
from click.testing import CliRunner

from trm_export.cli import main as cli
from trm_export.runtime.manifest import GraphSpec, TensorSpec
from trm_export.runtime.tensorrt_backend import incompatibility
from trm_export.targets.recipe import RecipeError, make_recipe
from trm_export.targets.registry import TARGETS, UnknownTargetError, get_target

STATE = ["batch", 18, 32]


def graph(precision: str = "fp32", opset: int = 17, ir: int = 8) -> GraphSpec:
    io = [TensorSpec(n, STATE, "float32") for n in ("x", "z_H", "z_L")]
    return GraphSpec(f"graphs/step_{precision}.onnx", precision, opset, ir, io, [])


# Facts from shared/reference/targets.md (NVIDIA support matrices, JetPack notes, module data sheets).
@pytest.mark.parametrize(("name", "trt", "opset", "ir", "sm", "dla"), [
    ("jetson-orin-nano", "10.3", 20, 9, "8.7", 0),
    ("jetson-orin-nx", "10.3", 20, 9, "8.7", 2),
    ("jetson-agx-orin", "10.3", 20, 9, "8.7", 2),
    ("jetson-xavier-nx", "8.5", 17, 8, "7.2", 2),
    ("jetson-agx-xavier", "8.5", 17, 8, "7.2", 2),
    ("jetson-agx-orin-jp7", "11.4", 25, 11, "8.7", 2),
])
def test_jetson_targets_match_the_documented_facts(name, trt, opset, ir, sm, dla):
    t = get_target(name)
    assert (t.tensorrt[0], t.max_opset, t.max_ir_version, t.sm, t.dla_cores) == (trt, opset, ir, (sm,), dla)
    assert t.is_jetson and t.workspace_mb and t.batch.min <= t.batch.opt <= t.batch.max


def test_aliases_and_suggestions():
    jetson = get_target("jetson")  # any module: decided on the device, graphs the oldest TensorRT (8.5) reads
    assert jetson.decided_on_device and (jetson.max_opset, jetson.max_ir_version) == (17, 8)
    assert all(get_target(m).max_opset >= 17 and get_target(m).is_jetson for m in jetson.modules)
    assert get_target("orin").name == "jetson-agx-orin"
    assert get_target("JETSON-ORIN-NANO").name == "jetson-orin-nano"
    with pytest.raises(UnknownTargetError, match=r"Did you mean 'jetson-orin-nx'\?"):
        get_target("jetson-orin-mx")
    assert get_target("gpu-trt11").strongly_typed and get_target("jetson-agx-orin-jp7").strongly_typed
    assert not any(t.strongly_typed for t in TARGETS if t.tensorrt and t.tensorrt[0].startswith(("8", "10")))
    assert get_target("cpu").tensorrt is None


@pytest.mark.parametrize("target", [t.name for t in TARGETS if t.tensorrt and not t.decided_on_device])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_recipe_flags_follow_the_tensorrt_version(target, precision):
    t = get_target(target)
    args = make_recipe(t, precision, graph(precision)).trtexec_args()
    if t.strongly_typed:  # TensorRT 11: precision flags are gone, the graph carries the precision
        assert "--stronglyTyped" in args
        assert not {"--fp16", "--int8", "--best"} & set(args)
    else:
        assert "--stronglyTyped" not in args and "--best" not in args
        expected = {"fp32": set(), "fp16": {"--fp16"}, "int8": {"--int8"}}[precision]  # float layers stay fp32
        assert {a for a in args if a in ("--fp16", "--int8")} == expected
    assert f"--memPoolSize=workspace:{t.workspace_mb}" in args if t.workspace_mb else True
    b = t.batch
    assert f"--minShapes=x:{b.min}x18x32,z_H:{b.min}x18x32,z_L:{b.min}x18x32" in args
    assert f"--optShapes=x:{b.opt}x18x32,z_H:{b.opt}x18x32,z_L:{b.opt}x18x32" in args
    assert f"--maxShapes=x:{b.max}x18x32,z_H:{b.max}x18x32,z_L:{b.max}x18x32" in args
    assert "--timingCacheFile=engines/timing.cache" in args
    assert ("--builderOptimizationLevel=3" in args) == (not t.tensorrt[0].startswith("8"))


def test_dla_recipe_is_static_with_gpu_fallback():
    args = make_recipe(get_target("jetson-orin-nx"), "int8", graph("int8"), dla_core=1).trtexec_args()
    assert "--useDLACore=1" in args and "--allowGPUFallback" in args
    assert "--minShapes=x:32x18x32,z_H:32x18x32,z_L:32x18x32" in args  # min = opt = max
    assert "--maxShapes=x:32x18x32,z_H:32x18x32,z_L:32x18x32" in args
    with pytest.raises(RecipeError, match="has no DLA cores"):
        make_recipe(get_target("jetson-orin-nano"), "int8", graph("int8"), dla_core=0)
    with pytest.raises(RecipeError, match="DLA runs fp16 or int8 only"):
        make_recipe(get_target("jetson-agx-orin"), "fp32", graph("fp32"), dla_core=0)
    with pytest.raises(RecipeError, match=r"DLA cores 0..1, asked for 2"):
        make_recipe(get_target("jetson-agx-orin"), "int8", graph("int8"), dla_core=2)


def test_recipe_refuses_a_graph_the_target_cannot_parse():
    with pytest.raises(RecipeError, match=r"opset 20; jetson-xavier-nx \(TensorRT 8.5\) accepts at most 17"):
        make_recipe(get_target("jetson-xavier-nx"), "fp32", graph(opset=20, ir=9))
    with pytest.raises(RecipeError, match="runs ONNX Runtime"):
        make_recipe(get_target("cpu"), "fp32", graph())


@pytest.mark.parametrize("target", ["jetson-xavier-nx", "jetson-orin-nano", "gpu-trt11"])
def test_export_for_a_tensorrt_target_carries_the_build_script(tmp_path, target):
    from test_export import export

    path, manifest = export(tmp_path, target=target)
    script = (path / "build" / "build_engines.sh").read_text()
    recipe = manifest["build"]["recipes"]["fp32"]
    assert recipe["trtexec"] in script and "build/build_engines.sh" in manifest["files"]
    t = get_target(target)
    assert ("--stronglyTyped" in recipe["trtexec"]) == t.strongly_typed
    assert f"--onnx={manifest['graphs']['fp32']['file']}" in recipe["trtexec"]
    assert (path / "build" / "build_engines.sh").stat().st_mode & 0o111
    result = CliRunner().invoke(cli, ["build", str(path), "--print-recipe"])
    assert result.exit_code == 0 and recipe["trtexec"] in result.output


def test_cpu_bundle_has_no_build_script(tmp_path):
    from test_export import export

    path, manifest = export(tmp_path)
    assert set(manifest["build"]) == {"runtime"} and not (path / "build").exists()  # the runtime's wheel only


def test_engine_from_another_version_or_gpu_is_refused():
    record = {"file": "engines/step_fp32.jetson-agx-orin.engine", "tensorrt_version": "10.3.0", "sm": "8.7"}
    assert incompatibility(record, "10.3.0.30", "8.7") is None
    assert "rebuild it here" in incompatibility(record, "10.7.0", "8.7")
    assert "SM 8.7; this device has TensorRT 10.3.0, SM 8.9" in incompatibility(record, "10.3.0", "8.9")


def test_manifest_json_round_trips_the_build_entry(tmp_path):
    from test_export import export

    from trm_export.runtime.manifest import read_manifest

    path, manifest = export(tmp_path, target="jetson-orin-nano")
    assert dataclasses.asdict(read_manifest(path))["build"] == json.loads((path / "manifest.json").read_text())["build"]


needs_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                                    reason="TensorRT is not installed (its pip packages download from NVIDIA; "
                                           "run scripts/gpu_check.sh on a GPU machine with TensorRT)")


@needs_tensorrt
@pytest.mark.tensorrt
def test_build_and_run_engine_matches_golden(tmp_path):
    from test_export import export

    from trm_export.runtime.selfcheck import verify_bundle
    from trm_export.targets.engines import build_bundle_engines

    path, _ = export(tmp_path, target="gpu-trt10")
    manifest = build_bundle_engines(path)
    assert "fp32" in manifest.build["engines"]
    assert verify_bundle(path, variant="fp32")


@pytest.mark.rounding
@pytest.mark.parametrize("target", [  # one TensorRT generation by default; the other two under -m slow (9 s each)
    pytest.param("jetson-xavier-nx", marks=pytest.mark.slow), "jetson-orin-nano",
    pytest.param("gpu-trt11", marks=pytest.mark.slow)])
def test_quantized_bundle_for_a_target_passes_its_checks_and_recipes(tmp_path, target):
    from test_export import export, random_puzzles, stable

    from trm_export.calibration import MixedOptions, QuantizeOptions, RecordOptions, add_variants, check_bundle
    from trm_export.calibration.data import PuzzleSet

    path, _ = export(tmp_path, target=target)
    p = random_puzzles(stable("trm-att-rope"), n=8)
    puzzles = PuzzleSet(p.tokens, p.puzzle_ids, None, "random test puzzles")
    options = QuantizeOptions(methods=("minmax",), mixed=False, record=RecordOptions(max_samples=24), threads=1,
                              progress=False, choose="int8", mixed_options=MixedOptions(max_accuracy_drop=100.0))
    result = add_variants(path, tmp_path / "q", options, calib=puzzles, heldout=puzzles)
    assert set(result.manifest.graphs) == {"fp32", "int8-minmax", "fp16"}  # fp16 made for TensorRT targets
    assert check_bundle(result.path)
    # the chosen variant is the bundle's default and the first the device builds (random puzzles have no labels:
    # the budget here only makes the choice deterministic)
    assert result.manifest.default_variant == "int8-minmax" == result.manifest.choice["chosen"]
    script = (result.path / "build" / "build_engines.sh").read_text()
    assert next(line for line in script.splitlines() if line.startswith("trtexec")) == \
        result.manifest.build["recipes"]["int8-minmax"]["trtexec"]
    recipes = result.manifest.build["recipes"]
    t = get_target(target)
    for variant, flags in (("int8-minmax", "--int8"), ("fp16", "--fp16")):
        command = recipes[variant]["trtexec"]
        assert (flags in command) != t.strongly_typed and ("--stronglyTyped" in command) == t.strongly_typed
        assert command in (result.path / "build" / "build_engines.sh").read_text()


# --- The engine path without TensorRT: recorded engines, and the backend the Solver picks --------------------------

def _fake_probe(path):
    return "10.3.0.30", "8.7"  # what an Orin with JetPack 6 reports; the engine file itself is never parsed here


def test_build_script_records_its_engines():
    script = make_recipe(get_target("jetson-agx-orin"), "int8", graph("int8")).trtexec_command()
    from trm_export.targets.recipe import build_script

    text = build_script([make_recipe(get_target("jetson-agx-orin"), "int8", graph("int8"))], get_target("jetson"))
    assert script in text and "trm-export build . --record" in text.splitlines()[-4]


def test_an_engine_built_by_the_script_is_recorded_checked_and_picked(tmp_path):
    from test_export import export

    from trm_export.errors import BundleError
    from trm_export.runtime.manifest import read_manifest
    from trm_export.runtime.solver import Solver, select_backend
    from trm_export.targets.engines import record_engines

    path, manifest = export(tmp_path, target="jetson-agx-orin")
    with pytest.raises(BundleError, match="no engine found where the recipes put them"):
        record_engines(path, probe=_fake_probe)
    engine = path / manifest["build"]["recipes"]["fp32"]["engine_file"]
    engine.parent.mkdir()
    engine.write_bytes(b"")
    with pytest.raises(BundleError, match="empty engine file"):
        record_engines(path, probe=_fake_probe)
    engine.write_bytes(b"serialized engine bytes")  # what trtexec --saveEngine wrote
    recorded = record_engines(path, probe=_fake_probe)
    record = recorded.build["engines"]["fp32"]
    assert (record["file"], record["tensorrt_version"], record["sm"]) == (engine.relative_to(path).as_posix(),
                                                                         "10.3.0.30", "8.7")
    assert record["file"] in read_manifest(path).files  # checksummed: a swapped engine is refused
    # On a device with TensorRT the engine runs; without it, a printed fall back or a refusal, never silence.
    assert select_backend(recorded, "fp32", "auto", tensorrt_here=True) == ("tensorrt", None)
    kind, note = select_backend(recorded, "fp32", "auto", tensorrt_here=False)
    assert kind == "onnxruntime" and "has a TensorRT engine" in note and "not importable" in note
    with pytest.raises(BundleError, match="TensorRT is not importable here"):
        select_backend(recorded, "fp32", "tensorrt", tensorrt_here=False)
    assert select_backend(recorded, "fp32", "onnxruntime", tensorrt_here=True) == ("onnxruntime", None)
    solver = Solver(path)  # this machine has no TensorRT
    assert solver.backend.name.startswith("onnxruntime") and "has a TensorRT engine" in solver.backend_note
    engine.write_bytes(b"another engine")
    with pytest.raises(BundleError, match="does not match its manifest"):
        Solver(path)


def test_no_engine_yet_is_said_and_tensorrt_is_refused(tmp_path):
    from test_export import export

    from trm_export.errors import BundleError
    from trm_export.runtime.solver import Solver

    path, _ = export(tmp_path, target="jetson-orin-nano")
    solver = Solver(path)
    assert "no TensorRT engine for variant 'fp32' yet" in solver.backend_note
    with pytest.raises(BundleError, match="no TensorRT engine for variant 'fp32'"):
        Solver(path, backend="tensorrt")
    cpu_path, _ = export(tmp_path, out="cpu-bundle")
    assert Solver(cpu_path).backend_note is None  # a CPU bundle runs what it was made for


def test_engine_records_are_typed_in_the_manifest(tmp_path):
    from test_export import export

    from trm_export.errors import BundleError
    from trm_export.runtime.manifest import read_manifest, seal

    path, manifest = export(tmp_path, target="jetson-agx-orin")
    engine = path / manifest["build"]["recipes"]["fp32"]["engine_file"]
    engine.parent.mkdir()
    engine.write_bytes(b"x")
    from trm_export.targets.engines import record_engines

    record_engines(path, probe=_fake_probe)
    data = json.loads((path / "manifest.json").read_text())
    data["build"]["engines"]["fp32"]["sm"] = "8.7; rm -rf /"
    (path / "manifest.json").write_text(seal(data))
    with pytest.raises(BundleError, match=r"build.engines.fp32.sm"):
        read_manifest(path)
