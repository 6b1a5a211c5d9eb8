"""`trm-export serve BUNDLE`: the bundle's page on a local HTTP server, the way the page needs it.

- Cross-origin isolation (COOP same-origin + COEP require-corp): WebAssembly threads need SharedArrayBuffer, which
  browsers give only to isolated pages. A plain `python3 -m http.server` serves the page too, single-threaded.
- The right MIME types for .mjs (JavaScript modules are refused as anything else) and .wasm (streaming compile).
- Only the manifest and the files it lists with a checksum are served, read-only; anything else is 404. They are
  read once at start and checked against their checksums, and served from memory: a file swapped for a link or
  deleted afterwards changes nothing (a browser bundle is a few tens of MB).
- A client that hangs up early is one log line, never a traceback; a connection that sends nothing is closed
  after IDLE_SECONDS, so idle connections cannot pile up threads.
- 127.0.0.1 by default: the page's checksums need a secure context (localhost or https) anyway.
"""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from trm_export.errors import BundleError, printable
from trm_export.runtime.manifest import MANIFEST_NAME, member, read_manifest
from trm_export.web.bundle import PAGE

TYPES = {".html": "text/html; charset=utf-8", ".mjs": "text/javascript; charset=utf-8",
         ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".wasm": "application/wasm",
         ".json": "application/json", ".md": "text/markdown; charset=utf-8"}


IDLE_SECONDS = 20.0  # a connection that sends no request within this is closed


def _handler(files: dict[str, bytes], log: Callable[[str], None] | None):
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "trm-export"
        timeout = IDLE_SECONDS  # socket timeout: an idle or stalled client frees its thread

        def _send(self, head_only: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            if path in ("/", "/web", "/web/"):
                self.send_response(302)
                self.send_header("Location", "/" + PAGE)
                self.end_headers()
                return
            rel = path.lstrip("/")
            if rel not in files:
                self.send_error(404, "not a file of this bundle")
                return
            data = files[rel]
            self.send_response(200)
            self.send_header("Content-Type", TYPES.get(Path(rel).suffix, "application/octet-stream"))
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            if not head_only:
                self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self._send(False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._send(True)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
            if log is not None:
                log(printable(f"{self.address_string()} {format % args}"))  # the request line is the client's

    return Handler


def make_server(bundle: str | Path, host: str = "127.0.0.1", port: int = 8000,
                log: Callable[[str], None] | None = None) -> http.server.ThreadingHTTPServer:
    """A server for `bundle`'s page (not started: call serve_forever, or start_in_thread). Port 0 picks one."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle, verify=True)
    if PAGE not in manifest.files:
        raise BundleError(f"{bundle}: no {PAGE}; this bundle was exported for {manifest.target}: export it with "
                          "--target browser to get the page")
    files = {MANIFEST_NAME: (bundle / MANIFEST_NAME).read_bytes()}
    for rel, expected in manifest.files.items():  # read once, checked as read: what is served cannot change
        data = member(bundle, rel).read_bytes()
        if hashlib.sha256(data).hexdigest() != expected:
            raise BundleError(f"{bundle}: {rel} changed while the server started (sha256 differs); not serving it")
        files[rel] = data
    try:
        return _Server((host, port), _handler(files, log), log)
    except OSError as exc:
        raise BundleError(f"cannot serve on {host}:{port} ({exc.strerror}); choose another --port") from None


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler, log: Callable[[str], None] | None):
        self.log = log
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:
        """A client that hung up or timed out: one line, not socketserver's traceback on stderr."""
        import sys

        exc = sys.exc_info()[1]
        if self.log is not None:
            self.log(printable(f"{client_address[0]} connection ended: {type(exc).__name__}: {exc}"))


def start_in_thread(server: http.server.ThreadingHTTPServer) -> str:
    """Serve in a daemon thread; return the page's URL."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return page_url(server)


def page_url(server: http.server.ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/{PAGE}"
