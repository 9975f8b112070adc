//! The samplers of ComfyUI's KSampler (k-diffusion's update rules as ComfyUI 0.3.64 runs them).
//! Each works in σ-space on a denoiser D(x, σ) that returns the predicted clean latent; the
//! arithmetic follows ComfyUI's float32 tensor expressions step for step.
//!
//! The families live in their own files: `euler` (Euler/Heun/DPM-2 and friends), `dpm_solver`
//! (DPM-Solver and DPM-Solver++ incl. the SDE variants), `exponential` (res_multistep, SEEDS,
//! ER-SDE), `multistep` (LMS, iPNDM, DEIS), `cfg_pp` (the CFG++ variants), `uni_pc`, `sa_solver`;
//! `options` holds what the custom-sampling sampler nodes set on them.

mod cfg_pp;
mod dpm_solver;
mod euler;
mod exponential;
mod multistep;
mod options;
mod sa_solver;
mod uni_pc;

pub use options::{
    AncestralNoise, DpmAdaptiveOptions, ErSdeNoiseScaler, ErSdeOptions, LatentResize, LcmUpscaleOptions,
    SaSolverOptions, Sampler, SolverType, TauInterval,
};

use candle_core::{Result, Tensor};

use super::brownian::BrownianNoise;
use super::noise::{set_global_generator, CpuGenerator};
use super::schedule::SigmaSchedule;

/// The sampler names of `KSampler.SAMPLERS`, in ComfyUI's order (the first is the default).
pub const SAMPLER_NAMES: [&str; 42] = [
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun",
    "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
    "er_sde",
    "seeds_2",
    "seeds_3",
    "sa_solver",
    "sa_solver_pece",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
];

/// Samplers for which KSampler schedules one step more and drops the penultimate σ.
pub fn discards_penultimate_sigma(name: &str) -> bool {
    matches!(name, "dpm_2" | "dpm_2_ancestral" | "uni_pc" | "uni_pc_bh2")
}

/// The denoiser a sampler drives: D(x, σ), the predicted clean latent for the whole batch at σ.
pub trait Denoiser {
    fn denoise(&mut self, x: &Tensor, sigma: f32) -> Result<Tensor>;

    /// The guided prediction and the negative side's own prediction, for the CFG++ samplers
    /// (ComfyUI's post-CFG hook with the cfg = 1 shortcut disabled).
    fn denoise_with_uncond(&mut self, x: &Tensor, sigma: f32) -> Result<(Tensor, Tensor)>;
}

/// What a sampler reports after each step's first model call (ComfyUI's callback).
pub struct Step<'a> {
    pub index: usize,
    pub total: usize,
    pub x: &'a Tensor,
    pub denoised: &'a Tensor,
}

/// Why sampling could not run.
#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    #[error("unknown sampler '{0}'")]
    Unknown(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// The random state a sampling run starts from, as ComfyUI's is.
pub struct RunSeed {
    /// `extra_args["seed"]`: seeds the step noise of ancestral samplers and the Brownian tree of
    /// SDE samplers.
    pub seed: u64,
    /// torch's global CPU generator as sampling finds it (after the initial noise was drawn from
    /// it): [`run_sampler`] makes it this thread's global generator
    /// ([`super::noise::set_global_generator`]), which samplers calling `torch.randn_like` (LCM
    /// upscale) and model patches calling `torch.randint` (HyperTile, ToMe) draw from.
    pub global_generator: CpuGenerator,
}

impl RunSeed {
    /// `seed`, with the global generator freshly seeded with it.
    pub fn new(seed: u64) -> Self {
        RunSeed {
            seed,
            global_generator: CpuGenerator::new(seed),
        }
    }
}

/// Runs sampler `name` with its default options; see [`run_sampler`].
pub fn sample(
    name: &str,
    denoiser: &mut dyn Denoiser,
    x: Tensor,
    sigmas: &[f32],
    schedule: &SigmaSchedule,
    seed: u64,
    callback: &mut dyn FnMut(Step) -> Result<()>,
) -> std::result::Result<Tensor, SamplerError> {
    let sampler = Sampler::Named(name.to_string());
    run_sampler(&sampler, denoiser, x, sigmas, schedule, RunSeed::new(seed), callback)
}

/// Runs `sampler` from `x` (already noised to `sigmas[0]`) along `sigmas` for a model with σ
/// table `schedule`. `seed` feeds the per-step noise of ancestral and SDE samplers; `callback`
/// runs once per step and may abort sampling by returning an error.
pub fn run_sampler(
    sampler: &Sampler,
    denoiser: &mut dyn Denoiser,
    x: Tensor,
    sigmas: &[f32],
    schedule: &SigmaSchedule,
    seed: RunSeed,
    callback: &mut dyn FnMut(Step) -> Result<()>,
) -> std::result::Result<Tensor, SamplerError> {
    set_global_generator(seed.global_generator);
    let mut run = Run {
        denoiser,
        sigmas: sigmas.to_vec(),
        schedule,
        seed: seed.seed,
        callback,
    };
    let run = &mut run;
    let result = match sampler {
        Sampler::Named(name) => run_named(run, name, x)?,
        Sampler::EulerAncestral(noise) => euler::euler_ancestral(run, x, *noise),
        Sampler::EulerAncestralCfgPp(noise) => cfg_pp::euler_ancestral_cfg_pp(run, x, *noise),
        Sampler::DpmppTwoSAncestral(noise) => dpm_solver::dpmpp_2s_ancestral(run, x, *noise),
        Sampler::DpmppSde { noise, r } => dpm_solver::dpmpp_sde(run, x, *noise, *r),
        Sampler::DpmppTwoMSde { noise, solver } => dpm_solver::dpmpp_2m_sde(run, x, *noise, *solver),
        Sampler::DpmppThreeMSde(noise) => dpm_solver::dpmpp_3m_sde(run, x, *noise),
        Sampler::Lms { order } => multistep::lms(run, x, *order),
        Sampler::DpmAdaptive(options) => dpm_solver::dpm_adaptive(run, x, options),
        Sampler::ErSde(options) => exponential::er_sde(run, x, options),
        Sampler::SaSolver(options) => sa_solver::sa_solver(run, x, options),
        Sampler::LcmUpscale(options) => euler::lcm_upscale(run, x, options),
        Sampler::EulerCfgPpAlternative => cfg_pp::euler_cfg_pp_alternative(run, x),
    };
    Ok(result?)
}

/// Runs one of KSampler's samplers with its default options.
fn run_named(run: &mut Run, name: &str, x: Tensor) -> std::result::Result<Result<Tensor>, SamplerError> {
    let ancestral = AncestralNoise::default();
    Ok(match name {
        "euler" | "ddim" => euler::euler(run, x),
        "euler_ancestral" => euler::euler_ancestral(run, x, ancestral),
        "heun" => euler::heun(run, x),
        "heunpp2" => euler::heunpp2(run, x),
        "dpm_2" => euler::dpm_2(run, x),
        "dpm_2_ancestral" => euler::dpm_2_ancestral(run, x),
        "gradient_estimation" => euler::gradient_estimation(run, x, false),
        "gradient_estimation_cfg_pp" => euler::gradient_estimation(run, x, true),
        "lcm" => euler::lcm(run, x),
        "ddpm" => euler::ddpm(run, x),
        "lms" => multistep::lms(run, x, 4),
        "ipndm" => multistep::ipndm(run, x),
        "ipndm_v" => multistep::ipndm_v(run, x),
        "deis" => multistep::deis(run, x),
        "dpm_fast" => dpm_solver::dpm_fast(run, x),
        "dpm_adaptive" => dpm_solver::dpm_adaptive(run, x, &DpmAdaptiveOptions::default()),
        "dpmpp_2s_ancestral" => dpm_solver::dpmpp_2s_ancestral(run, x, ancestral),
        "dpmpp_2m" => dpm_solver::dpmpp_2m(run, x),
        "dpmpp_sde" | "dpmpp_sde_gpu" => dpm_solver::dpmpp_sde(run, x, ancestral, 0.5),
        "dpmpp_2m_sde" | "dpmpp_2m_sde_gpu" => dpm_solver::dpmpp_2m_sde(run, x, ancestral, SolverType::Midpoint),
        "dpmpp_2m_sde_heun" | "dpmpp_2m_sde_heun_gpu" => dpm_solver::dpmpp_2m_sde(run, x, ancestral, SolverType::Heun),
        "dpmpp_3m_sde" | "dpmpp_3m_sde_gpu" => dpm_solver::dpmpp_3m_sde(run, x, ancestral),
        "euler_cfg_pp" => cfg_pp::euler_ancestral_cfg_pp(run, x, AncestralNoise { eta: 0.0, s_noise: 0.0 }),
        "euler_ancestral_cfg_pp" => cfg_pp::euler_ancestral_cfg_pp(run, x, ancestral),
        "dpmpp_2s_ancestral_cfg_pp" => cfg_pp::dpmpp_2s_ancestral_cfg_pp(run, x),
        "dpmpp_2m_cfg_pp" => cfg_pp::dpmpp_2m_cfg_pp(run, x),
        "res_multistep" => exponential::res_multistep(run, x, 0.0, false),
        "res_multistep_cfg_pp" => exponential::res_multistep(run, x, 0.0, true),
        "res_multistep_ancestral" => exponential::res_multistep(run, x, 1.0, false),
        "res_multistep_ancestral_cfg_pp" => exponential::res_multistep(run, x, 1.0, true),
        "er_sde" => exponential::er_sde(run, x, &ErSdeOptions::default()),
        "seeds_2" => exponential::seeds_2(run, x),
        "seeds_3" => exponential::seeds_3(run, x),
        "sa_solver" => sa_solver::sa_solver(run, x, &SaSolverOptions::default()),
        "sa_solver_pece" => sa_solver::sa_solver(
            run,
            x,
            &SaSolverOptions {
                use_pece: true,
                ..SaSolverOptions::default()
            },
        ),
        "uni_pc" => uni_pc::uni_pc(run, x, uni_pc::Variant::Bh1),
        "uni_pc_bh2" => uni_pc::uni_pc(run, x, uni_pc::Variant::Bh2),
        other => return Err(SamplerError::Unknown(other.to_string())),
    })
}

/// One sampling run: the denoiser, the σ sequence and what the update rules need of the model.
struct Run<'a> {
    denoiser: &'a mut dyn Denoiser,
    sigmas: Vec<f32>,
    schedule: &'a SigmaSchedule,
    seed: u64,
    callback: &'a mut dyn FnMut(Step) -> Result<()>,
}

impl Run<'_> {
    fn steps(&self) -> usize {
        self.sigmas.len().saturating_sub(1)
    }

    fn denoise(&mut self, x: &Tensor, sigma: f32) -> Result<Tensor> {
        self.denoiser.denoise(x, sigma)
    }

    fn report(&mut self, index: usize, x: &Tensor, denoised: &Tensor) -> Result<()> {
        let total = self.steps();
        (self.callback)(Step {
            index,
            total,
            x,
            denoised,
        })
    }

    /// Flow models (SD3, FLUX) use the CONST parameterization: x = (1 − σ)·x₀ + σ·ε.
    fn is_flow(&self) -> bool {
        self.schedule.is_flow()
    }

    /// `sigma_to_half_log_snr`: λ = ln(α/σ), i.e. −ln σ, or ln((1 − σ)/σ) for flow models.
    fn half_log_snr(&self, sigma: f32) -> f32 {
        if self.is_flow() {
            -(sigma / (1.0 - sigma)).ln()
        } else {
            -sigma.ln()
        }
    }

    /// `half_log_snr_to_sigma`, the inverse of [`Run::half_log_snr`].
    fn sigma_from_half_log_snr(&self, lambda: f32) -> f32 {
        if self.is_flow() {
            1.0 / (1.0 + lambda.exp())
        } else {
            (-lambda).exp()
        }
    }

    /// `offset_first_sigma_for_snr`: a flow model's σ = 1 has no finite λ, so it starts just below.
    fn offset_first_sigma_for_snr(&mut self) {
        if self.sigmas.len() > 1 && self.is_flow() && self.sigmas[0] >= 1.0 {
            self.sigmas[0] = self.schedule.percent_to_sigma(1e-4) as f32;
        }
    }

    /// `noise_scaling(σ, noise, x)` without max-denoise: `x + σ·n`, or `σ·n + (1 − σ)·x` for flow.
    fn noise_scaling(&self, sigma: f32, noise: &Tensor, x: &Tensor) -> Result<Tensor> {
        if self.is_flow() {
            (noise * f64::from(sigma))? + (x * f64::from(1.0 - sigma))?
        } else {
            (noise * f64::from(sigma))? + x
        }
    }

    /// ComfyUI's `default_noise_sampler`: CPU `randn` draws seeded with the sampling seed.
    fn step_noise(&self, x: &Tensor) -> StepNoise {
        StepNoise {
            generator: CpuGenerator::new(self.seed),
            template: x.clone(),
        }
    }

    /// ComfyUI's `BrownianTreeNoiseSampler` over the σ range of this run (before any offset).
    fn brownian_noise(&self, x: &Tensor) -> TreeNoise {
        let positive = self.sigmas.iter().copied().filter(|s| *s > 0.0);
        let sigma_min = positive.fold(f32::INFINITY, f32::min);
        let sigma_max = self.sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        TreeNoise {
            tree: BrownianNoise::new(sigma_min, sigma_max, x.elem_count(), self.seed),
            template: x.clone(),
        }
    }
}

/// Where per-step noise comes from: n(σ, σ_next), standard normal with x's shape.
trait NoiseSource {
    fn next(&mut self, sigma: f32, sigma_next: f32) -> Result<Tensor>;
}

/// Per-step noise for ancestral samplers: `torch.randn(x.shape)` from a CPU generator seeded
/// with the sampling seed, drawn in sequence.
struct StepNoise {
    generator: CpuGenerator,
    template: Tensor,
}

impl NoiseSource for StepNoise {
    fn next(&mut self, _sigma: f32, _sigma_next: f32) -> Result<Tensor> {
        let values = self.generator.randn(self.template.elem_count());
        Tensor::from_vec(values, self.template.shape(), self.template.device())?.to_dtype(self.template.dtype())
    }
}

/// Brownian-tree noise: the same increments whatever the step sizes (SDE samplers).
struct TreeNoise {
    tree: BrownianNoise,
    template: Tensor,
}

impl NoiseSource for TreeNoise {
    fn next(&mut self, sigma: f32, sigma_next: f32) -> Result<Tensor> {
        let values = self.tree.sample(sigma, sigma_next);
        Tensor::from_vec(values, self.template.shape(), self.template.device())?.to_dtype(self.template.dtype())
    }
}

/// `n(σ, σ_next)·s_noise·amount`, multiplied in ComfyUI's order.
fn scaled_noise(noise: &mut dyn NoiseSource, sigma: f32, sigma_next: f32, s_noise: f32, amount: f32) -> Result<Tensor> {
    (noise.next(sigma, sigma_next)? * f64::from(s_noise))? * f64::from(amount)
}

/// `(x − D) / σ`.
fn to_d(x: &Tensor, sigma: f32, denoised: &Tensor) -> Result<Tensor> {
    (x - denoised)? / f64::from(sigma)
}

/// `x + d·dt`.
fn step(x: &Tensor, d: &Tensor, dt: f32) -> Result<Tensor> {
    x + (d * f64::from(dt))?
}

/// `a·x + b·y` with scalar coefficients.
fn combine(a: f32, x: &Tensor, b: f32, y: &Tensor) -> Result<Tensor> {
    weighted_sum(&[(f64::from(a), x), (f64::from(b), y)])
}

/// `get_ancestral_step(σ_from, σ_to, η)`: (σ_down, σ_up).
fn ancestral_step(sigma_from: f32, sigma_to: f32, eta: f32) -> (f32, f32) {
    if eta == 0.0 {
        return (sigma_to, 0.0);
    }
    let sigma_up = sigma_to.min(
        eta * (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to) / (sigma_from * sigma_from))
            .sqrt(),
    );
    let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
    (sigma_down, sigma_up)
}

/// The down-step of the flow (CONST) ancestral samplers: (σ_down, α_{i+1}/α_down, renoise coefficient).
fn flow_ancestral_step(sigma: f32, sigma_next: f32, eta: f32) -> (f32, f32, f32) {
    let downstep_ratio = 1.0 + (sigma_next / sigma - 1.0) * eta;
    let sigma_down = sigma_next * downstep_ratio;
    let alpha_next = 1.0 - sigma_next;
    let alpha_down = 1.0 - sigma_down;
    let renoise = (sigma_next * sigma_next
        - sigma_down * sigma_down * alpha_next * alpha_next / (alpha_down * alpha_down))
        .sqrt();
    (sigma_down, alpha_next / alpha_down, renoise)
}

/// Solves the small dense system `matrix · x = rhs` (Gaussian elimination with partial
/// pivoting), as `torch.linalg.solve` does for the UniPC and SA-Solver coefficients.
fn solve_linear(mut matrix: Vec<Vec<f64>>, mut rhs: Vec<f64>) -> Vec<f64> {
    let n = rhs.len();
    for column in 0..n {
        let pivot = (column..n)
            .max_by(|a, b| matrix[*a][column].abs().total_cmp(&matrix[*b][column].abs()))
            .unwrap_or(column);
        matrix.swap(column, pivot);
        rhs.swap(column, pivot);
        for row in column + 1..n {
            let factor = matrix[row][column] / matrix[column][column];
            let pivot_row = matrix[column].clone();
            for (value, pivot_value) in matrix[row][column..].iter_mut().zip(&pivot_row[column..]) {
                *value -= factor * pivot_value;
            }
            rhs[row] -= factor * rhs[column];
        }
    }
    let mut solution = vec![0.0; n];
    for row in (0..n).rev() {
        let known: f64 = (row + 1..n).map(|k| matrix[row][k] * solution[k]).sum();
        solution[row] = (rhs[row] - known) / matrix[row][row];
    }
    solution
}

/// `Σ coefficient_k · tensor_k`, accumulated left to right.
fn weighted_sum(terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (coefficient, tensor) in terms {
        let term = (*tensor * *coefficient)?;
        total = Some(match total {
            Some(total) => (total + term)?,
            None => term,
        });
    }
    total.ok_or_else(|| candle_core::Error::Msg("empty weighted sum".into()))
}
