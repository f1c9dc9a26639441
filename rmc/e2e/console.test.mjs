// End-to-end test of the BIDS console in a real browser: starts `bids demo --rmc … --hold`
// (an in-process testnet with the console attached), then drives Debian's headless Chromium
// through playwright-core: log in (a wrong password first), see the testnet's hosts, change a
// host's rate limit, check the host reports it, and save screenshots under out/.
//
// Environment: BIDS_BIN (default ../../target/release/bids), CHROMIUM (default
// /usr/bin/chromium).
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer } from "node:net";
import { mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = dirname(fileURLToPath(import.meta.url));
const BIDS = process.env.BIDS_BIN || resolve(here, "../../target/release/bids");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const PASSWORD = "e2e-console-password";
const OUT = join(here, "out");

function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.once("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

// Resolves when `pattern` shows up in the child's output; fails if it exits first or after `ms`.
function waitForOutput(child, pattern, ms, log) {
  return new Promise((ok, fail) => {
    const timer = setTimeout(() => fail(new Error(`no ${pattern} within ${ms} ms:\n${log.join("")}`)), ms);
    const check = () => {
      if (pattern.test(log.join(""))) { clearTimeout(timer); ok(); }
    };
    child.stdout.on("data", check);
    child.stderr.on("data", check);
    child.once("exit", (code) => { clearTimeout(timer); fail(new Error(`bids demo exited (${code}) early:\n${log.join("")}`)); });
    check();
  });
}

test("console: log in, see the hosts, change a rate limit", { timeout: 240_000 }, async () => {
  mkdirSync(OUT, { recursive: true });
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  const log = [];
  const demo = spawn(BIDS, [
    "demo", "--rmc", `127.0.0.1:${port}`, "--hold", "--mode", "bids",
    "--idcs", "3", "--hosts", "2", "--size", "24MiB", "--wan-mbit", "80", "--lan-mbit", "400",
  ], { env: { ...process.env, BIDS_RMC_PASSWORD: PASSWORD, RUST_LOG: "warn" }, stdio: ["ignore", "pipe", "pipe"] });
  demo.stdout.on("data", (d) => log.push(d.toString()));
  demo.stderr.on("data", (d) => log.push(d.toString()));
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox", "--disable-gpu"] });
  try {
    await waitForOutput(demo, /console: http:\/\//, 120_000, log);
    const page = await browser.newPage({ viewport: { width: 1440, height: 900 } });
    page.on("pageerror", (e) => log.push(`page error: ${e}\n`));
    await page.goto(base + "/");

    // Not logged in: the login form, and the API says 401.
    await page.locator("#login-form").waitFor({ state: "visible" });
    const anon = await page.request.get(base + "/api/hosts");
    assert.equal(anon.status(), 401);

    // A wrong password is refused on the page.
    await page.fill("#login-password", "wrong");
    await page.click("#login-submit");
    await page.locator("#login-error", { hasText: "Wrong user or password" }).waitFor();
    assert.equal(await page.locator("#nav").isVisible(), false);

    // The right one opens the console.
    await page.fill("#login-password", PASSWORD);
    await page.click("#login-submit");
    await page.locator("#nav").waitFor({ state: "visible" });

    // The hosts of the running testnet: 3 IDCs, A with 1 host + 1 bridgehead, B and C with
    // 2 hosts + 1 bridgehead each.
    await page.click("nav a[data-view=hosts]");
    await page.waitForFunction(() => document.querySelectorAll("#hosts-by-idc tr[data-peer]").length === 8, null, { timeout: 30_000 });
    const idcs = await page.$$eval("#hosts-by-idc .card", (cards) => cards.map((c) => c.dataset.idc));
    assert.deepEqual(idcs, ["A", "B", "C"]);
    await page.waitForFunction(() => [...document.querySelectorAll("#hosts-by-idc .alive")].every((td) => td.textContent.includes("alive")), null, { timeout: 30_000 });
    const bridgeheads = await page.locator("#hosts-by-idc td.role-bridgehead").count();
    assert.equal(bridgeheads, 3);

    // Change the download limit of the first ordinary host of IDC B to 3 MB/s.
    const row = page.locator('#hosts-by-idc .card[data-idc="B"] tr[data-peer]', { has: page.locator("td.role-host") }).first();
    const peer = await row.getAttribute("data-peer");
    await row.locator("input.lim-down").fill("3");
    await row.locator("button.apply-limits").click();
    await page.locator("#toast", { hasText: "limits of" }).waitFor({ timeout: 30_000 });

    // The host applied it and reports it (GIS → console) in its next heartbeat.
    let reported = null;
    for (let i = 0; i < 100 && reported !== 3_000_000; i++) {
      const hosts = await (await page.request.get(base + "/api/hosts")).json();
      reported = hosts.find((h) => h.peer === peer)?.limits?.download_bps ?? null;
      if (reported !== 3_000_000) await page.waitForTimeout(100);
    }
    assert.equal(reported, 3_000_000);
    await page.waitForFunction((p) => {
      const r = document.querySelector(`tr[data-peer="${p}"] input.lim-down`);
      return r && Number(r.value) === 3;
    }, peer, { timeout: 10_000 });
    await page.screenshot({ path: join(OUT, "hosts.png"), fullPage: true });

    // After the distribution, the overview charts show WAN and LAN traffic per IDC.
    await waitForOutput(demo, /holding/i, 180_000, log);
    await page.click("nav a[data-view=overview]");
    await page.waitForFunction(() => document.querySelectorAll("#traffic-charts svg path.series-wan").length >= 2, null, { timeout: 30_000 });
    // Provision times as each host measured them: one bar per host of B and C (all six fetched
    // the image), arriving with their heartbeats.
    await page.waitForFunction(() => [...document.querySelectorAll("#provision-chart rect > title")]
      .filter((t) => /\(IDC [BC]\)/.test(t.textContent)).length >= 6, null, { timeout: 30_000 });
    await page.screenshot({ path: join(OUT, "overview.png"), fullPage: true });
    await page.click("nav a[data-view=images]");
    await page.locator("#images-table tbody tr").first().waitFor();
    await page.screenshot({ path: join(OUT, "images.png"), fullPage: true });
  } finally {
    await browser.close();
    const exited = new Promise((ok) => demo.once("exit", ok));
    if (demo.exitCode === null) demo.kill("SIGTERM");
    await Promise.race([exited, new Promise((ok) => setTimeout(ok, 20_000))]);
    if (demo.exitCode === null) demo.kill("SIGKILL");
  }
});
