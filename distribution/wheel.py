"""The runtime travels with the bundle: trm-export as a wheel inside it, and optionally its dependencies' wheels.

trm-export is not on a package index a device can reach, and devices in the field are often offline: the bundle is
the one thing that gets there. So every export writes `runtime/trm_export-<version>-py3-none-any.whl`, packed from
the installed package itself (the same modules and metadata that made the bundle; pure Python, so one wheel fits
every device), byte for byte the same for the same installation (sorted entries, fixed dates: an export is
reproducible, #36). `--wheelhouse PLATFORM` adds numpy, onnxruntime and click as wheels for the device's platform
(`pip download --only-binary=:all:`), so `pip install --no-index --find-links runtime trm-export` needs no network.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import io
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

from trm_export.errors import TrmExportError

DISTRIBUTION = "trm-export"
RUNTIME_FOLDER = "runtime"
# The import packages of the distribution (pyproject.toml's [tool.setuptools] packages: a test keeps them equal)
# and their package data.
PACKAGES = ("trm_export", "trm_export.export", "trm_export.export.adapters", "trm_export.runtime",
            "trm_export.calibration", "trm_export.targets", "trm_export.tasks", "trm_export.reference_models",
            "trm_export.report", "trm_export.planning", "trm_export.distribution", "trm_export.web",
            "trm_export.triton")
PACKAGE_DATA = {"trm_export.reference_models": ("*/*", "*.md"),
                "trm_export.web": ("app/*", "tests/*.mjs", "package.json", "package-lock.json")}
_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say: every entry the same, every build the same bytes
# `--wheelhouse PLATFORM`: pip's platform tags for each machine a device can be, newest glibc first.
PLATFORMS = {
    "linux_aarch64": ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64", "linux_aarch64"),
    "linux_x86_64": ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64"),
}
# The runtime's requirements for a device. numpy stays below 2 on aarch64: JetPack's TensorRT and NVIDIA's Jetson
# onnxruntime-gpu wheels are built against NumPy 1 and do not import under 2.
WHEELHOUSE_REQUIREMENTS = {"linux_aarch64": ("numpy>=1.24,<2", "onnxruntime>=1.17", "click>=8.1"),
                           "linux_x86_64": ("numpy>=1.24", "onnxruntime>=1.17", "click>=8.1")}


class DistributionError(TrmExportError):
    """The runtime wheel or the wheelhouse cannot be made."""


def runtime_wheel() -> tuple[str, bytes]:
    """(file name, bytes) of the installed trm-export as a py3-none-any wheel."""
    # The installed dist-info (an editable install's too); a checkout's egg-info on sys.path carries PKG-INFO only.
    found = [d for d in importlib.metadata.distributions(name=DISTRIBUTION) if d.read_text("METADATA")]
    if not found:
        raise DistributionError(f"the installed {DISTRIBUTION} has no METADATA; reinstall it (pip install -e . in the "
                                "checkout)")
    dist = found[0]
    version = dist.version
    info = f"trm_export-{version}.dist-info"
    files: dict[str, bytes] = {}
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise DistributionError(f"the installed {DISTRIBUTION} has no package {package}: reinstall it "
                                    "(pip install -e . in the checkout)")
        folder = Path(next(iter(spec.submodule_search_locations)))
        prefix = package.replace(".", "/")
        for path in sorted(folder.glob("*.py")):
            files[f"{prefix}/{path.name}"] = path.read_bytes()
        for pattern in PACKAGE_DATA.get(package, ()):
            for path in sorted(folder.glob(pattern)):
                if path.is_file():
                    files[f"{prefix}/{path.relative_to(folder).as_posix()}"] = path.read_bytes()
    files[f"{info}/METADATA"] = dist.read_text("METADATA").encode()
    files[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: trm-export\nRoot-Is-Purelib: true\n"
                              b"Tag: py3-none-any\n")
    files[f"{info}/entry_points.txt"] = (dist.read_text("entry_points.txt") or "").encode()
    record = "".join(f"{name},sha256={_digest(data)},{len(data)}\n" for name, data in sorted(files.items()))
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for name, data in sorted(files.items()):  # RECORD last by name order is not required; sorted is stable
            entry = zipfile.ZipInfo(name, _DATE)
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = 0o644 << 16
            wheel.writestr(entry, data)
    return f"trm_export-{version}-py3-none-any.whl", buffer.getvalue()


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


_WHEELHOUSE = re.compile(r"(linux_aarch64|linux_x86_64)-cp3(\d{1,2})")


def parse_wheelhouse(platform: str) -> tuple[str, str]:
    """'linux_aarch64-cp310' -> ('linux_aarch64', '310'); a clear line for anything else."""
    match = _WHEELHOUSE.fullmatch(platform or "")
    if not match or not 8 <= int(match.group(2)) <= 13:
        raise DistributionError(f"--wheelhouse {platform!r}: expected MACHINE-cp3X with MACHINE one of "
                                f"{', '.join(PLATFORMS)} and Python 3.8-3.13 (JetPack 6: linux_aarch64-cp310, JetPack "
                                "5: linux_aarch64-cp38, this kind of PC: linux_x86_64-cp311)")
    return match.group(1), "3" + match.group(2)


def download_wheelhouse(platform: str, folder: Path, log: Callable[[str], None] = print) -> list[Path]:
    """The runtime's dependency wheels for `platform` into `folder` (pip download, binary wheels only). Needs a
    package index (PyPI, or the one pip is configured for) on the exporting machine, never on the device."""
    machine, python = parse_wheelhouse(platform)
    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.iterdir())
    command = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--quiet",
               "--only-binary=:all:", "--dest", str(folder), "--python-version", python, "--implementation", "cp",
               *[arg for tag in PLATFORMS[machine] for arg in ("--platform", tag)],
               *WHEELHOUSE_REQUIREMENTS[machine]]
    log(f"wheelhouse for {platform}: pip download {' '.join(WHEELHOUSE_REQUIREMENTS[machine])}")
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DistributionError(f"--wheelhouse {platform}: pip download failed ({reason}); the exporting machine "
                                "needs a package index (PyPI or a mirror pip is configured for)")
    return sorted(set(folder.iterdir()) - before)
