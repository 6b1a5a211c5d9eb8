"""The one interface every backend implements, and ONNX Runtime's implementation of it.

A backend owns the recurrent state of `capacity` batch slots in its own memory (host arrays for the CPU,
device buffers for CUDA / TensorRT) and advances it one ACT step at a time. Per step only the Q values come
back to the caller; logits and states are read for the slots that need them. Slots [0, n) are the active ones:
the loop keeps them packed at the front, so a step can run on a smaller batch once the queue runs dry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from trm_export.errors import BundleError
from trm_export.runtime.cpus import quota_threads
from trm_export.runtime.graph_file import read_graph
from trm_export.runtime.step_watch import StepWatch

STEP_INPUTS = ("x", "z_H", "z_L")
STEP_OUTPUTS = ("z_H_out", "z_L_out", "logits", "q_halt", "q_continue")


class Backend(Protocol):
    name: str
    capacity: int

    def load(self, slots: np.ndarray, x: np.ndarray, z_H: np.ndarray, z_L: np.ndarray) -> None:
        """Put new puzzles (their embedding and initial state) into `slots`."""

    def move(self, src: np.ndarray, dst: np.ndarray) -> None:
        """Copy the puzzles in slots `src` to slots `dst` (to keep active slots packed)."""

    def step(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Advance slots [0, n) one ACT step; return q_halt[n], q_continue[n] on the host."""

    def logits(self, slots: np.ndarray) -> np.ndarray:
        """Logits [len(slots), seq_len, vocab] of the last step for `slots`."""

    def state(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """z_H, z_L [n, S, D] of slots [0, n) (copies on the host; for verification and drift)."""


def importable(module: str) -> bool:
    """Whether an optional engine (tensorrt, openvino) is installed, without importing it."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def onnxruntime_providers(requested: str | None) -> list[str]:
    """Execution providers for `requested` ('cpu', 'cuda', 'tensorrt' or None = best available)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    names = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
    if requested is None:
        order = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        return [p for p in order if p in available]
    if requested not in names:
        raise BundleError(f"unknown ONNX Runtime provider {requested!r}; known: {sorted(names)}")
    if names[requested] not in available:
        raise BundleError(f"requested provider was {names[requested]}, but available providers are {available}")
    return [names[requested]] + (["CPUExecutionProvider"] if requested != "cpu" else [])


class HostSlots:
    """The state of `capacity` slots in host arrays, ping-ponged between steps: what a CPU engine reads and writes
    in place (ONNX Runtime binds them, OpenVINO wraps them as shared tensors), so a step copies nothing."""

    def __init__(self, capacity: int, state_shape: tuple[int, int], seq_len: int, vocab: int) -> None:
        self.capacity = capacity
        s, d = state_shape
        self.x = np.zeros((capacity, s, d), np.float32)
        self.z = [np.zeros((2, capacity, s, d), np.float32) for _ in range(2)]  # [z_H, z_L] x [ping, pong]
        self.current = 0  # which of ping/pong holds the state
        self.logit_buf = np.zeros((capacity, seq_len, vocab), np.float32)
        self.q = np.zeros((2, capacity), np.float32)

    def buffers(self, n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(inputs, outputs) of the next step on slots [0, n), by the step graph's names; contiguous views."""
        src, dst = self.current, 1 - self.current
        inputs = {"x": self.x[:n], "z_H": self.z[0][src, :n], "z_L": self.z[1][src, :n]}
        outputs = {"z_H_out": self.z[0][dst, :n], "z_L_out": self.z[1][dst, :n], "logits": self.logit_buf[:n],
                   "q_halt": self.q[0, :n], "q_continue": self.q[1, :n]}
        return inputs, outputs

    def stepped(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The outputs of `buffers(n)` now hold the next state: make it current; return q_halt, q_continue."""
        self.current = 1 - self.current
        return self.q[0, :n].copy(), self.q[1, :n].copy()

    def load(self, slots: np.ndarray, x: np.ndarray, z_H: np.ndarray, z_L: np.ndarray) -> None:
        self.x[slots] = x
        self.z[0][self.current, slots] = z_H
        self.z[1][self.current, slots] = z_L

    def move(self, src: np.ndarray, dst: np.ndarray) -> None:
        self.x[dst] = self.x[src]
        for z in self.z:
            z[self.current, dst] = z[self.current, src]
        self.logit_buf[dst] = self.logit_buf[src]

    def logits(self, slots: np.ndarray) -> np.ndarray:
        return self.logit_buf[slots]

    def state(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.z[0][self.current, :n].copy(), self.z[1][self.current, :n].copy()


def check_step_io(model_path: Path, inputs: set[str], outputs: set[str]) -> None:
    """A step graph takes exactly STEP_INPUTS and gives at least STEP_OUTPUTS."""
    if inputs != set(STEP_INPUTS) or not set(STEP_OUTPUTS) <= outputs:
        raise BundleError(f"{model_path}: not a step graph (inputs {sorted(inputs)}, outputs {sorted(outputs)}; "
                          f"expected {list(STEP_INPUTS)} -> {list(STEP_OUTPUTS)})")


class OnnxRuntimeBackend(HostSlots):
    """ONNX Runtime with IO binding: inputs and outputs bound to preallocated arrays, states ping-ponged.

    On the CPU provider the bound arrays are the session's own buffers (no copy per step). On a GPU provider
    the same binding works through host memory; keeping state on the device there is the TensorRT backend's
    job (targets).
    """

    def __init__(self, model_path: Path, capacity: int, state_shape: tuple[int, int], seq_len: int, vocab: int,
                 provider: str | None = None, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = threads or quota_threads()  # a container's CPU limit, which ONNX Runtime's default ignores
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.providers = onnxruntime_providers(provider)
        graph = read_graph(model_path)  # the bytes, every weight inside them: no path for ONNX Runtime to follow
        try:
            self.session = ort.InferenceSession(graph, options, providers=self.providers)
        except Exception as exc:  # ONNX Runtime's own exception types: a broken or foreign graph
            raise BundleError(f"{model_path}: ONNX Runtime cannot load this graph ({_first_line(exc)}); "
                              "re-export the bundle") from None
        check_step_io(model_path, {i.name for i in self.session.get_inputs()},
                      {o.name for o in self.session.get_outputs()})
        self.name = f"onnxruntime ({self.session.get_providers()[0]})"
        super().__init__(capacity, state_shape, seq_len, vocab)
        self.binding = self.session.io_binding()
        self.run_options = ort.RunOptions()
        self.watch = StepWatch(lambda: setattr(self.run_options, "terminate", True), str(model_path))

    def step(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        inputs, outputs = self.buffers(n)
        for name, array in inputs.items():
            self.binding.bind_input(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
        for name, array in outputs.items():
            self.binding.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
        self.run_options.terminate = False
        with self.watch.step(n):
            try:
                self.session.run_with_iobinding(self.binding, self.run_options)
            except Exception as exc:  # shapes the graph does not take, a kernel failure, the watch's cancel
                raise BundleError(f"step graph failed in ONNX Runtime: {_first_line(exc)}") from None
        return self.stepped(n)
