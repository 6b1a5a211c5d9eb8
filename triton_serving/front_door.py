"""The HTTP front door: tritonserver's HTTP port behind a proxy that refuses what would abort it.

tritonserver's HTTP parser sizes an input's buffer from the shape a request declares, before it reads the data or
checks the shape against the model: one JSON request declaring `[2**40, 81]` ends the whole server (std::bad_alloc,
signal 6) and every other client gets "connection refused". Its gRPC front end compares the data's size with the
shape first and answers INVALID_ARGUMENT, and it offers no request-size limit for HTTP. So `TritonServer` puts
tritonserver's own HTTP port on 127.0.0.1 (an internal port) and this proxy on the address clients use. Per request
it checks, before anything is forwarded:

- the body's size (Content-Length, at most `max_request_bytes`; a chunked or compressed body is refused: its size,
  or its shapes, cannot be checked before the parser sees them);
- on an inference request (`/v2/models/NAME[/versions/V]/infer`), every input's declared shape: non-negative
  integers whose product, times the datatype's size, is at most `max_request_bytes`.

A refusal is Triton's own error form (`{"error": "..."}`, status 400, 411, 413 or 415); everything else reaches the
server unchanged, on one keep-alive connection per client connection. Idle client connections close after
`idle_seconds`.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INFER_PATH = re.compile(r"^/v2/models/[^/?]+(/versions/[^/?]+)?/infer(\?.*)?$")
# Bytes per element of each KServe v2 datatype (BYTES: at least its 4-byte length prefix).
DATATYPE_BYTES = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2, "INT32": 4,
                  "INT64": 8, "FP16": 2, "BF16": 2, "FP32": 4, "FP64": 8, "BYTES": 4}
# Per connection, not per request: forwarded as they come would make the proxy's connection the client's.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
DEFAULT_MAX_REQUEST_BYTES = 64 << 20


class Refusal(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_declared_shapes(header: bytes, max_bytes: int) -> None:
    """Refuse (Refusal 400) an inference request header whose inputs declare more than `max_bytes` of data, or
    whose shapes are not lists of non-negative integers. What the header means otherwise is Triton's to judge."""
    try:
        request = json.loads(header)
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, bad UTF-8, a 5000-digit number
        raise Refusal(400, f"the inference request header is not JSON: {str(exc)[:200]}") from None
    inputs = request.get("inputs") if isinstance(request, dict) else None
    if not isinstance(inputs, list):
        return  # no inputs: nothing is allocated from a shape; Triton answers it
    for item in inputs:
        if not isinstance(item, dict):
            continue
        name, shape = str(item.get("name"))[:100], item.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise Refusal(400, f"input {name!r}: shape must be a list of non-negative integers")
        size = DATATYPE_BYTES.get(str(item.get("datatype")), 8) * math.prod(shape)
        if size > max_bytes:
            raise Refusal(400, f"input {name!r} declares shape {shape[:8]} ({size} bytes): this server takes at "
                               f"most {max_bytes} bytes per request")


class FrontDoor:
    """The proxy on (host, port) in front of tritonserver's HTTP at (backend_host, backend_port); threads of this
    process. `start()` returns once it listens; `stop()` closes it and its connections."""

    def __init__(self, host: str, port: int, backend_host: str, backend_port: int, *,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, idle_seconds: float = 60.0):
        self.address, self.backend = (host, port), (backend_host, backend_port)
        self.max_request_bytes = max_request_bytes
        self._handler = type("Handler", (_Handler,), {"door": self, "timeout": idle_seconds})
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FrontDoor:
        if self._server is None:
            self._server = ThreadingHTTPServer(self.address, self._handler)
            self._server.daemon_threads = True
            self._thread = threading.Thread(target=self._server.serve_forever, name="trm-triton-front-door",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._thread.join()
            self._server.server_close()
            self._server = self._thread = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as tritonclient expects
    door: FrontDoor
    _backend: http.client.HTTPConnection | None = None
    _body_read = False

    def log_message(self, format: str, *args) -> None:  # tritonserver logs requests; nothing here on stderr
        pass

    def do_GET(self) -> None:
        self._forward()

    do_POST = do_PUT = do_DELETE = do_HEAD = do_GET

    def _forward(self) -> None:
        self._body_read = False
        try:
            body = self._read_checked_body()
        except Refusal as refusal:  # a body left unread would be taken for the next request: close after answering
            self._answer(refusal.status, {"error": str(refusal)}, close=not self._body_read)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            response = self._exchange(body, headers)
        except (OSError, http.client.HTTPException):
            self._answer(502, {"error": "tritonserver did not answer (it may be stopping)"}, close=True)
            return
        payload = response.read()
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _read_checked_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise Refusal(411, "chunked request bodies are not accepted: send Content-Length")
        if self.headers.get("Content-Encoding", "identity").lower() != "identity":
            raise Refusal(415, "compressed request bodies are not accepted (their shapes cannot be checked unread)")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise Refusal(400, "Content-Length is not a number") from None
        if not 0 <= length <= self.door.max_request_bytes:
            raise Refusal(413, f"a {length}-byte request: this server takes at most "
                               f"{self.door.max_request_bytes} bytes")
        body = self.rfile.read(length)
        self._body_read = True
        if INFER_PATH.match(self.path) and self.command == "POST":
            header = body
            if "Inference-Header-Content-Length" in self.headers:
                try:
                    header = body[:int(self.headers["Inference-Header-Content-Length"])]
                except ValueError:
                    raise Refusal(400, "Inference-Header-Content-Length is not a number") from None
            check_declared_shapes(header, self.door.max_request_bytes)
        return body

    def _exchange(self, body: bytes, headers: dict[str, str]) -> http.client.HTTPResponse:
        for attempt in (0, 1):  # a kept-alive connection the server closed meanwhile: once more, on a new one
            if self._backend is None:
                self._backend = http.client.HTTPConnection(*self.door.backend, timeout=600)
            try:
                self._backend.request(self.command, self.path, body=body or None, headers=headers)
                return self._backend.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._backend.close()
                self._backend = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _answer(self, status: int, payload: dict, close: bool = False) -> None:
        data = json.dumps(payload).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def finish(self) -> None:
        super().finish()
        if self._backend is not None:
            self._backend.close()
