"""The browser as a target: `--target browser` bundles carry `web/`, a static page and a JavaScript runtime
(`app/trm.mjs`, the loop of runtime/solver.py) on onnxruntime-web's WebAssembly build; `trm-export serve` serves
one. Python here writes and serves the page; it never runs it (the tests drive it in Node.js and Chromium)."""
