"""Which Jetson this is, and the engine-build settings that follow: decided on the device, from what it reports.

A `--target jetson` bundle carries graphs every supported Jetson builds (opset 17, IR 8: TensorRT 8.5 on JetPack 5.1
reads them, and so does every later TensorRT). What differs per module is decided here, where the engines are
built: the module (from `/proc/device-tree/model`), the TensorRT version (the one that will build: the `tensorrt`
module's or trtexec's, else the one the L4T release in `/etc/nv_tegra_release` ships), the builder workspace (the
module's cap, lowered to a quarter of the memory available now: CPU and GPU share it), the batch profile and the DLA
cores. `build/build_engines.sh` makes the same decision in shell (targets/recipe.py, `device_build_script`); the
tests run both on injected devices and require them to agree.

Runs on the device: Python 3.8, no torch.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from trm_export.errors import TrmExportError
from trm_export.targets.registry import Target, get_target

# Module names in /proc/device-tree/model, most specific first (an "Orin NX" must not match a plain "Orin").
MODULES: tuple[tuple[str, str], ...] = (
    ("Orin Nano", "jetson-orin-nano"),
    ("Orin NX", "jetson-orin-nx"),
    ("AGX Orin", "jetson-agx-orin"),
    ("Xavier NX", "jetson-xavier-nx"),
    ("AGX Xavier", "jetson-agx-xavier"),
    ("Jetson-AGX", "jetson-agx-xavier"),  # what early AGX Xavier device trees say
)
# Modules TensorRT 8.5+ no longer reaches (JetPack 4.6 at most: TensorRT 8.2, ONNX opset 13, SM 5.3 / 6.2).
TOO_OLD = ("Jetson Nano", "Jetson TX2", "Jetson TX1")
# An unknown module (a newer one, a carrier board that renames itself) gets the smallest Orin's settings.
FALLBACK_MODULE = "jetson-orin-nano"
# L4T release (major, lowest revision) -> (JetPack, the TensorRT it ships), from NVIDIA's JetPack release notes; the
# row with the same major and the highest revision reached applies. L4T R38 (JetPack 7) ships TensorRT 10.13 or 11
# depending on the release: there the TensorRT that builds must say its own version.
L4T_RELEASES: tuple[tuple[tuple[int, int], str, str], ...] = (
    ((35, 0), "5.1", "8.5.2"),
    ((36, 0), "6.0", "8.6.2"),
    ((36, 4), "6.1/6.2", "10.3.0"),
)
MIN_TENSORRT = (8, 5)
WORKSPACE_FLOOR_MB = 256
ROOT = Path("/")  # where /proc and /etc are read from; tests point it at an injected device


class DeviceError(TrmExportError):
    """This machine cannot build the bundle's engines (a module or TensorRT too old, or not a Jetson at all)."""


@dataclass(frozen=True)
class DeviceFacts:
    """What the device says it is. Every field may be None: a field that could not be read."""

    model: str | None  # /proc/device-tree/model, e.g. "NVIDIA Jetson Orin Nano Developer Kit"
    l4t: tuple[int, int] | None  # /etc/nv_tegra_release: "# R36 (release), REVISION: 4.0" -> (36, 4)
    tensorrt: str | None  # the TensorRT that will build, e.g. "10.3.0.30"
    memory_mb: int | None  # MemTotal
    available_mb: int | None  # MemAvailable


@dataclass(frozen=True)
class DeviceSettings:
    """The build settings decided for this device, printed before a build and recorded with each engine."""

    module: str  # a module target's name
    known_module: bool
    jetpack: str | None
    tensorrt: str  # version the recipes are made for
    tensorrt_from: str  # where that version came from
    workspace_mb: int
    batch: tuple[int, int, int]
    dla_cores: int
    facts: DeviceFacts

    def target(self) -> Target:
        """The module's target with this device's TensorRT, workspace and graph limits: what the recipes use."""
        base = get_target(self.module)
        major_minor = ".".join(self.tensorrt.split(".")[:2])
        opset, ir = ((17, 8) if _version(self.tensorrt) < (10, 0) else (20, 9) if _version(self.tensorrt) < (11, 0)
                     else (25, 11))
        return dataclasses.replace(base, tensorrt=(major_minor, major_minor), max_opset=opset, max_ir_version=ir,
                                   workspace_mb=self.workspace_mb, jetpack=self.jetpack or base.jetpack)

    def describe(self) -> str:
        facts = self.facts
        model = facts.model or "unknown (no /proc/device-tree/model)"
        unknown = "" if self.known_module else f" (not a module trm-export knows: {self.module}'s settings)"
        memory = (f"{facts.available_mb} of {facts.memory_mb} MB available" if facts.memory_mb and facts.available_mb
                  else "memory not readable")
        return (f"device: {model}{unknown}; JetPack {self.jetpack or 'unknown'}, TensorRT {self.tensorrt} "
                f"({self.tensorrt_from}); {memory} -> workspace {self.workspace_mb} MB, batch "
                f"{'/'.join(str(b) for b in self.batch)}, DLA cores {self.dla_cores}")

    def record(self) -> dict:
        """The manifest's record of what was decided and from what (plain JSON)."""
        return {"model": self.facts.model, "module": self.module, "known_module": self.known_module,
                "jetpack": self.jetpack, "tensorrt": self.tensorrt, "tensorrt_from": self.tensorrt_from,
                "memory_mb": self.facts.memory_mb, "available_mb": self.facts.available_mb,
                "workspace_mb": self.workspace_mb, "batch": list(self.batch), "dla_cores": self.dla_cores}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def _read(rel: str) -> str | None:
    try:
        return (ROOT / rel).read_bytes()[:4096].decode("utf-8", "replace")
    except OSError:
        return None


def parse_l4t(text: str | None) -> tuple[int, int] | None:
    match = re.search(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def parse_meminfo(text: str | None) -> tuple[int | None, int | None]:
    """(MemTotal, MemAvailable) in MB from /proc/meminfo."""
    values = {key: int(kb) // 1024 for key, kb in re.findall(r"^(MemTotal|MemAvailable):\s+(\d+) kB", text or "",
                                                                re.MULTILINE)}
    return values.get("MemTotal"), values.get("MemAvailable")


def tensorrt_version_here() -> str | None:
    try:
        import tensorrt  # noqa: PLC0415 - optional, JetPack's
    except ImportError:
        return None
    return str(tensorrt.__version__)


def read_device_facts(tensorrt: str | None = None) -> DeviceFacts:
    """This device's facts (from ROOT); `tensorrt` is the building TensorRT's version when the caller knows it."""
    model = _read("proc/device-tree/model")
    model = model.replace("\x00", "").strip() if model else None
    memory, available = parse_meminfo(_read("proc/meminfo"))
    return DeviceFacts(model=model or None, l4t=parse_l4t(_read("etc/nv_tegra_release")),
                       tensorrt=tensorrt or tensorrt_version_here(), memory_mb=memory, available_mb=available)


def module_of(model: str | None) -> str | None:
    """The module target a device-tree model names, None for an unknown one; DeviceError for a retired module."""
    for words, name in MODULES:  # case-sensitive, as the build script's `case` is
        if model and words in model:
            return name
    for words in TOO_OLD:
        if model and words in model:
            raise DeviceError(f"this device is a {model.strip()}: TensorRT 8.5 or newer (JetPack 5.1+, an Orin or "
                              "Xavier module) is needed to build these graphs; its JetPack 4.6 stops at TensorRT 8.2 "
                              "and ONNX opset 13. Run the bundle on ONNX Runtime (`--backend onnxruntime`)")
    return None


def jetpack_of(l4t: tuple[int, int] | None) -> tuple[str, str] | None:
    """(JetPack, its TensorRT) for an L4T release, None when unknown or older than JetPack 5.1."""
    found = None
    for (major, revision), jetpack, tensorrt in L4T_RELEASES:
        if l4t is not None and l4t[0] == major and l4t[1] >= revision:
            found = (jetpack, tensorrt)
    return found


def workspace_for(cap_mb: int, available_mb: int | None) -> int:
    """The module's cap, or a quarter of the memory available now, whichever is less (multiples of 256 MB, at least
    256): CPU and GPU share a Jetson's memory, and a build that exhausts it is killed half-way."""
    if available_mb is None:
        return cap_mb
    quarter = max(WORKSPACE_FLOOR_MB, available_mb // 4 // 256 * 256)
    return min(cap_mb, quarter)


def decide(facts: DeviceFacts, module: str | None = None) -> DeviceSettings:
    """The build settings for this device. `module` (a target name) overrides what the device tree says."""
    if module is not None:
        target = get_target(module)
        if not target.is_jetson or target.name == "jetson":
            raise DeviceError(f"--module {module!r} is not a Jetson module; one of: "
                              + ", ".join(sorted(set(dict(MODULES).values()))))
        name, known = target.name, True
    else:
        found = module_of(facts.model)
        name, known = found or FALLBACK_MODULE, found is not None
    base = get_target(name)
    release = jetpack_of(facts.l4t)
    if facts.tensorrt:
        tensorrt, source = facts.tensorrt, "the TensorRT that builds"
    elif release:
        tensorrt, source = release[1], f"L4T R{facts.l4t[0]}.{facts.l4t[1]} ships it"
    elif module is not None:  # named by the user (printing a module's recipes off the device)
        tensorrt, source = base.tensorrt[0], f"{base.name}'s JetPack {base.jetpack}"
    else:
        raise DeviceError("cannot tell the TensorRT version of this device: `import tensorrt` fails and "
                          "/etc/nv_tegra_release names no JetPack 5.1+ release. Install the TensorRT of JetPack "
                          "(`sudo apt install nvidia-jetpack`), or name the module: --module jetson-orin-nano")
    if _version(tensorrt)[:2] < MIN_TENSORRT:
        raise DeviceError(f"TensorRT {tensorrt} is too old for these graphs (opset 17 needs TensorRT 8.5+, JetPack "
                          "5.1+): upgrade JetPack, or run the bundle on ONNX Runtime (`--backend onnxruntime`)")
    if base.sm == ("7.2",) and _version(tensorrt) >= (9, 0):
        raise DeviceError(f"TensorRT {tensorrt} on a Xavier ({facts.model}): NVIDIA ships Xavier up to JetPack 5.1 "
                          "(TensorRT 8.5); the version read is not one this module runs")
    jetpack = release[0] if release else None
    workspace = workspace_for(base.workspace_mb or 1024, facts.available_mb)
    batch = (base.batch.min, base.batch.opt, base.batch.max)
    return DeviceSettings(module=name, known_module=known, jetpack=jetpack, tensorrt=tensorrt,
                          tensorrt_from=source, workspace_mb=workspace, batch=batch, dla_cores=base.dla_cores,
                          facts=facts)


def module_mismatch(target: Target, facts: DeviceFacts) -> str | None:
    """A line for a module-specific bundle (`--target jetson-agx-orin`) on another module, else None."""
    if not target.is_jetson or target.decided_on_device:
        return None
    try:
        found = module_of(facts.model)
    except DeviceError as exc:
        return f"note: {exc}"
    if found is None or target.name.startswith(found):  # jetson-agx-orin-jp7 is an AGX Orin too
        return None
    return (f"note: this bundle is for {target.name}, but this device is a {facts.model} ({found}): its build "
            "settings (DLA cores, workspace, batch profile) are the other module's. Re-export with --target jetson "
            f"(settings decided on the device) or --target {found}")
