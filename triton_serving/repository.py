"""`trm-export triton BUNDLE -o REPOSITORY`: a Triton Inference Server model repository that serves a bundle.

    REPOSITORY/
      README.md                       how to start tritonserver, the model's inputs and outputs, client examples
      trm_export_repository.json      what was written from what (the bundle's manifest digest, the settings)
      Dockerfile, k8s.yaml            the repository as an image, and its Kubernetes deployment (triton.deployment)
      NAME/config.pbtxt               Python backend, max_batch_size 0, inputs / outputs, parameters of the loop
      NAME/1/model.py                 the backend's entry points (trm_export.triton.model, copied verbatim)
      NAME/1/bundle/                  the bundle: manifest and the files it lists, checksums verified on load

One model, not a step model driven by a loop model through BLS: the loop model runs the step in its own process
with the runtime's backends (ONNX Runtime on the CPU or CUDA, or the bundle's TensorRT engine), so the recursion
state (z_H, z_L: batch x positions x hidden floats each) never leaves the process between steps, where a BLS call
per step would copy it to and from Triton twice per step; Triton's own batching would also cut the loop at request
boundaries, which is what continuous refill across requests avoids (trm_export.triton.serving).

The bundle is untrusted input: its checksums are verified before anything is written, the model name is checked
(it becomes a folder and a quoted config string), every copied path is resolved inside the bundle, and the
repository appears only when complete (written beside it under a hidden name, then renamed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from trm_export.errors import BundleError, InputError
from trm_export.runtime.manifest import MANIFEST_NAME, Manifest, member, read_manifest
from trm_export.runtime.solver import Solver
from trm_export.targets.device_readme import bundled_runtime, sample_file
from trm_export.triton.deployment import dockerfile, image_name, kubernetes, kubernetes_yaml, readme_section
from trm_export.triton.serving import BUNDLE_DIR, LoopParameters

MARKER = "trm_export_repository.json"
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
KINDS = ("cpu", "gpu")


@dataclass(frozen=True)
class TritonOptions:
    """What `write_repository` writes. `loop`: the loop model's parameters (config.pbtxt, editable later);
    `instances`: model instances (each a process with its own loop and batch); `kind`: where they run."""

    name: str = "trm"
    loop: LoopParameters = LoopParameters()
    instances: int = 1
    kind: str = "cpu"
    force: bool = False


def config_pbtxt(name: str, seq_len: int, options: TritonOptions) -> str:
    """The loop model's config.pbtxt (Triton's ModelConfig in protobuf text format)."""
    params = "\n".join(f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}'
                       for k, v in options.loop.as_config().items())
    return f'''name: "{name}"
backend: "python"
# 0: Triton does not batch; the model batches puzzles of all requests itself (continuous refill). A request carries
# any number of puzzles up to the max_puzzles parameter.
max_batch_size: 0
input [
  {{ name: "puzzles" data_type: TYPE_INT64 dims: [ -1, {seq_len} ] }},
  {{ name: "puzzle_ids" data_type: TYPE_INT64 dims: [ -1 ] optional: true }}
]
output [
  {{ name: "predictions" data_type: TYPE_INT64 dims: [ -1, {seq_len} ] }},
  {{ name: "steps" data_type: TYPE_INT32 dims: [ -1 ] }},
  {{ name: "q_halt" data_type: TYPE_FP32 dims: [ -1 ] }},
  {{ name: "q_continue" data_type: TYPE_FP32 dims: [ -1 ] }}
]
# Each instance is a process with its own loop and batch of batch_size slots; one keeps the batch fullest. With
# several CPU instances, set threads to cores / instances (each ONNX Runtime session would take every core).
instance_group [ {{ kind: KIND_{options.kind.upper()} count: {options.instances} }} ]
# The loop (trm_export.triton.serving.LoopParameters; "" = the default): variant (the bundle's default), mode
# (adaptive | fixed), halting (q | stable:K | q+stable:K), max_steps (the trained limit), min_steps, batch_size
# (slots), threads (ONNX Runtime intra-op threads; "": all cores), backend (auto | onnxruntime | tensorrt),
# max_puzzles (per request).
{params}
'''


def check_options(manifest: Manifest, bundle: Path, options: TritonOptions) -> None:
    """Refuse what the server would refuse at load time, now, in one line."""
    if not NAME_PATTERN.fullmatch(options.name):
        raise InputError(f"model name {options.name!r}: use letters, digits, '_', '-' and '.' (at most 64, not "
                         "starting with '.' or '-'); it becomes a folder and a config string")
    if options.kind not in KINDS:
        raise InputError(f"instance kind must be one of {KINDS}, got {options.kind!r}")
    if isinstance(options.instances, bool) or not isinstance(options.instances, int) or options.instances < 1:
        raise InputError(f"instances must be an integer >= 1, got {options.instances!r}")
    p = options.loop
    for field, value in (("batch_size", p.batch_size), ("max_puzzles", p.max_puzzles)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{field} must be an integer >= 1, got {value!r}")
    if p.variant is not None and p.variant not in manifest.graphs:
        raise BundleError(f"requested variant {p.variant!r}; this bundle has {sorted(manifest.graphs)}")
    for text in p.as_config().values():  # strings go into config.pbtxt between quotes
        if '"' in text or "\\" in text or "\n" in text:
            raise InputError(f"parameter value {text!r} contains a quote, backslash or newline")
    # The loop settings as the served model will check them (mode, halting, steps), and the graph loads.
    Solver(bundle, variant=p.variant, batch_size=1, verify=False).loop_settings(p.mode, p.max_steps, p.min_steps,
                                                                                 p.halting)


def write_repository(bundle: str | Path, out: str | Path, options: TritonOptions = TritonOptions()) -> Path:
    """Write the model repository for `bundle` at `out` (see the module docstring); returns `out`."""
    bundle, out = Path(bundle), Path(out)
    manifest = read_manifest(bundle, verify=True)
    check_options(manifest, bundle, options)
    if out.exists() and not options.force:
        raise BundleError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not (out / MARKER).is_file():
        raise BundleError(f"{out} exists and is not a repository written by trm-export triton; refusing to replace "
                          "it even with --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        version = staging / options.name / "1"
        copy_bundle(bundle, manifest, version / BUNDLE_DIR)
        read_manifest(version / BUNDLE_DIR, verify=True)  # the copy is the bundle, byte for byte
        shutil.copyfile(Path(__file__).with_name("model.py"), version / "model.py")
        (staging / options.name / "config.pbtxt").write_text(config_pbtxt(options.name, manifest.task.seq_len,
                                                                          options))
        digest = json.loads((bundle / MANIFEST_NAME).read_text(encoding="utf-8"))["digest"]
        image = image_name(options.name, digest)
        wheel = bundled_runtime(manifest)[0]
        (staging / "README.md").write_text(render_readme(options, manifest, bundle) + "\n"
                                           + readme_section(options.name, image))
        (staging / "Dockerfile").write_text(dockerfile(options.name, wheel))
        (staging / "k8s.yaml").write_text(kubernetes_yaml(kubernetes(options.name, image)))
        record = {"bundle": str(bundle), "manifest_digest": digest, "model": options.name,
                  "instances": options.instances, "kind": options.kind, "loop": asdict(options.loop)}
        (staging / MARKER).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            aside = out.parent / f".{out.name}.replaced-{os.getpid()}"
            os.replace(out, aside)
            os.replace(staging, out)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def copy_bundle(bundle: Path, manifest: Manifest, into: Path) -> None:
    """The manifest and the files it lists, nothing else (no report, no stray files), each resolved inside."""
    into.mkdir(parents=True)
    shutil.copyfile(bundle / MANIFEST_NAME, into / MANIFEST_NAME)
    for rel in sorted(manifest.files):
        target = into / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(member(bundle, rel), target)


def render_readme(options: TritonOptions, manifest: Manifest, bundle: Path) -> str:
    name, task, p = options.name, manifest.task, options.loop
    variant = p.variant or manifest.default_variant
    wheel = bundled_runtime(manifest)[0]
    # The runtime travels with the bundle (distribution.wheel): install it from the copy in this repository.
    runtime = f"{name}/1/{BUNDLE_DIR}/{wheel}" if wheel else "trm-export"
    in_container = f"/models/{runtime}" if wheel else runtime

    sample = sample_file(manifest) or "samples/puzzles.txt"
    return f"""# Triton model repository: `{name}`

Written by `trm-export triton {bundle.name}` from a bundle of task `{task.name or "custom"}` ({task.seq_len} tokens
per puzzle, vocabulary {task.vocab_size}), variant `{variant}`. Loop: mode `{p.mode}`, halting `{p.halting}`,
{p.batch_size} slots, at most {p.max_puzzles} puzzles per request, {options.instances} {options.kind.upper()}
instance(s).

## The model `{name}`

| input | type | shape | |
|---|---|---|---|
| `puzzles` | INT64 | [N, {task.seq_len}] | token ids, as the bundle's task encodes puzzles |
| `puzzle_ids` | INT64 | [N] | optional: puzzle identifiers (0 when absent) |

| output | type | shape | |
|---|---|---|---|
| `predictions` | INT64 | [N, {task.seq_len}] | the answer tokens |
| `steps` | INT32 | [N] | recursion steps each puzzle ran |
| `q_halt`, `q_continue` | FP32 | [N] | the Q head at the last step |

Every puzzle of every request joins one batch: when a puzzle halts, its slot takes the next queued puzzle, whichever
request it came from, and a request is answered as soon as its own puzzles have halted. Answers are the runtime's
(`trm_export.runtime.Solver`) with the same settings. A bad request (wrong shape or type: Triton's message; a token
outside the vocabulary, more than {p.max_puzzles} puzzles: ours) gets an error and does not disturb the others.

The loop's settings are the `parameters` of `{name}/config.pbtxt`; edit them and restart the server. The bundle in
`{name}/1/bundle/` is verified against its checksums when the model loads.

## Start the server

The model runs in Triton's Python backend, which needs `trm-export` (numpy + onnxruntime, no torch) importable
where its stub runs, with numpy < 2 for stubs built against numpy 1.x (Triton 2.51 / 24.10, the one tested; the
model refuses to load, saying so, when tensors do not survive the exchange).

In an NGC container (`nvcr.io/nvidia/tritonserver:<yy.mm>-py3`, which has the Python backend):

```bash
docker run --rm -p 127.0.0.1:8000:8000 -p 127.0.0.1:8001:8001 -p 127.0.0.1:8002:8002 -v "$PWD":/models \\
  nvcr.io/nvidia/tritonserver:24.10-py3 \\
  bash -c "pip install 'numpy<2' {in_container} && tritonserver --model-repository=/models"
```

Without a container (x86-64, glibc 2.35+), PyPI's `nvidia-pytriton` wheel carries a `tritonserver` binary and the
Python backend; trm-export finds and starts it (`trm_export.triton.server`, as its tests do):

```bash
python3.11 -m venv triton-env && triton-env/bin/pip install 'numpy<2' onnxruntime \\
  && triton-env/bin/pip install --no-deps nvidia-pytriton==0.7.0 {runtime}     # the server binary only
triton-env/bin/python -c "from trm_export.triton.server import TritonServer; TritonServer('.', 'triton-env', \\
  http_port=8000, grpc_port=8001, metrics_port=8002).run_forever()"
```

Ctrl-C or SIGTERM to that launcher stops the server gracefully: it takes no new requests, answers those in flight
within the grace period (`grace_seconds=30`, tritonserver's `--exit-timeout-secs`), and leaves no process behind.

Prometheus metrics are at `http://HOST:8002/metrics` (`metrics_port`, tritonserver's `--metrics-port`; without it
the launcher picks a free port and prints it): Triton's per-model counts and times, and the loop's own
`trm_puzzles_total`, `trm_steps_total` (over it: mean steps), `trm_puzzles_at_step_limit_total`,
`trm_requests_total`, `trm_request_seconds_total` (arrival to answer), `trm_queue_seconds_total` (waiting for a
slot, summed over puzzles) and `trm_puzzles_in_flight`, reported at each
new request.

It listens on 127.0.0.1 (this machine only); `host='0.0.0.0'` serves other machines. HTTP reaches tritonserver
through the launcher's front door (`trm_export.triton.front_door`): tritonserver's own HTTP parser sizes a buffer
from a request's declared shape before checking it, so one request declaring `[2**40, 81]` would abort the server;
the front door refuses such a request, and any body over `max_request_bytes` (64 MiB) or sent chunked or
compressed, with a 4xx answer. (The container line above and the `Dockerfile` run tritonserver alone, without it:
publish their ports on the host's loopback, `-p 127.0.0.1:8000:8000`, or put a proxy that limits request sizes in
front of port 8000; gRPC checks sizes itself.)

GPU: write the repository with `--kind gpu`; the loop then runs the bundle's TensorRT engine where one was built
for that GPU and TensorRT is importable in the stub's environment, else ONNX Runtime's CUDA provider.

## Clients

Puzzles travel as the model's tokens (the bundle's `task` encoding). `trm_export.triton.client.LoopClient` does the
encoding: it reads the task's text format (or a `.npy` of tokens) as `trm-export run` does, checks shapes and the
vocabulary before sending, splits the puzzles into requests of at most {p.max_puzzles}, and prints the answers as
`run` does (answer, steps, valid). With trm-export and tritonclient installed (`pip install {runtime}
"tritonclient[http]"`), this solves the bundle's sample puzzles:

```python
from trm_export.triton.client import LoopClient

bundle = "{name}/1/{BUNDLE_DIR}"  # the server's copy: the client encodes puzzles as its manifest says
with LoopClient.for_bundle("localhost:8000", bundle, model="{name}", max_puzzles={p.max_puzzles}) as client:
    print(client.solve_file(f"{{bundle}}/{sample}"), end="")  # answer, steps, valid: one line per puzzle
```

`protocol="grpc"` with port 8001 speaks gRPC. Raw tokens: `client.solve(tokens)` (INT64 [N, {task.seq_len}]) gives
answers, steps and Q values as arrays. All zeros is not a puzzle: the model answers it with noise and no error.

Throughput needs requests in flight: send from several threads (or `async_infer`); the model batches them.
"""
