//! A sampler with its options, as ComfyUI's sampler nodes build it (`KSAMPLER(function,
//! extra_options)`): KSampler's samplers by name with their defaults, or one of the custom-sampling
//! sampler nodes' samplers with the options they set. Options that ComfyUI keeps as Python floats
//! are `f64` here and meet the float32 tensors where ComfyUI's do.

use std::fmt;
use std::sync::Arc;

use candle_core::{Result, Tensor};

/// A sampler and its options: what a SAMPLER socket carries.
#[derive(Clone, Debug)]
pub enum Sampler {
    /// One of [`SAMPLER_NAMES`](super::SAMPLER_NAMES) with its default options (KSampler,
    /// KSamplerSelect).
    Named(String),
    /// `euler_ancestral` (SamplerEulerAncestral).
    EulerAncestral(AncestralNoise),
    /// `euler_ancestral_cfg_pp` (SamplerEulerAncestralCFGPP).
    EulerAncestralCfgPp(AncestralNoise),
    /// `dpmpp_2s_ancestral` (SamplerDPMPP_2S_Ancestral).
    DpmppTwoSAncestral(AncestralNoise),
    /// `dpmpp_sde` (SamplerDPMPP_SDE); `r` places the intermediate evaluation within the step.
    DpmppSde { noise: AncestralNoise, r: f64 },
    /// `dpmpp_2m_sde` (SamplerDPMPP_2M_SDE) with its second-order correction.
    DpmppTwoMSde { noise: AncestralNoise, solver: SolverType },
    /// `dpmpp_3m_sde` (SamplerDPMPP_3M_SDE).
    DpmppThreeMSde(AncestralNoise),
    /// `lms` of the given order (SamplerLMS).
    Lms { order: usize },
    /// `dpm_adaptive` (SamplerDPMAdaptative).
    DpmAdaptive(DpmAdaptiveOptions),
    /// `er_sde` (SamplerER_SDE).
    ErSde(ErSdeOptions),
    /// `sa_solver` (SamplerSASolver).
    SaSolver(SaSolverOptions),
    /// `sample_lcm_upscale` (SamplerLCMUpscale): LCM steps that enlarge the latent as they go.
    LcmUpscale(LcmUpscaleOptions),
    /// `sample_euler_pp`, SamplerEulerCFGpp's `alternative` version: Euler steps along
    /// x − 2·D + D_uncond.
    EulerCfgPpAlternative,
}

/// How much noise an ancestral or SDE sampler adds back: `eta` scales the ancestral step (0 makes
/// the sampler deterministic), `s_noise` the noise itself. ComfyUI's defaults are 1 and 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AncestralNoise {
    pub eta: f64,
    pub s_noise: f64,
}

impl Default for AncestralNoise {
    fn default() -> Self {
        AncestralNoise { eta: 1.0, s_noise: 1.0 }
    }
}

/// The second-order correction of DPM-Solver++(2M) SDE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SolverType {
    Midpoint,
    Heun,
}

/// DPM-Solver-12/23 with PID step-size control (`sample_dpm_adaptive`'s arguments).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DpmAdaptiveOptions {
    /// 2 (DPM-Solver-12) or 3 (DPM-Solver-23).
    pub order: usize,
    pub rtol: f64,
    pub atol: f64,
    /// The first step size in t = −ln σ.
    pub h_init: f64,
    pub pcoeff: f64,
    pub icoeff: f64,
    pub dcoeff: f64,
    /// Steps whose proposed size factor falls below this are rejected.
    pub accept_safety: f64,
    pub eta: f64,
    pub s_noise: f64,
}

impl Default for DpmAdaptiveOptions {
    fn default() -> Self {
        DpmAdaptiveOptions {
            order: 3,
            rtol: 0.05,
            atol: 0.0078,
            h_init: 0.05,
            pcoeff: 0.0,
            icoeff: 1.0,
            dcoeff: 0.0,
            accept_safety: 0.81,
            eta: 0.0,
            s_noise: 1.0,
        }
    }
}

/// ER-SDE-Solver's noise scaler of λ = σ/α.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ErSdeNoiseScaler {
    /// ComfyUI's default, λ·(e^{λ^0.3} + 10).
    ErSde,
    /// The reverse-time SDE's λ^exponent (`eta + 1`; 1 is the ODE).
    Power(f64),
}

/// `sample_er_sde`'s options.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ErSdeOptions {
    pub noise_scaler: ErSdeNoiseScaler,
    /// The highest stage used (1 to 3).
    pub max_stage: usize,
    pub s_noise: f64,
}

impl Default for ErSdeOptions {
    fn default() -> Self {
        ErSdeOptions {
            noise_scaler: ErSdeNoiseScaler::ErSde,
            max_stage: 3,
            s_noise: 1.0,
        }
    }
}

/// Where SA-Solver is stochastic: τ = `eta` for σ in [`end_sigma`, `start_sigma`], else 0
/// (`get_tau_interval_func`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TauInterval {
    pub start_sigma: f64,
    pub end_sigma: f64,
    pub eta: f64,
}

impl TauInterval {
    /// τ at `sigma`.
    pub fn tau(&self, sigma: f32) -> f64 {
        let sigma = f64::from(sigma);
        if self.eta <= 0.0 {
            0.0
        } else if self.start_sigma >= sigma && sigma >= self.end_sigma {
            self.eta
        } else {
            0.0
        }
    }
}

/// `sample_sa_solver`'s options.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SaSolverOptions {
    /// `None`: τ = 1 between the model's 20 % and 80 % points.
    pub tau: Option<TauInterval>,
    pub s_noise: f64,
    pub predictor_order: usize,
    pub corrector_order: usize,
    /// Re-evaluates the model on the corrected state (predict–evaluate–correct–evaluate).
    pub use_pece: bool,
    /// The paper's simplified order-2 coefficients where two points are used.
    pub simple_order_2: bool,
}

impl Default for SaSolverOptions {
    fn default() -> Self {
        SaSolverOptions {
            tau: None,
            s_noise: 1.0,
            predictor_order: 3,
            corrector_order: 4,
            use_pece: false,
            simple_order_2: false,
        }
    }
}

/// Resizes a latent [B, C, H, W] to `height × width` (ComfyUI's `common_upscale` with cropping
/// disabled); the resampling itself lives with the image code.
pub trait LatentResize: fmt::Debug + Send + Sync {
    fn resize(&self, latent: &Tensor, width: usize, height: usize) -> Result<Tensor>;
}

/// `sample_lcm_upscale`'s options.
#[derive(Clone, Debug)]
pub struct LcmUpscaleOptions {
    /// The final size over the initial one.
    pub total_upscale: f64,
    /// How many of the first steps enlarge the latent; `None`: ⌊(steps + 1)/2⌋, at least one.
    pub upscale_steps: Option<usize>,
    pub resize: Arc<dyn LatentResize>,
}
