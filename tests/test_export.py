"""Export: step graph + bundle + automatic parity, for every variant; determinism; safe writing; verify."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from official_format import VARIANTS, write_official_checkpoint

from trm_export.cli import main as cli
from trm_export.errors import BundleError
from trm_export.export.onnx_graph import opset_of
from trm_export.export.pipeline import ExportOptions, ParityError, Puzzles, export_bundle
from trm_export.runtime.manifest import read_manifest
from trm_export.runtime.selfcheck import verify_bundle
from trm_export.targets.registry import UnknownTargetError

TESTS = Path(__file__).resolve().parent
OPTIONS = ExportOptions(progress=False, batch_size=8)


def stable(name: str):
    # Contractive random weights: a whole float32 loop run twice (torch vs ONNX Runtime) then differs only by
    # rounding, as a trained model's does (random mlp_t blocks at gain 1 are chaotic: see official_format).
    return dataclasses.replace(VARIANTS[name], gain=0.5)


def random_puzzles(v, n: int = 12, seed: int = 0) -> Puzzles:
    rng = np.random.default_rng(seed)
    return Puzzles(rng.integers(1, v.vocab_size, (n, v.seq_len)), rng.integers(0, v.num_puzzle_identifiers, n), None,
                   "random test puzzles", None)


def export(tmp_path: Path, name: str = "trm-att-rope", out: str = "bundle", **options) -> tuple[Path, dict]:
    v = stable(name)
    ckpt = tmp_path / "ckpt"
    if not ckpt.exists():
        write_official_checkpoint(ckpt, v)
    path, manifest, report = export_bundle(ckpt, tmp_path / out, dataclasses.replace(OPTIONS, **options),
                                           puzzles=random_puzzles(v))
    return path, json.loads((path / "manifest.json").read_text())


@pytest.mark.rounding
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_exports_with_parity_and_verifies(tmp_path, name):
    path, manifest = export(tmp_path, name)
    parity = manifest["parity"]["fp32"]
    assert parity["passed"] and parity["puzzles"] == 12 and parity["steps"] == VARIANTS[name].halt_max_steps
    assert max(parity["max_abs_z_H"]) <= 1e-4 and max(parity["max_abs_logits"]) <= 1e-4
    assert parity["predictions_identical"] == 1.0 and parity["adaptive_steps_identical"] == 1.0
    graph = onnx.load(path / manifest["graphs"]["fp32"]["file"])
    assert [i.name for i in graph.graph.input] == ["x", "z_H", "z_L"]
    assert [o.name for o in graph.graph.output] == ["z_H_out", "z_L_out", "logits", "q_halt", "q_continue"]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # Each weight once, and no table of the embedding inside the step graph.
    names = [i.name for i in graph.graph.initializer]
    assert len(names) == len(set(names))
    assert not any("embed_tokens" in n or "puzzle_emb" in n or "embed_pos" in n for n in names)
    report = verify_bundle(path)
    assert report, str(report)


@pytest.mark.rounding
@pytest.mark.parametrize("name", ["trm-mlpt", "trm-att-rope"])
def test_export_form_is_the_same_step_with_plain_matmuls(tmp_path, name):
    """The model is exported in a faster form (SwiGLU gate/up as two MatMuls; mlp_t as left products, no
    transposes): the same step up to rounding, the state dict untouched, named layers for quantization."""
    import torch

    from trm_export.export.checkpoint import load_checkpoint

    v = stable(name)
    write_official_checkpoint(tmp_path / "ckpt", v)
    model = load_checkpoint(tmp_path / "ckpt").model
    keys = set(model.state_dict())
    torch.manual_seed(0)
    s, d = model.config.total_seq_len, model.config.hidden_size
    x, z_H, z_L = (torch.randn(3, s, d) for _ in range(3))
    with torch.no_grad():
        reference = model.step(x, z_H, z_L)
        with model.exporting():
            exported = model.step(x, z_H, z_L)
        again = model.step(x, z_H, z_L)  # the reference form is back after the block
    for ref, exp, back in zip(reference, exported, again, strict=True):
        torch.testing.assert_close(exp, ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(back, ref)
    assert set(model.state_dict()) == keys
    path, manifest = export(tmp_path, name)
    graph = onnx.load(path / manifest["graphs"]["fp32"]["file"])
    ops = [n.op_type for n in graph.graph.node]
    assert not [n.name for n in graph.graph.node if n.op_type in ("Slice", "Split") and "/mlp" in n.name]
    matmul_scopes = {n.name.rsplit("/", 2)[-2] for n in graph.graph.node if n.op_type == "MatMul"}
    assert {"gate_proj", "up_proj", "down_proj"} <= matmul_scopes
    if v.mlp_t:
        assert "Transpose" not in ops


@pytest.mark.rounding
@pytest.mark.parametrize("name", ["trm-att-rope", "trm-att-learned", "trm-att-rope-3heads", "hrm"])
def test_onnxruntime_ops_compute_the_standard_forms_step(tmp_path, name):
    """The cpu target's attention and rope as ONNX Runtime's MultiHeadAttention and RotaryEmbedding: one step from a
    given state is the standard-ops graph's and the PyTorch reference's, within float32 rounding; the nodes are
    the contrib ones (a Softmax left over would mean the fused form silently fell back)."""
    import onnxruntime as ort

    from trm_export.export.checkpoint import load_checkpoint
    from trm_export.export.onnx_graph import export_step_graph

    v = stable(name)
    write_official_checkpoint(tmp_path / "ckpt", v)
    model = load_checkpoint(tmp_path / "ckpt").model
    torch.manual_seed(0)
    s, d = model.config.total_seq_len, model.config.hidden_size
    state = {k: torch.randn(3, s, d) for k in ("x", "z_H", "z_L")}
    with torch.no_grad():
        reference = [t.numpy() for t in model.step(*state.values())]
    feeds = {k: t.numpy() for k, t in state.items()}
    outputs = {}
    for fused in (False, True):
        graph = export_step_graph(model, 20, onnxruntime_ops=fused)
        ops = collections.Counter(n.op_type for n in graph.model.graph.node)
        if fused:
            assert ops["MultiHeadAttention"] > 0 and ops["Softmax"] == 0
            assert ops["RotaryEmbedding"] == (2 * ops["MultiHeadAttention"] if v.pos_encodings == "rope" else 0)
            assert graph.onnxruntime_ops == sorted(k for k in ("MultiHeadAttention", "RotaryEmbedding") if ops[k])
        else:
            assert graph.onnxruntime_ops == [] and ops["Softmax"] > 0
        session = ort.InferenceSession(graph.data, providers=["CPUExecutionProvider"])
        outputs[fused] = session.run(None, feeds)
    for ours, standard, ref in zip(outputs[True], outputs[False], reference, strict=True):
        scale = max(1.0, float(np.abs(ref).max()))
        assert np.abs(ours - ref).max() <= 2e-5 * scale
        assert np.abs(ours - standard).max() <= 2e-5 * scale


def test_standard_ops_keeps_the_cpu_graph_free_of_contrib_ops(tmp_path):
    path, manifest = export(tmp_path, standard_ops=True)
    graph = onnx.load(path / manifest["graphs"]["fp32"]["file"])
    assert not [n for n in graph.graph.node if n.domain] and manifest["graphs"]["fp32"]["onnxruntime_ops"] == []
    assert any(n.op_type == "Softmax" for n in graph.graph.node)


def test_weights_are_stored_once_however_many_calls(tmp_path):
    v = stable("trm-att-rope")
    path, manifest = export(tmp_path, "trm-att-rope")
    graph = onnx.load(path / manifest["graphs"]["fp32"]["file"])
    weight_elems = sum(int(np.prod(i.dims)) for i in graph.graph.initializer if len(i.dims) == 2 and min(i.dims) > 4)
    block_params = v.L_layers * (4 * v.hidden_size ** 2 + 3 * v.hidden_size * 256)
    assert weight_elems <= block_params + 2 * v.hidden_size * 16 + 1000  # + lm/q heads, rope tables
    calls = sum(1 for n in graph.graph.node if n.op_type == "MultiHeadAttention")  # the cpu target's attention
    assert calls == v.H_cycles * (v.L_cycles + 1) * v.L_layers  # every call unrolled


@pytest.mark.parametrize(("target", "opset", "ir"), [("cpu", 20, 9), ("jetson", 17, 8), ("jetson-orin-nx", 20, 9),
                                                     ("jetson-xavier-nx", 17, 8),
                                                     ("gpu-trt11", 20, 9)])
def test_opset_and_ir_follow_the_target(tmp_path, target, opset, ir):
    path, manifest = export(tmp_path, target=target)
    graph = onnx.load(path / manifest["graphs"]["fp32"]["file"])
    assert (opset_of(graph), graph.ir_version) == (opset, ir)
    assert manifest["graphs"]["fp32"]["opset"] == opset and manifest["target"] != ""
    # ONNX Runtime's contrib ops only where the runtime is native ONNX Runtime: TensorRT cannot parse them.
    contrib = {n.op_type for n in graph.graph.node if n.domain == "com.microsoft"}
    assert contrib == ({"MultiHeadAttention", "RotaryEmbedding"} if target == "cpu" else set())
    assert manifest["graphs"]["fp32"]["onnxruntime_ops"] == sorted(contrib)


@pytest.mark.rounding
def test_export_is_deterministic(tmp_path):
    first, m1 = export(tmp_path, out="a")
    second, m2 = export(tmp_path, out="b")
    files = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second).as_posix() for p in second.rglob("*") if p.is_file())
    for rel in files:
        if rel not in ("manifest.json", "README.md"):  # the README names the bundle and its export time
            assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
    for m in (m1, m2):
        del m["provenance"]["created_at"], m["digest"], m["files"]["README.md"]  # the digest covers created_at
    assert m1 == m2


def test_existing_output_is_never_overwritten_without_force(tmp_path):
    path, manifest = export(tmp_path)
    marker = path / "graphs" / "step_fp32.onnx"
    before = marker.read_bytes()
    with pytest.raises(BundleError, match="already exists; pass --force"):
        export(tmp_path)
    assert marker.read_bytes() == before
    path, _ = export(tmp_path, force=True)
    assert read_manifest(path)  # replaced, complete and consistent
    assert not list(tmp_path.glob(".bundle.*"))


def test_force_never_replaces_a_folder_that_is_not_a_bundle(tmp_path):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="is not a bundle"):
        export(tmp_path, force=True)
    assert (tmp_path / "bundle" / "notes.txt").read_text() == "mine"


def _exports_a_broken_graph(monkeypatch, relative_error: float = 1e-3) -> None:
    """An exporter bug: the graph is traced from the model with one weight off by `relative_error`."""
    import copy

    from trm_export.export import pipeline

    original = pipeline.export_step_graph

    def broken(model, opset, **form):
        model = copy.deepcopy(model)
        with torch.no_grad():
            next(p for name, p in model.named_parameters() if "down_proj" in name).mul_(1 + relative_error)
        return original(model, opset, **form)

    monkeypatch.setattr(pipeline, "export_step_graph", broken)


def test_failed_parity_writes_nothing(tmp_path, monkeypatch):
    _exports_a_broken_graph(monkeypatch)
    with pytest.raises(ParityError, match=r"max \|z_H - ref\| .* > 0.0001 on \d+ puzzle-steps, not explained by "
                                          r"float32 rounding"):
        export(tmp_path)
    assert not (tmp_path / "bundle").exists()
    assert not list(tmp_path.glob(".bundle.*"))


@pytest.mark.rounding
def test_a_tolerance_below_float32_rounding_is_judged_against_float64(tmp_path):
    # Asked for 1e-12, the step graph misses it everywhere; float32 itself cannot reach it (the reference is ~1e-6
    # from the float64 step), so every puzzle-step is rounding-limited and the export passes, saying so.
    path, manifest = export(tmp_path, tolerance=1e-12)
    parity = manifest["parity"]["fp32"]
    assert parity["passed"] and parity["step_graph_violations"] == []
    assert parity["rounding_limited"] >= 12 * VARIANTS["trm-att-rope"].halt_max_steps
    assert 1e-8 < max(parity["float32_rounding_max_abs"].values()) < 1e-4


ILL_CONDITIONED_MAZE = Path(__file__).resolve().parent / "data" / "maze_ill_conditioned" / "step_5234"
# Puzzles of the maze held-out split: 31 is one on which a step amplifies float32 rounding (the reference is 1.2e-3
# from float64 on z_H at step 9, the graph 2.8e-3 from the reference); the others are ones on which the loop is
# rounding-stable (on puzzles 0 and 2 to 5 this half-trained model is chaotic: see parity.rounding_sensitive).
MAZE_PUZZLES = [1, 6, 7, 8, 9, 10, 11, 13, 31]


def _maze_puzzles(indices: list[int] = MAZE_PUZZLES):
    from trm_export.export.checkpoint import load_checkpoint
    from trm_export.export.pipeline import default_puzzles

    ck = load_checkpoint(ILL_CONDITIONED_MAZE)
    p = default_puzzles(ck)
    return ck, dataclasses.replace(p, tokens=p.tokens[indices], puzzle_ids=p.puzzle_ids[indices],
                                   labels=p.labels[indices])


@pytest.mark.rounding
def test_an_ill_conditioned_real_model_exports_with_rounding_limited_steps(tmp_path):
    # The early maze checkpoint's float32 reference is itself up to 1e-3 from float64 on some inputs: no
    # float32 graph can be within 1e-4 of it there. Judged against float64, the export passes and its own
    # self-check passes on golden puzzles chosen among the rounding-stable ones.
    ck, puzzles = _maze_puzzles()
    path, manifest, report = export_bundle(ck, tmp_path / "maze", OPTIONS, puzzles=puzzles)
    # which output (z_H or logits) misses 1e-4 against the float32 reference depends on the CPU's rounding (on AVX2
    # only logits did): the bar is that some puzzle-steps miss it and are judged rounding-limited, none a violation
    assert report.passed and report.rounding_limited > 0
    assert max(report.max_abs_z_H + report.max_abs_logits) > 1e-4
    assert report.step_graph_violations == []
    assert max(report.rounding_limited_max_abs_vs_float64.values()) <= 1e-4 + 4 * max(
        report.float32_rounding_max_abs.values())
    golden = json.loads((path / "manifest.json").read_text())["golden"]
    assert golden["rounding_stable"] == golden["count"] == 8
    assert verify_bundle(path)


@pytest.mark.rounding
def test_an_ill_conditioned_model_does_not_excuse_a_broken_graph(tmp_path, monkeypatch):
    # 1e-4 relative on one weight: on the ordinary puzzles float32 is accurate, so the error shows there. One
    # ordinary puzzle beside the ill-conditioned one is enough (every broken puzzle-step costs ten float64 steps).
    _exports_a_broken_graph(monkeypatch, relative_error=1e-4)
    ck, puzzles = _maze_puzzles([1, 31])
    with pytest.raises(ParityError, match="not explained by float32 rounding") as failure:
        export_bundle(ck, tmp_path / "maze", OPTIONS, puzzles=puzzles)
    assert "puzzle-steps" in str(failure.value)
    assert not (tmp_path / "maze").exists()


def test_unknown_target_lists_the_valid_ones(tmp_path):
    with pytest.raises(UnknownTargetError, match=r"unknown target 'jetsn'. Did you mean 'jetson'\? Valid targets: cpu"):
        export(tmp_path, target="jetsn")
    result = CliRunner().invoke(cli, [str(tmp_path / "ckpt"), "--target", "jetsn"])
    assert result.exit_code != 0 and "Valid targets: cpu, jetson, jetson-orin-nano" in result.output


def test_killed_export_leaves_nothing_half_written(tmp_path):
    v = stable("trm-att-rope")
    write_official_checkpoint(tmp_path / "ckpt", v)
    script = textwrap.dedent(f"""
        import sys, time, numpy as np
        sys.path.insert(0, {str(TESTS)!r})
        import trm_export.export.pipeline as pipeline
        from test_export import random_puzzles, stable, OPTIONS
        def slow_parity(*args, **kwargs):
            print("parity started", flush=True)
            time.sleep(60)
        pipeline.check_parity = slow_parity
        pipeline.export_bundle({str(tmp_path / 'ckpt')!r}, {str(tmp_path / 'out')!r}, OPTIONS,
                               puzzles=random_puzzles(stable("trm-att-rope")))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".out.partial-*")):
        time.sleep(0.1)
    line = proc.stdout.readline()
    assert "parity started" in line, proc.stderr.read()
    assert list(tmp_path.glob(".out.partial-*"))  # staging exists mid-export, the output does not
    assert not (tmp_path / "out").exists()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_stale_partial_from_a_sigkilled_export_is_cleaned(tmp_path):
    stale = tmp_path / ".bundle.partial-999999999"
    stale.mkdir()
    (stale / "half.onnx").write_bytes(b"\0" * 10)
    path, _ = export(tmp_path)
    assert not stale.exists() and path.exists()


def test_tampered_bundle_is_refused(tmp_path):
    path, manifest = export(tmp_path)
    table = path / "tables" / "H_init.npy"
    data = bytearray(table.read_bytes())
    data[-1] ^= 0xFF
    table.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"tables/H_init.npy: sha256 differs from the manifest"):
        verify_bundle(path)
    os.remove(path / "golden" / "tokens.npy")
    with pytest.raises(BundleError, match=r"golden/tokens.npy: missing"):
        read_manifest(path)


def test_verify_cli_passes_and_fails(tmp_path):
    path, _ = export(tmp_path)
    result = CliRunner().invoke(cli, ["verify", str(path)])
    assert result.exit_code == 0, result.output
    assert "Passed: 6/6" in result.output
    golden = path / "golden" / "q_halt.npy"
    q = np.load(golden)
    np.save(golden, -q)  # a wrong golden vector, with the manifest updated so only the numbers disagree
    manifest = json.loads((path / "manifest.json").read_text())
    from trm_export.runtime.manifest import seal, sha256_file

    manifest["files"]["golden/q_halt.npy"] = sha256_file(golden)
    (path / "manifest.json").write_text(seal(manifest))
    result = CliRunner().invoke(cli, ["verify", str(path)])
    assert result.exit_code == 1 and "FAIL" in result.output


def test_puzzle_table_in_float16(tmp_path):
    path, manifest = export(tmp_path, puzzle_table_dtype="float16")
    assert np.load(path / manifest["embedding"]["puzzle_table"]).dtype == np.float16
    assert verify_bundle(path)


def test_manifest_describes_the_model(tmp_path):
    path, manifest = export(tmp_path, "hrm")
    v = stable("hrm")
    assert manifest["format_version"] == 2 and manifest["model"]["family"] == "hrm"
    assert manifest["loop"] == {"halt_max_steps": v.halt_max_steps, "halting_rule": "q_halt>q_continue",
                                "uses_q_continue": True}
    assert manifest["task"]["seq_len"] == v.seq_len and manifest["task"]["prefix_len"] == v.prefix_len
    assert manifest["graphs"]["fp32"]["inputs"][0] == {"name": "x", "shape": ["batch", v.seq_len + v.prefix_len,
                                                                               v.hidden_size], "dtype": "float32"}
    assert len(manifest["provenance"]["checkpoint_sha256"]) == 64
    assert set(manifest["files"]) == {p.relative_to(path).as_posix() for p in path.rglob("*")
                                      if p.is_file() and p.name != "manifest.json"}


@pytest.mark.rounding
def test_rounding_sensitive_puzzles_are_identified_not_silently_excused(tmp_path):
    # Random mlp_t blocks at gain 1 are chaotic: float32 rounding alone changes some loop outcomes. Those
    # puzzles must be shown to change under float64 too; a stable model has none.
    from trm_export.export.checkpoint import load_checkpoint
    from trm_export.export.parity import _rounding_sensitive

    v = VARIANTS["trm-mlpt"]
    write_official_checkpoint(tmp_path / "chaotic", v)
    model = load_checkpoint(tmp_path / "chaotic").model
    p = random_puzzles(v, n=24)
    sensitive = _rounding_sensitive(model, p.tokens, p.puzzle_ids, list(range(24)), 16)  # 16 steps: chaos shows
    assert len(sensitive) > 0
    write_official_checkpoint(tmp_path / "stable", stable("trm-mlpt"))
    model = load_checkpoint(tmp_path / "stable").model
    assert _rounding_sensitive(model, p.tokens, p.puzzle_ids, list(range(24)), 16) == []
    path, manifest = export(tmp_path, "trm-mlpt")
    parity = manifest["parity"]["fp32"]
    assert parity["passed"] and parity["differing"] == [] and parity["rounding_sensitive"] == []


@pytest.mark.rounding
def test_golden_vectors_of_a_chaotic_model_are_its_rounding_stable_puzzles(tmp_path):
    # Random mlp_t blocks at gain 1 are chaotic: on most random puzzles float32 rounding can change the loop. The
    # golden set takes the stable ones first, and the self-check's bars are the stable fraction, so the correct
    # bundle passes its own check.
    v = VARIANTS["trm-mlpt"]
    write_official_checkpoint(tmp_path / "ckpt", v)
    options = dataclasses.replace(OPTIONS, golden_puzzles=12)
    path, manifest, report = export_bundle(tmp_path / "ckpt", tmp_path / "bundle", options,
                                           puzzles=random_puzzles(v, n=24))
    assert report.passed and report.rounding_sensitive
    golden = json.loads((path / "manifest.json").read_text())["golden"]
    stable = golden["rounding_stable"]
    assert 0 < stable < golden["count"] == 12
    assert golden["tolerances"]["fp32"]["predictions_identical"] == pytest.approx(stable / 12)
    assert verify_bundle(path)
