"""trm-export: deploy tiny recursive reasoning models (TRM, HRM) to devices.

Subpackages:
  export       checkpoint loading, PyTorch reference, ONNX step graphs, bundles (needs torch, onnx)
  runtime      the small torch-free loop that device apps embed (numpy + onnxruntime)
  calibration  recursion-aware INT8 calibration and quantization
  targets      deployment targets and TensorRT engine building
  tasks        Sudoku and maze puzzles in the official token encodings
"""

import os

# ONNX Runtime (1.2x and newer on Linux) starts a telemetry client when it is imported: it writes a device id and
# an event queue (CPU model, OS, Python path, model file names) under $HOME/.cache/Microsoft and $TMPDIR/.ses.
# trm-export writes nowhere but its outputs, so it turns that off before any of its modules imports onnxruntime;
# a user who wants it sets ORT_DISABLE_TELEMETRY=0. (An app that imported onnxruntime before trm_export has
# already started it: set the variable in its environment.)
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from trm_export.errors import BundleError, CheckpointError, ConfigError, InputError, TrmExportError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["BundleError", "CheckpointError", "ConfigError", "InputError", "TrmExportError", "__version__"]
