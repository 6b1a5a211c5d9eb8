"""The loop that device apps embed: load a bundle, feed puzzles, get answers.

    solver = Solver("bundle/")
    answer = solver.solve(puzzle_tokens)              # one puzzle or [N, seq_len]
    answer.predictions, answer.steps_used

Modes: `fixed` runs every puzzle `max_steps` steps (the papers' evaluation); `adaptive` halts a puzzle by a halting
policy (after at least `min_steps`, at most `max_steps`, which may exceed the trained limit):

- `halting="q"` (the default): when the trained Q head says so, by the rule the checkpoint was trained with;
- `halting="stable:K"`: once the puzzle's answer (the argmax of its logits) has not changed for K consecutive
  steps, i.e. at the first step t whose answer equals the answers after steps t-1, ..., t-K (so at step K+1 at
  the earliest). It does not trust the Q head; it stops models that would "overthink" a settled answer;
- `halting="q+stable:K"`: at the first step where either says halt (the Q head, or K unchanged steps).

`min_steps` holds every policy back, `max_steps` stops every puzzle. The stable policies read every active
puzzle's answer after every step: free on ONNX Runtime (the logits are in host memory), a device-to-host copy of
the logits per step on TensorRT; the `q` policy reads answers only when a puzzle halts.

Puzzles stream through `batch_size` slots; with `refill` (default) a halted puzzle's slot takes the next puzzle
on the next step, so the batch stays full. A puzzle's computation never mixes with its neighbours' (every op
of the step graph is per sample), so its answer does not depend on what else is in the batch.

Threads: a Solver may be shared. Its backend holds one batch of state, so `solve` calls on one Solver run one at
a time (a lock; a second thread waits for the first to finish). For parallel throughput give each thread its own
Solver: they share nothing. For many callers feeding one batch (a server), `runtime.stream.SolverStream` runs this
loop on its own thread and takes every caller's puzzles into the same slots.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from trm_export.errors import BundleError, InputError
from trm_export.runtime.backend import Backend, OnnxRuntimeBackend, importable
from trm_export.runtime.embedding import Embedder
from trm_export.runtime.manifest import HALTING_RULE, Manifest, member, read_manifest
from trm_export.runtime.validate import validate_puzzles

MODES = ("fixed", "adaptive")
HALTING_FORMS = ("q", "stable:K", "q+stable:K")
BACKENDS = ("auto", "onnxruntime", "openvino", "tensorrt")
GRAPH_FORMS = ("auto", "fused", "standard")
# A step budget beyond any use (the papers evaluate 16 steps; HRM's accuracy knob goes to a few times that).
MAX_STEPS = 4096


def state_bytes(batch_size: int, state_shape: tuple[int, int], seq_len: int, vocab: int) -> int:
    """Host memory a backend allocates for `batch_size` slots: x, two states twice (ping-pong), logits."""
    s, d = state_shape
    return 4 * batch_size * (5 * s * d + seq_len * vocab + 2)


@dataclass(frozen=True)
class LoopSettings:
    """How the loop runs every puzzle it is fed (`Solver.loop_settings` checks them)."""

    mode: str
    max_steps: int
    min_steps: int
    halting: HaltingPolicy


class PuzzleFeed(Protocol):
    """Where `Solver.run_loop` takes puzzles from and gives answers to. Keys are the feed's own int64 labels."""

    def take(self, n: int, wait: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Up to n puzzles: tokens [k, seq_len], ids [k], keys [k]. With `wait` (nothing is running), block until
        there is work; k == 0 then ends the loop."""

    def finish(self, keys: np.ndarray, predictions: np.ndarray, steps: np.ndarray, q_halt: np.ndarray,
               q_continue: np.ndarray) -> None:
        """Halted puzzles' answers."""


class _ArrayFeed:
    """The puzzles of one `solve` call, in order; keys are their row numbers."""

    def __init__(self, tokens: np.ndarray, ids: np.ndarray):
        self.tokens, self.ids, self.next = tokens, ids, 0
        n = len(tokens)
        self.predictions = np.zeros((n, tokens.shape[1]), np.int64)
        self.steps = np.zeros(n, np.int32)
        self.q = np.zeros((2, n), np.float32)

    def take(self, n: int, wait: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys = np.arange(self.next, min(self.next + n, len(self.tokens)))
        self.next += len(keys)
        return self.tokens[keys], self.ids[keys], keys

    def finish(self, keys, predictions, steps, q_halt, q_continue) -> None:
        self.predictions[keys], self.steps[keys] = predictions, steps
        self.q[0, keys], self.q[1, keys] = q_halt, q_continue

    def result(self) -> SolveResult:
        return SolveResult(self.predictions, self.steps, self.q[0], self.q[1])


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


@dataclass(frozen=True)
class SolveResult:
    """Answers in input order."""

    predictions: np.ndarray  # [N, seq_len] int64
    steps_used: np.ndarray  # [N] int32
    q_halt: np.ndarray  # [N] float32, at the final step
    q_continue: np.ndarray  # [N]

    def __len__(self) -> int:
        return len(self.steps_used)


@dataclass(frozen=True)
class HaltingPolicy:
    """How `adaptive` mode halts a puzzle: on the Q head (`q`), on `stable` unchanged answers in a row (0: not), or
    on either, whichever says so first."""

    q: bool = True
    stable: int = 0

    @property
    def name(self) -> str:
        """The policy as `parse_halting` reads it: "q", "stable:K" or "q+stable:K"."""
        return "+".join((["q"] if self.q else []) + ([f"stable:{self.stable}"] if self.stable else []))


def parse_halting(policy: str | HaltingPolicy) -> HaltingPolicy:
    """"q" | "stable:K" | "q+stable:K" (K an integer, 1..MAX_STEPS) -> HaltingPolicy; anything else: InputError."""
    if isinstance(policy, HaltingPolicy):
        if isinstance(policy.stable, bool) or not isinstance(policy.stable, int) or not (
                policy.q or policy.stable) or not 0 <= policy.stable <= MAX_STEPS:
            raise InputError(f"not a halting policy: {policy!r}")
        return policy
    if isinstance(policy, str):
        text = policy.strip()
        q = text == "q" or text.startswith("q+")
        rest = text[2:] if text.startswith("q+") else text
        if text == "q":
            return HaltingPolicy(True, 0)
        if rest.startswith("stable:"):
            k = rest[len("stable:"):]
            if k.isascii() and k.isdigit() and 1 <= int(k) <= MAX_STEPS:
                return HaltingPolicy(q, int(k))
    raise InputError(f"halting must be one of {', '.join(HALTING_FORMS)} with K an integer 1..{MAX_STEPS} (the "
                     f"answer unchanged for K steps in a row), got {policy!r}")


def halt_now(q_halt: np.ndarray, q_continue: np.ndarray, rule: str) -> np.ndarray:
    """Boolean 'halt now' per puzzle from one step's Q values, by the rule the checkpoint was trained with:
    `q_halt>0` (TRM), `q_halt>q_continue` (HRM, TRM with the continue head), or `q_halt>=T` (a halting logit
    against a threshold T, compared in float64: tiny-recursive-model's sigmoid(halt) >= P is q_halt >= logit(P))."""
    if rule == "q_halt>0":
        return q_halt > 0
    if rule == "q_halt>q_continue":
        return q_halt > q_continue
    threshold = halting_threshold(rule)
    if threshold is not None:
        return np.asarray(q_halt, np.float64) >= threshold
    raise BundleError(f"unknown halting rule {rule!r}; known: 'q_halt>0', 'q_halt>q_continue', 'q_halt>=T'")


def halting_threshold(rule: str) -> float | None:
    """T of a `q_halt>=T` rule, None for the other rules."""
    match = HALTING_RULE.fullmatch(rule)
    return float(match.group(1)) if match and match.group(1) is not None else None


def select_backend(manifest: Manifest, variant: str, requested: str, tensorrt_here: bool) -> tuple[str, str | None]:
    """("tensorrt" | "onnxruntime" | "openvino", note): which backend runs `variant`, and a line saying why when it
    is not the one the bundle was built for. Never a silent fall back: "auto" falls back with a note, "tensorrt"
    refuses. "onnxruntime" and "openvino" run the ONNX graph, as asked."""
    if requested not in BACKENDS:
        raise BundleError(f"requested backend {requested!r}; available: {', '.join(map(repr, BACKENDS))}")
    engine = manifest.build.get("engines", {}).get(variant)
    if requested in ("onnxruntime", "openvino"):
        return requested, None
    if engine is not None and tensorrt_here:
        return "tensorrt", None
    if requested == "tensorrt":
        if engine is None:
            raise BundleError(f"no TensorRT engine for variant {variant!r} in this bundle; build one on the device "
                              "with `trm-export build BUNDLE` (or build/build_engines.sh, which records it)")
        raise BundleError(f"variant {variant!r} has a TensorRT engine ({engine['file']}) but TensorRT is not "
                          "importable here: on a Jetson use a venv with --system-site-packages (JetPack's TensorRT)")
    if engine is not None:
        return "onnxruntime", (f"variant {variant!r} has a TensorRT engine ({engine['file']}) but TensorRT is not "
                               "importable here: running ONNX Runtime instead (--backend tensorrt refuses to)")
    if manifest.build.get("recipes"):  # a TensorRT target's bundle, no engine built yet
        return "onnxruntime", (f"no TensorRT engine for variant {variant!r} yet: running ONNX Runtime (build engines "
                               "on the device: build/build_engines.sh or `trm-export build`)")
    return "onnxruntime", None


def _tuned_cpu_engine(manifest: Manifest, variant: str, batch: int, threads: int | None,
                      provider: str | None) -> tuple[str, str | None]:
    """("onnxruntime" | "openvino", note) for `auto` on a CPU: OpenVINO only where `trm-export tune` measured it
    faster on this machine (runtime.cpu_engines); ONNX Runtime otherwise, and always where it has a GPU provider."""
    from trm_export.runtime.backend import onnxruntime_providers
    from trm_export.runtime.cpu_engines import measured_engine
    from trm_export.runtime.openvino_backend import HOW_TO_INSTALL

    engine, note = measured_engine(manifest, variant, batch, threads)
    if engine != "openvino" or (provider is None and onnxruntime_providers(None)[0] != "CPUExecutionProvider"):
        return "onnxruntime", note
    if not importable("openvino"):
        return "onnxruntime", ("this machine's record says OpenVINO is faster, but it is not installed: "
                               f"{HOW_TO_INSTALL}")
    return "openvino", note


class Solver:
    """Runs a bundle's step graph in a loop. Verifies the bundle's checksums on load.

    `variant` None: the bundle's default (`manifest.default_variant`, the target's precision chosen at export).
    `backend`: "auto" runs a recorded TensorRT engine where TensorRT is importable, else ONNX Runtime and says
    why in `backend_note` (or OpenVINO, where `trm-export tune` measured it faster on this machine: the note says
    so); "tensorrt" refuses to fall back; "onnxruntime" always runs the ONNX graph; "openvino" runs it on
    OpenVINO's CPU plugin in float32 (optional: installed separately).

    `graph_form`, where the variant has two graph files (the cpu target's fp32: ONNX Runtime's fused attention,
    and the same step in standard ops): "auto" gives OpenVINO the standard-ops file and ONNX Runtime the fused one
    (each engine's faster form, issue #41); "fused" or "standard" picks one for any engine."""

    def __init__(self, bundle: str | Path, *, variant: str | None = None, backend: str = "auto",
                 provider: str | None = None, batch_size: int = 64, threads: int | None = None,
                 verify: bool = True, graph_form: str = "auto"):
        self.bundle = Path(bundle)
        self.manifest: Manifest = read_manifest(self.bundle, verify=verify)
        variant = self.manifest.default_variant if variant is None else variant
        if variant not in self.manifest.graphs:
            raise BundleError(f"requested variant {variant!r}; this bundle has {sorted(self.manifest.graphs)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        task = self.manifest.task
        if graph_form not in GRAPH_FORMS:
            raise BundleError(f"graph_form must be one of {', '.join(GRAPH_FORMS)}, got {graph_form!r}")
        if graph_form == "standard" and self.manifest.graphs[variant].standard_file is None:
            raise BundleError(f"variant {variant!r} has no standard-ops graph in this bundle (only the cpu target's "
                              "fp32 carries one)")
        self.variant, self.graph_form = variant, graph_form
        self.embedder = Embedder(self.bundle, self.manifest.embedding, task)
        need, have = state_bytes(batch_size, self.embedder.state_shape, task.seq_len, task.vocab_size), _memory_bytes()
        if have is not None and need > have // 2:
            raise InputError(f"batch_size {batch_size} needs {need / 2**30:.1f} GiB of buffers for this model; this "
                             f"machine has {have / 2**30:.1f} GiB: use a smaller --batch-size")
        self.backend: Backend = self._make_backend(backend, provider, batch_size, threads)
        self._lock = threading.Lock()

    def _make_backend(self, backend: str, provider: str | None, batch_size: int, threads: int | None) -> Backend:
        task = self.manifest.task
        engine = self.manifest.build.get("engines", {}).get(self.variant)
        kind, self.backend_note = select_backend(self.manifest, self.variant, backend, importable("tensorrt"))
        if kind == "onnxruntime" and backend == "auto" and provider in (None, "cpu"):
            kind, note = _tuned_cpu_engine(self.manifest, self.variant, batch_size, threads, provider)
            self.backend_note = "; ".join(n for n in (self.backend_note, note) if n) or None
        if kind == "tensorrt":
            from trm_export.runtime.tensorrt_backend import TensorRTBackend, check_engine_here

            check_engine_here(engine)
            return TensorRTBackend(member(self.bundle, engine["file"]), batch_size, self.embedder.state_shape,
                                   task.seq_len, task.vocab_size)
        graph, path = self.manifest.graphs[self.variant], self._graph_file(kind)
        made: Backend
        if kind == "openvino":
            from trm_export.runtime.openvino_backend import OpenVinoBackend

            if provider not in (None, "cpu"):
                raise BundleError(f"provider {provider!r} is ONNX Runtime's; the openvino backend runs on the CPU")
            made = OpenVinoBackend(member(self.bundle, path), batch_size, self.embedder.state_shape, task.seq_len,
                                   task.vocab_size, threads=threads)
        else:
            made = OnnxRuntimeBackend(member(self.bundle, path), batch_size, self.embedder.state_shape,
                                      task.seq_len, task.vocab_size, provider=provider, threads=threads)
        if graph.standard_file is not None:  # two forms of this step: say which one runs
            made.name += ", standard-ops graph" if path == graph.standard_file else ", fused graph"
        return made

    def _graph_file(self, engine: str) -> str:
        """Which of the variant's graph files `engine` reads (see graph_form in the class docstring)."""
        graph = self.manifest.graphs[self.variant]
        standard = self.graph_form == "standard" or (self.graph_form == "auto" and engine == "openvino")
        return graph.standard_file if standard and graph.standard_file is not None else graph.file

    @property
    def task(self):
        return self.manifest.task

    def solve(self, puzzles: object, puzzle_ids: object = None, *, mode: str = "adaptive",
              max_steps: int | None = None, min_steps: int = 1, refill: bool = True,
              on_step: Callable[[int, np.ndarray, np.ndarray, np.ndarray], None] | None = None,
              halting: str | HaltingPolicy = "q") -> SolveResult:
        """Solve puzzles ([N, seq_len] tokens, or one puzzle) and return answers in input order.

        `halting` (adaptive mode; `fixed` ignores it, but it must still be a valid policy): "q" (the bundle's
        trained Q-head rule), "stable:K" or "q+stable:K" (see the module docstring).

        `on_step(puzzle_index[n], steps[n], q_halt[n], q_continue[n])` is called after every step for the n active
        slots (puzzle index -1: a finished puzzle waiting for its batch; steps: how many steps each puzzle has
        run, the one just taken included); it may read `self.backend.state(n)` and
        `self.backend.logits(...)`. For tracing and verification.
        """
        settings = self.loop_settings(mode, max_steps, min_steps, halting)
        tokens, ids = validate_puzzles(puzzles, puzzle_ids, self.task)
        feed = _ArrayFeed(tokens, ids)
        with self._lock:  # one batch of state in the backend: solves on one Solver take turns
            self.run_loop(feed, settings, refill, on_step)
        return feed.result()

    def loop_settings(self, mode: str = "adaptive", max_steps: int | None = None, min_steps: int = 1,
                      halting: str | HaltingPolicy = "q") -> LoopSettings:
        """The checked loop settings of `solve` (InputError on a bad one)."""
        if mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {mode!r}")
        policy = parse_halting(halting)
        limit = self.manifest.loop.halt_max_steps if max_steps is None else max_steps
        for name, value in (("max_steps", limit), ("min_steps", min_steps)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise InputError(f"{name} must be an integer, got {value!r}")
        if not 1 <= min_steps <= limit <= MAX_STEPS:
            raise InputError(f"need 1 <= min_steps ({min_steps}) <= max_steps ({limit}) <= {MAX_STEPS}")
        return LoopSettings(mode, int(limit), int(min_steps), policy)

    def run_loop(self, feed: PuzzleFeed, settings: LoopSettings, refill: bool = True,
                 on_step: Callable | None = None) -> None:
        """The loop itself: puzzles from `feed.take`, answers to `feed.finish`, until `feed.take(..., wait=True)`
        returns none. The caller holds the backend (`solve` holds the Solver's lock; `runtime.stream` owns its
        Solver)."""
        capacity = self.backend.capacity
        rule = self.manifest.loop.halting_rule
        mode, limit, min_steps, policy = settings.mode, settings.max_steps, settings.min_steps, settings.halting
        use_q = mode == "adaptive" and policy.q
        stable = policy.stable if mode == "adaptive" else 0
        # stable:K, per slot: the answer after its last step, and how many steps in a row it has not changed
        # (moved along with the slot when slots are packed, reset when the slot takes a new puzzle).
        slot_answer = np.zeros((capacity if stable else 0, self.task.seq_len), np.int64)
        slot_unchanged = np.zeros(capacity, np.int32)
        slot_puzzle = np.full(capacity, -1, np.int64)  # the feed's key; -1: free, or finished, waiting for its batch
        slot_steps = np.zeros(capacity, np.int32)

        def load(slots: np.ndarray, wait: bool = False) -> int:
            tokens, ids, keys = feed.take(len(slots), wait)
            take = len(keys)
            if take:
                slots = slots[:take]
                z_H, z_L = self.embedder.initial_state(take)
                self.backend.load(slots, self.embedder(tokens, ids), z_H, z_L)
                slot_puzzle[slots], slot_steps[slots], slot_unchanged[slots] = keys, 0, 0
            return take

        active = 0
        while True:
            if not active:  # the first batch, the next batch without refill, or new work for an idle stream
                active = load(np.arange(capacity), wait=True)
                if not active:
                    return
            q_halt, q_cont = self.backend.step(active)
            if not (np.isfinite(q_halt).all() and np.isfinite(q_cont).all()):
                raise BundleError(f"{self.bundle}: the {self.variant} step graph produced NaN or infinite Q values; "
                                  f"the graph is broken: run `trm-export verify {self.bundle} --variant "
                                  f"{self.variant}` and re-export")
            live = slot_puzzle[:active] >= 0
            slot_steps[:active] += live
            if on_step is not None:
                on_step(slot_puzzle[:active].copy(), slot_steps[:active].copy(), q_halt, q_cont)
            answers = None
            if stable:  # every active slot's answer, every step (on TensorRT: a copy of the logits to the host)
                answers = self.backend.logits(np.arange(active)).argmax(-1)
                same = (slot_steps[:active] > 1) & (answers == slot_answer[:active]).all(axis=1)  # step 1: changed
                slot_unchanged[:active] = np.where(same, slot_unchanged[:active] + 1, 0)
                slot_answer[:active] = answers
            halted = live & (slot_steps[:active] >= limit)
            if mode == "adaptive":
                says = np.zeros(active, bool)
                if use_q:
                    says |= halt_now(q_halt, q_cont, rule)
                if stable:
                    says |= slot_unchanged[:active] >= stable
                halted |= live & (slot_steps[:active] >= min_steps) & says
            done = np.flatnonzero(halted)
            if len(done):
                feed.finish(slot_puzzle[done], self.backend.logits(done).argmax(-1) if answers is None else
                            answers[done], slot_steps[done].copy(), q_halt[done], q_cont[done])
                slot_puzzle[done] = -1
            if refill:
                carried = (slot_answer, slot_unchanged) if stable else ()
                active = self._refill(done, active, load, slot_puzzle, slot_steps, carried)
                if active < capacity:  # a stream's new work joins the running batch (a finite feed has none)
                    active += load(np.arange(active, capacity))
            elif not (slot_puzzle[:active] >= 0).any():  # wait for the whole batch, then load the next one
                active = 0

    def _refill(self, done: np.ndarray, active: int, load, slot_puzzle: np.ndarray,
                slot_steps: np.ndarray, carried: tuple[np.ndarray, ...] = ()) -> int:
        """New puzzles into the freed slots; if the queue is empty, pack the survivors to the front (with them the
        per-slot arrays of `carried`)."""
        if not len(done):
            return active
        filled = load(done)
        holes = done[filled:]
        if not len(holes):
            return active
        new_active = active - len(holes)
        targets = holes[holes < new_active]
        sources = np.array([s for s in range(new_active, active) if slot_puzzle[s] >= 0], np.int64)
        if len(targets):
            self.backend.move(sources, targets)
            slot_puzzle[targets], slot_steps[targets] = slot_puzzle[sources], slot_steps[sources]
            for array in carried:
                array[targets] = array[sources]
        return new_active

    def solve_one(self, puzzle: object, puzzle_id: int = 0, **kwargs) -> SolveResult:
        return self.solve(np.asarray(puzzle)[None, :], np.array([puzzle_id]), **kwargs)
