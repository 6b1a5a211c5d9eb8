"""The `trm-export` command line. Commands parse options and call the Python API; errors become one line.

Heavy dependencies (torch, onnx) are imported inside commands, so `--help` and the runtime commands work
where only the runtime is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from trm_export import __version__
from trm_export.errors import TrmExportError

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


def override_options(func):
    for option in reversed(_OVERRIDE_OPTIONS):
        func = option(func)
    return func


def _load(model: Path | None, dataset_json: Path | None, **overrides):
    from trm_export.export.checkpoint import load_checkpoint
    from trm_export.reference_models import reference_model_path

    return load_checkpoint(model if model is not None else reference_model_path(), dataset_json=dataset_json,
                           overrides=overrides)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TrmExportError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trm-export")
def main() -> None:
    """Deploy tiny recursive reasoning models (TRM, HRM) to a Jetson, a desktop GPU or a CPU.

    MODEL is a checkpoint as the official training saves it (`step_N`, `checkpoint` or `*.pt`, or the folder
    holding it with all_config.yaml); without MODEL the bundled Sudoku reference model is used.
    """


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@override_options
def inspect(model: Path | None, dataset_json: Path | None, **overrides) -> None:
    """Show a checkpoint's configuration and where each value came from."""
    ck = _load(model, dataset_json, **overrides)
    cfg = ck.config
    click.echo(f"checkpoint   {ck.path}  (sha256 {ck.sha256[:16]}…, key prefix {ck.key_prefix!r})")
    click.echo(f"model        {cfg.family.upper()}{' mlp_t' if cfg.mlp_t else ''}, "
               f"{sum(p.numel() for p in ck.model.parameters()):,} parameters, state "
               f"[{cfg.total_seq_len} x {cfg.hidden_size}], {cfg.net_calls_per_step} network calls per step")
    for name, value in cfg.to_dict().items():
        click.echo(f"  {name:<24} {value!s:<12} {ck.sources.get(name, 'default')}")
    dtypes = sorted(set(ck.stored_dtypes.values()))
    click.echo(f"stored dtypes {', '.join(dtypes)} (the reference computes in float32)")


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--split", type=click.Choice(["heldout", "calibration"]), default="heldout", show_default=True)
@click.option("--limit", type=int, default=None, help="Evaluate only the first N puzzles of the split.")
@click.option("--steps", default="1,2,4,8,16", show_default=True, help="Fixed step budgets, comma separated.")
@click.option("--adaptive/--no-adaptive", default=True, show_default=True,
              help="Also halt on the Q head, capped at the largest budget.")
@click.option("--threads", type=int, default=None, help="torch threads (default: all cores).")
@override_options
def evaluate(model: Path | None, split: str, limit: int | None, steps: str, adaptive: bool, threads: int | None,
             dataset_json: Path | None, **overrides) -> None:
    """Exact accuracy of the PyTorch reference (float32) per step budget on the matching task's puzzles."""
    import torch
    from trm_export.export.accuracy import accuracy_by_budget, format_table, task_for_config

    if threads:
        torch.set_num_threads(threads)
    try:
        budgets = tuple(sorted({int(s) for s in steps.split(",") if s.strip()}))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {steps!r}", param_hint="--steps") from None
    if not budgets or budgets[0] < 1:
        raise click.BadParameter("step budgets must be >= 1", param_hint="--steps")
    ck = _load(model, dataset_json, **overrides)
    task = task_for_config(ck.config)
    data = task.split(split, size=limit)
    click.echo(f"{ck.path}: {task.spec.name} {split} split, {len(data)} puzzles")
    rows = accuracy_by_budget(ck.model, data, budgets, adaptive=adaptive, progress=True)
    click.echo(format_table(rows))


if __name__ == "__main__":
    sys.exit(main())
