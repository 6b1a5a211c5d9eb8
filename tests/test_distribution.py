"""The runtime travels with the bundle (issue #37): trm-export's wheel in every bundle, its dependencies' wheels
with --wheelhouse, and a device that installs from the bundle alone and runs the guide's commands."""

from __future__ import annotations

import base64
import hashlib
import platform
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import tomllib
from conftest import SUDOKU_SHAPED
from official_format import write_official_checkpoint

from trm_export.distribution.wheel import (
    PACKAGES,
    DistributionError,
    download_wheelhouse,
    parse_wheelhouse,
    runtime_wheel,
)
from trm_export.export.pipeline import ExportOptions, export_bundle
from trm_export.runtime.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_package_and_is_the_same_bytes_every_time():
    """Every import package pyproject ships is in the wheel, every module of it, with a RECORD pip checks; two
    builds are byte-identical (an export is reproducible)."""
    assert set(PACKAGES) == set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    name, data = runtime_wheel()
    assert runtime_wheel() == (name, data) and name.endswith("-py3-none-any.whl")
    wheel = zipfile.ZipFile(__import__("io").BytesIO(data))
    names = set(wheel.namelist())
    for folder, package in (("runtime", "trm_export/runtime"), ("planning", "trm_export/planning"),
                            ("triton_serving", "trm_export/triton"), ("core", "trm_export")):
        assert {f"{package}/{p.name}" for p in (ROOT / folder).glob("*.py")} <= names, folder
    assert "trm_export/web/app/index.html" in names
    info = name.split("-py3")[0] + ".dist-info"
    record = wheel.read(f"{info}/RECORD").decode().splitlines()
    for line in record:
        path, digest, size = line.rsplit(",", 2)
        if path.endswith("RECORD"):
            continue
        body = wheel.read(path)
        assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b"=").decode()
        assert int(size) == len(body)
    metadata = wheel.read(f"{info}/METADATA").decode()
    assert "Requires-Dist: onnxruntime>=1.17" in metadata and "Requires-Python: >=3.8" in metadata
    assert "trm-export = trm_export.cli:main" in wheel.read(f"{info}/entry_points.txt").decode()


def test_a_mistyped_wheelhouse_is_one_line():
    for bad in ("aarch64", "linux_aarch64-cp27", "linux_arm-cp310", "linux_aarch64-cp310; rm -rf /"):
        with pytest.raises(DistributionError, match="expected MACHINE-cp3X"):
            parse_wheelhouse(bad)
    assert parse_wheelhouse("linux_aarch64-cp38") == ("linux_aarch64", "38")


@pytest.fixture(scope="module")
def offline_bundle(tmp_path_factory) -> Path:
    """A cpu bundle with the wheelhouse of this very machine (needs PyPI on the exporting side, as a user's)."""
    root = tmp_path_factory.mktemp("offline")
    here = f"linux_{platform.machine()}-cp{sys.version_info[0]}{sys.version_info[1]}"
    out = root / "sudoku.bundle"
    export_bundle(write_official_checkpoint(root / "ck", SUDOKU_SHAPED), out,
                  ExportOptions(progress=False, parity_puzzles=4, golden_puzzles=2, wheelhouse=here))
    return out


def test_an_offline_device_follows_the_bundle_guide_as_written(offline_bundle, tmp_path):
    """The bundle README's commands, as written, in the bundle folder: the install line into a fresh venv that
    sees no package index (the venv made beforehand stands for its `python3 -m venv` line), then every command of
    "Check it, then solve puzzles" on the bundle's own sample puzzles. No PyTorch on that side."""
    from test_device_readme import fenced_blocks, section

    manifest = read_manifest(offline_bundle)
    runtime = manifest.build["runtime"]
    assert runtime["wheelhouse"].startswith("linux_") and runtime["wheel"] in manifest.files
    deps = runtime["dependencies"]
    assert deps and all(rel in manifest.files for rel in deps)  # checksummed like every file
    assert {p.split("/")[1].split("-")[0].lower() for p in deps} >= {"numpy", "onnxruntime", "click"}
    readme = (offline_bundle / "README.md").read_text()
    commands = []
    for title in ("Install the runtime on the device", "Check it, then solve puzzles"):
        for _, body in fenced_blocks(section(readme, title)):
            commands += [line.split("  #")[0].strip() for line in body.splitlines() if line.strip()]
    commands = [c for c in commands if not c.startswith(("python3 -m venv", "sudo "))]
    assert commands[0] == "pip install --no-index --find-links runtime trm-export"
    assert "trm-export run . --input samples/puzzles.txt" in commands
    env = tmp_path / "device-venv"
    venv.create(env, with_pip=True)
    path = f"{env / 'bin'}:/usr/bin:/bin"  # the venv activated; nothing of this machine's own Python
    for command in commands:
        ran = subprocess.run(["bash", "-c", command], cwd=offline_bundle, capture_output=True, text=True,
                             timeout=600, env={"PATH": path, "HOME": str(tmp_path), "PIP_NO_INDEX": "1",
                                               "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
        assert ran.returncode == 0, f"{command}\n{ran.stdout[-2000:]}\n{ran.stderr[-2000:]}"
    assert subprocess.run([str(env / "bin" / "python"), "-c", "import torch"], capture_output=True).returncode
    assert (offline_bundle / "solutions.txt").read_text().count("\n") == 5  # one line per sample puzzle


def test_an_aarch64_wheelhouse_holds_jetpack_wheels(tmp_path):
    """--wheelhouse linux_aarch64-cp310 (JetPack 6): aarch64 CPython 3.10 wheels of numpy (below 2: JetPack's
    TensorRT and NVIDIA's onnxruntime-gpu need NumPy 1), onnxruntime, and click. (In a bundle they are checksummed
    like every file: the test above.)"""
    names = [p.name for p in download_wheelhouse("linux_aarch64-cp310", tmp_path, log=lambda m: None)]
    binary = {n.split("-")[0].lower(): n for n in names if not n.endswith("-none-any.whl")}
    assert set(binary) >= {"numpy", "onnxruntime"}
    assert all("-cp310-" in n and "aarch64" in n for n in binary.values()), binary
    assert binary["numpy"].startswith("numpy-1.")
    assert any(n.startswith("click-") for n in names)
