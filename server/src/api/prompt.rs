//! `POST /prompt` (queue a prompt, protocol §2) and `GET /prompt` (queue status).

use super::{json_response, parse_body, ApiError, JSON_CONTENT_TYPE};
use crate::queue::QueueItem;
use crate::state::AppState;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use easel_engine::pyjson::{dumps, py_str};
use easel_engine::ui_workflow::queued_prompt;
use easel_engine::{validate_prompt, NodeErrors, Prompt, ValidationFailure};
use serde_json::{json, Value as Json};

pub fn routes() -> Router<AppState> {
    Router::new().route("/prompt", get(status).post(queue_prompt))
}

async fn status(State(state): State<AppState>) -> Response {
    json_response(&json!({"exec_info": {"queue_remaining": state.queue.remaining()}}))
}

/// Validation and the store write block, so they run off the async workers. The prompt reaches
/// the worker only once its answer has been handed to the connection ([`HandOff`]).
async fn queue_prompt(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let worker_state = state.clone();
    let (answer, item) = tokio::task::spawn_blocking(move || accept_prompt(&worker_state, &body))
        .await
        .map_err(|_| ApiError::Malformed)??;
    let hand_off = HandOff {
        answer: Some(answer),
        item: Some(item),
        state,
    };
    let mut response = Response::new(Body::new(hand_off));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(JSON_CONTENT_TYPE),
    );
    Ok(response)
}

/// The body of `POST /prompt`'s answer, which queues the stored prompt when the connection is done
/// with it (written out, or the client gone). Clients that listen for a prompt's WebSocket
/// messages only once the answer names its id (two npm SDKs do) would otherwise miss the messages
/// of a prompt that starts and ends before the answer leaves.
struct HandOff {
    answer: Option<Bytes>,
    item: Option<QueueItem>,
    state: AppState,
}

impl hyper::body::Body for HandOff {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(
            self.get_mut()
                .answer
                .take()
                .map(|answer| Ok(hyper::body::Frame::data(answer))),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.answer.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.answer.as_ref().map_or(0, |answer| answer.len() as u64))
    }
}

impl Drop for HandOff {
    fn drop(&mut self) {
        if let Some(item) = self.item.take() {
            let state = &self.state;
            state.queue.put(item, |remaining| state.broadcast_status(remaining));
        }
    }
}

/// ComfyUI's `post_prompt`: number, id, validation, then the prompt is stored; its answer and the
/// item to queue are returned. A prompt in the frontend's UI format is converted first, and saved
/// images embed it as the frontend's own prompts do.
fn accept_prompt(state: &AppState, body: &[u8]) -> Result<(Bytes, QueueItem), ApiError> {
    let request = parse_body(body)?;
    let (number, number_json) = match request.get("number") {
        Some(value) => {
            let number = match value {
                Json::String(text) => text.trim().parse::<f64>().map_err(|_| ApiError::Malformed)?,
                other => other.as_f64().ok_or(ApiError::Malformed)?,
            };
            if !number.is_finite() {
                return Err(ApiError::Unreadable(format!(
                    "`number` must be a finite number, not {value}"
                )));
            }
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
    let invalid_prompt = |message: String| ApiError::Invalid(Box::new(ValidationFailure::invalid_prompt(message)));
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
    let max_nodes = state.settings.max_prompt_nodes;
    if prompt.len() > max_nodes {
        return Err(invalid_prompt(format!(
            "The prompt has {} nodes; this server runs prompts of up to {max_nodes} (--max-prompt-nodes)",
            prompt.len()
        )));
    }
    let targets: Option<Vec<String>> = request
        .get("partial_execution_targets")
        .and_then(Json::as_array)
        .map(|ids| ids.iter().map(py_str).collect());
    let validated = validate_prompt(&runtime.registry, &runtime.services, prompt, targets.as_deref())
        .map_err(|failure| ApiError::Invalid(Box::new(failure)))?;
    let answer = Accepted {
        prompt_id: &prompt_id,
        number: &number_json,
        node_errors: &validated.node_errors,
    };
    let answer = Bytes::from(dumps(&answer));
    let item = QueueItem {
        number,
        number_json,
        priority: 0,
        prompt_id,
        validated,
        extra_data,
    };
    state.store.enqueue(&item.to_stored())?;
    Ok((answer, item))
}

/// `POST /prompt`'s answer to a queued prompt.
#[derive(serde::Serialize)]
struct Accepted<'a> {
    prompt_id: &'a str,
    number: &'a Json,
    node_errors: &'a NodeErrors,
}
