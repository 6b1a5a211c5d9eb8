"""A bounded load test of a served loop model: fixed clients x requests, every answer checked.

Each client (a thread with its own tritonclient connection) sends its requests one after another; each request
carries 1..max_puzzles distinct puzzles drawn from a pool whose answers are known (the runtime's, computed
beforehand). A response must give exactly the expected answers and step counts of the puzzles that request sent, in
its order: an answer that went to the wrong request, or a puzzle lost or answered twice, shows up as a mismatch or a
count that does not add up. It stops by itself after clients x requests; a request that fails or times out is
counted, not retried.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class LoadResult:
    protocol: str
    clients: int
    requests: int  # sent
    puzzles: int  # sent
    seconds: float
    latencies: list[float] = field(default_factory=list)  # of the answered requests, seconds
    answered: int = 0  # requests with a response
    wrong: int = 0  # responses whose answers or steps are not the expected ones for the puzzles sent
    failed: int = 0  # requests that got an error or no response
    errors: list[str] = field(default_factory=list)  # the first few messages

    @property
    def puzzles_per_second(self) -> float:
        return self.puzzles / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1e3) if self.latencies else float("nan")

    def summary(self) -> str:
        return (f"{self.protocol}: {self.clients} clients x {self.requests // max(self.clients, 1)} requests, "
                f"{self.puzzles} puzzles in {self.seconds:.1f} s = {self.puzzles_per_second:.1f} puzzles/s; latency "
                f"p50 {self.percentile_ms(50):.0f} ms, p95 {self.percentile_ms(95):.0f} ms, p99 "
                f"{self.percentile_ms(99):.0f} ms; {self.answered} answered, {self.wrong} wrong, {self.failed} failed")

    def to_dict(self) -> dict:
        return {"protocol": self.protocol, "clients": self.clients, "requests": self.requests,
                "puzzles": self.puzzles, "seconds": self.seconds, "puzzles_per_second": self.puzzles_per_second,
                "p50_ms": self.percentile_ms(50), "p95_ms": self.percentile_ms(95), "p99_ms": self.percentile_ms(99),
                "answered": self.answered, "wrong": self.wrong, "failed": self.failed, "errors": self.errors}


def client_module(protocol: str):
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
    return module


def connect(module, url: str, timeout: float):
    """A client whose calls give up after `timeout` seconds (HTTP: the connection's; gRPC: per call, in infer)."""
    if module.__name__.endswith("http"):
        return module.InferenceServerClient(url, network_timeout=timeout, connection_timeout=timeout)
    return module.InferenceServerClient(url)


def infer(client, module, model: str, puzzles: np.ndarray, timeout: float | None = None) -> dict[str, np.ndarray]:
    """One request: puzzles [N, seq_len] int64 -> the model's outputs as arrays."""
    inp = module.InferInput("puzzles", list(puzzles.shape), "INT64")
    inp.set_data_from_numpy(np.ascontiguousarray(puzzles, np.int64))
    kwargs = {"client_timeout": timeout} if timeout and not module.__name__.endswith("http") else {}
    result = client.infer(model, [inp], **kwargs)
    return {name: result.as_numpy(name) for name in ("predictions", "steps", "q_halt", "q_continue")}


# Q values are float32 logits; other batch neighbours may round them differently in the last bits.
Q_TOLERANCE = 1e-4


def run_load(url: str, model: str, protocol: str, clients: int, requests_per_client: int, pool: np.ndarray,
             expected_predictions: np.ndarray, expected_steps: np.ndarray, *, max_puzzles: int = 4, seed: int = 0,
             timeout: float = 300.0, expected_q: tuple[np.ndarray, np.ndarray] | None = None) -> LoadResult:
    """`clients` threads x `requests_per_client` requests of 1..max_puzzles puzzles from `pool` (see the module
    docstring); returns the counts, throughput and latencies. With `expected_q` (q_halt, q_continue at each puzzle's
    halt) a response's Q values must match them too, within Q_TOLERANCE: a server that mixes up its outputs is
    wrong even where answers and step counts agree."""
    module = client_module(protocol)
    rng = np.random.default_rng(seed)
    plans = [[rng.choice(len(pool), size=int(rng.integers(1, max_puzzles + 1)), replace=False)
              for _ in range(requests_per_client)] for _ in range(clients)]
    result = LoadResult(protocol, clients, clients * requests_per_client, sum(len(p) for c in plans for p in c), 0.0)
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def client_thread(plan: list[np.ndarray]) -> None:
        client = connect(module, url, timeout)
        start.wait()
        for picks in plan:
            sent = time.perf_counter()
            try:
                out = infer(client, module, model, pool[picks], timeout)
            except Exception as exc:  # the client library's own exception types: counted, never retried
                with lock:
                    result.failed += 1
                    if len(result.errors) < 5:
                        result.errors.append(str(exc)[:300])
                continue
            latency = time.perf_counter() - sent
            ok = (out["predictions"].shape == (len(picks), pool.shape[1])
                  and np.array_equal(out["predictions"], expected_predictions[picks])
                  and np.array_equal(out["steps"], expected_steps[picks])
                  and (expected_q is None or all(
                      out[name].shape == (len(picks),) and np.allclose(out[name], want[picks], rtol=0, atol=Q_TOLERANCE)
                      for name, want in (("q_halt", expected_q[0]), ("q_continue", expected_q[1])))))
            with lock:
                result.answered += 1
                result.wrong += not ok
                result.latencies.append(latency)
        client.close()

    threads = [threading.Thread(target=client_thread, args=(plan,), daemon=True) for plan in plans]
    for t in threads:
        t.start()
    start.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - began
    return result
