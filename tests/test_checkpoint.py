"""Checkpoint loading: what users really have loads; bad input fails with a precise, named error."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import yaml
from official_format import (
    COMPILED_PREFIX,
    VARIANTS,
    Variant,
    official_dataset_json,
    official_state_dict,
    write_official_checkpoint,
)

from trm_export.errors import CheckpointError, ConfigError
from trm_export.export.checkpoint import load_checkpoint


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_loads_with_the_official_config(tmp_path, name):
    v = VARIANTS[name]
    ck = load_checkpoint(write_official_checkpoint(tmp_path, name))
    cfg = ck.config
    assert (cfg.family, cfg.hidden_size, cfg.L_layers, cfg.mlp_t) == (v.family, v.hidden_size, v.L_layers, v.mlp_t)
    assert (cfg.vocab_size, cfg.seq_len, cfg.num_puzzle_identifiers) == (v.vocab_size, v.seq_len,
                                                                          v.num_puzzle_identifiers)
    assert cfg.prefix_len == v.prefix_len
    assert cfg.halting_rule == ("q_halt>0" if v.family == "trm" and v.no_ACT_continue else "q_halt>q_continue")
    assert ck.key_prefix == COMPILED_PREFIX
    assert all(p.dtype == torch.float32 for p in ck.model.state_dict().values())


def test_directory_picks_the_latest_step(tmp_path):
    write_official_checkpoint(tmp_path, "trm-att-rope", file_name="step_20", seed=1)
    write_official_checkpoint(tmp_path, "trm-att-rope", file_name="step_100", seed=2)
    write_official_checkpoint(tmp_path, "trm-att-rope", file_name="step_3", seed=3)
    assert load_checkpoint(tmp_path).path.name == "step_100"


def test_shapes_tell_what_a_missing_dataset_json_would(tmp_path):
    # mlp_t and learned positions reveal seq_len; vocab and puzzle ids always come from shapes.
    ck = load_checkpoint(write_official_checkpoint(tmp_path, "trm-mlpt", with_dataset=False))
    v = VARIANTS["trm-mlpt"]
    assert ck.config.seq_len == v.seq_len and ck.sources["seq_len"] == "weights"
    assert ck.config.vocab_size == v.vocab_size and ck.config.num_puzzle_identifiers == v.num_puzzle_identifiers


def test_seq_len_neither_given_nor_inferable(tmp_path):
    path = write_official_checkpoint(tmp_path, "trm-att-rope", with_dataset=False)
    with pytest.raises(CheckpointError, match=r"cannot determine seq_len \(give --seq-len"):
        load_checkpoint(path)
    assert load_checkpoint(path, overrides={"seq_len": VARIANTS["trm-att-rope"].seq_len}).config.seq_len == 16


def test_dataset_json_found_by_flag_and_through_data_paths(tmp_path, monkeypatch):
    path = write_official_checkpoint(tmp_path / "ckpt", "trm-att-rope", with_dataset=False)
    data = tmp_path / "data" / "test-task" / "train"
    data.mkdir(parents=True)
    (data / "dataset.json").write_text(json.dumps({"vocab_size": 11, "seq_len": 16, "num_puzzle_identifiers": 3}))
    assert load_checkpoint(path, dataset_json=data).dataset_path == data / "dataset.json"
    monkeypatch.chdir(tmp_path)  # all_config.yaml says data_paths: [data/test-task]
    assert load_checkpoint(path).config.seq_len == 16


def test_without_config_the_missing_fields_are_listed_and_overrides_work(tmp_path):
    path = write_official_checkpoint(tmp_path, "trm-att-rope", with_config=False)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    for flag in ("--h-cycles", "--l-cycles", "--num-heads", "--pos-encodings"):
        assert flag in str(err.value)
    assert "no all_config.yaml" in str(err.value)
    v = VARIANTS["trm-att-rope"]
    ck = load_checkpoint(path, overrides={"H_cycles": v.H_cycles, "L_cycles": v.L_cycles, "num_heads": v.num_heads,
                                          "pos_encodings": "rope", "puzzle_emb_len": v.puzzle_emb_len})
    assert ck.config.expansion * ck.config.hidden_size * 2 / 3 <= ck.config.mlp_intermediate
    assert ck.sources["expansion"] == "weights"


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("this is a README, not weights\n")
    with pytest.raises(CheckpointError, match=r"model\.pt: not a PyTorch checkpoint"):
        load_checkpoint(path)


class _Exploit:
    def __reduce__(self):
        return (print, ("this would have run code",))


def test_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    path = tmp_path / "step_1"
    torch.save({"_orig_mod.model.inner.H_init": torch.zeros(4), "payload": _Exploit()}, path)
    with pytest.raises(CheckpointError, match="refused: the file is a pickle that would import or run code"):
        load_checkpoint(path)
    path2 = tmp_path / "raw.pt"
    path2.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError, match="raw.pt"):
        load_checkpoint(path2)
    assert "would have run code" not in capsys.readouterr().out


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "step_1"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_checkpoint(path)


def test_not_a_trm_checkpoint(tmp_path):
    path = tmp_path / "step_1"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="no embed_tokens.embedding_weight"):
        load_checkpoint(path)


def _save(tmp_path, state, name="trm-att-rope"):
    write_official_checkpoint(tmp_path, name)
    path = tmp_path / "step_1000"
    torch.save({COMPILED_PREFIX + k: t for k, t in state.items()}, path)
    return path


def test_missing_keys_are_listed(tmp_path):
    state = official_state_dict(VARIANTS["trm-att-rope"])
    del state["L_level.layers.1.self_attn.o_proj.weight"], state["q_head.bias"]
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_save(tmp_path, state))
    assert "missing keys ['L_level.layers.1.self_attn.o_proj.weight', 'q_head.bias']" in str(err.value)


def test_unexpected_keys_are_listed(tmp_path):
    state = official_state_dict(VARIANTS["trm-att-rope"])
    state["extra_head.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unexpected keys \['extra_head.weight'\]"):
        load_checkpoint(_save(tmp_path, state))


def test_shape_mismatch_names_key_expected_and_got(tmp_path):
    state = official_state_dict(VARIANTS["trm-att-rope"])
    state["L_level.layers.0.mlp.down_proj.weight"] = torch.zeros(32, 512)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_save(tmp_path, state))
    assert "shape mismatch for L_level.layers.0.mlp.down_proj.weight: expected [32, 256]" in str(err.value)
    assert "got [32, 512]" in str(err.value)


def test_unknown_architecture(tmp_path):
    path = write_official_checkpoint(tmp_path, "trm-att-rope")
    cfg = yaml.safe_load((tmp_path / "all_config.yaml").read_text())
    cfg["arch"]["name"] = "transformers_baseline@Model_ACTV2"
    (tmp_path / "all_config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match=r"all_config.yaml: unknown architecture arch.name='transformers_base"):
        load_checkpoint(path)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("hidden_size", 64, "hidden_size: config says 64, weights say 32"),
    ("mlp_t", True, "mlp_t: config says True, weights say False"),
    ("L_layers", 4, "L_layers: config says 4, weights say 2"),
    ("pos_encodings", "learned", "config says 'learned', weights have no embed_pos"),
])
def test_config_and_weights_disagree(tmp_path, field, value, message):
    path = write_official_checkpoint(tmp_path, "trm-att-rope")
    cfg = yaml.safe_load((tmp_path / "all_config.yaml").read_text())
    cfg["arch"][field] = value
    (tmp_path / "all_config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="config and weights disagree") as err:
        load_checkpoint(path)
    assert message in str(err.value)


def test_hrm_config_with_trm_weights_disagree(tmp_path):
    path = write_official_checkpoint(tmp_path, "trm-att-rope")
    cfg = yaml.safe_load((tmp_path / "all_config.yaml").read_text())
    cfg["arch"]["name"] = "hrm.hrm_act_v1@HierarchicalReasoningModel_ACTV1"
    (tmp_path / "all_config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="family: config says 'hrm', weights say 'trm'"):
        load_checkpoint(path)


def test_dataset_json_and_weights_disagree(tmp_path):
    path = write_official_checkpoint(tmp_path, "trm-mlpt")
    (tmp_path / "dataset.json").write_text(json.dumps({"vocab_size": 11, "seq_len": 30, "num_puzzle_identifiers": 3}))
    with pytest.raises(CheckpointError, match=r"seq_len: dataset.json says 30, weights say 16"):
        load_checkpoint(path)
    (tmp_path / "dataset.json").write_text(json.dumps({"vocab_size": 12, "seq_len": 16, "num_puzzle_identifiers": 3}))
    with pytest.raises(CheckpointError, match=r"vocab_size: dataset.json says 12, weights say 11"):
        load_checkpoint(path)


def test_unknown_override_is_rejected(tmp_path):
    path = write_official_checkpoint(tmp_path, "trm-att-rope")
    with pytest.raises(ConfigError, match="cannot override 'hidden_size'"):
        load_checkpoint(path, overrides={"hidden_size": 3})


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="directory holds no checkpoint"):
        load_checkpoint(tmp_path)


def test_trm_without_puzzle_embedding_needs_puzzle_emb_len_zero(tmp_path):
    # Upstream TRM sizes its state as seq_len + puzzle_emb_len (default 16) but prepends nothing when
    # puzzle_emb_ndim is 0: such a model cannot run, so the loader says why instead of failing in a matmul.
    path = write_official_checkpoint(tmp_path, "trm-att-rope-nopuzzle")
    cfg = yaml.safe_load((tmp_path / "all_config.yaml").read_text())
    cfg["arch"]["puzzle_emb_len"] = 16
    (tmp_path / "all_config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CheckpointError, match="puzzle_emb_ndim is 0 but puzzle_emb_len is 16.*Set puzzle_emb_len: 0"):
        load_checkpoint(path)


# --- the official format, exactly (issue #17 part 6) ------------------------------------------------------------

# Every field of the official PuzzleDatasetMetadata (a pydantic model without defaults: each one is required; a
# missing one is a ValidationError when the official PuzzleDataset reads dataset.json), with its type. Read in
# SamsungSAILMontreal/TinyRecursiveModels dataset/common.py at commit e7b68717f0a6c4cbb4ce6fbef787b14f42083bd9;
# sapientinc/HRM dataset/common.py at 42410daaaf6ac8b266536d105a6e2362ffe40929 has the same fields less
# total_puzzles (and ignores extra ones). The builders there (build_sudoku_dataset.py, build_maze_dataset.py)
# write total_puzzles = total_groups = number of puzzles in the split; build_arc_dataset.py counts its puzzles.
OFFICIAL_DATASET_FIELDS = {
    "pad_id": int, "ignore_label_id": (int, type(None)), "blank_identifier_id": int, "vocab_size": int,
    "seq_len": int, "num_puzzle_identifiers": int, "total_groups": int, "mean_puzzle_examples": (float, int),
    "total_puzzles": int, "sets": list,
}
# loss_type values the official ACTLossHead runs: TRM's models/losses.py (commit above) calls
# loss_fn(logits, labels, ignore_index=..., valid_mask=...), which only stablemax_cross_entropy takes
# (its softmax_cross_entropy raises TypeError on valid_mask); HRM's models/losses.py (commit above) takes both
# names, without valid_mask. config/arch/*.yaml in both repositories say stablemax_cross_entropy.
OFFICIAL_LOSS_TYPES = ("stablemax_cross_entropy",)


def assert_official_dataset_json(meta: dict) -> None:
    missing = sorted(set(OFFICIAL_DATASET_FIELDS) - set(meta))
    assert not missing, f"dataset.json lacks the official field(s) {missing}"
    for name, kind in OFFICIAL_DATASET_FIELDS.items():
        assert isinstance(meta[name], kind) and not isinstance(meta[name], bool), (name, meta[name])
    assert all(isinstance(s, str) for s in meta["sets"]) and meta["sets"]
    assert meta["total_puzzles"] >= meta["total_groups"] >= 0


def _train_reference_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "train_reference.py"
    spec = importlib.util.spec_from_file_location("train_reference_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_dataset_json_we_write_has_the_official_fields(tmp_path):
    from trm_export.reference_models import HERE
    from trm_export.tasks import get_task

    spec = get_task("sudoku").spec
    assert_official_dataset_json(spec.dataset_json())
    meta = spec.dataset_json(total_groups=60)
    assert_official_dataset_json(meta)
    assert meta["total_puzzles"] == meta["total_groups"] == 60  # one puzzle per group, as the official builders
    assert list(meta) == list(OFFICIAL_DATASET_FIELDS)  # and in the official order
    with pytest.raises(ValueError, match="total_puzzles"):
        spec.dataset_json(total_groups=5, total_puzzles=4)
    write_official_checkpoint(tmp_path / "variant", "trm-att-rope")
    assert_official_dataset_json(json.loads((tmp_path / "variant" / "dataset.json").read_text()))
    shipped = sorted(HERE.glob("*/dataset.json"))
    assert len(shipped) >= 2
    for path in shipped:
        assert_official_dataset_json(json.loads(path.read_text()))


def test_the_training_script_writes_the_official_files(tmp_path):
    from trm_export.export.model import RecursiveModel
    from trm_export.tasks import get_task

    tr = _train_reference_module()
    recipe = tr.RECIPES["sudoku"]
    spec = get_task(**recipe["task"]).spec
    cfg = tr.model_config(recipe, spec)
    tr.save_official(tmp_path, RecursiveModel(cfg), cfg, recipe, spec, 7, {"train_minutes": 0.0})
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert_official_dataset_json(meta)
    assert meta["total_puzzles"] == recipe["train_pool"]
    config = yaml.safe_load((tmp_path / "all_config.yaml").read_text())
    assert config["arch"]["loss"] == {"name": "losses@ACTLossHead", "loss_type": "stablemax_cross_entropy"}
    assert load_checkpoint(tmp_path).config == cfg


def test_every_config_we_write_names_a_loss_the_official_code_runs(tmp_path):
    from trm_export.reference_models import HERE

    written = [tmp_path / name / "all_config.yaml" for name in sorted(VARIANTS)]
    for name in sorted(VARIANTS):
        write_official_checkpoint(tmp_path / name, name)
    shipped = sorted(HERE.glob("*/all_config.yaml"))
    assert len(shipped) >= 2
    for path in written + shipped:
        loss = yaml.safe_load(path.read_text())["arch"]["loss"]
        assert loss["name"] == "losses@ACTLossHead" and loss["loss_type"] in OFFICIAL_LOSS_TYPES, (path, loss)
        assert set(loss) == {"name", "loss_type"}  # the rest of `loss:` goes to ACTLossHead as keyword arguments


def test_older_dataset_json_without_total_puzzles_still_loads(tmp_path):
    path = write_official_checkpoint(tmp_path, "trm-att-rope")
    meta = json.loads((tmp_path / "dataset.json").read_text())
    del meta["total_puzzles"]
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    assert load_checkpoint(path).config.seq_len == VARIANTS["trm-att-rope"].seq_len


@pytest.mark.parametrize("name", ["trm-att-rope-3heads", "hrm-learned-3heads"])
def test_hidden_size_not_a_multiple_of_heads_follows_the_official_arithmetic(tmp_path, name):
    # Official Attention: head_dim = hidden_size // num_heads; qkv_proj [3 * heads * head_dim, hidden],
    # o_proj [hidden, heads * head_dim]. 32 / 3 -> 3 heads of 10 (30 wide); 64 / 3 -> 3 heads of 21 (63 wide).
    import numpy as np
    from numpy_reference import NumpyRecursiveModel, load_official_state

    from trm_export.export.reference import run_reference

    v = VARIANTS[name]
    assert v.hidden_size % v.num_heads
    path = write_official_checkpoint(tmp_path, name)
    ck = load_checkpoint(path)
    head_dim = v.hidden_size // v.num_heads
    assert (ck.config.head_dim, ck.config.attention_width) == (head_dim, v.num_heads * head_dim)
    attn = ck.model.L_level.layers[0].self_attn
    assert tuple(attn.qkv_proj.weight.shape) == (3 * v.num_heads * head_dim, v.hidden_size)
    assert tuple(attn.o_proj.weight.shape) == (v.hidden_size, v.num_heads * head_dim)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, v.vocab_size, size=(3, v.seq_len))
    puzzle_ids = rng.integers(0, v.num_puzzle_identifiers, size=3)
    steps = 3
    tr = run_reference(ck.model, tokens, puzzle_ids, mode="fixed", max_steps=steps, record_states=True)
    _, state = load_official_state(path)
    one = NumpyRecursiveModel(state, v).run(tokens, puzzle_ids, mode="fixed", max_steps=steps,
                                            given_states=(tr.z_H, tr.z_L))
    for field in ("z_H", "z_L", "logits", "q_halt", "q_continue"):
        assert np.abs(np.asarray(getattr(tr, field), np.float64) - getattr(one, field)).max() <= 1e-5, field


def test_num_heads_beyond_hidden_size_is_refused():
    from trm_export.export.config import ModelConfig

    base = dict(family="trm", vocab_size=11, seq_len=16, num_puzzle_identifiers=1, hidden_size=32, expansion=2.0,
                L_layers=1, H_cycles=1, L_cycles=1, pos_encodings="none", puzzle_emb_len=0)
    assert ModelConfig(num_heads=3, **base).attention_width == 30
    with pytest.raises(ConfigError, match="num_heads must be between 1 and hidden_size 32, got 33"):
        ModelConfig(num_heads=33, **base)
    with pytest.raises(ConfigError, match="RoPE needs an even head_dim, got 21"):
        ModelConfig(num_heads=3, **{**base, "hidden_size": 64, "pos_encodings": "rope"})


def _bare(tmp_path, variant, name="model.pt"):
    """A bare checkpoint: the weights alone, as users pass a `model.pt` around."""
    return write_official_checkpoint(tmp_path, variant, file_name=name, with_config=False, with_dataset=False)


SUDOKU_MLPT = Variant("bare-sudoku-mlpt", mlp_t=True, pos_encodings="none", hidden_size=32, num_heads=1,
                      vocab_size=11, seq_len=81, num_puzzle_identifiers=1, puzzle_emb_ndim=32, puzzle_emb_len=1,
                      L_layers=1)
BARE_FLAGS = {"H_cycles": 2, "L_cycles": 2, "pos_encodings": "none"}


def test_bare_checkpoint_with_a_position_table_lists_the_candidates(tmp_path):
    # 82 mixer positions = seq_len + prefix: (81, 1) Sudoku, (66, 16) with the official default, ... all fit.
    path = _bare(tmp_path, SUDOKU_MLPT)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, overrides=BARE_FLAGS)
    text = str(err.value)
    assert "\n" not in text
    assert "ambiguous: the weights fit seq_len + puzzle_emb_len = 82" in text
    assert "seq_len 81 with prefix 1 (Sudoku" in text and "seq_len 66 with prefix 16" in text
    assert "give --seq-len / --puzzle-emb-len or a dataset.json (--dataset)" in text
    assert "suggestion, if it was trained on Sudoku: --seq-len 81 --puzzle-emb-len 1" in text
    # Any one of the flags, or a dataset.json, decides the pair.
    for decide in ({"seq_len": 81}, {"puzzle_emb_len": 1}):
        ck = load_checkpoint(path, overrides={**BARE_FLAGS, **decide})
        assert (ck.config.seq_len, ck.config.prefix_len) == (81, 1)
        assert "ambiguous" not in " ".join(ck.sources.values())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset.json").write_text(json.dumps(official_dataset_json(SUDOKU_MLPT)))
    ck = load_checkpoint(path, dataset_json=tmp_path / "data", overrides=BARE_FLAGS)
    assert (ck.config.seq_len, ck.config.puzzle_emb_len) == (81, 1)
    assert ck.sources["seq_len"] == "dataset.json" and ck.sources["puzzle_emb_len"].startswith("weights (82 positions")
    # A seq_len that leaves no room for the puzzle embedding disagrees with the weights.
    with pytest.raises(CheckpointError, match="leave a 0-position prefix, fewer than the 1"):
        load_checkpoint(path, overrides={**BARE_FLAGS, "seq_len": 82})


def test_bare_checkpoint_shown_with_ambiguous_sources_never_as_read_from_the_weights(tmp_path):
    ck = load_checkpoint(_bare(tmp_path, SUDOKU_MLPT), overrides=BARE_FLAGS, allow_ambiguous=True)
    assert ck.ambiguous and "seq_len 81 with prefix 1" in ck.ambiguous
    assert ck.sources["seq_len"].startswith("ambiguous") and ck.sources["puzzle_emb_len"].startswith("ambiguous")
    assert (ck.config.seq_len, ck.config.prefix_len) == (81, 1)  # the one shipped-task candidate, provisionally
    decided = load_checkpoint(tmp_path / "model.pt", overrides={**BARE_FLAGS, "seq_len": 81}, allow_ambiguous=True)
    assert decided.ambiguous is None


def test_bare_rope_checkpoint_needs_the_prefix_length(tmp_path):
    # No position table: nothing in the weights sizes the prefix, and no all_config.yaml says it.
    v = VARIANTS["trm-att-rope"]
    path = _bare(tmp_path, v)
    flags = {**BARE_FLAGS, "num_heads": v.num_heads, "pos_encodings": "rope", "seq_len": v.seq_len}
    with pytest.raises(CheckpointError, match=r"puzzle_emb_len is ambiguous: no all_config.yaml sets it.*"
                                              r"give --puzzle-emb-len"):
        load_checkpoint(path, overrides=flags)
    assert load_checkpoint(path, overrides={**flags, "puzzle_emb_len": v.puzzle_emb_len}).config.prefix_len == 2
    # Without a puzzle embedding the official TRM runs only with puzzle_emb_len 0: decided.
    bare = _bare(tmp_path / "nopuzzle", "trm-att-rope-nopuzzle")
    ck = load_checkpoint(bare, overrides=flags)
    assert ck.config.prefix_len == 0 and ck.sources["puzzle_emb_len"].startswith("weights")


def test_inspect_shows_an_ambiguous_bare_checkpoint_and_export_refuses_it(tmp_path):
    from click.testing import CliRunner

    from trm_export.cli import main as cli

    path = _bare(tmp_path, SUDOKU_MLPT)
    flags = ["--h-cycles=2", "--l-cycles=2", "--pos-encodings=none"]  # BARE_FLAGS as the command line has them
    shown = CliRunner().invoke(cli, ["inspect", str(path), *flags])
    assert shown.exit_code == 0, shown.output
    assert "AMBIGUOUS: " in shown.output and "ambiguous" in shown.output.split("AMBIGUOUS")[0]
    refused = CliRunner().invoke(cli, [str(path), *flags, "-o", str(tmp_path / "b")])
    assert refused.exit_code != 0 and "seq_len 81 with prefix 1" in refused.output
    assert not (tmp_path / "b").exists()
