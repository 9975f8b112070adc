//! What the server knows: node definitions, model folders, system and feature information
//! (protocol §1.1–1.3, §1.8, §1.9, §1.11).

use super::{json_response, paths, ApiError};
use crate::state::AppState;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use serde_json::{json, Map, Value as Json};
use std::collections::HashMap;

/// The ComfyUI release whose API Easel speaks, and the frontend it pins.
const COMFYUI_VERSION: &str = "0.3.64";
const FRONTEND_VERSION: &str = "1.27.10";
const TEMPLATES_VERSION: &str = "0.1.95";

/// The routes; `with_models: false` leaves `/models` out (GenServe's takes its place at the root).
pub fn routes(with_models: bool) -> Router<AppState> {
    let router = Router::new()
        .route("/object_info", get(object_info))
        .route("/object_info/{node_class}", get(object_info_class))
        .route("/embeddings", get(embeddings))
        .route("/extensions", get(extensions))
        .route("/models/{folder}", get(model_files))
        .route("/system_stats", get(system_stats))
        .route("/features", get(features))
        .route("/view_metadata/{folder_name}", get(view_metadata))
        .route("/global_subgraphs", get(global_subgraphs));
    if with_models {
        router.route("/models", get(model_folders))
    } else {
        router
    }
}

/// Subgraph blueprints that custom node packs ship (later ComfyUI versions; the newest frontends
/// list them): Easel has no custom nodes, so none. One by id is a 404, as for an unknown id there.
async fn global_subgraphs() -> Response {
    json_response(&json!({}))
}

async fn object_info(State(state): State<AppState>) -> Response {
    json_response(&state.runtime.registry.object_info(&state.runtime.services))
}

async fn object_info_class(State(state): State<AppState>, Path(node_class): Path<String>) -> Response {
    let mut body = Map::new();
    if let Some(schema) = state.runtime.registry.schema(&node_class, &state.runtime.services) {
        body.insert(node_class, schema.to_object_info());
    }
    json_response(&Json::Object(body))
}

/// Embedding names without their extensions.
async fn embeddings(State(state): State<AppState>) -> Result<Response, ApiError> {
    let names: Vec<String> = paths(&state)?
        .filename_list("embeddings")
        .into_iter()
        .map(|name| match name.rsplit_once('.') {
            Some((stem, _)) if !stem.is_empty() => stem.to_string(),
            _ => name,
        })
        .collect();
    Ok(json_response(&json!(names)))
}

/// The frontend's extension scripts: every `*.js` under `<web root>/extensions`, as URL paths.
async fn extensions(State(state): State<AppState>) -> Response {
    let mut scripts = Vec::new();
    if let Some(root) = &state.settings.front_end_root {
        let mut stack = vec![root.join("extensions")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "js") {
                    if let Ok(relative) = path.strip_prefix(root) {
                        scripts.push(format!("/{}", relative.to_string_lossy().replace('\\', "/")));
                    }
                }
            }
        }
    }
    scripts.sort();
    json_response(&json!(scripts))
}

async fn model_folders(State(state): State<AppState>) -> Result<Response, ApiError> {
    Ok(json_response(&json!(paths(&state)?.folder_names().collect::<Vec<_>>())))
}

/// Files of one model folder; only registered names (no `clip`/`unet` aliases), as ComfyUI.
async fn model_files(State(state): State<AppState>, Path(folder): Path<String>) -> Result<Response, ApiError> {
    let paths = paths(&state)?;
    if !paths.folder_names().any(|name| name == folder) {
        return Err(ApiError::NotFound);
    }
    Ok(json_response(&json!(paths.filename_list(&folder))))
}

/// `(total, available)` system memory in bytes, from `/proc/meminfo` where there is one.
fn memory() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// The command line with every `--api-key` value hidden: `/system_stats` shows it to any client.
fn redacted_argv(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut hide_next = false;
    args.map(|arg| {
        let hidden = if hide_next {
            "***".to_string()
        } else if arg.starts_with("--api-key=") {
            "--api-key=***".to_string()
        } else {
            arg.clone()
        };
        hide_next = arg == "--api-key";
        hidden
    })
    .collect()
}

async fn system_stats() -> Response {
    let (total, free) = memory();
    let os = if cfg!(windows) { "nt" } else { "posix" };
    json_response(&json!({
        "system": {
            "os": os,
            "ram_total": total,
            "ram_free": free,
            "comfyui_version": COMFYUI_VERSION,
            "required_frontend_version": FRONTEND_VERSION,
            "installed_templates_version": Json::Null,
            "required_templates_version": TEMPLATES_VERSION,
            "python_version": format!("Easel {} (Rust, no Python)", env!("CARGO_PKG_VERSION")),
            "pytorch_version": "none (candle)",
            "embedded_python": false,
            "argv": redacted_argv(std::env::args()),
        },
        "devices": [{
            "name": "cpu", "type": "cpu", "index": Json::Null,
            "vram_total": total, "vram_free": free, "torch_vram_total": total, "torch_vram_free": free,
        }],
    }))
}

async fn features(State(state): State<AppState>) -> Response {
    json_response(&state.features())
}

/// The `__metadata__` of a `.safetensors` model file (404 when there is none, or the header is over
/// 1 MiB).
async fn view_metadata(
    State(state): State<AppState>,
    Path(folder): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let filename = query
        .get("filename")
        .filter(|f| f.ends_with(".safetensors"))
        .ok_or(ApiError::NotFound)?;
    let file = paths(&state)?.full_path(&folder, filename).ok_or(ApiError::NotFound)?;
    let metadata = tokio::task::spawn_blocking(move || safetensors_metadata(&file))
        .await
        .map_err(|_| ApiError::NotFound)?
        .ok_or(ApiError::NotFound)?;
    Ok(json_response(&metadata))
}

fn safetensors_metadata(file: &std::path::Path) -> Option<Json> {
    use std::io::Read;
    let mut reader = std::fs::File::open(file).ok()?;
    let mut length = [0u8; 8];
    reader.read_exact(&mut length).ok()?;
    let length = u64::from_le_bytes(length);
    if length > 1024 * 1024 {
        return None;
    }
    let mut header = vec![0u8; length as usize];
    reader.read_exact(&mut header).ok()?;
    let header: Json = serde_json::from_slice(&header).ok()?;
    header.get("__metadata__").cloned()
}

#[cfg(test)]
mod tests {
    use super::redacted_argv;

    #[test]
    fn system_stats_hides_api_keys_from_the_command_line() {
        let argv = [
            "easel",
            "serve",
            "--api-key",
            "s3cret",
            "--api-key=other",
            "--port",
            "8188",
        ];
        assert_eq!(
            redacted_argv(argv.iter().map(|a| a.to_string())),
            ["easel", "serve", "--api-key", "***", "--api-key=***", "--port", "8188"]
        );
    }
}
