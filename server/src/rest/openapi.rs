//! The REST API's OpenAPI 3.1 document at `/openapi.json`, derived (utoipa) from the request and
//! answer types in [`super::schemas`] and [`super::compat::schemas`] and the handlers' path
//! attributes, and a page at `/docs` that shows it (inside the binary, nothing fetched).

use crate::state::AppState;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Easel REST API",
        description = "Generation for people who don't edit graphs: a request becomes a prompt built from a bundled workflow, queued with ComfyUI's `/prompt` queue and followed as a task. Drop-in routes answer clients of the per-family API, GenServe and FooocusAPI in their shapes. Refusals are `{\"error\": {\"code\", \"message\", \"field\"}}`."
    ),
    paths(
        super::routes::generate,
        super::routes::list_tasks,
        super::routes::delete_tasks,
        super::routes::get_task,
        super::routes::delete_task,
        super::routes::cancel_task,
        super::routes::models,
        super::routes::list_styles,
        super::routes::list_presets,
        super::routes::status,
        super::downloads::start,
        super::downloads::list,
        super::downloads::one,
        crate::metrics::metrics,
        crate::metrics::healthz,
        crate::metrics::readyz,
        super::compat::family::sd15,
        super::compat::family::sdxl,
        super::compat::family::sd3,
        super::compat::family::flux,
        super::compat::family::upscale,
        super::compat::family::object_remove,
        super::compat::family::iclight,
        super::compat::genserve::generate,
        super::compat::genserve::generate_img2img,
        super::compat::genserve::status,
        super::compat::genserve::models,
        super::compat::fooocus::generate,
        super::compat::fooocus::control,
        super::compat::fooocus::all_models,
        super::compat::fooocus::list_styles,
        super::compat::fooocus::list_tasks,
        super::compat::fooocus::one_task,
        super::compat::fooocus::output,
        openapi_json,
        docs,
    ),
    modifiers(&ApiKeyScheme),
    security((), ("api_key" = [])),
    tags(
        (name = "generation", description = "Generate images"),
        (name = "tasks", description = "Follow, list, cancel and delete tasks"),
        (name = "catalog", description = "Models, styles, presets and model downloads"),
        (name = "operations", description = "Status, metrics, health and readiness"),
        (name = "family API", description = "Drop-in: a per-family REST layer over ComfyUI"),
        (name = "GenServe", description = "Drop-in: GenServe"),
        (name = "FooocusAPI", description = "Drop-in: FooocusAPI"),
        (name = "documentation", description = "This document and its page"),
    )
)]
pub struct ApiDoc;

/// `X-API-KEY` (or `Authorization: Bearer`), required when the server has `--api-key`.
struct ApiKeyScheme;

impl Modify for ApiKeyScheme {
    fn modify(&self, document: &mut utoipa::openapi::OpenApi) {
        let components = document.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-API-KEY",
                "Required when the server runs with --api-key (also accepted: Authorization: Bearer KEY)",
            ))),
        );
    }
}

/// The document as JSON, built once.
static DOCUMENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|error| format!("{{\"error\": \"the OpenAPI document could not be written: {error}\"}}"))
});

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/openapi.json", get(openapi_json))
        .route("/docs", get(docs))
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "documentation", operation_id = "openapi",
    responses((status = 200, description = "OpenAPI 3.1", content_type = "application/json")))]
async fn openapi_json() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT.as_str()).into_response()
}

/// A page showing this document.
#[utoipa::path(get, path = "/docs", tag = "documentation", operation_id = "docs",
    responses((status = 200, description = "HTML", content_type = "text/html")))]
async fn docs() -> Response {
    crate::api::page::file("api-docs.html")
}
