//! A generation request becomes a queued task: its fields read (JSON or multipart), checked,
//! its model and styles resolved, its images stored by content hash, its prompt built from the
//! bundled workflow and validated like `POST /prompt`, then the task and its prompt stored in one
//! transaction and queued. The `/v1` route and the drop-in routes all come through here.

use super::catalog::{default_model, presets, styles};
use super::recipes::{build, workflow_for, BuiltPrompt, Ingredients, WORKFLOW_VERSION};
use super::request::{
    parse, ControlKind, Family, GenerateRequest, Mode, OutputFormat, RawRequest, ReturnStyle, UploadedImage,
};
use super::tasks::view_url;
use super::{now_ms, paths, RestError};
use crate::queue::QueueItem;
use crate::state::AppState;
use crate::store::tasks::{StoredTask, TaskStatus};
use axum::body::Bytes;
use axum::extract::multipart::{Field, MultipartError};
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, StatusCode};
use easel_engine::{validate_prompt, Prompt, ValidationFailure};
use easel_nodes::controlnet::nodes::is_union_controlnet;
use easel_nodes::packs::controlnet_aux::{installed_depth_anything_v2, DEPTH_ANYTHING_V2_FOLDER};
use easel_nodes::paths::{write_replacing, Paths};
use serde_json::{json, Map, Value as Json};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// How a request wants its images back.
#[derive(Debug, Clone, Copy)]
pub struct AnswerStyle {
    pub stream: bool,
    pub run_async: bool,
    pub return_style: ReturnStyle,
    pub output_format: OutputFormat,
}

/// The raw fields of a JSON body or a multipart form.
pub async fn read_request(request: Request, state: &AppState) -> Result<RawRequest, RestError> {
    let multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("multipart/form-data"));
    let unreadable =
        |error: &dyn std::fmt::Display| RestError::invalid(None, format!("the request could not be read: {error}"));
    if !multipart {
        let body = Bytes::from_request(request, state)
            .await
            .map_err(|error| unreadable(&error))?;
        return RawRequest::from_json(&body);
    }
    // The body's length bounds a file's (capped: the header is the client's word).
    let size_hint = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<usize>().ok())
        .unwrap_or(0)
        .min(state.settings.max_upload_size);
    let mut form = Multipart::from_request(request, state)
        .await
        .map_err(|error| unreadable(&error))?;
    let mut raw = RawRequest::default();
    while let Some(field) = form.next_field().await.map_err(|error| unreadable(&error))? {
        let name = field.name().unwrap_or_default().to_string();
        if field.file_name().is_some() {
            let bytes = read_file(field, size_hint).await.map_err(|error| unreadable(&error))?;
            raw.files.push((name, bytes));
        } else {
            let text = field.text().await.map_err(|error| unreadable(&error))?;
            raw.add_form_text(name, text);
        }
    }
    Ok(raw)
}

/// A file part's bytes. A part that arrived whole is the multipart reader's own buffer, not a
/// copy; one in pieces is copied as they come into one buffer, sized from the request's length
/// (`size_hint`) so it is not grown by copying again.
async fn read_file(mut field: Field<'_>, size_hint: usize) -> Result<Bytes, MultipartError> {
    let Some(first) = field.chunk().await? else {
        return Ok(Bytes::new());
    };
    let Some(second) = field.chunk().await? else {
        return Ok(first);
    };
    let mut whole = Vec::with_capacity(size_hint.max(first.len() + second.len()));
    whole.extend_from_slice(&first);
    whole.extend_from_slice(&second);
    drop((first, second));
    while let Some(piece) = field.chunk().await? {
        whole.extend_from_slice(&piece);
    }
    Ok(Bytes::from(whole))
}

/// [`accept_generation`] off the async workers (it validates and writes the store).
pub async fn submit(state: &AppState, raw: RawRequest) -> Result<(StoredTask, AnswerStyle), RestError> {
    let accepting = state.clone();
    tokio::task::spawn_blocking(move || accept_generation(&accepting, raw))
        .await
        .map_err(|_| {
            RestError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the request could not be handled",
            )
        })?
}

/// Checks a request, builds and validates its prompt, stores its images and queues it as a task.
pub fn accept_generation(state: &AppState, mut raw: RawRequest) -> Result<(StoredTask, AnswerStyle), RestError> {
    let paths = paths(state)?;
    if let Some(name) = raw.fields.get("preset").filter(|value| !value.is_null()) {
        let name = name.as_str().unwrap_or_default().to_string();
        let presets = presets(paths);
        let preset = presets
            .get(&name)
            .ok_or_else(|| RestError::field("preset", format!("no preset named `{name}` (see /v1/presets)")))?;
        raw.apply_preset(&preset.fields);
    }
    let request = parse(&raw, state.settings.max_upload_size)?;
    if let Some(limit) = state.settings.max_queue {
        let depth = state.queue.remaining();
        if depth >= limit {
            return Err(RestError {
                retry_after: Some(5),
                ..RestError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "queue_full",
                    format!("the queue is full ({depth} of {limit} prompts): try again shortly"),
                )
            });
        }
    }
    let webhooks = &state.settings.webhooks;
    let webhook_url = request.webhook_url.clone().or_else(|| webhooks.default_url.clone());
    if let Some(url) = &request.webhook_url {
        crate::outbound::check_url(url, webhooks.allow_private)
            .map_err(|error| RestError::field("webhook_url", error))?;
    }
    let workflow_name = workflow_for(&request)?;
    let checkpoint = resolve_checkpoint(state, paths, &request)?;
    let depth_checkpoint = if request
        .controlnets
        .iter()
        .any(|control| control.kind == ControlKind::Depth)
    {
        Some(depth_checkpoint(paths)?)
    } else {
        None
    };
    // Read only when asked for: most requests name none.
    let all_styles = if request.styles.is_empty() {
        Default::default()
    } else {
        styles(paths)
    };
    let chosen_styles = request
        .styles
        .iter()
        .map(|name| {
            all_styles
                .get(name)
                .cloned()
                .ok_or_else(|| RestError::field("styles", format!("no style named `{name}` (see /v1/styles)")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let seed = request.seed.unwrap_or_else(random_seed);
    // Time-ordered (UUID v7): the task's rows join the store's id indexes at their end, where
    // the pages are already at hand, rather than at a random leaf (fewer pages read and written).
    let id = uuid::Uuid::now_v7().to_string();
    let stored_images = StoredInputs::write(paths, &request)?;
    // A folder per day, as FooocusAPI keeps its outputs.
    let output_prefix = format!(
        "rest/{}/{}_{}",
        chrono::Utc::now().date_naive(),
        request.family.name(),
        request.mode.name()
    );
    let control_images = stored_images
        .controls
        .iter()
        .map(|own| own.as_deref().or(stored_images.image.as_deref()))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| {
            stored_images.remove_new();
            RestError::field(
                "controlnets",
                "a ControlNet without its own `image` needs the request's `image`",
            )
        })?;
    // Union ControlNets take an inpaint hint's masked pixels black, as xinsir's workflows mark them.
    let union_inpaint_controls: Vec<bool> = request
        .controlnets
        .iter()
        .map(|control| {
            control.kind == ControlKind::Inpaint
                && paths
                    .full_path("controlnet", &control.model)
                    .is_some_and(|path| is_union_controlnet(&path))
        })
        .collect();
    let ingredients = Ingredients {
        checkpoint: checkpoint.as_deref(),
        seed,
        image: stored_images.image.as_deref(),
        mask: stored_images.mask.as_deref(),
        control_images: &control_images,
        ip_adapter_images: &stored_images.ip_adapter_images,
        ip_adapter_negatives: &stored_images.ip_adapter_negatives,
        union_inpaint_controls: &union_inpaint_controls,
        depth_checkpoint,
        light_image: stored_images.light_image.as_deref(),
        background: stored_images.background.as_deref(),
        styles: &chosen_styles,
        output_prefix: &output_prefix,
    };
    let extra_data = match raw.fields.get("client_id").and_then(Json::as_str) {
        Some(client) => json!({"client_id": client}),
        None => json!({}),
    };
    let queued = build(&request, workflow_name, &ingredients).and_then(|mut built| {
        let validated = validate(state, &mut built)?;
        let spec = json!({
            "request": sanitized_request(raw.fields, &request, checkpoint.as_deref(), &stored_images, seed),
            "seed": seed,
            "workflow": format!("{WORKFLOW_VERSION}/{workflow_name}"),
        });
        let task = StoredTask {
            id: id.clone(),
            status: TaskStatus::Pending,
            priority: request.priority,
            spec,
            queued_at: now_ms(),
            started_at: None,
            finished_at: None,
            images: Vec::new(),
            error: None,
            webhook_url: webhook_url.clone(),
        };
        let number = state.queue.next_number(false);
        let item = QueueItem {
            number: number as f64,
            number_json: json!(number),
            priority: request.priority,
            prompt_id: id.clone(),
            validated,
            extra_data,
        };
        state.store.enqueue_task(&item.to_stored(), &task)?;
        Ok((task, item))
    });
    let (task, item) = match queued {
        Ok(queued) => queued,
        Err(error) => {
            stored_images.remove_new();
            return Err(error);
        }
    };
    state.queue.put(item, |remaining| state.broadcast_status(remaining));
    let style = AnswerStyle {
        stream: request.stream,
        run_async: request.run_async,
        return_style: request.return_style,
        output_format: request.output_format,
    };
    Ok((task, style))
}

/// A seed that JavaScript clients can hold exactly (below 2⁵³).
fn random_seed() -> u64 {
    let bytes = *uuid::Uuid::new_v4().as_bytes();
    u64::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], 0]) & ((1 << 53) - 1)
}

/// The checkpoint to load: the request's `model`, checked against its family and mode, or the
/// family's default; `None` when the request names split files.
fn resolve_checkpoint(state: &AppState, paths: &Paths, request: &GenerateRequest) -> Result<Option<String>, RestError> {
    if request.unet.is_some() {
        return Ok(None);
    }
    let family = request.family;
    if let Some(name) = &request.model {
        if let Some(entry) = state.model_catalog.find(paths, name) {
            if entry.folder != "checkpoints" {
                return Err(RestError::field(
                    "model",
                    format!("`{name}` holds only a diffusion model: name it as `unet`, with `clip` and `vae`"),
                ));
            }
            if entry.family != family {
                return Err(RestError::field(
                    "model",
                    format!("`{name}` is a {} model, not {}", entry.family.name(), family.name()),
                ));
            }
            if !entry.modes().contains(&request.mode) {
                return Err(RestError::field(
                    "model",
                    format!(
                        "`{name}` ({} {}) cannot do {}",
                        family.name(),
                        entry.variant,
                        request.mode.name()
                    ),
                ));
            }
        }
        return Ok(Some(name.clone()));
    }
    let checkpoints: Vec<_> = state
        .model_catalog
        .models(paths)
        .into_iter()
        .filter(|entry| entry.folder == "checkpoints")
        .collect();
    let configured = state.settings.default_models.get(family.name()).map(String::as_str);
    default_model(&checkpoints, family, request.mode, configured)
        .map(|entry| Some(entry.name.clone()))
        .ok_or_else(|| {
            let kind = if family == Family::Flux && matches!(request.mode, Mode::Inpaint | Mode::Outpaint) {
                "FLUX fill"
            } else {
                family.name()
            };
            RestError::field(
                "model",
                format!(
                    "no {kind} checkpoint in models/checkpoints for {}: put one there or name one with `model`",
                    request.mode.name()
                ),
            )
        })
}

/// The Depth Anything V2 checkpoint `depth` ControlNets use (the installed one the pack module
/// prefers), or a refusal saying where to put one.
fn depth_checkpoint(paths: &Paths) -> Result<&'static str, RestError> {
    installed_depth_anything_v2(paths).ok_or_else(|| {
        RestError::field(
            "controlnets",
            format!(
                "a `depth` ControlNet needs a Depth Anything V2 checkpoint: put \
                     depth_anything_v2_vitl.safetensors (or vitb/vits) in models/{DEPTH_ANYTHING_V2_FOLDER}"
            ),
        )
        .with_code("unknown_model")
    })
}

/// The prompt validated as `POST /prompt` validates it; a refusal names the field behind the
/// first failing input.
/// The prompt is taken out of `built` (only its field map is needed afterwards).
fn validate(state: &AppState, built: &mut BuiltPrompt) -> Result<easel_engine::ValidatedPrompt, RestError> {
    let runtime = &state.runtime;
    let prompt = Prompt::from_json(std::mem::take(&mut built.prompt))
        .map_err(|error| RestError::invalid(None, format!("the built workflow is not a prompt: {error}")))?;
    let validated = validate_prompt(&runtime.registry, &runtime.services, prompt, None)
        .map_err(|failure| validation_error(&failure, built))?;
    if !validated.node_errors.is_empty() {
        return Err(validation_error(
            &ValidationFailure {
                error: json!({"message": "Prompt outputs failed validation", "details": ""}),
                node_errors: validated.node_errors.clone(),
            },
            built,
        ));
    }
    Ok(validated)
}

fn validation_error(failure: &ValidationFailure, built: &BuiltPrompt) -> RestError {
    let node_errors = serde_json::to_value(&failure.node_errors).unwrap_or_default();
    let entries = node_errors.as_object().into_iter().flatten();
    let errors = entries.flat_map(|(node, entry)| {
        entry["errors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(move |error| (node.clone(), error.clone()))
    });
    let mut first = None;
    for (node, error) in errors {
        let input = error["extra_info"]["input_name"].as_str().unwrap_or_default();
        let Some(field) = built.field_of(&node, input) else {
            first.get_or_insert((node, error));
            continue;
        };
        let received = &error["extra_info"]["received_value"];
        if let Some(folder) = error["extra_info"]["model_folder"].as_str() {
            return RestError::field(
                field,
                format!(
                    "no model file named {received} for `{field}`: it belongs in models/{folder} \
                     (POST /v1/models/download fetches one)"
                ),
            )
            .with_code("unknown_model");
        }
        let message = [error["message"].as_str(), error["details"].as_str()]
            .into_iter()
            .flatten()
            .filter(|part| !part.is_empty())
            .collect::<Vec<_>>()
            .join(": ");
        return RestError::field(field, message);
    }
    let message = match first {
        Some((node, error)) => format!(
            "node {node} of the built workflow: {} {}",
            error["message"].as_str().unwrap_or_default(),
            error["details"].as_str().unwrap_or_default()
        ),
        None => format!(
            "{} {}",
            failure.error["message"].as_str().unwrap_or_default(),
            failure.error["details"].as_str().unwrap_or_default()
        ),
    };
    RestError::invalid(None, message.trim().to_string()).with_code("invalid_workflow")
}

/// The request's input images, stored by content hash in `input/rest/`.
struct StoredInputs {
    /// LoadImage's names for them (`rest/<sha256>.<ext>`).
    image: Option<String>,
    mask: Option<String>,
    /// Each ControlNet's own image, if it brought one.
    controls: Vec<Option<String>>,
    /// The IP-Adapter's image prompts and negative ones.
    ip_adapter_images: Vec<String>,
    ip_adapter_negatives: Vec<String>,
    /// The relight mode's light map and background.
    light_image: Option<String>,
    background: Option<String>,
    /// Files this request created (removed again if it is refused).
    created: Vec<PathBuf>,
}

impl StoredInputs {
    fn write(paths: &Paths, request: &GenerateRequest) -> Result<StoredInputs, RestError> {
        let mut stored = StoredInputs {
            image: None,
            mask: None,
            controls: Vec::new(),
            ip_adapter_images: Vec::new(),
            ip_adapter_negatives: Vec::new(),
            light_image: None,
            background: None,
            created: Vec::new(),
        };
        let folder = paths.input.join("rest");
        let mut store = |field: &str, upload: &Option<UploadedImage>| -> Result<Option<String>, RestError> {
            let Some(upload) = upload else {
                return Ok(None);
            };
            let hash = Sha256::digest(&upload.bytes);
            let hex: String = hash.iter().map(|byte| format!("{byte:02x}")).collect();
            let name = format!("{hex}.{}", upload.extension);
            let path = folder.join(&name);
            if !path.is_file() {
                std::fs::create_dir_all(&folder)
                    .and_then(|()| write_replacing(&path, &upload.bytes))
                    .map_err(|error| {
                        RestError::field(field, format!("the image could not be stored: {error}"))
                            .with_status(StatusCode::SERVICE_UNAVAILABLE)
                            .with_code("storage_error")
                    })?;
                stored.created.push(path);
            }
            Ok(Some(format!("rest/{name}")))
        };
        let written = (|| {
            let image = store("image", &request.image)?;
            let mask = store("mask", &request.mask)?;
            let controls = request
                .controlnets
                .iter()
                .map(|control| store("controlnets", &control.image))
                .collect::<Result<Vec<_>, _>>()?;
            let mut ip_images = |images: &[UploadedImage]| -> Result<Vec<String>, RestError> {
                images
                    .iter()
                    .map(|image| Ok(store("ip_adapter", &Some(image.clone()))?.unwrap_or_default()))
                    .collect()
            };
            let (ip_adapter_images, ip_adapter_negatives) = match &request.ip_adapter {
                Some(ip_adapter) => (ip_images(&ip_adapter.images)?, ip_images(&ip_adapter.negative_images)?),
                None => (Vec::new(), Vec::new()),
            };
            let relight = request.relight.as_ref();
            let light_image = store("relight", &relight.map(|relight| relight.light_image.clone()))?;
            let background = store("relight", &relight.and_then(|relight| relight.background.clone()))?;
            Ok((
                image,
                mask,
                controls,
                [ip_adapter_images, ip_adapter_negatives],
                [light_image, background],
            ))
        })();
        match written {
            Ok((image, mask, controls, [ip_adapter_images, ip_adapter_negatives], [light_image, background])) => {
                (stored.image, stored.mask, stored.controls) = (image, mask, controls);
                (stored.ip_adapter_images, stored.ip_adapter_negatives) = (ip_adapter_images, ip_adapter_negatives);
                (stored.light_image, stored.background) = (light_image, background);
                Ok(stored)
            }
            Err(error) => {
                stored.remove_new();
                Err(error)
            }
        }
    }

    fn remove_new(&self) {
        for path in &self.created {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The request as the task shows it: images as the URLs of their stored copies, the family,
/// mode, model and seed it ran with.
fn sanitized_request(
    mut fields: Map<String, Json>,
    request: &GenerateRequest,
    checkpoint: Option<&str>,
    images: &StoredInputs,
    seed: u64,
) -> Json {
    // A stored input (`rest/<file>`) as its `/view` URL.
    let url = |name: &str| {
        let (subfolder, filename) = name.split_once('/').unwrap_or(("", name));
        json!(view_url(filename, subfolder, "input"))
    };
    for (field, name) in [("image", &images.image), ("mask", &images.mask)] {
        if let Some(name) = name {
            fields.insert(field.into(), url(name));
        }
    }
    if let Some(Json::Object(ip_adapter)) = fields.get_mut("ip_adapter") {
        for (key, stored) in [
            ("images", &images.ip_adapter_images),
            ("image_negative", &images.ip_adapter_negatives),
        ] {
            if ip_adapter.contains_key(key) {
                ip_adapter.insert(key.into(), stored.iter().map(|name| url(name)).collect());
            }
        }
    }
    if let Some(Json::Object(relight)) = fields.get_mut("relight") {
        for (key, stored) in [("light_image", &images.light_image), ("background", &images.background)] {
            if let Some(name) = stored {
                relight.insert(key.into(), url(name));
            }
        }
    }
    if let Some(Json::Array(controls)) = fields.get_mut("controlnets") {
        for (control, stored) in controls.iter_mut().zip(&images.controls) {
            if let (Some(control), Some(name)) = (control.as_object_mut(), stored) {
                control.insert("image".into(), url(name));
            }
        }
    }
    fields.insert("family".into(), json!(request.family.name()));
    fields.insert("mode".into(), json!(request.mode.name()));
    if let Some(checkpoint) = checkpoint {
        fields.insert("model".into(), json!(checkpoint));
    }
    fields.insert("seed".into(), json!(seed));
    Json::Object(fields)
}
