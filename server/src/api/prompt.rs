//! `POST /prompt` (queue a prompt, protocol §2) and `GET /prompt` (queue status).

use super::{json_response, parse_body, ApiError};
use crate::queue::QueueItem;
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use easel_engine::pyjson::py_str;
use easel_engine::ui_workflow::queued_prompt;
use easel_engine::{validate_prompt, Prompt, ValidationFailure};
use serde_json::{json, Value as Json};

pub fn routes() -> Router<AppState> {
    Router::new().route("/prompt", get(status).post(queue_prompt))
}

async fn status(State(state): State<AppState>) -> Response {
    json_response(&json!({"exec_info": {"queue_remaining": state.queue.remaining()}}))
}

/// Validation and the store write block, so they run off the async workers.
async fn queue_prompt(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    tokio::task::spawn_blocking(move || accept_prompt(&state, &body))
        .await
        .map_err(|_| ApiError::Malformed)?
}

/// ComfyUI's `post_prompt`: number, id, validation, then the prompt is stored and queued. A
/// prompt in the frontend's UI format is converted first, and saved images embed it as the
/// frontend's own prompts do.
fn accept_prompt(state: &AppState, body: &[u8]) -> Result<Response, ApiError> {
    let request = parse_body(body)?;
    let (number, number_json) = match request.get("number") {
        Some(value) => {
            let number = match value {
                Json::String(text) => text.trim().parse::<f64>().map_err(|_| ApiError::Malformed)?,
                other => other.as_f64().ok_or(ApiError::Malformed)?,
            };
            (number, json!(number))
        }
        None => {
            let front = request
                .get("front")
                .is_some_and(|f| f.as_bool().unwrap_or(!f.is_null()));
            let number = state.queue.next_number(front);
            (number as f64, json!(number))
        }
    };
    let Some(prompt_json) = request.get("prompt") else {
        return Err(ApiError::Invalid(Box::new(ValidationFailure::no_prompt())));
    };
    let prompt_id = match request.get("prompt_id") {
        Some(Json::String(id)) => id.clone(),
        Some(other) => py_str(other),
        None => uuid::Uuid::new_v4().to_string(),
    };
    let invalid_prompt = |message: String| {
        ApiError::Invalid(Box::new(ValidationFailure {
            error: json!({"type": "invalid_prompt", "message": message, "details": "", "extra_info": {}}),
            node_errors: json!({}),
        }))
    };
    let mut extra_data = request
        .get("extra_data")
        .cloned()
        .filter(Json::is_object)
        .unwrap_or_else(|| json!({}));
    if let (Some(client_id), Some(extra)) = (request.get("client_id"), extra_data.as_object_mut()) {
        extra.insert("client_id".into(), client_id.clone());
    }
    let runtime = &state.runtime;
    let prompt_json = queued_prompt(prompt_json, &mut extra_data, &runtime.registry, &runtime.services)
        .map_err(|e| invalid_prompt(e.to_string()))?;
    let prompt = Prompt::from_json(prompt_json).map_err(|e| invalid_prompt(e.to_string()))?;
    let targets: Option<Vec<String>> = request
        .get("partial_execution_targets")
        .and_then(Json::as_array)
        .map(|ids| ids.iter().map(py_str).collect());
    let validated = validate_prompt(&runtime.registry, &runtime.services, prompt, targets.as_deref())
        .map_err(|failure| ApiError::Invalid(Box::new(failure)))?;
    let response = json!({"prompt_id": prompt_id, "number": number_json, "node_errors": validated.node_errors});
    let item = QueueItem {
        number,
        number_json,
        prompt_id,
        validated,
        extra_data,
    };
    state.enqueue(item)?;
    Ok(json_response(&response))
}
