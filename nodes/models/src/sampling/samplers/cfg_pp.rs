//! The CFG++ samplers: they step from the guided prediction along the direction of the
//! unguided (negative) prediction, which the denoiser returns alongside (and the `alternative`
//! Euler CFG++ of SamplerEulerCFGpp).

use candle_core::{Result, Tensor};

use super::{ancestral_step, combine, flow_ancestral_step, step, to_d, AncestralNoise, NoiseSource, Run};

/// Euler ancestral CFG++ in DDIM form (Euler CFG++ is η = 0, s_noise = 0).
pub(super) fn euler_ancestral_cfg_pp(run: &mut Run, mut x: Tensor, options: AncestralNoise) -> Result<Tensor> {
    let mut noise = run.step_noise(&x);
    let (eta, s_noise) = (options.eta as f32, options.s_noise as f32);
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let (denoised, uncond) = run.denoiser.denoise_with_uncond(&x, sigma)?;
        run.report(i, &x, &denoised)?;
        if sigma_next == 0.0 {
            x = denoised;
            continue;
        }
        let alpha_s = sigma * run.half_log_snr(sigma).exp();
        let alpha_t = sigma_next * run.half_log_snr(sigma_next).exp();
        let d = to_d(&x, sigma, &(uncond * f64::from(alpha_s))?)?;
        let (sigma_down, sigma_up) = ancestral_step(sigma / alpha_s, sigma_next / alpha_t, eta);
        let sigma_down = alpha_t * sigma_down;
        x = combine(alpha_t, &denoised, sigma_down, &d)?;
        if options.eta > 0.0 && options.s_noise > 0.0 {
            let fresh = ((noise.next(sigma, sigma_next)? * f64::from(alpha_t))? * f64::from(s_noise))?;
            x = (x + (fresh * f64::from(sigma_up))?)?;
        }
    }
    Ok(x)
}

/// SamplerEulerCFGpp's `alternative` version (`sample_euler_pp`): Euler steps along
/// d = (x − 2·D + D_uncond)/σ.
pub(super) fn euler_cfg_pp_alternative(run: &mut Run, mut x: Tensor) -> Result<Tensor> {
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let (denoised, uncond) = run.denoiser.denoise_with_uncond(&x, sigma)?;
        let d = to_d(&((&x - &denoised)? + uncond)?, sigma, &denoised)?;
        run.report(i, &x, &denoised)?;
        x = step(&x, &d, sigma_next - sigma)?;
    }
    Ok(x)
}

pub(super) fn dpmpp_2s_ancestral_cfg_pp(run: &mut Run, mut x: Tensor) -> Result<Tensor> {
    let flow = run.is_flow();
    let mut noise = run.step_noise(&x);
    let lambda_flow = |sigma: f32| ((1.0 - sigma) / sigma).ln();
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let (denoised, uncond) = run.denoiser.denoise_with_uncond(&x, sigma)?;
        let guidance = (&denoised - &uncond)?;
        run.report(i, &x, &denoised)?;
        if flow {
            let (sigma_down, renoise_scale, renoise) = flow_ancestral_step(sigma, sigma_next, 1.0);
            if sigma_next == 0.0 {
                let d = to_d(&x, sigma, &uncond)?;
                x = step(&x, &d, sigma_down - sigma)?;
            } else {
                let sigma_s = if sigma == 1.0 {
                    0.9999
                } else {
                    let (t_i, t_down) = (lambda_flow(sigma), lambda_flow(sigma_down));
                    1.0 / ((t_i + 0.5 * (t_down - t_i)).exp() + 1.0)
                };
                let ratio = sigma_s / sigma;
                let u = combine(ratio, &x, 1.0 - ratio, &uncond)?;
                let (_, uncond_2) = run.denoiser.denoise_with_uncond(&u, sigma_s)?;
                let down_ratio = sigma_down / sigma;
                x = combine(down_ratio, &x, 1.0 - down_ratio, &uncond_2)?;
                x = ((x * f64::from(renoise_scale))? + (noise.next(sigma, sigma_next)? * f64::from(renoise))?)?;
            }
            x = (x + (guidance * f64::from(1.0 - sigma_next))?)?;
            continue;
        }
        let (sigma_down, sigma_up) = ancestral_step(sigma, sigma_next, 1.0);
        if sigma_down == 0.0 {
            let d = to_d(&x, sigma, &uncond)?;
            x = step(&x, &d, sigma_down - sigma)?;
        } else {
            let (t, t_next) = (-sigma.ln(), -sigma_down.ln());
            let h = t_next - t;
            let s = t + 0.5 * h;
            let sigma_s = (-s).exp();
            let x_2 = combine(sigma_s / (-t).exp(), &x, -(-h * 0.5).exp_m1(), &uncond)?;
            let (_, uncond_2) = run.denoiser.denoise_with_uncond(&x_2, sigma_s)?;
            x = combine((-t_next).exp() / (-t).exp(), &x, -(-h).exp_m1(), &uncond_2)?;
        }
        if sigma_next > 0.0 {
            x = (x + (noise.next(sigma, sigma_next)? * f64::from(sigma_up))?)?;
        }
        x = (x + guidance)?;
    }
    Ok(x)
}

pub(super) fn dpmpp_2m_cfg_pp(run: &mut Run, mut x: Tensor) -> Result<Tensor> {
    let mut old_uncond: Option<Tensor> = None;
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let (denoised, uncond) = run.denoiser.denoise_with_uncond(&x, sigma)?;
        run.report(i, &x, &denoised)?;
        let (t, t_next) = (-sigma.ln(), -sigma_next.ln());
        let h = t_next - t;
        let decay = (-h).exp();
        let mut mix = (&uncond * f64::from(-decay))?;
        if let Some(old) = old_uncond.as_ref().filter(|_| sigma_next != 0.0) {
            let r = (t + run.sigmas[i - 1].ln()) / h;
            mix = (mix - ((&denoised - old)? * f64::from((-h).exp_m1() * (1.0 / (2.0 * r))))?)?;
        }
        x = ((&denoised + mix)? + (x * f64::from(decay))?)?;
        old_uncond = Some(uncond);
    }
    Ok(x)
}
