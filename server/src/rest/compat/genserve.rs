//! GenServe's routes: `POST /generate` (JSON, images base64), `POST /generate/img2img` (a
//! multipart form), `GET /status`, and `GET /models` (only when GenServe is the one drop-in API
//! on; ComfyUI's `/models` wins otherwise). Answers and errors in GenServe's shape:
//! `{"success", "task_id", "image_base64", "error", "elapsed_time", "gpu_id", "model_id", "mode"}`,
//! 400 for bad parameters, 500 when the generation fails.

use crate::rest::answers::{encode_as, read_output, wait_for_end};
use crate::rest::catalog::ModelEntry;
use crate::rest::generation::{accept_generation, read_request};
use crate::rest::request::{Family, OutputFormat, RawRequest};
use crate::rest::{paths, JsonAnswer, RestError};
use crate::state::AppState;
use crate::store::tasks::TaskStatus;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;
use serde_json::{json, Map, Value as Json};
use std::time::Instant;

pub fn routes(owns_models: bool) -> Router<AppState> {
    let router = Router::new()
        .route("/generate", post(generate))
        .route("/generate/img2img", post(generate_img2img))
        .route("/status", get(status));
    if owns_models {
        router.route("/models", get(models))
    } else {
        router
    }
}

/// GenServe's answer to a request that did not produce an image.
fn failure(status: StatusCode, model_id: &Json, mode: &Json, error: &str) -> Response {
    let body = json!({
        "success": false, "task_id": null, "image_base64": null, "error": error,
        "elapsed_time": 0.0, "gpu_id": null, "model_id": model_id, "mode": mode,
    });
    (status, JsonAnswer(body)).into_response()
}

/// The model a GenServe `model_id` means: a file of that name, or the first FLUX checkpoint of
/// the variant its id names (`…schnell…`, `…fill…`, else dev).
fn resolve_model(models: &[ModelEntry], model_id: &str, fill: bool) -> Option<String> {
    if let Some(entry) = models.iter().find(|entry| entry.name == model_id) {
        return Some(entry.name.clone());
    }
    let id = model_id.to_ascii_lowercase();
    let variant = if fill || id.contains("fill") {
        "fill"
    } else if id.contains("schnell") {
        "schnell"
    } else {
        "dev"
    };
    models
        .iter()
        .find(|entry| entry.folder == "checkpoints" && entry.family == Family::Flux && entry.variant == variant)
        .map(|entry| entry.name.clone())
}

/// GenServe's fields as Easel's request.
fn to_request(state: &AppState, raw: RawRequest) -> Result<RawRequest, String> {
    let body = raw.fields;
    let given = |name: &str| body.get(name).filter(|value| !value.is_null()).cloned();
    let mode = given("mode")
        .and_then(|mode| mode.as_str().map(str::to_string))
        .unwrap_or("text2img".into());
    let easel_mode = match mode.as_str() {
        "text2img" => "text2img",
        "img2img" => "img2img",
        "fill" => "inpaint",
        "controlnet" => return Err("the controlnet mode is not available in Easel yet".into()),
        other => return Err(format!("unknown mode `{other}`: text2img, img2img, fill or controlnet")),
    };
    let model_id = given("model_id")
        .and_then(|id| id.as_str().map(str::to_string))
        .unwrap_or("flux1-dev".into());
    let paths = paths(state).map_err(|error| error.message)?;
    let models = state.model_catalog.models(paths);
    let model = resolve_model(&models, &model_id, mode == "fill")
        .ok_or_else(|| format!("model `{model_id}` is not available: put a FLUX checkpoint in models/checkpoints"))?;
    let mut fields = Map::new();
    let mut set = |name: &str, value: Option<Json>, default: Json| {
        fields.insert(name.to_string(), value.unwrap_or(default));
    };
    set("family", None, json!("flux"));
    set("mode", None, json!(easel_mode));
    set("model", None, json!(model));
    set("prompt", given("prompt"), json!(""));
    set("width", given("width"), json!(1024));
    set("height", given("height"), json!(1024));
    set("steps", given("num_inference_steps"), json!(50));
    set("cfg", given("cfg"), json!(3.5));
    set("seed", given("seed"), json!(42));
    set("priority", given("priority"), json!(0));
    if mode == "img2img" {
        set("denoise", given("strength"), json!(0.8));
    }
    let mut files = Vec::new();
    for (theirs, ours) in [("input_image", "image"), ("mask_image", "mask")] {
        if let Some(value) = given(theirs) {
            fields.insert(ours.into(), value);
        }
        files.extend(
            raw.files
                .iter()
                .filter(|(name, _)| name == theirs)
                .map(|(_, bytes)| (ours.to_string(), bytes.clone())),
        );
    }
    Ok(RawRequest { fields, files })
}

#[utoipa::path(post, path = "/generate", tag = "GenServe", operation_id = "genserve_generate",
    request_body = crate::rest::compat::schemas::GenServeRequest,
    responses((status = 200, description = "OK", body = crate::rest::compat::schemas::GenServeAnswer),
        (status = 400, description = "Bad parameters", body = crate::rest::compat::schemas::GenServeAnswer),
        (status = 500, description = "The generation failed", body = crate::rest::compat::schemas::GenServeAnswer)))]
async fn generate(State(state): State<AppState>, request: Request) -> Response {
    let started = Instant::now();
    let raw = match read_request(request, &state).await {
        Ok(raw) => raw,
        Err(error) => return failure(StatusCode::BAD_REQUEST, &Json::Null, &Json::Null, &error.message),
    };
    let model_id = raw.fields.get("model_id").cloned().unwrap_or(json!("flux1-dev"));
    let mode = raw.fields.get("mode").cloned().unwrap_or(json!("text2img"));
    let accepting = state.clone();
    let accepted = tokio::task::spawn_blocking(move || {
        let raw = to_request(&accepting, raw).map_err(|message| RestError::invalid(None, message))?;
        accept_generation(&accepting, raw)
    })
    .await;
    let task = match accepted {
        Ok(Ok((task, _))) => task,
        Ok(Err(error)) => {
            let status = if error.status.is_client_error() {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            let message = match &error.field {
                Some(field) => format!("{field}: {}", error.message),
                None => error.message,
            };
            return failure(status, &model_id, &mode, &message);
        }
        Err(_) => {
            return failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                &model_id,
                &mode,
                "the request could not be handled",
            )
        }
    };
    let finished = match wait_for_end(&state, &task.id).await {
        Ok(task) => task,
        Err(error) => return failure(StatusCode::INTERNAL_SERVER_ERROR, &model_id, &mode, &error.message),
    };
    let image = match finished.status {
        TaskStatus::Succeeded => finished
            .images
            .first()
            .ok_or_else(|| RestError::invalid(None, "no image was saved"))
            .and_then(|image| encode_as(read_output(&state, image)?, OutputFormat::Png)),
        _ => Err(RestError::invalid(
            None,
            finished
                .error
                .as_ref()
                .and_then(|error| error["message"].as_str())
                .unwrap_or("the generation was cancelled"),
        )),
    };
    match image {
        Ok(png) => JsonAnswer(json!({
            "success": true,
            "task_id": finished.id,
            "image_base64": base64::engine::general_purpose::STANDARD.encode(png),
            "error": null,
            "elapsed_time": started.elapsed().as_secs_f64(),
            "gpu_id": 0,
            "model_id": model_id,
            "mode": mode,
        }))
        .into_response(),
        Err(error) => failure(StatusCode::INTERNAL_SERVER_ERROR, &model_id, &mode, &error.message),
    }
}

/// The same as `/generate`, as a multipart form with the images as files.
#[utoipa::path(post, path = "/generate/img2img", tag = "GenServe", operation_id = "genserve_generate_img2img",
    request_body(content = crate::rest::compat::schemas::GenServeRequest, content_type = "multipart/form-data"),
    responses((status = 200, description = "OK", body = crate::rest::compat::schemas::GenServeAnswer),
        (status = 400, description = "Bad parameters", body = crate::rest::compat::schemas::GenServeAnswer),
        (status = 500, description = "The generation failed", body = crate::rest::compat::schemas::GenServeAnswer)))]
async fn generate_img2img(state: State<AppState>, request: Request) -> Response {
    generate(state, request).await
}

#[utoipa::path(get, path = "/status", tag = "GenServe", operation_id = "genserve_status",
    responses((status = 200, description = "OK", body = crate::rest::compat::schemas::GenServeStatus)))]
async fn status(State(state): State<AppState>) -> Response {
    let alive = state.metrics.worker_alive.load(std::sync::atomic::Ordering::SeqCst);
    JsonAnswer(json!({
        "status": "running",
        "concurrent_manager": {
            "alive_processes": u8::from(alive),
            "dead_processes": u8::from(!alive),
            "total_restarts": 0,
            "global_queue_size": state.queue.remaining(),
        },
    }))
    .into_response()
}

/// Served only when GenServe is the one drop-in API on (else ComfyUI's `/models`).
#[utoipa::path(get, path = "/models", tag = "GenServe", operation_id = "genserve_models",
    responses((status = 200, description = "OK", body = [crate::rest::compat::schemas::GenServeModel])))]
async fn models(State(state): State<AppState>) -> Result<Response, RestError> {
    let paths = paths(&state)?.clone();
    let catalog = state.clone();
    let models = tokio::task::spawn_blocking(move || catalog.model_catalog.models(&paths))
        .await
        .unwrap_or_default();
    let busy = state.queue.running().is_some();
    let listed: Vec<Json> = models
        .iter()
        .filter(|entry| entry.family == Family::Flux && entry.folder == "checkpoints")
        .map(|entry| {
            let features: Vec<&str> = if entry.variant == "fill" {
                vec!["fill"]
            } else {
                vec!["text2img", "img2img"]
            };
            json!({
                "model_id": entry.name,
                "model_name": format!("FLUX.1 {}", entry.variant),
                "description": format!("{} ({})", entry.name, entry.variant),
                "total_gpu_processes": 1,
                "available_gpu_processes": u8::from(!busy),
                "supported_features": features,
            })
        })
        .collect();
    Ok(JsonAnswer(Json::Array(listed)).into_response())
}
