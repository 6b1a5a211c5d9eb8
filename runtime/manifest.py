"""The bundle manifest: what a bundle holds and how to run it (schema in docs/bundle.md).

Plain dataclasses and JSON, no torch or onnx: the device reads this. A bundle is verified against the
checksums here before anything in it runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trm_export.errors import BundleError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: list  # ints and symbolic names ("batch")
    dtype: str


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph (or engine) of the bundle."""

    file: str
    precision: str  # fp32 | fp16 | int8 | mixed
    opset: int
    ir_version: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    details: dict[str, Any] = field(default_factory=dict)  # calibration method, float layers, ...


@dataclass(frozen=True)
class TaskEncoding:
    name: str | None  # "sudoku", "maze" or None for a user's own task
    vocab_size: int
    seq_len: int
    pad_id: int
    blank_id: int | None
    prefix_len: int
    num_puzzle_identifiers: int
    grid_side: int | None = None


@dataclass(frozen=True)
class EmbeddingSpec:
    """x = scale * (pos_scale * ([puzzle prefix; tokens] + pos) if learned positions else [prefix; tokens])."""

    token_table: str
    scale: float
    position_table: str | None
    position_scale: float
    puzzle_table: str | None
    puzzle_emb_ndim: int
    hidden_size: int
    H_init: str
    L_init: str


@dataclass(frozen=True)
class LoopSpec:
    halt_max_steps: int
    halting_rule: str  # "q_halt>0" | "q_halt>q_continue"
    uses_q_continue: bool


@dataclass(frozen=True)
class Manifest:
    format_version: int
    model: dict[str, Any]  # family + the full model config
    task: TaskEncoding
    embedding: EmbeddingSpec
    loop: LoopSpec
    graphs: dict[str, GraphSpec]  # variant name -> graph; "fp32" always present
    target: str
    files: dict[str, str]  # relative path -> sha256 of every other file in the bundle
    provenance: dict[str, Any]
    golden: dict[str, Any]  # {"file": ..., "count": ..., "tolerances": {...}}
    parity: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)  # engines, on-device recipes

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(f"bundle format version {version!r} is not supported (this runtime reads version "
                              f"{FORMAT_VERSION}); re-export the bundle with a matching trm-export")
        try:
            return cls(
                format_version=version,
                model=data["model"],
                task=TaskEncoding(**data["task"]),
                embedding=EmbeddingSpec(**data["embedding"]),
                loop=LoopSpec(**data["loop"]),
                graphs={k: GraphSpec(**{**g, "inputs": [TensorSpec(**t) for t in g["inputs"]],
                                        "outputs": [TensorSpec(**t) for t in g["outputs"]]})
                        for k, g in data["graphs"].items()},
                target=data["target"],
                files=data["files"],
                provenance=data["provenance"],
                golden=data["golden"],
                parity=data.get("parity", {}),
                build=data.get("build", {}),
            )
        except (KeyError, TypeError) as exc:
            raise BundleError(f"manifest does not follow the schema (docs/bundle.md): {exc}") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(bundle: str | Path, verify: bool = True) -> Manifest:
    """Read `bundle/manifest.json`; with `verify`, check every listed file's sha256 and refuse on mismatch."""
    bundle = Path(bundle)
    path = bundle / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle}: not a bundle (no {MANIFEST_NAME})")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    manifest = Manifest.from_dict(data)
    if verify:
        verify_files(bundle, manifest)
    return manifest


def verify_files(bundle: Path, manifest: Manifest) -> None:
    problems = []
    for rel, expected in sorted(manifest.files.items()):
        file = bundle / rel
        if not file.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(file) != expected:
            problems.append(f"{rel}: sha256 differs from the manifest (file changed or corrupt)")
    if problems:
        raise BundleError(f"{bundle}: bundle does not match its manifest: " + "; ".join(problems))
