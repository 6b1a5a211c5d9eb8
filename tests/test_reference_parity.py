"""The PyTorch reference is exact: it agrees with an independent numpy float64 implementation of the equations.

The numpy side (tests/numpy_reference.py) is written from shared/reference/checkpoints.md alone and reads the
official-format checkpoint file itself, so a wrong equation, a mis-mapped weight or a lossy load in
`trm_export` shows up here as a mismatch.

Two comparisons per variant, every step:
- one-step ("teacher-forced"): numpy computes step t from the torch trace's float32 state after step t - 1
  (step 1 from H_init / L_init). This is the exactness bar: max |torch - numpy| <= 1e-5 on z_H, z_L, logits,
  q_halt, q_continue at EVERY step, identical argmax, identical adaptive halting steps and answers.
- free-running: numpy runs its own float64 recursion. The recursion amplifies rounding (x2-x5 per step for the
  random mlp_t weights), so a float32 implementation drifts from float64 by more than 1e-5 after a few steps
  however exact its math; the bar there is "no worse than numpy's own float32 run of the same equations" (x10
  slack), plus identical per-step argmax and adaptive decisions for the trained step count.
Run with -s to see the errors per variant.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy_reference import (
    KNOWN_PREFIXES,
    NumpyRecursiveModel,
    load_official_state,
    rms,
    rope_tables,
    rotate_half,
)
from official_format import COMPILED_PREFIX, VARIANTS, write_official_checkpoint

from trm_export.export.checkpoint import load_checkpoint
from trm_export.export.reference import run_reference

ATOL = 1e-5
DRIFT_SLACK = 10.0  # free-running torch error may be at most this many times numpy float32's own drift
NUM_PUZZLES = 4
FILE_NAMES = ("step_1234", "checkpoint", "model.pt")
FIELDS = ("z_H", "z_L", "logits", "q_halt", "q_continue")

_SUMMARY: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_summary():
    # These models are tiny: one intra-op thread is fastest, and on a busy 2-core machine torch's default
    # spin-waiting thread pool makes a 6-step run take seconds instead of milliseconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if _SUMMARY:
        print("\nmax |torch - numpy float64| over all steps and puzzles:")
        for name, line in sorted(_SUMMARY.items()):
            print(f"  {name:30s} {line}")


def _puzzles(v, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, v.vocab_size, size=(NUM_PUZZLES, v.seq_len), dtype=np.int64)
    puzzle_ids = rng.integers(0, v.num_puzzle_identifiers, size=NUM_PUZZLES, dtype=np.int64)
    return tokens, puzzle_ids


def _per_step(a, b, steps: int) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape and a.shape[0] == steps, (a.shape, b.shape, steps)
    return np.abs(a - b).reshape(steps, -1).max(axis=1)


def _same_decisions(torch_tr, np_tr) -> None:
    assert np.array_equal(np.asarray(torch_tr.step_predictions), np_tr.step_predictions)
    assert np.asarray(torch_tr.steps_used).tolist() == np_tr.steps_used.tolist()
    assert np.array_equal(np.asarray(torch_tr.predictions), np_tr.predictions)


def check_against_numpy(torch_tr, ref: NumpyRecursiveModel, ref32: NumpyRecursiveModel, tokens, puzzle_ids, *,
                        mode: str, max_steps: int | None = None, min_steps: int = 1,
                        free_decisions: bool = True) -> dict[str, dict[str, float]]:
    """Assert both bars (module docstring) and return {"one_step"|"free"|"f32_drift": {field: max error}}."""
    steps = int(max_steps or ref.halt_max_steps)
    kw = dict(mode=mode, max_steps=steps, min_steps=min_steps)
    one = ref.run(tokens, puzzle_ids, given_states=(torch_tr.z_H, torch_tr.z_L), **kw)
    free = ref.run(tokens, puzzle_ids, **kw)
    free32 = ref32.run(tokens, puzzle_ids, **kw)
    out: dict[str, dict[str, float]] = {"one_step": {}, "free": {}, "f32_drift": {}}
    for field in FIELDS:
        got = getattr(torch_tr, field)
        err1 = _per_step(got, getattr(one, field), steps)
        bad = np.nonzero(err1 > ATOL)[0]
        assert bad.size == 0, (f"{field}: one-step max |torch - numpy| per step {err1.tolist()} exceeds {ATOL} "
                               f"first at step {int(bad[0]) + 1} (max |value| {np.abs(got).max():.3g})")
        err_free = _per_step(got, getattr(free, field), steps)
        drift32 = _per_step(getattr(free32, field), getattr(free, field), steps)
        bound = np.maximum(ATOL, DRIFT_SLACK * drift32)
        assert (err_free <= bound).all(), (f"{field}: free-running error per step {err_free.tolist()} beyond "
                                           f"{DRIFT_SLACK} x numpy float32 drift {drift32.tolist()}")
        out["one_step"][field] = float(err1.max())
        out["free"][field] = float(err_free.max())
        out["f32_drift"][field] = float(drift32.max())
    _same_decisions(torch_tr, one)
    if free_decisions:
        _same_decisions(torch_tr, free)
    return out


def _fmt(errs: dict[str, float]) -> str:
    q = max(errs["q_halt"], errs["q_continue"])
    return f"z_H={errs['z_H']:.1e} z_L={errs['z_L']:.1e} logits={errs['logits']:.1e} q={q:.1e}"


def _models(path, v) -> tuple[NumpyRecursiveModel, NumpyRecursiveModel]:
    _, state = load_official_state(path)
    return NumpyRecursiveModel(state, v), NumpyRecursiveModel(state, v, dtype=np.float32)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_reference_matches_numpy_every_step(tmp_path, name):
    v = VARIANTS[name]
    path = write_official_checkpoint(tmp_path, name)
    ck = load_checkpoint(tmp_path)
    ref, ref32 = _models(path, v)
    assert ck.config.prefix_len == v.prefix_len
    assert ck.config.halting_rule == ref.halting_rule
    tokens, puzzle_ids = _puzzles(v)
    steps = v.halt_max_steps

    fixed = run_reference(ck.model, tokens, puzzle_ids, mode="fixed", record_states=True)
    assert fixed.z_H.shape == (steps, NUM_PUZZLES, v.seq_len + v.prefix_len, v.hidden_size)
    # the recursion really moves: states differ between steps, so a stuck loop cannot pass
    assert np.abs(fixed.z_H[-1] - fixed.z_H[0]).max() > 1e-3
    errs = check_against_numpy(fixed, ref, ref32, tokens, puzzle_ids, mode="fixed")
    assert np.asarray(fixed.steps_used).tolist() == [steps] * NUM_PUZZLES

    adaptive = run_reference(ck.model, tokens, puzzle_ids, mode="adaptive", record_states=True)
    check_against_numpy(adaptive, ref, ref32, tokens, puzzle_ids, mode="adaptive")
    used = np.asarray(adaptive.steps_used).tolist()

    line = (f"one-step: {_fmt(errs['one_step'])} | free-running: {_fmt(errs['free'])} "
            f"(numpy f32 drift z_H={errs['f32_drift']['z_H']:.1e}) | adaptive steps_used={used}")
    _SUMMARY[name] = line
    print(f"\n{name}: {line}")


@pytest.mark.parametrize("name", ["trm-att-rope", "trm-mlpt", "hrm"])
def test_more_steps_than_trained_and_min_steps(tmp_path, name):
    """max_steps beyond halt_max_steps (the HRM accuracy knob) and min_steps keep the same math and rule."""
    v = VARIANTS[name]
    path = write_official_checkpoint(tmp_path, name, seed=3)
    ck = load_checkpoint(path)
    ref, ref32 = _models(path, v)
    tokens, puzzle_ids = _puzzles(v, seed=5)
    steps = v.halt_max_steps + 3
    tr = run_reference(ck.model, tokens, puzzle_ids, mode="adaptive", max_steps=steps, min_steps=2,
                       record_states=True)
    # 9 free-running float32 steps of the random mlp_t net drift too far for argmax equality to mean anything;
    # the decisions are checked one-step
    check_against_numpy(tr, ref, ref32, tokens, puzzle_ids, mode="adaptive", max_steps=steps, min_steps=2,
                        free_decisions=not v.mlp_t)
    assert (np.asarray(tr.steps_used) >= 2).all()


@pytest.mark.parametrize("file_name", FILE_NAMES)
@pytest.mark.parametrize("prefix", KNOWN_PREFIXES)
def test_key_prefix_and_file_name_give_the_same_numbers(tmp_path, prefix, file_name):
    v = VARIANTS["trm-att-rope"]
    tokens, puzzle_ids = _puzzles(v, seed=1)
    base = load_checkpoint(write_official_checkpoint(tmp_path / "base", v, prefix=COMPILED_PREFIX,
                                                     file_name="step_1000"))
    want = run_reference(base.model, tokens, puzzle_ids, mode="adaptive", record_states=True)

    path = write_official_checkpoint(tmp_path / "ck", v, prefix=prefix, file_name=file_name)
    assert all(k.startswith(prefix) for k in torch.load(path, weights_only=True))
    for source in (path.parent, path):  # the folder (file found by name) and the file itself
        ck = load_checkpoint(source)
        assert ck.key_prefix == prefix
        got = run_reference(ck.model, tokens, puzzle_ids, mode="adaptive", record_states=True)
        for field in ("z_H", "z_L", "logits", "q_halt", "q_continue", "step_predictions", "predictions",
                      "steps_used"):
            assert np.array_equal(np.asarray(getattr(got, field)), np.asarray(getattr(want, field))), field

    np_prefix, _ = load_official_state(path)
    assert np_prefix == prefix
    ref, ref32 = _models(path, v)  # numpy strips the prefix on its own
    check_against_numpy(got, ref, ref32, tokens, puzzle_ids, mode="adaptive")


@pytest.mark.parametrize("name", ["trm-att-rope", "trm-mlpt-learned", "hrm"])
def test_bf16_initial_states_are_used_exactly(tmp_path, name):
    path = write_official_checkpoint(tmp_path, name)
    raw = torch.load(path, weights_only=True)
    ck = load_checkpoint(path)
    buffers = dict(ck.model.named_buffers())
    for key in ("H_init", "L_init"):
        stored = raw[COMPILED_PREFIX + key]
        assert stored.dtype == torch.bfloat16
        dtype_name = next(d for k, d in ck.stored_dtypes.items() if k.split(".")[-1] == key)
        assert dtype_name == "bfloat16"
        loaded = next(b for k, b in buffers.items() if k.split(".")[-1] == key)
        assert loaded.dtype == torch.float32
        assert torch.equal(loaded, stored.to(torch.float32)), key
        # the bf16 grid is coarse: a re-randomised or float32-rounded init would not land on it exactly
        assert (loaded.view(torch.int32) & 0xFFFF).eq(0).all()
    assert not torch.equal(raw[COMPILED_PREFIX + "H_init"], raw[COMPILED_PREFIX + "L_init"])


# ---------------------------------------------------------------- self-checks of the numpy implementation


def test_numpy_primitives_behave_as_the_spec_says():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 8)) * 7
    np.testing.assert_allclose(np.sqrt(np.mean(rms(x, 0.0) ** 2, axis=-1)), 1.0, rtol=1e-12)
    cos, sin = rope_tables(6, 8, 10000.0)
    assert np.allclose(cos[0], 1.0) and np.allclose(sin[0], 0.0)  # position 0 is not rotated
    np.testing.assert_allclose(rotate_half(np.arange(4.0)), [-2.0, -3.0, 0.0, 1.0])
    # frequency i (and its twin i + hd/2) turns by pos / theta^(2i/hd)
    np.testing.assert_allclose(np.arccos(cos[1, :4]), 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8), rtol=1e-9)
    np.testing.assert_array_equal(cos[:, :4], cos[:, 4:])
    # RoPE scores depend only on the offset between positions
    q, k = rng.normal(size=8), rng.normal(size=8)

    def rot(v, p):
        return v * cos[p] + rotate_half(v) * sin[p]

    assert np.isclose(rot(q, 3) @ rot(k, 1), rot(q, 5) @ rot(k, 3))
