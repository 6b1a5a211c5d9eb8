"""Train the shipped reference models on a 2-core CPU (a fixture maker, not a product feature).

    python scripts/train_reference.py sudoku --minutes 80 --threads 1
    python scripts/train_reference.py maze --minutes 80 --threads 1

Training follows the TRM recipe at small scale: ACT deep supervision (each batch slot carries its puzzle's
z_H / z_L from step to step, one optimizer step per ACT step, a slot is refilled when its puzzle halts), only
the last H cycle of a step takes gradients (the maze recipe: all cycles), the Q head learns to predict
whether the current answer is exactly right (binary cross-entropy, halt when q_halt > 0), exploration forces
a random minimum number of steps, and the saved weights are an EMA copy. Data: a pool from the task's train
split, freshly augmented for every batch. The maze recipe adds short paths to the pool and a curriculum
(answers grow once the current ones are solved, the training horizon with them), see RECIPES. The output is
what the official trainer writes: `step_N` (state dict with the compiled `_orig_mod.model.inner.` prefix),
`all_config.yaml` with the official field names, and `dataset.json`.

Resumable: `runs/<task>/train_state.pt` holds model, EMA, optimizer and carry; rerunning continues. The shipped
maze model took 175 minutes at the constant rate, then a resumed run with `--anneal 0.1`, stopped after 25 of
its 80 minutes (why: reference_models/maze_att/NOTES.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from trm_export.export.config import ModelConfig
from trm_export.export.model import RecursiveModel
from trm_export.tasks import get_task
from trm_export.tasks.base import TaskData

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "_orig_mod.model.inner."

# One recipe per reference model: architecture (official arch field names), task parameters, optimizer.
RECIPES = {
    "sudoku": {
        "task": {"name": "sudoku"},
        "arch": {"hidden_size": 96, "num_heads": 1, "expansion": 2.0, "L_layers": 2, "H_cycles": 2,
                 "L_cycles": 3, "pos_encodings": "none", "puzzle_emb_ndim": 96, "puzzle_emb_len": 1,
                 "mlp_t": True, "halt_max_steps": 16, "halt_exploration_prob": 0.1, "no_ACT_continue": True,
                 "forward_dtype": "float32"},
        "batch_size": 64, "lr": 1e-3, "weight_decay": 0.1, "warmup": 300, "ema": 0.995, "train_pool": 6000,
        "out": "sudoku_mlpt",
    },
    "maze": {
        "task": {"name": "maze", "size": 9},
        "arch": {"hidden_size": 64, "num_heads": 4, "expansion": 2.0, "L_layers": 2, "H_cycles": 2,
                 "L_cycles": 3, "pos_encodings": "rope", "puzzle_emb_ndim": 64, "puzzle_emb_len": 1,
                 "mlp_t": False, "halt_max_steps": 16, "halt_exploration_prob": 0.1, "no_ACT_continue": True,
                 "forward_dtype": "float32"},
        "batch_size": 64, "lr": 1e-3, "weight_decay": 0.1, "warmup": 300, "ema": 0.995, "train_pool": 6000,
        # Half the pool are short paths (2-8 moves), where the curriculum below starts: the 9+ move mazes of
        # the task's splits alone left the model on the "copy the maze" plateau.
        "short_pool": {"size": 6000, "min_path": 2, "max_path": 8},
        # Curriculum on the answer's size (cells the answer changes: path cells here). Draws only puzzles
        # with at most `cap` changed cells; `cap` grows by `step` once the puzzles released in the last
        # `window` iterations were solved at a rate >= `advance_at`. The ACT horizon grows with it
        # ([cap limit, training cap on steps per puzzle]). Why: mixed with long mazes, the short ones' signal
        # drowns in the long ones' path cells (the model sat at 5-8% solved for 24 minutes), and with a
        # 16-step horizon only 1 sample in 16 starts from H_init/L_init; trained on fresh 2-4 move mazes alone,
        # the same model solved them in 300 iterations.
        "curriculum": {"start": 3, "step": 2, "advance_at": 0.6, "window": 100,
                       "horizon": [[7, 2], [11, 4], [15, 8], [10_000, 16]]},
        # Gradients through every H cycle of a step, not only the last (TRM's default, "grad_cycles": 1): the
        # maze model must learn to carry S/G reachability across the grid, and with the 1-cycle gradient it
        # did not learn even 2-8 move mazes in 12 minutes; with full backprop through the step the model solved
        # 2-4 move mazes (trained on those alone) in 300 iterations. Costs about 1.5x per iteration.
        "grad_cycles": "all",
        "out": "maze_att",
    },
}
ARCH_NAME = "recursive_reasoning.trm@TinyRecursiveReasoningModel_ACTV1"


def model_config(recipe: dict, spec) -> ModelConfig:
    arch = {k: v for k, v in recipe["arch"].items() if k != "halt_exploration_prob"}
    return ModelConfig(family="trm", vocab_size=spec.vocab_size, seq_len=spec.seq_len,
                       num_puzzle_identifiers=spec.num_puzzle_identifiers, **arch)


class Pool:
    """Training puzzles: a fixed pool from the train split, augmented afresh on every draw."""

    def __init__(self, task, size: int, cache: Path, seed: int, short: dict | None = None):
        if cache.is_file():
            arrays = np.load(cache)
            self.data = TaskData(arrays["inputs"], arrays["labels"], np.zeros(len(arrays["inputs"]), np.int32))
        else:
            parts = [task.split("train", size=size)]
            if short:
                parts.append(task.split("train", **short))
            inputs = np.concatenate([p.inputs for p in parts])
            labels = np.concatenate([p.labels for p in parts])
            self.data = TaskData(inputs, labels, np.zeros(len(inputs), np.int32))
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, inputs=self.data.inputs, labels=self.data.labels)
        self.task = task
        self.rng = np.random.default_rng(seed)
        self.size = (self.data.inputs != self.data.labels).sum(1)  # cells the answer changes
        self.cap = int(self.size.max())

    def draw(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n puzzles whose answers change at most `cap` cells (all of them unless a curriculum set cap)."""
        allowed = np.flatnonzero(self.size <= self.cap)
        batch = self.task.augment(self.data.select(allowed[self.rng.integers(0, len(allowed), n)]), self.rng)
        return np.array(batch.inputs), np.array(batch.labels)  # writable copies for torch


def train_step(model, opt, carry, batch_fill, cfg: ModelConfig, explore: float, gen: torch.Generator,
               max_steps: int, grad_all_cycles: bool = False):
    """One ACT step of deep supervision for every slot; refills halted slots first."""
    inputs, labels, z_H, z_L, steps, halted = carry
    if halted.any():
        idx = halted.nonzero().flatten()
        new_in, new_lab = batch_fill(len(idx))
        inputs[idx], labels[idx] = torch.from_numpy(new_in).long(), torch.from_numpy(new_lab).long()
        z_H[idx], z_L[idx] = model.H_init, model.L_init
        steps[idx] = 0
    x = model.embed(inputs, torch.zeros(len(inputs), dtype=torch.long))
    with torch.set_grad_enabled(grad_all_cycles):
        for _ in range(cfg.H_cycles - 1):
            z_H, z_L = model.cycle(x, z_H, z_L)
    z_H, z_L = model.cycle(x, z_H, z_L)
    logits, q_halt, _ = model.heads(z_H)
    lm_loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), labels.reshape(-1))
    with torch.no_grad():
        correct = (logits.argmax(-1) == labels).all(-1)
    q_loss = F.binary_cross_entropy_with_logits(q_halt, correct.float())
    loss = lm_loss + 0.5 * q_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        steps = steps + 1
        halted = (steps >= max_steps) | (q_halt > 0)
        explore_mask = torch.rand(len(steps), generator=gen) < explore
        min_steps = torch.randint(2, max_steps + 1, (len(steps),), generator=gen) * explore_mask
        halted = halted & (steps >= min_steps)
    stats = {"lm_loss": lm_loss.item(), "q_loss": q_loss.item(), "acc": float(correct.float().mean()),
             "halted_steps": float(steps[halted].float().mean()) if halted.any() else float("nan"),
             "released": int(halted.sum()), "released_solved": int((halted & correct).sum())}
    return (inputs, labels, z_H.detach(), z_L.detach(), steps, halted), stats


@torch.inference_mode()
def evaluate(model, inputs: np.ndarray, labels: np.ndarray, steps: int = 16) -> tuple[list[float], float]:
    """Exact accuracy after each of `steps` fixed steps, and the accuracy on the cells the answer changes
    (Sudoku blanks, maze path cells) after the last step: the progress signal while exact is still 0."""
    x = model.embed(torch.from_numpy(inputs).long(), torch.zeros(len(inputs), dtype=torch.long))
    z_H, z_L = model.initial_state(len(inputs))
    lab = torch.from_numpy(labels).long()
    changed = torch.from_numpy(inputs != labels)
    accs = []
    for _ in range(steps):
        z_H, z_L, logits, _, _ = model.step(x, z_H, z_L)
        accs.append(float((logits.argmax(-1) == lab).all(-1).float().mean()))
    changed_acc = float((logits.argmax(-1) == lab)[changed].float().mean())
    return accs, changed_acc


def save_official(out: Path, ema_model: RecursiveModel, cfg: ModelConfig, recipe: dict, spec, step: int,
                  train_cfg: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {PREFIX + k: v.detach().clone() for k, v in ema_model.state_dict().items()}
    tmp = out / f".step_{step}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / f"step_{step}")
    for old in out.glob("step_*"):
        if old.name != f"step_{step}":
            old.unlink()
    # loss_type: the official TRM ACTLossHead calls its loss with valid_mask=, which only stablemax_cross_entropy
    # takes (its softmax_cross_entropy raises), and HRM's losses.py has the same name: the value the official code
    # runs. This trainer's token loss is plain softmax cross-entropy, recorded beside it in `trained_lm_loss`.
    arch = {"name": ARCH_NAME, "loss": {"name": "losses@ACTLossHead", "loss_type": "stablemax_cross_entropy"},
            **recipe["arch"], "H_layers": 0, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta}
    # Every field the official PretrainConfig requires (TRM: data_paths; HRM: data_path), true to this trainer:
    # epochs such that the official schedule's total steps (epochs x groups / batch) are the steps trained here,
    # AdamW's betas, lr_min_ratio the annealing floor (1.0: none), and the puzzle table (one row, a buffer)
    # never trained (puzzle_emb_lr 0).
    groups = recipe["train_pool"] + recipe.get("short_pool", {}).get("size", 0)
    floor = train_cfg.get("lr_anneal", {}).get("floor", 1.0)
    all_config = {"arch": arch, "data_paths": [f"data/{recipe['out']}"], "data_path": f"data/{recipe['out']}",
                  "global_batch_size": recipe["batch_size"],
                  "epochs": max(1, round(step * recipe["batch_size"] / groups)), "lr": recipe["lr"],
                  "lr_min_ratio": floor, "lr_warmup_steps": recipe["warmup"], "weight_decay": recipe["weight_decay"],
                  "beta1": 0.9, "beta2": 0.95, "puzzle_emb_lr": 0.0, "puzzle_emb_weight_decay": 0.0,
                  "ema": True, "ema_rate": recipe["ema"], "seed": 0,
                  "trained_lm_loss": "softmax cross-entropy (scripts/train_reference.py), not arch.loss.loss_type",
                  **train_cfg}
    (out / "all_config.yaml").write_text(yaml.safe_dump(all_config, sort_keys=False))
    # The training split: the pool's puzzles, one per group, augmented on the fly (not stored).
    puzzles = recipe["train_pool"] + recipe.get("short_pool", {}).get("size", 0)
    meta = spec.dataset_json(total_groups=puzzles, mean_puzzle_examples=1.0, total_puzzles=puzzles)
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(RECIPES))
    parser.add_argument("--minutes", type=float, default=80.0, help="wall-clock budget of this run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-every", type=float, default=300.0, help="seconds between evaluations/saves")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs")
    parser.add_argument("--out", type=Path, default=None, help="default: reference_models/<name>")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from a saved checkpoint folder (e.g. the shipped model) instead of random weights "
                             "when there is no train_state.pt to resume: weights and EMA from it, a fresh optimizer, "
                             "the curriculum cap it recorded")
    parser.add_argument("--anneal", type=float, default=None, metavar="FLOOR",
                        help="cosine-decay the learning rate over this run's --minutes, from the recipe's rate to "
                             "FLOOR times it (a final phase; the shipped maze model's last run used 0.1)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    recipe = RECIPES[args.task]
    task = get_task(**recipe["task"])
    spec = task.spec
    cfg = model_config(recipe, spec)
    run_dir = args.runs / args.task
    out = args.out or ROOT / "reference_models" / recipe["out"]
    torch.manual_seed(0)
    model = RecursiveModel(cfg)
    ema = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"],
                            betas=(0.9, 0.95))
    pool = Pool(task, recipe["train_pool"], run_dir / "train_pool.npz", seed=1, short=recipe.get("short_pool"))
    calib = task.split("calibration")
    eval_in, eval_lab = calib.inputs[:256], calib.labels[:256]
    b, s = recipe["batch_size"], spec.seq_len
    carry = (torch.zeros(b, s, dtype=torch.long), torch.zeros(b, s, dtype=torch.long),
             model.H_init.expand(b, cfg.total_seq_len, cfg.hidden_size).clone(),
             model.L_init.expand(b, cfg.total_seq_len, cfg.hidden_size).clone(),
             torch.zeros(b, dtype=torch.long), torch.ones(b, dtype=torch.bool))
    state_file = run_dir / "train_state.pt"
    it, trained_seconds, history = 0, 0.0, []
    saved_cap = None  # the curriculum's cap where a resumed or initialising run left it
    if state_file.is_file():
        st = torch.load(state_file, weights_only=False)  # our own file, written below
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        carry, it, trained_seconds, history = st["carry"], st["it"], st["seconds"], st["history"]
        pool.rng = np.random.default_rng(st["rng_seed"] + it)
        saved_cap = st.get("cap")
        print(f"resumed at iteration {it} ({trained_seconds / 60:.1f} min trained)", flush=True)
    elif args.init_from:
        from trm_export.export.checkpoint import load_checkpoint

        loaded = load_checkpoint(args.init_from)
        model.load_state_dict(loaded.model.state_dict())
        ema.load_state_dict(loaded.model.state_dict())
        saved = yaml.safe_load((loaded.path.parent / "all_config.yaml").read_text())
        it = int(loaded.path.name.removeprefix("step_"))
        trained_seconds = 60 * float(saved.get("train_minutes", 0.0))
        history_file = loaded.path.parent / "training_history.json"
        history = json.loads(history_file.read_text()) if history_file.is_file() else []
        saved_cap = saved.get("curriculum_cap")
        print(f"initialised from {loaded.path} (iteration {it}, fresh optimizer)", flush=True)
    gen = torch.Generator().manual_seed(1234 + it)
    curriculum = recipe.get("curriculum")
    full_cap = pool.cap
    if curriculum:
        pool.cap = curriculum["start"] if saved_cap is None else saved_cap
    released = []

    start = time.time()
    last_eval = start
    window: list[dict] = []
    while True:
        lr = recipe["lr"] * min(1.0, (it + 1) / recipe["warmup"])
        if args.anneal is not None:
            progress = min(1.0, (time.time() - start) / (args.minutes * 60))
            lr *= args.anneal + (1 - args.anneal) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        horizon = cfg.halt_max_steps
        if curriculum:
            horizon = next(h for limit, h in curriculum["horizon"] if pool.cap <= limit)
        carry, stats = train_step(model, opt, carry, pool.draw, cfg, recipe["arch"]["halt_exploration_prob"], gen,
                                  horizon, grad_all_cycles=recipe.get("grad_cycles") == "all")
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(p, 1 - recipe["ema"])
        it += 1
        window.append(stats)
        if curriculum and pool.cap < full_cap:
            released.append((stats["released"], stats["released_solved"]))
            if len(released) >= curriculum["window"]:
                total, solved = (sum(r[i] for r in released) for i in (0, 1))
                if total and solved / total >= curriculum["advance_at"]:
                    pool.cap = min(full_cap, pool.cap + curriculum["step"])
                    print(f"[{args.task}] it {it}: {solved}/{total} released puzzles solved -> answers of up to "
                          f"{pool.cap} cells", flush=True)
                released = []
        now = time.time()
        done = now - start >= args.minutes * 60
        if now - last_eval >= args.eval_every or done:
            accs, changed_acc = evaluate(ema, eval_in, eval_lab)
            elapsed = trained_seconds + now - start
            mean = {k: float(np.mean([w[k] for w in window if not math.isnan(w[k])] or [math.nan]))
                    for k in window[0]}
            history.append({"it": it, "minutes": elapsed / 60, "lr": lr, **mean, "exact_by_step": accs,
                            "changed_token_acc": changed_acc, "curriculum_cap": pool.cap})
            print(f"[{args.task}] it {it} {elapsed / 60:.1f} min lm {mean['lm_loss']:.3f} q {mean['q_loss']:.3f} "
                  f"train-acc {mean['acc']:.3f} halt@ {mean['halted_steps']:.1f} | calib exact "
                  f"1:{accs[0]:.3f} 2:{accs[1]:.3f} 4:{accs[3]:.3f} 8:{accs[7]:.3f} 16:{accs[15]:.3f} "
                  f"changed-cells {changed_acc:.3f} cap {pool.cap}", flush=True)
            window = []
            extra = {"train_minutes": round(elapsed / 60, 1)}
            if curriculum:
                extra["curriculum_cap"] = int(pool.cap)
            if args.anneal is not None:
                extra["lr_anneal"] = {"floor": args.anneal, "over_minutes": args.minutes,
                                      "from_minutes": round(trained_seconds / 60, 1)}
            save_official(out, ema, cfg, recipe, spec, it, extra)
            run_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                        "carry": carry, "it": it, "seconds": elapsed, "history": history, "rng_seed": 7,
                        "cap": pool.cap},
                       run_dir / "train_state.tmp")
            os.replace(run_dir / "train_state.tmp", state_file)
            (run_dir / "history.json").write_text(json.dumps(history, indent=1))
            (out / "training_history.json").write_text(json.dumps(history, indent=1))
            last_eval = now
        if done:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
