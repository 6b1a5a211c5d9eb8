"""The device-side code (what `pip install trm-export` without extras runs: the runtime, the tasks, the targets,
the report, the CLI's runtime commands) must run on Python 3.8 (JetPack 5 ships it; JetPack 6 has 3.10).

Static checks here; scripts/oldest_runtime_check.sh runs the runtime for real on Python 3.8 with the oldest numpy
and onnxruntime that pyproject.toml claims (tests/test_runtime_oldest.py).

- vermin (the `test` extra) finds the minimum Python of every construct, library function and keyword argument
  it knows. Annotations are not evaluated (`--no-eval-annotations`: every device-side module that annotates
  has `from __future__ import annotations`, checked below), `# novm` comments are not honoured, and a file it
  cannot parse (syntax newer than the Python running it) fails (`--pessimistic`).
- vermin cannot tell the type of a variable, so `name.removesuffix(...)` or `path.is_relative_to(...)` pass it
  unseen, and it does not flag `list[int]` or `int | None` evaluated at runtime: a small AST check covers those.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the runtime commands (verify, run, build, report) and `trm_export.runtime` import without torch.
DEVICE_SIDE = ["runtime", "tasks", "targets", "report", "core/cli.py", "core/errors.py", "core/__init__.py",
               "web/__init__.py", "web/bundle.py", "web/serve.py",  # `trm-export serve` runs on a device too
               "triton_serving",  # Triton runs on Jetson (JetPack builds) too
               "planning", "export/config.py"]  # the report sizes its sample from the model's FLOPs there too
OLDEST = (3, 8)

# Methods newer than 3.8 that vermin only sees on a literal: name -> "version (owner)".
NEWER_METHODS = {
    "removeprefix": "3.9 (str, bytes)", "removesuffix": "3.9 (str, bytes)", "is_relative_to": "3.9 (Path)",
    "with_stem": "3.9 (Path)", "bit_count": "3.10 (int)", "hardlink_to": "3.10 (Path)",
}
BUILTIN_GENERICS = {"list", "dict", "tuple", "set", "frozenset", "type"}  # subscriptable at runtime from 3.9
# Their classes too (`typing`'s aliases are subscriptable on 3.8): collections.abc.Callable[...] and the like.
GENERIC_MODULES = {"collections", "collections.abc", "os", "re", "queue", "contextlib"}


def device_files() -> list[Path]:
    files = []
    for entry in DEVICE_SIDE:
        path = ROOT / entry
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_vermin_finds_nothing_newer_than_python_3_8():
    exe = shutil.which("vermin", path=str(Path(sys.executable).parent)) or shutil.which("vermin")
    if exe is None:
        pytest.skip("vermin is not installed (pip install -e '.[test]')")
    target = ".".join(map(str, OLDEST))
    out = subprocess.run(
        [exe, f"-t={target}-", "--violations", "-vvv", "--no-tips", "--no-parse-comments", "--no-eval-annotations",
         "--pessimistic", "--no-config-file", *DEVICE_SIDE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    analyzed = re.search(r"Analyzing (\d+) files", text)
    assert analyzed and int(analyzed.group(1)) >= len(device_files()), f"vermin skipped files:\n{text}"
    assert out.returncode == 0, f"vermin: device-side code needs a Python newer than {target}:\n{text}"
    found = re.search(r"Minimum required versions: (?:~2, )?(?:!2, )?3\.(\d+)", text)
    assert found is None or int(found.group(1)) <= OLDEST[1], text


def _annotation_nodes(tree: ast.AST) -> set[int]:
    """ids of every node inside an annotation (never evaluated with `from __future__ import annotations`)."""
    roots = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
            roots += [a.annotation for a in every if a is not None and a.annotation is not None]
            roots += [node.returns] if node.returns is not None else []
        elif isinstance(node, ast.AnnAssign):
            roots.append(node.annotation)
    return {id(n) for root in roots for n in ast.walk(root)}


def _dotted(node: ast.AST) -> str:
    """`a.b.c` for a Name or an Attribute chain, else ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and _dotted(node.value):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _runtime_generic(name: str, imported: set[str]) -> bool:
    """`list`, or a class (capitalised, not `os.environ`) from GENERIC_MODULES: subscriptable from 3.9 only."""
    if name in BUILTIN_GENERICS:
        return True
    module, _, last = name.rpartition(".")
    return last[:1].isupper() and (name in imported or module in GENERIC_MODULES)


def _is_type_union(node: ast.AST) -> bool:
    return isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and all(
        isinstance(side, (ast.Name, ast.Attribute, ast.Subscript)) or _is_type_union(side) or
        (isinstance(side, ast.Constant) and side.value is None) for side in (node.left, node.right))


def test_device_side_code_has_no_runtime_constructs_newer_than_3_8():
    problems = []
    for path in device_files():
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        in_annotation = _annotation_nodes(tree)
        generic = {alias.asname or alias.name for n in ast.walk(tree)
                   if isinstance(n, ast.ImportFrom) and n.module in GENERIC_MODULES for alias in n.names}
        future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                     any(a.name == "annotations" for a in n.names) for n in tree.body)
        if in_annotation and not future:
            problems.append(f"{rel}: annotations without `from __future__ import annotations` (3.8 evaluates them)")
        for node in ast.walk(tree):
            if id(node) in in_annotation:
                continue
            line = getattr(node, "lineno", "?")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in NEWER_METHODS):
                problems.append(f"{rel}:{line}: .{node.func.attr}() needs Python {NEWER_METHODS[node.func.attr]}")
            elif isinstance(node, ast.Subscript) and _runtime_generic(_dotted(node.value), generic):
                problems.append(f"{rel}:{line}: {_dotted(node.value)}[...] evaluated at runtime needs Python 3.9 "
                                "(in an annotation it is fine; elsewhere use typing's alias)")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2
                  and _is_type_union(node.args[1])):
                problems.append(f"{rel}:{line}: {node.func.id}(x, A | B) needs Python 3.10; use a tuple")
    assert not problems, "device-side code that fails on Python 3.8:\n" + "\n".join(problems)


# Import names a top-level folder must never have: with the checkout on sys.path (`python -m pytest` from the
# root, a notebook started there) the folder would be imported instead of the package. torch imports triton
# (inductor, torch.compile) and probes for others.
SHADOW_RISKS = {"triton", "torch", "torchvision", "onnx", "onnxruntime", "numpy", "click", "yaml", "tqdm",
                "matplotlib", "openvino", "tritonclient", "tensorrt", "cuda", "cupy", "pytest", "hypothesis",
                "sympy", "networkx", "jinja2", "filelock", "fsspec", "typing_extensions", "test"}


def test_no_top_level_folder_shadows_a_package():
    root = Path(__file__).resolve().parent.parent
    folders = {p.name for p in root.iterdir() if p.is_dir() and p.name.isidentifier()}
    assert not folders & SHADOW_RISKS, folders & SHADOW_RISKS
    # Nor any package installed here: asked from outside the checkout, so that the folders themselves are not found.
    # A namespace package (no __init__, origin None) is not shadowed: it merges with a folder of the same name (einx,
    # which tiny-recursive-model pulls in, installs its documentation as a top-level `docs` namespace).
    script = ("import importlib.util, sys; names = sys.argv[1:]; specs = [importlib.util.find_spec(n) for n in names]; "
              "print(' '.join(n for n, s in zip(names, specs) if s is not None and s.origin is not None))")
    done = subprocess.run([sys.executable, "-c", script, *sorted(folders - {"tests"})], capture_output=True,
                          text=True, cwd=root.parent, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "", done.stdout + done.stderr
