// Easel's built-in page: pick a bundled workflow, change the inputs its manifest offers, run it,
// follow the queue, node and step progress and the live previews, get the image, browse history.
// It talks only to the public API (/easel/workflows, /object_info, /upload/image, /prompt, /queue,
// /history, /view, /ws, and /v1/models/download for a missing model), like any other client.

const $ = (selector) => document.querySelector(selector);

/** What a manifest entry (`_meta.easel`: {kind: input name or names}) may name, in the order of the form. */
const FIELD_KINDS = {
  model: { label: 'Model' },
  prompt: { label: 'Prompt', multiline: true },
  negative_prompt: { label: 'Negative prompt', multiline: true },
  image: { label: 'Input image', file: true },
  mask: { label: 'Mask (white = the part to repaint)', file: true },
  width: { label: 'Width', number: true },
  height: { label: 'Height', number: true },
  steps: { label: 'Steps', number: true },
  seed: { label: 'Seed', number: true },
  denoise: { label: 'Denoise', number: true },
};

const page = {
  clientId: newId(),
  workflows: [],
  /** The workflow whose form is shown; null while a form is being built. */
  form: null,
  /** Promises of the input specs by node class, from /object_info. */
  schemas: {},
  /** The prompt this page queued and is following: {id, prompt, images, started}. */
  job: null,
  previews: 0,
  previewUrl: null,
  /** An image pasted into the page, used where the image field is empty. */
  pastedImage: null,
};

/** How many renders of each part of the page have started. */
const renders = {};

/** Starts a render of a part of the page; the function it returns says whether it is still the
 * latest one. A render checks it after each await and, once superseded, leaves the page alone. */
function newRender(part) {
  const generation = (renders[part] = (renders[part] ?? 0) + 1);
  return () => renders[part] === generation;
}

function newId() {
  if (globalThis.crypto?.randomUUID) return crypto.randomUUID();
  return Array.from({ length: 32 }, () => Math.floor(Math.random() * 16).toString(16)).join('');
}

async function getJson(path) {
  const response = await fetch(path);
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function showError(message) {
  const error = $('#error');
  error.textContent = message;
  error.hidden = !message;
}

function viewUrl(image) {
  const query = new URLSearchParams({ filename: image.filename, subfolder: image.subfolder ?? '', type: image.type ?? 'output' });
  return `/view?${query}`;
}

// ---- Workflows and the form -------------------------------------------------------------------

/** The form fields of a workflow: one per kind, each with the node inputs it sets. */
function fieldsOf(prompt) {
  const fields = {};
  for (const [nodeId, node] of Object.entries(prompt)) {
    for (const [kind, inputs] of Object.entries(node._meta?.easel ?? {})) {
      if (!(kind in FIELD_KINDS)) continue;
      for (const input of [inputs].flat()) {
        const field = (fields[kind] ??= { kind, targets: [], value: node.inputs[input], classType: node.class_type, input });
        field.targets.push({ nodeId, input });
      }
    }
  }
  return Object.keys(FIELD_KINDS).filter((kind) => kind in fields).map((kind) => fields[kind]);
}

/** `[type, options]` of a node input from /object_info, fetched once per class. */
async function inputSpec(classType, input) {
  page.schemas[classType] ??= getJson(`/object_info/${encodeURIComponent(classType)}`)
    .then((info) => info[classType]?.input ?? {}, () => ({}));
  const inputs = await page.schemas[classType];
  return inputs.required?.[input] ?? inputs.optional?.[input] ?? [];
}

async function controlFor(field) {
  const kind = FIELD_KINDS[field.kind];
  const id = `field-${field.kind}`;
  const [type, options = {}] = await inputSpec(field.classType, field.input);
  let control;
  if (kind.multiline) {
    control = document.createElement('textarea');
    control.value = field.value ?? '';
  } else if (kind.file) {
    control = document.createElement('input');
    control.type = 'file';
    control.accept = 'image/*';
  } else if (field.kind === 'model') {
    control = document.createElement('select');
    const choices = Array.isArray(type) ? type : options.options ?? [];
    for (const choice of choices.includes(field.value) ? choices : [field.value, ...choices]) {
      control.add(new Option(choice, choice, false, choice === field.value));
    }
  } else {
    control = document.createElement('input');
    control.type = 'number';
    control.value = field.value;
    for (const limit of ['min', 'max', 'step']) {
      if (typeof options[limit] === 'number') control[limit] = options[limit];
    }
    if (type === 'INT' && !options.step) control.step = 1;
    if (type === 'FLOAT' && !options.step) control.step = 'any';
  }
  control.id = id;
  control.name = field.kind;
  const label = document.createElement('label');
  label.htmlFor = id;
  label.textContent = kind.label;
  const wrapper = document.createElement('div');
  wrapper.append(label, control);
  if (field.kind === 'seed') {
    const random = document.createElement('label');
    random.className = 'inline';
    random.innerHTML = '<input type="checkbox" id="random-seed"> New random seed each run';
    wrapper.append(random);
  }
  if (kind.file) {
    const note = document.createElement('small');
    note.textContent = field.kind === 'mask'
      ? 'Optional: painted onto the input image, which it needs.'
      : `Or paste an image. Left empty, ${field.value} from the server's input folder is used.`;
    wrapper.append(note);
  }
  return wrapper;
}

/** Shows the form of a workflow, built apart and put in place in one step, unless another
 * workflow was chosen while its specs were being fetched. */
async function showWorkflow(name) {
  const current = newRender('form');
  const workflow = page.workflows.find((w) => w.name === name);
  $('#fields').replaceChildren();
  page.form = null;
  page.pastedImage = null;
  if (!workflow) return;
  const controls = await Promise.all(fieldsOf(workflow.prompt).map(controlFor));
  if (!current()) return;
  $('#fields').replaceChildren(...controls);
  page.form = workflow;
  const path = new URL(location);
  path.hash = name;
  history.replaceState(null, '', path);
}

async function loadWorkflows() {
  page.workflows = await getJson('/easel/workflows');
  const select = $('#workflow');
  select.replaceChildren(...page.workflows.map((w) => new Option(w.name.replaceAll('_', ' '), w.name)));
  const wanted = decodeURIComponent(location.hash.slice(1));
  if (page.workflows.some((w) => w.name === wanted)) select.value = wanted;
  await showWorkflow(select.value);
}

// ---- Queueing ---------------------------------------------------------------------------------

/** An image file as a PNG whose alpha is the mask's inverted brightness (LoadImage's mask is
 * 1 − alpha, so white in the mask is what gets repainted). */
async function withMask(imageFile, maskFile) {
  const [image, mask] = await Promise.all([createImageBitmap(imageFile), createImageBitmap(maskFile)]);
  const canvas = document.createElement('canvas');
  canvas.width = image.width;
  canvas.height = image.height;
  const context = canvas.getContext('2d', { willReadFrequently: true });
  context.drawImage(mask, 0, 0, image.width, image.height);
  const maskPixels = context.getImageData(0, 0, image.width, image.height).data;
  context.clearRect(0, 0, image.width, image.height);
  context.drawImage(image, 0, 0);
  const pixels = context.getImageData(0, 0, image.width, image.height);
  for (let i = 0; i < pixels.data.length; i += 4) {
    const brightness = (maskPixels[i] + maskPixels[i + 1] + maskPixels[i + 2]) / 3;
    pixels.data[i + 3] = 255 - Math.round(brightness);
  }
  context.putImageData(pixels, 0, 0);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, 'image/png'));
  return new File([blob], `${imageFile.name.replace(/\.[^.]*$/, '')}_masked.png`, { type: 'image/png' });
}

/** Uploads an input image; its name as LoadImage takes it. */
async function upload(file) {
  const body = new FormData();
  body.append('image', file);
  body.append('type', 'input');
  const response = await fetch('/upload/image', { method: 'POST', body });
  if (!response.ok) throw new Error(`The upload failed: HTTP ${response.status}`);
  const stored = await response.json();
  return stored.subfolder ? `${stored.subfolder}/${stored.name}` : stored.name;
}

/** The workflow's prompt with the form's values. */
async function buildPrompt(workflow) {
  const prompt = structuredClone(workflow.prompt);
  const fields = fieldsOf(workflow.prompt);
  const set = (field, value) => field.targets.forEach(({ nodeId, input }) => (prompt[nodeId].inputs[input] = value));
  const imageFile = $('#field-image')?.files?.[0] ?? page.pastedImage;
  const maskFile = $('#field-mask')?.files?.[0];
  for (const field of fields) {
    const control = $(`#field-${field.kind}`);
    if (FIELD_KINDS[field.kind].number) {
      if (field.kind === 'seed' && $('#random-seed')?.checked) {
        control.value = Math.floor(Math.random() * 2 ** 48);
      }
      if (control.value === '' || Number.isNaN(Number(control.value))) throw new Error(`${FIELD_KINDS[field.kind].label} must be a number`);
      set(field, Number(control.value));
    } else if (field.kind === 'mask') {
      if (maskFile && !imageFile) throw new Error('A mask needs an input image');
    } else if (field.kind !== 'image') {
      set(field, control.value);
    }
  }
  // The upload comes after every field is read: another workflow's form may be shown by its end.
  const imageField = fields.find((field) => field.kind === 'image');
  if (imageField && imageFile) set(imageField, await upload(maskFile ? await withMask(imageFile, maskFile) : imageFile));
  return prompt;
}

/** ComfyUI's error body (`error` and `node_errors`) as lines a person can read. */
function describeRejection(body, prompt) {
  const lines = [body.error?.message ?? 'The prompt was rejected'];
  if (body.error?.details) lines.push(body.error.details);
  for (const [nodeId, errors] of Object.entries(body.node_errors ?? {})) {
    const title = prompt[nodeId]?._meta?.title ?? errors.class_type;
    for (const error of errors.errors ?? []) {
      lines.push(`${title}: ${error.message}${error.details ? ` (${error.details})` : ''}`);
      const folder = error.extra_info?.model_folder;
      if (folder) {
        lines.push(`Put ${error.extra_info.received_value} in models/${folder} of the server's base directory, ` +
          'or download it below.');
      }
    }
  }
  return lines.join('\n');
}

/** The model files a rejection says are missing: {name, folder, url}, the URL where the workflow
 * names one (`_meta.models: [{name, url, directory}]` on the loader, as the official templates
 * carry `models`). */
function missingModels(body, prompt) {
  const missing = [];
  for (const [nodeId, errors] of Object.entries(body.node_errors ?? {})) {
    for (const error of errors.errors ?? []) {
      const folder = error.extra_info?.model_folder;
      if (!folder) continue;
      const name = String(error.extra_info.received_value);
      const named = (prompt[nodeId]?._meta?.models ?? []).find((model) => model.name === name);
      missing.push({ name, folder: named?.directory ?? folder, url: named?.url ?? '' });
    }
  }
  return missing;
}

/** Offers to download each missing model into its folder (`POST /v1/models/download`). */
function offerDownloads(missing) {
  const list = $('#downloads');
  list.replaceChildren();
  list.hidden = missing.length === 0;
  for (const model of missing) {
    const row = document.createElement('form');
    row.className = 'download';
    const id = `download-${list.children.length}`;
    const label = document.createElement('label');
    label.htmlFor = id;
    label.textContent = `Download ${model.name} into models/${model.folder} from`;
    const url = document.createElement('input');
    Object.assign(url, { id, type: 'url', required: true, value: model.url, placeholder: 'https://…' });
    const button = document.createElement('button');
    button.type = 'submit';
    button.textContent = 'Download';
    const status = document.createElement('output');
    status.setAttribute('aria-live', 'polite');
    row.append(label, url, button, status);
    row.addEventListener('submit', (event) => {
      event.preventDefault();
      button.disabled = true;
      download({ url: url.value, folder: model.folder, name: model.name }, status)
        .catch((error) => { status.textContent = error.message; })
        .finally(() => { button.disabled = false; });
    });
    list.append(row);
  }
}

/** Downloads a model, showing its progress in `status` until it is done. */
async function download(request, status) {
  const response = await fetch('/v1/models/download', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(request),
  });
  let job = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(job.error?.message ?? `HTTP ${response.status}`);
  while (job.status === 'downloading') {
    status.textContent = job.percent == null ? `${job.bytes} bytes` : `${Math.floor(job.percent)}%`;
    await new Promise((resolve) => setTimeout(resolve, 250));
    job = await getJson(`/v1/models/downloads/${job.id}`);
  }
  if (job.status !== 'done') throw new Error(`The download failed: ${job.error ?? job.status}`);
  status.textContent = `Downloaded into models/${job.folder}: generate again.`;
}

async function generate(event) {
  event.preventDefault();
  showError('');
  const workflow = page.form;
  if (!workflow) return;
  const button = $('#run');
  button.disabled = true;
  try {
    const prompt = await buildPrompt(workflow);
    const response = await fetch('/prompt', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ prompt, client_id: page.clientId }),
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      offerDownloads(missingModels(body, prompt));
      throw new Error(describeRejection(body, prompt));
    }
    offerDownloads([]);
    startJob(body.prompt_id, prompt);
  } catch (error) {
    showError(error.message);
    button.disabled = false;
  }
}

// ---- Following a prompt -----------------------------------------------------------------------

function startJob(id, prompt) {
  page.job = { id, prompt, images: [], started: false };
  $('#progress').hidden = false;
  $('#result').hidden = true;
  $('#preview-figure').hidden = true;
  $('#nodes').replaceChildren();
  $('#step-progress').value = 0;
  $('#step-label').textContent = 'Step';
  updateQueuePosition();
}

async function updateQueuePosition() {
  const job = page.job;
  if (!job || job.started) return;
  const current = newRender('queue');
  const queue = await getJson('/queue').catch(() => null);
  if (!queue || !current() || page.job !== job || job.started) return;
  const running = queue.queue_running.some((item) => item[1] === job.id);
  const pending = [...queue.queue_pending].sort((a, b) => a[0] - b[0]);
  const index = pending.findIndex((item) => item[1] === job.id);
  $('#queue-position').textContent = running
    ? 'Running'
    : index >= 0
      ? `Waiting: ${index + 1} of ${pending.length} in the queue${queue.queue_running.length ? ', after the one running' : ''}`
      : 'Queued';
}

function nodeTitle(nodeId) {
  const node = page.job?.prompt[nodeId];
  return node?._meta?.title ?? node?.class_type ?? nodeId;
}

/** One list item per node with its own progress bar, from `progress_state`. */
function showNodeStates(nodes) {
  const list = $('#nodes');
  for (const [nodeId, state] of Object.entries(nodes)) {
    const shownId = state.display_node_id ?? nodeId;
    let item = list.querySelector(`li[data-node="${CSS.escape(shownId)}"]`);
    if (!item) {
      item = document.createElement('li');
      item.dataset.node = shownId;
      const bar = document.createElement('progress');
      bar.setAttribute('aria-label', nodeTitle(shownId));
      item.append(document.createTextNode(nodeTitle(shownId)), document.createElement('br'), bar);
      list.append(item);
    }
    item.dataset.state = state.state;
    const bar = item.querySelector('progress');
    bar.max = state.max || 1;
    bar.value = state.state === 'finished' ? bar.max : state.value;
  }
}

function showPreview(blob) {
  if (!page.job) return;
  page.previews += 1;
  document.body.dataset.previews = page.previews;
  if (page.previewUrl) URL.revokeObjectURL(page.previewUrl);
  page.previewUrl = URL.createObjectURL(blob);
  $('#preview').src = page.previewUrl;
  $('#preview-figure').hidden = false;
}

/** A binary frame: type 1 is [format, image], type 4 is [metadata length, metadata, image]. */
function onBinary(buffer) {
  const view = new DataView(buffer);
  const type = view.getUint32(0);
  if (type === 1) {
    const mime = view.getUint32(4) === 2 ? 'image/png' : 'image/jpeg';
    showPreview(new Blob([buffer.slice(8)], { type: mime }));
  } else if (type === 4) {
    const length = view.getUint32(4);
    const metadata = JSON.parse(new TextDecoder().decode(buffer.slice(8, 8 + length)));
    if (page.job && metadata.prompt_id && metadata.prompt_id !== page.job.id) return;
    showPreview(new Blob([buffer.slice(8 + length)], { type: metadata.image_type ?? 'image/png' }));
  }
}

function finishJob(message) {
  const job = page.job;
  page.job = null;
  $('#run').disabled = false;
  $('#queue-position').textContent = message;
  const container = $('#result-images');
  container.replaceChildren();
  const saved = job.images.filter((image) => image.type === 'output');
  for (const image of saved.length ? saved : job.images) {
    const figure = document.createElement('figure');
    const img = document.createElement('img');
    img.src = viewUrl(image);
    img.alt = `Result: ${image.filename}`;
    const link = document.createElement('a');
    link.href = viewUrl(image);
    link.download = image.filename;
    link.className = 'download';
    link.textContent = `Download ${image.filename}`;
    figure.append(img, link);
    container.append(figure);
  }
  $('#result').hidden = job.images.length === 0;
  loadHistory();
}

function onMessage({ type, data }) {
  if (type === 'status') {
    updateQueuePosition();
    return;
  }
  const job = page.job;
  if (!job || (data?.prompt_id && data.prompt_id !== job.id)) return;
  switch (type) {
    case 'execution_start':
      job.started = true;
      $('#queue-position').textContent = 'Running';
      break;
    case 'execution_cached':
      showNodeStates(Object.fromEntries(data.nodes.map((node) => [node, { state: 'finished', value: 1, max: 1 }])));
      break;
    case 'progress_state':
      showNodeStates(data.nodes);
      break;
    case 'progress':
      $('#step-label').textContent = `${nodeTitle(data.node)}: step ${data.value} of ${data.max}`;
      $('#step-progress').max = data.max;
      $('#step-progress').value = data.value;
      break;
    case 'executed':
      job.images.push(...(data.output?.images ?? []));
      break;
    case 'execution_success':
      finishJob('Done');
      break;
    case 'execution_interrupted':
      finishJob('Interrupted');
      break;
    case 'execution_error':
      showError(`${data.node_type ?? 'A node'} failed: ${data.exception_message}`);
      finishJob('Failed');
      break;
  }
}

/** Reads the end of the prompt from history: after a reconnect its messages may have been missed. */
async function catchUp() {
  const job = page.job;
  if (!job) return;
  const history = await getJson(`/history/${job.id}`).catch(() => ({}));
  const entry = history[job.id];
  if (!entry || page.job !== job) return;
  job.images = Object.values(entry.outputs ?? {}).flatMap((output) => output.images ?? []);
  finishJob(entry.status?.status_str === 'success' ? 'Done' : 'Failed');
}

function connect() {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const socket = new WebSocket(`${scheme}://${location.host}/ws?clientId=${page.clientId}`);
  socket.binaryType = 'arraybuffer';
  socket.onopen = () => {
    $('#connection').textContent = 'Connected';
    catchUp();
  };
  socket.onmessage = (event) => {
    if (typeof event.data === 'string') onMessage(JSON.parse(event.data));
    else onBinary(event.data);
  };
  socket.onclose = () => {
    $('#connection').textContent = 'Disconnected, reconnecting…';
    setTimeout(connect, 1000);
  };
}

// ---- History ----------------------------------------------------------------------------------

async function loadHistory() {
  const current = newRender('history');
  const history = await getJson('/history?max_items=48').catch(() => ({}));
  if (!current()) return;
  const gallery = $('#gallery');
  gallery.replaceChildren();
  for (const [id, entry] of Object.entries(history).reverse()) {
    const images = Object.values(entry.outputs ?? {}).flatMap((output) => output.images ?? []);
    const item = document.createElement('li');
    item.dataset.prompt = id;
    const shown = images.filter((image) => image.type === 'output');
    for (const image of (shown.length ? shown : images).slice(0, 4)) {
      const link = document.createElement('a');
      link.href = viewUrl(image);
      const img = document.createElement('img');
      img.src = viewUrl(image);
      img.alt = image.filename;
      img.loading = 'lazy';
      link.append(img);
      item.append(link);
    }
    const started = entry.status?.messages?.[0]?.[1]?.timestamp;
    const meta = document.createElement('p');
    meta.className = 'meta';
    meta.textContent = `${entry.status?.status_str ?? ''}${started ? ` · ${new Date(started).toLocaleString()}` : ''}`;
    const remove = document.createElement('button');
    remove.type = 'button';
    remove.className = 'secondary';
    remove.textContent = 'Delete';
    remove.setAttribute('aria-label', `Delete ${images[0]?.filename ?? id} from history`);
    remove.onclick = async () => {
      await fetch('/history', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ delete: [id] }) });
      loadHistory();
    };
    item.append(meta, remove);
    gallery.append(item);
  }
}

// ---- Start ------------------------------------------------------------------------------------

/** A pasted image becomes the input image (shown in the file field where the browser allows). */
function onPaste(event) {
  const file = [...(event.clipboardData?.files ?? [])].find((f) => f.type.startsWith('image/'));
  const field = $('#field-image');
  if (!file || !field) return;
  event.preventDefault();
  page.pastedImage = file;
  const transfer = new DataTransfer();
  transfer.items.add(file);
  field.files = transfer.files;
}

$('#workflow').addEventListener('change', (event) => showWorkflow(event.target.value));
$('#generate').addEventListener('submit', generate);
$('#refresh-history').addEventListener('click', loadHistory);
document.addEventListener('paste', onPaste);
connect();
loadWorkflows().catch((error) => showError(`Could not load the workflows: ${error.message}`));
loadHistory();
