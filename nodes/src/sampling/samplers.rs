//! The samplers of ComfyUI's KSampler (k-diffusion's update rules as ComfyUI 0.3.64 runs them).
//! Each works in σ-space on a denoiser D(x, σ) that returns the predicted clean latent; the
//! arithmetic follows ComfyUI's float32 tensor expressions step for step.

use candle_core::{Result, Tensor};

use super::noise::CpuGenerator;

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
}

/// What a sampler reports after each step's first model call (ComfyUI's callback).
pub struct Step<'a> {
    pub index: usize,
    pub total: usize,
    pub x: &'a Tensor,
    pub denoised: &'a Tensor,
}

/// Per-step noise for ancestral samplers: `torch.randn(x.shape)` from a CPU generator seeded
/// with the sampling seed, drawn in sequence (ComfyUI's `default_noise_sampler` on a CPU).
struct StepNoise {
    generator: CpuGenerator,
    template: Tensor,
}

impl StepNoise {
    fn new(seed: u64, template: &Tensor) -> Self {
        StepNoise {
            generator: CpuGenerator::new(seed),
            template: template.clone(),
        }
    }

    fn next(&mut self) -> Result<Tensor> {
        let values = self.generator.randn(self.template.elem_count());
        Tensor::from_vec(values, self.template.shape(), self.template.device())?.to_dtype(self.template.dtype())
    }
}

/// Why sampling could not run.
#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    #[error("sampler '{0}' is not implemented in Easel yet")]
    NotImplemented(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

/// Runs sampler `name` from `x` (already noised to `sigmas[0]`) along `sigmas`. `seed` feeds the
/// per-step noise of ancestral samplers; `callback` runs once per step and may abort sampling
/// by returning an error.
pub fn sample(
    name: &str,
    denoiser: &mut dyn Denoiser,
    x: Tensor,
    sigmas: &[f32],
    seed: u64,
    callback: &mut dyn FnMut(Step) -> Result<()>,
) -> std::result::Result<Tensor, SamplerError> {
    let result = match name {
        "euler" | "ddim" => euler(denoiser, x, sigmas, callback),
        "euler_ancestral" => euler_ancestral(denoiser, x, sigmas, seed, callback),
        "heun" => heun(denoiser, x, sigmas, callback),
        "dpm_2" => dpm_2(denoiser, x, sigmas, callback),
        "dpm_2_ancestral" => dpm_2_ancestral(denoiser, x, sigmas, seed, callback),
        "dpmpp_2m" => dpmpp_2m(denoiser, x, sigmas, callback),
        "dpmpp_2s_ancestral" => dpmpp_2s_ancestral(denoiser, x, sigmas, seed, callback),
        "lcm" => lcm(denoiser, x, sigmas, seed, callback),
        "ddpm" => ddpm(denoiser, x, sigmas, seed, callback),
        "ipndm" => ipndm(denoiser, x, sigmas, callback),
        other => return Err(SamplerError::NotImplemented(other.to_string())),
    };
    Ok(result?)
}

/// `(x − D) / σ`.
fn to_d(x: &Tensor, sigma: f32, denoised: &Tensor) -> Result<Tensor> {
    (x - denoised)? / f64::from(sigma)
}

/// `x + d·dt`.
fn step(x: &Tensor, d: &Tensor, dt: f32) -> Result<Tensor> {
    x + (d * f64::from(dt))?
}

/// `get_ancestral_step` with η = 1: (σ_down, σ_up).
fn ancestral_step(sigma_from: f32, sigma_to: f32) -> (f32, f32) {
    let sigma_up = sigma_to.min(
        (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to) / (sigma_from * sigma_from)).sqrt(),
    );
    let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
    (sigma_down, sigma_up)
}

fn report(
    callback: &mut dyn FnMut(Step) -> Result<()>,
    index: usize,
    sigmas: &[f32],
    x: &Tensor,
    denoised: &Tensor,
) -> Result<()> {
    callback(Step {
        index,
        total: sigmas.len() - 1,
        x,
        denoised,
    })
}

fn euler(
    denoiser: &mut dyn Denoiser,
    mut x: Tensor,
    sigmas: &[f32],
    callback: &mut dyn FnMut(Step) -> Result<()>,
) -> Result<Tensor> {
    for i in 0..sigmas.len().saturating_sub(1) {
        let denoised = denoiser.denoise(&x, sigmas[i])?;
        let d = to_d(&x, sigmas[i], &denoised)?;
        report(callback, i, sigmas, &x, &denoised)?;
        x = step(&x, &d, sigmas[i + 1] - sigmas[i])?;
    }
    Ok(x)
}

fn euler_ancestral(
    denoiser: &mut dyn Denoiser,
    mut x: Tensor,
    sigmas: &[f32],
    seed: u64,
    callback: &mut dyn FnMut(Step) -> Result<()>,
) -> Result<Tensor> {
    let mut noise = StepNoise::new(seed, &x);
    for i in 0..sigmas.len().saturating_sub(1) {
        let denoised = denoiser.denoise(&x, sigmas[i])?;
        let (sigma_down, sigma_up) = ancestral_step(sigmas[i], sigmas[i + 1]);
        report(callback, i, sigmas, &x, &denoised)?;
        if sigma_down == 0.0 {
            x = denoised;
        } else {
            let d = to_d(&x, sigmas[i], &denoised)?;
            x = (step(&x, &d, sigma_down - sigmas[i])? + (noise.next()? * f64::from(sigma_up))?)?;
        }
    }
    Ok(x)
}

fn heun(
    denoiser: &mut dyn Denoiser,
    mut x: Tensor,
    sigmas: &[f32],
    callback: &mut dyn FnMut(Step) -> Result<()>,
) -> Result<Tensor> {
    for i in 0..sigmas.len().saturating_sub(1) {
        let denoised = denoiser.denoise(&x, sigmas[i])?;
        let d = to_d(&x, sigmas[i], &denoised)?;
        report(callback, i, sigmas, &x, &denoised)?;
        let dt = sigmas[i + 1] - sigmas[i];
        if sigmas[i + 1] == 0.0 {
            x = step(&x, &d, dt)?;
        } else {
            let x_2 = step(&x, &d, dt)?;
            let denoised_2 = denoiser.denoise(&x_2, sigmas[i + 1])?;
            let d_2 = to_d(&x_2, sigmas[i + 1], &denoised_2)?;
            let d_prime = ((d + d_2)? / 2.0)?;
            x = step(&x, &d_prime, dt)?;
        }
    }
    Ok(x)
}

/// torch's `a.lerp(b, 0.5)` on scalars: `b − (b − a)·0.5`.
fn log_midpoint(a: f32, b: f32) -> f32 {
    let (log_a, log_b) = (a.ln(), b.ln());
    (log_b - (log_b - log_a) * 0.5).exp()
}

fn dpm_2(
    denoiser: &mut dyn Denoiser,
    mut x: Tensor,
    sigmas: &[f32],
    callback: &mut dyn FnMut(Step) -> Result<()>,
) -> Result<Tensor> {
    for i in 0..sigmas.len().saturating_sub(1) {
        let denoised = denoiser.denoise(&x, sigmas[i])?;
        let d = to_d(&x, sigmas[i], &denoised)?;
        report(callback, i, sigmas, &x, &denoised)?;
        if sigmas[i + 1] == 0.0 {
            x = step(&x, &d, sigmas[i + 1] - sigmas[i])?;
        } else {
            let sigma_mid = log_midpoint(sigmas[i], sigmas[i + 1]);
            let x_2 = step(&x, &d, sigma_mid - sigmas[i])?;
            let denoised_2 = denoiser.denoise(&x_2, sigma_mid)?;
            let d_2 = to_d(&x_2, sigma_mid, &denoised_2)?;
            x = step(&x, &d_2, sigmas[i + 1] - sigmas[i])?;
        }
    }
    Ok(x)
}

fn dpm_2_ancestral(
    denoiser: &mut dyn Denoiser,
    mut x: Tensor,
    sigmas: &[f32],
    seed: u64,
    callback: &mut dyn FnMut(Step) -> Result<()>,
) -> Result<Tensor> {
    let mut noise = StepNoise::new(seed, &x);
    for i in 0..sigmas.len().saturating_sub(1) {
        let denoised = denoiser.denoise(&x, sigmas[i])?;
        let (sigma_down, sigma_up) = ancestral_step(sigmas[i], sigmas[i + 1]);
        report(callback, i, sigmas, &x, &denoised)?;
        let d = to_d(&x, sigmas[i], &denoised)?;
        if sigma_down == 0.0 {
            x = step(&x, &d, sigma_down - sigmas[i])?;
        } else {
            let sigma_mid = log_midpoint(sigmas[i], sigma_down);
            let x_2 = step(&x, &d, sigma_mid - sigmas[i])?;
            let denoised_2 = denoiser.denoise(&x_2, sigma_mid)?;
            let d_2 = to_d(&x_2, sigma_mid, &denoised_2)?;
            x = step(&x, &d_2, sigma_down - sigmas[i])?;
            x = (x + (noise.next()? * f64::from(sigma_up))?)?;
        }
    }
    Ok(x)
}

/// `t = −ln σ` and its inverse, as DPM-Solver++ uses them.
fn t_of(sigma: f32) -> f32 {
    -sigma.ln()
}

fn sigma_of(t: f32) -> f32 {
    (-t).exp()
}

fn dpmpp_2m(
    denoiser: &mut dyn Denoiser,
    mut x: Tensor,
    sigmas: &[f32],
    callback: &mut dyn FnMut(Step) -> Result<()>,
) -> Result<Tensor> {
    let mut old_denoised: Option<Tensor> = None;
    for i in 0..sigmas.len().saturating_sub(1) {
        let denoised = denoiser.denoise(&x, sigmas[i])?;
        report(callback, i, sigmas, &x, &denoised)?;
        let (t, t_next) = (t_of(sigmas[i]), t_of(sigmas[i + 1]));
        let h = t_next - t;
        let ratio = f64::from(sigma_of(t_next) / sigma_of(t));
        let factor = f64::from((-h).exp_m1());
        x = match &old_denoised {
            Some(old) if sigmas[i + 1] != 0.0 => {
                let h_last = t - t_of(sigmas[i - 1]);
                let r = h_last / h;
                let blended = ((&denoised * f64::from(1.0 + 1.0 / (2.0 * r)))? - (old * f64::from(1.0 / (2.0 * r)))?)?;
                ((&x * ratio)? - (blended * factor)?)?
            }
            _ => ((&x * ratio)? - (&denoised * factor)?)?,
        };
        old_denoised = Some(denoised);
    }
    Ok(x)
}

fn dpmpp_2s_ancestral(
    denoiser: &mut dyn Denoiser,
    mut x: Tensor,
    sigmas: &[f32],
    seed: u64,
    callback: &mut dyn FnMut(Step) -> Result<()>,
) -> Result<Tensor> {
    let mut noise = StepNoise::new(seed, &x);
    for i in 0..sigmas.len().saturating_sub(1) {
        let denoised = denoiser.denoise(&x, sigmas[i])?;
        let (sigma_down, sigma_up) = ancestral_step(sigmas[i], sigmas[i + 1]);
        report(callback, i, sigmas, &x, &denoised)?;
        if sigma_down == 0.0 {
            let d = to_d(&x, sigmas[i], &denoised)?;
            x = step(&x, &d, sigma_down - sigmas[i])?;
        } else {
            let (t, t_next) = (t_of(sigmas[i]), t_of(sigma_down));
            let h = t_next - t;
            let s = t + 0.5 * h;
            let x_2 = ((&x * f64::from(sigma_of(s) / sigma_of(t)))? - (&denoised * f64::from((-h * 0.5).exp_m1()))?)?;
            let denoised_2 = denoiser.denoise(&x_2, sigma_of(s))?;
            x = ((&x * f64::from(sigma_of(t_next) / sigma_of(t)))? - (denoised_2 * f64::from((-h).exp_m1()))?)?;
        }
        if sigmas[i + 1] > 0.0 {
            x = (x + (noise.next()? * f64::from(sigma_up))?)?;
        }
    }
    Ok(x)
}

fn lcm(
    denoiser: &mut dyn Denoiser,
    mut x: Tensor,
    sigmas: &[f32],
    seed: u64,
    callback: &mut dyn FnMut(Step) -> Result<()>,
) -> Result<Tensor> {
    let mut noise = StepNoise::new(seed, &x);
    for i in 0..sigmas.len().saturating_sub(1) {
        let denoised = denoiser.denoise(&x, sigmas[i])?;
        report(callback, i, sigmas, &x, &denoised)?;
        x = denoised;
        if sigmas[i + 1] > 0.0 {
            x = ((noise.next()? * f64::from(sigmas[i + 1]))? + x)?;
        }
    }
    Ok(x)
}

fn ddpm(
    denoiser: &mut dyn Denoiser,
    mut x: Tensor,
    sigmas: &[f32],
    seed: u64,
    callback: &mut dyn FnMut(Step) -> Result<()>,
) -> Result<Tensor> {
    let mut noise = StepNoise::new(seed, &x);
    for i in 0..sigmas.len().saturating_sub(1) {
        let (sigma, sigma_prev) = (sigmas[i], sigmas[i + 1]);
        let denoised = denoiser.denoise(&x, sigma)?;
        report(callback, i, sigmas, &x, &denoised)?;
        let eps = ((&x - &denoised)? / f64::from(sigma))?;
        let scaled = (&x / f64::from((1.0 + sigma * sigma).sqrt()))?;
        let alpha_cumprod = 1.0 / (sigma * sigma + 1.0);
        let alpha_cumprod_prev = 1.0 / (sigma_prev * sigma_prev + 1.0);
        let alpha = alpha_cumprod / alpha_cumprod_prev;
        let correction = ((eps * f64::from(1.0 - alpha))? / f64::from((1.0 - alpha_cumprod).sqrt()))?;
        let mut mu = ((scaled - correction)? * f64::from((1.0 / alpha).sqrt()))?;
        if sigma_prev > 0.0 {
            let spread = ((1.0 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod)).sqrt();
            mu = (mu + (noise.next()? * f64::from(spread))?)?;
        }
        x = if sigma_prev != 0.0 {
            (mu * f64::from((1.0 + sigma_prev * sigma_prev).sqrt()))?
        } else {
            mu
        };
    }
    Ok(x)
}

fn ipndm(
    denoiser: &mut dyn Denoiser,
    x: Tensor,
    sigmas: &[f32],
    callback: &mut dyn FnMut(Step) -> Result<()>,
) -> Result<Tensor> {
    const MAX_ORDER: usize = 4;
    let mut x_next = x;
    let mut history: Vec<Tensor> = Vec::new();
    for i in 0..sigmas.len().saturating_sub(1) {
        let (t_cur, t_next) = (sigmas[i], sigmas[i + 1]);
        let x_cur = x_next;
        let denoised = denoiser.denoise(&x_cur, t_cur)?;
        report(callback, i, sigmas, &x_cur, &denoised)?;
        let d_cur = ((&x_cur - &denoised)? / f64::from(t_cur))?;
        let order = MAX_ORDER.min(i + 1);
        let dt = f64::from(t_next - t_cur);
        let n = history.len();
        x_next = if t_next == 0.0 {
            denoised
        } else {
            let slope = match order {
                1 => d_cur.clone(),
                2 => (((&d_cur * 3.0)? - &history[n - 1])? / 2.0)?,
                3 => ((((&d_cur * 23.0)? - (&history[n - 1] * 16.0)?)? + (&history[n - 2] * 5.0)?)? / 12.0)?,
                _ => {
                    let sum = ((((&d_cur * 55.0)? - (&history[n - 1] * 59.0)?)? + (&history[n - 2] * 37.0)?)?
                        - (&history[n - 3] * 9.0)?)?;
                    (sum / 24.0)?
                }
            };
            (&x_cur + (slope * dt)?)?
        };
        if history.len() == MAX_ORDER - 1 {
            history.remove(0);
        }
        history.push(d_cur);
    }
    Ok(x_next)
}
