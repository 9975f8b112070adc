//! Files of the input, output and temp directories: `GET /view`, `POST /upload/image`,
//! `POST /upload/mask` (protocol §1.4–1.6).
//!
//! Beyond ComfyUI's checks, every path a client names is a plain relative path (no root, `..`,
//! backslash or NUL) and is checked again after symlinks are resolved; only images, video and
//! audio are served inline, with `nosniff`.

use super::{json_response, paths, ApiError};
use crate::state::AppState;
use axum::extract::{Multipart, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use easel_nodes::image::io::{replace_alpha, view_channel, view_preview, PreviewFormat};
use easel_nodes::paths::{contained_once_created, safe_relative, split_annotation, write_replacing, Paths};
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/view", get(view))
        .route("/upload/image", post(upload_image))
        .route("/upload/mask", post(upload_mask))
}

/// A relative path a client may name: no root, no `..`, no backslash, no NUL.
fn client_path(text: &str) -> Option<PathBuf> {
    if text.contains('\\') || text.contains('\0') {
        return None;
    }
    safe_relative(text)
}

/// `file` still lies in `dir` once symlinks are resolved (for paths that exist).
fn contained(dir: &Path, file: &Path) -> bool {
    match (dir.canonicalize(), file.canonicalize()) {
        (Ok(dir), Ok(file)) => file.starts_with(dir),
        _ => true,
    }
}

/// The content type from the file name, and whether a browser may show it inline.
fn content_type(name: &str) -> (&'static str, bool) {
    let extension = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    let media = match extension.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        "tif" | "tiff" => "image/tiff",
        "avif" => "image/avif",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        "mp3" => "audio/mpeg",
        "wav" => "audio/x-wav",
        "flac" => "audio/flac",
        "ogg" => "audio/ogg",
        _ => return ("application/octet-stream", false),
    };
    (media, true)
}

fn file_response(bytes: Vec<u8>, media: &str, name: &str, inline: bool) -> Response {
    let name = name.replace(['"', '\r', '\n'], "_");
    let disposition = if inline {
        format!("filename=\"{name}\"")
    } else {
        format!("attachment; filename=\"{name}\"")
    };
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, media.to_string()),
            (header::CONTENT_DISPOSITION, disposition),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
        ],
        bytes,
    )
        .into_response()
}

/// `GET /view?filename=…&type=…&subfolder=…&preview=…&channel=…`.
async fn view(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let paths = paths(&state)?;
    let requested = query.get("filename").ok_or(ApiError::NotFound)?;
    let (filename, annotation) = split_annotation(requested);
    let kind = annotation.unwrap_or_else(|| query.get("type").map(String::as_str).unwrap_or("output"));
    if filename.is_empty() || filename.starts_with('/') || filename.contains("..") || filename.contains('\0') {
        return Err(ApiError::BadRequest);
    }
    let base = paths.directory_by_type(kind).ok_or(ApiError::BadRequest)?;
    let mut dir = base.to_path_buf();
    if let Some(subfolder) = query.get("subfolder").filter(|s| !s.is_empty()) {
        dir = dir.join(client_path(subfolder).ok_or(ApiError::Forbidden)?);
    }
    // ComfyUI drops directory parts of the filename.
    let filename = filename.rsplit(['/', '\\']).next().unwrap_or_default();
    let file = dir.join(client_path(filename).ok_or(ApiError::NotFound)?);
    if !file.is_file() {
        return Err(ApiError::NotFound);
    }
    if !contained(base, &file) {
        return Err(ApiError::Forbidden);
    }
    let bytes = tokio::fs::read(&file).await.map_err(|_| ApiError::NotFound)?;
    let channel = query.get("channel").map(String::as_str).unwrap_or("rgba");
    if let Some(preview) = query.get("preview") {
        let mut parts = preview.split(';');
        let format = parts.next().unwrap_or_default();
        let quality = preview
            .rsplit(';')
            .next()
            .and_then(|q| q.parse::<u8>().ok())
            .unwrap_or(90);
        // ComfyUI forces WebP only when a `channel` parameter asks for alpha.
        let asks_alpha = query.get("channel").is_some_and(|c| c.contains('a'));
        let format = if format == "jpeg" && !asks_alpha {
            PreviewFormat::Jpeg
        } else {
            PreviewFormat::WebP
        };
        let (bytes, media) =
            view_preview(&bytes, format, quality, channel == "rgb").map_err(|_| ApiError::BadRequest)?;
        return Ok(file_response(bytes, media, filename, true));
    }
    if channel == "rgb" || channel == "a" {
        let bytes = view_channel(&bytes, channel).map_err(|_| ApiError::BadRequest)?;
        return Ok(file_response(bytes, "image/png", filename, true));
    }
    let (media, inline) = content_type(filename);
    let metadata = tokio::fs::metadata(&file).await.map_err(|_| ApiError::NotFound)?;
    Ok(stored_file(bytes, media, filename, inline, &metadata, &headers))
}

/// A file as aiohttp's `FileResponse` sends it: `ETag` (`"<mtime ns hex>-<size hex>"`),
/// `Last-Modified` and `Accept-Ranges`; 304 for a matching `If-None-Match`; 206 for one `Range`.
fn stored_file(
    bytes: Vec<u8>,
    media: &str,
    name: &str,
    inline: bool,
    metadata: &std::fs::Metadata,
    request: &HeaderMap,
) -> Response {
    let modified = metadata.modified().ok();
    let nanos = modified
        .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let etag = format!("\"{nanos:x}-{:x}\"", bytes.len());
    let if_none_match = request.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok());
    if if_none_match.is_some_and(|tags| tags.split(',').any(|t| t.trim() == etag)) {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    let length = bytes.len() as u64;
    let range = request
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="));
    let (status, body, content_range) = match range.map(|r| byte_range(r, length)) {
        None => (StatusCode::OK, bytes, None),
        Some(Some((start, end))) => (
            StatusCode::PARTIAL_CONTENT,
            bytes[start as usize..=end as usize].to_vec(),
            Some(format!("bytes {start}-{end}/{length}")),
        ),
        Some(None) => (
            StatusCode::RANGE_NOT_SATISFIABLE,
            Vec::new(),
            Some(format!("bytes */{length}")),
        ),
    };
    let mut response = file_response(body, media, name, inline);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    let values = [
        (header::ETAG, Some(etag)),
        (header::LAST_MODIFIED, modified.map(httpdate::fmt_http_date)),
        (header::ACCEPT_RANGES, Some("bytes".to_string())),
        (header::CONTENT_RANGE, content_range),
    ];
    for (name, value) in values {
        if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
            headers.insert(name, value);
        }
    }
    response
}

/// One `start-end`, `start-` or `-suffix` range within `length` bytes, inclusive.
fn byte_range(range: &str, length: u64) -> Option<(u64, u64)> {
    let last = length.checked_sub(1)?;
    let (start, end) = range.split_once('-')?;
    let (start, end) = match (start.trim(), end.trim()) {
        ("", suffix) => (length.saturating_sub(suffix.parse::<u64>().ok()?), last),
        (start, "") => (start.parse::<u64>().ok()?, last),
        (start, end) => (start.parse::<u64>().ok()?, end.parse::<u64>().ok()?.min(last)),
    };
    (start <= end).then_some((start, end))
}

/// The parts of an upload form.
#[derive(Default)]
struct UploadForm {
    file: Option<(String, Vec<u8>)>,
    fields: HashMap<String, String>,
}

async fn read_form(mut multipart: Multipart) -> Result<UploadForm, ApiError> {
    let mut form = UploadForm::default();
    while let Some(field) = multipart.next_field().await.map_err(|_| ApiError::BadRequest)? {
        let name = field.name().unwrap_or_default().to_string();
        if name == "image" {
            let filename = field.file_name().unwrap_or_default().to_string();
            let bytes = field.bytes().await.map_err(|_| ApiError::BadRequest)?;
            form.file = Some((filename, bytes.to_vec()));
        } else {
            let value = field.text().await.map_err(|_| ApiError::BadRequest)?;
            form.fields.insert(name, value);
        }
    }
    Ok(form)
}

/// Where an upload goes and under which name: ComfyUI's `image_upload`. Returns the response body
/// and the path to write, or `None` when the same bytes are already there under that name.
fn place_upload(paths: &Paths, form: &UploadForm) -> Result<(Json, Option<PathBuf>), ApiError> {
    let (filename, bytes) = form.file.as_ref().ok_or(ApiError::BadRequest)?;
    if filename.is_empty() || filename.contains(['/', '\\', '\0']) || filename == ".." || filename == "." {
        return Err(ApiError::BadRequest);
    }
    let kind = form.fields.get("type").map(String::as_str).unwrap_or("input");
    let base = paths.directory_by_type(kind).ok_or(ApiError::BadRequest)?;
    let subfolder = form.fields.get("subfolder").cloned().unwrap_or_default();
    let folder = if subfolder.is_empty() {
        base.to_path_buf()
    } else {
        base.join(client_path(&subfolder).ok_or(ApiError::BadRequest)?)
    };
    // Checked before creating, so a symlinked subfolder cannot make folders elsewhere.
    if !contained_once_created(base, &folder) {
        return Err(ApiError::BadRequest);
    }
    std::fs::create_dir_all(&folder).map_err(|_| ApiError::BadRequest)?;
    if !contained(base, &folder) {
        return Err(ApiError::BadRequest);
    }
    let overwrite = matches!(form.fields.get("overwrite").map(String::as_str), Some("true" | "1"));
    let (stem, extension) = match filename.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => (stem.to_string(), format!(".{ext}")),
        _ => (filename.clone(), String::new()),
    };
    let mut name = filename.clone();
    let mut target = Some(folder.join(&name));
    if !overwrite {
        let digest = Sha256::digest(bytes);
        let mut copy = 1;
        while let Some(path) = target.as_ref().filter(|p| p.exists()) {
            if std::fs::read(path).is_ok_and(|existing| Sha256::digest(existing) == digest) {
                target = None;
                break;
            }
            name = format!("{stem} ({copy}){extension}");
            target = Some(folder.join(&name));
            copy += 1;
        }
    }
    Ok((json!({"name": name, "subfolder": subfolder, "type": kind}), target))
}

/// Writes an upload with [`write_replacing`]: a symlink under the upload's name is replaced, never
/// followed out of the folder.
async fn write_upload(path: PathBuf, bytes: Vec<u8>) -> Result<(), ApiError> {
    tokio::task::spawn_blocking(move || write_replacing(&path, &bytes))
        .await
        .map_err(|_| ApiError::Malformed)?
        .map_err(|_| ApiError::BadRequest)
}

async fn upload_image(State(state): State<AppState>, multipart: Multipart) -> Result<Response, ApiError> {
    let mut form = read_form(multipart).await?;
    let (body, target) = place_upload(paths(&state)?, &form)?;
    if let (Some(path), Some((_, bytes))) = (target, form.file.take()) {
        write_upload(path, bytes).await?;
    }
    Ok(json_response(&body))
}

/// The image an upload mask applies to (`original_ref`), if it names one that exists.
fn original_image(paths: &Paths, original_ref: &str) -> Option<PathBuf> {
    let reference: Json = serde_json::from_str(original_ref).ok()?;
    let requested = reference["filename"].as_str()?;
    let (filename, annotation) = split_annotation(requested);
    let kind = annotation.unwrap_or_else(|| reference["type"].as_str().unwrap_or("output"));
    let dir = paths.directory_by_type(kind)?;
    let mut folder = dir.to_path_buf();
    if let Some(subfolder) = reference["subfolder"].as_str().filter(|s| !s.is_empty()) {
        folder = folder.join(client_path(subfolder)?);
    }
    let file = folder.join(client_path(filename)?);
    (file.is_file() && contained(dir, &file)).then_some(file)
}

/// Like `/upload/image`, but stores the original image with the upload's alpha. As in ComfyUI,
/// an unusable `original_ref` writes nothing and still answers 200.
async fn upload_mask(State(state): State<AppState>, multipart: Multipart) -> Result<Response, ApiError> {
    let form = read_form(multipart).await?;
    let paths = paths(&state)?;
    let (body, target) = place_upload(paths, &form)?;
    let original = form.fields.get("original_ref").and_then(|r| original_image(paths, r));
    if let (Some(path), Some(original), Some((_, mask))) = (target, original, &form.file) {
        let original = tokio::fs::read(&original).await.map_err(|_| ApiError::BadRequest)?;
        let composed = replace_alpha(&original, mask).map_err(|_| ApiError::BadRequest)?;
        write_upload(path, composed).await?;
    }
    Ok(json_response(&body))
}
