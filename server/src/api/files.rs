//! `GET /view` (protocol §1.6): files of the input, output and temp directories.

use super::ApiError;
use crate::state::AppState;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use easel_nodes::paths::{safe_relative, Paths};
use std::collections::HashMap;

pub fn routes() -> Router<AppState> {
    Router::new().route("/view", get(view))
}

/// A content type from the file name; types a browser would execute are served as bytes.
fn content_type(name: &str) -> &'static str {
    let extension = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match extension.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        "tif" | "tiff" => "image/tiff",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mp3" => "audio/mpeg",
        "wav" => "audio/x-wav",
        "flac" => "audio/flac",
        "json" => "application/json",
        "txt" => "text/plain",
        _ => "application/octet-stream",
    }
}

async fn view(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let paths = state.runtime.services.get::<Paths>().ok_or(ApiError::NotFound)?;
    let requested = query.get("filename").ok_or(ApiError::NotFound)?;
    let (filename, kind) = [" [output]", " [input]", " [temp]"]
        .iter()
        .find_map(|suffix| {
            requested
                .strip_suffix(suffix)
                .map(|name| (name, &suffix[2..suffix.len() - 1]))
        })
        .unwrap_or((
            requested.as_str(),
            query.get("type").map(String::as_str).unwrap_or("output"),
        ));
    if filename.is_empty() || filename.starts_with('/') || filename.contains("..") {
        return Err(ApiError::BadRequest);
    }
    let mut dir = paths.directory_by_type(kind).ok_or(ApiError::BadRequest)?.to_path_buf();
    if let Some(subfolder) = query.get("subfolder").filter(|s| !s.is_empty()) {
        dir = dir.join(safe_relative(subfolder).ok_or(ApiError::Forbidden)?);
    }
    // ComfyUI drops directory parts of the filename.
    let filename = filename.rsplit(['/', '\\']).next().unwrap_or_default();
    let file = dir.join(safe_relative(filename).ok_or(ApiError::NotFound)?);
    if !file.is_file() {
        return Err(ApiError::NotFound);
    }
    let bytes = tokio::fs::read(&file).await.map_err(|_| ApiError::NotFound)?;
    let disposition = format!("filename=\"{}\"", filename.replace('"', "%22"));
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type(filename).to_string()),
            (header::CONTENT_DISPOSITION, disposition),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_string()),
        ],
        bytes,
    )
        .into_response())
}
