"""`trm-export serve BUNDLE`: the bundle's page on a local HTTP server, the way the page needs it.

- Cross-origin isolation (COOP same-origin + COEP require-corp): WebAssembly threads need SharedArrayBuffer, which
  browsers give only to isolated pages. A plain `python3 -m http.server` serves the page too, single-threaded.
- The right MIME types for .mjs (JavaScript modules are refused as anything else) and .wasm (streaming compile).
- Only the manifest and the files it lists with a checksum are served, read-only; anything else is 404. The
  bundle's checksums are verified before the server starts.
- 127.0.0.1 by default: the page's checksums need a secure context (localhost or https) anyway.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from trm_export.errors import BundleError, printable
from trm_export.runtime.manifest import MANIFEST_NAME, read_manifest
from trm_export.web.bundle import PAGE

TYPES = {".html": "text/html; charset=utf-8", ".mjs": "text/javascript; charset=utf-8",
         ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".wasm": "application/wasm",
         ".json": "application/json", ".md": "text/markdown; charset=utf-8"}


def _handler(bundle: Path, served: frozenset[str], log: Callable[[str], None] | None):
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "trm-export"

        def _send(self, head_only: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            if path in ("/", "/web", "/web/"):
                self.send_response(302)
                self.send_header("Location", "/" + PAGE)
                self.end_headers()
                return
            rel = path.lstrip("/")
            if rel not in served:
                self.send_error(404, "not a file of this bundle")
                return
            data = (bundle / rel).read_bytes()
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
    served = frozenset([MANIFEST_NAME, *manifest.files])
    try:
        return http.server.ThreadingHTTPServer((host, port), _handler(bundle.resolve(), served, log))
    except OSError as exc:
        raise BundleError(f"cannot serve on {host}:{port} ({exc.strerror}); choose another --port") from None


def start_in_thread(server: http.server.ThreadingHTTPServer) -> str:
    """Serve in a daemon thread; return the page's URL."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return page_url(server)


def page_url(server: http.server.ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}/{PAGE}"
