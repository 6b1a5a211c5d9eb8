"""Checkpoint loading: what users really have loads; bad input fails with a precise, named error."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import yaml
from official_format import COMPILED_PREFIX, VARIANTS, official_state_dict, write_official_checkpoint

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
