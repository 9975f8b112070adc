//! Noise schedules: ComfyUI's `model_sampling` objects (the σ table of a model and the maps
//! between σ, timestep and percent), every scheduler of `KSampler.SCHEDULERS` and those of the
//! custom-sampling scheduler nodes, computed in the same precision and order as ComfyUI's torch
//! (or numpy) code so that the σ sequences agree with ComfyUI's to float32 rounding.

use std::fmt;
use std::str::FromStr;

/// The σ table of a model and the maps between σ and the timestep its network receives.
#[derive(Clone, Debug, PartialEq)]
pub enum SigmaSchedule {
    /// `ModelSamplingDiscrete` (SD1.x, SD2.x, SDXL): σ from a DDPM beta schedule, ascending,
    /// with its logarithm; the network receives the integer index of the nearest σ. A distilled
    /// schedule (`ModelSamplingDiscreteDistilled`, LCM) keeps every `skip_steps`-th σ and
    /// the network receives `index·skip_steps + skip_steps − 1`; otherwise `skip_steps` is 1.
    Discrete {
        sigmas: Vec<f32>,
        log_sigmas: Vec<f32>,
        skip_steps: usize,
    },
    /// `ModelSamplingDiscreteFlow` (SD3, FLUX schnell): σ = shift·t / (1 + (shift − 1)·t).
    Flow {
        shift: f64,
        multiplier: f64,
        sigmas: Vec<f32>,
    },
    /// `ModelSamplingFlux` (FLUX dev): σ = e^μ / (e^μ + 1/t − 1), μ = `shift`.
    Flux { shift: f64, sigmas: Vec<f32> },
    /// `ModelSamplingContinuousEDM` and `ModelSamplingContinuousV`: 1000 σ log-spaced from
    /// `sigma_min` to `sigma_max`; the network receives ¼·ln σ (EDM) or 2·atan(σ)/π (V).
    Continuous {
        timestep: ContinuousTimestep,
        sigmas: Vec<f32>,
    },
}

/// How a continuous schedule's σ becomes the network's timestep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContinuousTimestep {
    /// ¼·ln σ.
    Edm,
    /// 2·atan(σ)/π.
    V,
}

impl SigmaSchedule {
    /// SD1.x/SD2.x/SDXL: linear betas from 0.00085 to 0.012 over 1000 steps.
    pub fn sd_discrete() -> Self {
        Self::discrete_linear(0.00085, 0.012, 1000, false)
    }

    /// `make_beta_schedule("linear")` then σ = √((1 − ᾱ)/ᾱ), all in float64 as ComfyUI does;
    /// with `zero_terminal_snr`, ComfyUI's `rescale_zero_terminal_snr_sigmas` first.
    pub fn discrete_linear(linear_start: f64, linear_end: f64, timesteps: usize, zero_terminal_snr: bool) -> Self {
        let roots = linspace_f64(linear_start.sqrt(), linear_end.sqrt(), timesteps);
        let mut cumulative_alpha = 1.0f64;
        let mut sigmas: Vec<f64> = roots
            .into_iter()
            .map(|root| {
                cumulative_alpha *= 1.0 - root * root;
                ((1.0 - cumulative_alpha) / cumulative_alpha).sqrt()
            })
            .collect();
        if zero_terminal_snr {
            sigmas = rescale_zero_terminal_snr(&sigmas);
        }
        SigmaSchedule::Discrete {
            log_sigmas: sigmas.iter().map(|sigma| sigma.ln() as f32).collect(),
            sigmas: sigmas.into_iter().map(|sigma| sigma as f32).collect(),
            skip_steps: 1,
        }
    }

    /// `ModelSamplingDiscreteDistilled` over this discrete schedule: the 50 timesteps an LCM was
    /// distilled on (every 20th of 1000, ending with the last). Other schedules are returned
    /// unchanged.
    pub fn distilled(&self) -> Self {
        const ORIGINAL_TIMESTEPS: usize = 50;
        let SigmaSchedule::Discrete { sigmas, .. } = self else {
            return self.clone();
        };
        let count = sigmas.len();
        let skip_steps = (count / ORIGINAL_TIMESTEPS).max(1);
        let kept: Vec<f32> = (0..ORIGINAL_TIMESTEPS.min(count))
            .rev()
            .map(|x| sigmas[count - 1 - x * skip_steps])
            .collect();
        SigmaSchedule::Discrete {
            log_sigmas: kept.iter().map(|sigma| sigma.ln()).collect(),
            sigmas: kept,
            skip_steps,
        }
    }

    /// SD3 (`shift` 3, `multiplier` 1000) and FLUX schnell (1, 1): 1000 timesteps.
    pub fn flow(shift: f64, multiplier: f64) -> Self {
        let multiplier32 = multiplier as f32;
        let sigmas = (1..=1000)
            .map(|step| flow_sigma(shift, multiplier, step as f32 / 1000.0 * multiplier32))
            .collect();
        SigmaSchedule::Flow {
            shift,
            multiplier,
            sigmas,
        }
    }

    /// FLUX dev with μ = `shift` (1.15 by default): 10000 timesteps.
    pub fn flux(shift: f64) -> Self {
        let sigmas = (1..=10000)
            .map(|step| flux_sigma(shift, step as f32 / 10000.0))
            .collect();
        SigmaSchedule::Flux { shift, sigmas }
    }

    /// A continuous schedule between `sigma_min` and `sigma_max`: `exp(linspace(ln min, ln max,
    /// 1000))` in float32, as torch computes it.
    pub fn continuous(timestep: ContinuousTimestep, sigma_min: f64, sigma_max: f64) -> Self {
        let sigmas = linspace_f32(sigma_min.ln() as f32, sigma_max.ln() as f32, 1000)
            .into_iter()
            .map(f32::exp)
            .collect();
        SigmaSchedule::Continuous { timestep, sigmas }
    }

    /// Whether the model is a rectified flow (ComfyUI's `CONST` sampling: SD3, FLUX).
    pub fn is_flow(&self) -> bool {
        matches!(self, SigmaSchedule::Flow { .. } | SigmaSchedule::Flux { .. })
    }

    /// The ascending σ table.
    pub fn table(&self) -> &[f32] {
        match self {
            SigmaSchedule::Discrete { sigmas, .. }
            | SigmaSchedule::Flow { sigmas, .. }
            | SigmaSchedule::Flux { sigmas, .. }
            | SigmaSchedule::Continuous { sigmas, .. } => sigmas,
        }
    }

    pub fn sigma_min(&self) -> f32 {
        self.table()[0]
    }

    pub fn sigma_max(&self) -> f32 {
        self.table()[self.table().len() - 1]
    }

    /// What the network receives for σ: the nearest table index (discrete; first on ties),
    /// σ·multiplier (flow) or σ itself (FLUX).
    pub fn timestep(&self, sigma: f32) -> f32 {
        match self {
            SigmaSchedule::Discrete {
                log_sigmas, skip_steps, ..
            } => {
                let log_sigma = sigma.ln();
                let mut best = 0;
                let mut best_distance = f32::INFINITY;
                for (index, &candidate) in log_sigmas.iter().enumerate() {
                    let distance = (log_sigma - candidate).abs();
                    if distance < best_distance {
                        best = index;
                        best_distance = distance;
                    }
                }
                (best * skip_steps + skip_steps - 1) as f32
            }
            SigmaSchedule::Flow { multiplier, .. } => sigma * *multiplier as f32,
            SigmaSchedule::Flux { .. } => sigma,
            SigmaSchedule::Continuous {
                timestep: ContinuousTimestep::Edm,
                ..
            } => 0.25 * sigma.ln(),
            SigmaSchedule::Continuous {
                timestep: ContinuousTimestep::V,
                ..
            } => sigma.atan() / std::f32::consts::PI * 2.0,
        }
    }

    /// σ at a (possibly fractional) timestep: the inverse of [`timestep`](Self::timestep).
    pub fn sigma(&self, timestep: f32) -> f32 {
        match self {
            SigmaSchedule::Discrete {
                log_sigmas, skip_steps, ..
            } => {
                let skip = *skip_steps as f32;
                let t = ((timestep - (skip - 1.0)) / skip).clamp(0.0, (log_sigmas.len() - 1) as f32);
                let weight = t.fract();
                let low = log_sigmas[t.floor() as usize];
                let high = log_sigmas[t.ceil() as usize];
                ((1.0 - weight) * low + weight * high).exp()
            }
            SigmaSchedule::Flow { shift, multiplier, .. } => flow_sigma(*shift, *multiplier, timestep),
            SigmaSchedule::Flux { shift, .. } => flux_sigma(*shift, timestep),
            SigmaSchedule::Continuous {
                timestep: ContinuousTimestep::Edm,
                ..
            } => (timestep / 0.25).exp(),
            SigmaSchedule::Continuous {
                timestep: ContinuousTimestep::V,
                ..
            } => (timestep * std::f32::consts::PI / 2.0).tan(),
        }
    }

    /// σ at which a fraction `percent` of sampling is done (for timestep ranges and ControlNet).
    pub fn percent_to_sigma(&self, percent: f64) -> f64 {
        match self {
            SigmaSchedule::Discrete { .. } => {
                if percent <= 0.0 {
                    999_999_999.9
                } else if percent >= 1.0 {
                    0.0
                } else {
                    f64::from(self.sigma(((1.0 - percent) * 999.0) as f32))
                }
            }
            SigmaSchedule::Flow { shift, .. } => match percent {
                p if p <= 0.0 => 1.0,
                p if p >= 1.0 => 0.0,
                p => time_snr_shift(*shift, 1.0 - p),
            },
            SigmaSchedule::Flux { shift, .. } => match percent {
                p if p <= 0.0 => 1.0,
                p if p >= 1.0 => 0.0,
                p => shift.exp() / (shift.exp() + (1.0 / (1.0 - p) - 1.0)),
            },
            SigmaSchedule::Continuous { .. } => match percent {
                p if p <= 0.0 => 999_999_999.9,
                p if p >= 1.0 => 0.0,
                p => {
                    let log_min = f64::from(self.sigma_min()).ln();
                    ((f64::from(self.sigma_max()).ln() - log_min) * (1.0 - p) + log_min).exp()
                }
            },
        }
    }
}

/// FLUX dev's μ (ComfyUI's `Flux` model config), before ModelSamplingFlux changes it.
pub const FLUX_DEV_SHIFT: f64 = 1.15;

/// The shift of SD3's flow schedule (ComfyUI's `sampling_settings` of SD3 and SD3.5).
pub const SD3_SHIFT: f64 = 3.0;

/// The μ of the ModelSamplingFlux node: linear in the image area between
/// (256 latent patches, `base_shift`) and (4096 patches, `max_shift`).
pub fn flux_shift_for_size(max_shift: f64, base_shift: f64, width: f64, height: f64) -> f64 {
    let slope = (max_shift - base_shift) / (4096.0 - 256.0);
    let intercept = base_shift - slope * 256.0;
    (width * height / (8.0 * 8.0 * 2.0 * 2.0)) * slope + intercept
}

/// ComfyUI's `rescale_zero_terminal_snr_sigmas`: √ᾱ shifted so that the last is 0 and scaled
/// so that the first is unchanged; the last ᾱ is then set to 4.8973451890853435e-08.
fn rescale_zero_terminal_snr(sigmas: &[f64]) -> Vec<f64> {
    let roots: Vec<f64> = sigmas
        .iter()
        .map(|sigma| (1.0 / (sigma * sigma + 1.0)).sqrt())
        .collect();
    let (Some(&first), Some(&last)) = (roots.first(), roots.last()) else {
        return sigmas.to_vec();
    };
    let scale = first / (first - last);
    let mut alphas: Vec<f64> = roots.iter().map(|root| ((root - last) * scale).powi(2)).collect();
    if let Some(terminal) = alphas.last_mut() {
        *terminal = 4.8973451890853435e-08;
    }
    alphas.iter().map(|alpha| ((1.0 - alpha) / alpha).sqrt()).collect()
}

fn time_snr_shift(shift: f64, t: f64) -> f64 {
    if shift == 1.0 {
        t
    } else {
        shift * t / (1.0 + (shift - 1.0) * t)
    }
}

/// Flow σ of a timestep tensor element, in float32 as torch evaluates it.
fn flow_sigma(shift: f64, multiplier: f64, timestep: f32) -> f32 {
    let t = timestep / multiplier as f32;
    if shift == 1.0 {
        t
    } else {
        (shift as f32 * t) / (1.0 + (shift - 1.0) as f32 * t)
    }
}

/// FLUX σ of a timestep tensor element: `e^μ / (e^μ + (1/t − 1))` in float32, where torch turns
/// `float / tensor` into a reciprocal and a multiplication.
fn flux_sigma(shift: f64, timestep: f32) -> f32 {
    let e_mu = shift.exp() as f32;
    (1.0 / (e_mu + (1.0 / timestep - 1.0))) * e_mu
}

/// The schedulers of `KSampler.SCHEDULERS`, in ComfyUI's order (the first is the default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheduler {
    Simple,
    SgmUniform,
    Karras,
    Exponential,
    DdimUniform,
    Beta,
    Normal,
    LinearQuadratic,
    KlOptimal,
}

impl Scheduler {
    pub const ALL: [Scheduler; 9] = [
        Scheduler::Simple,
        Scheduler::SgmUniform,
        Scheduler::Karras,
        Scheduler::Exponential,
        Scheduler::DdimUniform,
        Scheduler::Beta,
        Scheduler::Normal,
        Scheduler::LinearQuadratic,
        Scheduler::KlOptimal,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scheduler::Simple => "simple",
            Scheduler::SgmUniform => "sgm_uniform",
            Scheduler::Karras => "karras",
            Scheduler::Exponential => "exponential",
            Scheduler::DdimUniform => "ddim_uniform",
            Scheduler::Beta => "beta",
            Scheduler::Normal => "normal",
            Scheduler::LinearQuadratic => "linear_quadratic",
            Scheduler::KlOptimal => "kl_optimal",
        }
    }

    /// `comfy.samplers.calculate_sigmas`: `steps` σ values from high to low, usually followed
    /// by a 0 (the `normal`, `ddim_uniform` and `beta` schedulers may return other lengths).
    pub fn sigmas(self, schedule: &SigmaSchedule, steps: usize) -> Vec<f32> {
        if steps == 0 {
            return Vec::new();
        }
        let sigma_min = f64::from(schedule.sigma_min());
        let sigma_max = f64::from(schedule.sigma_max());
        match self {
            Scheduler::Simple => simple(schedule, steps),
            Scheduler::SgmUniform => normal(schedule, steps, true),
            Scheduler::Karras => karras(steps, sigma_min, sigma_max, 7.0),
            Scheduler::Exponential => exponential(steps, sigma_min, sigma_max),
            Scheduler::DdimUniform => ddim_uniform(schedule, steps),
            Scheduler::Beta => beta(schedule, steps, 0.6, 0.6),
            Scheduler::Normal => normal(schedule, steps, false),
            Scheduler::LinearQuadratic => linear_quadratic(schedule, steps, 0.025),
            Scheduler::KlOptimal => kl_optimal(steps, sigma_min, sigma_max),
        }
    }
}

impl fmt::Display for Scheduler {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

impl FromStr for Scheduler {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Scheduler::ALL
            .into_iter()
            .find(|scheduler| scheduler.name() == name)
            .ok_or_else(|| format!("unknown scheduler '{name}'"))
    }
}

/// The σ sequence of the KSampler node (`KSampler.set_steps`): with `denoise` < 1 it schedules
/// `int(steps / denoise)` steps and keeps the last `steps + 1` values; samplers that need it
/// (`dpm_2`, `dpm_2_ancestral`, `uni_pc`, `uni_pc_bh2`) schedule one step more and drop the
/// penultimate σ.
pub fn ksampler_sigmas(
    schedule: &SigmaSchedule,
    scheduler: Scheduler,
    steps: usize,
    denoise: f64,
    discard_penultimate: bool,
) -> Vec<f32> {
    let calculate = |steps: usize| {
        if discard_penultimate {
            let mut sigmas = scheduler.sigmas(schedule, steps + 1);
            let last = sigmas.pop();
            sigmas.pop();
            sigmas.extend(last);
            sigmas
        } else {
            scheduler.sigmas(schedule, steps)
        }
    };
    if denoise > 0.9999 {
        calculate(steps)
    } else if denoise <= 0.0 {
        Vec::new()
    } else {
        let sigmas = calculate((steps as f64 / denoise) as usize);
        let keep = (steps + 1).min(sigmas.len());
        sigmas[sigmas.len() - keep..].to_vec()
    }
}

fn simple(schedule: &SigmaSchedule, steps: usize) -> Vec<f32> {
    let table = schedule.table();
    let stride = table.len() as f64 / steps as f64;
    let mut sigmas: Vec<f32> = (0..steps)
        .map(|x| table[table.len() - 1 - (x as f64 * stride) as usize])
        .collect();
    sigmas.push(0.0);
    sigmas
}

fn normal(schedule: &SigmaSchedule, mut steps: usize, sgm: bool) -> Vec<f32> {
    let start = schedule.timestep(schedule.sigma_max());
    let end = schedule.timestep(schedule.sigma_min());
    let mut append_zero = true;
    let timesteps = if sgm {
        let mut timesteps = linspace_f32(start, end, steps + 1);
        timesteps.pop();
        timesteps
    } else {
        if schedule.sigma(end).abs() <= 1e-5 {
            steps += 1;
            append_zero = false;
        }
        linspace_f32(start, end, steps)
    };
    let mut sigmas: Vec<f32> = timesteps.into_iter().map(|t| schedule.sigma(t)).collect();
    if append_zero {
        sigmas.push(0.0);
    }
    sigmas
}

/// k-diffusion's `get_sigmas_karras`: `steps` σ from `sigma_max` to `sigma_min` evenly spaced in
/// σ^(1/ρ), then 0.
pub fn karras(steps: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Vec<f32> {
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    let span = (min_inv_rho - max_inv_rho) as f32;
    let mut sigmas: Vec<f32> = linspace_f32(0.0, 1.0, steps)
        .into_iter()
        .map(|ramp| (max_inv_rho as f32 + ramp * span).powf(rho as f32))
        .collect();
    sigmas.push(0.0);
    sigmas
}

/// k-diffusion's `get_sigmas_exponential`: `steps` σ evenly spaced in log σ, then 0.
pub fn exponential(steps: usize, sigma_min: f64, sigma_max: f64) -> Vec<f32> {
    let mut sigmas: Vec<f32> = linspace_f32(sigma_max.ln() as f32, sigma_min.ln() as f32, steps)
        .into_iter()
        .map(f32::exp)
        .collect();
    sigmas.push(0.0);
    sigmas
}

/// k-diffusion's `get_sigmas_polyexponential`: `steps` σ whose logarithm runs from ln σ_max to
/// ln σ_min along a ramp from 1 to 0 raised to the power ρ, then 0.
pub fn polyexponential(steps: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Vec<f32> {
    let log_min = sigma_min.ln();
    let span = (sigma_max.ln() - log_min) as f32;
    let mut sigmas: Vec<f32> = linspace_f32(1.0, 0.0, steps)
        .into_iter()
        .map(|ramp| (torch_pow(ramp, rho) * span + log_min as f32).exp())
        .collect();
    sigmas.push(0.0);
    sigmas
}

/// k-diffusion's `get_sigmas_vp`: the continuous VP schedule σ(t) = √(e^{β_d·t²/2 + β_min·t} − 1)
/// for `steps` t from 1 to ε_s, then 0.
pub fn vp(steps: usize, beta_d: f64, beta_min: f64, eps_s: f64) -> Vec<f32> {
    let (beta_d, beta_min) = (beta_d as f32, beta_min as f32);
    let mut sigmas: Vec<f32> = linspace_f32(1.0, eps_s as f32, steps)
        .into_iter()
        .map(|t| (beta_d * (t * t) / 2.0 + beta_min * t).exp_m1().sqrt())
        .collect();
    sigmas.push(0.0);
    sigmas
}

/// k-diffusion's `get_sigmas_laplace` (Tiankai et al. 2024): ln σ = μ − β·sign(½ − x)·ln(1 −
/// 2|½ − x| + 10⁻⁵) for `steps` x from 0 to 1, clamped to [σ_min, σ_max]; no 0 is appended.
pub fn laplace(steps: usize, sigma_min: f64, sigma_max: f64, mu: f64, beta: f64) -> Vec<f32> {
    const EPSILON: f32 = 1e-5;
    let (sigma_min, sigma_max) = (sigma_min as f32, sigma_max as f32);
    linspace_f32(0.0, 1.0, steps)
        .into_iter()
        .map(|x| {
            let offset = 0.5 - x;
            let sign = if offset > 0.0 {
                1.0
            } else if offset < 0.0 {
                -1.0
            } else {
                0.0
            };
            let lambda = mu as f32 - beta as f32 * sign * ((1.0 - 2.0 * offset.abs()) + EPSILON).ln();
            lambda.exp().max(sigma_min).min(sigma_max)
        })
        .collect()
}

/// The log-linear interpolation of a decreasing sequence to `count` values, as the Align Your
/// Steps, GITS and OptimalSteps schedulers make it in numpy (float64): `np.interp` of the
/// logarithms over evenly spaced positions, exponentiated.
pub fn loglinear_interp(values: &[f64], count: usize) -> Vec<f64> {
    let positions = numpy_linspace(0.0, 1.0, values.len());
    let logs: Vec<f64> = values.iter().rev().map(|value| value.ln()).collect();
    let mut interpolated: Vec<f64> = numpy_linspace(0.0, 1.0, count)
        .into_iter()
        .map(|x| numpy_interp(x, &positions, &logs).exp())
        .collect();
    interpolated.reverse();
    interpolated
}

/// `np.interp(x, xp, fp)` for increasing `xp`: linear between the neighbouring points, the end
/// values outside.
fn numpy_interp(x: f64, xp: &[f64], fp: &[f64]) -> f64 {
    let last = xp.len() - 1;
    if x < xp[0] {
        return fp[0];
    }
    if x >= xp[last] {
        return fp[last];
    }
    let j = xp.partition_point(|point| *point <= x) - 1;
    if xp[j] == x {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j]);
    slope * (x - xp[j]) + fp[j]
}

/// `numpy.linspace(start, stop, count)` in float64: `start + k·step`, the last exactly `stop`.
pub(crate) fn numpy_linspace(start: f64, stop: f64, count: usize) -> Vec<f64> {
    if count <= 1 {
        return vec![start; count];
    }
    let step = (stop - start) / (count - 1) as f64;
    (0..count)
        .map(|k| if k + 1 == count { stop } else { k as f64 * step + start })
        .collect()
}

/// torch's `tensor ** exponent` on one float32 value, with the special cases its CPU kernel
/// takes (copy, square, cube, square root, reciprocals).
pub(crate) fn torch_pow(value: f32, exponent: f64) -> f32 {
    if exponent == 0.0 {
        1.0
    } else if exponent == 1.0 {
        value
    } else if exponent == 2.0 {
        value * value
    } else if exponent == 3.0 {
        value * value * value
    } else if exponent == 0.5 {
        value.sqrt()
    } else if exponent == -0.5 {
        1.0 / value.sqrt()
    } else if exponent == -1.0 {
        1.0 / value
    } else if exponent == -2.0 {
        1.0 / (value * value)
    } else {
        value.powf(exponent as f32)
    }
}

fn ddim_uniform(schedule: &SigmaSchedule, mut steps: usize) -> Vec<f32> {
    let table = schedule.table();
    let mut sigmas = Vec::new();
    if table[1].abs() <= 1e-5 {
        steps += 1;
    } else {
        sigmas.push(0.0);
    }
    let stride = (table.len() / steps).max(1);
    sigmas.extend(table.iter().skip(1).step_by(stride));
    sigmas.reverse();
    sigmas
}

/// ComfyUI's `beta_scheduler`: timesteps at the Beta(α, β) distribution's quantiles, repeats
/// dropped, then 0.
pub fn beta(schedule: &SigmaSchedule, steps: usize, alpha: f64, beta: f64) -> Vec<f32> {
    let table = schedule.table();
    let last_index = (table.len() - 1) as f64;
    let mut sigmas = Vec::with_capacity(steps + 1);
    let mut previous = None;
    for step in 0..steps {
        let t = 1.0 - step as f64 / steps as f64;
        let index = (beta_ppf(t, alpha, beta) * last_index).round_ties_even();
        if previous != Some(index) {
            sigmas.push(table[index as usize]);
        }
        previous = Some(index);
    }
    sigmas.push(0.0);
    sigmas
}

/// Inverse of the regularised incomplete beta function by bisection (to full f64 precision).
fn beta_ppf(probability: f64, alpha: f64, beta: f64) -> f64 {
    if probability <= 0.0 {
        return 0.0;
    }
    if probability >= 1.0 {
        return 1.0;
    }
    let (mut low, mut high) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let middle = 0.5 * (low + high);
        if middle <= low || middle >= high {
            break;
        }
        if statrs::function::beta::beta_reg(alpha, beta, middle) < probability {
            low = middle;
        } else {
            high = middle;
        }
    }
    0.5 * (low + high)
}

fn linear_quadratic(schedule: &SigmaSchedule, steps: usize, threshold_noise: f64) -> Vec<f32> {
    let values: Vec<f64> = if steps == 1 {
        vec![1.0, 0.0]
    } else {
        let linear_steps = steps / 2;
        let linear = (0..linear_steps).map(|i| i as f64 * threshold_noise / linear_steps as f64);
        let step_difference = linear_steps as f64 - threshold_noise * steps as f64;
        let quadratic_steps = (steps - linear_steps) as f64;
        let quadratic_coefficient = step_difference / (linear_steps as f64 * quadratic_steps.powi(2));
        let linear_coefficient =
            threshold_noise / linear_steps as f64 - 2.0 * step_difference / quadratic_steps.powi(2);
        let constant = quadratic_coefficient * (linear_steps as f64).powi(2);
        let quadratic = (linear_steps..steps)
            .map(|i| quadratic_coefficient * (i as f64).powi(2) + linear_coefficient * i as f64 + constant);
        linear.chain(quadratic).chain([1.0]).map(|value| 1.0 - value).collect()
    };
    let sigma_max = schedule.sigma_max();
    values.into_iter().map(|value| value as f32 * sigma_max).collect()
}

fn kl_optimal(steps: usize, sigma_min: f64, sigma_max: f64) -> Vec<f32> {
    let atan_min = sigma_min.atan() as f32;
    let atan_max = sigma_max.atan() as f32;
    let mut sigmas: Vec<f32> = (0..steps)
        .map(|i| {
            let u = i as f32 / (steps - 1) as f32;
            (u * atan_min + (1.0 - u) * atan_max).tan()
        })
        .collect();
    sigmas.push(0.0);
    sigmas
}

/// `torch.linspace` in float32: the first half counts up from `start`, the second half down
/// from `end`, each value one fused multiply-add (as PyTorch's vectorised CPU kernel computes
/// it).
pub fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps <= 1 {
        return vec![start; steps];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|index| {
            if index < halfway {
                step.mul_add(index as f32, start)
            } else {
                (-step).mul_add((steps - index - 1) as f32, end)
            }
        })
        .collect()
}

/// `torch.linspace` in float64, with fused multiply-adds as [`linspace_f32`].
fn linspace_f64(start: f64, end: f64, steps: usize) -> Vec<f64> {
    if steps <= 1 {
        return vec![start; steps];
    }
    let step = (end - start) / (steps - 1) as f64;
    let halfway = steps / 2;
    (0..steps)
        .map(|index| {
            if index < halfway {
                step.mul_add(index as f64, start)
            } else {
                (-step).mul_add((steps - index - 1) as f64, end)
            }
        })
        .collect()
}
