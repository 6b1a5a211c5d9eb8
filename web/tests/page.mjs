// node web/tests/page.mjs URL [--solve N] [--batch] [--bench 1,64] [--bench-seconds S] [--screenshot FILE]
//                            [--phone] [--conflict] [--bad-input TEXT]
// Drives the page of a browser bundle in headless Chromium (playwright-core; CHROMIUM or /usr/bin/chromium) the
// way a person would: waits for the self-check, types golden puzzle N into the puzzle box, presses Solve and reads
// the grid, optionally solves the golden puzzles in batch mode and times the step at the given batch sizes.
// --phone: a 390 x 844 viewport, and how wide the page is there; --conflict: a Sudoku whose clues contradict each
// other (no answer can be valid): the badge and the marked cells; --bad-input: text the parser refuses.
// Prints one JSON object; console errors of the page are in it.
import { chromium } from "playwright-core";

const args = process.argv.slice(2);
const option = (name, fallback = null) => (args.includes(name) ? args[args.indexOf(name) + 1] : fallback);
const url = args[0];
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  // the machine has no network beyond the bundle's server: without these Chromium keeps trying to reach it
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"],
});
const out = { console: [] };
try {
  const phone = args.includes("--phone");
  const page = await browser.newPage({ viewport: phone ? { width: 390, height: 844 } : { width: 1100, height: 900 } });
  const finished = () => page.waitForFunction(
    () => ["done", "invalid", "error", "input"].includes(document.getElementById("status").dataset.state),
    null, { timeout: 300000 });
  // Puzzle text into the box, Solve, and what the page then says: the badge, the verdict, the cells marked.
  const solveText = async (text) => {
    await page.fill("#puzzle", text);
    await page.fill("#delay", "0");
    await page.click("#solve");
    await finished();
    return page.evaluate(() => ({
      state: document.getElementById("status").dataset.state,
      status: document.getElementById("status").textContent,
      verdict: document.getElementById("verdict").textContent,
      marked: document.querySelectorAll("#grid .cell.conflict").length,
    }));
  };
  page.on("console", (m) => { if (m.type() === "error" || m.type() === "warning") out.console.push(m.text()); });
  page.on("pageerror", (e) => out.console.push(`pageerror: ${e.message}`));
  await page.goto(url);
  await page.waitForFunction(() => window.trm !== undefined, null, { timeout: 60000 });
  await page.evaluate(() => window.trm.ready).catch(() => {});
  await page.waitForFunction(() => !["loading", "checking"].includes(document.getElementById("status").dataset.state),
                             null, { timeout: 300000 });
  out.status = await page.evaluate(() => document.getElementById("status").dataset.state);
  out.status_text = await page.textContent("#status");
  out.isolated = await page.evaluate(() => globalThis.crossOriginIsolated);
  out.threads = await page.evaluate(() => window.trm.threads());
  if (out.status === "ready") {
    out.self_check = await page.evaluate(() => ({ passed: window.trm.selfCheck.passed,
                                                  figures: window.trm.selfCheck.figures }));
    out.checked_files = await page.textContent("#footer");
  }
  if (out.status === "ready" && option("--solve") !== null) {
    const n = Number(option("--solve"));
    // the puzzle typed as a person would, from the golden puzzle's text as the Example button shows it
    const text = await page.evaluate((i) => {
      const t = window.trm.solver.task, p = window.trm.selfCheck.puzzles[i];
      return t.name === "sudoku" ? p.map((v) => (v === 1 ? "." : String(v - 1))).join("") : null;
    }, n);
    if (text !== null) {
      await page.fill("#puzzle", "");
      await page.type("#puzzle", text);
    } else {
      for (let i = 0; i <= n; i++) await page.click("#example");
    }
    await page.fill("#delay", option("--delay", "0"));
    await page.click("#solve");
    await finished();
    out.solved = await page.evaluate(() => ({
      state: document.getElementById("status").dataset.state,
      status: document.getElementById("status").textContent,
      answer: document.getElementById("grid").dataset.answer.split(",").map(Number),
      steps: Number(document.getElementById("grid").dataset.steps),
      ms_per_step: Number(document.getElementById("grid").dataset.msPerStep),
      trace: document.querySelectorAll("#trace li").length,
      verdict: document.getElementById("verdict").textContent,
    }));
  }
  if (out.status === "ready" && args.includes("--conflict")) {
    // golden puzzle 0 with its first blank set to a clue of the same row: the clues themselves break the rules
    const text = await page.evaluate(() => {
      const p = window.trm.selfCheck.puzzles[0].slice(0, 81).map((v) => (v === 1 ? "." : String(v - 1)));
      const row = Math.floor(p.findIndex((c, i) => c === "." && p.slice(i - (i % 9), i - (i % 9) + 9)
        .some((d) => d !== ".")) / 9);
      const cells = p.slice(row * 9, row * 9 + 9);
      p[row * 9 + cells.indexOf(".")] = cells.find((d) => d !== ".");
      return p.join("");
    });
    out.conflict = await solveText(text);
  }
  if (out.status === "ready" && option("--bad-input") !== null) out.bad_input = await solveText(option("--bad-input"));
  if (phone) out.page_width = await page.evaluate(() => document.documentElement.scrollWidth);
  if (out.status === "ready") {
    if (args.includes("--batch")) {
      await page.click("#batch-examples");
      await page.click("#batch-solve");
      await page.waitForFunction(() => document.getElementById("batch-summary").dataset.puzzlesPerSecond !==
                                 undefined || /rror|not/.test(document.getElementById("batch-summary").textContent),
                                 null, { timeout: 300000 });
      out.batch = { summary: await page.textContent("#batch-summary"),
                    lines: (await page.inputValue("#batch-output")).split("\n") };
    }
    if (option("--bench")) {
      const seconds = Number(option("--bench-seconds", "2"));
      out.bench = [];
      for (const b of option("--bench").split(",").map(Number)) {
        out.bench.push(await page.evaluate(([bb, s]) => window.trm.timeSteps(bb, s), [b, seconds]));
      }
    }
  }
  if (option("--screenshot")) await page.screenshot({ path: option("--screenshot"), fullPage: true });
} catch (error) {
  out.error = String(error.message).split("\n")[0];
  process.exitCode = 1;
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
