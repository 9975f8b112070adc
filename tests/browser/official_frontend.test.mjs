// The official ComfyUI frontend (the pip wheel, each version of `frontendVersions`) against Easel:
// it starts without errors, opens a bundled workflow through its file input as a user's "Open"
// does, queues it with the Run button, shows the progress in the page title and the saved
// image on the Save Image node; and a saved UI-format workflow posted to Easel runs as the prompt
// the frontend itself makes of it (graphToPrompt), subgraphs included where the frontend has them.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { frontendRoot, frontendVersions, withEasel, withPage, workspace } from './harness.mjs';

/** Paths a ComfyUI server answers 404 too while the frontend starts. */
const ALLOWED_MISSING = [
  '/user.css',
  '/api/userdata/user.css',
  '/api/userdata/comfy.templates.json',
  '/api/userdata', // workflow and subgraph folders before they exist
  '/templates/index.json',
  '/favicon.ico',
];

/**
 * Errors the frontend throws by itself, whatever the server: 1.27's settings registration runs
 * the navigation-mode setting's change handler before the setting it changes is registered (on
 * every start, with or without stored settings).
 */
const FRONTEND_OWN_ERRORS = [{ version: /^1\.27\./, error: /reading 'id'\)[\s\S]*addSetting/ }];

function isFrontendOwnError(version, problem) {
  return FRONTEND_OWN_ERRORS.some((known) => known.version.test(version) && known.error.test(problem));
}

/**
 * Opens the frontend as a returning user of this version (no first-run template dialog over the
 * canvas) and waits until its app is up and connected.
 */
async function openFrontend(page, easel, version) {
  const settings = { 'Comfy.TutorialCompleted': true, 'Comfy.InstalledVersion': version };
  await fetch(`${easel.url}/api/settings`, { method: 'POST', body: JSON.stringify(settings) });
  await page.goto(easel.url);
  await page.waitForFunction(() => window.app?.graph && window.app.api?.clientId, null, { timeout: 90000 });
}

for (const version of frontendVersions) {
  test(`official frontend ${version} runs a bundled workflow`, { timeout: 180000 }, async () => {
    await withEasel(['--front-end-root', frontendRoot(version)], async (easel) => {
      await withPage(`official-frontend-${version}`, async (page, problems) => {
        await openFrontend(page, easel, version);

        // Twelve steps, so the progress is seen before the image.
        const workflow = JSON.parse(readFileSync(join(workspace, 'workflows/sd15_txt2img.json'), 'utf8'));
        workflow['3'].inputs.steps = 12;
        await page.setInputFiles('#comfy-file-input', {
          name: 'sd15_txt2img.json',
          mimeType: 'application/json',
          buffer: Buffer.from(JSON.stringify(workflow)),
        });
        await page.waitForFunction(() => window.app.graph._nodes.length === 7, null, { timeout: 30000 });
        const types = await page.evaluate(() => window.app.graph._nodes.map((node) => node.type).sort());
        assert.deepEqual(types, ['CLIPTextEncode', 'CLIPTextEncode', 'CheckpointLoaderSimple', 'EmptyLatentImage',
          'KSampler', 'SaveImage', 'VAEDecode']);

        // Fit the whole graph in view (the '.' key), as the Save Image node draws its image only
        // where it is visible.
        await page.locator('#graph-canvas').click({ position: { x: 60, y: 600 } });
        await page.keyboard.press('.');
        await page.evaluate(() => {
          window.easelTitles = [];
          new MutationObserver(() => window.easelTitles.push(document.title))
            .observe(document.querySelector('title'), { childList: true, characterData: true, subtree: true });
        });
        const saved = page.waitForResponse((response) =>
          response.url().includes('/view?') && response.url().includes('filename=sd15_txt2img_') && response.status() === 200,
        { timeout: 120000 });
        saved.catch(() => {});
        const run = page.getByRole('button', { name: 'Run', exact: true });
        if (await run.count()) {
          await run.first().click();
        } else {
          await page.keyboard.press('Control+Enter');
        }
        const image = await saved;
        assert.equal(image.headers()['content-type'], 'image/png');

        // The Save Image node shows the image it saved.
        await page.waitForFunction(() => {
          const node = window.app.graph._nodes.find((n) => n.type === 'SaveImage');
          return node?.imgs?.length > 0 && node.imgs[0].complete && node.imgs[0].naturalWidth === 64;
        }, null, { timeout: 30000 });
        const titles = await page.evaluate(() => window.easelTitles);
        assert.ok(titles.some((title) => /\[\d+%\]/.test(title)), `no progress in the title: ${titles.join(' | ')}`);

        const history = await (await fetch(`${easel.url}/history`)).json();
        const entries = Object.values(history);
        assert.equal(entries.length, 1);
        assert.equal(entries[0].status.status_str, 'success');
        assert.equal(entries[0].prompt[2]['3'].inputs.steps, 12);
        assert.deepEqual(problems.filter((problem) => !isFrontendOwnError(version, problem)), []);
      }, { allowedMissing: ALLOWED_MISSING });
    });
  });
}

/** UI-format workflows saved by the frontend, and the first version that can open each. */
const SAVED_WORKFLOWS = [
  ['ui_workflow_sd15_lora.json', '1.0.0'],
  ['ui_workflow_sd15_lora_subgraph.json', '1.24.0'],
  ['ui_workflow_sd15_lora_nested_subgraph.json', '1.24.0'],
];

function atLeast(version, minimum) {
  const [a, b] = [version, minimum].map((v) => v.split('.').map(Number));
  for (let i = 0; i < 3; i++) if (a[i] !== b[i]) return a[i] > b[i];
  return true;
}

for (const version of frontendVersions) {
  test(`official frontend ${version} and Easel make the same prompt of a saved workflow`, { timeout: 180000 }, async () => {
    await withEasel(['--front-end-root', frontendRoot(version)], async (easel) => {
      await withPage(`saved-workflows-${version}`, async (page, problems) => {
        await openFrontend(page, easel, version);
        for (const [fixture, minimum] of SAVED_WORKFLOWS.filter(([, minimum]) => atLeast(version, minimum))) {
          const saved = readFileSync(join(workspace, 'nodes/tests/fixtures', fixture), 'utf8');
          await page.setInputFiles('#comfy-file-input', { name: fixture, mimeType: 'application/json', buffer: Buffer.from(saved) });
          await page.waitForFunction((count) => window.app.graph._nodes.length === count, JSON.parse(saved).nodes.length);
          const frontendPrompt = await page.evaluate(async () => (await window.app.graphToPrompt()).output);

          const response = await fetch(`${easel.url}/prompt`, { method: 'POST', body: JSON.stringify({ prompt: JSON.parse(saved) }) });
          const { prompt_id: promptId } = await response.json();
          assert.equal(response.status, 200, fixture);
          let entry;
          for (let tries = 0; !entry && tries < 600; tries++) {
            entry = (await (await fetch(`${easel.url}/history/${promptId}`)).json())[promptId];
            if (!entry) await new Promise((r) => setTimeout(r, 100));
          }
          assert.equal(entry?.status.status_str, 'success', fixture);
          assert.deepStrictEqual(entry.prompt[2], frontendPrompt, fixture);
        }
        assert.deepEqual(problems.filter((problem) => !isFrontendOwnError(version, problem)), []);
      }, { allowedMissing: ALLOWED_MISSING });
    });
  });
}
