"""TensorRT backend: the recurrent state lives on the GPU; per step only q_halt / q_continue come to the host.

Two state buffer sets (ping-pong: step k reads A and writes B, step k+1 the reverse; an input never shares a
pointer with an output), `execute_async_v3` on a non-default stream, and, for the full-batch shape, one CUDA
graph per direction captured after a warm-up and replayed. Memory and streams through cuda-python (JetPack
ships it; desktop: `pip install cuda-python`). Imported lazily by the Solver.

Written against the documented TensorRT 8.5 / 10.x / 11.x and CUDA runtime APIs; it has not run in this
project's CI (no GPU there): `scripts/gpu_check.sh` exercises it where TensorRT and a GPU exist.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trm_export.errors import BundleError


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as exc:
            raise BundleError(f"the TensorRT backend needs cuda-python ({exc}); `pip install cuda-python`") from None
    return cudart


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise BundleError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


def check_engine_here(record: dict) -> None:
    """Refuse an engine built for another TensorRT version or GPU: engines are not portable."""
    import tensorrt as trt

    cu = _cudart()
    major = _check(cu.cudaDeviceGetAttribute(cu.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, 0))
    minor = _check(cu.cudaDeviceGetAttribute(cu.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, 0))
    engine_compatibility_error = incompatibility(record, trt.__version__, f"{major}.{minor}")
    if engine_compatibility_error:
        raise BundleError(engine_compatibility_error)


def incompatibility(record: dict, trt_version: str, sm: str) -> str | None:
    """Why an engine recorded in a manifest cannot run here (None when it can)."""
    built_version, built_sm = record["tensorrt_version"], record["sm"]
    if built_version.split(".")[:2] != trt_version.split(".")[:2] or built_sm != sm:
        return (f"engine {record['file']} was built with TensorRT {built_version} for SM {built_sm}; this device has "
                f"TensorRT {trt_version}, SM {sm}. Engines are not portable: rebuild it here with "
                "`trm-export build BUNDLE` (or build/build_engines.sh)")
    return None


class TensorRTBackend:
    """Backend protocol (runtime/backend.py) on a deserialized TensorRT engine."""

    def __init__(self, engine_path: Path, capacity: int, state_shape: tuple[int, int], seq_len: int, vocab: int):
        import tensorrt as trt

        self.cudart = cu = _cudart()
        self.trt = trt
        self.name = f"tensorrt {trt.__version__}"
        self.capacity = capacity
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise BundleError(f"TensorRT could not deserialize {engine_path}; rebuild it on this device")
        self.context = self.engine.create_execution_context()
        self.stream = _check(cu.cudaStreamCreate())
        s, d = state_shape
        self.row = {"state": s * d * 4, "logits": seq_len * vocab * 4}
        self.shape_state, self.shape_logits = (s, d), (seq_len, vocab)
        nbytes = capacity * self.row["state"]
        self.x = _check(cu.cudaMalloc(nbytes))
        self.z = [[_check(cu.cudaMalloc(nbytes)) for _ in range(2)] for _ in range(2)]  # [z_H, z_L][ping, pong]
        self.logit_buf = _check(cu.cudaMalloc(capacity * self.row["logits"]))
        self.q_dev = [_check(cu.cudaMalloc(capacity * 4)) for _ in range(2)]
        self.q_host = np.zeros((2, capacity), np.float32)
        self.current = 0
        self.graphs: dict[tuple[int, int], object] = {}  # (n, direction) -> instantiated CUDA graph

    def _copy(self, dst: int, src: int, nbytes: int, kind) -> None:
        _check(self.cudart.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream))

    def _sync(self) -> None:
        _check(self.cudart.cudaStreamSynchronize(self.stream))

    def load(self, slots: np.ndarray, x: np.ndarray, z_H: np.ndarray, z_L: np.ndarray) -> None:
        h2d = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        rows = [np.ascontiguousarray(a, dtype=np.float32) for a in (x, z_H, z_L)]
        targets = (self.x, self.z[0][self.current], self.z[1][self.current])
        for base, host in zip(targets, rows):  # noqa: B905 - three and three; zip(strict=) needs 3.10, this runs on 3.8
            for i, slot in enumerate(slots):
                self._copy(int(base) + int(slot) * self.row["state"], host[i].ctypes.data, self.row["state"], h2d)
        self._sync()  # host arrays may be freed after return

    def move(self, src: np.ndarray, dst: np.ndarray) -> None:
        d2d = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        if len(src) != len(dst):  # what zip(strict=True) checked; the runtime runs on 3.8
            raise ValueError(f"move: {len(src)} source slots but {len(dst)} destination slots")
        for base in (self.x, self.z[0][self.current], self.z[1][self.current]):
            for s, t in zip(src, dst):  # noqa: B905 - lengths checked above (zip(strict=) needs 3.10)
                self._copy(int(base) + int(t) * self.row["state"], int(base) + int(s) * self.row["state"],
                           self.row["state"], d2d)

    def _bind(self, n: int, src: int, dst: int) -> None:
        shape = (n, *self.shape_state)
        for name in ("x", "z_H", "z_L"):
            self.context.set_input_shape(name, shape)
        addresses = {"x": self.x, "z_H": self.z[0][src], "z_L": self.z[1][src], "z_H_out": self.z[0][dst],
                     "z_L_out": self.z[1][dst], "logits": self.logit_buf, "q_halt": self.q_dev[0],
                     "q_continue": self.q_dev[1]}
        for name, ptr in addresses.items():
            self.context.set_tensor_address(name, int(ptr))

    def step(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        cu = self.cudart
        src, dst = self.current, 1 - self.current
        key = (n, src)
        if n == self.capacity and key in self.graphs:
            _check(cu.cudaGraphLaunch(self.graphs[key], self.stream))
        else:
            self._bind(n, src, dst)
            if not self.context.execute_async_v3(int(self.stream)):
                raise BundleError("TensorRT execution failed")
            if n == self.capacity:  # warmed up for this direction: capture it for replay
                self._bind(n, src, dst)
                _check(cu.cudaStreamBeginCapture(self.stream, cu.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))
                self.context.execute_async_v3(int(self.stream))
                graph = _check(cu.cudaStreamEndCapture(self.stream))
                self.graphs[key] = _check(cu.cudaGraphInstantiate(graph, 0))
                # The capture recorded the step without running it; the warm-up run above already advanced the
                # state from `src` to `dst`, so nothing else to do for this step.
        d2h = cu.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for i in range(2):
            self._copy(self.q_host[i].ctypes.data, int(self.q_dev[i]), n * 4, d2h)
        self._sync()
        self.current = dst
        return self.q_host[0, :n].copy(), self.q_host[1, :n].copy()

    def logits(self, slots: np.ndarray) -> np.ndarray:
        out = np.zeros((len(slots), *self.shape_logits), np.float32)
        d2h = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for i, slot in enumerate(slots):
            self._copy(out[i].ctypes.data, int(self.logit_buf) + int(slot) * self.row["logits"], self.row["logits"],
                       d2h)
        self._sync()
        return out

    def state(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        d2h = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        out = [np.zeros((n, *self.shape_state), np.float32) for _ in range(2)]
        for which in range(2):
            self._copy(out[which].ctypes.data, int(self.z[which][self.current]), n * self.row["state"], d2h)
        self._sync()
        return out[0], out[1]

    def __del__(self) -> None:
        cu = getattr(self, "cudart", None)
        if cu is None:
            return
        for ptr in [self.x, self.logit_buf, *self.q_dev, *(p for pair in self.z for p in pair)]:
            cu.cudaFree(ptr)
