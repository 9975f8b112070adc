//! The built-in page (`web/`, inside the binary): always at `/easel/`, and at `/` when no
//! frontend is served. It talks to the public API like any client; the one route of its own,
//! `GET /easel/workflows`, lists the bundled workflows a person can run from a form.
//!
//! A workflow is offered when its nodes say, in `_meta.easel`, which of their inputs a person may
//! change, as `{field: input name or names}`: `{"prompt": "text"}` on a positive CLIPTextEncode,
//! `{"seed": "seed", "steps": "steps"}` on a KSampler, `{"image": "image", "mask": "image"}` on an
//! inpainting workflow's LoadImage. The fields are `model`, `prompt`, `negative_prompt`, `image`,
//! `mask`, `width`, `height`, `steps`, `seed` and `denoise`; a field on several nodes sets them
//! all. ComfyUI ignores `_meta` beyond the title, so the files stay plain API prompts.

use super::json_response;
use crate::state::AppState;
use axum::extract::Path;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use rust_embed::RustEmbed;
use serde_json::{json, Value as Json};

#[derive(RustEmbed)]
#[folder = "../web/"]
struct PageFiles;

#[derive(RustEmbed)]
#[folder = "../workflows/"]
struct BundledWorkflows;

/// Every bundled workflow (`workflows/NAME`, embedded in the binary), parsed once.
static PARSED_WORKFLOWS: std::sync::LazyLock<std::collections::HashMap<String, Json>> =
    std::sync::LazyLock::new(|| {
        BundledWorkflows::iter()
            .filter(|name| name.ends_with(".json"))
            .filter_map(|name| {
                let content = BundledWorkflows::get(&name)?;
                Some((name.to_string(), serde_json::from_slice(&content.data).ok()?))
            })
            .collect()
    });

/// A bundled workflow (`workflows/NAME`) as JSON.
pub fn bundled_workflow(name: &str) -> Option<Json> {
    PARSED_WORKFLOWS.get(name).cloned()
}

/// Every bundled workflow: its path under `workflows/` and its JSON.
pub fn bundled_workflows() -> impl Iterator<Item = (&'static str, &'static Json)> {
    PARSED_WORKFLOWS
        .iter()
        .map(|(name, workflow)| (name.as_str(), workflow))
}

/// The page's routes; `at_root` also serves it at `/`.
pub fn routes(at_root: bool) -> Router<AppState> {
    let router = Router::new()
        .route("/easel", get(|| async { Redirect::permanent("/easel/") }))
        .route("/easel/", get(index))
        .route("/easel/workflows", get(workflows))
        .route("/easel/{file}", get(asset));
    if at_root {
        router.route("/", get(index))
    } else {
        router
    }
}

async fn index() -> Response {
    file("index.html")
}

async fn asset(Path(name): Path<String>) -> Response {
    file(&name)
}

/// A file of the page, not cached (the page changes with the binary).
pub(crate) fn file(name: &str) -> Response {
    let Some(content) = PageFiles::get(name) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let content_type = match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        _ => "application/octet-stream",
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        content.data.into_owned(),
    )
        .into_response()
}

/// `[{"name": file stem, "prompt": API prompt}]` for the bundled workflows with a manifest,
/// by name.
async fn workflows() -> Response {
    let mut names: Vec<_> = BundledWorkflows::iter()
        .filter(|name| name.ends_with(".json") && !name.contains('/'))
        .collect();
    names.sort();
    let listed: Vec<Json> = names
        .iter()
        .filter_map(|name| {
            let content = BundledWorkflows::get(name)?;
            let prompt: Json = serde_json::from_slice(&content.data).ok()?;
            let has_manifest = prompt
                .as_object()?
                .values()
                .any(|node| node.pointer("/_meta/easel").is_some_and(Json::is_object));
            has_manifest.then(|| json!({"name": name.trim_end_matches(".json"), "prompt": prompt}))
        })
        .collect();
    json_response(&Json::Array(listed))
}
