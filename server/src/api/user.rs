//! What the official frontend reads and writes at start-up: users, user data files, settings,
//! translations and templates (protocol §1.15–1.17), for the user [`crate::users`] resolves.

use super::{json_response, paths, ApiError};
use crate::logs;
use crate::state::AppState;
use crate::url::percent_decode;
use crate::users::UserError;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::Router;
use easel_nodes::paths::safe_relative;
use serde_json::{json, Map, Value as Json};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::UNIX_EPOCH;

/// The file of the user's settings.
const SETTINGS_FILE: &str = "comfy.settings.json";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/users", get(users).post(create_user))
        .route("/userdata", get(list_userdata))
        .route("/v2/userdata", get(list_userdata_v2))
        .route("/userdata/{file}", get(read_file).post(write_file).delete(delete_file))
        .route("/userdata/{file}/move/{dest}", post(move_file))
        .route("/settings", get(settings).post(merge_settings))
        .route("/settings/{id}", get(setting).post(set_setting))
        .route("/i18n", get(empty_object))
        .route("/workflow_templates", get(empty_object))
        .route("/experiment/models", get(experiment_models))
        .route("/experiment/models/{folder}", get(experiment_model_files))
}

/// `/internal/*`, which ComfyUI does not mirror under `/api`.
pub fn internal_routes() -> Router<AppState> {
    Router::new()
        .route("/internal/logs", get(|| async { json_response(&json!(logs::text())) }))
        .route("/internal/logs/raw", get(|| async { json_response(&logs::raw()) }))
        .route("/internal/logs/subscribe", patch(subscribe_logs))
        .route("/internal/folder_paths", get(folder_paths))
        .route("/internal/files/{directory_type}", get(directory_files))
}

/// `{"clientId", "enabled"}`: whether that socket receives `logs` messages.
async fn subscribe_logs(body: Bytes) -> Result<Response, ApiError> {
    let request = super::parse_body(&body)?;
    let sid = request["clientId"].as_str().ok_or(ApiError::BadRequest)?;
    logs::subscribe(sid, request["enabled"].as_bool().unwrap_or(false));
    Ok(StatusCode::OK.into_response())
}

/// The directory of the user a request acts for (`<user directory>/<id>`).
fn user_root(state: &AppState, headers: &HeaderMap) -> Result<PathBuf, ApiError> {
    let header = headers
        .get("comfy-user")
        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
    let user = state.users.resolve(header.as_deref()).map_err(|error| {
        tracing::warn!("{error}");
        ApiError::UnknownUser
    })?;
    Ok(paths(state)?.user.join(user))
}

fn text(status: StatusCode, message: &'static str) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], message).into_response()
}

/// A user-data path from a URL segment (decoded once more if it still holds `%`, as ComfyUI does).
fn user_path(root: &std::path::Path, raw: &str) -> Option<PathBuf> {
    let decoded = if raw.contains('%') {
        percent_decode(raw, false)
    } else {
        raw.to_string()
    };
    if decoded.contains('\\') || decoded.contains('\0') {
        return None;
    }
    Some(root.join(safe_relative(&decoded)?))
}

fn seconds(time: std::io::Result<std::time::SystemTime>) -> f64 {
    time.ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `{path, size, modified, created}` of a file, `path` relative to `base`.
fn file_info(base: &std::path::Path, file: &std::path::Path) -> Json {
    let metadata = std::fs::metadata(file).ok();
    let relative = file
        .strip_prefix(base)
        .unwrap_or(file)
        .to_string_lossy()
        .replace('\\', "/");
    json!({
        "path": relative,
        "size": metadata.as_ref().map_or(0, |m| m.len()),
        "modified": metadata.as_ref().map_or(0.0, |m| seconds(m.modified())),
        "created": metadata.as_ref().map_or(0.0, |m| seconds(m.created().or_else(|_| m.modified()))),
    })
}

fn flag(query: &HashMap<String, String>, name: &str) -> bool {
    query.get(name).is_some_and(|v| v == "true")
}

async fn users(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    Ok(json_response(&match state.users.listing() {
        Some(users) => json!({"storage": "server", "users": users}),
        None => json!({"storage": "server", "migrated": user_root(&state, &headers)?.is_dir()}),
    }))
}

/// `POST /users {"username"}`: records the user in `users.json` and returns its id.
async fn create_user(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let request = super::parse_body(&body)?;
    let username = request["username"].as_str().ok_or(ApiError::Malformed)?;
    match state.users.add(username, &paths(&state)?.user) {
        Ok(id) => Ok(json_response(&json!(id))),
        Err(error @ (UserError::Duplicate | UserError::NoName | UserError::SystemPrefix)) => {
            let mut response = json_response(&json!({"error": error.to_string()}));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            Ok(response)
        }
        Err(error) => {
            tracing::error!("{error}");
            Err(ApiError::Malformed)
        }
    }
}

/// Files under `dir` (recursively or not), relative to `dir`, with forward slashes.
fn files_under(dir: &std::path::Path, recurse: bool) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                if recurse {
                    stack.push(path);
                }
            } else {
                files.push(path);
            }
        }
    }
    files
}

async fn list_userdata(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let Some(dir) = query.get("dir") else {
        return Ok(text(StatusCode::BAD_REQUEST, "Directory not provided"));
    };
    let root = user_root(&state, &headers)?;
    let Some(dir) = user_path(&root, dir.trim_end_matches('/')) else {
        return Ok(text(StatusCode::FORBIDDEN, "Invalid directory"));
    };
    if !dir.is_dir() {
        return Ok(text(StatusCode::NOT_FOUND, "Directory not found"));
    }
    let files = files_under(&dir, flag(&query, "recurse"));
    let listing: Vec<Json> = files
        .iter()
        .map(|file| {
            let info = file_info(&dir, file);
            if flag(&query, "full_info") {
                info
            } else if flag(&query, "split") {
                let relative = info["path"].as_str().unwrap_or_default().to_string();
                let mut parts = vec![json!(relative)];
                parts.extend(relative.split('/').map(|p| json!(p)));
                Json::Array(parts)
            } else {
                info["path"].clone()
            }
        })
        .collect();
    Ok(json_response(&Json::Array(listing)))
}

async fn list_userdata_v2(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let root = match user_root(&state, &headers) {
        Err(ApiError::UnknownUser) => return Ok(text(StatusCode::FORBIDDEN, "Invalid user specified in request")),
        root => root?,
    };
    if !root.is_dir() {
        return Ok(json_response(&json!([])));
    }
    let start = match query.get("path").filter(|p| !p.is_empty()) {
        Some(path) => match user_path(&root, path) {
            Some(start) => start,
            None => return Ok(text(StatusCode::BAD_REQUEST, "Invalid path requested")),
        },
        None => root.clone(),
    };
    if !start.exists() {
        return Ok(text(StatusCode::NOT_FOUND, "Requested path not found"));
    }
    if !start.is_dir() {
        return Ok(text(StatusCode::BAD_REQUEST, "Requested path is not a directory"));
    }
    let mut entries: Vec<(bool, String, Json)> = Vec::new();
    let mut stack = vec![start];
    while let Some(current) = stack.pop() {
        for entry in std::fs::read_dir(&current).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let relative = path
                .strip_prefix(&root)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            if path.is_dir() {
                entries.push((
                    true,
                    name.to_lowercase(),
                    json!({"name": name, "path": relative, "type": "directory"}),
                ));
                stack.push(path);
            } else {
                let metadata = entry.metadata().ok();
                let item = json!({
                    "name": name, "path": relative, "type": "file",
                    "size": metadata.as_ref().map_or(0, |m| m.len()),
                    "modified": metadata.as_ref().map_or(0.0, |m| seconds(m.modified())),
                });
                entries.push((false, name.to_lowercase(), item));
            }
        }
    }
    entries.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    Ok(json_response(&Json::Array(
        entries.into_iter().map(|(_, _, item)| item).collect(),
    )))
}

async fn read_file(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(file): Path<String>,
) -> Result<Response, ApiError> {
    let root = user_root(&state, &headers)?;
    let path = user_path(&root, &file).ok_or(ApiError::Forbidden)?;
    let bytes = tokio::fs::read(&path).await.map_err(|_| ApiError::NotFound)?;
    let media = match path.extension().and_then(|e| e.to_str()) {
        Some("json") => "application/json",
        Some("css") => "text/css",
        Some("txt") => "text/plain",
        _ => "application/octet-stream",
    };
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, media),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        bytes,
    )
        .into_response())
}

/// The answer to a write or move: the path relative to the user root, or its full information.
fn written(root: &std::path::Path, path: &std::path::Path, query: &HashMap<String, String>) -> Response {
    let info = file_info(root, path);
    json_response(if flag(query, "full_info") { &info } else { &info["path"] })
}

async fn write_file(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(file): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let root = user_root(&state, &headers)?;
    let path = user_path(&root, &file).ok_or(ApiError::Forbidden)?;
    if query.get("overwrite").is_some_and(|o| o == "false") && path.exists() {
        return Ok(text(StatusCode::CONFLICT, "File already exists"));
    }
    if !easel_nodes::paths::contained_once_created(&root, &path) {
        return Err(ApiError::Forbidden);
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|_| ApiError::BadRequest)?;
    }
    let target = path.clone();
    tokio::task::spawn_blocking(move || easel_nodes::paths::write_replacing(&target, &body))
        .await
        .map_err(|_| ApiError::Malformed)?
        .map_err(|_| ApiError::BadRequest)?;
    Ok(written(&root, &path, &query))
}

async fn delete_file(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(file): Path<String>,
) -> Result<Response, ApiError> {
    let root = user_root(&state, &headers)?;
    let path = user_path(&root, &file).ok_or(ApiError::Forbidden)?;
    tokio::fs::remove_file(&path).await.map_err(|_| ApiError::NotFound)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn move_file(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((file, dest)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let root = user_root(&state, &headers)?;
    let source = user_path(&root, &file).ok_or(ApiError::Forbidden)?;
    let target = user_path(&root, &dest).ok_or(ApiError::Forbidden)?;
    if !source.is_file() {
        return Err(ApiError::NotFound);
    }
    if query.get("overwrite").is_some_and(|o| o == "false") && target.exists() {
        return Ok(text(StatusCode::CONFLICT, "File already exists"));
    }
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|_| ApiError::BadRequest)?;
    }
    tokio::fs::rename(&source, &target)
        .await
        .map_err(|_| ApiError::BadRequest)?;
    Ok(written(&root, &target, &query))
}

/// The user directory for the settings routes, where an unknown user is 401 (ComfyUI's
/// `HTTPUnauthorized`).
fn settings_root(state: &AppState, headers: &HeaderMap) -> Result<PathBuf, ApiError> {
    user_root(state, headers).map_err(|error| match error {
        ApiError::UnknownUser => ApiError::Unauthorized,
        other => other,
    })
}

fn read_settings(root: &std::path::Path) -> Map<String, Json> {
    std::fs::read(root.join(SETTINGS_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

fn write_settings(root: &std::path::Path, settings: &Map<String, Json>) -> Result<(), ApiError> {
    std::fs::create_dir_all(root).map_err(|_| ApiError::BadRequest)?;
    let mut text = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut serializer = serde_json::Serializer::with_formatter(&mut text, formatter);
    serde::Serialize::serialize(settings, &mut serializer).map_err(|_| ApiError::BadRequest)?;
    easel_nodes::paths::write_replacing(&root.join(SETTINGS_FILE), &text).map_err(|_| ApiError::BadRequest)
}

async fn settings(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let root = settings_root(&state, &headers)?;
    Ok(json_response(&Json::Object(read_settings(&root))))
}

async fn setting(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let root = settings_root(&state, &headers)?;
    Ok(json_response(read_settings(&root).get(&id).unwrap_or(&Json::Null)))
}

async fn merge_settings(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let root = settings_root(&state, &headers)?;
    let Json::Object(update) = super::parse_body(&body)? else {
        return Err(ApiError::BadRequest);
    };
    let mut settings = read_settings(&root);
    settings.extend(update);
    write_settings(&root, &settings)?;
    Ok(StatusCode::OK.into_response())
}

async fn set_setting(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let value = super::parse_body(&body)?;
    let root = settings_root(&state, &headers)?;
    let mut settings = read_settings(&root);
    settings.insert(id, value);
    write_settings(&root, &settings)?;
    Ok(StatusCode::OK.into_response())
}

async fn empty_object() -> Response {
    json_response(&json!({}))
}

/// `[{"name": folder, "folders": [paths]}]` for every model folder but `configs` and `custom_nodes`.
async fn experiment_models(State(state): State<AppState>) -> Result<Response, ApiError> {
    let paths = paths(&state)?;
    let folders: Vec<Json> = paths
        .folder_names()
        .filter(|name| *name != "configs" && *name != "custom_nodes")
        .map(|name| json!({"name": name, "folders": paths.folder_dirs(name)}))
        .collect();
    Ok(json_response(&Json::Array(folders)))
}

/// `[{"name", "pathIndex", "modified", "created", "size"}]`: model files (ComfyUI's model
/// extensions only) of one folder, skipping dotfiles and dot-directories.
async fn experiment_model_files(
    State(state): State<AppState>,
    Path(folder): Path<String>,
) -> Result<Response, ApiError> {
    let paths = paths(&state)?;
    if folder == "configs" || folder == "custom_nodes" || !paths.folder_names().any(|name| name == folder) {
        return Err(ApiError::NotFound);
    }
    let mut files = Vec::new();
    for (index, dir) in paths.folder_dirs(&folder).iter().enumerate() {
        let dir = std::path::Path::new(dir);
        let mut stack = vec![dir.to_path_buf()];
        while let Some(current) = stack.pop() {
            for entry in std::fs::read_dir(&current).into_iter().flatten().flatten() {
                let path = entry.path();
                if entry.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let extension = path
                    .extension()
                    .map(|e| format!(".{}", e.to_string_lossy().to_lowercase()));
                if !extension.is_some_and(|e| easel_nodes::paths::MODEL_EXTENSIONS.contains(&e.as_str())) {
                    continue;
                }
                let mut info = file_info(dir, &path);
                if let Some(object) = info.as_object_mut() {
                    let relative = object.remove("path").unwrap_or_default();
                    let mut ordered = Map::new();
                    ordered.insert("name".into(), relative);
                    ordered.insert("pathIndex".into(), json!(index));
                    ordered.extend(std::mem::take(object));
                    *object = ordered;
                }
                files.push(info);
            }
        }
    }
    Ok(json_response(&Json::Array(files)))
}

async fn folder_paths(State(state): State<AppState>) -> Result<Response, ApiError> {
    let paths = paths(&state)?;
    let map: Map<String, Json> = paths
        .folder_names()
        .map(|name| (name.to_string(), json!(paths.folder_dirs(name))))
        .collect();
    Ok(json_response(&Json::Object(map)))
}

/// Top-level file names of input, output or temp, newest first.
async fn directory_files(State(state): State<AppState>, Path(kind): Path<String>) -> Result<Response, ApiError> {
    let Some(dir) = paths(&state)?.directory_by_type(&kind) else {
        let mut response = json_response(&json!({"error": "Invalid directory type"}));
        *response.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(response);
    };
    let mut files: Vec<(f64, String)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| {
            (
                seconds(e.metadata().and_then(|m| m.modified())),
                e.file_name().to_string_lossy().into_owned(),
            )
        })
        .collect();
    files.sort_by(|a, b| b.0.total_cmp(&a.0));
    Ok(json_response(&json!(files
        .into_iter()
        .map(|(_, name)| name)
        .collect::<Vec<_>>())))
}
