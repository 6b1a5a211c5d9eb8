"""Serving on Triton (issue #20): the stream that batches requests together, the model repository, and a real
tritonserver (nvidia-pytriton's, from scripts/triton_env.sh) answering over HTTP and gRPC.

The server tests skip, saying why, where no such environment exists; everything else runs anywhere.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from trm_export.cli import main
from trm_export.errors import BundleError, InputError
from trm_export.runtime.selfcheck import load_golden
from trm_export.runtime.solver import Solver
from trm_export.runtime.stream import SolverStream
from trm_export.tasks import get_task
from trm_export.triton.repository import MARKER, TritonOptions, write_repository
from trm_export.triton.serving import LoopParameters


@pytest.fixture(scope="module")
def bundle(sudoku_bundle) -> Path:
    return sudoku_bundle / "bundle"


@pytest.fixture(scope="module")
def puzzles() -> np.ndarray:
    return get_task("sudoku").split("heldout", size=48).inputs


@pytest.fixture(scope="module")
def expected(bundle, puzzles):
    return Solver(bundle, batch_size=16).solve(puzzles)


# --- the stream: requests from many threads share one batch --------------------------------------------------------

@pytest.mark.parametrize("settings", [{}, {"halting": "q+stable:1", "max_steps": 6, "min_steps": 2},
                                      {"mode": "fixed", "max_steps": 3}])
def test_stream_answers_each_request_as_solve_would(bundle, puzzles, settings):
    """Six threads submit requests of 1-5 puzzles at once through 8 slots: each request gets exactly what
    Solver.solve gives for its puzzles with the same settings."""
    want = Solver(bundle, batch_size=16).solve(puzzles, **settings)
    if settings.get("mode") != "fixed":
        assert len(set(want.steps_used.tolist())) > 1, "the puzzles must halt at different steps"
    rng = np.random.default_rng(0)
    cuts = np.cumsum(rng.integers(1, 6, size=len(puzzles)))
    requests = np.split(np.arange(len(puzzles)), cuts[cuts < len(puzzles)])
    answers: dict[int, object] = {}
    with SolverStream(bundle, batch_size=8, **settings) as stream:
        def client(first: int) -> None:
            for r in range(first, len(requests), 6):
                answers[r] = stream.submit(puzzles[requests[r]]).result(timeout=120)

        threads = [threading.Thread(target=client, args=(c,)) for c in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(answers) == list(range(len(requests)))
    for r, rows in enumerate(requests):
        np.testing.assert_array_equal(answers[r].predictions, want.predictions[rows])
        np.testing.assert_array_equal(answers[r].steps_used, want.steps_used[rows])
        np.testing.assert_array_equal(answers[r].q_halt, want.q_halt[rows])


def test_a_quick_request_does_not_wait_for_a_slow_one(bundle, puzzles, expected):
    """Refill across requests: a 1-step puzzle sent just after a puzzle that runs to the step limit is answered
    first (a server that ran each request to its end would answer it after the slow one)."""
    slow = int(np.argmax(expected.steps_used))
    quick = int(np.argmin(expected.steps_used))
    assert expected.steps_used[slow] >= expected.steps_used[quick] + 4
    order = []
    with SolverStream(bundle, batch_size=4) as stream:
        a = stream.submit(puzzles[slow])
        b = stream.submit(puzzles[quick])
        a.add_done_callback(lambda f: order.append("slow"))
        b.add_done_callback(lambda f: order.append("quick"))
        a.result(timeout=60)
        b.result(timeout=60)
    assert order == ["quick", "slow"]
    assert b.result().steps_used[0] == expected.steps_used[quick]


def test_a_small_request_is_not_starved_by_a_flood(bundle, puzzles, expected):
    """Slots go to waiting requests in turn: the slowest puzzle, sent alone after a 40-puzzle flood into 4 slots,
    is answered long before the flood (first come, first served would take it after all 40 and answer it last)."""
    slow = int(np.argmax(expected.steps_used))
    flood = np.delete(np.arange(len(puzzles)), slow)[:40]
    order = []
    with SolverStream(bundle, batch_size=4) as stream:
        a = stream.submit(puzzles[flood])
        b = stream.submit(puzzles[slow])
        a.add_done_callback(lambda f: order.append("flood"))
        b.add_done_callback(lambda f: order.append("alone"))
        np.testing.assert_array_equal(a.result(timeout=120).predictions, expected.predictions[flood])
        np.testing.assert_array_equal(b.result(timeout=120).predictions, expected.predictions[[slow]])
    assert order == ["alone", "flood"]


def test_the_stream_counts_the_seconds_puzzles_wait_for_a_slot(bundle, puzzles, expected):
    """Queue wait, the metric an operator of a batched loop needs: 48 puzzles into 4 slots wait for each other."""
    with SolverStream(bundle, batch_size=4) as stream:
        assert stream.queued_seconds() == 0.0
        result = stream.submit(puzzles).result(timeout=120)
        waited = stream.queued_seconds()
    np.testing.assert_array_equal(result.predictions, expected.predictions)
    assert waited > 0.0  # 44 of them waited while the first four ran


def test_stream_refuses_bad_requests_and_keeps_serving(bundle, puzzles, expected):
    with SolverStream(bundle, batch_size=8, max_puzzles=4) as stream:
        running = stream.submit(puzzles[:4])
        bad = puzzles[:1].copy()
        bad[0, 3] = 99
        with pytest.raises(InputError, match="outside the vocabulary"):
            stream.submit(bad)
        with pytest.raises(InputError, match="at most 4"):
            stream.submit(puzzles[:5])
        with pytest.raises(InputError):
            stream.submit(puzzles[:2, :80])
        np.testing.assert_array_equal(running.result(timeout=60).predictions, expected.predictions[:4])
        assert stream.pending() == 0
    with pytest.raises(RuntimeError, match="closed"):
        stream.submit(puzzles[:1])


# --- the repository ---------------------------------------------------------------------------------------------------

def test_repository_layout_and_config(bundle, tmp_path):
    """What Triton reads, checked statically: config.pbtxt parses as Triton's ModelConfig (the protobuf tritonclient
    ships) with the model's inputs, outputs and loop parameters; the bundle copy verifies; model.py is the
    package's entry-point file."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    out = write_repository(bundle, tmp_path / "repo", TritonOptions(
        name="sudoku", loop=LoopParameters(halting="stable:2", batch_size=32), instances=2))
    config = text_format.Parse((out / "sudoku" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.backend, config.max_batch_size) == ("sudoku", "python", 0)
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input] == [
        ("puzzles", model_config_pb2.TYPE_INT64, [-1, 81], False),
        ("puzzle_ids", model_config_pb2.TYPE_INT64, [-1], True)]
    assert [o.name for o in config.output] == ["predictions", "steps", "q_halt", "q_continue"]
    group = config.instance_group[0]
    assert (group.count, group.kind) == (2, model_config_pb2.ModelInstanceGroup.KIND_CPU)
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert LoopParameters.from_config({"parameters": {k: {"string_value": v} for k, v in params.items()}}) == \
        LoopParameters(halting="stable:2", batch_size=32)
    Solver(out / "sudoku" / "1" / "bundle")  # verifies every checksum
    assert (out / "sudoku" / "1" / "model.py").read_bytes() == \
        (Path(__file__).parent.parent / "triton_serving" / "model.py").read_bytes()
    assert (out / MARKER).is_file() and "tritonserver" in (out / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_repository_refusals_are_one_line_and_write_nothing(bundle, tmp_path):
    runner = CliRunner()
    out = tmp_path / "repo"
    assert runner.invoke(main, ["triton", str(bundle), "-o", str(out)]).exit_code == 0
    before = (out / "trm" / "config.pbtxt").read_text()
    cases = [
        (["-o", str(out)], "already exists; pass --force"),
        (["-o", str(tmp_path / "r2"), "--name", "../up"], "model name"),
        (["-o", str(tmp_path / "r2"), "--name", 'a"b'], "model name"),
        (["-o", str(tmp_path / "r2"), "--halting", "stable:x"], "halting must be one of"),
        (["-o", str(tmp_path / "r2"), "--variant", "int8-minmax"], "this bundle has"),
        (["-o", str(tmp_path / "r2"), "--min-steps", "9"], "min_steps"),
    ]
    for args, message in cases:
        result = runner.invoke(main, ["triton", str(bundle), *args])
        assert result.exit_code != 0 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "r2").exists() and (out / "trm" / "config.pbtxt").read_text() == before
    stranger = tmp_path / "mine"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    result = runner.invoke(main, ["triton", str(bundle), "-o", str(stranger), "--force"])
    assert "not a repository written by trm-export" in result.output
    assert (stranger / "notes.txt").read_text() == "keep me"


def test_a_tampered_bundle_is_refused(bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    graph = next((copy / "graphs").glob("*.onnx"))
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    with pytest.raises(BundleError, match=f"graphs/{graph.name}: sha256 differs"):
        write_repository(copy, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_loop_parameters_from_config_refuse_junk():
    with pytest.raises(InputError, match="unknown parameter"):
        LoopParameters.from_config({"parameters": {"max_stepz": {"string_value": "3"}}})
    with pytest.raises(InputError, match="whole number"):
        LoopParameters.from_config({"parameters": {"batch_size": {"string_value": "-1"}}})


# --- a real tritonserver ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    from trm_export.triton.server import TritonServer, TritonUnavailable

    pytest.importorskip("tritonclient.grpc")
    out = write_repository(bundle, tmp_path_factory.mktemp("triton") / "repo", TritonOptions(
        loop=LoopParameters(batch_size=16, max_puzzles=8)))
    try:
        # Triton waits up to --exit-timeout-secs (the grace) for requests in flight and open connections.
        srv = TritonServer(out, grace_seconds=2).start()
    except TritonUnavailable as exc:
        pytest.skip(f"no tritonserver: {exc}")
    yield srv
    srv.stop()


def _listening(port: int) -> list[str]:
    """The local addresses of the sockets listening on `port` (/proc/net/tcp and tcp6: this machine's own view)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                ip = ipaddress.ip_address(raw)
                found.append(str(getattr(ip, "ipv4_mapped", None) or ip))  # gRPC listens as ::ffff:127.0.0.1
    return found


def test_the_server_listens_on_this_machine_only(server):
    """tritonserver binds every interface by default; ours binds 127.0.0.1 unless told otherwise."""
    for port in (server.http_port, server.grpc_port, server.metrics_port):
        assert _listening(port) == ["127.0.0.1"], (port, _listening(port))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_golden_puzzles_through_the_server_equal_the_runtime(bundle, server, protocol):
    from trm_export.triton.load import client_module, connect, infer

    solver = Solver(bundle)
    golden = load_golden(solver)
    want = solver.solve(golden["tokens"], golden["puzzle_ids"])
    module = client_module(protocol)
    client = connect(module, server.http_url if protocol == "http" else server.grpc_url, 60)
    inp = golden["tokens"]
    got = [infer(client, module, "trm", inp[i:i + 3]) for i in range(0, len(inp), 3)]
    np.testing.assert_array_equal(np.concatenate([g["predictions"] for g in got]), want.predictions)
    np.testing.assert_array_equal(np.concatenate([g["steps"] for g in got]), want.steps_used)
    np.testing.assert_array_equal(np.concatenate([g["q_halt"] for g in got]), want.q_halt)


def test_load_every_request_gets_its_own_answers(server, puzzles, expected):
    """A bounded load: 8 clients x 20 requests of 1-4 puzzles, HTTP and gRPC: none lost, none wrong."""
    from trm_export.triton.load import run_load

    for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        load = run_load(url, "trm", protocol, 8, 20, puzzles, expected.predictions, expected.steps_used,
                        seed=1, timeout=120, expected_q=(expected.q_halt, expected.q_continue))
        assert (load.answered, load.wrong, load.failed) == (160, 0, 0), load.summary() + str(load.errors)


def test_bad_requests_get_clear_errors_and_do_not_disturb_others(server, puzzles, expected):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from trm_export.triton.load import run_load

    outcome = {}
    others = threading.Thread(target=lambda: outcome.setdefault("load", run_load(
        server.http_url, "trm", "http", 4, 15, puzzles, expected.predictions, expected.steps_used, seed=2,
        expected_q=(expected.q_halt, expected.q_continue))))
    others.start()
    client = httpclient.InferenceServerClient(server.http_url)
    bad_token = puzzles[:2].astype(np.int64)
    bad_token[1, 7] = 99
    cases = [(bad_token, "INT64", "token 99 at puzzle 1, position 7 is outside the vocabulary"),
             (puzzles[:2, :80].astype(np.int64), "INT64", "unexpected shape for input 'puzzles'"),
             (puzzles[:2].astype(np.int32), "INT32", "expects 'INT64'"),
             (np.ones((9, 81), np.int64), "INT64", "9 puzzles in one request; at most 8")]
    for array, dtype, message in cases:
        inp = httpclient.InferInput("puzzles", list(array.shape), dtype)
        inp.set_data_from_numpy(array)
        with pytest.raises(InferenceServerException) as info:
            client.infer("trm", [inp])
        assert message in str(info.value) and info.value.status() == "400", str(info.value)
    # What tritonserver's own HTTP parser would die of (a buffer sized from the declared shape: std::bad_alloc,
    # signal 6, every client refused), in JSON and binary form, and bodies whose size cannot be checked unread.
    huge = {"name": "puzzles", "shape": [2 ** 40, 81], "datatype": "INT64"}
    binary_header = json.dumps({"inputs": [{**huge, "parameters": {"binary_data_size": 648}}]}).encode()
    raw = [("POST", json.dumps({"inputs": [{**huge, "data": [0] * 81}]}).encode(), {}, 400, "declares shape"),
           ("POST", binary_header + bytes(648), {"Inference-Header-Content-Length": str(len(binary_header))},
            400, "declares shape"),
           ("POST", b"5\r\nhello\r\n0\r\n\r\n", {"Transfer-Encoding": "chunked"}, 411, "chunked"),
           ("POST", b"", {"Content-Length": str(1 << 40)}, 413, "at most")]
    for method, body, headers, status, message in raw:
        conn = http.client.HTTPConnection(*server.http_url.split(":"), timeout=30)
        conn.putrequest(method, "/v2/models/trm/infer")
        sized = {} if "Transfer-Encoding" in headers else {"Content-Length": str(len(body))}
        for key, value in {**sized, **headers}.items():
            conn.putheader(key, value)
        conn.endheaders(body)
        response = conn.getresponse()
        assert (response.status, message in response.read().decode()) == (status, True), (status, message)
        conn.close()
    others.join()
    assert server.process.poll() is None
    load = outcome["load"]
    assert (load.answered, load.wrong, load.failed) == (60, 0, 0), load.summary()


def test_a_stub_that_would_lose_tensor_data_refuses_to_load(server, tmp_path):
    """Triton 24.10's Python stub is built for numpy 1.x; with numpy 2 it hands back empty tensors without an
    error. The model checks a round trip when it loads and refuses, saying why (here: this venv's numpy 2)."""
    import dataclasses
    import sysconfig

    from trm_export.triton.server import TritonServer, TritonUnavailable

    if int(np.__version__.split(".")[0]) < 2:
        pytest.skip("this environment has numpy < 2")
    other = TritonServer(server.repository, log=tmp_path / "numpy2.log")
    other.install = dataclasses.replace(other.install, python_path=sysconfig.get_paths()["purelib"])
    with pytest.raises(TritonUnavailable, match="cannot exchange tensors with this Triton Python stub"):
        other.start(timeout=60)
    other.stop()


def _session_processes(session: int) -> dict[str, float]:
    """Command name -> CPU seconds of each process alive in `session` (tritonserver's own, its backend stubs')."""
    alive = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if int(fields[3]) == session and fields[0] != "Z":  # stat's session id; utime and stime in clock ticks
            alive[f"{name} {stat.parent.name}"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return alive


def _stub_seconds(session: int) -> float:
    return sum(sec for name, sec in _session_processes(session).items() if not name.startswith("tritonserver"))


def test_sigterm_to_the_launcher_finishes_requests_in_flight_and_leaves_nothing(bundle, puzzles, expected, tmp_path):
    """#39: SIGTERM to the Python launcher (a container runtime's stop, a supervisor's) used to leave tritonserver
    running and answering, orphaned in its own session; and a stop that signals the whole session kills the
    Python backend's stubs under the requests. Now: a request in flight when SIGTERM arrives is answered in full
    and correctly within the grace period, then no process of the server's session is left."""
    import signal
    import subprocess
    import sys
    import time

    import tritonclient.http as httpclient

    TILES = 4
    repo = write_repository(bundle, tmp_path / "repo", TritonOptions(loop=LoopParameters(
        batch_size=16, max_puzzles=48 * TILES)))
    script = ("import os, sys; from trm_export.triton.server import TritonServer; "
              f"s = TritonServer({str(repo)!r}, grace_seconds=30); s.start(); "
              "print('ready', s.http_port, s.process.pid, flush=True); s.run_forever(); print('returned', flush=True)")
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
    try:
        _, port, session = launcher.stdout.readline().split()
        big = np.tile(puzzles, (TILES, 1))  # 192 puzzles: a second or more of work, well within the grace
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=120, connection_timeout=120)
        inp = httpclient.InferInput("puzzles", list(big.shape), "INT64")
        inp.set_data_from_numpy(big.astype(np.int64))
        answer = {}
        def send() -> None:
            try:
                answer["result"] = client.infer("trm", [inp])
            except Exception as exc:  # noqa: BLE001 - reported below
                answer["error"] = exc
            client.close()  # an open connection would hold the stop for the whole grace period

        idle, deadline = -1.0, time.monotonic() + 60
        while _stub_seconds(int(session)) != idle and time.monotonic() < deadline:
            idle = _stub_seconds(int(session))  # until the stub has settled after loading (its self-check)
            time.sleep(0.5)
        request = threading.Thread(target=send)
        request.start()
        deadline = time.monotonic() + 60
        while _stub_seconds(int(session)) < idle + 0.2 and time.monotonic() < deadline:
            time.sleep(0.05)  # until the loop model has worked on the request for 0.2 CPU seconds
        assert "result" not in answer, "answered before the stop: make the request longer"
        launcher.send_signal(signal.SIGTERM)
        request.join(120)
        out, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        if _session_processes(int(session)):
            os.killpg(int(session), signal.SIGKILL)  # a failed run leaves no server behind either
    assert "result" in answer, answer.get("error")
    np.testing.assert_array_equal(answer["result"].as_numpy("predictions"), np.tile(expected.predictions, (TILES, 1)))
    np.testing.assert_array_equal(answer["result"].as_numpy("steps"), np.tile(expected.steps_used, TILES))
    assert launcher.returncode == 0 and "returned" in out
    assert _listening(int(port)) == [] and _session_processes(int(session)) == {}


def test_the_repository_readme_client_runs_as_written(server):
    """#39: the README's client example encodes real puzzles (the bundle's samples, the model's tokens), not zeros,
    and runs as written against the server (only its address changed); the start lines publish the metrics."""
    import re
    import subprocess
    import sys

    readme = (server.repository / "README.md").read_text()
    [code] = re.findall(r"```python\n(.*?)```", readme, re.S)
    code = code.replace("localhost:8000", server.http_url)
    done = subprocess.run([sys.executable, "-c", code], cwd=server.repository, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # `trm-export run`'s lines (answer, steps, valid) for the bundle's sample puzzles, as the runtime gives them
    # (the test model is random: its answers are not solutions; benchmarks/triton_load.py serves the real one).
    from trm_export.runtime.io import check_solutions, format_solutions, read_puzzles

    solver = Solver(server.repository / "trm" / "1" / "bundle", batch_size=16)
    tokens = read_puzzles(server.repository / "trm" / "1" / "bundle" / "samples" / "puzzles.txt", solver.task)
    result = solver.solve(tokens)
    assert done.stdout == format_solutions(result, solver.task, check_solutions(tokens, result.predictions,
                                                                                solver.task))
    assert len(done.stdout.splitlines()) == len(tokens) >= 3
    assert "np.zeros" not in code and "samples/puzzles.txt" in code
    assert "8002:8002" in readme and "/metrics" in readme and "triton-env/bin/python -c" in readme


def test_the_repository_deploys_as_an_image_and_on_kubernetes(bundle, tmp_path):
    """#39: `trm-export triton` writes a Dockerfile (NVIDIA's tritonserver of a stated release, the runtime from
    the bundle's own wheel, the three ports) and k8s.yaml (Deployment with probes and resources, Service, HPA):
    the Dockerfile checked statically (no container daemon here), the manifests against Kubernetes' schemas
    offline (strict: no unknown field)."""
    import json
    import shlex

    import kubernetes_validate
    import yaml

    from trm_export.triton.deployment import TRITON_IMAGE

    out = write_repository(bundle, tmp_path / "repo", TritonOptions(name="Sudoku_Model.v1"))
    lines = [line for line in (out / "Dockerfile").read_text().splitlines() if line and not line.startswith("#")]
    instructions = [line.split(None, 1) for line in lines]
    assert [i[0] for i in instructions] == ["FROM", "COPY", "RUN", "EXPOSE", "CMD"]
    assert instructions[0][1] == TRITON_IMAGE and ":" in TRITON_IMAGE and "latest" not in TRITON_IMAGE
    wheel = next(w for w in shlex.split(instructions[2][1]) if w.endswith(".whl"))
    assert wheel.startswith("/models/") and (out / wheel.removeprefix("/models/")).is_file()  # the bundle's wheel
    assert instructions[3][1].split() == ["8000", "8001", "8002"]
    command = json.loads(instructions[4][1])
    assert command[0] == "tritonserver" and "--metrics-port=8002" in command
    assert not [p for p in out.iterdir() if p.is_dir() and p.name != "Sudoku_Model.v1"]  # tritonserver's models only
    documents = list(yaml.safe_load_all((out / "k8s.yaml").read_text()))
    assert [d["kind"] for d in documents] == ["Deployment", "Service", "HorizontalPodAutoscaler"]
    for document in documents:
        kubernetes_validate.validate(document, "1.30", strict=True)  # raises on any schema error
    pod = documents[0]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["resources"]["limits"]["cpu"] == container["resources"]["requests"]["cpu"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    assert documents[0]["metadata"]["name"] == "trm-sudoku-model-v1"  # a Kubernetes name from any model name
    readme = (out / "README.md").read_text()
    assert "kubectl apply -f k8s.yaml" in readme and "docker build -t" in readme


def test_the_client_checks_puzzles_before_sending(server, bundle, puzzles, expected):
    """#39: the client refuses what the server would refuse after the upload (a wrong shape, a token outside the
    vocabulary, floats), naming the puzzle and position; and splits large inputs into requests the model takes."""
    import re

    from trm_export.triton.client import LoopClient

    with LoopClient.for_bundle(server.grpc_url, bundle, protocol="grpc", max_puzzles=8) as client:
        bad = puzzles[:3].astype(np.int64)
        bad[2, 40] = 11
        for tokens, message in ((bad, re.escape("token 11 at puzzle 2, position 40 is outside the vocabulary (0..10)")),
                                (puzzles[:2, :80], r"must be \[N, 81\] tokens"),
                                (puzzles[:2].astype(np.float32), "must be integer tokens")):
            with pytest.raises(InputError, match=message):
                client.solve(tokens)
        result = client.solve(puzzles[:20])  # three requests of at most 8
    np.testing.assert_array_equal(result.predictions, expected.predictions[:20])
    np.testing.assert_array_equal(result.steps_used, expected.steps_used[:20])


def test_the_metrics_port_serves_the_loop_models_own_metrics(server, puzzles, expected):
    """#39: besides Triton's counters, the loop model reports puzzles answered, their steps, step-limit runs,
    requests and their seconds, and puzzles in flight on the metrics port (Python backend custom metrics). They
    reach Triton from its own thread at the next request: a second request makes the first one's counts show."""
    import re
    import urllib.request

    import tritonclient.http as httpclient

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(trm_\w+)\{[^}]*\} (\S+)$", text, re.M)}

    client = httpclient.InferenceServerClient(server.http_url)

    def infer(rows: slice) -> None:
        inp = httpclient.InferInput("puzzles", [rows.stop - rows.start, puzzles.shape[1]], "INT64")
        inp.set_data_from_numpy(puzzles[rows].astype(np.int64))
        client.infer("trm", [inp])

    infer(slice(0, 1))  # flushes what earlier tests left pending
    before = scrape()
    infer(slice(0, 4))
    infer(slice(4, 5))  # its arrival flushes the four puzzles' counts
    after = scrape()
    assert {"trm_puzzles_total", "trm_steps_total", "trm_requests_total", "trm_request_seconds_total",
            "trm_queue_seconds_total",
            "trm_puzzles_in_flight", "trm_puzzles_at_step_limit_total"} <= set(after), sorted(after)
    assert after["trm_puzzles_total"] - before["trm_puzzles_total"] == 1 + 4  # the first request's one, then four
    assert after["trm_steps_total"] - before["trm_steps_total"] == int(expected.steps_used[:1].sum()
                                                                        + expected.steps_used[:4].sum())
    assert after["trm_requests_total"] - before["trm_requests_total"] == 2
    assert after["trm_request_seconds_total"] > before["trm_request_seconds_total"]
    assert after["trm_queue_seconds_total"] >= before["trm_queue_seconds_total"]
