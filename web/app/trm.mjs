// The trm-export runtime in JavaScript: what runtime/ does in Python, for a web page or Node.js.
//
//   const bundle = await openBundle(new URL("../", location.href));   // every file checked against its sha256
//   const solver = await Solver.create(bundle, ort);                   // ort: onnxruntime-web (or -node)
//   const result = await solver.solve([tokens], [0]);                  // adaptive, the trained Q head
//   result.predictions[0], result.stepsUsed[0]
//
// Same semantics as runtime/solver.py: `fixed` runs every puzzle maxSteps steps; `adaptive` halts by a policy,
// "q" (the trained Q head), "stable:K" (the answer unchanged for K steps in a row) or "q+stable:K" (either), after
// at least minSteps and at most maxSteps. Puzzles stream through batchSize slots; with refill a halted puzzle's
// slot takes the next puzzle on the next step. The embedding runs here, once per puzzle; the step graph runs in
// ONNX Runtime. A bundle is a stranger's input: the manifest is checked against its own digest, paths are
// checked, every file is checked against the manifest's sha256 before it is used, .npy headers against their
// sizes, and every failure is one line naming the file.
//
// Concurrency: a Solver holds one batch of state, so its solve() calls take turns (a queue); for parallel work
// create several Solvers.

export const MAX_STEPS = 4096;
export const STEP_INPUTS = ["x", "z_H", "z_L"];
export const STEP_OUTPUTS = ["z_H_out", "z_L_out", "logits", "q_halt", "q_continue"];
const FORMAT_VERSION = 2;
const MAX_MANIFEST_BYTES = 4 << 20;
// A web page holds every table in memory; beyond this a puzzle table (ARC: ~1M rows) belongs on a device.
export const MAX_TABLE_BYTES = 512 << 20;

export class BundleError extends Error {
  constructor(message) { super(message); this.name = "BundleError"; }
}
export class InputError extends Error {
  constructor(message) { super(message); this.name = "InputError"; }
}

// ---- files -------------------------------------------------------------------------------------------------------

// A bundle path: relative, '/'-separated, no '.' or '..' segment, no backslash or colon (as runtime/manifest.py).
export function checkRelative(rel, what) {
  if (typeof rel !== "string" || rel.length === 0 || rel.length > 512 || rel.startsWith("/") ||
      /[\\:\0]/.test(rel) || rel.split("/").some((part) => part === "" || part === "." || part === "..")) {
    throw new BundleError(`manifest.json: ${what} ${JSON.stringify(rel)} is not a relative path inside the bundle`);
  }
  return rel;
}

async function sha256Hex(buffer) {
  const subtle = globalThis.crypto && globalThis.crypto.subtle;
  if (!subtle) {
    throw new BundleError("this page cannot check the bundle's checksums: the browser offers WebCrypto only to " +
                          "secure pages; open it through http://127.0.0.1 or localhost (trm-export serve BUNDLE) " +
                          "or https");
  }
  const digest = new Uint8Array(await subtle.digest("SHA-256", buffer));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

// ---- the manifest's own digest -----------------------------------------------------------------------------------

// runtime/manifest.py seals manifest.json with `digest`: the sha256 of the manifest's canonical JSON, Python's
// json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=True) of every other field, so that tolerances,
// loop settings and paths are covered like the files. JSON.parse forgets how a number was written (1 and 1.0 become
// one value; Python keeps an int and a float), so the canonical text is rebuilt from the file's own tokens.
export function canonicalManifest(text) {
  let at = 0;
  const space = () => { while (at < text.length && " \t\n\r".includes(text[at])) at += 1; };
  const expect = (ch) => {
    space();
    if (text[at] !== ch) throw new BundleError(`manifest.json: not JSON (expected ${ch} at ${at})`);
    at += 1;
  };
  const stringToken = () => {  // the decoded string; `at` past its closing quote
    const start = at;
    at += 1;
    while (at < text.length && text[at] !== '"') at += text[at] === "\\" ? 2 : 1;
    at += 1;
    return JSON.parse(text.slice(start, at));
  };
  const value = (top) => {
    space();
    const ch = text[at];
    if (ch === "{") {
      at += 1;
      const members = new Map();  // a repeated key: the last one counts, as in Python
      space();
      if (text[at] === "}") { at += 1; } else {
        for (;;) {
          space();
          const key = stringToken();
          expect(":");
          members.set(key, value(false));
          space();
          if (text[at] === ",") { at += 1; continue; }
          expect("}");
          break;
        }
      }
      if (top) members.delete("digest");
      const keys = [...members.keys()].sort(byCodePoint);
      return `{${keys.map((k) => `${pythonString(k)}:${members.get(k)}`).join(",")}}`;
    }
    if (ch === "[") {
      at += 1;
      const items = [];
      space();
      if (text[at] === "]") { at += 1; } else {
        for (;;) {
          items.push(value(false));
          space();
          if (text[at] === ",") { at += 1; continue; }
          expect("]");
          break;
        }
      }
      return `[${items.join(",")}]`;
    }
    if (ch === '"') return pythonString(stringToken());
    for (const word of ["true", "false", "null"]) {
      if (text.startsWith(word, at)) { at += word.length; return word; }
    }
    const number = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/y;
    number.lastIndex = at;
    const match = number.exec(text);
    if (!match) throw new BundleError(`manifest.json: not JSON (unexpected ${JSON.stringify(ch)} at ${at})`);
    at = number.lastIndex;
    return pythonNumber(match[0]);
  };
  const out = value(true);
  space();
  if (at !== text.length) throw new BundleError(`manifest.json: not JSON (trailing text at ${at})`);
  return out;
}

function byCodePoint(a, b) {  // Python compares str by code point; JavaScript's sort by UTF-16 unit
  const x = Array.from(a, (c) => c.codePointAt(0)), y = Array.from(b, (c) => c.codePointAt(0));
  for (let i = 0; i < Math.min(x.length, y.length); i += 1) if (x[i] !== y[i]) return x[i] - y[i];
  return x.length - y.length;
}

const SHORT_ESCAPES = { '"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f" };

function pythonString(s) {  // json.dumps(s, ensure_ascii=True): printable ASCII as is, the rest escaped
  let out = '"';
  for (let i = 0; i < s.length; i += 1) {
    const code = s.charCodeAt(i);
    if (SHORT_ESCAPES[s[i]]) out += SHORT_ESCAPES[s[i]];
    else if (code >= 0x20 && code <= 0x7e) out += s[i];
    else out += `\\u${code.toString(16).padStart(4, "0")}`;
  }
  return `${out}"`;
}

function pythonNumber(literal) {  // how json.dumps writes what json.loads reads from `literal`
  if (!/[.eE]/.test(literal)) return BigInt(literal).toString();  // an int, any size
  const x = Number(literal);
  if (!Number.isFinite(x)) return x > 0 ? "Infinity" : "-Infinity";
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  // float repr: the shortest digits that read back (JavaScript's too), fixed notation for 1e-4 <= |x| < 1e16
  const [mantissa, exp] = Math.abs(x).toExponential().split("e");
  const digits = mantissa.replace(".", ""), point = Number(exp) + 1;  // digits before the decimal point
  const sign = x < 0 ? "-" : "";
  if (point > -4 && point <= 16) {
    if (point <= 0) return `${sign}0.${"0".repeat(-point)}${digits}`;
    if (point >= digits.length) return `${sign}${digits}${"0".repeat(point - digits.length)}.0`;
    return `${sign}${digits.slice(0, point)}.${digits.slice(point)}`;
  }
  const e = Number(exp);
  return `${sign}${mantissa}e${e < 0 ? "-" : "+"}${String(Math.abs(e)).padStart(2, "0")}`;
}

// Reads bundle files by relative path: over HTTP from `base` (a URL ending in '/'), or with `readFile(rel)`.
export function httpReader(base) {
  return async (rel) => {
    const url = new URL(rel, base);
    const response = await fetch(url);
    if (!response.ok) throw new BundleError(`${rel}: HTTP ${response.status} from ${url}`);
    return response.arrayBuffer();
  };
}

// ---- .npy --------------------------------------------------------------------------------------------------------

const NPY_TYPES = {
  "<f4": [Float32Array, 4], "<f2": [null, 2], "<f8": [Float64Array, 8], "<i8": [BigInt64Array, 8],
  "<i4": [Int32Array, 4], "<i2": [Int16Array, 2], "|i1": [Int8Array, 1], "|u1": [Uint8Array, 1],
  "<u2": [Uint16Array, 2], "<u4": [Uint32Array, 4], "<u8": [BigUint64Array, 8], "|b1": [Uint8Array, 1],
};

function halfToFloat(bits) {
  const sign = bits & 0x8000 ? -1 : 1, exp = (bits >> 10) & 0x1f, frac = bits & 0x3ff;
  if (exp === 0) return sign * frac * 2 ** -24;
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * (1 + frac / 1024) * 2 ** (exp - 15);
}

// A .npy file -> {shape, dtype, data}: floats as Float32Array (float16 widened exactly), integers as Int32Array
// (refused beyond its range). The header is checked against the file's size before anything is allocated.
export function parseNpy(buffer, name = "array") {
  const bytes = new Uint8Array(buffer);
  const magic = String.fromCharCode(...bytes.subarray(1, 6));
  if (bytes.length < 10 || bytes[0] !== 0x93 || magic !== "NUMPY") throw new BundleError(`${name}: not a .npy file`);
  const major = bytes[6];
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const [headerLen, start] = major === 1 ? [view.getUint16(8, true), 10] : [view.getUint32(8, true), 12];
  if (start + headerLen > bytes.length || headerLen > 65536) throw new BundleError(`${name}: damaged .npy header`);
  const header = String.fromCharCode(...bytes.subarray(start, start + headerLen));
  const descr = /'descr':\s*'([^']+)'/.exec(header), fortran = /'fortran_order':\s*(True|False)/.exec(header);
  const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header);
  if (!descr || !fortran || !shapeText) throw new BundleError(`${name}: damaged .npy header`);
  if (!(descr[1] in NPY_TYPES)) throw new BundleError(`${name}: arrays of dtype ${descr[1]} are not accepted here`);
  if (fortran[1] === "True") throw new BundleError(`${name}: Fortran-ordered arrays are not accepted here`);
  const parts = shapeText[1].split(",").map((s) => s.trim()).filter((s) => s.length);
  if (!parts.every((s) => /^[0-9]{1,10}$/.test(s))) throw new BundleError(`${name}: damaged .npy shape`);
  const shape = parts.map(Number);
  const count = shape.reduce((a, b) => a * b, 1);
  const [Ctor, itemsize] = NPY_TYPES[descr[1]];
  const dataStart = start + headerLen;
  if (bytes.length - dataStart !== count * itemsize) {
    throw new BundleError(`${name}: header claims ${JSON.stringify(shape)} ${descr[1]} (${count * itemsize} bytes) ` +
                          `but the file holds ${bytes.length - dataStart}; the file is damaged or crafted`);
  }
  const raw = bytes.slice(dataStart).buffer; // aligned copy
  let data;
  if (descr[1] === "<f2") {
    const half = new Uint16Array(raw);
    data = new Float32Array(count);
    for (let i = 0; i < count; i++) data[i] = halfToFloat(half[i]);
  } else if (Ctor === Float32Array || Ctor === Float64Array) {
    data = Ctor === Float32Array ? new Float32Array(raw) : Float32Array.from(new Float64Array(raw));
  } else {
    const wide = new Ctor(raw);
    data = new Int32Array(count);
    for (let i = 0; i < count; i++) {
      const v = Number(wide[i]);
      if (v > 2147483647 || v < -2147483648) throw new BundleError(`${name}: value ${v} out of the accepted range`);
      data[i] = v;
    }
  }
  return { shape, dtype: descr[1], data };
}

// ---- the bundle --------------------------------------------------------------------------------------------------

function field(object, key, where) {
  if (object === null || typeof object !== "object" || !(key in object)) {
    throw new BundleError(`manifest.json: ${where}.${key} is missing`);
  }
  return object[key];
}

function int(object, key, where, low, high) {
  const v = field(object, key, where);
  if (!Number.isInteger(v) || v < low || v > high) {
    throw new BundleError(`manifest.json: ${where}.${key} must be an integer in [${low}, ${high}], got ${v}`);
  }
  return v;
}

export class Bundle {
  // Use openBundle(); `read(rel)` gives a file's bytes after its checksum is checked.
  constructor(manifest, reader) {
    this.manifest = manifest;
    this._reader = reader;
    this.checked = [];  // files read and found equal to their checksum
  }

  async read(rel, maxBytes = Infinity) {
    checkRelative(rel, "file");
    const files = this.manifest.files;
    if (!Object.prototype.hasOwnProperty.call(files, rel)) {
      throw new BundleError(`${rel}: not listed in manifest.json's checksums; refusing to use it`);
    }
    const buffer = await this._reader(rel);
    if (buffer.byteLength > maxBytes) {
      throw new BundleError(`${rel}: ${(buffer.byteLength / 2 ** 20).toFixed(0)} MiB, more than a page holds ` +
                            `(${maxBytes / 2 ** 20} MiB); run this bundle with the Python runtime`);
    }
    const digest = await sha256Hex(buffer);
    if (digest !== files[rel]) {
      throw new BundleError(`${rel}: checksum mismatch (the file was changed after export); re-export the bundle`);
    }
    this.checked.push(rel);
    return buffer;
  }

  async array(rel, shape, kinds = "f", maxBytes = Infinity) {
    const array = parseNpy(await this.read(rel, maxBytes), rel);
    if (shape && (array.shape.length !== shape.length || shape.some((s, i) => s !== null && s !== array.shape[i]))) {
      throw new BundleError(`${rel}: shape ${JSON.stringify(array.shape)}, expected ` +
                            JSON.stringify(shape.map((s) => (s === null ? "any" : s))));
    }
    const isFloat = array.dtype[1] === "f";
    if (!kinds.includes(isFloat ? "f" : "i")) throw new BundleError(`${rel}: dtype ${array.dtype} not accepted here`);
    if (isFloat && !array.data.every(Number.isFinite)) {
      throw new BundleError(`${rel}: holds NaN or infinite values; the bundle is broken, re-export it`);
    }
    return array;
  }
}

// The bundle at `base` (a URL ending in '/': the folder holding manifest.json), or read through `reader(rel)`.
export async function openBundle(base, reader = null) {
  reader = reader || httpReader(base);
  const raw = await reader("manifest.json");
  if (raw.byteLength > MAX_MANIFEST_BYTES) throw new BundleError("manifest.json: too large to be a manifest");
  let manifest;
  const text = new TextDecoder().decode(raw);
  try {
    manifest = JSON.parse(text);
  } catch (error) {
    throw new BundleError(`manifest.json: not JSON (${error.message})`);
  }
  if (manifest === null || typeof manifest !== "object" || Array.isArray(manifest)) {
    throw new BundleError("manifest.json: not a JSON object");
  }
  if (manifest.format_version !== FORMAT_VERSION) {
    throw new BundleError(`manifest.json: format_version ${manifest.format_version}; this page reads ` +
                          `${FORMAT_VERSION}: export the bundle again with this trm-export`);
  }
  const files = field(manifest, "files", "manifest");
  if (files === null || typeof files !== "object") throw new BundleError("manifest.json: files must be an object");
  for (const [rel, digest] of Object.entries(files)) {
    checkRelative(rel, "files entry");
    if (!/^[0-9a-f]{64}$/.test(digest)) throw new BundleError(`manifest.json: files.${rel} is not a sha256`);
  }
  const task = field(manifest, "task", "manifest");
  int(task, "vocab_size", "task", 2, 1 << 16);
  int(task, "seq_len", "task", 1, 1 << 16);
  int(task, "prefix_len", "task", 0, 1024);
  int(task, "num_puzzle_identifiers", "task", 1, 1 << 24);
  const loop = field(manifest, "loop", "manifest");
  int(loop, "halt_max_steps", "loop", 1, MAX_STEPS);
  const rule = field(loop, "halting_rule", "loop");
  if (!HALTING_RULE.test(rule)) {
    throw new BundleError(`manifest.json: unknown halting rule ${JSON.stringify(rule)}`);
  }
  int(field(manifest, "embedding", "manifest"), "hidden_size", "embedding", 1, 1 << 16);
  let canonical;
  try {
    canonical = new TextEncoder().encode(canonicalManifest(text));
  } catch (error) {  // a RangeError: nested deeper than this reader recurses (JSON.parse itself does not recurse)
    if (error instanceof BundleError) throw error;
    throw new BundleError(`manifest.json: nested too deeply to be a manifest (${error.message})`);
  }
  if (manifest.digest !== await sha256Hex(canonical.buffer)) {
    throw new BundleError("manifest.json: its digest does not match its content: the manifest was edited after " +
                          "export (tolerances, loop settings and paths are covered like the graphs); " +
                          "re-export the bundle");
  }
  return new Bundle(manifest, reader);
}

// ---- embedding ---------------------------------------------------------------------------------------------------

// tokens -> x [prefix_len + seq_len, hidden] float32, as runtime/embedding.py (float32 arithmetic throughout).
export class Embedder {
  static async load(bundle) {
    const e = bundle.manifest.embedding, t = bundle.manifest.task;
    const d = e.hidden_size, total = t.prefix_len + t.seq_len;
    const self = new Embedder();
    self.task = t;
    self.spec = e;
    self.S = total;
    self.D = d;
    self.tokens = (await bundle.array(checkRelative(e.token_table, "embedding.token_table"), [t.vocab_size, d])).data;
    self.positions = e.position_table
      ? (await bundle.array(checkRelative(e.position_table, "embedding.position_table"), [total, d])).data : null;
    self.rows = null;
    if (e.puzzle_rows) {
      const rows = (await bundle.array(checkRelative(e.puzzle_rows, "embedding.puzzle_rows"), [null], "i")).data;
      for (let i = 0; i < rows.length; i++) {
        if (rows[i] < 0 || rows[i] >= t.num_puzzle_identifiers || (i && rows[i] <= rows[i - 1])) {
          throw new BundleError(`${e.puzzle_rows}: must hold ascending identifiers below ${t.num_puzzle_identifiers}`);
        }
      }
      self.rows = rows;
    }
    self.puzzles = null;
    if (e.puzzle_table) {
      const n = self.rows ? self.rows.length : t.num_puzzle_identifiers;
      const width = int(e, "puzzle_emb_ndim", "embedding", 1, t.prefix_len * d);
      self.puzzles = (await bundle.array(checkRelative(e.puzzle_table, "embedding.puzzle_table"), [n, width], "f",
                                         MAX_TABLE_BYTES)).data;
      self.puzzleWidth = width;
    }
    self.H_init = (await bundle.array(checkRelative(e.H_init, "embedding.H_init"), [d])).data;
    self.L_init = (await bundle.array(checkRelative(e.L_init, "embedding.L_init"), [d])).data;
    self.scale = Math.fround(e.scale);
    self.positionScale = Math.fround(e.position_scale);
    return self;
  }

  // The puzzle table row of an (original) identifier; one a --keep-puzzles bundle did not keep is refused.
  tableRow(id) {
    if (!this.rows) return id;
    let lo = 0, hi = this.rows.length - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.rows[mid] < id) lo = mid + 1; else hi = mid;
    }
    if (this.rows[lo] !== id) {
      throw new InputError(`puzzle identifier ${id} is not in this bundle's puzzle table (exported with ` +
                           "--keep-puzzles); export again keeping it");
    }
    return lo;
  }

  // Writes x of one puzzle into `out` (a Float32Array of S * D at `offset`).
  embed(tokens, id, out, offset) {
    const { S, D } = this, prefix = this.task.prefix_len;
    out.fill(0, offset, offset + S * D);
    if (this.puzzles) {
      const row = this.tableRow(id) * this.puzzleWidth;
      out.set(this.puzzles.subarray(row, row + this.puzzleWidth), offset);
    }
    for (let p = 0; p < tokens.length; p++) {
      const t = tokens[p] * D;
      out.set(this.tokens.subarray(t, t + D), offset + (prefix + p) * D);
    }
    const pos = this.positions;
    for (let i = 0; i < S * D; i++) {
      // Float32Array stores round each product and sum to float32, as numpy's float32 arithmetic does
      // (double rounding of + and * through float64 is exact for float32 operands).
      const v = pos ? Math.fround(this.positionScale * Math.fround(out[offset + i] + pos[i])) : out[offset + i];
      out[offset + i] = this.scale * v;
    }
  }
}

// ---- halting -----------------------------------------------------------------------------------------------------

// "q" | "stable:K" | "q+stable:K" -> {q, stable}; anything else: InputError (as runtime/solver.py parse_halting).
export function parseHalting(policy) {
  const text = String(policy).trim();
  if (text === "q") return { q: true, stable: 0 };
  const q = text.startsWith("q+");
  const rest = q ? text.slice(2) : text;
  const match = /^stable:([0-9]{1,4})$/.exec(rest);
  if (match && Number(match[1]) >= 1 && Number(match[1]) <= MAX_STEPS) return { q, stable: Number(match[1]) };
  throw new InputError(`halting must be one of q, stable:K, q+stable:K with K an integer 1..${MAX_STEPS}, got ` +
                       JSON.stringify(policy));
}

// q_halt>0 (TRM), q_halt>q_continue (HRM), q_halt>=T (a halting logit against a threshold, as runtime/solver.py).
const HALTING_RULE = /^(?:q_halt>0|q_halt>q_continue|q_halt>=(-?[0-9]{1,6}(?:\.[0-9]{1,20})?))$/;

export function haltNow(qHalt, qContinue, rule) {
  if (rule === "q_halt>0") return qHalt > 0;
  if (rule === "q_halt>q_continue") return qHalt > qContinue;
  return qHalt >= Number(HALTING_RULE.exec(rule)[1]);
}

// ---- the solver --------------------------------------------------------------------------------------------------

export class Solver {
  // `ort`: the onnxruntime-web (or onnxruntime-node) module. `variant`: the bundle's default unless given.
  static async create(bundle, ort, { variant = null, batchSize = 64, executionProviders = ["wasm"] } = {}) {
    const m = bundle.manifest;
    variant = variant || m.default_variant || "fp32";
    const graphs = field(m, "graphs", "manifest");
    if (!Object.prototype.hasOwnProperty.call(graphs, variant)) {
      throw new BundleError(`requested variant ${JSON.stringify(variant)}; this bundle has ` +
                            Object.keys(graphs).sort().join(", "));
    }
    if (!Number.isInteger(batchSize) || batchSize < 1 || batchSize > 4096) {
      throw new InputError(`batchSize must be an integer in [1, 4096], got ${batchSize}`);
    }
    const self = new Solver();
    self.bundle = bundle;
    self.ort = ort;
    self.variant = variant;
    self.embedder = await Embedder.load(bundle);
    const file = checkRelative(graphs[variant].file, `graphs.${variant}.file`);
    const graph = new Uint8Array(await bundle.read(file));
    try {
      self.session = await ort.InferenceSession.create(graph, { executionProviders, graphOptimizationLevel: "all" });
    } catch (error) {
      throw new BundleError(`${file}: ONNX Runtime cannot load this graph (${String(error.message).split("\n")[0]})`);
    }
    const inputs = [...self.session.inputNames].sort(), outputs = self.session.outputNames;
    if (inputs.join() !== [...STEP_INPUTS].sort().join() || !STEP_OUTPUTS.every((o) => outputs.includes(o))) {
      throw new BundleError(`${file}: not a step graph (inputs ${inputs}, outputs ${outputs})`);
    }
    const { S, D } = self.embedder, t = m.task;
    self.capacity = batchSize;
    self.x = new Float32Array(batchSize * S * D);
    self.zH = new Float32Array(batchSize * S * D);
    self.zL = new Float32Array(batchSize * S * D);
    self.logitBuf = new Float32Array(batchSize * t.seq_len * t.vocab_size);
    self._queue = Promise.resolve();
    return self;
  }

  get task() { return this.bundle.manifest.task; }

  // Advance slots [0, n) one step; returns [qHalt, qContinue] (Float32Array each, length n).
  async step(n) {
    const { S, D } = this.embedder, size = n * S * D, Tensor = this.ort.Tensor;
    const feeds = {
      x: new Tensor("float32", this.x.subarray(0, size), [n, S, D]),
      z_H: new Tensor("float32", this.zH.subarray(0, size), [n, S, D]),
      z_L: new Tensor("float32", this.zL.subarray(0, size), [n, S, D]),
    };
    let out;
    try {
      out = await this.session.run(feeds);
    } catch (error) {
      throw new BundleError(`step graph failed in ONNX Runtime: ${String(error.message).split("\n")[0]}`);
    }
    this.zH.set(out.z_H_out.data);
    this.zL.set(out.z_L_out.data);
    this.logitBuf.set(out.logits.data);
    const q = [Float32Array.from(out.q_halt.data), Float32Array.from(out.q_continue.data)];
    for (const name of STEP_OUTPUTS) out[name].dispose?.();
    return q;
  }

  // The answer (argmax of the last step's logits, first index on ties like numpy) of `slot`, as an Int32Array.
  answer(slot) {
    const { seq_len: L, vocab_size: V } = this.task, answer = new Int32Array(L);
    for (let p = 0, base = slot * L * V; p < L; p++, base += V) {
      let best = 0;
      for (let v = 1; v < V; v++) if (this.logitBuf[base + v] > this.logitBuf[base + best]) best = v;
      answer[p] = best;
    }
    return answer;
  }

  _load(slot, tokens, id) {
    const { S, D } = this.embedder, at = slot * S * D;
    this.embedder.embed(tokens, id, this.x, at);
    for (let p = 0; p < S; p++) {
      this.zH.set(this.embedder.H_init, at + p * D);
      this.zL.set(this.embedder.L_init, at + p * D);
    }
  }

  _move(src, dst) {
    const n = this.embedder.S * this.embedder.D, l = this.task.seq_len * this.task.vocab_size;
    for (const buf of [this.x, this.zH, this.zL]) buf.copyWithin(dst * n, src * n, (src + 1) * n);
    this.logitBuf.copyWithin(dst * l, src * l, (src + 1) * l);
  }

  _validate(puzzles, ids) {
    const t = this.task;
    if (!Array.isArray(puzzles) || puzzles.length === 0) throw new InputError("no puzzles given (empty input)");
    ids = ids === null || ids === undefined ? puzzles.map(() => 0) : ids;
    if (ids.length !== puzzles.length) {
      throw new InputError(`need one puzzle id per puzzle: ${puzzles.length} puzzles, got ${ids.length} ids`);
    }
    puzzles.forEach((tokens, i) => {
      if (tokens.length !== t.seq_len) {
        throw new InputError(`each puzzle must have ${t.seq_len} tokens, puzzle ${i} has ${tokens.length}`);
      }
      for (let p = 0; p < tokens.length; p++) {
        if (!Number.isInteger(tokens[p]) || tokens[p] < 0 || tokens[p] >= t.vocab_size) {
          throw new InputError(`token ${tokens[p]} at puzzle ${i}, position ${p} is outside the vocabulary ` +
                               `[0, ${t.vocab_size})`);
        }
      }
      if (!Number.isInteger(ids[i]) || ids[i] < 0 || ids[i] >= t.num_puzzle_identifiers) {
        throw new InputError(`unknown puzzle id ${ids[i]}: the model knows ids 0..${t.num_puzzle_identifiers - 1}`);
      }
    });
    return ids;
  }

  // Solve `puzzles` (an array of token arrays) and return answers in input order:
  // {predictions: [Int32Array], stepsUsed: Int32Array, qHalt: Float32Array, qContinue: Float32Array}.
  // onStep({puzzles, steps, qHalt, qContinue, solver}) after every step for the active slots (puzzle -1: finished,
  // waiting for its batch), awaited if it returns a promise; solver.answer(slot) reads a slot's current answer.
  solve(puzzles, ids = null, options = {}) {
    const run = this._queue.then(() => this._solve(puzzles, ids, options));
    this._queue = run.catch(() => {});
    return run;
  }

  async _solve(puzzles, ids, { mode = "adaptive", maxSteps = null, minSteps = 1, refill = true, onStep = null,
                               halting = "q" } = {}) {
    if (mode !== "fixed" && mode !== "adaptive") throw new InputError(`mode must be fixed or adaptive, got ${mode}`);
    const policy = parseHalting(halting);
    const limit = maxSteps === null ? this.bundle.manifest.loop.halt_max_steps : maxSteps;
    if (!Number.isInteger(limit) || !Number.isInteger(minSteps) || !(1 <= minSteps && minSteps <= limit &&
                                                                     limit <= MAX_STEPS)) {
      throw new InputError(`need 1 <= minSteps (${minSteps}) <= maxSteps (${limit}) <= ${MAX_STEPS}`);
    }
    ids = this._validate(puzzles, ids);
    const total = puzzles.length, capacity = this.capacity, rule = this.bundle.manifest.loop.halting_rule;
    const useQ = mode === "adaptive" && policy.q, stable = mode === "adaptive" ? policy.stable : 0;
    const predictions = new Array(total), stepsUsed = new Int32Array(total);
    const finalQ = [new Float32Array(total), new Float32Array(total)];
    const slotPuzzle = new Int32Array(capacity).fill(-1), slotSteps = new Int32Array(capacity);
    const slotAnswer = new Array(capacity).fill(null), slotUnchanged = new Int32Array(capacity);
    let queue = 0;

    const load = (slots) => {
      const take = Math.min(slots.length, total - queue);
      for (let i = 0; i < take; i++) {
        const slot = slots[i];
        this._load(slot, puzzles[queue], ids[queue]);
        slotPuzzle[slot] = queue++;
        slotSteps[slot] = 0;
        slotUnchanged[slot] = 0;
      }
      return take;
    };
    const range = (n) => Array.from({ length: n }, (_, i) => i);

    let active = load(range(capacity));
    while (active) {
      const [qHalt, qCont] = await this.step(active);
      if (!qHalt.every(Number.isFinite) || !qCont.every(Number.isFinite)) {
        throw new BundleError(`the ${this.variant} step graph produced NaN or infinite Q values; the graph is ` +
                              "broken: verify the bundle and re-export");
      }
      for (let s = 0; s < active; s++) if (slotPuzzle[s] >= 0) slotSteps[s] += 1;
      if (onStep) {  // awaited: a page may draw the step before the next one runs
        await onStep({ puzzles: slotPuzzle.slice(0, active), steps: slotSteps.slice(0, active), qHalt,
                       qContinue: qCont, solver: this });
      }
      const answers = stable ? range(active).map((s) => this.answer(s)) : null;
      if (stable) {
        for (let s = 0; s < active; s++) {
          const same = slotSteps[s] > 1 && slotAnswer[s] !== null && answers[s].every((v, p) => v === slotAnswer[s][p]);
          slotUnchanged[s] = same ? slotUnchanged[s] + 1 : 0;
          slotAnswer[s] = answers[s];
        }
      }
      const done = [];
      for (let s = 0; s < active; s++) {
        if (slotPuzzle[s] < 0) continue;
        let halted = slotSteps[s] >= limit;
        if (mode === "adaptive" && slotSteps[s] >= minSteps) {
          halted ||= (useQ && haltNow(qHalt[s], qCont[s], rule)) || (stable > 0 && slotUnchanged[s] >= stable);
        }
        if (halted) done.push(s);
      }
      for (const s of done) {
        const p = slotPuzzle[s];
        predictions[p] = answers ? answers[s] : this.answer(s);
        stepsUsed[p] = slotSteps[s];
        finalQ[0][p] = qHalt[s];
        finalQ[1][p] = qCont[s];
        slotPuzzle[s] = -1;
      }
      if (refill) {
        active = this._refill(done, active, load, slotPuzzle, slotSteps, stable ? [slotAnswer, slotUnchanged] : []);
      } else if (!slotPuzzle.subarray(0, active).some((p) => p >= 0)) {
        active = load(range(capacity));
      }
    }
    return { predictions, stepsUsed, qHalt: finalQ[0], qContinue: finalQ[1] };
  }

  // New puzzles into the freed slots; when the queue is empty, pack the survivors to the front.
  _refill(done, active, load, slotPuzzle, slotSteps, carried) {
    if (!done.length) return active;
    const filled = load(done);
    const holes = done.slice(filled);
    if (!holes.length) return active;
    const newActive = active - holes.length;
    const targets = holes.filter((h) => h < newActive);
    const sources = [];
    for (let s = newActive; s < active; s++) if (slotPuzzle[s] >= 0) sources.push(s);
    targets.forEach((dst, i) => {
      const src = sources[i];
      this._move(src, dst);
      slotPuzzle[dst] = slotPuzzle[src];
      slotSteps[dst] = slotSteps[src];
      for (const array of carried) array[dst] = array[src];
    });
    return newActive;
  }
}

// ---- speed -------------------------------------------------------------------------------------------------------

// Milliseconds per step of the step graph at `batch` (<= the solver's capacity): every slot holds `tokens`, steps
// run back to back for about `seconds` after one warm-up step. The loop's own work is not included.
export async function timeSteps(solver, tokens, id = 0, batch = 1, seconds = 2) {
  if (!Number.isInteger(batch) || batch < 1 || batch > solver.capacity) {
    throw new InputError(`batch must be an integer in [1, ${solver.capacity}], got ${batch}`);
  }
  for (let s = 0; s < batch; s++) solver._load(s, tokens, id);
  await solver.step(batch);
  const now = () => (globalThis.performance ? performance.now() : Date.now());
  const start = now();
  let steps = 0;
  while (steps < 3 || now() - start < 1000 * seconds) {
    await solver.step(batch);
    steps += 1;
  }
  return { batch, steps, ms_per_step: (now() - start) / steps };
}

// ---- the self-check ----------------------------------------------------------------------------------------------

// The bundle's golden puzzles through `solver`, compared with what the PyTorch reference computed at export, with
// the manifest's bars (as runtime/selfcheck.py): {passed, checks: [{name, ok, measured}], figures}.
export async function goldenCheck(solver) {
  const m = solver.bundle.manifest, golden = field(m, "golden", "manifest");
  const folder = checkRelative(field(golden, "folder", "golden"), "golden.folder");
  const n = int(golden, "count", "golden", 1, 100000), L = m.task.seq_len;
  const load = (name, shape, kinds) => solver.bundle.array(`${folder}/${name}.npy`, shape, kinds);
  const tokens = await load("tokens", [n, L], "i"), ids = await load("puzzle_ids", [n], "i");
  const qHaltRef = await load("q_halt", [null, n], "f"), qContRef = await load("q_continue", [null, n], "f");
  const fixedRef = await load("predictions", [n, L], "i");
  const stepsRef = await load("adaptive_steps", [n], "i"), adaptiveRef = await load("adaptive_predictions", [n, L], "i");
  const steps = qHaltRef.shape[0];
  if (qContRef.shape[0] !== steps || steps < 1 || steps > MAX_STEPS) {
    throw new BundleError(`${folder}: golden q_halt / q_continue shapes do not fit; re-export the bundle`);
  }
  const puzzles = Array.from({ length: n }, (_, i) => Array.from(tokens.data.subarray(i * L, (i + 1) * L)));
  const qHalt = new Float32Array(steps * n), qCont = new Float32Array(steps * n);
  const record = ({ puzzles: slots, steps: done, qHalt: qh, qContinue: qc }) => {
    slots.forEach((p, s) => {
      if (p >= 0) {
        qHalt[(done[s] - 1) * n + p] = qh[s];
        qCont[(done[s] - 1) * n + p] = qc[s];
      }
    });
  };
  const idList = Array.from(ids.data);
  const fixed = await solver.solve(puzzles, idList, { mode: "fixed", maxSteps: steps, onStep: record });
  const adaptive = await solver.solve(puzzles, idList, { mode: "adaptive", maxSteps: steps });
  const same = (pred, ref, i) => pred.every((v, p) => v === ref.data[i * L + p]);
  let qErr = 0, signs = 0;
  for (let i = 0; i < steps * n; i++) {
    qErr = Math.max(qErr, Math.abs(qHalt[i] - qHaltRef.data[i]), Math.abs(qCont[i] - qContRef.data[i]));
    signs += (qHalt[i] > 0) === (qHaltRef.data[i] > 0);
  }
  const mean = (f) => Array.from({ length: n }, (_, i) => f(i)).filter(Boolean).length / n;
  const figures = {
    puzzles: n, steps, q_abs: qErr, q_sign_agreement: signs / (steps * n),
    fixed_identical: mean((i) => same(fixed.predictions[i], fixedRef, i)),
    adaptive_steps_identical: mean((i) => adaptive.stepsUsed[i] === stepsRef.data[i]),
    adaptive_identical: mean((i) => same(adaptive.predictions[i], adaptiveRef, i)),
  };
  const tolerances = field(golden, "tolerances", "golden");
  const tol = tolerances[solver.variant] || tolerances.fp32;
  const checks = [
    { name: "Q values at every step", ok: figures.q_abs <= tol.q_abs,
      measured: `max error ${figures.q_abs.toPrecision(3)} (bar <= ${Number(tol.q_abs).toPrecision(3)})` },
  ];
  for (const [name, key, bar] of [["q_halt sign at every step", "q_sign_agreement", "q_sign_agreement"],
                                  ["fixed-step predictions", "fixed_identical", "predictions_identical"],
                                  ["adaptive halting steps", "adaptive_steps_identical", "predictions_identical"],
                                  ["adaptive predictions", "adaptive_identical", "predictions_identical"]]) {
    checks.push({ name, ok: figures[key] >= tol[bar],
                  measured: `${figures[key].toPrecision(3)} (bar >= ${tol[bar]}, ${n} golden puzzles)` });
  }
  return { passed: checks.every((c) => c.ok), checks, figures, fixed, adaptive, puzzles, ids: idList };
}

// ---- puzzle text -------------------------------------------------------------------------------------------------

export const MAZE_CHARS = "# SGo";

// Text -> puzzles (token arrays) in the task's text format, as tasks/files.py: Sudoku one 81-character line each
// ('.' or '0' blank; '#' comment lines and blank lines skipped), mazes square grids of "# SGo" separated by empty
// lines. Errors name the puzzle and the character.
export function parsePuzzles(text, task) {
  if (task.name === "sudoku") {
    const puzzles = [];
    text.split(/\r?\n/).forEach((raw, row) => {
      const line = raw.trim();
      if (!line || line.startsWith("#")) return;
      if (line.length !== 81) throw new InputError(`line ${row + 1}: a Sudoku line has 81 characters, found ${line.length}`);
      puzzles.push(Array.from(line, (ch, pos) => {
        if (ch === "." || ch === "0") return 1;
        if (ch >= "1" && ch <= "9") return ch.charCodeAt(0) - 48 + 1;
        throw new InputError(`line ${row + 1}: bad character ${JSON.stringify(ch)} at position ${pos + 1} ` +
                             "(expected 1-9, 0 or .)");
      }));
    });
    return puzzles;
  }
  if (task.name === "maze") {
    const side = task.grid_side;
    // Mazes are separated by lines of nothing but white space; each row remembers its line for the errors.
    const blocks = [];
    let block = null;
    text.replace(/\r/g, "").split("\n").forEach((row, n) => {
      if (/^\s*$/.test(row)) { block = null; return; }
      if (!block) blocks.push(block = []);
      block.push({ row, line: n + 1 });
    });
    return blocks.map((rows, k) => {
      const where = `maze ${k + 1} (line ${rows[0].line})`;
      if (rows.length !== side) {
        throw new InputError(`${where}: ${rows.length} rows; this model takes ${side} x ${side} grids`);
      }
      const short = rows.find((r) => r.row.length !== side);
      if (short) {
        throw new InputError(`maze ${k + 1}, line ${short.line}: ${short.row.length} characters; this model takes ` +
                             `${side} x ${side} grids (keep trailing spaces: they are open cells)`);
      }
      return Array.from(rows.map((r) => r.row).join(""), (ch, i) => {
        const token = MAZE_CHARS.indexOf(ch) + 1;
        if (!token) {
          throw new InputError(`maze ${k + 1}, line ${rows[Math.floor(i / side)].line}: bad character ` +
                               `${JSON.stringify(ch)} at column ${(i % side) + 1} (expected one of "${MAZE_CHARS}")`);
        }
        return token;
      });
    });
  }
  // A task without a text format: one puzzle per line, its tokens as integers.
  return text.split(/\r?\n/).map((l) => l.trim()).filter((l) => l && !l.startsWith("#"))
    .map((l, row) => l.split(/[\s,]+/).map((v) => {
      if (!/^[0-9]+$/.test(v)) throw new InputError(`line ${row + 1}: ${JSON.stringify(v)} is not a token id`);
      return Number(v);
    }));
}

// One puzzle's tokens -> rows of characters for display (null for a task without a grid).
export function gridRows(tokens, task) {
  const side = task.grid_side;
  if (!side || side * side !== tokens.length) return null;
  const ch = task.name === "sudoku" ? (t) => (t >= 2 && t <= 10 ? String(t - 1) : ".")
    : task.name === "maze" ? (t) => MAZE_CHARS[t - 1] || "?" : (t) => String(t);
  return Array.from({ length: side }, (_, r) => Array.from(tokens.slice(r * side, (r + 1) * side), ch));
}

// Is `answer` a solution of `puzzle`? Sudoku: every row, column and box 1-9, givens kept. Maze: the marked path
// joins S to G and is a shortest path. null for other tasks.
// The cells that make `answer` wrong, for the page to mark: a Sudoku's blanks, changed clues and digits repeated
// in a row, column or box; a maze's path over a wall, S or G, and walls, S or G not as given. Empty when valid (or
// for a task without a rule).
export function conflicts(puzzle, answer, task) {
  const bad = new Set();
  if (task.name === "sudoku") {
    const digit = (i) => answer[i] - 1;
    for (let i = 0; i < 81; i++) {
      if (digit(i) < 1 || digit(i) > 9 || (puzzle[i] !== 1 && puzzle[i] !== answer[i])) bad.add(i);
    }
    const units = [];
    for (let k = 0; k < 9; k++) {
      const row = [], col = [], box = [];
      for (let j = 0; j < 9; j++) {
        row.push(k * 9 + j);
        col.push(j * 9 + k);
        box.push((3 * Math.floor(k / 3) + Math.floor(j / 3)) * 9 + 3 * (k % 3) + (j % 3));
      }
      units.push(row, col, box);
    }
    for (const unit of units) {
      const seen = new Map();
      for (const i of unit) seen.set(digit(i), [...(seen.get(digit(i)) || []), i]);
      for (const [d, cells] of seen) if (d >= 1 && d <= 9 && cells.length > 1) cells.forEach((i) => bad.add(i));
    }
  } else if (task.name === "maze") {
    const path = 5, open = 2;
    for (let i = 0; i < answer.length; i++) {
      if (answer[i] === path ? puzzle[i] !== open : answer[i] !== puzzle[i]) bad.add(i);
    }
  }
  return bad;
}

export function isValidSolution(puzzle, answer, task) {
  // A Sudoku is valid exactly when no cell conflicts (every digit in 1-9, clues kept, no repeat in a unit); a maze
  // also needs its path to be a shortest one from S to G.
  if (task.name === "sudoku") return conflicts(puzzle, answer, task).size === 0;
  if (task.name === "maze") {
    if (conflicts(puzzle, answer, task).size) return false;  // walls, S and G as given; 'o' only on open cells
    const side = task.grid_side, n = side * side, path = 5, wall = 1;
    const start = puzzle.indexOf(3), goal = puzzle.indexOf(4);
    const bfs = (ok) => {
      const dist = new Int32Array(n).fill(-1), queue = [start];
      dist[start] = 0;
      for (let h = 0; h < queue.length; h++) {
        const c = queue[h], r = Math.floor(c / side), col = c % side;
        for (const [dr, dc] of [[1, 0], [-1, 0], [0, 1], [0, -1]]) {
          const rr = r + dr, cc = col + dc, nb = rr * side + cc;
          if (rr >= 0 && rr < side && cc >= 0 && cc < side && dist[nb] < 0 && ok(nb)) {
            dist[nb] = dist[c] + 1;
            queue.push(nb);
          }
        }
      }
      return dist[goal];
    };
    const shortest = bfs((c) => puzzle[c] !== wall);
    const marked = answer.filter((t) => t === path).length;
    return shortest > 0 && marked === shortest - 1 && bfs((c) => answer[c] === path || c === goal) === shortest;
  }
  return null;
}
