//! The sampling category: ComfyUI's KSampler pipeline and its custom-sampling nodes.
//!
//! - [`ksampler`]: KSampler and KSamplerAdvanced (`common_ksampler`), and the progress reporting
//!   every sampling node shares;
//! - [`custom`]: SamplerCustom(Advanced), the noise, guider, sampler, scheduler and σ nodes of
//!   `sampling/custom_sampling`;
//! - [`run`]: one sampling run: noise, σ schedule, the guider, the sampler, latent scaling;
//! - [`guider`]: classifier-free guidance over the active conditioning entries;
//! - [`inpainting`]: the denoise-mask and DifferentialDiffusion wrappers around the guider;
//! - [`preview`]: live previews of the estimate (latent2rgb).
//!
//! The samplers, schedules and noise themselves are in `easel_models::sampling`.

pub mod custom;
pub mod guider;
pub mod inpainting;
pub mod ksampler;
pub mod preview;
pub mod run;

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
    registry.register(custom::KSamplerSelect);
    registry.register(custom::BasicScheduler);
    registry.register(custom::KarrasScheduler);
    registry.register(custom::ExponentialScheduler);
    registry.register(custom::BetaSamplingScheduler);
    registry.register(custom::SdTurboScheduler);
    registry.register(custom::SplitSigmas);
    registry.register(custom::SplitSigmasDenoise);
    registry.register(custom::FlipSigmas);
}
