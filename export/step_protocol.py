"""The step protocol: what trm-export needs of a looped model, whoever wrote it.

A recursive model here is: an input embedding (token rows, an optional prefix of rows per puzzle identifier,
optional learned positions, a scale), an initial recurrent state (two tensors [batch, prefix + seq_len, hidden],
each a broadcast row), ONE refinement step from (inputs, state) to (state, logits, halting values), a halting rule
on those values, and the trained step limit. The exporter writes the step as the bundle's ONNX graph and the
embedding as its tables; parity, calibration, every target, the report and the runtime loop work on that alone, so
the bundle format does not depend on where the model came from.

A `StepModel` is a torch module with:

    config: StepModelConfig (or the official ModelConfig, which has every field below)
    embed(tokens [B, seq_len], puzzle_ids [B]) -> x [B, prefix + seq_len, hidden]
    initial_state(batch) -> (z_H, z_L), each [batch, prefix + seq_len, hidden]
    step(x, z_H, z_L) -> (z_H, z_L, logits [B, seq_len, vocab], q_halt [B], q_continue [B])
    exporting(onnxruntime_ops=False) -> a context manager: the form the graph is exported in (the same function)
    embedding_arrays() -> EmbeddingArrays: the tables the runtime applies before the first step

Implemented by the official TRM / HRM (export/model.py RecursiveModel), by the adapters in export/adapters/, and
by a user's own module (`--step-module MODULE:FUNCTION`, export/adapters/step_module.py; an example in
examples/looped_model/). `step_flops` may be left 0: the loader counts it (count_step_flops).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class EmbeddingArrays:
    """x = scale * (position_scale * ([prefix; tokens] + positions) if positions else [prefix; tokens]); the prefix
    rows of a puzzle are its puzzle_table row, zero-padded to prefix_len x hidden."""

    token_table: np.ndarray  # [vocab, hidden]
    scale: float
    H_init: np.ndarray  # [hidden]: z_H's row, broadcast over batch and positions
    L_init: np.ndarray  # [hidden]
    position_table: np.ndarray | None = None  # [prefix + seq_len, hidden]
    position_scale: float = 1.0
    puzzle_table: np.ndarray | None = None  # [num_puzzle_identifiers, puzzle_emb_ndim]


@dataclass(frozen=True)
class StepModelConfig:
    """What the exporter reads of a model that is not the official TRM / HRM (field names as ModelConfig's)."""

    family: str  # where the model comes from: "tiny-recursive-model", a user's own name
    vocab_size: int
    seq_len: int
    hidden_size: int
    halt_max_steps: int
    halting_rule: str  # runtime.manifest.HALTING_RULE: "q_halt>0", "q_halt>q_continue" or "q_halt>=T"
    step_flops: int  # per puzzle and step, counted from the shapes: sizes every stage's sample
    prefix_len: int = 0
    num_puzzle_identifiers: int = 1
    puzzle_emb_ndim: int = 0
    net_calls_per_step: int = 1
    description: dict[str, Any] | None = None  # the network's own description, recorded in the manifest
    # The official models' fields the exporter also reads, at what they mean for any other model.
    forward_dtype: str = "float32"
    pos_encodings: str = "none"
    mlp_t: bool = False

    @property
    def total_seq_len(self) -> int:
        return self.prefix_len + self.seq_len

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "description": dict(self.description or {})}


class StepModel(Protocol):
    """What the exporter calls (see the module docstring); a torch.nn.Module in practice."""

    config: StepModelConfig

    def embed(self, tokens: Any, puzzle_ids: Any) -> Any: ...
    def initial_state(self, batch: int) -> tuple[Any, Any]: ...
    def step(self, x: Any, z_H: Any, z_L: Any) -> tuple[Any, Any, Any, Any, Any]: ...
    def exporting(self, onnxruntime_ops: bool = False) -> Any: ...
    def embedding_arrays(self) -> EmbeddingArrays: ...


PROTOCOL_METHODS = ("embed", "initial_state", "step", "exporting", "embedding_arrays")


def count_step_flops(model: StepModel) -> int:
    """FLOPs of one step of one puzzle, counted by torch's FlopCounterMode on the shapes (a multiply-add is two):
    the work that sizes every stage's sample, the same on any machine."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, model.config.total_seq_len, model.config.hidden_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.step(x, x.clone(), x.clone())
    return max(int(counter.get_total_flops()), 1)
