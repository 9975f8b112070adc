//! The objects that flow between the diffusion nodes (MODEL, CLIP, VAE, CONDITIONING, LATENT)
//! and the sampling pipeline of ComfyUI's `common_ksampler`: noise, σ schedule, classifier-free
//! guidance over the conditioning entries, the sampler, and the latent scaling in and out of
//! model space.

use std::fmt;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use easel_engine::NodeObject;

use crate::image::Mask;
use crate::models::clip_text::{ClipTextEncoder, OutputLayer};
use crate::models::unet::{UNet, UNetInput};
use crate::models::vae::Vae;
use crate::models::weights::WeightSource;
use crate::sampling::noise::prepare_noise;
use crate::sampling::samplers::{self, Denoiser, SamplerError, Step};
use crate::sampling::schedule::{ksampler_sigmas, Scheduler, SigmaSchedule};

/// What the network predicts, and so how its output becomes the denoised latent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    /// The noise (SD1.x, SD2.x base, SDXL).
    Epsilon,
}

/// A latent space: how VAE latents are scaled into model space and how previews colour them.
#[derive(Clone, Debug, PartialEq)]
pub struct LatentFormat {
    pub scale_factor: f64,
    /// Per-channel RGB contributions for fast previews, [channels][3].
    pub rgb_factors: Vec<[f32; 3]>,
}

impl LatentFormat {
    /// SD1.x and SD2.x (`latent_formats.SD15`).
    pub fn sd15() -> Self {
        LatentFormat {
            scale_factor: 0.18215,
            rgb_factors: vec![
                [0.3512, 0.2297, 0.3227],
                [0.3250, 0.4974, 0.2350],
                [-0.2829, 0.1762, 0.2721],
                [-0.2120, -0.2616, -0.7177],
            ],
        }
    }
}

/// A diffusion network with its noise schedule (ComfyUI's `BaseModel` with `model_sampling`).
pub struct DiffusionModel {
    pub unet: UNet,
    /// What the UNet was built from (LoRA nodes build it again with their patches).
    pub source: WeightSource,
    pub prediction: Prediction,
    pub schedule: SigmaSchedule,
    pub latent_format: LatentFormat,
    pub device: Device,
}

impl DiffusionModel {
    /// D(x, σ) for one conditioning: scale the input, run the network at σ's timestep, turn the
    /// prediction into the denoised latent.
    fn denoise(&self, x: &Tensor, sigma: f32, context: &Tensor) -> candle_core::Result<Tensor> {
        let batch = x.dim(0)?;
        let input_scale = f64::from((sigma * sigma + 1.0).sqrt());
        let scaled = (x / input_scale)?;
        let timestep = self.schedule.timestep(sigma);
        let timesteps = Tensor::from_vec(vec![timestep; batch], batch, &self.device)?;
        let context = if context.dim(0)? == batch {
            context.clone()
        } else {
            context.repeat((batch, 1, 1))?
        };
        let input = UNetInput::new(&scaled, &timesteps, &context);
        let out = self.unet.forward(&input)?;
        match self.prediction {
            Prediction::Epsilon => x - (out * f64::from(sigma))?,
        }
    }
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

/// The CLIP socket: a text encoder and the layer its output is taken from.
#[derive(Clone)]
pub struct Clip {
    pub encoder: Arc<ClipTextEncoder>,
    pub output_layer: OutputLayer,
    /// What the encoder was built from (LoRA nodes build it again with their patches).
    pub source: WeightSource,
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
}

/// The CONDITIONING socket: a list of entries.
#[derive(Clone, Debug)]
pub struct Conditioning(pub Vec<CondEntry>);

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
}

/// A conditioning entry with its timestep range turned into σ bounds.
struct ActiveEntry {
    context: Tensor,
    sigma_start: f64,
    sigma_end: f64,
}

impl ActiveEntry {
    fn new(entry: &CondEntry, schedule: &SigmaSchedule, device: &Device) -> candle_core::Result<Self> {
        let (sigma_start, sigma_end) = match entry.timestep_range {
            Some((start, end)) => (schedule.percent_to_sigma(start), schedule.percent_to_sigma(end)),
            None => (f64::INFINITY, f64::NEG_INFINITY),
        };
        Ok(ActiveEntry {
            context: entry.cross_attention.to_device(device)?.to_dtype(DType::F32)?,
            sigma_start,
            sigma_end,
        })
    }

    fn applies_at(&self, sigma: f32) -> bool {
        let sigma = f64::from(sigma);
        !(sigma > self.sigma_start || sigma < self.sigma_end)
    }
}

impl Guider<'_> {
    fn predict(&self, entries: &[ActiveEntry], x: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        let mut count = 1e-37f32;
        for entry in entries.iter().filter(|entry| entry.applies_at(sigma)) {
            let denoised = self.model.denoise(x, sigma, &entry.context)?;
            sum = Some(match sum {
                Some(sum) => (sum + denoised)?,
                None => denoised,
            });
            count += 1.0;
        }
        match sum {
            Some(sum) => sum / f64::from(count),
            None => x.zeros_like(),
        }
    }
}

impl Guider<'_> {
    /// Both sides' predictions. When each side has one active entry and their contexts have
    /// the same shape, they run as one batch, as ComfyUI's `calc_cond_batch` does.
    fn predict_both(&self, x: &Tensor, sigma: f32) -> candle_core::Result<(Tensor, Tensor)> {
        let active = |entries: &[ActiveEntry]| -> Vec<usize> {
            (0..entries.len()).filter(|i| entries[*i].applies_at(sigma)).collect()
        };
        if let ([positive], [negative]) = (active(&self.positive).as_slice(), active(&self.negative).as_slice()) {
            let (positive, negative) = (&self.positive[*positive].context, &self.negative[*negative].context);
            if positive.dims()[1..] == negative.dims()[1..] {
                let batch = x.dim(0)?;
                let per_item = |context: &Tensor| -> candle_core::Result<Tensor> {
                    if context.dim(0)? == batch {
                        Ok(context.clone())
                    } else {
                        context.repeat((batch, 1, 1))
                    }
                };
                let contexts = Tensor::cat(&[per_item(positive)?, per_item(negative)?], 0)?;
                let out = self.model.denoise(&Tensor::cat(&[x, x], 0)?, sigma, &contexts)?;
                return Ok((out.narrow(0, 0, batch)?, out.narrow(0, batch, batch)?));
            }
        }
        Ok((
            self.predict(&self.positive, x, sigma)?,
            self.predict(&self.negative, x, sigma)?,
        ))
    }
}

impl Denoiser for Guider<'_> {
    fn denoise(&mut self, x: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
        if (self.cfg - 1.0).abs() <= 1e-9 * self.cfg.abs().max(1.0) {
            return self.predict(&self.positive, x, sigma);
        }
        let (cond, uncond) = self.predict_both(x, sigma)?;
        &uncond + ((cond - &uncond)? * self.cfg)?
    }

    fn denoise_with_uncond(&mut self, x: &Tensor, sigma: f32) -> candle_core::Result<(Tensor, Tensor)> {
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

/// ComfyUI's `common_ksampler`: returns the sampled raw latent.
pub fn sample(request: &SamplingRequest, progress: &mut ProgressCallback) -> Result<Tensor, SamplerError> {
    let model = request.model;
    let device = &model.device;
    let latent = request.latent.samples.to_device(device)?.to_dtype(DType::F32)?;
    let (batch, _, height, width) = latent.dims4()?;
    crate::memory::ensure_available(model.unet.working_memory(batch, height, width), || {
        format!("sampling a {}×{} latent (batch {batch})", width * 8, height * 8)
    })?;
    let shape = latent.dims().to_vec();
    let noise = if request.disable_noise {
        latent.zeros_like()?
    } else {
        let values = prepare_noise(request.seed, &shape, request.latent.batch_index.as_deref());
        Tensor::from_vec(values, shape.as_slice(), device)?
    };

    let mut sigmas = ksampler_sigmas(
        &model.schedule,
        request.scheduler,
        request.steps,
        request.denoise,
        samplers::discards_penultimate_sigma(request.sampler),
    );
    if let Some(last_step) = request.last_step {
        if last_step + 1 < sigmas.len() {
            sigmas.truncate(last_step + 1);
            if request.force_full_denoise {
                if let Some(last) = sigmas.last_mut() {
                    *last = 0.0;
                }
            }
        }
    }
    if let Some(start_step) = request.start_step {
        if start_step + 1 < sigmas.len() {
            sigmas.drain(..start_step);
        } else {
            return Ok(latent);
        }
    }
    if sigmas.is_empty() {
        return Ok(latent);
    }

    let scale = model.latent_format.scale_factor;
    let has_content = latent.abs()?.max_all()?.to_scalar::<f32>()? != 0.0;
    let latent_in = if has_content {
        (&latent * scale)?
    } else {
        latent.clone()
    };
    let positive = entries(request.positive, model)?;
    let negative = entries(request.negative, model)?;
    let mut guider = Guider {
        model,
        positive,
        negative,
        cfg: request.cfg,
    };

    let sigma_max = model.schedule.sigma_max();
    let first = sigmas[0];
    let max_denoise = (sigma_max - first).abs() <= 1e-5 * sigma_max.abs().max(first.abs()) || first > sigma_max;
    let noise_scale = if max_denoise {
        (1.0 + first * first).sqrt()
    } else {
        first
    };
    let x = ((&noise * f64::from(noise_scale))? + &latent_in)?;

    let mut callback = |step: Step| progress(step.index + 1, step.total, step.denoised);
    let mut inpainting;
    let denoiser: &mut dyn Denoiser = match &request.denoise_mask {
        Some(mask) => {
            let mask = mask.to_device(device)?.to_dtype(DType::F32)?;
            inpainting = Inpainting {
                keep: (1.0 - &mask)?,
                mask,
                inner: &mut guider,
                latent: latent_in,
                noise,
            };
            &mut inpainting
        }
        None => &mut guider,
    };
    let sampled = samplers::sample(
        request.sampler,
        denoiser,
        x,
        &sigmas,
        &model.schedule,
        request.seed,
        &mut callback,
    )?;
    Ok((sampled / scale)?)
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
}

impl Inpainting<'_> {
    fn network_input(&self, x: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
        let noised = ((&self.noise * f64::from(sigma))? + &self.latent)?;
        (x * &self.mask)? + (noised * &self.keep)?
    }

    fn kept(&self, denoised: &Tensor) -> candle_core::Result<Tensor> {
        (denoised * &self.mask)? + (&self.latent * &self.keep)?
    }
}

impl Denoiser for Inpainting<'_> {
    fn denoise(&mut self, x: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
        let input = self.network_input(x, sigma)?;
        let denoised = self.inner.denoise(&input, sigma)?;
        self.kept(&denoised)
    }

    fn denoise_with_uncond(&mut self, x: &Tensor, sigma: f32) -> candle_core::Result<(Tensor, Tensor)> {
        let input = self.network_input(x, sigma)?;
        let (guided, uncond) = self.inner.denoise_with_uncond(&input, sigma)?;
        Ok((self.kept(&guided)?, uncond))
    }
}

fn entries(conditioning: &Conditioning, model: &DiffusionModel) -> candle_core::Result<Vec<ActiveEntry>> {
    conditioning
        .0
        .iter()
        .map(|entry| ActiveEntry::new(entry, &model.schedule, &model.device))
        .collect()
}

/// Encodes a prompt into a one-entry conditioning (CLIPTextEncode).
pub fn encode_prompt(
    clip: &Clip,
    chunks: &[Vec<crate::models::tokenizer::WeightedToken>],
) -> candle_core::Result<Conditioning> {
    let encoded = clip.encoder.encode_weighted(chunks, clip.output_layer)?;
    Ok(Conditioning(vec![CondEntry {
        cross_attention: encoded.hidden,
        pooled: Some(encoded.pooled),
        timestep_range: None,
    }]))
}
