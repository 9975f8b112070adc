// What the browser tests share: an `easel serve` of the workspace's build over tiny test models in
// a fresh base directory, Debian's Chromium driven by Playwright, and a screenshot of the page
// in `artifacts/` when a test fails.

import { spawn, execFileSync } from 'node:child_process';
import { cpSync, mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const workspace = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
export const artifacts = join(workspace, 'tests/browser/artifacts');
const easelBinary = process.env.EASEL_BIN ?? join(workspace, 'target/debug/easel');
const chromiumBinary = process.env.CHROMIUM ?? '/usr/bin/chromium';

/** The frontend versions to test, installed by `run` under `target/frontends/<version>`. */
export const frontendVersions = (process.env.EASEL_FRONTEND_VERSIONS ?? '1.27.10 1.58.1').split(/\s+/).filter(Boolean);

export function frontendRoot(version) {
  return join(workspace, 'target/frontends', version, 'comfyui_frontend_package/static');
}

async function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
    server.on('error', reject);
  });
}

/** Starts `easel serve` with the tiny test models and the bundled inputs; `stop()` ends it and
 * removes its directory. */
async function startEasel(extraArgs) {
  const base = mkdtempSync(join(tmpdir(), 'easel-browser-'));
  execFileSync(easelBinary, ['testmodels', join(base, 'models')], { stdio: 'ignore' });
  cpSync(join(workspace, 'workflows/input'), join(base, 'input'), { recursive: true });
  const port = await freePort();
  const log = [];
  const child = spawn(easelBinary, ['serve', '--port', String(port), '--base-directory', base, ...extraArgs], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  for (const stream of [child.stdout, child.stderr]) stream.on('data', (chunk) => log.push(chunk.toString()));
  const url = `http://127.0.0.1:${port}`;
  const started = Date.now();
  for (;;) {
    if (child.exitCode !== null) throw new Error(`easel exited: ${log.join('')}`);
    const ready = await fetch(`${url}/prompt`).then((r) => r.ok, () => false);
    if (ready) break;
    if (Date.now() - started > 30000) throw new Error(`easel did not answer: ${log.join('')}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    url,
    base,
    log,
    async stop() {
      child.kill();
      await new Promise((r) => (child.exitCode !== null ? r() : child.on('exit', r)));
      rmSync(base, { recursive: true, force: true });
    },
  };
}

/** Runs `body(easel)` against a fresh `startEasel(extraArgs)`, which it stops afterwards. */
export async function withEasel(extraArgs, body) {
  const easel = await startEasel(extraArgs);
  try {
    return await body(easel);
  } finally {
    await easel.stop();
  }
}

/**
 * Runs `body(page, problems)` in a new headless Chromium page. `problems` collects uncaught page
 * errors and failed requests other than the ones named in `allowedMissing` (paths a ComfyUI
 * server also answers 404). On failure the page is saved as `artifacts/<name>.png`.
 */
export async function withPage(name, body, { allowedMissing = [] } = {}) {
  const browser = await chromium.launch({
    executablePath: chromiumBinary,
    // The flags that keep Chromium off the network it cannot reach here.
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const problems = [];
  page.on('pageerror', (error) => problems.push(`page error: ${error.stack ?? error.message}`));
  page.on('response', (response) => {
    const path = new URL(response.url()).pathname;
    if (response.status() >= 400 && !allowedMissing.some((allowed) => path.startsWith(allowed))) {
      problems.push(`HTTP ${response.status()} ${response.url()}`);
    }
  });
  try {
    await body(page, problems);
  } catch (error) {
    mkdirSync(artifacts, { recursive: true });
    await page.screenshot({ path: join(artifacts, `${name}.png`), fullPage: true }).catch(() => {});
    throw error;
  } finally {
    await browser.close();
  }
}
