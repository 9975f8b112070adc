//! The jobs API of later ComfyUI versions (`GET /jobs`, `GET /jobs/{id}`, `POST /jobs/{id}/cancel`,
//! `POST /jobs/cancel`): queue and history as one list of jobs, which the newest official
//! frontends read for their queue and history panels instead of `/queue` and `/history`.
//!
//! A job is a queued prompt (`pending`, `in_progress`) or a history entry (`completed`, `failed`,
//! `cancelled`). Easel's prompts carry no `create_time` unless the client put one in
//! `extra_data` (ComfyUI 0.3.64 adds none), so jobs are ordered by their creation time when they
//! have one and then by their queue number, which grows in the order prompts were accepted.

use super::{json_response, ApiError};
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Map, Value as Json};
use std::cmp::Ordering;
use std::collections::HashMap;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/jobs", get(list))
        .route("/jobs/cancel", post(cancel_many))
        .route("/jobs/{job_id}", get(detail))
        .route("/jobs/{job_id}/cancel", post(cancel_one))
}

const PENDING: &str = "pending";
const IN_PROGRESS: &str = "in_progress";
const COMPLETED: &str = "completed";
const FAILED: &str = "failed";
const CANCELLED: &str = "cancelled";
const STATUSES: [&str; 5] = [PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED];

/// Media kinds the frontend can preview, and file extensions it previews whatever the kind.
const PREVIEWABLE_KINDS: [&str; 5] = ["images", "video", "audio", "3d", "text"];
const THREE_D_EXTENSIONS: [&str; 5] = [".obj", ".fbx", ".gltf", ".glb", ".usdz"];
const TEXT_EXTENSIONS: [&str; 3] = [".txt", ".md", ".json"];
/// Longest text preview, in characters.
const TEXT_PREVIEW_LIMIT: usize = 1024;

/// A 400 with `{"error": message}`, as ComfyUI's jobs routes answer bad parameters.
fn bad_request(message: impl Into<String>) -> Response {
    let mut response = json_response(&json!({"error": message.into()}));
    *response.status_mut() = StatusCode::BAD_REQUEST;
    response
}

/// The list request's parameters, checked as ComfyUI checks them (the error message if not).
struct ListQuery {
    statuses: Vec<String>,
    workflow_id: Option<String>,
    by_duration: bool,
    descending: bool,
    limit: Option<usize>,
    offset: usize,
}

impl ListQuery {
    fn parse(query: &HashMap<String, String>) -> Result<ListQuery, String> {
        let statuses: Vec<String> = match query.get("status") {
            Some(list) => list
                .split(',')
                .map(|s| s.trim().to_lowercase())
                .filter(|s| !s.is_empty())
                .collect(),
            None => Vec::new(),
        };
        let invalid: Vec<&str> = statuses
            .iter()
            .map(String::as_str)
            .filter(|s| !STATUSES.contains(s))
            .collect();
        if !invalid.is_empty() {
            return Err(format!(
                "Invalid status value(s): {}. Valid values: {}",
                invalid.join(", "),
                STATUSES.join(", ")
            ));
        }
        let sort_by = query.get("sort_by").map_or("created_at".into(), |s| s.to_lowercase());
        if sort_by != "created_at" && sort_by != "execution_duration" {
            return Err("sort_by must be 'created_at' or 'execution_duration'".into());
        }
        let sort_order = query.get("sort_order").map_or("desc".into(), |s| s.to_lowercase());
        if sort_order != "asc" && sort_order != "desc" {
            return Err("sort_order must be 'asc' or 'desc'".into());
        }
        let limit = match query.get("limit") {
            None => None,
            Some(text) => match text.trim().parse::<i64>() {
                Ok(n) if n > 0 => Some(n as usize),
                Ok(_) => return Err("limit must be a positive integer".into()),
                Err(_) => return Err("limit must be an integer".into()),
            },
        };
        let offset = match query.get("offset") {
            None => 0,
            Some(text) => match text.trim().parse::<i64>() {
                Ok(n) => n.max(0) as usize,
                Err(_) => return Err("offset must be an integer".into()),
            },
        };
        Ok(ListQuery {
            statuses: if statuses.is_empty() {
                STATUSES.iter().map(|s| s.to_string()).collect()
            } else {
                statuses
            },
            workflow_id: query.get("workflow_id").filter(|id| !id.is_empty()).cloned(),
            by_duration: sort_by == "execution_duration",
            descending: sort_order == "desc",
            limit,
            offset,
        })
    }

    fn wants(&self, status: &str) -> bool {
        self.statuses.iter().any(|s| s == status)
    }
}

async fn list(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let query = match ListQuery::parse(&query) {
        Ok(query) => query,
        Err(message) => return Ok(bad_request(message)),
    };
    let (running, pending) = state.queue.snapshot();
    let mut jobs = Vec::new();
    if query.wants(IN_PROGRESS) {
        jobs.extend(running.iter().map(|item| queued_job(item, IN_PROGRESS, false)));
    }
    if query.wants(PENDING) {
        jobs.extend(pending.iter().map(|item| queued_job(item, PENDING, false)));
    }
    if [COMPLETED, FAILED, CANCELLED].iter().any(|s| query.wants(s)) {
        if let Json::Object(history) = state.store.history_page(None, None)? {
            jobs.extend(
                history
                    .iter()
                    .map(|(prompt_id, entry)| history_job(prompt_id, entry, false))
                    .filter(|job| job["status"].as_str().is_some_and(|s| query.wants(s))),
            );
        }
    }
    if let Some(workflow_id) = &query.workflow_id {
        jobs.retain(|job| job.get("workflow_id").and_then(Json::as_str) == Some(workflow_id));
    }
    sort_jobs(&mut jobs, query.by_duration, query.descending);
    let total = jobs.len();
    let page: Vec<Json> = jobs
        .into_iter()
        .skip(query.offset)
        .take(query.limit.unwrap_or(usize::MAX))
        .collect();
    let has_more = query.offset + page.len() < total;
    Ok(json_response(&json!({
        "jobs": page,
        "pagination": {"offset": query.offset, "limit": query.limit, "total": total, "has_more": has_more},
    })))
}

async fn detail(State(state): State<AppState>, Path(job_id): Path<String>) -> Result<Response, ApiError> {
    if let Some(entry) = state.store.history_entry(&job_id)?.get(&job_id) {
        return Ok(json_response(&history_job(&job_id, entry, true)));
    }
    let (running, pending) = state.queue.snapshot();
    let is_job = |item: &&Json| item.get(1).and_then(Json::as_str) == Some(job_id.as_str());
    let job = running
        .iter()
        .find(is_job)
        .map(|item| queued_job(item, IN_PROGRESS, true))
        .or_else(|| pending.iter().find(is_job).map(|item| queued_job(item, PENDING, true)));
    Ok(match job {
        Some(job) => json_response(&job),
        None => {
            let mut response = json_response(&json!({"error": "Job not found"}));
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
        }
    })
}

/// Cancels one job whatever its state: a running one is interrupted, a pending one dequeued, a
/// finished or unknown one left alone. `{"cancelled": whether anything was cancelled}`.
async fn cancel_one(State(state): State<AppState>, Path(job_id): Path<String>) -> Result<Response, ApiError> {
    let cancelled = cancel(&state, &job_id)?;
    Ok(json_response(&json!({"cancelled": cancelled})))
}

/// `{"job_ids": [uuid, ...]}`: cancels each, as `cancel_one`; ids that are not canonical UUIDs are
/// refused before anything is cancelled.
async fn cancel_many(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let Ok(request) = serde_json::from_slice::<Json>(&body) else {
        return Ok(bad_request("Request body must be valid JSON"));
    };
    let Some(job_ids) = request.get("job_ids").and_then(Json::as_array) else {
        return Ok(bad_request("job_ids must be a list"));
    };
    let invalid: Vec<String> = job_ids
        .iter()
        .filter(|id| !id.as_str().is_some_and(is_canonical_uuid))
        .map(|id| id.as_str().map_or_else(|| id.to_string(), str::to_string))
        .collect();
    if !invalid.is_empty() {
        let mut response = json_response(&json!({"error": "job_ids contains invalid id(s)", "invalid_ids": invalid}));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(response);
    }
    let mut cancelled = false;
    for job_id in job_ids.iter().filter_map(Json::as_str) {
        cancelled |= cancel(&state, job_id)?;
    }
    Ok(json_response(&json!({"cancelled": cancelled})))
}

fn cancel(state: &AppState, job_id: &str) -> Result<bool, ApiError> {
    if state.interrupt_if_running(job_id) {
        return Ok(true);
    }
    Ok(state.dequeue(&[job_id.to_string()])? || state.interrupt_if_running(job_id))
}

/// A UUID in its canonical lowercase hyphenated spelling.
fn is_canonical_uuid(text: &str) -> bool {
    uuid::Uuid::parse_str(text).is_ok_and(|id| id.hyphenated().to_string() == text)
}

/// `(create_time, workflow_id)` from a prompt's `extra_data`.
fn creation(extra_data: &Json) -> (Option<i64>, Option<Json>) {
    let create_time = extra_data.get("create_time").and_then(Json::as_i64);
    let workflow_id = extra_data.pointer("/extra_pnginfo/workflow/id").cloned();
    (create_time, workflow_id)
}

/// An object of the fields that have a value (ComfyUI's `prune_dict`).
fn pruned(fields: Vec<(&str, Option<Json>)>) -> Map<String, Json> {
    fields
        .into_iter()
        .filter_map(|(name, value)| value.filter(|v| !v.is_null()).map(|v| (name.to_string(), v)))
        .collect()
}

/// A job of a queue item `[number, prompt_id, prompt, extra_data, outputs_to_execute]`.
fn queued_job(item: &Json, status: &str, with_workflow: bool) -> Json {
    let extra_data = &item[3];
    let (create_time, workflow_id) = creation(extra_data);
    let mut job = pruned(vec![
        ("id", Some(item[1].clone())),
        ("status", Some(json!(status))),
        ("priority", Some(item[0].clone())),
        ("create_time", create_time.map(Json::from)),
        ("outputs_count", Some(json!(0))),
        ("previewable_outputs_count", Some(json!(0))),
        ("workflow_id", workflow_id),
    ]);
    if with_workflow {
        job.insert("workflow".into(), json!({"prompt": item[2], "extra_data": extra_data}));
    }
    Json::Object(job)
}

/// A job of a history entry: its state from `status_str` and the execution messages, its
/// outputs counted and the one to preview picked.
fn history_job(prompt_id: &str, entry: &Json, with_outputs: bool) -> Json {
    let prompt = &entry["prompt"];
    let extra_data = &prompt[3];
    let (create_time, workflow_id) = creation(extra_data);
    let status_info = &entry["status"];
    let (mut started, mut ended, mut error, mut interrupted) = (None, None, None, false);
    for message in status_info["messages"].as_array().into_iter().flatten() {
        let (Some(name), Some(data)) = (message[0].as_str(), message.get(1).filter(|d| d.is_object())) else {
            continue;
        };
        match name {
            "execution_start" => started = data.get("timestamp").cloned(),
            "execution_success" | "execution_error" | "execution_interrupted" => {
                ended = data.get("timestamp").cloned();
                if name == "execution_error" {
                    error = Some(data.clone());
                }
                interrupted |= name == "execution_interrupted";
            }
            _ => {}
        }
    }
    let status = match status_info["status_str"].as_str() {
        Some("error") if interrupted => CANCELLED,
        Some("error") => FAILED,
        _ => COMPLETED,
    };
    let outputs = &entry["outputs"];
    let summary = OutputsSummary::of(outputs);
    let mut job = pruned(vec![
        ("id", Some(json!(prompt_id))),
        ("status", Some(json!(status))),
        ("priority", Some(prompt[0].clone())),
        ("create_time", create_time.map(Json::from)),
        ("execution_start_time", started),
        ("execution_end_time", ended),
        ("execution_error", error),
        ("outputs_count", Some(json!(summary.count))),
        ("previewable_outputs_count", Some(json!(summary.previewable))),
        ("preview_output", summary.preview),
        ("workflow_id", workflow_id),
    ]);
    if with_outputs {
        job.insert("outputs".into(), normalized_outputs(outputs));
        job.insert("execution_status".into(), status_info.clone());
        job.insert(
            "workflow".into(),
            json!({"prompt": prompt[2], "extra_data": extra_data}),
        );
    }
    Json::Object(job)
}

/// Each node's output lists as `(node_id, media kind, items)`; `animated` is a flag, not a list.
fn output_lists(outputs: &Json) -> impl Iterator<Item = (&String, &String, &Vec<Json>)> {
    outputs
        .as_object()
        .into_iter()
        .flatten()
        .flat_map(|(node_id, node_outputs)| {
            node_outputs
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(move |(kind, items)| {
                    (kind != "animated")
                        .then_some(())
                        .and(items.as_array())
                        .map(|items| (node_id, kind, items))
                })
        })
}

fn has_extension(filename: &str, extensions: &[&str]) -> bool {
    let lower = filename.to_lowercase();
    extensions.iter().any(|extension| lower.ends_with(extension))
}

/// An output item as a file record: objects as they are, a bare 3D file name as an output file;
/// `None` for anything else.
fn file_item(item: &Json) -> Option<Json> {
    match item {
        Json::Object(_) => Some(item.clone()),
        Json::String(name) if has_extension(name, &THREE_D_EXTENSIONS) => {
            Some(json!({"filename": name, "type": "output", "subfolder": "", "mediaType": "3d"}))
        }
        _ => None,
    }
}

fn is_previewable(kind: &str, item: &Json) -> bool {
    let format = item.get("format").and_then(Json::as_str).unwrap_or("");
    let filename = item.get("filename").and_then(Json::as_str).unwrap_or("");
    PREVIEWABLE_KINDS.contains(&kind)
        || format.starts_with("video/")
        || format.starts_with("audio/")
        || has_extension(filename, &THREE_D_EXTENSIONS)
        || has_extension(filename, &TEXT_EXTENSIONS)
}

fn is_text(kind: &str, item: &Json) -> bool {
    kind == "text"
        || has_extension(
            item.get("filename").and_then(Json::as_str).unwrap_or(""),
            &TEXT_EXTENSIONS,
        )
}

/// What the job list shows of a prompt's outputs.
struct OutputsSummary {
    /// Every output file.
    count: usize,
    /// Those the frontend can preview.
    previewable: usize,
    /// The one to show: a saved visual file first, then any visual file, then a text file, then
    /// raw text.
    preview: Option<Json>,
}

impl OutputsSummary {
    fn of(outputs: &Json) -> OutputsSummary {
        let (mut count, mut previewable) = (0, 0);
        let (mut saved, mut visual, mut text_file, mut text) = (None, None, None, None);
        for (node_id, kind, items) in output_lists(outputs) {
            for item in items {
                let Some(file) = file_item(item) else {
                    if kind == "text" && text.is_none() && !item.is_null() {
                        text = Some(text_preview(item, node_id));
                    }
                    continue;
                };
                count += 1;
                if !is_previewable(kind, &file) {
                    continue;
                }
                previewable += 1;
                let mut enriched = file.clone();
                if let Json::Object(fields) = &mut enriched {
                    fields.insert("nodeId".into(), json!(node_id));
                    fields.entry("mediaType").or_insert_with(|| json!(kind));
                }
                let slot = if is_text(kind, &file) {
                    &mut text_file
                } else if file.get("type").and_then(Json::as_str) == Some("output") {
                    &mut saved
                } else {
                    &mut visual
                };
                slot.get_or_insert(enriched);
            }
        }
        OutputsSummary {
            count,
            previewable,
            preview: saved.or(visual).or(text_file).or(text),
        }
    }
}

/// Raw text output as a preview, cut at [`TEXT_PREVIEW_LIMIT`] characters.
fn text_preview(item: &Json, node_id: &str) -> Json {
    let value = match item {
        Json::String(text) => text.clone(),
        Json::Array(parts) => parts.first().map(easel_engine::pyjson::py_str).unwrap_or_default(),
        other => easel_engine::pyjson::py_str(other),
    };
    let mut preview = json!({"content": value.chars().take(TEXT_PREVIEW_LIMIT).collect::<String>()});
    if value.chars().count() > TEXT_PREVIEW_LIMIT {
        preview["truncated"] = json!(true);
    }
    preview["nodeId"] = json!(node_id);
    preview["mediaType"] = json!("text");
    preview
}

/// Outputs as the job detail shows them: bare 3D file names become file records, nulls go.
fn normalized_outputs(outputs: &Json) -> Json {
    let Some(nodes) = outputs.as_object() else {
        return outputs.clone();
    };
    let mut normalized = nodes.clone();
    for node_outputs in normalized.values_mut() {
        let Some(kinds) = node_outputs.as_object_mut() else {
            continue;
        };
        for (kind, items) in kinds.iter_mut() {
            if kind == "animated" {
                continue;
            }
            if let Json::Array(list) = items {
                list.retain(|item| !item.is_null());
                for item in list.iter_mut() {
                    if let Some(file) = file_item(item) {
                        *item = file;
                    }
                }
            }
        }
    }
    Json::Object(normalized)
}

/// Orders jobs by creation (creation time, then queue number) or by execution duration; a
/// stable sort, as ComfyUI's.
fn sort_jobs(jobs: &mut [Json], by_duration: bool, descending: bool) {
    let number = |job: &Json, name: &str| job.get(name).and_then(Json::as_f64).unwrap_or(0.0);
    let key = |job: &Json| -> (f64, f64) {
        if by_duration {
            let (start, end) = (number(job, "execution_start_time"), number(job, "execution_end_time"));
            (if start != 0.0 && end != 0.0 { end - start } else { 0.0 }, 0.0)
        } else {
            (number(job, "create_time"), number(job, "priority"))
        }
    };
    jobs.sort_by(|a, b| {
        let order = key(a).partial_cmp(&key(b)).unwrap_or(Ordering::Equal);
        if descending {
            order.reverse()
        } else {
            order
        }
    });
}
