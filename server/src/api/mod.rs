//! ComfyUI's HTTP routes, a `Router` per area, every route also under `/api`. Responses are
//! shaped in one place: [`json_response`] for bodies, [`ApiError`] for failures.

mod files;
mod history;
mod info;
mod jobs;
pub(crate) mod page;
mod prompt;
mod queue;
mod user;

pub use page::{bundled_workflow, bundled_workflows};

use crate::security;
use crate::state::AppState;
use crate::store::StoreError;
use axum::extract::DefaultBodyLimit;
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use easel_engine::pyjson::dumps;
use easel_engine::ValidationFailure;
use easel_nodes::paths::Paths;
use serde_json::{json, Value as Json};
use tower_http::compression::CompressionLayer;
use tower_http::services::{ServeDir, ServeFile};
use tower_http::set_header::SetResponseHeaderLayer;

/// Every route, plain and under `/api`, the WebSocket, the REST API (`/v1`, the drop-in routes
/// of `--compat`, `/metrics`, `/healthz`, `/readyz`), the built-in page at `/easel/`, and the
/// frontend of `--front-end-root` if any (`/` is its `index.html`, not cached; without one `/` is
/// the built-in page), all behind the API-key and origin checks.
pub fn router(state: AppState) -> Router {
    let comfy_routes = |with_models: bool| {
        Router::new()
            .merge(prompt::routes())
            .merge(queue::routes())
            .merge(history::routes())
            .merge(jobs::routes())
            .merge(files::routes())
            .merge(info::routes(with_models))
            .merge(user::routes())
            .route("/ws", get(crate::ws::websocket))
    };
    let limit = state.settings.max_upload_size;
    let compat = state.settings.compat;
    let mut app = Router::new()
        .merge(comfy_routes(!compat.genserve_owns_models()))
        .nest("/api", comfy_routes(true))
        .merge(user::internal_routes())
        .merge(crate::rest::routes())
        .merge(crate::rest::compat::routes(compat))
        .merge(crate::metrics::routes())
        .merge(page::routes(state.settings.front_end_root.is_none()))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            crate::metrics::count_request,
        ));
    if let Some(root) = state.settings.front_end_root.clone() {
        let index = Router::new()
            .route_service("/", ServeFile::new(root.join("index.html")))
            .layer(SetResponseHeaderLayer::overriding(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-cache"),
            ));
        app = app.merge(index).fallback_service(ServeDir::new(root));
    } else {
        app = app.fallback(unknown_path);
    }
    if state.settings.compress_responses {
        // As ComfyUI: only JSON and plain text are compressed.
        let json_or_text =
            |_: StatusCode, _: axum::http::Version, headers: &axum::http::HeaderMap, _: &axum::http::Extensions| {
                headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|t| t.starts_with("application/json") || t.starts_with("text/plain"))
            };
        app = app.layer(CompressionLayer::new().gzip(true).compress_when(json_or_text));
    }
    app.layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), security::check_origin))
        .layer(middleware::from_fn_with_state(state.clone(), security::require_key))
        .with_state(state)
}

/// What ComfyUI's static catch-all answers for a path without a route: 404 for GET and HEAD,
/// 405 (`Allow: GET,HEAD`) for other methods.
async fn unknown_path(method: axum::http::Method) -> Response {
    if method == axum::http::Method::GET || method == axum::http::Method::HEAD {
        return StatusCode::NOT_FOUND.into_response();
    }
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::ALLOW, "GET,HEAD"),
        ],
        "405: Method Not Allowed",
    )
        .into_response()
}

/// aiohttp's `json_response` content type.
pub const JSON_CONTENT_TYPE: &str = "application/json; charset=utf-8";

/// A JSON body as aiohttp's `json_response` writes it (`json.dumps` spacing).
pub fn json_response(body: &impl serde::Serialize) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, JSON_CONTENT_TYPE)], dumps(body)).into_response()
}

/// A refusal in the shape of ComfyUI's error bodies:
/// `{"error": {"type", "message", "details", "extra_info": {}}, "node_errors": {}}`.
pub fn error_response(status: StatusCode, error_type: &str, message: &str, details: &str) -> Response {
    let body = json!({
        "error": {"type": error_type, "message": message, "details": details, "extra_info": {}},
        "node_errors": {},
    });
    let mut response = json_response(&body);
    *response.status_mut() = status;
    response
}

/// Every failure a route answers with, in ComfyUI's shape.
pub enum ApiError {
    /// A body or parameter ComfyUI's handler would raise on: aiohttp's plain-text 500.
    Malformed,
    /// A rejected prompt: 400 with ComfyUI's error body.
    Invalid(Box<ValidationFailure>),
    /// Bare statuses, with no body (aiohttp's `web.Response(status=N)`).
    BadRequest,
    Forbidden,
    NotFound,
    /// aiohttp's `HTTPUnauthorized`: 401 with its plain-text body.
    Unauthorized,
    /// A `comfy-user` that is not a known user: ComfyUI's unhandled `KeyError`, a plain-text 500
    /// (the settings routes answer 401, `/v2/userdata` 403).
    UnknownUser,
    /// A request body Easel reads differently from ComfyUI's parser (nested deeper than
    /// [`MAX_JSON_DEPTH`], or with `NaN`/`Infinity`), or a value it cannot keep: 400 saying why.
    Unreadable(String),
    /// The store failed: 503 with an error body in ComfyUI's shape.
    Storage(StoreError),
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        ApiError::Storage(error)
    }
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
            ApiError::Invalid(failure) => {
                let mut response = json_response(&failure);
                *response.status_mut() = StatusCode::BAD_REQUEST;
                response
            }
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "401: Unauthorized",
            )
                .into_response(),
            ApiError::UnknownUser => ApiError::Malformed.into_response(),
            ApiError::BadRequest => StatusCode::BAD_REQUEST.into_response(),
            ApiError::Forbidden => StatusCode::FORBIDDEN.into_response(),
            ApiError::NotFound => StatusCode::NOT_FOUND.into_response(),
            ApiError::Unreadable(message) => error_response(StatusCode::BAD_REQUEST, "invalid_request", &message, ""),
            ApiError::Storage(error) => {
                tracing::error!("store failure: {error}");
                error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage_error",
                    "The server could not store the request",
                    &error.to_string(),
                )
            }
        }
    }
}

/// The server's directories.
pub fn paths(state: &AppState) -> Result<&Paths, ApiError> {
    state.runtime.services.get::<Paths>().ok_or(ApiError::NotFound)
}

/// How deep a request body may nest (serde_json's limit). Python's parser goes deeper, but no
/// workflow does; the store reads back without a limit what is nested this deep.
pub const MAX_JSON_DEPTH: usize = 127;

/// A JSON request body; ComfyUI's 500 for one that is not JSON, and a 400 saying why for JSON
/// that Python reads but Easel does not (too deep, or `NaN`/`Infinity`).
pub fn parse_body(body: &[u8]) -> Result<Json, ApiError> {
    serde_json::from_slice(body).map_err(|_| {
        let shape = JsonShape::of(body);
        if shape.depth > MAX_JSON_DEPTH {
            ApiError::Unreadable(format!("The request is nested deeper than {MAX_JSON_DEPTH} levels"))
        } else if shape.non_finite {
            ApiError::Unreadable("The request holds NaN or Infinity, which JSON has no numbers for".into())
        } else {
            ApiError::Malformed
        }
    })
}

/// What a scan of JSON text finds outside its strings: how deep it nests, and whether it has the
/// `NaN`/`Infinity` literals of Python's parser (no JSON token outside a string has `N` or `I`).
struct JsonShape {
    depth: usize,
    non_finite: bool,
}

impl JsonShape {
    fn of(text: &[u8]) -> JsonShape {
        let mut shape = JsonShape {
            depth: 0,
            non_finite: false,
        };
        let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
        for &byte in text {
            if in_string {
                match byte {
                    _ if escaped => escaped = false,
                    b'\\' => escaped = true,
                    b'"' => in_string = false,
                    _ => {}
                }
                continue;
            }
            match byte {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    shape.depth = shape.depth.max(depth);
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                b'N' | b'I' => shape.non_finite = true,
                _ => {}
            }
        }
        shape
    }
}

/// A list of prompt ids from a `{"delete": [...]}` body.
pub fn ids(value: Option<&Json>) -> Vec<String> {
    value
        .and_then(Json::as_array)
        .map(|ids| ids.iter().map(easel_engine::pyjson::py_str).collect())
        .unwrap_or_default()
}
