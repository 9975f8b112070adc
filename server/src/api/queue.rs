//! The queue's routes: `GET/POST /queue`, `POST /interrupt`, `POST /free` (protocol §1.12–1.14).

use super::{ids, json_response, parse_body, ApiError};
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value as Json};
use std::sync::atomic::Ordering;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/queue", get(list).post(change))
        .route("/interrupt", post(interrupt))
        .route("/free", post(free))
}

async fn list(State(state): State<AppState>) -> Response {
    let (running, pending) = state.queue.snapshot();
    json_response(&json!({"queue_running": running, "queue_pending": pending}))
}

/// `{"clear": true}` and/or `{"delete": [ids]}` on pending prompts.
async fn change(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let request = parse_body(&body)?;
    if request.get("clear").is_some_and(|c| c.as_bool().unwrap_or(false)) {
        state.clear_queue()?;
    }
    if request.get("delete").is_some() {
        state.dequeue(&ids(request.get("delete")))?;
    }
    Ok(StatusCode::OK.into_response())
}

/// Interrupts the running prompt; with `{"prompt_id": X}`, only if X is the one running.
async fn interrupt(State(state): State<AppState>, body: Bytes) -> Response {
    let request: Json = serde_json::from_slice(&body).unwrap_or_else(|_| json!({}));
    match request.get("prompt_id").and_then(Json::as_str) {
        Some(prompt_id) => {
            state.interrupt_if_running(prompt_id);
        }
        None => state.interrupt.trigger(),
    }
    StatusCode::OK.into_response()
}

/// `{"unload_models": bool, "free_memory": bool}`: before the next prompt, `unload_models` drops
/// the loaded-model cache and `free_memory` the output cache.
async fn free(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let request = parse_body(&body)?;
    let flag = |name: &str| request.get(name).is_some_and(|f| f.as_bool().unwrap_or(false));
    if flag("free_memory") {
        state.free_memory.store(true, Ordering::SeqCst);
    }
    if flag("unload_models") {
        state.unload_models.store(true, Ordering::SeqCst);
    }
    Ok(StatusCode::OK.into_response())
}
