"""Build TensorRT engines with the Python API, for TensorRT 8.5, 10.x and 11.x, from a BuildRecipe.

Written against NVIDIA's documented Python API of each major version; TensorRT is imported only when a build is
asked for, so everything else works without it. Not yet run on hardware in this project's CI (no GPU there):
`scripts/gpu_check.sh` exercises it on a machine that has TensorRT and a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trm_export.errors import TrmExportError
from trm_export.targets.recipe import BuildRecipe


class TensorRTUnavailable(TrmExportError):
    """TensorRT (or a GPU) is not present: build on the device with the bundle's recipe instead."""


@dataclass(frozen=True)
class EngineRecord:
    """What the manifest records about a built engine; a runtime refuses an engine built elsewhere."""

    variant: str
    file: str
    tensorrt_version: str
    sm: str
    dla_core: int | None
    batch: tuple[int, int, int]


def import_tensorrt():
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional dependency, imported lazily on purpose
    except ImportError as exc:
        raise TensorRTUnavailable(
            f"TensorRT is not importable here ({exc}). On a Jetson it comes with JetPack; on a desktop GPU "
            "`pip install trm-export[tensorrt]`. Or run the bundle's build/build_engines.sh on the device.") from None
    return trt


def current_sm() -> str:
    """Compute capability of GPU 0 as 'major.minor' (via cuda-python, or torch when present)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            cudart = None
    if cudart is not None:
        err, major = cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, 0)
        err2, minor = cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, 0)
        if int(err) == 0 and int(err2) == 0:
            return f"{major}.{minor}"
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return f"{major}.{minor}"
    except ImportError:
        pass
    raise TensorRTUnavailable("no CUDA GPU found (neither cuda-python nor torch sees one)")


def build_engine(bundle: Path, recipe: BuildRecipe, verbose: bool = False) -> EngineRecord:
    """Build `recipe` inside `bundle` (engine file and timing cache are written there)."""
    trt = import_tensorrt()
    version = trt.__version__
    major = int(version.split(".")[0])
    if major != recipe.tensorrt_major:
        raise TrmExportError(f"this host has TensorRT {version}; the recipe is for TensorRT {recipe.tensorrt_major}.x "
                             f"({recipe.target}). Build on the target device or pick the matching target")
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if major < 10:  # explicit batch is implied (and the flag deprecated) from TensorRT 10
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if recipe.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    onnx_path = bundle / recipe.onnx_file
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TrmExportError(f"TensorRT {version} cannot parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    if recipe.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, recipe.workspace_mb << 20)
    if major >= 10:
        config.builder_optimization_level = recipe.builder_optimization_level
    for flag in recipe.precision_flags:  # empty for fp32 and for strongly typed networks (TensorRT 11)
        config.set_flag({"fp16": trt.BuilderFlag.FP16, "int8": trt.BuilderFlag.INT8}[flag])
    if recipe.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = recipe.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in recipe.shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = bundle / recipe.timing_cache
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TrmExportError(f"TensorRT {version} failed to build {recipe.onnx_file} for {recipe.target}")
    engine_path = bundle / recipe.engine_file
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    batch = next(iter(recipe.shapes.values()))
    return EngineRecord(recipe.variant, recipe.engine_file, version, current_sm(), recipe.dla_core,
                        (batch[0][0], batch[1][0], batch[2][0]))
