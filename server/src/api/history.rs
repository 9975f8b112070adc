//! `GET /history`, `GET /history/{id}`, `POST /history` (protocol §1.12).

use super::{ids, json_response, parse_body, ApiError};
use crate::state::AppState;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::collections::HashMap;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/history", get(page).post(change))
        .route("/history/{prompt_id}", get(entry))
}

/// `max_items` and `offset` must be integers (ComfyUI answers 500 otherwise).
fn integer(query: &HashMap<String, String>, name: &str) -> Result<Option<usize>, ApiError> {
    query
        .get(name)
        .map(|v| {
            v.trim()
                .parse::<i64>()
                .map(|n| n.max(0) as usize)
                .map_err(|_| ApiError::Malformed)
        })
        .transpose()
}

async fn page(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let (max_items, offset) = (integer(&query, "max_items")?, integer(&query, "offset")?);
    Ok(json_response(&state.store.history_page(max_items, offset)?))
}

async fn entry(State(state): State<AppState>, Path(prompt_id): Path<String>) -> Result<Response, ApiError> {
    Ok(json_response(&state.store.history_entry(&prompt_id)?))
}

/// `{"clear": true}` and/or `{"delete": [ids]}`.
async fn change(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let request = parse_body(&body)?;
    if request.get("clear").is_some_and(|c| c.as_bool().unwrap_or(false)) {
        state.store.delete_history(None)?;
    }
    if request.get("delete").is_some() {
        state.store.delete_history(Some(&ids(request.get("delete"))))?;
    }
    Ok(StatusCode::OK.into_response())
}
