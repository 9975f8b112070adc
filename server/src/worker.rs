//! The worker: takes prompts off the queue in order, executes them, routes their events to
//! WebSocket clients as ComfyUI does, and records history.

use crate::hub::{message, preview_frame, preview_frame_with_metadata, progress_text_frame, Outgoing};
use crate::rest::tasks::LiveTasks;
use crate::state::Shared;
use easel_engine::events::{Event, EventKind};
use easel_engine::{EventSink, ExecutionOutcome, ExecutionStatus, Executor};
use easel_nodes::model_cache::ModelCache;
use serde_json::{json, Value as Json};
use std::cell::{Cell, RefCell};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// `extra_data` keys that reach the queue but never history.
const SENSITIVE_EXTRA_DATA_KEYS: [&str; 2] = ["auth_token_comfy_org", "api_key_comfy_org"];

/// How long the idle worker waits for a prompt before it looks at `POST /free` requests again.
const FREE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How long after it was queued a prompt starts at the earliest: its client may still be reading
/// the `POST /prompt` answer that names it before it listens for the prompt's messages.
const SETTLE: Duration = Duration::from_millis(25);

pub fn run(shared: &Shared) {
    let _alive = AliveWhileRunning(shared);
    let runtime = &shared.runtime;
    let mut executor = Executor::new(runtime.registry.clone(), runtime.services.clone(), runtime.cache_mode);
    // History entries the store refused (a full disk): stored again before each prompt and every
    // idle second until they are in, so a prompt that ran still ends in its entry, run once.
    let mut unsaved: Vec<(String, Json)> = Vec::new();
    loop {
        unsaved.retain(|(prompt_id, entry)| !store_history(shared, prompt_id, entry));
        // `POST /free` takes effect before the next prompt, or within a second when idle.
        if shared.unload_models.swap(false, Ordering::SeqCst) {
            if let Some(models) = runtime.services.get::<ModelCache>() {
                models.clear();
            }
        }
        if shared.free_memory.swap(false, Ordering::SeqCst) {
            executor.clear_cache();
            crate::allocator::release_freed_memory();
        }
        let Some((item, queued_at)) = shared
            .queue
            .take_within(FREE_CHECK_INTERVAL, |remaining| shared.broadcast_status(remaining))
        else {
            continue;
        };
        shared.interrupt.clear();
        match shared.store.mark_running(&item.prompt_id) {
            Ok(true) => shared.live_tasks.begin(&item.prompt_id, &item.validated.prompt),
            Ok(false) => {}
            Err(error) => tracing::error!(prompt_id = %item.prompt_id, "cannot record the prompt as running: {error}"),
        }
        // Shown as running from here on: an interrupt meanwhile stops it before its first node.
        if let Some(wait) = SETTLE.checked_sub(queued_at.elapsed()) {
            std::thread::sleep(wait);
        }
        let started = Instant::now();
        let client = item.client_id().map(str::to_string);
        let sink = RoutedEvents {
            shared,
            client: client.as_deref(),
            task: shared
                .live_tasks
                .is_tracked(&item.prompt_id)
                .then_some(item.prompt_id.as_str()),
            held_preview: RefCell::new(None),
            last_step: Cell::new(None),
        };
        // Nodes' panics are caught by the engine; this catches the engine's own, so one bad prompt
        // never stops the worker (the executor, and so its cache, is started afresh).
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            executor.execute(
                &item.prompt_id,
                &item.validated,
                &item.extra_data,
                &sink,
                &shared.interrupt,
            )
        }));
        let outcome = run.unwrap_or_else(|_| {
            tracing::error!(prompt_id = %item.prompt_id, "the engine failed on this prompt");
            executor = Executor::new(runtime.registry.clone(), runtime.services.clone(), runtime.cache_mode);
            engine_failure(&item.prompt_id)
        });
        shared.set_executing_node(None);
        shared.metrics.prompt_finished(started.elapsed().as_secs_f64());

        let mut extra_data = item.extra_data.clone();
        if let Some(extra) = extra_data.as_object_mut() {
            for key in SENSITIVE_EXTRA_DATA_KEYS {
                extra.remove(key);
            }
        }
        let cached = outcome
            .messages
            .get(1)
            .and_then(|m| m[1]["nodes"].as_array())
            .map_or(0, Vec::len);
        let status = outcome.status_json();
        tracing::info!(
            prompt_id = %item.prompt_id,
            nodes = item.validated.prompt.len(),
            cached,
            status = status["status_str"].as_str().unwrap_or_default(),
            "Prompt executed in {:.2} seconds",
            started.elapsed().as_secs_f64()
        );
        let entry = json!({
            "prompt": [item.number_json, item.prompt_id, item.validated.prompt.to_json(), extra_data, item.validated.outputs_to_execute],
            "outputs": outcome.outputs,
            "status": status,
            "meta": outcome.meta,
        });
        if !store_history(shared, &item.prompt_id, &entry) {
            unsaved.push((item.prompt_id.clone(), entry));
        }
        shared.queue.finish(|remaining| shared.broadcast_status(remaining));
        if let Some(client) = &client {
            shared.hub.send(
                client,
                message("executing", &json!({"node": Json::Null, "prompt_id": item.prompt_id})),
            );
        }
    }
}

/// Marks the worker stopped when its thread ends (it should not: `/readyz` reports it).
struct AliveWhileRunning<'a>(&'a Shared);

impl Drop for AliveWhileRunning<'_> {
    fn drop(&mut self) {
        self.0.metrics.worker_alive.store(false, Ordering::SeqCst);
    }
}

/// Replaces the prompt's queue row by its history entry (settling its task, if any, which
/// streams and waiting requests then hear of); whether the store took it.
fn store_history(shared: &Shared, prompt_id: &str, entry: &Json) -> bool {
    match shared.store.complete(prompt_id, entry) {
        Ok(webhook_due) => {
            shared.live_tasks.end(prompt_id);
            if webhook_due {
                shared.webhook_wake.notify();
            }
            true
        }
        Err(error) => {
            tracing::error!(%prompt_id, "cannot store the history entry yet (tried again each second): {error}");
            false
        }
    }
}

/// The outcome recorded when the engine itself failed on a prompt.
fn engine_failure(prompt_id: &str) -> ExecutionOutcome {
    let error = json!({
        "prompt_id": prompt_id, "node_id": Json::Null, "node_type": Json::Null, "executed": [],
        "exception_message": "Easel failed while executing this prompt; see the server log.\n",
        "exception_type": "EngineError", "traceback": [], "current_inputs": {}, "current_outputs": [],
        "timestamp": easel_engine::events::timestamp_ms(),
    });
    ExecutionOutcome {
        status: ExecutionStatus::Error,
        messages: vec![json!(["execution_error", error])],
        outputs: serde_json::Map::new(),
        meta: serde_json::Map::new(),
    }
}

/// Sends execution events to the prompt's client; progress events go to everyone when the prompt
/// has no client (ComfyUI's routing, protocol §4.3). A preview goes as binary type 4 right away to a
/// client that negotiated preview metadata, else as type 1 after its `progress` message. Progress
/// text goes to everyone as binary type 3, as ComfyUI's `send_progress_text` does by default.
struct RoutedEvents<'a> {
    shared: &'a Shared,
    client: Option<&'a str>,
    /// The REST task this prompt runs for, which follows its progress and previews.
    task: Option<&'a str>,
    /// When the last progress report came (for `/metrics`' step durations).
    last_step: Cell<Option<Instant>>,
    held_preview: RefCell<Option<Outgoing>>,
}

impl RoutedEvents<'_> {
    /// Whether anyone would receive an event of this kind (frames are not built for nobody).
    fn has_audience(&self, kind: EventKind) -> bool {
        let hub = &self.shared.hub;
        match (self.client, kind) {
            (_, EventKind::ProgressText) => hub.has_clients(),
            (Some(client), _) => hub.is_connected(client),
            (
                None,
                EventKind::Progress | EventKind::ProgressState | EventKind::ExecutionInterrupted | EventKind::Preview,
            ) => hub.has_clients(),
            (None, _) => false,
        }
    }
}

impl EventSink for RoutedEvents<'_> {
    fn wants(&self, kind: EventKind) -> bool {
        kind == EventKind::Progress || (self.task.is_some() && LiveTasks::follows(kind)) || self.has_audience(kind)
    }

    fn emit(&self, event: Event) {
        let hub = &self.shared.hub;
        if event.kind == EventKind::Progress {
            // A step's time: from the node's previous report (a node's first report has none).
            let continues = event.data["value"].as_u64().unwrap_or(0) > 1;
            if let Some(previous) = self.last_step.get().filter(|_| continues) {
                self.shared.metrics.sampling_step(previous.elapsed().as_secs_f64());
            }
            self.last_step.set(Some(Instant::now()));
        }
        if let Some(task) = self.task.filter(|_| LiveTasks::follows(event.kind)) {
            self.shared.live_tasks.on_event(task, &event);
        }
        if event.kind == EventKind::Executing {
            self.shared
                .set_executing_node(event.data["display_node"].as_str().map(str::to_string));
        }
        if !self.has_audience(event.kind) {
            return;
        }
        match event.kind {
            EventKind::Preview => {
                let image = event.image.as_deref().map(Vec::as_slice).unwrap_or_default();
                match self.client {
                    Some(client) if hub.supports_preview_metadata(client) => {
                        hub.send(client, preview_frame_with_metadata(&event.data, image));
                    }
                    _ => {
                        let image_type = event.data["image_type"].as_str().unwrap_or_default();
                        *self.held_preview.borrow_mut() = Some(preview_frame(image_type, image));
                    }
                }
            }
            EventKind::ProgressText => {
                let node_id = event.data["node_id"].as_str().unwrap_or_default();
                let text = event.data["text"].as_str().unwrap_or_default();
                hub.broadcast(progress_text_frame(node_id, text));
            }
            EventKind::Progress | EventKind::ProgressState | EventKind::ExecutionInterrupted => {
                hub.send_or_broadcast(self.client, message(event.kind.name(), &event.data));
                if event.kind == EventKind::Progress {
                    if let Some(preview) = self.held_preview.borrow_mut().take() {
                        hub.send_or_broadcast(self.client, preview);
                    }
                }
            }
            kind => {
                if let Some(client) = self.client {
                    hub.send(client, message(kind.name(), &event.data));
                }
            }
        }
    }
}
