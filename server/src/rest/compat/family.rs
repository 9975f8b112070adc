//! The per-family REST layer many teams put over ComfyUI: `POST /sd15/generate`,
//! `/sdxl/generate`, `/sd3/generate`, `/flux/generate` (base64 JSON in, `{"image_base64"}` out),
//! `/iclight/generate` (relighting with IC-Light on SD1.5), and `/upscale`, `/object_remove`,
//! which need models Easel cannot run yet.

use crate::rest::answers::{encode_as, read_output, wait_for_end};
use crate::rest::generation::submit;
use crate::rest::request::{OutputFormat, RawRequest};
use crate::rest::{JsonAnswer, RestError};
use crate::state::AppState;
use crate::store::tasks::TaskStatus;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::Engine;
use serde_json::{json, Map, Value as Json};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/sd15/generate", post(sd15))
        .route("/sdxl/generate", post(sdxl))
        .route("/sd3/generate", post(sd3))
        .route("/flux/generate", post(flux))
        .route("/upscale", post(upscale))
        .route("/object_remove", post(object_remove))
        .route("/iclight/generate", post(iclight))
}

/// One route per family, each documented on its own.
macro_rules! family_route {
    ($name:ident, $family:literal, $path:literal) => {
        #[utoipa::path(post, path = $path, tag = "family API", operation_id = $family,
                    request_body = crate::rest::compat::schemas::FamilyRequest,
                    responses((status = 200, description = "OK", body = crate::rest::compat::schemas::FamilyAnswer),
                        (status = 400, description = "Bad input: the field is named", body = crate::rest::schemas::ErrorBody),
                        (status = 500, description = "The generation failed", body = crate::rest::schemas::ErrorBody),
                        (status = 501, description = "Not available in Easel yet", body = crate::rest::schemas::ErrorBody)))]
        async fn $name(state: State<AppState>, body: axum::body::Bytes) -> Result<Response, RestError> {
            generate(state, body, $family).await
        }
    };
}

family_route!(sd15, "sd15", "/sd15/generate");
family_route!(sdxl, "sdxl", "/sdxl/generate");
family_route!(sd3, "sd3", "/sd3/generate");
family_route!(flux, "flux", "/flux/generate");

/// Routes whose models Easel cannot run yet: 501 naming what is missing.
macro_rules! not_yet_route {
    ($name:ident, $path:literal, $capability:literal) => {
        #[utoipa::path(post, path = $path, tag = "family API", operation_id = stringify!($name),
                            responses((status = 501, description = "Not available in Easel yet", body = crate::rest::schemas::ErrorBody)))]
        async fn $name() -> RestError {
            RestError::not_yet("route", $capability)
        }
    };
}

not_yet_route!(upscale, "/upscale", "The upscale route (upscale models)");
not_yet_route!(
    object_remove,
    "/object_remove",
    "The object_remove route (the Fooocus inpaint patch)"
);

#[utoipa::path(post, path = "/iclight/generate", tag = "family API", operation_id = "iclight",
            request_body = crate::rest::compat::schemas::IcLightRequest,
            responses((status = 200, description = "OK", body = crate::rest::compat::schemas::FamilyAnswer),
                (status = 400, description = "Bad input: the field is named", body = crate::rest::schemas::ErrorBody),
                (status = 500, description = "The relighting failed", body = crate::rest::schemas::ErrorBody)))]
async fn iclight(state: State<AppState>, body: axum::body::Bytes) -> Result<Response, RestError> {
    let body = RawRequest::from_json(&body)?;
    answer(state, iclight_request(&body.fields)?).await
}

/// The service's defaults for a family: steps, cfg, sampler, scheduler.
fn defaults(family: &str) -> (u32, f64, &'static str, &'static str) {
    match family {
        "flux" => (20, 3.5, "euler", "simple"),
        "sd3" => (28, 4.5, "dpmpp_2m", "sgm_uniform"),
        "sdxl" => (20, 7.0, "dpmpp_2m_sde", "karras"),
        _ => (20, 7.0, "dpmpp_2m", "karras"),
    }
}

/// The service's fields as Easel's request.
pub fn to_request(family: &str, body: &Map<String, Json>) -> Result<RawRequest, RestError> {
    let (steps, cfg, sampler, scheduler) = defaults(family);
    let given = |name: &str| body.get(name).filter(|value| !value.is_null()).cloned();
    let mut fields = Map::new();
    let mut set = |name: &str, value: Option<Json>, default: Json| {
        fields.insert(name.to_string(), value.unwrap_or(default));
    };
    let mode = match given("gen_type").as_ref().and_then(Json::as_str) {
        Some("t2i") => "text2img",
        Some("i2i") => "img2img",
        Some("inpaint") => "inpaint",
        Some(other) => {
            return Err(RestError::field(
                "gen_type",
                format!("`gen_type` is t2i, i2i or inpaint, not `{other}`"),
            ))
        }
        None if given("mask").is_some() => "inpaint",
        None if given("init_image").is_some() => "img2img",
        None => "text2img",
    };
    set("family", None, json!(family));
    set("mode", None, json!(mode));
    set("width", given("width"), json!(1024));
    set("height", given("height"), json!(1024));
    add_shared_fields(body, &mut fields, (steps, cfg, sampler, scheduler, 1.0));
    for (theirs, ours) in [
        ("checkpoint", "model"),
        ("unet", "unet"),
        ("clip", "clip"),
        ("vae", "vae"),
        ("init_image", "image"),
        ("mask", "mask"),
        ("refiner", "refiner"),
        ("controlnet_requests", "controlnets"),
        ("ipadapter_request", "ip_adapter"),
    ] {
        if let Some(value) = given(theirs) {
            fields.insert(ours.into(), value);
        }
    }
    // The family API names the IP-Adapter's encoder at the top of the request.
    if let (Some(Json::Object(ip_adapter)), Some(encoder)) = (fields.get_mut("ip_adapter"), given("clip_vision")) {
        ip_adapter.entry("clip_vision").or_insert(encoder);
    }
    if fields.contains_key("refiner") {
        fields.insert("refine_switch".into(), given("refine_switch").unwrap_or(json!(0.4)));
    }
    if let Some(Json::Array(loras)) = given("lora_requests") {
        let loras: Vec<Json> = loras
            .iter()
            .map(|lora| {
                json!({"name": lora["lora"], "strength_model": lora["strength_model"], "strength_clip": lora["strength_clip"]})
            })
            .collect();
        fields.insert("loras".into(), Json::Array(loras));
    }
    Ok(RawRequest {
        fields,
        files: Vec::new(),
    })
}

/// The relight route's fields as Easel's `relight` request: SD1.5 with an IC-Light model, the
/// service's light-map settings and its defaults (30 steps, cfg 1.5, dpmpp_2m_sde/karras,
/// denoise 0.7).
pub fn iclight_request(body: &Map<String, Json>) -> Result<RawRequest, RestError> {
    match body.get("gen_type") {
        None | Some(Json::Null) => {}
        Some(Json::String(kind)) if kind == "iclight" => {}
        Some(_) => return Err(RestError::field("gen_type", "`gen_type` is iclight on this route")),
    }
    let given = |name: &str| body.get(name).filter(|value| !value.is_null()).cloned();
    let mut relight = Map::new();
    for (theirs, ours) in [
        ("iclight_model", "model"),
        ("light_condition", "light_image"),
        ("background", "background"),
        ("light_strength", "light_strength"),
        ("keep_background", "keep_background"),
        ("remap_min_value", "remap_min"),
        ("remap_max_value", "remap_max"),
    ] {
        if let Some(value) = given(theirs) {
            relight.insert(ours.into(), value);
        }
    }
    let blends: Vec<Json> = [("color", 0.1), ("hue", 0.2)]
        .into_iter()
        .enumerate()
        .map(|(index, (mode, percentage))| {
            json!({
                "mode": given(&format!("blending_mode_{}", index + 1)).unwrap_or(json!(mode)),
                "percentage": given(&format!("blending_percentage_{}", index + 1)).unwrap_or(json!(percentage)),
            })
        })
        .collect();
    relight.insert("blends".into(), Json::Array(blends));
    let mut fields = Map::new();
    fields.insert("family".into(), json!("sd15"));
    fields.insert("mode".into(), json!("relight"));
    fields.insert("relight".into(), Json::Object(relight));
    add_shared_fields(body, &mut fields, (30, 1.5, "dpmpp_2m_sde", "karras", 0.7));
    for (theirs, ours) in [("checkpoint", "model"), ("init_image", "image"), ("mask", "mask")] {
        if let Some(value) = given(theirs) {
            fields.insert(ours.into(), value);
        }
    }
    Ok(RawRequest {
        fields,
        files: Vec::new(),
    })
}

/// The fields every route of the service reads, as Easel's, with the service's defaults (the
/// route's steps, cfg, sampler, scheduler and denoise).
fn add_shared_fields(
    body: &Map<String, Json>,
    fields: &mut Map<String, Json>,
    (steps, cfg, sampler, scheduler, denoise): (u32, f64, &str, &str, f64),
) {
    let given = |name: &str| body.get(name).filter(|value| !value.is_null()).cloned();
    for (theirs, ours, default) in [
        ("prompt_positive", "prompt", json!("high quality, 4K, expert.")),
        (
            "prompt_negative",
            "negative_prompt",
            json!("Low quality, Blur, artifact"),
        ),
        ("seed", "seed", json!(-1)),
        ("batch_size", "batch_size", json!(1)),
        ("steps", "steps", json!(steps)),
        ("cfg", "cfg", json!(cfg)),
        ("sampler_name", "sampler", json!(sampler)),
        ("scheduler", "scheduler", json!(scheduler)),
        ("denoise", "denoise", json!(denoise)),
    ] {
        fields.insert(ours.to_string(), given(theirs).unwrap_or(default));
    }
}

async fn generate(
    state: State<AppState>,
    body: axum::body::Bytes,
    family: &'static str,
) -> Result<Response, RestError> {
    let body = RawRequest::from_json(&body)?;
    answer(state, to_request(family, &body.fields)?).await
}

/// Runs a request to its end and answers as the service does: the first image as PNG base64.
async fn answer(State(state): State<AppState>, raw: RawRequest) -> Result<Response, RestError> {
    let (task, _) = submit(&state, raw).await?;
    let task = wait_for_end(&state, &task.id).await?;
    if task.status != TaskStatus::Succeeded {
        let message = task
            .error
            .as_ref()
            .and_then(|error| error["message"].as_str())
            .unwrap_or("it was cancelled");
        return Err(RestError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "task_failed",
            format!("the generation failed: {message}"),
        ));
    }
    let images = task
        .images
        .iter()
        .map(|image| {
            let png = encode_as(read_output(&state, image)?, OutputFormat::Png)?;
            Ok(base64::engine::general_purpose::STANDARD.encode(png))
        })
        .collect::<Result<Vec<_>, RestError>>()?;
    Ok(JsonAnswer(json!({
        "image_base64": images.first(),
        "images_base64": images,
        "task_id": task.id,
        "seed": task.spec["seed"],
    }))
    .into_response())
}
