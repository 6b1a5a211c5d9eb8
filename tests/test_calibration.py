"""Calibration: step inputs from every step, --calib errors, the Q/DQ checker, INT8 / mixed / FP16 bundles."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from official_format import VARIANTS, write_official_checkpoint
from onnx import TensorProto, helper, numpy_helper

from trm_export.calibration import (
    CalibrationError,
    CalibrationSettings,
    CompareOptions,
    Int8Options,
    MixedOptions,
    PuzzleSet,
    QuantizeOptions,
    RecordOptions,
    add_variants,
    calibrate,
    check_bundle,
    first_step_inputs,
    load_calibration_puzzles,
    quantize_int8,
    record_step_inputs,
    run_fp32,
    select_float_layers,
    validate_qdq,
)
from trm_export.calibration.compare import VariantComparison
from trm_export.calibration.fp16 import Fp16Options, convert_fp16, rms_norm_nodes
from trm_export.calibration.graph import compact_graph, prepare_graph, quantizable_groups, weights_on_the_right
from trm_export.calibration.variants import lowest_drop
from trm_export.errors import BundleError, InputError
from trm_export.export.pipeline import ExportOptions, Puzzles, export_bundle
from trm_export.report.latency import StepTiming
from trm_export.report.trajectory import Trajectory
from trm_export.runtime.manifest import TaskEncoding, read_manifest
from trm_export.runtime.selfcheck import verify_bundle
from trm_export.runtime.solver import Solver
from trm_export.tasks import format_sudoku, get_task

# Sudoku-shaped (so the task's calibration / held-out splits and text format apply), contractive weights.
SUDOKU_SHAPED = dataclasses.replace(VARIANTS["trm-att-rope"], name="sudoku-shaped", seq_len=81, vocab_size=11,
                                    num_puzzle_identifiers=1, halt_max_steps=6, gain=0.5)
THREADS = 1
FAST = QuantizeOptions(threads=THREADS, progress=False, fp16=True, mixed=True, calib_puzzles=12, eval_puzzles=24,
                       record=RecordOptions(max_samples=48, batch_size=16),
                       mixed_options=MixedOptions(sensitivity_puzzles=8),
                       compare=CompareOptions(drift_puzzles=8, batch_size=24))


def _export(root, variant, name: str = "bundle", standard_ops: bool = False):
    write_official_checkpoint(root / "ckpt", variant)
    if variant.seq_len == 81:
        data = get_task("sudoku").split("heldout", size=8)
        puzzles = Puzzles(data.inputs, data.puzzle_ids, data.labels, "held-out", "sudoku", 9)
    else:
        rng = np.random.default_rng(0)
        puzzles = Puzzles(rng.integers(1, variant.vocab_size, (8, variant.seq_len)),
                          rng.integers(0, variant.num_puzzle_identifiers, 8), None, "random", None)
    path, _, _ = export_bundle(root / "ckpt", root / name,
                               ExportOptions(progress=False, batch_size=8, standard_ops=standard_ops), puzzles=puzzles)
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("calib"), SUDOKU_SHAPED)


@pytest.fixture(scope="module")
def standard_bundle(tmp_path_factory):
    """The same model with attention in standard ops (--standard-ops): its q k^T and softmax v products are MatMuls
    (in the cpu target's default graph they are inside ONNX Runtime's MultiHeadAttention)."""
    return _export(tmp_path_factory.mktemp("calib-standard"), SUDOKU_SHAPED, standard_ops=True)


@pytest.fixture(scope="module")
def quantized(bundle):
    """The bundle plus every variant, written once for the module."""
    return add_variants(bundle, bundle.parent / "quantized", FAST)


@pytest.fixture(scope="module")
def calib_set(bundle):
    data = get_task("sudoku").split("calibration", size=5)
    return PuzzleSet(data.inputs.astype(np.int64), data.puzzle_ids.astype(np.int64), None, "calibration")


# --- calibration data -------------------------------------------------------------------------------------------

def test_reader_yields_the_inputs_of_every_step(bundle, calib_set):
    samples = record_step_inputs(bundle, calib_set, RecordOptions(max_samples=None, threads=THREADS))
    steps = SUDOKU_SHAPED.halt_max_steps
    assert len(samples) == len(calib_set) * steps == samples.available
    assert samples.step_counts() == {s: len(calib_set) for s in range(1, steps + 1)}
    # Step 1 sees the initial state; step k+1 sees what the runtime's loop computed at step k.
    manifest = read_manifest(bundle)
    h_init = np.load(bundle / manifest.embedding.H_init)
    first = samples.steps == 1
    assert np.array_equal(samples.z_H[first], np.broadcast_to(h_init, samples.z_H[first].shape))
    solver = Solver(bundle, provider="cpu", threads=THREADS)
    after: dict[int, np.ndarray] = {}

    def keep(puzzles, steps_done, qh, qc):
        after[int(steps_done[0])] = solver.backend.state(len(puzzles))[0].copy()

    solver.solve(calib_set.tokens, mode="fixed", max_steps=steps, on_step=keep)
    for k in range(1, steps):
        rows = np.flatnonzero(samples.steps == k + 1)
        assert np.allclose(samples.z_H[rows], after[k][samples.puzzles[rows]], atol=1e-6)
    # x is the same embedded puzzle at every step; the states differ from step to step.
    for p in range(len(calib_set)):
        rows = np.flatnonzero(samples.puzzles == p)
        assert all(np.array_equal(samples.x[rows[0]], samples.x[r]) for r in rows)
    assert not np.allclose(samples.z_H[samples.steps == 2], samples.z_H[samples.steps == steps])

    reader = samples.reader(batch_size=4)
    batches = []
    while (feed := reader.get_next()) is not None:
        assert set(feed) == {"x", "z_H", "z_L"} and feed["x"].dtype == np.float32
        batches.append(len(feed["x"]))
    assert sum(batches) == len(samples) and len(batches) == len(reader)


def test_sampling_bounds_memory_and_spreads_over_steps(bundle, calib_set):
    samples = record_step_inputs(bundle, calib_set, RecordOptions(max_samples=10, threads=THREADS))
    assert len(samples) == 10 and samples.available == 5 * SUDOKU_SHAPED.halt_max_steps
    assert set(samples.step_counts()) == set(range(1, 7)) and max(samples.step_counts().values()) <= 2
    assert samples.x.shape[0] == 10  # memory is what was kept, not puzzles x steps
    first = first_step_inputs(bundle, calib_set, RecordOptions(threads=THREADS))
    assert first.step_counts() == {1: 5}


def test_any_reader_with_get_next_feeds_the_calibrator(bundle, calib_set):
    samples = record_step_inputs(bundle, calib_set, RecordOptions(max_samples=20, threads=THREADS))
    prepared = prepare_graph(onnx.load(bundle / "graphs/step_fp32.onnx"))

    class Plain:  # the protocol only: get_next() -> dict | None
        def __init__(self):
            self.feeds = [{"x": samples.x[i:i + 3], "z_H": samples.z_H[i:i + 3], "z_L": samples.z_L[i:i + 3]}
                          for i in range(0, len(samples), 3)]

        def get_next(self):
            return self.feeds.pop(0) if self.feeds else None

    settings = CalibrationSettings(threads=THREADS, chunk_samples=6, batch_size=3)
    from_samples = calibrate(prepared, samples, settings)
    from_reader = calibrate(prepared, Plain(), settings)
    assert from_samples.samples == from_reader.samples == 20
    assert set(from_samples.data.keys()) == set(from_reader.data.keys())
    for name in from_samples.data.keys():
        assert np.allclose(from_samples.data[name].range_value, from_reader.data[name].range_value)
    class Empty:
        def get_next(self):
            return None

    with pytest.raises(CalibrationError, match="gave no data"):
        calibrate(prepared, Empty(), settings)


@pytest.mark.rounding
@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_only_what_the_int8_graph_reads_is_calibrated_and_its_ranges_are_onnx_runtimes(standard_bundle, calib_set,
                                                                                       method):
    """The calibrator collects the activation inputs of weighted MatMul/Gemm only (the attention products' too when
    asked), and fits them exactly as ONNX Runtime's own calibrator, which collects every MatMul input and output."""
    import tempfile

    import onnxruntime as ort
    from onnxruntime.quantization.calibrate import create_calibrator

    bundle = standard_bundle
    samples = record_step_inputs(bundle, calib_set, RecordOptions(max_samples=16, threads=THREADS))
    prepared = prepare_graph(onnx.load(bundle / "graphs/step_fp32.onnx"))
    settings = CalibrationSettings(method=method, threads=THREADS, chunk_samples=16, batch_size=16)
    ours, with_attention = calibrate(prepared, samples, settings), calibrate(
        prepared, samples, dataclasses.replace(settings, attention=True))
    constants = {i.name for i in prepared.graph.initializer}
    matmuls = [n for n in prepared.graph.node if n.op_type in ("MatMul", "Gemm")]
    weighted = {n.input[0] for n in matmuls if n.input[1] in constants}
    attention = {t for n in matmuls if n.input[1] not in constants for t in n.input[:2]}
    assert attention and set(ours.data.keys()) == weighted
    assert set(with_attention.data.keys()) == weighted | attention
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(prepared, Path(tmp) / "m.onnx")
        stock = create_calibrator(Path(tmp) / "m.onnx", ["MatMul", "Gemm"], str(Path(tmp) / "aug.onnx"),
                                  calibrate_method=getattr(ort.quantization.CalibrationMethod,
                                                           {"minmax": "MinMax", "entropy": "Entropy"}[method]),
                                  extra_options={"symmetric": True})
        options = ort.SessionOptions()  # ours runs at THREADS threads: the same kernels' partitioning
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
        stock.infer_session = ort.InferenceSession(stock.augmented_model_path, options,
                                                   providers=["CPUExecutionProvider"])
        stock.collect_data(samples.reader(16))
        full = stock.compute_data()
    assert weighted < set(full.keys())  # it also collected the MatMul outputs and the attention inputs
    for name in weighted:
        assert np.array_equal(ours.data[name].range_value, full[name].range_value), name
    with pytest.raises(CalibrationError, match="calibrate with CalibrationSettings\\(attention=True\\)"):
        quantize_int8(prepared, ours, Int8Options(quantize_attention=True))
    assert quantize_int8(prepared, with_attention, Int8Options(quantize_attention=True)).quantized


def test_calibration_chunks_are_bounded_by_memory():
    """A paper-size maze's 122 collected activations per sample: one sample per chunk (8 peaked at 11 GB); a small
    model keeps the configured chunk."""
    from onnx import TensorProto, helper

    from trm_export.calibration.quantize import CHUNK_BYTES, _chunk_samples

    def step(positions: int, hidden: int) -> onnx.ModelProto:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", positions, hidden])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", positions, hidden])
        return helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))

    settings = CalibrationSettings()
    assert _chunk_samples(step(916, 512), settings, 122) == 1
    assert _chunk_samples(step(400, 512), settings, 122) == CHUNK_BYTES // (122 * 400 * 3 * 512 * 4) == 3
    assert _chunk_samples(step(97, 512), settings, 122) == settings.chunk_samples  # Sudoku-Extreme: 73 MB each


def test_a_report_without_labels_says_so_and_plots_the_drift(bundle, calib_set, tmp_path):
    """Unlabelled evaluation puzzles (ARC without its dataset folder, the user's own file): no accuracy to plot, the
    report says why and still shows the drift (its plotting crashed on an empty log axis)."""
    options = dataclasses.replace(FAST, methods=("minmax",), fp16=False, mixed=False, report=True, eval_puzzles=4)
    result = add_variants(bundle, tmp_path / "q", options, heldout=calib_set)  # calib_set has no labels
    report = result.path / "report"
    assert sorted(p.name for p in report.glob("*.png")) == ["drift.png"]
    assert "the evaluation puzzles have no labels" in (report / "REPORT.md").read_text()


def test_bad_calibration_files_are_refused_with_a_reason(bundle, tmp_path):
    manifest = read_manifest(bundle)
    np.save(tmp_path / "empty.npy", np.zeros((0, 81), np.int64))
    np.save(tmp_path / "short.npy", np.ones((3, 80), np.int64))
    np.save(tmp_path / "vocab.npy", np.full((2, 81), 11, np.int64))
    np.save(tmp_path / "floats.npy", np.ones((2, 81), np.float32))
    (tmp_path / "empty.txt").write_text("# nothing here\n")
    (tmp_path / "bad.txt").write_text("12345\n")
    cases = {"empty.npy": "no puzzles", "short.npy": "81", "vocab.npy": "outside", "floats.npy": "integer",
             "empty.txt": "no sudoku puzzles", "bad.txt": r"bad.txt:1", "missing.npy": "no such file"}
    for name, message in cases.items():
        with pytest.raises(InputError, match=message):
            load_calibration_puzzles(tmp_path / name, manifest)
    good = tmp_path / "good.txt"
    good.write_text("\n".join(format_sudoku(p) for p in get_task("sudoku").split("calibration", size=3).inputs))
    assert len(load_calibration_puzzles(good, manifest)) == 3
    custom = dataclasses.replace(manifest, task=TaskEncoding(None, 11, 81, 0, None, 2, 1))
    with pytest.raises(InputError, match="no text format"):
        load_calibration_puzzles(good, custom)
    with pytest.raises(InputError, match="no calibration puzzles"):
        record_step_inputs(bundle, PuzzleSet(np.zeros((0, 81), np.int64), np.zeros(0, np.int64), None, "x"))


# --- the Q/DQ checker on hand-built graphs ----------------------------------------------------------------------

def _qdq_graph(*, zp=0, zp_type=TensorProto.INT8, scale=0.05, w_axis=1, w_scales=3, consumer="MatMul",
               act_scale_shape=(), opset=17, ir=8, with_zp=True, scale_as_input=False) -> onnx.ModelProto:
    """x[2,4] -Q/DQ-> MatMul with an int8 per-channel weight [4,3] -> Add (float) -> y: valid by default."""
    w = numpy_helper.from_array(np.arange(-6, 6, dtype=np.int8).reshape(4, 3), "w_q")
    inits = [w, numpy_helper.from_array(np.full(w_scales, 0.1, np.float32), "w_scale"),
             numpy_helper.from_array(np.zeros(w_scales, np.int8), "w_zp"),
             numpy_helper.from_array(np.full(act_scale_shape, scale, np.float32), "x_scale"),
             helper.make_tensor("x_zp", zp_type, [], [zp]), numpy_helper.from_array(np.ones(3, np.float32), "b")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])]
    if scale_as_input:
        inits = [i for i in inits if i.name != "x_scale"]
        inputs.append(helper.make_tensor_value_info("x_scale", TensorProto.FLOAT, []))
    zp_in = ["x_zp"] if with_zp else []
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", *zp_in], ["x_q"], name="x_Q"),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", *zp_in], ["x_dq"], name="x_DQ"),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="w_DQ", axis=w_axis)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])]
    if consumer == "MatMul":
        nodes.append(helper.make_node("MatMul", ["x_dq", "w_dq"], ["h"], name="proj/MatMul"))
    else:  # the activation DQ also feeds a float op: a stray pair
        nodes.append(helper.make_node("MatMul", ["x_dq", "w_dq"], ["h"], name="proj/MatMul"))
        stray_inputs = ["x_dq", "x"] if consumer == "Add" else ["x_dq"]
        nodes.append(helper.make_node(consumer, stray_inputs, ["s"], name=f"stray/{consumer}",
                                      **({"axes": [1]} if consumer == "ReduceMean" else {})))
        outputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT,
                                                     [2, 1] if consumer == "ReduceMean" else [2, 4]))
    nodes.append(helper.make_node("Add", ["h", "b"], ["y"], name="residual/Add"))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)


def test_a_valid_qdq_graph_passes():
    report = validate_qdq(_qdq_graph(), "jetson-xavier-nx")
    assert report, str(report)
    assert report.quantized_nodes == 1 and report.qdq_nodes == 3
    assert "Passed: 11/11" in str(report)


@pytest.mark.parametrize(("graph", "rule", "node"), [
    (dict(zp=3), "zero-point", "x_Q"),
    (dict(zp_type=TensorProto.UINT8, zp=0), "int8", "x_Q"),
    (dict(with_zp=False), "int8", "x_Q"),
    (dict(scale=0.0), "scale", "x_Q"),
    (dict(scale=-0.1), "scale", "x_DQ"),
    (dict(scale_as_input=True), "scale", "x_Q"),
    (dict(act_scale_shape=(4,)), "per-tensor-activation", "x_Q"),
    (dict(w_axis=0, w_scales=4), "per-channel-weight", "w_DQ"),
    (dict(w_scales=2), "per-channel-weight", "w_DQ"),
    (dict(consumer="Add"), "placement", "x_DQ"),
    (dict(consumer="Softmax"), "placement", "x_DQ"),
    (dict(consumer="ReduceMean"), "placement", "x_DQ"),
    (dict(opset=20, ir=9), "opset", "g"),
    (dict(opset=17, ir=9), "ir_version", "g"),
])
def test_each_rule_violation_is_caught_with_its_node(graph, rule, node):
    report = validate_qdq(_qdq_graph(**graph), "jetson-xavier-nx")  # opset <= 17, IR <= 8
    assert not report
    assert rule in report.failed_rules(), str(report)
    assert any(v.rule == rule and v.node == node for v in report.violations), str(report)
    assert f"[{rule}] {node}" in str(report)


def test_int32_bias_and_qoperator_ops_are_violations():
    model = _qdq_graph()
    model.graph.initializer.extend([numpy_helper.from_array(np.zeros(3, np.int32), "b_q"),
                                    numpy_helper.from_array(np.array(0.01, np.float32), "b_scale")])
    nodes = list(model.graph.node)
    nodes.insert(3, helper.make_node("DequantizeLinear", ["b_q", "b_scale"], ["b_dq"], name="b_DQ"))
    nodes[-1] = helper.make_node("Gemm", ["x_dq", "w_dq", "b_dq"], ["y"], name="head/Gemm")
    del nodes[-2]  # the MatMul
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    report = validate_qdq(model, "cpu")
    assert {"int8", "placement"} <= set(report.failed_rules()), str(report)
    assert any(v.node == "b_DQ" and "bias" in v.message for v in report.violations)

    graph = helper.make_graph(
        [helper.make_node("QLinearMatMul", ["a", "s", "z", "a", "s", "z", "s", "z"], ["y"], name="qmm")], "g",
        [helper.make_tensor_value_info("a", TensorProto.INT8, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, [2, 2])],
        [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")])
    report = validate_qdq(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    assert "qdq-format" in report.failed_rules()


@pytest.mark.rounding
def test_left_weight_products_move_to_the_right_unchanged() -> None:
    """mlp_t's export form computes W @ h; before quantization it becomes (h^T W^T)^T, same values, same node name,
    the weight as B (one transposed copy even when two calls share it)."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["W", "x"], ["y"], name="/mlp_t/gate_proj/MatMul"),
             helper.make_node("MatMul", ["W", "x"], ["y2"], name="/mlp_t/gate_proj_1/MatMul"),
             helper.make_node("Add", ["y", "y2"], ["out"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 4])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 5, 4])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rng.standard_normal((2, 3, 4)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    moved = weights_on_the_right(model)
    onnx.checker.check_model(moved)
    after = ort.InferenceSession(moved.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
    matmuls = [n for n in moved.graph.node if n.op_type == "MatMul"]
    assert [n.name for n in matmuls] == ["/mlp_t/gate_proj/MatMul", "/mlp_t/gate_proj_1/MatMul"]
    assert all(n.input[1] == "W_T" for n in matmuls)
    assert [i.name for i in moved.graph.initializer] == ["W_T"]


def test_quantize_attention_is_refused_where_attention_is_onnxruntimes_fused_op(bundle, tmp_path):
    with pytest.raises(CalibrationError, match="fused MultiHeadAttention .* re-export with --standard-ops"):
        add_variants(bundle, tmp_path / "q", dataclasses.replace(FAST, int8=Int8Options(quantize_attention=True)))
    assert not (tmp_path / "q").exists()


def test_quantizer_output_passes_the_checker_for_attention_and_mlp_t(tmp_path, quantized):
    for variant in ("int8-minmax", "int8-entropy", "int8-percentile", "int8-mixed"):
        report = validate_qdq(quantized.path / quantized.manifest.graphs[variant].file, quantized.manifest.target)
        assert report and report.quantized_nodes > 0, str(report)
    # mlp_t: the block input feeds both the token-mixing MatMul and the residual Add; the Add must stay float.
    mlpt = _export(tmp_path, dataclasses.replace(VARIANTS["trm-mlpt"], gain=0.5))
    prepared = prepare_graph(onnx.load(mlpt / "graphs/step_fp32.onnx"))
    rng = np.random.default_rng(0)
    puzzles = PuzzleSet(rng.integers(1, 11, (4, 16)), rng.integers(0, 3, 4), None, "random")
    samples = record_step_inputs(mlpt, puzzles, RecordOptions(max_samples=12, threads=THREADS))
    graph = quantize_int8(prepared, calibrate(prepared, samples, CalibrationSettings(threads=THREADS)))
    report = validate_qdq(graph.model, "jetson-agx-orin")
    assert report, str(report)
    assert report.quantized_nodes == sum(n.op_type in ("MatMul", "Gemm") for n in prepared.graph.node)


# --- INT8 / mixed / FP16 bundles ---------------------------------------------------------------------------------

@pytest.mark.rounding
def test_variant_bundle_verifies_and_runs_through_the_solver(quantized, bundle):
    path, manifest = quantized.path, quantized.manifest
    assert set(manifest.graphs) == {"fp32", "int8-minmax", "int8-entropy", "int8-percentile", "int8-mixed", "fp16",
                                    "int8-dynamic"}  # the cpu target runs ONNX Runtime: its integer MatMul form too
    assert check_bundle(path), str(check_bundle(path))
    dynamic = onnx.load(path / manifest.graphs["int8-dynamic"].file)
    ops = {n.op_type for n in dynamic.graph.node}
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= ops and "MatMul" not in ops  # every GEMM in int8
    refused = validate_qdq(dynamic, "jetson-orin-nano")  # not TensorRT's form: refused for its targets
    assert not refused and "TensorRT takes QuantizeLinear/DequantizeLinear pairs only" in str(refused)
    tokens = get_task("sudoku").split("heldout", size=5).inputs
    fp32 = Solver(path, provider="cpu", threads=THREADS).solve(tokens, mode="fixed")
    for variant, spec in manifest.graphs.items():
        assert verify_bundle(path, variant=variant, provider="cpu", threads=THREADS), variant
        model = onnx.load(path / spec.file)
        assert [i.name for i in model.graph.input] == ["x", "z_H", "z_L"]
        assert all(i.type.tensor_type.elem_type == TensorProto.FLOAT for i in [*model.graph.input,
                                                                                *model.graph.output])
        result = Solver(path, variant=variant, provider="cpu", threads=THREADS).solve(tokens, mode="fixed")
        assert result.predictions.shape == fp32.predictions.shape
        if variant == "fp32":
            continue
        tol = manifest.golden["tolerances"][variant]
        assert set(tol) == {"q_abs", "q_sign_agreement", "predictions_identical"}
        parity = manifest.parity[variant]
        assert len(parity["rel_error"]) == len(parity["cosine"]) == SUDOKU_SHAPED.halt_max_steps
        assert parity["exact_accuracy"] is not None and parity["self_check"]
        details = spec.details
        assert 0 < details["size_ratio_fp32"] < 1 and details["size_bytes"] == (path / spec.file).stat().st_size
    for method in ("minmax", "entropy", "percentile"):
        details = manifest.graphs[f"int8-{method}"].details
        assert details["calibration_method"] == method
        assert details["calibration"]["samples"] == 48 and len(details["calibration"]["per_step"]) == 6
        assert details["size_ratio_fp32"] < 0.5  # int8 weights (tiny model: the graph itself weighs a lot)
    assert manifest.graphs["int8-mixed"].precision == "mixed" and manifest.graphs["fp16"].precision == "fp16"
    # The source bundle is untouched; the fp32 graph is carried over byte for byte.
    assert (path / "graphs/step_fp32.onnx").read_bytes() == (bundle / "graphs/step_fp32.onnx").read_bytes()
    assert set(read_manifest(bundle).graphs) == {"fp32"}


@pytest.mark.rounding
def test_mixed_precision_keeps_in_float_exactly_what_it_records(quantized):
    spec = quantized.manifest.graphs["int8-mixed"]
    mixed = spec.details["mixed_precision"]
    model = onnx.load(quantized.path / spec.file)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}

    def is_quantized(node):
        return any(producers.get(i) == "DequantizeLinear" for i in node.input)

    groups = quantizable_groups(prepare_graph(onnx.load(quantized.path / "graphs/step_fp32.onnx")))
    by_node = {n: g.label for g in groups for n in g.nodes}
    floats = {by_node[n.name] for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and not is_quantized(n)}
    expected = set(mixed["float_layers"]) | {g.label for g in groups if g.kind == "activation"}
    assert floats == expected
    assert mixed["met"] == (mixed["accuracy_drop_points"] <= mixed["max_accuracy_drop_points"])
    assert mixed["criterion"] == "exact accuracy"


@pytest.mark.rounding
def test_float_layers_come_back_most_sensitive_first(bundle, calib_set, tmp_path):
    prepared = prepare_graph(onnx.load(bundle / "graphs/step_fp32.onnx"))
    samples = record_step_inputs(bundle, calib_set, RecordOptions(max_samples=12, threads=THREADS))
    ranges = calibrate(prepared, samples, CalibrationSettings(threads=THREADS))
    compare = CompareOptions(drift_puzzles=4, threads=THREADS)
    reference = run_fp32(bundle, calib_set.head(4), compare)
    # An impossible budget: layers go float in ranking order until the cap.
    result = select_float_layers(bundle, prepared, ranges, reference, reference,
                                 MixedOptions(max_accuracy_drop=-1.0, max_float_layers=2), compare=compare,
                                 work_dir=tmp_path)
    assert not result.met and len(result.float_layers) == 2
    assert list(result.float_layers) == [s.label for s in result.ranking[:2]]
    drifts = [s.logits_rel_error for s in result.ranking]
    assert drifts == sorted(drifts, reverse=True) and all(d > 0 for d in drifts[:-1])
    assert result.ranking[-1].label == "q_head"  # it moves neither z_H nor the logits, only the halting Q
    assert all(s.final_rel_error > 0 for s in result.ranking if "head" not in s.label)
    assert len(result.history) == 3
    graph = quantize_int8(prepared, ranges, Int8Options(keep_float=result.float_layers))
    assert set(result.float_layers) <= set(graph.float_layers)
    with pytest.raises(CalibrationError, match="unknown layer 'nope'.*quantizable layers: L_level"):
        quantize_int8(prepared, ranges, Int8Options(keep_float=("nope",)))


def test_fp16_keeps_norm_statistics_in_float32(bundle):
    prepared = prepare_graph(onnx.load(bundle / "graphs/step_fp32.onnx"))
    converted = convert_fp16(prepared, Fp16Options())
    norms = rms_norm_nodes(prepared)
    assert len([n for n in norms if "ReduceMean" in n]) == sum(n.op_type == "ReduceMean" for n in prepared.graph.node)
    inferred = onnx.shape_inference.infer_shapes(converted.model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    means = [n for n in converted.model.graph.node if n.op_type == "ReduceMean"]
    assert means and all(types[n.output[0]] == TensorProto.FLOAT for n in means)
    matmuls = [n for n in converted.model.graph.node if n.op_type == "MatMul"]
    assert all(types[n.output[0]] == TensorProto.FLOAT16 for n in matmuls)
    assert validate_qdq(compact_graph(converted.model), "gpu-trt11")


def test_new_bundle_is_atomic_and_never_overwrites_without_force(bundle, tmp_path, monkeypatch):
    out = tmp_path / "q.bundle"
    options = dataclasses.replace(FAST, methods=("minmax",), mixed=False, fp16=False)
    first = add_variants(bundle, out, options)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(BundleError, match="already exists; pass --force"):
        add_variants(bundle, out, options)
    assert (out / "manifest.json").read_bytes() == before

    import trm_export.calibration.variants as variants

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted mid-way")

    monkeypatch.setattr(variants, "compare_graph", broken)  # files staged, a graph written
    with pytest.raises(RuntimeError, match="interrupted"):
        add_variants(bundle, tmp_path / "other.bundle", options)
    assert not (tmp_path / "other.bundle").exists() and not list(tmp_path.glob(".other.bundle.*"))
    with pytest.raises(RuntimeError, match="interrupted"):
        add_variants(bundle, out, dataclasses.replace(options, force=True))
    assert (out / "manifest.json").read_bytes() == before  # the old bundle survives a failed replacement
    monkeypatch.undo()
    second = add_variants(bundle, out, dataclasses.replace(options, force=True))
    assert second.path == first.path and read_manifest(out)
    assert not list(tmp_path.glob(".q.bundle.*"))
    assert json.loads((out / "manifest.json").read_text())["graphs"]["int8-minmax"]["precision"] == "int8"


def test_check_bundle_flags_a_precision_the_graph_does_not_hold(quantized, tmp_path):
    import shutil

    from trm_export.runtime.manifest import seal, sha256_file

    copy = tmp_path / "copy.bundle"
    shutil.copytree(quantized.path, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["graphs"]["int8-minmax"]["file"] = data["graphs"]["fp32"]["file"]  # claims int8, holds fp32
    data["files"] = {k: sha256_file(copy / k) for k in data["files"]}
    (copy / "manifest.json").write_text(seal(data))
    report = check_bundle(copy)
    assert not report and not report.graphs["int8-minmax"] and report.graphs["fp16"]
    assert "no MatMul/Gemm is quantized" in str(report)


def test_options_are_checked_up_front():
    with pytest.raises(CalibrationError, match="unknown calibration method 'kl'; available: minmax"):
        CalibrationSettings(method="kl")
    with pytest.raises(CalibrationError, match=r"unknown calibration method\(s\) \['kl'\]"):
        QuantizeOptions(methods=("kl",))


def test_the_plan_sizes_the_evaluation_calibration_and_methods_from_the_work(bundle, tmp_path, monkeypatch):
    """Without --eval-puzzles / --calib-puzzles the plan sizes them from the model's FLOPs (budgets shrunk here, as
    for a paper-size model): the FP32 reference and every variant on the same first puzzles, the calibration
    puzzles, the methods the budget covers (at least one); mixed precision not built past its budget; each said."""
    import trm_export.planning.plan as planning

    for stage in ("evaluation", "calibration", "methods", "mixed"):
        monkeypatch.setitem(planning.BUDGET, stage, 1e-9)
    lines: list[str] = []
    options = dataclasses.replace(FAST, eval_puzzles=None, calib_puzzles=None, fp16=False, mixed=None,
                                  mixed_options=dataclasses.replace(FAST.mixed_options, max_accuracy_drop=-1.0))
    result = add_variants(bundle, tmp_path / "q", options, log=lines.append)
    plan = result.manifest.plan
    assert (plan["eval_puzzles"], plan["screen_puzzles"], plan["calib_puzzles"], plan["methods"]) == (
        1, 1, 1, ["minmax"])
    assert result.manifest.parity["int8-minmax"]["puzzles"] == 1 and result.samples["puzzles"] == 1
    assert any(line.startswith("  evaluation: 1 of ") for line in lines)
    assert result.not_built == ["entropy", "percentile"] and "int8-percentile" not in result.manifest.graphs
    assert any(line.startswith("int8-entropy, int8-percentile not built: past the plan's work budget")
               and "--methods entropy,percentile" in line for line in lines)
    # int8-minmax misses the (impossible) accuracy budget, and mixed precision is past its budget
    assert "int8-mixed" not in result.manifest.graphs
    assert any(line.startswith("int8-mixed not built: int8-minmax misses the -1-point budget") for line in lines)
    # flags override the plan, and the record says so
    again = add_variants(bundle, tmp_path / "r", dataclasses.replace(options, eval_puzzles=3, methods=("entropy",)),
                         log=lines.append)
    assert (again.manifest.plan["eval_puzzles"], again.manifest.plan["methods"]) == (3, ["entropy"])
    assert again.manifest.plan["set_by"] == {"eval_puzzles": "--eval-puzzles", "methods": "--methods"}


def _trajectory(exact: list[bool] | None, answers: list[int]) -> Trajectory:
    n = len(answers)
    return Trajectory(1, "q", np.zeros((1, n), np.float32), np.zeros((1, n), np.float32),
                      None if exact is None else np.array([exact]), None,
                      np.array(answers, np.int64).reshape(n, 1))


def _comparison(variant: str, trajectory: Trajectory, identical: float = 1.0, exact: float | None = None,
                fp32_exact: float | None = None) -> VariantComparison:
    return VariantComparison(variant, trajectory.puzzles, 1, "test", 0, identical, 1.0, [0.0], [1.0],
                             exact_accuracy=exact, fp32_exact_accuracy=fp32_exact, trajectory=trajectory)


def test_the_lowest_possible_drop_bounds_what_the_other_puzzles_can_change():
    """A screened variant is not measured further when no answers on the other puzzles can bring it within the
    budget: with labels it may at most solve every puzzle fp32 fails there; without, a changed answer stays."""
    reference = _trajectory([True, True, True, False, True], [1, 2, 3, 4, 5])
    both_wrong = _comparison("int8-minmax", _trajectory([False, False], [0, 0]), 0.0, 0.0, 1.0)
    assert lowest_drop(both_wrong, reference) == pytest.approx(100 * (2 - 1) / 5)  # fp32 fails one of the rest
    one_wrong = _comparison("int8-minmax", _trajectory([False, True], [0, 2]), 0.5, 0.5, 1.0)
    assert lowest_drop(one_wrong, reference) == 0.0  # the rest could make up for it
    unlabelled = _trajectory(None, [1, 2, 3, 4, 5])
    changed = _comparison("fp16", _trajectory(None, [9]), identical=0.0)
    assert lowest_drop(changed, unlabelled) == pytest.approx(20.0)
    same = _comparison("fp16", _trajectory(None, [1]), identical=1.0)
    assert lowest_drop(same, unlabelled) == 0.0


def test_the_choice_measures_a_screened_fallback_only_within_its_planned_puzzles():
    """A screened variant that could be chosen is measured on every puzzle only when the plan's choice_puzzles
    cover the rest; otherwise it is not chosen, and the note says why and how."""
    import trm_export.calibration.variants as variants

    n = 5
    full = _comparison("int8-minmax", _trajectory(None, [0] * n), identical=0.0)  # misses: 100 points
    screened = _comparison("fp16", _trajectory(None, [1]), identical=1.0)  # within the budget on 1 of 5
    timings = {v: (StepTiming(1, 1, 1.0, 1.0, 1.0, 1.0), StepTiming(1, 1, 1.0, 1.0, 1.0, 1.0))
               for v in ("fp32", "int8-minmax", "fp16")}
    measured: list[str] = []

    def measure(variant: str, puzzles: int) -> VariantComparison:
        measured.append(variant)
        comparisons[variant] = _comparison(variant, _trajectory(None, [1] * puzzles), identical=1.0)
        return comparisons[variant]

    for allowed in (4, 3, 10):
        comparisons = {"int8-minmax": full, "fp16": screened}
        measured.clear()
        said: list[str] = []
        budget = variants._ChoiceBudget(allowed, n, said.append)
        chosen, record = variants._choose("int8", comparisons, 0.5, timings, n, measure, budget)
        fits = n - 1 <= allowed
        assert chosen == ("fp16" if fits else "fp32"), allowed
        assert measured == (["fp16"] if fits else [])
        assert record["missed_budget"] == {"int8-minmax": 100.0} and record["puzzles"] == n
        if not fits:
            assert budget.skipped == said and len(said) == 1
            assert said[0].startswith("fp16 not chosen: within the budget on the first 1 evaluation puzzles")
            assert f"past the {allowed} puzzles the plan gives the choice" in said[0] and "--eval-puzzles N" in said[0]
            assert record["screened_only"] == {"fp16": {"puzzles": 1, "accuracy_drop_points": 0.0}}
