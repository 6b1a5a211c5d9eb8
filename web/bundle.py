"""`web/` of a browser bundle: the page, the JavaScript runtime and onnxruntime-web's WebAssembly build, copied in
before the checksums are taken, so the manifest covers them like every other file.

onnxruntime-web comes from the npm registry, pinned in web/package.json and installed with `npm ci` (a checkout:
`npm ci --prefix web`); TRM_ORT_WEB names another install (the package folder, holding dist/). Only the
WebAssembly build is copied (about 15 MB): the step graph's every operator is one of ONNX Runtime's CPU kernels
there, compiled to WebAssembly, so nothing falls back to a slower path. The WebGPU build (30 MB more, not every
operator on the GPU) is not shipped.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from trm_export.errors import TrmExportError

WEB_DIR = Path(__file__).resolve().parent
APP_FILES = ("index.html", "app.mjs", "trm.mjs", "style.css")
# onnxruntime-web's WebAssembly-only ES module, its loader and the SIMD + threads binary it loads.
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
PAGE = "web/index.html"


class WebRuntimeError(TrmExportError):
    """onnxruntime-web is missing, or not the version the JavaScript runtime was tested with."""


def pinned_version() -> str:
    """The onnxruntime-web version of web/package.json (exact: the page is tested against it)."""
    return json.loads((WEB_DIR / "package.json").read_text())["dependencies"]["onnxruntime-web"]


def find_ort_web() -> Path:
    """onnxruntime-web's dist/ folder: TRM_ORT_WEB, else web/node_modules; checked for the pinned version."""
    want = pinned_version()
    given = os.environ.get("TRM_ORT_WEB")
    package = Path(given) if given else WEB_DIR / "node_modules" / "onnxruntime-web"
    fix = (f"install it with `npm ci --prefix {WEB_DIR}` (npm registry), or set TRM_ORT_WEB to an "
           f"onnxruntime-web@{want} package folder")
    try:
        found = json.loads((package / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError, TypeError):
        raise WebRuntimeError(f"--target browser needs onnxruntime-web {want}, not found at {package}: {fix}") from None
    if found != want:
        raise WebRuntimeError(f"{package}: onnxruntime-web {found}; the page is tested with {want}: {fix}")
    missing = [name for name in ORT_FILES if not (package / "dist" / name).is_file()]
    if missing:
        raise WebRuntimeError(f"{package}/dist lacks {', '.join(missing)}; the install is incomplete: {fix}")
    return package / "dist"


def write_web_app(bundle_dir: Path, runtime: str) -> dict:
    """For a browser target (`runtime` "onnxruntime-web"), write web/ into `bundle_dir`; return the manifest's
    build entry ({"web": ...}), else {}."""
    if runtime != "onnxruntime-web":
        return {}
    dist = find_ort_web()
    web = bundle_dir / "web"
    (web / "ort").mkdir(parents=True, exist_ok=True)
    for name in APP_FILES:
        shutil.copyfile(WEB_DIR / "app" / name, web / name)
    for name in ORT_FILES:
        shutil.copyfile(dist / name, web / "ort" / name)
    return {"web": {"page": PAGE, "onnxruntime_web": pinned_version(), "execution_provider": "wasm"}}
