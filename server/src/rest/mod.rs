//! Easel's REST API for people who don't edit graphs (`/v1/…`): a generation request ("prompt +
//! images + a few knobs") becomes an API-format prompt built from a bundled workflow, queued like
//! any `POST /prompt` (same queue, history, cache and WebSocket messages), and followed as a task.
//!
//! - [`request`]: the request's fields, read from JSON or a multipart form, and checked;
//! - [`recipes`]: which bundled workflow serves a family and mode, and how fields fill it in;
//! - [`catalog`]: the models a request may name, styles and presets;
//! - [`tasks`]: a task as clients see it, and the progress of running ones;
//! - [`generation`]: a request checked, built and queued; [`answers`]: how a task is answered;
//! - [`routes`]: the `/v1` handlers; [`compat`]: drop-in routes of other services;
//! - [`downloads`]: model downloads into the model folders;
//! - [`schemas`]: request and answer types; [`openapi`]: the OpenAPI document and its page.
//!
//! Every failure answers `{"error": {"code", "message", "field"}}` ([`RestError`]).

pub mod answers;
pub mod catalog;
pub mod compat;
pub mod downloads;
pub mod generation;
pub mod openapi;
pub mod recipes;
pub mod request;
pub mod routes;
pub mod schemas;
pub mod tasks;

use crate::store::StoreError;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

pub use crate::store::tasks::now_ms;
pub use routes::routes;

/// A refusal: the status, a stable code, a message a person can act on, and the request field
/// that was wrong, if one was.
#[derive(Debug, Clone, PartialEq)]
pub struct RestError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    /// Seconds to wait before trying again (429).
    pub retry_after: Option<u32>,
}

impl RestError {
    /// A refusal of any status.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        RestError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    /// 400: a field (or the body) is wrong.
    pub fn invalid(field: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        RestError {
            field: field.into(),
            ..RestError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
        }
    }

    /// 400 for a field: `field` is wrong because `message`.
    pub fn field(field: &str, message: impl Into<String>) -> Self {
        RestError::invalid(Some(field.to_string()), message)
    }

    /// 501: the request needs something Easel cannot run yet.
    pub fn not_yet(field: &str, capability: &str) -> Self {
        RestError {
            field: Some(field.to_string()),
            ..RestError::new(
                StatusCode::NOT_IMPLEMENTED,
                "not_implemented",
                format!("{capability} is not available in Easel yet"),
            )
        }
    }

    pub fn not_found(what: &str) -> Self {
        RestError::new(StatusCode::NOT_FOUND, "not_found", format!("no such {what}"))
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = code;
        self
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }
}

impl From<StoreError> for RestError {
    fn from(error: StoreError) -> Self {
        tracing::error!("store failure: {error}");
        RestError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "storage_error",
            format!("the server could not read or write its task store: {error}"),
        )
    }
}

impl IntoResponse for RestError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message, "field": self.field}});
        let mut response = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

/// A JSON answer (`application/json`), serialised into one growing buffer: axum's `Json` writes
/// each token through `BytesMut`'s `io::Write`, which costs a `/v1/generate` answer twice the time.
pub struct JsonAnswer<T>(pub T);

impl<T: serde::Serialize> IntoResponse for JsonAnswer<T> {
    fn into_response(self) -> Response {
        let mut body = Vec::with_capacity(1024);
        match serde_json::to_writer(&mut body, &self.0) {
            Ok(()) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
            Err(error) => RestError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the answer could not be written: {error}"),
            )
            .into_response(),
        }
    }
}

/// A time as ISO 8601 (UTC, milliseconds).
pub fn iso_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A query parameter holding an ISO 8601 time, as milliseconds (absent or empty: `None`).
pub fn query_time(query: &std::collections::HashMap<String, String>, name: &str) -> Result<Option<i64>, RestError> {
    query
        .get(name)
        .filter(|text| !text.is_empty())
        .map(|text| parse_time(name, text))
        .transpose()
}

/// An ISO 8601 time (`2026-12-06T09:00:00Z`, an offset, or a plain date) as milliseconds.
pub fn parse_time(field: &str, text: &str) -> Result<i64, RestError> {
    if let Ok(time) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(time.timestamp_millis());
    }
    if let Ok(time) = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f") {
        return Ok(time.and_utc().timestamp_millis());
    }
    if let Ok(date) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(date
            .and_hms_opt(0, 0, 0)
            .unwrap_or_default()
            .and_utc()
            .timestamp_millis());
    }
    Err(RestError::field(
        field,
        format!("`{text}` is not an ISO 8601 time (such as 2026-12-06T09:30:00Z)"),
    ))
}

/// The server's folders.
pub fn paths(state: &crate::state::AppState) -> Result<&easel_nodes::paths::Paths, RestError> {
    state
        .runtime
        .services
        .get::<easel_nodes::paths::Paths>()
        .ok_or_else(|| RestError::invalid(None, "this server has no model and file folders"))
}
