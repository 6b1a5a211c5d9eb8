"""ARC: the official encoding, augmentations and their inverses, and the official vote (tests/data recorded from the
official evaluator by scripts/record_official_arc_vote.py on the cases of tests/arc_cases.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from arc_cases import CASES, SEED, make_cases

from trm_export.errors import InputError
from trm_export.runtime.arc import ArcResult, Ballot
from trm_export.tasks.arc import Augmentation, crop, dihedral, encode_grid, read_challenges, read_solutions, views

RECORDED = Path(__file__).parent / "data" / "official_arc_vote.json"


def test_the_vote_equals_the_official_evaluator_on_1000_cases():
    recorded = json.loads(RECORDED.read_text())
    assert (recorded["cases"], recorded["seed"]) == (CASES, SEED)
    for case, official in zip(make_cases(), recorded["records"], strict=True):
        ballot = Ballot()
        for i, identifier, tokens, q in case.predictions:
            aug = Augmentation.from_name(case.identifiers[identifier])[1]
            ballot.add(case.task_id, case.test_inputs[i], aug.invert(crop(tokens)), q)
        result = ArcResult({case.task_id: [ballot.ranked(case.task_id, x) for x in case.test_inputs]}, {}, 0.0)
        submission = json.dumps(result.submission(), sort_keys=True).encode()
        assert hashlib.sha256(submission).hexdigest()[:16] == official["submission"], case.task_id
        scores = result.score({case.task_id: case.truths})
        assert (scores[1], scores[2]) == (official["pass@1"], official["pass@2"]), case.task_id


@pytest.mark.parametrize("transform", range(8))
def test_every_augmentation_is_undone_exactly(transform):
    rng = np.random.default_rng(transform)
    for _ in range(50):
        grid = rng.integers(0, 10, (int(rng.integers(1, 31)), int(rng.integers(1, 31)))).astype(np.uint8)
        aug = Augmentation(transform, (0, *(int(c) for c in rng.permutation(np.arange(1, 10)))))
        assert np.array_equal(aug.invert(aug.apply(grid)), grid)
        assert Augmentation.from_name(aug.name("t"))[1] == aug
        back = aug.invert(crop(encode_grid(aug.apply(grid))))  # the whole round trip through tokens
        assert np.array_equal(back, grid)
        assert (aug.apply(grid) == 0).sum() == (grid == 0).sum()  # the background colour stays


def test_dihedral_numbering_is_the_official_one():
    g = np.arange(6).reshape(2, 3)
    expected = [g, np.rot90(g), np.rot90(g, 2), np.rot90(g, 3), np.fliplr(g), np.flipud(g), g.T,
                np.fliplr(np.rot90(g))]
    for t, e in enumerate(expected):
        assert np.array_equal(dihedral(g, t), e)


def test_encoding_places_eos_below_and_right_without_a_corner():
    tokens = encode_grid(np.array([[0, 9], [3, 4]], np.uint8)).reshape(30, 30)
    assert tokens[:2, :2].tolist() == [[2, 11], [5, 6]]
    assert tokens[2, :2].tolist() == [1, 1] and tokens[:2, 2].tolist() == [1, 1] and tokens[2, 2] == 0
    full = encode_grid(np.zeros((30, 30), np.uint8))
    assert (full == 2).all()  # a 30 x 30 grid leaves no room for EOS
    assert crop(full).shape == (30, 30)


def test_crop_takes_the_largest_top_left_rectangle():
    tokens = encode_grid(np.full((4, 5), 7, np.uint8)).reshape(30, 30).copy()
    tokens[2, 3] = 1  # row 2 stops at column 3: 2 x 5 = 10 or 4 x 3 = 12
    assert crop(tokens).shape == (4, 3)
    tokens[0, 0] = 0
    assert crop(tokens).shape == (0, 0)


def test_views_index_names_once():
    names = ["<blank>", "abc", "abc|||t3|||0123456789", "xyz", "abc|||t1|||0987654321", "not|||a|||name"]
    index = views(names)
    assert [i for i, _ in index["abc"]] == [1, 2, 4] and [i for i, _ in index["xyz"]] == [3]
    assert index["abc"][2][1] == Augmentation(1, (0, 9, 8, 7, 6, 5, 4, 3, 2, 1))


@pytest.mark.parametrize("content, message", [
    ("[]", "expected an object"),
    ('{"t": {"train": []}}', "needs a non-empty \"test\" list"),
    ('{"t": {"test": [{"input": [[1, 2], [3]]}]}}', "rows of different lengths"),
    ('{"t": {"test": [{"input": [[10]]}]}}', "colours must be integers 0..9"),
    ('{"t": {"test": [{"input": [[1.5]]}]}}', "colours must be integers 0..9"),
    (json.dumps({"t": {"test": [{"input": [[0] * 31]}]}}), "1 x 31 grid; ARC grids are at most 30 x 30"),
    ('{"t": {"test": [{"input": []}]}}', "a grid must be a non-empty list"),
    ('{"t": {"train": [{"input": [[1]]}], "test": [{"input": [[1]]}]}}', "train[0].output"),
    ("{", "not a JSON ARC challenge file"),
    ("[" * 100_000 + "]" * 100_000, "not a JSON ARC challenge file"),  # deeper than Python's reader recurses
    ('{"t": {"test": [{"input": [[1' + "0" * 5000 + ']]}]}}', "not a JSON ARC challenge file"),  # past int()'s limit
])
def test_malformed_challenge_files_say_where(tmp_path, content, message):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(InputError, match=None) as err:
        read_challenges(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_solutions_must_match_the_tasks(tmp_path):
    (tmp_path / "c.json").write_text('{"t": {"test": [{"input": [[1]]}, {"input": [[2]]}]}}')
    tasks = read_challenges(tmp_path / "c.json")
    (tmp_path / "s.json").write_text('{"t": [[[1]]]}')
    with pytest.raises(InputError, match="needs 2 solution grid"):
        read_solutions(tmp_path / "s.json", tasks)


def test_kept_rows_from_a_list_a_folder_or_a_challenge_file(tmp_path):
    from arc_cases import random_task, write_arc_folder

    from trm_export.export.puzzle_rows import select_rows

    rng = np.random.default_rng(1)
    tasks = {f"t{i}": random_task(rng) for i in range(3)}
    names = write_arc_folder(tmp_path / "data", tasks, augmentations=2)  # <blank>, then 3 names per task
    (tmp_path / "ids.txt").write_text("# kept\n4\nt2|||" + names[8].split("|||", 1)[1] + "  # by name\n\n")
    assert select_rows(tmp_path / "ids.txt", len(names), names).tolist() == [0, 4, 8]
    assert select_rows(tmp_path / "data", len(names), names).tolist() == list(range(10))  # every test split id
    (tmp_path / "c.json").write_text(json.dumps({"t1": {"train": [], "test": tasks["t1"]["test"]}}))
    assert select_rows(tmp_path / "c.json", len(names), names).tolist() == [0, 4, 5, 6]
    for content, message in (("99\n", "identifier 99 is outside the checkpoint's table of 10 rows"),
                             ("nope\n", "ids.txt:1: 'nope' is neither an identifier nor a puzzle name"),
                             ("# nothing\n", "no identifiers listed")):
        (tmp_path / "ids.txt").write_text(content)
        with pytest.raises(InputError, match=None) as err:
            select_rows(tmp_path / "ids.txt", len(names), names)
        assert message in str(err.value)
    with pytest.raises(InputError, match="needs the names"):
        select_rows(tmp_path / "c.json", len(names), None)
