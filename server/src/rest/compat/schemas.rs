//! The drop-in routes' request and answer shapes, for the OpenAPI document.

use crate::rest::schemas::{FileNames, GenerateRequestBody};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// The family API's kinds of generation.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GenType {
    T2i,
    I2i,
    Inpaint,
}

/// A LoRA of the family API.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct FamilyLora {
    pub lora: String,
    pub strength_model: Option<f64>,
    pub strength_clip: Option<f64>,
}

/// `POST /{family}/generate`, with that service's defaults.
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"checkpoint": "sd_xl_base_1.0.safetensors", "prompt_positive": "a red barn", "gen_type": "t2i", "steps": 20}))]
pub struct FamilyRequest {
    pub checkpoint: Option<String>,
    pub unet: Option<String>,
    pub clip: Option<FileNames>,
    pub vae: Option<String>,
    pub clip_vision: Option<String>,
    /// Base64.
    pub init_image: Option<String>,
    /// Base64, white = repaint.
    pub mask: Option<String>,
    /// Default "high quality, 4K, expert.".
    pub prompt_positive: Option<String>,
    /// Default "Low quality, Blur, artifact".
    pub prompt_negative: Option<String>,
    pub seed: Option<i64>,
    pub width: Option<u32>,
    pub height: Option<u32>,
    pub batch_size: Option<u32>,
    pub steps: Option<u32>,
    pub cfg: Option<f64>,
    pub sampler_name: Option<String>,
    pub scheduler: Option<String>,
    pub denoise: Option<f64>,
    pub gen_type: Option<GenType>,
    pub refiner: Option<String>,
    /// Default 0.4: the fraction of steps on the base.
    pub refine_switch: Option<f64>,
    /// `[{"controlnet", "type": canny | depth | inpaint, "image", "strength", "start_percent",
    /// "end_percent"}]`, as `/v1/generate`'s `controlnets`.
    pub controlnet_requests: Option<Vec<Value>>,
    pub lora_requests: Option<Vec<FamilyLora>>,
    /// As `/v1/generate`'s `ip_adapter` (the encoder may be named by `clip_vision` above).
    pub ipadapter_request: Option<Value>,
}

/// `POST /iclight/generate`: relight `init_image` (SD1.5 + IC-Light), with that service's
/// defaults (30 steps, cfg 1.5, dpmpp_2m_sde/karras, denoise 0.7).
#[derive(Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"checkpoint": "realisticVisionV51.safetensors", "iclight_model": "iclight_sd15_fc.safetensors", "init_image": "<base64>", "light_condition": "<base64>", "prompt_positive": "warm sunset light"}))]
pub struct IcLightRequest {
    /// An SD1.5 checkpoint.
    pub checkpoint: Option<String>,
    /// The IC-Light model (fc, or fbc with `background`), in `models/diffusion_models`.
    pub iclight_model: String,
    /// Base64: the subject.
    pub init_image: String,
    /// Base64: the light map, bright where the light comes from.
    pub light_condition: String,
    /// Base64: the background an fbc model places the subject on.
    pub background: Option<String>,
    /// Base64, white on the subject: where to relight.
    pub mask: Option<String>,
    /// Default 0.5: how much of the start picture is the light map.
    pub light_strength: Option<f64>,
    /// Default true; false (with a `mask`) paints a new background.
    pub keep_background: Option<bool>,
    /// Default `color` at 0.1, then `hue` at 0.2: the subject's colours blended back.
    pub blending_mode_1: Option<String>,
    pub blending_percentage_1: Option<f64>,
    pub blending_mode_2: Option<String>,
    pub blending_percentage_2: Option<f64>,
    /// Default −0.15 and 1.14: the light map's levels stretched to this range.
    pub remap_min_value: Option<f64>,
    pub remap_max_value: Option<f64>,
    pub prompt_positive: Option<String>,
    pub prompt_negative: Option<String>,
    pub seed: Option<i64>,
    pub batch_size: Option<u32>,
    pub steps: Option<u32>,
    pub cfg: Option<f64>,
    pub sampler_name: Option<String>,
    pub scheduler: Option<String>,
    pub denoise: Option<f64>,
    /// `iclight` or absent.
    pub gen_type: Option<String>,
}

/// The family API's answer.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct FamilyAnswer {
    /// The first image, PNG as base64.
    pub image_base64: Option<String>,
    pub images_base64: Vec<String>,
    pub task_id: String,
    pub seed: u64,
}

/// GenServe's modes.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GenServeMode {
    #[serde(rename = "text2img")]
    Text2Img,
    #[serde(rename = "img2img")]
    Img2Img,
    Fill,
    Controlnet,
}

/// `POST /generate` (JSON) and `POST /generate/img2img` (the same fields in a multipart form).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct GenServeRequest {
    pub prompt: String,
    /// Default `flux1-dev`: a FLUX checkpoint of that variant, or a file name.
    pub model_id: Option<String>,
    pub mode: Option<GenServeMode>,
    pub height: Option<u32>,
    pub width: Option<u32>,
    /// Default 50.
    pub num_inference_steps: Option<u32>,
    /// Default 3.5.
    pub cfg: Option<f64>,
    /// Default 42.
    pub seed: Option<i64>,
    pub priority: Option<i64>,
    /// img2img: default 0.8.
    pub strength: Option<f64>,
    pub input_image: Option<String>,
    pub mask_image: Option<String>,
    pub control_image: Option<String>,
}

/// GenServe's answer, also for failures (`success` false, `error` set).
#[derive(Serialize, Deserialize, ToSchema)]
pub struct GenServeAnswer {
    pub success: bool,
    pub task_id: Option<String>,
    pub image_base64: Option<String>,
    pub error: Option<String>,
    pub elapsed_time: f64,
    pub gpu_id: Option<u32>,
    pub model_id: Value,
    pub mode: Value,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct ConcurrentManager {
    pub alive_processes: u32,
    pub dead_processes: u32,
    pub total_restarts: u32,
    pub global_queue_size: u64,
}

/// `GET /status`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct GenServeStatus {
    pub status: String,
    pub concurrent_manager: ConcurrentManager,
}

/// An entry of GenServe's `GET /models`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct GenServeModel {
    pub model_id: String,
    pub model_name: String,
    pub description: String,
    pub total_gpu_processes: u32,
    pub available_gpu_processes: u32,
    pub supported_features: Vec<String>,
}

/// `POST /v1/engine/generate/`: Easel's generation fields and FooocusAPI's answer switches.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct FooocusGenerate {
    #[serde(flatten)]
    pub fields: GenerateRequestBody,
    /// Answer with the task at once.
    pub async_process: Option<bool>,
    /// Answer with a `text/event-stream` of `{"progress", "preview", "message", "images"}`.
    pub stream_output: Option<bool>,
}

/// FooocusAPI's task states.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FooocusStatus {
    Pending,
    Running,
    Finished,
    Failed,
    Stopped,
}

/// A task as FooocusAPI shows it.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct FooocusTask {
    pub task_id: String,
    pub req_params: Value,
    pub in_queue_mills: i64,
    pub start_mills: Option<i64>,
    pub finish_mills: Option<i64>,
    pub task_status: FooocusStatus,
    pub progress: u32,
    pub preview: Option<String>,
    pub webhook_url: Option<String>,
    /// `/outputs/{date}/{file}` URLs.
    pub result: Vec<String>,
    pub error: Option<Value>,
}

/// `GET /tasks`: the lists the query asked for.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct FooocusTaskLists {
    pub history: Option<Vec<FooocusTask>>,
    pub current: Option<Vec<FooocusTask>>,
    pub pending: Option<Vec<FooocusTask>>,
}

#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ControlAction {
    Stop,
    Skip,
}

/// `POST /v1/engine/control/`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct FooocusControl {
    pub action: ControlAction,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct FooocusControlAnswer {
    pub message: String,
    pub task_id: Option<String>,
}

/// `GET /v1/engines/all-models`.
#[derive(Serialize, Deserialize, ToSchema)]
pub struct FooocusModels {
    pub model_filenames: Vec<String>,
    pub lora_filenames: Vec<String>,
}
