//! First- and second-order samplers in σ: Euler (and ancestral), Heun, Heun++, DPM-2 (and
//! ancestral), gradient estimation, LCM (and LCM with upscaling) and DDPM.

use candle_core::{Result, Tensor, D};

use super::{ancestral_step, combine, flow_ancestral_step, scaled_noise, step, to_d, NoiseSource, Run};
use super::{AncestralNoise, LcmUpscaleOptions};
use crate::sampling::noise::with_global_generator;
use crate::sampling::schedule::numpy_linspace;

pub(super) fn euler(run: &mut Run, mut x: Tensor) -> Result<Tensor> {
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        let d = to_d(&x, sigma, &denoised)?;
        run.report(i, &x, &denoised)?;
        x = step(&x, &d, sigma_next - sigma)?;
    }
    Ok(x)
}

pub(super) fn euler_ancestral(run: &mut Run, mut x: Tensor, options: AncestralNoise) -> Result<Tensor> {
    let mut noise = run.step_noise(&x);
    let flow = run.is_flow();
    let (eta, s_noise) = (options.eta as f32, options.s_noise as f32);
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        run.report(i, &x, &denoised)?;
        if flow {
            if sigma_next == 0.0 {
                x = denoised;
            } else {
                let (sigma_down, renoise_scale, renoise) = flow_ancestral_step(sigma, sigma_next, eta);
                let ratio = sigma_down / sigma;
                x = combine(ratio, &x, 1.0 - ratio, &denoised)?;
                if options.eta > 0.0 {
                    let fresh = scaled_noise(&mut noise, sigma, sigma_next, s_noise, renoise)?;
                    x = ((x * f64::from(renoise_scale))? + fresh)?;
                }
            }
            continue;
        }
        let (sigma_down, sigma_up) = ancestral_step(sigma, sigma_next, eta);
        if sigma_down == 0.0 {
            x = denoised;
        } else {
            let d = to_d(&x, sigma, &denoised)?;
            x = (step(&x, &d, sigma_down - sigma)? + scaled_noise(&mut noise, sigma, sigma_next, s_noise, sigma_up)?)?;
        }
    }
    Ok(x)
}

pub(super) fn heun(run: &mut Run, mut x: Tensor) -> Result<Tensor> {
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        let d = to_d(&x, sigma, &denoised)?;
        run.report(i, &x, &denoised)?;
        let dt = sigma_next - sigma;
        if sigma_next == 0.0 {
            x = step(&x, &d, dt)?;
        } else {
            let x_2 = step(&x, &d, dt)?;
            let denoised_2 = run.denoise(&x_2, sigma_next)?;
            let d_2 = to_d(&x_2, sigma_next, &denoised_2)?;
            let d_prime = ((d + d_2)? / 2.0)?;
            x = step(&x, &d_prime, dt)?;
        }
    }
    Ok(x)
}

/// Heun++: a third evaluation one step further ahead, weighted by σ / (3σ₀).
pub(super) fn heunpp2(run: &mut Run, mut x: Tensor) -> Result<Tensor> {
    let sigmas = run.sigmas.clone();
    let s_end = sigmas[sigmas.len() - 1];
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        let d = to_d(&x, sigma, &denoised)?;
        run.report(i, &x, &denoised)?;
        let dt = sigma_next - sigma;
        if sigma_next == s_end {
            x = step(&x, &d, dt)?;
        } else if sigmas[i + 2] == s_end {
            let x_2 = step(&x, &d, dt)?;
            let denoised_2 = run.denoise(&x_2, sigma_next)?;
            let d_2 = to_d(&x_2, sigma_next, &denoised_2)?;
            let w2 = sigma_next / (2.0 * sigmas[0]);
            let w1 = 1.0 - w2;
            let d_prime = combine(w1, &d, w2, &d_2)?;
            x = step(&x, &d_prime, dt)?;
        } else {
            let x_2 = step(&x, &d, dt)?;
            let denoised_2 = run.denoise(&x_2, sigma_next)?;
            let d_2 = to_d(&x_2, sigma_next, &denoised_2)?;
            let x_3 = step(&x_2, &d_2, sigmas[i + 2] - sigma_next)?;
            let denoised_3 = run.denoise(&x_3, sigmas[i + 2])?;
            let d_3 = to_d(&x_3, sigmas[i + 2], &denoised_3)?;
            let w = 3.0 * sigmas[0];
            let w2 = sigma_next / w;
            let w3 = sigmas[i + 2] / w;
            let w1 = 1.0 - w2 - w3;
            let d_prime = (combine(w1, &d, w2, &d_2)? + (d_3 * f64::from(w3))?)?;
            x = step(&x, &d_prime, dt)?;
        }
    }
    Ok(x)
}

/// torch's `a.lerp(b, 0.5)` of the logarithms: the geometric midpoint of two σ.
fn log_midpoint(a: f32, b: f32) -> f32 {
    let (log_a, log_b) = (a.ln(), b.ln());
    (log_b - (log_b - log_a) * 0.5).exp()
}

pub(super) fn dpm_2(run: &mut Run, mut x: Tensor) -> Result<Tensor> {
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        let d = to_d(&x, sigma, &denoised)?;
        run.report(i, &x, &denoised)?;
        if sigma_next == 0.0 {
            x = step(&x, &d, sigma_next - sigma)?;
        } else {
            let sigma_mid = log_midpoint(sigma, sigma_next);
            let x_2 = step(&x, &d, sigma_mid - sigma)?;
            let denoised_2 = run.denoise(&x_2, sigma_mid)?;
            let d_2 = to_d(&x_2, sigma_mid, &denoised_2)?;
            x = step(&x, &d_2, sigma_next - sigma)?;
        }
    }
    Ok(x)
}

pub(super) fn dpm_2_ancestral(run: &mut Run, mut x: Tensor) -> Result<Tensor> {
    let mut noise = run.step_noise(&x);
    let flow = run.is_flow();
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        let (sigma_down, renoise_scale, noise_amount) = if flow {
            flow_ancestral_step(sigma, sigma_next, 1.0)
        } else {
            let (down, up) = ancestral_step(sigma, sigma_next, 1.0);
            (down, 1.0, up)
        };
        run.report(i, &x, &denoised)?;
        let d = to_d(&x, sigma, &denoised)?;
        if sigma_down == 0.0 {
            x = step(&x, &d, sigma_down - sigma)?;
        } else {
            let sigma_mid = log_midpoint(sigma, sigma_down);
            let x_2 = step(&x, &d, sigma_mid - sigma)?;
            let denoised_2 = run.denoise(&x_2, sigma_mid)?;
            let d_2 = to_d(&x_2, sigma_mid, &denoised_2)?;
            x = step(&x, &d_2, sigma_down - sigma)?;
            if flow {
                x = (x * f64::from(renoise_scale))?;
            }
            x = (x + (noise.next(sigma, sigma_next)? * f64::from(noise_amount))?)?;
        }
    }
    Ok(x)
}

/// Gradient estimation (γ = 2): Euler plus (γ − 1)·(d − d_prev)·dt; the CFG++ form steps from
/// the guided prediction along the unguided direction.
pub(super) fn gradient_estimation(run: &mut Run, mut x: Tensor, cfg_pp: bool) -> Result<Tensor> {
    const GAMMA: f32 = 2.0;
    let mut old_d: Option<Tensor> = None;
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let (denoised, d) = if cfg_pp {
            let (denoised, uncond) = run.denoiser.denoise_with_uncond(&x, sigma)?;
            let d = to_d(&x, sigma, &uncond)?;
            (denoised, d)
        } else {
            let denoised = run.denoise(&x, sigma)?;
            let d = to_d(&x, sigma, &denoised)?;
            (denoised, d)
        };
        run.report(i, &x, &denoised)?;
        let dt = sigma_next - sigma;
        if sigma_next == 0.0 {
            x = denoised;
        } else {
            x = if cfg_pp {
                (&denoised + (&d * f64::from(sigma_next))?)?
            } else {
                step(&x, &d, dt)?
            };
            if let Some(old_d) = &old_d {
                let d_bar = ((&d - old_d)? * f64::from(GAMMA - 1.0))?;
                x = step(&x, &d_bar, dt)?;
            }
        }
        old_d = Some(d);
    }
    Ok(x)
}

pub(super) fn lcm(run: &mut Run, mut x: Tensor) -> Result<Tensor> {
    let mut noise = run.step_noise(&x);
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        run.report(i, &x, &denoised)?;
        x = denoised;
        if sigma_next > 0.0 {
            let fresh = noise.next(sigma, sigma_next)?;
            x = run.noise_scaling(sigma_next, &fresh, &x)?;
        }
    }
    Ok(x)
}

/// LCM steps that enlarge the latent: after each of the first steps the denoised latent is
/// resized on a linear ramp of scales up to `total_upscale`, then re-noised with draws from
/// torch's global generator (`torch.randn_like`).
pub(super) fn lcm_upscale(run: &mut Run, mut x: Tensor, options: &LcmUpscaleOptions) -> Result<Tensor> {
    let points = match options.upscale_steps {
        None => (run.sigmas.len() / 2 + 1).max(2),
        Some(steps) => (steps + 1).min(run.sigmas.len() + 1),
    };
    let upscales = numpy_linspace(1.0, options.total_upscale, points);
    let (height, width) = (x.dim(D::Minus2)?, x.dim(D::Minus1)?);
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        run.report(i, &x, &denoised)?;
        x = denoised;
        if let Some(scale) = upscales.get(i + 1) {
            let scaled = |size: usize| (size as f64 * scale).round_ties_even() as usize;
            x = options.resize.resize(&x, scaled(width), scaled(height))?;
        }
        if sigma_next > 0.0 {
            let values = with_global_generator(|generator| generator.randn(x.elem_count()));
            let fresh = Tensor::from_vec(values, x.shape(), x.device())?.to_dtype(x.dtype())?;
            x = (x + (fresh * f64::from(sigma_next))?)?;
        }
    }
    Ok(x)
}

/// DDPM ancestral steps on the variance-preserving latent `x / √(1 + σ²)`.
pub(super) fn ddpm(run: &mut Run, mut x: Tensor) -> Result<Tensor> {
    let mut noise = run.step_noise(&x);
    for i in 0..run.steps() {
        let (sigma, sigma_prev) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        run.report(i, &x, &denoised)?;
        let eps = ((&x - &denoised)? / f64::from(sigma))?;
        let scaled = (&x / f64::from((1.0 + sigma * sigma).sqrt()))?;
        let alpha_cumprod = 1.0 / (sigma * sigma + 1.0);
        let alpha_cumprod_prev = 1.0 / (sigma_prev * sigma_prev + 1.0);
        let alpha = alpha_cumprod / alpha_cumprod_prev;
        let correction = ((eps * f64::from(1.0 - alpha))? / f64::from((1.0 - alpha_cumprod).sqrt()))?;
        let mut mu = ((scaled - correction)? * f64::from((1.0 / alpha).sqrt()))?;
        if sigma_prev > 0.0 {
            let spread = ((1.0 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod)).sqrt();
            mu = (mu + (noise.next(sigma, sigma_prev)? * f64::from(spread))?)?;
        }
        x = if sigma_prev != 0.0 {
            (mu * f64::from((1.0 + sigma_prev * sigma_prev).sqrt()))?
        } else {
            mu
        };
    }
    Ok(x)
}
