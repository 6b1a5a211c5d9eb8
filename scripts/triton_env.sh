#!/usr/bin/env bash
# The environment a local tritonserver runs from (trm_export.triton.server; tests/test_triton.py):
# PyPI's nvidia-pytriton wheel for the server binary and its Python backend (installed without its own
# dependencies: only the binary is used), numpy < 2 (the wheel's Python backend stub is built for numpy 1.x), and
# trm-export itself (the loop model imports its runtime), editable from this checkout.
#   scripts/triton_env.sh [DIR]        (default: .venv-triton in the checkout)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.venv-triton}
python=${PYTHON:-python3.11}
# The stub embeds the system's libpython of the same version.
if ! ldconfig -p 2>/dev/null | grep -q "libpython3.11.so.1.0" && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q libpython3.11 >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q libpython3.11 >/dev/null; }
fi
[ -x "$dir/bin/python" ] || "$python" -m venv "$dir"
"$dir/bin/pip" install -q "numpy>=1.24,<2" "onnxruntime>=1.17"
"$dir/bin/pip" install -q --no-deps "nvidia-pytriton==0.7.0"
"$dir/bin/pip" install -q --no-deps -e .
echo "triton environment ready: $dir"
