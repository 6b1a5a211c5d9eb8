"""A local `tritonserver` from PyPI's nvidia-pytriton wheel, started on a model repository (tests, benchmarks, and
users without an NGC container).

The wheel carries the server binary, its libraries and the Python backend, with one backend stub per Python
version. Triton loads backends from one folder per backend, with the stub beside the backend library, so
`prepare_backends` assembles `ENV/trm-triton-backends/python/` from the wheel once. The stub embeds the system's
libpython of the environment's version (Debian: libpython3.11) and ignores PYTHONPATH, which the loop model's
model.py honours instead: the server is started with PYTHONPATH = the environment's site-packages.

    with TritonServer("repository/", env=".venv-triton") as server:
        server.http_url, server.grpc_url
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from trm_export.errors import TrmExportError
from trm_export.triton.front_door import DEFAULT_MAX_REQUEST_BYTES, FrontDoor

ENV_VARIABLE = "TRM_TRITON_ENV"
DEFAULT_ENV = Path(__file__).resolve().parent.parent / ".venv-triton"  # the checkout's, made by scripts/triton_env.sh


class TritonUnavailable(TrmExportError):
    """No usable tritonserver here (why, and how to get one)."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path  # the folder holding python/ (libtriton_python.so, its utils and the stub)
    library_path: str
    python_path: str  # the environment's site-packages: what the loop model imports


def find_env(env: str | Path | None = None) -> Path:
    """The environment holding nvidia-pytriton: `env`, else $TRM_TRITON_ENV, else the checkout's .venv-triton."""
    return Path(env or os.environ.get(ENV_VARIABLE) or DEFAULT_ENV)


def find_triton(env: str | Path | None = None) -> TritonInstall:
    """Locate the wheel's server in `env` (see find_env) and prepare its backend folder; TritonUnavailable says why
    not and how to get one."""
    env = find_env(env)
    how = f"create it with scripts/triton_env.sh {env} (or set {ENV_VARIABLE})"
    roots = sorted(env.glob("lib/python3*/site-packages/pytriton/tritonserver"))
    if not roots:
        raise TritonUnavailable(f"{env}: no nvidia-pytriton tritonserver in this environment; {how}")
    root = roots[-1]
    site_packages = root.parent.parent
    version = site_packages.parent.name[len("python"):]  # "3.11"
    binary = root / "bin" / "tritonserver"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not binary.is_file() or not stub.is_file():
        raise TritonUnavailable(f"{root}: the wheel lacks {'the server binary' if not binary.is_file() else stub}")
    backends = prepare_backends(root, stub, env / "trm-triton-backends")
    libraries = [site_packages / "nvidia_pytriton.libs", root / "lib", root / "external_libs"]
    library_path = os.pathsep.join(str(p) for p in libraries if p.is_dir())
    missing = _missing_libraries(backends / "python" / stub.name, library_path)
    if missing:
        raise TritonUnavailable(f"{stub}: needs {', '.join(missing)} (Debian: apt-get install libpython{version})")
    return TritonInstall(binary, backends, library_path, str(site_packages))


def prepare_backends(root: Path, stub: Path, into: Path) -> Path:
    python = into / "python"
    if not (python / stub.name).is_file():
        partial = into.with_name(into.name + f".partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(root / "backends" / "python", partial / "python")
        shutil.copy2(stub, partial / "python" / stub.name)
        shutil.rmtree(into, ignore_errors=True)
        os.replace(partial, into)
    return into


def _missing_libraries(binary: Path, library_path: str) -> list[str]:
    ldd = shutil.which("ldd")
    if ldd is None:
        return []
    out = subprocess.run([ldd, str(binary)], capture_output=True, text=True,
                         env={**os.environ, "LD_LIBRARY_PATH": library_path}).stdout
    return [line.split()[0] for line in out.splitlines() if "not found" in line]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """tritonserver on `repository`, listening on `host` (127.0.0.1: this machine only) on free ports unless given;
    a context manager (stops on exit). The server's log goes to `log` (default: repository/../NAME.tritonserver.log).

    tritonserver itself binds every interface unless told otherwise; serving other machines is a decision
    (host="0.0.0.0"). Clients reach HTTP through the front door (triton_serving.front_door: tritonserver's HTTP
    parser trusts a request's declared shape, and one request declaring [2**40, 81] would abort it), which refuses
    requests over `max_request_bytes`; tritonserver's own HTTP port listens on 127.0.0.1 only."""

    def __init__(self, repository: str | Path, env: str | Path | None = None, *, http_port: int = 0,
                 grpc_port: int = 0, metrics_port: int = 0, log: str | Path | None = None,
                 extra_args: tuple[str, ...] = (), host: str = "127.0.0.1", grace_seconds: int = 30,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
        self.repository = Path(repository).resolve()
        self.host = host
        self.install = find_triton(env)
        self.http_port, self.grpc_port = http_port or free_port(), grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.front_door = FrontDoor(host, self.http_port, "127.0.0.1", free_port(),
                                    max_request_bytes=max_request_bytes)
        self.log = Path(log) if log else self.repository.parent / f"{self.repository.name}.tritonserver.log"
        self.extra_args = tuple(extra_args)
        # How long a stop waits for requests in flight: tritonserver's --exit-timeout-secs, and this side's wait.
        self.grace_seconds = grace_seconds
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host  # where a client on this machine connects

    def command(self) -> list[str]:
        return [str(self.install.binary), f"--model-repository={self.repository}",
                f"--backend-directory={self.install.backends}", "--http-address=127.0.0.1",
                f"--http-port={self.front_door.backend[1]}", f"--grpc-address={self.host}",
                f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
                f"--exit-timeout-secs={self.grace_seconds}", *self.extra_args]

    def start(self, timeout: float = 120.0) -> TritonServer:
        env = {**os.environ, "LD_LIBRARY_PATH": self.install.library_path, "PYTHONPATH": self.install.python_path}
        self.front_door.start()
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.front_door.stop()
                raise TritonUnavailable(f"tritonserver exited with status {self.process.returncode} while starting: "
                                        f"{self.failure_line()} (log: {self.log})")
            if self.ready():
                return self
            time.sleep(0.25)
        self.stop()
        raise TritonUnavailable(f"tritonserver not ready after {timeout:g} s (log: {self.log})")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def failure_line(self) -> str:
        """The log's first model-loading error, else its last line."""
        lines = self.log.read_text(errors="replace").splitlines() if self.log.exists() else []
        for line in lines:
            if "failed to load" in line or "Error" in line and "NVML" not in line and "DCGM" not in line:
                return line.strip()[:400]
        return lines[-1].strip()[:400] if lines else "(no output)"

    def stop(self) -> None:
        """A graceful stop: SIGTERM to tritonserver, which stops taking requests and lets those in flight finish
        (up to its --exit-timeout-secs, the grace period) before it unloads the models; then whatever is left of
        its session (a backend stub, a server stuck past the grace) is killed, so nothing outlives the stop."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.grace_seconds + 15)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the session's leftovers; none when it stopped cleanly
        except ProcessLookupError:
            pass
        self.process.wait()
        self.front_door.stop()  # after the server: answers to requests in flight pass through it

    def __enter__(self) -> TritonServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def run_forever(self) -> None:
        """Start, print where it listens, wait for Ctrl-C or SIGTERM (a container runtime's or a supervisor's stop):
        either stops tritonserver before this process ends. tritonserver runs in a session of its own (so that a
        terminal's Ctrl-C reaches it once, through here), so a launcher that died without stopping it would leave
        it running and answering."""
        def terminate(signum, frame):
            raise _Stopped(signum)

        previous = signal.signal(signal.SIGTERM, terminate)
        try:
            if self.process is None:
                self.start()
            print(f"tritonserver on {self.repository}: HTTP {self.http_url}, gRPC {self.grpc_url}, metrics "
                  f"{self._client_host}:{self.metrics_port} (log: {self.log}); Ctrl-C or SIGTERM stops",
                  file=sys.stderr, flush=True)
            self.process.wait()
        except (KeyboardInterrupt, _Stopped):
            pass
        finally:
            self.stop()
            signal.signal(signal.SIGTERM, previous)


class _Stopped(Exception):
    """SIGTERM arrived: run_forever stops the server and returns."""
