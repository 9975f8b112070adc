//! A task as clients see it, and the live progress of running tasks: the worker reports each
//! event of a task's prompt here ([`LiveTasks::on_event`]); streams and waiting requests listen on
//! [`LiveTasks::subscribe`].

use super::iso_time;
use crate::store::tasks::{StoredTask, TaskStatus};
use base64::Engine;
use easel_engine::events::{Event, EventKind};
use easel_engine::Prompt;
use serde_json::{json, Value as Json};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// How often a running task's preview may change (previews are for people watching).
const PREVIEW_INTERVAL: Duration = Duration::from_millis(250);

/// Where a running task is (a task's `progress`; the preview is shown beside it).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[schema(as = TaskProgress)]
pub struct LiveProgress {
    /// Of the whole task, 0–100; it never goes down.
    pub percent: f64,
    pub node: Option<String>,
    pub node_type: Option<String>,
    pub step: Option<u64>,
    pub steps: Option<u64>,
    pub message: String,
    /// The latest preview, base64 (JPEG unless the sampler sends PNG).
    #[serde(skip)]
    pub preview: Option<String>,
}

impl LiveProgress {
    /// As a task shows it: the percent to a tenth.
    pub fn shown(&self) -> LiveProgress {
        LiveProgress {
            percent: (self.percent * 10.0).round() / 10.0,
            ..self.clone()
        }
    }
}

/// A change streams hear about.
#[derive(Debug, Clone)]
pub enum TaskUpdate {
    Progress {
        id: String,
        progress: LiveProgress,
    },
    /// The task ended and its stored row is final.
    Ended {
        id: String,
    },
}

/// What is tracked of one running task.
struct Tracked {
    progress: LiveProgress,
    /// The prompt's node classes.
    classes: HashMap<String, String>,
    /// The weight of the nodes that will execute (all but the cached ones).
    to_run: f64,
    /// The weight of the nodes that have finished.
    done: f64,
    preview_at: Option<Instant>,
}

/// How much of a task's time a node of this class takes, roughly: samplers most of it.
fn weight(class: &str) -> f64 {
    if class.contains("Sampler") {
        10.0
    } else {
        1.0
    }
}

pub struct LiveTasks {
    running: Mutex<HashMap<String, Tracked>>,
    updates: broadcast::Sender<TaskUpdate>,
}

impl Default for LiveTasks {
    fn default() -> Self {
        LiveTasks {
            running: Mutex::new(HashMap::new()),
            updates: broadcast::channel(1024).0,
        }
    }
}

impl LiveTasks {
    pub fn subscribe(&self) -> broadcast::Receiver<TaskUpdate> {
        self.updates.subscribe()
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tracked>> {
        self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A task's prompt starts.
    pub fn begin(&self, id: &str, prompt: &Prompt) {
        let classes: HashMap<String, String> = prompt
            .node_ids()
            .map(|node| {
                (
                    node.to_string(),
                    prompt.class_type(node).unwrap_or_default().to_string(),
                )
            })
            .collect();
        let progress = LiveProgress {
            message: "Starting".into(),
            ..LiveProgress::default()
        };
        let to_run = classes.values().map(|class| weight(class)).sum();
        self.running().insert(
            id.to_string(),
            Tracked {
                progress: progress.clone(),
                classes,
                to_run,
                done: 0.0,
                preview_at: None,
            },
        );
        self.publish(TaskUpdate::Progress {
            id: id.to_string(),
            progress,
        });
    }

    /// Whether a task's prompt is running (and wants its events).
    pub fn is_tracked(&self, id: &str) -> bool {
        self.running().contains_key(id)
    }

    /// The progress of a running task.
    pub fn progress(&self, id: &str) -> Option<LiveProgress> {
        self.running().get(id).map(|tracked| tracked.progress.clone())
    }

    /// Whether a task's progress follows events of this kind (the executor builds the others,
    /// `progress_state`'s table above all, only for a WebSocket audience).
    pub fn follows(kind: EventKind) -> bool {
        matches!(
            kind,
            EventKind::ExecutionCached | EventKind::Executing | EventKind::Progress | EventKind::Preview
        )
    }

    /// An event of a task's prompt.
    pub fn on_event(&self, id: &str, event: &Event) {
        let progress = {
            let mut running = self.running();
            let Some(tracked) = running.get_mut(id) else {
                return;
            };
            let Some(new_preview) = tracked.apply(event) else {
                return;
            };
            let mut progress = tracked.progress.clone();
            // Streams get a preview once, with the event that brought it.
            if !new_preview {
                progress.preview = None;
            }
            progress
        };
        self.publish(TaskUpdate::Progress {
            id: id.to_string(),
            progress,
        });
    }

    /// The task's prompt ended and its row is settled.
    pub fn end(&self, id: &str) {
        self.running().remove(id);
        self.publish(TaskUpdate::Ended { id: id.to_string() });
    }

    fn publish(&self, update: TaskUpdate) {
        // No receivers is not an error: nobody is watching.
        let _ = self.updates.send(update);
    }
}

impl Tracked {
    /// Folds an event in: `None` when nothing a client sees changed, else whether the event
    /// brought a new preview.
    fn apply(&mut self, event: &Event) -> Option<bool> {
        let data = &event.data;
        match event.kind {
            EventKind::ExecutionCached => {
                let cached: f64 = data["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|node| self.classes.get(node.as_str()?))
                    .map(|class| weight(class))
                    .sum();
                self.to_run -= cached;
                None
            }
            EventKind::Executing => {
                let node = data["node"].as_str()?;
                if let Some(previous) = &self.progress.node_type {
                    self.done += weight(previous);
                }
                let node_type = self.classes.get(node).cloned();
                self.progress.message = format!("Running {}", node_type.as_deref().unwrap_or(node));
                self.progress.node = Some(node.to_string());
                self.progress.node_type = node_type;
                self.progress.step = None;
                self.progress.steps = None;
                self.advance(0.0);
                Some(false)
            }
            EventKind::Progress => {
                let (Some(value), Some(max)) = (data["value"].as_f64(), data["max"].as_f64()) else {
                    return None;
                };
                self.progress.step = Some(value as u64);
                self.progress.steps = Some(max as u64);
                let what = self.progress.node_type.clone().unwrap_or_default();
                self.progress.message = format!("{what} step {}/{}", value as u64, max as u64);
                self.advance(if max > 0.0 { value / max } else { 0.0 });
                Some(false)
            }
            EventKind::Preview => {
                let due = self.preview_at.is_none_or(|at| at.elapsed() >= PREVIEW_INTERVAL);
                let image = event.image.as_deref().filter(|_| due)?;
                self.preview_at = Some(Instant::now());
                self.progress.preview = Some(base64::engine::general_purpose::STANDARD.encode(image));
                Some(true)
            }
            _ => None,
        }
    }

    /// Percent of the task: the finished nodes' weight plus the done part of the current one's;
    /// below 100 until the task ends, and never lower than before.
    fn advance(&mut self, fraction: f64) {
        let current = self.progress.node_type.as_deref().map_or(0.0, weight);
        let done = self.done + current * fraction.clamp(0.0, 1.0);
        let percent = (100.0 * done / self.to_run.max(1.0)).min(99.0);
        self.progress.percent = self.progress.percent.max(percent);
    }
}

/// An image's URL under `/view`.
pub fn view_url(filename: &str, subfolder: &str, kind: &str) -> String {
    let encode = |text: &str| -> String {
        text.bytes()
            .map(|byte| match byte {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (byte as char).to_string(),
                _ => format!("%{byte:02X}"),
            })
            .collect()
    };
    format!(
        "/view?filename={}&subfolder={}&type={}",
        encode(filename),
        encode(subfolder),
        encode(kind)
    )
}

/// A task as clients see it (documented by `schemas::Task`), borrowing from the stored task:
/// answers serialise it straight to their bytes.
#[derive(Debug, serde::Serialize)]
pub struct TaskBody<'a> {
    id: &'a str,
    status: TaskStatus,
    priority: i64,
    family: &'a Json,
    mode: &'a Json,
    seed: &'a Json,
    workflow: &'a Json,
    request: &'a Json,
    queued_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
    pub progress: LiveProgress,
    preview: Option<String>,
    images: Vec<Json>,
    error: Option<&'a Json>,
}

/// A task as `/v1` answers it. `live` is its progress if it is running; `images` are the saved
/// images' entries to show (with `base64` when they are inline).
pub fn task_json<'a>(task: &'a StoredTask, live: Option<&LiveProgress>, images: Vec<Json>) -> TaskBody<'a> {
    let settled = |percent: f64, status: TaskStatus| LiveProgress {
        percent,
        message: status_message(status).into(),
        ..LiveProgress::default()
    };
    let progress = match (task.status, live) {
        (TaskStatus::Succeeded, _) => settled(100.0, TaskStatus::Succeeded),
        (_, Some(live)) => live.shown(),
        (status, None) => settled(0.0, status),
    };
    let request = &task.spec["request"];
    TaskBody {
        id: &task.id,
        status: task.status,
        priority: task.priority,
        family: &request["family"],
        mode: &request["mode"],
        seed: &task.spec["seed"],
        workflow: &task.spec["workflow"],
        request,
        queued_at: iso_time(task.queued_at),
        started_at: task.started_at.map(iso_time),
        finished_at: task.finished_at.map(iso_time),
        progress,
        preview: live.and_then(|live| live.preview.clone()),
        images,
        error: task.error.as_ref(),
    }
}

pub fn status_message(status: TaskStatus) -> &'static str {
    match status {
        TaskStatus::Pending => "Waiting in the queue",
        TaskStatus::Running => "Running",
        TaskStatus::Succeeded => "Finished",
        TaskStatus::Failed => "Failed",
        TaskStatus::Cancelled => "Cancelled",
    }
}

/// A saved image's entry: where it is and its URL.
pub fn image_entry(image: &Json) -> Json {
    let filename = image["filename"].as_str().unwrap_or_default();
    let subfolder = image["subfolder"].as_str().unwrap_or_default();
    json!({
        "url": view_url(filename, subfolder, "output"),
        "filename": filename,
        "subfolder": subfolder,
        "type": "output",
    })
}
