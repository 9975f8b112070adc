//! `POST /v1/generate`'s request: its fields read from a JSON object or a multipart form, checked
//! one by one so that a refusal names the field, with each family's defaults filled in.

use super::RestError;
use axum::body::Bytes;
use base64::Engine;
use easel_nodes::packs::ipadapter::attention::{COMBINE_METHODS, EMBEDS_SCALINGS, WEIGHT_TYPES};
use easel_nodes::packs::was::BLEND_MODES;
use serde_json::{Map, Value as Json};

/// The model families a request may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Sd15,
    Sdxl,
    Sd3,
    Flux,
}

impl Family {
    pub const ALL: [Family; 4] = [Family::Sd15, Family::Sdxl, Family::Sd3, Family::Flux];

    pub fn name(self) -> &'static str {
        match self {
            Family::Sd15 => "sd15",
            Family::Sdxl => "sdxl",
            Family::Sd3 => "sd3",
            Family::Flux => "flux",
        }
    }
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[serde(rename = "text2img")]
    Text2Img,
    #[serde(rename = "img2img")]
    Img2Img,
    Inpaint,
    Outpaint,
    Upscale,
    ObjectRemove,
    Relight,
}

impl Mode {
    pub const ALL: [Mode; 7] = [
        Mode::Text2Img,
        Mode::Img2Img,
        Mode::Inpaint,
        Mode::Outpaint,
        Mode::Upscale,
        Mode::ObjectRemove,
        Mode::Relight,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Text2Img => "text2img",
            Mode::Img2Img => "img2img",
            Mode::Inpaint => "inpaint",
            Mode::Outpaint => "outpaint",
            Mode::Upscale => "upscale",
            Mode::ObjectRemove => "object_remove",
            Mode::Relight => "relight",
        }
    }

    /// Whether the mode starts from an input image.
    pub fn needs_image(self) -> bool {
        self != Mode::Text2Img
    }
}

/// How finished images come back in JSON answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnStyle {
    Base64,
    Url,
}

/// The encoding of returned images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    Jpeg,
    Webp,
}

impl OutputFormat {
    pub fn parse(name: &str) -> Option<OutputFormat> {
        match name {
            "png" | "image/png" => Some(OutputFormat::Png),
            "jpeg" | "jpg" | "image/jpeg" => Some(OutputFormat::Jpeg),
            "webp" | "image/webp" => Some(OutputFormat::Webp),
            _ => None,
        }
    }

    pub fn mime(self) -> &'static str {
        match self {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Webp => "image/webp",
        }
    }
}

/// An uploaded image: its bytes (shared with the request's own buffer, never copied), its
/// format's file extension and its size.
#[derive(Debug, Clone)]
pub struct UploadedImage {
    pub bytes: Bytes,
    pub extension: &'static str,
    pub width: u32,
    pub height: u32,
}

/// One LoRA of the stack.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraRequest {
    pub name: String,
    pub strength_model: f64,
    pub strength_clip: f64,
}

/// How a ControlNet's image is prepared (the family API's `type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlKind {
    /// Canny edges of the image (ComfyUI's Canny node, thresholds 0.4 and 0.8).
    Canny,
    /// A depth map estimated from the image (comfyui_controlnet_aux's DepthAnythingV2Preprocessor).
    Depth,
    /// The image with the request's mask marked on it (comfyui_controlnet_aux's
    /// InpaintPreprocessor, for inpainting ControlNets).
    Inpaint,
    /// The image as it is (already a control map).
    Plain,
}

impl ControlKind {
    /// The control type a union ControlNet is told for images prepared this way
    /// (SetUnionControlNetType's names); none for an image taken as it is.
    pub fn union_type(self) -> Option<&'static str> {
        match self {
            ControlKind::Canny => Some("canny/lineart/anime_lineart/mlsd"),
            ControlKind::Depth => Some("depth"),
            ControlKind::Inpaint => Some("repaint"),
            ControlKind::Plain => None,
        }
    }

    fn parse(name: &str) -> Option<ControlKind> {
        Some(match name {
            "canny" => ControlKind::Canny,
            "depth" => ControlKind::Depth,
            "inpaint" => ControlKind::Inpaint,
            "none" => ControlKind::Plain,
            _ => return None,
        })
    }
}

/// One ControlNet of the stack, applied in order.
#[derive(Debug, Clone)]
pub struct ControlnetRequest {
    /// The file in `models/controlnet`.
    pub model: String,
    pub kind: ControlKind,
    /// The control image; `None`: the request's `image`.
    pub image: Option<UploadedImage>,
    pub strength: f64,
    pub start_percent: f64,
    pub end_percent: f64,
}

/// The IP-Adapter to apply (SD1.x and SDXL), as IPAdapterAdvanced takes it.
#[derive(Debug, Clone)]
pub struct IpAdapterRequest {
    /// The file in `models/ipadapter`.
    pub model: String,
    /// The CLIP vision encoder, a file in `models/clip_vision`.
    pub clip_vision: String,
    /// The image prompts (at least one), combined by `combine_embeds`.
    pub images: Vec<UploadedImage>,
    /// Negative image prompts (none: the unconditional side sees no image).
    pub negative_images: Vec<UploadedImage>,
    pub weight: f64,
    pub start_at: f64,
    pub end_at: f64,
    pub weight_type: String,
    pub combine_embeds: String,
    pub embeds_scaling: String,
}

/// How the relight mode relights the request's `image` (IC-Light on SD1.5).
#[derive(Debug, Clone)]
pub struct RelightRequest {
    /// The IC-Light offsets ("fc", or "fbc" with a `background`), a file in
    /// `models/diffusion_models` (LoadAndApplyICLightUnet's list).
    pub model: String,
    /// The light map: bright where the light comes from.
    pub light_image: UploadedImage,
    /// The background an "fbc" model places the subject on.
    pub background: Option<UploadedImage>,
    /// How much of the picture sampling starts from is the light map rather than the subject.
    pub light_strength: f64,
    /// Keep the picture's background: with a `mask`, everything outside it is the original
    /// image; without one, the whole picture is relit. `false` (which needs a `mask`) greys the
    /// background out so that the model paints a new one.
    pub keep_background: bool,
    /// The light map's levels stretched to `remap_min…remap_max` (then clipped to 0…1).
    pub remap_min: f64,
    pub remap_max: f64,
    /// The subject's own colours blended back onto the relit picture, in order
    /// (`(mode, percentage)` of WAS Node Suite's Image Blending Mode).
    pub blends: Vec<(String, f64)>,
}

/// The most colour blends a relight request may chain.
const MAX_RELIGHT_BLENDS: usize = 4;

/// How far an outpainting extends the image on each side, and how soft the seam is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outpaint {
    pub left: u32,
    pub top: u32,
    pub right: u32,
    pub bottom: u32,
    pub feathering: u32,
}

impl Default for Outpaint {
    /// No extension; ComfyUI's default feathering.
    fn default() -> Self {
        Outpaint {
            left: 0,
            top: 0,
            right: 0,
            bottom: 0,
            feathering: 40,
        }
    }
}

/// A checked generation request, with the family's defaults filled in.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub family: Family,
    pub mode: Mode,
    pub model: Option<String>,
    pub unet: Option<String>,
    pub clip: Vec<String>,
    pub vae: Option<String>,
    pub refiner: Option<String>,
    pub refine_switch: f64,
    pub prompt: String,
    pub negative_prompt: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub cfg: f64,
    pub sampler: String,
    pub scheduler: String,
    /// `None`: a random seed (−1 or absent).
    pub seed: Option<u64>,
    pub denoise: f64,
    pub batch_size: u32,
    pub image: Option<UploadedImage>,
    pub mask: Option<UploadedImage>,
    pub outpaint: Outpaint,
    pub loras: Vec<LoraRequest>,
    pub controlnets: Vec<ControlnetRequest>,
    pub ip_adapter: Option<IpAdapterRequest>,
    pub relight: Option<RelightRequest>,
    pub styles: Vec<String>,
    pub preset: Option<String>,
    pub priority: i64,
    pub webhook_url: Option<String>,
    pub stream: bool,
    pub run_async: bool,
    pub return_style: ReturnStyle,
    pub output_format: OutputFormat,
}

/// Every field `/v1/generate` reads; anything else is refused (a misspelt field would otherwise
/// be silently ignored).
pub const FIELDS: [&str; 35] = [
    "family",
    "mode",
    "model",
    "unet",
    "clip",
    "vae",
    "refiner",
    "refine_switch",
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "cfg",
    "sampler",
    "scheduler",
    "seed",
    "denoise",
    "batch_size",
    "image",
    "mask",
    "outpaint",
    "loras",
    "controlnets",
    "ip_adapter",
    "relight",
    "styles",
    "preset",
    "priority",
    "webhook_url",
    "stream",
    "async",
    "return",
    "output_format",
    "client_id",
];

/// The most image prompts (and negative ones) an IP-Adapter request may send.
const MAX_IP_ADAPTER_IMAGES: usize = 8;
/// The largest side a request may ask for (ComfyUI's `MAX_RESOLUTION` is larger, but a REST
/// client asking for more is almost surely wrong).
pub const MAX_SIDE: u32 = 8192;
pub const MAX_BATCH: u32 = 64;
pub const MAX_STEPS: u32 = 1000;
pub const MAX_LORAS: usize = 8;
/// The most ControlNets one request chains.
pub const MAX_CONTROLNETS: usize = 4;

/// A request's raw fields: JSON values, and the bytes of images sent as files.
#[derive(Debug, Default)]
pub struct RawRequest {
    pub fields: Map<String, Json>,
    pub files: Vec<(String, Bytes)>,
}

impl RawRequest {
    /// A JSON body.
    pub fn from_json(body: &[u8]) -> Result<RawRequest, RestError> {
        let value: Json = serde_json::from_slice(body)
            .map_err(|error| RestError::invalid(None, format!("the body is not valid JSON: {error}")))?;
        match value {
            Json::Object(fields) => Ok(RawRequest {
                fields,
                files: Vec::new(),
            }),
            _ => Err(RestError::invalid(None, "the body must be a JSON object")),
        }
    }

    /// A text field of a multipart form: JSON where it reads as JSON (numbers, booleans, lists),
    /// else the text itself.
    pub fn add_form_text(&mut self, name: String, text: String) {
        let value = match serde_json::from_str::<Json>(&text) {
            Ok(value) if !value.is_string() => value,
            _ => Json::String(text),
        };
        self.fields.insert(name, value);
    }

    /// Fields of a preset, under the request's own.
    pub fn apply_preset(&mut self, preset: &Map<String, Json>) {
        for (name, value) in preset {
            self.fields.entry(name.clone()).or_insert_with(|| value.clone());
        }
    }
}

/// Reads and checks a request; `max_image_bytes` bounds each uploaded image.
pub fn parse(raw: &RawRequest, max_image_bytes: usize) -> Result<GenerateRequest, RestError> {
    let fields = Fields(&raw.fields);
    if let Some(unknown) = raw.fields.keys().find(|name| !FIELDS.contains(&name.as_str())) {
        return Err(RestError::field(
            unknown,
            format!("`{unknown}` is not a field of /v1/generate"),
        ));
    }
    let family = match fields.string("family")?.as_deref() {
        None => Family::Sd15,
        Some(name) => Family::ALL
            .into_iter()
            .find(|family| family.name() == name)
            .ok_or_else(|| {
                RestError::field(
                    "family",
                    format!("unknown family `{name}`: use sd15, sdxl, sd3 or flux"),
                )
            })?,
    };
    let mode = match fields.string("mode")?.as_deref() {
        None => Mode::Text2Img,
        Some(name) => Mode::ALL.into_iter().find(|mode| mode.name() == name).ok_or_else(|| {
            let names: Vec<_> = Mode::ALL.iter().map(|mode| mode.name()).collect();
            RestError::field(
                "mode",
                format!("unknown mode `{name}`: use one of {}", names.join(", ")),
            )
        })?,
    };
    let defaults = Defaults::of(family, mode);
    let prompt = fields.string("prompt")?.unwrap_or_default();
    if prompt.trim().is_empty() {
        return Err(RestError::field("prompt", "a prompt is required"));
    }
    let model = fields.name("model")?;
    let unet = fields.name("unet")?;
    let clip = match raw.fields.get("clip") {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::String(name)) => vec![name.clone()],
        Some(Json::Array(names)) if (1..=3).contains(&names.len()) => names
            .iter()
            .map(|name| name.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| RestError::field("clip", CLIP_FIELD))?,
        Some(_) => return Err(RestError::field("clip", CLIP_FIELD)),
    };
    let vae = fields.name("vae")?;
    if model.is_some() && (unet.is_some() || !clip.is_empty() || vae.is_some()) {
        return Err(RestError::field(
            "model",
            "give either `model` (one checkpoint file) or `unet` with `clip` and `vae`, not both",
        ));
    }
    let split_parts = [unet.is_some(), !clip.is_empty(), vae.is_some()];
    if split_parts.contains(&true) && split_parts.contains(&false) {
        let missing = [
            ("unet", unet.is_none()),
            ("clip", clip.is_empty()),
            ("vae", vae.is_none()),
        ]
        .into_iter()
        .find(|(_, missing)| *missing)
        .map_or("unet", |(name, _)| name);
        return Err(RestError::field(
            missing,
            "split model files need all three of `unet`, `clip` and `vae`",
        ));
    }
    let refiner = fields.name("refiner")?;
    if refiner.is_some() && (family != Family::Sdxl || mode != Mode::Text2Img) {
        return Err(RestError::field(
            "refiner",
            "a refiner works with family sdxl and mode text2img",
        ));
    }
    let width = fields.side("width", defaults.side)?;
    let height = fields.side("height", defaults.side)?;
    let seed = match raw.fields.get("seed") {
        None | Some(Json::Null) => None,
        Some(value) if value.as_i64() == Some(-1) => None,
        Some(value) => Some(value.as_u64().ok_or_else(|| {
            RestError::field(
                "seed",
                "`seed` is a whole number from 0 to 18446744073709551615, or -1 for a random one",
            )
        })?),
    };
    let stream = fields.flag("stream")?;
    let run_async = fields.flag("async")?;
    if stream && run_async {
        return Err(RestError::field(
            "async",
            "ask for either `stream` or `async`, not both",
        ));
    }
    let image = fields.image("image", max_image_bytes, &raw.files)?;
    let mask = fields.image("mask", max_image_bytes, &raw.files)?;
    if mode.needs_image() && image.is_none() {
        return Err(RestError::field(
            "image",
            format!("mode {} needs an `image`", mode.name()),
        ));
    }
    if mode == Mode::Inpaint && mask.is_none() {
        return Err(RestError::field(
            "mask",
            "mode inpaint needs a `mask` (white where to repaint)",
        ));
    }
    if let (Some(image), Some(mask)) = (&image, &mask) {
        if (image.width, image.height) != (mask.width, mask.height) {
            return Err(RestError::field(
                "mask",
                format!(
                    "the mask is {}×{} but the image is {}×{}: they must be the same size",
                    mask.width, mask.height, image.width, image.height
                ),
            ));
        }
    }
    let outpaint = fields.outpaint()?;
    if mode == Mode::Outpaint && outpaint.left + outpaint.top + outpaint.right + outpaint.bottom == 0 {
        return Err(RestError::field(
            "outpaint",
            "mode outpaint needs `outpaint` with at least one side to extend, such as {\"right\": 256}",
        ));
    }
    let controlnets = fields.controlnets(max_image_bytes)?;
    if mask.is_none() && controlnets.iter().any(|control| control.kind == ControlKind::Inpaint) {
        return Err(RestError::field(
            "controlnets",
            "an inpaint ControlNet marks the request's `mask` on its image: send a `mask` (white where to repaint)",
        ));
    }
    let relight = fields.relight(max_image_bytes)?;
    match (&relight, mode) {
        (None, Mode::Relight) => {
            return Err(RestError::field(
                "relight",
                "mode relight needs `relight`: {\"model\" (IC-Light, in models/diffusion_models), \"light_image\", …}",
            ))
        }
        (Some(_), Mode::Relight) if family != Family::Sd15 => {
            return Err(RestError::field(
                "family",
                "IC-Light relights with SD1.5 models: mode relight works with family sd15",
            ))
        }
        (Some(relight), Mode::Relight) if !relight.keep_background && mask.is_none() => return Err(RestError::field(
            "mask",
            "`keep_background: false` paints a new background around the subject: send a `mask` (white on the subject)",
        )),
        (Some(_), mode) if mode != Mode::Relight => {
            return Err(RestError::field("relight", "`relight` goes with mode relight"))
        }
        _ => {}
    }
    let webhook_url = fields.string("webhook_url")?;
    let return_style = match fields.string("return")?.as_deref() {
        None | Some("base64") => ReturnStyle::Base64,
        Some("url") => ReturnStyle::Url,
        Some(other) => {
            return Err(RestError::field(
                "return",
                format!("`return` is base64 or url, not `{other}`"),
            ))
        }
    };
    let output_format = match fields.string("output_format")? {
        None => OutputFormat::Png,
        Some(name) => OutputFormat::parse(&name).ok_or_else(|| {
            RestError::field(
                "output_format",
                format!("`output_format` is png, jpeg or webp, not `{name}`"),
            )
        })?,
    };
    Ok(GenerateRequest {
        family,
        mode,
        model,
        unet,
        clip,
        vae,
        refiner,
        refine_switch: fields.number("refine_switch", 0.8, 0.0, 1.0)?,
        prompt,
        negative_prompt: fields.string("negative_prompt")?.unwrap_or_default(),
        width,
        height,
        steps: fields.count("steps", defaults.steps, 1, MAX_STEPS)?,
        cfg: fields.number("cfg", defaults.cfg, 0.0, 100.0)?,
        sampler: fields.name("sampler")?.unwrap_or_else(|| defaults.sampler.to_string()),
        scheduler: fields
            .name("scheduler")?
            .unwrap_or_else(|| defaults.scheduler.to_string()),
        seed,
        denoise: fields.number("denoise", defaults.denoise, 0.0, 1.0)?,
        batch_size: fields.count("batch_size", 1, 1, MAX_BATCH)?,
        image,
        mask,
        outpaint,
        loras: fields.loras()?,
        controlnets,
        ip_adapter: fields.ip_adapter(max_image_bytes)?,
        relight,
        styles: fields.names("styles")?,
        preset: fields.name("preset")?,
        priority: match raw.fields.get("priority") {
            None | Some(Json::Null) => 0,
            Some(value) => value
                .as_i64()
                .filter(|priority| priority.abs() <= 1_000_000)
                .ok_or_else(|| RestError::field("priority", "`priority` is a whole number (higher runs first)"))?,
        },
        webhook_url,
        stream,
        run_async,
        return_style,
        output_format,
    })
}

impl GenerateRequest {
    /// A plain request of a family and mode, as `/v1/models` asks whether Easel runs it.
    pub fn probe(family: Family, mode: Mode) -> GenerateRequest {
        let defaults = Defaults::of(family, mode);
        GenerateRequest {
            family,
            mode,
            model: None,
            unet: None,
            clip: Vec::new(),
            vae: None,
            refiner: None,
            refine_switch: 0.8,
            prompt: String::new(),
            negative_prompt: String::new(),
            width: defaults.side,
            height: defaults.side,
            steps: defaults.steps,
            cfg: defaults.cfg,
            sampler: defaults.sampler.into(),
            scheduler: defaults.scheduler.into(),
            seed: None,
            denoise: defaults.denoise,
            batch_size: 1,
            image: None,
            mask: None,
            outpaint: Outpaint::default(),
            loras: Vec::new(),
            controlnets: Vec::new(),
            ip_adapter: None,
            relight: None,
            styles: Vec::new(),
            preset: None,
            priority: 0,
            webhook_url: None,
            stream: false,
            run_async: false,
            return_style: ReturnStyle::Base64,
            output_format: OutputFormat::Png,
        }
    }
}

/// A family's (and mode's) defaults for the fields a request leaves out.
struct Defaults {
    side: u32,
    steps: u32,
    cfg: f64,
    sampler: &'static str,
    scheduler: &'static str,
    denoise: f64,
}

impl Defaults {
    fn of(family: Family, mode: Mode) -> Defaults {
        // IC-Light's: a light-map start picture, sampled gently.
        if mode == Mode::Relight {
            return Defaults {
                side: 512,
                steps: 30,
                cfg: 1.5,
                sampler: "dpmpp_2m_sde",
                scheduler: "karras",
                denoise: 0.7,
            };
        }
        let denoise = if mode == Mode::Img2Img { 0.75 } else { 1.0 };
        match family {
            Family::Sd15 => Defaults {
                side: 512,
                steps: 20,
                cfg: 7.0,
                sampler: "dpmpp_2m",
                scheduler: "karras",
                denoise,
            },
            Family::Sdxl => Defaults {
                side: 1024,
                steps: 25,
                cfg: 7.0,
                sampler: "dpmpp_2m_sde",
                scheduler: "karras",
                denoise,
            },
            Family::Sd3 => Defaults {
                side: 1024,
                steps: 28,
                cfg: 4.5,
                sampler: "dpmpp_2m",
                scheduler: "sgm_uniform",
                denoise,
            },
            Family::Flux => Defaults {
                side: 1024,
                steps: 20,
                // FLUX's guidance: fill models want much more than dev.
                cfg: if matches!(mode, Mode::Inpaint | Mode::Outpaint) {
                    30.0
                } else {
                    3.5
                },
                sampler: "euler",
                scheduler: "simple",
                denoise,
            },
        }
    }
}

/// What the `clip` field takes.
const CLIP_FIELD: &str = "`clip` is a file name or a list of up to three (SD3: CLIP-L, CLIP-G, T5-XXL)";

/// Typed reads of the raw fields, each refusal naming its field.
struct Fields<'a>(&'a Map<String, Json>);

impl Fields<'_> {
    fn get(&self, name: &str) -> Option<&Json> {
        self.0.get(name).filter(|value| !value.is_null())
    }

    fn string(&self, name: &str) -> Result<Option<String>, RestError> {
        match self.get(name) {
            None => Ok(None),
            Some(Json::String(text)) => Ok(Some(text.clone())),
            Some(_) => Err(RestError::field(name, format!("`{name}` must be a string"))),
        }
    }

    /// The object field `name` as fields of its own, if given; `keys` names its keys in the
    /// refusal of anything else.
    fn object(&self, name: &str, keys: &str) -> Result<Option<Fields<'_>>, RestError> {
        match self.get(name) {
            None => Ok(None),
            Some(value) => value
                .as_object()
                .map(|object| Some(Fields(object)))
                .ok_or_else(|| RestError::field(name, format!("`{name}` is an object: {keys}"))),
        }
    }

    /// A non-empty name (a file, a sampler, a style).
    fn name(&self, name: &str) -> Result<Option<String>, RestError> {
        match self.string(name)? {
            Some(text) if text.trim().is_empty() => Err(RestError::field(name, format!("`{name}` is empty"))),
            other => Ok(other),
        }
    }

    fn names(&self, name: &str) -> Result<Vec<String>, RestError> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Json::String(one)) => Ok(vec![one.clone()]),
            Some(Json::Array(list)) => list
                .iter()
                .map(|item| item.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| RestError::field(name, format!("`{name}` is a list of names"))),
            Some(_) => Err(RestError::field(name, format!("`{name}` is a list of names"))),
        }
    }

    fn flag(&self, name: &str) -> Result<bool, RestError> {
        match self.get(name) {
            None => Ok(false),
            Some(Json::Bool(flag)) => Ok(*flag),
            Some(Json::String(text)) if text == "true" || text == "false" => Ok(text == "true"),
            Some(_) => Err(RestError::field(name, format!("`{name}` is true or false"))),
        }
    }

    fn number(&self, name: &str, default: f64, min: f64, max: f64) -> Result<f64, RestError> {
        match self.get(name) {
            None => Ok(default),
            Some(value) => value
                .as_f64()
                .filter(|number| (min..=max).contains(number))
                .ok_or_else(|| RestError::field(name, format!("`{name}` is a number from {min} to {max}"))),
        }
    }

    fn count(&self, name: &str, default: u32, min: u32, max: u32) -> Result<u32, RestError> {
        match self.get(name) {
            None => Ok(default),
            Some(value) => value
                .as_u64()
                .filter(|count| (u64::from(min)..=u64::from(max)).contains(count))
                .map(|count| count as u32)
                .ok_or_else(|| RestError::field(name, format!("`{name}` is a whole number from {min} to {max}"))),
        }
    }

    /// A width or height: a multiple of 8 up to [`MAX_SIDE`].
    fn side(&self, name: &str, default: u32) -> Result<u32, RestError> {
        let side = self.count(name, default, 8, MAX_SIDE)?;
        if side % 8 != 0 {
            return Err(RestError::field(
                name,
                format!("`{name}` must be a multiple of 8, not {side}"),
            ));
        }
        Ok(side)
    }

    fn outpaint(&self) -> Result<Outpaint, RestError> {
        let mut outpaint = Outpaint::default();
        let Some(value) = self.get("outpaint") else {
            return Ok(outpaint);
        };
        let Json::Object(sides) = value else {
            return Err(RestError::field(
                "outpaint",
                "`outpaint` is {\"left\", \"top\", \"right\", \"bottom\", \"feathering\"} in pixels",
            ));
        };
        for (name, amount) in sides {
            let slot = match name.as_str() {
                "left" => &mut outpaint.left,
                "top" => &mut outpaint.top,
                "right" => &mut outpaint.right,
                "bottom" => &mut outpaint.bottom,
                "feathering" => &mut outpaint.feathering,
                _ => return Err(RestError::field("outpaint", format!("`outpaint` has no side `{name}`"))),
            };
            *slot = amount
                .as_u64()
                .filter(|amount| *amount <= u64::from(MAX_SIDE))
                .map(|amount| amount as u32)
                .ok_or_else(|| {
                    RestError::field("outpaint", format!("`outpaint.{name}` is a whole number of pixels"))
                })?;
        }
        Ok(outpaint)
    }

    fn loras(&self) -> Result<Vec<LoraRequest>, RestError> {
        let list = match self.get("loras") {
            None => return Ok(Vec::new()),
            Some(Json::Array(list)) if list.len() <= MAX_LORAS => list,
            Some(_) => {
                return Err(RestError::field(
                    "loras",
                    format!(
                        "`loras` is a list of up to {MAX_LORAS} {{\"name\", \"strength_model\", \"strength_clip\"}}"
                    ),
                ))
            }
        };
        list.iter()
            .map(|lora| {
                let name = lora
                    .as_str()
                    .or_else(|| lora["name"].as_str())
                    .filter(|name| !name.is_empty())
                    .ok_or_else(|| RestError::field("loras", "each LoRA needs a `name`"))?;
                let strength = |key: &str| -> Result<f64, RestError> {
                    match lora.get(key).filter(|value| !value.is_null()) {
                        None => Ok(1.0),
                        Some(value) => value
                            .as_f64()
                            .filter(|strength| strength.abs() <= 100.0)
                            .ok_or_else(|| RestError::field("loras", format!("`{key}` is a number from -100 to 100"))),
                    }
                };
                Ok(LoraRequest {
                    name: name.to_string(),
                    strength_model: strength("strength_model")?,
                    strength_clip: strength("strength_clip")?,
                })
            })
            .collect()
    }

    /// The ControlNets to chain: `{"model" (or the family API's "controlnet"), "type": canny |
    /// depth | inpaint | none, "image" (base64; absent: the request's image), "strength" [0.7],
    /// "start_percent" [0], "end_percent" [0.4]}`.
    fn controlnets(&self, max_image_bytes: usize) -> Result<Vec<ControlnetRequest>, RestError> {
        const FIELD: &str = "controlnets";
        let list = match self.get(FIELD) {
            None => return Ok(Vec::new()),
            Some(Json::Array(list)) if list.len() <= MAX_CONTROLNETS => list,
            Some(_) => {
                return Err(RestError::field(
                    FIELD,
                    format!(
                        "`controlnets` is a list of up to {MAX_CONTROLNETS} {{\"model\", \"type\", \"image\", \"strength\", \"start_percent\", \"end_percent\"}}"
                    ),
                ))
            }
        };
        list.iter()
            .map(|entry| {
                let entry = Fields(
                    entry
                        .as_object()
                        .ok_or_else(|| RestError::field(FIELD, "each ControlNet is an object"))?,
                );
                let model = entry
                    .get("model")
                    .or_else(|| entry.get("controlnet"))
                    .and_then(Json::as_str)
                    .filter(|name| !name.is_empty())
                    .ok_or_else(|| {
                        RestError::field(FIELD, "each ControlNet needs a `model` (a file in models/controlnet)")
                    })?;
                let kind = match entry.get("type") {
                    None => ControlKind::Plain,
                    Some(kind) => kind.as_str().and_then(ControlKind::parse).ok_or_else(|| {
                        RestError::field(FIELD, "a ControlNet's `type` is canny, depth, inpaint or none")
                    })?,
                };
                let number = |key: &str, default: f64, max: f64| -> Result<f64, RestError> {
                    entry
                        .number(key, default, 0.0, max)
                        .map_err(|error| RestError::field(FIELD, error.message))
                };
                let (start_percent, end_percent) =
                    (number("start_percent", 0.0, 1.0)?, number("end_percent", 0.4, 1.0)?);
                if start_percent > end_percent {
                    return Err(RestError::field(
                        FIELD,
                        "a ControlNet's `start_percent` is after its `end_percent`",
                    ));
                }
                Ok(ControlnetRequest {
                    model: model.to_string(),
                    kind,
                    image: entry
                        .image("image", max_image_bytes, &[])
                        .map_err(|error| RestError::field(FIELD, error.message))?,
                    strength: number("strength", 0.7, 10.0)?,
                    start_percent,
                    end_percent,
                })
            })
            .collect()
    }

    /// The IP-Adapter: `{"ipadapter" (or "model"), "clip_vision", "images": [base64…],
    /// "image_negative": [base64…], "weight" [0.7], "start_at" [0], "end_at" [0.4],
    /// "weight_type" [linear], "combine_embeds" [concat], "embeds_scaling" [V only]}`.
    fn ip_adapter(&self, max_image_bytes: usize) -> Result<Option<IpAdapterRequest>, RestError> {
        const FIELD: &str = "ip_adapter";
        let Some(fields) = self.object(FIELD, "{\"ipadapter\", \"clip_vision\", \"images\", \"weight\", …}")? else {
            return Ok(None);
        };
        let in_field = |error: RestError| RestError::field(FIELD, error.message);
        let file = |keys: &[&str], folder: &str| -> Result<String, RestError> {
            keys.iter()
                .find_map(|key| fields.get(key).and_then(Json::as_str).filter(|name| !name.is_empty()))
                .map(str::to_string)
                .ok_or_else(|| {
                    RestError::field(
                        FIELD,
                        format!("the IP-Adapter needs `{}` (a file in models/{folder})", keys[0]),
                    )
                })
        };
        let images = |key: &str| -> Result<Vec<UploadedImage>, RestError> {
            let list = match fields.get(key) {
                None => return Ok(Vec::new()),
                Some(Json::String(one)) => vec![Json::String(one.clone())],
                Some(Json::Array(list)) if list.len() <= MAX_IP_ADAPTER_IMAGES => list.clone(),
                Some(_) => {
                    return Err(RestError::field(
                        FIELD,
                        format!("`{key}` is a list of up to {MAX_IP_ADAPTER_IMAGES} images (base64 or data URLs)"),
                    ))
                }
            };
            list.iter()
                .map(|image| {
                    nested_image(FIELD, key, image, max_image_bytes)?
                        .ok_or_else(|| RestError::field(FIELD, format!("`{key}` holds an empty image")))
                })
                .collect()
        };
        let images_given = images("images")?;
        if images_given.is_empty() {
            return Err(RestError::field(
                FIELD,
                "the IP-Adapter needs `images`: at least one image prompt",
            ));
        }
        let choice = |key: &str, default: &str, allowed: &[&str]| -> Result<String, RestError> {
            let value = fields
                .string(key)
                .map_err(in_field)?
                .unwrap_or_else(|| default.to_string());
            match allowed.contains(&value.as_str()) {
                true => Ok(value),
                false => Err(RestError::field(
                    FIELD,
                    format!("`{key}` is one of {}", allowed.join(", ")),
                )),
            }
        };
        let (start_at, end_at) = (
            fields.number("start_at", 0.0, 0.0, 1.0).map_err(in_field)?,
            fields.number("end_at", 0.4, 0.0, 1.0).map_err(in_field)?,
        );
        if start_at > end_at {
            return Err(RestError::field(
                FIELD,
                "the IP-Adapter's `start_at` is after its `end_at`",
            ));
        }
        Ok(Some(IpAdapterRequest {
            model: file(&["ipadapter", "model"], "ipadapter")?,
            clip_vision: file(&["clip_vision"], "clip_vision")?,
            images: images_given,
            negative_images: images("image_negative")?,
            weight: fields.number("weight", 0.7, -1.0, 5.0).map_err(in_field)?,
            start_at,
            end_at,
            weight_type: choice("weight_type", "linear", &WEIGHT_TYPES)?,
            combine_embeds: choice("combine_embeds", "concat", &COMBINE_METHODS)?,
            embeds_scaling: choice("embeds_scaling", "V only", &EMBEDS_SCALINGS)?,
        }))
    }

    /// The relight settings: `{"model", "light_image", "background", "light_strength" [0.5],
    /// "keep_background" [true], "remap_min" [-0.15], "remap_max" [1.14], "blends" [color at
    /// 0.1, then hue at 0.2]}`.
    fn relight(&self, max_image_bytes: usize) -> Result<Option<RelightRequest>, RestError> {
        const FIELD: &str = "relight";
        let Some(fields) = self.object(FIELD, "{\"model\", \"light_image\", \"light_strength\", …}")? else {
            return Ok(None);
        };
        let in_field = |error: RestError| RestError::field(FIELD, error.message);
        let model = fields.name("model").map_err(in_field)?.ok_or_else(|| {
            RestError::field(
                FIELD,
                "relighting needs `model`: the IC-Light file in models/diffusion_models",
            )
        })?;
        let image = |key: &str| match fields.get(key) {
            None => Ok(None),
            Some(image) => nested_image(FIELD, key, image, max_image_bytes),
        };
        let light_image = image("light_image")?.ok_or_else(|| {
            RestError::field(
                FIELD,
                "relighting needs `light_image`: the light map, bright where the light comes from",
            )
        })?;
        let blends = match fields.get("blends") {
            None => vec![("color".to_string(), 0.1), ("hue".to_string(), 0.2)],
            Some(Json::Array(list)) if list.len() <= MAX_RELIGHT_BLENDS => list
                .iter()
                .map(|blend| {
                    let mode = blend["mode"].as_str().filter(|mode| BLEND_MODES.contains(mode));
                    let percentage = blend["percentage"].as_f64().filter(|p| (0.0..=1.0).contains(p));
                    match (mode, percentage) {
                        (Some(mode), Some(percentage)) => Ok((mode.to_string(), percentage)),
                        _ => Err(RestError::field(
                            FIELD,
                            format!(
                                "each of `blends` is {{\"mode\": one of {}, \"percentage\": 0 to 1}}",
                                BLEND_MODES.join(", ")
                            ),
                        )),
                    }
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(RestError::field(
                    FIELD,
                    format!("`blends` is a list of up to {MAX_RELIGHT_BLENDS} {{\"mode\", \"percentage\"}}"),
                ))
            }
        };
        let (remap_min, remap_max) = (
            fields.number("remap_min", -0.15, -10.0, 1.0).map_err(in_field)?,
            fields.number("remap_max", 1.14, 0.0, 10.0).map_err(in_field)?,
        );
        Ok(Some(RelightRequest {
            model,
            light_image,
            background: image("background")?,
            light_strength: fields.number("light_strength", 0.5, 0.0, 1.0).map_err(in_field)?,
            keep_background: match fields.get("keep_background") {
                None => true,
                Some(_) => fields.flag("keep_background").map_err(in_field)?,
            },
            remap_min,
            remap_max,
            blends,
        }))
    }

    /// An image given as base64, a data URL, or (multipart) a file.
    fn image(
        &self,
        name: &str,
        max_bytes: usize,
        files: &[(String, Bytes)],
    ) -> Result<Option<UploadedImage>, RestError> {
        let bytes = match (self.get(name), files.iter().find(|(field, _)| field == name)) {
            (Some(_), Some(_)) => {
                return Err(RestError::field(
                    name,
                    format!("`{name}` was sent both as a file and as a field"),
                ))
            }
            (None, None) => return Ok(None),
            (None, Some((_, bytes))) => bytes.clone(),
            (Some(Json::String(text)), None) => Bytes::from(decode_base64(name, text)?),
            (Some(_), None) => {
                return Err(RestError::field(
                    name,
                    format!("`{name}` is an image as base64 or a data URL"),
                ))
            }
        };
        if bytes.len() > max_bytes {
            return Err(RestError::field(
                name,
                format!(
                    "`{name}` is {} bytes, over the upload limit of {max_bytes}",
                    bytes.len()
                ),
            ));
        }
        let format = image::guess_format(&bytes).map_err(|_| {
            RestError::field(
                name,
                format!("`{name}` is not an image Easel can read (PNG, JPEG, WebP, …)"),
            )
        })?;
        let extension = match format {
            image::ImageFormat::Png => "png",
            image::ImageFormat::Jpeg => "jpg",
            image::ImageFormat::WebP => "webp",
            image::ImageFormat::Bmp => "bmp",
            image::ImageFormat::Gif => "gif",
            image::ImageFormat::Tiff => "tiff",
            _ => {
                return Err(RestError::field(
                    name,
                    format!("`{name}` is in an image format Easel cannot read"),
                ))
            }
        };
        let (width, height) = image::ImageReader::with_format(std::io::Cursor::new(&bytes), format)
            .into_dimensions()
            .map_err(|error| RestError::field(name, format!("`{name}` does not decode: {error}")))?;
        if width > MAX_SIDE || height > MAX_SIDE {
            return Err(RestError::field(
                name,
                format!("`{name}` is {width}×{height}; sides up to {MAX_SIDE} are accepted"),
            ));
        }
        Ok(Some(UploadedImage {
            bytes,
            extension,
            width,
            height,
        }))
    }
}

/// An image inside an object field (`field.key`), as base64 or a data URL; a refusal names
/// `field`.
fn nested_image(field: &str, key: &str, image: &Json, max_bytes: usize) -> Result<Option<UploadedImage>, RestError> {
    let one = Map::from_iter([(key.to_string(), image.clone())]);
    Fields(&one)
        .image(key, max_bytes, &[])
        .map_err(|error| RestError::field(field, error.message))
}

/// The bytes of base64 text or a `data:…;base64,` URL.
fn decode_base64(field: &str, text: &str) -> Result<Vec<u8>, RestError> {
    let payload = match text.strip_prefix("data:") {
        Some(url) => url
            .split_once(";base64,")
            .map(|(_, data)| data)
            .ok_or_else(|| RestError::field(field, format!("`{field}` is a data URL without base64 data")))?,
        None => text,
    };
    // Line-wrapped base64 is unwrapped; the usual single line is decoded where it lies.
    let payload: std::borrow::Cow<'_, str> = if payload.bytes().any(|byte| byte.is_ascii_whitespace()) {
        payload
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect::<String>()
            .into()
    } else {
        payload.into()
    };
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| RestError::field(field, format!("`{field}` is not valid base64")))
}
