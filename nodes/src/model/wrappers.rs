//! Wrappers around model calls, as ComfyUI's `patcher_extension` wrappers are: a
//! [`NetworkWrapper`] goes around every call of the diffusion network (`WrappersMP.DIFFUSION_MODEL`,
//! also what `model_function_wrapper` did), a [`PredictionWrapper`] around each guided prediction
//! the sampler asks for (`WrappersMP.PREDICT_NOISE`). A wrapper gets the call's input and a
//! callable for the call it wraps; it may change the input, call it, change its result, or not
//! call it at all (the step caches reuse an earlier change instead).
//!
//! A MODEL value is cached by the engine and may feed several samplers, so state a wrapper keeps
//! over a sampling run lives in a copy made for that run ([`ModelPatches::for_sampling_run`], the
//! part of ComfyUI's `OUTER_SAMPLE` wrapper that clones its holder); the run drops it at its end.
//! Wrappers run in the order they were added, the first outermost.

use std::sync::Arc;

use candle_core::{Result, Tensor};
use easel_models::architectures::unet_patches::BatchPart;
use easel_models::sampling::samplers::Denoiser;
use easel_models::sampling::schedule::SigmaSchedule;

use crate::model::patches::ModelPatches;

/// The sampling run a wrapper is prepared for.
pub struct SamplingRun<'a> {
    /// The model's σ schedule (`percent_to_sigma`).
    pub schedule: &'a SigmaSchedule,
    /// The run's σ, from the first to the last (steps: one fewer).
    pub sigmas: &'a [f32],
}

/// One call of the diffusion network as a wrapper sees it.
#[derive(Clone, Copy)]
pub struct NetworkCall<'a> {
    /// The network's input: the noisy latent scaled for it (`calculate_input`), [B, C, H, W],
    /// without an inpainting model's extra channels (the network adds them).
    pub input: &'a Tensor,
    /// σ of the step (`transformer_options["sigmas"]`) and the network's timestep for it.
    pub sigma: f32,
    pub timestep: f32,
    /// The batch in equal chunks, what each is (`cond_or_uncond`). A side's entries are called
    /// in the same order at every model evaluation.
    pub parts: &'a [BatchPart],
}

/// The wrapped network call: the network's raw output (noise, velocity, …) for an input.
pub type WrappedNetwork<'a> = dyn Fn(&Tensor) -> Result<Tensor> + 'a;

/// A wrapper around the diffusion network's calls (`WrappersMP.DIFFUSION_MODEL`).
pub trait NetworkWrapper: Send + Sync {
    /// The wrapper to use for one sampling run, with fresh state; `None` (the default): this
    /// wrapper keeps no state over a run and serves every run itself.
    fn for_sampling_run(&self, _run: &SamplingRun) -> Option<Arc<dyn NetworkWrapper>> {
        None
    }

    /// A model evaluation begins: the calls for every side at one σ follow
    /// (`WrappersMP.CALC_COND_BATCH`).
    fn start_model_evaluation(&self) {}

    /// The network's output for `call`; `network` runs the wrapped call on an input.
    fn wrap(&self, call: &NetworkCall, network: &WrappedNetwork) -> Result<Tensor>;
}

/// A guided prediction: the denoised latent the sampler steps with, and the negative side's
/// own prediction where the sampler asked for it (the CFG++ samplers).
pub struct GuidedPrediction {
    pub denoised: Tensor,
    pub uncond: Option<Tensor>,
}

/// The wrapped prediction: the guided prediction for a noisy latent.
pub type WrappedPrediction<'a> = dyn FnMut(&Tensor) -> Result<GuidedPrediction> + 'a;

/// A wrapper around the guided prediction of each sampler step (`WrappersMP.PREDICT_NOISE`).
pub trait PredictionWrapper: Send + Sync {
    /// As [`NetworkWrapper::for_sampling_run`].
    fn for_sampling_run(&self, _run: &SamplingRun) -> Option<Arc<dyn PredictionWrapper>> {
        None
    }

    /// The guided prediction for the noisy latent `x` at σ; `predict` runs the wrapped one.
    fn wrap(&self, x: &Tensor, sigma: f32, predict: &mut WrappedPrediction) -> Result<GuidedPrediction>;
}

impl ModelPatches {
    /// The patches for one sampling run: each wrapper replaced by its copy for the run.
    pub fn for_sampling_run(&self, run: &SamplingRun) -> ModelPatches {
        let mut patches = self.clone();
        for wrapper in &mut patches.network_wrappers {
            if let Some(for_run) = wrapper.for_sampling_run(run) {
                *wrapper = for_run;
            }
        }
        for wrapper in &mut patches.prediction_wrappers {
            if let Some(for_run) = wrapper.for_sampling_run(run) {
                *wrapper = for_run;
            }
        }
        patches
    }

    /// Tells the network wrappers a model evaluation begins.
    pub fn start_model_evaluation(&self) {
        for wrapper in &self.network_wrappers {
            wrapper.start_model_evaluation();
        }
    }

    /// `network` on `call.input` through the network wrappers.
    pub fn call_network(&self, call: &NetworkCall, network: &WrappedNetwork) -> Result<Tensor> {
        call_through(&self.network_wrappers, call, network)
    }

    /// `predict` on `x` through the prediction wrappers.
    pub fn wrap_prediction(&self, x: &Tensor, sigma: f32, predict: &mut WrappedPrediction) -> Result<GuidedPrediction> {
        predict_through(&self.prediction_wrappers, x, sigma, predict)
    }
}

fn call_through(wrappers: &[Arc<dyn NetworkWrapper>], call: &NetworkCall, network: &WrappedNetwork) -> Result<Tensor> {
    match wrappers.split_first() {
        None => network(call.input),
        Some((outer, inner)) => outer.wrap(call, &|input: &Tensor| {
            call_through(inner, &NetworkCall { input, ..*call }, network)
        }),
    }
}

fn predict_through(
    wrappers: &[Arc<dyn PredictionWrapper>],
    x: &Tensor,
    sigma: f32,
    predict: &mut WrappedPrediction,
) -> Result<GuidedPrediction> {
    match wrappers.split_first() {
        None => predict(x),
        Some((outer, inner)) => outer.wrap(x, sigma, &mut |x: &Tensor| predict_through(inner, x, sigma, predict)),
    }
}

/// The sampler's denoiser with the run's prediction wrappers around the guided one, which
/// announces each model evaluation to the network wrappers.
pub(crate) struct WrappedDenoiser<'a> {
    pub(crate) inner: &'a mut dyn Denoiser,
    pub(crate) patches: &'a ModelPatches,
}

impl Denoiser for WrappedDenoiser<'_> {
    fn denoise(&mut self, x: &Tensor, sigma: f32) -> Result<Tensor> {
        let (inner, patches) = (&mut *self.inner, self.patches);
        let mut predict = |x: &Tensor| {
            patches.start_model_evaluation();
            Ok(GuidedPrediction {
                denoised: inner.denoise(x, sigma)?,
                uncond: None,
            })
        };
        Ok(patches.wrap_prediction(x, sigma, &mut predict)?.denoised)
    }

    fn denoise_with_uncond(&mut self, x: &Tensor, sigma: f32) -> Result<(Tensor, Tensor)> {
        let (inner, patches) = (&mut *self.inner, self.patches);
        let mut predict = |x: &Tensor| {
            patches.start_model_evaluation();
            let (denoised, uncond) = inner.denoise_with_uncond(x, sigma)?;
            Ok(GuidedPrediction {
                denoised,
                uncond: Some(uncond),
            })
        };
        let prediction = patches.wrap_prediction(x, sigma, &mut predict)?;
        let uncond = prediction.uncond.ok_or_else(|| {
            candle_core::Error::Msg("a prediction wrapper gave no negative-side prediction to a CFG++ sampler".into())
        })?;
        Ok((prediction.denoised, uncond))
    }
}
