"""A table a device can hold: an ARC-shaped checkpoint with a paper-size puzzle table, exported whole and with
`--keep-puzzles` of a 400-task evaluation; bundle sizes, export times and peak memory side by side, one run.

The model is small (hidden 32: the table, not the step, is what this measures); its puzzle table is ROWS x 512
(puzzle_emb_ndim 512, as the papers') in the official layout, and identifiers.json names every row as the official
ARC builder does: 400 evaluation tasks x 1,001 views (the original and 1,000 augmentations) and training tasks for
the rest. The challenge file asks the 400 evaluation tasks, one test input each.

    python benchmarks/keep_puzzles.py [--rows 800000] [--workdir /tmp/trm-keep] [--keep]

Writes benchmarks/results/keep_puzzles.md. Needs about 3x the table's size in free disk (checkpoint, whole
bundle) and memory for one copy of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from official_format import VARIANTS, write_official_checkpoint  # noqa: E402

from trm_export.tasks.arc import Augmentation, encode_grid  # noqa: E402

EVAL_TASKS, VIEWS = 400, 1001


def names_for(rows: int, rng: np.random.Generator) -> list[str]:
    """<blank>, 400 evaluation tasks x 1,001 views, then training tasks' views until `rows` names."""
    names = ["<blank>"]
    task = 0
    while len(names) < rows:
        tid = f"{task:08x}"
        names.append(tid)
        for _ in range(VIEWS - 1):
            if len(names) >= rows:
                break
            colours = (0, *(int(c) for c in rng.permutation(np.arange(1, 10))))
            names.append(Augmentation(int(rng.integers(0, 8)), colours).name(tid))
        task += 1
    return names[:rows]


def write_fixture(work: Path, rows: int) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(0)
    names = names_for(rows, rng)
    variant = dataclasses.replace(VARIANTS["trm-att-rope"], name="arc-table", vocab_size=12, seq_len=900,
                                  num_puzzle_identifiers=rows, puzzle_emb_ndim=512, puzzle_emb_len=16,
                                  halt_max_steps=2, gain=0.5)
    write_official_checkpoint(work / "ck", variant)
    data = work / "data"
    (data / "test").mkdir(parents=True, exist_ok=True)
    (data / "identifiers.json").write_text(json.dumps(names))
    # test/: the identity view of each evaluation task's test input (enough for parity; the eval asks all views)
    grids = [rng.integers(0, 10, (int(rng.integers(1, 11)), int(rng.integers(1, 11)))) for _ in range(EVAL_TASKS)]
    ids = [1 + t * VIEWS for t in range(EVAL_TASKS)]
    tokens = np.stack([encode_grid(g.astype(np.uint8)) for g in grids]).astype(np.int32)
    for key, value in (("inputs", tokens), ("labels", tokens), ("puzzle_identifiers", ids),
                       ("puzzle_indices", np.arange(EVAL_TASKS + 1)), ("group_indices", np.arange(EVAL_TASKS + 1))):
        np.save(data / "test" / f"all__{key}.npy", np.asarray(value, np.int32))
    meta = {"pad_id": 0, "ignore_label_id": 0, "blank_identifier_id": 0, "vocab_size": 12, "seq_len": 900,
            "num_puzzle_identifiers": rows, "total_groups": EVAL_TASKS, "mean_puzzle_examples": 1.0,
            "total_puzzles": EVAL_TASKS, "sets": ["all"]}
    (data / "test" / "dataset.json").write_text(json.dumps(meta))
    challenges = {names[i]: {"train": [], "test": [{"input": g.tolist()}]} for i, g in zip(ids, grids, strict=True)}
    (work / "challenges.json").write_text(json.dumps(challenges))
    (work / "challenges_1.json").write_text(json.dumps(dict(list(challenges.items())[:1])))
    return work / "ck", data, work / "challenges.json"


def run(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GB of the child, last line)."""
    start = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # the largest child so far, GB
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(command)}\n{out[-2000:]}")
    return wall, peak, out.strip().splitlines()[-1] if out.strip() else ""


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=800_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/trm-keep"))
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.perf_counter()
    ckpt, data, challenges = write_fixture(work, args.rows)
    print(f"fixture: {args.rows:,} rows in {time.perf_counter() - started:.0f} s, checkpoint "
          f"{(ckpt / 'step_1000').stat().st_size / 1e9:.2f} GB", file=sys.stderr)
    cli = [sys.executable, "-m", "trm_export.cli"]
    common = [str(ckpt), "--target", "cpu", "--data", str(data), "--parity-puzzles", "8", "--no-report", "--threads",
              "2"]
    results = []
    for label, extra in (("whole table", []), ("--keep-puzzles challenges.json", ["--keep-puzzles",
                                                                                   str(challenges)])):
        out = work / ("whole" if not extra else "kept")
        wall, peak, _ = run([*cli, *common, *extra, "-o", str(out)])
        table = out / "tables" / "puzzle_emb.npy"
        results.append((label, wall, peak, table.stat().st_size, folder_size(out)))
        print(f"{label}: {wall:.0f} s", file=sys.stderr)
    wall, _, line = run([*cli, "run", str(work / "kept"), "--input", str(work / "challenges_1.json"), "--max-steps",
                         "1", "--mode", "fixed", "-o", str(work / "submission.json")])
    lines = [
        "# `--keep-puzzles`: a table a device can hold", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} (UTC) with `benchmarks/keep_puzzles.py --rows "
        f"{args.rows}`, torch {torch.__version__.split('+')[0]}, on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end. Model: hidden 32, ARC "
        f"encoding (vocab 12 x 900), puzzle table {args.rows:,} x 512 float32; identifiers.json names "
        f"{EVAL_TASKS} evaluation tasks x {VIEWS:,} views plus training tasks. Peak RSS: the largest child so far "
        "(the second export's figure includes the first's).", "",
        "| export | wall | peak RSS | puzzle table | bundle |", "|---|---|---|---|---|"]
    for label, w, p, t, b in results:
        lines.append(f"| {label} | {w:.0f} s | {p:.2f} GB | {t / 1e6:,.1f} MB | {b / 1e6:,.1f} MB |")
    lines += ["", f"`run` on the kept bundle with one of the tasks ({VIEWS:,} views, 1 fixed step each): "
                  f"{wall:.0f} s; {line}"]
    (ROOT / "benchmarks" / "results" / "keep_puzzles.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
