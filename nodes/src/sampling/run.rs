//! One sampling run, as ComfyUI's `common_ksampler` and `SamplerCustomAdvanced` make it: the
//! latent scaled into model space, noise, the σ schedule, the guider (with inpainting or
//! DifferentialDiffusion wrapped around it), the sampler, and the latent scaled back.

use candle_core::{DType, Tensor};
use easel_models::memory::{ensure_available, OutOfMemory};
use easel_models::sampling::noise::{prepare_noise_and_generator, CpuGenerator};
use easel_models::sampling::samplers::{self, Denoiser, RunSeed, Sampler, SamplerError, Step};
use easel_models::sampling::schedule::{ksampler_sigmas, Scheduler};

use crate::conditioning::{Conditioning, ConditioningError};
use crate::hooks::patching::HookedModels;
use crate::latent::Latent;
use crate::model::diffusion_model::{DiffusionModel, LatentInputs};
use crate::model::wrappers::{SamplingRun, WrappedDenoiser};
use crate::sampling::guider::{add_same_areas, entries, give_controls_and_boxes, DualSide, Guider};
use crate::sampling::inpainting::{DifferentialDiffusion, Inpainting};
use crate::sampling::perp_neg::{PerpNegGuidance, PerpNegSide};

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
    let sampler = Sampler::Named(request.sampler.to_string());
    let run = GuidedSampling {
        model: request.model,
        positive: request.positive,
        negative: request.negative,
        cfg: request.cfg,
        dual: None,
        perp_neg: None,
        sampler: &sampler,
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
    /// PerpNegGuider's empty prompt (then `cfg` is its scale).
    pub perp_neg: Option<&'a PerpNegGuidance>,
    pub sampler: &'a Sampler,
    pub sigmas: &'a [f32],
    pub latent: &'a Latent,
    /// Seeds the initial noise (where `add_noise`) and the samplers' step noise. Without initial
    /// noise, torch's global generator (which ComfyUI then leaves as it was) is seeded with it.
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
    let (noise, global_generator) = if run.add_noise {
        let (values, generator) = prepare_noise_and_generator(run.seed, &shape, run.latent.batch_index.as_deref());
        (Tensor::from_vec(values, shape.as_slice(), device)?, generator)
    } else {
        (latent.zeros_like()?, CpuGenerator::new(run.seed))
    };
    let sigmas = run.sigmas;
    // The model with its wrappers' state for this run alone (ComfyUI's OUTER_SAMPLE wrappers).
    let run_model = DiffusionModel {
        patches: model.patches.for_sampling_run(&SamplingRun {
            schedule: &model.schedule,
            sigmas,
        }),
        ..model.clone()
    };

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
        seed: run.seed,
    };
    // The sides in ComfyUI's order (positive, middle, negative); each gets entries for the
    // areas the others have (`process_conds`).
    let mut sides = vec![entries(run.positive, model, false, &latent_inputs)?];
    if let Some(dual) = run.dual {
        sides.push(entries(&dual.middle, model, true, &latent_inputs)?);
    }
    if let Some(perp_neg) = run.perp_neg {
        sides.push(entries(&perp_neg.empty, model, true, &latent_inputs)?);
    }
    sides.push(entries(run.negative, model, true, &latent_inputs)?);
    for from in 0..sides.len() {
        // Only the other sides grow while `from`'s areas are paired, so one copy serves them all.
        let areas = sides[from].clone();
        for to in (0..sides.len()).filter(|to| *to != from) {
            add_same_areas(&areas, &mut sides[to]);
        }
    }
    if let Some((positive, others)) = sides.split_first_mut() {
        for other in others {
            give_controls_and_boxes(positive, other);
        }
    }
    let negative = sides.pop().unwrap_or_default();
    let empty = run.perp_neg.map(|_| sides.pop().unwrap_or_default());
    let middle = run.dual.map(|_| sides.pop().unwrap_or_default());
    let positive = sides.pop().unwrap_or_default();
    let mut guider = Guider {
        model: &run_model,
        positive,
        negative,
        cfg: run.cfg,
        dual: run.dual.zip(middle).map(|(dual, middle)| DualSide {
            middle,
            cfg_conds: dual.cfg_conds,
            nested: dual.nested,
        }),
        perp_neg: run.perp_neg.zip(empty).map(|(perp_neg, empty)| PerpNegSide {
            empty,
            neg_scale: perp_neg.neg_scale,
        }),
        latent: latent_in.clone(),
        denoise_mask: denoise_mask.clone(),
        seed: run.seed,
        hooked: HookedModels::new(sigmas),
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
    let mut wrapped = WrappedDenoiser {
        inner: &mut guider,
        patches: &run_model.patches,
    };
    let mut inpainting;
    let denoiser: &mut dyn Denoiser = match denoise_mask {
        Some(mask) => {
            inpainting = Inpainting {
                keep: (1.0 - &mask)?,
                mask,
                inner: &mut wrapped,
                latent: latent_in,
                noise,
                prediction: model.prediction,
                differential: model
                    .differential_diffusion
                    .map(|strength| DifferentialDiffusion::new(strength, &model.schedule, sigmas)),
            };
            &mut inpainting
        }
        None => &mut wrapped,
    };
    let seed = RunSeed {
        seed: run.seed,
        global_generator,
    };
    let sampled = samplers::run_sampler(run.sampler, denoiser, x, sigmas, &model.schedule, seed, &mut callback)?;
    let last = sigmas.last().copied().unwrap_or(0.0);
    let sampled = model.prediction.inverse_noise_scaling(last, sampled)?;
    Ok(Sampled {
        samples: model.latent_format.process_out(&sampled)?,
        denoised: last_denoised
            .map(|denoised| model.latent_format.process_out(&denoised))
            .transpose()?,
    })
}
