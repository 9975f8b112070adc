//! The latent category: ComfyUI's `LATENT` value ([`Latent`], defined here with each model
//! family's [`LatentFormat`]) and the nodes that make, resize, batch, transform and decode latents.
//!
//! - [`nodes`]: EmptyLatentImage, EmptySD3LatentImage, LatentUpscale(By), LatentFromBatch,
//!   RepeatLatentBatch, SetLatentNoiseMask;
//! - [`transform`]: LatentFlip, LatentRotate, LatentCrop, LatentComposite(Masked), LatentBlend;
//! - [`arithmetic`]: LatentAdd, LatentSubtract, LatentMultiply;
//! - [`batch`]: LatentBatch, LatentBatchSeedBehavior, LatentCut;
//! - [`operations`]: LatentInterpolate, LatentConcat, RebatchLatents, and the latent operations
//!   (LatentApplyOperation, LatentApplyOperationCFG, LatentOperationTonemapReinhard,
//!   LatentOperationSharpen);
//! - [`files`]: LoadLatent, SaveLatent (`.latent` files);
//! - [`vae`]: VAEDecode, VAEEncode, VAEEncodeForInpaint, InpaintModelConditioning,
//!   InstructPixToPixConditioning and the tiled VAE nodes.

pub mod arithmetic;
pub mod batch;
pub mod files;
pub mod nodes;
pub mod operations;
pub mod transform;
pub mod vae;

use candle_core::Tensor;
use easel_engine::{NodeObject, NodeRegistry};
use easel_models::checkpoint::Family;

use crate::image::Mask;

/// Adds the latent and VAE nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    registry.register(nodes::EmptyLatentImage);
    registry.register(nodes::EmptySd3LatentImage);
    registry.register(nodes::LatentUpscale);
    registry.register(nodes::LatentUpscaleBy);
    registry.register(nodes::LatentFromBatch);
    registry.register(nodes::RepeatLatentBatch);
    registry.register(nodes::SetLatentNoiseMask);
    registry.register(transform::LatentFlip);
    registry.register(transform::LatentRotate);
    registry.register(transform::LatentCrop);
    registry.register(transform::LatentComposite);
    registry.register(transform::LatentCompositeMasked);
    registry.register(transform::LatentBlend);
    registry.register(arithmetic::LatentAdd);
    registry.register(arithmetic::LatentSubtract);
    registry.register(arithmetic::LatentMultiply);
    registry.register(batch::LatentBatch);
    registry.register(batch::LatentBatchSeedBehavior);
    registry.register(batch::LatentCut);
    registry.register(operations::LatentInterpolate);
    registry.register(operations::LatentConcat);
    registry.register(operations::RebatchLatents);
    registry.register(operations::LatentApplyOperation);
    registry.register(operations::LatentApplyOperationCfg);
    registry.register(operations::LatentOperationTonemapReinhard);
    registry.register(operations::LatentOperationSharpen);
    registry.register(files::LoadLatent);
    registry.register(files::SaveLatent);
    registry.register(vae::VaeDecode);
    registry.register(vae::VaeEncode);
    registry.register(vae::VaeEncodeForInpaint);
    registry.register(vae::InpaintModelConditioning);
    registry.register(vae::InstructPixToPixConditioning);
    registry.register(vae::VaeDecodeTiled);
    registry.register(vae::VaeEncodeTiled);
}

/// `comfy.utils.repeat_to_batch_size` on dimension 0: `t` cut to `batch` items, or tiled and
/// then cut (a [1, …] tensor repeated).
pub(crate) fn repeat_to_batch(t: &Tensor, batch: usize) -> candle_core::Result<Tensor> {
    let have = t.dim(0)?;
    let tiled = if have < batch && have > 0 {
        let mut repeats = vec![1; t.rank()];
        repeats[0] = batch.div_ceil(have);
        t.repeat(repeats)?
    } else {
        t.clone()
    };
    if tiled.dim(0)? > batch {
        return tiled.narrow(0, 0, batch);
    }
    Ok(tiled)
}

/// A latent space: how VAE latents are scaled into model space and how previews colour them.
#[derive(Clone, Debug, PartialEq)]
pub struct LatentFormat {
    pub scale_factor: f64,
    /// Subtracted before scaling into model space (FLUX).
    pub shift_factor: f64,
    /// Per-channel RGB contributions for fast previews, [channels][3], and the bias added.
    pub rgb_factors: Vec<[f32; 3]>,
    pub rgb_bias: [f32; 3],
}

impl LatentFormat {
    /// SD1.x and SD2.x (`latent_formats.SD15`).
    pub fn sd15() -> Self {
        LatentFormat {
            scale_factor: 0.18215,
            shift_factor: 0.0,
            rgb_factors: vec![
                [0.3512, 0.2297, 0.3227],
                [0.3250, 0.4974, 0.2350],
                [-0.2829, 0.1762, 0.2721],
                [-0.2120, -0.2616, -0.7177],
            ],
            rgb_bias: [0.0; 3],
        }
    }

    /// SDXL and its refiner (`latent_formats.SDXL`).
    pub fn sdxl() -> Self {
        LatentFormat {
            scale_factor: 0.13025,
            shift_factor: 0.0,
            rgb_factors: vec![
                [0.3651, 0.4232, 0.4341],
                [-0.2533, -0.0042, 0.1068],
                [0.1076, 0.1111, -0.0362],
                [-0.3165, -0.2492, -0.2188],
            ],
            rgb_bias: [0.1084, -0.0175, -0.0011],
        }
    }

    /// FLUX.1's 16-channel latents (`latent_formats.Flux`).
    pub fn flux() -> Self {
        LatentFormat {
            scale_factor: 0.3611,
            shift_factor: 0.1159,
            rgb_factors: vec![
                [-0.0346, 0.0244, 0.0681],
                [0.0034, 0.0210, 0.0687],
                [0.0275, -0.0668, -0.0433],
                [-0.0174, 0.0160, 0.0617],
                [0.0859, 0.0721, 0.0329],
                [0.0004, 0.0383, 0.0115],
                [0.0405, 0.0861, 0.0915],
                [-0.0236, -0.0185, -0.0259],
                [-0.0245, 0.0250, 0.1180],
                [0.1008, 0.0755, -0.0421],
                [-0.0515, 0.0201, 0.0011],
                [0.0428, -0.0012, -0.0036],
                [0.0817, 0.0765, 0.0749],
                [-0.1264, -0.0522, -0.1103],
                [-0.0280, -0.0881, -0.0499],
                [-0.1262, -0.0982, -0.0778],
            ],
            rgb_bias: [-0.0329, -0.0718, -0.0851],
        }
    }

    /// SD3 and SD3.5 (`latent_formats.SD3`).
    pub fn sd3() -> Self {
        LatentFormat {
            scale_factor: 1.5305,
            shift_factor: 0.0609,
            rgb_factors: vec![
                [-0.0922, -0.0175, 0.0749],
                [0.0311, 0.0633, 0.0954],
                [0.1994, 0.0927, 0.0458],
                [0.0856, 0.0339, 0.0902],
                [0.0587, 0.0272, -0.0496],
                [-0.0006, 0.1104, 0.0309],
                [0.0978, 0.0306, 0.0427],
                [-0.0042, 0.1038, 0.1358],
                [-0.0194, 0.0020, 0.0669],
                [-0.0488, 0.0130, -0.0268],
                [0.0922, 0.0988, 0.0951],
                [-0.0278, 0.0524, -0.0542],
                [0.0332, 0.0456, 0.0895],
                [-0.0069, -0.0030, -0.0810],
                [-0.0596, -0.0465, -0.0293],
                [-0.1448, -0.1463, -0.1189],
            ],
            rgb_bias: [0.2394, 0.2135, 0.1925],
        }
    }

    /// ComfyUI's `process_in`: a VAE latent into model space, `(x − shift)·scale`.
    pub fn process_in(&self, latent: &Tensor) -> candle_core::Result<Tensor> {
        (latent - self.shift_factor)? * self.scale_factor
    }

    /// ComfyUI's `process_out`: a model-space latent back for the VAE, `x/scale + shift`.
    pub fn process_out(&self, latent: &Tensor) -> candle_core::Result<Tensor> {
        (latent / self.scale_factor)? + self.shift_factor
    }

    /// The latent format of a model family.
    pub fn of(family: Family) -> Self {
        match family {
            Family::Sdxl | Family::SdxlRefiner => LatentFormat::sdxl(),
            Family::Flux => LatentFormat::flux(),
            Family::Sd3 => LatentFormat::sd3(),
            _ => LatentFormat::sd15(),
        }
    }
}

/// The LATENT socket: raw VAE latents [B, C, H, W]; for latents taken from a batch, the index
/// of each in its original batch (so that each gets the noise it would have had there); and the
/// inpainting mask that limits sampling to part of the latent (`SetLatentNoiseMask`).
#[derive(Clone, Debug)]
pub struct Latent {
    pub samples: Tensor,
    pub batch_index: Option<Vec<usize>>,
    pub noise_mask: Option<Mask>,
}

impl Latent {
    /// These latents' batch indices and mask with other `samples` (a sampler's output).
    pub fn with_samples(&self, samples: Tensor) -> Latent {
        Latent {
            samples,
            batch_index: self.batch_index.clone(),
            noise_mask: self.noise_mask.clone(),
        }
    }

    /// Latents of their own: no batch indices, no mask.
    pub fn new(samples: Tensor) -> Self {
        Latent {
            samples,
            batch_index: None,
            noise_mask: None,
        }
    }
}

impl NodeObject for Latent {
    fn type_name(&self) -> &'static str {
        "LATENT"
    }
    fn describe(&self) -> String {
        format!("{{'samples': tensor{:?}}}", self.samples.dims())
    }
}
