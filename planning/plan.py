"""What an export covers, decided from the work before any of it runs.

The same checkpoint, data, target and flags give the same plan on a quiet or a busy machine: each stage's sample
is sized by counting, never by timing. One puzzle-step costs `step_flops` (counted from the model's shapes:
export.config.ModelConfig.step_flops), each kind of work a fixed multiple of it (COST), and each stage gets a
fixed work budget (BUDGET), written as the seconds that work takes at NOMINAL_FLOPS: float32 PyTorch steps on a
quiet 2-core AMD Zen 4, where the budgets were set (measured there: 99 GFLOP/s on the bundled Sudoku model at
batch 64, 123 on a paper-size maze at batch 1). A faster or slower machine gets the same plan and spends less or
more time on it; a machine's speed turns the plan into "about N s here" on the console and decides nothing.

Correctness has floors the budgets never cut: parity and the golden vectors cover every step up to the trained
limit for at least one puzzle (`check_steps` lowers that only when the user asks, recorded as their choice).

The plan is recorded in the manifest (`plan`); `--plan FILE` (a bundle's manifest.json, or the plan alone)
replays it exactly, and the sample flags override single fields of it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trm_export.errors import InputError

NOMINAL_FLOPS = 100e9
# What one puzzle-step of each kind of work costs, in float32 PyTorch reference steps (measured on the fixtures
# and the paper-size maze, 2 threads: ONNX Runtime's step 0.6-0.65 of PyTorch's; float64 2-3x; bfloat16 where the
# CPU emulates it 5-30x; the calibrator runs the step unoptimised with every activation as an output, ~2x).
COST = {"reference": 1.0, "onnxruntime": 0.65, "float64": 3.0, "bfloat16": 10.0, "calibrate": 2.0}
# Per puzzle-step of each stage: parity records the reference and runs the graph three times (fed the reference's
# states, fixed, adaptive); a golden candidate traces float32, the export form and float64.
PARITY_STEP = COST["reference"] + 3 * COST["onnxruntime"]
GOLDEN_STEP = 2 * COST["reference"] + COST["float64"]
# Work budgets in seconds at NOMINAL_FLOPS. The paper-size fixtures (benchmarks/paper_size.py) finish each CLI
# stage within 10 minutes on a quiet 2-core machine at these; the shipped models are covered whole or nearly.
BUDGET = {
    "parity": 45.0,  # the parity sample's puzzles (every planned step of each)
    "golden": 60.0,  # rounding-stable candidates for the golden vectors
    "trained_dtype": 20.0,  # the accuracy in the arithmetic the model was trained in (bfloat16)
    "evaluation": 60.0,  # the FP32 reference loop every variant is measured against
    "calibration": 30.0,  # recording the step inputs on the calibration puzzles
    "methods": 100.0,  # calibrating, quantizing and screening each calibration method
    "mixed": 120.0,  # mixed precision's layer ranking and tries, when the best method misses the accuracy budget
    "choice": 60.0,  # measuring screened variants on the rest of the evaluation before the choice
    "report": 30.0,  # an fp32 bundle's report: its accuracy run, every variant and backend together
    "timing_step": 0.5,  # one timed step: the largest batch (a power of two, at most the target's) that fits
}
SCREEN_PUZZLES = 200  # every variant is first measured on this many evaluation puzzles (a fifth when cut)
GOLDEN_CANDIDATES_PER_VECTOR = 4  # golden vectors are chosen among rounding-stable puzzles of 4 x as many
TRAINED_DTYPE_MAX_PUZZLES = 200

# The fields a user can set (flags, a --plan file); the rest describe the model the plan was made for.
SAMPLE_FIELDS = ("check_steps", "parity_puzzles", "golden_candidates", "trained_dtype_puzzles", "eval_puzzles",
                 "screen_puzzles", "calib_puzzles", "methods", "mixed_puzzle_steps", "choice_puzzles",
                 "timing_batch", "report_puzzles")


@dataclass(frozen=True)
class Plan:
    """Sample sizes of every stage; None: the stage is not part of this run."""

    step_flops: int  # per puzzle-step, counted
    trained_steps: int
    check_steps: int  # steps parity and the golden vectors cover
    parity_puzzles: int
    golden_candidates: int
    trained_dtype_puzzles: int  # 0: not measured (float32-trained, no labels, or one puzzle is past its budget)
    eval_puzzles: int | None = None
    screen_puzzles: int | None = None
    calib_puzzles: int | None = None
    methods: tuple[str, ...] | None = None  # calibration methods built, in order
    mixed_puzzle_steps: int | None = None  # the most puzzle-steps mixed precision may take (ranking + tries)
    choice_puzzles: int | None = None  # evaluation puzzles the choice may add to screened variants, all together
    timing_batch: int | None = None  # the batch step latency is timed at (besides 1)
    report_puzzles: int | None = None  # an fp32 bundle's report: held-out puzzles per variant
    available: dict[str, int] = field(default_factory=dict)  # puzzles there were to take from: parity, eval, calib
    # field -> who set it ("--parity-puzzles", "--plan FILE"); a field not listed was sized from the work here.
    set_by: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """A recorded plan (read_plan's fields or to_dict's), back as a Plan."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if values.get("methods") is not None:
            values["methods"] = tuple(values["methods"])
        values.setdefault("check_steps", values.get("trained_steps"))
        for name in ("parity_puzzles", "golden_candidates", "trained_dtype_puzzles"):
            values.setdefault(name, 0)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["methods"] = None if self.methods is None else list(self.methods)
        out["nominal_gflops"] = NOMINAL_FLOPS / 1e9
        out["budget_seconds"] = dict(BUDGET)
        return out

    def replace(self, **changes: Any) -> Plan:
        return dataclasses.replace(self, **changes)

    def nominal_seconds(self) -> float:
        """What the planned work takes at NOMINAL_FLOPS (the console's estimate scales it by this machine's rate)."""
        step = self.step_flops / NOMINAL_FLOPS
        seconds = self.check_steps * step * (self.parity_puzzles * PARITY_STEP + self.golden_candidates * GOLDEN_STEP)
        seconds += self.trained_steps * step * self.trained_dtype_puzzles * COST["bfloat16"]
        if self.eval_puzzles is not None:
            ort = self.trained_steps * step * COST["onnxruntime"]
            samples = self.trained_steps * (self.calib_puzzles or 0)
            per_method = samples * step * COST["calibrate"] + 2 * (self.screen_puzzles or 0) * ort
            seconds += ort * (self.eval_puzzles + (self.calib_puzzles or 0)) + len(self.methods or ()) * per_method
        return seconds


def fits(budget: str, unit_seconds: float, most: int, least: int = 1) -> int:
    """How many units of `unit_seconds` (nominal) the stage's budget covers, within [least, most]."""
    if unit_seconds <= 0:
        return most
    return max(least, min(most, int(BUDGET[budget] / unit_seconds)))


def plan_export(step_flops: int, trained_steps: int, parity_available: int, golden_count: int,
                trained_dtype: bool, fixed: dict[str, Any] | None = None, set_by: dict[str, str] | None = None) -> Plan:
    """The export stage's samples: parity, golden vectors, the accuracy as trained (bfloat16 models with labels).

    `fixed`: fields already decided (a --plan file, flags), taken as they are; `set_by` says by whom."""
    fixed = dict(fixed or {})
    steps = int(fixed.get("check_steps") or trained_steps)
    if not 1 <= steps <= trained_steps:
        raise InputError(f"check_steps {steps}: between 1 and the trained step limit {trained_steps}")
    per_step = step_flops / NOMINAL_FLOPS
    sized = {
        "parity_puzzles": fits("parity", steps * PARITY_STEP * per_step, parity_available),
        "golden_candidates": fits("golden", steps * GOLDEN_STEP * per_step,
                                  min(parity_available, GOLDEN_CANDIDATES_PER_VECTOR * golden_count)),
        "trained_dtype_puzzles": (fits("trained_dtype", trained_steps * COST["bfloat16"] * per_step,
                                       min(parity_available, TRAINED_DTYPE_MAX_PUZZLES), least=0)
                                  if trained_dtype else 0),
    }
    values = {**sized, **{k: v for k, v in fixed.items() if k in sized}}
    if values["parity_puzzles"] > parity_available:
        raise InputError(f"the plan checks parity on {values['parity_puzzles']} puzzles; {parity_available} were "
                         "given: replay it with the same puzzles, or lower --parity-puzzles")
    values["golden_candidates"] = max(1, min(values["golden_candidates"], parity_available))
    return Plan(step_flops=step_flops, trained_steps=trained_steps, check_steps=steps, set_by=dict(set_by or {}),
                available={"parity": parity_available}, **values)


def plan_quantize(plan: Plan, eval_available: int, calib_available: int, methods: tuple[str, ...],
                  max_samples: int | None, target_batch: int, fixed: dict[str, Any] | None = None,
                  set_by: dict[str, str] | None = None, screen_most: int | None = SCREEN_PUZZLES) -> Plan:
    """The quantize stage's samples on top of `plan`: evaluation (every variant on the same puzzles), screening,
    calibration puzzles, which methods, what mixed precision and the choice may add, the timed batch."""
    fixed = dict(fixed or {})
    steps = plan.trained_steps  # variants are measured on the whole loop: the accuracy a user gets
    ort = steps * COST["onnxruntime"] * plan.step_flops / NOMINAL_FLOPS  # one puzzle's loop in ONNX Runtime
    n_eval = int(fixed.get("eval_puzzles") or fits("evaluation", ort, eval_available))
    if n_eval > eval_available:
        raise InputError(f"the plan measures {n_eval} evaluation puzzles; {eval_available} are available: replay it "
                         "with the same data, or lower --eval-puzzles")
    most = n_eval if screen_most is None else screen_most
    screen = fixed.get("screen_puzzles") or (min(most, n_eval) if n_eval == eval_available
                                             else max(1, min(most, n_eval // 5)))
    calib = int(fixed.get("calib_puzzles") or fits("calibration", ort, calib_available))
    if calib > calib_available:
        raise InputError(f"the plan calibrates on {calib} puzzles; {calib_available} are available: replay it with "
                         "the same calibration puzzles, or lower --calib-puzzles")
    if "methods" in fixed and fixed["methods"] is not None:
        chosen = tuple(fixed["methods"])
    else:
        samples = calib * steps if max_samples is None else min(calib * steps, max_samples)
        method = (samples * COST["calibrate"] * plan.step_flops / NOMINAL_FLOPS + screen * ort)
        chosen = methods[:fits("methods", method, len(methods), least=min(1, len(methods)))]
    # a replayed batch never beyond the target's (a recorded plan is a stranger's input)
    timing = min(target_batch, fixed.get("timing_batch") or timing_batch(plan.step_flops, target_batch))
    sized = {
        "mixed_puzzle_steps": int(BUDGET["mixed"] / (COST["onnxruntime"] * plan.step_flops / NOMINAL_FLOPS)),
        "choice_puzzles": fits("choice", ort, eval_available, least=0),
    }
    values = {**sized, **{k: int(v) for k, v in fixed.items() if k in sized}}
    return plan.replace(eval_puzzles=n_eval, screen_puzzles=int(min(screen, n_eval)), calib_puzzles=calib,
                        methods=chosen, timing_batch=int(timing), set_by={**plan.set_by, **(set_by or {})},
                        available={**plan.available, "eval": eval_available, "calib": calib_available}, **values)


def plan_report(step_flops: int, steps: int, available: int, jobs: int, batch: int,
                work_seconds: float = BUDGET["report"]) -> int:
    """A report's held-out puzzles: as many whole batches (at least one) as `work_seconds` of nominal work cover,
    every variant and backend (`jobs`) run on them for `steps` steps."""
    per_puzzle = jobs * steps * COST["onnxruntime"] * step_flops / NOMINAL_FLOPS
    fit = int(work_seconds / per_puzzle) if per_puzzle > 0 else available
    return available if fit >= available else max(min(batch, available), fit // batch * batch)


def step_flops_of(manifest: Any) -> int | None:
    """A bundle's FLOPs per puzzle-step: as its plan recorded them, or counted from its model config (a bundle
    written before plans were recorded); None when the config is not one trm-export knows."""
    recorded = (manifest.plan or {}).get("step_flops")
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded > 0:
        return recorded
    from trm_export.export.config import ModelConfig  # torch-free: the shapes' arithmetic only

    try:
        return ModelConfig.from_dict(dict(manifest.model.get("config") or {})).step_flops
    except Exception:  # a stranger's or a future config: the caller measures every puzzle it was asked for
        return None


def timing_batch(step_flops: int, target_batch: int) -> int:
    """The target's batch, or the largest power of two below it whose step fits BUDGET['timing_step'] (a
    paper-size model at batch 64 on a CPU would take minutes per timed step)."""
    step = COST["onnxruntime"] * step_flops / NOMINAL_FLOPS
    if target_batch * step <= BUDGET["timing_step"]:
        return target_batch
    return max(1, 1 << int(math.log2(max(1.0, BUDGET["timing_step"] / step))))


def read_plan(path: str | Path) -> dict[str, Any]:
    """The sample fields of a recorded plan: a bundle's manifest.json (its `plan`), a bundle folder, or the plan's
    own JSON. One clear line when the file is not one."""
    path = Path(path)
    source = path / "manifest.json" if path.is_dir() else path
    try:
        data = json.loads(source.read_bytes()[: 1 << 24])
    except (OSError, ValueError) as exc:
        raise InputError(f"--plan {path}: cannot read a plan from it ({exc}); give a bundle's manifest.json or the "
                         "plan it records") from None
    if isinstance(data, dict) and isinstance(data.get("plan"), dict):
        data = data["plan"]
    if not isinstance(data, dict) or "step_flops" not in data:
        raise InputError(f"--plan {path}: no recorded plan in it (a bundle's manifest.json has one under 'plan', "
                         "written by trm-export 0.1 or later); export once without --plan to make one")
    fields = recorded_fields(data, f"--plan {path}")
    del fields["set_by"], fields["available"]  # a replay's fields are set by --plan, sized against today's data
    return fields


def recorded_fields(data: dict[str, Any], where: str) -> dict[str, Any]:
    """A recorded plan's fields, each checked (a plan comes from a stranger's manifest or file): the model's step
    cost and step limit, the sample counts, the methods, and who set what. One clear line for a wrong one."""
    def count(name: str, value: Any, least: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= 1 << 40:
            raise InputError(f"{where}: {name} must be a count (an integer of at least {least}), got {value!r}")
        return value

    out: dict[str, Any] = {"step_flops": count("step_flops", data.get("step_flops"), 1),
                           "trained_steps": count("trained_steps", data.get("trained_steps"), 1)}
    for name in SAMPLE_FIELDS:
        value = data.get(name)
        if value is None:
            continue
        if name == "methods":
            if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
                raise InputError(f"{where}: methods must be a list of calibration method names, got {value!r}")
            out[name] = tuple(value)
        else:
            out[name] = count(name, value)
    set_by, available = data.get("set_by"), data.get("available")
    out["set_by"] = ({k: v for k, v in set_by.items() if isinstance(k, str) and isinstance(v, str)}
                     if isinstance(set_by, dict) else {})
    out["available"] = ({k: v for k, v in available.items() if isinstance(k, str) and isinstance(v, int)
                         and not isinstance(v, bool)} if isinstance(available, dict) else {})
    return out


def check_replay(recorded: dict[str, Any], step_flops: int, trained_steps: int, path: str) -> None:
    """A replayed plan must be one for this model: the same step cost and step limit."""
    if (recorded.get("step_flops"), recorded.get("trained_steps")) != (step_flops, trained_steps):
        raise InputError(f"--plan {path}: made for a model of {recorded.get('step_flops')} FLOPs per step and "
                         f"{recorded.get('trained_steps')} steps; this checkpoint's are {step_flops} and "
                         f"{trained_steps}: replay a plan of the same model")


def describe(plan: Plan, seconds_here: float | None = None, export: bool = True) -> list[str]:
    """The plan in a few lines, for the console before the work; without `export`, the variants' part only (the
    export's was printed when it was made)."""
    def who(name: str) -> str:
        return f" ({plan.set_by[name]})" if name in plan.set_by else ""

    def of(count: int, pool: str, budget: str, name: str) -> str:
        available = plan.available.get(pool)
        if name in plan.set_by:
            return f"{count} puzzles ({plan.set_by[name]})"
        if available is None or count >= available:
            return f"all {count} puzzles"
        return f"{count} of {available} puzzles ({BUDGET[budget]:g} s of work at {NOMINAL_FLOPS / 1e9:g} GFLOP/s)"

    steps = (f"all {plan.trained_steps} steps" if plan.check_steps == plan.trained_steps else
             f"the first {plan.check_steps} of {plan.trained_steps} steps{who('check_steps')}")
    lines = [f"plan, sized from the work ({plan.step_flops / 1e9:.3g} GFLOP per puzzle-step, {plan.trained_steps} "
             "steps), never from the clock; recorded in the manifest, replayed by --plan:"]
    if export:
        lines += [f"  parity: {of(plan.parity_puzzles, 'parity', 'parity', 'parity_puzzles')} x {steps}",
                  f"  golden vectors: chosen among {plan.golden_candidates} puzzles, {steps}{who('golden_candidates')}"]
    if export and plan.trained_dtype_puzzles:
        lines.append(f"  accuracy as trained (bfloat16): {plan.trained_dtype_puzzles} puzzles")
    if plan.report_puzzles is not None:
        lines.append(f"  report: {plan.report_puzzles} held-out puzzles")
    if plan.eval_puzzles is not None:
        lines += [f"  evaluation: {of(plan.eval_puzzles, 'eval', 'evaluation', 'eval_puzzles')}, every variant "
                  f"screened on the first {plan.screen_puzzles}",
                  f"  calibration: {of(plan.calib_puzzles or 0, 'calib', 'calibration', 'calib_puzzles')}; methods "
                  f"{', '.join(plan.methods or ()) or 'none'}{who('methods')}"]
    if seconds_here is not None:
        lines.append(f"  about {_duration(seconds_here)} on this machine (from timed reference steps of a batch; an "
                     "estimate: the time decides nothing)")
    return lines


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
