"""A looped model of your own, deployed with trm-export: the step protocol (export/step_protocol.py) in one file.

The model: token and position embeddings, two recurrent states (z_H, z_L), and one step that refines z_L a few
times from (x, z_H) and then z_H from z_L, all through one small transformer, then reads the answer (a linear head
on z_H) and a halting logit (q_halt > 0: halt). The loop stays outside the model, as trm-export deploys it.

Train it on Sudoku (a few minutes on a CPU; the task generator ships with trm-export), then export it like any model:

    cd examples/looped_model
    python looped_sudoku.py --steps 2000 -o looped-sudoku.pt
    trm-export looped-sudoku.pt --step-module looped_sudoku:make_step --target cpu -o looped.bundle
    trm-export verify looped.bundle
    trm-export run looped.bundle --input ../sudoku.txt

`make_step` is what `--step-module` calls: it builds the model and reads the state_dict (weights_only: a checkpoint
never runs code). The training is TRM's deep supervision: each batch runs `supervision` steps, the state carried
from one to the next without gradient, each step's answer and halting logit trained (the halting logit learns
whether the answer is already right).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trm_export.export.step_protocol import EmbeddingArrays, StepModelConfig

SETTINGS = {"dim": 64, "heads": 4, "layers": 2, "latent_updates": 3, "max_steps": 8}


class Block(nn.Module):
    """Pre-norm self-attention and MLP, attention written out (every op exports to plain ONNX)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, n, d = h.shape
        qkv = self.qkv(self.norm1(h)).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attention = torch.softmax(q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5, dim=-1)
        h = h + self.out((attention @ v).transpose(1, 2).reshape(b, n, d))
        return h + self.mlp(self.norm2(h))


class LoopedSudoku(nn.Module):
    """The StepModel: `config`, embed, initial_state, step, exporting, embedding_arrays."""

    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2, latent_updates: int = 3, max_steps: int = 8,
                 vocab: int = 11, seq_len: int = 81):
        super().__init__()
        self.latent_updates = latent_updates
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Parameter(torch.randn(seq_len, dim) * 0.02)
        self.z_H_init = nn.Parameter(torch.randn(dim) * 0.02)
        self.z_L_init = nn.Parameter(torch.randn(dim) * 0.02)
        # The blocks, then a norm: the states stay bounded however many steps run.
        self.net = nn.Sequential(*(Block(dim, heads) for _ in range(layers)), nn.LayerNorm(dim))
        self.answer, self.halt = nn.Linear(dim, vocab), nn.Linear(dim, 1)
        self.config = StepModelConfig(
            family="looped-sudoku", vocab_size=vocab, seq_len=seq_len, hidden_size=dim, halt_max_steps=max_steps,
            halting_rule="q_halt>0", step_flops=0,  # 0: trm-export counts it from the shapes
            net_calls_per_step=latent_updates + 1,
            description={"dim": dim, "heads": heads, "layers": layers, "latent_updates": latent_updates})

    def embed(self, tokens: torch.Tensor, puzzle_ids: torch.Tensor) -> torch.Tensor:
        return self.tokens(tokens.long()) + self.positions

    def initial_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (batch, self.config.seq_len, self.config.hidden_size)
        return self.z_H_init.expand(shape).clone(), self.z_L_init.expand(shape).clone()

    def step(self, x: torch.Tensor, z_H: torch.Tensor, z_L: torch.Tensor):
        for _ in range(self.latent_updates):
            z_L = self.net(z_L + z_H + x)
        z_H = self.net(z_H + z_L)
        q_halt = self.halt(z_H.mean(dim=1)).squeeze(-1)
        return z_H, z_L, self.answer(z_H), q_halt, torch.zeros_like(q_halt)

    @contextlib.contextmanager
    def exporting(self, onnxruntime_ops: bool = False) -> Iterator[LoopedSudoku]:
        yield self  # exported as it computes

    def embedding_arrays(self) -> EmbeddingArrays:
        def array(t: torch.Tensor):
            return t.detach().float().numpy()

        return EmbeddingArrays(token_table=array(self.tokens.weight), scale=1.0, H_init=array(self.z_H_init),
                               L_init=array(self.z_L_init), position_table=array(self.positions))


def make_step(path: Path) -> LoopedSudoku:
    """What `--step-module looped_sudoku:make_step` calls: the model with the weights saved at `path`."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = LoopedSudoku(**saved["settings"])
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def train(out: Path, steps: int, batch: int = 64, supervision: int = 4, lr: float = 1e-3, seed: int = 0,
          settings: dict | None = None, log=print) -> LoopedSudoku:
    """`steps` optimizer steps of deep supervision on generated Sudoku puzzles; saved to `out`."""
    from trm_export.tasks import get_task

    torch.manual_seed(seed)
    settings = {**SETTINGS, **(settings or {})}
    model = LoopedSudoku(**settings)
    data = get_task("sudoku").split("train", size=max(batch, steps * batch // supervision), min_blanks=5,
                                    max_blanks=40)
    inputs, labels = torch.from_numpy(data.inputs.copy()).long(), torch.from_numpy(data.labels.copy()).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    start, done, b = time.monotonic(), 0, 0
    while done < steps:
        rows = torch.arange(b * batch, (b + 1) * batch) % len(inputs)
        b += 1
        y = labels[rows]
        z_H, z_L = model.initial_state(batch)
        for _ in range(supervision):  # the state carries over, the gradient does not
            x = model.embed(inputs[rows], rows)
            z_H, z_L, logits, q_halt, _ = model.step(x, z_H.detach(), z_L.detach())
            right = (logits.argmax(-1) == y).all(dim=1).float()
            loss = F.cross_entropy(logits.transpose(1, 2), y) + F.binary_cross_entropy_with_logits(q_halt, right)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done % 100 == 0 or done == steps:
                log(f"step {done}/{steps}: loss {loss.item():.3f}, solved {right.mean().item():.0%} "
                    f"({time.monotonic() - start:.0f} s)")
            if done == steps:
                break
    torch.save({"settings": settings, "state_dict": model.state_dict()}, out)
    return model.eval()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Train the looped Sudoku model and save it for trm-export.")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps (default: 2000)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("-o", "--output", type=Path, default=Path("looped-sudoku.pt"))
    args = parser.parse_args()
    train(args.output, args.steps, args.batch)
    print(f"saved {args.output}; next: trm-export {args.output} --step-module looped_sudoku:make_step "
          "--target cpu -o looped.bundle")
