"""OpenVINO's CPU plugin behind the runtime's Backend interface (`backend="openvino"`): optional, imported lazily.

The same step graph file and the same host slots as ONNX Runtime (backend.HostSlots): the arrays are handed to
OpenVINO as shared tensors, inputs and outputs, so a step copies nothing. OpenVINO compiles the ONNX graph itself
(its own fusions and kernels), which on some models and batch sizes is faster than ONNX Runtime on the same file
(benchmarks/cpu_speed.py measures both; `trm-export tune` on the device). The cpu target's contrib ops (fused
attention and rope) are read through runtime/openvino_ops.py, not OpenVINO's own converters (one computes wrongly).

Arithmetic: the graph's own, always. On a CPU with AVX512_BF16 or AMX OpenVINO's default inference precision is
bfloat16 (faster, and not what the graph computes); we ask for float32 (`INFERENCE_PRECISION_HINT`), so that
answers stay what the bundle's golden vectors and parity describe. A quantized (Q/DQ) variant runs in int8 as
OpenVINO lowers it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trm_export.errors import BundleError
from trm_export.runtime import openvino_ops
from trm_export.runtime.backend import HostSlots, _first_line, check_step_io
from trm_export.runtime.cpus import quota_threads
from trm_export.runtime.graph_file import read_graph
from trm_export.runtime.step_watch import StepWatch

HOW_TO_INSTALL = "pip install openvino (or trm-export[openvino])"
# OpenVINO 2024.0-2024.2 compute our attention steps wrongly, in either export form (the maze reference model:
# logits 50 off after one step; 2024.3, 2024.6, 2025.0 and 2026.4 agree with ONNX Runtime within 2e-5).
OLDEST_CORRECT = (2024, 3)


def check_version(version: str) -> None:
    """Refuse an OpenVINO release known to compute these graphs wrongly (its version string: "2024.2.0-15519-...")."""
    try:
        year_minor = tuple(int(part) for part in version.split("-")[0].split(".")[:2])
    except ValueError:
        return  # a development build: the golden self-check judges it
    if year_minor < OLDEST_CORRECT:
        raise BundleError(f"OpenVINO {version.split('-')[0]} computes these step graphs wrongly (fixed in "
                          f"{'.'.join(map(str, OLDEST_CORRECT))}): pip install 'openvino>={OLDEST_CORRECT[0]}."
                          f"{OLDEST_CORRECT[1]}', or use --backend onnxruntime")


class OpenVinoBackend(HostSlots):
    """One compiled model and one infer request on the CPU plugin, latency mode (one stream), float32."""

    def __init__(self, model_path: Path, capacity: int, state_shape: tuple[int, int], seq_len: int, vocab: int,
                 threads: int | None = None, inference_precision: str = "f32"):
        """`inference_precision`: "f32" (the graph's arithmetic: what the runtime always uses) or "bf16" (OpenVINO's
        default on CPUs with AVX512_BF16 / AMX; another arithmetic, measured by benchmarks/cpu_speed.py, never
        chosen by the runtime)."""
        if inference_precision not in ("f32", "bf16"):
            raise ValueError(f"inference_precision must be 'f32' or 'bf16', got {inference_precision!r}")
        try:
            import openvino as ov
        except ImportError:
            raise BundleError(f"backend 'openvino' requested, but OpenVINO is not installed here: "
                              f"{HOW_TO_INSTALL}") from None
        check_version(ov.__version__)
        read_graph(model_path)  # refused unless every weight is inside the file
        config: dict[str, object] = {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": "LATENCY"}
        threads = threads or quota_threads()  # a container's CPU limit, which OpenVINO's default ignores
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            core = ov.Core()
            openvino_ops.register(core)
            self.compiled = core.compile_model(str(model_path), "CPU", config)  # checked: self-contained
        except Exception as exc:  # OpenVINO's own exception types: a broken graph, an op it does not have
            raise BundleError(f"{model_path}: OpenVINO cannot compile this graph ({openvino_ops.reason(exc)}); "
                              "run it with --backend onnxruntime") from None
        names = [set().union(*(port.get_names() for port in ports)) if ports else set()
                 for ports in (self.compiled.inputs, self.compiled.outputs)]
        check_step_io(model_path, names[0], names[1])
        self.name = f"openvino {ov.__version__.split('-')[0]} (CPU, {inference_precision})"
        super().__init__(capacity, state_shape, seq_len, vocab)
        self.request = self.compiled.create_infer_request()
        self.watch = StepWatch(self.request.cancel, str(model_path))
        self._tensor = ov.Tensor

    def step(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        inputs, outputs = self.buffers(n)
        for name, array in {**inputs, **outputs}.items():  # views of our slots: OpenVINO reads and writes in place
            self.request.set_tensor(name, self._tensor(array, shared_memory=True))
        with self.watch.step(n):
            try:
                self.request.infer()
            except Exception as exc:  # shapes the graph does not take, a kernel failure, the watch's cancel
                raise BundleError(f"step graph failed in OpenVINO: {_first_line(exc)}") from None
        return self.stepped(n)
