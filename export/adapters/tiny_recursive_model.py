"""lucidrains' tiny-recursive-model (`pip install tiny-recursive-model`) as a StepModel.

Its README trains `TinyRecursiveModel(dim, num_tokens, network=MLPMixer1D(dim, depth, seq_len))` and saves
`torch.save(trm.state_dict(), "saved-trm.pt")`. One of its `deep_refinement` calls (num_refinement_blocks times:
num_latent_refinements latent updates, then one output update, all through the one network) is one step here:
z_H is its `outputs`, z_L its `latents`, the inputs are the token rows after the register tokens (a prefix shared
by every puzzle: the bundle's puzzle table with one row). The logits are `to_pred` of the outputs without the
registers; q_halt is `to_halt_pred`'s logit and `predict`'s rule sigmoid(q_halt) >= halt_prob_thres becomes
q_halt >= logit(halt_prob_thres); the step limit is predict's max_deep_refinement_steps. q_continue is 0 (unused).

The network's description comes from a JSON file (`--arch-config`), since the state_dict does not carry it:

    {"dim": 64, "num_tokens": 11, "seq_len": 81, "network": "mlp-mixer", "depth": 2,
     "num_refinement_blocks": 3, "num_latent_refinements": 6, "num_register_tokens": 0,
     "halt_prob_thres": 0.5, "max_deep_refinement_steps": 12}

or, for x-transformers' Encoder, "network": "x-transformers-encoder" with "heads" and "attn_dim_head" (its
constructor's arguments; the mixer's expansion factors are then unused).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trm_export.errors import TrmExportError
from trm_export.export.step_protocol import EmbeddingArrays, StepModelConfig, count_step_flops

# The two networks its README builds: MLPMixer1D(dim, depth, seq_len), or x-transformers'
# Encoder(dim, depth, heads, attn_dim_head) (attention over the register and token rows, no positions of its own).
NETWORKS = ("mlp-mixer", "x-transformers-encoder")


class AdapterError(TrmExportError):
    """The checkpoint or its description does not make a tiny-recursive-model."""


@dataclass(frozen=True)
class TinyRecursiveConfig:
    """The constructor arguments of TinyRecursiveModel and its network, and predict's two settings."""

    dim: int
    num_tokens: int
    seq_len: int  # of the puzzle, without register tokens
    network: str = "mlp-mixer"  # or "x-transformers-encoder" (see NETWORKS)
    depth: int = 2
    expansion_factor: float = 4.0  # mlp-mixer
    expansion_factor_token: float = 0.5  # mlp-mixer
    heads: int = 8  # x-transformers-encoder
    attn_dim_head: int = 64  # x-transformers-encoder
    num_refinement_blocks: int = 3
    num_latent_refinements: int = 6
    num_register_tokens: int = 0
    halt_prob_thres: float = 0.5
    max_deep_refinement_steps: int = 12

    @classmethod
    def read(cls, path: str | Path) -> TinyRecursiveConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise AdapterError(f"{path}: not a readable JSON file ({exc})") from None
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if not isinstance(raw, dict):
            raise AdapterError(f"{path}: expected a JSON object of {', '.join(fields)}")
        unknown = sorted(set(raw) - set(fields))
        missing = sorted(n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in raw)
        if unknown or missing:
            raise AdapterError(f"{path}: {'unknown field(s) ' + str(unknown) if unknown else ''}"
                               f"{'; ' if unknown and missing else ''}"
                               f"{'missing field(s) ' + str(missing) if missing else ''}; fields: {', '.join(fields)}")
        for name, value in raw.items():
            kind = float if isinstance(fields[name].default, float) else str if name == "network" else int
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
                  else isinstance(value, kind) and not isinstance(value, bool))
            if not ok:
                raise AdapterError(f"{path}: field {name} must be {kind.__name__}, got {value!r}")
        config = cls(**raw)
        config.check(path)
        return config

    def check(self, where: object = "tiny-recursive-model config") -> None:
        if self.network not in NETWORKS:
            raise AdapterError(f"{where}: network {self.network!r} is not one this adapter builds ({NETWORKS})")
        for name in ("dim", "num_tokens", "seq_len", "depth", "num_latent_refinements", "max_deep_refinement_steps",
                     "heads", "attn_dim_head"):
            if not 1 <= getattr(self, name) <= 1 << 20:
                raise AdapterError(f"{where}: {name} must be 1..{1 << 20}, got {getattr(self, name)}")
        if self.num_refinement_blocks < 2:  # TinyRecursiveModel asserts it
            raise AdapterError(f"{where}: num_refinement_blocks must be at least 2, got {self.num_refinement_blocks}")
        if not 0 <= self.num_register_tokens <= 1024:
            raise AdapterError(f"{where}: num_register_tokens must be 0..1024, got {self.num_register_tokens}")
        if not 0.0 < self.halt_prob_thres < 1.0:
            raise AdapterError(f"{where}: halt_prob_thres must be in (0, 1), got {self.halt_prob_thres}")

    @property
    def halt_logit(self) -> float:
        """logit(halt_prob_thres): sigmoid(q) >= P exactly when q >= log(P / (1 - P))."""
        return math.log(self.halt_prob_thres / (1.0 - self.halt_prob_thres))


def build(config: TinyRecursiveConfig) -> nn.Module:
    """The package's own TinyRecursiveModel with the described network (the package must be installed)."""
    try:
        from tiny_recursive_model import MLPMixer1D, TinyRecursiveModel
    except ImportError as exc:
        raise AdapterError(f"--arch tiny-recursive-model needs the package: pip install tiny-recursive-model ({exc})"
                           ) from None
    if config.network == "x-transformers-encoder":
        from x_transformers import Encoder  # a dependency of tiny-recursive-model

        network = Encoder(dim=config.dim, depth=config.depth, heads=config.heads, attn_dim_head=config.attn_dim_head)
    else:
        network = MLPMixer1D(dim=config.dim, depth=config.depth, seq_len=config.num_register_tokens + config.seq_len,
                             expansion_factor=config.expansion_factor,
                             expansion_factor_token=config.expansion_factor_token)
    return TinyRecursiveModel(dim=config.dim, num_tokens=config.num_tokens, network=network,
                              num_refinement_blocks=config.num_refinement_blocks,
                              num_latent_refinements=config.num_latent_refinements,
                              num_register_tokens=config.num_register_tokens)


class TinyRecursiveStep(nn.Module):
    """A trained TinyRecursiveModel behind the step protocol (export/step_protocol.py); see the module docstring."""

    def __init__(self, trm: nn.Module, config: TinyRecursiveConfig):
        super().__init__()
        self.trm, self.arch = trm, config
        calls = config.num_refinement_blocks * (config.num_latent_refinements + 1)
        self.config = StepModelConfig(
            family="tiny-recursive-model", vocab_size=config.num_tokens, seq_len=config.seq_len,
            hidden_size=config.dim, halt_max_steps=config.max_deep_refinement_steps,
            halting_rule=f"q_halt>={config.halt_logit!r}", step_flops=0, prefix_len=config.num_register_tokens,
            puzzle_emb_ndim=config.num_register_tokens * config.dim, net_calls_per_step=calls,
            description=dataclasses.asdict(config))
        self.config = dataclasses.replace(self.config, step_flops=count_step_flops(self))

    def embed(self, tokens: torch.Tensor, puzzle_ids: torch.Tensor) -> torch.Tensor:
        return self.trm.embed_inputs_with_registers(tokens.long())[0]

    def initial_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (batch, self.config.total_seq_len, self.config.hidden_size)
        outputs, latents = self.trm.get_initial()
        return outputs.expand(shape).clone(), latents.expand(shape).clone()

    def step(self, x: torch.Tensor, z_H: torch.Tensor, z_L: torch.Tensor):
        outputs, latents = self.trm.deep_refinement(x, z_H, z_L)
        logits = self.trm.to_pred(outputs[:, self.config.prefix_len:])
        q_halt = self.trm.to_halt_pred(outputs)
        return outputs, latents, logits, q_halt, torch.zeros_like(q_halt)

    @contextlib.contextmanager
    def exporting(self, onnxruntime_ops: bool = False) -> Iterator[TinyRecursiveStep]:
        yield self  # exported as it computes

    def embedding_arrays(self) -> EmbeddingArrays:
        trm, d = self.trm, self.config.hidden_size
        registers = trm.register_tokens.detach().float().numpy()
        return EmbeddingArrays(
            token_table=trm.input_embed.weight.detach().float().numpy(), scale=1.0,
            H_init=trm.output_init_embed.detach().float().numpy(),
            L_init=trm.latent_init_embed.detach().float().numpy(),
            puzzle_table=registers.reshape(1, len(registers) * d) if len(registers) else None)


def load(path: str | Path, config: TinyRecursiveConfig) -> TinyRecursiveStep:
    """`torch.save(trm.state_dict(), path)` of a model described by `config`, read without unpickling code."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's own error types for damaged or foreign files
        raise AdapterError(f"{path}: not a readable state_dict ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(f"{path}: expected torch.save(trm.state_dict(), ...): a dict of tensors")
    trm = build(config)
    expected = trm.state_dict()
    missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unknown or wrong:
        detail = "; ".join(part for part in (
            f"missing {missing[:4]}" if missing else "", f"unexpected {unknown[:4]}" if unknown else "",
            "shapes differ at " + ", ".join(f"{k} {list(state[k].shape)} vs {list(expected[k].shape)}"
                                            for k in wrong[:3]) if wrong else "") if part)
        raise AdapterError(f"{path}: does not match the described network ({detail}): check --arch-config "
                           "(dim, num_tokens, seq_len, depth, num_register_tokens)")
    trm.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return TinyRecursiveStep(trm.float().eval(), config).eval()

