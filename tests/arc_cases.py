"""Synthetic ARC voting cases, the same from a seed on every machine: shared by tests/test_arc.py and
scripts/record_official_arc_vote.py, which ran the official TRM evaluator on them (the test compares with what it
recorded, so it needs no network and no official code).

A case is one task with 1-3 test inputs and, per test input, the predictions of several views: an augmentation
(a name of identifiers.json), the answer the view predicts (in the augmented frame, encoded as tokens; drawn from a
small pool so that answers collide and votes pile up, sometimes with stray EOS / PAD tokens so that the crop
matters) and a q_halt logit (see make_case: exact ties happen, near-ties do not).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trm_export.tasks.arc import Augmentation, encode_grid

CASES = 1000
SEED = 20261202


@dataclass
class Case:
    task_id: str
    test_inputs: list[np.ndarray]
    truths: list[np.ndarray]
    identifiers: list[str]  # position = identifier; 0 is <blank>
    # per prediction: (test input index, identifier, prediction tokens [900] in the augmented frame, q logit)
    predictions: list[tuple[int, int, np.ndarray, float]]


def _grid(rng: np.random.Generator, max_side: int = 8) -> np.ndarray:
    return rng.integers(0, 10, (int(rng.integers(1, max_side + 1)), int(rng.integers(1, max_side + 1)))).astype(
        np.uint8)


def _augmentation(rng: np.random.Generator) -> Augmentation:
    colours = (0, *(int(c) for c in rng.permutation(np.arange(1, 10))))
    return Augmentation(int(rng.integers(0, 8)), colours)


def make_case(rng: np.random.Generator, index: int) -> Case:
    task_id = f"task{index:04d}"
    augs = [Augmentation()] + [_augmentation(rng) for _ in range(int(rng.integers(1, 8)))]
    names = list(dict.fromkeys(a.name(task_id) for a in augs))  # distinct names, as the builder dedups
    identifiers = ["<blank>", *names]
    n_inputs = int(rng.integers(1, 4))
    test_inputs = [_grid(rng) for _ in range(n_inputs)]
    truths = [_grid(rng) for _ in range(n_inputs)]
    predictions = []
    for i in range(n_inputs):
        pool = [truths[i]] + [_grid(rng) for _ in range(int(rng.integers(1, 4)))]
        # q logits: continuous values (a ranking by mean confidence), or 0 and 40, whose confidences 0.5 and 1.0
        # add up exactly in float64 (true ties, broken by arrival order). Never a repeated continuous value: two
        # answers with the same multiset of confidences would tie up to the last bit of the sum's rounding order,
        # and sigmoid's last bit differs between libraries. float32 values: what a step graph outputs.
        exact = rng.random() < 0.5
        for identifier, name in enumerate(names, start=1):
            aug = Augmentation.from_name(name)[1]
            for _ in range(int(rng.integers(1, 3))):  # a view may be asked more than once (aggregated voting)
                answer = pool[int(rng.integers(0, len(pool)))]
                tokens = encode_grid(aug.apply(answer)).astype(np.int64)
                kind = rng.random()
                if kind < 0.1:  # a stray EOS inside the answer: the crop shrinks it
                    tokens[int(rng.integers(0, 900))] = 1
                elif kind < 0.15:  # a PAD at the top-left corner: an empty answer
                    tokens[0] = 0
                q = float(rng.choice([0.0, 40.0])) if exact else float(np.float32(rng.normal(0, 2)))
                predictions.append((i, identifier, tokens, q))
    order = rng.permutation(len(predictions))  # views arrive interleaved across test inputs
    return Case(task_id, test_inputs, truths, identifiers, [predictions[j] for j in order])


def make_cases(count: int = CASES, seed: int = SEED) -> list[Case]:
    rng = np.random.default_rng(seed)
    return [make_case(rng, i) for i in range(count)]


def random_task(rng: np.random.Generator, n_train: int = 2, n_test: int = 1, max_side: int = 6) -> dict:
    """A task in the public challenge format, with its solutions: a flip of the input, so that it has a rule."""
    def pair() -> dict:
        grid = _grid(rng, max_side)
        return {"input": grid.tolist(), "output": np.fliplr(grid).tolist()}

    return {"train": [pair() for _ in range(n_train)], "test": [pair() for _ in range(n_test)]}


def write_arc_folder(root, tasks: dict[str, dict], augmentations: int, seed: int = 0) -> list[str]:
    """A small ARC dataset folder in the official builder's layout: identifiers.json (<blank>, then per task its
    original and `augmentations` augmented names), train/ (every view's demonstration pairs) and test/ (every view's
    test pairs, offset 0), each with dataset.json. Returns the identifiers."""
    import json
    from pathlib import Path

    rng = np.random.default_rng(seed)
    root = Path(root)
    identifiers = ["<blank>"]
    splits: dict[str, dict[str, list]] = {s: {"inputs": [], "labels": [], "ids": [], "indices": [0]}
                                          for s in ("train", "test")}
    for task_id, task in tasks.items():
        augs = [Augmentation()] + [_augmentation(rng) for _ in range(augmentations)]
        for aug in augs:
            identifiers.append(aug.name(task_id))
            for split, pairs in (("train", task["train"]), ("test", task["test"])):
                s = splits[split]
                for p in pairs:
                    s["inputs"].append(encode_grid(aug.apply(np.array(p["input"], np.uint8))))
                    s["labels"].append(encode_grid(aug.apply(np.array(p["output"], np.uint8))))
                s["ids"].append(len(identifiers) - 1)
                s["indices"].append(len(s["inputs"]))
    for split, s in splits.items():
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        n = len(s["ids"])
        for key, value in (("inputs", s["inputs"]), ("labels", s["labels"]), ("puzzle_identifiers", s["ids"]),
                           ("puzzle_indices", s["indices"]), ("group_indices", np.arange(n + 1))):
            np.save(folder / f"all__{key}.npy", np.asarray(value, np.int32))
        meta = {"pad_id": 0, "ignore_label_id": 0, "blank_identifier_id": 0, "vocab_size": 12, "seq_len": 900,
                "num_puzzle_identifiers": len(identifiers), "total_groups": n, "mean_puzzle_examples":
                len(s["inputs"]) / n, "total_puzzles": n, "sets": ["all"]}
        (folder / "dataset.json").write_text(json.dumps(meta))
    (root / "identifiers.json").write_text(json.dumps(identifiers))
    (root / "test_puzzles.json").write_text(json.dumps(tasks))
    return identifiers


def build_arc_fixture(root) -> None:
    """The ARC-shaped official fixture of tests/test_arc_bundle.py (and of scripts/record_official_arc_run.py, which
    records what the official code answers on it): a dataset folder of 4 tasks x 4 views, an official-format
    checkpoint (random weights, ARC's 900 positions, one layer and one call of each level per step, 2 steps), the
    challenges of 3 of the tasks (task3 is trained on, not asked) and their solutions."""
    import dataclasses
    import json
    from pathlib import Path

    from official_format import VARIANTS, write_official_checkpoint

    root = Path(root)
    rng = np.random.default_rng(7)
    tasks = {f"task{i}": random_task(rng, n_test=1 + i % 2) for i in range(4)}
    identifiers = write_arc_folder(root / "data", tasks, augmentations=3)
    del tasks["task3"]
    variant = dataclasses.replace(VARIANTS["trm-att-rope"], name="arc-shaped", vocab_size=12, seq_len=900,
                                  num_puzzle_identifiers=len(identifiers), halt_max_steps=2, gain=0.5,
                                  L_layers=1, H_cycles=1, L_cycles=1)
    write_official_checkpoint(root / "ck", variant)
    challenges = {t: {"train": v["train"], "test": [{"input": p["input"]} for p in v["test"]]}
                  for t, v in tasks.items()}
    (root / "challenges.json").write_text(json.dumps(challenges))
    (root / "solutions.json").write_text(json.dumps({t: [p["output"] for p in v["test"]] for t, v in tasks.items()}))
