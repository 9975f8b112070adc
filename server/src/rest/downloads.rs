//! `POST /v1/models/download` (a model file fetched into its folder in the background; answered
//! with the job at once, or as a server-sent-event stream of its progress), `GET
//! /v1/models/downloads` and `GET /v1/models/downloads/{id}`. Progress also goes to every
//! WebSocket client as `easel_download` messages.

use super::schemas::{DownloadJob, DownloadList};
use super::{iso_time, now_ms, paths, JsonAnswer, RestError};
use crate::downloads::{agent, download, DownloadError, DownloadTarget};
use crate::hub::message;
use crate::state::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value as Json};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// How often a download's progress is told.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/models/download", post(start))
        .route("/v1/models/downloads", get(list))
        .route("/v1/models/downloads/{id}", get(one))
}

/// The server's downloads, newest last, and the channel their changes go out on.
pub struct DownloadJobs {
    jobs: Mutex<Vec<DownloadJob>>,
    updates: broadcast::Sender<DownloadJob>,
}

impl Default for DownloadJobs {
    fn default() -> Self {
        DownloadJobs {
            jobs: Mutex::new(Vec::new()),
            updates: broadcast::channel(256).0,
        }
    }
}

impl DownloadJobs {
    fn jobs(&self) -> std::sync::MutexGuard<'_, Vec<DownloadJob>> {
        self.jobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get(&self, id: &str) -> Option<DownloadJob> {
        self.jobs().iter().find(|job| job.id == id).cloned()
    }

    /// Changes a job and tells WebSocket clients and streams.
    fn update(&self, state: &AppState, id: &str, change: impl FnOnce(&mut DownloadJob)) {
        let job = {
            let mut jobs = self.jobs();
            let Some(job) = jobs.iter_mut().find(|job| job.id == id) else {
                return;
            };
            change(job);
            job.clone()
        };
        state.hub.broadcast(message("easel_download", &json!(job)));
        let _ = self.updates.send(job);
    }
}

#[utoipa::path(post, path = "/v1/models/download", tag = "catalog", operation_id = "download_model",
    request_body = crate::rest::schemas::DownloadRequest,
    responses((status = 200, description = "Progress events (`stream`)", body = crate::rest::schemas::DownloadJob, content_type = "text/event-stream"),
        (status = 202, description = "Started", body = crate::rest::schemas::DownloadJob),
        (status = 400, description = "A field is wrong; nothing was queued", body = crate::rest::schemas::ErrorBody),
        (status = 409, description = "The file exists", body = crate::rest::schemas::ErrorBody)))]
async fn start(State(state): State<AppState>, body: axum::body::Bytes) -> Result<Response, RestError> {
    let body: Json =
        serde_json::from_slice(&body).map_err(|_| RestError::invalid(None, "the body must be a JSON object"))?;
    let text = |name: &str| -> Result<Option<&str>, RestError> {
        match body.get(name) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(text)) => Ok(Some(text.as_str())),
            Some(_) => Err(RestError::field(name, format!("`{name}` must be a string"))),
        }
    };
    let url = text("url")?.ok_or_else(|| RestError::field("url", "a `url` is required"))?;
    crate::outbound::check_url(url, state.settings.download_allow_private)
        .map_err(|error| RestError::field("url", error))?;
    let folder = text("folder")?.unwrap_or("checkpoints");
    let target = DownloadTarget::new(paths(&state)?, url, folder, text("name")?, text("sha256")?).map_err(|error| {
        let field = match &error {
            DownloadError::Invalid(message) if message.contains("folder") => "folder",
            DownloadError::Invalid(message) if message.contains("SHA-256") => "sha256",
            DownloadError::Invalid(message) if message.contains("URL") => "url",
            DownloadError::Exists(_) => {
                return RestError::new(StatusCode::CONFLICT, "model_exists", error.to_string());
            }
            _ => "name",
        };
        RestError::field(field, error.to_string())
    })?;
    let id = uuid::Uuid::new_v4().to_string();
    let job = DownloadJob {
        id: id.clone(),
        url: target.url.clone(),
        folder: target.folder.clone(),
        name: target.name.clone(),
        status: "downloading".into(),
        bytes: 0,
        total: None,
        percent: None,
        sha256: target.sha256.clone(),
        error: None,
        started_at: iso_time(now_ms()),
        finished_at: None,
    };
    let updates = state.downloads.updates.subscribe();
    state.downloads.jobs().push(job.clone());
    let worker_state = state.clone();
    let worker_id = id.clone();
    std::thread::Builder::new()
        .name("easel-download".into())
        .spawn(move || run(&worker_state, &worker_id, &target))
        .map_err(|error| RestError::new(StatusCode::SERVICE_UNAVAILABLE, "download_failed", error.to_string()))?;
    if body["stream"] == true {
        return Ok(stream(state, id, updates).into_response());
    }
    Ok((StatusCode::ACCEPTED, JsonAnswer(job)).into_response())
}

/// The download thread: fetches the file and records how it went.
fn run(state: &AppState, id: &str, target: &DownloadTarget) {
    let jobs = &state.downloads;
    let mut told = Instant::now();
    let mut progress = |bytes: u64, total: Option<u64>| {
        if told.elapsed() < PROGRESS_INTERVAL && total != Some(bytes) {
            return;
        }
        told = Instant::now();
        jobs.update(state, id, |job| {
            job.bytes = bytes;
            job.total = total;
            job.percent = total.map(|total| (1000.0 * bytes as f64 / total.max(1) as f64).round() / 10.0);
        });
    };
    let result = download(&agent(), target, &mut progress);
    jobs.update(state, id, |job| {
        job.finished_at = Some(iso_time(now_ms()));
        match result {
            Ok(sha256) => {
                job.status = "done".into();
                job.sha256 = Some(sha256);
                job.percent = Some(100.0);
            }
            Err(error) => {
                tracing::warn!(url = %target.url, "download failed: {error}");
                job.status = "failed".into();
                job.error = Some(error.to_string());
            }
        }
    });
}

/// The job's progress as server-sent events, ending with its final state.
fn stream(
    state: AppState,
    id: String,
    updates: broadcast::Receiver<DownloadJob>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let events = futures_util::stream::unfold(
        (state, id, updates, false),
        |(state, id, mut updates, done)| async move {
            if done {
                return None;
            }
            loop {
                let job = match updates.recv().await {
                    Ok(job) if job.id == id => job,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => state.downloads.get(&id)?,
                    Err(broadcast::error::RecvError::Closed) => return None,
                };
                let finished = job.status != "downloading";
                return Some((
                    Ok(SseEvent::default().data(json!(job).to_string())),
                    (state, id, updates, finished),
                ));
            }
        },
    );
    Sse::new(events).keep_alive(KeepAlive::default())
}

#[utoipa::path(get, path = "/v1/models/downloads", tag = "catalog", operation_id = "list_downloads",
    responses((status = 200, description = "OK", body = crate::rest::schemas::DownloadList)))]
async fn list(State(state): State<AppState>) -> Response {
    let jobs = state.downloads.jobs().clone();
    JsonAnswer(DownloadList { downloads: jobs }).into_response()
}

#[utoipa::path(get, path = "/v1/models/downloads/{id}", tag = "catalog", operation_id = "get_download",
    params(("id" = String, Path, description = "The download id")),
    responses((status = 200, description = "OK", body = crate::rest::schemas::DownloadJob), (status = 404, description = "No such thing", body = crate::rest::schemas::ErrorBody)))]
async fn one(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, RestError> {
    let job = state
        .downloads
        .get(&id)
        .ok_or_else(|| RestError::not_found("download"))?;
    Ok(JsonAnswer(job).into_response())
}
