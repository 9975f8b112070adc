//! Model patches, as ComfyUI's `ModelPatcher` keeps them in `model_options`: a MODEL is a base
//! model plus patches, and a node that patches it clones the (cheap) [`ModelPatches`] and adds
//! its own after the others. The base weights are never copied.
//!
//! - the network's hook points ([`UNetPatches`]: block patches, attention patches and
//!   replacements; [`DitPatches`]: FLUX's block replacements), passed to every network call;
//! - the sampler's guidance functions, around classifier-free guidance as ComfyUI's
//!   `sampling_function` and `cfg_function` call them: a [`CondBatchFunction`] may predict both
//!   sides in the sampler's place, [`PreCfgFunction`]s see both sides' predictions, a
//!   [`CfgFunction`] replaces `uncond + (cond − uncond)·scale`, and [`PostCfgFunction`]s change
//!   the guided result. They may call the model again through [`GuidanceArgs::model`], on a side
//!   with more network patches ([`CallPatches`]) or on another conditioning.
//!
//! - wrappers around the network's calls and the sampler's guided predictions
//!   ([`crate::model::wrappers`]), prepared afresh for each sampling run.
//!
//! Weight patches (LoRA, merges) live in the model's [`easel_models::weights::WeightSource`]; the
//! network is built again with them.

use std::sync::Arc;

use candle_core::{Result, Tensor};
use easel_models::architectures::dit_patches::DitPatches;
use easel_models::architectures::unet_patches::{UNetPatch, UNetPatches};

use crate::conditioning::Conditioning;
use crate::model::wrappers::{NetworkWrapper, PredictionWrapper};

/// A side of guidance: ComfyUI's `cond`, DualCFGGuider's middle prompt, `uncond`, and
/// PerpNegGuider's empty prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Positive,
    Middle,
    Negative,
    Empty,
}

/// Network patches for some model calls only, on top of the model's own (PAG's perturbed
/// attention, SkipLayerGuidance's skipped blocks); each network takes those of its kind.
#[derive(Clone, Default)]
pub struct CallPatches {
    pub unet: UNetPatches,
    pub dit: DitPatches,
}

/// The model as guidance functions may call it again.
pub trait GuidanceModel {
    /// One side's prediction (`calc_cond_batch` with that side alone) for a latent at σ, with
    /// `extra` patches on top of the model's.
    fn predict_side(&self, side: Side, x: &Tensor, sigma: f32, extra: &CallPatches) -> Result<Tensor>;

    /// The prediction for a conditioning that is no side of the guider (PerpNeg's empty prompt:
    /// ComfyUI's `encode_model_conds` as a negative prompt, then `calc_cond_batch`). Its entries
    /// apply at every σ, as ComfyUI resolves no timestep range for them.
    fn predict_conditioning(&self, conditioning: &Conditioning, x: &Tensor, sigma: f32) -> Result<Tensor>;
}

/// What the guidance functions see of one step (ComfyUI's `args`).
pub struct GuidanceArgs<'a> {
    /// The noisy latent, `input`.
    pub x: &'a Tensor,
    pub sigma: f32,
    /// The guidance scale, `cond_scale`.
    pub cond_scale: f64,
    /// The side guidance goes towards, and the one it goes away from (`None` where it was not
    /// evaluated: cfg 1).
    pub cond: Side,
    pub uncond: Option<Side>,
    pub model: &'a dyn GuidanceModel,
}

/// Predicts both sides in the sampler's place (`sampler_calc_cond_batch_function`): [cond,
/// uncond], the uncond zeros where `args.uncond` is `None`; or `None` where the sampler should
/// predict them as usual.
pub trait CondBatchFunction: Send + Sync {
    fn predict(&self, args: &GuidanceArgs) -> Result<Option<[Tensor; 2]>>;
}

/// Changes both sides' denoised predictions before guidance (`sampler_pre_cfg_function`):
/// `outputs` are [cond, uncond], the unevaluated side zeros.
pub trait PreCfgFunction: Send + Sync {
    fn apply(&self, args: &GuidanceArgs, outputs: [Tensor; 2]) -> Result<[Tensor; 2]>;
}

/// Computes the guided denoised latent from both sides' (`sampler_cfg_function`, in ComfyUI's
/// terms on the noise `x − denoised`; here on the denoised predictions).
pub trait CfgFunction: Send + Sync {
    fn guide(&self, args: &GuidanceArgs, cond: &Tensor, uncond: &Tensor) -> Result<Tensor>;
}

/// Changes the guided denoised latent (`sampler_post_cfg_function`).
pub trait PostCfgFunction: Send + Sync {
    fn apply(&self, args: &GuidanceArgs, predictions: &GuidedPredictions, denoised: Tensor) -> Result<Tensor>;
}

/// Both sides' denoised predictions as guidance combined them (`cond_denoised`,
/// `uncond_denoised`: zeros when not evaluated).
pub struct GuidedPredictions {
    pub cond: Tensor,
    pub uncond: Tensor,
}

/// A model's patches (ComfyUI's `model_options` and `transformer_options`), cheap to clone.
#[derive(Clone, Default)]
pub struct ModelPatches {
    pub unet: UNetPatches,
    pub dit: DitPatches,
    pub cond_batch: Option<Arc<dyn CondBatchFunction>>,
    pub pre_cfg: Vec<Arc<dyn PreCfgFunction>>,
    pub cfg: Option<Arc<dyn CfgFunction>>,
    pub post_cfg: Vec<Arc<dyn PostCfgFunction>>,
    /// Evaluate the negative side even at cfg 1 (`disable_cfg1_optimization`).
    pub disable_cfg1_optimization: bool,
    /// Around every network call, the first outermost (`WrappersMP.DIFFUSION_MODEL`).
    pub network_wrappers: Vec<Arc<dyn NetworkWrapper>>,
    /// Around each guided prediction, the first outermost (`WrappersMP.PREDICT_NOISE`).
    pub prediction_wrappers: Vec<Arc<dyn PredictionWrapper>>,
}

impl ModelPatches {
    /// Whether guidance is plain CFG: no function predicting the sides, before, instead of or
    /// after it.
    pub fn guides_plainly(&self) -> bool {
        self.cond_batch.is_none() && self.pre_cfg.is_empty() && self.cfg.is_none() && self.post_cfg.is_empty()
    }

    /// The pre-CFG functions in order on [cond, uncond] (`sampling_function`).
    pub fn apply_pre_cfg(&self, args: &GuidanceArgs, outputs: [Tensor; 2]) -> Result<[Tensor; 2]> {
        self.pre_cfg
            .iter()
            .try_fold(outputs, |outputs, function| function.apply(args, outputs))
    }

    /// ComfyUI's `cfg_function`: `uncond + (cond − uncond)·scale` (or the CFG function), then
    /// the post-CFG functions in order. `uncond` is `None` where that side was not evaluated
    /// (zeros stand for it).
    pub fn cfg_function(&self, args: &GuidanceArgs, cond: Tensor, uncond: Option<Tensor>) -> Result<Tensor> {
        let uncond = match uncond {
            Some(uncond) => uncond,
            None => cond.zeros_like()?,
        };
        let guided = match &self.cfg {
            Some(function) => function.guide(args, &cond, &uncond)?,
            None => (&uncond + ((&cond - &uncond)? * args.cond_scale)?)?,
        };
        if self.post_cfg.is_empty() {
            return Ok(guided);
        }
        self.apply_post_cfg(args, &GuidedPredictions { cond, uncond }, guided)
    }

    /// The post-CFG functions in order on the guided prediction.
    pub fn apply_post_cfg(
        &self,
        args: &GuidanceArgs,
        predictions: &GuidedPredictions,
        guided: Tensor,
    ) -> Result<Tensor> {
        self.post_cfg
            .iter()
            .try_fold(guided, |guided, function| function.apply(args, predictions, guided))
    }

    /// With a UNet patch added after the others.
    pub fn with_unet_patch(&self, patch: Arc<dyn UNetPatch>) -> ModelPatches {
        let mut patched = self.clone();
        patched.unet.add(patch);
        patched
    }

    /// With `function` predicting both sides (replacing any other).
    pub fn with_cond_batch(&self, function: Arc<dyn CondBatchFunction>) -> ModelPatches {
        let mut patched = self.clone();
        patched.cond_batch = Some(function);
        patched
    }

    /// With a pre-CFG function added after the others.
    pub fn with_pre_cfg(&self, function: Arc<dyn PreCfgFunction>) -> ModelPatches {
        let mut patched = self.clone();
        patched.pre_cfg.push(function);
        patched
    }

    /// With `function` as the CFG function (replacing any other).
    pub fn with_cfg(&self, function: Arc<dyn CfgFunction>) -> ModelPatches {
        let mut patched = self.clone();
        patched.cfg = Some(function);
        patched
    }

    /// With a post-CFG function added after the others.
    pub fn with_post_cfg(&self, function: Arc<dyn PostCfgFunction>) -> ModelPatches {
        let mut patched = self.clone();
        patched.post_cfg.push(function);
        patched
    }

    /// With a network wrapper added inside the others.
    pub fn with_network_wrapper(&self, wrapper: Arc<dyn NetworkWrapper>) -> ModelPatches {
        let mut patched = self.clone();
        patched.network_wrappers.push(wrapper);
        patched
    }

    /// With a prediction wrapper added inside the others.
    pub fn with_prediction_wrapper(&self, wrapper: Arc<dyn PredictionWrapper>) -> ModelPatches {
        let mut patched = self.clone();
        patched.prediction_wrappers.push(wrapper);
        patched
    }
}
