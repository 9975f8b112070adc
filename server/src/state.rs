//! The server's shared state: the runtime, the queue, history, WebSocket clients and the worker.

use crate::hub::{message, Hub, Outgoing};
use crate::metrics::Metrics;
use crate::queue::{PromptQueue, QueueItem};
use crate::rest::catalog::ModelCatalog;
use crate::rest::compat::Compat;
use crate::rest::downloads::DownloadJobs;
use crate::rest::tasks::LiveTasks;
use crate::setup::Runtime;
use crate::store::{Store, StoreError};
use crate::users::Users;
use crate::webhooks::{WebhookSettings, WebhookWake};
use easel_engine::Interrupt;
use easel_nodes::paths::Paths;
use serde_json::{json, Value as Json};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// How many nodes a prompt may have unless `--max-prompt-nodes` says otherwise: several times the
/// largest real workflows, and small enough that validating and answering any prompt stays cheap.
pub const DEFAULT_MAX_PROMPT_NODES: usize = 5000;

/// Server-wide settings from the command line.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// The request body limit in bytes (`--max-upload-size`, in MB on the command line).
    pub max_upload_size: usize,
    /// The limit as `/features` shows it: ComfyUI's default prints an int, a user value a float.
    pub max_upload_size_json: Json,
    /// `--api-key`: with any, every route needs one.
    pub api_keys: Vec<String>,
    /// `--enable-cors-header`: the allowed origin (CORS headers replace the origin check).
    pub cors_origin: Option<String>,
    /// `--enable-compress-response-body`: gzip JSON and text answers for clients that accept it.
    pub compress_responses: bool,
    /// `--front-end-root`: a built frontend to serve.
    pub front_end_root: Option<std::path::PathBuf>,
    /// `--multi-user`: the `comfy-user` header picks whose user data a request reads and writes.
    pub multi_user: bool,
    /// Served over TLS: the `?token=` cookie is `Secure`.
    pub tls: bool,
    /// `--max-prompt-nodes`: larger prompts are refused with a 400.
    pub max_prompt_nodes: usize,
    /// `--default-model FAMILY=FILE`: the checkpoint a REST request of that family gets when it
    /// names none (else the first of the family in `models/checkpoints`).
    pub default_models: std::collections::HashMap<String, String>,
    /// `--max-queue`: REST requests beyond this many queued or running prompts get a 429.
    pub max_queue: Option<usize>,
    /// `--healthz-public`: `/healthz` answers without an API key.
    pub healthz_public: bool,
    /// The `--webhook-*` options.
    pub webhooks: WebhookSettings,
    /// `--compat`: which drop-in REST APIs are served.
    pub compat: Compat,
    /// `--download-allow-private`: model downloads may come from loopback and private addresses.
    pub download_allow_private: bool,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            max_upload_size: 100 * 1024 * 1024,
            max_upload_size_json: json!(100 * 1024 * 1024),
            api_keys: Vec::new(),
            cors_origin: None,
            compress_responses: false,
            front_end_root: None,
            multi_user: false,
            tls: false,
            max_prompt_nodes: DEFAULT_MAX_PROMPT_NODES,
            default_models: std::collections::HashMap::new(),
            max_queue: None,
            healthz_public: false,
            webhooks: WebhookSettings::default(),
            compat: Compat::default(),
            download_allow_private: false,
        }
    }
}

pub struct Shared {
    pub runtime: Runtime,
    pub settings: ServerSettings,
    pub queue: PromptQueue,
    pub store: Store,
    pub hub: Arc<Hub>,
    /// Who may use the user-data routes.
    pub users: Users,
    pub interrupt: Interrupt,
    /// The node the running prompt is executing (for a client that reconnects mid-prompt).
    pub executing: Mutex<Option<String>>,
    /// `POST /free` asked to drop the output cache before the next prompt.
    pub free_memory: AtomicBool,
    /// `POST /free` asked to drop the loaded models before the next prompt.
    pub unload_models: AtomicBool,
    /// The progress of running REST tasks, and the updates streams listen to.
    pub live_tasks: LiveTasks,
    /// The model files REST requests may name, recognised once per file.
    pub model_catalog: ModelCatalog,
    /// When the server started (`/v1/status`' uptime).
    pub started: Instant,
    /// Counters and histograms for `/metrics`.
    pub metrics: Metrics,
    /// Wakes the webhook thread when a task ends.
    pub webhook_wake: WebhookWake,
    /// Model downloads started over HTTP.
    pub downloads: DownloadJobs,
}

#[derive(Clone)]
pub struct AppState(pub Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    /// Creates the state from the store's queue (see [`Store::recover`]) and starts the worker
    /// thread that executes queued prompts.
    pub fn start(runtime: Runtime, settings: ServerSettings, store: Store) -> Result<Self, StoreError> {
        let recovery = store.recover()?;
        let queue = PromptQueue::default();
        if let Some(highest) = recovery.highest_number {
            queue.continue_counter_after(highest);
        }
        for prompt_id in &recovery.abandoned {
            tracing::warn!(%prompt_id, "not re-running a prompt the server stopped on twice");
        }
        let interrupted = recovery.interrupted.map(|stored| (stored, true));
        for (stored, first) in interrupted
            .into_iter()
            .chain(recovery.pending.into_iter().map(|p| (p, false)))
        {
            let prompt_id = stored.prompt_id.clone();
            match QueueItem::from_stored(stored) {
                Ok(mut item) => {
                    if first {
                        // Runs before everything else; `number_json` keeps what clients saw.
                        item.number = f64::NEG_INFINITY;
                        tracing::warn!(%prompt_id, "re-queued the prompt that was running when the server stopped");
                    }
                    queue.put(item, |_| {});
                }
                Err(error) => tracing::error!(%prompt_id, "cannot re-queue a stored prompt: {error}"),
            }
        }
        let user_directory = runtime.services.get::<Paths>().map(|paths| paths.user.as_path());
        let users = Users::load(user_directory, settings.multi_user);
        let hub = Arc::new(Hub::default());
        crate::logs::attach(&hub);
        let shared = Arc::new(Shared {
            runtime,
            settings,
            queue,
            store,
            hub,
            users,
            interrupt: Interrupt::new(),
            executing: Mutex::new(None),
            free_memory: AtomicBool::new(false),
            unload_models: AtomicBool::new(false),
            live_tasks: LiveTasks::default(),
            model_catalog: ModelCatalog::default(),
            started: Instant::now(),
            metrics: Metrics::default(),
            webhook_wake: WebhookWake::default(),
            downloads: DownloadJobs::default(),
        });
        let worker = shared.clone();
        std::thread::Builder::new()
            .name("easel-worker".into())
            .spawn(move || crate::worker::run(&worker))
            .map_err(StoreError::Io)?;
        let deliverer = shared.clone();
        std::thread::Builder::new()
            .name("easel-webhooks".into())
            .spawn(move || crate::webhooks::run(&deliverer))
            .map_err(StoreError::Io)?;
        Ok(AppState(shared))
    }
}

impl Shared {
    /// `{"status": {"exec_info": {"queue_remaining": N}}}` (plus `sid` for a new socket).
    pub fn status(&self, remaining: usize, sid: Option<&str>) -> Outgoing {
        let mut data = json!({"status": {"exec_info": {"queue_remaining": remaining}}});
        if let (Some(sid), Some(object)) = (sid, data.as_object_mut()) {
            object.insert("sid".into(), json!(sid));
        }
        message("status", &data)
    }

    /// Tells every client the queue length (pass as a queue method's `announce`).
    pub fn broadcast_status(&self, remaining: usize) {
        self.hub.broadcast(self.status(remaining, None));
    }

    /// Forgets pending prompts, on disk and in the queue; whether any of them was pending.
    pub fn dequeue(&self, ids: &[String]) -> Result<bool, StoreError> {
        let cancelled = self.store.remove_pending(Some(ids))?;
        self.tasks_cancelled(&cancelled);
        Ok(self.queue.delete(ids, |remaining| self.broadcast_status(remaining)))
    }

    /// Forgets every pending prompt, on disk and in the queue.
    pub fn clear_queue(&self) -> Result<(), StoreError> {
        let cancelled = self.store.remove_pending(None)?;
        self.tasks_cancelled(&cancelled);
        self.queue.clear(|remaining| self.broadcast_status(remaining));
        Ok(())
    }

    /// Tasks taken off the queue before they ran: their watchers hear it, their webhooks go out.
    pub fn tasks_cancelled(&self, ids: &[String]) {
        for id in ids {
            self.live_tasks.end(id);
        }
        if !ids.is_empty() {
            self.webhook_wake.notify();
        }
    }

    /// Interrupts the running prompt if it is this one; whether it was.
    pub fn interrupt_if_running(&self, prompt_id: &str) -> bool {
        let running = self.queue.running().is_some_and(|item| item.prompt_id == prompt_id);
        if running {
            self.interrupt.trigger();
        }
        running
    }

    /// `/features`, also the WebSocket `feature_flags` reply.
    pub fn features(&self) -> Json {
        json!({"supports_preview_metadata": true, "max_upload_size": self.settings.max_upload_size_json})
    }

    pub fn executing_node(&self) -> Option<String> {
        self.executing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn set_executing_node(&self, node: Option<String>) {
        *self.executing.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = node;
    }
}
