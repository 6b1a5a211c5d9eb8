"""The PyTorch reference is exact: it agrees with an independent numpy float64 implementation of the equations.

The numpy side (tests/numpy_reference.py) is written from shared/reference/checkpoints.md alone and reads the
official-format checkpoint file itself, so a wrong equation, a mis-mapped weight or a lossy load in
`trm_export` shows up here as a mismatch.

Two comparisons per variant, every step, both judged against float64 so that the bars hold on any IEEE float32
machine (SIMD width and summation order change float32's last bits, never these bars):
- one-step ("teacher-forced"): numpy computes step t in float64 from the torch trace's float32 state after step
  t - 1 (step 1 from H_init / L_init). This is the exactness bar: max |torch - numpy| <= 1e-5 on z_H, z_L,
  logits, q_halt, q_continue at EVERY step, identical argmax, identical adaptive halting steps and answers.
- free-running: numpy runs its own float64 recursion. The recursion amplifies rounding (x2-x5 per step for the
  random mlp_t weights), so a float32 implementation drifts from float64 by more than 1e-5 after a few steps
  however exact its math. The bar there is what torch's own one-step rounding can become: each step's measured
  one-step error is injected into the float64 run after that step, carried through the remaining steps in
  float64, and the carried errors are summed (x10 slack). Decisions (argmax, halting) must agree wherever the
  float64 margin is wider than that bar, so that rounding cannot flip them.
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

pytestmark = pytest.mark.rounding  # every test here judges float32 or bfloat16 results

ATOL = 1e-5
CARRY_SLACK = 10.0  # free-running error may be at most this many times the float64-carried one-step rounding
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


def carried_rounding(ref: NumpyRecursiveModel, free, tokens, puzzle_ids, one_step: dict[str, np.ndarray],
                     steps: int) -> dict[str, np.ndarray]:
    """Per field and step: the one-step errors of every step so far, each carried to this step in float64.

    The state error measured one-step at step s (torch against float64 from torch's own state) is put on the
    float64 free-running state after step s as a +-e pattern (seeded, so the same on every machine), the
    remaining steps run in float64, and the distance they end up from the free run is what that step's rounding
    became. Summing over s bounds the float32 drift by the triangle inequality, to first order.
    """
    out = {f: np.array(one_step[f], dtype=np.float64) for f in FIELDS}
    rng = np.random.default_rng(1234)
    for s in range(1, steps):  # error after step s (1-based), carried through steps s+1..T
        e = max(one_step["z_H"][s - 1], one_step["z_L"][s - 1])
        if e == 0.0:
            continue
        start = tuple(np.asarray(z[s - 1], np.float64) + e * rng.choice([-1.0, 1.0], size=z[s - 1].shape)
                      for z in (free.z_H, free.z_L))
        carried = ref.run(tokens, puzzle_ids, mode="fixed", max_steps=steps - s, start=start)
        for f in FIELDS:
            out[f][s:] += _per_step(getattr(carried, f), getattr(free, f)[s:], steps - s)
    return out


def _same_decisions_beyond(torch_tr, free, bar: dict[str, np.ndarray], halting_rule: str, min_steps: int) -> None:
    """Argmax and halting agree with float64 wherever float64's margin is wider than the rounding bar."""
    got = np.asarray(torch_tr.step_predictions)
    top2 = np.sort(free.logits, axis=-1)[..., -2:]
    wide = (top2[..., 1] - top2[..., 0]) > 2.0 * bar["logits"][:, None, None]  # [T, N, seq_len]
    assert np.array_equal(got[wide], free.step_predictions[wide]), "argmax differs where rounding cannot flip it"
    if halting_rule == "q_halt>0":
        margin, q_bar = free.q_halt, bar["q_halt"]
    else:
        margin, q_bar = free.q_halt - free.q_continue, bar["q_halt"] + bar["q_continue"]
    wide_halt = np.abs(margin) > q_bar[:, None]  # [T, N]
    used, want = np.asarray(torch_tr.steps_used), free.steps_used
    for n in range(len(want)):
        # the halting step is decided by the steps up to the earlier of the two; rounding decides it if any of
        # those margins is narrow
        last = min(int(used[n]), int(want[n]))
        if wide_halt[min_steps - 1:last, n].all():
            assert used[n] == want[n], f"puzzle {n}: halts at {used[n]}, float64 at {want[n]} (wide margins)"
            t = used[n] - 1
            if wide[t, n].all():
                assert np.array_equal(np.asarray(torch_tr.predictions)[n], free.predictions[n])


def check_against_numpy(torch_tr, ref: NumpyRecursiveModel, tokens, puzzle_ids, *, mode: str,
                        max_steps: int | None = None, min_steps: int = 1) -> dict[str, dict[str, float]]:
    """Assert both bars (module docstring) and return {"one_step"|"free"|"carried": {field: max error}}."""
    steps = int(max_steps or ref.halt_max_steps)
    kw = dict(mode=mode, max_steps=steps, min_steps=min_steps)
    one = ref.run(tokens, puzzle_ids, given_states=(torch_tr.z_H, torch_tr.z_L), **kw)
    free = ref.run(tokens, puzzle_ids, **kw)
    one_step = {}
    for field in FIELDS:
        got = getattr(torch_tr, field)
        err1 = _per_step(got, getattr(one, field), steps)
        bad = np.nonzero(err1 > ATOL)[0]
        assert bad.size == 0, (f"{field}: one-step max |torch - numpy| per step {err1.tolist()} exceeds {ATOL} "
                               f"first at step {int(bad[0]) + 1} (max |value| {np.abs(got).max():.3g})")
        one_step[field] = err1
    _same_decisions(torch_tr, one)
    carried = carried_rounding(ref, free, tokens, puzzle_ids, one_step, steps)
    bar = {f: np.maximum(ATOL, CARRY_SLACK * carried[f]) for f in FIELDS}
    out: dict[str, dict[str, float]] = {"one_step": {}, "free": {}, "carried": {}}
    for field in FIELDS:
        err_free = _per_step(getattr(torch_tr, field), getattr(free, field), steps)
        assert (err_free <= bar[field]).all(), (f"{field}: free-running error per step {err_free.tolist()} beyond "
                                                f"{CARRY_SLACK} x carried one-step rounding {carried[field].tolist()}")
        out["one_step"][field] = float(one_step[field].max())
        out["free"][field] = float(err_free.max())
        out["carried"][field] = float(carried[field].max())
    _same_decisions_beyond(torch_tr, free, bar, ref.halting_rule, min_steps)
    return out


def _fmt(errs: dict[str, float]) -> str:
    q = max(errs["q_halt"], errs["q_continue"])
    return f"z_H={errs['z_H']:.1e} z_L={errs['z_L']:.1e} logits={errs['logits']:.1e} q={q:.1e}"


def _numpy_model(path, v) -> NumpyRecursiveModel:
    _, state = load_official_state(path)
    return NumpyRecursiveModel(state, v)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_reference_matches_numpy_every_step(tmp_path, name):
    v = VARIANTS[name]
    path = write_official_checkpoint(tmp_path, name)
    ck = load_checkpoint(tmp_path)
    ref = _numpy_model(path, v)
    assert ck.config.prefix_len == v.prefix_len
    assert ck.config.halting_rule == ref.halting_rule
    tokens, puzzle_ids = _puzzles(v)
    steps = v.halt_max_steps

    fixed = run_reference(ck.model, tokens, puzzle_ids, mode="fixed", record_states=True)
    assert fixed.z_H.shape == (steps, NUM_PUZZLES, v.seq_len + v.prefix_len, v.hidden_size)
    # the recursion really moves: states differ between steps, so a stuck loop cannot pass
    assert np.abs(fixed.z_H[-1] - fixed.z_H[0]).max() > 1e-3
    errs = check_against_numpy(fixed, ref, tokens, puzzle_ids, mode="fixed")
    assert np.asarray(fixed.steps_used).tolist() == [steps] * NUM_PUZZLES

    adaptive = run_reference(ck.model, tokens, puzzle_ids, mode="adaptive", record_states=True)
    check_against_numpy(adaptive, ref, tokens, puzzle_ids, mode="adaptive")
    used = np.asarray(adaptive.steps_used).tolist()

    line = (f"one-step: {_fmt(errs['one_step'])} | free-running: {_fmt(errs['free'])} "
            f"(carried one-step rounding z_H={errs['carried']['z_H']:.1e}) | adaptive steps_used={used}")
    _SUMMARY[name] = line
    print(f"\n{name}: {line}")


@pytest.mark.parametrize("name", ["trm-att-rope", "trm-mlpt", "hrm"])
def test_more_steps_than_trained_and_min_steps(tmp_path, name):
    """max_steps beyond halt_max_steps (the HRM accuracy knob) and min_steps keep the same math and rule."""
    v = VARIANTS[name]
    path = write_official_checkpoint(tmp_path, name, seed=3)
    ck = load_checkpoint(path)
    ref = _numpy_model(path, v)
    tokens, puzzle_ids = _puzzles(v, seed=5)
    steps = v.halt_max_steps + 3
    tr = run_reference(ck.model, tokens, puzzle_ids, mode="adaptive", max_steps=steps, min_steps=2,
                       record_states=True)
    check_against_numpy(tr, ref, tokens, puzzle_ids, mode="adaptive", max_steps=steps, min_steps=2)
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
    ref = _numpy_model(path, v)  # numpy strips the prefix on its own
    check_against_numpy(got, ref, tokens, puzzle_ids, mode="adaptive")


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
