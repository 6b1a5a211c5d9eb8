"""trm-export: deploy tiny recursive reasoning models (TRM, HRM) to devices.

Subpackages:
  export       checkpoint loading, PyTorch reference, ONNX step graphs, bundles (needs torch, onnx)
  runtime      the small torch-free loop that device apps embed (numpy + onnxruntime)
  calibration  recursion-aware INT8 calibration and quantization
  targets      deployment targets and TensorRT engine building
  tasks        Sudoku and maze puzzles in the official token encodings
"""

from trm_export.errors import BundleError, CheckpointError, ConfigError, InputError, TrmExportError

__version__ = "0.1.0"

__all__ = ["BundleError", "CheckpointError", "ConfigError", "InputError", "TrmExportError", "__version__"]
