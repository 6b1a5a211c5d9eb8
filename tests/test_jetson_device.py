"""One `--target jetson` bundle, right for the module it lands on: the settings are decided on the device.

Each device is injected as what it reports (its /proc/device-tree/model, /etc/nv_tegra_release, /proc/meminfo and
trtexec's banner). Both deciders run on it: `trm-export build` (targets/jetson_device.py) and the bundle's
build/build_engines.sh (run with a stand-in trtexec that logs its arguments); they must print and use the same
settings, and the script's commands must be the recipes `trm-export build` would build.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from trm_export.runtime.manifest import GraphSpec, TensorSpec
from trm_export.targets import jetson_device
from trm_export.targets.jetson_device import DeviceError, decide, read_device_facts
from trm_export.targets.recipe import device_build_script, make_recipe
from trm_export.targets.registry import get_target

GIB_KB = 1024 * 1024


def _graph(precision: str) -> GraphSpec:
    io = [TensorSpec(n, ["batch", 18, 32], "float32") for n in ("x", "z_H", "z_L")]
    return GraphSpec(f"graphs/step_{precision.replace('-', '_')}.onnx", precision, 17, 8, io, [])


GRAPHS = [("int8-entropy", _graph("int8")), ("fp32", _graph("fp32")), ("fp16", _graph("fp16"))]


def inject(root: Path, model: str | None, l4t: str | None, available_gib: float | None,
           total_gib: float = 8) -> Path:
    if model is not None:
        (root / "proc/device-tree").mkdir(parents=True)
        (root / "proc/device-tree/model").write_bytes(model.encode() + b"\0")  # device trees end with a NUL
    if available_gib is not None:
        (root / "proc").mkdir(exist_ok=True)
        (root / "proc/meminfo").write_text(f"MemTotal:       {int(total_gib * GIB_KB)} kB\nMemFree:  1000 kB\n"
                                           f"MemAvailable:   {int(available_gib * GIB_KB)} kB\n")
    if l4t is not None:
        (root / "etc").mkdir()
        (root / "etc/nv_tegra_release").write_text(f"# {l4t}, GCID: 36508470, BOARD: generic, EABI: aarch64\n")
    return root


# (model, L4T line, MemAvailable GiB, MemTotal GiB, trtexec's version number or None) ->
# (module, known, TensorRT major.minor, workspace MB, batch, DLA cores)
DEVICES = {
    "orin-nano-4gb-jp6.2": (("NVIDIA Jetson Orin Nano Developer Kit", "R36 (release), REVISION: 4.3", 2.9, 4, 100300),
                            ("jetson-orin-nano", True, "10.3", 512, (1, 16, 64), 0)),
    "orin-nx-16gb-jp6.1": (("NVIDIA Jetson Orin NX Engineering Reference Developer Kit",
                            "R36 (release), REVISION: 4.0", 13.5, 16, None),
                           ("jetson-orin-nx", True, "10.3", 2048, (1, 32, 128), 2)),
    "agx-orin-64gb-jp6.1": (("NVIDIA Jetson AGX Orin Developer Kit", "R36 (release), REVISION: 4.0", 58, 64, 100300),
                            ("jetson-agx-orin", True, "10.3", 4096, (1, 64, 256), 2)),
    "agx-orin-jp6.0-trt8.6": (("NVIDIA Jetson AGX Orin Developer Kit", "R36 (release), REVISION: 3.0", 28, 32, None),
                              ("jetson-agx-orin", True, "8.6", 4096, (1, 64, 256), 2)),
    "xavier-nx-jp5.1": (("NVIDIA Jetson Xavier NX Developer Kit", "R35 (release), REVISION: 4.1", 5.5, 8, 8502),
                        ("jetson-xavier-nx", True, "8.5", 1024, (1, 16, 64), 2)),
    "agx-orin-jp7-trt11": (("NVIDIA Jetson AGX Orin Developer Kit", "R38 (release), REVISION: 4.0", 50, 64, 110401),
                           ("jetson-agx-orin", True, "11.4", 4096, (1, 64, 256), 2)),
    "unknown-module": (("ACME RoboBrain carrier v2", "R36 (release), REVISION: 4.0", 6.0, 8, None),
                       ("jetson-orin-nano", False, "10.3", 1024, (1, 16, 64), 0)),
    "low-memory": (("NVIDIA Jetson Orin Nano Developer Kit", "R36 (release), REVISION: 4.0", 0.6, 4, None),
                   ("jetson-orin-nano", True, "10.3", 256, (1, 16, 64), 0)),
}


def script_bundle(tmp_path: Path) -> Path:
    """A folder with the any-Jetson build script of GRAPHS, where the script expects it."""
    bundle = tmp_path / "bundle"
    (bundle / "build").mkdir(parents=True)
    (bundle / "build/build_engines.sh").write_text(
        device_build_script(GRAPHS, get_target("jetson"), [get_target(m) for m in get_target("jetson").modules]))
    return bundle


def fake_trtexec(bin_dir: Path, version: int | None) -> Path:
    """A trtexec that prints the banner of `version` (none: like a trtexec that is not there) and, given arguments,
    logs them one per line and writes the engine it was asked for."""
    bin_dir.mkdir()
    log = bin_dir / "trtexec.log"
    banner = f'echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{version}] # trtexec"' if version else "echo usage"
    (bin_dir / "trtexec").write_text(
        "#!/bin/sh\n"
        f'[ "$#" -eq 0 ] && {{ {banner}; exit 1; }}\n'
        f'printf "%s\\n" "$@" >> "{log}"; echo ---- >> "{log}"\n'
        'for a in "$@"; do case "$a" in --saveEngine=*) printf engine > "${a#--saveEngine=}" ;; esac; done\n')
    (bin_dir / "trtexec").chmod(0o755)
    return log


def run_script(bundle: Path, root: Path, bin_dir: Path) -> subprocess.CompletedProcess:
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "TRM_DEVICE_ROOT": str(root), "HOME": str(bundle)}
    return subprocess.run(["sh", str(bundle / "build/build_engines.sh")], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def device(tmp_path, monkeypatch):
    def make(name: str):
        (model, l4t, available, total, trt), _ = DEVICES[name]
        root = inject(tmp_path / "device", model, l4t, available, total)
        monkeypatch.setattr(jetson_device, "ROOT", root)
        version = None if trt is None else (f"{trt // 10000}.{trt // 100 % 100}.{trt % 100}" if trt >= 100000
                                            else f"{trt // 1000}.{trt // 100 % 10}.{trt % 100}")
        return root, read_device_facts(tensorrt=version), trt
    return make


@pytest.mark.parametrize("name", sorted(DEVICES))
def test_the_device_decides_and_the_script_agrees(tmp_path, device, name):
    root, facts, trt = device(name)
    module, known, tensorrt, workspace, batch, dla = DEVICES[name][1]
    settings = decide(facts)
    decided = (settings.module, settings.known_module, ".".join(settings.tensorrt.split(".")[:2]),
               settings.workspace_mb, settings.batch, settings.dla_cores)
    assert decided == (module, known, tensorrt, workspace, batch, dla)
    assert settings.workspace_mb <= max(256, facts.available_mb // 4)  # CPU and GPU share the memory
    target = settings.target()
    assert target.strongly_typed == tensorrt.startswith("11")

    bundle = script_bundle(tmp_path)
    log = fake_trtexec(tmp_path / "bin", trt)
    done = run_script(bundle, root, tmp_path / "bin")
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stdout.splitlines() if line.startswith("device: ")]
    assert said == [f"device: {facts.model} -> {module}; JetPack {settings.jetpack or 'unknown'}, TensorRT {tensorrt} "
                    f"({'trtexec' if trt else 'L4T R' + '.'.join(map(str, facts.l4t)) + ' ships it'}); workspace "
                    f"{workspace} MB, batch {'/'.join(map(str, batch))}, DLA cores {dla}"]
    assert ("is not a module this bundle knows" in done.stdout) == (not known)
    # The script's commands are, argument for argument, the recipes `trm-export build` makes on this device.
    logged = [block.strip("\n").split("\n") for block in log.read_text().split("----\n") if block.strip()]
    assert logged == [make_recipe(target, v, g).trtexec_args()[1:] for v, g in GRAPHS]
    assert all(not any(a.startswith("--useDLACore") for a in args) for args in logged)
    assert (bundle / f"engines/step_int8.{module}.engine").is_file()


@pytest.mark.parametrize(("model", "l4t", "trt", "message"), [
    ("NVIDIA Jetson Nano Developer Kit", "R32 (release), REVISION: 7.1", None, "JetPack 4.6 stops at TensorRT 8.2"),
    ("NVIDIA Jetson AGX Orin Developer Kit", None, 8201, "too old for these graphs"),
    ("NVIDIA Jetson AGX Orin Developer Kit", None, None, "cannot tell the TensorRT version"),
    ("NVIDIA Jetson AGX Orin Developer Kit", "R38 (release), REVISION: 2.0", None, "cannot tell the TensorRT version"),
])
def test_a_device_that_cannot_build_is_told_why(tmp_path, monkeypatch, model, l4t, trt, message):
    root = inject(tmp_path / "device", model, l4t, 3.0)
    monkeypatch.setattr(jetson_device, "ROOT", root)
    version = f"{trt // 1000}.{trt // 100 % 10}.{trt % 100}" if trt else None
    with pytest.raises(DeviceError, match=message):
        decide(read_device_facts(tensorrt=version))
    bundle = script_bundle(tmp_path)
    log = fake_trtexec(tmp_path / "bin", trt)
    done = run_script(bundle, root, tmp_path / "bin")
    assert done.returncode == 1 and message in done.stderr and not log.exists()


def test_a_jetson_bundle_builds_records_and_says_what_was_decided(tmp_path, device):
    """End to end on an injected Orin Nano 4 GB: export --target jetson, run its script, record the engines."""
    from test_export import export

    from trm_export.runtime.manifest import read_manifest
    from trm_export.targets.engines import check_build_recipes, record_engines

    path, manifest = export(tmp_path, target="jetson")
    assert {(g["opset"], g["ir_version"]) for g in manifest["graphs"].values()} == {(17, 8)}  # TensorRT 8.5 reads it
    root, facts, trt = device("orin-nano-4gb-jp6.2")
    fake_trtexec(tmp_path / "bin", trt)
    done = run_script(path, root, tmp_path / "bin")
    assert done.returncode == 0, done.stderr
    settings = decide(facts)
    recorded = record_engines(path, probe=lambda _: ("10.3.0.30", "8.7"), settings=settings)
    engine = recorded.build["engines"]["fp32"]
    assert engine["file"] == "engines/step_fp32.jetson-orin-nano.engine" and engine["batch"] == [1, 16, 64]
    assert engine["device"]["module"] == "jetson-orin-nano" and engine["device"]["workspace_mb"] == 512
    assert engine["device"]["model"] == "NVIDIA Jetson Orin Nano Developer Kit"
    check_build_recipes(path, read_manifest(path))  # recording keeps the bundle's own recipes valid
    # The settings printed by `trm-export build` on this device are the script's.
    from click.testing import CliRunner

    from trm_export.cli import main as cli

    result = CliRunner().invoke(cli, ["build", str(path), "--print-recipe"])
    assert result.exit_code == 0, result.output
    assert decide(read_device_facts()).describe() in result.output  # this machine has no TensorRT: L4T's is used
    assert "(L4T R36.4 ships it)" in result.output and "--memPoolSize=workspace:512" in result.output
    result = CliRunner().invoke(cli, ["build", str(path), "--print-recipe", "--module", "jetson-agx-orin"])
    assert "--maxShapes=x:256x" in result.output and "jetson-agx-orin.engine" in result.output


def test_a_module_bundle_on_another_module_is_told_to_re_export(tmp_path, device):
    from click.testing import CliRunner
    from test_export import export

    from trm_export.cli import main as cli

    path, _ = export(tmp_path, target="jetson-agx-orin")
    device("orin-nano-4gb-jp6.2")
    result = CliRunner().invoke(cli, ["build", str(path), "--print-recipe"])
    assert result.exit_code == 0
    assert ("this bundle is for jetson-agx-orin, but this device is a NVIDIA Jetson Orin Nano Developer Kit "
            "(jetson-orin-nano)") in result.output and "--target jetson" in result.output
    assert os.environ.get("TRM_DEVICE_ROOT") is None


def test_the_floor_reproduces_nvidias_module_figures():
    """targets/floor.py's arithmetic against NVIDIA's published dense GPU figures (TOPS / TFLOPS)."""
    from trm_export.targets.floor import GPUS, gpus_for

    peak = {gpu.name: gpu for gpu in GPUS}
    assert round(peak["Orin Nano 8 GB"].peak("int8") / 1e12, 1) == 20.5
    assert round(peak["Orin NX 16 GB"].peak("int8") / 1e12, 1) == 30.1
    assert round(peak["AGX Orin 64 GB"].peak("int8") / 1e12, 1) == 85.2
    assert [round(peak["AGX Xavier"].peak(p) / 1e12, 1) for p in ("int8", "fp16")] == [22.6, 11.3]
    assert {g.target for g in gpus_for(get_target("jetson"))} == set(get_target("jetson").modules)
    assert [g.name for g in gpus_for(get_target("jetson-agx-orin-jp7"))] == ["AGX Orin 32 GB", "AGX Orin 64 GB"]
    assert gpus_for(get_target("gpu-trt10")) == [] and gpus_for(get_target("cpu")) == []
