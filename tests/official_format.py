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
