//! How a task is answered: waited for, its images read back (converted to the asked format,
//! inline as base64 or as URLs), its first image as bytes, or its progress as a server-sent-event
//! stream.

use super::generation::AnswerStyle;
use super::request::{OutputFormat, ReturnStyle};
use super::tasks::{image_entry, status_message, task_json, LiveProgress, TaskUpdate};
use super::{paths, RestError};
use crate::state::AppState;
use crate::store::tasks::{StoredTask, TaskStatus};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use easel_nodes::image::io::{view_preview, PreviewFormat};
use easel_nodes::paths::safe_relative;
use serde_json::{json, Value as Json};

/// The image type an `Accept` header asks for first (`image/png`, `image/jpeg`, `image/webp`),
/// if its first entry is one: browsers' lists that merely include image types do not count.
pub fn accepted_image(headers: &HeaderMap) -> Option<OutputFormat> {
    let accept = headers.get(header::ACCEPT)?.to_str().ok()?;
    let first = accept.split(',').next()?.split(';').next()?.trim();
    OutputFormat::parse(first).filter(|_| first.starts_with("image/"))
}

/// Waits for a task to end (the client going away drops this wait, not the task).
pub async fn wait_for_end(state: &AppState, id: &str) -> Result<StoredTask, RestError> {
    let mut updates = state.live_tasks.subscribe();
    loop {
        let task = state.store.task(id)?.ok_or_else(|| RestError::not_found("task"))?;
        if task.status.is_final() {
            return Ok(task);
        }
        loop {
            match updates.recv().await {
                Ok(TaskUpdate::Ended { id: ended }) if ended == id => break,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    return Err(RestError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "shutting_down",
                        "the server is shutting down",
                    ))
                }
            }
        }
    }
}

/// The bytes of a saved output image (from the task's own record; still checked to lie inside
/// the output folder).
pub fn read_output(state: &AppState, image: &Json) -> Result<Vec<u8>, RestError> {
    let paths = paths(state)?;
    let subfolder = image["subfolder"].as_str().unwrap_or_default();
    let filename = image["filename"].as_str().unwrap_or_default();
    let relative = safe_relative(format!("{subfolder}/{filename}").trim_start_matches('/'))
        .ok_or_else(|| RestError::not_found("image"))?;
    let path = paths.output.join(relative);
    if !easel_nodes::paths::contained_once_created(&paths.output, &path) {
        return Err(RestError::not_found("image"));
    }
    std::fs::read(&path).map_err(|_| RestError::not_found("image").with_status(StatusCode::GONE))
}

/// A saved PNG in the asked format.
pub fn encode_as(png: Vec<u8>, format: OutputFormat) -> Result<Vec<u8>, RestError> {
    let preview = match format {
        OutputFormat::Png => return Ok(png),
        OutputFormat::Jpeg => PreviewFormat::Jpeg,
        OutputFormat::Webp => PreviewFormat::WebP,
    };
    view_preview(&png, preview, 95, false)
        .map(|(bytes, _)| bytes)
        .map_err(|error| {
            RestError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "conversion_failed",
                format!("the saved image could not be converted: {error}"),
            )
        })
}

/// The task's images for a JSON answer: URLs, and base64 unless the request asked for URLs.
pub fn images_of(state: &AppState, task: &StoredTask, style: AnswerStyle) -> Result<Vec<Json>, RestError> {
    task.images
        .iter()
        .map(|image| {
            let mut entry = image_entry(image);
            if style.return_style == ReturnStyle::Base64 {
                let bytes = encode_as(read_output(state, image)?, style.output_format)?;
                entry["base64"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
                entry["content_type"] = json!(style.output_format.mime());
            }
            Ok(entry)
        })
        .collect()
}

/// The first image of a finished task as bytes; a failed or cancelled task answers its error.
pub fn image_bytes(state: &AppState, task: &StoredTask, format: OutputFormat) -> Result<Response, RestError> {
    let ended = RestError::new;
    match task.status {
        TaskStatus::Succeeded => {}
        TaskStatus::Cancelled => {
            return Err(ended(
                StatusCode::CONFLICT,
                "task_cancelled",
                format!("task {} was cancelled", task.id),
            ))
        }
        _ => {
            let message = task
                .error
                .as_ref()
                .and_then(|error| error["message"].as_str())
                .unwrap_or("failed");
            return Err(ended(
                StatusCode::INTERNAL_SERVER_ERROR,
                "task_failed",
                format!("task {} failed: {message}", task.id),
            ));
        }
    }
    let first = task.images.first().ok_or_else(|| {
        ended(
            StatusCode::INTERNAL_SERVER_ERROR,
            "task_failed",
            format!("task {} saved no image", task.id),
        )
    })?;
    let bytes = encode_as(read_output(state, first)?, format)?;
    Ok((
        [
            (header::CONTENT_TYPE, format.mime().to_string()),
            (header::HeaderName::from_static("x-task-id"), task.id.clone()),
        ],
        bytes,
    )
        .into_response())
}

/// `text/event-stream` of a task: its progress as it runs (percent of the whole task, node,
/// step, message, preview), then one last event with the finished task and its images.
/// Whose event shape a stream uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamShape {
    /// `/v1/generate`: `{"task_id", "status", "percent", "node", "step", "steps", "message",
    /// "preview", "images"}`, the last with the task.
    Easel,
    /// FooocusAPI's `{"progress", "preview", "message", "images"}`, ending with "Finished" and the
    /// image URLs.
    Fooocus,
}

pub fn stream(
    state: AppState,
    id: String,
    style: AnswerStyle,
    shape: StreamShape,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let updates = state.live_tasks.subscribe();
    let first = state.live_tasks.progress(&id);
    let start = StreamState {
        state,
        id,
        updates,
        first: Some(first),
        last_percent: 0.0,
        done: false,
        style,
        shape,
    };
    let events = futures_util::stream::unfold(start, |mut stream| async move {
        let event = stream.next_event().await?;
        Some((Ok(event), stream))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

struct StreamState {
    state: AppState,
    id: String,
    updates: tokio::sync::broadcast::Receiver<TaskUpdate>,
    /// The progress to send first (`Some(None)`: the task has not started).
    first: Option<Option<LiveProgress>>,
    last_percent: f64,
    done: bool,
    style: AnswerStyle,
    shape: StreamShape,
}

impl StreamState {
    async fn next_event(&mut self) -> Option<SseEvent> {
        if self.done {
            return None;
        }
        if let Some(first) = self.first.take() {
            let (progress, status) = match first {
                Some(progress) => (progress, "running"),
                None => {
                    let waiting = LiveProgress {
                        message: status_message(TaskStatus::Pending).into(),
                        ..Default::default()
                    };
                    (waiting, "pending")
                }
            };
            return Some(self.progress_event(&progress, status));
        }
        loop {
            let task = match self.state.store.task(&self.id) {
                Ok(Some(task)) => task,
                _ => return self.finish_with_error(),
            };
            if task.status.is_final() {
                return Some(self.final_event(&task));
            }
            match self.updates.recv().await {
                Ok(TaskUpdate::Progress { id, progress }) if id == self.id => {
                    return Some(self.progress_event(&progress, "running"));
                }
                Ok(TaskUpdate::Ended { .. }) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Ok(TaskUpdate::Progress { .. }) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return self.finish_with_error(),
            }
        }
    }

    fn progress_event(&mut self, progress: &LiveProgress, status: &str) -> SseEvent {
        self.last_percent = self.last_percent.max(progress.percent);
        if self.shape == StreamShape::Fooocus {
            let body = json!({
                "progress": self.last_percent.floor() as u32,
                "preview": progress.preview,
                "message": progress.message,
                "images": [],
            });
            return SseEvent::default().data(body.to_string());
        }
        let mut body = serde_json::to_value(progress).unwrap_or_default();
        body["percent"] = json!((self.last_percent * 10.0).round() / 10.0);
        body["task_id"] = json!(self.id);
        body["status"] = json!(status);
        body["preview"] = json!(progress.preview);
        body["images"] = json!([]);
        SseEvent::default().data(body.to_string())
    }

    fn final_event(&mut self, task: &StoredTask) -> SseEvent {
        self.done = true;
        if self.shape == StreamShape::Fooocus {
            let (progress, message) = match task.status {
                TaskStatus::Succeeded => (100, "Finished".to_string()),
                status => {
                    let reason = task.error.as_ref().and_then(|error| error["message"].as_str());
                    let percent = self.last_percent.floor() as u32;
                    (
                        percent,
                        format!("{}: {}", status_message(status), reason.unwrap_or(status.name())),
                    )
                }
            };
            let urls: Vec<String> = task.images.iter().map(super::compat::fooocus::output_url).collect();
            let body = json!({"progress": progress, "preview": null, "message": message, "images": urls});
            return SseEvent::default().data(body.to_string());
        }
        let images =
            images_of(&self.state, task, self.style).unwrap_or_else(|_| task.images.iter().map(image_entry).collect());
        let task_body = task_json(task, None, images.clone());
        let percent = if task.status == TaskStatus::Succeeded {
            100.0
        } else {
            self.last_percent
        };
        let body = json!({
            "task_id": task.id,
            "status": task.status.name(),
            "percent": (percent * 10.0).round() / 10.0,
            "message": task_body.progress.message,
            "preview": null,
            "images": images,
            "error": task.error,
            "task": task_body,
        });
        SseEvent::default().data(body.to_string())
    }

    fn finish_with_error(&mut self) -> Option<SseEvent> {
        self.done = true;
        let body = json!({"task_id": self.id, "status": "failed", "error": {"message": "the task could not be read"}});
        Some(SseEvent::default().data(body.to_string()))
    }
}
