"""Recipes and engines of a bundle: what `export` writes for a TensorRT target, what `trm-export build` does.

At export the bundle gets `build/build_engines.sh` (the exact trtexec commands for its target's TensorRT
version) and the recipes in `manifest.build`. On a machine with TensorRT and a GPU, `trm-export build BUNDLE`
runs the same recipes through the Python API and records each engine (file, TensorRT version, SM) in the
manifest, whose checksums are then updated.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from trm_export.runtime.manifest import MANIFEST_NAME, Manifest, read_manifest, sha256_file
from trm_export.targets.recipe import BuildRecipe, build_script, make_recipe
from trm_export.targets.registry import Target, get_target

BUILD_SCRIPT = "build/build_engines.sh"


def recipes_for(manifest: Manifest, target: Target, dla_core: int | None = None,
                variants: list[str] | None = None) -> list[BuildRecipe]:
    """Recipes for `variants` (default: every graph, the bundle's chosen variant first)."""
    names = variants or sorted(manifest.graphs, key=lambda v: (v != manifest.default_variant, v))
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


def write_build_recipes(bundle_dir: Path, manifest: Manifest) -> dict:
    """For a TensorRT target, write build/build_engines.sh into `bundle_dir`; return the manifest's build entry."""
    target = get_target(manifest.target)
    if target.tensorrt is None:
        return {}
    recipes = recipes_for(manifest, target)
    script = bundle_dir / BUILD_SCRIPT
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(build_script(recipes, target) + "\n")
    script.chmod(0o755)
    return recipe_manifest_entry(recipes)


def build_bundle_engines(bundle: str | Path, variants: list[str] | None = None, dla_core: int | None = None,
                         verbose: bool = False) -> Manifest:
    """Build engines for the bundle's target on this machine and record them in the manifest."""
    from trm_export.targets.tensorrt_build import build_engine

    bundle = Path(bundle)
    manifest = read_manifest(bundle, verify=True)
    target = get_target(manifest.target)
    if target.tensorrt is None:
        target = get_target("gpu-trt10")  # a CPU bundle can still be built for the local GPU
    records = {}
    for recipe in recipes_for(manifest, target, dla_core=dla_core, variants=variants):
        records[recipe.variant] = dataclasses.asdict(build_engine(bundle, recipe, verbose=verbose))
    build = dict(manifest.build) or recipe_manifest_entry(recipes_for(manifest, target))
    build["engines"] = {**build.get("engines", {}), **records}
    files = {**manifest.files}
    for rec in records.values():
        files[rec["file"]] = sha256_file(bundle / rec["file"])
    cache = bundle / "engines" / "timing.cache"
    if cache.is_file():
        files["engines/timing.cache"] = sha256_file(cache)
    updated = dataclasses.replace(manifest, build=build, files=files)
    tmp = bundle / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(updated.to_json())
    os.replace(tmp, bundle / MANIFEST_NAME)
    return updated
