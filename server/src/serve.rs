//! `easel serve`: ComfyUI's HTTP API over the engine.
//!
//! This first cut serves what a script client needs to queue a workflow and fetch its images:
//! `GET /object_info[/{class}]`, `POST /prompt`, `GET /history[/{id}]` and `GET /view`, each also
//! under `/api`, with ComfyUI's JSON bodies and status codes. One worker thread executes queued
//! prompts in ComfyUI's order (lowest `number` first). WebSocket events, the queue routes and the
//! durable store come with the server issue.

use crate::cli::ServeArgs;
use crate::setup::{self, Runtime};
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use easel_engine::pyjson::dumps;
use easel_engine::{validate_prompt, Executor, Interrupt, Prompt, ValidatedPrompt, ValidationFailure};
use easel_nodes::paths::{safe_relative, Paths};
use indexmap::IndexMap;
use serde_json::{json, Value as Json};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// ComfyUI keeps at most this many history entries (plus the one being added).
const MAXIMUM_HISTORY_SIZE: usize = 10000;

/// Serves until interrupted (Ctrl-C).
pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let runtime = setup::runtime(&args.execution)?;
    let state = AppState::start(runtime);
    let tokio = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    tokio.block_on(async move {
        let address = format!("{}:{}", args.listen, args.port);
        let listener = tokio::net::TcpListener::bind(&address).await?;
        tracing::info!("Starting server");
        tracing::info!("To see the GUI go to: http://{address}");
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async {
                // Without a signal handler there is nothing to wait for: serve until killed.
                if tokio::signal::ctrl_c().await.is_err() {
                    std::future::pending::<()>().await;
                }
            })
            .await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Routes, each also under `/api` as ComfyUI mirrors them.
pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .route("/object_info", get(object_info))
        .route("/object_info/{node_class}", get(object_info_class))
        .route("/prompt", post(post_prompt))
        .route("/history", get(history))
        .route("/history/{prompt_id}", get(history_entry))
        .route("/view", get(view));
    Router::new()
        .merge(routes.clone())
        .nest("/api", routes)
        .with_state(state)
}

/// A queued prompt.
struct QueueItem {
    number: f64,
    prompt_id: String,
    validated: ValidatedPrompt,
    extra_data: Json,
    /// The response's `number`: an int from the counter, or the client's float.
    number_json: Json,
}

impl PartialEq for QueueItem {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for QueueItem {}

impl PartialOrd for QueueItem {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for QueueItem {
    /// Reversed, so the max-heap pops the lowest `(number, prompt_id)` first, as ComfyUI's heapq does.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .number
            .total_cmp(&self.number)
            .then_with(|| other.prompt_id.cmp(&self.prompt_id))
    }
}

struct Shared {
    runtime: Runtime,
    queue: Mutex<BinaryHeap<QueueItem>>,
    queued: Condvar,
    history: Mutex<IndexMap<String, Json>>,
    /// ComfyUI's `number` counter: grows on every POST without a `number`, valid or not.
    counter: Mutex<i64>,
}

#[derive(Clone)]
pub struct AppState(Arc<Shared>);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl AppState {
    /// Creates the state and starts the worker thread that executes queued prompts.
    pub fn start(runtime: Runtime) -> Self {
        let shared = Arc::new(Shared {
            runtime,
            queue: Mutex::new(BinaryHeap::new()),
            queued: Condvar::new(),
            history: Mutex::new(IndexMap::new()),
            counter: Mutex::new(0),
        });
        let worker = shared.clone();
        std::thread::spawn(move || work(&worker));
        AppState(shared)
    }
}

/// The worker loop: pops the lowest-numbered prompt, executes it, stores its history entry.
fn work(shared: &Shared) {
    let runtime = &shared.runtime;
    let mut executor = Executor::new(runtime.registry.clone(), runtime.services.clone(), runtime.cache_mode);
    let interrupt = Interrupt::new();
    loop {
        let item = {
            let mut queue = lock(&shared.queue);
            loop {
                if let Some(item) = queue.pop() {
                    break item;
                }
                queue = shared
                    .queued
                    .wait(queue)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
        };
        interrupt.clear();
        let outcome = executor.execute(&item.prompt_id, &item.validated, &item.extra_data, &|_| {}, &interrupt);
        let entry = json!({
            "prompt": [
                item.number_json,
                item.prompt_id,
                item.validated.prompt.to_json(),
                item.extra_data,
                item.validated.outputs_to_execute,
            ],
            "outputs": outcome.outputs,
            "status": outcome.status_json(),
            "meta": outcome.meta,
        });
        let mut history = lock(&shared.history);
        if history.len() > MAXIMUM_HISTORY_SIZE {
            history.shift_remove_index(0);
        }
        history.insert(item.prompt_id, entry);
    }
}

/// Every error a route answers with, in ComfyUI's shape.
enum ApiError {
    /// A body that is not JSON: aiohttp's plain-text 500.
    Malformed,
    Invalid(ValidationFailure),
    BadRequest,
    Forbidden,
    NotFound,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Malformed => (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "500 Internal Server Error\n\nServer got itself in trouble",
            )
                .into_response(),
            ApiError::Invalid(failure) => json_response(StatusCode::BAD_REQUEST, &failure.to_json()),
            ApiError::BadRequest => StatusCode::BAD_REQUEST.into_response(),
            ApiError::Forbidden => StatusCode::FORBIDDEN.into_response(),
            ApiError::NotFound => StatusCode::NOT_FOUND.into_response(),
        }
    }
}

/// A JSON body as aiohttp's `json_response` writes it (`json.dumps` spacing).
fn json_response(status: StatusCode, body: &Json) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        dumps(body),
    )
        .into_response()
}

async fn object_info(State(state): State<AppState>) -> Response {
    let runtime = &state.0.runtime;
    json_response(StatusCode::OK, &runtime.registry.object_info(&runtime.services))
}

async fn object_info_class(State(state): State<AppState>, Path(node_class): Path<String>) -> Response {
    let runtime = &state.0.runtime;
    let mut body = serde_json::Map::new();
    if let Some(schema) = runtime.registry.schema(&node_class, &runtime.services) {
        body.insert(node_class, schema.to_object_info());
    }
    json_response(StatusCode::OK, &Json::Object(body))
}

async fn post_prompt(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let request: Json = serde_json::from_slice(&body).map_err(|_| ApiError::Malformed)?;
    let shared = &state.0;
    let (number, number_json) = match request.get("number") {
        Some(value) => {
            let number = match value {
                Json::String(text) => text.trim().parse::<f64>().map_err(|_| ApiError::Malformed)?,
                other => other.as_f64().ok_or(ApiError::Malformed)?,
            };
            (number, json!(number))
        }
        None => {
            let mut counter = lock(&shared.counter);
            let front = request
                .get("front")
                .is_some_and(|f| f.as_bool().unwrap_or(!f.is_null()));
            let number = if front { -*counter } else { *counter };
            *counter += 1;
            (number as f64, json!(number))
        }
    };
    let Some(prompt_json) = request.get("prompt") else {
        return Err(ApiError::Invalid(ValidationFailure::no_prompt()));
    };
    let prompt_id = match request.get("prompt_id") {
        Some(Json::String(id)) => id.clone(),
        Some(other) => easel_engine::pyjson::py_str(other),
        None => uuid::Uuid::new_v4().to_string(),
    };
    let prompt = Prompt::from_json(prompt_json.clone()).map_err(|e| {
        ApiError::Invalid(ValidationFailure {
            error: json!({"type": "invalid_prompt", "message": e.to_string(), "details": "", "extra_info": {}}),
            node_errors: json!({}),
        })
    })?;
    let targets: Option<Vec<String>> = request
        .get("partial_execution_targets")
        .and_then(Json::as_array)
        .map(|ids| ids.iter().map(easel_engine::pyjson::py_str).collect());
    let runtime = &shared.runtime;
    let validated =
        validate_prompt(&runtime.registry, &runtime.services, prompt, targets.as_deref()).map_err(ApiError::Invalid)?;
    let mut extra_data = request
        .get("extra_data")
        .cloned()
        .filter(Json::is_object)
        .unwrap_or_else(|| json!({}));
    if let (Some(client_id), Some(extra)) = (request.get("client_id"), extra_data.as_object_mut()) {
        extra.insert("client_id".into(), client_id.clone());
    }
    if let Some(extra) = extra_data.as_object_mut() {
        extra.remove("auth_token_comfy_org");
        extra.remove("api_key_comfy_org");
    }
    let response = json!({"prompt_id": prompt_id, "number": number_json, "node_errors": validated.node_errors});
    lock(&shared.queue).push(QueueItem {
        number,
        prompt_id,
        validated,
        extra_data,
        number_json,
    });
    shared.queued.notify_one();
    Ok(json_response(StatusCode::OK, &response))
}

async fn history(State(state): State<AppState>, Query(query): Query<HashMap<String, String>>) -> Response {
    let history = lock(&state.0.history);
    let max_items = query
        .get("max_items")
        .and_then(|m| m.parse::<usize>().ok())
        .unwrap_or(history.len());
    let skip = history.len().saturating_sub(max_items);
    let body: serde_json::Map<String, Json> = history.iter().skip(skip).map(|(k, v)| (k.clone(), v.clone())).collect();
    json_response(StatusCode::OK, &Json::Object(body))
}

async fn history_entry(State(state): State<AppState>, Path(prompt_id): Path<String>) -> Response {
    let history = lock(&state.0.history);
    let mut body = serde_json::Map::new();
    if let Some(entry) = history.get(&prompt_id) {
        body.insert(prompt_id, entry.clone());
    }
    json_response(StatusCode::OK, &Json::Object(body))
}

/// `GET /view?filename=…&type=output|input|temp&subfolder=…`.
async fn view(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let paths = state.0.runtime.services.get::<Paths>().ok_or(ApiError::NotFound)?;
    let filename = query.get("filename").ok_or(ApiError::NotFound)?;
    if filename.contains("..") {
        return Err(ApiError::BadRequest);
    }
    // ComfyUI drops directory parts of the filename.
    let filename = filename.rsplit(['/', '\\']).next().unwrap_or_default();
    let kind = query.get("type").map(String::as_str).unwrap_or("output");
    let mut dir = paths.directory_by_type(kind).ok_or(ApiError::NotFound)?.to_path_buf();
    if let Some(subfolder) = query.get("subfolder").filter(|s| !s.is_empty()) {
        dir = dir.join(safe_relative(subfolder).ok_or(ApiError::Forbidden)?);
    }
    let file = dir.join(safe_relative(filename).ok_or(ApiError::NotFound)?);
    let bytes = tokio::fs::read(&file).await.map_err(|_| ApiError::NotFound)?;
    let content_type = match file
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_lowercase)
        .as_deref()
    {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("gif") => "image/gif",
        _ => "application/octet-stream",
    };
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type.to_string()),
            (header::CONTENT_DISPOSITION, format!("filename=\"{filename}\"")),
        ],
        bytes,
    )
        .into_response())
}
