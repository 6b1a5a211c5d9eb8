"""Which CPU engine `backend="auto"` runs: ONNX Runtime, or OpenVINO where it was measured faster here.

The two engines run the same graph file, in float32, with the same answers (within float32 rounding); which one is
faster depends on the CPU, the model and the batch size (OpenVINO's fusions pay at large batches of attention
steps; ONNX Runtime often leads at batch 1). So the choice is measured, never guessed: `trm-export tune BUNDLE`
times both on this machine and records the result per (bundle digest, variant, batch size, threads, CPU) in a
small file outside the bundle (bundles are sealed and travel; a measurement belongs to the machine). `auto` then
runs OpenVINO where a record of this machine says it beat ONNX Runtime (in most paired rounds and in the
median: report/tune.py), and says so in `Solver.backend_note`; without a record it runs ONNX Runtime, as always.

The record file is `$TRM_EXPORT_TUNE_FILE`, else `~/.cache/trm-export/cpu_engines.json`. It is read as untrusted:
anything malformed is ignored, with a note.
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trm_export.runtime.manifest import Manifest

RECORD_ENV = "TRM_EXPORT_TUNE_FILE"


def cpu_model() -> str:
    """The CPU's model name (Linux tells it in /proc/cpuinfo), else what the platform module says."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith(("model name", "Model"))), cpu)
    except OSError:
        pass
    return cpu


def machine() -> str:
    """What a measurement belongs to: CPU model and the cores this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()}, {cores} core{'' if cores == 1 else 's'}"


def record_file() -> Path:
    return Path(os.environ.get(RECORD_ENV) or Path.home() / ".cache" / "trm-export" / "cpu_engines.json")


def _key(digest: str, variant: str, threads: int | None) -> str:
    return f"{digest}|{variant}|threads={threads or 'default'}|{machine()}"


def read_records(path: Path | None = None) -> tuple[dict[str, Any], str | None]:
    """(records, note): the record file's entries; a note (and no records) when it exists but is unreadable."""
    path = path or record_file()
    if not path.is_file():
        return {}, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return {}, f"{path}: unreadable engine record ({exc}); ignored: run `trm-export tune BUNDLE` again"
    return data, None


def measured_engine(manifest: Manifest, variant: str, batch: int,
                    threads: int | None) -> tuple[str | None, str | None]:
    """(engine, note) from this machine's record for the nearest measured batch size; (None, note) without one.
    Without a record file (the usual case) nothing else is computed: this runs at every `auto` Solver's start."""
    records, note = read_records()
    if not records:
        return None, note
    entry = records.get(_key(manifest.digest, variant, threads))
    if not isinstance(entry, dict) or not isinstance(entry.get("batches"), dict):
        return None, note
    batches = {int(b): v for b, v in entry["batches"].items()
               if str(b).isdigit() and int(b) > 0 and isinstance(v, dict)}
    if not batches:
        return None, note
    nearest = min(batches, key=lambda b: (abs(math.log(b) - math.log(batch)), b))
    row = batches[nearest]
    engine = row.get("engine")
    if engine not in ("onnxruntime", "openvino"):
        return None, note
    speedup = row.get("speedup")
    words = f"{speedup:.2f}x ONNX Runtime's speed" if isinstance(speedup, (int, float)) else "faster"
    return engine, (f"OpenVINO: measured {words} on this CPU at batch {nearest} (trm-export tune, "
                    f"{entry.get('measured', '?')})" if engine == "openvino" else None)


def write_record(digest: str, variant: str, threads: int | None, batches: dict[int, dict[str, Any]],
                 measured: str) -> Path:
    """Add or replace this machine's record for (bundle, variant, threads); the file is replaced atomically."""
    path = record_file()
    records, _ = read_records(path)
    records[_key(digest, variant, threads)] = {"measured": measured, "machine": machine(),
                                               "batches": {str(b): v for b, v in sorted(batches.items())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".cpu_engines.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(records, out, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path
