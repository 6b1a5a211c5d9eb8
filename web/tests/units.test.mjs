// node --test web/tests/: the JavaScript runtime's parsers and checks, on crafted input (no model needed).
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  BundleError, canonicalManifest, checkRelative, conflicts, haltNow, InputError, isValidSolution, openBundle,
  parseHalting, parseNpy, parsePuzzles,
} from "../app/trm.mjs";

function npy(descr, shape, payload, fortran = "False") {
  let header = `{'descr': '${descr}', 'fortran_order': ${fortran}, 'shape': (${shape.join(", ")}${shape.length === 1 ? "," : ""}), }`;
  header += " ".repeat((64 - ((10 + header.length + 1) % 64)) % 64) + "\n";
  const bytes = new Uint8Array(10 + header.length + payload.byteLength);
  bytes.set([0x93, ..."NUMPY"].map((c) => (typeof c === "string" ? c.charCodeAt(0) : c)), 0);
  bytes[6] = 1;
  new DataView(bytes.buffer).setUint16(8, header.length, true);
  bytes.set(Array.from(header, (c) => c.charCodeAt(0)), 10);
  bytes.set(new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength), 10 + header.length);
  return bytes.buffer;
}

test("npy: float32, float16 widened exactly, int64 narrowed", () => {
  assert.deepEqual(Array.from(parseNpy(npy("<f4", [2], new Float32Array([1.5, -2]))).data), [1.5, -2]);
  const half = parseNpy(npy("<f2", [3], new Uint16Array([0x3c00, 0xc000, 0x0001]))).data;
  assert.deepEqual(Array.from(half), [1, -2, 2 ** -24]);
  const ints = parseNpy(npy("<i8", [2, 2], new BigInt64Array([1n, 2n, 3n, 4n])));
  assert.deepEqual(ints.shape, [2, 2]);
  assert.deepEqual(Array.from(ints.data), [1, 2, 3, 4]);
});

test("npy: a header that claims more than the file holds, object arrays, Fortran order: refused", () => {
  assert.throws(() => parseNpy(npy("<f4", [1000000000], new Float32Array(2)), "t.npy"),
                (e) => e instanceof BundleError && /t\.npy: header claims \[1000000000\]/.test(e.message));
  assert.throws(() => parseNpy(npy("|O", [1], new Uint8Array(8))), /not accepted/);
  assert.throws(() => parseNpy(npy("<f4", [1], new Float32Array(1), "True")), /Fortran-ordered/);
  assert.throws(() => parseNpy(new Uint8Array([1, 2, 3]).buffer), /not a \.npy/);
  assert.throws(() => parseNpy(npy("<i8", [1], new BigInt64Array([2n ** 40n]))), /out of the accepted range/);
});

test("bundle paths stay inside the bundle", () => {
  for (const bad of ["../manifest.json", "/etc/passwd", "graphs/../../x", "a\\b", "C:x", "", "a//b", "./a"]) {
    assert.throws(() => checkRelative(bad, "file"), BundleError, bad);
  }
  assert.equal(checkRelative("graphs/step_fp32.onnx", "file"), "graphs/step_fp32.onnx");
});

test("a manifest listing a path outside the bundle, or not JSON, is refused before any file is read", async () => {
  const read = (manifest) => async (rel) => {
    assert.equal(rel, "manifest.json");
    return new TextEncoder().encode(manifest).buffer;
  };
  await assert.rejects(openBundle(null, read(JSON.stringify({ format_version: 2, files: { "../x": "0".repeat(64) } }))),
                       /not a relative path inside the bundle/);
  await assert.rejects(openBundle(null, read("{")), /manifest\.json: not JSON/);
  await assert.rejects(openBundle(null, read(JSON.stringify({ format_version: 1 }))), /format_version 1/);
});

test("a manifest edited after export is refused: its digest covers every field, as runtime/manifest.py's", async () => {
  const { createHash } = await import("node:crypto");
  const read = (text) => async () => new TextEncoder().encode(text).buffer;
  const body = { format_version: 2, files: {}, embedding: { hidden_size: 8 },
                 task: { vocab_size: 11, seq_len: 81, prefix_len: 0, num_puzzle_identifiers: 1 },
                 loop: { halt_max_steps: 16, halting_rule: "q_halt>0", tolerance: 1.0 } };
  const sealed = (text) => {
    const digest = createHash("sha256").update(canonicalManifest(text)).digest("hex");
    return text.replace(/}\s*$/, `, "digest": "${digest}"}`);
  };
  const text = JSON.stringify(body, null, 2).replace('"tolerance": 1', '"tolerance": 1.0');  // as Python writes it
  const bundle = await openBundle(null, read(sealed(text)));
  assert.equal(bundle.manifest.loop.halt_max_steps, 16);
  const edited = sealed(text).replace('"halt_max_steps": 16', '"halt_max_steps": 4096');
  await assert.rejects(openBundle(null, read(edited)), /manifest\.json: its digest does not match its content/);
  // 1 and 1.0 are one number to JavaScript, not to Python: a float turned int is an edit too
  await assert.rejects(openBundle(null, read(sealed(text).replace('"tolerance": 1.0', '"tolerance": 1'))),
                       /digest does not match/);
  await assert.rejects(openBundle(null, read(text)), /digest does not match/);
  const deep = text.replace(/}\s*$/, `, "a": ${"[".repeat(1e6)}${"]".repeat(1e6)}}`);
  await assert.rejects(openBundle(null, read(deep)), /manifest\.json: nested too deeply to be a manifest/);
});

test("halting policies parse as runtime/solver.py's", () => {
  assert.deepEqual(parseHalting("q"), { q: true, stable: 0 });
  assert.deepEqual(parseHalting("stable:3"), { q: false, stable: 3 });
  assert.deepEqual(parseHalting(" q+stable:2 "), { q: true, stable: 2 });
  for (const bad of ["", "stable:0", "stable:-1", "stable:x", "q+q", "stable:5000", "stable", "Q"]) {
    assert.throws(() => parseHalting(bad), InputError, bad);
  }
});

test("halting rules decide as runtime/solver.py's halt_now", () => {
  assert.equal(haltNow(0.25, 9, "q_halt>0"), true);
  assert.equal(haltNow(0, -1, "q_halt>0"), false);
  assert.equal(haltNow(0.25, 0.5, "q_halt>q_continue"), false);
  // q_halt>=T (tiny-recursive-model's sigmoid(halt) >= 0.9): float32 Q values against a float64 threshold
  const rule = "q_halt>=2.1972245773362196";
  assert.equal(haltNow(Math.fround(2.1972244), 0, rule), false);
  assert.equal(haltNow(Math.fround(2.1972246), 0, rule), true);
  assert.equal(haltNow(0, 0, "q_halt>=0"), true);  // an untrained, zero halt head halts at once, as predict() does
});

test("puzzle text: Sudoku lines and mazes, errors name the place", () => {
  const sudoku = { name: "sudoku", seq_len: 81, grid_side: 9 };
  const line = "1".repeat(40) + "." + "0" + "9".repeat(39);
  const [p] = parsePuzzles(`# a comment\n\n${line}\n`, sudoku);
  assert.equal(p.length, 81);
  assert.deepEqual([p[0], p[40], p[41], p[80]], [2, 1, 1, 10]);
  assert.throws(() => parsePuzzles("12x" + "1".repeat(78), sudoku), /line 1: bad character "x" at position 3/);
  assert.throws(() => parsePuzzles("123", sudoku), /81 characters, found 3/);
  const maze = { name: "maze", seq_len: 9, grid_side: 3 };
  assert.deepEqual(parsePuzzles("#S#\n# #\n#G#\n\n###\nS G\n###\n", maze), [[1, 3, 1, 1, 2, 1, 1, 4, 1],
                                                                            [1, 1, 1, 3, 2, 4, 1, 1, 1]]);
  assert.throws(() => parsePuzzles("#S#\n#x#\n#G#", maze), /line 2: bad character "x" at column 2/);
  assert.throws(() => parsePuzzles("#S\n#G", maze), /3 x 3/);
});

test("valid solutions: Sudoku rules and givens, maze shortest paths", () => {
  const sudoku = { name: "sudoku", seq_len: 81, grid_side: 9 };
  const grid = Array.from({ length: 81 }, (_, i) => {
    const r = Math.floor(i / 9), c = i % 9;
    return ((r * 3 + Math.floor(r / 3) + c) % 9) + 2;  // a valid Sudoku, tokens 2..10
  });
  const puzzle = grid.map((t, i) => (i % 2 ? 1 : t));
  assert.equal(isValidSolution(puzzle, grid, sudoku), true);
  const swapped = [...grid];
  [swapped[0], swapped[1]] = [swapped[1], swapped[0]];
  assert.equal(isValidSolution(puzzle, swapped, sudoku), false);
  const maze = { name: "maze", seq_len: 9, grid_side: 3 };
  const m = [3, 2, 2, 1, 1, 2, 4, 2, 2];  // S . . / # # . / G . .
  assert.equal(isValidSolution(m, [3, 5, 5, 1, 1, 5, 4, 5, 5], maze), true);
  assert.equal(isValidSolution(m, [3, 5, 5, 1, 1, 5, 4, 2, 5], maze), false);  // broken path
  assert.equal(isValidSolution(m, [3, 2, 2, 1, 1, 2, 4, 2, 2], maze), false);  // no path
});

test("a malformed maze names its line and what is wrong with it", () => {
  const task = { name: "maze", grid_side: 3, seq_len: 9 };
  assert.deepEqual(parsePuzzles("#S#\n# #\n#G#\n\n###\n# S\nG #\n", task).length, 2);
  assert.throws(() => parsePuzzles("#S#\n# #\n#G#\n\n###\n# S\n", task),
                (e) => e instanceof InputError && e.message.startsWith("maze 2 (line 5): 2 rows; this model takes 3 x 3"));
  assert.throws(() => parsePuzzles("#S#\n#\n#G#\n", task), /maze 1, line 2: 1 characters; this model takes 3 x 3 grids/);
  assert.throws(() => parsePuzzles("\n\n#S#\n#x#\n#G#\n", task), /maze 1, line 4: bad character "x" at column 2/);
});

test("conflicts: what makes an answer wrong, cell by cell", () => {
  const sudoku = { name: "sudoku", grid_side: 9, seq_len: 81 };
  const solution = "534678912672195348198342567859761423426853791713924856961537284287419635345286179";
  const tokens = (s) => Array.from(s, (c) => (c === "." ? 1 : Number(c) + 1));
  const puzzle = tokens("53..7...." + ".".repeat(72));
  assert.equal(conflicts(puzzle, tokens(solution), sudoku).size, 0);
  const swapped = tokens(solution);
  swapped[2] = swapped[3];  // row 1 now holds two 6s; column 3 lost its 4 and box 1 holds 6 twice
  const bad = conflicts(puzzle, swapped, sudoku);
  assert.ok(bad.has(2) && bad.has(3) && !bad.has(80), [...bad].join(","));
  const maze = { name: "maze", grid_side: 3, seq_len: 9 };
  const grid = [1, 3, 1, 2, 2, 1, 1, 4, 1];  // "#S#", "  #", "#G#"
  assert.deepEqual([...conflicts(grid, [1, 3, 1, 2, 5, 1, 1, 4, 1], maze)], []);
  assert.deepEqual([...conflicts(grid, [5, 3, 1, 2, 5, 1, 1, 4, 1], maze)], [0]);  // a path over a wall
});
