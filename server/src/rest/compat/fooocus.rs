//! FooocusAPI's routes: `POST /v1/engine/generate/` (Easel's generation fields plus
//! `async_process`, `stream_output`, `webhook_url`; answered as a stream, a task at once, image
//! bytes by `Accept`, or the finished task), its task object, `GET /tasks` (history, current,
//! pending; `action=delete`), `GET /tasks/{id}`, `POST /v1/engine/control/`,
//! `GET /v1/engines/all-models`, `GET /v1/engines/styles` and `GET /outputs/{date}/{file}`.

use crate::rest::answers::{accepted_image, encode_as, image_bytes, read_output, stream, wait_for_end, StreamShape};
use crate::rest::catalog::styles;
use crate::rest::generation::{read_request, submit};
use crate::rest::request::OutputFormat;
use crate::rest::{paths, query_time, JsonAnswer, RestError};
use crate::state::AppState;
use crate::store::tasks::{StoredTask, TaskFilter, TaskStatus};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use easel_nodes::paths::safe_relative;
use serde_json::{json, Value as Json};
use std::collections::HashMap;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/engine/generate/", post(generate))
        .route("/v1/engine/control/", post(control))
        .route("/v1/engines/all-models", get(all_models))
        .route("/v1/engines/styles", get(list_styles))
        .route("/tasks", get(list_tasks))
        .route("/tasks/{id}", get(one_task))
        .route("/outputs/{date}/{file}", get(output))
}

/// A saved image's URL under `/outputs/{date}/{file}` (the REST API saves into
/// `output/rest/<date>/`); other images keep their `/view` URL.
pub fn output_url(image: &Json) -> String {
    let subfolder = image["subfolder"].as_str().unwrap_or_default();
    let filename = image["filename"].as_str().unwrap_or_default();
    match subfolder.strip_prefix("rest/") {
        Some(date) if !date.contains('/') => format!("/outputs/{date}/{filename}"),
        _ => crate::rest::tasks::view_url(filename, subfolder, "output"),
    }
}

/// A task as FooocusAPI shows it.
fn task_object(state: &AppState, task: &StoredTask) -> Json {
    let live = state.live_tasks.progress(&task.id);
    let status = match task.status {
        TaskStatus::Pending => "pending",
        TaskStatus::Running => "running",
        TaskStatus::Succeeded => "finished",
        TaskStatus::Failed => "failed",
        TaskStatus::Cancelled => "stopped",
    };
    let progress = match task.status {
        TaskStatus::Succeeded => 100,
        _ => live.as_ref().map_or(0, |live| live.percent.floor() as u32),
    };
    json!({
        "task_id": task.id,
        "req_params": task.spec["request"],
        "in_queue_mills": task.queued_at,
        "start_mills": task.started_at,
        "finish_mills": task.finished_at,
        "task_status": status,
        "progress": progress,
        "preview": live.and_then(|live| live.preview),
        "webhook_url": task.webhook_url,
        "result": task.images.iter().map(output_url).collect::<Vec<_>>(),
        "error": task.error,
    })
}

#[utoipa::path(post, path = "/v1/engine/generate/", tag = "FooocusAPI", operation_id = "fooocus_generate",
    request_body = crate::rest::compat::schemas::FooocusGenerate,
    responses((status = 200, description = "The task (`async_process`, or finished), progress events (`stream_output`), or image bytes (`Accept`)", content(
            (crate::rest::compat::schemas::FooocusTask = "application/json"),
            (String = "text/event-stream"), ("image/png"), ("image/jpeg"), ("image/webp"))),
        (status = 400, description = "Bad input: the field is named", body = crate::rest::schemas::ErrorBody)))]
async fn generate(State(state): State<AppState>, request: Request) -> Result<Response, RestError> {
    let accept_image = accepted_image(request.headers());
    let mut raw = read_request(request, &state).await?;
    for (theirs, ours) in [("async_process", "async"), ("stream_output", "stream")] {
        if let Some(value) = raw.fields.remove(theirs) {
            raw.fields.insert(ours.into(), value);
        }
    }
    let (task, style) = submit(&state, raw).await?;
    if style.stream {
        return Ok(stream(state, task.id, style, StreamShape::Fooocus).into_response());
    }
    if style.run_async {
        return Ok(JsonAnswer(task_object(&state, &task)).into_response());
    }
    let task = wait_for_end(&state, &task.id).await?;
    match accept_image {
        Some(format) => image_bytes(&state, &task, format),
        None => Ok(JsonAnswer(task_object(&state, &task)).into_response()),
    }
}

/// `{"action": "stop" | "skip"}`: both stop the running task.
#[utoipa::path(post, path = "/v1/engine/control/", tag = "FooocusAPI", operation_id = "fooocus_control",
    request_body = crate::rest::compat::schemas::FooocusControl,
    responses((status = 200, description = "OK", body = crate::rest::compat::schemas::FooocusControlAnswer), (status = 400, description = "Bad input: the field is named", body = crate::rest::schemas::ErrorBody)))]
async fn control(State(state): State<AppState>, body: axum::body::Bytes) -> Result<Response, RestError> {
    let body: Json = serde_json::from_slice(&body).map_err(|_| RestError::invalid(None, "the body must be JSON"))?;
    let action = body["action"].as_str().unwrap_or_default();
    if !matches!(action, "stop" | "skip") {
        return Err(RestError::field("action", "`action` is stop or skip"));
    }
    let running = state.queue.running().map(|item| item.prompt_id.clone());
    if let Some(id) = &running {
        state.interrupt_if_running(id);
    }
    Ok(JsonAnswer(json!({"message": format!("{action} requested"), "task_id": running})).into_response())
}

#[utoipa::path(get, path = "/v1/engines/all-models", tag = "FooocusAPI", operation_id = "fooocus_all_models",
    responses((status = 200, description = "OK", body = crate::rest::compat::schemas::FooocusModels)))]
async fn all_models(State(state): State<AppState>) -> Result<Response, RestError> {
    let paths = paths(&state)?;
    Ok(JsonAnswer(json!({
        "model_filenames": paths.filename_list("checkpoints"),
        "lora_filenames": paths.filename_list("loras"),
    }))
    .into_response())
}

#[utoipa::path(get, path = "/v1/engines/styles", tag = "FooocusAPI", operation_id = "fooocus_styles",
    responses((status = 200, description = "OK", body = [String])))]
async fn list_styles(State(state): State<AppState>) -> Result<Response, RestError> {
    let names: Vec<String> = styles(paths(&state)?).into_keys().collect();
    Ok(JsonAnswer(names).into_response())
}

#[utoipa::path(get, path = "/tasks/{id}", tag = "FooocusAPI", operation_id = "fooocus_task",
    params(("id" = String, Path, description = "The task id")),
    responses((status = 200, description = "OK", body = crate::rest::compat::schemas::FooocusTask), (status = 404, description = "No such thing", body = crate::rest::schemas::ErrorBody)))]
async fn one_task(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, RestError> {
    let task = state.store.task(&id)?.ok_or_else(|| RestError::not_found("task"))?;
    Ok(JsonAnswer(task_object(&state, &task)).into_response())
}

/// `?query=all|history|current|pending&page=&page_size=&start_at=&end_at=&action=delete`.
#[utoipa::path(get, path = "/tasks", tag = "FooocusAPI", operation_id = "fooocus_tasks",
    params(("query" = Option<String>, Query, description = "all (default), history, current or pending"),
        ("page" = Option<u32>, Query, description = "From 0"),
        ("page_size" = Option<u32>, Query, description = "Default 10"),
        ("start_at" = Option<String>, Query, description = "ISO 8601"),
        ("end_at" = Option<String>, Query, description = "ISO 8601"),
        ("action" = Option<String>, Query, description = "`delete`: delete the matching history and its files")),
    responses((status = 200, description = "OK", body = crate::rest::compat::schemas::FooocusTaskLists), (status = 400, description = "Bad input: the field is named", body = crate::rest::schemas::ErrorBody)))]
async fn list_tasks(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, RestError> {
    let which = query.get("query").map_or("all", String::as_str);
    if !matches!(which, "all" | "history" | "current" | "pending") {
        return Err(RestError::field("query", "`query` is all, history, current or pending"));
    }
    let number = |name: &str, default: usize| -> Result<usize, RestError> {
        match query.get(name).filter(|text| !text.is_empty()) {
            None => Ok(default),
            Some(text) => text
                .parse()
                .map_err(|_| RestError::field(name, format!("`{name}` is a whole number"))),
        }
    };
    let (page, page_size) = (number("page", 0)?, number("page_size", 10)?.clamp(1, 1000));
    let history_filter = TaskFilter {
        status: None,
        start_at: query_time(&query, "start_at")?,
        end_at: query_time(&query, "end_at")?,
        ended: true,
    };
    let delete = query.get("action").is_some_and(|action| action == "delete");
    let mut answer = serde_json::Map::new();
    if matches!(which, "all" | "history") {
        let history: Vec<Json> = if delete {
            let deleted = state.store.delete_tasks(&history_filter, None)?;
            crate::rest::routes::remove_outputs(&state, &deleted);
            deleted.iter().map(|task| task_object(&state, task)).collect()
        } else {
            let page_tasks = state.store.tasks(&history_filter, (page + 1) * page_size, None)?;
            page_tasks
                .tasks
                .iter()
                .skip(page * page_size)
                .map(|task| task_object(&state, task))
                .collect()
        };
        answer.insert("history".into(), Json::Array(history));
    }
    for (name, status) in [("current", TaskStatus::Running), ("pending", TaskStatus::Pending)] {
        if matches!(which, "all") || which == name {
            let filter = TaskFilter {
                status: Some(status),
                ..TaskFilter::default()
            };
            let tasks = state.store.tasks(&filter, 1000, None)?;
            let mut listed: Vec<Json> = tasks.tasks.iter().map(|task| task_object(&state, task)).collect();
            listed.reverse();
            answer.insert(name.into(), Json::Array(listed));
        }
    }
    Ok(JsonAnswer(Json::Object(answer)).into_response())
}

/// A REST output, converted when `Accept` asks for JPEG or WebP.
#[utoipa::path(get, path = "/outputs/{date}/{file}", tag = "FooocusAPI", operation_id = "fooocus_output",
    params(("date" = String, Path, description = "YYYY-MM-DD"), ("file" = String, Path, description = "The file name")),
    responses((status = 200, description = "The image, converted to the first image type `Accept` names", content(("image/png"), ("image/jpeg"), ("image/webp"))),
        (status = 404, description = "No such thing", body = crate::rest::schemas::ErrorBody)))]
async fn output(
    State(state): State<AppState>,
    Path((date, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, RestError> {
    let plain = |part: &str| safe_relative(part).is_some() && !part.contains('/') && !part.contains('\\');
    if !plain(&date) || !plain(&file) {
        return Err(RestError::not_found("output"));
    }
    let image = json!({"subfolder": format!("rest/{date}"), "filename": file});
    let bytes = read_output(&state, &image).map_err(|_| RestError::not_found("output"))?;
    let format = accepted_image(&headers).unwrap_or(OutputFormat::Png);
    let bytes = if file.to_ascii_lowercase().ends_with(".png") {
        encode_as(bytes, format)?
    } else {
        bytes
    };
    let content_type = if file.to_ascii_lowercase().ends_with(".png") {
        format.mime()
    } else {
        "application/octet-stream"
    };
    Ok(([(header::CONTENT_TYPE, content_type)], bytes).into_response())
}
