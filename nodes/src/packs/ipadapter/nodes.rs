//! The pack's nodes: IPAdapterModelLoader, IPAdapterUnifiedLoader, IPAdapter, IPAdapterAdvanced,
//! IPAdapterBatch, IPAdapterEmbeds, IPAdapterEncoder and IPAdapterCombineEmbeds (and
//! PrepImageForClipVision, in [`super::prep_image`]).

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, NodeRegistry, Services, Value};
use easel_models::checkpoint::Family;
use serde_json::{Map, Value as Json};

use super::attention::{EmbedsScaling, COMBINE_METHODS, EMBEDS_SCALINGS, WEIGHT_TYPES};
use super::{
    apply_ip_adapter, black_image_encoding, combine, encode_for, load_ip_adapter, ApplySettings, Embeds, ImagePrompt,
    IpAdapterPipeline, FOLDER,
};
use crate::clip_vision::{load_clip_vision, ClipVisionModel};
use crate::image::{Image, Mask};
use crate::loaders::model_files_fingerprint;
use crate::loaders::models::{cached, file_names};
use crate::model::diffusion_model::Model;
use crate::paths::Paths;
use crate::runtime::{device, tensor_error};
use easel_models::kernels::interpolate::bicubic_antialiased;

/// The pack's module name, as ComfyUI names a custom node pack's module.
pub(super) const MODULE: &str = "custom_nodes.ComfyUI_IPAdapter_plus";
/// The unified loader's presets.
const PRESETS: [&str; 6] = [
    "LIGHT - SD1.5 only (low strength)",
    "STANDARD (medium strength)",
    "VIT-G (medium strength)",
    "PLUS (high strength)",
    "PLUS FACE (portraits)",
    "FULL FACE - SD1.5 only (portraits stronger)",
];

pub(super) fn register(registry: &mut NodeRegistry) {
    registry.register(IpAdapterUnifiedLoader);
    registry.register(IpAdapterModelLoader);
    registry.register(IpAdapterSimple);
    registry.register(IpAdapterAdvanced { batch: false });
    registry.register(IpAdapterAdvanced { batch: true });
    registry.register(IpAdapterEmbeds);
    registry.register(IpAdapterEncoder);
    registry.register(IpAdapterCombineEmbeds);
    registry.register(super::prep_image::PrepImageForClipVision);
    registry.register(super::noise::IpAdapterNoise);
}

/// A weight input whose range the pack writes as integers (`"min": -1, "max": 3`).
fn weight(max: i64) -> InputSpec {
    InputSpec::of("FLOAT")
        .opt("default", 1.0)
        .opt("min", -1)
        .opt("max", max)
        .opt("step", 0.05)
}

fn fraction(default: f64) -> InputSpec {
    InputSpec::float(default, 0.0, 1.0).opt("step", 0.001)
}

/// The settings IPAdapterAdvanced, IPAdapterBatch and IPAdapterEmbeds read alike.
fn settings<'a>(
    inputs: &'a NodeInputs,
    combine_embeds: &'a str,
    unfold_batch: bool,
) -> Result<ApplySettings<'a>, NodeError> {
    let weight_type = inputs.string("weight_type")?;
    let scaling = inputs.string("embeds_scaling")?;
    Ok(ApplySettings {
        weight: inputs.float("weight")?,
        weight_type: WEIGHT_TYPES
            .into_iter()
            .find(|known| *known == weight_type)
            .ok_or_else(|| NodeError::value(format!("unknown weight type {weight_type}")))?,
        combine_embeds,
        start_at: inputs.float("start_at")?,
        end_at: inputs.float("end_at")?,
        attn_mask: inputs.optional_object::<Mask>("attn_mask")?,
        unfold_batch,
        embeds_scaling: EmbedsScaling::from_name(scaling)
            .ok_or_else(|| NodeError::value(format!("unknown embeds scaling {scaling}")))?,
    })
}

/// The adapter and the encoder to use: the `clip_vision` input, else the pipeline's.
fn adapter_and_encoder(inputs: &NodeInputs) -> Result<(IpAdapterPipeline, Option<ClipVisionModel>), NodeError> {
    let pipeline = inputs.object::<IpAdapterPipeline>("ipadapter")?.clone();
    let encoder = match inputs.optional_object::<ClipVisionModel>("clip_vision")? {
        Some(encoder) => Some(encoder.clone()),
        None => pipeline.clip_vision.clone(),
    };
    Ok((pipeline, encoder))
}

/// `IPAdapterModelLoader`.
pub struct IpAdapterModelLoader;

impl Node for IpAdapterModelLoader {
    fn schema(&self, services: &Services) -> NodeSchema {
        NodeSchema::v1("IPAdapterModelLoader", MODULE, "ipadapter/loaders")
            .display("IPAdapter Model Loader")
            .required("ipadapter_file", InputSpec::combo(&file_names(services, FOLDER)))
            .model_folder("ipadapter_file", FOLDER)
            .output(OutputSpec::of("IPADAPTER"))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &[("ipadapter_file", FOLDER)])
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let path = crate::loaders::models::model_file(ctx, FOLDER, inputs.string("ipadapter_file")?)?;
        let device = device(ctx.services);
        let adapter = cached(ctx, &path, "ipadapter", || load_ip_adapter(&path, &device))?;
        Ok(NodeOutput::values(vec![Value::object(IpAdapterPipeline {
            adapter,
            clip_vision: None,
        })]))
    }
}

/// The pack's file-name patterns (`get_clipvision_file`, `get_ipadapter_file`: the encoder's,
/// then the adapter's in the order tried), searched case-insensitively; `Err` for a preset the
/// model's family has no file for.
fn preset_patterns(preset: &str, sdxl: bool) -> Result<(&'static str, Vec<&'static str>), NodeError> {
    let preset = preset.to_lowercase();
    let clip_vision = match preset.starts_with("vit-g") {
        true => r"(ViT.bigG.14.*39B.b160k|ipadapter.*sdxl|sdxl.*model)\.(bin|safetensors)",
        false => r"(ViT.H.14.*s32B.b79K|ipadapter.*sd15|sd1.?5.*model)\.(bin|safetensors)",
    };
    let adapter = match (preset.as_str(), sdxl) {
        (p, true) if p.starts_with("light") => {
            return Err(NodeError::new("light model is not supported for SDXL"));
        }
        (p, false) if p.starts_with("light") => {
            return Ok((
                clip_vision,
                vec![r"sd15.light.v11\.(safetensors|bin)$", r"sd15.light\.(safetensors|bin)$"],
            ));
        }
        (p, true) if p.starts_with("standard") => r"ip.adapter.sdxl.vit.h\.(safetensors|bin)$",
        (p, false) if p.starts_with("standard") => r"ip.adapter.sd15\.(safetensors|bin)$",
        (p, true) if p.starts_with("vit-g") => r"ip.adapter.sdxl\.(safetensors|bin)$",
        (p, false) if p.starts_with("vit-g") => r"sd15.vit.g\.(safetensors|bin)$",
        (p, true) if p.starts_with("plus (") => r"plus.sdxl.vit.h\.(safetensors|bin)$",
        (p, false) if p.starts_with("plus (") => r"ip.adapter.plus.sd15\.(safetensors|bin)$",
        (p, true) if p.starts_with("plus face") => r"plus.face.sdxl.vit.h\.(safetensors|bin)$",
        (p, false) if p.starts_with("plus face") => r"plus.face.sd15\.(safetensors|bin)$",
        (p, true) if p.starts_with("full") => {
            return Err(NodeError::new("full face model is not supported for SDXL"));
        }
        (p, false) if p.starts_with("full") => r"full.face.sd15\.(safetensors|bin)$",
        _ => return Err(NodeError::new(format!("invalid type '{preset}'"))),
    };
    Ok((clip_vision, vec![adapter]))
}

/// The first file of `folder` whose name matches `pattern` (case-insensitively, anywhere).
fn find_file(paths: &Paths, folder: &str, pattern: &str) -> Result<Option<std::path::PathBuf>, NodeError> {
    let regex = fancy_regex::Regex::new(&format!("(?i){pattern}"))
        .map_err(|error| NodeError::new(format!("bad file pattern {pattern}: {error}")))?;
    let name = paths
        .filename_list(folder)
        .into_iter()
        .find(|name| regex.is_match(name).unwrap_or(false));
    Ok(name.and_then(|name| paths.full_path(folder, &name)))
}

/// `IPAdapterUnifiedLoader`: the CLIP vision encoder and the IP-Adapter of a preset, found in
/// the `clip_vision` and `ipadapter` folders by the pack's file-name rules.
pub struct IpAdapterUnifiedLoader;

impl Node for IpAdapterUnifiedLoader {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("IPAdapterUnifiedLoader", MODULE, "ipadapter")
            .display("IPAdapter Unified Loader")
            .required("model", InputSpec::of("MODEL"))
            .required("preset", InputSpec::combo(&PRESETS))
            .optional("ipadapter", InputSpec::of("IPADAPTER"))
            .output(OutputSpec::of("MODEL").named("model"))
            .output(OutputSpec::of("IPADAPTER").named("ipadapter"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let paths = ctx.services.require::<Paths>()?;
        let sdxl = matches!(model.0.family, Family::Sdxl | Family::SdxlRefiner);
        let (clip_pattern, adapter_patterns) = preset_patterns(inputs.string("preset")?, sdxl)?;
        let device = device(ctx.services);
        let clip_path = find_file(paths, "clip_vision", clip_pattern)?
            .ok_or_else(|| NodeError::new("ClipVision model not found."))?;
        let encoder = cached(ctx, &clip_path, "clip_vision", || load_clip_vision(&clip_path, &device))?;
        let mut adapter_path = None;
        for pattern in adapter_patterns {
            adapter_path = adapter_path.or(find_file(paths, FOLDER, pattern)?);
        }
        let adapter_path = adapter_path.ok_or_else(|| NodeError::new("IPAdapter model not found."))?;
        let adapter = cached(ctx, &adapter_path, "ipadapter", || {
            load_ip_adapter(&adapter_path, &device)
        })?;
        Ok(NodeOutput::values(vec![
            Value::object(model.clone()),
            Value::object(IpAdapterPipeline {
                adapter,
                clip_vision: Some(ClipVisionModel(encoder)),
            }),
        ]))
    }
}

/// `IPAdapter` (the simple node): the weight types "standard" (linear), "prompt is more
/// important" (ease out) and "style transfer", with the pipeline's encoder.
pub struct IpAdapterSimple;

impl Node for IpAdapterSimple {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("IPAdapter", MODULE, "ipadapter")
            .display("IPAdapter")
            .required("model", InputSpec::of("MODEL"))
            .required("ipadapter", InputSpec::of("IPADAPTER"))
            .required("image", InputSpec::of("IMAGE"))
            .required("weight", weight(3))
            .required("start_at", fraction(0.0))
            .required("end_at", fraction(1.0))
            .required(
                "weight_type",
                InputSpec::combo(&["standard", "prompt is more important", "style transfer"]),
            )
            .optional("attn_mask", InputSpec::of("MASK"))
            .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let pipeline = inputs.object::<IpAdapterPipeline>("ipadapter")?;
        let Some(encoder) = &pipeline.clip_vision else {
            return Err(NodeError::new(
                "CLIPVision model not present in the pipeline. Please load the models with the IPAdapterUnifiedLoader node.",
            ));
        };
        let weight_type = match inputs.string("weight_type")? {
            name if name.starts_with("style") => "style transfer",
            "prompt is more important" => "ease out",
            _ => "linear",
        };
        let settings = ApplySettings {
            weight: inputs.float("weight")?,
            weight_type,
            combine_embeds: "concat",
            start_at: inputs.float("start_at")?,
            end_at: inputs.float("end_at")?,
            attn_mask: inputs.optional_object::<Mask>("attn_mask")?,
            unfold_batch: false,
            embeds_scaling: EmbedsScaling::ValueOnly,
        };
        let prompt = ImagePrompt::Images {
            image: inputs.object::<Image>("image")?,
            negative: None,
        };
        let model = apply_ip_adapter(model, &pipeline.adapter, Some(encoder), prompt, &settings)?;
        Ok(NodeOutput::values(vec![Value::object(model)]))
    }
}

/// `IPAdapterAdvanced` ("IPAdapter Advanced") and, with `batch`, `IPAdapterBatch` ("IPAdapter
/// Batch (Adv.)"), where each latent of the batch takes its own image.
pub struct IpAdapterAdvanced {
    batch: bool,
}

impl Node for IpAdapterAdvanced {
    fn schema(&self, _: &Services) -> NodeSchema {
        let (class, display) = match self.batch {
            true => ("IPAdapterBatch", "IPAdapter Batch (Adv.)"),
            false => ("IPAdapterAdvanced", "IPAdapter Advanced"),
        };
        let schema = NodeSchema::v1(class, MODULE, "ipadapter")
            .display(display)
            .required("model", InputSpec::of("MODEL"))
            .required("ipadapter", InputSpec::of("IPADAPTER"))
            .required("image", InputSpec::of("IMAGE"))
            .required("weight", weight(5))
            .required("weight_type", InputSpec::combo(&WEIGHT_TYPES));
        let schema = match self.batch {
            true => schema,
            false => schema.required("combine_embeds", InputSpec::combo(&COMBINE_METHODS)),
        };
        let schema = schema
            .required("start_at", fraction(0.0))
            .required("end_at", fraction(1.0))
            .required("embeds_scaling", InputSpec::combo(&EMBEDS_SCALINGS));
        let schema = match self.batch {
            true => schema.required("encode_batch_size", InputSpec::int(0, 0, 4096)),
            false => schema,
        };
        schema
            .optional("image_negative", InputSpec::of("IMAGE"))
            .optional("attn_mask", InputSpec::of("MASK"))
            .optional("clip_vision", InputSpec::of("CLIP_VISION"))
            .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let (pipeline, encoder) = adapter_and_encoder(inputs)?;
        let encoder = encoder.ok_or_else(|| NodeError::new("Missing CLIPVision model."))?;
        let combine_embeds = match self.batch {
            true => "concat",
            false => inputs.string("combine_embeds")?,
        };
        let settings = settings(inputs, combine_embeds, self.batch)?;
        let prompt = ImagePrompt::Images {
            image: inputs.object::<Image>("image")?,
            negative: inputs.optional_object::<Image>("image_negative")?,
        };
        let model = apply_ip_adapter(model, &pipeline.adapter, Some(&encoder), prompt, &settings)?;
        Ok(NodeOutput::values(vec![Value::object(model)]))
    }
}

/// `IPAdapterEmbeds`: IPAdapterAdvanced on embeddings from IPAdapterEncoder.
pub struct IpAdapterEmbeds;

impl Node for IpAdapterEmbeds {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("IPAdapterEmbeds", MODULE, "ipadapter/embeds")
            .display("IPAdapter Embeds")
            .required("model", InputSpec::of("MODEL"))
            .required("ipadapter", InputSpec::of("IPADAPTER"))
            .required("pos_embed", InputSpec::of("EMBEDS"))
            .required("weight", weight(3))
            .required("weight_type", InputSpec::combo(&WEIGHT_TYPES))
            .required("start_at", fraction(0.0))
            .required("end_at", fraction(1.0))
            .required("embeds_scaling", InputSpec::combo(&EMBEDS_SCALINGS))
            .optional("neg_embed", InputSpec::of("EMBEDS"))
            .optional("attn_mask", InputSpec::of("MASK"))
            .optional("clip_vision", InputSpec::of("CLIP_VISION"))
            .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let (pipeline, encoder) = adapter_and_encoder(inputs)?;
        let negative = inputs.optional_object::<Embeds>("neg_embed")?;
        if encoder.is_none() && negative.is_none() {
            return Err(NodeError::new("Missing CLIPVision model."));
        }
        let settings = settings(inputs, "concat", false)?;
        let prompt = ImagePrompt::Embeds {
            positive: &inputs.object::<Embeds>("pos_embed")?.0,
            negative: negative.map(|embeds| &embeds.0),
        };
        let model = apply_ip_adapter(model, &pipeline.adapter, encoder.as_ref(), prompt, &settings)?;
        Ok(NodeOutput::values(vec![Value::object(model)]))
    }
}

/// `IPAdapterEncoder`: the images' embeddings for the adapter (times the weight), and the
/// unconditional ones (zeros, or a black image's hidden states for plus models); a mask
/// multiplies the preprocessed pixels, centre-cropped and resized as the pack does.
pub struct IpAdapterEncoder;

impl Node for IpAdapterEncoder {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("IPAdapterEncoder", MODULE, "ipadapter/embeds")
            .display("IPAdapter Encoder")
            .required("ipadapter", InputSpec::of("IPADAPTER"))
            .required("image", InputSpec::of("IMAGE"))
            .required("weight", InputSpec::float(1.0, -1.0, 3.0).opt("step", 0.01))
            .optional("mask", InputSpec::of("MASK"))
            .optional("clip_vision", InputSpec::of("CLIP_VISION"))
            .output(OutputSpec::of("EMBEDS").named("pos_embed"))
            .output(OutputSpec::of("EMBEDS").named("neg_embed"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let (pipeline, encoder) = adapter_and_encoder(inputs)?;
        let encoder = encoder.ok_or_else(|| NodeError::new("Missing CLIPVision model."))?;
        let adapter = &pipeline.adapter;
        let size = encoder.0.config().image_size;
        let pixel_mask = inputs
            .optional_object::<Mask>("mask")?
            .map(|mask| pixel_mask(mask, size, encoder.0.device()))
            .transpose()
            .map_err(tensor_error)?;
        let cond = encode_for(adapter, &encoder, inputs.object::<Image>("image")?, pixel_mask.as_ref())?;
        let uncond = match adapter.config().takes_hidden_states() {
            true => black_image_encoding(adapter, &encoder)?,
            false => cond.zeros_like().map_err(tensor_error)?,
        };
        let weight = inputs.float("weight")?;
        let cond = match weight != 1.0 {
            true => (cond * weight).map_err(tensor_error)?,
            false => cond,
        };
        Ok(NodeOutput::values(vec![
            Value::object(Embeds(cond)),
            Value::object(Embeds(uncond)),
        ]))
    }
}

/// The encoder's pixel mask [B, size, size] of a MASK (see [`square_resized`]).
fn pixel_mask(mask: &Mask, size: usize, device: &candle_core::Device) -> candle_core::Result<candle_core::Tensor> {
    let masks = candle_core::Tensor::from_slice(&mask.data, (mask.batch, 1, mask.height, mask.width), device)?;
    square_resized(&masks, size)?.squeeze(1)
}

/// torchvision's `CenterCrop(min(H, W))` then `Resize((size, size), BICUBIC, antialias=True)` of
/// [B, C, H, W] images: as they are when they already have that size, else the centre square
/// (torchvision's rounding) resized by antialiased bicubic.
pub(super) fn square_resized(images: &candle_core::Tensor, size: usize) -> candle_core::Result<candle_core::Tensor> {
    let (_, _, height, width) = images.dims4()?;
    if (height, width) == (size, size) {
        return Ok(images.clone());
    }
    let side = height.min(width);
    let top = ((height - side) as f64 / 2.0).round_ties_even() as usize;
    let left = ((width - side) as f64 / 2.0).round_ties_even() as usize;
    let square = images.narrow(2, top, side)?.narrow(3, left, side)?;
    bicubic_antialiased(&square, size, size)
}

/// `IPAdapterCombineEmbeds`: up to five embeddings joined, then combined into one.
pub struct IpAdapterCombineEmbeds;

impl Node for IpAdapterCombineEmbeds {
    fn schema(&self, _: &Services) -> NodeSchema {
        let methods = ["concat", "add", "subtract", "average", "norm average", "max", "min"];
        let schema = NodeSchema::v1("IPAdapterCombineEmbeds", MODULE, "ipadapter/embeds")
            .display("IPAdapter Combine Embeds")
            .required("embed1", InputSpec::of("EMBEDS"))
            .required("method", InputSpec::combo(&methods));
        (2..=5)
            .fold(schema, |schema, n| {
                schema.optional(&format!("embed{n}"), InputSpec::of("EMBEDS"))
            })
            .output(OutputSpec::of("EMBEDS"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let mut embeds = vec![inputs.object::<Embeds>("embed1")?.0.clone()];
        for n in 2..=5 {
            if let Some(more) = inputs.optional_object::<Embeds>(&format!("embed{n}"))? {
                embeds.push(more.0.clone());
            }
        }
        let method = inputs.string("method")?;
        if method == "concat" && embeds.len() == 1 {
            return Ok(NodeOutput::values(vec![Value::object(Embeds(embeds.remove(0)))]));
        }
        let joined = candle_core::Tensor::cat(&embeds, 0).map_err(tensor_error)?;
        let combined = combine(&joined, method).map_err(tensor_error)?;
        Ok(NodeOutput::values(vec![Value::object(Embeds(combined))]))
    }
}
