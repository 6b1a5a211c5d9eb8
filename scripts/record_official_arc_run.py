"""Record the official TRM evaluation of the ARC fixture end to end: the official model over every test view, the
official evaluator's vote, its submission (issue #38: `run --input challenges.json` must agree by default).

Run once, with the official repository at hand (not at test time):

    python scripts/record_official_arc_run.py OFFICIAL_TRM_CHECKOUT DEPS tests/data/official_arc_run.json

DEPS is a folder with pydantic, einops, omegaconf and pyyaml for the official imports (`pip install --target DEPS
...`). The fixture is tests/arc_cases.build_arc_fixture (the one tests/test_arc_bundle.py exports). The official
model is built as pretrain.create_model builds it, from the fixture's all_config.yaml and dataset.json, in float32
(`forward_dtype` overridden: every exported graph computes in float32; bfloat16 is another arithmetic, compared in
tests/test_bfloat16_reference.py), in eval mode over all halt_max_steps steps, as pretrain.evaluate runs it; the
evaluator (evaluators/arc.py) is used as it is, with the stand-ins of scripts/record_official_arc_vote.py. Per
test input it records the official attempts and whether the case is near-tied: a view's answer within 1e-3 of
another at some cell (top-2 logit margin), or vote candidates whose order rests on a mean sigmoid(q_halt) within
1e-4 of each other; there a float32 run elsewhere may legitimately answer otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
from arc_cases import build_arc_fixture  # noqa: E402
from record_official_arc_vote import _stubs  # noqa: E402

LOGIT_MARGIN = 1e-3
Q_MARGIN = 1e-4


def official_views(checkout: Path, fixture: Path) -> tuple[dict, dict, np.ndarray]:
    """(batch, outputs, per-view minimum top-2 logit margin) of the official model over the test split."""
    import yaml
    from utils.functions import load_model_class

    test = fixture / "data" / "test"
    inputs = np.load(test / "all__inputs.npy")
    ids = np.load(test / "all__puzzle_identifiers.npy")
    indices = np.load(test / "all__puzzle_indices.npy")
    example_ids = np.repeat(ids, np.diff(indices))  # each example row carries its puzzle's identifier
    arch = dict(yaml.safe_load((fixture / "ck" / "all_config.yaml").read_text())["arch"])
    dataset = json.loads((test / "dataset.json").read_text())
    name = arch.pop("name")
    arch.pop("loss")
    state = torch.load(next((fixture / "ck").glob("step_*")), weights_only=True)
    state = {k.removeprefix("_orig_mod.model."): v for k, v in state.items()}
    batch = {"inputs": torch.from_numpy(inputs.astype(np.int32)),
             "puzzle_identifiers": torch.from_numpy(example_ids.astype(np.int32))}
    model = load_model_class(name)({**arch, "batch_size": len(inputs), "vocab_size": dataset["vocab_size"],
                                    "seq_len": dataset["seq_len"], "causal": False, "forward_dtype": "float32",
                                    "num_puzzle_identifiers": dataset["num_puzzle_identifiers"]})
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        carry = model.initial_carry(batch)
        while True:  # pretrain.evaluate's loop: until every sequence has halted (eval: at halt_max_steps)
            carry, outputs = model(carry=carry, batch=batch)
            if bool(carry.halted.all()):
                break
    logits = outputs["logits"].float()
    top2 = torch.topk(logits, 2, dim=-1).values
    margins = (top2[..., 0] - top2[..., 1]).min(dim=-1).values.numpy()
    preds = {"preds": torch.argmax(logits, dim=-1).to(torch.int32), "q_halt_logits": outputs["q_halt_logits"].float()}
    return batch, preds, margins


def main(checkout: str, deps: str, out: str) -> None:
    checkout_path = Path(checkout)
    sys.path[:0] = [checkout, deps]
    _stubs()
    from dataset.build_arc_dataset import arc_grid_to_np, grid_hash
    from dataset.common import PuzzleDatasetMetadata
    from evaluators.arc import ARC

    with tempfile.TemporaryDirectory() as tmp:
        fixture = Path(tmp)
        build_arc_fixture(fixture)
        batch, preds, margins = official_views(checkout_path, fixture)
        metadata = PuzzleDatasetMetadata(**json.loads((fixture / "data" / "test" / "dataset.json").read_text()))
        evaluator = ARC(str(fixture / "data"), metadata, submission_K=2, pass_Ks=(1, 2))
        evaluator.update_batch(batch, preds)
        captured: dict = {}
        original_dump = json.dump
        json.dump = lambda obj, f, **kw: captured.setdefault("submission", obj)
        try:
            result = evaluator.result(tmp, rank=0, world_size=1)
        finally:
            json.dump = original_dump
        asked = json.loads((fixture / "challenges.json").read_text())
        margin_of = _view_margins(evaluator, batch, margins)
        records = {}
        for task, attempts in captured["submission"].items():
            if task not in asked:
                continue
            pairs = evaluator.test_puzzles[task]["test"]
            records[task] = []
            for pair, attempt in zip(pairs, attempts, strict=True):
                key = (task, grid_hash(arc_grid_to_np(pair["input"])))
                near = margin_of.get(key, 0.0) < LOGIT_MARGIN or _near_tied_vote(evaluator, *key, Q_MARGIN)
                records[task].append({"attempt_1": attempt["attempt_1"], "attempt_2": attempt["attempt_2"],
                                      "near_tied": bool(near)})
    commit = subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    Path(out).write_text(json.dumps({
        "official_commit": commit.strip() or "e7b68717f0a6c4cbb4ce6fbef787b14f42083bd9", "forward_dtype": "float32",
        "torch": torch.__version__, "logit_margin": LOGIT_MARGIN, "q_margin": Q_MARGIN,
        "official_pass": {k: float(v) for k, v in result.items()}, "submission": records}, indent=1) + "\n")
    near = sum(a["near_tied"] for v in records.values() for a in v)
    print(f"{sum(map(len, records.values()))} test inputs of {len(records)} tasks recorded ({near} near-tied) -> {out}")


def _view_margins(evaluator, batch: dict, margins: np.ndarray) -> dict[tuple[str, str], float]:
    """(task, input grid hash) -> the smallest top-2 logit margin over the views of that test input, keyed as the
    evaluator keys its votes (the view's input cropped and un-augmented)."""
    from dataset.build_arc_dataset import grid_hash, inverse_aug
    from evaluators.arc import _crop

    smallest: dict[tuple[str, str], float] = {}
    for row, (ident, grid) in enumerate(zip(batch["puzzle_identifiers"].tolist(), batch["inputs"].numpy(),
                                            strict=True)):
        name, inverse = inverse_aug(evaluator.identifier_map[ident])
        key = (name, grid_hash(inverse(_crop(grid))))
        smallest[key] = min(smallest.get(key, float("inf")), float(margins[row]))
    return smallest


def _near_tied_vote(evaluator, task: str, input_hash: str, margin: float) -> bool:
    """Whether the top three candidates of this test input's vote are ordered by mean q values closer than
    `margin` at equal counts (the evaluator sorts by (count, mean q)): there the attempts rest on rounding."""
    stats: dict[str, list[float]] = {}
    for pred_hash, q in evaluator._local_preds.get(task, {}).get(input_hash, []):
        entry = stats.setdefault(pred_hash, [0, 0.0])
        entry[0] += 1
        entry[1] += q
    ranked = sorted(((count, total / count) for count, total in stats.values()), reverse=True)[:3]
    return any(c1 == c2 and abs(q1 - q2) < margin for (c1, q1), (c2, q2) in zip(ranked, ranked[1:], strict=False))


if __name__ == "__main__":
    main(*sys.argv[1:4])
