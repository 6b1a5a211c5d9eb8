// The JavaScript runtime (web/app/trm.mjs) under Node.js, on onnxruntime-web's WebAssembly build: the same runtime
// and engine the page uses. For the tests and benchmarks; prints one JSON object ({error} on a failure, exit 1).
//
//   node web/tests/runtime.mjs BUNDLE golden [--threads N] [--variant V]   the bundle's golden self-check
//   node web/tests/runtime.mjs BUNDLE solve < request.json                  {puzzles, ids, options, batchSize}
//   node web/tests/runtime.mjs BUNDLE time --batches 1,64 [--seconds S]    ms per step
import { readFile } from "node:fs/promises";
import path from "node:path";
import * as ort from "onnxruntime-web";
import { goldenCheck, openBundle, Solver, timeSteps } from "../app/trm.mjs";

const args = process.argv.slice(2);
const option = (name, fallback = null) => (args.includes(name) ? args[args.indexOf(name) + 1] : fallback);
const [root, command] = [path.resolve(args[0]), args[1]];
ort.env.wasm.numThreads = Number(option("--threads", "1"));

const reader = async (rel) => {
  const bytes = await readFile(path.join(root, rel));
  return bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
};
const plain = (r) => ({ predictions: r.predictions.map((p) => Array.from(p)), steps: Array.from(r.stepsUsed),
                        q_halt: Array.from(r.qHalt), q_continue: Array.from(r.qContinue) });

async function stdinJson() {
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString());
}

try {
  const bundle = await openBundle(null, reader);
  let out;
  if (command === "golden") {
    const solver = await Solver.create(bundle, ort, { variant: option("--variant"), batchSize: 8 });
    const report = await goldenCheck(solver);
    out = { passed: report.passed, checks: report.checks, figures: report.figures, fixed: plain(report.fixed),
            adaptive: plain(report.adaptive), variant: solver.variant };
  } else if (command === "solve") {
    const request = await stdinJson();
    const solver = await Solver.create(bundle, ort, { variant: request.variant || null,
                                                      batchSize: request.batchSize || 64 });
    out = plain(await solver.solve(request.puzzles, request.ids || null, request.options || {}));
  } else if (command === "time") {
    const solver = await Solver.create(bundle, ort, { batchSize: 64 });
    const tokens = (await bundle.array(`${bundle.manifest.golden.folder}/tokens.npy`, null, "i")).data
      .subarray(0, bundle.manifest.task.seq_len);
    out = { threads: ort.env.wasm.numThreads, times: [] };
    for (const b of option("--batches", "1").split(",").map(Number)) {
      out.times.push(await timeSteps(solver, Array.from(tokens), 0, b, Number(option("--seconds", "2"))));
    }
  } else {
    throw new Error(`unknown command ${command}; golden, solve or time`);
  }
  out.checked_files = bundle.checked.length;
  console.log(JSON.stringify(out));
} catch (error) {
  console.log(JSON.stringify({ error: `${error.name}: ${error.message}` }));
  process.exitCode = 1;
}
