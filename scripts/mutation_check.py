#!/usr/bin/env python3
"""Break the code on purpose, one mutation at a time, and check that the tests meant to notice do.

Each mutation names the claim it attacks, an exact snippet of one source file and its replacement, and the tests
that must fail with it in place. The script applies it in the working tree (the package is installed editable, so
the tests see it), runs those tests, and puts the file back byte for byte whatever happens (Ctrl-C included). It
refuses to touch a file with uncommitted changes. A mutation whose tests all pass is a claim the suite does not
guard: the script exits 1 and names it.

    .venv/bin/python scripts/mutation_check.py            # every mutation (a few minutes)
    .venv/bin/python scripts/mutation_check.py --list
    .venv/bin/python scripts/mutation_check.py dataset-labels-on-wrong-rows
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    claim: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or `path -k expr` pieces: each must fail (at least one test in it)


MUTATIONS = [
    Mutation("graph-external-data-unchecked", "a graph's weights outside the bundle are never read",
             "runtime/graph_file.py", '''        found = _refusal(memoryview(data), "model", 0)''',
             '''        found = None''',
             ("tests/test_hostile.py -k external-weights-climbing-run",
              "tests/test_runtime_oldest.py -k outside_the_bundle")),
    Mutation("manifest-digest-unchecked", "an edited manifest is refused by its digest",
             "runtime/manifest.py", '''    if data.get("digest") != canonical_digest(data):''',
             '''    if False:''',
             ("tests/test_hostile.py -k loosened-tolerance", "tests/test_runtime_oldest.py -k edited_manifest")),
    Mutation("build-script-unchecked", "the build script a device owner runs is the manifest's",
             "targets/engines.py", '''    if script.is_file() and script.read_bytes()''',
             '''    if False and script.read_bytes()''',
             ("tests/test_hostile.py -k build_script_that_is_not",)),
    Mutation("terminal-escapes-printed", "nothing from a file or a request drives the terminal",
             "core/errors.py", '''    return _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], text)''',
             '''    return text''',
             ("tests/test_hostile.py -k escape", "tests/test_hostile.py -k verify_reports")),
    Mutation("dataset-labels-on-wrong-rows", "a dataset folder's labels are scored against their own puzzles",
             "tasks/official.py", '''        x, y = np.asarray(inputs[rows]), np.asarray(labels[rows])''',
             '''        x, y = np.asarray(inputs[rows]), np.asarray(labels[rows[::-1]])''',
             ("tests/test_dataset_folder.py -k shipped_task", "tests/test_dataset_folder.py -k score_against")),
    Mutation("float32-recorded-as-bfloat16", "the 'as trained' figure is computed in the trained arithmetic",
             "export/accuracy.py",
             '''mode="adaptive", compute_dtype=dtype)''', '''mode="adaptive", compute_dtype="float32")''',
             ("tests/test_report.py -k bfloat16_figure",)),
    Mutation("triton-q-values-swapped", "the Triton loop model answers what the runtime answers, Q values included",
             "triton_serving/serving.py",
             '''                   self.pb.Tensor("q_halt", result.q_halt.astype(np.float32)),
                   self.pb.Tensor("q_continue", result.q_continue.astype(np.float32))]''',
             '''                   self.pb.Tensor("q_halt", result.q_continue.astype(np.float32)),
                   self.pb.Tensor("q_continue", result.q_halt.astype(np.float32))]''',
             ("tests/test_triton.py -k golden_puzzles", "tests/test_triton.py -k load_every")),
    Mutation("combined-halting-waits-for-both", "q+stable:K halts at whichever says so first",
             "runtime/solver.py", '''                if stable:
                    says |= slot_unchanged[:active] >= stable''',
             '''                if stable:
                    says = (says if use_q else True) & (slot_unchanged[:active] >= stable)''',
             ("tests/test_halting.py -k combined_policy", "tests/test_halting.py -k batch_order")),
    Mutation("plan-by-the-clock", "the same checkpoint and flags give the same bundle on a quiet or a busy machine",
             "planning/plan.py", '''    return max(least, min(most, int(BUDGET[budget] / unit_seconds)))''',
             '''    return max(least, min(most, int(BUDGET[budget] / unit_seconds
                                     / (2 if -__import__("time").perf_counter() + __import__("time").perf_counter()
                                        > 1 else 1))))''',  # a budget cut when the clock says "slow"
             ("tests/test_plan.py -k busy_machine",)),
    Mutation("arc-default-halts-on-q", "an ARC challenge file runs the official evaluation's loop by default",
             "core/cli.py", '''    mode = mode or ("fixed" if arc else "adaptive")''',
             '''    mode = mode or "adaptive"''',
             ("tests/test_arc_bundle.py -k writes_a_submission",)),
]


def _dirty(rel: str) -> bool:
    out = subprocess.run(["git", "status", "--porcelain", "--", rel], cwd=ROOT, capture_output=True, text=True)
    return bool(out.stdout.strip())


def _fails(test: str) -> bool:
    """Whether `test` (a path, optionally `-k expr`) fails, with at least one test selected."""
    parts = test.split(" -k ", 1)
    args = [parts[0]] + (["-k", parts[1]] if len(parts) == 2 else [])
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode == 5:  # nothing selected: the mutation's test list is out of date
        raise SystemExit(f"{test}: selects no test; fix the mutation table")
    return done.returncode == 1


def check(mutation: Mutation) -> list[str]:
    """The tests of `mutation` that did NOT fail with it in place (empty: caught by all)."""
    path = ROOT / mutation.file
    if _dirty(mutation.file):
        raise SystemExit(f"{mutation.file} has uncommitted changes; commit or stash them first")
    original = path.read_bytes()
    text = original.decode()
    if text.count(mutation.old) != 1:
        raise SystemExit(f"{mutation.name}: the snippet occurs {text.count(mutation.old)} times in {mutation.file}; "
                         "fix the mutation table")
    try:
        path.write_text(text.replace(mutation.old, mutation.new))
        return [test for test in mutation.tests if not _fails(test)]
    finally:
        path.write_bytes(original)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their claims")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    unknown = set(args.names) - {m.name for m in MUTATIONS}
    if unknown:
        print(f"unknown mutations {sorted(unknown)}; known: {[m.name for m in MUTATIONS]}", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name:<34} {m.claim}  [{m.file}]")
        return 0
    missed = []
    for i, m in enumerate(chosen, 1):
        start = time.perf_counter()
        survivors = check(m)
        verdict = "caught by all" if not survivors else f"NOT caught by {survivors}"
        print(f"[{i}/{len(chosen)}] {m.name}: {verdict} of {len(m.tests)} ({time.perf_counter() - start:.0f} s)",
              flush=True)
        missed += [m.name] if survivors else []
    print(f"{len(chosen) - len(missed)} of {len(chosen)} mutations caught by every test named for them"
          + (f"; not: {missed}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
