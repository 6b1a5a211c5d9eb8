"""What the loop model does inside Triton's Python backend: requests in, SolverStream, responses out.

`model.py` (copied into the repository) is only the Python backend's entry points; everything here is plain
Python that takes Triton's utility module as an argument, so that it reads without Triton in mind.

Requests are answered out of order, as their puzzles halt: `execute` hands each request to the stream and returns
None at once, and the stream's loop thread sends the response through the request's response sender when its
last puzzle halts (Triton's Python backend allows this in its default, non-decoupled mode: one response per
request, flagged final). So requests that arrive while others are running join the same batch (continuous refill
across requests) and HTTP and plain gRPC clients work, which a decoupled model would not allow.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trm_export.errors import InputError, TrmExportError
from trm_export.runtime.stream import SolverStream

INPUTS = ("puzzles", "puzzle_ids")
OUTPUTS = ("predictions", "steps", "q_halt", "q_continue")
BUNDLE_DIR = "bundle"  # beside model.py in the model's version folder


@dataclass(frozen=True)
class LoopParameters:
    """The loop model's `parameters` in config.pbtxt (all strings there; "" = the default)."""

    variant: str | None = None
    mode: str = "adaptive"
    halting: str = "q"
    max_steps: int | None = None
    min_steps: int = 1
    batch_size: int = 64
    threads: int | None = None
    backend: str = "auto"
    max_puzzles: int = 256

    @classmethod
    def from_config(cls, config: dict) -> LoopParameters:
        raw = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        unknown = sorted(set(raw) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"config.pbtxt: unknown parameter(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        values = {}
        for name, text in raw.items():
            if text == "":
                continue
            if name in ("max_steps", "min_steps", "batch_size", "threads", "max_puzzles"):
                if not text.isdigit():
                    raise InputError(f"config.pbtxt: parameter {name} must be a whole number, got {text!r}")
                values[name] = int(text)
            else:
                values[name] = text
        return cls(**values)

    def as_config(self) -> dict[str, str]:
        return {k: "" if v is None else str(v) for k, v in self.__dict__.items()}


def tensors_survive(pb_utils) -> bool:
    """Whether numpy arrays cross into Triton tensors and back intact in this stub. A stub built for numpy 1.x
    running with numpy 2 loses tensor data silently (every answer would come back empty); a DLPack round trip
    shows it."""
    probe = np.arange(1, 6, dtype=np.int64)
    tensor = pb_utils.Tensor("probe", probe)
    if not hasattr(tensor, "to_dlpack"):
        return bool(np.array_equal(tensor.as_numpy(), probe))
    back = pb_utils.Tensor.from_dlpack("probe", tensor.to_dlpack()).as_numpy()
    return bool(np.array_equal(back, probe))


class LoopMetrics:
    """What an operator of a recursive model watches, beside Triton's own counters, on the metrics port (the Python
    backend's custom metrics, `trm_*`): puzzles answered, the steps they ran (their ratio: mean steps), how many ran
    to the step limit instead of halting, requests answered and the seconds from their arrival to their answer, the
    seconds puzzles waited in the queue for a slot (over puzzles answered: the mean queue wait), puzzles in flight.
    The stream's thread only adds to plain counters; they reach Triton from Triton's own thread (`flush`, at every
    `execute`): metric calls from the stream's thread made requests fail under load. A stub without the metrics API
    (before Triton 23.05) serves without them."""

    NAMES = ("trm_puzzles_total", "trm_steps_total", "trm_puzzles_at_step_limit_total", "trm_requests_total",
             "trm_request_seconds_total", "trm_queue_seconds_total", "trm_puzzles_in_flight")

    def __init__(self, pb_utils, labels: dict[str, str]):
        import threading

        self.lock = threading.Lock()
        self.pending = dict.fromkeys(self.NAMES, 0.0)
        self.metrics, self.families = {}, []  # families kept alive: deleting one invalidates its metrics
        family = getattr(pb_utils, "MetricFamily", None)
        if family is None:
            return
        for name in self.NAMES:
            kind = family.GAUGE if name == "trm_puzzles_in_flight" else family.COUNTER
            try:
                self.families.append(family(name=name, description=name.replace("_", " "), kind=kind))
                self.metrics[name] = self.families[-1].Metric(labels=labels)
            except Exception:  # the stub's own error types: serve without this metric
                continue

    def add(self, name: str, value: float) -> None:
        """Any thread: counted here, reported at the next flush."""
        with self.lock:
            self.pending[name] += value

    def flush(self) -> None:
        """Triton's thread: what was counted since the last flush, onto the metrics."""
        with self.lock:
            pending, self.pending = self.pending, dict.fromkeys(self.NAMES, 0.0)
        for name, value in pending.items():
            metric = self.metrics.get(name)
            if metric is not None and value:
                try:
                    metric.increment(value)
                except Exception:  # never fail a request over a metric
                    pass


class LoopModel:
    """One model instance: a SolverStream over the bundle beside model.py, fed by Triton requests."""

    def __init__(self, bundle: Path, parameters: LoopParameters, pb_utils, provider: str | None = None):
        self.pb = pb_utils
        if not tensors_survive(pb_utils):
            raise RuntimeError(f"numpy {np.__version__} cannot exchange tensors with this Triton Python stub (data "
                               "comes back empty; stubs of Triton <= 24.x are built for numpy 1.x): install "
                               "numpy<2 in the environment the stub imports from")
        p = parameters
        self.parameters = p
        self.stream = SolverStream(bundle, variant=p.variant, backend=p.backend, provider=provider,
                                   batch_size=p.batch_size, threads=p.threads, mode=p.mode, max_steps=p.max_steps,
                                   min_steps=p.min_steps, halting=p.halting, max_puzzles=p.max_puzzles)
        self.step_limit = p.max_steps or self.stream.solver.manifest.loop.halt_max_steps
        self.metrics = LoopMetrics(pb_utils, {"model": bundle.parent.parent.name})
        self._queued_reported = 0.0  # the stream's queue seconds already reported

    @classmethod
    def from_triton(cls, args: dict, pb_utils) -> LoopModel:
        """From the `args` Triton passes to `initialize`."""
        config = json.loads(args["model_config"])
        bundle = Path(args["model_repository"]) / args["model_version"] / BUNDLE_DIR
        provider = "cuda" if args.get("model_instance_kind") == "GPU" else "cpu"
        return cls(bundle, LoopParameters.from_config(config), pb_utils, provider)

    def accept(self, request) -> None:
        """Queue one request's puzzles; its response is sent when they have all halted (or at once on an error)."""
        queued = self.stream.queued_seconds()
        self.metrics.add("trm_queue_seconds_total", queued - self._queued_reported)
        self._queued_reported = queued
        self.metrics.flush()  # Triton's thread: the counts of the answers sent since the last request
        sender = request.get_response_sender()
        try:
            puzzles = self.pb.get_input_tensor_by_name(request, "puzzles")
            ids = self.pb.get_input_tensor_by_name(request, "puzzle_ids")
            if puzzles is None:
                raise InputError("the request has no 'puzzles' input ([N, seq_len] INT64 tokens)")
            tokens = np.array(puzzles.as_numpy())  # a copy: the request's memory is released when execute returns
            arrived = time.monotonic()
            future = self.stream.submit(tokens, None if ids is None else np.array(ids.as_numpy()))
            self.metrics.add("trm_puzzles_in_flight", len(tokens))
        except TrmExportError as exc:  # the request's fault: 400
            self._error(sender, str(exc), "INVALID_ARG")
            return
        except RuntimeError as exc:  # the stream stopped (a broken graph): 500
            self._error(sender, str(exc))
            return
        future.add_done_callback(lambda f: self._respond(sender, f, len(tokens), arrived))

    def _respond(self, sender, future, puzzles: int = 0, arrived: float | None = None) -> None:
        self.metrics.add("trm_puzzles_in_flight", -puzzles)
        error = future.exception()
        if error is not None:
            self._error(sender, str(error))
            return
        result = future.result()
        self.metrics.add("trm_puzzles_total", len(result.steps_used))
        self.metrics.add("trm_steps_total", int(result.steps_used.sum()))
        self.metrics.add("trm_puzzles_at_step_limit_total", int((result.steps_used >= self.step_limit).sum()))
        self.metrics.add("trm_requests_total", 1)
        if arrived is not None:
            self.metrics.add("trm_request_seconds_total", time.monotonic() - arrived)
        outputs = [self.pb.Tensor("predictions", result.predictions.astype(np.int64)),
                   self.pb.Tensor("steps", result.steps_used.astype(np.int32)),
                   self.pb.Tensor("q_halt", result.q_halt.astype(np.float32)),
                   self.pb.Tensor("q_continue", result.q_continue.astype(np.float32))]
        sender.send(self.pb.InferenceResponse(output_tensors=outputs),
                    flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _error(self, sender, message: str, code: str = "INTERNAL") -> None:
        error = self.pb.TritonError
        response = self.pb.InferenceResponse(error=error(message, getattr(error, code)) if hasattr(error, code) else
                                             error(message))
        sender.send(response, flags=self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def close(self) -> None:
        self.stream.close()
