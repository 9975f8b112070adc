//! The sampling category: ComfyUI's KSampler pipeline and its custom-sampling nodes.
//!
//! - [`ksampler`]: KSampler and KSamplerAdvanced (`common_ksampler`), and the progress reporting
//!   every sampling node shares;
//! - [`custom`]: SamplerCustom(Advanced), the noise, guider, sampler, scheduler and σ nodes of
//!   `sampling/custom_sampling`;
//! - [`custom_samplers`]: the sampler nodes that set a sampler's options (SamplerEulerAncestral,
//!   SamplerDPMAdaptative, SamplerSASolver, SamplerLCMUpscale, …);
//! - [`schedulers`]: more scheduler and σ nodes (Align Your Steps, GITS, OptimalSteps, Laplace,
//!   VP, polyexponential, ExtendIntermediateSigmas, …), with their tables in [`noise_levels`];
//! - [`run`]: one sampling run: noise, σ schedule, the guider, the sampler, latent scaling;
//! - [`guider`]: classifier-free guidance over the active conditioning entries;
//! - [`perp_neg`]: Perp-Neg guidance (the PerpNeg model patch and PerpNegGuider);
//! - [`inpainting`]: the denoise-mask and DifferentialDiffusion wrappers around the guider;
//! - [`preview`]: live previews of the estimate (latent2rgb).
//!
//! The samplers, schedules and noise themselves are in `easel_models::sampling`.

pub mod custom;
pub mod custom_samplers;
pub mod guider;
pub mod inpainting;
pub mod ksampler;
pub mod noise_levels;
pub mod perp_neg;
pub mod preview;
pub mod run;
pub mod schedulers;

use easel_engine::NodeRegistry;

/// Adds the sampling nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    registry.register(ksampler::KSampler);
    registry.register(ksampler::KSamplerAdvanced);
    registry.register(custom::SamplerCustom);
    registry.register(custom::SamplerCustomAdvanced);
    registry.register(custom::RandomNoise);
    registry.register(custom::DisableNoise);
    registry.register(custom::BasicGuider);
    registry.register(custom::CfgGuider);
    registry.register(custom::DualCfgGuider);
    registry.register(perp_neg::PerpNegNode);
    registry.register(perp_neg::PerpNegGuiderNode);
    registry.register(custom::KSamplerSelect);
    registry.register(custom::BasicScheduler);
    registry.register(custom::KarrasScheduler);
    registry.register(custom::ExponentialScheduler);
    registry.register(custom::BetaSamplingScheduler);
    registry.register(custom::SdTurboScheduler);
    registry.register(custom::SplitSigmas);
    registry.register(custom::SplitSigmasDenoise);
    registry.register(custom::FlipSigmas);
    registry.register(custom::AddNoise);
    registry.register(custom_samplers::SamplerEulerAncestral);
    registry.register(custom_samplers::SamplerEulerAncestralCfgPp);
    registry.register(custom_samplers::SamplerLms);
    registry.register(custom_samplers::SamplerDpmpp3mSde);
    registry.register(custom_samplers::SamplerDpmpp2mSde);
    registry.register(custom_samplers::SamplerDpmppSde);
    registry.register(custom_samplers::SamplerDpmpp2sAncestral);
    registry.register(custom_samplers::SamplerDpmAdaptative);
    registry.register(custom_samplers::SamplerErSde);
    registry.register(custom_samplers::SamplerSaSolver);
    registry.register(custom_samplers::SamplerLcmUpscale);
    registry.register(custom_samplers::SamplerEulerCfgPp);
    registry.register(schedulers::PolyexponentialScheduler);
    registry.register(schedulers::LaplaceScheduler);
    registry.register(schedulers::VpScheduler);
    registry.register(schedulers::AlignYourStepsScheduler);
    registry.register(schedulers::GitsScheduler);
    registry.register(schedulers::OptimalStepsScheduler);
    registry.register(schedulers::SetFirstSigma);
    registry.register(schedulers::ExtendIntermediateSigmas);
    registry.register(schedulers::SamplingPercentToSigma);
}
