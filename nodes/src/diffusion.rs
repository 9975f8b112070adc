//! The objects that flow between the diffusion nodes (MODEL, CLIP, VAE, CONDITIONING, LATENT)
//! and the sampling pipeline of ComfyUI's `common_ksampler`: noise, σ schedule, classifier-free
//! guidance over the conditioning entries, the sampler, and the latent scaling in and out of
//! model space.

use std::fmt;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use easel_engine::NodeObject;

use crate::cond_regions::{same_area_source, CondRegion, LatentArea, RegionError, ResolvedRegion};
use crate::diffusion_nodes::{image_as_latents, latents_as_image};
use crate::image::Mask;
use crate::paths::Paths;
use crate::resample::{common_upscale, ResizeMethod};
use easel_models::architectures::clip_text::{ClipTextEncoder, EncodeOptions, OutputLayer};
use easel_models::architectures::flux::{Flux, FluxControl, FluxInput};
use easel_models::architectures::t5::T5Encoder;
use easel_models::architectures::unet::{timestep_embedding, UNet, UNetInput};
use easel_models::architectures::vae::Vae;
use easel_models::checkpoint::{Family, TextEncoderKind};
use easel_models::memory::{ensure_available, OutOfMemory};
use easel_models::sampling::noise::prepare_noise;
use easel_models::sampling::samplers::{self, Denoiser, SamplerError, Step};
use easel_models::sampling::schedule::{ksampler_sigmas, Scheduler, SigmaSchedule};
use easel_models::text::embeddings::EmbeddingFolder;
use easel_models::text::t5_tokenizer::{T5Tokenizer, FLUX_T5_MIN_LENGTH, T5_EMBEDDING_KEY};
use easel_models::text::tokenizer::{tokenize_with_weights, EmbeddingLookup, NoEmbeddings, WeightedToken, END_TOKEN};
use easel_models::weights::WeightSource;

/// What the network predicts, and so what it is given and how its output becomes the denoised
/// latent (ComfyUI's model-sampling types, σ_data = 1 unless said otherwise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    /// The noise (SD1.x, SD2.x base, SDXL).
    Epsilon,
    /// The velocity `α·ε − σ·x₀` (SD2.x 768-v, v-prediction SDXL fine-tunes).
    V,
    /// The clean latent itself.
    X0,
    /// The clean latent, from the noisy latent as it is (no input scaling).
    ImgToImg,
    /// A latent consistency model: the noise, turned into the denoised latent with LCM's
    /// boundary condition (σ_data 0.5, timestep scaling 10).
    Lcm,
    /// The velocity of a rectified flow from the latent to the noise (ComfyUI's `CONST`: SD3,
    /// FLUX), whose noisy latents are `σ·noise + (1 − σ)·latent`.
    Flow,
}

impl Prediction {
    /// ComfyUI's `calculate_input`: what the network is given for the noisy latent `x` at σ.
    pub fn network_input(self, x: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
        match self {
            Prediction::ImgToImg | Prediction::Flow => Ok(x.clone()),
            _ => x / f64::from((sigma * sigma + 1.0).sqrt()),
        }
    }

    /// ComfyUI's `calculate_denoised`: the denoised latent from the network's output `out` for
    /// the noisy latent `x` at σ, whose timestep was `timestep`.
    pub fn denoised(self, x: &Tensor, out: &Tensor, sigma: f32, timestep: f32) -> candle_core::Result<Tensor> {
        match self {
            Prediction::Epsilon | Prediction::Flow => x - (out * f64::from(sigma))?,
            Prediction::V => {
                let variance = sigma * sigma + 1.0;
                (x / f64::from(variance))? - (out * f64::from(sigma))? / f64::from(variance.sqrt())
            }
            Prediction::X0 | Prediction::ImgToImg => Ok(out.clone()),
            Prediction::Lcm => {
                const SIGMA_DATA_SQUARED: f32 = 0.25;
                let x0 = (x - (out * f64::from(sigma))?)?;
                let scaled = timestep * 10.0;
                let skip = SIGMA_DATA_SQUARED / (scaled * scaled + SIGMA_DATA_SQUARED);
                let output = scaled / (scaled * scaled + SIGMA_DATA_SQUARED).sqrt();
                (x0 * f64::from(output))? + (x * f64::from(skip))?
            }
        }
    }

    /// ComfyUI's `noise_scaling`: the latent noised to σ, `latent + σ·noise` (at the largest σ
    /// of the schedule, `√(1 + σ²)·noise`), or `σ·noise + (1 − σ)·latent` for flows.
    pub fn noise_scaling(
        self,
        sigma: f32,
        noise: &Tensor,
        latent: &Tensor,
        max_denoise: bool,
    ) -> candle_core::Result<Tensor> {
        match self {
            Prediction::Flow => (noise * f64::from(sigma))? + (latent * f64::from(1.0 - sigma))?,
            _ if max_denoise => (noise * f64::from((1.0 + sigma * sigma).sqrt()))? + latent,
            _ => (noise * f64::from(sigma))? + latent,
        }
    }

    /// ComfyUI's `inverse_noise_scaling` of the sampled latent at the last σ: a flow's latent
    /// is divided by 1 − σ, others are kept.
    pub fn inverse_noise_scaling(self, sigma: f32, x: Tensor) -> candle_core::Result<Tensor> {
        match self {
            Prediction::Flow => x / f64::from(1.0 - sigma),
            _ => Ok(x),
        }
    }
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
            _ => LatentFormat::sd15(),
        }
    }
}

/// The network of a diffusion model.
#[derive(Clone)]
pub enum DiffusionNetwork {
    UNet(Arc<UNet>),
    Flux(Arc<Flux>),
}

impl DiffusionNetwork {
    /// The width of the text embeddings the network attends to.
    pub fn context_dim(&self) -> usize {
        match self {
            DiffusionNetwork::UNet(unet) => unet.config().context_dim,
            DiffusionNetwork::Flux(flux) => flux.config().context_dim,
        }
    }

    /// Latent channels the network predicts.
    pub fn latent_channels(&self) -> usize {
        match self {
            DiffusionNetwork::UNet(unet) => unet.config().out_channels,
            DiffusionNetwork::Flux(flux) => flux.config().out_channels,
        }
    }

    /// Channels the network takes beyond the latent's (inpainting models).
    pub fn extra_channels(&self) -> usize {
        match self {
            DiffusionNetwork::UNet(unet) => unet.config().in_channels.saturating_sub(unet.config().out_channels),
            DiffusionNetwork::Flux(flux) => (flux.config().in_channels / 4).saturating_sub(flux.config().out_channels),
        }
    }

    /// Bytes of activations one call on a [batch, C, height, width] latent needs at most.
    pub fn working_memory(&self, batch: usize, height: usize, width: usize) -> u64 {
        match self {
            DiffusionNetwork::UNet(unet) => unet.working_memory(batch, height, width),
            DiffusionNetwork::Flux(flux) => flux.working_memory(batch, height, width),
        }
    }

    /// The UNet, for the UNet families.
    pub fn unet(&self) -> Option<&Arc<UNet>> {
        match self {
            DiffusionNetwork::UNet(unet) => Some(unet),
            DiffusionNetwork::Flux(_) => None,
        }
    }
}

/// A diffusion network with its noise schedule (ComfyUI's `BaseModel` with `model_sampling`);
/// clones share the network.
#[derive(Clone)]
pub struct DiffusionModel {
    /// The family, which decides the class conditioning (SDXL's size vector) among others.
    pub family: Family,
    pub network: DiffusionNetwork,
    /// What the network was built from (LoRA nodes build it again with their patches).
    pub source: WeightSource,
    pub prediction: Prediction,
    pub schedule: SigmaSchedule,
    pub latent_format: LatentFormat,
    pub device: Device,
    /// The strength DifferentialDiffusion set: the inpainting mask is then thresholded anew at
    /// every step (see [`DifferentialDiffusion`]).
    pub differential_diffusion: Option<f64>,
}

impl DiffusionModel {
    /// D(x, σ) for one conditioning: scale the input, run the network at σ's timestep, turn the
    /// prediction into the denoised latent.
    fn denoise(&self, x: &Tensor, sigma: f32, inputs: &ModelInputs) -> candle_core::Result<Tensor> {
        let batch = x.dim(0)?;
        let scaled = self.prediction.network_input(x, sigma)?;
        let concat = inputs.concat.as_ref().map(|c| repeat_to_batch(c, batch)).transpose()?;
        let timestep = self.schedule.timestep(sigma);
        let timesteps = Tensor::from_vec(vec![timestep; batch], batch, &self.device)?;
        let context = repeat_to_batch(&inputs.context, batch)?;
        let y = inputs.y.as_ref().map(|y| repeat_to_batch(y, batch)).transpose()?;
        let out = match &self.network {
            DiffusionNetwork::UNet(unet) => {
                let input = match &concat {
                    Some(concat) => Tensor::cat(&[&scaled, concat], 1)?,
                    None => scaled,
                };
                unet.forward(&UNetInput {
                    y: y.as_ref(),
                    ..UNetInput::new(&input, &timesteps, &context)
                })?
            }
            DiffusionNetwork::Flux(flux) => {
                let (Some(y), Some(guidance)) = (&y, &inputs.guidance) else {
                    return Err(candle_core::Error::Msg(
                        "a FLUX model call needs the pooled output and the guidance".into(),
                    ));
                };
                flux.forward(&FluxInput {
                    x: &scaled,
                    timesteps: &timesteps,
                    context: &context,
                    y,
                    guidance: Some(&repeat_to_batch(guidance, batch)?),
                    concat: concat.as_ref(),
                    control: FluxControl::default(),
                    image_prompt: None,
                })?
            }
        };
        self.prediction.denoised(x, &out, sigma, timestep)
    }

    /// The extra input channels of an inpainting model for an entry, [B, 5, H, W] (ComfyUI's
    /// `concat_cond` with keys mask and masked image): the entry's mask (else the sampling's
    /// denoise mask) resized to the latent and rounded, and its image latent (else the latent
    /// being sampled) in model space; without any mask, ones and a blank image. `None` for models
    /// without extra channels.
    fn inpaint_channels(&self, entry: &CondEntry, latent: &LatentInputs) -> Result<Option<Tensor>, ConditioningError> {
        let extra = self.network.extra_channels();
        if extra == 0 {
            return Ok(None);
        }
        if let DiffusionNetwork::Flux(_) = self.network {
            return self.flux_concat(extra, entry, latent).map(Some);
        }
        if extra != 5 {
            return Err(ConditioningError::ExtraChannels(extra));
        }
        let (batch, _, height, width) = latent.model_space.dims4()?;
        let mask = match (&entry.inpaint, latent.denoise_mask) {
            (Some(inpaint), _) => Some(inpaint.mask_channel(&self.device)?),
            (None, Some(denoise_mask)) => Some(denoise_mask.narrow(1, 0, 1)?),
            (None, None) => None,
        };
        let Some(mask) = mask else {
            let blank = Tensor::new(&BLANK_INPAINT_IMAGE, &self.device)?.reshape((1, 4, 1, 1))?;
            let blank = blank.broadcast_as((batch, 4, height, width))?.contiguous()?;
            let ones = Tensor::ones((batch, 1, height, width), DType::F32, &self.device)?;
            return Ok(Some(Tensor::cat(&[&ones, &blank], 1)?));
        };
        let mask = resize_to_batch(&resize_centered(&mask, height, width)?.round()?, batch)?;
        let image = match &entry.inpaint {
            Some(inpaint) => self
                .latent_format
                .process_in(&inpaint.latent.to_device(&self.device)?.to_dtype(DType::F32)?)?,
            None => latent.model_space.clone(),
        };
        let image = resize_to_batch(&resize_centered(&image, height, width)?, batch)?;
        Ok(Some(Tensor::cat(&[&mask, &image], 1)?))
    }

    /// The extra input channels of a FLUX model for an entry (ComfyUI's `Flux.concat_cond`):
    /// the entry's image latent (else zeros) in model space; for fill models (`extra` = latent
    /// channels + 64) also the mask (the entry's, else the channel mean of the sampling's denoise
    /// mask, else ones) at pixel size, each 8×8 block of pixels made 64 channels.
    fn flux_concat(&self, extra: usize, entry: &CondEntry, latent: &LatentInputs) -> Result<Tensor, ConditioningError> {
        let (batch, channels, height, width) = latent.model_space.dims4()?;
        let image = match &entry.inpaint {
            Some(inpaint) => inpaint.latent.to_device(&self.device)?.to_dtype(DType::F32)?,
            None => latent.model_space.zeros_like()?,
        };
        let image = resize_to_batch(&resize_centered(&image, height, width)?, batch)?;
        let image = self.latent_format.process_in(&image)?;
        if extra <= channels {
            return Ok(image);
        }
        if extra != channels + FLUX_MASK_CHANNELS {
            return Err(ConditioningError::ExtraChannels(extra));
        }
        let mask = match (&entry.inpaint, latent.denoise_mask) {
            (Some(inpaint), _) => inpaint.mask_channel(&self.device)?,
            (None, Some(denoise_mask)) => denoise_mask.mean_keepdim(1)?,
            (None, None) => Tensor::ones((batch, 1, height, width), DType::F32, &self.device)?,
        };
        let mask = resize_centered(&mask, height * 8, width * 8)?;
        let mask_batch = mask.dim(0)?;
        let mask = mask
            .reshape((mask_batch, height, 8, width, 8))?
            .permute((0, 2, 4, 1, 3))?
            .reshape((mask_batch, FLUX_MASK_CHANNELS, height, width))?;
        let mask = resize_to_batch(&mask, batch)?;
        Ok(Tensor::cat(&[&image, &mask], 1)?)
    }

    /// The class-conditioning vector `y` of an entry, [1, adm] (ComfyUI's `encode_adm`): for SDXL
    /// the pooled text vector and the embedded sizes, for the refiner the sizes and the
    /// aesthetic score (6 on the positive side, 2.5 on the negative one by default), for FLUX the
    /// pooled vector itself; `None` for models without class conditioning. `latent_size` is the
    /// latent's (height, width).
    pub fn class_conditioning(
        &self,
        entry: &CondEntry,
        negative: bool,
        latent_size: (usize, usize),
    ) -> Result<Option<Tensor>, ConditioningError> {
        let unet = match &self.network {
            DiffusionNetwork::UNet(unet) => unet,
            DiffusionNetwork::Flux(flux) => {
                let pooled = entry.pooled.as_ref().ok_or(ConditioningError::NoPooledOutput)?;
                let (found, expected) = (pooled.dim(D::Minus1)?, flux.config().vector_dim);
                if found < expected {
                    let family = self.family.name();
                    return Err(ConditioningError::PooledWidth {
                        family,
                        found,
                        expected,
                    });
                }
                return Ok(Some(pooled.to_device(&self.device)?.to_dtype(DType::F32)?));
            }
        };
        let Some(adm_width) = unet.config().adm_in_channels else {
            return Ok(None);
        };
        let sizes = &entry.sdxl;
        let height = sizes.height.unwrap_or((latent_size.0 * 8) as f64);
        let width = sizes.width.unwrap_or((latent_size.1 * 8) as f64);
        let (crop_w, crop_h) = (sizes.crop_w.unwrap_or(0.0), sizes.crop_h.unwrap_or(0.0));
        let values = match self.family {
            Family::SdxlRefiner => {
                let aesthetic = sizes.aesthetic_score.unwrap_or(if negative { 2.5 } else { 6.0 });
                vec![height, width, crop_h, crop_w, aesthetic]
            }
            _ => vec![
                height,
                width,
                crop_h,
                crop_w,
                sizes.target_height.unwrap_or(height),
                sizes.target_width.unwrap_or(width),
            ],
        };
        let pooled = entry.pooled.as_ref().ok_or(ConditioningError::NoPooledOutput)?;
        let pooled_width = pooled.dim(D::Minus1)?;
        let expected = adm_width.saturating_sub(values.len() * SIZE_EMBEDDING_WIDTH);
        if pooled_width != expected {
            return Err(ConditioningError::PooledWidth {
                family: self.family.name(),
                found: pooled_width,
                expected,
            });
        }
        let values: Vec<f32> = values.into_iter().map(|v| v as f32).collect();
        let count = values.len();
        let sizes = Tensor::from_vec(values, count, &self.device)?;
        let embedded = timestep_embedding(&sizes, SIZE_EMBEDDING_WIDTH)?.reshape((1, count * SIZE_EMBEDDING_WIDTH))?;
        let pooled = pooled
            .to_device(&self.device)?
            .to_dtype(DType::F32)?
            .reshape((1, pooled_width))?;
        Ok(Some(Tensor::cat(&[&pooled, &embedded], 1)?))
    }
}

/// `t` ([1, …] or [batch, …]) with `batch` items.
fn repeat_to_batch(t: &Tensor, batch: usize) -> candle_core::Result<Tensor> {
    if t.dim(0)? == batch {
        return Ok(t.clone());
    }
    let mut repeats = vec![1; t.rank()];
    repeats[0] = batch;
    t.repeat(repeats)
}

/// ComfyUI's `blank_inpaint_image_like` for SD latents: "zero" pixels in latent space.
const BLANK_INPAINT_IMAGE: [f32; 4] = [0.8223, -0.6876, 0.6364, 0.1380];

/// `t` [B, C, h, w] resized to `height × width` as `common_upscale(…, "bilinear", "center")`
/// does (cropped to the aspect ratio first); unchanged when it has that size.
fn resize_centered(t: &Tensor, height: usize, width: usize) -> Result<Tensor, ConditioningError> {
    let (_, _, h, w) = t.dims4()?;
    if (h, w) == (height, width) {
        return Ok(t.clone());
    }
    let image = latents_as_image(t).map_err(|e| ConditioningError::Inpaint(e.to_string()))?;
    let resized = common_upscale(&image, width, height, ResizeMethod::Bilinear, true, false)
        .map_err(|e| ConditioningError::Inpaint(e.to_string()))?;
    image_as_latents(resized, t.device()).map_err(|e| ConditioningError::Inpaint(e.to_string()))
}

/// ComfyUI's `resize_to_batch_size`: items picked evenly to make `batch` of them.
fn resize_to_batch(t: &Tensor, batch: usize) -> candle_core::Result<Tensor> {
    let items = t.dim(0)?;
    if items == batch {
        return Ok(t.clone());
    }
    let indices: Vec<u32> = if batch <= 1 {
        (0..batch.min(items) as u32).collect()
    } else if batch < items {
        let scale = (items - 1) as f64 / (batch - 1) as f64;
        (0..batch)
            .map(|i| ((i as f64 * scale).round_ties_even() as usize).min(items - 1) as u32)
            .collect()
    } else {
        let scale = items as f64 / batch as f64;
        (0..batch)
            .map(|i| (((i as f64 + 0.5) * scale).floor() as usize).min(items - 1) as u32)
            .collect()
    };
    let indices = Tensor::new(indices.as_slice(), t.device())?;
    t.index_select(&indices, 0)
}

/// What one model call takes besides the latent: the text conditioning, the class
/// conditioning (SDXL, FLUX), an inpainting model's extra channels and FLUX's guidance
/// strength ([1]).
#[derive(Clone)]
struct ModelInputs {
    context: Tensor,
    y: Option<Tensor>,
    concat: Option<Tensor>,
    guidance: Option<Tensor>,
}

/// The latent being sampled, as the conditioning needs it: in model space, and the denoise
/// mask when sampling is masked.
struct LatentInputs<'a> {
    model_space: &'a Tensor,
    denoise_mask: Option<&'a Tensor>,
}

/// Width of each embedded size in SDXL's class-conditioning vector.
const SIZE_EMBEDDING_WIDTH: usize = 256;

/// Why a conditioning cannot drive a model.
#[derive(Debug, thiserror::Error)]
pub enum ConditioningError {
    #[error(
        "the conditioning's text embeddings are {found} wide but this {family} model's cross-attention \
         takes {expected}: was it encoded by another model family's text encoder (or is a refiner used \
         as a base model, or the other way round)?"
    )]
    ContextWidth {
        family: &'static str,
        found: usize,
        expected: usize,
    },
    #[error(
        "a diffusion model with {0} extra input channels is not supported by Easel yet (inpainting models have 5)"
    )]
    ExtraChannels(usize),
    #[error("the inpainting image cannot be used: {0}")]
    Inpaint(String),
    #[error("the conditioning has no pooled output, which this model needs ('pooled_output')")]
    NoPooledOutput,
    #[error(
        "the conditioning's pooled output is {found} wide but this {family} model needs {expected}: \
         was it encoded by another model family's text encoder (or is a refiner used as a base \
         model, or the other way round)?"
    )]
    PooledWidth {
        family: &'static str,
        found: usize,
        expected: usize,
    },
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// Why a sampling run failed: the sampler, the model's arithmetic, memory or the conditioning.
#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    #[error(transparent)]
    Sampler(#[from] SamplerError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    OutOfMemory(#[from] OutOfMemory),
    #[error(transparent)]
    Conditioning(#[from] ConditioningError),
}

/// The MODEL socket.
#[derive(Clone)]
pub struct Model(pub Arc<DiffusionModel>);

impl fmt::Debug for Model {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("<ModelPatcher>")
    }
}

impl NodeObject for Model {
    fn type_name(&self) -> &'static str {
        "MODEL"
    }
}

/// The network of one text encoder of a CLIP.
#[derive(Clone)]
pub enum TextNetwork {
    /// A CLIP text transformer of the given kind.
    Clip {
        kind: TextEncoderKind,
        encoder: Arc<ClipTextEncoder>,
    },
    /// T5-XXL and its vocabulary (FLUX).
    T5 {
        encoder: Arc<T5Encoder>,
        tokenizer: Arc<T5Tokenizer>,
    },
}

/// One text encoder of a CLIP.
#[derive(Clone)]
pub struct TextEncoder {
    pub network: TextNetwork,
    /// What the encoder was built from (LoRA nodes build it again with their patches).
    pub source: WeightSource,
}

impl TextEncoder {
    /// The CLIP kind of the encoder (none for T5).
    pub fn clip_kind(&self) -> Option<TextEncoderKind> {
        match &self.network {
            TextNetwork::Clip { kind, .. } => Some(*kind),
            TextNetwork::T5 { .. } => None,
        }
    }
}

/// The CLIP socket: the text encoders of a model family (SDXL: CLIP-L then CLIP-G; FLUX: CLIP-L
/// then T5-XXL) and the layer CLIPSetLastLayer chose.
#[derive(Clone)]
pub struct Clip {
    pub family: Family,
    pub encoders: Vec<TextEncoder>,
    /// `stop_at_clip_layer` counted from the end (1 = the last layer), when it was set.
    pub layer_from_end: Option<usize>,
}

/// One list of chunks per text encoder of a CLIP, in its order (T5: one chunk).
pub type ClipTokens = Vec<Vec<Vec<WeightedToken>>>;

impl Clip {
    /// How ComfyUI reads CLIP encoder `kind`'s output in this family: SD1.x and FLUX the last
    /// layer's (CLIP-L padded with the end token; FLUX keeps only its pooled vector, unprojected);
    /// SD2.x the penultimate layer's, normed; SDXL and its refiner the penultimate layer's without
    /// the final norm, CLIP-G's pooled vector projected and its chunks padded with 0. A layer set
    /// by CLIPSetLastLayer replaces the default.
    pub fn options(&self, kind: TextEncoderKind) -> EncodeOptions {
        let (default_layer, layer_norm_hidden) = match self.family {
            Family::Sd1 | Family::Flux => (OutputLayer::Last, true),
            Family::Sd2 => (OutputLayer::FromEnd(2), true),
            _ => (OutputLayer::FromEnd(2), false),
        };
        let open_clip = kind != TextEncoderKind::ClipL;
        EncodeOptions {
            layer: self.output_layer(default_layer),
            layer_norm_hidden,
            project_pooled: open_clip,
            pad_token: if open_clip { 0 } else { END_TOKEN },
        }
    }

    fn output_layer(&self, default: OutputLayer) -> OutputLayer {
        self.layer_from_end.map_or(default, OutputLayer::FromEnd)
    }

    /// `text` tokenized for every encoder (textual inversions from `paths`' embeddings folders).
    pub fn tokenize(&self, text: &str, paths: Option<&Paths>) -> ClipTokens {
        let find_embedding = paths.map(|paths| move |name: &str| paths.full_path("embeddings", name));
        self.encoders
            .iter()
            .map(|encoder| {
                let (key, width) = match &encoder.network {
                    TextNetwork::Clip { kind, encoder } => (kind.embedding_key(), encoder.width()),
                    TextNetwork::T5 { encoder, .. } => (T5_EMBEDDING_KEY, encoder.config().d_model),
                };
                let folder = find_embedding
                    .as_ref()
                    .map(|find| EmbeddingFolder::new(find, key, width));
                let embeddings: &dyn EmbeddingLookup = match &folder {
                    Some(folder) => folder,
                    None => &NoEmbeddings,
                };
                match &encoder.network {
                    TextNetwork::Clip { kind, .. } => {
                        tokenize_with_weights(text, embeddings, self.options(*kind).pad_token)
                    }
                    TextNetwork::T5 { tokenizer, .. } => {
                        vec![tokenizer.tokenize_with_weights(text, embeddings, FLUX_T5_MIN_LENGTH)]
                    }
                }
            })
            .collect()
    }

    /// Encodes tokens into a one-entry conditioning. FLUX: T5's hidden states and CLIP-L's pooled
    /// vector (ComfyUI's `FluxClipModel`). Otherwise each CLIP's hidden states, cut to the
    /// shortest and joined along the channels (SDXL: CLIP-L ⧺ CLIP-G), and the last one's pooled
    /// vector.
    pub fn encode(&self, tokens: &ClipTokens) -> candle_core::Result<Conditioning> {
        let mut clip_hidden = Vec::with_capacity(self.encoders.len());
        let mut t5_hidden = None;
        let mut pooled = None;
        for (encoder, chunks) in self.encoders.iter().zip(tokens) {
            match &encoder.network {
                TextNetwork::Clip { kind, encoder } => {
                    let encoded = encoder.encode_weighted(chunks, self.options(*kind))?;
                    clip_hidden.push(encoded.hidden);
                    pooled = Some(encoded.pooled);
                }
                TextNetwork::T5 { encoder, .. } => {
                    let layer = self.output_layer(OutputLayer::Last);
                    t5_hidden = Some(encoder.encode_weighted(chunks, layer)?);
                }
            }
        }
        let hidden = match t5_hidden {
            Some(hidden) => hidden,
            None => {
                let tokens = clip_hidden
                    .iter()
                    .map(|h| h.dim(1))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                let cut_to = tokens.into_iter().min().unwrap_or(0);
                let hidden = clip_hidden
                    .iter()
                    .map(|h| h.narrow(1, 0, cut_to))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&hidden, D::Minus1)?
            }
        };
        Ok(Conditioning(vec![CondEntry::new(hidden, pooled)]))
    }
}

impl fmt::Debug for Clip {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("<comfy.sd.CLIP>")
    }
}

impl NodeObject for Clip {
    fn type_name(&self) -> &'static str {
        "CLIP"
    }
}

/// The VAE socket.
#[derive(Clone)]
pub struct VaeModel(pub Arc<Vae>);

impl fmt::Debug for VaeModel {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("<comfy.sd.VAE>")
    }
}

impl NodeObject for VaeModel {
    fn type_name(&self) -> &'static str {
        "VAE"
    }
}

/// One conditioning entry: text embeddings and what ComfyUI keeps beside them.
#[derive(Clone, Debug)]
pub struct CondEntry {
    /// [1, tokens, width].
    pub cross_attention: Tensor,
    /// [1, width], when the text encoder produced one.
    pub pooled: Option<Tensor>,
    /// The part of sampling, as (start, end) fractions, during which the entry applies.
    pub timestep_range: Option<(f64, f64)>,
    /// The sizes SDXL's class conditioning embeds (CLIPTextEncodeSDXL and its refiner twin).
    pub sdxl: SdxlSizes,
    /// Where in the latent the entry applies, and how strongly.
    pub region: CondRegion,
    /// The image an inpainting model completes (InpaintModelConditioning).
    pub inpaint: Option<InpaintImage>,
    /// The guidance strength a FLUX dev model embeds (FluxGuidance; 3.5 when not set).
    pub guidance: Option<f32>,
}

/// The mask channels of FLUX fill: each latent pixel's 8×8 block of mask pixels.
const FLUX_MASK_CHANNELS: usize = 64;

/// FLUX's guidance strength for conditioning that does not set one (ComfyUI's `Flux.extra_conds`).
pub const DEFAULT_GUIDANCE: f32 = 3.5;

/// What InpaintModelConditioning gives inpainting models beside the noise: the image with its
/// masked part greyed out, encoded (raw VAE latent, `concat_latent_image`), and the mask
/// (`concat_mask`).
#[derive(Clone, Debug)]
pub struct InpaintImage {
    pub latent: Tensor,
    pub mask: Mask,
}

impl InpaintImage {
    /// The mask as one channel, [B, 1, H, W] at its own (pixel) size.
    fn mask_channel(&self, device: &Device) -> candle_core::Result<Tensor> {
        let mask = &self.mask;
        Tensor::from_vec(mask.data.clone(), (mask.batch, 1, mask.height, mask.width), device)
    }
}

impl CondEntry {
    /// An entry of text embeddings with nothing else set.
    pub fn new(cross_attention: Tensor, pooled: Option<Tensor>) -> Self {
        CondEntry {
            cross_attention,
            pooled,
            timestep_range: None,
            sdxl: SdxlSizes::default(),
            region: CondRegion::default(),
            inpaint: None,
            guidance: None,
        }
    }
}

/// The keys of a conditioning entry SDXL's class conditioning reads; a missing one takes its
/// default when sampling (the latent's size, no crop, the size as target, the refiner's
/// aesthetic score 6 or 2.5).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SdxlSizes {
    pub width: Option<f64>,
    pub height: Option<f64>,
    pub crop_w: Option<f64>,
    pub crop_h: Option<f64>,
    pub target_width: Option<f64>,
    pub target_height: Option<f64>,
    pub aesthetic_score: Option<f64>,
}

/// The CONDITIONING socket: a list of entries.
#[derive(Clone, Debug)]
pub struct Conditioning(pub Vec<CondEntry>);

impl Conditioning {
    /// Every entry with the guidance strength a FLUX dev model embeds (FluxGuidance's
    /// `conditioning_set_values`).
    pub fn with_guidance(&self, guidance: f32) -> Conditioning {
        let entries = self
            .0
            .iter()
            .map(|entry| CondEntry {
                guidance: Some(guidance),
                ..entry.clone()
            })
            .collect();
        Conditioning(entries)
    }
}

impl NodeObject for Conditioning {
    fn type_name(&self) -> &'static str {
        "CONDITIONING"
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

/// Classifier-free guidance over conditioning lists (ComfyUI's `CFGGuider` with
/// `sampling_function`): each side is the strength-weighted average of its active entries'
/// predictions, and `uncond + (cond − uncond)·cfg` combines them. At cfg = 1 the negative side is
/// not evaluated.
struct Guider<'a> {
    model: &'a DiffusionModel,
    positive: Vec<ActiveEntry>,
    negative: Vec<ActiveEntry>,
    cfg: f64,
    /// DualCFGGuider's middle prompt and its scale.
    dual: Option<DualSide>,
}

/// The middle side of DualCFGGuider, ready for the model.
struct DualSide {
    middle: Vec<ActiveEntry>,
    cfg_conds: f64,
    nested: bool,
}

/// Python's `math.isclose(value, 1.0)`: ComfyUI skips what a scale of 1 makes unnecessary.
fn is_one(value: f64) -> bool {
    (value - 1.0).abs() <= 1e-9 * value.abs().max(1.0)
}

/// A conditioning entry ready for the model: its inputs on the model's device, its timestep
/// range turned into σ bounds, and its region resolved against the latent.
#[derive(Clone)]
struct ActiveEntry {
    inputs: ModelInputs,
    sigma_start: f64,
    sigma_end: f64,
    /// The area as the entry asked for it, which same-area entries are matched by.
    requested_area: Option<LatentArea>,
    /// Where the prediction is made (the area clamped to the latent; `None`: everywhere) and
    /// its weight there, [B, C, h, w]; no weight means 1.
    area: Option<LatentArea>,
    weight: Option<Tensor>,
}

impl ActiveEntry {
    /// `entry` for `model`, on the negative side or not, for `latent`.
    fn new(
        entry: &CondEntry,
        model: &DiffusionModel,
        negative: bool,
        latent: &LatentInputs,
    ) -> Result<Self, ConditioningError> {
        let shape = latent.model_space.dims();
        let schedule = &model.schedule;
        let (sigma_start, sigma_end) = match entry.timestep_range {
            Some((start, end)) => (schedule.percent_to_sigma(start), schedule.percent_to_sigma(end)),
            None => (f64::INFINITY, f64::NEG_INFINITY),
        };
        let width = entry.cross_attention.dim(D::Minus1)?;
        let expected = model.network.context_dim();
        if width != expected {
            return Err(ConditioningError::ContextWidth {
                family: model.family.name(),
                found: width,
                expected,
            });
        }
        let (latent_height, latent_width) = (shape[2], shape[3]);
        let region = ResolvedRegion::new(&entry.region, latent_height, latent_width, &model.device)?;
        let (area, weight) = match region.placement(shape, &model.device)? {
            Some((area, weight)) => (area, Some(weight)),
            None => (None, None),
        };
        let inputs = ModelInputs {
            context: entry.cross_attention.to_device(&model.device)?.to_dtype(DType::F32)?,
            y: model.class_conditioning(entry, negative, (latent_height, latent_width))?,
            concat: model.inpaint_channels(entry, latent)?,
            guidance: match model.network {
                DiffusionNetwork::Flux(_) => Some(Tensor::new(
                    &[entry.guidance.unwrap_or(DEFAULT_GUIDANCE)],
                    &model.device,
                )?),
                DiffusionNetwork::UNet(_) => None,
            },
        };
        Ok(ActiveEntry {
            inputs,
            sigma_start,
            sigma_end,
            requested_area: region.area,
            area,
            weight,
        })
    }

    fn applies_at(&self, sigma: f32) -> bool {
        let sigma = f64::from(sigma);
        !(sigma > self.sigma_start || sigma < self.sigma_end)
    }
}

/// Gives every entry of `from` that has an area an entry with the same area on the `to` side,
/// with the text conditioning of the `to` entry that contains it (ComfyUI's
/// `create_cond_with_same_area_if_none`), so that guidance compares like with like there.
fn add_same_areas(from: &[ActiveEntry], to: &mut Vec<ActiveEntry>) {
    for entry in from {
        let Some(area) = entry.requested_area else {
            continue;
        };
        let areas: Vec<Option<LatentArea>> = to.iter().map(|other| other.requested_area).collect();
        if let Some(source) = same_area_source(&area, &areas) {
            let paired = ActiveEntry {
                inputs: to[source].inputs.clone(),
                ..entry.clone()
            };
            to.push(paired);
        }
    }
}

/// `t` narrowed to `area` on its last two dimensions.
fn crop(t: &Tensor, area: &LatentArea) -> candle_core::Result<Tensor> {
    t.narrow(2, area.y, area.height)?.narrow(3, area.x, area.width)
}

/// `t` (over `area`) placed in zeros of `height × width`.
fn uncrop(t: &Tensor, area: &LatentArea, height: usize, width: usize) -> candle_core::Result<Tensor> {
    t.pad_with_zeros(2, area.y, height - area.y - area.height)?
        .pad_with_zeros(3, area.x, width - area.x - area.width)
}

impl Guider<'_> {
    /// One side's prediction (`calc_cond_batch` for one side): every active entry predicts on
    /// its area, and the predictions are averaged with their weights (counts start at 1e-37).
    fn predict(&self, entries: &[ActiveEntry], x: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
        let (_, _, height, width) = x.dims4()?;
        let mut sum: Option<Tensor> = None;
        let mut count: Option<Tensor> = None;
        for entry in entries.iter().filter(|entry| entry.applies_at(sigma)) {
            let (input, denoised) = match &entry.area {
                Some(area) => {
                    let input = crop(x, area)?;
                    let inputs = ModelInputs {
                        concat: entry.inputs.concat.as_ref().map(|c| crop(c, area)).transpose()?,
                        ..entry.inputs.clone()
                    };
                    let denoised = self.model.denoise(&input, sigma, &inputs)?;
                    (input, denoised)
                }
                None => (x.clone(), self.model.denoise(x, sigma, &entry.inputs)?),
            };
            let (weighted, weight) = match &entry.weight {
                Some(weight) => ((denoised * weight)?, weight.clone()),
                None => (denoised, input.ones_like()?),
            };
            let (weighted, weight) = match &entry.area {
                Some(area) => (
                    uncrop(&weighted, area, height, width)?,
                    uncrop(&weight, area, height, width)?,
                ),
                None => (weighted, weight),
            };
            sum = Some(match sum {
                Some(sum) => (sum + weighted)?,
                None => weighted,
            });
            count = Some(match count {
                Some(count) => (count + weight)?,
                None => weight,
            });
        }
        match (sum, count) {
            (Some(sum), Some(count)) => sum / (count + 1e-37)?,
            _ => x.zeros_like(),
        }
    }
}

impl Guider<'_> {
    /// Both sides' predictions. When each side has one active entry over the whole latent and
    /// their inputs have the same shapes, they run as one batch, as ComfyUI's `calc_cond_batch`
    /// does.
    fn predict_both(&self, x: &Tensor, sigma: f32) -> candle_core::Result<(Tensor, Tensor)> {
        let active = |entries: &[ActiveEntry]| -> Vec<usize> {
            (0..entries.len()).filter(|i| entries[*i].applies_at(sigma)).collect()
        };
        if let ([positive], [negative]) = (active(&self.positive).as_slice(), active(&self.negative).as_slice()) {
            let (positive, negative) = (&self.positive[*positive], &self.negative[*negative]);
            let whole = positive.weight.is_none() && negative.weight.is_none();
            let (positive, negative) = (&positive.inputs, &negative.inputs);
            let same_shape = |p: &Option<Tensor>, n: &Option<Tensor>| match (p, n) {
                (Some(p), Some(n)) => p.dims()[1..] == n.dims()[1..],
                (None, None) => true,
                _ => false,
            };
            if whole
                && positive.context.dims()[1..] == negative.context.dims()[1..]
                && same_shape(&positive.y, &negative.y)
                && same_shape(&positive.concat, &negative.concat)
            {
                let batch = x.dim(0)?;
                let both =
                    |p: &Tensor, n: &Tensor| Tensor::cat(&[repeat_to_batch(p, batch)?, repeat_to_batch(n, batch)?], 0);
                let both_optional = |p: &Option<Tensor>, n: &Option<Tensor>| match (p, n) {
                    (Some(p), Some(n)) => both(p, n).map(Some),
                    _ => Ok(None),
                };
                let inputs = ModelInputs {
                    context: both(&positive.context, &negative.context)?,
                    y: both_optional(&positive.y, &negative.y)?,
                    concat: both_optional(&positive.concat, &negative.concat)?,
                    guidance: both_optional(&positive.guidance, &negative.guidance)?,
                };
                let out = self.model.denoise(&Tensor::cat(&[x, x], 0)?, sigma, &inputs)?;
                return Ok((out.narrow(0, 0, batch)?, out.narrow(0, batch, batch)?));
            }
        }
        Ok((
            self.predict(&self.positive, x, sigma)?,
            self.predict(&self.negative, x, sigma)?,
        ))
    }
}

impl Guider<'_> {
    /// DualCFGGuider's prediction and the one its guidance treats as unconditional. Regular:
    /// `negative + (middle − negative)·cfg + (positive − middle)·cfg_conds`, the negative side
    /// not evaluated (zeros) when cfg is 1 and then the middle one neither when cfg_conds is 1
    /// too; nested: `negative + cfg·(middle + (positive − middle)·cfg_conds − negative)`.
    fn dual_guided(&self, dual: &DualSide, x: &Tensor, sigma: f32) -> candle_core::Result<(Tensor, Tensor)> {
        if dual.nested {
            let negative = self.predict(&self.negative, x, sigma)?;
            let middle = self.predict(&dual.middle, x, sigma)?;
            let positive = self.predict(&self.positive, x, sigma)?;
            let text = (&middle + ((positive - &middle)? * dual.cfg_conds)?)?;
            let guided = (&negative + ((text - &negative)? * self.cfg)?)?;
            return Ok((guided, middle));
        }
        let skip_negative = is_one(self.cfg);
        let skip_middle = skip_negative && is_one(dual.cfg_conds);
        let negative = match skip_negative {
            true => x.zeros_like()?,
            false => self.predict(&self.negative, x, sigma)?,
        };
        let middle = match skip_middle {
            true => x.zeros_like()?,
            false => self.predict(&dual.middle, x, sigma)?,
        };
        let positive = self.predict(&self.positive, x, sigma)?;
        let between = (&negative + ((&middle - &negative)? * self.cfg)?)?;
        let guided = (between + ((positive - &middle)? * dual.cfg_conds)?)?;
        Ok((guided, negative))
    }
}

impl Denoiser for Guider<'_> {
    fn denoise(&mut self, x: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
        if let Some(dual) = &self.dual {
            return Ok(self.dual_guided(dual, x, sigma)?.0);
        }
        if is_one(self.cfg) {
            return self.predict(&self.positive, x, sigma);
        }
        let (cond, uncond) = self.predict_both(x, sigma)?;
        &uncond + ((cond - &uncond)? * self.cfg)?
    }

    fn denoise_with_uncond(&mut self, x: &Tensor, sigma: f32) -> candle_core::Result<(Tensor, Tensor)> {
        if let Some(dual) = &self.dual {
            return self.dual_guided(dual, x, sigma);
        }
        let (cond, uncond) = self.predict_both(x, sigma)?;
        let guided = (&uncond + ((cond - &uncond)? * self.cfg)?)?;
        Ok((guided, uncond))
    }
}

/// Everything `common_ksampler` takes.
pub struct SamplingRequest<'a> {
    pub model: &'a DiffusionModel,
    pub seed: u64,
    pub steps: usize,
    pub cfg: f64,
    pub sampler: &'a str,
    pub scheduler: Scheduler,
    pub positive: &'a Conditioning,
    pub negative: &'a Conditioning,
    pub latent: &'a Latent,
    pub denoise: f64,
    /// KSamplerAdvanced: no initial noise.
    pub disable_noise: bool,
    pub start_step: Option<usize>,
    pub last_step: Option<usize>,
    pub force_full_denoise: bool,
    /// Where sampling may change the latent (1) and where it keeps it (0), [B, C, H, W] at the
    /// latent's size (ComfyUI's `prepare_mask` of the latent's noise mask).
    pub denoise_mask: Option<Tensor>,
}

/// Progress of one sampling run: (finished steps, total steps, the current denoised estimate).
pub type ProgressCallback<'a> = dyn FnMut(usize, usize, &Tensor) -> candle_core::Result<()> + 'a;

impl SamplingRequest<'_> {
    /// KSampler's σ: the scheduler's for `steps` and `denoise`, cut to `start_step..=last_step`
    /// (the last set to 0 with `force_full_denoise`); empty when `start_step` leaves nothing.
    fn sigmas(&self) -> Vec<f32> {
        let mut sigmas = ksampler_sigmas(
            &self.model.schedule,
            self.scheduler,
            self.steps,
            self.denoise,
            samplers::discards_penultimate_sigma(self.sampler),
        );
        if let Some(last_step) = self.last_step {
            if last_step + 1 < sigmas.len() {
                sigmas.truncate(last_step + 1);
                if self.force_full_denoise {
                    if let Some(last) = sigmas.last_mut() {
                        *last = 0.0;
                    }
                }
            }
        }
        if let Some(start_step) = self.start_step {
            if start_step + 1 < sigmas.len() {
                sigmas.drain(..start_step);
            } else {
                sigmas.clear();
            }
        }
        sigmas
    }
}

/// ComfyUI's `common_ksampler`: returns the sampled raw latent.
pub fn sample(request: &SamplingRequest, progress: &mut ProgressCallback) -> Result<Tensor, SamplingError> {
    let sigmas = request.sigmas();
    let run = GuidedSampling {
        model: request.model,
        positive: request.positive,
        negative: request.negative,
        cfg: request.cfg,
        dual: None,
        sampler: request.sampler,
        sigmas: &sigmas,
        latent: request.latent,
        seed: request.seed,
        add_noise: !request.disable_noise,
        denoise_mask: request.denoise_mask.clone(),
    };
    Ok(sample_guided(&run, progress)?.samples)
}

/// A sampling run once its σ are chosen (ComfyUI's guider `sample`), as KSampler and the
/// custom-sampling nodes (SamplerCustom, SamplerCustomAdvanced) make it.
pub struct GuidedSampling<'a> {
    pub model: &'a DiffusionModel,
    pub positive: &'a Conditioning,
    /// Empty for BasicGuider (with cfg 1 it is never evaluated).
    pub negative: &'a Conditioning,
    /// The scale between the negative side and the positive one (DualCFGGuider: between the
    /// negative side and the middle one, `cfg_cond2_negative`).
    pub cfg: f64,
    /// DualCFGGuider's middle prompt.
    pub dual: Option<&'a DualCfg>,
    pub sampler: &'a str,
    pub sigmas: &'a [f32],
    pub latent: &'a Latent,
    /// Seeds the initial noise (where `add_noise`) and the samplers' step noise.
    pub seed: u64,
    pub add_noise: bool,
    /// Where sampling may change the latent (1) and where it keeps it (0), [B, C, H, W].
    pub denoise_mask: Option<Tensor>,
}

/// DualCFGGuider's second prompt (`cond2`, treated as a negative prompt by class conditioning),
/// which sits between the negative prompt and the positive one (`cond1`), and how they combine.
#[derive(Clone, Debug)]
pub struct DualCfg {
    pub middle: Conditioning,
    /// The scale from the middle prompt to the positive one.
    pub cfg_conds: f64,
    /// ComfyUI's `nested` style.
    pub nested: bool,
}

/// What a sampling run gives: the sampled raw latent, and the last denoised estimate (raw),
/// when a step ran.
pub struct Sampled {
    pub samples: Tensor,
    pub denoised: Option<Tensor>,
}

/// Runs `run`: noise, the conditioning's guidance, the sampler over `run.sigmas`, and the
/// latent scaling in and out of model space. With no σ the latent comes back as it is.
pub fn sample_guided(run: &GuidedSampling, progress: &mut ProgressCallback) -> Result<Sampled, SamplingError> {
    let model = run.model;
    let device = &model.device;
    let latent = run.latent.samples.to_device(device)?.to_dtype(DType::F32)?;
    let has_content = latent.abs()?.max_all()?.to_scalar::<f32>()? != 0.0;
    let (batch, channels, height, width) = latent.dims4()?;
    // ComfyUI's `fix_empty_latent_channels`: an empty latent of another channel count (an
    // EmptyLatentImage for FLUX) becomes an empty one of the model's.
    let model_channels = model.network.latent_channels();
    let latent = if !has_content && channels != model_channels {
        Tensor::zeros((batch, model_channels, height, width), DType::F32, device)?
    } else {
        latent
    };
    if run.sigmas.is_empty() {
        return Ok(Sampled {
            samples: latent,
            denoised: None,
        });
    }
    ensure_available(model.network.working_memory(batch, height, width), || {
        format!("sampling a {}×{} latent (batch {batch})", width * 8, height * 8)
    })?;
    let shape = latent.dims().to_vec();
    let noise = if run.add_noise {
        let values = prepare_noise(run.seed, &shape, run.latent.batch_index.as_deref());
        Tensor::from_vec(values, shape.as_slice(), device)?
    } else {
        latent.zeros_like()?
    };
    let sigmas = run.sigmas;

    // As ComfyUI: an empty latent is not shifted into model space.
    let latent_in = if has_content {
        model.latent_format.process_in(&latent)?
    } else {
        latent.clone()
    };
    let denoise_mask = run
        .denoise_mask
        .as_ref()
        .map(|mask| mask.to_device(device)?.to_dtype(DType::F32))
        .transpose()?;
    let latent_inputs = LatentInputs {
        model_space: &latent_in,
        denoise_mask: denoise_mask.as_ref(),
    };
    // The sides in ComfyUI's order (positive, middle, negative); each gets entries for the
    // areas the others have (`process_conds`).
    let mut sides = vec![entries(run.positive, model, false, &latent_inputs)?];
    if let Some(dual) = run.dual {
        sides.push(entries(&dual.middle, model, true, &latent_inputs)?);
    }
    sides.push(entries(run.negative, model, true, &latent_inputs)?);
    for from in 0..sides.len() {
        // Only the other sides grow while `from`'s areas are paired, so one copy serves them all.
        let areas = sides[from].clone();
        for to in (0..sides.len()).filter(|to| *to != from) {
            add_same_areas(&areas, &mut sides[to]);
        }
    }
    let negative = sides.pop().unwrap_or_default();
    let middle = run.dual.map(|_| sides.pop().unwrap_or_default());
    let positive = sides.pop().unwrap_or_default();
    let mut guider = Guider {
        model,
        positive,
        negative,
        cfg: run.cfg,
        dual: run.dual.zip(middle).map(|(dual, middle)| DualSide {
            middle,
            cfg_conds: dual.cfg_conds,
            nested: dual.nested,
        }),
    };

    let sigma_max = model.schedule.sigma_max();
    let first = sigmas[0];
    let max_denoise = (sigma_max - first).abs() <= 1e-5 * sigma_max.abs().max(first.abs()) || first > sigma_max;
    let x = model.prediction.noise_scaling(first, &noise, &latent_in, max_denoise)?;

    let mut last_denoised = None;
    let mut callback = |step: Step| {
        last_denoised = Some(step.denoised.clone());
        progress(step.index + 1, step.total, step.denoised)
    };
    let mut inpainting;
    let denoiser: &mut dyn Denoiser = match denoise_mask {
        Some(mask) => {
            inpainting = Inpainting {
                keep: (1.0 - &mask)?,
                mask,
                inner: &mut guider,
                latent: latent_in,
                noise,
                prediction: model.prediction,
                differential: model
                    .differential_diffusion
                    .map(|strength| DifferentialDiffusion::new(strength, &model.schedule, sigmas)),
            };
            &mut inpainting
        }
        None => &mut guider,
    };
    let sampled = samplers::sample(
        run.sampler,
        denoiser,
        x,
        sigmas,
        &model.schedule,
        run.seed,
        &mut callback,
    )?;
    let last = sigmas.last().copied().unwrap_or(0.0);
    let sampled = model.prediction.inverse_noise_scaling(last, sampled)?;
    Ok(Sampled {
        samples: model.latent_format.process_out(&sampled)?,
        denoised: last_denoised
            .map(|denoised| model.latent_format.process_out(&denoised))
            .transpose()?,
    })
}

/// ComfyUI's `KSamplerX0Inpaint`: where the denoise mask is 0 the network sees the original
/// latent noised to the current σ, and its prediction is replaced by the original latent, so
/// that sampling changes only the masked part.
struct Inpainting<'a> {
    inner: &'a mut dyn Denoiser,
    mask: Tensor,
    /// 1 − mask.
    keep: Tensor,
    /// The original latent, in model space.
    latent: Tensor,
    /// The initial noise, before scaling.
    noise: Tensor,
    /// How the model noises latents.
    prediction: Prediction,
    differential: Option<DifferentialDiffusion<'a>>,
}

impl Inpainting<'_> {
    /// The mask at σ and its complement: the denoise mask, or DifferentialDiffusion's
    /// thresholding of it.
    fn masks_at(&self, sigma: f32) -> candle_core::Result<(Tensor, Tensor)> {
        match &self.differential {
            Some(differential) => {
                let mask = differential.mask_at(&self.mask, sigma)?;
                let keep = (1.0 - &mask)?;
                Ok((mask, keep))
            }
            None => Ok((self.mask.clone(), self.keep.clone())),
        }
    }

    fn network_input(&self, x: &Tensor, sigma: f32, (mask, keep): &(Tensor, Tensor)) -> candle_core::Result<Tensor> {
        let noised = self.prediction.noise_scaling(sigma, &self.noise, &self.latent, false)?;
        (x * mask)? + (noised * keep)?
    }

    fn kept(&self, denoised: &Tensor, (mask, keep): &(Tensor, Tensor)) -> candle_core::Result<Tensor> {
        (denoised * mask)? + (&self.latent * keep)?
    }
}

impl Denoiser for Inpainting<'_> {
    fn denoise(&mut self, x: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
        let masks = self.masks_at(sigma)?;
        let input = self.network_input(x, sigma, &masks)?;
        let denoised = self.inner.denoise(&input, sigma)?;
        self.kept(&denoised, &masks)
    }

    fn denoise_with_uncond(&mut self, x: &Tensor, sigma: f32) -> candle_core::Result<(Tensor, Tensor)> {
        let masks = self.masks_at(sigma)?;
        let input = self.network_input(x, sigma, &masks)?;
        let (guided, uncond) = self.inner.denoise_with_uncond(&input, sigma)?;
        Ok((self.kept(&guided, &masks)?, uncond))
    }
}

/// ComfyUI's DifferentialDiffusion (`denoise_mask_function`): at each step the mask keeps the
/// parts whose value reaches the step's progress, `threshold = (t(σ) − t_to) / (t_from − t_to)`
/// between the run's first timestep and its last (at least σ_min's); a strength below 1 blends
/// that binary mask with the original one (a strength of 0 counts as none, as in ComfyUI).
struct DifferentialDiffusion<'a> {
    strength: f64,
    schedule: &'a SigmaSchedule,
    timestep_from: f32,
    timestep_to: f32,
}

impl<'a> DifferentialDiffusion<'a> {
    fn new(strength: f64, schedule: &'a SigmaSchedule, sigmas: &[f32]) -> Self {
        let sigma_from = sigmas.first().copied().unwrap_or(0.0);
        let sigma_to = sigmas.last().copied().unwrap_or(0.0).max(schedule.sigma_min());
        DifferentialDiffusion {
            strength,
            schedule,
            timestep_from: schedule.timestep(sigma_from),
            timestep_to: schedule.timestep(sigma_to),
        }
    }

    fn mask_at(&self, mask: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
        let threshold = (self.schedule.timestep(sigma) - self.timestep_to) / (self.timestep_from - self.timestep_to);
        let threshold = Tensor::new(threshold, mask.device())?.broadcast_as(mask.shape())?;
        let binary = mask.ge(&threshold)?.to_dtype(DType::F32)?;
        if self.strength > 0.0 && self.strength < 1.0 {
            (binary * self.strength)? + (mask * (1.0 - self.strength))?
        } else {
            Ok(binary)
        }
    }
}

/// The entries of one side of guidance, ready for `model` and `latent`.
fn entries(
    conditioning: &Conditioning,
    model: &DiffusionModel,
    negative: bool,
    latent: &LatentInputs,
) -> Result<Vec<ActiveEntry>, ConditioningError> {
    conditioning
        .0
        .iter()
        .map(|entry| ActiveEntry::new(entry, model, negative, latent))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DifferentialDiffusion keeps, at each step, the parts of the mask that reach the step's
    /// progress between the first timestep and the last (σ_min's at least); a strength below 1
    /// blends that with the mask, 0 counts as 1 (ComfyUI's `if strength and strength < 1`).
    #[test]
    fn differential_diffusion_thresholds_the_mask_by_progress() {
        let schedule = SigmaSchedule::flow(1.0, 1.0);
        let sigma_min = schedule.sigma_min();
        let sigmas = [1.0, 0.75, 0.5, 0.0];
        let mask = Tensor::new(&[0.2f32, 0.5, 0.7, 0.9], &Device::Cpu).unwrap();
        let values = |t: Tensor| t.to_vec1::<f32>().unwrap();
        let threshold = (0.75 * 1.0 - sigma_min) / (1.0 - sigma_min);
        assert!(threshold > 0.7 && threshold < 0.75, "{threshold}");
        for (strength, expected) in [
            (1.0, vec![0.0, 0.0, 0.0, 1.0]),
            (0.0, vec![0.0, 0.0, 0.0, 1.0]),
            (0.5, vec![0.1, 0.25, 0.35, 0.95]),
        ] {
            let differential = DifferentialDiffusion::new(strength, &schedule, &sigmas);
            let got = values(differential.mask_at(&mask, 0.75).unwrap());
            for (got, expected) in got.iter().zip(&expected) {
                assert!(
                    (got - expected).abs() < 1e-6,
                    "strength {strength}: {got} vs {expected}"
                );
            }
        }
        // At the first step everything below 1 is kept; at σ_min everything is changed.
        let differential = DifferentialDiffusion::new(1.0, &schedule, &sigmas);
        assert_eq!(values(differential.mask_at(&mask, 1.0).unwrap()), vec![0.0; 4]);
        assert_eq!(values(differential.mask_at(&mask, sigma_min).unwrap()), vec![1.0; 4]);
    }
}
