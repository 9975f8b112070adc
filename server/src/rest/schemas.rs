//! The REST API's request and answer shapes as Rust types, for the OpenAPI document
//! ([`super::openapi`]). The handlers read requests field by field (so a refusal names the field)
//! and write answers as JSON; the end-to-end tests check that real requests and answers have
//! exactly these fields.

use super::request::{Family, Mode};
use super::tasks::LiveProgress;
use crate::store::tasks::TaskStatus;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// One file name, or a list of up to three (text encoders: a pair, or SD3's three).
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum FileNames {
    One(String),
    Several(Vec<String>),
}

/// How far an outpainting extends the image, in pixels.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct OutpaintSides {
    pub left: Option<u32>,
    pub top: Option<u32>,
    pub right: Option<u32>,
    pub bottom: Option<u32>,
    /// How soft the seam is (default 40).
    pub feathering: Option<u32>,
}

/// One LoRA of the stack.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct LoraEntry {
    /// A file in `models/loras`.
    pub name: String,
    /// Default 1.
    pub strength_model: Option<f64>,
    /// Default 1.
    pub strength_clip: Option<f64>,
}

/// One ControlNet of the stack (SD1.x, SD2.x, SDXL; XLabs or Mistoline on FLUX), applied after
/// those before it.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ControlnetEntry {
    /// A file in `models/controlnet` (the family API calls it `controlnet`).
    pub model: String,
    /// How the image is prepared: `canny` (edges), `depth` (a Depth Anything V2 depth map; needs
    /// a checkpoint in `models/depthanything`), `inpaint` (the request's `mask` marked on it),
    /// `none` (already a control map; default).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Base64 or a data URL; absent: the request's `image`.
    pub image: Option<String>,
    /// Default 0.7.
    pub strength: Option<f64>,
    /// The part of sampling it steers: default 0 to 0.4.
    pub start_percent: Option<f64>,
    pub end_percent: Option<f64>,
}

/// An image prompt through ComfyUI_IPAdapter_plus's IPAdapterAdvanced.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct IpAdapterEntry {
    /// A file in `models/ipadapter` (`model` is accepted too).
    pub ipadapter: String,
    /// A file in `models/clip_vision` (the family API may name it at the top of the request).
    pub clip_vision: String,
    /// The image prompts: base64 or data URLs (up to 8).
    pub images: Vec<String>,
    /// Negative image prompts.
    pub image_negative: Option<Vec<String>>,
    /// Default 0.7.
    pub weight: Option<f64>,
    /// The part of sampling it steers: default 0 to 0.4.
    pub start_at: Option<f64>,
    pub end_at: Option<f64>,
    /// One of the pack's weight types (default `linear`).
    pub weight_type: Option<String>,
    /// `concat` (default), `add`, `subtract`, `average` or `norm average`.
    pub combine_embeds: Option<String>,
    /// `V only` (default), `K+V`, `K+V w/ C penalty` or `K+mean(V) w/ C penalty`.
    pub embeds_scaling: Option<String>,
}

/// A colour blend of the relight mode (WAS Node Suite's Image Blending Mode).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct RelightBlend {
    /// One of the node's modes: `color`, `hue`, `multiply`, `overlay`, `soft_light`, …
    pub mode: String,
    /// 0 to 1.
    pub percentage: f64,
}

/// Relighting with IC-Light (mode `relight`, SD1.5).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct RelightEntry {
    /// The IC-Light model in `models/diffusion_models` ("fc"; "fbc" with `background`).
    pub model: String,
    /// Base64 or a data URL: the light map, bright where the light comes from.
    pub light_image: String,
    /// Base64 or a data URL: the background an "fbc" model places the subject on.
    pub background: Option<String>,
    /// Default 0.5: how much of the picture sampling starts from is the light map.
    pub light_strength: Option<f64>,
    /// Default true: keep the background (with a `mask`, the original outside it); false (with
    /// a `mask`) paints a new one.
    pub keep_background: Option<bool>,
    /// Default −0.15 and 1.14: the light map's levels stretched to this range.
    pub remap_min: Option<f64>,
    pub remap_max: Option<f64>,
    /// The subject's colours blended back onto the relit picture (default `color` at 0.1, then
    /// `hue` at 0.2; up to 4).
    pub blends: Option<Vec<RelightBlend>>,
}

/// `POST /v1/generate`: JSON (images as base64 or data URLs) or a multipart form (the same
/// fields as text, `image` and `mask` as files). Only `prompt` is required.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"family": "sdxl", "prompt": "a lighthouse at dawn", "width": 1024, "height": 1024, "steps": 25, "seed": -1}))]
pub struct GenerateRequestBody {
    /// Default `sd15`.
    pub family: Option<Family>,
    /// Default `text2img`.
    pub mode: Option<Mode>,
    /// A checkpoint file in `models/checkpoints`; default: `--default-model` or the family's first.
    pub model: Option<String>,
    /// Split files: the diffusion model (`.safetensors` or `.gguf`), with `clip` and `vae`.
    pub unet: Option<String>,
    /// Split files: the text encoder(s).
    pub clip: Option<FileNames>,
    /// Split files: the VAE.
    pub vae: Option<String>,
    /// SDXL text2img: a refiner checkpoint.
    pub refiner: Option<String>,
    /// The fraction of steps on the base model before the refiner (default 0.8).
    pub refine_switch: Option<f64>,
    pub prompt: String,
    /// Ignored by FLUX (sampled at cfg 1).
    pub negative_prompt: Option<String>,
    /// A multiple of 8.
    pub width: Option<u32>,
    /// A multiple of 8.
    pub height: Option<u32>,
    pub steps: Option<u32>,
    /// CFG scale; FLUX's guidance for `flux`.
    pub cfg: Option<f64>,
    /// A KSampler sampler name.
    pub sampler: Option<String>,
    /// A KSampler scheduler name.
    pub scheduler: Option<String>,
    /// −1 or absent: a random seed, reported back.
    pub seed: Option<i64>,
    pub denoise: Option<f64>,
    pub batch_size: Option<u32>,
    /// Base64, a data URL, or (multipart) a file.
    pub image: Option<String>,
    /// White where to repaint (mode relight: white on the subject); the image's size.
    pub mask: Option<String>,
    pub outpaint: Option<OutpaintSides>,
    pub loras: Option<Vec<LoraEntry>>,
    /// ControlNets, in order (up to 4; FLUX takes XLabs' and Mistoline's; refiner requests
    /// answer 501 for now).
    pub controlnets: Option<Vec<ControlnetEntry>>,
    /// An IP-Adapter on SD1.x or SDXL (FLUX and refiner requests answer 501).
    pub ip_adapter: Option<IpAdapterEntry>,
    /// Mode `relight`: the IC-Light model, light map and blends.
    pub relight: Option<RelightEntry>,
    /// Names from `/v1/styles`, applied in order.
    pub styles: Option<Vec<String>>,
    /// A name from `/v1/presets`: its fields under the request's own.
    pub preset: Option<String>,
    /// Higher runs first (default 0).
    pub priority: Option<i64>,
    /// Where the finished task is POSTed (Standard Webhooks signature).
    pub webhook_url: Option<String>,
    /// Answer with a `text/event-stream` of progress.
    pub stream: Option<bool>,
    /// Answer 202 with the task at once.
    #[serde(rename = "async")]
    pub run_async: Option<bool>,
    /// Finished images inline as `base64` (default) or only as `url`.
    #[serde(rename = "return")]
    pub return_style: Option<String>,
    /// `png` (default), `jpeg` or `webp`.
    pub output_format: Option<String>,
    /// A WebSocket client that should get the prompt's messages.
    pub client_id: Option<String>,
}

/// A saved image.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct TaskImage {
    /// A `/view` URL.
    pub url: String,
    pub filename: String,
    pub subfolder: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// In answers that inline images.
    pub base64: Option<String>,
    pub content_type: Option<String>,
}

/// Why a task failed.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct TaskError {
    pub message: String,
    pub node_id: Option<String>,
    pub node_type: Option<String>,
}

/// A generation task.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct Task {
    /// Also the prompt's id in `/queue`, `/history` and on `/ws`.
    pub id: String,
    pub status: TaskStatus,
    pub priority: i64,
    pub family: Family,
    pub mode: Mode,
    /// The seed it ran with.
    pub seed: u64,
    /// The bundled workflow it was built from (`v1/sd_text2img`).
    pub workflow: String,
    /// The request, images replaced by the URLs of their stored copies.
    pub request: Value,
    /// ISO 8601.
    pub queued_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub progress: LiveProgress,
    /// The latest preview while running (base64 JPEG).
    pub preview: Option<String>,
    pub images: Vec<TaskImage>,
    pub error: Option<TaskError>,
}

/// `GET /v1/tasks`: newest first.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct TaskList {
    pub tasks: Vec<Task>,
    /// Pass as `cursor` for the next page; null on the last.
    pub next_cursor: Option<String>,
}

/// One event of a `/v1/generate` stream; the last has `status` final, `images` and `task`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct StreamEvent {
    pub task_id: String,
    pub status: TaskStatus,
    pub percent: f64,
    pub node: Option<String>,
    pub node_type: Option<String>,
    pub step: Option<u64>,
    pub steps: Option<u64>,
    pub message: String,
    pub preview: Option<String>,
    pub images: Vec<TaskImage>,
    pub error: Option<TaskError>,
    pub task: Option<Task>,
}

/// What a refusal says.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable: `invalid_request`, `unknown_model`, `not_found`, `not_implemented`, `queue_full`, …
    pub code: String,
    pub message: String,
    /// The request field that was wrong.
    pub field: Option<String>,
}

/// Every refusal of the REST API.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"error": {"code": "invalid_request", "message": "`width` must be a multiple of 8, not 65", "field": "width"}}))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// A delete's count.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct Deleted {
    pub deleted: u64,
    pub files_deleted: u64,
}

/// A model file a request may name.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ModelView {
    pub name: String,
    pub folder: String,
    pub family: Family,
    /// `base`, `refiner`, `dev`, `schnell` or `fill`.
    pub variant: String,
    pub modes: Vec<Mode>,
    pub add_ons: Vec<String>,
    pub refiner: bool,
}

/// A family's models and modes.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct FamilyModels {
    pub default: Option<String>,
    /// `{mode: {"available": bool, "reason"?: string}}`.
    pub modes: BTreeMap<String, Value>,
    pub models: Vec<ModelView>,
}

/// `GET /v1/models`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct ModelsAnswer {
    pub families: BTreeMap<String, FamilyModels>,
}

/// `GET /v1/styles`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct StylesAnswer {
    pub styles: Vec<super::catalog::Style>,
}

/// `GET /v1/presets`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct PresetsAnswer {
    pub presets: Vec<super::catalog::Preset>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct PriorityCount {
    pub priority: i64,
    pub pending: u64,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct QueueState {
    pub pending: u64,
    pub running: bool,
    pub by_priority: Vec<PriorityCount>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct WorkerState {
    pub id: u32,
    pub device: String,
    pub busy: bool,
}

/// `GET /v1/status`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct StatusAnswer {
    pub status: String,
    pub queue: QueueState,
    pub running_task: Option<String>,
    pub workers: Vec<WorkerState>,
    pub uptime_seconds: u64,
    pub version: String,
}

/// `POST /v1/models/download`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct DownloadRequest {
    /// http(s).
    pub url: String,
    /// A model folder (default `checkpoints`).
    pub folder: Option<String>,
    /// Default: the URL's last path segment.
    pub name: Option<String>,
    /// 64 hexadecimal digits.
    pub sha256: Option<String>,
    /// Answer with a `text/event-stream` of progress.
    pub stream: Option<bool>,
}

/// A download.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DownloadJob {
    pub id: String,
    pub url: String,
    pub folder: String,
    pub name: String,
    /// `downloading`, `done` or `failed`.
    pub status: String,
    pub bytes: u64,
    pub total: Option<u64>,
    pub percent: Option<f64>,
    pub sha256: Option<String>,
    pub error: Option<String>,
    pub started_at: String,
    pub finished_at: Option<String>,
}

/// `GET /v1/models/downloads`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct DownloadList {
    pub downloads: Vec<DownloadJob>,
}

/// `/healthz`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
}

/// `/readyz`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    pub ready: bool,
    pub problems: Vec<String>,
}
