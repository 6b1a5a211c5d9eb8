// The page: loads the bundle this folder belongs to (../manifest.json), checks it, and solves puzzles with the
// runtime in trm.mjs on onnxruntime-web (WebAssembly). No framework, no build step.
//
// URL parameters: ?threads=N (WebAssembly threads; more than 1 needs a cross-origin isolated page, which
// `trm-export serve` provides), ?variant=NAME (default: the bundle's), ?batch=N (slots, default 64).
// window.trm exposes the loaded solver and a few functions for tests and benchmarks (ready, selfCheck, timeSteps).

import * as ort from "./ort/ort.wasm.min.mjs";
import {
  conflicts, goldenCheck, gridRows, isValidSolution, openBundle, parsePuzzles, Solver, timeSteps,
} from "./trm.mjs";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const isolated = globalThis.crossOriginIsolated === true;
const threads = Math.max(1, Math.min(16, Number(params.get("threads")) ||
  (isolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1)));
ort.env.wasm.numThreads = isolated ? threads : 1;

let solver = null, golden = null, exampleAt = 0;

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

function sigmoid(v) { return 1 / (1 + Math.exp(-v)); }

// A puzzle as text: `grid` draws a Sudoku as nine rows (the parser takes both), a list keeps it on one line.
function textOf(tokens, task, grid = false) {
  const rows = gridRows(tokens, task);
  if (!rows) return Array.from(tokens).join(" ");
  return rows.map((r) => r.join("")).join(task.name === "sudoku" && !grid ? "" : "\n");
}

// The grid of `tokens`; cells given in `puzzle` are marked, cells that changed since `previous` are highlighted,
// cells in `wrong` (what makes an answer invalid) are marked as conflicts.
function drawGrid(tokens, puzzle, previous = null, wrong = new Set()) {
  const task = solver.task, rows = gridRows(tokens, task), grid = $("grid");
  grid.replaceChildren();
  grid.dataset.answer = Array.from(tokens).join(",");
  if (!rows) {
    grid.textContent = Array.from(tokens).join(" ");
    return;
  }
  grid.style.gridTemplateColumns = `repeat(${task.grid_side}, 1fr)`;
  grid.style.setProperty("--side", String(task.grid_side));
  grid.className = `grid ${task.name || "tokens"}`;
  rows.flat().forEach((ch, i) => {
    const cell = document.createElement("div");
    cell.className = "cell";
    if (task.name === "sudoku" && puzzle[i] !== 1) cell.classList.add("given");
    if (task.name === "maze") cell.classList.add(`m${tokens[i]}`);
    if (previous && previous[i] !== tokens[i]) cell.classList.add("changed");
    if (wrong.has(i)) cell.classList.add("conflict");
    if (task.name === "sudoku" && (i % 9) % 3 === 2 && i % 9 !== 8) cell.classList.add("box-right");
    if (task.name === "sudoku" && Math.floor(i / 9) % 3 === 2 && i < 72) cell.classList.add("box-bottom");
    cell.textContent = task.name === "maze" ? "" : ch;
    grid.append(cell);
  });
}

function traceLine(step, qHalt, halted) {
  const item = document.createElement("li");
  const bar = document.createElement("span");
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.className = "fill";
  fill.style.width = `${(100 * sigmoid(qHalt)).toFixed(1)}%`;
  bar.append(fill);
  const words = document.createElement("span");
  words.textContent = `step ${step}: halt confidence ${(100 * sigmoid(qHalt)).toFixed(0)}% (q_halt ${qHalt.toFixed(2)})` +
    (halted ? " — halted" : "");
  item.append(bar, words);
  $("trace").append(item);
}

async function solveOne() {
  const task = solver.task;
  $("verdict").textContent = "";
  $("trace").replaceChildren();
  let puzzle;
  try {
    const text = $("puzzle").value;  // a Sudoku may come as nine rows: one line of 81 for the parser
    const puzzles = parsePuzzles(task.name === "sudoku" ? text.replace(/\s+/g, "") : text, task);
    if (puzzles.length !== 1) throw new Error(`give one puzzle here (found ${puzzles.length}); use "Solve many" below`);
    puzzle = puzzles[0];
  } catch (error) {  // the badge follows: the last answer no longer stands
    $("verdict").textContent = error.message;
    setStatus("input", `puzzle not read: ${error.message}`);
    return;
  }
  const halting = $("halting").value, delay = Math.max(0, Number($("delay").value) || 0);
  const maxSteps = Math.max(1, Math.min(4096, Number($("max-steps").value) ||
                                             solver.bundle.manifest.loop.halt_max_steps));
  $("solve").disabled = true;
  setStatus("solving", "solving");
  let previous = puzzle;
  drawGrid(puzzle, puzzle);
  // Compute time only: from each step's start to its result, without drawing or the animation's delay.
  let computing = 0, since = performance.now();
  try {
    const result = await solver.solve([puzzle], [0], {
      mode: halting === "fixed" ? "fixed" : "adaptive", halting: halting === "fixed" ? "q" : halting, maxSteps,
      onStep: async ({ puzzles, steps, qHalt, solver: s }) => {
        computing += performance.now() - since;
        if (puzzles[0] >= 0) {
          const answer = s.answer(0);
          drawGrid(answer, puzzle, previous);
          previous = answer;
          traceLine(steps[0], qHalt[0], false);
          if (delay) await new Promise((resolve) => setTimeout(resolve, delay));
        }
        since = performance.now();
      },
    });
    const steps = result.stepsUsed[0], answer = result.predictions[0];
    const valid = isValidSolution(puzzle, answer, task);
    drawGrid(answer, puzzle, null, valid === false ? conflicts(puzzle, answer, task) : new Set());
    $("trace").lastChild?.lastChild.append(steps < maxSteps ? " — halted" : " — step limit");
    const stepWords = `${steps} step${steps === 1 ? "" : "s"}`;
    const timing = ` (${(computing / steps).toFixed(1)} ms per step, ${computing.toFixed(0)} ms for the puzzle, ` +
      `${ort.env.wasm.numThreads} thread${ort.env.wasm.numThreads === 1 ? "" : "s"})`;
    $("verdict").textContent = `${steps < maxSteps || halting === "fixed" ? "Answer" : "Step limit reached"} after ` +
      stepWords + (valid === null ? "." : valid ? ": a valid solution." :
        `: not a valid solution (${$("grid").querySelectorAll(".conflict").length} conflicting cells marked).`) +
      timing;
    $("grid").dataset.steps = String(steps);
    $("grid").dataset.msPerStep = String(computing / steps);
    // The badge says what the verdict says: "solved" only for an answer the task's rules accept.
    if (valid === false) setStatus("invalid", `not solved: the answer after ${stepWords} breaks the rules`);
    else setStatus("done", valid ? `solved in ${stepWords}` : `answered in ${stepWords}`);
  } catch (error) {
    $("verdict").textContent = error.message;
    setStatus("error", error.message);
  } finally {
    $("solve").disabled = false;
  }
}

async function solveMany() {
  const task = solver.task;
  let puzzles;
  try {
    puzzles = parsePuzzles($("batch-input").value, task);
    if (!puzzles.length) throw new Error("no puzzles given");
  } catch (error) {
    $("batch-summary").textContent = error.message;
    return;
  }
  $("batch-solve").disabled = true;
  $("batch-summary").textContent = `solving ${puzzles.length} puzzles…`;
  try {
    const batch = Math.max(1, Math.min(solver.capacity, Number($("batch-size").value) || solver.capacity));
    const one = batch === solver.capacity ? solver : await Solver.create(solver.bundle, ort, {
      variant: solver.variant, batchSize: batch });
    const start = performance.now();
    const result = await one.solve(puzzles, null, { mode: "adaptive" });
    const seconds = (performance.now() - start) / 1000;
    const valid = puzzles.map((p, i) => isValidSolution(p, result.predictions[i], task));
    const meanSteps = result.stepsUsed.reduce((a, b) => a + b, 0) / puzzles.length;
    const validWords = valid[0] === null ? "" : `, ${valid.filter(Boolean).length} of ${puzzles.length} valid`;
    $("batch-summary").textContent = `${puzzles.length} puzzles in ${seconds.toFixed(2)} s: ` +
      `${(puzzles.length / seconds).toFixed(1)} puzzles/s, ${meanSteps.toFixed(1)} steps on average${validWords} ` +
      `(batch ${batch}, ${ort.env.wasm.numThreads} thread${ort.env.wasm.numThreads === 1 ? "" : "s"})`;
    $("batch-summary").dataset.puzzlesPerSecond = String(puzzles.length / seconds);
    $("batch-output").value = result.predictions.map((p, i) =>
      `${textOf(p, task).replace(/\n/g, "|")}\t${result.stepsUsed[i]} steps` +
      (valid[i] === null ? "" : `\t${valid[i] ? "valid" : "invalid"}`)).join("\n");
  } catch (error) {
    $("batch-summary").textContent = error.message;
  } finally {
    $("batch-solve").disabled = false;
  }
}

function showCheck(report) {
  const body = $("check-table").tBodies[0];
  body.replaceChildren();
  for (const check of report.checks) {
    const row = body.insertRow();
    row.insertCell().textContent = check.ok ? "ok" : "FAIL";
    row.insertCell().textContent = check.name;
    row.insertCell().textContent = check.measured;
    row.className = check.ok ? "ok" : "fail";
  }
  $("check").dataset.passed = String(report.passed);
}

function showExample() {
  const L = solver.task.seq_len, n = golden.puzzles.length;
  $("puzzle").value = textOf(golden.puzzles[exampleAt % n].slice(0, L), solver.task, true);
  exampleAt += 1;
}

async function main() {
  const bundle = await openBundle(new URL("../", location.href));
  const m = bundle.manifest, task = m.task;
  $("model").textContent = `${String(m.model.family || "").toUpperCase()} ${task.name || "custom task"} model, ` +
    `variant ${params.get("variant") || m.default_variant}, exported for ${m.target}; ONNX Runtime Web ` +
    `${ort.env.versions?.web || ""} (WebAssembly, ${ort.env.wasm.numThreads} thread` +
    `${ort.env.wasm.numThreads === 1 ? "" : "s"}${isolated ? "" : ": this page is not cross-origin isolated"}).`;
  $("max-steps").value = String(m.loop.halt_max_steps);
  $("format-hint").textContent = task.name === "sudoku"
    ? "A Sudoku: 81 characters row by row (digits, '.' or '0' for a blank), on one line or nine."
    : task.name === "maze" ? `A maze: ${task.grid_side} rows of ${task.grid_side} characters ('#' wall, ` +
      "space open, S start, G goal)." : `Token ids, ${task.seq_len} per puzzle, separated by spaces.`;
  solver = await Solver.create(bundle, ort, { variant: params.get("variant"),
                                              batchSize: Number(params.get("batch")) || 64 });
  setStatus("checking", "running the golden self-check");
  golden = await goldenCheck(solver);
  showCheck(golden);
  $("footer").textContent = `${bundle.checked.length} files checked against manifest.json's sha256.`;
  if (!golden.passed) {
    setStatus("failed", "self-check FAILED: this page does not compute what was exported (see Self-check)");
    return;
  }
  setStatus("ready", "verified: the golden puzzles give the reference's answers");
  showExample();
  $("batch-input").value = golden.puzzles.map((p) => textOf(p, task)).join(task.name === "maze" ? "\n\n" : "\n");
  $("example").onclick = showExample;
  $("solve").onclick = solveOne;
  $("batch-examples").onclick = () => {
    $("batch-input").value = golden.puzzles.map((p) => textOf(p, task)).join(task.name === "maze" ? "\n\n" : "\n");
  };
  $("batch-solve").onclick = solveMany;
  $("solve").disabled = $("batch-solve").disabled = false;
}

const ready = main().catch((error) => {
  setStatus("error", `${error.name || "Error"}: ${error.message}`);
  throw error;
});

window.trm = {
  ready,
  get solver() { return solver; },
  get selfCheck() { return golden; },
  threads: () => ort.env.wasm.numThreads,
  timeSteps: async (batch, seconds) => timeSteps(solver, golden.puzzles[0], golden.ids[0], batch, seconds),
};
