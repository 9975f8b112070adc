//! `LoraLoader` and `LoraLoaderModelOnly`: a LoRA applied to a MODEL and a CLIP, which are
//! built again from their (mapped) files with the LoRA's patches added to theirs
//! ([`easel_models::lora`]). The base models are not read again: only the patched matrices
//! are copies, the rest stays in the file's map.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{Map, Value as Json};

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use easel_models::checkpoint::{Family, TextEncoderKind};
use easel_models::lora::{load_lora, ClipLoraNames, LoadedLora, LoraKeyMap};
use easel_models::weights::{SafetensorsFile, TensorShapes};

use crate::loaders::model_files_fingerprint;
use crate::model::clip::{Clip, TextEncoder, TextNetwork};
use crate::model::diffusion_model::{DiffusionModel, DiffusionNetwork, Model};
use crate::paths::Paths;
use crate::runtime::tensor_error;

const MODEL_TOOLTIP: &str = "The modified diffusion model.";
const CLIP_TOOLTIP: &str = "The modified CLIP model.";
const DESCRIPTION: &str = "LoRAs are used to modify diffusion and CLIP models, altering the way in which latents are denoised such as applying styles. Multiple LoRA nodes can be linked together.";

fn strength(tooltip: Option<&str>) -> InputSpec {
    let spec = InputSpec::float(1.0, -100.0, 100.0).opt("step", 0.01);
    match tooltip {
        Some(tooltip) => spec.opt("tooltip", tooltip),
        None => spec,
    }
}

fn lora_names(services: &Services) -> Vec<String> {
    services
        .get::<Paths>()
        .map(|paths| paths.filename_list("loras"))
        .unwrap_or_default()
}

/// `LoraLoader`: MODEL and CLIP with a LoRA applied at separate strengths.
pub struct LoraLoader;

impl Node for LoraLoader {
    fn schema(&self, services: &Services) -> NodeSchema {
        NodeSchema::v1("LoraLoader", "nodes", "loaders")
            .display("Load LoRA")
            .description(DESCRIPTION)
            .required(
                "model",
                InputSpec::of("MODEL").opt("tooltip", "The diffusion model the LoRA will be applied to."),
            )
            .required(
                "clip",
                InputSpec::of("CLIP").opt("tooltip", "The CLIP model the LoRA will be applied to."),
            )
            .required(
                "lora_name",
                InputSpec::combo(&lora_names(services)).opt("tooltip", "The name of the LoRA."),
            )
            .model_folder("lora_name", "loras")
            .required(
                "strength_model",
                strength(Some(
                    "How strongly to modify the diffusion model. This value can be negative.",
                )),
            )
            .required(
                "strength_clip",
                strength(Some(
                    "How strongly to modify the CLIP model. This value can be negative.",
                )),
            )
            .output(OutputSpec::of("MODEL").tooltip(MODEL_TOOLTIP))
            .output(OutputSpec::of("CLIP").tooltip(CLIP_TOOLTIP))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &[("lora_name", "loras")])
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let clip = inputs.object::<Clip>("clip")?;
        let (strength_model, strength_clip) = (inputs.float("strength_model")?, inputs.float("strength_clip")?);
        if strength_model == 0.0 && strength_clip == 0.0 {
            return Ok(NodeOutput::values(vec![
                Value::object(model.clone()),
                Value::object(clip.clone()),
            ]));
        }
        let lora = open_lora(ctx, inputs.string("lora_name")?)?;
        let (model, clip) = apply_lora(&lora, model, strength_model as f32, Some((clip, strength_clip as f32)))?;
        let clip = clip.ok_or_else(|| NodeError::new("the LoRA was not applied to the CLIP model"))?;
        Ok(NodeOutput::values(vec![Value::object(model), Value::object(clip)]))
    }
}

/// `LoraLoaderModelOnly`: MODEL with a LoRA applied.
pub struct LoraLoaderModelOnly;

impl Node for LoraLoaderModelOnly {
    fn schema(&self, services: &Services) -> NodeSchema {
        NodeSchema::v1("LoraLoaderModelOnly", "nodes", "loaders")
            .display("LoraLoaderModelOnly")
            .description(DESCRIPTION)
            .required("model", InputSpec::of("MODEL"))
            .required("lora_name", InputSpec::combo(&lora_names(services)))
            .model_folder("lora_name", "loras")
            .required("strength_model", strength(None))
            .output(OutputSpec::of("MODEL"))
            .output_tooltips(&[MODEL_TOOLTIP, CLIP_TOOLTIP])
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &[("lora_name", "loras")])
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let strength_model = inputs.float("strength_model")?;
        if strength_model == 0.0 {
            return Ok(NodeOutput::values(vec![Value::object(model.clone())]));
        }
        let lora = open_lora(ctx, inputs.string("lora_name")?)?;
        let model = apply_model_lora(&lora, model, strength_model as f32)?;
        Ok(NodeOutput::values(vec![Value::object(model)]))
    }
}

pub(crate) fn open_lora(ctx: &NodeContext, name: &str) -> Result<SafetensorsFile, NodeError> {
    let paths = ctx.services.require::<Paths>()?;
    let path = paths.full_path("loras", name).ok_or_else(|| {
        NodeError::typed(
            "FileNotFoundError",
            format!("Model in folder 'loras' with filename '{name}' not found."),
        )
    })?;
    SafetensorsFile::open(&path).map_err(|error| NodeError::new(error.to_string()))
}

/// How LoRA files name a text encoder of `family` (ComfyUI's `model_lora_keys_clip`): SDXL's and SD3's
/// CLIP-L is `lora_te1`, its CLIP-G `lora_te2` / `text_encoder_2`; a lone encoder is
/// `lora_te` / `text_encoder` (CLIP-L also `lora_te1`, the refiner's CLIP-G also
/// `lora_prior_te`).
fn clip_lora_names(family: Family, kind: TextEncoderKind) -> ClipLoraNames {
    let (kohya, diffusers): (&'static [&'static str], _) = match (family, kind) {
        (_, TextEncoderKind::ClipL) => (&["lora_te", "lora_te1"], "text_encoder"),
        (Family::Sdxl | Family::Sd3, TextEncoderKind::ClipG) => (&["lora_te2"], "text_encoder_2"),
        (_, TextEncoderKind::ClipG) => (&["lora_te", "lora_prior_te"], "text_encoder"),
        (_, TextEncoderKind::ClipH) => (&["lora_te"], "text_encoder"),
    };
    let comfy = match kind {
        TextEncoderKind::ClipL => "clip_l",
        TextEncoderKind::ClipG => "clip_g",
        TextEncoderKind::ClipH => "clip_h",
    };
    ClipLoraNames {
        kohya,
        diffusers,
        comfy,
    }
}

/// The patches `lora` makes to `model`'s diffusion network at `strength`.
pub(crate) fn model_lora_patches(
    lora: &SafetensorsFile,
    model: &DiffusionModel,
    strength: f32,
) -> Result<LoadedLora, NodeError> {
    let mut keys = LoraKeyMap::default();
    let (file, prefix) = (model.source.file.as_ref(), model.source.name_prefix());
    match &model.network {
        DiffusionNetwork::UNet(unet) => keys.add_unet(file, &prefix, unet.config()),
        DiffusionNetwork::Flux(flux) => keys.add_flux(file, &prefix, flux.config()),
        DiffusionNetwork::Mmdit(mmdit) => keys.add_mmdit(file, &prefix, mmdit.config()),
    }
    load_lora(lora, &keys, strength).map_err(tensor_error)
}

/// The patches `lora` makes to a text encoder of a `family` CLIP at `strength`; `None` for a T5
/// (LoRA patches the CLIP encoders beside it).
pub(crate) fn encoder_lora_patches(
    lora: &SafetensorsFile,
    encoder: &TextEncoder,
    family: Family,
    strength: f32,
) -> Result<Option<LoadedLora>, NodeError> {
    let TextNetwork::Clip { kind, encoder: network } = &encoder.network else {
        return Ok(None);
    };
    let mut keys = LoraKeyMap::default();
    keys.add_clip(
        encoder.source.file.as_ref(),
        &encoder.source.name_prefix(),
        network.config().naming,
        clip_lora_names(family, *kind),
    );
    load_lora(lora, &keys, strength).map(Some).map_err(tensor_error)
}

/// `model` with `lora`'s patches added at `strength` (LoraLoaderModelOnly's work).
pub fn apply_model_lora(lora: &SafetensorsFile, model: &Model, strength: f32) -> Result<Model, NodeError> {
    apply_lora(lora, model, strength, None).map(|(model, _)| model)
}

/// `model` (and `clip`) with `lora`'s patches added at their strengths; logs the LoRA's tensors
/// neither took, as ComfyUI does.
fn apply_lora(
    lora: &SafetensorsFile,
    model: &Model,
    strength_model: f32,
    clip: Option<(&Clip, f32)>,
) -> Result<(Model, Option<Clip>), NodeError> {
    let mut used = HashSet::new();
    let loaded = model_lora_patches(lora, &model.0, strength_model)?;
    used.extend(loaded.used);
    let model = if strength_model == 0.0 || loaded.patches.is_empty() {
        model.clone()
    } else {
        Model(Arc::new(
            model.0.with_weight_patches(loaded.patches).map_err(tensor_error)?,
        ))
    };
    let clip = match clip {
        Some((clip, strength_clip)) => {
            let mut encoders = Vec::with_capacity(clip.encoders.len());
            for encoder in &clip.encoders {
                let Some(loaded) = encoder_lora_patches(lora, encoder, clip.family, strength_clip)? else {
                    encoders.push(encoder.clone());
                    continue;
                };
                used.extend(loaded.used);
                if strength_clip == 0.0 || loaded.patches.is_empty() {
                    encoders.push(encoder.clone());
                    continue;
                }
                encoders.push(encoder.with_weight_patches(loaded.patches).map_err(tensor_error)?);
            }
            Some(Clip {
                encoders,
                ..clip.clone()
            })
        }
        None => None,
    };
    let mut unused: Vec<&str> = lora.tensor_names().filter(|name| !used.contains(*name)).collect();
    unused.sort_unstable();
    for name in unused {
        tracing::warn!("lora key not loaded: {name}");
    }
    Ok((model, clip))
}
