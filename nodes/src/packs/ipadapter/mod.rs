//! cubiq's ComfyUI_IPAdapter_plus (`custom_nodes.ComfyUI_IPAdapter_plus`): image prompts for
//! SD1.5 and SDXL. The IPADAPTER value is a loaded adapter (and the CLIP vision encoder the
//! unified loader chose for it); applying one ([`apply_ip_adapter`], the pack's
//! `ipadapter_execute`) encodes the images, projects them to context tokens and replaces the
//! UNet's cross-attentions with ones that also attend to them ([`attention`]). The nodes are in
//! [`nodes`].

pub mod attention;
pub mod nodes;
mod noise;
mod prep_image;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use easel_engine::{NodeError, NodeObject, NodeRegistry};
use easel_models::architectures::ip_adapter::{IpAdapter, IpAdapterConfig};
use easel_models::architectures::unet_patches::{AttentionKind, BlockPosition, ReplaceKey};
use easel_models::formats::pth::{is_pth_path, PthFile};
use easel_models::kernels::sgemm::Precision;
use easel_models::weights::{LayeredWeights, MappedWeights, RenamedWeights, WeightSource};

use self::attention::{to_size, EmbedsScaling, IpAdapterApplication, IpAdapterAttention, LayerWeight};
use crate::clip_vision::{ClipVisionModel, ClipVisionOutput};
use crate::image::{Image, Mask};
use crate::loaders::models::{file_size, open_weight_file};
use crate::model::diffusion_model::{DiffusionModel, Model};
use crate::runtime::tensor_error;

/// The models folder the pack registers.
pub const FOLDER: &str = "ipadapter";

/// Adds the pack's nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    nodes::register(registry);
}

/// The IPADAPTER socket.
#[derive(Clone)]
pub struct IpAdapterPipeline {
    pub adapter: Arc<IpAdapter>,
    /// The encoder IPAdapterUnifiedLoader loaded beside it.
    pub clip_vision: Option<ClipVisionModel>,
}

impl std::fmt::Debug for IpAdapterPipeline {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("IPAdapter")
    }
}

impl NodeObject for IpAdapterPipeline {
    fn type_name(&self) -> &'static str {
        "IPADAPTER"
    }
}

/// The EMBEDS socket: what IPAdapterEncoder made of images (pooled embeddings, or penultimate
/// hidden states for plus models).
#[derive(Clone, Debug)]
pub struct Embeds(pub Tensor);

impl NodeObject for Embeds {
    fn type_name(&self) -> &'static str {
        "EMBEDS"
    }
}

/// `ipadapter_model_loader`: an IP-Adapter file (its tensors under `image_proj.` and
/// `ip_adapter.`, or `adapter_modules.`; a torch pickle nesting `image_proj` and `ip_adapter`
/// dicts), and its size.
pub fn load_ip_adapter(path: &Path, device: &Device) -> Result<(IpAdapter, u64), NodeError> {
    let file = match is_pth_path(path) {
        true => nested_pickle(path).map_or_else(|| open_weight_file(path), Ok)?,
        false => open_weight_file(path)?,
    };
    let has_prefix = |prefix: &str| file.tensor_names().any(|name| name.starts_with(prefix));
    let file: Arc<dyn MappedWeights> = if has_prefix("adapter_modules.") {
        Arc::new(RenamedWeights::new(file, |name| {
            match name.strip_prefix("adapter_modules.") {
                Some(rest) => format!("ip_adapter.{rest}"),
                None => name.to_string(),
            }
        }))
    } else {
        file
    };
    if !file.tensor_names().any(|name| name.starts_with("ip_adapter.")) {
        return Err(NodeError::new(format!("invalid IPAdapter model {}", path.display())));
    }
    let config = IpAdapterConfig::infer(file.as_ref()).map_err(|error| NodeError::new(error.to_string()))?;
    let source = WeightSource::new(file, "", device, Precision::F32);
    let adapter = IpAdapter::new(config, source.weights()).map_err(tensor_error)?;
    Ok((adapter, file_size(path)))
}

/// A torch pickle's `image_proj` and `ip_adapter` dicts as one file of prefixed names (how the
/// `.bin` releases save them); `None` when the file does not nest them.
fn nested_pickle(path: &Path) -> Option<Arc<dyn MappedWeights>> {
    let part = |key: &'static str| -> Option<Arc<dyn MappedWeights>> {
        let file: Arc<dyn MappedWeights> = Arc::new(PthFile::open_nested(path, key).ok()?);
        Some(Arc::new(RenamedWeights::new(file, move |name| format!("{key}.{name}"))))
    };
    let (projection, layers) = (part("image_proj")?, part("ip_adapter")?);
    let names: HashSet<String> = projection.tensor_names().map(str::to_string).collect();
    Some(Arc::new(LayeredWeights::new(projection, names, layers, "")))
}

/// What the image prompt is made of: images (and an optional negative image), or embeddings
/// from IPAdapterEncoder.
pub enum ImagePrompt<'a> {
    Images {
        image: &'a Image,
        negative: Option<&'a Image>,
    },
    Embeds {
        positive: &'a Tensor,
        negative: Option<&'a Tensor>,
    },
}

/// The settings of one application (the pack's `ipa_args`).
pub struct ApplySettings<'a> {
    pub weight: f64,
    /// One of [`attention::WEIGHT_TYPES`].
    pub weight_type: &'static str,
    /// "concat", "add", "subtract", "average" or "norm average".
    pub combine_embeds: &'a str,
    pub start_at: f64,
    pub end_at: f64,
    pub attn_mask: Option<&'a Mask>,
    pub unfold_batch: bool,
    pub embeds_scaling: EmbedsScaling,
}

/// `encode_image_masked` as the pack encodes: what the adapter takes of `images` (the
/// penultimate hidden states for plus models, else the pooled embeddings), the preprocessed
/// pixels multiplied by `pixel_mask` where one is given.
pub fn encode_for(
    adapter: &IpAdapter,
    encoder: &ClipVisionModel,
    images: &Image,
    pixel_mask: Option<&Tensor>,
) -> Result<Tensor, NodeError> {
    let ClipVisionOutput(output) = encoder.encode_masked(images, true, pixel_mask)?;
    Ok(match adapter.config().takes_hidden_states() {
        true => output.penultimate_hidden_states,
        false => output.image_embeds,
    })
}

/// What a plus model's unconditional side sees without a negative image: a black image encoded.
pub fn black_image_encoding(adapter: &IpAdapter, encoder: &ClipVisionModel) -> Result<Tensor, NodeError> {
    let size = encoder.0.config().image_size;
    encode_for(adapter, encoder, &Image::filled(1, size, size, 3, 0.0), None)
}

/// `ipadapter_execute`: `model` with `adapter` attending to `prompt` at every cross-attention the
/// pack patches.
pub fn apply_ip_adapter(
    model: &Model,
    adapter: &Arc<IpAdapter>,
    encoder: Option<&ClipVisionModel>,
    prompt: ImagePrompt,
    settings: &ApplySettings,
) -> Result<Model, NodeError> {
    if model.0.network.unet().is_none() {
        return Err(NodeError::new(
            "IPAdapter patches a UNet's cross-attention; this model has none",
        ));
    }
    let missing_encoder = || NodeError::new("Missing CLIPVision model.");
    let plus = adapter.config().takes_hidden_states();
    let (cond, uncond) = match prompt {
        ImagePrompt::Images { image, negative } => {
            let encoder = encoder.ok_or_else(missing_encoder)?;
            let cond = encode_for(adapter, encoder, image, None)?;
            let uncond = match (negative, plus) {
                (Some(negative), _) => encode_for(adapter, encoder, negative, None)?,
                (None, true) => black_image_encoding(adapter, encoder)?,
                (None, false) => cond.zeros_like().map_err(tensor_error)?,
            };
            (cond, uncond)
        }
        ImagePrompt::Embeds { positive, negative } => {
            let uncond = match (negative, plus) {
                (Some(negative), _) => negative.clone(),
                (None, true) => black_image_encoding(adapter, encoder.ok_or_else(missing_encoder)?)?,
                (None, false) => positive.zeros_like().map_err(tensor_error)?,
            };
            (positive.clone(), uncond)
        }
    };
    let device = &model.0.device;
    let on_device = |t: &Tensor| t.to_device(device)?.to_dtype(DType::F32);
    let (cond, uncond) = (
        on_device(&cond).map_err(tensor_error)?,
        on_device(&uncond).map_err(tensor_error)?,
    );
    let images = cond.dim(0).map_err(tensor_error)?;
    let uncond = to_size(&uncond, images).map_err(tensor_error)?;
    let (cond, uncond) = match (settings.combine_embeds, images > 1 && !settings.unfold_batch) {
        ("concat", _) | (_, false) => (cond, uncond),
        (method, true) => (
            combine(&cond, method).map_err(tensor_error)?,
            uncond.narrow(0, 0, 1).map_err(tensor_error)?,
        ),
    };
    let cond = adapter.tokens(&cond).map_err(tensor_error)?;
    let uncond = adapter.tokens(&uncond).map_err(tensor_error)?;
    let sdxl = adapter.config().sdxl;
    let weight = layer_weight(settings.weight, settings.weight_type, sdxl);
    let schedule = &model.0.schedule;
    let sigma_range = (
        schedule.percent_to_sigma(settings.start_at) as f32,
        schedule.percent_to_sigma(settings.end_at) as f32,
    );
    let application = Arc::new(IpAdapterApplication::new(
        adapter.clone(),
        weight,
        settings.weight_type,
        cond,
        uncond,
        settings.attn_mask.cloned(),
        sigma_range,
        settings.unfold_batch,
        settings.embeds_scaling,
    ));
    let mut patches = model.0.patches.clone();
    for (module, (block, block_index)) in patched_attentions(sdxl).into_iter().enumerate() {
        let key = ReplaceKey {
            kind: AttentionKind::CrossAttention,
            block,
            block_index,
        };
        let replacement =
            IpAdapterAttention::extended(patches.unet.replacement_at(&key), application.clone(), 2 * module + 1);
        patches.unet.replace(key, Arc::new(replacement));
    }
    Ok(Model(Arc::new(DiffusionModel {
        patches,
        ..(*model.0).clone()
    })))
}

/// The cross-attentions the pack patches, in the order of the adapter's modules (1, 3, 5, …):
/// SD1.5's input blocks 1, 2, 4, 5, 7, 8 and output blocks 3–11; SDXL's transformer blocks of
/// input blocks 4, 5 (2 each), 7, 8 (10 each) and output blocks 0–5 (10, 10, 10, 2, 2, 2). The
/// pack also numbers the middle block's (last), under a key ComfyUI never looks up (`("middle",
/// 1)`, where ComfyUI 0.3.64 names the block `("middle", 0)`), so the middle block gets none.
fn patched_attentions(sdxl: bool) -> Vec<(BlockPosition, Option<usize>)> {
    if !sdxl {
        let inputs = [1, 2, 4, 5, 7, 8].map(|id| (BlockPosition::Input(id), None));
        let outputs = (3..=11).map(|id| (BlockPosition::Output(id), None));
        return inputs.into_iter().chain(outputs).collect();
    }
    let depth = |wide: bool| if wide { 10 } else { 2 };
    let inputs = [4, 5, 7, 8]
        .into_iter()
        .flat_map(|id| (0..depth(id >= 7)).map(move |index| (BlockPosition::Input(id), Some(index))));
    let outputs = (0..6).flat_map(|id| (0..depth(id < 3)).map(move |index| (BlockPosition::Output(id), Some(index))));
    inputs.chain(outputs).collect()
}

/// `combine_embeds` over the images (the first axis), to one.
pub fn combine(embeds: &Tensor, method: &str) -> candle_core::Result<Tensor> {
    let images = embeds.dim(0)?;
    match method {
        "add" => embeds.sum_keepdim(0),
        "subtract" => embeds.narrow(0, 0, 1)? - embeds.narrow(0, 1, images - 1)?.mean_keepdim(0)?,
        "average" => embeds.mean_keepdim(0),
        "norm average" => {
            let norm = embeds.sqr()?.sum_keepdim(0)?.sqrt()?;
            embeds.broadcast_div(&norm)?.mean_keepdim(0)
        }
        "max" => embeds.max_keepdim(0),
        "min" => embeds.min_keepdim(0),
        _ => Ok(embeds.clone()),
    }
}

/// The weight of the composition layers under "style and composition" (the pack's default
/// `weight_composition`, 1) and "style transfer precise" (the weight).
fn composition_weight(weight_type: &str, weight: f64) -> f64 {
    match weight_type {
        "style and composition" => 1.0,
        _ => weight,
    }
}

/// The weight of the layer-dependent weight types, by transformer index (SD1.5's 16, SDXL's
/// 11), as the pack sets them; other types keep one weight.
fn layer_weight(weight: f64, weight_type: &str, sdxl: bool) -> LayerWeight {
    let w = weight;
    let pairs: Vec<(usize, f64)> = match (weight_type, sdxl) {
        ("style transfer", true) => vec![(6, w)],
        ("style transfer", false) => [0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15].map(|t| (t, w)).to_vec(),
        ("composition", true) => vec![(3, w)],
        ("composition", false) => vec![(4, w * 0.25), (5, w)],
        ("strong style transfer", true) => [0, 1, 2, 4, 5, 6, 7, 8, 9, 10].map(|t| (t, w)).to_vec(),
        ("strong style transfer", false) => [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
            .map(|t| (t, w))
            .to_vec(),
        // Style and composition: the composition layers at the composition weight, which is 1
        // for "style and composition" (the pack's default `weight_composition`) and the weight
        // for "style transfer precise".
        ("style and composition" | "style transfer precise", true) => {
            vec![(3, composition_weight(weight_type, w)), (6, w)]
        }
        ("style and composition" | "style transfer precise", false) => {
            let composition = composition_weight(weight_type, w);
            let mut pairs: Vec<(usize, f64)> = [0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15].map(|t| (t, w)).to_vec();
            pairs.extend([(4, composition * 0.25), (5, composition)]);
            pairs
        }
        ("composition precise", true) => (0..11)
            .map(|t| (t, if t == 3 || t == 6 { w } else { w * 0.1 }))
            .collect(),
        ("composition precise", false) => (0..16)
            .map(|t| match t {
                4 => (t, w * 0.25),
                6..=8 => (t, w * 0.1),
                _ => (t, w),
            })
            .collect(),
        _ => return LayerWeight::Uniform(weight),
    };
    LayerWeight::PerTransformer(pairs.into_iter().collect())
}
