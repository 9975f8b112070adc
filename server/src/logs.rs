//! The log the frontend's log panel shows: the last 300 lines, kept by a `tracing` layer, read by
//! `/internal/logs[/raw]` and streamed as `logs` messages to subscribed WebSocket clients.

use crate::hub::{message, Hub};
use serde_json::{json, Value as Json};
use std::collections::{HashSet, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, LazyLock, Mutex, Weak};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// How many lines are kept (ComfyUI keeps the last 300 writes).
const KEPT: usize = 300;

/// The terminal size the frontend is told (Easel has no terminal of its own to measure).
const SIZE: (u32, u32) = (80, 24);

#[derive(Default)]
struct Log {
    entries: VecDeque<(String, String)>,
    subscribers: HashSet<String>,
    hub: Weak<Hub>,
}

static LOG: LazyLock<Mutex<Log>> = LazyLock::new(|| Mutex::new(Log::default()));

fn log() -> std::sync::MutexGuard<'static, Log> {
    LOG.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn entry_json(time: &str, text: &str) -> Json {
    json!({"t": time, "m": text})
}

fn size() -> Json {
    json!({"cols": SIZE.0, "rows": SIZE.1})
}

/// Where `logs` messages go.
pub fn attach(hub: &Arc<Hub>) {
    log().hub = Arc::downgrade(hub);
}

/// `PATCH /internal/logs/subscribe`.
pub fn subscribe(sid: &str, enabled: bool) {
    let mut log = log();
    if enabled {
        log.subscribers.insert(sid.to_string());
    } else {
        log.subscribers.remove(sid);
    }
}

/// `GET /internal/logs`: every entry as `"<time> - <text>"`, concatenated.
pub fn text() -> String {
    log()
        .entries
        .iter()
        .map(|(time, text)| format!("{time} - {text}"))
        .collect()
}

/// `GET /internal/logs/raw`.
pub fn raw() -> Json {
    let entries: Vec<Json> = log().entries.iter().map(|(t, m)| entry_json(t, m)).collect();
    json!({"entries": entries, "size": size()})
}

fn record(text: String) {
    let time = chrono::Local::now().format("%Y-%m-%dT%H:%M:%S%.6f").to_string();
    let mut log = log();
    if log.entries.len() == KEPT {
        log.entries.pop_front();
    }
    if let Some(hub) = log.hub.upgrade().filter(|_| !log.subscribers.is_empty()) {
        let frame = message("logs", &json!({"entries": [entry_json(&time, &text)], "size": size()}));
        for sid in &log.subscribers {
            hub.send(sid, frame.clone());
        }
    }
    log.entries.push_back((time, text));
}

/// A `tracing` layer that keeps log lines for the frontend.
pub struct LogLayer;

/// Collects an event's message and fields into one line.
struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

impl<S: Subscriber> Layer<S> for LogLayer {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut line = Line(String::new());
        event.record(&mut line);
        line.0.push('\n');
        record(line.0);
    }
}
