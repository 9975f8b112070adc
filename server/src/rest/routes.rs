//! The `/v1` handlers: generate (answered as a stream, a task at once, image bytes, or the
//! finished task), tasks (get, list, cancel, delete), models, styles, presets and status.

use super::answers::{accepted_image, image_bytes, images_of, stream, wait_for_end, StreamShape};
use super::catalog::{default_model, presets, styles};
use super::generation::{read_request, submit};
use super::recipes::workflow_for;
use super::request::{Family, GenerateRequest, Mode, OutputFormat};
use super::tasks::{image_entry, task_json};
use super::{paths, query_time, JsonAnswer, RestError};
use crate::state::AppState;
use crate::store::tasks::{StoredTask, TaskFilter, TaskStatus};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use easel_nodes::paths::safe_relative;
use serde_json::{json, Map, Value as Json};
use std::collections::HashMap;

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
        .merge(super::downloads::routes())
        .merge(super::openapi::routes())
}

/// How `/v1/generate` answers, in the order the request asks for it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Answer {
    Stream,
    Async,
    Bytes(OutputFormat),
    Finished,
}

#[utoipa::path(post, path = "/v1/generate", tag = "generation", operation_id = "generate",
    request_body(description = "JSON, or a multipart form with `image` and `mask` as files", content(
        (crate::rest::schemas::GenerateRequestBody = "application/json"),
        (crate::rest::schemas::GenerateRequestBody = "multipart/form-data"))),
    responses(
        (status = 200, description = "The finished task (default); its progress as events (`stream`); or the first image (`Accept: image/png|jpeg|webp`, the task id in `X-Task-Id`)", content(
            (crate::rest::schemas::Task = "application/json"),
            (crate::rest::schemas::StreamEvent = "text/event-stream"),
            ("image/png"), ("image/jpeg"), ("image/webp"))),
        (status = 202, description = "Queued (`async`)", body = crate::rest::schemas::Task),
        (status = 400, description = "A field is wrong; nothing was queued", body = crate::rest::schemas::ErrorBody),
        (status = 429, description = "The queue is full (`Retry-After`)", body = crate::rest::schemas::ErrorBody),
        (status = 501, description = "A family, mode or add-on Easel cannot run yet", body = crate::rest::schemas::ErrorBody)))]
async fn generate(State(state): State<AppState>, request: Request) -> Result<Response, RestError> {
    let accept_image = accepted_image(request.headers());
    let raw = read_request(request, &state).await?;
    let (task, answer_style) = submit(&state, raw).await?;
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
        Answer::Stream => Ok(stream(state, task.id, answer_style, StreamShape::Easel).into_response()),
        Answer::Async => {
            let body = task_json(&task, None, Vec::new());
            let location = format!("/v1/tasks/{}", task.id);
            Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], JsonAnswer(body)).into_response())
        }
        Answer::Bytes(format) => {
            let task = wait_for_end(&state, &task.id).await?;
            image_bytes(&state, &task, format)
        }
        Answer::Finished => {
            let task = wait_for_end(&state, &task.id).await?;
            let images = images_of(&state, &task, answer_style)?;
            Ok(JsonAnswer(task_json(&task, None, images)).into_response())
        }
    }
}

#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "tasks", operation_id = "get_task",
    params(("id" = String, Path, description = "The task id")),
    responses((status = 200, description = "OK", body = crate::rest::schemas::Task), (status = 404, description = "No such thing", body = crate::rest::schemas::ErrorBody)))]
async fn get_task(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, RestError> {
    let task = state.store.task(&id)?.ok_or_else(|| RestError::not_found("task"))?;
    let live = state.live_tasks.progress(&id);
    let images = task.images.iter().map(image_entry).collect();
    Ok(JsonAnswer(task_json(&task, live.as_ref(), images)).into_response())
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
    Ok(TaskFilter {
        status,
        start_at: query_time(query, "start_at")?,
        end_at: query_time(query, "end_at")?,
        ended: false,
    })
}

#[utoipa::path(get, path = "/v1/tasks", tag = "tasks", operation_id = "list_tasks",
    params(("status" = Option<String>, Query, description = "pending, running, succeeded, failed or cancelled"),
        ("start_at" = Option<String>, Query, description = "Queued at or after (ISO 8601)"),
        ("end_at" = Option<String>, Query, description = "Queued at or before (ISO 8601)"),
        ("limit" = Option<u32>, Query, description = "1 to 1000 (default 50)"),
        ("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page")),
    responses((status = 200, description = "OK", body = crate::rest::schemas::TaskList), (status = 400, description = "A field is wrong; nothing was queued", body = crate::rest::schemas::ErrorBody)))]
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
    let tasks: Vec<_> = page
        .tasks
        .iter()
        .map(|task| {
            let live = state.live_tasks.progress(&task.id);
            task_json(task, live.as_ref(), task.images.iter().map(image_entry).collect())
        })
        .collect();
    let next_cursor = page.next.map(|(time, id)| format!("{time}_{id}"));
    Ok(JsonAnswer(json!({"tasks": tasks, "next_cursor": next_cursor})).into_response())
}

#[utoipa::path(post, path = "/v1/tasks/{id}/cancel", tag = "tasks", operation_id = "cancel_task",
    params(("id" = String, Path, description = "The task id")),
    responses((status = 200, description = "Cancelled, or being interrupted", body = crate::rest::schemas::Task),
        (status = 404, description = "No such thing", body = crate::rest::schemas::ErrorBody),
        (status = 409, description = "The task has ended", body = crate::rest::schemas::ErrorBody)))]
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
        let cancelled = state.store.remove_pending(Some(std::slice::from_ref(&id)))?;
        state.tasks_cancelled(&cancelled);
    } else {
        state.interrupt_if_running(&id);
    }
    let task = state.store.task(&id)?.ok_or_else(|| RestError::not_found("task"))?;
    let live = state.live_tasks.progress(&id);
    Ok(JsonAnswer(task_json(&task, live.as_ref(), Vec::new())).into_response())
}

#[utoipa::path(delete, path = "/v1/tasks/{id}", tag = "tasks", operation_id = "delete_task",
    params(("id" = String, Path, description = "The task id")),
    responses((status = 200, description = "The task, its history entry and its output files are gone", body = crate::rest::schemas::Deleted),
        (status = 404, description = "No such thing", body = crate::rest::schemas::ErrorBody),
        (status = 409, description = "The task is pending or running", body = crate::rest::schemas::ErrorBody)))]
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
    Ok(JsonAnswer(json!({"deleted": deleted.len(), "files_deleted": files})).into_response())
}

/// `DELETE /v1/tasks?start_at=&end_at=&status=`: ended tasks in the range, with their files.
#[utoipa::path(delete, path = "/v1/tasks", tag = "tasks", operation_id = "delete_tasks",
    params(("status" = Option<String>, Query, description = "Only tasks of this status"),
        ("start_at" = Option<String>, Query, description = "Queued at or after (ISO 8601)"),
        ("end_at" = Option<String>, Query, description = "Queued at or before (ISO 8601)")),
    responses((status = 200, description = "Ended tasks in the range, with their files", body = crate::rest::schemas::Deleted), (status = 400, description = "A field is wrong; nothing was queued", body = crate::rest::schemas::ErrorBody)))]
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
    Ok(JsonAnswer(json!({"deleted": deleted.len(), "files_deleted": files})).into_response())
}

/// Removes the saved images of deleted tasks; how many files went.
pub(crate) fn remove_outputs(state: &AppState, tasks: &[StoredTask]) -> usize {
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

#[utoipa::path(get, path = "/v1/models", tag = "catalog", operation_id = "list_models",
    responses((status = 200, description = "OK", body = crate::rest::schemas::ModelsAnswer)))]
async fn models(State(state): State<AppState>) -> Result<Response, RestError> {
    let paths = paths(&state)?.clone();
    let catalog_state = state.clone();
    let models = tokio::task::spawn_blocking(move || catalog_state.model_catalog.models(&paths))
        .await
        .unwrap_or_default();
    let mut families = Map::new();
    for family in Family::ALL {
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
    Ok(JsonAnswer(json!({"families": families})).into_response())
}

/// Each mode of a family: whether Easel runs it, and if not, what it waits for.
fn family_modes(family: Family) -> Json {
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

#[utoipa::path(get, path = "/v1/styles", tag = "catalog", operation_id = "list_styles",
    responses((status = 200, description = "OK", body = crate::rest::schemas::StylesAnswer)))]
async fn list_styles(State(state): State<AppState>) -> Result<Response, RestError> {
    let styles: Vec<_> = styles(paths(&state)?).into_values().collect();
    Ok(JsonAnswer(json!({"styles": styles})).into_response())
}

#[utoipa::path(get, path = "/v1/presets", tag = "catalog", operation_id = "list_presets",
    responses((status = 200, description = "OK", body = crate::rest::schemas::PresetsAnswer)))]
async fn list_presets(State(state): State<AppState>) -> Result<Response, RestError> {
    let presets: Vec<_> = presets(paths(&state)?).into_values().collect();
    Ok(JsonAnswer(json!({"presets": presets})).into_response())
}

#[utoipa::path(get, path = "/v1/status", tag = "operations", operation_id = "status",
    responses((status = 200, description = "OK", body = crate::rest::schemas::StatusAnswer)))]
async fn status(State(state): State<AppState>) -> Result<Response, RestError> {
    let by_priority: Vec<Json> = state
        .store
        .pending_by_priority()?
        .into_iter()
        .map(|(priority, pending)| json!({"priority": priority, "pending": pending}))
        .collect();
    let running = state.queue.running().map(|item| item.prompt_id.clone());
    let pending = state.queue.remaining().saturating_sub(usize::from(running.is_some()));
    Ok(JsonAnswer(json!({
        "status": "running",
        "queue": {"pending": pending, "running": running.is_some(), "by_priority": by_priority},
        "running_task": running,
        "workers": [{"id": 0, "device": "cpu", "busy": running.is_some()}],
        "uptime_seconds": state.started.elapsed().as_secs(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response())
}
