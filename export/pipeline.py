"""`trm-export MODEL --target T -o OUT`: checkpoint in, verified bundle out, one call.

Stages: load the checkpoint -> pick real puzzles (the matching task's held-out split, or the user's) ->
export the step graph at the target's opset -> write tables, graph and golden vectors to a staging folder ->
verify parity against the PyTorch reference by running the staged bundle with the runtime -> commit.
"""

from __future__ import annotations

import copy
import json
import platform
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from trm_export import __version__
from trm_export.distribution.wheel import RUNTIME_FOLDER, download_wheelhouse, parse_wheelhouse, runtime_wheel
from trm_export.errors import TrmExportError
from trm_export.export.accuracy import trained_dtype_accuracy
from trm_export.export.checkpoint import LoadedCheckpoint, load_checkpoint
from trm_export.export.onnx_graph import check_graph, export_step_graph
from trm_export.export.parity import ROUNDING_SENSITIVE_THRESHOLD, ParityReport, check_parity, rounding_sensitive
from trm_export.export.puzzle_rows import only_kept, select_rows
from trm_export.export.reference import run_reference
from trm_export.export.staging import StagedBundle
from trm_export.planning.plan import SAMPLE_FIELDS, Plan, describe, plan_export
from trm_export.runtime.manifest import (
    FORMAT_VERSION,
    EmbeddingSpec,
    GraphSpec,
    LoopSpec,
    Manifest,
    TaskEncoding,
)
from trm_export.runtime.selfcheck import check_golden, golden_figures
from trm_export.runtime.solver import Solver
from trm_export.targets.device_readme import SAMPLES
from trm_export.targets.engines import write_build_recipes
from trm_export.targets.registry import Target, get_target
from trm_export.tasks.arc import ARC_SEQ_LEN, ARC_VOCAB
from trm_export.tasks.official import HELDOUT_PUZZLES
from trm_export.web.bundle import find_ort_web, write_web_app

# The TorchScript exporter's highest opset that every TensorRT-10 parser accepts; lower targets cap it further.
EXPORTER_MAX_OPSET = 20
GOLDEN_FOLDER = "golden"
FP32_TOLERANCES = {"q_abs": 1e-3, "q_sign_agreement": 1.0, "predictions_identical": 1.0}


class ParityError(TrmExportError):
    """The exported graph does not reproduce the PyTorch reference."""


class RoundingSensitiveError(TrmExportError):
    """--strict: float32 itself cannot reproduce the model's answers on too many puzzles (nothing is written)."""


@dataclass(frozen=True)
class ExportOptions:
    target: str = "cpu"
    force: bool = False
    # The samples of parity, golden vectors and the accuracy as trained (trm_export.planning: sized from the
    # model's FLOPs and the puzzles, never the clock). None: sized here from the fields below and `replay`.
    plan: Plan | None = None
    replay: dict[str, Any] | None = None  # fields of a recorded plan (planning.read_plan), taken as they are
    parity_puzzles: int | None = None  # the first N puzzles (None: as the plan sizes it)
    golden_puzzles: int = 8  # golden vectors, chosen among rounding-stable candidates (the plan says how many)
    # Steps parity and the golden vectors cover: None, every step up to the trained limit; an int lowers it (the
    # user's explicit choice, recorded). Each step is the same graph, fed the state the previous step produced, so
    # the first steps check the graph; they do not see what later states do.
    check_steps: int | None = None
    puzzle_table_dtype: str = "float32"  # or "float16": halves a large (ARC) puzzle table
    # identifiers.json of the official dataset folder (the names of the puzzle table's rows), copied into the
    # bundle: ARC's runtime finds a task's views there. Its length must be the table's row count.
    identifiers: Path | None = None
    # Keep only these rows of the puzzle table (export.puzzle_rows: a dataset folder, an ARC challenge file or a
    # list of identifiers); None keeps every row.
    keep_puzzles: Path | None = None
    # A model trained in bfloat16 (forward_dtype, the official default): its accuracy computed as the official code
    # computes (export.bfloat16) on the labelled puzzles the plan sizes, recorded in manifest.reference for the
    # report: the number the user's training printed, beside every variant's. False: not measured.
    trained_dtype: bool = True
    tolerance: float = 1e-4
    batch_size: int = 64
    progress: bool = True
    # Above this share of rounding-sensitive puzzles (parity.ROUNDING_SENSITIVE_THRESHOLD) the export warns; with
    # strict it refuses, before the bundle is committed.
    rounding_sensitive_threshold: float = ROUNDING_SENSITIVE_THRESHOLD
    strict: bool = False
    # Standard ONNX ops only: the cpu target otherwise writes attention and rope as ONNX Runtime's contrib nodes
    # (export/onnxruntime_ops.py), which ONNX Runtime runs and OpenVINO through runtime/openvino_ops.py only.
    standard_ops: bool = False
    # The runtime's dependency wheels for a device's platform ("linux_aarch64-cp310"), beside the trm-export wheel
    # every bundle carries (distribution.wheel): an offline device installs from the bundle alone.
    wheelhouse: str | None = None


@dataclass(frozen=True)
class Puzzles:
    """Real puzzles for parity and golden vectors, with where they came from."""

    tokens: np.ndarray
    puzzle_ids: np.ndarray
    labels: np.ndarray | None
    source: str
    task_name: str | None
    grid_side: int | None = None


def default_puzzles(ck: LoadedCheckpoint) -> Puzzles:
    """The held-out split of the shipped task that matches the model's encoding."""
    from trm_export.export.accuracy import task_for_config

    try:
        task = task_for_config(ck.config)
    except ValueError as exc:
        raise TrmExportError(f"{exc}. Give real puzzles for the parity check with --puzzles FILE (.npy tokens)") \
            from None
    data = task.split("heldout")
    return Puzzles(data.inputs, data.puzzle_ids, data.labels, f"{task.spec.name} held-out split", task.spec.name,
                   task.spec.side)


def puzzles_from_file(path: Path, config) -> Puzzles:
    """The user's own puzzles (.npy tokens [N, seq_len], or the matching task's text format), without labels."""
    from trm_export.export.accuracy import task_for_config
    from trm_export.runtime.io import read_puzzles
    from trm_export.runtime.manifest import TaskEncoding
    from trm_export.runtime.validate import validate_puzzles

    path = Path(path)
    try:
        spec = task_for_config(config).spec
    except ValueError:
        spec = None
    encoding = TaskEncoding(spec.name if spec else None, config.vocab_size, config.seq_len, 0, None,
                            config.prefix_len, config.num_puzzle_identifiers, spec.side if spec else None)
    tokens = read_puzzles(path, encoding)  # InputError naming the file: missing, unreadable, no text format
    try:
        tokens, ids = validate_puzzles(tokens, None, encoding)
    except TrmExportError as exc:
        raise TrmExportError(f"{path}: {exc}") from None
    return Puzzles(tokens, ids, None, f"{path.name} ({len(tokens)} puzzles)", encoding.name, encoding.grid_side)


def puzzles_from_folder(folder: str | Path, config, size: int | None = HELDOUT_PUZZLES) -> Puzzles:
    """Held-out puzzles with labels from an official dataset folder's test split (`--data`), spread evenly over it.

    Where the folder's encoding is a shipped task's (Sudoku, maze), the bundle keeps that task's name and text
    format; any other task (ARC) is a custom one, its accuracy measured against the folder's labels."""
    from trm_export.export.accuracy import task_for_config
    from trm_export.tasks.official import folder_sample

    data, described = folder_sample(folder, "heldout", config.seq_len, config.vocab_size,
                                    config.num_puzzle_identifiers, size)
    try:
        spec = task_for_config(config).spec
    except ValueError:
        spec = None
    return Puzzles(data.inputs.astype(np.int64), data.puzzle_ids.astype(np.int64), data.labels.astype(np.int64),
                   described, spec.name if spec else None, spec.side if spec else None)


def uses_onnxruntime_ops(target: Target, options: ExportOptions) -> bool:
    """ONNX Runtime's fused attention and rope: for the target whose runtime is native ONNX Runtime (cpu), unless
    the user asks for standard ops. TensorRT cannot parse them; onnxruntime-web's WebAssembly build is not measured
    with them."""
    return target.runtime == "onnxruntime" and not options.standard_ops


def opset_for(target: Target) -> int:
    return min(target.max_opset, EXPORTER_MAX_OPSET)


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, flush=True)


def export_bundle(checkpoint: str | Path | LoadedCheckpoint, out: str | Path, options: ExportOptions = ExportOptions(),
                  puzzles: Puzzles | None = None, dataset_json: str | Path | None = None,
                  overrides: dict[str, Any] | None = None,
                  log: Callable[[str], None] | None = None) -> tuple[Path, Manifest, ParityReport]:
    """Export `checkpoint` to a verified bundle at `out`. Raises ParityError (and writes nothing) on failure."""
    say = log or (lambda m: _log(options.progress, m))
    target = get_target(options.target)
    if options.puzzle_table_dtype not in ("float32", "float16"):
        raise TrmExportError(f"puzzle_table_dtype must be float32 or float16, got {options.puzzle_table_dtype!r}")
    if target.runtime == "onnxruntime-web":
        find_ort_web()  # before any work: a missing npm install fails in a second, not after the parity check
    if options.wheelhouse is not None:
        parse_wheelhouse(options.wheelhouse)  # a mistyped platform fails before any work
    with StagedBundle(out, force=options.force) as stage:  # refuses an existing `out` before any work
        ck = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(
            checkpoint, dataset_json=dataset_json, overrides=overrides)
        cfg, model = ck.config, ck.model
        if options.puzzle_table_dtype == "float16" and cfg.puzzle_emb_ndim > 0:
            # The bundle stores the table rounded to float16; parity and golden vectors then compare against a
            # reference that uses the same rounded table, so they measure the graph, not the storage choice.
            model = copy.deepcopy(model)
            model.puzzle_emb.weights.copy_(model.puzzle_emb.weights.half().float())
        say(f"loaded {ck.path} ({cfg.family.upper()}{' mlp_t' if cfg.mlp_t else ''}, "
            f"{sum(p.numel() for p in model.parameters()):,} parameters)")
        puzzles, keep, names = parity_puzzles(ck, puzzles, options)
        plan = options.plan or export_plan(ck, puzzles, options)
        if options.plan is None:
            for line in describe(plan):
                say(line)

        opset = opset_for(target)
        graph = export_step_graph(model, opset, onnxruntime_ops=uses_onnxruntime_ops(target, options))
        check_graph(graph.model, target.max_opset, target.max_ir_version)
        graph_file = stage.write_bytes("graphs/step_fp32.onnx", graph.data)
        say(f"step graph: opset {opset}, IR {graph.model.ir_version}, {len(graph.model.graph.node)} nodes, "
            f"{len(graph.data) / 1e6:.2f} MB ({cfg.net_calls_per_step} network calls unrolled"
            + (f"; ONNX Runtime's {', '.join(graph.onnxruntime_ops)}" if graph.onnxruntime_ops else "") + ")")
        standard_file = None
        if graph.onnxruntime_ops:  # OpenVINO runs the same step faster in standard ops: carried beside it (#41)
            standard = export_step_graph(model, opset)
            check_graph(standard.model, target.max_opset, target.max_ir_version)
            standard_file = stage.write_bytes("graphs/step_fp32.standard.onnx", standard.data)
            say(f"the same step in standard ONNX ops, for OpenVINO: {len(standard.model.graph.node)} nodes")

        if keep is not None:
            row_bytes = cfg.puzzle_emb_ndim * np.dtype(options.puzzle_table_dtype).itemsize
            say(f"puzzle table: {len(keep):,} of {cfg.num_puzzle_identifiers:,} rows kept ({options.keep_puzzles}), "
                f"{row_bytes * cfg.num_puzzle_identifiers / 1e6:,.1f} MB -> {row_bytes * len(keep) / 1e6:,.1f} MB")
        embedding = _write_tables(stage, model, options.puzzle_table_dtype, keep)
        steps = plan.check_steps
        golden = _write_golden(stage, model, puzzles, options.golden_puzzles, plan.golden_candidates, steps)
        identifiers = None if names is None else _write_identifiers(stage, names, keep)
        arc = names is not None and (cfg.vocab_size, cfg.seq_len) == (ARC_VOCAB, ARC_SEQ_LEN)
        task = TaskEncoding(name="arc" if arc else puzzles.task_name, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len,
                            pad_id=int((ck.dataset or {}).get("pad_id", 0)),
                            blank_id=1 if puzzles.task_name == "sudoku" else None, prefix_len=cfg.prefix_len,
                            num_puzzle_identifiers=cfg.num_puzzle_identifiers, grid_side=puzzles.grid_side,
                            identifiers=identifiers)
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            model={"family": cfg.family, "config": cfg.to_dict()},
            task=task,
            embedding=embedding,
            loop=LoopSpec(cfg.halt_max_steps, cfg.halting_rule, cfg.halting_rule == "q_halt>q_continue"),
            graphs={"fp32": GraphSpec(graph_file, "fp32", opset, graph.model.ir_version, graph.inputs, graph.outputs,
                                      onnxruntime_ops=graph.onnxruntime_ops, standard_file=standard_file)},
            target=target.name,
            files={},
            provenance={"checkpoint": ck.path.name, "checkpoint_sha256": ck.sha256, "key_prefix": ck.key_prefix,
                        "toolchain": f"trm-export {__version__}", "torch": torch.__version__.split("+")[0],
                        "onnx": onnx.__version__,
                        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "host": platform.machine()},
            golden=golden,
            plan=plan.to_dict(),
        )
        _write_samples(stage, puzzles, task)
        build = {**write_build_recipes(stage.path, manifest), **write_web_app(stage.path, target.runtime),
                 "runtime": _write_runtime(stage, options.wheelhouse, say)}
        manifest = _with_files(manifest, stage, build=build)
        stage.write_manifest(manifest)

        limit = plan.parity_puzzles
        solver = Solver(stage.path, batch_size=min(options.batch_size, max(limit, 1)), provider="cpu")
        say(f"verifying parity against the PyTorch reference on {limit} of {len(puzzles.tokens)} puzzles "
            f"({puzzles.source}), {_steps_words(steps, cfg.halt_max_steps)}, backend {solver.backend.name}")
        report = check_parity(model, solver, puzzles.tokens[:limit], puzzles.puzzle_ids[:limit],
                              None if puzzles.labels is None else puzzles.labels[:limit], steps=steps,
                              tolerance=options.tolerance, progress=options.progress,
                              offered=len(puzzles.tokens) if limit < len(puzzles.tokens) else None)
        say(f"parity: {report.summary()}")
        if not report.passed:
            raise ParityError("export failed parity against the PyTorch reference: " + "; ".join(report.failures()))
        warning = report.rounding_warning(options.rounding_sensitive_threshold)
        if warning:
            (log or _loud)(warning)  # shown even without progress output
            if options.strict:  # inside the staging: nothing is committed, an earlier bundle at `out` stays
                raise RoundingSensitiveError(_strict_refusal(report, options.rounding_sensitive_threshold))
        # The golden check on a device must catch a broken graph or engine, not the loop's amplified rounding: its
        # q tolerance is 1e-3 or twice what this host's own free-running loop shows, whichever is larger.
        figures = golden_figures(solver)
        q_abs = max(FP32_TOLERANCES["q_abs"], 2 * max(figures["q_halt_abs"], figures["q_continue_abs"]))
        tolerances = {"fp32": {**manifest.golden["tolerances"]["fp32"], "q_abs": q_abs}}
        parity = {"fp32": {**report.to_dict(), "puzzles_source": puzzles.source, "golden": figures,
                           "sample": parity_sample_note(report, plan),
                           "rounding_sensitive_threshold": options.rounding_sensitive_threshold}}
        reference = {}
        if _trained_dtype_applies(ck, puzzles, options):
            n = plan.trained_dtype_puzzles
            if n:
                say(f"accuracy as trained ({cfg.forward_dtype}, PyTorch as the official code computes) on {n} "
                    "puzzles")
                trained = trained_dtype_accuracy(model, puzzles.tokens[:n], puzzles.puzzle_ids[:n],
                                                 puzzles.labels[:n], puzzles.source)
                reference = {cfg.forward_dtype: trained}
                last = trained["rows"][-2]  # fixed, the trained step limit
                say(f"  {cfg.forward_dtype}: {100 * last['exact_accuracy']:.1f}% exact at {last['budget']} fixed "
                    f"steps on {trained['puzzles']} puzzles")
            else:
                say(f"accuracy as trained ({cfg.forward_dtype}): not measured: one puzzle's loop is past the plan's "
                    f"budget for it at this model's size; `trm-export evaluate MODEL --compute-dtype "
                    f"{cfg.forward_dtype} --limit N` measures it on N puzzles")
        elif cfg.forward_dtype == "bfloat16" and options.trained_dtype:
            say("accuracy as trained (bfloat16): not measured: the parity puzzles have no labels; export with the "
                "official dataset folder (--data DIR) or without --puzzles (the task's held-out split), or run "
                "`trm-export evaluate MODEL --compute-dtype bfloat16`")
        manifest = _with_files(manifest, stage, parity=parity, golden={**manifest.golden, "tolerances": tolerances},
                               reference=reference)
        if standard_file is not None:  # held to the fused graph's own golden bars, run on ONNX Runtime here
            stage.write_manifest(manifest)
            check_golden(Solver(stage.path, batch_size=min(options.batch_size, golden["count"]), provider="cpu",
                                graph_form="standard", verify=False))
            say("standard-ops step graph: passes the golden self-check")
        path = stage.commit(manifest)
    say(f"bundle written: {path}")
    return path, manifest, report


SAMPLE_PUZZLES = 5


def _write_samples(stage: StagedBundle, puzzles: Puzzles, task: TaskEncoding) -> str:
    """samples/: the first few parity puzzles in the input format `run` reads (text for a shipped task, else .npy
    tokens), so that every command of the bundle's guide runs as written."""
    from trm_export.tasks.maze import format_maze
    from trm_export.tasks.sudoku import format_sudoku

    tokens = puzzles.tokens[:SAMPLE_PUZZLES]
    try:
        if task.name == "sudoku":
            return stage.write_bytes(SAMPLES[0], "".join(format_sudoku(t) + "\n" for t in tokens).encode())
        if task.name == "maze" and task.grid_side:
            return stage.write_bytes(SAMPLES[0], ("\n\n".join(format_maze(t, task.grid_side) for t in tokens)
                                                  + "\n").encode())
    except ValueError:  # tokens the text format cannot show (a dataset folder's own encoding): as tokens
        pass
    return stage.write_array(SAMPLES[1], tokens.astype(np.int64))


def _write_runtime(stage: StagedBundle, wheelhouse: str | None, say: Callable[[str], None]) -> dict[str, Any]:
    """runtime/: the trm-export wheel, and with `wheelhouse` its dependencies' wheels for that platform."""
    name, data = runtime_wheel()
    wheel = stage.write_bytes(f"{RUNTIME_FOLDER}/{name}", data)
    entry: dict[str, Any] = {"wheel": wheel, "wheelhouse": wheelhouse, "dependencies": []}
    if wheelhouse is not None:
        added = download_wheelhouse(wheelhouse, stage.path / RUNTIME_FOLDER, say)
        entry["dependencies"] = sorted(f"{RUNTIME_FOLDER}/{p.name}" for p in added)
        say(f"wheelhouse for {wheelhouse}: {', '.join(p.name for p in added)}")
    return entry


def _loud(message: str) -> None:
    print(message, flush=True)


def _strict_refusal(report: ParityReport, threshold: float) -> str:
    return (f"--strict: {report.rounding_sensitive_words()} checked are rounding-sensitive, above the "
            f"{100 * threshold:.3g}% threshold: float32 cannot reproduce this model's answers on them (ill-conditioned "
            "recursion: another rounding of the reference itself changes them; the graph matches the reference). "
            "No bundle was written (an earlier one at the output is untouched). Without --strict the bundle is written "
            "with this warning and the share in its manifest; or check the checkpoint (a trained model rarely shows "
            "any)")


def parity_sample_note(report: ParityReport, plan: Plan) -> str:
    """What the parity sample can and cannot tell, in words (manifest and console)."""
    steps = "" if not report.trained_steps else (
        f" Only the first {report.steps} of the {report.trained_steps} trained steps were checked "
        f"(set by {plan.set_by.get('check_steps', 'the user')}): each step is the same graph, so a graph error "
        "shows in them, but what the later states do is not seen.")
    if not report.offered:
        return f"every offered puzzle ({report.puzzles}) checked." + steps
    rate = min(100.0, 300.0 / report.puzzles)  # rule of three: 95% bound on a rate seen 0 times in n trials
    why = plan.set_by.get("parity_puzzles", "the plan, sized from the model's work")
    return (f"the first {report.puzzles} of {report.offered} puzzles ({why}). Every checked step of each is "
            "compared, so a graph error that shows on any input in general is caught; an error that only some "
            f"puzzles trigger is caught with 95% confidence if it affects at least {rate:.3g}% of puzzles (rule of "
            "three); rarer ones can pass unseen. --parity-puzzles all checks every puzzle." + steps)


def parity_puzzles(ck: LoadedCheckpoint, puzzles: Puzzles | None,
                   options: ExportOptions) -> tuple[Puzzles, np.ndarray | None, list[str] | None]:
    """(parity puzzles, kept puzzle-table rows or None, row names or None): the given puzzles or the task's
    held-out split, only those of the kept rows with --keep-puzzles."""
    cfg = ck.config
    puzzles = puzzles or default_puzzles(ck)
    names = None if options.identifiers is None else _read_identifiers(options.identifiers, cfg)
    keep = None
    if options.keep_puzzles is not None and cfg.puzzle_emb_ndim > 0:
        keep = select_rows(options.keep_puzzles, cfg.num_puzzle_identifiers, names)
        puzzles = only_kept(puzzles, keep, "parity")
    return puzzles, keep, names


def export_plan(ck: LoadedCheckpoint, puzzles: Puzzles, options: ExportOptions) -> Plan:
    """The export stage's plan (planning.plan_export): from the model's FLOPs and the puzzles, a replayed plan's
    fields (options.replay) and the flags, in that order of precedence from last to first."""
    cfg = ck.config
    fixed = dict(options.replay or {})
    set_by = {k: "--plan" for k in fixed if k in SAMPLE_FIELDS}
    for name, value, flag in (("parity_puzzles", options.parity_puzzles, "--parity-puzzles"),
                              ("check_steps", options.check_steps, "--check-steps")):
        if value is not None:
            fixed[name], set_by[name] = min(value, len(puzzles.tokens) if name == "parity_puzzles" else
                                            cfg.halt_max_steps), flag
    return plan_export(cfg.step_flops, cfg.halt_max_steps, len(puzzles.tokens), options.golden_puzzles,
                       _trained_dtype_applies(ck, puzzles, options), fixed=fixed, set_by=set_by)


def _trained_dtype_applies(ck: LoadedCheckpoint, puzzles: Puzzles, options: ExportOptions) -> bool:
    return options.trained_dtype and puzzles.labels is not None and ck.config.forward_dtype == "bfloat16"


def _steps_words(steps: int, trained: int) -> str:
    return f"{steps} steps" if steps == trained else f"the first {steps} of {trained} steps"


def _with_files(manifest: Manifest, stage: StagedBundle, **changes: Any) -> Manifest:
    from dataclasses import replace

    return replace(manifest, files=stage.checksums(), **changes)


def _write_tables(stage: StagedBundle, model, puzzle_dtype: str, keep: np.ndarray | None) -> EmbeddingSpec:
    """The embedding tables (the model's `embedding_arrays`, export/step_protocol.py) as .npy files; of the puzzle
    table only the rows of `keep` (original identifiers, ascending) when given, with their identifiers beside it."""
    cfg, arrays = model.config, model.embedding_arrays()
    token_table = stage.write_array("tables/embed_tokens.npy", arrays.token_table)
    pos_table = (stage.write_array("tables/embed_pos.npy", arrays.position_table)
                 if arrays.position_table is not None else None)
    puzzle_table = puzzle_rows = None
    if arrays.puzzle_table is not None:
        table = arrays.puzzle_table if keep is None else arrays.puzzle_table[keep]
        puzzle_table = stage.write_array("tables/puzzle_emb.npy", table.astype(puzzle_dtype, copy=False))
        if keep is not None:
            puzzle_rows = stage.write_array("tables/puzzle_rows.npy", keep.astype(np.int64))
    return EmbeddingSpec(token_table=token_table, scale=float(arrays.scale), position_table=pos_table,
                         position_scale=float(arrays.position_scale), puzzle_table=puzzle_table,
                         puzzle_emb_ndim=cfg.puzzle_emb_ndim, hidden_size=cfg.hidden_size,
                         H_init=stage.write_array("tables/H_init.npy", arrays.H_init),
                         L_init=stage.write_array("tables/L_init.npy", arrays.L_init), puzzle_rows=puzzle_rows)


def _read_identifiers(path: Path, cfg) -> list[str]:
    """The dataset folder's identifiers.json, checked: one name per row of the checkpoint's puzzle table."""
    from trm_export.tasks.arc import read_identifiers

    names = read_identifiers(path)
    if len(names) != cfg.num_puzzle_identifiers:
        raise TrmExportError(f"{path}: {len(names)} puzzle names, the checkpoint's puzzle table has "
                             f"{cfg.num_puzzle_identifiers} rows: not the dataset folder this model was trained on")
    return names


def _write_identifiers(stage: StagedBundle, names: list[str], keep: np.ndarray | None) -> str:
    """The names by identifier into the bundle; with --keep-puzzles, the names of rows not kept are empty."""
    if keep is not None:
        kept = set(keep.tolist())
        names = [n if i in kept else "" for i, n in enumerate(names)]
    return stage.write_bytes("tables/identifiers.json", json.dumps(names).encode())


def _write_golden(stage: StagedBundle, model, puzzles: Puzzles, count: int, candidates: int | None = None,
                  steps: int | None = None) -> dict[str, Any]:
    """Golden vectors: the reference's loop on `count` puzzles, for the bundle's self-check on a device.

    They are taken among the rounding-stable puzzles (parity.rounding_sensitive) of the first `candidates` (the
    plan's; default 4 x count): a puzzle
    whose outcome another float32 rounding can change would fail a correct engine's self-check. A chaotic model
    may leave fewer stable puzzles than asked for; the rest are filled in order, and the self-check's
    predictions and q-sign bars are then the stable fraction. `steps`: the first steps of the loop (default: the
    trained limit); the self-check runs as many."""
    candidates = min(candidates or 4 * count, len(puzzles.tokens))
    parts = [slice(i, min(i + count, candidates)) for i in range(0, candidates, count)]
    traces: list = []
    sensitive = np.concatenate([rounding_sensitive(model, puzzles.tokens[part], puzzles.puzzle_ids[part], steps,
                                                   traces) for part in parts])
    order = np.concatenate([np.flatnonzero(~sensitive), np.flatnonzero(sensitive)])
    chosen = np.sort(order[: min(count, len(sensitive))])
    n, stable = len(chosen), int(np.sum(~sensitive[chosen]))
    tokens, ids = puzzles.tokens[chosen], puzzles.puzzle_ids[chosen]
    # Every candidate chosen, checked in one batch (a paper-size model's one puzzle): that check's float32 trace is
    # this very loop, the same batch; otherwise the chosen puzzles' own.
    trace = (traces[0] if len(traces) == 1 and n == candidates else
             run_reference(model, tokens, ids, mode="adaptive", max_steps=steps))
    arrays = {"tokens": tokens.astype(np.int64), "puzzle_ids": ids.astype(np.int64), "q_halt": trace.q_halt,
              "q_continue": trace.q_continue, "predictions": trace.step_predictions[-1].astype(np.int64),
              "adaptive_steps": trace.steps_used, "adaptive_predictions": trace.predictions.astype(np.int64)}
    for name, array in arrays.items():
        stage.write_array(f"{GOLDEN_FOLDER}/{name}.npy", array)
    tolerances = dict(FP32_TOLERANCES)
    if stable < n:
        tolerances["predictions_identical"] = tolerances["q_sign_agreement"] = stable / n
    return {"folder": GOLDEN_FOLDER, "count": n, "steps": trace.num_steps,
            "trained_steps": model.config.halt_max_steps, "source": puzzles.source,
            "indices": [int(i) for i in chosen], "rounding_stable": stable, "tolerances": {"fp32": tolerances}}
