"""Paper-size models through every CLI stage: wall time and peak RSS of each stage (issue #17).

Writes the four paper-size fixtures (tests/official_format.py, PAPER_VARIANTS: TRM mlp_t Sudoku ~5M, TRM attention
Maze 30x30 ~7M, TRM attention ARC ~7M + an --arc-rows x 512 puzzle table, HRM Sudoku 27M) to a work folder outside
the repository, then runs each stage as a child process of the real CLI at its default settings:

    inspect        trm-export inspect MODEL                                  (load)
    export-cpu     trm-export MODEL --target cpu -o cpu.bundle
    export-jetson  trm-export MODEL --target jetson-orin-nano -o jetson.bundle
    verify         trm-export verify cpu.bundle
    quantize       trm-export quantize cpu.bundle -o q.bundle
    report         trm-export report cpu.bundle -o report/
    run            trm-export run cpu.bundle --input puzzles.npy              (a few generated puzzles)

Wall and CPU time come from os.wait4 on the child, peak RSS from its own VmHWM (polled every 0.2 s; rusage's
maxrss would start from this process's high-water mark at fork). Each stage has a timeout (default 10 min), after
which the child's process group is killed; a failed or timed-out stage is recorded with its one-line error and the
next stage runs. When there is no cpu bundle for verify / quantize / report / run, one is written first from ONE puzzle
(--puzzles FILE --parity-puzzles 1 --no-report: golden vectors and parity then cost one puzzle's loops; timed as
`export-cpu-min`; --no-fallback-bundle skips it), so that those stages are still measured at their defaults.

Sudoku and Maze 30x30 match shipped tasks, so their puzzles come from the shipped generators; ARC (vocab 12 x 900)
has none: its puzzles come from an official-layout dataset folder written here (ARC-like grids, random colours,
labelled by a colour rotation), passed with --data to the export, quantize and report, as a user passes theirs.

    .venv/bin/python benchmarks/paper_size.py                       # everything, ~hours on 2 cores
    .venv/bin/python benchmarks/paper_size.py --models sudoku-mlpt --stages inspect,export-cpu --timeout 120

Results: benchmarks/results/paper_size.md and .json (CPU model, load average, the table), rewritten after every
stage so an interrupted run leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from trm_export.report.measure import cpu_model

REPO = Path(__file__).resolve().parent.parent

MODELS = {  # short name -> paper variant
    "sudoku-mlpt": "paper-trm-mlpt-sudoku",
    "hrm-sudoku": "paper-hrm-sudoku",
    "maze-att": "paper-trm-att-maze",
    "arc-att": "paper-trm-att-arc",
}
STAGES = ("inspect", "export-cpu", "export-jetson", "verify", "quantize", "report", "run")
DEFAULT_ARC_ROWS = 400_000
RUN_PUZZLES = 8


@dataclass
class StageResult:
    model: str
    stage: str
    status: str  # ok | fail | timeout | skipped
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # user + system of the child: on a shared machine, what a quiet one would not wait
    peak_rss_mb: float = 0.0  # rusage of the child: its image's peak, or its parent's at fork if that was higher
    vm_hwm_mb: float = 0.0  # the CLI's own VmHWM, polled every 0.2 s (0: not recorded)
    error: str = ""
    loadavg_start: float = 0.0
    timeout: float = 0.0
    command: str = ""
    log: str = ""
    tail: list[str] = field(default_factory=list)


def cli() -> str:
    found = Path(sys.executable).parent / "trm-export"
    return str(found) if found.exists() else (shutil.which("trm-export") or "trm-export")


def one_line_error(lines: list[str]) -> str:
    """The child's last line that reads like an error, else its last non-empty line."""
    keys = ("Error", "error", "Traceback", "Killed", "refused", "failed", "FAIL")
    text = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("\r")]
    for ln in reversed(text):
        if any(k in ln for k in keys):
            return ln[:300]
    return text[-1][:300] if text else ""


def _timestamped_copy(stream, out, start: float) -> None:
    """Copy the child's output to its log, each line (tqdm's carriage-return updates included) prefixed with the
    seconds since the stage started: where the time goes, without touching the CLI."""
    buf = b""
    while True:
        data = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not data:
            break
        buf += data
        *lines, buf = buf.replace(b"\r", b"\n").split(b"\n")
        stamp = time.perf_counter() - start
        for line in lines:
            if line.strip():
                out.write(f"[{stamp:7.1f}s] {line.decode(errors='replace')}\n")
        out.flush()
    if buf.strip():
        out.write(f"[{time.perf_counter() - start:7.1f}s] {buf.decode(errors='replace')}\n")
    out.flush()


def write_fixture(folder: Path, variant: str, arc_rows: int) -> tuple[Path, dict]:
    """Write the fixture in a child process, so that this process stays small: a child's peak RSS (rusage) starts
    from its parent's high-water mark at fork (it survives exec), so writing a 400k-row table here would raise
    every later stage's figure to ~1.2 GB."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from pathlib import Path;"
        "from official_format import paper_parameter_count, paper_variant, write_paper_checkpoint as w;"
        "v = paper_variant(sys.argv[3], int(sys.argv[4]));"
        "p = w(Path(sys.argv[2]), sys.argv[3], arc_rows=int(sys.argv[4]));"
        "print(json.dumps({'path': str(p), 'variant': v.name, 'parameters': paper_parameter_count(v),"
        " 'rows': v.num_puzzle_identifiers}))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "tests"), str(folder), variant, str(arc_rows)],
                         check=True, capture_output=True, text=True).stdout
    info = json.loads(out.strip().splitlines()[-1])
    return Path(info.pop("path")), info


def _vm_hwm_mb(pid: int) -> float | None:
    """The process's own peak RSS so far (VmHWM of its current image; None once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_stage(model: str, stage: str, argv: list[str], timeout: float, log_dir: Path) -> StageResult:
    log = log_dir / f"{model}.{stage}.log"
    result = StageResult(model, stage, "ok", loadavg_start=os.getloadavg()[0], timeout=timeout,
                         command=" ".join(argv), log=str(log))
    start = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                 env=env)
        reader = threading.Thread(target=_timestamped_copy, args=(child.stdout, out, start), daemon=True)
        reader.start()
        deadline = start + timeout
        status, rusage, killed = None, None, False
        while status is None:
            hwm = _vm_hwm_mb(child.pid)
            if hwm is not None:
                result.vm_hwm_mb = max(result.vm_hwm_mb, hwm)
            pid, st, ru = os.wait4(child.pid, os.WNOHANG)
            if pid:
                status, rusage = st, ru
                break
            if time.perf_counter() > deadline and not killed:
                killed = True
                os.killpg(child.pid, signal.SIGTERM)
                deadline = time.perf_counter() + 15  # then SIGKILL
                timeout = float("inf")
                continue
            if killed and time.perf_counter() > deadline:
                os.killpg(child.pid, signal.SIGKILL)
                deadline = float("inf")
            time.sleep(0.2)
        child.returncode = os.waitstatus_to_exitcode(status)
        reader.join(timeout=5)
    result.seconds = time.perf_counter() - start
    result.peak_rss_mb = rusage.ru_maxrss / 1024  # Linux: kB
    result.cpu_seconds = rusage.ru_utime + rusage.ru_stime
    lines = log.read_text(errors="replace").replace("\r", "\n").splitlines()
    result.tail = [ln for ln in lines if ln.strip()][-40:]
    if killed:
        result.status, result.error = "timeout", f"killed after {result.seconds:.0f} s; last output: " + (
            result.tail[-1][:200] if result.tail else "none")
    elif child.returncode != 0:
        result.status, result.error = "fail", f"exit {child.returncode}: {one_line_error(lines)}"
    return result


def arc_like_puzzles(n: int, seed: int) -> np.ndarray:
    """ARC encoding (pad 0, end-of-row 1, colours 2..11) on a 30 x 30 canvas: random grids of random size."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 30, 30), np.int32)
    for i in range(n):
        h, w = rng.integers(3, 30, size=2)
        out[i, :h, :w] = rng.integers(2, 12, size=(h, w))
        out[i, :h, w] = 1
        if h < 30:
            out[i, h, : w + 1] = 1
    return out.reshape(n, 900)


def arc_dataset_folder(root: Path, rows: int) -> Path:
    """An ARC dataset folder in the official builder's layout, as every command's --data reads it: test/ (1000
    ARC-like puzzles, labelled by a colour rotation so that accuracy is defined) and train/ (256, calibration),
    puzzle identifiers spread over the model's `rows`-row table, label 0 (padding) ignored as the official one is."""
    for split, n, seed in (("test", 1000, 2), ("train", 256, 3)):
        out = root / split
        out.mkdir(parents=True, exist_ok=True)
        inputs = arc_like_puzzles(n, seed)
        labels = np.where(inputs >= 2, (inputs - 2 + 1) % 10 + 2, inputs)
        ids = np.random.default_rng(seed).integers(1, rows, size=n)
        for key, value in (("inputs", inputs), ("labels", labels), ("puzzle_identifiers", ids),
                           ("puzzle_indices", np.arange(n + 1)), ("group_indices", np.arange(n + 1))):
            np.save(out / f"all__{key}.npy", np.asarray(value, np.int32))
        meta = {"pad_id": 0, "ignore_label_id": 0, "blank_identifier_id": 0, "vocab_size": 12, "seq_len": 900,
                "num_puzzle_identifiers": rows, "total_groups": n, "mean_puzzle_examples": 1.0, "total_puzzles": n,
                "sets": ["all"]}
        (out / "dataset.json").write_text(json.dumps(meta))
    return root


def puzzle_files(model: str, folder: Path, arc_rows: int) -> dict[str, Path]:
    """Generated puzzles for `run`, and for ARC (no shipped task) an official dataset folder (--data) for the
    export, quantize and report."""
    from trm_export.tasks import get_task

    files = {}
    if model == "arc-att":
        for name, n, seed in (("one", 1, 4), ("run", RUN_PUZZLES, 1)):
            files[name] = folder / f"arc_{name}.npy"
            np.save(files[name], arc_like_puzzles(n, seed))
        files["data"] = arc_dataset_folder(folder / "arc_data", arc_rows)
        return files
    task = get_task("sudoku") if "sudoku" in model else get_task("maze", size=30)
    path = folder / f"{model}_run.npy"
    tokens = task.generate(RUN_PUZZLES, seed=12345).inputs
    np.save(path, tokens)
    np.save(folder / f"{model}_one.npy", tokens[:1])
    files["run"], files["one"] = path, folder / f"{model}_one.npy"
    return files


def commands(model: str, ckpt: Path, folder: Path, puzzles: dict[str, Path],
             threads: int | None = None) -> dict[str, list[str]]:
    exe = cli()
    t = ["--threads", str(threads)] if threads else []
    cpu, jetson, quant = folder / "cpu.bundle", folder / "jetson.bundle", folder / "quant.bundle"
    data = ["--data", str(puzzles["data"])] if "data" in puzzles else []
    return {
        "inspect": [exe, "inspect", str(ckpt)],
        "export-cpu": [exe, str(ckpt), "--target", "cpu", "-o", str(cpu), "--force", *data, *t],
        "export-cpu-min": [exe, str(ckpt), "--target", "cpu", "-o", str(cpu), "--force", "--no-report",
                           "--parity-puzzles", "1", "--puzzles", str(puzzles["one"]), *t],
        "export-jetson": [exe, str(ckpt), "--target", "jetson-orin-nano", "-o", str(jetson), "--force",
                          *data, *t],
        "verify": [exe, "verify", str(cpu)],
        "quantize": [exe, "quantize", str(cpu), "-o", str(quant), "--force", *data, *t],
        "report": [exe, "report", str(cpu), "-o", str(folder / "report"), *data, *t],
        "run": [exe, "run", str(cpu), "--input", str(puzzles["run"]), "-o", str(folder / "solutions.npz"),
                "--force", *t],
    }


def fmt_cell(r: StageResult | None) -> str:
    if r is None:
        return "-"
    if r.status == "skipped":
        return f"skipped ({r.error})"
    if r.stage == "fixture":
        return f"{r.seconds:.0f} s, {r.error}"
    limit = f" (limit {r.timeout:.0f} s)" if r.timeout else ""
    mark = {"ok": "ok", "fail": "**FAIL**", "timeout": f"**TIMEOUT**{limit}"}[r.status]
    cpu = f" (CPU {r.cpu_seconds:.0f} s)" if r.cpu_seconds else ""
    threads = "" if "--threads" in r.command or r.stage in ("inspect", "verify") else " †"
    rss = r.vm_hwm_mb or r.peak_rss_mb
    upper = "" if r.vm_hwm_mb else " (≤)"
    return f"{r.seconds:.0f} s{cpu}, {rss / 1024:.2f} GB{upper}, {mark}{threads}"


def write_results(out: Path, meta: dict, results: list[StageResult]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {**meta, "load_average_now": os.getloadavg(), "results": [asdict(r) for r in results]}
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    models = list(dict.fromkeys(r.model for r in results))
    stages = [s for s in ("fixture", "inspect", "export-cpu", "export-cpu-min", "export-jetson", "verify",
                          "quantize", "report", "run") if any(r.stage == s for r in results)]
    cell = {(r.model, r.stage): r for r in results}
    lines = [
        "# Paper-size models through every CLI stage (issue #17)",
        "",
        f"Measured {meta['started']} (UTC) with `benchmarks/paper_size.py` ({meta['argv']}), git {meta['git']}.",
        f"Machine: {meta['cpu']}, {meta['cores']} cores, {meta['memory_gb']:.0f} GiB; shared with other jobs: "
        f"load average at start {meta['loadavg_start']}, now {tuple(round(x, 2) for x in os.getloadavg())} "
        "(each stage's load average at its start is in the JSON). Stage timeout "
        f"{meta['timeout']:.0f} s; threads {meta.get('threads') or 'CLI default (all cores)'}. "
        "Cell: wall time (CPU time of the child: user + system, the time it did not wait for a core), peak RSS of "
        "the CLI process (VmHWM), status.",
        *(["Earlier runs merged here (--append): " + "; ".join(
            f"{r['started']} ({r['argv']}), load average {r['loadavg_start']}" for r in meta["earlier_runs"])]
          if meta.get("earlier_runs") else []),
        "",
        "Models: " + "; ".join(f"`{m}` = {meta['models'][m]['variant']} ({meta['models'][m]['parameters']:,} "
                               f"stored elements)" for m in models),
        "",
        "| stage | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for s in stages:
        lines.append(f"| {s} | " + " | ".join(fmt_cell(cell.get((m, s))) for m in models) + " |")
    if any("(≤)" in fmt_cell(r) for r in results):
        lines += ["", "(≤): peak RSS from the child's rusage only, which starts from the harness's own high-water "
                  "mark at fork (it survives exec): an upper bound; rows measured since record the CLI's own VmHWM."]
    if any(fmt_cell(r).endswith(" †") for r in results):
        lines += ["", "† run at the CLI's default threads (all cores), the others with --threads 1."]
    errors = [r for r in results if r.status in ("fail", "timeout")]
    if errors:
        lines += ["", "## Failures and timeouts", ""]
        lines += [f"- {r.model} {r.stage}: {r.error}" for r in errors]
    lines += ["", "## Stage commands", ""]
    lines += [f"- {r.model} {r.stage}: `{r.command}`" for r in results if r.command]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma separated, of {', '.join(MODELS)}")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma separated, of {', '.join(STAGES)}")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per stage (default 600)")
    ap.add_argument("--arc-rows", type=int, default=DEFAULT_ARC_ROWS, help="ARC puzzle-embedding rows")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/trm-paper-size"), help="fixtures and bundles")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (default: removed at the end)")
    ap.add_argument("--no-fallback-bundle", action="store_true",
                    help="do not write a minimal cpu bundle when export-cpu fails")
    ap.add_argument("--threads", type=int, default=None,
                    help="pass --threads N to the stages that take it (default: the CLI's, all cores); on a shared "
                    "machine 2 torch threads on 2 busy cores ran 3-8x slower than 1")
    ap.add_argument("--append", action="store_true",
                    help="keep the results already in --output's JSON (same model and stage: replaced)")
    ap.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "paper_size.md")
    ap.add_argument("--render-only", action="store_true", help="rewrite --output's .md from its .json and exit")
    args = ap.parse_args(argv)
    if args.render_only:
        data = json.loads(args.output.with_suffix(".json").read_text())
        results = [StageResult(**r) for r in data.pop("results")]
        write_results(args.output, data, results)
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for s in stages:
        if s not in STAGES:
            ap.error(f"unknown stage {s!r}; choose from {', '.join(STAGES)}")
    if args.workdir.resolve().is_relative_to(REPO):
        ap.error("--workdir must be outside the repository")
    args.workdir.mkdir(parents=True, exist_ok=True)
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True,
                           text=True).stdout.strip()
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "argv": " ".join(sys.argv[1:]) or "defaults",
        "git": git + (" + uncommitted changes" if dirty else ""), "cpu": cpu_model(), "cores": os.cpu_count(),
        "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "loadavg_start": tuple(round(x, 2) for x in os.getloadavg()), "timeout": args.timeout,
        "arc_rows": args.arc_rows, "threads": args.threads, "models": {}, "python": sys.version.split()[0],
    }
    results: list[StageResult] = []
    previous = args.output.with_suffix(".json")
    if args.append and previous.is_file():
        old = json.loads(previous.read_text())
        meta["models"].update(old.get("models", {}))
        meta["earlier_runs"] = old.get("earlier_runs", []) + [
            {k: old.get(k) for k in ("started", "argv", "git", "loadavg_start", "timeout")}]
        rerun = {(m, s) for m in models for s in stages}
        results = [StageResult(**r) for r in old["results"] if (r["model"], r["stage"]) not in rerun
                   and not (r["stage"] in ("fixture", "export-cpu-min") and r["model"] in models)]
    total = len(models) * len(stages)
    done, t0 = 0, time.perf_counter()
    durations: list[float] = []

    def progress(model: str, stage: str) -> None:
        mean = (sum(durations) / len(durations)) if durations else args.timeout / 2
        eta = (total - done) * mean
        print(f"[{done + 1}/{total}] {model} {stage}  elapsed {(time.perf_counter() - t0) / 60:.1f} min, "
              f"ETA ~{eta / 60:.0f} min (at most {(total - done) * args.timeout / 60:.0f})", file=sys.stderr,
              flush=True)

    for model in models:
        folder = args.workdir / model
        folder.mkdir(parents=True, exist_ok=True)
        log_dir = folder / "logs"
        log_dir.mkdir(exist_ok=True)
        print(f"{model}: writing the fixture ({MODELS[model]})", file=sys.stderr, flush=True)
        start = time.perf_counter()
        ckpt, meta["models"][model] = write_fixture(folder / "checkpoint", MODELS[model], args.arc_rows)
        puzzles = puzzle_files(model, folder, meta["models"][model]["rows"])
        results.append(StageResult(model, "fixture", "ok", time.perf_counter() - start,
                                   loadavg_start=os.getloadavg()[0],
                                   error=f"{ckpt.stat().st_size / 2**20:.0f} MiB checkpoint"))
        cmds = commands(model, ckpt, folder, puzzles, args.threads)
        cpu_bundle = folder / "cpu.bundle"
        for stage in stages:
            progress(model, stage)
            needs_cpu = stage in ("verify", "quantize", "report", "run")
            if needs_cpu and not (cpu_bundle / "manifest.json").is_file() and not args.no_fallback_bundle:
                if not any(r.model == model and r.stage == "export-cpu-min" for r in results):
                    print("  no cpu bundle: export-cpu-min first (one puzzle, --no-report)",
                          file=sys.stderr, flush=True)
                    results.append(run_stage(model, "export-cpu-min", cmds["export-cpu-min"], args.timeout, log_dir))
                    write_results(args.output, meta, results)
            if needs_cpu and not (cpu_bundle / "manifest.json").is_file():
                results.append(StageResult(model, stage, "skipped", error="no cpu bundle"))
            else:
                r = run_stage(model, stage, cmds[stage], args.timeout, log_dir)
                results.append(r)
                durations.append(r.seconds)
                print(f"  {stage}: {r.status} {r.seconds:.0f} s, peak RSS {r.peak_rss_mb:.0f} MB {r.error}",
                      file=sys.stderr, flush=True)
            done += 1
            write_results(args.output, meta, results)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    print(f"wrote {args.output} and {args.output.with_suffix('.json')}", file=sys.stderr)
    return 0 if all(r.status in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
