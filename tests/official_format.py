"""Write checkpoints exactly as the official TRM / HRM training code saves them, for tests.

Independent of `trm_export.export.model` on purpose: the key names and shapes come from the table in
shared/reference/checkpoints.md, so a renamed parameter in our modules fails the loading tests instead of
being mirrored here. Weights are random but scaled like the official init, with a non-zero Q head so that
adaptive halting really varies between puzzles.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

COMPILED_PREFIX = "_orig_mod.model.inner."
TRM_ARCH_NAME = "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1"
HRM_ARCH_NAME = "hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1"


@dataclass(frozen=True)
class Variant:
    """One small model in the official config vocabulary."""

    name: str
    family: str = "trm"
    vocab_size: int = 11
    seq_len: int = 16
    num_puzzle_identifiers: int = 3
    hidden_size: int = 32
    num_heads: int = 4
    expansion: float = 2.0
    L_layers: int = 2
    H_layers: int = 0
    H_cycles: int = 2
    L_cycles: int = 2
    pos_encodings: str = "rope"
    puzzle_emb_ndim: int = 32
    puzzle_emb_len: int = 2
    mlp_t: bool = False
    halt_max_steps: int = 6
    no_ACT_continue: bool = True
    forward_dtype: str = "bfloat16"
    # Scale of the block weights. Random mlp_t blocks at gain 1 are chaotic (float32 rounding grows ~5x per
    # step, see test_reference_parity); tests that run a whole float32 loop twice use a contractive gain.
    gain: float = 1.0
    extra: dict = field(default_factory=dict)

    @property
    def prefix_len(self) -> int:
        if self.puzzle_emb_ndim == 0:
            return 0
        if self.family == "hrm" or self.puzzle_emb_len == 0:
            return -(self.puzzle_emb_ndim // -self.hidden_size)
        return self.puzzle_emb_len


VARIANTS = {
    v.name: v
    for v in (
        Variant("trm-att-rope"),
        Variant("trm-att-learned", pos_encodings="learned"),
        Variant("trm-att-none", pos_encodings="none"),
        Variant("trm-att-rope-nopuzzle", puzzle_emb_ndim=0, puzzle_emb_len=0),
        Variant("trm-att-rope-continue", no_ACT_continue=False),
        Variant("trm-att-rope-short-puzzle-emb", puzzle_emb_ndim=40, puzzle_emb_len=0),  # ceil(40/32)=2, padded
        Variant("trm-mlpt", mlp_t=True, pos_encodings="none"),
        Variant("trm-mlpt-nopuzzle", mlp_t=True, pos_encodings="none", puzzle_emb_ndim=0, puzzle_emb_len=0),
        Variant("trm-mlpt-learned", mlp_t=True, pos_encodings="learned"),
        Variant("hrm", family="hrm", H_layers=2, puzzle_emb_ndim=32, puzzle_emb_len=0, no_ACT_continue=False),
        Variant("hrm-learned", family="hrm", H_layers=1, L_layers=1, pos_encodings="learned",
                puzzle_emb_ndim=48, puzzle_emb_len=0, no_ACT_continue=False),
        # hidden_size not a multiple of num_heads: the official Attention takes head_dim = hidden // heads and
        # sizes qkv_proj [3 * heads * head_dim, hidden], o_proj [hidden, heads * head_dim] (32 / 3: 10, 30).
        Variant("trm-att-rope-3heads", num_heads=3),
        # ... and an odd head_dim (64 / 3 = 21, 63 wide), which the official code runs without RoPE.
        Variant("hrm-learned-3heads", family="hrm", hidden_size=64, num_heads=3, H_layers=1, L_layers=1,
                pos_encodings="learned", puzzle_emb_ndim=64, puzzle_emb_len=0, no_ACT_continue=False),
    )
}


def _intermediate(width: int, expansion: float) -> int:
    return -(round(expansion * width * 2 / 3) // -256) * 256


def _trunc(gen: torch.Generator, *shape: int, std: float) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * std).clamp(-2 * std, 2 * std)


def official_state_dict(v: Variant, seed: int = 0) -> dict[str, torch.Tensor]:
    """Unprefixed state dict with the official names and shapes (checkpoints.md), official dtypes."""
    g = torch.Generator().manual_seed(seed)
    d = v.hidden_size
    total = v.seq_len + v.prefix_len
    sd: dict[str, torch.Tensor] = {}
    dtype = getattr(torch, v.forward_dtype)
    sd["H_init"] = _trunc(g, d, std=1.0).to(dtype)
    sd["L_init"] = _trunc(g, d, std=1.0).to(dtype)
    sd["embed_tokens.embedding_weight"] = _trunc(g, v.vocab_size, d, std=1 / math.sqrt(d))
    sd["lm_head.weight"] = _trunc(g, v.vocab_size, d, std=1 / math.sqrt(d))
    sd["q_head.weight"] = _trunc(g, 2, d, std=0.5 / math.sqrt(d))
    sd["q_head.bias"] = torch.tensor([0.0, 0.1])
    if v.puzzle_emb_ndim > 0:
        sd["puzzle_emb.weights"] = _trunc(g, v.num_puzzle_identifiers, v.puzzle_emb_ndim, std=0.3)
    if v.pos_encodings == "learned":
        sd["embed_pos.embedding_weight"] = _trunc(g, total, d, std=1 / math.sqrt(d))
    inter = _intermediate(d, v.expansion)
    levels = [("L_level", v.L_layers)] + ([("H_level", v.H_layers)] if v.family == "hrm" else [])
    for level, n in levels:
        for i in range(n):
            p = f"{level}.layers.{i}."
            gain = v.gain
            if v.mlp_t:
                inter_t = _intermediate(total, v.expansion)
                sd[p + "mlp_t.gate_up_proj.weight"] = _trunc(g, 2 * inter_t, total, std=gain / math.sqrt(total))
                sd[p + "mlp_t.down_proj.weight"] = _trunc(g, total, inter_t, std=gain / math.sqrt(inter_t))
            else:
                width = v.num_heads * (d // v.num_heads)  # heads x head_dim, as the official Attention sizes it
                sd[p + "self_attn.qkv_proj.weight"] = _trunc(g, 3 * width, d, std=gain / math.sqrt(d))
                sd[p + "self_attn.o_proj.weight"] = _trunc(g, d, width, std=gain / math.sqrt(width))
            sd[p + "mlp.gate_up_proj.weight"] = _trunc(g, 2 * inter, d, std=gain / math.sqrt(d))
            sd[p + "mlp.down_proj.weight"] = _trunc(g, d, inter, std=gain / math.sqrt(inter))
    return sd


def official_all_config(v: Variant) -> dict:
    """all_config.yaml as the official pretrain.py dumps it (training fields included, task shape not)."""
    arch = {
        "name": HRM_ARCH_NAME if v.family == "hrm" else TRM_ARCH_NAME,
        "loss": {"name": "losses@ACTLossHead", "loss_type": "stablemax_cross_entropy"},
        "halt_exploration_prob": 0.1,
        "halt_max_steps": v.halt_max_steps,
        "H_cycles": v.H_cycles,
        "L_cycles": v.L_cycles,
        "H_layers": v.H_layers,
        "L_layers": v.L_layers,
        "hidden_size": v.hidden_size,
        "num_heads": v.num_heads,
        "expansion": v.expansion,
        "puzzle_emb_ndim": v.puzzle_emb_ndim,
        "pos_encodings": v.pos_encodings,
        "forward_dtype": v.forward_dtype,
    }
    if v.family == "trm":
        arch.update(mlp_t=v.mlp_t, puzzle_emb_len=v.puzzle_emb_len, no_ACT_continue=v.no_ACT_continue)
    arch.update(v.extra)
    return {
        "arch": arch,
        "data_paths": ["data/test-task"],
        "global_batch_size": 768,
        "epochs": 50000,
        "lr": 1e-4,
        "lr_min_ratio": 1.0,
        "lr_warmup_steps": 2000,
        "weight_decay": 1.0,
        "beta1": 0.9,
        "beta2": 0.95,
        "puzzle_emb_lr": 1e-4,
        "puzzle_emb_weight_decay": 1.0,
        "project_name": "Test-ACT-torch",
        "run_name": v.name,
        "checkpoint_path": f"checkpoints/Test-ACT-torch/{v.name}",
        "seed": 0,
        "checkpoint_every_eval": True,
        "eval_interval": 5000,
        "eval_save_outputs": [],
        "ema": True,
        "ema_rate": 0.999,
        "freeze_weights": False,
    }


def official_dataset_json(v: Variant) -> dict:
    return {"pad_id": 0, "ignore_label_id": 0, "blank_identifier_id": 0, "vocab_size": v.vocab_size,
            "seq_len": v.seq_len, "num_puzzle_identifiers": v.num_puzzle_identifiers, "total_groups": 10,
            "mean_puzzle_examples": 1.0, "total_puzzles": 10, "sets": ["all"]}


def write_official_checkpoint(directory: Path, variant: str | Variant, *, prefix: str = COMPILED_PREFIX,
                              file_name: str = "step_1000", with_config: bool = True, with_dataset: bool = True,
                              seed: int = 0) -> Path:
    """Write `directory/file_name` (+ all_config.yaml, dataset.json) and return the checkpoint path."""
    v = VARIANTS[variant] if isinstance(variant, str) else variant
    directory.mkdir(parents=True, exist_ok=True)
    state = {prefix + k: t for k, t in official_state_dict(v, seed).items()}
    path = directory / file_name
    torch.save(state, path)
    if with_config:
        (directory / "all_config.yaml").write_text(yaml.safe_dump(official_all_config(v)))
    if with_dataset:
        (directory / "dataset.json").write_text(json.dumps(official_dataset_json(v)))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Paper-size variants (issue #17): the four models users bring, at the official shapes.
# Shapes: /tmp/official/config/arch/trm.yaml and hrm.yaml, the TRM README's training commands (Sudoku: mlp_t,
# pos_encodings none, L_layers 2, H_cycles 3, L_cycles 6; Maze / ARC: attention, rope, H 3, L 4), dataset encodings
# from shared/reference/checkpoints.md. Storage dtypes as the official trainer writes them: CastedLinear /
# CastedEmbedding parameters and the puzzle-embedding buffer float32, H_init / L_init in forward_dtype (bfloat16).
# The weights are random at a contractive gain (0.5), so the float32 loop is not chaotic at 16 steps; shapes,
# sizes and cost are the papers'. The ARC table (one row per augmented training puzzle) is written chunk by chunk,
# so a 500k x 512 table costs one float32 copy (plus torch.save's stream), never several.
# ---------------------------------------------------------------------------------------------------------------

PAPER_ARC_ROWS = 1_000  # the tests' default; the benchmark passes several hundred thousand (paper: ~1M)
_PAPER_COMMON = dict(hidden_size=512, num_heads=8, expansion=4.0, halt_max_steps=16, puzzle_emb_ndim=512,
                     gain=0.5)
PAPER_VARIANTS = {
    v.name: v
    for v in (
        # TRM-MLP, Sudoku-Extreme: 81 tokens + 16 prefix = 97 positions, ~5M parameters.
        Variant("paper-trm-mlpt-sudoku", vocab_size=11, seq_len=81, num_puzzle_identifiers=1, L_layers=2,
                H_cycles=3, L_cycles=6, pos_encodings="none", puzzle_emb_len=16, mlp_t=True, **_PAPER_COMMON),
        # TRM-Att, Maze-Hard 30x30: 900 + 16 = 916 positions, ~7M.
        Variant("paper-trm-att-maze", vocab_size=6, seq_len=900, num_puzzle_identifiers=1, L_layers=2,
                H_cycles=3, L_cycles=4, pos_encodings="rope", puzzle_emb_len=16, **_PAPER_COMMON),
        # TRM-Att, ARC-AGI: as the maze model with vocab 12 and a table of one row per augmented puzzle.
        Variant("paper-trm-att-arc", vocab_size=12, seq_len=900, num_puzzle_identifiers=PAPER_ARC_ROWS, L_layers=2,
                H_cycles=3, L_cycles=4, pos_encodings="rope", puzzle_emb_len=16, **_PAPER_COMMON),
        # HRM, Sudoku-Extreme: 27M; H_layers 4, L_layers 4, H 2, L 2; prefix ceil(512 / 512) = 1 (82 positions).
        Variant("paper-hrm-sudoku", family="hrm", vocab_size=11, seq_len=81, num_puzzle_identifiers=1, H_layers=4,
                L_layers=4, H_cycles=2, L_cycles=2, pos_encodings="rope", puzzle_emb_len=0, no_ACT_continue=False,
                **_PAPER_COMMON),
    )
}


def _replace(v: Variant, **changes) -> Variant:
    import dataclasses

    return dataclasses.replace(v, **changes)


def paper_variant(name: str, arc_rows: int | None = None) -> Variant:
    """A paper-size variant; `arc_rows` sets the puzzle-embedding row count of the ARC model."""
    v = PAPER_VARIANTS[name]
    if arc_rows is not None and "arc" in name:
        v = _replace(v, num_puzzle_identifiers=int(arc_rows))
    return v


def paper_state_dict(v: Variant, seed: int = 0, table_dtype: str = "float32",
                     chunk_rows: int = 65536) -> dict[str, torch.Tensor]:
    """`official_state_dict` for a paper-size variant, with the puzzle table filled in place, chunk by chunk."""
    sd = official_state_dict(_replace(v, num_puzzle_identifiers=1), seed)
    if v.puzzle_emb_ndim > 0:
        g = torch.Generator().manual_seed(seed + 1)
        table = torch.empty(v.num_puzzle_identifiers, v.puzzle_emb_ndim, dtype=getattr(torch, table_dtype))
        for start in range(0, v.num_puzzle_identifiers, chunk_rows):
            block = torch.randn(min(chunk_rows, v.num_puzzle_identifiers - start), v.puzzle_emb_ndim, generator=g)
            table[start:start + len(block)] = block.mul_(0.3).clamp_(-0.6, 0.6)
        sd["puzzle_emb.weights"] = table
    return sd


def paper_parameter_count(v: Variant) -> int:
    """Stored elements (parameters and persistent buffers) of a paper-size variant, from shapes only."""
    sd = official_state_dict(_replace(v, num_puzzle_identifiers=1))
    return sum(t.numel() for t in sd.values()) + (v.num_puzzle_identifiers - 1) * v.puzzle_emb_ndim


def write_paper_checkpoint(directory: Path, name: str, *, arc_rows: int | None = None, seed: int = 0,
                           table_dtype: str = "float32", prefix: str = COMPILED_PREFIX,
                           file_name: str = "step_50000") -> Path:
    """Write a paper-size checkpoint as the official trainer saves it (+ all_config.yaml, dataset.json)."""
    v = paper_variant(name, arc_rows)
    directory.mkdir(parents=True, exist_ok=True)
    sd = paper_state_dict(v, seed, table_dtype)
    state = {prefix + k: sd.pop(k) for k in list(sd)}  # same tensors, renamed: no copy
    path = directory / file_name
    torch.save(state, path)
    del state
    config = official_all_config(v)
    config["data_paths"] = [f"data/{name.split('-')[-1]}"]
    (directory / "all_config.yaml").write_text(yaml.safe_dump(config))
    dataset = official_dataset_json(v)
    dataset.update(total_groups=v.num_puzzle_identifiers, total_puzzles=v.num_puzzle_identifiers)
    (directory / "dataset.json").write_text(json.dumps(dataset))
    return path


# ---------------------------------------------------------------------------------------------------------------
# bfloat16 reference (issue #17 part 3): the small models whose official bfloat16 and float32 runs are recorded
# under tests/data/official_bf16/ by scripts/record_official_bf16.py (checked by tests/test_bfloat16_reference.py).
# Between them they cover every official cast point: RoPE attention (TRM), mlp_t with learned positions (the
# 0.707106781 scale), HRM's two networks with RoPE and a ceil-sized puzzle prefix.
# ---------------------------------------------------------------------------------------------------------------

BF16_VARIANTS = {
    v.name: v
    for v in (
        Variant("bf16-trm-att-rope", halt_max_steps=8),
        Variant("bf16-trm-mlpt-learned", mlp_t=True, pos_encodings="learned", L_layers=1, halt_max_steps=8),
        Variant("bf16-hrm", family="hrm", H_layers=1, L_layers=1, puzzle_emb_ndim=32, puzzle_emb_len=0,
                no_ACT_continue=False, halt_max_steps=8),
    )
}
