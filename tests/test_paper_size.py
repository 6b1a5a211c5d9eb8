"""The paper-size fixtures (issue #17) have the official shapes and sizes; a small-row ARC one loads.

Fast: shapes are checked against our model built on the meta device (no memory), and the only file written is
the ARC-shaped checkpoint with a few rows. benchmarks/paper_size.py runs the big ones through the CLI.
"""

from __future__ import annotations

import pytest
import torch
from official_format import (
    COMPILED_PREFIX,
    PAPER_VARIANTS,
    paper_parameter_count,
    paper_state_dict,
    paper_variant,
    write_paper_checkpoint,
)

from trm_export.export.checkpoint import load_checkpoint
from trm_export.export.config import ModelConfig
from trm_export.export.model import RecursiveModel

# name -> (papers' parameter count, positions, prefix, net calls per step, block passes per 16-step puzzle)
EXPECTED = {
    "paper-trm-mlpt-sudoku": (5.0e6, 97, 16, 21, 672),
    "paper-trm-att-maze": (6.8e6, 916, 16, 15, 480),
    "paper-trm-att-arc": (6.8e6, 916, 16, 15, 480),
    "paper-hrm-sudoku": (27.3e6, 82, 1, 6, 384),
}


def _config(v) -> ModelConfig:
    fields = set(ModelConfig.__dataclass_fields__)
    values = {k: getattr(v, k) for k in ("family", "vocab_size", "seq_len", "num_puzzle_identifiers", "hidden_size",
                                         "num_heads", "expansion", "L_layers", "H_layers", "H_cycles", "L_cycles",
                                         "pos_encodings", "puzzle_emb_ndim", "puzzle_emb_len", "mlp_t",
                                         "halt_max_steps", "no_ACT_continue")}
    if v.family == "hrm":
        values["puzzle_emb_len"] = 0
    return ModelConfig.from_dict({k: x for k, x in values.items() if k in fields})


@pytest.mark.parametrize("name", sorted(PAPER_VARIANTS))
def test_paper_variant_shapes_and_sizes(name):
    v = paper_variant(name, arc_rows=7)
    params, positions, prefix, calls, passes = EXPECTED[name]
    assert v.hidden_size == 512 and v.num_heads == 8 and v.expansion == 4 and v.halt_max_steps == 16
    assert v.prefix_len == prefix and v.seq_len + v.prefix_len == positions
    sd = paper_state_dict(v)
    # Official storage: float32 weights and puzzle table, H_init / L_init in forward_dtype (bfloat16).
    assert sd["H_init"].dtype == sd["L_init"].dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for k, t in sd.items() if k not in ("H_init", "L_init"))
    assert sd["puzzle_emb.weights"].shape == (v.num_puzzle_identifiers, 512)
    # Every key and shape is what our model (built from the same config, on the meta device) expects.
    with torch.device("meta"):
        model = RecursiveModel(_config(v))
    expected = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    assert {k: tuple(t.shape) for k, t in sd.items()} == expected
    cfg = model.config
    assert cfg.net_calls_per_step == calls
    if v.family == "trm":  # one network of L_layers blocks per call
        assert calls * v.L_layers * 16 == passes
    else:  # HRM: H_cycles x (L_cycles x L_layers + H_layers) blocks per step
        assert v.H_cycles * (v.L_cycles * v.L_layers + v.H_layers) * 16 == passes
    # The papers' sizes (without the puzzle table: ~5M, ~7M, 27M).
    dense = sum(t.numel() for t in sd.values()) - v.num_puzzle_identifiers * v.puzzle_emb_ndim
    assert abs(dense - params) / params < 0.03, dense


def test_arc_rows_parameter():
    big = paper_variant("paper-trm-att-arc", arc_rows=500_000)
    assert big.num_puzzle_identifiers == 500_000
    assert paper_parameter_count(big) - paper_parameter_count(paper_variant("paper-trm-att-arc", 1)) == (
        499_999 * 512)
    assert paper_variant("paper-trm-att-maze", arc_rows=500_000).num_puzzle_identifiers == 1


def test_small_arc_fixture_loads(tmp_path):
    path = write_paper_checkpoint(tmp_path / "arc", "paper-trm-att-arc", arc_rows=33)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert all(k.startswith(COMPILED_PREFIX) for k in raw)
    ck = load_checkpoint(path)
    cfg = ck.config
    assert (cfg.family, cfg.vocab_size, cfg.seq_len, cfg.num_puzzle_identifiers) == ("trm", 12, 900, 33)
    assert (cfg.hidden_size, cfg.num_heads, cfg.H_cycles, cfg.L_cycles, cfg.L_layers, cfg.prefix_len) == (
        512, 8, 3, 4, 2, 16)
    assert cfg.pos_encodings == "rope" and not cfg.mlp_t
    assert ck.stored_dtypes["H_init"] == "bfloat16" and ck.stored_dtypes["puzzle_emb.weights"] == "float32"
    torch.testing.assert_close(ck.model.puzzle_emb.weights, raw[COMPILED_PREFIX + "puzzle_emb.weights"])


def test_large_tables_are_not_copied(tmp_path):
    """The loader takes the checkpoint's table (no second copy); float64 copies for rounding checks keep only the
    rows they use; the runtime memory-maps the bundle's table."""
    import numpy as np

    from trm_export.export.parity import float64_copy
    from trm_export.runtime.embedding import load_array

    path = write_paper_checkpoint(tmp_path / "arc", "paper-trm-att-arc", arc_rows=40)
    model = load_checkpoint(path).model
    table = model.puzzle_emb.weights
    assert float64_copy(model).puzzle_emb.weights.shape == (0, 512)
    kept = float64_copy(model, np.array([3, 39]))
    assert kept.puzzle_emb.weights.dtype == torch.float64
    torch.testing.assert_close(kept.puzzle_emb.weights, table[[3, 39]].double())
    assert model.puzzle_emb.weights is table and table.dtype == torch.float32  # the original is untouched
    # Puzzles embed through the kept rows exactly as through the whole table (ids remapped as _float64_trace does).
    ids = np.array([39, 3, 39])
    rows, local = np.unique(ids, return_inverse=True)
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, 12, size=(3, 900)))
    with torch.inference_mode():
        torch.testing.assert_close(float64_copy(model, rows).embed(tokens, torch.from_numpy(local.reshape(-1))),
                                   float64_copy(model, np.arange(40)).embed(tokens, torch.from_numpy(ids)))
    np.save(tmp_path / "t.npy", np.arange(12, dtype=np.float32).reshape(3, 4))
    mapped = load_array(tmp_path / "t.npy", (3, 4), kinds="f", mmap=True)
    assert isinstance(mapped, np.memmap) and mapped[2, 1] == 9


@pytest.mark.parametrize("name, parity, candidates, evaluation, batch", [
    ("paper-trm-mlpt-sudoku", 3, 2, 22, 2),
    ("paper-hrm-sudoku", 6, 5, 41, 4),
    ("paper-trm-att-maze", 1, 1, 2, 1),
    ("paper-trm-att-arc", 1, 1, 2, 1),
])
def test_paper_size_plans_cover_every_step_of_a_few_puzzles(name, parity, candidates, evaluation, batch):
    """What a paper-size export covers comes from the model's FLOPs, never the clock: every trained step of at
    least one puzzle for parity and the golden vectors (the floor), and samples the budgets cover (the closing note
    of #36 has the wall times this gives on a quiet 2-core machine)."""
    from trm_export.calibration.quantize import METHODS
    from trm_export.planning.plan import plan_export, plan_quantize

    cfg = _config(paper_variant(name))
    plan = plan_export(cfg.step_flops, 16, 1000, 8, trained_dtype=True)
    assert (plan.check_steps, plan.parity_puzzles, plan.golden_candidates) == (16, parity, candidates)
    assert plan.trained_dtype_puzzles == 0  # bfloat16 at 10x float32's cost: past its budget at this size
    plan = plan_quantize(plan, 1000, 256, METHODS, 512, 64)
    assert (plan.eval_puzzles, plan.methods, plan.timing_batch) == (evaluation, ("minmax",), batch)
    assert plan.calib_puzzles >= 1 and plan.screen_puzzles == max(1, evaluation // 5)
