"""Deployment targets as data: one frozen record per device class, in one place.

Facts come from NVIDIA's TensorRT support matrices, the JetPack release notes and the Jetson module data sheets
(summarised in shared/reference/targets.md). Everything downstream (opset and IR of the exported graph, precision
defaults, the TensorRT build recipe, batch profiles) reads these records; nothing else hard-codes a version.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from trm_export.errors import TrmExportError


class UnknownTargetError(TrmExportError):
    """A target name that is neither a target nor an alias."""


@dataclass(frozen=True)
class BatchProfile:
    """TensorRT optimization profile over the batch axis (min, opt, max)."""

    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    runtime: str  # "onnxruntime" | "tensorrt" | "onnxruntime-web"
    max_opset: int
    max_ir_version: int
    default_precision: str  # "fp32" | "fp16" | "int8"
    batch: BatchProfile
    tensorrt: tuple[str, str] | None = None  # supported TensorRT version range, inclusive (major.minor)
    jetpack: str | None = None
    python: str | None = None  # the Python 3 this JetPack ships (its Ubuntu's); JetPack's TensorRT module is for it
    sm: tuple[str, ...] = ()  # compute capabilities an engine may be built for
    dla_cores: int = 0
    memory_gb: tuple[int, ...] = ()
    workspace_mb: int | None = None  # builder workspace cap (shared-memory boards need one)
    aliases: tuple[str, ...] = field(default=())
    # Module targets this one stands for when the module is decided on the device (`--target jetson`): its graphs
    # build on every one of them, and `trm-export build` / build_engines.sh pick the module's settings there.
    modules: tuple[str, ...] = ()

    @property
    def strongly_typed(self) -> bool:
        """TensorRT 11 removed precision flags: precision must live in the graph (Q/DQ, fp16 tensors)."""
        return self.tensorrt is not None and int(self.tensorrt[0].split(".")[0]) >= 11

    @property
    def is_jetson(self) -> bool:
        return self.jetpack is not None

    @property
    def decided_on_device(self) -> bool:
        return bool(self.modules)


_ORIN = dict(runtime="tensorrt", sm=("8.7",), default_precision="int8")
# JetPack 6 is Ubuntu 22.04 (Python 3.10), JetPack 5 Ubuntu 20.04 (Python 3.8), JetPack 7 Ubuntu 24.04 (Python 3.12).
_JP6 = dict(jetpack="6.1-6.2", python="3.10", tensorrt=("10.3", "10.3"), max_opset=20, max_ir_version=9)
_JP5 = dict(jetpack="5.1", python="3.8", tensorrt=("8.5", "8.5"), max_opset=17, max_ir_version=8)

_JETSON_MODULES = ("jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin", "jetson-xavier-nx", "jetson-agx-xavier")

TARGETS: tuple[Target, ...] = (
    Target("cpu", "Any x86-64 or ARM CPU through ONNX Runtime", runtime="onnxruntime", max_opset=20,
           max_ir_version=10, default_precision="fp32", batch=BatchProfile(1, 16, 64)),
    # Opset 17 / IR 8 is what the oldest of them (TensorRT 8.5, JetPack 5.1) parses; later TensorRTs read it too.
    Target("jetson", "Any Jetson Orin or Xavier on JetPack 5.1 to 7 (module settings decided on the device)",
           runtime="tensorrt", sm=("7.2", "8.7"), default_precision="int8", jetpack="5.1 to 7", python=None,
           tensorrt=("8.5", "11.99"), max_opset=17, max_ir_version=8, memory_gb=(4, 8, 16, 32, 64),
           batch=BatchProfile(1, 16, 64), modules=_JETSON_MODULES, aliases=("jetson-any",)),
    Target("jetson-orin-nano", "Jetson Orin Nano 4/8 GB (JetPack 6, TensorRT 10.3)", **_ORIN, **_JP6,
           dla_cores=0, memory_gb=(4, 8), workspace_mb=1024, batch=BatchProfile(1, 16, 64),
           aliases=("orin-nano",)),
    Target("jetson-orin-nx", "Jetson Orin NX 8/16 GB (JetPack 6, TensorRT 10.3)", **_ORIN, **_JP6,
           dla_cores=2, memory_gb=(8, 16), workspace_mb=2048, batch=BatchProfile(1, 32, 128),
           aliases=("orin-nx",)),
    Target("jetson-agx-orin", "Jetson AGX Orin 32/64 GB (JetPack 6, TensorRT 10.3)", **_ORIN, **_JP6,
           dla_cores=2, memory_gb=(32, 64), workspace_mb=4096, batch=BatchProfile(1, 64, 256),
           aliases=("agx-orin", "orin")),
    Target("jetson-agx-orin-jp7", "Jetson AGX Orin on JetPack 7.2.2 (TensorRT 11.4.1+, strongly typed)",
           **_ORIN, jetpack="7.2.2", python="3.12", tensorrt=("11.4", "11.99"), max_opset=25, max_ir_version=11,
           dla_cores=2, memory_gb=(32, 64), workspace_mb=4096, batch=BatchProfile(1, 64, 256)),
    Target("jetson-xavier-nx", "Jetson Xavier NX 8/16 GB (JetPack 5.1, TensorRT 8.5)", runtime="tensorrt",
           sm=("7.2",), default_precision="int8", **_JP5, dla_cores=2, memory_gb=(8, 16), workspace_mb=1024,
           batch=BatchProfile(1, 16, 64), aliases=("xavier-nx",)),
    Target("jetson-agx-xavier", "Jetson AGX Xavier 32/64 GB (JetPack 5.1, TensorRT 8.5)", runtime="tensorrt",
           sm=("7.2",), default_precision="int8", **_JP5, dla_cores=2, memory_gb=(32, 64), workspace_mb=2048,
           batch=BatchProfile(1, 32, 128), aliases=("agx-xavier", "xavier")),
    Target("gpu-trt10", "Desktop / data-centre NVIDIA GPU with TensorRT 10.x", runtime="tensorrt",
           tensorrt=("10.0", "10.99"), max_opset=20, max_ir_version=9, sm=("7.5", "8.0", "8.6", "8.9", "9.0"),
           default_precision="fp16", batch=BatchProfile(1, 64, 512), aliases=("gpu", "desktop", "trt10")),
    Target("gpu-trt11", "Desktop / data-centre NVIDIA GPU with TensorRT 11.x (strongly typed)", runtime="tensorrt",
           tensorrt=("11.0", "11.99"), max_opset=25, max_ir_version=11,
           sm=("7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0"), default_precision="fp16",
           batch=BatchProfile(1, 64, 512), aliases=("trt11",)),
    # onnxruntime-web's WebAssembly build is ONNX Runtime's CPU kernels compiled to WebAssembly (web/bundle.py);
    # it reads opsets and IR versions as far as the native build of its version does.
    Target("browser", "A web page: ONNX Runtime Web (WebAssembly, SIMD and threads) in a current browser",
           runtime="onnxruntime-web", max_opset=20, max_ir_version=10, default_precision="fp32",
           batch=BatchProfile(1, 16, 64), aliases=("web", "wasm")),
)


def _index() -> dict[str, Target]:
    index: dict[str, Target] = {}
    for target in TARGETS:
        for key in (target.name, *target.aliases):
            if key in index:
                raise AssertionError(f"target name {key!r} defined twice")
            index[key] = target
    return index


_BY_NAME = _index()


def target_names(with_aliases: bool = False) -> list[str]:
    return sorted(_BY_NAME) if with_aliases else [t.name for t in TARGETS]


def get_target(name: str) -> Target:
    """The target called `name` (or an alias of it); unknown names list the valid ones and the closest."""
    key = name.strip().lower()
    if key in _BY_NAME:
        return _BY_NAME[key]
    close = difflib.get_close_matches(key, list(_BY_NAME), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnknownTargetError(f"unknown target {name!r}.{hint} Valid targets: {', '.join(target_names())} "
                             f"(aliases: {', '.join(sorted(set(_BY_NAME) - set(target_names())))})")
