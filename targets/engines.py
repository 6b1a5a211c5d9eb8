"""Recipes and engines of a bundle: what `export` writes for a TensorRT target, what `trm-export build` does.

At export the bundle gets `build/build_engines.sh` (the exact trtexec commands for its target's TensorRT
version) and the recipes in `manifest.build`. On a machine with TensorRT and a GPU, `trm-export build BUNDLE`
runs the same recipes through the Python API and records each engine (file, TensorRT version, SM) in the
manifest, whose checksums are then updated; after build_engines.sh (trtexec), `trm-export build BUNDLE
--record` checks and records the engines it wrote (the script runs it when trm-export is installed).

A `--target jetson` bundle is for whichever module it lands on: its script and `trm-export build` read the device
(targets/jetson_device.py) and build with that module's settings; the manifest then records what was decided.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from trm_export.errors import BundleError
from trm_export.runtime.manifest import MANIFEST_NAME, Manifest, member, read_manifest, sha256_file
from trm_export.targets.jetson_device import DeviceSettings, decide, read_device_facts
from trm_export.targets.recipe import BuildRecipe, build_script, device_build_script, graph_stem, make_recipe
from trm_export.targets.registry import Target, get_target

BUILD_SCRIPT = "build/build_engines.sh"


def _ordered_graphs(manifest: Manifest) -> list:
    """(variant, graph) pairs, the bundle's chosen variant first (built first on the device), then by name."""
    return [(name, manifest.graphs[name]) for name in sorted(manifest.graphs,
                                                             key=lambda v: (v != manifest.default_variant, v))]


def recipes_for(manifest: Manifest, target: Target, dla_core: int | None = None,
                variants: list[str] | None = None) -> list[BuildRecipe]:
    """Recipes for `variants` (default: every graph, the bundle's chosen variant first)."""
    names = variants or [name for name, _ in _ordered_graphs(manifest)]
    unknown = sorted(set(names) - set(manifest.graphs))
    if unknown:
        from trm_export.errors import BundleError

        raise BundleError(f"requested variants {unknown}; this bundle has {sorted(manifest.graphs)}")
    if dla_core is not None:  # DLA takes fp16 / int8 only
        names = [n for n in names if manifest.graphs[n].precision != "fp32"]
    return [make_recipe(target, name, manifest.graphs[name], dla_core=dla_core) for name in names]


def recipe_manifest_entry(recipes: list[BuildRecipe]) -> dict:
    recipes_by_variant = {r.variant: {"trtexec": r.trtexec_command(), "engine_file": r.engine_file,
                                      "tensorrt_major": r.tensorrt_major, "strongly_typed": r.strongly_typed,
                                      "precision_flags": list(r.precision_flags)} for r in recipes}
    return {"script": BUILD_SCRIPT, "recipes": recipes_by_variant, "engines": {}}


def device_recipe_entry(manifest: Manifest, target: Target) -> dict:
    """The manifest's build entry of a bundle whose module is decided on the device: what each graph becomes
    (precision, engine file per module) and the modules it is for; the commands themselves are the device's."""
    recipes = {}
    for name, graph in _ordered_graphs(manifest):
        recipes[name] = {"onnx_file": graph.file, "precision": graph.precision,
                         "engine_file": f"engines/{graph_stem(graph.file)}.MODULE.engine"}
    return {"script": BUILD_SCRIPT, "decided_on_device": list(target.modules), "recipes": recipes, "engines": {}}


def _expected(manifest: Manifest, target: Target) -> tuple[str, dict]:
    """(build script text, manifest build entry) that the manifest's target and graphs give."""
    if target.decided_on_device:
        modules = [get_target(m) for m in target.modules]
        return device_build_script(_ordered_graphs(manifest), target, modules), device_recipe_entry(manifest, target)
    recipes = recipes_for(manifest, target)
    return build_script(recipes, target), recipe_manifest_entry(recipes)


def write_build_recipes(bundle_dir: Path, manifest: Manifest) -> dict:
    """For a TensorRT target, write build/build_engines.sh into `bundle_dir`; return the manifest's build entry."""
    target = get_target(manifest.target)
    if target.tensorrt is None:
        return {}
    text, entry = _expected(manifest, target)
    script = bundle_dir / BUILD_SCRIPT
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text + "\n")
    script.chmod(0o755)
    return entry


def check_build_recipes(bundle: str | Path, manifest: Manifest) -> None:
    """Refuse (BundleError) a bundle whose build script or recipes are not what its typed manifest data gives.

    build/build_engines.sh is what a device owner is told to run, and the manifest's digest is not a signature:
    a stranger can replace the script and reseal. So the script and the recorded recipes are derived again here,
    from the manifest's target and graphs through the same quoting, and must be equal byte for byte.
    """
    bundle = Path(bundle)
    target = get_target(manifest.target)
    if target.tensorrt is None:
        if BUILD_SCRIPT in manifest.files or manifest.build.get("recipes"):
            raise BundleError(f"{bundle}: a {target.name} bundle has no build script or recipes, but this one lists "
                              "them; refusing (re-export the bundle)")
        return
    text, entry = _expected(manifest, target)
    if (manifest.build.get("recipes") != entry["recipes"]
            or manifest.build.get("decided_on_device") != entry.get("decided_on_device")):
        raise BundleError(f"{bundle}: the manifest's build recipes are not the commands its graphs and target give "
                          "(edited after export); refusing; re-export the bundle, or see `trm-export build "
                          f"{bundle} --print-recipe`")
    script = member(bundle, BUILD_SCRIPT)
    if script.is_file() and script.read_bytes() != (text + "\n").encode():
        raise BundleError(f"{bundle / BUILD_SCRIPT}: not the script this bundle's manifest gives (edited after "
                          f"export): do not run it; `trm-export build {bundle}` builds from the manifest itself, "
                          "or re-export the bundle")


def build_target(manifest: Manifest, settings: DeviceSettings | None = None,
                 module: str | None = None) -> tuple[Target, DeviceSettings | None]:
    """(the target whose recipes build here, the device settings decided for it): a `--target jetson` bundle's
    module is read from this device (or `module`, or injected `settings`); a CPU bundle builds for the local GPU."""
    target = get_target(manifest.target)
    if target.decided_on_device:
        settings = settings or decide(read_device_facts(), module=module)
        return settings.target(), settings
    if target.tensorrt is None:
        return get_target("gpu-trt10"), None  # a CPU bundle can still be built for the local GPU
    return target, None


def build_bundle_engines(bundle: str | Path, variants: list[str] | None = None, dla_core: int | None = None,
                         verbose: bool = False, settings: DeviceSettings | None = None) -> Manifest:
    """Build engines for the bundle's target on this machine and record them in the manifest."""
    from trm_export.targets.tensorrt_build import build_engine

    bundle = Path(bundle)
    manifest = read_manifest(bundle, verify=True)
    target, settings = build_target(manifest, settings)
    records = {}
    for recipe in recipes_for(manifest, target, dla_core=dla_core, variants=variants):
        records[recipe.variant] = {**dataclasses.asdict(build_engine(bundle, recipe, verbose=verbose)),
                                   "built_by": "trm-export build", "precision_flags": list(recipe.precision_flags)}
    return _record(bundle, manifest, target, records, settings)


def _probe_here(path: Path) -> tuple[str, str]:
    """Deserialize `path` with this machine's TensorRT: it must load here, or it was built elsewhere."""
    from trm_export.targets.tensorrt_build import current_sm, import_tensorrt

    trt = import_tensorrt()
    engine = trt.Runtime(trt.Logger(trt.Logger.ERROR)).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise BundleError(f"{path}: TensorRT {trt.__version__} cannot load this engine (built by another TensorRT "
                          "version or for another GPU, or truncated): build it again here")
    return trt.__version__, current_sm()


def record_engines(bundle: str | Path, variants: list[str] | None = None,
                   probe: Callable[[Path], tuple[str, str]] | None = None,
                   settings: DeviceSettings | None = None) -> Manifest:
    """Find the engines that build/build_engines.sh (trtexec) wrote, check each on this machine and record them.

    An engine is looked for where the bundle's recipe puts it (GPU, then each DLA core). Checked: it is a plain
    file inside the bundle, TensorRT here deserializes it (its TensorRT version and SM are then this machine's),
    and its sha256 goes into the manifest's checksums, so that a later swap is refused like any edited file.
    `probe(engine file) -> (TensorRT version, SM)` and `settings` (what the device is) stand in for TensorRT and
    the device in tests. Raises BundleError when no engine is found.
    """
    bundle = Path(bundle)
    manifest = read_manifest(bundle, verify=True)
    target, settings = build_target(manifest, settings)
    probe = probe or _probe_here
    records = {}
    for dla in (None, *range(target.dla_cores)):
        for recipe in recipes_for(manifest, target, dla_core=dla, variants=variants):
            if recipe.variant in records:
                continue
            path = bundle / recipe.engine_file
            if path.is_symlink() or not path.is_file():
                continue
            engine = member(bundle, recipe.engine_file)
            if engine.stat().st_size == 0:
                raise BundleError(f"{engine}: empty engine file (a build was interrupted): run build/build_engines.sh "
                                  "again")
            version, sm = probe(engine)
            batch = next(iter(recipe.shapes.values()))
            records[recipe.variant] = {"variant": recipe.variant, "file": recipe.engine_file,
                                       "tensorrt_version": version, "sm": sm, "dla_core": recipe.dla_core,
                                       "batch": [batch[0][0], batch[1][0], batch[2][0]], "built_by": "trtexec",
                                       "precision_flags": list(recipe.precision_flags)}
    if not records:
        raise BundleError(f"{bundle}: no engine found where the recipes put them (engines/*.{target.name}.engine): "
                          "run build/build_engines.sh on the device first, or `trm-export build` to build and record")
    return _record(bundle, manifest, target, records, settings)


def _record(bundle: Path, manifest: Manifest, target: Target, records: dict[str, dict],
            settings: DeviceSettings | None = None) -> Manifest:
    """The manifest with `records` as its engines (with the device settings they were built with), their
    checksums (and the timing cache's) in `files`, sealed and written atomically."""
    build = dict(manifest.build) or recipe_manifest_entry(recipes_for(manifest, target))
    if settings is not None:
        records = {name: {**rec, "device": settings.record()} for name, rec in records.items()}
    build["engines"] = {**build.get("engines", {}), **records}
    files = {**manifest.files}
    for rec in records.values():
        files[rec["file"]] = sha256_file(bundle / rec["file"])
    cache = bundle / "engines" / "timing.cache"
    if cache.is_file() and not cache.is_symlink():
        files["engines/timing.cache"] = sha256_file(cache)
    updated = dataclasses.replace(manifest, build=build, files=files)
    tmp = bundle / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(updated.to_json())
    os.replace(tmp, bundle / MANIFEST_NAME)
    return read_manifest(bundle, verify=False)  # what a reader will see: the schema checks the records too
