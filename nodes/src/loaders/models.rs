//! The model loaders: whole checkpoints (`CheckpointLoaderSimple`: SD1.x, SD2.x, SDXL, SD3 and
//! FLUX as ComfyUI saves them) and the parts people keep in
//! separate files (`UNETLoader`, ComfyUI-GGUF's `UnetLoaderGGUF`, `VAELoader`; the text-encoder
//! loaders are in [`crate::loaders::text_encoders`]), recognised from their tensors and built over the
//! files' memory maps. Loaded parts are shared through the [`ModelCache`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value as Json};

use candle_core::Device;
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use easel_models::architectures::clip_text::ClipTextEncoder;
use easel_models::architectures::flux::{Flux, FluxConfig};
use easel_models::architectures::mmdit::{Mmdit, MmditConfig};
use easel_models::architectures::t5::{T5Config, T5Encoder};
use easel_models::architectures::unet::{UNet, UNetConfig};
use easel_models::architectures::vae::{Vae, VaeConfig};
use easel_models::checkpoint::{
    detect_checkpoint, detect_family, detect_unet_family, edm_v_prediction_range, is_v_prediction, DetectError, Family,
    TextEncoderKind, TextEncoderLayout, FLUX_CLIP_L_PREFIX, FLUX_T5_PREFIX, FLUX_VAE_PREFIX, SD3_CLIP_G_PREFIX,
    SD3_CLIP_L_PREFIX, SD3_T5_PREFIX, UNET_PREFIX, VAE_PREFIX,
};
use easel_models::formats::fp8::Fp8Format;
use easel_models::formats::gguf::GgufFile;
use easel_models::formats::pth::{is_pth_path, PthFile};
use easel_models::kernels::sgemm::Precision;
use easel_models::sampling::schedule::{ContinuousTimestep, SigmaSchedule, FLUX_DEV_SHIFT, SD3_SHIFT};
use easel_models::weights::{MappedWeights, SafetensorsFile, TensorShapes, WeightSource};

use crate::latent::LatentFormat;
use crate::loaders::model_files_fingerprint;
use crate::loaders::t5_tokenizer_files::{find_t5_tokenizer, TokenizerSearch};
use crate::model::clip::{Clip, TextEncoder, TextNetwork};
use crate::model::diffusion_model::{DiffusionModel, DiffusionNetwork, Model, Prediction};
use crate::model::patches::ModelPatches;
use crate::model::vae::VaeModel;
use crate::model_cache::ModelCache;
use crate::paths::Paths;
use crate::runtime::{device, tensor_error, DiffusionModelPrecision};

/// The three parts of a checkpoint, loaded together.
pub struct LoadedCheckpoint {
    pub model: Model,
    pub clip: Option<Clip>,
    pub vae: Option<VaeModel>,
}

/// The file `name` in model folder `folder`, or ComfyUI's error for a missing one.
pub(crate) fn model_file(ctx: &NodeContext, folder: &str, name: &str) -> Result<PathBuf, NodeError> {
    let paths = ctx.services.require::<Paths>()?;
    paths.full_path(folder, name).ok_or_else(|| {
        NodeError::typed(
            "FileNotFoundError",
            format!("Model in folder '{folder}' with filename '{name}' not found."),
        )
    })
}

pub(crate) fn file_names(services: &Services, folder: &str) -> Vec<String> {
    services
        .get::<Paths>()
        .map(|paths| paths.filename_list(folder))
        .unwrap_or_default()
}

pub(crate) fn open(path: &Path) -> Result<Arc<SafetensorsFile>, NodeError> {
    SafetensorsFile::open(path)
        .map(Arc::new)
        .map_err(|error| NodeError::new(error.to_string()))
}

pub(crate) fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// A control model or annotator file: a PyTorch pickle (`.pth`, `.pt`, `.ckpt`, `.bin`, read
/// without running any of its code) or safetensors.
pub(crate) fn open_weight_file(path: &Path) -> Result<Arc<dyn MappedWeights>, NodeError> {
    if is_pth_path(path) {
        let file = PthFile::open(path).map_err(|error| NodeError::new(error.to_string()))?;
        return Ok(Arc::new(file));
    }
    Ok(open(path)?)
}

/// The GGUF file at `path` when its extension says it is one (`None`: another format).
pub(crate) fn open_gguf(path: &Path) -> Result<Option<GgufFile>, NodeError> {
    let is_gguf = path
        .extension()
        .is_some_and(|extension| extension.eq_ignore_ascii_case("gguf"));
    if !is_gguf {
        return Ok(None);
    }
    GgufFile::open(path)
        .map(Some)
        .map_err(|error| NodeError::new(error.to_string()))
}

/// ComfyUI's message for a file whose model type it cannot tell.
pub(crate) fn undetected(path: &Path, error: impl std::fmt::Display) -> NodeError {
    NodeError::new(format!(
        "ERROR: Could not detect model type of: {}\n{error}",
        path.display()
    ))
}

/// Runs `load` through the registry's model cache when there is one.
pub(crate) fn cached<T: Send + Sync + 'static>(
    ctx: &NodeContext,
    path: &Path,
    part: &'static str,
    load: impl FnOnce() -> Result<(T, u64), NodeError>,
) -> Result<Arc<T>, NodeError> {
    match ctx.services.get::<ModelCache>() {
        Some(cache) => cache.get_or_load(path, part, load),
        None => Ok(Arc::new(load()?.0)),
    }
}

/// The diffusion model of `family` whose UNet (`unet`) `source` holds.
pub(crate) fn build_model(
    source: WeightSource,
    family: Family,
    unet: UNetConfig,
    v_prediction: bool,
) -> Result<Model, NodeError> {
    let unet = UNet::new(unet, source.weights()).map_err(tensor_error)?;
    let device = source.device.clone();
    let edm_v_prediction = edm_v_prediction_range(source.file.as_ref(), family);
    let (prediction, schedule) = match edm_v_prediction {
        Some((sigma_min, sigma_max)) => (
            Prediction::V,
            SigmaSchedule::continuous(ContinuousTimestep::Edm, sigma_min, sigma_max),
        ),
        None if v_prediction => (Prediction::V, SigmaSchedule::sd_discrete()),
        None => (Prediction::Epsilon, SigmaSchedule::sd_discrete()),
    };
    Ok(Model(Arc::new(DiffusionModel {
        family,
        network: DiffusionNetwork::UNet(Arc::new(unet)),
        source,
        prediction,
        schedule,
        latent_format: LatentFormat::of(family),
        device,
        differential_diffusion: None,
        edm_v_prediction,
        ic_light: false,
        patches: ModelPatches::default(),
    })))
}

/// The text encoder `layout` describes in `file`; encoders compute in f32.
pub(crate) fn build_text_encoder(
    file: Arc<dyn MappedWeights>,
    layout: TextEncoderLayout,
    device: &Device,
) -> Result<TextEncoder, NodeError> {
    let source = WeightSource::new(file, &layout.prefix, device, Precision::F32);
    let network = ClipTextEncoder::new(layout.config, source.weights()).map_err(tensor_error)?;
    Ok(TextEncoder {
        network: TextNetwork::Clip {
            kind: layout.kind,
            encoder: Arc::new(network),
        },
        source,
    })
}

/// The T5 encoder under `prefix` in `file` (of `path`), with its tokenizer found by `search`;
/// encoders compute in f32.
pub(crate) fn build_t5(
    path: &Path,
    file: Arc<dyn MappedWeights>,
    prefix: &str,
    device: &Device,
    search: TokenizerSearch,
) -> Result<TextEncoder, NodeError> {
    let config = T5Config::infer(file.as_ref(), prefix).map_err(|error| undetected(path, error))?;
    let tokenizer = find_t5_tokenizer(path, search).map_err(|error| NodeError::new(error.to_string()))?;
    let source = WeightSource::new(file, prefix, device, Precision::F32);
    let encoder = T5Encoder::new(config, source.weights()).map_err(tensor_error)?;
    let network = TextNetwork::T5 {
        encoder: Arc::new(encoder),
        tokenizer,
    };
    Ok(TextEncoder { network, source })
}

/// The VAE under `prefix` in `file`; VAEs compute in f32.
fn build_vae(
    file: &Arc<SafetensorsFile>,
    prefix: &str,
    config: VaeConfig,
    device: &Device,
) -> Result<VaeModel, NodeError> {
    let source = WeightSource::new(file.clone(), prefix, device, Precision::F32);
    let network = Arc::new(Vae::new(config, source.weights()).map_err(tensor_error)?);
    Ok(VaeModel { network, source })
}

/// Loads a single-file checkpoint in ComfyUI's layout, the diffusion model multiplying in
/// `precision`; also returns the file size (the cache's measure of it).
/// A FLUX checkpoint's T5 finds its tokenizer through `search`.
pub fn load_checkpoint(
    path: &Path,
    device: &Device,
    precision: Precision,
    search: TokenizerSearch,
) -> Result<(LoadedCheckpoint, u64), NodeError> {
    let file = open(path)?;
    match detect_family(file.as_ref()) {
        Ok(Family::Flux) => return load_flux_checkpoint(path, file, device, precision, search),
        Ok(Family::Sd3) => return load_sd3_checkpoint(path, file, device, precision, search),
        _ => {}
    }
    let layout = detect_checkpoint(&file).map_err(|error| undetected(path, error))?;
    let source = WeightSource::new(file.clone(), UNET_PREFIX, device, precision);
    let model = build_model(source, layout.family, layout.unet, layout.v_prediction)?;
    let encoders = layout
        .text_encoders
        .into_iter()
        .map(|encoder| build_text_encoder(file.clone(), encoder, device))
        .collect::<Result<Vec<_>, _>>()?;
    let clip = (!encoders.is_empty()).then_some(Clip {
        family: layout.family,
        encoders,
        layer_from_end: None,
        t5_padding: None,
        hooks: None,
    });
    let vae = match layout.vae {
        Some(config) => Some(build_vae(&file, VAE_PREFIX, config, device)?),
        None => None,
    };
    Ok((LoadedCheckpoint { model, clip, vae }, file_size(path)))
}

/// A FLUX checkpoint as ComfyUI saves one: the model in the BFL layout, CLIP-L and T5-XXL under
/// `text_encoders.`, the VAE under `vae.`; a part that is absent is `None`, as in ComfyUI (the
/// CLIP needs both encoders).
fn load_flux_checkpoint(
    path: &Path,
    file: Arc<SafetensorsFile>,
    device: &Device,
    precision: Precision,
    search: TokenizerSearch,
) -> Result<(LoadedCheckpoint, u64), NodeError> {
    let prefix = flux_prefix(file.as_ref()).ok_or_else(|| {
        undetected(
            path,
            DetectError::MissingTensor(format!("{UNET_PREFIX}double_blocks.0.img_attn.qkv.weight")),
        )
    })?;
    let config = FluxConfig::infer(file.as_ref(), prefix).map_err(|error| undetected(path, error))?;
    let model = build_flux(WeightSource::new(file.clone(), prefix, device, precision), config)?;
    let clip_l = TextEncoderLayout::find(file.as_ref(), TextEncoderKind::ClipL, FLUX_CLIP_L_PREFIX)
        .map_err(|error| undetected(path, error))?;
    let clip = match clip_l {
        Some(clip_l) if file.has(&format!("{FLUX_T5_PREFIX}shared.weight")) => Some(Clip {
            family: Family::Flux,
            encoders: vec![
                build_text_encoder(file.clone(), clip_l, device)?,
                build_t5(path, file.clone(), FLUX_T5_PREFIX, device, search)?,
            ],
            layer_from_end: None,
            t5_padding: None,
            hooks: None,
        }),
        _ => None,
    };
    let vae = checkpoint_vae(path, &file, FLUX_VAE_PREFIX, device)?;
    Ok((LoadedCheckpoint { model, clip, vae }, file_size(path)))
}

/// An SD3 checkpoint as Stability and ComfyUI save one: the MMDiT under
/// `model.diffusion_model.`, the text encoders it has (CLIP-L, CLIP-G, T5-XXL: any of them, as
/// ComfyUI's `sd3_clip` runs with what is there) under `text_encoders.`, the VAE under
/// `first_stage_model.`; a part that is absent is `None`.
fn load_sd3_checkpoint(
    path: &Path,
    file: Arc<SafetensorsFile>,
    device: &Device,
    precision: Precision,
    search: TokenizerSearch,
) -> Result<(LoadedCheckpoint, u64), NodeError> {
    let config = MmditConfig::infer(file.as_ref(), UNET_PREFIX).map_err(|error| undetected(path, error))?;
    let model = build_mmdit(WeightSource::new(file.clone(), UNET_PREFIX, device, precision), config)?;
    let mut encoders = Vec::new();
    for (kind, prefix) in [
        (TextEncoderKind::ClipL, SD3_CLIP_L_PREFIX),
        (TextEncoderKind::ClipG, SD3_CLIP_G_PREFIX),
    ] {
        if let Some(layout) =
            TextEncoderLayout::find(file.as_ref(), kind, prefix).map_err(|error| undetected(path, error))?
        {
            encoders.push(build_text_encoder(file.clone(), layout, device)?);
        }
    }
    if file.has(&format!("{SD3_T5_PREFIX}encoder.final_layer_norm.weight")) {
        encoders.push(build_t5(path, file.clone(), SD3_T5_PREFIX, device, search)?);
    }
    let clip = (!encoders.is_empty()).then_some(Clip {
        family: Family::Sd3,
        encoders,
        layer_from_end: None,
        t5_padding: None,
        hooks: None,
    });
    let vae = checkpoint_vae(path, &file, VAE_PREFIX, device)?;
    Ok((LoadedCheckpoint { model, clip, vae }, file_size(path)))
}

/// The VAE under `prefix` in the checkpoint `file` (of `path`), if it has one there.
fn checkpoint_vae(
    path: &Path,
    file: &Arc<SafetensorsFile>,
    prefix: &str,
    device: &Device,
) -> Result<Option<VaeModel>, NodeError> {
    if !file.has(&format!("{prefix}encoder.conv_in.weight")) {
        return Ok(None);
    }
    let config = VaeConfig::infer(file.as_ref(), prefix).map_err(|error| undetected(path, error))?;
    Ok(Some(build_vae(file, prefix, config, device)?))
}

pub(crate) fn diffusion_precision(services: &Services) -> Precision {
    services.get::<DiffusionModelPrecision>().copied().unwrap_or_default().0
}

/// `CheckpointLoaderSimple`: MODEL, CLIP and VAE from one single-file checkpoint.
pub struct CheckpointLoaderSimple;

impl Node for CheckpointLoaderSimple {
    fn schema(&self, services: &Services) -> NodeSchema {
        NodeSchema::v1("CheckpointLoaderSimple", "nodes", "loaders")
            .display("Load Checkpoint")
            .description("Loads a diffusion model checkpoint, diffusion models are used to denoise latents.")
            .required(
                "ckpt_name",
                InputSpec::combo(&file_names(services, "checkpoints"))
                    .opt("tooltip", "The name of the checkpoint (model) to load."),
            )
            .model_folder("ckpt_name", "checkpoints")
            .output(OutputSpec::of("MODEL").tooltip("The model used for denoising latents."))
            .output(OutputSpec::of("CLIP").tooltip("The CLIP model used for encoding text prompts."))
            .output(
                OutputSpec::of("VAE")
                    .tooltip("The VAE model used for encoding and decoding images to and from latent space."),
            )
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &[("ckpt_name", "checkpoints")])
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let (_, loaded) = checkpoint_outputs(ctx, inputs.string("ckpt_name")?)?;
        Ok(NodeOutput::values(loaded))
    }
}

/// CheckpointLoaderSimple's work: the checkpoint `name` of the checkpoints folder loaded
/// (through the model cache); its path, and its MODEL, CLIP and VAE (None for a part the file
/// lacks).
pub(crate) fn checkpoint_outputs(ctx: &NodeContext, name: &str) -> Result<(PathBuf, Vec<Value>), NodeError> {
    let path = model_file(ctx, "checkpoints", name)?;
    let device = device(ctx.services);
    let precision = diffusion_precision(ctx.services);
    let search = TokenizerSearch::of(ctx.services);
    let loaded = cached(ctx, &path, "checkpoint", || {
        load_checkpoint(&path, &device, precision, search)
    })?;
    let optional = |value: Option<Value>| value.unwrap_or(Value::Json(serde_json::Value::Null));
    let outputs = vec![
        Value::object(loaded.model.clone()),
        optional(loaded.clip.clone().map(Value::object)),
        optional(loaded.vae.clone().map(Value::object)),
    ];
    Ok((path, outputs))
}

/// `CheckpointLoader` ("Load Checkpoint With Config (DEPRECATED)"): a checkpoint with its
/// original `.yaml` config. The architecture is read from the weights, as CheckpointLoaderSimple
/// reads it; the config decides the parameterization, as ComfyUI's `load_checkpoint` lets it
/// (`model.params.parameterization: "v"` makes a v-prediction model, anything else epsilon).
pub struct CheckpointLoader;

impl Node for CheckpointLoader {
    fn schema(&self, services: &Services) -> NodeSchema {
        let mut schema = NodeSchema::v1("CheckpointLoader", "nodes", "advanced/loaders")
            .display("Load Checkpoint With Config (DEPRECATED)")
            .required("config_name", InputSpec::combo(&file_names(services, "configs")))
            .required("ckpt_name", InputSpec::combo(&file_names(services, "checkpoints")))
            .model_folder("config_name", "configs")
            .model_folder("ckpt_name", "checkpoints")
            .output(OutputSpec::of("MODEL"))
            .output(OutputSpec::of("CLIP"))
            .output(OutputSpec::of("VAE"));
        schema.deprecated = true;
        schema
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(
            services,
            inputs,
            &[("config_name", "configs"), ("ckpt_name", "checkpoints")],
        )
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let config_path = model_file(ctx, "configs", inputs.string("config_name")?)?;
        let text =
            std::fs::read_to_string(&config_path).map_err(|error| NodeError::typed("OSError", error.to_string()))?;
        let config: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text)
            .map_err(|error| NodeError::value(format!("'{}' is not a model config: {error}", config_path.display())))?;
        let parameterization = config
            .get("model")
            .and_then(|model| model.get("params"))
            .and_then(|params| params.get("parameterization"))
            .and_then(serde_yaml_ng::Value::as_str);
        let prediction = match parameterization {
            Some("v") => Prediction::V,
            _ => Prediction::Epsilon,
        };
        let mut outputs = CheckpointLoaderSimple.execute(ctx, inputs)?;
        if let Some(model) = outputs.outputs.first().and_then(|value| value.downcast::<Model>()) {
            let configured = Model(Arc::new(DiffusionModel {
                prediction,
                ..(*model.0).clone()
            }));
            outputs.outputs[0] = Value::object(configured);
        }
        Ok(outputs)
    }
}

/// Where the UNet of a diffusion-model file lies: under ComfyUI's checkpoint prefix or at the
/// root.
fn unet_prefix(file: &dyn TensorShapes) -> Option<&'static str> {
    [UNET_PREFIX, ""]
        .into_iter()
        .find(|prefix| file.has(&format!("{prefix}input_blocks.0.0.weight")))
}

/// Where a FLUX model in the BFL layout lies in `file`: under `model.diffusion_model.` (as
/// ComfyUI saves models) or at the root (as BFL and city96 publish them).
fn flux_prefix(file: &dyn TensorShapes) -> Option<&'static str> {
    [UNET_PREFIX, ""]
        .into_iter()
        .find(|prefix| file.has(&format!("{prefix}double_blocks.0.img_attn.qkv.weight")))
}

/// Where an MMDiT (SD3) lies in `file`: under `model.diffusion_model.` or at the root.
fn mmdit_prefix(file: &dyn TensorShapes) -> Option<&'static str> {
    [UNET_PREFIX, ""]
        .into_iter()
        .find(|prefix| file.has(&format!("{prefix}joint_blocks.0.context_block.attn.qkv.weight")))
}

/// The architectures ComfyUI-GGUF's UNet loader accepts in `general.architecture`.
const IMAGE_ARCHITECTURES: [&str; 12] = [
    "flux",
    "sd1",
    "sdxl",
    "sd3",
    "aura",
    "hidream",
    "cosmos",
    "ltxv",
    "hyvid",
    "wan",
    "lumina2",
    "qwen_image",
];

/// A diffusion model file, safetensors or (by its extension) GGUF. A GGUF file passes
/// ComfyUI-GGUF's architecture check: a text model's or an unknown architecture is refused; a
/// file without one is read by its tensor names, with a warning.
fn open_weights(path: &Path) -> Result<Arc<dyn MappedWeights>, NodeError> {
    let Some(file) = open_gguf(path)? else {
        return Ok(open(path)?);
    };
    match file.architecture() {
        None | Some("pig") => tracing::warn!(
            "Warning: This gguf model file is loaded in compatibility mode (no architecture in {})",
            path.display()
        ),
        Some(architecture) if !IMAGE_ARCHITECTURES.contains(&architecture) => {
            return Err(NodeError::typed(
                "ValueError",
                format!("Unexpected architecture type in GGUF file: '{architecture}'"),
            ))
        }
        Some(_) => {}
    }
    Ok(Arc::new(file))
}

/// A FLUX model from `source`: dev (with guidance embedding) samples on ComfyUI's
/// `ModelSamplingFlux` with μ = 1.15, schnell on the plain flow schedule.
fn build_flux(source: WeightSource, config: FluxConfig) -> Result<Model, NodeError> {
    let schedule = if config.guidance_embed {
        SigmaSchedule::flux(FLUX_DEV_SHIFT)
    } else {
        SigmaSchedule::flow(1.0, 1.0)
    };
    let flux = Flux::new(config, source.weights()).map_err(tensor_error)?;
    Ok(flow_model(
        Family::Flux,
        DiffusionNetwork::Flux(Arc::new(flux)),
        source,
        schedule,
    ))
}

/// A rectified-flow model of `family` (FLUX, SD3): `network` built from `source`, sampled on
/// `schedule`, in the family's latent space.
fn flow_model(family: Family, network: DiffusionNetwork, source: WeightSource, schedule: SigmaSchedule) -> Model {
    Model(Arc::new(DiffusionModel {
        family,
        network,
        device: source.device.clone(),
        source,
        prediction: Prediction::Flow,
        schedule,
        latent_format: LatentFormat::of(family),
        differential_diffusion: None,
        edm_v_prediction: None,
        ic_light: false,
        patches: ModelPatches::default(),
    }))
}

/// An SD3 model from `source`: a rectified flow on ComfyUI's `ModelSamplingDiscreteFlow` with
/// shift 3.
fn build_mmdit(source: WeightSource, config: MmditConfig) -> Result<Model, NodeError> {
    let mmdit = Mmdit::new(config, source.weights()).map_err(tensor_error)?;
    let schedule = SigmaSchedule::flow(SD3_SHIFT, 1000.0);
    Ok(flow_model(
        Family::Sd3,
        DiffusionNetwork::Mmdit(Arc::new(mmdit)),
        source,
        schedule,
    ))
}

/// Loads a diffusion model file (`UNETLoader`, `UnetLoaderGGUF`): an LDM-layout UNet, a FLUX
/// model or an SD3 MMDiT, multiplying in `precision` and stored in `stored_as` where given (its
/// `weight_dtype`); also returns the file size.
pub fn load_diffusion_model(
    path: &Path,
    device: &Device,
    precision: Precision,
    stored_as: Option<Fp8Format>,
) -> Result<(Model, u64), NodeError> {
    let file = open_weights(path)?;
    if let Some(prefix) = flux_prefix(file.as_ref()) {
        let config = FluxConfig::infer(file.as_ref(), prefix).map_err(|error| undetected(path, error))?;
        let source = WeightSource {
            stored_as,
            ..WeightSource::new(file, prefix, device, precision)
        };
        return Ok((build_flux(source, config)?, file_size(path)));
    }
    if let Some(prefix) = mmdit_prefix(file.as_ref()) {
        let config = MmditConfig::infer(file.as_ref(), prefix).map_err(|error| undetected(path, error))?;
        let source = WeightSource {
            stored_as,
            ..WeightSource::new(file, prefix, device, precision)
        };
        return Ok((build_mmdit(source, config)?, file_size(path)));
    }
    let prefix = unet_prefix(file.as_ref()).ok_or_else(|| {
        undetected(
            path,
            DetectError::Unrecognised(
                "no UNet in the LDM layout ('input_blocks.0.0.weight', at the root or under \
                 'model.diffusion_model.'); diffusers-layout UNets are not read yet"
                    .into(),
            ),
        )
    })?;
    let family = detect_unet_family(file.as_ref(), prefix).map_err(|error| undetected(path, error))?;
    if matches!(family, Family::Sd3 | Family::Flux) {
        return Err(undetected(path, DetectError::NotYetSupported(family.name())));
    }
    let unet = UNetConfig::infer(file.as_ref(), prefix, family.heads()).map_err(|error| undetected(path, error))?;
    let v_prediction = is_v_prediction(file.as_ref(), family, prefix);
    let source = WeightSource {
        stored_as,
        ..WeightSource::new(file, prefix, device, precision)
    };
    let model = build_model(source, family, unet, v_prediction)?;
    Ok((model, file_size(path)))
}

/// `UNETLoader` ("Load Diffusion Model"): a diffusion model from `diffusion_models`.
pub struct UnetLoader;

impl Node for UnetLoader {
    fn schema(&self, services: &Services) -> NodeSchema {
        NodeSchema::v1("UNETLoader", "nodes", "advanced/loaders")
            .display("Load Diffusion Model")
            .required("unet_name", InputSpec::combo(&file_names(services, "diffusion_models")))
            .model_folder("unet_name", "diffusion_models")
            .required(
                "weight_dtype",
                InputSpec::combo(&["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]),
            )
            .output(OutputSpec::of("MODEL"))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &[("unet_name", "diffusion_models")])
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        // As ComfyUI: every weight rounded to the fp8 format and kept in it, computed in f32
        // on the CPU (`fp8_e4m3fn_fast` differs only where GPUs multiply in fp8).
        let stored_as = match inputs.string("weight_dtype")? {
            "fp8_e4m3fn" | "fp8_e4m3fn_fast" => Some(Fp8Format::E4M3Fn),
            "fp8_e5m2" => Some(Fp8Format::E5M2),
            _ => None,
        };
        load_diffusion_model_node(ctx, inputs.string("unet_name")?, stored_as)
    }
}

/// The MODEL output of a diffusion-model loader: the file `name` of `diffusion_models`, loaded
/// (stored in `stored_as` where given) unless the model cache has it.
pub(crate) fn load_diffusion_model_node(
    ctx: &NodeContext,
    name: &str,
    stored_as: Option<Fp8Format>,
) -> Result<NodeOutput, NodeError> {
    let path = model_file(ctx, "diffusion_models", name)?;
    let part = match stored_as {
        Some(Fp8Format::E4M3Fn) => "diffusion_model fp8_e4m3fn",
        Some(Fp8Format::E5M2) => "diffusion_model fp8_e5m2",
        None => "diffusion_model",
    };
    let device = device(ctx.services);
    let precision = diffusion_precision(ctx.services);
    let model = cached(ctx, &path, part, || {
        load_diffusion_model(&path, &device, precision, stored_as)
    })?;
    Ok(NodeOutput::values(vec![Value::object((*model).clone())]))
}

/// `VAELoader` ("Load VAE"): a VAE from the `vae` folder.
pub struct VaeLoader;

/// The VAE of a standalone file: its tensors at the root or under the checkpoint prefix.
pub fn load_vae(path: &Path, device: &Device) -> Result<(VaeModel, u64), NodeError> {
    let file = open(path)?;
    let prefix = [VAE_PREFIX, ""]
        .into_iter()
        .find(|prefix| file.has(&format!("{prefix}encoder.conv_in.weight")))
        .ok_or_else(|| {
            undetected(
                path,
                DetectError::Unrecognised(
                    "no VAE in the LDM layout ('encoder.conv_in.weight'); diffusers-layout VAEs are not \
                     read yet"
                        .into(),
                ),
            )
        })?;
    let config = VaeConfig::infer(file.as_ref(), prefix).map_err(|error| undetected(path, error))?;
    Ok((build_vae(&file, prefix, config, device)?, file_size(path)))
}

impl Node for VaeLoader {
    fn schema(&self, services: &Services) -> NodeSchema {
        let mut names = file_names(services, "vae");
        names.push("pixel_space".to_string());
        NodeSchema::v1("VAELoader", "nodes", "loaders")
            .display("Load VAE")
            .required("vae_name", InputSpec::combo(&names))
            .model_folder("vae_name", "vae")
            .output(OutputSpec::of("VAE"))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &[("vae_name", "vae")])
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let name = inputs.string("vae_name")?;
        if name == "pixel_space" {
            return Err(NodeError::new(
                "the pixel_space VAE (for pixel-space diffusion models) is not supported by Easel yet",
            ));
        }
        let path = model_file(ctx, "vae", name)?;
        let device = device(ctx.services);
        let vae = cached(ctx, &path, "vae", || load_vae(&path, &device))?;
        Ok(NodeOutput::values(vec![Value::object((*vae).clone())]))
    }
}
