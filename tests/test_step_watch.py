"""The step watch (runtime/step_watch.py): a step that does not come back within a limit derived from the graph's
own timing is stopped, with one line. End to end on a hostile bundle: tests/test_hostile.py."""

from __future__ import annotations

import threading
import time

import pytest

from trm_export.errors import BundleError
from trm_export.runtime.step_watch import StepTimeout, StepWatch


def _stuck_step(watch: StepWatch, stopped: threading.Event, n: int) -> float:
    """A step that only ends when the watch cancels it; its duration."""
    start = time.monotonic()
    with pytest.raises(StepTimeout, match="did not return within"):
        with watch.step(n):
            assert stopped.wait(30), "the watch never cancelled the step"
            raise RuntimeError("cancelled")  # what a backend raises when its run is cancelled
    return time.monotonic() - start


def test_the_limit_follows_the_graphs_own_measured_steps(monkeypatch):
    monkeypatch.delenv("TRM_STEP_TIMEOUT", raising=False)
    stopped = threading.Event()
    watch = StepWatch(stopped.set, "graph.onnx", first_step_seconds=1.5, factor=100, floor_seconds=0.3)
    assert watch.limit(8) == 1.5  # nothing measured yet
    assert 1.5 <= _stuck_step(watch, stopped, 8) < 5
    stopped.clear()
    for n, seconds in ((4, 0.004), (4, 0.002)):  # two golden steps: 1 ms then 0.5 ms per puzzle
        with watch.step(n):
            time.sleep(seconds)
    assert 0.0005 <= watch.per_puzzle < 0.002  # the fastest of them, however busy the machine
    limit = watch.limit(16)
    assert limit == pytest.approx(max(0.3, 100 * watch.per_puzzle * 16))
    assert watch.limit(1) == 0.3  # the floor
    took = _stuck_step(watch, stopped, 16)
    assert limit <= took < limit + 3
    with watch.step(4):  # a step after a stopped one runs normally
        pass


def test_a_fixed_limit_from_the_environment_and_its_refusal(monkeypatch):
    monkeypatch.setenv("TRM_STEP_TIMEOUT", "0.4")
    stopped = threading.Event()
    watch = StepWatch(stopped.set, "graph.onnx")
    assert watch.limit(64) == 0.4
    assert 0.4 <= _stuck_step(watch, stopped, 64) < 4
    for junk in ("0", "-1", "soon", "inf", "nan"):
        monkeypatch.setenv("TRM_STEP_TIMEOUT", junk)
        with pytest.raises(BundleError, match="TRM_STEP_TIMEOUT must be a number of seconds"):
            StepWatch(stopped.set, "graph.onnx")
