"""Load a checkpoint exactly as the official TRM / HRM training code saves it.

What users hand us: `step_N` (a plain `torch.save(state_dict)`), sometimes renamed `checkpoint` or `*.pt`, keys
prefixed `_orig_mod.model.inner.` (compiled), `model.inner.` or `module.`; `all_config.yaml` beside it (the
training config, model fields under `arch:`); the data set's `dataset.json` (vocab, seq_len, puzzle ids), beside
it or elsewhere. What the tensor shapes tell is read off them; what they cannot tell comes from the config,
dataset.json or explicit overrides, and every disagreement is an error rather than a guess.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trm_export.errors import CheckpointError, ConfigError
from trm_export.export.config import ModelConfig, prefix_length, swiglu_intermediate
from trm_export.export.model import RecursiveModel
from trm_export.runtime.manifest import sha256_file

# Longest first: the first prefix shared by every key is the one stripped.
KEY_PREFIXES = (
    "module._orig_mod.model.inner.",
    "_orig_mod.model.inner.",
    "module.model.inner.",
    "model.inner.",
    "_orig_mod.",
    "module.",
    "",
)
CONFIG_NAME = "all_config.yaml"
DATASET_NAME = "dataset.json"
# Fields a user may set with an override (CLI flags --seq-len, --num-heads, ...).
OVERRIDABLE = ("seq_len", "vocab_size", "num_puzzle_identifiers", "num_heads", "H_cycles", "L_cycles",
               "pos_encodings", "puzzle_emb_len", "halt_max_steps", "no_ACT_continue", "expansion",
               "rms_norm_eps", "rope_theta", "family")
# Official `arch:` fields we read; anything else there (loss, name, batch sizes, ...) is training-only.
ARCH_FIELDS = ("hidden_size", "num_heads", "expansion", "L_layers", "H_layers", "H_cycles", "L_cycles",
               "pos_encodings", "puzzle_emb_ndim", "puzzle_emb_len", "mlp_t", "rms_norm_eps", "rope_theta",
               "halt_max_steps", "no_ACT_continue", "forward_dtype")


@dataclass
class LoadedCheckpoint:
    """A checkpoint turned into a float32 reference model, with where every fact came from."""

    path: Path
    config: ModelConfig
    model: RecursiveModel
    key_prefix: str
    sha256: str
    stored_dtypes: dict[str, str]
    dataset: dict[str, Any] | None = None
    config_path: Path | None = None
    dataset_path: Path | None = None
    sources: dict[str, str] = field(default_factory=dict)  # config field -> "weights" | "config" | ...
    # Set only with load_checkpoint(allow_ambiguous=True): what the files and weights left undecided (seq_len /
    # puzzle_emb_len candidates and the flags that decide them). Such a checkpoint must not be exported.
    ambiguous: str | None = None


def find_checkpoint_file(path: Path) -> Path:
    """A file is taken as is; in a directory take the highest `step_N`, else `checkpoint`, else one `*.pt`."""
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError(path, "no such file or directory")
    if not path.is_dir():  # a FIFO or a device would block or never end when read
        raise CheckpointError(path, "not a regular file or a folder")
    # Regular files only (is_file): a FIFO named step_1 would hang the read.
    steps = sorted((p for p in path.iterdir() if re.fullmatch(r"step_\d{1,18}", p.name) and p.is_file()),
                   key=lambda p: int(p.name.split("_")[1]))
    if steps:
        return steps[-1]
    if (path / "checkpoint").is_file():
        return path / "checkpoint"
    pts = sorted(path.glob("*.pt"))
    if len(pts) == 1:
        return pts[0]
    found = ", ".join(p.name for p in sorted(path.iterdir())) or "nothing"
    raise CheckpointError(path, "directory holds no checkpoint (looked for step_N, checkpoint, one *.pt); "
                          f"found {found}")


def _pickle_imports(path: Path) -> bool:
    """Does the file parse as a pickle (any protocol, 0 and 1 included) that imports or calls something? Read with
    pickletools, which only decodes opcodes: nothing in the file runs."""
    import pickletools

    with open(path, "rb") as f:
        data = f.read(16 << 20)
    try:
        return any(op.name in ("GLOBAL", "STACK_GLOBAL", "INST", "REDUCE", "OBJ", "NEWOBJ", "NEWOBJ_EX")
                   for op, _, _ in pickletools.genops(data))
    except Exception:  # not a pickle at all
        return False


def _torch_reason(exc: BaseException) -> str:
    """torch's first line, without its advice to load with weights_only=False: we never run a file's code."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if "weights_only" in first or "WeightsUnpickler" in first:
        return "the weights-only loader rejected its contents"
    return first[:300]


# torch.save stores its zip entries uncompressed, and float weights hardly compress: a checkpoint whose entries
# would inflate far beyond the file is a decompression bomb (2 MB holding 2 GiB of zeros drove loading to 6 GB).
MAX_INFLATION = 10


def _refuse_inflating_zip(path: Path) -> None:
    import zipfile

    if not zipfile.is_zipfile(path):
        return  # a legacy pickle, or not a checkpoint: torch.load says which
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(path, f"not a PyTorch checkpoint (a damaged zip: {exc})") from None
    size = path.stat().st_size
    if declared > MAX_INFLATION * size + (16 << 20):
        raise CheckpointError(path, f"its zip entries declare {declared / 2**30:.2f} GiB in a {size / 2**20:.1f} MiB "
                              "file: compressed far beyond what weights allow (a decompression bomb); refused "
                              "unread. Re-save the state dict with torch.save")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True; anything that is not a plain state dict of tensors is refused."""
    _refuse_inflating_zip(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        with open(path, "rb") as f:
            head = f.read(4)
        # A zip (torch.save) or a pickle (protocol >= 2 starts with 0x80) that the weights-only loader rejects
        # imports or runs something beyond tensors; any other bytes are simply not a checkpoint.
        if "Unsupported global" in str(exc) or head.startswith((b"PK\x03\x04", b"\x80")) or _pickle_imports(path):
            raise CheckpointError(
                path, "refused: the file is a pickle that would import or run code beyond tensors "
                "(torch.load weights_only=True rejected it). Re-save a plain state dict: "
                "torch.save(model.state_dict(), path)") from None
        raise CheckpointError(path, f"not a PyTorch checkpoint ({_torch_reason(exc)})") from None
    except Exception as exc:  # zip errors, truncated files, text files: all "not a checkpoint"
        raise CheckpointError(path, f"not a PyTorch checkpoint ({type(exc).__name__}: {_torch_reason(exc)})") from None
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(path, f"expected a state dict (name -> tensor), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(path, f"expected a state dict of tensors; non-tensor entries: {bad[:5]}")
    # Weights are real floating-point numbers in ordinary dense storage. A complex, bool or integer tensor would be
    # cast to float32 and exported as if it were a weight; a sparse or meta tensor cannot be read as one.
    odd = [f"{k} ({_kind(v)})" for k, v in obj.items()
           if v.is_meta or v.layout != torch.strided or not v.is_floating_point()]
    if odd:
        raise CheckpointError(path, f"{len(odd)} tensor(s) are not dense floating-point weights: "
                              f"{', '.join(odd[:3])}{' ...' if len(odd) > 3 else ''}; a TRM / HRM checkpoint holds "
                              "floating-point weights only (float32, bfloat16, float16)")
    broken = [k for k, v in obj.items() if v.is_floating_point() and not _all_finite(v)]
    if broken:
        raise CheckpointError(path, f"{len(broken)} tensor(s) hold NaN or infinite values ({', '.join(broken[:3])}"
                              f"{' ...' if len(broken) > 3 else ''}): the training run diverged or the file is "
                              "damaged; export an earlier checkpoint")
    return obj


def _kind(tensor: torch.Tensor) -> str:
    dtype = str(tensor.dtype).replace("torch.", "")
    if tensor.is_meta:
        return f"{dtype}, meta: no data"
    return dtype if tensor.layout == torch.strided else f"{dtype}, {str(tensor.layout).replace('torch.', '')}"


def _all_finite(tensor: torch.Tensor, chunk_rows: int = 1 << 16) -> bool:
    """torch.isfinite(t).all() in row chunks: a bool mask of a whole ARC puzzle table is a quarter of its size."""
    if tensor.dim() < 2 or tensor.shape[0] <= chunk_rows:
        return bool(torch.isfinite(tensor).all())
    return all(bool(torch.isfinite(tensor[i:i + chunk_rows]).all()) for i in range(0, tensor.shape[0], chunk_rows))


def strip_prefix(path: Path, state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    for prefix in KEY_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            return prefix, {k[len(prefix):]: v for k, v in state.items()}
    raise CheckpointError(path, "keys do not share one known prefix") from None  # unreachable: "" matches


def read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, RecursionError) as exc:  # RecursionError: nested past Python's stack
        raise CheckpointError(path, f"cannot read the training config: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "training config is not a YAML mapping")
    return data


def read_dataset_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested past Python's stack
        raise CheckpointError(path, f"cannot read dataset.json: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "dataset.json is not a JSON object")
    return data


def family_from_arch_name(config_path: Path, name: str) -> str:
    lowered = name.lower()
    if "hrm" in lowered or "hierarchicalreasoning" in lowered:
        return "hrm"
    if "trm" in lowered or "tinyrecursive" in lowered or "recursive_reasoning" in lowered:
        return "trm"
    raise CheckpointError(
        config_path, f"unknown architecture arch.name={name!r}; supported: TRM "
        "(recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1) and HRM "
        "(hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1)")


def locate_dataset_json(ckpt_dir: Path, train_config: dict | None, explicit: Path | None) -> Path | None:
    if explicit is not None:
        explicit = Path(explicit)
        candidate = explicit / DATASET_NAME if explicit.is_dir() else explicit
        if not candidate.is_file():
            raise CheckpointError(explicit, "dataset.json not found at the given path")
        return candidate
    if (ckpt_dir / DATASET_NAME).is_file():
        return ckpt_dir / DATASET_NAME
    data_paths = []
    if train_config:
        data_paths = train_config.get("data_paths") or [train_config.get("data_path")]
    for data_path in data_paths:
        if not isinstance(data_path, str):
            continue
        for base in (Path.cwd(), ckpt_dir):
            candidate = base / data_path / "train" / DATASET_NAME
            if candidate.is_file():
                return candidate
    return None


def infer_from_weights(path: Path, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the tensor shapes tell. seq_len needs the prefix length, so it is returned as a raw total."""
    if "embed_tokens.embedding_weight" not in state:
        raise CheckpointError(
            path, "not a TRM/HRM checkpoint: no embed_tokens.embedding_weight (after stripping prefixes "
            f"{[p for p in KEY_PREFIXES if p]}); first keys: {sorted(state)[:5]}")
    vocab, hidden = state["embed_tokens.embedding_weight"].shape
    facts: dict[str, Any] = {"vocab_size": int(vocab), "hidden_size": int(hidden)}
    facts["family"] = "hrm" if any(k.startswith("H_level.") for k in state) else "trm"
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(r"L_level\.layers\.(\d+)\.", k))}
    facts["L_layers"] = len(layer_ids)
    if facts["family"] == "hrm":
        facts["H_layers"] = len({int(m.group(1)) for k in state if (m := re.match(r"H_level\.layers\.(\d+)\.", k))})
    facts["mlp_t"] = any(".mlp_t." in k for k in state)
    if "puzzle_emb.weights" in state:
        rows, ndim = state["puzzle_emb.weights"].shape
        facts["num_puzzle_identifiers"], facts["puzzle_emb_ndim"] = int(rows), int(ndim)
    else:
        facts["puzzle_emb_ndim"] = 0
    if "embed_pos.embedding_weight" in state:
        facts["pos_encodings"] = "learned"
        facts["_total_seq_len"] = int(state["embed_pos.embedding_weight"].shape[0])
    if facts["mlp_t"] and "L_level.layers.0.mlp_t.down_proj.weight" in state:
        facts["_total_seq_len"], facts["_mlp_t_intermediate"] = (
            int(n) for n in state["L_level.layers.0.mlp_t.down_proj.weight"].shape)
    gate_up = state.get("L_level.layers.0.mlp.gate_up_proj.weight")
    if gate_up is not None:
        facts["_mlp_intermediate"] = int(gate_up.shape[0]) // 2
    return facts


def build_config(path: Path, state: dict[str, torch.Tensor], train_config: dict | None, config_path: Path | None,
                 dataset: dict | None, dataset_path: Path | None, overrides: dict[str, Any],
                 allow_ambiguous: bool = False) -> tuple[ModelConfig, dict[str, str], str | None]:
    """The model config, each field's source, and what stayed ambiguous (None unless `allow_ambiguous`: then a
    provisional candidate is filled in and its source starts with "ambiguous:"; otherwise that is an error)."""
    facts = infer_from_weights(path, state)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def put(name: str, value: Any, source: str) -> None:
        values[name] = value
        sources[name] = source

    # 1. The training config's arch section.
    if train_config is not None:
        arch = train_config.get("arch")
        if not isinstance(arch, dict):
            raise CheckpointError(config_path, "training config has no 'arch:' section")
        if "name" in arch:
            put("family", family_from_arch_name(config_path, str(arch["name"])), "config")
        for name in ARCH_FIELDS:
            if name in arch and arch[name] is not None:
                put(name, _typed(config_path, name, arch[name]), "config")
    # 2. dataset.json.
    if dataset is not None:
        for name in ("vocab_size", "seq_len", "num_puzzle_identifiers"):
            if name in dataset:
                put(name, int(dataset[name]), "dataset.json")
    # 3. Weights, which must agree with whatever the files say.
    disagreements = []
    for name in ("vocab_size", "hidden_size", "L_layers", "H_layers", "mlp_t", "num_puzzle_identifiers",
                 "puzzle_emb_ndim", "family"):
        if name not in facts:
            continue
        if name in values and values[name] != facts[name]:
            disagreements.append(f"{name}: {sources[name]} says {values[name]!r}, weights say {facts[name]!r}")
        put(name, facts[name], "weights")
    if facts.get("pos_encodings") == "learned":
        if values.get("pos_encodings", "learned") != "learned":
            disagreements.append(f"pos_encodings: config says {values['pos_encodings']!r}, "
                                 "weights have a learned position table (embed_pos)")
        put("pos_encodings", "learned", "weights")
    elif values.get("pos_encodings") == "learned":
        disagreements.append("pos_encodings: config says 'learned', weights have no embed_pos table")
    if disagreements:
        raise CheckpointError(config_path or path, "config and weights disagree: " + "; ".join(disagreements))
    # 4. Explicit overrides win over files (never over weights, which are facts).
    for name, value in overrides.items():
        if name not in OVERRIDABLE:
            raise ConfigError(f"cannot override {name!r}; overridable fields: {list(OVERRIDABLE)}")
        if value is not None:
            put(name, value, "override")
    if values.get("family") == "trm":
        values["H_layers"] = 0  # upstream TRM ignores H_layers: one network updates both states
    values.setdefault("num_puzzle_identifiers", 1)
    sources.setdefault("num_puzzle_identifiers", "default")
    if "expansion" not in values and "_mlp_intermediate" in facts:
        # Any expansion e with find_multiple(round(e * W * 2/3), 256) == I reproduces a stored intermediate size I;
        # mlp_t models store a second one (W = seq_len + prefix) that the same e must reproduce.
        widths = [(facts["hidden_size"], facts["_mlp_intermediate"])]
        if "_mlp_t_intermediate" in facts:
            widths.append((facts["_total_seq_len"], facts["_mlp_t_intermediate"]))
        expansion = _expansion_fitting(widths)
        if expansion is None:
            raise CheckpointError(path, "cannot determine expansion: no single value gives the stored SwiGLU "
                                  f"widths {[i for _, i in widths]} (give all_config.yaml)")
        put("expansion", expansion, "weights")
    # seq_len and the puzzle prefix: the weights decide them only together (a learned position table or the
    # mlp_t mixer is seq_len + prefix long); a guess is never labelled as read from the weights.
    ambiguities = _settle_seq_len_and_prefix(facts, values, sources, put, train_config is not None,
                                             config_path or dataset_path or path)
    required = {
        "seq_len": "--seq-len or a dataset.json (--dataset)",
        "H_cycles": "--h-cycles or all_config.yaml",
        "L_cycles": "--l-cycles or all_config.yaml",
        "pos_encodings": "--pos-encodings rope|none or all_config.yaml",
    }
    if not values.get("mlp_t"):
        required["num_heads"] = "--num-heads or all_config.yaml"
    else:
        values.setdefault("num_heads", 1)
    missing = [f"{name} (give {hint})" for name, hint in required.items() if name not in values]
    if missing or (ambiguities and not allow_ambiguous):
        parts = (["cannot determine " + "; ".join(missing)] if missing else []) + ambiguities
        raise CheckpointError(path, "; ".join(parts) +
                              (f"; no {CONFIG_NAME} beside the checkpoint" if train_config is None else ""))
    known = {f for f in ModelConfig.__dataclass_fields__}
    try:
        config = ModelConfig.from_dict({k: v for k, v in values.items() if k in known})
    except ConfigError as exc:
        raise CheckpointError(config_path or path, str(exc)) from None
    return config, sources, "; ".join(ambiguities) or None


def _typed(config_path: Path, name: str, value: Any) -> Any:
    """A training config's arch value, refused unless it has its field's type (a list, a string for a number, a YAML
    alias tree would otherwise travel into the model's construction)."""
    kind = str(ModelConfig.__dataclass_fields__[name].type) if name in ModelConfig.__dataclass_fields__ else ""
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          "bool": lambda v: isinstance(v, bool)}.get(kind, lambda v: isinstance(v, str))
    if not ok(value):
        shown = repr(value) if isinstance(value, (str, int, float)) else type(value).__name__
        raise CheckpointError(config_path, f"arch.{name} must be {'a' if kind != 'int' else 'an'} "
                              f"{kind or 'string'}, got {shown[:60]}")
    return value


def _expansion_fitting(widths: list[tuple[int, int]]) -> float | None:
    """An expansion that sizes every (input width, intermediate) SwiGLU as stored: 1.5 * I / D (the hidden MLP's
    exact value) if it fits all, else the smallest multiple of 1/4 that does, else the middle of the interval."""
    lo, hi = 0.0, math.inf
    for width, inter in widths:
        lo, hi = max(lo, (inter - 255.5) * 1.5 / width), min(hi, (inter + 0.5) * 1.5 / width)
    first = 1.5 * widths[0][1] / widths[0][0]
    for e in [first] + [k / 4 for k in range(1, 257)] + ([(lo + hi) / 2] if lo < hi else []):
        if all(swiglu_intermediate(width, e) == inter for width, inter in widths):
            return e
    return None


def _shipped_task_name(vocab_size: int, seq_len: int) -> str | None:
    """The shipped task with this encoding (export.accuracy.task_for_config's rule), or None."""
    from types import SimpleNamespace

    from trm_export.export.accuracy import task_for_config

    try:
        task = task_for_config(SimpleNamespace(vocab_size=vocab_size, seq_len=seq_len))
    except ValueError:
        return None
    side = getattr(task.spec, "side", 0)
    return "Sudoku" if task.spec.name == "sudoku" else f"{task.spec.name} {side}x{side}"


def _settle_seq_len_and_prefix(facts: dict, values: dict, sources: dict, put, has_config: bool,
                               blame: Path) -> list[str]:
    """Fill seq_len / puzzle_emb_len where the weights and the official rules decide them; return what stays
    ambiguous (each a message listing the candidates and the flags), after filling a provisional candidate
    whose source says "ambiguous: ..." (only used when the caller allows ambiguity, e.g. for inspect)."""
    family = values.get("family", "trm")
    ndim = int(values.get("puzzle_emb_ndim", 0))
    hidden = int(values["hidden_size"])
    total = facts.get("_total_seq_len")
    if family == "trm" and "puzzle_emb_len" not in values:
        if ndim == 0:
            # Upstream TRM prepends nothing without a puzzle embedding but sizes its state seq_len + puzzle_emb_len:
            # only 0 runs, so a bare checkpoint without one was trained with 0.
            put("puzzle_emb_len", 0, "weights (no puzzle embedding: the official TRM runs only with 0)")
        elif has_config:
            put("puzzle_emb_len", ModelConfig.puzzle_emb_len,
                f"default (the official TRM default; {CONFIG_NAME} does not set it)")
    prefix_known = family == "hrm" or ndim == 0 or "puzzle_emb_len" in values
    min_prefix = math.ceil(ndim / hidden)  # the puzzle embedding must fit in prefix x hidden_size
    if total is not None and prefix_known:
        prefix = prefix_length(family, ndim, int(values["puzzle_emb_len"]) if "puzzle_emb_len" in values
                               else ModelConfig.puzzle_emb_len, hidden)
        inferred = total - prefix
        if "seq_len" in values and values["seq_len"] != inferred:
            raise CheckpointError(
                blame, f"config and weights disagree: seq_len: {sources['seq_len']} says {values['seq_len']}, "
                f"weights say {inferred} ({total} positions minus a {prefix}-position prefix)")
        put("seq_len", inferred, "weights")
        return []
    if total is not None and "seq_len" in values:
        prefix = total - int(values["seq_len"])
        if prefix < min_prefix:
            raise CheckpointError(
                blame, f"config and weights disagree: seq_len: {sources['seq_len']} says {values['seq_len']}, but "
                f"the weights' {total} positions then leave a {prefix}-position prefix, fewer than the "
                f"{min_prefix} that the {ndim}-wide puzzle embedding needs at hidden_size {hidden}")
        put("puzzle_emb_len", prefix, f"weights ({total} positions minus seq_len {values['seq_len']} from "
                                      f"{sources['seq_len']})")
        return []
    if total is None and prefix_known:
        return []  # seq_len, if still unknown, is reported as missing (no table tells it)
    default = ModelConfig.puzzle_emb_len
    if total is None:
        # TRM with a puzzle embedding, no position table and no config: nothing in the files sizes the prefix.
        message = (f"puzzle_emb_len is ambiguous: no {CONFIG_NAME} sets it and the weights hold no position "
                   f"table; any prefix >= {min_prefix} fits them (the official default is {default}; "
                   f"puzzle_emb_len 0 means ceil(puzzle_emb_ndim / hidden_size) = {min_prefix}); "
                   "give --puzzle-emb-len")
        guess = default if default >= min_prefix else min_prefix
        put("puzzle_emb_len", guess, f"ambiguous: provisional {guess}, not read from the weights; "
                                     "give --puzzle-emb-len")
        return [message]
    # A table of seq_len + prefix positions and nothing else: every prefix from min_prefix up fits.
    notes: dict[int, list[str]] = {}
    shipped = []
    for prefix in range(max(min_prefix, 1), total):
        name = _shipped_task_name(int(values["vocab_size"]), total - prefix)
        if name:
            notes.setdefault(prefix, []).append(name)
            shipped.append((total - prefix, prefix, name))
    notes.setdefault(min_prefix, []).append(f"puzzle_emb_len 0 = ceil({ndim} / {hidden})")
    if default >= min_prefix and total - default >= 1:
        notes.setdefault(default, []).append("the official default puzzle_emb_len")
    order = sorted(notes, key=lambda p: (not any(s[1] == p for s in shipped), p))
    listed = ", ".join(f"seq_len {total - p} with prefix {p} ({'; '.join(notes[p])})" for p in order[:8])
    more = f", ... {len(order) - 8} more" if len(order) > 8 else ""
    message = (f"seq_len and puzzle_emb_len are ambiguous: the weights fit seq_len + puzzle_emb_len = {total} "
               f"({listed}{more}; any prefix from {max(min_prefix, 1)} to {total - 1} fits); give --seq-len / "
               "--puzzle-emb-len or a dataset.json (--dataset)")
    if len(shipped) == 1:
        seq, prefix, name = shipped[0]
        message += f"; suggestion, if it was trained on {name}: --seq-len {seq} --puzzle-emb-len {prefix}"
    pick = shipped[0][1] if len(shipped) == 1 else (default if default in notes else min_prefix)
    why = f"ambiguous: provisional, not read from the weights ({total} positions fit several pairs)"
    put("seq_len", total - pick, why)
    put("puzzle_emb_len", pick, why)
    return [message]


def _build_model(config: ModelConfig) -> RecursiveModel:
    """RecursiveModel(config) without allocating the puzzle-embedding table, which the checkpoint's tensor replaces
    (load_state_dict(assign=True)): the model is built with a one-row table, then shaped as the config says."""
    if config.puzzle_emb_ndim == 0 or config.num_puzzle_identifiers == 1:
        return RecursiveModel(config)
    import dataclasses

    model = RecursiveModel(dataclasses.replace(config, num_puzzle_identifiers=1))
    model.config = config
    model.puzzle_emb.weights = torch.empty(config.num_puzzle_identifiers, config.puzzle_emb_ndim, device="meta")
    return model


def check_state_dict(path: Path, model: RecursiveModel, state: dict[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    for key in sorted(set(expected) & set(state)):
        if tuple(expected[key].shape) != tuple(state[key].shape):
            problems.append(f"shape mismatch for {key}: expected {list(expected[key].shape)} from the config, "
                            f"got {list(state[key].shape)}")
    if problems:
        raise CheckpointError(path, "weights do not fit the model: " + "; ".join(problems))


def load_checkpoint(path: str | Path, dataset_json: str | Path | None = None,
                    overrides: dict[str, Any] | None = None, allow_ambiguous: bool = False) -> LoadedCheckpoint:
    """Load `path` (file or directory) into a float32 `RecursiveModel` in eval mode.

    `dataset_json` points at the data set's dataset.json (file or folder) when it is not beside the checkpoint;
    `overrides` sets fields that neither the files nor the shapes tell (seq_len, num_heads, ...).
    Where the weights fit several (seq_len, puzzle_emb_len) pairs and nothing decides, loading fails with the
    candidates and the flags; `allow_ambiguous=True` (for showing a checkpoint, never for exporting it) loads a
    provisional candidate instead, with `ambiguous` set and the sources saying "ambiguous: ...".
    """
    file = find_checkpoint_file(Path(path))
    raw = read_state_dict(file)
    prefix, state = strip_prefix(file, raw)
    config_path = file.parent / CONFIG_NAME
    train_config = read_yaml(config_path) if config_path.is_file() else None
    dataset_path = locate_dataset_json(file.parent, train_config, Path(dataset_json) if dataset_json else None)
    dataset = read_dataset_json(dataset_path) if dataset_path else None
    config, sources, ambiguous = build_config(file, state, train_config, config_path if train_config else None,
                                              dataset, dataset_path, dict(overrides or {}), allow_ambiguous)
    model = _build_model(config)
    check_state_dict(file, model, state)
    stored_dtypes = {k: str(v.dtype).replace("torch.", "") for k, v in state.items()}
    # assign=True: the model takes the loaded tensors (float32 ones as they are, others converted once) instead of
    # copying them into its own; an ARC puzzle table (~1M x 512) is held once, not twice.
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    del raw, state
    model.float().eval()
    return LoadedCheckpoint(path=file, config=config, model=model, key_prefix=prefix, sha256=sha256_file(file),
                            stored_dtypes=stored_dtypes, dataset=dataset,
                            config_path=config_path if train_config else None, dataset_path=dataset_path,
                            sources=sources, ambiguous=ambiguous)
