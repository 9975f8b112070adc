//! The `/v1` handlers: generate (answered as a stream, a task at once, image bytes, or the
//! finished task), tasks (get, list, cancel, delete), models, styles, presets and status.

use super::catalog::{default_model, presets, styles};
use super::recipes::{build, workflow_for, BuiltPrompt, Ingredients, WORKFLOW_VERSION};
use super::request::{parse, GenerateRequest, Mode, OutputFormat, RawRequest, ReturnStyle};
use super::tasks::{image_entry, status_message, task_json, view_url, TaskUpdate};
use super::{now_ms, parse_time, RestError};
use crate::queue::QueueItem;
use crate::state::AppState;
use crate::store::tasks::{StoredTask, TaskFilter, TaskStatus};
use axum::extract::{FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;
use easel_engine::{validate_prompt, Prompt, ValidationFailure};
use easel_nodes::image::io::{view_preview, PreviewFormat};
use easel_nodes::paths::{safe_relative, write_replacing, Paths};
use serde_json::{json, Map, Value as Json};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::PathBuf;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/generate", post(generate))
        .route("/v1/tasks", get(list_tasks).delete(delete_tasks))
        .route("/v1/tasks/{id}", get(get_task).delete(delete_task))
        .route("/v1/tasks/{id}/cancel", post(cancel_task))
        .route("/v1/models", get(models))
        .route("/v1/styles", get(list_styles))
        .route("/v1/presets", get(list_presets))
        .route("/v1/status", get(status))
}

fn paths(state: &AppState) -> Result<&Paths, RestError> {
    state
        .runtime
        .services
        .get::<Paths>()
        .ok_or_else(|| RestError::invalid(None, "this server has no model and file folders"))
}

/// How `/v1/generate` answers, in the order the request asks for it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Answer {
    Stream,
    Async,
    Bytes(OutputFormat),
    Finished,
}

/// The first image type an `Accept` header names before any JSON or event-stream type.
fn accepted_image(headers: &HeaderMap) -> Option<OutputFormat> {
    let accept = headers.get(header::ACCEPT)?.to_str().ok()?;
    for media in accept.split(',') {
        let media = media.split(';').next().unwrap_or_default().trim();
        if let Some(format) = media.strip_prefix("image/").and(OutputFormat::parse(media)) {
            return Some(format);
        }
        if matches!(media, "application/json" | "text/event-stream" | "*/*") {
            return None;
        }
    }
    None
}

async fn generate(State(state): State<AppState>, request: Request) -> Result<Response, RestError> {
    let accept_image = accepted_image(request.headers());
    let raw = read_request(request, &state).await?;
    let accepting = state.clone();
    let (task, answer_style) = tokio::task::spawn_blocking(move || accept_generation(&accepting, raw))
        .await
        .map_err(|_| RestError::invalid(None, "the request could not be handled"))??;
    let answer = if answer_style.stream {
        Answer::Stream
    } else if answer_style.run_async {
        Answer::Async
    } else if let Some(format) = accept_image {
        Answer::Bytes(format)
    } else {
        Answer::Finished
    };
    match answer {
        Answer::Stream => Ok(stream(state, task.id, answer_style).into_response()),
        Answer::Async => {
            let body = task_json(&task, None, Vec::new());
            let location = format!("/v1/tasks/{}", task.id);
            Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], axum::Json(body)).into_response())
        }
        Answer::Bytes(format) => {
            let task = wait_for_end(&state, &task.id).await?;
            image_bytes(&state, &task, format)
        }
        Answer::Finished => {
            let task = wait_for_end(&state, &task.id).await?;
            let images = images_of(&state, &task, answer_style)?;
            Ok(axum::Json(task_json(&task, None, images)).into_response())
        }
    }
}

/// How a request wants its images back.
#[derive(Debug, Clone, Copy)]
struct AnswerStyle {
    stream: bool,
    run_async: bool,
    return_style: ReturnStyle,
    output_format: OutputFormat,
}

/// The raw fields of a JSON body or a multipart form.
async fn read_request(request: Request, state: &AppState) -> Result<RawRequest, RestError> {
    let multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("multipart/form-data"));
    let too_large =
        |error: &dyn std::fmt::Display| RestError::invalid(None, format!("the request could not be read: {error}"));
    if !multipart {
        let body = axum::body::Bytes::from_request(request, state)
            .await
            .map_err(|error| too_large(&error))?;
        return RawRequest::from_json(&body);
    }
    let mut form = Multipart::from_request(request, state)
        .await
        .map_err(|error| too_large(&error))?;
    let mut raw = RawRequest::default();
    while let Some(field) = form.next_field().await.map_err(|error| too_large(&error))? {
        let name = field.name().unwrap_or_default().to_string();
        if field.file_name().is_some() {
            let bytes = field.bytes().await.map_err(|error| too_large(&error))?;
            raw.files.push((name, bytes.to_vec()));
        } else {
            let text = field.text().await.map_err(|error| too_large(&error))?;
            raw.add_form_text(name, text);
        }
    }
    Ok(raw)
}

/// Checks a request, builds and validates its prompt, stores its images and queues it as a task.
fn accept_generation(state: &AppState, mut raw: RawRequest) -> Result<(StoredTask, AnswerStyle), RestError> {
    let paths = paths(state)?;
    if let Some(name) = raw.fields.get("preset").filter(|value| !value.is_null()) {
        let name = name.as_str().unwrap_or_default().to_string();
        let presets = presets(paths);
        let preset = presets
            .get(&name)
            .ok_or_else(|| RestError::field("preset", format!("no preset named `{name}` (see /v1/presets)")))?;
        raw.apply_preset(&preset.fields);
    }
    let request = parse(&raw, state.settings.max_upload_size)?;
    if let Some(limit) = state.settings.max_queue {
        let depth = state.queue.remaining();
        if depth >= limit {
            return Err(RestError {
                retry_after: Some(5),
                ..RestError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "queue_full",
                    format!("the queue is full ({depth} of {limit} prompts): try again shortly"),
                )
            });
        }
    }
    let webhooks = &state.settings.webhooks;
    let webhook_url = request.webhook_url.clone().or_else(|| webhooks.default_url.clone());
    if let Some(url) = &request.webhook_url {
        crate::webhooks::check_url(url, webhooks.allow_private)
            .map_err(|error| RestError::field("webhook_url", error))?;
    }
    let workflow_name = workflow_for(&request)?;
    let checkpoint = resolve_checkpoint(state, paths, &request)?;
    let all_styles = styles(paths);
    let chosen_styles = request
        .styles
        .iter()
        .map(|name| {
            all_styles
                .get(name)
                .cloned()
                .ok_or_else(|| RestError::field("styles", format!("no style named `{name}` (see /v1/styles)")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let workflow = crate::api::bundled_workflow(&format!("rest/{WORKFLOW_VERSION}/{workflow_name}.json"))
        .ok_or_else(|| RestError::invalid(None, format!("the bundled workflow {workflow_name} is missing")))?;
    let seed = request.seed.unwrap_or_else(random_seed);
    let id = uuid::Uuid::new_v4().to_string();
    let stored_images = StoredInputs::write(paths, &request)?;
    // A folder per day, as FooocusAPI keeps its outputs.
    let output_prefix = format!(
        "rest/{}/{}_{}",
        chrono::Utc::now().format("%Y-%m-%d"),
        request.family.name(),
        request.mode.name()
    );
    let ingredients = Ingredients {
        checkpoint: checkpoint.as_deref(),
        seed,
        image: stored_images.image.as_deref(),
        mask: stored_images.mask.as_deref(),
        styles: &chosen_styles,
        output_prefix: &output_prefix,
    };
    let queued = build(&request, workflow, &ingredients).and_then(|built| {
        let validated = validate(state, &built)?;
        let spec = json!({
            "request": sanitized_request(&raw, &request, checkpoint.as_deref(), &stored_images, seed),
            "seed": seed,
            "workflow": format!("{WORKFLOW_VERSION}/{workflow_name}"),
        });
        let task = StoredTask {
            id: id.clone(),
            status: TaskStatus::Pending,
            priority: request.priority,
            spec,
            queued_at: now_ms(),
            started_at: None,
            finished_at: None,
            images: Vec::new(),
            error: None,
            webhook_url: webhook_url.clone(),
        };
        let number = state.queue.next_number(false);
        let client_id = raw.fields.get("client_id").and_then(Json::as_str);
        let extra_data = match client_id {
            Some(client) => json!({"client_id": client}),
            None => json!({}),
        };
        let item = QueueItem {
            number: number as f64,
            number_json: json!(number),
            priority: request.priority,
            prompt_id: id.clone(),
            validated,
            extra_data,
        };
        let stored = item.to_stored();
        state
            .store
            .insert_task(&task, |transaction| crate::store::enqueue_with(transaction, &stored))?;
        Ok((task, item))
    });
    let (task, item) = match queued {
        Ok(queued) => queued,
        Err(error) => {
            stored_images.remove_new();
            return Err(error);
        }
    };
    state.queue.put(item, |remaining| state.broadcast_status(remaining));
    let style = AnswerStyle {
        stream: request.stream,
        run_async: request.run_async,
        return_style: request.return_style,
        output_format: request.output_format,
    };
    Ok((task, style))
}

/// A seed that JavaScript clients can hold exactly (below 2⁵³).
fn random_seed() -> u64 {
    let bytes = *uuid::Uuid::new_v4().as_bytes();
    u64::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], 0]) & ((1 << 53) - 1)
}

/// The checkpoint to load: the request's `model`, checked against its family and mode, or the
/// family's default; `None` when the request names split files.
fn resolve_checkpoint(state: &AppState, paths: &Paths, request: &GenerateRequest) -> Result<Option<String>, RestError> {
    if request.unet.is_some() {
        return Ok(None);
    }
    let models = state.model_catalog.models(paths);
    let family = request.family;
    if let Some(name) = &request.model {
        if let Some(entry) = models.iter().find(|entry| &entry.name == name) {
            if entry.folder != "checkpoints" {
                return Err(RestError::field(
                    "model",
                    format!("`{name}` holds only a diffusion model: name it as `unet`, with `clip` and `vae`"),
                ));
            }
            if entry.family != family {
                return Err(RestError::field(
                    "model",
                    format!("`{name}` is a {} model, not {}", entry.family.name(), family.name()),
                ));
            }
            if !entry.modes().contains(&request.mode) {
                return Err(RestError::field(
                    "model",
                    format!(
                        "`{name}` ({} {}) cannot do {}",
                        family.name(),
                        entry.variant,
                        request.mode.name()
                    ),
                ));
            }
        }
        return Ok(Some(name.clone()));
    }
    let checkpoints: Vec<_> = models
        .into_iter()
        .filter(|entry| entry.folder == "checkpoints")
        .collect();
    let configured = state.settings.default_models.get(family.name()).map(String::as_str);
    default_model(&checkpoints, family, request.mode, configured)
        .map(|entry| Some(entry.name.clone()))
        .ok_or_else(|| {
            let kind =
                if family == super::request::Family::Flux && matches!(request.mode, Mode::Inpaint | Mode::Outpaint) {
                    "FLUX fill"
                } else {
                    family.name()
                };
            RestError::field(
                "model",
                format!(
                    "no {kind} checkpoint in models/checkpoints for {}: put one there or name one with `model`",
                    request.mode.name()
                ),
            )
        })
}

/// The prompt validated as `POST /prompt` validates it; a refusal names the field behind the
/// first failing input.
fn validate(state: &AppState, built: &BuiltPrompt) -> Result<easel_engine::ValidatedPrompt, RestError> {
    let runtime = &state.runtime;
    let prompt = Prompt::from_json(built.prompt.clone())
        .map_err(|error| RestError::invalid(None, format!("the built workflow is not a prompt: {error}")))?;
    let validated = validate_prompt(&runtime.registry, &runtime.services, prompt, None)
        .map_err(|failure| validation_error(&failure, built))?;
    if !validated.node_errors.is_empty() {
        return Err(validation_error(
            &ValidationFailure {
                error: json!({"message": "Prompt outputs failed validation", "details": ""}),
                node_errors: validated.node_errors.clone(),
            },
            built,
        ));
    }
    Ok(validated)
}

fn validation_error(failure: &ValidationFailure, built: &BuiltPrompt) -> RestError {
    let node_errors = serde_json::to_value(&failure.node_errors).unwrap_or_default();
    let entries = node_errors.as_object().into_iter().flatten();
    let errors = entries.flat_map(|(node, entry)| {
        entry["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(move |error| (node.clone(), error.clone()))
    });
    let mut first = None;
    for (node, error) in errors {
        let input = error["extra_info"]["input_name"].as_str().unwrap_or_default();
        let Some(field) = built.field_of(&node, input) else {
            first.get_or_insert((node, error));
            continue;
        };
        let received = &error["extra_info"]["received_value"];
        let is_file = ["model", "unet", "clip", "vae", "refiner", "loras"].contains(&field);
        if error["type"] == "value_not_in_list" && is_file {
            return RestError::field(field, format!("no model file named {received} for `{field}`"))
                .with_code("unknown_model");
        }
        let message = [error["message"].as_str(), error["details"].as_str()]
            .into_iter()
            .flatten()
            .filter(|part| !part.is_empty())
            .collect::<Vec<_>>()
            .join(": ");
        return RestError::field(field, message);
    }
    let message = match first {
        Some((node, error)) => format!(
            "node {node} of the built workflow: {} {}",
            error["message"].as_str().unwrap_or_default(),
            error["details"].as_str().unwrap_or_default()
        ),
        None => format!(
            "{} {}",
            failure.error["message"].as_str().unwrap_or_default(),
            failure.error["details"].as_str().unwrap_or_default()
        ),
    };
    RestError::invalid(None, message.trim().to_string()).with_code("invalid_workflow")
}

/// The request's input images, stored by content hash in `input/rest/`.
struct StoredInputs {
    /// LoadImage's names for them (`rest/<sha256>.<ext>`).
    image: Option<String>,
    mask: Option<String>,
    /// Files this request created (removed again if it is refused).
    created: Vec<PathBuf>,
}

impl StoredInputs {
    fn write(paths: &Paths, request: &GenerateRequest) -> Result<StoredInputs, RestError> {
        let mut stored = StoredInputs {
            image: None,
            mask: None,
            created: Vec::new(),
        };
        let folder = paths.input.join("rest");
        for (field, upload) in [("image", &request.image), ("mask", &request.mask)] {
            let Some(upload) = upload else {
                continue;
            };
            let hash = Sha256::digest(&upload.bytes);
            let hex: String = hash.iter().map(|byte| format!("{byte:02x}")).collect();
            let name = format!("{hex}.{}", upload.extension);
            let path = folder.join(&name);
            if !path.is_file() {
                let written = std::fs::create_dir_all(&folder).and_then(|()| write_replacing(&path, &upload.bytes));
                if let Err(error) = written {
                    stored.remove_new();
                    return Err(
                        RestError::field(field, format!("the image could not be stored: {error}"))
                            .with_status(StatusCode::SERVICE_UNAVAILABLE)
                            .with_code("storage_error"),
                    );
                }
                stored.created.push(path);
            }
            let slot = if field == "image" {
                &mut stored.image
            } else {
                &mut stored.mask
            };
            *slot = Some(format!("rest/{name}"));
        }
        Ok(stored)
    }

    fn remove_new(&self) {
        for path in &self.created {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The request as the task shows it: images as the URLs of their stored copies, the family,
/// mode, model and seed it ran with.
fn sanitized_request(
    raw: &RawRequest,
    request: &GenerateRequest,
    checkpoint: Option<&str>,
    images: &StoredInputs,
    seed: u64,
) -> Json {
    let mut fields: Map<String, Json> = raw.fields.clone();
    for (field, name) in [("image", &images.image), ("mask", &images.mask)] {
        if let Some(name) = name {
            let (subfolder, filename) = name.split_once('/').unwrap_or(("", name));
            fields.insert(field.into(), json!(view_url(filename, subfolder, "input")));
        }
    }
    fields.insert("family".into(), json!(request.family.name()));
    fields.insert("mode".into(), json!(request.mode.name()));
    if let Some(checkpoint) = checkpoint {
        fields.insert("model".into(), json!(checkpoint));
    }
    fields.insert("seed".into(), json!(seed));
    Json::Object(fields)
}

/// Waits for a task to end (the client going away drops this wait, not the task).
async fn wait_for_end(state: &AppState, id: &str) -> Result<StoredTask, RestError> {
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
                    return Err(RestError::invalid(None, "the server is shutting down"))
                }
            }
        }
    }
}

/// The bytes of a saved output image (from the task's own record; still checked to lie inside
/// the output folder).
fn read_output(state: &AppState, image: &Json) -> Result<Vec<u8>, RestError> {
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
fn encode_as(png: Vec<u8>, format: OutputFormat) -> Result<Vec<u8>, RestError> {
    let preview = match format {
        OutputFormat::Png => return Ok(png),
        OutputFormat::Jpeg => PreviewFormat::Jpeg,
        OutputFormat::Webp => PreviewFormat::WebP,
    };
    view_preview(&png, preview, 95, false)
        .map(|(bytes, _)| bytes)
        .map_err(|error| RestError::invalid(None, format!("the image could not be converted: {error}")))
}

/// The task's images for a JSON answer: URLs, and base64 unless the request asked for URLs.
fn images_of(state: &AppState, task: &StoredTask, style: AnswerStyle) -> Result<Vec<Json>, RestError> {
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
fn image_bytes(state: &AppState, task: &StoredTask, format: OutputFormat) -> Result<Response, RestError> {
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
fn stream(
    state: AppState,
    id: String,
    style: AnswerStyle,
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
    first: Option<Option<super::tasks::LiveProgress>>,
    last_percent: f64,
    done: bool,
    style: AnswerStyle,
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
                    let waiting = super::tasks::LiveProgress {
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

    fn progress_event(&mut self, progress: &super::tasks::LiveProgress, status: &str) -> SseEvent {
        self.last_percent = self.last_percent.max(progress.percent);
        let mut body = progress.to_json();
        body["percent"] = json!((self.last_percent * 10.0).round() / 10.0);
        body["task_id"] = json!(self.id);
        body["status"] = json!(status);
        body["preview"] = json!(progress.preview);
        body["images"] = json!([]);
        SseEvent::default().data(body.to_string())
    }

    fn final_event(&mut self, task: &StoredTask) -> SseEvent {
        self.done = true;
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
            "message": task_body["progress"]["message"],
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

async fn get_task(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, RestError> {
    let task = state.store.task(&id)?.ok_or_else(|| RestError::not_found("task"))?;
    let live = state.live_tasks.progress(&id);
    let images = task.images.iter().map(image_entry).collect();
    Ok(axum::Json(task_json(&task, live.as_ref(), images)).into_response())
}

/// `?status=&start_at=&end_at=` of the listing and the ranged delete.
fn task_filter(query: &HashMap<String, String>) -> Result<TaskFilter, RestError> {
    let status = match query.get("status").filter(|status| !status.is_empty()) {
        None => None,
        Some(name) => Some(TaskStatus::parse(name).ok_or_else(|| {
            RestError::field(
                "status",
                format!("`{name}` is not a status: pending, running, succeeded, failed or cancelled"),
            )
        })?),
    };
    let time = |name: &str| {
        query
            .get(name)
            .filter(|text| !text.is_empty())
            .map(|text| parse_time(name, text))
            .transpose()
    };
    Ok(TaskFilter {
        status,
        start_at: time("start_at")?,
        end_at: time("end_at")?,
    })
}

async fn list_tasks(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, RestError> {
    let filter = task_filter(&query)?;
    let limit = match query.get("limit") {
        None => 50,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|limit| (1..=1000).contains(limit))
            .ok_or_else(|| RestError::field("limit", "`limit` is a whole number from 1 to 1000"))?,
    };
    let cursor = match query.get("cursor").filter(|text| !text.is_empty()) {
        None => None,
        Some(text) => Some(
            text.split_once('_')
                .and_then(|(time, id)| Some((time.parse::<i64>().ok()?, id.to_string())))
                .ok_or_else(|| RestError::field("cursor", "`cursor` is the `next_cursor` of a previous page"))?,
        ),
    };
    let page = state.store.tasks(&filter, limit, cursor.as_ref())?;
    let tasks: Vec<Json> = page
        .tasks
        .iter()
        .map(|task| {
            let live = state.live_tasks.progress(&task.id);
            task_json(task, live.as_ref(), task.images.iter().map(image_entry).collect())
        })
        .collect();
    let next_cursor = page.next.map(|(time, id)| format!("{time}_{id}"));
    Ok(axum::Json(json!({"tasks": tasks, "next_cursor": next_cursor})).into_response())
}

async fn cancel_task(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, RestError> {
    let task = state.store.task(&id)?.ok_or_else(|| RestError::not_found("task"))?;
    if task.status.is_final() {
        return Err(RestError::new(
            StatusCode::CONFLICT,
            "task_ended",
            format!("task {id} has already ended ({})", task.status.name()),
        ));
    }
    let was_pending = state
        .queue
        .delete(std::slice::from_ref(&id), |remaining| state.broadcast_status(remaining));
    if was_pending {
        state.store.cancel_pending_task(&id, now_ms())?;
        state.live_tasks.end(&id);
    } else {
        state.interrupt_if_running(&id);
    }
    let task = state.store.task(&id)?.ok_or_else(|| RestError::not_found("task"))?;
    let live = state.live_tasks.progress(&id);
    Ok(axum::Json(task_json(&task, live.as_ref(), Vec::new())).into_response())
}

async fn delete_task(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, RestError> {
    let task = state.store.task(&id)?.ok_or_else(|| RestError::not_found("task"))?;
    if !task.status.is_final() {
        return Err(RestError::new(
            StatusCode::CONFLICT,
            "task_active",
            format!("task {id} is {}: cancel it first", task.status.name()),
        ));
    }
    let deleted = state.store.delete_tasks(&TaskFilter::default(), Some(&id))?;
    let files = remove_outputs(&state, &deleted);
    Ok(axum::Json(json!({"deleted": deleted.len(), "files_deleted": files})).into_response())
}

/// `DELETE /v1/tasks?start_at=&end_at=&status=`: ended tasks in the range, with their files.
async fn delete_tasks(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, RestError> {
    let filter = task_filter(&query)?;
    if filter.start_at.is_none() && filter.end_at.is_none() && filter.status.is_none() {
        return Err(RestError::field(
            "start_at",
            "give `start_at`, `end_at` or `status`: a delete of every task must be asked for explicitly",
        ));
    }
    let deleted = state.store.delete_tasks(&filter, None)?;
    let files = remove_outputs(&state, &deleted);
    Ok(axum::Json(json!({"deleted": deleted.len(), "files_deleted": files})).into_response())
}

/// Removes the saved images of deleted tasks; how many files went.
fn remove_outputs(state: &AppState, tasks: &[StoredTask]) -> usize {
    let Ok(paths) = paths(state) else {
        return 0;
    };
    let mut removed = 0;
    for image in tasks.iter().flat_map(|task| &task.images) {
        let subfolder = image["subfolder"].as_str().unwrap_or_default();
        let filename = image["filename"].as_str().unwrap_or_default();
        let Some(relative) = safe_relative(format!("{subfolder}/{filename}").trim_start_matches('/')) else {
            continue;
        };
        let path = paths.output.join(relative);
        if easel_nodes::paths::contained_once_created(&paths.output, &path) && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

async fn models(State(state): State<AppState>) -> Result<Response, RestError> {
    let paths = paths(&state)?.clone();
    let catalog_state = state.clone();
    let models = tokio::task::spawn_blocking(move || catalog_state.model_catalog.models(&paths))
        .await
        .unwrap_or_default();
    let mut families = Map::new();
    for family in super::request::Family::ALL {
        let listed: Vec<Json> = models
            .iter()
            .filter(|entry| entry.family == family)
            .map(|entry| entry.to_json())
            .collect();
        let checkpoints: Vec<_> = models
            .iter()
            .filter(|entry| entry.folder == "checkpoints")
            .cloned()
            .collect();
        let configured = state.settings.default_models.get(family.name()).map(String::as_str);
        let default = default_model(&checkpoints, family, Mode::Text2Img, configured).map(|entry| entry.name.clone());
        families.insert(
            family.name().to_string(),
            json!({"default": default, "modes": family_modes(family), "models": listed}),
        );
    }
    Ok(axum::Json(json!({"families": families})).into_response())
}

/// Each mode of a family: whether Easel runs it, and if not, what it waits for.
fn family_modes(family: super::request::Family) -> Json {
    let modes: Map<String, Json> = Mode::ALL
        .iter()
        .map(|&mode| {
            let probe = GenerateRequest::probe(family, mode);
            let available = match workflow_for(&probe) {
                Ok(_) => json!({"available": true}),
                Err(error) => json!({"available": false, "reason": error.message}),
            };
            (mode.name().to_string(), available)
        })
        .collect();
    Json::Object(modes)
}

async fn list_styles(State(state): State<AppState>) -> Result<Response, RestError> {
    let styles: Vec<_> = styles(paths(&state)?).into_values().collect();
    Ok(axum::Json(json!({"styles": styles})).into_response())
}

async fn list_presets(State(state): State<AppState>) -> Result<Response, RestError> {
    let presets: Vec<_> = presets(paths(&state)?).into_values().collect();
    Ok(axum::Json(json!({"presets": presets})).into_response())
}

async fn status(State(state): State<AppState>) -> Result<Response, RestError> {
    let by_priority: Vec<Json> = state
        .store
        .pending_by_priority()?
        .into_iter()
        .map(|(priority, pending)| json!({"priority": priority, "pending": pending}))
        .collect();
    let running = state.queue.running().map(|item| item.prompt_id.clone());
    let (_, pending) = state.queue.snapshot();
    Ok(axum::Json(json!({
        "status": "running",
        "queue": {"pending": pending.len(), "running": running.is_some(), "by_priority": by_priority},
        "running_task": running,
        "workers": [{"id": 0, "device": "cpu", "busy": running.is_some()}],
        "uptime_seconds": state.started.elapsed().as_secs(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response())
}
