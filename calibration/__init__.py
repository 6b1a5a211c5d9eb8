"""Recursion-aware INT8 (and FP16) for step graphs that a loop applies hundreds of times per puzzle.

    from trm_export.calibration import add_variants, QuantizeOptions, check_bundle
    result = add_variants("sudoku.bundle", "sudoku-q.bundle")        # int8-minmax/-entropy/-percentile, int8-mixed
    print(result.summary())
    print(check_bundle("sudoku-q.bundle"))                            # Q/DQ rules + target opset/IR, every graph

Modules: `data` (recording step inputs at every step, ONNX Runtime-style readers, --calib files), `quantize`
(calibration and explicit Q/DQ INT8 with ONNX Runtime's quantizer), `qdq` (TensorRT's Q/DQ rules as a
checker), `mixed` (float layers by end-of-loop sensitivity), `fp16`, `compare` (drift against FP32 through the
runtime's loop), `graph` (passes shared by all), `variants` (the one call that writes a new bundle).

Choices measured on the tiny test models (random weights, so answers sit near ties; the trained reference
models are measured by benchmarks/calibration_recursion.py):
- calibrating on every step's inputs instead of step 1 only cut the final z_H drift about 3x (maze-shaped
  model: relative error after 16 steps 1.0e-2 vs 3.2e-2) and doubled the share of answers identical to FP32;
- quantizing the attention products (q @ k^T, softmax @ v) raised the drift and lowered identical answers
  (56% vs 72%), so `Int8Options.quantize_attention` defaults to False;
- a float32 softmax in the FP16 graph changed nothing measurable, so only the norm statistics stay float32
  by default (TensorRT fuses a float16 softmax into its attention kernels).
"""

from trm_export.calibration.compare import CompareOptions, VariantComparison, compare_graph, run_fp32
from trm_export.calibration.data import (
    CalibrationDataReader,
    CalibrationError,
    PuzzleSet,
    RecordOptions,
    StepInputReader,
    StepSamples,
    first_step_inputs,
    load_calibration_puzzles,
    record_step_inputs,
    task_split,
)
from trm_export.calibration.fp16 import Fp16Options, convert_fp16
from trm_export.calibration.mixed import MixedOptions, MixedResult, select_float_layers
from trm_export.calibration.qdq import BundleCheck, QdqReport, Violation, check_bundle, validate_qdq
from trm_export.calibration.quantize import METHODS, CalibrationSettings, Int8Options, calibrate, quantize_int8
from trm_export.calibration.variants import QuantizeOptions, QuantizeResult, add_variants

__all__ = [
    "METHODS",
    "BundleCheck",
    "CalibrationDataReader",
    "CalibrationError",
    "CalibrationSettings",
    "CompareOptions",
    "Fp16Options",
    "Int8Options",
    "MixedOptions",
    "MixedResult",
    "PuzzleSet",
    "QdqReport",
    "QuantizeOptions",
    "QuantizeResult",
    "RecordOptions",
    "StepInputReader",
    "StepSamples",
    "VariantComparison",
    "Violation",
    "add_variants",
    "calibrate",
    "check_bundle",
    "compare_graph",
    "convert_fp16",
    "first_step_inputs",
    "load_calibration_puzzles",
    "quantize_int8",
    "record_step_inputs",
    "run_fp32",
    "select_float_layers",
    "task_split",
    "validate_qdq",
]
