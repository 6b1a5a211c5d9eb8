"""Refit a trained reference model's Q head (halting head) with the backbone frozen.

    python scripts/tune_q_head.py reference_models/sudoku_mlpt sudoku --pool runs/sudoku/train_pool.npz

Why: during training the Q head chases a moving target (the backbone's answers keep improving) and the saved
weights are an EMA of it, so the shipped head halts a few unsolved puzzles too early. This phase keeps the
official objective (binary cross-entropy: "is the current answer exactly right?") on the states the finished
model really visits (train puzzles, every one of the 16 steps) and weighs a wrong "halt" `w` times as much as a
missed one. `w` is the smallest of WEIGHTS whose adaptive loop loses at most --max-loss points against 16 fixed
steps on the calibration split; the held-out split is never looked at. Only q_head row 0 (q_halt) changes;
the file is rewritten in place (same `step_N` name and prefix) and all_config.yaml records the tuning.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from trm_export.export.checkpoint import CONFIG_NAME, find_checkpoint_file, load_checkpoint
from trm_export.export.model import RecursiveModel
from trm_export.tasks import get_task

WEIGHTS = (1.0, 2.0, 4.0, 8.0, 16.0)


@torch.no_grad()  # not inference_mode: the states are then fitted with autograd
def visited_states(model: RecursiveModel, inputs: np.ndarray, labels: np.ndarray, steps: int,
                   batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """z_H at the Q head's position [N, steps, D] and 'answer exactly right' [N, steps], at every step."""
    feats, correct = [], []
    for i in range(0, len(inputs), batch):
        tokens = torch.from_numpy(np.array(inputs[i:i + batch])).long()
        lab = torch.from_numpy(np.array(labels[i:i + batch])).long()
        x = model.embed(tokens, torch.zeros(len(tokens), dtype=torch.long))
        z_H, z_L = model.initial_state(len(tokens))
        f, c = [], []
        for _ in range(steps):
            z_H, z_L, logits, _, _ = model.step(x, z_H, z_L)
            f.append(z_H[:, 0].clone())
            c.append((logits.argmax(-1) == lab).all(-1))
        feats.append(torch.stack(f, 1))
        correct.append(torch.stack(c, 1))
    return torch.cat(feats), torch.cat(correct)


def adaptive_accuracy(q_halt: torch.Tensor, correct: torch.Tensor) -> tuple[float, float]:
    """Exact accuracy and mean steps when each puzzle stops at its first q_halt > 0 (or the last step)."""
    halt = q_halt > 0
    halt[:, -1] = True
    first = halt.float().argmax(1)
    acc = correct[torch.arange(len(correct)), first].float().mean()
    return float(acc), float(first.float().mean() + 1)


def fit_halt_row(feats: torch.Tensor, correct: torch.Tensor, wrong_halt_weight: float) -> torch.nn.Linear:
    """Weighted logistic regression of correctness on z_H[:, 0] (LBFGS; a convex problem)."""
    x = feats.reshape(-1, feats.shape[-1]).float()
    y = correct.reshape(-1).float()
    w = torch.where(y > 0, 1.0, wrong_halt_weight)
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(lin(x)[:, 0], y, reduction="none") * w).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("task", choices=["sudoku", "maze"])
    parser.add_argument("--maze-size", type=int, default=9)
    parser.add_argument("--pool", type=Path, default=None, help="train_pool.npz of the training run (default: "
                        "regenerate the train split)")
    parser.add_argument("--puzzles", type=int, default=3000, help="train puzzles whose states are fitted")
    parser.add_argument("--max-loss", type=float, default=0.5, help="points of exact accuracy on calibration")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    task = get_task("maze", size=args.maze_size) if args.task == "maze" else get_task("sudoku")
    loaded = load_checkpoint(args.model_dir)
    model, steps = loaded.model, loaded.config.halt_max_steps
    if args.pool:
        arrays = np.load(args.pool)
        train_in, train_lab = arrays["inputs"][:args.puzzles], arrays["labels"][:args.puzzles]
    else:
        train = task.split("train", size=args.puzzles)
        train_in, train_lab = train.inputs, train.labels
    calib = task.split("calibration")
    print(f"collecting states: {len(train_in)} train + {len(calib)} calibration puzzles x {steps} steps", flush=True)
    train_f, train_c = visited_states(model, train_in, train_lab, steps)
    cal_f, cal_c = visited_states(model, calib.inputs, calib.labels, steps)
    fixed = float(cal_c[:, -1].float().mean())
    with torch.no_grad():
        shipped = adaptive_accuracy(model.q_head(cal_f)[..., 0], cal_c)
    print(f"calibration: fixed-{steps} {fixed:.4f}; shipped head adaptive {shipped[0]:.4f} at {shipped[1]:.2f} steps")

    chosen = None
    for weight in WEIGHTS:
        lin = fit_halt_row(train_f, train_c, weight)
        with torch.no_grad():
            acc, mean_steps = adaptive_accuracy(lin(cal_f)[..., 0], cal_c)
        loss = 100 * (fixed - acc)
        print(f"  wrong-halt weight {weight:g}: adaptive {acc:.4f} at {mean_steps:.2f} steps (loses {loss:.2f} points)")
        if loss <= args.max_loss:
            chosen = (weight, lin, acc, mean_steps)
            break
    if chosen is None:
        print(f"no weight in {WEIGHTS} keeps the loss within {args.max_loss} points; checkpoint unchanged")
        return 1
    weight, lin, acc, mean_steps = chosen

    ckpt = find_checkpoint_file(args.model_dir)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    prefix = loaded.key_prefix
    w_key, b_key = prefix + "q_head.weight", prefix + "q_head.bias"
    w, b = state[w_key].clone(), state[b_key].clone()
    w[0] = lin.weight.detach()[0].to(w.dtype)
    b[0] = lin.bias.detach()[0].to(b.dtype)
    state[w_key], state[b_key] = w, b
    tmp = ckpt.with_name(f".{ckpt.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, ckpt)
    config_path = ckpt.parent / CONFIG_NAME
    config = yaml.safe_load(config_path.read_text())
    config["q_head_tuning"] = {"wrong_halt_weight": weight, "train_puzzles": len(train_in), "steps": steps,
                               "calibration_adaptive_exact": round(acc, 4),
                               "calibration_mean_steps": round(mean_steps, 2),
                               "calibration_fixed_exact": round(fixed, 4)}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"wrote {ckpt} (wrong-halt weight {weight:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
