"""The bfloat16 reference (export/bfloat16.py) against the official code's own bfloat16 runs.

tests/data/official_bf16/<variant>/ holds a small official-format checkpoint and what the official TRM / HRM model
classes computed with it in bfloat16 and in float32 (recorded by scripts/record_official_bf16.py; commits and CPU
in provenance.json). No network and no official code at test time.

Why the bars are shaped as they are. Every bfloat16 op rounds; the float32 reference differs from the official
bfloat16 run by that rounding noise everywhere (about half of all block outputs differ by more than one bfloat16
ulp). Our bfloat16 reference makes the same roundings, so on the recording CPU's kernels it is bit-exact. Another
CPU's kernels (SDPA's exp and reduction order, GEMM blocking) round a few elements differently; within one block
that stays small (measured with ATEN_CPU_CAPABILITY=default: <= 0.12 of the float32 reference's distance, <= 6% of
elements more than one ulp off), but the deep recursion decorrelates the roundings within one ACT step, after
which two bfloat16 runs on different kernels are as far apart as bfloat16 and float32 are. Hence:
- embeddings: bit-exact on any CPU (element-wise ops, each correctly rounded);
- one block, and the heads, from the official's own recorded inputs: close in bfloat16 ulps, and much closer
  than the float32 reference (a missed cast point costs about as much as float32 does);
- the whole loop: bit-exact predictions and Q values where this CPU reproduces the recorded blocks bit-exactly
  (the recording CPU's kernels); elsewhere statistical bars on the tokens that are not at a bfloat16 tie.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trm_export.export.accuracy import (
    accuracy_by_budget_and_dtype,
    format_table,
    trained_dtype_accuracy,
    training_compute_dtypes,
)
from trm_export.export.bfloat16 import Bfloat16Reference, block, kernel_probe
from trm_export.export.checkpoint import load_checkpoint
from trm_export.export.model import RecursiveModel
from trm_export.export.reference import run_reference
from trm_export.tasks import TaskData

pytestmark = pytest.mark.rounding  # every test here judges float32 or bfloat16 results

DATA = Path(__file__).parent / "data" / "official_bf16"
CASES = ("bf16-trm-att-rope", "bf16-trm-mlpt-learned", "bf16-hrm")


def _bf16(bits: np.ndarray) -> torch.Tensor:
    """A bfloat16 tensor from its recorded uint16 bit patterns."""
    return torch.from_numpy(bits.astype(np.uint16).view(np.int16)).view(torch.bfloat16)


def ulp_distance(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|x - ref| in bfloat16 ulps at ref's magnitude (floored at 1/16: the states are RMS-normed, values near 0
    carry no precision of their own)."""
    x, ref = x.float(), ref.float()
    ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1 / 16))))
    return (x - ref).abs() / ulp


@functools.cache
def _case(name: str) -> tuple[RecursiveModel, dict[str, np.ndarray]]:
    model = load_checkpoint(DATA / name).model.eval()
    with np.load(DATA / name / "official_run.npz") as f:
        return model, dict(f)


def _inputs(rec: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(rec["tokens"]).long(), torch.from_numpy(rec["puzzle_ids"]).long()


@functools.cache
def _block_distances(name: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Per recorded probe: ulp distances of ours-bf16 and ours-fp32 from the official bf16 block output."""
    model, rec = _case(name)
    out = []
    with torch.no_grad():
        for probe, h_in, h_out in zip(rec["probe_names"], _bf16(rec["bfloat16_block_in"]),
                                      _bf16(rec["bfloat16_block_out"]), strict=True):
            level = model.L_level if str(probe).startswith("L_level") else model.high_net
            ours = block(h_in, level.layers[0], model.rope)
            assert ours.dtype == torch.bfloat16
            ours32 = level.layers[0](h_in.float(), model.rope)
            out.append((str(probe), ulp_distance(ours, h_out), ulp_distance(ours32, h_out)))
    return out


@functools.cache
def _same_gemms_as_recording() -> bool:
    return json.loads((DATA / "provenance.json").read_text())["kernel_probe"] == kernel_probe()


def _same_kernels_as_recording(name: str) -> bool:
    """True where this machine runs the recording's kernels: the same torch build and ATen CPU capability, the
    same bfloat16 GEMM results (a probe product: oneDNN picks native AVX-512 BF16 instructions whatever ATen's
    capability says), and every recorded block computed bit-exactly. (The blocks alone are not enough: a kernel
    that rounds one element in 10^4 differently can pass them and still change a chaotic loop.)"""
    prov = json.loads((DATA / "provenance.json").read_text())
    return (prov["torch"] == torch.__version__
            and prov["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
            and _same_gemms_as_recording()
            and all(bool((d16 == 0).all()) for _, d16, _ in _block_distances(name)))


def _not_at_tie(logits: np.ndarray, ulps: float = 2.0) -> np.ndarray:
    """Tokens whose official bfloat16 top-2 logits are more than `ulps` bfloat16 ulps apart: there, a different
    rounding elsewhere cannot flip the argmax by itself."""
    top2 = np.sort(logits, axis=-1)[..., -2:]
    ulp = 2.0 ** -7 * np.exp2(np.floor(np.log2(np.maximum(np.abs(top2[..., 1]), 2.0 ** -10))))
    return (top2[..., 1] - top2[..., 0]) > ulps * ulp


def test_recording_provenance():
    prov = json.loads((DATA / "provenance.json").read_text())
    assert prov["trm_commit"].startswith("e7b6871") and prov["hrm_commit"].startswith("42410da")
    assert set(CASES) <= set(prov["variants"])


@pytest.mark.parametrize("name", CASES)
def test_embeddings_bit_exact(name):
    """Token rows, puzzle prefix, learned positions (x 0.707106781) and x sqrt(D), all in bfloat16 as official."""
    model, rec = _case(name)
    with torch.no_grad():
        x = Bfloat16Reference(model).embed(*_inputs(rec))
    assert x.dtype == torch.bfloat16
    assert torch.equal(x, _bf16(rec["bfloat16_embed"]))


@pytest.mark.parametrize("name", CASES)
def test_one_block_from_official_input(name):
    """First block of each level on the official carry (after steps 1 and 5): our bfloat16 output within a few
    ulps of the official, and far closer than the float32 reference (measured on the recording CPU: 0 ulps;
    other kernels: mean <= 0.12 x float32's; a float32 block is 1.9-2.2 ulps off on average)."""
    for probe, d16, d32 in _block_distances(name):
        assert d32.mean() > 1.0, f"{name} {probe}: the float32 block should be visibly off ({d32.mean():.2f})"
        assert d16.mean() <= 0.3 * d32.mean(), f"{name} {probe}: mean {d16.mean():.3f} vs fp32 {d32.mean():.3f}"
        assert (d16 > 1).float().mean() <= 0.10, f"{name} {probe}: {(d16 > 1).float().mean():.3f} > 1 ulp"


@pytest.mark.parametrize("name", CASES)
def test_heads_from_official_state(name):
    """lm_head and q_head on the official z_H of every step: bfloat16 logits (argmax on them), float32 Q values
    that are bfloat16 numbers (the official `.to(torch.float32)` after a bfloat16 q_head)."""
    model, rec = _case(name)
    net = Bfloat16Reference(model)
    with torch.no_grad():
        z_H = _bf16(rec["bfloat16_z_H"])  # [T, N, S, D]
        heads = [net.heads(z) for z in z_H]
        logits = torch.stack([h[0] for h in heads])
        q = torch.stack([torch.stack(h[1:], dim=-1) for h in heads])
        logits32 = torch.stack([model.heads(z.float())[0] for z in z_H])
    official = torch.from_numpy(rec["bfloat16_logits"])
    d16, d32 = ulp_distance(logits, official), ulp_distance(logits32, official)
    assert logits.dtype == torch.bfloat16
    assert (d16 <= 1).float().mean() >= 0.99 and d16.mean() <= 0.3 * d32.mean(), (d16.mean(), d32.mean())
    not_tie = _not_at_tie(rec["bfloat16_logits"])
    assert (logits.argmax(-1).numpy() == rec["bfloat16_preds"])[not_tie].all()
    assert torch.equal(q, q.bfloat16().float())
    for i, key in enumerate(("bfloat16_q_halt", "bfloat16_q_continue")):
        assert ulp_distance(q[..., i], torch.from_numpy(rec[key])).max() <= 1.0


@pytest.mark.parametrize("name", CASES)
def test_loop_predictions(name):
    """run_reference(compute_dtype="bfloat16") over all halt_max_steps steps from the tokens, against the
    official bfloat16 loop. On the recording CPU's kernels: identical predictions (ties included) and Q values at
    every step. Elsewhere: on tokens not at a bfloat16 tie, as close to the official bfloat16 run as the float32
    reference is at least, and exact at the first step."""
    model, rec = _case(name)
    steps = rec["bfloat16_preds"].shape[0]
    ours = run_reference(model, rec["tokens"], rec["puzzle_ids"], max_steps=steps, compute_dtype="bfloat16")
    ours32 = run_reference(model, rec["tokens"], rec["puzzle_ids"], max_steps=steps)
    official = rec["bfloat16_preds"]
    not_tie = _not_at_tie(rec["bfloat16_logits"])
    agree16 = (ours.step_predictions == official)[not_tie].mean()
    agree32 = (ours32.step_predictions == official)[not_tie].mean()
    if _same_kernels_as_recording(name):
        np.testing.assert_array_equal(ours.step_predictions, official)
        np.testing.assert_array_equal(ours.q_halt, rec["bfloat16_q_halt"])
        np.testing.assert_array_equal(ours.q_continue, rec["bfloat16_q_continue"])
        assert agree32 < 1.0, "the float32 reference should differ from the bfloat16 run somewhere"
    else:
        first = (ours.step_predictions[0] == official[0])[not_tie[0]].mean()
        assert first >= 0.98, first
        assert agree16 >= agree32 - 0.02, (agree16, agree32)


def test_unknown_compute_dtype_says_what_exists():
    model, rec = _case("bf16-trm-att-rope")
    with pytest.raises(ValueError, match="requested compute_dtype 'float16'; available: float32, bfloat16"):
        run_reference(model, rec["tokens"], rec["puzzle_ids"], compute_dtype="float16")


def test_accuracy_table_shows_bfloat16_beside_float32():
    """`evaluate`'s table: with labels = the official bfloat16 answers of the chaotic mlp_t model, the bfloat16
    column is the one that reproduces them (float32 drifts off within a few steps)."""
    model, rec = _case("bf16-trm-mlpt-learned")
    labels = rec["bfloat16_preds"][-1].astype(np.int32)
    data = TaskData(rec["tokens"], labels, rec["puzzle_ids"])
    assert training_compute_dtypes(model.config) == ("float32", "bfloat16")
    rows = accuracy_by_budget_and_dtype(model, data, budgets=(1, 8), adaptive=True)
    assert [(r.compute_dtype, r.mode, r.budget) for r in rows] == [
        (d, m, b) for d in ("float32", "bfloat16") for m, b in (("fixed", 1), ("fixed", 8), ("adaptive", 8))]
    by = {(r.compute_dtype, r.mode, r.budget): r for r in rows}
    assert by["bfloat16", "fixed", 8].token_accuracy > by["float32", "fixed", 8].token_accuracy + 0.2
    if _same_kernels_as_recording("bf16-trm-mlpt-learned"):
        assert by["bfloat16", "fixed", 8].exact_accuracy == 1.0
    table = format_table(rows).splitlines()
    assert table[0] == ("| loop | steps | exact accuracy (float32) | exact accuracy (bfloat16) | token accuracy "
                        "(float32) | token accuracy (bfloat16) | mean steps (float32) | mean steps (bfloat16) |")
    assert len(table) == 2 + 3 and table[3].startswith("| fixed | 8 | ")
    float32_only = format_table([r for r in rows if r.compute_dtype == "float32"])
    assert float32_only.startswith("| loop | steps | exact accuracy |")  # one dtype: the table as before


def test_the_accuracy_as_trained_is_sized_by_the_work_and_skipped_past_its_budget():
    """The export's bfloat16 accuracy runs on the puzzles the plan sizes from the model's FLOPs (on a CPU that
    emulates bfloat16 GEMMs one paper-size puzzle took 117 s): a small model gets its puzzles, a paper-size one
    none (said at export), whatever the clock; trained_dtype_accuracy measures every puzzle it is given."""
    from trm_export.planning.plan import plan_export

    model, rec = _case("bf16-trm-mlpt-learned")
    small = plan_export(model.config.step_flops, 16, 1000, 8, trained_dtype=True)
    assert small.trained_dtype_puzzles == 200  # its cap: the first 200
    paper = plan_export(25_632_486_400, 16, 1000, 8, trained_dtype=True)  # the paper-size Sudoku's step
    assert paper.trained_dtype_puzzles == 0
    assert plan_export(model.config.step_flops, 16, 1000, 8, trained_dtype=False).trained_dtype_puzzles == 0
    labels = np.zeros_like(rec["tokens"])
    measured = trained_dtype_accuracy(model, rec["tokens"], rec["puzzle_ids"], labels, "recorded", batch=2)
    assert measured["puzzles"] == len(rec["tokens"])
