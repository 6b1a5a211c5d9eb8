"""Record the official TRM / HRM code's own runs of small checkpoints, in bfloat16 and in float32, for the tests.

For each variant of `tests/official_format.BF16_VARIANTS` this writes, under OUT/<variant>/:
  step_1000, all_config.yaml, dataset.json  the checkpoint, exactly as the official trainer saves it;
  official_run.npz                           the official model's eval-mode loop on fixed puzzles:
    tokens [N, seq_len], puzzle_ids [N];
    for dtype in bfloat16, float32 (the `forward_dtype` it was built with):
      {dtype}_logits [T, N, seq_len, vocab] float32 (bfloat16 values are exact in float32),
      {dtype}_preds [T, N, seq_len] (argmax of the official logits, in their dtype, as ACTLossHead takes it),
      {dtype}_q_halt, {dtype}_q_continue [T, N] float32;
    bfloat16 only, as uint16 bit patterns of the bfloat16 tensors:
      bfloat16_embed [N, S, D]    the input embeddings (`_input_embeddings`);
      bfloat16_z_H [T, N, S, D]   the carry's z_H after each step (what the heads read);
      bfloat16_block_in, bfloat16_block_out [P, N, S, D]  probes: the first block of a level run on the official
        carry after step t (L_level on z_L + (z_H + x); HRM also H_level on z_H + z_L), for the steps PROBE_STEPS;
      probe_names [P]: "<level>@<t>".
and OUT/provenance.json: the official repositories' commits, the torch version, CPU and ATen CPU capability
(kernel set) the run was recorded with.

The official code is not a dependency of trm-export; run this where its sources are checked out:
  .venv/bin/python scripts/record_official_bf16.py --trm /tmp/official --hrm /tmp/official_hrm \
      --deps /tmp/official_deps --out tests/data/official_bf16
(--deps: a folder with pydantic, einops, omegaconf, pyyaml for the official imports). HRM imports flash-attn,
whose kernels need CUDA: a stand-in with the same math and layout (SDPA on [B, heads, S, head_dim]) replaces it.
Each family runs in its own child process, since both repositories name their package `models`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from trm_export.export.bfloat16 import kernel_probe
from trm_export.report.measure import cpu_model

ROOT = Path(__file__).resolve().parents[1]
TRM_COMMIT = "e7b68717f0a6c4cbb4ce6fbef787b14f42083bd9"  # SamsungSAILMontreal/TinyRecursiveModels
HRM_COMMIT = "42410daaaf6ac8b266536d105a6e2362ffe40929"  # sapientinc/HRM
NUM_PUZZLES = 4
DTYPES = ("bfloat16", "float32")
PROBE_STEPS = (1, 5)  # 0-based steps whose carry feeds the single-block probes


def _official_commit(source: Path, expected: str) -> str:
    """The checkout's commit when it is a git work tree, else the commit these sources were copied from."""
    try:
        out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return expected


def _bits(t):
    """uint16 bit patterns of a bfloat16 tensor (numpy has no bfloat16)."""
    import numpy as np
    import torch

    assert t.dtype == torch.bfloat16, t.dtype
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def record_child(official: Path, deps: Path, case: Path) -> None:
    """In a fresh process: build the official model from the case's files and record both dtypes' loops."""
    sys.path[:0] = [str(official), str(deps)]
    import types

    import numpy as np
    import torch
    import torch.nn.functional as F
    import yaml

    if "hrm" in case.name:  # flash-attn stand-in: same math and [B, S, heads, head_dim] layout
        fa = types.ModuleType("flash_attn")

        def flash_attn_func(q, k, v, causal=False):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=causal)
            return o.transpose(1, 2)

        fa.flash_attn_func = flash_attn_func
        sys.modules["flash_attn"] = fa

    from utils.functions import load_model_class

    arch = dict(yaml.safe_load((case / "all_config.yaml").read_text())["arch"])
    dataset = json.loads((case / "dataset.json").read_text())
    name = arch.pop("name")
    arch.pop("loss")
    state = torch.load(case / "step_1000", weights_only=True)
    state = {k.removeprefix("_orig_mod.model."): v for k, v in state.items()}

    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(1, dataset["vocab_size"], (NUM_PUZZLES, dataset["seq_len"]), generator=g)
    puzzle_ids = torch.randint(0, dataset["num_puzzle_identifiers"], (NUM_PUZZLES,), generator=g)
    batch = {"inputs": tokens, "puzzle_identifiers": puzzle_ids}
    out: dict[str, np.ndarray] = {"tokens": tokens.numpy().astype(np.int32),
                                  "puzzle_ids": puzzle_ids.numpy().astype(np.int32)}
    for dtype in DTYPES:
        # As pretrain.create_model builds it: the arch fields plus batch size and the data set's task shape.
        model = load_model_class(name)({**arch, "batch_size": NUM_PUZZLES, "vocab_size": dataset["vocab_size"],
                                        "seq_len": dataset["seq_len"], "causal": False, "forward_dtype": dtype,
                                        "num_puzzle_identifiers": dataset["num_puzzle_identifiers"]})
        model.load_state_dict(state, strict=True)  # the loss head's `model.` prefix removed above
        model.eval()
        inner = model.inner
        cos_sin = inner.rotary_emb() if hasattr(inner, "rotary_emb") else None
        levels = [("L_level", inner.L_level)] + ([("H_level", inner.H_level)] if hasattr(inner, "H_level") else [])
        rec: dict[str, list] = {k: [] for k in ("logits", "preds", "q_halt", "q_continue", "z_H", "block_in",
                                                "block_out", "probe_names")}
        with torch.no_grad():
            x = inner._input_embeddings(batch["inputs"], batch["puzzle_identifiers"])
            carry = model.initial_carry(batch)
            for t in range(model.config.halt_max_steps):
                carry, outputs = model(carry=carry, batch=batch)
                logits = outputs["logits"]
                rec["logits"].append(logits.float().numpy())
                rec["preds"].append(torch.argmax(logits, dim=-1).numpy().astype(np.int8))  # as ACTLossHead
                rec["q_halt"].append(outputs["q_halt_logits"].float().numpy())
                rec["q_continue"].append(outputs["q_continue_logits"].float().numpy())
                z_H, z_L = carry.inner_carry.z_H, carry.inner_carry.z_L
                rec["z_H"].append(z_H.clone())
                if t in PROBE_STEPS:
                    for level, module in levels:
                        # The level's own input injection, then its first block alone.
                        h = z_L + (z_H + x) if level == "L_level" else z_H + z_L
                        rec["block_in"].append(h)
                        rec["block_out"].append(module.layers[0](cos_sin=cos_sin, hidden_states=h))
                        rec["probe_names"].append(f"{level}@{t}")
            assert bool(carry.halted.all()), "eval mode runs exactly halt_max_steps steps"
        for key in ("logits", "preds", "q_halt", "q_continue"):
            out[f"{dtype}_{key}"] = np.stack(rec[key])
        if dtype == "bfloat16":
            out["probe_names"] = np.array(rec["probe_names"])
            out["bfloat16_embed"] = _bits(x)
            for key in ("z_H", "block_in", "block_out"):
                out[f"{dtype}_{key}"] = _bits(torch.stack(rec[key]))
    np.savez_compressed(case / "official_run.npz", **out)
    print(f"{case.name}: recorded {model.config.halt_max_steps} steps x {NUM_PUZZLES} puzzles", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trm", type=Path, default=Path("/tmp/official"), help="TinyRecursiveModels checkout")
    parser.add_argument("--hrm", type=Path, default=Path("/tmp/official_hrm"), help="HRM checkout")
    parser.add_argument("--deps", type=Path, default=Path("/tmp/official_deps"))
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "official_bf16")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--official", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        record_child(args.official, args.deps, args.child)
        return

    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from official_format import BF16_VARIANTS, write_official_checkpoint

    args.out.mkdir(parents=True, exist_ok=True)
    for name, variant in BF16_VARIANTS.items():
        case = args.out / name
        write_official_checkpoint(case, variant)
        official = args.hrm if variant.family == "hrm" else args.trm
        subprocess.run([sys.executable, __file__, "--child", str(case), "--official", str(official),
                        "--deps", str(args.deps)], check=True)
    provenance = {
        "trm_repository": "SamsungSAILMontreal/TinyRecursiveModels",
        "trm_commit": _official_commit(args.trm, TRM_COMMIT),
        "hrm_repository": "sapientinc/HRM",
        "hrm_commit": _official_commit(args.hrm, HRM_COMMIT),
        "hrm_attention": "flash_attn_func replaced by torch SDPA on the same layout (flash-attn needs CUDA)",
        "torch": torch.__version__,
        "cpu": cpu_model(),
        # The kernels that rounded: the tests demand bit-exact loops only where these (and the blocks) match.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # ...and what the bfloat16 GEMMs compute, which the capability does not decide (oneDNN's own dispatch).
        "kernel_probe": kernel_probe(),
        "variants": {name: {k: v for k, v in vars(variant).items() if k != "extra"}
                     for name, variant in BF16_VARIANTS.items()},
    }
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")


if __name__ == "__main__":
    main()
