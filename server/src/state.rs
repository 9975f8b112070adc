//! The server's shared state: the runtime, the queue, history, WebSocket clients and the worker.

use crate::history::History;
use crate::hub::{message, Hub, Outgoing};
use crate::queue::PromptQueue;
use crate::setup::Runtime;
use easel_engine::Interrupt;
use serde_json::{json, Value as Json};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

/// Server-wide settings from the command line.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// `--max-upload-size` in bytes (the `features` value keeps ComfyUI's int/float distinction).
    pub max_upload_size: Json,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            max_upload_size: json!(100 * 1024 * 1024),
        }
    }
}

pub struct Shared {
    pub runtime: Runtime,
    pub settings: ServerSettings,
    pub queue: PromptQueue,
    pub history: History,
    pub hub: Hub,
    pub interrupt: Interrupt,
    /// The node the running prompt is executing (for a client that reconnects mid-prompt).
    pub executing: Mutex<Option<String>>,
    /// `POST /free` asked to drop the output cache before the next prompt.
    pub free_memory: AtomicBool,
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
    /// Creates the state and starts the worker thread that executes queued prompts.
    pub fn start(runtime: Runtime, settings: ServerSettings) -> Self {
        let shared = Arc::new(Shared {
            runtime,
            settings,
            queue: PromptQueue::default(),
            history: History::default(),
            hub: Hub::default(),
            interrupt: Interrupt::new(),
            executing: Mutex::new(None),
            free_memory: AtomicBool::new(false),
        });
        let worker = shared.clone();
        std::thread::Builder::new()
            .name("easel-worker".into())
            .spawn(move || crate::worker::run(&worker))
            .expect("the worker thread starts");
        AppState(shared)
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

    /// `/features`, also the WebSocket `feature_flags` reply.
    pub fn features(&self) -> Json {
        json!({"supports_preview_metadata": true, "max_upload_size": self.settings.max_upload_size})
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
