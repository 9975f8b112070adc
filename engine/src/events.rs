//! Execution events, independent of any transport. Each is one of ComfyUI's WebSocket message types
//! with its `data` object built in ComfyUI's key order; the server decides who receives it.

use serde_json::Value as Json;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// ComfyUI's message types emitted while executing a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    ExecutionStart,
    ExecutionCached,
    Executing,
    Progress,
    ProgressState,
    Executed,
    ExecutionSuccess,
    ExecutionError,
    ExecutionInterrupted,
    /// An image shown while a node runs. Not a JSON message: the server sends the event's `image` as
    /// a binary frame, with `data` (ComfyUI's preview metadata) when the client asked for it.
    Preview,
    /// Text a node shows on itself (ComfyUI's `send_progress_text`), `data` being `{"node_id", "text"}`.
    /// Not a JSON message: the server broadcasts it as a binary frame.
    ProgressText,
}

impl EventKind {
    /// The message `type`.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::ExecutionStart => "execution_start",
            EventKind::ExecutionCached => "execution_cached",
            EventKind::Executing => "executing",
            EventKind::Progress => "progress",
            EventKind::ProgressState => "progress_state",
            EventKind::Executed => "executed",
            EventKind::ExecutionSuccess => "execution_success",
            EventKind::ExecutionError => "execution_error",
            EventKind::ExecutionInterrupted => "execution_interrupted",
            EventKind::Preview => "preview",
            EventKind::ProgressText => "progress_text",
        }
    }
}

/// One event: a kind, its `data`, and for previews the encoded image.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    pub data: Json,
    pub image: Option<Arc<Vec<u8>>>,
}

impl Event {
    pub fn new(kind: EventKind, data: Json) -> Self {
        Event {
            kind,
            data,
            image: None,
        }
    }
}

/// Receives events as they happen.
pub trait EventSink {
    fn emit(&self, event: Event);

    /// Whether events of `kind` are wanted at all. `progress_state` lists every node started so far,
    /// so on huge graphs a sink that ignores it saves the executor quadratic work.
    fn wants(&self, _kind: EventKind) -> bool {
        true
    }
}

impl<F: Fn(Event)> EventSink for F {
    fn emit(&self, event: Event) {
        self(event)
    }
}

/// ComfyUI's `timestamp`: `int(time.time() * 1000)`.
pub fn timestamp_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
