#!/usr/bin/env bash
# The runtime on the oldest Python, numpy, onnxruntime and click that pyproject.toml claims: JetPack 5 (Jetson
# Xavier) ships Python 3.8, and a device may hold the oldest libraries pip allows.
#
#   1. .venv-oldest (created when missing): Python 3.8 (3.9 or 3.10 with a warning when no 3.8 is found; set
#      OLDEST_PYTHON=/path/to/python to choose), exactly the floors of pyproject's `dependencies` (numpy>=1.24 ->
#      numpy==1.24, i.e. 1.24.0) and pytest: no torch, no onnx.
#   2. The main venv (MAIN_VENV, default .venv; it has torch) exports the Sudoku reference model to a temporary
#      CPU bundle, and .venv-oldest installs trm-export from the wheel that bundle carries (--no-deps), as a
#      device does.
#   3. tests/test_runtime_oldest.py runs in .venv-oldest on that bundle (TRM_RUNTIME_BUNDLE), without
#      tests/conftest.py (it needs torch): manifest and checksums, fixed and adaptive solves against the bundle's
#      golden values, `trm-export verify` and `trm-export run`, edited and damaged bundles refused.
#   4. The maze attention reference model's cpu bundle (ONNX Runtime's contrib attention and rope) passes
#      `trm-export verify` in .venv-oldest.
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN_VENV=${MAIN_VENV:-.venv}
OLD=.venv-oldest
start=$SECONDS
phase=$SECONDS
lap() { echo "oldest runtime check: $1 took $((SECONDS - phase)) s"; phase=$SECONDS; }

works() { [ -n "$1" ] && "$1" -c 'import venv, ensurepip' >/dev/null 2>&1; }
find_python() {  # $1 = 3.8: python3.8 on PATH (a pyenv shim only works when that version is active), pyenv's own
  local candidate
  for candidate in "$(command -v "python$1" || true)" \
                   "$(ls -d "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")/versions/$1".*/bin/python 2>/dev/null \
                      | sort -V | tail -n 1)"; do
    if works "$candidate"; then echo "$candidate"; return 0; fi
  done
  return 1
}

if [ -n "${OLDEST_PYTHON:-}" ]; then
  python=$OLDEST_PYTHON
else
  python=""
  for v in 3.8 3.9 3.10; do
    if python=$(find_python "$v"); then
      [ "$v" = 3.8 ] || echo "WARNING: no Python 3.8 found; testing the runtime on Python $v instead" >&2
      break
    fi
  done
fi
works "$python" || { echo "no usable Python 3.8-3.10 found (set OLDEST_PYTHON)" >&2; exit 2; }
pyver=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

if [ -x "$OLD/bin/python" ] && [ "$("$OLD/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "$pyver" ]; then
  echo "$OLD holds another Python; recreating it"
  rm -rf "$OLD"
fi
if [ ! -x "$OLD/bin/python" ]; then
  "$python" -m venv "$OLD"
  echo '*' > "$OLD/.gitignore"  # ignored by git without touching the project's .gitignore
fi

# The floors: `dependencies = ["numpy>=1.24", ...]` -> numpy==1.24 (pip reads 1.24 as 1.24.0).
deps=$(sed -n 's/^dependencies *= *\[\(.*\)\]/\1/p' pyproject.toml | tr -d '" ' | tr ',' ' ')
pins=()
expect="python=$pyver"
for dep in $deps; do
  name=${dep%%>=*} floor=${dep#*>=}
  [ "$name" != "$dep" ] || { echo "pyproject.toml: $dep has no >= floor" >&2; exit 2; }
  pins+=("$name==$floor")
  expect+=" $name=$floor"
done
pip=("$OLD/bin/python" -m pip --disable-pip-version-check -q)
if ! "${pip[@]}" install "${pins[@]}" pytest; then
  # The x.y.0 release has no wheel for this Python: the oldest patch that has one is the floor here.
  echo "WARNING: ${pins[*]} did not install; trying the oldest patch release of each floor" >&2
  for pin in "${pins[@]}"; do
    for patch in 1 2 3 4 5 6; do
      if "${pip[@]}" install "$pin.$patch" 2>/dev/null; then break; fi
    done
  done
  "${pip[@]}" install pytest
  expect="python=$pyver"  # the versions that installed are printed below
fi
if "$OLD/bin/python" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("torch") or u.find_spec("onnx")))'; then
  echo "$OLD has torch or onnx: the runtime must be tested without them; delete $OLD" >&2
  exit 1
fi
"$OLD/bin/python" -c 'import platform; from importlib.metadata import version as v
print("oldest runtime check: Python %s, numpy %s, onnxruntime %s, click %s" % (platform.python_version(),
      v("numpy"), v("onnxruntime"), v("click")))'
lap "venv $OLD"

[ -x "$MAIN_VENV/bin/trm-export" ] || { echo "$MAIN_VENV/bin/trm-export missing: set up the main venv first" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export_args=(reference_models/sudoku_mlpt --target cpu -o "$tmp/bundle" --parity-puzzles 8)
if "$MAIN_VENV/bin/trm-export" export --help | grep -q -- --no-report; then
  export_args+=(--no-report)  # the bundle's accuracy-versus-latency report is not what is tested here
fi
"$MAIN_VENV/bin/trm-export" "${export_args[@]}" > "$tmp/export.log" 2>&1 || { cat "$tmp/export.log"; exit 1; }
grep -E "^(loaded|stage times)" "$tmp/export.log" || true
lap "export of the bundle (main venv)"

# The runtime as a device gets it: the wheel inside the bundle (distribution/wheel.py), not this checkout.
wheels=("$tmp"/bundle/runtime/trm_export-*-py3-none-any.whl)
[ -f "${wheels[0]}" ] || { echo "the bundle carries no runtime wheel (runtime/trm_export-*.whl)" >&2; exit 1; }
"${pip[@]}" install --no-deps --force-reinstall "${wheels[0]}"
lap "runtime installed from the bundle's ${wheels[0]##*/}"

# Resealed copies made hostile as tests/test_hostile.py makes them: a graph that keeps a weight outside the bundle
# (ONNX Runtime 1.17 would read it; the runtime must refuse it before any engine sees the graph) and a graph whose
# step asks for minutes of arithmetic (stopped at its limit).
"$MAIN_VENV/bin/python" - "$tmp" <<'EOF'
import shutil, sys
from pathlib import Path
sys.path.insert(0, "tests")
from test_hostile import _external_weights, _hours_of_arithmetic
root = Path(sys.argv[1])
(root / "outside").mkdir()
_external_weights(via_link=False)(Path(shutil.copytree(root / "bundle", root / "external.bundle")), root / "outside")
_hours_of_arithmetic(Path(shutil.copytree(root / "bundle", root / "slow.bundle")), root / "outside")
EOF

TRM_RUNTIME_BUNDLE="$tmp/bundle" TRM_EXTERNAL_WEIGHTS_BUNDLE="$tmp/external.bundle" \
  TRM_SLOW_STEP_BUNDLE="$tmp/slow.bundle" TRM_EXPECT_VERSIONS="$expect" \
  "$OLD/bin/python" -m pytest tests/test_runtime_oldest.py -o addopts=-ra --noconftest -p no:cacheprovider -q --tb=short
lap "tests on Python $pyver"

# The attention reference model's cpu bundle: attention and rope as ONNX Runtime's contrib ops (MultiHeadAttention,
# RotaryEmbedding), whose kernels and attributes changed across onnxruntime releases: its golden self-check on the
# oldest onnxruntime (full fixed and adaptive loops against the PyTorch reference's recorded values).
maze_args=(reference_models/maze_att --target cpu -o "$tmp/maze" --parity-puzzles 8)
if "$MAIN_VENV/bin/trm-export" export --help | grep -q -- --no-report; then
  maze_args+=(--no-report)
fi
"$MAIN_VENV/bin/trm-export" "${maze_args[@]}" > "$tmp/maze.log" 2>&1 || { cat "$tmp/maze.log"; exit 1; }
grep -E "^step graph" "$tmp/maze.log" || true
"$OLD/bin/trm-export" verify "$tmp/maze"
lap "attention bundle (contrib ops) verified on Python $pyver"
echo "oldest runtime check: passed in $((SECONDS - start)) s"
