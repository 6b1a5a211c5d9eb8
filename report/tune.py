"""`trm-export tune BUNDLE`: time ONNX Runtime against OpenVINO on this CPU, record which is faster per batch size.

Both engines run the same step in float32: OpenVINO the bundle's standard-ops graph where the bundle carries one
(the cpu target's fp32), ONNX Runtime the fused graph, each engine its faster form. For each batch size they are
timed in alternating rounds (a fresh Solver each turn, one alive at a time: an idle session's spinning threads
would slow the other on a small machine). Each round times both engines one right after the other, in turns (ONNX
Runtime first in odd rounds, OpenVINO first in even ones), so a change in a shared machine's load between rounds
neither hides a lead nor invents one, and neither engine always gets the warmer or the quieter slot.

OpenVINO is recorded as the engine where it was faster in most rounds and by at least 5% in the median
(SWITCH_MARGIN), and only after it passed the bundle's golden self-check here. Why a majority and not every
round: the two engines give the same answers, so a wrong pick costs only the difference between them; where they
are equal either pick is right, and where one leads by a few percent a majority of paired rounds finds it far more
often than unanimity does (the paper-size maze step at batch 8: OpenVINO 4-9% faster in the medians of two tune
runs, and both runs kept ONNX Runtime under the earlier, stricter rules; one had OpenVINO win 4 of 5 rounds). Why
a margin: a lead smaller than the machine's round-to-round noise is a coin toss, and a wrong switch is then as
likely to cost as to pay. `backend="auto"` then follows the record (runtime.cpu_engines).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from trm_export.errors import BundleError
from trm_export.report.latency import StepTiming, time_steps
from trm_export.runtime.backend import importable
from trm_export.runtime.cpu_engines import machine, write_record
from trm_export.runtime.manifest import read_manifest
from trm_export.runtime.openvino_backend import HOW_TO_INSTALL
from trm_export.runtime.selfcheck import verify_bundle
from trm_export.runtime.solver import Solver

ENGINES = ("onnxruntime", "openvino")
# A switch must pay more than a shared machine's round-to-round noise: on the 2-core reference machine the same
# engine moved by 10-15% between rounds, and a tune that switched Sudoku batch 64 to OpenVINO on a 1.04x median
# was 0.89x in the next run (benchmarks/results/cpu_engines.md). Ties stay on ONNX Runtime.
SWITCH_MARGIN = 1.05


@dataclass(frozen=True)
class EngineRow:
    batch: int
    ms: dict[str, list[float]]  # engine -> median ms per step of each round

    @property
    def openvino_wins(self) -> int:
        """Rounds in which OpenVINO was faster than ONNX Runtime (the two timed back to back)."""
        return sum(o < r for o, r in zip(self.ms["openvino"], self.ms["onnxruntime"]))  # noqa: B905 - 3.8

    @property
    def engine(self) -> str:
        """OpenVINO where it was faster in most rounds (each timed back to back with ONNX Runtime) and by at least
        SWITCH_MARGIN in the median; ONNX Runtime, the engine every install has, otherwise (a tie included)."""
        ov, ort = self.ms["openvino"], self.ms["onnxruntime"]
        most = len(ov) == len(ort) and 2 * self.openvino_wins > len(ov)
        return "openvino" if most and self.speedup >= SWITCH_MARGIN else "onnxruntime"

    @property
    def speedup(self) -> float:
        """OpenVINO's speed over ONNX Runtime's (median of the rounds): > 1 is faster."""
        return statistics.median(self.ms["onnxruntime"]) / statistics.median(self.ms["openvino"])

    def record(self) -> dict:
        return {"engine": self.engine, "speedup": round(self.speedup, 3),
                "ms_per_step": {e: round(statistics.median(v), 3) for e, v in self.ms.items()},
                "rounds": len(self.ms["onnxruntime"]), "openvino_won_rounds": self.openvino_wins,
                "ms_per_round": {e: [round(t, 3) for t in v] for e, v in self.ms.items()}}


def tune_cpu_engines(bundle: str | Path, variant: str | None = None, batches: tuple[int, ...] = (1, 64),
                     threads: int | None = None, seconds: float = 1.0, rounds: int = 5,
                     log: Callable[[str], None] = print) -> tuple[list[EngineRow], Path]:
    """Time both engines on `bundle` at each batch size; write this machine's record; return the rows and file."""
    if not importable("openvino"):
        raise BundleError(f"tune compares ONNX Runtime with OpenVINO, and OpenVINO is not installed: {HOW_TO_INSTALL}")
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    variant = manifest.default_variant if variant is None else variant
    if variant not in manifest.graphs:
        raise BundleError(f"requested variant {variant!r}; this bundle has {sorted(manifest.graphs)}")
    report = verify_bundle(bundle, variant=variant, backend="openvino")
    if not report:
        raise BundleError(f"variant {variant!r} fails the bundle's golden self-check on OpenVINO here, so it is not "
                          f"a candidate: {str(report).splitlines()[0]}")
    log(f"{variant} on OpenVINO passes the golden self-check; timing {', '.join(ENGINES)} on {machine()}")
    rows = []
    for batch in batches:
        ms: dict[str, list[float]] = {e: [] for e in ENGINES}
        started = time.perf_counter()
        for r in range(rounds):
            for engine in ENGINES if r % 2 == 0 else ENGINES[::-1]:  # in turns: neither always goes first
                solver = Solver(bundle, variant=variant, backend=engine, batch_size=batch, threads=threads,
                                verify=False)
                timing: StepTiming = time_steps(solver, seconds)
                del solver
                ms[engine].append(timing.p50)
            left = (time.perf_counter() - started) / (r + 1) * (rounds - r - 1)
            log(f"  batch {batch}: round {r + 1}/{rounds}" + (f", about {left:.0f} s left" if left >= 1 else ""))
        rows.append(EngineRow(batch, ms))
    measured = datetime.now(timezone.utc).isoformat(timespec="minutes")
    path = write_record(manifest.digest, variant, threads, {row.batch: row.record() for row in rows}, measured)
    return rows, path
