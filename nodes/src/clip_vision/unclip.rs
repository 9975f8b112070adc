//! unCLIP (`nodes.py`, `comfy/model_base.py`): unCLIPCheckpointLoader loads an SD2.1 unCLIP
//! checkpoint with its image encoder; unCLIPConditioning adds image embeddings to
//! conditioning entries, and [`unclip_class_vector`] turns them into the class-conditioning
//! vector of an SD2.1 unCLIP UNet (or the pooled vector of SDXL, "revision") as ComfyUI's
//! `unclip_adm` does: each image's embedding noised to its noise-augmentation level
//! (`CLIPEmbeddingNoiseAugmentation`: the `squaredcos_cap_v2` schedule of 1000 steps, noise from
//! a generator seeded with the sampling seed − 10), joined to the level's timestep embedding and
//! scaled by its strength; several images are summed and noised again at level 0.05.

use candle_core::{Device, Tensor};
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, NodeRegistry, Services, Value};
use easel_models::architectures::unet::timestep_embedding;
use easel_models::sampling::noise::CpuGenerator;
use serde_json::{Map, Value as Json};

use super::{vision_encoder, ClipVisionModel, ClipVisionOutput};
use crate::conditioning::{CondEntry, Conditioning};
use crate::loaders::model_files_fingerprint;
use crate::loaders::models::{cached, checkpoint_outputs, file_names, open_weight_file};
use crate::model::diffusion_model::Model;
use crate::runtime::device;

pub(super) fn register(registry: &mut NodeRegistry) {
    registry.register(UnclipCheckpointLoader);
    registry.register(UnclipConditioning);
}

/// Where SD2.1 unCLIP checkpoints keep their image encoder (OpenCLIP's layout).
const UNCLIP_VISION_PREFIX: &str = "embedder.model.visual.";

/// `unCLIPCheckpointLoader`: a checkpoint as CheckpointLoaderSimple loads it, and the image
/// encoder an unCLIP checkpoint holds (None for other checkpoints).
pub struct UnclipCheckpointLoader;

impl Node for UnclipCheckpointLoader {
    fn schema(&self, services: &Services) -> NodeSchema {
        NodeSchema::v1("unCLIPCheckpointLoader", "nodes", "loaders")
            .display("unCLIPCheckpointLoader")
            .required("ckpt_name", InputSpec::combo(&file_names(services, "checkpoints")))
            .model_folder("ckpt_name", "checkpoints")
            .output(OutputSpec::of("MODEL"))
            .output(OutputSpec::of("CLIP"))
            .output(OutputSpec::of("VAE"))
            .output(OutputSpec::of("CLIP_VISION"))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &[("ckpt_name", "checkpoints")])
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let (path, mut outputs) = checkpoint_outputs(ctx, inputs.string("ckpt_name")?)?;
        let unclip = outputs[0].downcast::<Model>().is_some_and(|model| model.0.is_unclip());
        let vision = match unclip {
            true => {
                let device = device(ctx.services);
                let encoder = cached(ctx, &path, "clip_vision", || {
                    let file = open_weight_file(&path)?;
                    match vision_encoder(file, UNCLIP_VISION_PREFIX, &device)? {
                        Some(encoder) => Ok((encoder, 0)),
                        None => Err(NodeError::new(format!(
                            "{}: an unCLIP checkpoint without its image encoder ('{UNCLIP_VISION_PREFIX}')",
                            path.display()
                        ))),
                    }
                })?;
                Value::object(ClipVisionModel(encoder))
            }
            false => Value::Json(Json::Null),
        };
        outputs.push(vision);
        Ok(NodeOutput::values(outputs))
    }
}

/// Steps of the noise augmentation's schedule (`max_noise_level`).
const NOISE_LEVELS: usize = 1000;
/// The noise-augmentation level several images' sum is noised to again
/// (`unclip_noise_augment_merge`).
const MERGE_AUGMENTATION: f64 = 0.05;

/// One image added by unCLIPConditioning.
#[derive(Clone, Debug)]
pub struct UnclipImage {
    /// The encoder's image embeddings [B, width], one per image of the batch.
    pub image_embeds: Tensor,
    pub strength: f64,
    pub noise_augmentation: f64,
}

/// `unCLIPConditioning`: strength 0 leaves the conditioning as it is.
pub struct UnclipConditioning;

impl Node for UnclipConditioning {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("unCLIPConditioning", "nodes", "conditioning")
            .display("unCLIPConditioning")
            .required("conditioning", InputSpec::of("CONDITIONING"))
            .required("clip_vision_output", InputSpec::of("CLIP_VISION_OUTPUT"))
            .required("strength", InputSpec::float(1.0, -10.0, 10.0).opt("step", 0.01))
            .required("noise_augmentation", InputSpec::float(0.0, 0.0, 1.0).opt("step", 0.01))
            .output(OutputSpec::of("CONDITIONING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let conditioning = inputs.object::<Conditioning>("conditioning")?;
        let strength = inputs.float("strength")?;
        if strength == 0.0 {
            return Ok(NodeOutput::values(vec![Value::object(conditioning.clone())]));
        }
        let ClipVisionOutput(output) = inputs.object::<ClipVisionOutput>("clip_vision_output")?;
        let image = UnclipImage {
            image_embeds: output.image_embeds.clone(),
            strength,
            noise_augmentation: inputs.float("noise_augmentation")?,
        };
        let entries = conditioning
            .0
            .iter()
            .map(|entry| {
                let mut unclip = entry.unclip.clone();
                unclip.push(image.clone());
                CondEntry {
                    unclip,
                    ..entry.clone()
                }
            })
            .collect();
        Ok(NodeOutput::values(vec![Value::object(Conditioning(entries))]))
    }
}

/// `sqrt(ᾱ)` and `sqrt(1 − ᾱ)` of the `squaredcos_cap_v2` schedule at `level` (float64 as numpy
/// computes them, stored as float32 as ComfyUI registers them).
fn schedule_at(level: usize) -> (f32, f32) {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    let cumulative = (0..=level).fold(1.0f64, |product, i| {
        let (t1, t2) = (i as f64 / NOISE_LEVELS as f64, (i + 1) as f64 / NOISE_LEVELS as f64);
        let beta = (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999);
        product * (1.0 - beta)
    });
    (cumulative.sqrt() as f32, (1.0 - cumulative).sqrt() as f32)
}

/// `noise_augmentor(x, noise_level)`: `x` [1, width] noised to `augmentation` with `noise`,
/// joined to the level's embedding: [1, 2·width].
fn augmented(x: &Tensor, augmentation: f64, noise: &[f32]) -> candle_core::Result<Tensor> {
    let level = ((NOISE_LEVELS - 1) as f64 * augmentation).round_ties_even() as usize;
    let (signal, noise_scale) = schedule_at(level);
    let width = x.dim(1)?;
    let noise = Tensor::from_slice(noise, (1, width), x.device())?;
    let noised = ((x * f64::from(signal))? + (noise * f64::from(noise_scale))?)?;
    let level = Tensor::new(&[level as f32], x.device())?;
    Tensor::cat(&[&noised, &timestep_embedding(&level, width)?], 1)
}

/// The class-conditioning vector [1, 2·width] of `images` for a sampling run of `seed` (see the
/// module documentation); `width` is the image embeddings'.
pub fn unclip_class_vector(images: &[UnclipImage], seed: u64, device: &Device) -> candle_core::Result<Tensor> {
    let mut vectors = Vec::new();
    // The generator after the last image's draws.
    let mut last_generator = None;
    for image in images {
        let embeds = image
            .image_embeds
            .to_device(device)?
            .to_dtype(candle_core::DType::F32)?;
        for item in 0..embeds.dim(0)? {
            let x = embeds.narrow(0, item, 1)?;
            // Each image seeds the generator again.
            let mut generator = CpuGenerator::new(seed.wrapping_sub(10));
            let noise = generator.randn(x.dim(1)?);
            vectors.push((augmented(&x, image.noise_augmentation, &noise)? * image.strength)?);
            last_generator = Some(generator);
        }
    }
    match (vectors.len(), last_generator) {
        (1, _) => Ok(vectors.remove(0)),
        (_, Some(mut generator)) => {
            // The sum is noised again by the draws that follow the last image's.
            let width = vectors[0].dim(1)? / 2;
            let sum = Tensor::stack(&vectors, 0)?.sum(0)?;
            augmented(&sum.narrow(1, 0, width)?, MERGE_AUGMENTATION, &generator.randn(width))
        }
        (_, None) => candle_core::bail!("unCLIP conditioning without images"),
    }
}
