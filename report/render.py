"""Turn measurements into report/REPORT.md, report/report.json and three plots a user would rather look at.

- pareto.png: exact accuracy against per-puzzle latency (batch 1), every setting labelled, frontier drawn;
- accuracy_vs_steps.png: exact accuracy against the step budget, one line per variant, adaptive halting (Q head:
  stars; stable-answer policies: triangles, labelled) as markers at their mean steps;
- drift.png: per-step relative error and cosine similarity of z_H of each reduced precision against FP32.
A recommendation: the fastest setting whose exact accuracy is within the budget of the best FP32 setting, where
faster means beyond the timing noise; settings that cannot be told apart are named as equivalent.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from trm_export.report.measure import Measurement, ReportData


def pareto_front(rows: list[Measurement]) -> list[Measurement]:
    """Settings no other setting beats on both latency (lower) and exact accuracy (higher)."""
    front = []
    for r in sorted(rows, key=lambda m: (m.latency_ms_p50, -m.exact_accuracy)):
        if not front or r.exact_accuracy > front[-1].exact_accuracy:
            front.append(r)
    return front


def faster_beyond_noise(a: Measurement, b: Measurement) -> bool:
    """`a`'s latency is below `b`'s by more than the spread of either (interquartile ranges apart)."""
    return a.latency_ms_p75 < b.latency_ms_p25


@dataclass
class Recommendation:
    chosen: Measurement
    baseline: Measurement  # the most accurate fp32 setting
    budget_points: float  # the budget applied: the asked one, or one puzzle where the sample cannot resolve it
    equivalent: list[Measurement]  # other settings within the budget whose latency is within the noise of chosen
    notes: list[str]


def recommend(rows: list[Measurement], max_drop_points: float) -> Recommendation | None:
    """The fastest setting within `max_drop_points` of the best FP32 setting, where "faster" must be beyond the
    timing noise: among the settings within the budget whose latency cannot be told apart from the fastest one,
    the most accurate (then the fewest steps) is chosen and the others are named as equivalent."""
    fp32 = [r for r in rows if r.precision == "fp32"]
    if not fp32:
        return None
    baseline = max(fp32, key=lambda m: (m.exact_accuracy, -m.latency_ms_p50))
    budget, notes = max_drop_points, []
    one_puzzle = 100.0 / baseline.puzzles
    if one_puzzle > max_drop_points:
        budget = one_puzzle
        notes.append(f"{baseline.puzzles} puzzles cannot resolve a {max_drop_points:g}-point budget (one puzzle is "
                     f"{one_puzzle:.2g} points): a setting may lose one puzzle here; measure more puzzles for a "
                     "finer decision")
    # A drop of exactly the budget is within it; 0.965 - 0.960 is 0.0050000000000000044 in floats, hence the slack.
    ok = [r for r in rows if 100 * (baseline.exact_accuracy - r.exact_accuracy) <= budget + 1e-9]
    fastest = min(ok, key=lambda m: (m.latency_ms_p50, -m.throughput))
    tied = [r for r in ok if not faster_beyond_noise(fastest, r)]
    chosen = max(tied, key=lambda m: (m.exact_accuracy, -m.mean_steps, -m.latency_ms_p50))
    return Recommendation(chosen, baseline, budget, [r for r in tied if r is not chosen], notes)


def _setting(r: Measurement) -> str:
    return f"{r.variant}, {_loop(r)}"


def _loop(r: Measurement) -> str:
    """The loop setting: "fixed 16", "adaptive 16" (the Q head, capped at 16), "stable:2 16", "q+stable:2 16"."""
    return f"{r.mode} {r.budget}"


def _short(r: Measurement) -> str:
    """A plot label: 16 (fixed), A16 (Q head), S2@16 (stable:2), QS2@16 (q+stable:2)."""
    if r.mode == "fixed":
        return str(r.budget)
    if r.mode == "adaptive":
        return f"A{r.budget}"
    return f"{r.mode.replace('q+', 'Q').replace('stable:', 'S')}@{r.budget}"


_MARKERS = {"fixed": "o", "adaptive": "*"}  # any other halting policy: "^"


def _halting_legend(rows: list[Measurement]) -> list[str]:
    if not any(r.mode not in _MARKERS for r in rows):
        return []
    return ["Loop: `fixed N` runs N steps; `adaptive N` halts on the trained Q head; `stable:K N` halts a puzzle once "
            "its answer has not changed for K steps in a row; `q+stable:K N` halts on whichever says so first; N caps "
            "them (`trm-export run --halting`).", ""]


def _acc(r: Measurement) -> str:
    return f"{100 * r.exact_accuracy:.1f}% [{100 * r.exact_low:.1f}, {100 * r.exact_high:.1f}] of {r.puzzles}"


def _trained_section(data: ReportData, rec: Recommendation | None) -> list[str]:
    """The accuracy in the arithmetic the model was trained in (PyTorch at export): what the training printed,
    beside which every deployed variant above and below is read."""
    dtypes = sorted({r.compute_dtype for r in data.trained})
    lines = [f"## As trained: the PyTorch reference in {', '.join(dtypes)}", "",
             "Measured at export (a device has no PyTorch), on the first puzzles of the same held-out set "
             f"({data.trained[0].source}). The official code trains and evaluates in this arithmetic: this is the "
             "number a training run prints. Every variant of this bundle computes in float32 or below.", "",
             "| reference | loop | steps (mean) | exact acc [95% CI] of puzzles | token acc |", "|---|---|---|---|---|"]
    for r in data.trained:
        loop = f"fixed {r.budget}" if r.mode == "fixed" else f"Q head, cap {r.budget}"
        lines.append(f"| PyTorch {r.compute_dtype} | {loop} | {r.mean_steps:.2f} | {100 * r.exact_accuracy:.1f}% "
                     f"[{100 * r.exact_low:.1f}, {100 * r.exact_high:.1f}] of {r.puzzles} | "
                     f"{100 * r.token_accuracy:.2f}% |")
    if rec is not None:
        same = next((r for r in data.trained if r.mode == "fixed" and rec.chosen.mode == "fixed"
                     and r.budget == rec.chosen.budget), None)
        if same is not None:
            lines += ["", f"The recommended setting gets {100 * rec.chosen.exact_accuracy:.1f}% of "
                          f"{rec.chosen.puzzles}; the same loop in {same.compute_dtype}, as trained, "
                          f"{100 * same.exact_accuracy:.1f}% of {same.puzzles}."]
    return lines + [""]


def _device_elsewhere(data: ReportData, max_drop_points: float) -> list[str]:
    """A target whose engines run on another machine: no latency recommendation from this CPU; the settings
    within the accuracy budget, most accurate first, and where the latency recommendation comes from."""
    fp32 = [r for r in data.measurements if r.precision == "fp32"]
    lines = ["## Recommendation: made on the device", "",
             f"The `{data.target}` target runs TensorRT engines on its own GPU: the latencies in this report are "
             "the export machine's CPU, which ranks precisions differently (INT8 and FP16 gain far more on a GPU's "
             "tensor cores), so they recommend nothing. On the device, after `trm-export build .`, run `trm-export "
             "report .`: it times the engines there and recommends the fastest setting within the budget.", ""]
    if not fp32:
        return lines
    baseline = max(fp32, key=lambda m: m.exact_accuracy)
    within = sorted((r for r in data.measurements
                     if 100 * (baseline.exact_accuracy - r.exact_accuracy) <= max_drop_points + 1e-9),
                    key=lambda m: (-m.exact_accuracy, m.mean_steps, m.size_mb))
    lines += [f"By accuracy alone, within {max_drop_points:g} points of the best FP32 setting ({_setting(baseline)}, "
              f"{_acc(baseline)}), most accurate first, then fewest steps and smallest graph:", ""]
    lines += [f"- {_setting(r)}: {_acc(r)}, mean {r.mean_steps:.2f} steps, graph {r.size_mb:.2f} MB"
              for r in within[:8]]
    return lines + [""] + _device_estimate(data, within[:8])


def _device_estimate(data: ReportData, settings: list[Measurement]) -> list[str]:
    """The same settings ranked by an on-paper floor per puzzle on the target's GPUs (targets/floor.py), labelled
    as the estimate it is; nothing for a target that is not a Jetson or a model whose FLOPs are unknown."""
    from trm_export.errors import TrmExportError
    from trm_export.targets.floor import floor_us, gpus_for
    from trm_export.targets.registry import get_target

    try:
        gpus = gpus_for(get_target(data.target))
    except TrmExportError:
        return []
    if not gpus or not data.step_flops or not settings:
        return []
    shown = list({gpu.target: gpu for gpu in reversed(gpus)}.values())[::-1]  # one (the smallest) per module
    ranked = sorted(settings, key=lambda r: (floor_us(data.step_flops, r.mean_steps, r.precision, shown[0]),
                                             -r.exact_accuracy))
    lines = [f"By an on-paper floor per puzzle on the device: **an estimate, not a measurement**. Matmul FLOPs "
             f"({data.step_flops / 1e9:.3f} GFLOP per step) x mean steps / the GPU's dense peak in the variant's "
             "precision (INT8, FP16, TF32 for float32 on Orin): what no engine beats, reached only in part at small "
             "batches. Fastest first on the "
             f"{shown[0].name}:", "",
             "| setting | exact acc | " + " | ".join(gpu.name for gpu in shown) + " |",
             "|---|---|" + "---|" * len(shown)]
    lines += [f"| {_setting(r)} | {_acc(r)} | " + " | ".join(
        _us(floor_us(data.step_flops, r.mean_steps, r.precision, gpu)) for gpu in shown) + " |" for r in ranked]
    return lines + [""]


def _us(value: float) -> str:
    return f"{value:.1f} us" if value < 1000 else f"{value / 1000:.2f} ms"


def markdown(data: ReportData, max_drop_points: float) -> str:
    lines = [f"# Accuracy versus latency: `{Path(data.bundle).name}`", "",
             f"Target `{data.target}`. **Measured on {data.host}**, {data.puzzles} puzzles ({data.source}). "
             "Accuracy: exact (whole puzzle right), with its 95% interval (Wilson). Latency per puzzle: mean steps "
             "x the step time measured at batch 1, as median [quartiles]. Throughput: puzzles/s at the target's "
             "batch, halted slots refilled. Every figure was measured here: re-run `trm-export report` on the "
             "device for its own.", ""]
    rec = recommend(data.measurements, max_drop_points) if data.latency_is_the_targets else None
    if not data.latency_is_the_targets:
        lines += _device_elsewhere(data, max_drop_points)
    if rec:
        best, base = rec.chosen, rec.baseline
        lines += ["## Recommendation", "",
                  f"**{_setting(best)}** on {best.backend}: exact accuracy {_acc(best)} "
                  f"({100 * (best.exact_accuracy - base.exact_accuracy):+.1f} points against the best FP32 setting, "
                  f"{_setting(base)}, {_acc(base)}), {best.latency_ms_p50:.2f} ms per puzzle "
                  f"[{best.latency_ms_p25:.2f}, {best.latency_ms_p75:.2f}] "
                  f"({base.latency_ms_p50 / best.latency_ms_p50:.2f}x that baseline's), "
                  f"{best.throughput:.0f} puzzles/s at batch {best.batch}, mean {best.mean_steps:.2f} steps, "
                  f"graph {best.size_mb:.2f} MB. Accuracy budget: {rec.budget_points:g} points.", ""]
        if rec.equivalent:
            lines += ["Equivalent within the timing noise here (latency quartiles overlap), chosen by accuracy: " +
                      ", ".join(f"{_setting(r)} ({100 * r.exact_accuracy:.1f}%, {r.latency_ms_p50:.2f} ms)"
                                for r in rec.equivalent) + ".", ""]
        lines += [f"- {note}" for note in rec.notes] + ([""] if rec.notes else [])
    if data.trained:
        lines += _trained_section(data, rec)
    # Peak RSS is the runtime's alone only in `trm-export report` (a process without torch); the export's report
    # has none to give, and then no column.
    with_rss = any(r.peak_rss_mb is not None for r in data.measurements)
    lines += ["## All settings", "",
              "| variant | backend | loop | steps (mean) | exact acc [95% CI] of puzzles | token acc | ms per puzzle "
              "p50 [p25, p75] | puzzles/s | graph MB |" + (" peak RSS MB |" if with_rss else ""),
              "|---|---|---|---|---|---|---|---|---|" + ("---|" if with_rss else "")]
    front = {id(r) for r in pareto_front(data.measurements)}
    for r in data.measurements:
        rss = ("n/a" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}") if with_rss else ""
        mark = " *" if id(r) in front else ""
        lines.append(f"| {r.variant}{mark} | {r.backend} | {_loop(r)} | {r.mean_steps:.2f} | {_acc(r)} | "
                     f"{100 * r.token_accuracy:.2f}% | {r.latency_ms_p50:.2f} [{r.latency_ms_p25:.2f}, "
                     f"{r.latency_ms_p75:.2f}] | {r.throughput:.0f} (batch {r.batch}) | {r.size_mb:.2f} |"
                     + (f" {rss} |" if with_rss else ""))
    lines += ["", "`*`: on the accuracy/latency Pareto frontier."]
    if not with_rss:
        lines.append("Memory: measured by `trm-export report` (the runtime alone, peak RSS per variant); this "
                     "report's process held PyTorch as well.")
    lines += [""] + _halting_legend(data.measurements)
    if data.drift:
        lines += ["## Drift against FP32 (z_H, fixed loop)", "",
                  "| variant | rel. error step 1 | rel. error last step | cosine last step |", "|---|---|---|---|"]
        for d in data.drift:
            lines.append(f"| {d.variant} | {d.relative_error[0]:.2e} | {d.relative_error[-1]:.2e} | "
                         f"{d.cosine[-1]:.5f} |")
        lines.append("")
    if data.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in data.notes] + [""]
    if data.not_measured:
        lines += ["## Not measured here", ""] + [f"- {item}" for item in data.not_measured] + [""]
    lines += ["## Plots", "", "![accuracy versus latency](pareto.png)", "",
              "![accuracy versus steps](accuracy_vs_steps.png)"]
    if data.drift:
        lines += ["", "![drift against FP32](drift.png)"]
    return "\n".join(lines) + "\n"


def plots(data: ReportData, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    rows = data.measurements
    variants = sorted({r.variant for r in rows} | {d.variant for d in data.drift})
    colors = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
    if rows:  # no accuracy without labelled puzzles (the report says so): then the drift plot alone
        written += _accuracy_plots(data, folder, plt, colors)
    if data.drift:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for d in data.drift:
            steps = range(1, len(d.relative_error) + 1)
            a1.plot(steps, d.relative_error, marker="o", label=d.variant, color=colors.get(d.variant))
            a2.plot(steps, d.cosine, marker="o", label=d.variant, color=colors.get(d.variant))
        a1.set_yscale("log")
        a1.set_xlabel("ACT step")
        a1.set_ylabel("relative error of z_H vs FP32")
        a2.set_xlabel("ACT step")
        a2.set_ylabel("cosine similarity of z_H with FP32")
        for a in (a1, a2):
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        fig.suptitle("Per-step drift of reduced precision against FP32")
        fig.tight_layout()
        fig.savefig(folder / "drift.png", dpi=110)
        plt.close(fig)
        written.append("drift.png")
    return written


def _accuracy_plots(data: ReportData, folder: Path, plt, colors: dict) -> list[str]:
    """pareto.png and accuracy_vs_steps.png, from the measurements (there are some)."""
    import matplotlib.ticker

    rows = data.measurements
    variants = sorted({r.variant for r in rows})
    fig, ax = plt.subplots(figsize=(8, 5))
    front = pareto_front(rows)
    for r in rows:
        ax.errorbar(r.latency_ms_p50, 100 * r.exact_accuracy, color=colors[r.variant], alpha=0.35, linewidth=0.8,
                    xerr=[[r.latency_ms_p50 - r.latency_ms_p25], [r.latency_ms_p75 - r.latency_ms_p50]],
                    yerr=[[100 * (r.exact_accuracy - r.exact_low)], [100 * (r.exact_high - r.exact_accuracy)]])
        ax.scatter(r.latency_ms_p50, 100 * r.exact_accuracy, color=colors[r.variant],
                   marker=_MARKERS.get(r.mode, "^"), s=40 if r.mode == "fixed" else 90 if r.mode == "adaptive" else 55)
    for r in front:  # only the frontier is labelled: every other point is beaten on both axes by one of these
        ax.annotate(f"{r.variant} {_short(r)}", (r.latency_ms_p50,
                    100 * r.exact_accuracy), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.step([r.latency_ms_p50 for r in front], [100 * r.exact_accuracy for r in front], where="post", color="gray",
            linestyle="--", label="Pareto frontier")
    for v in variants:
        ax.scatter([], [], color=colors[v], label=v)
    ax.scatter([], [], color="black", marker="*", label="adaptive halting, Q head (A)")
    if any(r.mode not in _MARKERS for r in rows):
        ax.scatter([], [], color="black", marker="^", label="stable answer (SK), or Q head too (QSK)")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("latency per puzzle, batch 1, p50 with quartiles (ms, log scale)")
    ax.set_ylabel("exact accuracy (%), 95% interval")
    ax.set_title(f"Accuracy versus latency ({data.task}, {data.puzzles} held-out puzzles; frontier labelled, "
                 "A = adaptive)" if all(r.mode in _MARKERS for r in rows) else
                 f"Accuracy versus latency ({data.task}, {data.puzzles} held-out puzzles; frontier labelled,\n"
                 "A = Q head, SK = answer unchanged K steps, QSK = either)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(folder / "pareto.png", dpi=110)
    plt.close(fig)
    written = ["pareto.png"]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in variants:
        fixed = sorted((r for r in rows if r.variant == v and r.mode == "fixed"), key=lambda m: m.budget)
        ax.plot([r.budget for r in fixed], [100 * r.exact_accuracy for r in fixed], marker="o", color=colors[v],
                label=f"{v}, fixed")
        ax.fill_between([r.budget for r in fixed], [100 * r.exact_low for r in fixed],
                        [100 * r.exact_high for r in fixed], color=colors[v], alpha=0.12)
        for r in rows:
            if r.variant == v and r.mode == "adaptive":
                ax.scatter(r.mean_steps, 100 * r.exact_accuracy, marker="*", s=120, color=colors[v],
                           label=f"{v}, adaptive (at its mean steps)")
            elif r.variant == v and r.mode != "fixed":
                ax.scatter(r.mean_steps, 100 * r.exact_accuracy, marker="^", s=60, color=colors[v])
                ax.annotate(_short(r).split("@")[0], (r.mean_steps, 100 * r.exact_accuracy),
                            textcoords="offset points", xytext=(4, 4), fontsize=7, color=colors[v])
    ax.set_xscale("log", base=2)
    budgets = sorted({r.budget for r in rows if r.mode == "fixed"})
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("ACT steps (log scale)")
    ax.set_ylabel("exact accuracy (%)")
    ax.set_title("Exact accuracy versus step budget (bands: 95% intervals)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "accuracy_vs_steps.png", dpi=110)
    plt.close(fig)
    written.append("accuracy_vs_steps.png")
    return written


def is_report_folder(folder: Path) -> bool:
    """Whether `folder` holds nothing but what write_report writes (REPORT.md, report.json, PNG plots)."""
    return all(p.is_file() and not p.is_symlink() and (p.name in ("REPORT.md", "report.json") or p.suffix == ".png")
               for p in folder.iterdir())


def write_report(data: ReportData, folder: str | Path, max_drop_points: float = 0.5) -> Path:
    """Write REPORT.md, report.json and the plots into `folder` (replaced as a whole)."""
    import shutil

    folder = Path(folder)
    # mkdir, not mkdtemp (mode 700): a report folder is as readable as the rest of the bundle (the umask's mode)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        try:
            plots(data, tmp)
        except ImportError:
            data.not_measured.append("plots: matplotlib is not installed here")
        (tmp / "REPORT.md").write_text(markdown(data, max_drop_points))
        (tmp / "report.json").write_text(json.dumps(data.to_dict(), indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
