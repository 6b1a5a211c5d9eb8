"""Record what the official TRM ARC evaluator answers on the synthetic voting cases of tests/arc_cases.py.

Run once, with the official repository at hand (not at test time):

    python scripts/record_official_arc_vote.py OFFICIAL_TRM_CHECKOUT tests/data/official_arc_vote.json [COMMIT]

OFFICIAL_TRM_CHECKOUT holds `evaluators/arc.py`, `dataset/build_arc_dataset.py` and `dataset/common.py` (a git
checkout, or `git show` of them). The evaluator is used as it is, with three stand-ins for what a one-process run
on a CPU does not need: numba's `njit` (the identity: the same Python code, uncompiled), argdantic (only its CLI
decorator is imported) and `torch.distributed.gather_object` (one process: the gather is a copy). Per case it
records the sha256 of the official submission (attempt_1/attempt_2 per test input) and its pass@1 / pass@2.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from arc_cases import CASES, SEED, make_cases  # noqa: E402

from trm_export.tasks.arc import Augmentation, encode_grid  # noqa: E402


def _stubs() -> None:
    numba = types.ModuleType("numba")
    numba.njit = lambda f: f
    sys.modules["numba"] = numba
    argdantic = types.ModuleType("argdantic")

    class ArgParser:
        def command(self, *args, **kwargs):
            return lambda f: f

    argdantic.ArgParser = ArgParser
    sys.modules["argdantic"] = argdantic
    dist.gather_object = lambda obj, out, dst=0, group=None: out.__setitem__(0, obj)


def submission_digest(submission: dict) -> str:
    return hashlib.sha256(json.dumps(submission, sort_keys=True).encode()).hexdigest()[:16]


def main(checkout: str, out: str, commit: str = "") -> None:
    sys.path.insert(0, checkout)
    _stubs()
    from evaluators.arc import ARC  # the official evaluator

    commit = commit or subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True,
                                      text=True).stdout.strip()
    records = []
    for case in make_cases():
        evaluator = ARC.__new__(ARC)  # its __init__ reads identifiers.json / test_puzzles.json: set them directly
        evaluator.pass_Ks, evaluator.submission_K, evaluator.aggregated_voting = (1, 2), 2, True
        evaluator.blank_identifier_id = 0
        evaluator.identifier_map = case.identifiers
        evaluator.test_puzzles = {case.task_id: {"test": [{"input": x.tolist(), "output": y.tolist()}
                                                          for x, y in zip(case.test_inputs, case.truths, strict=True)]}}
        evaluator._local_hmap, evaluator._local_preds = {}, {}
        inputs = [encode_grid(Augmentation.from_name(case.identifiers[ident])[1].apply(case.test_inputs[i]))
                  for i, ident, _, _ in case.predictions]
        batch = {"inputs": torch.from_numpy(np.stack(inputs).astype(np.int32)),
                 "puzzle_identifiers": torch.tensor([ident for _, ident, _, _ in case.predictions], dtype=torch.int32)}
        preds = {"preds": torch.from_numpy(np.stack([t for _, _, t, _ in case.predictions]).astype(np.int32)),
                 "q_halt_logits": torch.tensor([q for _, _, _, q in case.predictions], dtype=torch.float32)}
        evaluator.update_batch(batch, preds)
        captured: dict = {}
        original_dump = json.dump
        json.dump = lambda obj, f, captured=captured, **kw: captured.setdefault("submission", obj)
        try:
            result = evaluator.result("/tmp", rank=0, world_size=1)  # its submission.json write is captured
        finally:
            json.dump = original_dump
        records.append({"task": case.task_id, "submission": submission_digest(captured["submission"]),
                        "pass@1": result["ARC/pass@1"], "pass@2": result["ARC/pass@2"]})
    Path(out).write_text(json.dumps({"official_commit": commit, "cases": CASES, "seed": SEED, "records": records},
                                    indent=0) + "\n")
    print(f"{len(records)} cases recorded from {commit or checkout} -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
