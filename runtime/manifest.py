"""The bundle manifest: what a bundle holds and how to run it (schema in docs/bundle.md).

Plain dataclasses and JSON, no torch or onnx: the device reads this. A bundle is a stranger's input: every field
is checked for type and range, every path it names must stay inside the bundle and be listed with its sha256,
and the manifest itself carries the digest of its canonical form, so an edited tolerance or path is refused like
an edited graph. All of it is checked before anything in the bundle runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trm_export.errors import BundleError

# ONNX Runtime's contrib domain and the two ops of it a cpu target's graph may have (GraphSpec.onnxruntime_ops):
# named here, torch-free, for the exporter that writes them and the OpenVINO converters that read them.
ONNXRUNTIME_DOMAIN = "com.microsoft"
MULTI_HEAD_ATTENTION = "MultiHeadAttention"
ROTARY_EMBEDDING = "RotaryEmbedding"

_VERSION = re.compile(r"[0-9]{1,4}(\.[0-9A-Za-z]{1,16}){0,4}")  # 10.3.0.26, 8.7
FORMAT_VERSION = 2  # 2: the manifest carries the digest of its own canonical form
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
    # ONNX Runtime contrib ops (ONNXRUNTIME_DOMAIN) in the graph: the cpu target's fused attention and rope.
    # ONNX Runtime runs them, OpenVINO through runtime/openvino_ops.py; empty for every other target.
    onnxruntime_ops: list[str] = field(default_factory=list)
    # The same step in standard ONNX ops beside a fused graph (the cpu target's fp32): what OpenVINO runs fastest
    # (issue #41). None where the graph has no contrib ops, or in bundles written before it.
    standard_file: str | None = None


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
    # Bundle file naming every puzzle identifier (the official builder's identifiers.json: position = identifier,
    # value = puzzle name): ARC needs it to find the views of a task (runtime.arc).
    identifiers: str | None = None


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
    # --keep-puzzles: the original identifiers of the puzzle table's rows (int64, ascending); None: every
    # identifier 0..num_puzzle_identifiers-1 has its row. Puzzles keep their original identifiers either way.
    puzzle_rows: str | None = None


@dataclass(frozen=True)
class LoopSpec:
    halt_max_steps: int
    halting_rule: str  # "q_halt>0" | "q_halt>q_continue" | "q_halt>=T" (T a decimal: a halting logit's threshold)
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
    golden: dict[str, Any]  # {"folder": ..., "count": ..., "tolerances": {...}}
    parity: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)  # engines, on-device recipes
    # The variant the runtime runs unless told otherwise: the target's precision as measured at export; `choice`
    # says why (each variant's accuracy drop against the budget).
    default_variant: str = "fp32"
    choice: dict[str, Any] = field(default_factory=dict)
    # What the PyTorch reference measured at export that a device cannot recompute (it has no torch): the accuracy
    # in the arithmetic the model was trained in, {"bfloat16": {"puzzles", "source", "rows": [...]}}.
    reference: dict[str, Any] = field(default_factory=dict)
    # What each stage of the export covered and why (trm_export.planning): sample sizes sized from the model's work,
    # never the clock; `--plan` replays it.
    plan: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        """The manifest as written: its fields plus `digest`, the sha256 of their canonical form. A graph without
        a standard-ops form is written without the key, as before it existed (its digest stays the same)."""
        data = dataclasses.asdict(self)
        for graph in data["graphs"].values():
            if graph["standard_file"] is None:
                del graph["standard_file"]
        return seal(data)

    @property
    def digest(self) -> str:
        """The sha256 the manifest carries of its canonical form: names this bundle's exact contents."""
        return json.loads(self.to_json())["digest"]

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Check every field's type and range (a stranger's manifest), then build the dataclasses."""
        return _parse(data)

    def referenced_files(self) -> dict[str, str]:
        """Every path the runtime opens -> what it is. Each must be listed in `files` (checked on read)."""
        refs = {g.file: f"graphs.{name}.file" for name, g in self.graphs.items()}
        refs.update({g.standard_file: f"graphs.{name}.standard_file" for name, g in self.graphs.items()
                     if g.standard_file is not None})
        e = self.embedding
        for what in ("token_table", "position_table", "puzzle_table", "H_init", "L_init", "puzzle_rows"):
            if getattr(e, what) is not None:
                refs[getattr(e, what)] = f"embedding.{what}"
        for name in GOLDEN_ARRAYS:
            refs[f"{self.golden['folder']}/{name}.npy"] = "golden"
        if self.task.identifiers is not None:
            refs[self.task.identifiers] = "task.identifiers"
        for variant, engine in self.build.get("engines", {}).items():
            refs[engine["file"]] = f"build.engines.{variant}.file"
        return refs


# The golden arrays the self-check reads (runtime/selfcheck.py), under golden["folder"].
GOLDEN_ARRAYS = ("tokens", "puzzle_ids", "q_halt", "q_continue", "predictions", "adaptive_steps",
                 "adaptive_predictions")
# Names that end up in file names and generated shell scripts: a strict pattern, checked on read and write.
# The halting rules a bundle may name: q_halt>0 (TRM), q_halt>q_continue (HRM), q_halt>=T (T a decimal threshold).
HALTING_RULE = re.compile(r"q_halt>0|q_halt>q_continue|q_halt>=(-?[0-9]{1,6}(?:\.[0-9]{1,20})?)")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# Bounds far beyond any TRM/HRM (ARC: 1M puzzle ids, 900 positions, hidden 512) that keep a crafted manifest
# from asking for absurd allocations before anything is read.
LIMITS = {"vocab_size": 1 << 20, "seq_len": 1 << 16, "prefix_len": 1 << 12, "hidden_size": 1 << 14,
          "num_puzzle_identifiers": 1 << 27, "halt_max_steps": 1 << 12, "grid_side": 1 << 10}
# What a bundle may hold besides listed files: the report, re-measured on any machine (not checksummed), and the
# author's signature of the manifest (runtime/signature.py), which cannot be listed in what it signs.
UNLISTED_OK = ("report", "signature.json")


def canonical_digest(data: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace), the `digest` field left out."""
    body = {k: v for k, v in data.items() if k != "digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def seal(data: dict[str, Any]) -> str:
    """manifest.json text for `data`, with its digest: any later edit of any field is refused on read."""
    # the digest is of what a reader will parse: JSON turns int keys into strings (which then sort differently)
    # and tuples into lists, so take the JSON form first
    body = json.loads(json.dumps({k: v for k, v in data.items() if k != "digest"}))
    return json.dumps({**body, "digest": canonical_digest(body)}, indent=2, sort_keys=True) + "\n"


class _Fields:
    """Typed access to one object of the manifest; every error names the field and says what was expected."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise _schema(where, "an object", data)
        self.data, self.where = data, where

    def _get(self, key: str, optional: bool) -> Any:
        if key not in self.data:
            if optional:
                return None
            raise BundleError(f"{MANIFEST_NAME}: field {self.where}.{key} is missing (schema: docs/bundle.md)")
        return self.data[key]

    def int(self, key: str, lo: int = 0, hi: int | None = None, optional: bool = False) -> int | None:
        v = self._get(key, optional)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise _schema(f"{self.where}.{key}", "an integer", v)
        hi = LIMITS.get(key) if hi is None else hi
        if v < lo or (hi is not None and v > hi):
            raise BundleError(f"{MANIFEST_NAME}: field {self.where}.{key} = {v} is outside [{lo}, {hi}]")
        return v

    def float(self, key: str, lo: float | None = None, hi: float | None = None) -> float:
        v = self._get(key, False)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _schema(f"{self.where}.{key}", "a finite number", v)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise BundleError(f"{MANIFEST_NAME}: field {self.where}.{key} = {v} is outside [{lo}, {hi}]")
        return float(v)

    def str(self, key: str, optional: bool = False, choices: tuple[str, ...] | None = None,
            pattern: re.Pattern | None = None) -> str | None:
        v = self._get(key, optional)
        if v is None and optional:
            return None
        if not isinstance(v, str):
            raise _schema(f"{self.where}.{key}", "a string", v)
        if choices is not None and v not in choices:
            raise BundleError(f"{MANIFEST_NAME}: field {self.where}.{key} = {v!r} is not one of {list(choices)}")
        if pattern is not None and not pattern.fullmatch(v):
            raise BundleError(f"{MANIFEST_NAME}: field {self.where}.{key} = {v!r} does not match "
                              f"{pattern.pattern}")
        return v

    def path(self, key: str, optional: bool = False) -> str | None:
        v = self.str(key, optional)
        return None if v is None else check_relative(v, f"{self.where}.{key}")

    def bool(self, key: str) -> bool:
        v = self._get(key, False)
        if not isinstance(v, bool):
            raise _schema(f"{self.where}.{key}", "true or false", v)
        return v

    def obj(self, key: str, optional: bool = False) -> dict[str, Any]:
        v = self._get(key, optional)
        if v is None and optional:
            return {}
        if not isinstance(v, dict):
            raise _schema(f"{self.where}.{key}", "an object", v)
        return v


def _schema(where: str, expected: str, got: Any) -> BundleError:
    shown = json.dumps(got)[:60] if isinstance(got, (dict, list, str, int, float, bool, type(None))) else repr(got)
    return BundleError(f"{MANIFEST_NAME}: field {where} must be {expected}, got {shown} (schema: docs/bundle.md; "
                       "re-export the bundle if it was edited)")


def check_relative(rel: str, where: str) -> str:
    """A path the manifest names: relative, '/'-separated, without '..', '.', empty or hidden parts."""
    parts = rel.split("/")
    if (not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel or ":" in parts[0]
            or any(p in ("", ".", "..") for p in parts)):
        raise BundleError(f"{MANIFEST_NAME}: {where} = {rel!r} is not a plain relative path inside the bundle; "
                          "a bundle names its files as 'folder/file' only")
    return rel


def _tensor_specs(data: Any, where: str) -> list[TensorSpec]:
    if not isinstance(data, list):
        raise _schema(where, "a list", data)
    specs = []
    for i, item in enumerate(data):
        f = _Fields(item, f"{where}[{i}]")
        shape = f._get("shape", False)
        # A step tensor's shape: the batch axis (a name, or a size) first, then sizes; never empty.
        if not isinstance(shape, list) or not shape or not all(
                (isinstance(d, str) and k == 0 and NAME_PATTERN.fullmatch(d)) or (isinstance(d, int) and not isinstance(
                    d, bool) and 0 <= d <= LIMITS["num_puzzle_identifiers"]) for k, d in enumerate(shape)):
            raise _schema(f"{where}[{i}].shape", "a non-empty list of sizes, the first of which may be an axis name",
                          shape)
        specs.append(TensorSpec(f.str("name"), shape, f.str("dtype")))
    return specs


def _op_names(graph: Any, where: str) -> list[str]:
    """graphs.<variant>.onnxruntime_ops: op type names (absent in older bundles: none)."""
    names = graph.get("onnxruntime_ops", []) if isinstance(graph, dict) else []
    if not isinstance(names, list) or len(names) > 64 or not all(
            isinstance(n, str) and NAME_PATTERN.fullmatch(n) for n in names):
        raise _schema(f"{where}.onnxruntime_ops", "a list of op type names", names)
    return list(names)


def _parse(data: Any) -> Manifest:
    root = _Fields(data, "manifest")
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise BundleError(f"bundle format version {version!r} is not supported (this runtime reads version "
                          f"{FORMAT_VERSION}); re-export the bundle with a matching trm-export")
    t = _Fields(root.obj("task"), "task")
    task = TaskEncoding(
        name=t.str("name", optional=True, pattern=NAME_PATTERN), vocab_size=t.int("vocab_size", lo=1),
        seq_len=t.int("seq_len", lo=1), pad_id=t.int("pad_id", hi=LIMITS["vocab_size"]),
        blank_id=t.int("blank_id", hi=LIMITS["vocab_size"], optional=True), prefix_len=t.int("prefix_len"),
        num_puzzle_identifiers=t.int("num_puzzle_identifiers", lo=1),
        grid_side=t.int("grid_side", lo=1, optional=True), identifiers=t.path("identifiers", True))
    if task.grid_side is not None and task.grid_side ** 2 != task.seq_len:  # a grid's cells are its tokens
        raise BundleError(f"{MANIFEST_NAME}: task.grid_side {task.grid_side} does not fit task.seq_len "
                          f"{task.seq_len} (a {task.grid_side} x {task.grid_side} grid has {task.grid_side ** 2} "
                          "cells); re-export the bundle")
    e = _Fields(root.obj("embedding"), "embedding")
    embedding = EmbeddingSpec(
        token_table=e.path("token_table"), scale=e.float("scale"), position_table=e.path("position_table", True),
        position_scale=e.float("position_scale"), puzzle_table=e.path("puzzle_table", True),
        puzzle_emb_ndim=e.int("puzzle_emb_ndim", hi=LIMITS["prefix_len"] * LIMITS["hidden_size"]),
        hidden_size=e.int("hidden_size", lo=1), H_init=e.path("H_init"), L_init=e.path("L_init"),
        puzzle_rows=e.path("puzzle_rows", True))
    lp = _Fields(root.obj("loop"), "loop")
    loop = LoopSpec(halt_max_steps=lp.int("halt_max_steps", lo=1),
                    halting_rule=lp.str("halting_rule", pattern=HALTING_RULE),
                    uses_q_continue=lp.bool("uses_q_continue"))
    graphs = {}
    for name, g in root.obj("graphs").items():
        if not NAME_PATTERN.fullmatch(name):
            raise BundleError(f"{MANIFEST_NAME}: graph variant name {name!r} does not match {NAME_PATTERN.pattern}")
        f = _Fields(g, f"graphs.{name}")
        graphs[name] = GraphSpec(
            file=f.path("file"), precision=f.str("precision", choices=("fp32", "fp16", "bf16", "int8", "mixed")),
            opset=f.int("opset", lo=1, hi=1000), ir_version=f.int("ir_version", lo=1, hi=1000),
            inputs=_tensor_specs(f._get("inputs", False), f"graphs.{name}.inputs"),
            outputs=_tensor_specs(f._get("outputs", False), f"graphs.{name}.outputs"),
            details=f.obj("details", optional=True), onnxruntime_ops=_op_names(g, f"graphs.{name}"),
            standard_file=f.path("standard_file", True))
    if "fp32" not in graphs:
        raise BundleError(f"{MANIFEST_NAME}: graphs has no 'fp32' variant; every bundle carries one")
    files = root.obj("files")
    for rel, digest in files.items():
        check_relative(rel, "a key of files")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise _schema(f"files[{rel!r}]", "a sha256 (64 lowercase hex digits)", digest)
    golden = root.obj("golden")
    gf = _Fields(golden, "golden")
    gf.path("folder")
    gf.int("count", lo=1, hi=1 << 16)
    for variant, tol in gf.obj("tolerances").items():
        tf = _Fields(tol, f"golden.tolerances.{variant}")
        tf.float("q_abs", lo=0.0)
        tf.float("q_sign_agreement", lo=0.0, hi=1.0)
        tf.float("predictions_identical", lo=0.0, hi=1.0)
    if "fp32" not in golden["tolerances"]:
        raise BundleError(f"{MANIFEST_NAME}: golden.tolerances has no 'fp32' entry")
    build = root.obj("build", optional=True)
    for variant, engine in _Fields(build, "build").obj("engines", optional=True).items():
        if variant not in graphs:
            raise BundleError(f"{MANIFEST_NAME}: build.engines names variant {variant!r}, which has no graph")
        ef = _Fields(engine, f"build.engines.{variant}")
        ef.path("file")
        ef.str("tensorrt_version", pattern=_VERSION)  # compared with this device's before the engine is loaded
        ef.str("sm", pattern=_VERSION)
    manifest = Manifest(format_version=version, model=root.obj("model"), task=task, embedding=embedding, loop=loop,
                        graphs=graphs, target=root.str("target", pattern=NAME_PATTERN), files=files,
                        provenance=root.obj("provenance"), golden=golden, parity=root.obj("parity", optional=True),
                        build=build, default_variant=root.str("default_variant", pattern=NAME_PATTERN),
                        choice=root.obj("choice", optional=True), reference=root.obj("reference", optional=True),
                        plan=root.obj("plan", optional=True))
    if manifest.default_variant not in graphs:
        raise BundleError(f"{MANIFEST_NAME}: default_variant {manifest.default_variant!r} has no graph")
    unlisted = sorted(rel for rel in manifest.referenced_files() if rel not in files)
    if unlisted:
        raise BundleError(f"{MANIFEST_NAME}: {', '.join(unlisted)} named by the manifest but not listed in files "
                          "with a checksum; re-export the bundle")
    return manifest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def member(bundle: Path, rel: str) -> Path:
    """bundle/rel, refused unless it stays inside the bundle once symbolic links are resolved."""
    check_relative(rel, "path")
    root = bundle.resolve()
    path = (bundle / rel).resolve()
    if path != root and root not in path.parents:
        raise BundleError(f"{bundle}: {rel} leads outside the bundle (through a symbolic link); refusing to read it")
    return bundle / rel


def read_manifest(bundle: str | Path, verify: bool = True) -> Manifest:
    """Read `bundle/manifest.json`, check its schema and digest; with `verify`, check every listed file's sha256.

    Refused (BundleError): a manifest whose digest does not match its content (edited after export), a field of
    the wrong type or out of range, a path that is absolute, climbs out or leads out through a link, a file the
    manifest uses that is not listed with its checksum, a listed file that is missing or differs.
    """
    bundle = Path(bundle)
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: not a bundle folder ({'a file' if bundle.exists() else 'no such folder'})")
    if not path.is_file():
        raise BundleError(f"{bundle}: not a bundle (no {MANIFEST_NAME})")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: {path.stat().st_size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested past Python's stack
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: not a manifest (a JSON object is expected)")
    if data.get("digest") != canonical_digest(data):
        raise BundleError(f"{path}: its digest does not match its content: the manifest was edited after export "
                          "(tolerances, loop settings and paths are covered like the graphs); re-export the bundle")
    manifest = Manifest.from_dict(data)
    if verify:
        verify_files(bundle, manifest)
    return manifest


MAX_MANIFEST_BYTES = 16 << 20


def verify_files(bundle: Path, manifest: Manifest) -> None:
    problems = []
    for rel, expected in sorted(manifest.files.items()):
        file = member(bundle, rel)
        if not file.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(file) != expected:
            problems.append(f"{rel}: sha256 differs from the manifest (file changed or corrupt)")
    if problems:
        raise BundleError(f"{bundle}: bundle does not match its manifest: " + "; ".join(problems))


def unlisted_files(bundle: Path, manifest: Manifest) -> list[str]:
    """Files in the bundle folder that the manifest does not list (nor the report): reported by `verify`."""
    out = []
    for p in sorted(bundle.rglob("*")):
        rel = p.relative_to(bundle).as_posix()
        if p.is_dir() and not p.is_symlink() or rel == MANIFEST_NAME or rel.split("/")[0] in UNLISTED_OK:
            continue
        if rel not in manifest.files:
            out.append(rel + (" (symbolic link)" if p.is_symlink() else ""))
    return out
