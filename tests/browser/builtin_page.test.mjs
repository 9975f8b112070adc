// The built-in page through a full generation, as a person uses it: pick a workflow, change the
// prompt and the seed, upload an input image, run; the queue position, the node and step
// progress, the live previews and the result with its download link appear; the history gallery
// lists the run and deletes it. A workflow chosen while the form of another is being built
// replaces it. A rejected prompt says why; a missing model can be downloaded from the page.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { cpSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:http';
import { join } from 'node:path';
import { withEasel, withPage, workspace } from './harness.mjs';

test('the built-in page makes a picture and keeps it in history', { timeout: 180000 }, async () => {
  // latent2rgb previews are sent while the sampler runs.
  await withEasel(['--preview-method', 'latent2rgb'], async (easel) => {
    await withPage('built-in-page', async (page, problems) => {
      await page.goto(`${easel.url}/easel/`);
      await page.waitForSelector('#connection:text("Connected")');

      // An img2img workflow: the form offers the image, the prompts, the steps, the seed, denoise.
      await page.selectOption('#workflow', 'sdxl_img2img');
      await page.waitForSelector('#field-image');
      for (const field of ['model', 'prompt', 'negative_prompt', 'steps', 'seed', 'denoise']) {
        assert.equal(await page.locator(`#field-${field}`).count(), 1, field);
      }
      assert.equal(await page.locator('#field-width').count(), 0);
      assert.equal(await page.inputValue('#field-model'), 'easel_tiny_sdxl.safetensors');
      await page.fill('#field-prompt', 'a lighthouse painted in watercolour');
      await page.fill('#field-steps', '8');
      await page.fill('#field-seed', '1234');
      const photo = readFileSync(join(workspace, 'workflows/input/example.png'));
      await page.setInputFiles('#field-image', { name: 'my_photo.png', mimeType: 'image/png', buffer: photo });
      // The keyboard alone runs it.
      await page.focus('#field-denoise');
      await page.keyboard.press('Enter');

      await page.waitForSelector('#progress:not([hidden])');
      await page.waitForSelector('#result-images img', { timeout: 120000 });
      await page.waitForFunction(() => document.querySelector('#result-images img').naturalWidth > 0);
      assert.equal(await page.textContent('#queue-position'), 'Done');
      assert.match(await page.textContent('#step-label'), /KSampler: step 8 of 8/);
      const states = await page.$$eval('#nodes li', (items) => items.map((item) => item.dataset.state));
      assert.ok(states.length >= 6 && states.every((state) => state === 'finished'), states.join());
      assert.ok(Number(await page.getAttribute('body', 'data-previews')) >= 1, 'no live preview was shown');

      const download = page.locator('#result-images a.download');
      const href = await download.getAttribute('href');
      assert.match(href, /^\/view\?filename=sdxl_img2img_\d+_\.png&subfolder=&type=output$/);
      assert.match(await download.getAttribute('download'), /^sdxl_img2img_\d+_\.png$/);

      // What ran is what the form said, with the uploaded image.
      const history = await (await fetch(`${easel.url}/history`)).json();
      const [promptId, entry] = Object.entries(history)[0];
      assert.equal(entry.status.status_str, 'success');
      const prompt = entry.prompt[2];
      assert.equal(prompt['6'].inputs.text, 'a lighthouse painted in watercolour');
      assert.equal(prompt['3'].inputs.steps, 8);
      assert.equal(prompt['3'].inputs.seed, 1234);
      assert.equal(prompt['1'].inputs.image, 'my_photo.png');

      const card = page.locator(`#gallery li[data-prompt="${promptId}"]`);
      await card.waitFor();
      assert.equal(await card.locator('img').count(), 1);
      await card.getByRole('button', { name: /^Delete/ }).click();
      await card.waitFor({ state: 'detached' });
      assert.deepEqual(await (await fetch(`${easel.url}/history`)).json(), {});
      assert.deepEqual(problems, []);
    });
  });
});

test('the built-in page shows only the form of the workflow chosen last, however its renders interleave', { timeout: 60000 }, async () => {
  await withEasel([], async (easel) => {
    await withPage('built-in-page-switch', async (page, problems) => {
      // /object_info answers wait until the test lets them through, so renders stay in flight.
      const held = [];
      let holding = true;
      const inFlight = new Set();
      page.on('request', (request) => request.url().includes('/object_info') && inFlight.add(request));
      for (const event of ['requestfinished', 'requestfailed']) page.on(event, (request) => inFlight.delete(request));
      await page.route('**/object_info/**', (route) => (holding ? held.push(route) : route.continue()));

      // The first render (sd15_txt2img) waits for its schemas; another workflow is chosen before
      // any of them arrives.
      await page.goto(`${easel.url}/easel/#sd15_txt2img`);
      while (held.length === 0) await new Promise((r) => setTimeout(r, 20));
      await page.selectOption('#workflow', 'sdxl_img2img');
      // One answer goes through, then a third workflow is chosen while the first two still render.
      const first = held.shift();
      const answered = page.waitForEvent('requestfinished', (request) => request === first.request());
      await first.continue();
      await answered;
      assert.ok(held.length > 0, 'the renders are still waiting');
      await page.selectOption('#workflow', 'flux_schnell_txt2img');
      holding = false;
      await Promise.all(held.splice(0).map((route) => route.continue()));
      // Every render has had all its answers, and the time to show them.
      await page.waitForFunction(() => location.hash === '#flux_schnell_txt2img');
      while (inFlight.size > 0) await new Promise((r) => setTimeout(r, 50));
      await page.waitForTimeout(300);

      const kinds = ['model', 'prompt', 'negative_prompt', 'width', 'height', 'steps', 'seed', 'denoise'];
      for (const kind of kinds) assert.equal(await page.locator(`#field-${kind}`).count(), 1, kind);
      assert.equal(await page.locator('#fields > div').count(), kinds.length);
      assert.equal(await page.locator('#random-seed').count(), 1);
      assert.equal(await page.locator('#field-image').count(), 0);
      assert.equal(await page.inputValue('#workflow'), 'flux_schnell_txt2img');
      assert.equal(await page.inputValue('#field-model'), 'easel_tiny_flux_schnell.safetensors');
      const models = await page.locator('#field-model option').allTextContents();
      assert.ok(!models.includes('easel_tiny_sd1.safetensors') && !models.includes('easel_tiny_sdxl.safetensors'), models.join());
      assert.equal(await page.inputValue('#field-prompt'), 'a (small:1.2) bird in a garden at sunset');
      assert.equal(await page.inputValue('#field-height'), '48');
      assert.equal(await page.inputValue('#field-seed'), '11');
      assert.deepEqual(problems, []);
    });
  });
});

test('the built-in page checks its fields and shows why a prompt is rejected', { timeout: 90000 }, async () => {
  // The missing model is downloaded from a server on this machine.
  await withEasel(['--download-allow-private'], async (easel) => {
    await withPage('built-in-page-rejected', async (page, problems) => {
      await page.goto(`${easel.url}/#sd15_inpaint`);
      await page.waitForSelector('#field-steps');
      // Limits come from the node's schema: the browser refuses a step count below KSampler's 1.
      await page.fill('#field-steps', '0');
      await page.click('#run');
      assert.equal(await page.locator('#field-steps:invalid').count(), 1);
      assert.equal(await page.isVisible('#progress'), false);

      // No image uploaded, and the workflow's example.png gone from the server's input folder.
      rmSync(join(easel.base, 'input/example.png'));
      await page.fill('#field-steps', '4');
      await page.click('#run');
      const error = page.locator('#error');
      await error.waitFor();
      assert.match(await error.textContent(), /Prompt outputs failed validation[\s\S]*Load Image: .*Invalid image file: example\.png/);
      assert.equal(await page.isEnabled('#run'), true);
      // The rejected POST /prompt is the only failed request.
      assert.equal(problems.length, 1, problems.join());
      assert.match(problems[0], /HTTP 400 .*\/prompt$/);

      // A missing model: the page says which folder it belongs in and offers to download it.
      cpSync(join(workspace, 'workflows/input/example.png'), join(easel.base, 'input/example.png'));
      const checkpoint = join(easel.base, 'models/checkpoints/easel_tiny_sd1.safetensors');
      const weights = readFileSync(checkpoint);
      rmSync(checkpoint);
      await page.click('#run');
      await page.waitForFunction(() => document.querySelector('#error').textContent.includes('models/checkpoints'));
      assert.match(await error.textContent(), /Load Checkpoint: Value not in list[\s\S]*Put easel_tiny_sd1\.safetensors in models\/checkpoints/);
      const files = createServer((request, response) => response.end(weights));
      await new Promise((resolve) => files.listen(0, '127.0.0.1', resolve));
      try {
        assert.match(await page.textContent('#downloads label'), /easel_tiny_sd1\.safetensors into models\/checkpoints/);
        await page.fill('#download-0', `http://127.0.0.1:${files.address().port}/weights`);
        await page.click('#downloads button');
        await page.waitForSelector('#downloads output:text("Downloaded into models/checkpoints")');
      } finally {
        files.close();
      }
      assert.deepEqual(readFileSync(checkpoint), weights);
      await page.click('#run');
      await page.waitForSelector('#result-images img', { timeout: 60000 });
      assert.equal(await page.isVisible('#downloads'), false);
    });
  });
});

test('the built-in page turns a mask into the input image\'s alpha for inpainting', { timeout: 120000 }, async () => {
  await withEasel([], async (easel) => {
    await withPage('built-in-page-mask', async (page, problems) => {
      await page.goto(`${easel.url}/easel/#sd15_inpaint`);
      await page.waitForSelector('#field-mask');
      // A 64×64 mask, white (repaint) on its left half, drawn by the browser.
      const maskPng = await page.evaluate(() => {
        const canvas = document.createElement('canvas');
        canvas.width = canvas.height = 64;
        const context = canvas.getContext('2d');
        context.fillStyle = 'black';
        context.fillRect(0, 0, 64, 64);
        context.fillStyle = 'white';
        context.fillRect(0, 0, 32, 64);
        return canvas.toDataURL('image/png').split(',')[1];
      });
      await page.setInputFiles('#field-image', join(workspace, 'workflows/input/example.png'));
      await page.setInputFiles('#field-mask', { name: 'mask.png', mimeType: 'image/png', buffer: Buffer.from(maskPng, 'base64') });
      await page.click('#run');
      await page.waitForSelector('#result-images img', { timeout: 90000 });
      assert.equal(await page.textContent('#queue-position'), 'Done');

      const history = await (await fetch(`${easel.url}/history`)).json();
      const uploaded = Object.values(history)[0].prompt[2]['1'].inputs.image;
      assert.equal(uploaded, 'example_masked.png');
      // The uploaded image: transparent where the mask is white, opaque where it is black.
      const alphas = await page.evaluate(async (name) => {
        const image = await createImageBitmap(await (await fetch(`/view?filename=${name}&type=input`)).blob());
        const canvas = document.createElement('canvas');
        canvas.width = image.width;
        canvas.height = image.height;
        const context = canvas.getContext('2d');
        context.drawImage(image, 0, 0);
        const alphaAt = (x, y) => context.getImageData(x, y, 1, 1).data[3];
        return [alphaAt(2, image.height / 2), alphaAt(image.width - 3, image.height / 2)];
      }, uploaded);
      assert.deepEqual(alphas, [0, 255]);
      assert.deepEqual(problems, []);
    });
  });
});
