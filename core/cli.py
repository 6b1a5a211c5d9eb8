"""The `trm-export` command line. Commands parse options and call the Python API; errors become one line.

Heavy dependencies (torch, onnx) are imported inside commands, so `--help` and the runtime commands work
where only the runtime is installed.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import click

from trm_export import __version__
from trm_export.errors import TrmExportError, printable
from trm_export.export.adapters import ARCHITECTURES
from trm_export.runtime import step_watch
from trm_export.runtime.solver import BACKENDS, MAX_STEPS

# Options that fill config fields neither the checkpoint's files nor its tensor shapes tell.
_OVERRIDE_OPTIONS = [
    click.option("--dataset", "dataset_json", type=click.Path(path_type=Path),
                 help="dataset.json of the training data (file or folder), when it is not beside the checkpoint."),
    click.option("--seq-len", type=int, help="Puzzle length (tokens), when no dataset.json says it."),
    click.option("--num-heads", type=int, help="Attention heads, when no all_config.yaml says it."),
    click.option("--h-cycles", "H_cycles", type=int, help="H cycles per ACT step."),
    click.option("--l-cycles", "L_cycles", type=int, help="L cycles per H cycle."),
    click.option("--pos-encodings", type=click.Choice(["rope", "learned", "none"]), help="Position encoding."),
    click.option("--puzzle-emb-len", type=int, help="Puzzle-embedding prefix length (TRM; 0 = ceil(ndim/D))."),
    click.option("--halt-max-steps", type=int, help="Trained ACT step limit."),
]


# One flag, the same on every command that takes puzzles (export, quantize, report, evaluate, run).
data_option = click.option(
    "--data", type=click.Path(path_type=Path), default=None, metavar="DIR",
    help="Official dataset folder, as the official builders write it (DIR/test and DIR/train, each with dataset.json "
         "and all__*.npy): held-out puzzles and their labels from test/, calibration puzzles from train/, a sample "
         "spread evenly over each split.")


def override_options(func):
    for option in reversed(_OVERRIDE_OPTIONS):
        func = option(func)
    return func


def _load(model: Path | None, dataset_json: Path | None, allow_ambiguous: bool = False, **overrides):
    from trm_export.export.checkpoint import load_checkpoint
    from trm_export.reference_models import reference_model_path

    return load_checkpoint(model if model is not None else reference_model_path(), dataset_json=dataset_json,
                           overrides=overrides, allow_ambiguous=allow_ambiguous)


class _Group(click.Group):
    """Routes `trm-export MODEL ...` to the `export` command; turns our errors into one-line CLI errors."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["export", *args]
        elif args and args[0].startswith("-") and args[0] not in ("-h", "--help", "--version"):
            args = ["export", *args]
        try:
            return super().parse_args(ctx, args)
        except click.ClickException as exc:  # click's own message quotes what was typed
            exc.message = printable(exc.message)
            raise

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except click.ClickException as exc:  # ours, or click's own (a bad option value quotes what was typed)
            exc.message = printable(exc.message)
            raise
        except TrmExportError as exc:
            raise _error(str(exc)) from None
        except FileNotFoundError as exc:
            raise _error(f"{exc.filename}: no such file or folder") from None
        except IsADirectoryError as exc:
            raise _error(f"{exc.filename}: is a folder, expected a file") from None
        except PermissionError as exc:
            raise _error(f"{exc.filename}: permission denied") from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise _error(f"{where}{exc.strerror or exc}") from None
        except MemoryError:
            raise _error("out of memory: use fewer puzzles or a smaller --batch-size") from None
        except KeyboardInterrupt:
            raise _error("interrupted; nothing was written (earlier outputs are untouched)") from None
        except Exception as exc:
            if os.environ.get("TRM_EXPORT_TRACEBACK"):
                raise
            raise _error(
                f"internal error, a bug in trm-export: {type(exc).__name__}: {_one_line(str(exc))} (set "
                "TRM_EXPORT_TRACEBACK=1 to see where, and please report it)") from None


def echo(message: object = "", **kwargs) -> None:
    """click.echo through the one sanitiser: what we print may quote a file, a bundle or a request."""
    click.echo(printable(str(message)), **kwargs)


def _error(message: str) -> click.ClickException:
    return click.ClickException(_one_line(printable(message)))


MAX_ERROR_CHARACTERS = 600  # an error quoting a 200 MB one-line puzzle file stays readable


def _one_line(text: str) -> str:
    """Errors are one line at the command line: the first line, and how many more there were; at most
    MAX_ERROR_CHARACTERS of it (what it quotes from a file can be any length)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    if len(line) > MAX_ERROR_CHARACTERS:
        line = f"{line[:MAX_ERROR_CHARACTERS]}... ({len(line) - MAX_ERROR_CHARACTERS} more characters)"
    return line if len(lines) <= 1 else f"{line} (+{len(lines) - 1} more lines)"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trm-export")
def main() -> None:
    """Deploy tiny recursive reasoning models (TRM, HRM) to a Jetson, a desktop GPU, a CPU or a browser.

    \b
    trm-export MODEL --target jetson -o b/       export MODEL to a verified bundle at the target's precision
    trm-export verify b/                         the bundle checks itself against its golden vectors
    trm-export run b/ --input puzzles.txt        solve puzzles with the runtime
    trm-export MODEL --target browser -o w/      a bundle with a web page (web/index.html)
    trm-export serve w/                          serve that page locally
    trm-export triton b/ -o repo/                a Triton Inference Server model repository serving b/

    MODEL is a checkpoint as the official training saves it (`step_N`, `checkpoint` or `*.pt`, or the folder
    holding it with all_config.yaml); without MODEL the bundled Sudoku reference model is used.
    """
    step_watch.exit_when_stuck()  # a step deaf to its cancel ends the command with its one line, not a hang


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@override_options
def inspect(model: Path | None, dataset_json: Path | None, **overrides) -> None:
    """Show a checkpoint's configuration and where each value came from (what the files and weights leave
    undecided is shown as such, with the candidates)."""
    ck = _load(model, dataset_json, allow_ambiguous=True, **overrides)
    cfg = ck.config
    echo(f"checkpoint   {ck.path}  (sha256 {ck.sha256[:16]}…, key prefix {ck.key_prefix!r})")
    echo(f"model        {cfg.family.upper()}{' mlp_t' if cfg.mlp_t else ''}, "
               f"{sum(p.numel() for p in ck.model.parameters()):,} parameters, state "
               f"[{cfg.total_seq_len} x {cfg.hidden_size}], {cfg.net_calls_per_step} network calls per step")
    for name, value in cfg.to_dict().items():
        echo(f"  {name:<24} {value!s:<12} {ck.sources.get(name, 'default')}")
    dtypes = sorted(set(ck.stored_dtypes.values()))
    echo(f"stored dtypes {', '.join(dtypes)} (the reference computes in float32)")
    if ck.ambiguous:
        echo(f"AMBIGUOUS: {ck.ambiguous}")


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--split", type=click.Choice(["heldout", "calibration"]), default="heldout", show_default=True)
@click.option("--limit", type=int, default=None, help="Evaluate only the first N puzzles of the split.")
@click.option("--steps", default="1,2,4,8,16", show_default=True, help="Fixed step budgets, comma separated.")
@click.option("--adaptive/--no-adaptive", default=True, show_default=True,
              help="Also halt on the Q head, capped at the largest budget.")
@click.option("--threads", type=int, default=None, help="torch threads (default: all cores).")
@click.option("--compute-dtype", "compute_dtypes", type=click.Choice(["auto", "float32", "bfloat16", "both"]),
              default="auto", show_default=True,
              help="The reference's arithmetic: float32 (what every export computes), bfloat16 (as the official code "
                   "computes with forward_dtype bfloat16: the accuracy a training run printed), both side by side; "
                   "auto: both when the checkpoint's forward_dtype is bfloat16, else float32.")
@data_option
@override_options
def evaluate(model: Path | None, split: str, limit: int | None, steps: str, adaptive: bool, threads: int | None,
             compute_dtypes: str, data: Path | None, dataset_json: Path | None, **overrides) -> None:
    """Exact accuracy of the PyTorch reference per step budget on the matching task's puzzles, or on a dataset
    folder's (--data: test/ for heldout, train/ for calibration; 1000 spread evenly unless --limit), in float32 and
    in the bfloat16 the official code trains and evaluates in."""
    import torch

    from trm_export.export.accuracy import accuracy_by_budget_and_dtype, format_table, task_for_config

    if threads:
        torch.set_num_threads(threads)
    try:
        budgets = tuple(sorted({int(s) for s in steps.split(",") if s.strip()}))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {steps!r}", param_hint="--steps") from None
    if not budgets or budgets[0] < 1:
        raise click.BadParameter("step budgets must be >= 1", param_hint="--steps")
    ck = _load(model, dataset_json, **overrides)
    cfg = ck.config
    if data is not None:
        from trm_export.tasks.official import HELDOUT_PUZZLES, folder_sample

        puzzles, source = folder_sample(data, split, cfg.seq_len, cfg.vocab_size, cfg.num_puzzle_identifiers,
                                        limit or HELDOUT_PUZZLES)
    else:
        task = task_for_config(cfg)
        puzzles = task.split(split, size=limit)
        source = f"{task.spec.name} {split} split"
    echo(f"{ck.path}: {source}, {len(puzzles)} puzzles")
    dtypes = {"auto": None, "float32": ("float32",), "bfloat16": ("bfloat16",),
              "both": ("float32", "bfloat16")}[compute_dtypes]
    rows = accuracy_by_budget_and_dtype(ck.model, puzzles, budgets, adaptive=adaptive, progress=True,
                                        compute_dtypes=dtypes)
    echo(format_table(rows))


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--target", "-t", default="cpu", show_default=True,
              help="Deployment target (see `trm-export targets`); `jetson` is the AGX Orin on JetPack 6, `browser` a "
                   "web page (onnxruntime-web; `trm-export serve` serves it).")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Bundle folder to write (default: <checkpoint name>-<target>.bundle).")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --output.")
@click.option("--puzzles", type=click.Path(path_type=Path), default=None,
              help="Real puzzles for the parity check and golden vectors (.npy tokens or the task's text format); "
                   "default: the matching task's held-out split.")
@click.option("--parity-puzzles", default=None, metavar="N|all",
              help="Check parity on the first N puzzles, or all (default: the plan's, sized from the model's work).")
@click.option("--check-steps", default=None, metavar="N|all",
              help="Steps of the recursion parity and the golden vectors cover (default: all, up to the trained "
                   "limit; a lower N is recorded as your choice).")
@click.option("--plan", "plan_file", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Replay a recorded plan (a bundle's manifest.json or folder): the same samples as that export; "
                   "the sample flags override single fields of it.")
@click.option("--strict", is_flag=True,
              help="Refuse the export (nothing written) when more than --strict-threshold of the checked puzzles are "
                   "rounding-sensitive: float32 itself cannot reproduce the model's answers there (another rounding "
                   "of the reference changes them). Without it the export warns and writes the bundle.")
@click.option("--strict-threshold", type=click.FloatRange(0, 100), default=5.0, show_default=True, metavar="PERCENT",
              help="Share of rounding-sensitive puzzles above which the export warns (and --strict refuses).")
@click.option("--puzzle-table-dtype", type=click.Choice(["float32", "float16"]), default="float32",
              show_default=True, help="Storage of the puzzle-embedding table (float16 halves large ARC tables).")
@click.option("--keep-puzzles", type=click.Path(path_type=Path), default=None, metavar="DIR|FILE",
              help="Keep only the puzzle-table rows a deployment will be asked for: a dataset folder (its test "
                   "split's identifiers), an ARC challenge file (its tasks' views; needs --data for the names) or a "
                   "list of identifiers or puzzle names, one per line. Puzzles keep their identifiers.")
@click.option("--standard-ops", is_flag=True,
              help="Standard ONNX ops only. The cpu target otherwise writes attention and rope as ONNX Runtime's "
                   "fused contrib ops (faster there; ONNX Runtime and the openvino backend run them): use it for "
                   "another engine.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "best"]), default=None,
              help="Precision the bundle runs by default (default: the target's, see `trm-export targets`); "
                   "best = the fastest variant within --max-accuracy-drop, measured here.")
@click.option("--max-accuracy-drop", type=click.FloatRange(0, 100), default=0.5, show_default=True,
              help="Points of exact accuracy a reduced-precision variant may lose against fp32 and still be chosen.")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration puzzles (.npy tokens or the task's text format); default: the task's calibration "
                   "split, never the held-out one.")
@click.option("--calib-puzzles", type=click.IntRange(1, None), default=None,
              help="Calibrate on the first N calibration puzzles (default: the plan's).")
@click.option("--eval-puzzles", type=click.IntRange(1, None), default=None,
              help="Measure each variant on the first N held-out puzzles (default: the plan's; a paper-size model "
                   "gets a few, ours all 1000).")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="torch and ONNX Runtime threads (default: all cores).")
@click.option("--no-report", is_flag=True,
              help="Skip report/ (accuracy versus latency of every variant, measured here, with plots).")
@click.option("--wheelhouse", default=None, metavar="MACHINE-cp3X",
              help="Also put the runtime's dependency wheels (numpy, onnxruntime, click) for that device into the "
                   "bundle's runtime/, beside the trm-export wheel every bundle carries: an offline device installs "
                   "from the bundle alone. JetPack 6: linux_aarch64-cp310; JetPack 5: linux_aarch64-cp38.")
@click.option("--arch", type=click.Choice(["official", *ARCHITECTURES]), default="official",
              show_default=True,
              help="Where MODEL comes from: the official TRM / HRM code (step_N with all_config.yaml), or lucidrains' "
                   "tiny-recursive-model (torch.save(trm.state_dict(), PATH); needs --arch-config).")
@click.option("--arch-config", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="--arch tiny-recursive-model: the network's description as JSON (dim, num_tokens, seq_len, depth, "
                   "num_refinement_blocks, num_latent_refinements, num_register_tokens, halt_prob_thres, "
                   "max_deep_refinement_steps): a state_dict does not carry it.")
@click.option("--step-module", default=None, metavar="MODULE:FUNCTION",
              help="Your own looped model: import MODULE (from the current folder first) and call FUNCTION(MODEL) "
                   "for a StepModel (export/step_protocol.py; an example in examples/looped_model/). Runs that code "
                   "because you named it.")
@data_option
@override_options
def export(model: Path | None, target: str, output: Path | None, force: bool, puzzles: Path | None,
           parity_puzzles: str | None, check_steps: str | None, plan_file: Path | None, strict: bool,
           strict_threshold: float, puzzle_table_dtype: str, keep_puzzles: Path | None, standard_ops: bool,
           precision: str | None,
           max_accuracy_drop: float, calib: Path | None, calib_puzzles: int | None, eval_puzzles: int | None,
           threads: int | None, no_report: bool, wheelhouse: str | None, arch: str, arch_config: Path | None,
           step_module: str | None, data: Path | None, dataset_json: Path | None, **overrides) -> None:
    """Export MODEL to a self-verifying bundle at the target's precision (INT8 for Jetsons: calibrated, measured,
    chosen within the accuracy budget, fp32 and fp16 kept beside it).

    What each stage covers is planned before any work, from the model's FLOPs and the data, never the clock:
    the same command gives the same bundle on a quiet or a busy machine. Parity and the golden vectors cover
    every trained step of at least one puzzle; the plan is printed, recorded in the manifest, and replayed by
    --plan."""
    import torch

    from trm_export.deploy import DeployOptions, deploy, resolve_precision
    from trm_export.export.pipeline import ExportOptions, puzzles_from_file
    from trm_export.targets.registry import get_target

    if threads:
        torch.set_num_threads(threads)
    target = get_target(target).name  # unknown target: fail before loading anything
    resolve_precision(target, precision)
    parity_count = _count_or_all(parity_puzzles, "--parity-puzzles")
    steps_count = _count_or_all(check_steps, "--check-steps")
    if calib is not None and not calib.is_file():
        raise click.BadParameter(f"{calib}: no such file", param_hint="--calib")
    replay = _replayed(plan_file)
    if wheelhouse is not None:
        from trm_export.distribution.wheel import parse_wheelhouse

        parse_wheelhouse(wheelhouse)  # a mistyped platform fails before the checkpoint is read
    if step_module is not None:
        from trm_export.export.adapters.loading import load_step_model

        if arch != "official" or arch_config is not None:
            raise click.UsageError("--step-module is your own model: leave out --arch and --arch-config")
        if model is None:
            raise click.UsageError("--step-module needs MODEL (the file your FUNCTION reads)")
        ck = load_step_model(model, step_module)
    elif arch == "official":
        if arch_config is not None:
            raise click.UsageError("--arch-config describes a tiny-recursive-model network: add --arch "
                                   "tiny-recursive-model")
        ck = _load(model, dataset_json, **overrides)
    else:
        from trm_export.export.adapters.loading import load_adapted

        if model is None or arch_config is None:
            raise click.UsageError(f"--arch {arch} needs MODEL (the saved state_dict) and --arch-config FILE")
        ck = load_adapted(model, arch, arch_config)
    if replay is not None:
        from trm_export.planning.plan import check_replay

        check_replay(replay, ck.config.step_flops, ck.config.halt_max_steps, str(plan_file))
    out = output or Path(f"{ck.path.parent.name}-{target}.bundle")
    given = puzzles_from_file(puzzles, ck.config) if puzzles else None
    options = DeployOptions(
        export=ExportOptions(target=target, force=force, parity_puzzles=parity_count, check_steps=steps_count,
                             puzzle_table_dtype=puzzle_table_dtype,
                             keep_puzzles=keep_puzzles, strict=strict, wheelhouse=wheelhouse,
                             rounding_sensitive_threshold=strict_threshold / 100, standard_ops=standard_ops),
        precision=precision, max_accuracy_drop=max_accuracy_drop, calib=calib, calib_puzzles=calib_puzzles,
        eval_puzzles=eval_puzzles, threads=threads, report=not no_report, data=data, replay=replay)
    result = deploy(ck, out, options, puzzles=given, log=lambda m: echo(m))
    echo("")
    echo(result.table())
    echo("(accuracy and ms/step measured here, ONNX Runtime on this CPU; the device measures its own: "
               "trm-export report)")
    echo("stage times: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in
                                           result.stage_seconds.items()) +
               f"; total {sum(result.stage_seconds.values()):.0f} s")
    path = result.path
    if (path / "report" / "REPORT.md").is_file():
        echo(f"report: {path / 'report' / 'REPORT.md'}")
    chosen = get_target(target)
    if chosen.runtime == "onnxruntime-web":
        echo(f"the page: trm-export serve {shlex.quote(str(path))}  (then open the URL it prints); or copy "
                   f"{path} to any web server, see its README.md")
        return
    from trm_export.targets.device_readme import bundled_runtime, sample_file

    sample = sample_file(result.manifest) or "puzzles.txt"
    wheel = bundled_runtime(result.manifest)[0]
    install = f"pip install {wheel}   |   " if wheel else ""
    echo(f"copy {path} to the device ({chosen.description}) and follow its README.md; there, in the bundle: "
         f"{install}trm-export verify .   |   trm-export run . --input {sample}")


def _replayed(path: Path | None) -> dict | None:
    """The sample fields of the plan `--plan FILE` names (planning.read_plan), or None."""
    if path is None:
        return None
    from trm_export.planning.plan import read_plan

    return read_plan(path)


def _count_or_all(value: str | None, option: str) -> int | None:
    """N|all options: None (not given), N, or 'all' as a count larger than any (the callers cap it)."""
    if value is None:
        return None
    if value == "all":
        return 1 << 62
    if not value.isdigit() or int(value) < 1:
        raise click.BadParameter(f"expected a number >= 1 or 'all', got {value!r}", param_hint=option)
    return int(value)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--variant", default=None, help="Which graph of the bundle to check (default: the bundle's chosen one).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: the bundle's TensorRT engine for the variant where one is built and TensorRT imports, "
                   "else ONNX Runtime. openvino: OpenVINO's CPU plugin in float32 (pip install openvino).")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default=None,
              help="ONNX Runtime execution provider (default: the best available).")
@click.option("--trust", type=click.Path(path_type=Path), default=None,
              help="Public key (PEM) of the author you trust: refuse the bundle unless its signature.json, made "
                   "with `trm-export sign`, verifies against it (the digest detects edits, not a forger who "
                   "reseals). Needs the sign extra.")
def verify(bundle: Path, variant: str | None, backend: str, provider: str | None, trust: Path | None) -> None:
    """Check a bundle: manifest checksums, then its golden puzzles against the reference's values."""
    from trm_export.runtime.manifest import read_manifest
    from trm_export.runtime.selfcheck import verify_bundle
    from trm_export.targets.engines import check_build_recipes

    if trust is not None:
        from trm_export.runtime.signature import check_signature

        echo(check_signature(bundle, trust))
    # The script a device owner runs is the manifest's (digest checked here; the files just below, once).
    check_build_recipes(bundle, read_manifest(bundle, verify=False))
    report = verify_bundle(bundle, variant=variant, provider=provider, backend=backend)
    echo(str(report))
    if not report:
        sys.exit(1)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", type=click.Path(path_type=Path), required=True,
              help="Your Ed25519 private key (PEM; `trm-export keygen` or `openssl genpkey -algorithm ed25519`).")
def sign(bundle: Path, key: Path) -> None:
    """Sign BUNDLE's manifest (every file's checksum) as its author: writes BUNDLE/signature.json.

    Users check it with `trm-export verify BUNDLE --trust YOUR_KEY.pub`: a bundle someone edited and resealed
    after you signed it is refused. Needs the sign extra (pip install 'trm-export[sign]')."""
    from trm_export.runtime.signature import sign_bundle

    echo(f"signed: {sign_bundle(bundle, key)} (publish your public key; users run trm-export verify "
         f"{shlex.quote(str(bundle))} --trust KEY.pub)")


@main.command()
@click.argument("private_key", type=click.Path(path_type=Path))
def keygen(private_key: Path) -> None:
    """Make an Ed25519 key pair for `sign`: PRIVATE_KEY (mode 600; keep it) and PRIVATE_KEY.pub (publish it)."""
    from trm_export.runtime.signature import make_keys

    private, public = make_keys(private_key)
    echo(f"private key: {private} (keep it secret)   public key: {public} (give it to your users)")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--input", "-i", "input_path", type=click.Path(path_type=Path), default=None,
              help="Puzzles: Sudoku lines of 81 characters (0 or . for blanks), maze grids, or a .npy of tokens.")
@data_option
@click.option("--limit", type=click.IntRange(1, None), default=None,
              help="With --data: solve N test puzzles spread evenly over the split (default: all of them).")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Write solutions here (.npz: arrays with predictions, steps and valid; any other name: the text "
                   "lines); default: print them, the summary line to stderr.")
@click.option("--solutions", type=click.Path(path_type=Path), default=None,
              help="ARC: the solutions file of the --input challenges ({task_id: [grid per test input]}); scores "
                   "pass@1 and pass@2 as the official evaluator does.")
@click.option("--force", is_flag=True, help="Replace an existing --output file.")
@click.option("--mode", type=click.Choice(["adaptive", "fixed"]), default=None,
              help="adaptive: each puzzle halts by --halting; fixed: every puzzle runs --max-steps steps. Default: "
                   "fixed for an ARC challenge file (the official evaluation runs every trained step of every view; "
                   "halting on the Q head changes which answers the vote sees), adaptive otherwise.")
@click.option("--halting", default="q", show_default=True, metavar="q|stable:K|q+stable:K",
              help="Adaptive: q halts on the model's Q head (the trained rule); stable:K once the puzzle's answer has "
                   "not changed for K steps in a row; q+stable:K on whichever says so first.")
@click.option("--max-steps", type=click.IntRange(1, MAX_STEPS), default=None,
              help="Step budget (default: the trained halt_max_steps).")
@click.option("--min-steps", type=click.IntRange(1, MAX_STEPS), default=1, show_default=True,
              help="Adaptive: no puzzle halts before this many steps.")
@click.option("--batch-size", type=click.IntRange(1, 1 << 20), default=64, show_default=True,
              help="Batch slots (refilled as puzzles halt).")
@click.option("--variant", default=None, help="Which graph of the bundle to run (default: the bundle's chosen one).")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: the bundle's TensorRT engine for the variant where one is built and TensorRT imports, "
                   "else ONNX Runtime. openvino: OpenVINO's CPU plugin in float32 (pip install openvino).")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default=None,
              help="ONNX Runtime execution provider (default: the best available).")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--skip-selfcheck", is_flag=True,
              help="Do not run the bundle's golden puzzles first (they take a few steps; they catch a swapped graph).")
def run(bundle: Path, input_path: Path | None, data: Path | None, limit: int | None, output: Path | None,
        solutions: Path | None, force: bool, mode: str | None, halting: str, max_steps: int | None, min_steps: int,
        batch_size: int, variant: str | None, backend: str, provider: str | None, threads: int | None,
        skip_selfcheck: bool) -> None:
    """Solve puzzles with a bundle (runtime only: numpy + onnxruntime).

    Each answer is marked valid or invalid where the task can check it (Sudoku, maze); a summary line counts them
    (with --data, also the answers equal to the folder's labels). ARC: --input challenges.json solves every view
    the model was trained with of each test input for every trained step (the official evaluation's loop; --mode
    adaptive halts on the Q head instead, a different answer set), votes as the official evaluator does, and
    writes the submission (attempt_1, attempt_2 per test input); with --solutions FILE it also scores pass@1 and
    pass@2.
    """
    from trm_export.runtime.io import check_output_file, check_solutions, describe_run, read_puzzles, write_solutions
    from trm_export.runtime.selfcheck import check_golden
    from trm_export.runtime.solver import Solver, parse_halting

    if (input_path is None) == (data is None):
        raise click.UsageError("give the puzzles with --input FILE or --data DIR (one of them)")
    if limit is not None and data is None:
        raise click.UsageError("--limit goes with --data")
    policy = parse_halting(halting)  # a bad policy fails before anything loads
    arc = input_path is not None and input_path.suffix.lower() == ".json"
    mode = mode or ("fixed" if arc else "adaptive")  # ARC: the official evaluation's loop
    if mode == "fixed" and policy.name != "q":
        echo(f"--halting {policy.name} is ignored with --mode fixed (every puzzle runs --max-steps steps)",
                   err=True)
    if output is not None:
        check_output_file(output, force)
    solver = Solver(bundle, variant=variant, backend=backend, provider=provider, batch_size=batch_size,
                    threads=threads)
    note = getattr(solver, "backend_note", None)
    if note:
        echo(note, err=True)
    if solutions is not None and not arc:
        raise click.UsageError("--solutions goes with an ARC challenge file (--input challenges.json)")
    if not skip_selfcheck:
        check_golden(solver)
    if arc:
        _run_arc(solver, input_path, solutions, output, dict(mode=mode, max_steps=max_steps, min_steps=min_steps,
                                                             halting=policy))
        return
    labels, ids = None, None
    if data is not None:
        from trm_export.tasks.official import folder_sample

        enc = solver.task
        puzzles, _ = folder_sample(data, "heldout", enc.seq_len, enc.vocab_size, enc.num_puzzle_identifiers, limit)
        tokens, labels, ids = puzzles.inputs, puzzles.labels, puzzles.puzzle_ids
    else:
        tokens = read_puzzles(input_path, solver.task)
    result = solver.solve(tokens, ids, mode=mode, max_steps=max_steps, min_steps=min_steps, halting=policy)
    valid = check_solutions(tokens, result.predictions, solver.task)
    text = write_solutions(result, solver.task, output, valid)
    loop = mode if mode == "fixed" or policy.name == "q" else f"{mode}, halting {policy.name}"
    summary = describe_run(result, valid, loop, solver.backend.name, labels)
    if output is None:
        echo(text, nl=False)
        echo(summary, err=True)  # stdout stays the solutions alone
    else:
        echo(f"{summary} -> {output}")


def _run_arc(solver, challenges: Path, solutions: Path | None, output: Path | None, solve_options: dict) -> None:
    """ARC: every view of every test input, voted; the submission to --output (or stdout), one summary line."""
    import json

    from trm_export.report.trajectory import puzzle_progress
    from trm_export.runtime.arc import bundle_views, solve_arc
    from trm_export.runtime.io import write_text_atomically
    from trm_export.tasks.arc import read_challenges, read_solutions

    tasks = read_challenges(challenges)
    truth = read_solutions(solutions, tasks) if solutions is not None else None  # both read before any work
    index = bundle_views(solver.bundle, solver.manifest)
    total = sum(len(t.test_inputs) * len(index.get(name, ())) for name, t in tasks.items())
    with puzzle_progress("ARC views", total) as tick:
        result = solve_arc(solver, tasks, index, on_progress=lambda done, _: tick(done), **solve_options)
    text = json.dumps(result.submission())
    inputs = sum(len(t.test_inputs) for t in tasks.values())
    summary = (f"{len(tasks)} task(s), {inputs} test input(s), {total} views solved ({solve_options['mode']} loop, "
               f"mean {result.mean_steps:.2f} steps), voted")
    if truth is not None:
        scores = result.score(truth)
        summary += f"; pass@1 {100 * scores[1]:.1f}%, pass@2 {100 * scores[2]:.1f}% (mean over tasks)"
    if output is None:
        echo(text)
        echo(summary, err=True)
    else:
        write_text_atomically(output, text + "\n")
        echo(f"{summary} -> {output}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--variant", "variants", multiple=True, help="Graph(s) to build (default: all in the bundle).")
@click.option("--dla-core", type=int, default=None, help="Build for this DLA core (fp16/int8, static batch).")
@click.option("--print-recipe", is_flag=True, help="Only print the trtexec commands for the bundle's target.")
@click.option("--record", is_flag=True,
              help="Do not build: check the engines build/build_engines.sh wrote (TensorRT here loads them) and record "
                   "them in the manifest, so that verify / run / report use them.")
@click.option("--module", default=None, metavar="TARGET",
              help="A `--target jetson` bundle: build with this module's settings (e.g. jetson-orin-nano) instead of "
                   "the module the device names (/proc/device-tree/model).")
def build(bundle: Path, variants: tuple[str, ...], dla_core: int | None, print_recipe: bool, record: bool,
          module: str | None) -> None:
    """Build TensorRT engines for BUNDLE here (needs TensorRT and a GPU), recorded in its manifest.

    A `--target jetson` bundle reads what the device is (module, TensorRT, memory available) and prints the
    settings it builds with (workspace, batch profile) before it starts."""
    from trm_export.runtime.manifest import read_manifest
    from trm_export.targets.engines import (
        build_bundle_engines,
        build_target,
        check_build_recipes,
        recipes_for,
        record_engines,
    )

    manifest = read_manifest(bundle)
    check_build_recipes(bundle, manifest)  # files verified too: --print-recipe reads nothing else
    target, settings = build_target(manifest, module=module)
    if module is not None and settings is None:
        raise click.UsageError(f"--module is for a `--target jetson` bundle; this one is for {manifest.target}")
    if settings is not None:
        echo(settings.describe(), err=print_recipe)
    elif target.is_jetson:
        from trm_export.targets.jetson_device import module_mismatch, read_device_facts

        note = module_mismatch(target, read_device_facts())
        if note:
            echo(note, err=True)
    if print_recipe:
        for recipe in recipes_for(manifest, target, dla_core=dla_core, variants=list(variants) or None):
            echo(recipe.trtexec_command())
        return
    if record:
        manifest = record_engines(bundle, list(variants) or None, settings=settings)
    else:
        manifest = build_bundle_engines(bundle, list(variants) or None, dla_core=dla_core, settings=settings)
    for name, rec in manifest.build["engines"].items():
        echo(f"{name}: {rec['file']} (TensorRT {rec['tensorrt_version']}, SM {rec['sm']}), recorded: "
             f"`trm-export verify {bundle} --variant {name}` now checks the engine")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--quick", is_flag=True, help="Small evaluation: 100 puzzles, short latency samples.")
@click.option("--puzzles", type=click.IntRange(1, 1000), default=None,
              help="Held-out puzzles to evaluate (default: as many of the 1000 (quick: 100) as the report's work "
                   "budget covers, counted from the model's FLOPs: the same puzzles on any machine).")
@click.option("--max-accuracy-drop", type=click.FloatRange(0, 100), default=0.5, show_default=True,
              help="Accuracy budget (points of exact accuracy below the best FP32 setting) for the recommendation.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: ONNX Runtime, and TensorRT too for variants with an engine built here. openvino: "
                   "OpenVINO's CPU plugin in float32 (pip install openvino).")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Report folder (default: BUNDLE/report, replaced by each run).")
@click.option("--force", is_flag=True, help="Replace an earlier report at --output (never a folder holding "
                                            "anything else).")
@data_option
def report(bundle: Path, quick: bool, puzzles: int | None, max_accuracy_drop: float,
           backend: str, threads: int | None, output: Path | None, force: bool, data: Path | None) -> None:
    """Measure accuracy versus latency of every variant and step budget here; write Markdown, JSON and plots.

    Runtime only (no torch): on the device it measures what runs there, TensorRT engines included."""
    from trm_export.report import ReportOptions, measure_bundle, write_report
    from trm_export.report.render import is_report_folder
    from trm_export.runtime.io import check_output_folder

    folder = output or bundle / "report"
    # The bundle's own report/ is re-measured in place; any other existing folder only with --force, and only if
    # it holds nothing but an earlier report.
    check_output_folder(folder, force, is_report_folder, "a report", replaceable=output is None)
    # A paper-size model's 1000 puzzles would take hours on a CPU: by default, as many as 300 s (quick: 60 s) of
    # work at the nominal rate cover (trm_export.planning), whatever this machine's speed or load.
    work = None if puzzles is not None else 60.0 if quick else 300.0
    data = measure_bundle(bundle, ReportOptions(quick=quick, puzzles=puzzles, work_seconds=work, threads=threads,
                                                backend=backend, data=data))
    folder = write_report(data, folder, max_accuracy_drop)
    echo(f"report written: {folder / 'REPORT.md'}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True,
              help="New bundle to write: the fp32 graph plus int8 / int8-mixed / fp16 variants.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at --output.")
@click.option("--methods", default=None,
              help="Calibration methods (comma separated: minmax,entropy,percentile); one int8-<method> graph each; "
                   "'' for none (default: as many of the three, in order, as the plan's work budget covers).")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration puzzles (.npy tokens or the task's text format); default: the task's calibration "
                   "split, never the held-out one.")
@click.option("--calib-puzzles", type=click.IntRange(1, None), default=None,
              help="Use the first N calibration puzzles (default: the plan's).")
@click.option("--eval-puzzles", type=click.IntRange(1, None), default=None,
              help="Evaluate on the first N held-out puzzles (default: the plan's, sized from the model's work; "
                   "every variant is measured on the same ones).")
@click.option("--plan", "plan_file", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Replay a recorded plan (a bundle's manifest.json or folder); the flags above override it.")
@click.option("--max-samples", type=int, default=512, show_default=True,
              help="Step-input samples kept for calibration, spread over every step of the loop.")
@click.option("--max-accuracy-drop", type=float, default=0.5, show_default=True,
              help="int8-mixed: return the most sensitive layers to float until the exact-accuracy drop (points) "
                   "is within this.")
@click.option("--mixed/--no-mixed", default=None,
              help="Build int8-mixed always / never (default: when the best method misses the budget and the plan's "
                   "work budget covers its search).")
@click.option("--fp16/--no-fp16", default=None, help="Build an fp16 graph (default: for TensorRT targets only).")
@click.option("--keep-float", multiple=True, help="Layer label or node name to leave in float (repeatable).")
@click.option("--quantize-attention", is_flag=True, help="Also quantize the attention products (q k^T, softmax v).")
@click.option("--threads", type=int, default=None, help="ONNX Runtime threads.")
@data_option
def quantize(bundle: Path, output: Path, force: bool, methods: str | None, calib: Path | None,
             calib_puzzles: int | None, eval_puzzles: int | None, plan_file: Path | None, max_samples: int,
             max_accuracy_drop: float, mixed: bool | None, fp16: bool | None, keep_float: tuple[str, ...],
             quantize_attention: bool, threads: int | None, data: Path | None) -> None:
    """Add recursion-aware INT8 (calibrated on every step's state) and FP16 variants to a bundle, measured."""
    from trm_export.calibration import Int8Options, MixedOptions, QuantizeOptions, RecordOptions, add_variants

    options = QuantizeOptions(
        methods=None if methods is None else tuple(m.strip() for m in methods.split(",") if m.strip()), mixed=mixed,
        fp16=fp16, record=RecordOptions(max_samples=max_samples),
        int8=Int8Options(tuple(keep_float), quantize_attention),
        mixed_options=MixedOptions(max_accuracy_drop=max_accuracy_drop), calib_puzzles=calib_puzzles,
        eval_puzzles=eval_puzzles, replay=_replayed(plan_file), force=force, threads=threads)
    heldout = None
    if data is not None:  # checked against the bundle before any work
        from trm_export.calibration.data import folder_split
        from trm_export.runtime.manifest import read_manifest
        from trm_export.tasks.official import CALIBRATION_PUZZLES, HELDOUT_PUZZLES

        task = read_manifest(bundle).task
        heldout = folder_split(data, "heldout", task, eval_puzzles or HELDOUT_PUZZLES)
        if calib is None:
            calib = folder_split(data, "calibration", task, calib_puzzles or CALIBRATION_PUZZLES)
    result = add_variants(bundle, output, options, calib=calib, heldout=heldout)
    echo(f"next: trm-export check {result.path}   |   trm-export report {result.path}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--variant", default=None, help="Which graph of the bundle (default: the bundle's chosen one).")
@click.option("--batch-size", "batch_sizes", type=click.IntRange(1, 4096), multiple=True, default=(1, 64),
              show_default=True, help="Batch sizes to time (repeatable); `auto` uses the nearest one's result.")
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="Threads of both engines (default: theirs); the record holds for this setting only.")
@click.option("--seconds", type=click.FloatRange(0.05, 600), default=1.0, show_default=True,
              help="Timing budget per engine, round and batch size (at least one step).")
@click.option("--rounds", type=click.IntRange(1, 20), default=5, show_default=True,
              help="Alternating rounds; OpenVINO is recorded where it beats ONNX Runtime in most rounds (the two "
                   "timed back to back, in turns) and in the median.")
def tune(bundle: Path, variant: str | None, batch_sizes: tuple[int, ...], threads: int | None, seconds: float,
         rounds: int) -> None:
    """Time ONNX Runtime against OpenVINO on this CPU; `--backend auto` then runs the faster one here.

    Both run the bundle's graph in float32. The result is recorded for this machine, bundle, variant and thread
    count in $TRM_EXPORT_TUNE_FILE (default ~/.cache/trm-export/cpu_engines.json), never in the bundle."""
    from trm_export.report.tune import tune_cpu_engines

    rows, path = tune_cpu_engines(bundle, variant, tuple(sorted(set(batch_sizes))), threads, seconds, rounds,
                                  log=click.echo)
    echo(f"{'batch':>5}  {'ONNX Runtime':>14}  {'OpenVINO':>14}  OpenVINO's speed  rounds it won  auto runs")
    for row in rows:
        ms, rounds = row.record()["ms_per_step"], len(row.ms["openvino"])
        echo(f"{row.batch:>5}  {ms['onnxruntime']:>11.2f} ms  {ms['openvino']:>11.2f} ms  "
                   f"{row.speedup:>15.2f}x  {row.openvino_wins:>7} of {rounds:<3}  {row.engine}")
    echo(f"recorded in {path}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
def check(bundle: Path) -> None:
    """Check every graph of BUNDLE against its target: Q/DQ rules (TensorRT's), opset and IR limits."""
    from trm_export.calibration import check_bundle

    report = check_bundle(bundle)
    echo(str(report))
    if not report:
        sys.exit(1)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The page checks the bundle's checksums, which browsers allow only on "
                   "localhost or https.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port.")
@click.option("--quiet", is_flag=True, help="Do not log requests.")
def serve(bundle: Path, host: str, port: int, quiet: bool) -> None:
    """Serve a browser bundle's page (--target browser): open the printed URL. Serves only the manifest and the
    files it lists, with the headers WebAssembly threads need; Ctrl-C stops it."""
    from trm_export.web.serve import make_server, page_url

    server = make_server(bundle, host, port, log=None if quiet else click.echo)
    echo(f"serving {bundle} at {page_url(server)} (Ctrl-C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="The repository folder to write.")
@click.option("--force", is_flag=True, help="Replace a repository written earlier at --output.")
@click.option("--name", default="trm", show_default=True, help="The model's name in the repository.")
@click.option("--variant", default=None, help="Graph to serve (default: the bundle's default variant).")
@click.option("--mode", type=click.Choice(["adaptive", "fixed"]), default="adaptive", show_default=True)
@click.option("--halting", default="q", show_default=True, help="Adaptive halting: q, stable:K or q+stable:K.")
@click.option("--max-steps", type=click.IntRange(1, None), default=None,
              help="Step limit (default: the trained halt_max_steps).")
@click.option("--min-steps", type=click.IntRange(1, None), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, None), default=64, show_default=True,
              help="Slots of the loop's batch, shared by all requests.")
@click.option("--max-puzzles", type=click.IntRange(1, None), default=256, show_default=True,
              help="Most puzzles one request may carry.")
@click.option("--threads", type=click.IntRange(1, None), default=None,
              help="ONNX Runtime threads per instance (default: all cores).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto",
              show_default=True)
@click.option("--instances", type=click.IntRange(1, None), default=1, show_default=True,
              help="Model instances: processes, each with its own loop and batch.")
@click.option("--kind", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Where the instances run (gpu: the bundle's TensorRT engine, else ONNX Runtime CUDA).")
def triton(bundle: Path, output: Path, force: bool, name: str, variant: str | None, mode: str, halting: str,
           max_steps: int | None, min_steps: int, batch_size: int, max_puzzles: int, threads: int | None,
           backend: str, instances: int, kind: str) -> None:
    """Write a Triton Inference Server model repository that serves BUNDLE: one model whose loop batches the
    puzzles of all requests together (continuous refill), over HTTP and gRPC. Its README says how to start it."""
    from trm_export.triton.repository import TritonOptions, write_repository
    from trm_export.triton.serving import LoopParameters

    loop = LoopParameters(variant=variant, mode=mode, halting=halting, max_steps=max_steps, min_steps=min_steps,
                          batch_size=batch_size, threads=threads, backend=backend, max_puzzles=max_puzzles)
    out = write_repository(bundle, output, TritonOptions(name=name, loop=loop, instances=instances, kind=kind,
                                                         force=force))
    echo(f"Triton model repository written: {out} (model {name!r}); start it as {out / 'README.md'} says")


def _sm_range(sm: tuple[str, ...]) -> str:
    return "-" if not sm else sm[0] if len(sm) == 1 else f"{sm[0]}+"


@main.command()
def targets() -> None:
    """List deployment targets with their TensorRT versions and limits."""
    from trm_export.targets.registry import TARGETS

    echo(f"{'target':<22}{'runtime':<17}{'TensorRT':<12}{'opset':<7}{'IR':<4}{'SM':<10}{'DLA':<5}"
               f"{'precision':<10}{'batch min/opt/max':<19}aliases")
    for t in TARGETS:
        trt = "-" if t.tensorrt is None else (t.tensorrt[0] if t.tensorrt[0] == t.tensorrt[1] else
                                               f"{t.tensorrt[0]}+")
        dla, batch = ("*", "*") if t.decided_on_device else (t.dla_cores, f"{t.batch.min}/{t.batch.opt}/{t.batch.max}")
        echo(f"{t.name:<22}{t.runtime:<17}{trt:<12}{t.max_opset:<7}{t.max_ir_version:<4}"
             f"{_sm_range(t.sm):<10}{dla:<5}{t.default_precision:<10}{batch:<19}{', '.join(t.aliases)}")
    echo("* decided on the device: `trm-export build` and build/build_engines.sh read which module it is "
         "(/proc/device-tree/model), its TensorRT and free memory, and use that module's settings")


if __name__ == "__main__":
    sys.exit(main())
