//! Exponential-integrator samplers on x₀ in the half-log-SNR λ: res_multistep (RES 2M, with
//! ancestral and CFG++ forms), SEEDS-2/3 and ER-SDE (VP, up to 3 stages), with per-step CPU noise.

use candle_core::{Result, Tensor};

use super::{ancestral_step, combine, to_d, ErSdeNoiseScaler, ErSdeOptions, NoiseSource, Run};
use crate::sampling::schedule::torch_pow;

/// torch's `lerp(a, b, w)` on scalars (the two-sided form that is exact at w = 1).
fn lerp(a: f32, b: f32, weight: f32) -> f32 {
    if weight < 0.5 {
        a + weight * (b - a)
    } else {
        b - (b - a) * (1.0 - weight)
    }
}

/// torch's `lerp(a, b, w)` on tensors.
fn lerp_tensors(a: &Tensor, b: &Tensor, weight: f32) -> Result<Tensor> {
    if weight < 0.5 {
        a + ((b - a)? * f64::from(weight))?
    } else {
        b - ((b - a)? * f64::from(1.0 - weight))?
    }
}

/// RES second-order multistep (arXiv 2308.02157) in t = −ln σ, stepping to the ancestral σ_down.
pub(super) fn res_multistep(run: &mut Run, mut x: Tensor, eta: f32, cfg_pp: bool) -> Result<Tensor> {
    let mut noise = run.step_noise(&x);
    let t_of = |sigma: f32| -sigma.ln();
    let phi1 = |t: f32| t.exp_m1() / t;
    let phi2 = |t: f32| (phi1(t) - 1.0) / t;
    let mut old: Option<(Tensor, f32)> = None;
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let (denoised, uncond) = if cfg_pp {
            let (denoised, uncond) = run.denoiser.denoise_with_uncond(&x, sigma)?;
            (denoised, Some(uncond))
        } else {
            (run.denoise(&x, sigma)?, None)
        };
        let (sigma_down, sigma_up) = ancestral_step(sigma, sigma_next, eta);
        run.report(i, &x, &denoised)?;
        let direction = uncond.as_ref().unwrap_or(&denoised);
        match &old {
            Some((old_denoised, old_sigma_down)) if sigma_down != 0.0 => {
                let (t, t_old, t_next, t_prev) = (
                    t_of(sigma),
                    t_of(*old_sigma_down),
                    t_of(sigma_down),
                    t_of(run.sigmas[i - 1]),
                );
                let h = t_next - t;
                let c2 = (t_prev - t_old) / h;
                let (phi1_value, phi2_value) = (phi1(-h), phi2(-h));
                let finite_or_zero = |v: f32| if v.is_nan() { 0.0 } else { v };
                let b1 = finite_or_zero(phi1_value - phi2_value / c2);
                let b2 = finite_or_zero(phi2_value / c2);
                if uncond.is_some() {
                    x = (x + (&denoised - direction)?)?;
                }
                let update = (combine(b1, direction, b2, old_denoised)? * f64::from(h))?;
                x = ((x * f64::from((-h).exp()))? + update)?;
            }
            _ => {
                let d = to_d(&x, sigma, direction)?;
                x = if uncond.is_some() {
                    (&denoised + (d * f64::from(sigma_down))?)?
                } else {
                    (&x + (d * f64::from(sigma_down - sigma))?)?
                };
            }
        }
        if sigma_next > 0.0 {
            x = (x + (noise.next(sigma, sigma_next)? * f64::from(sigma_up))?)?;
        }
        old = Some((uncond.unwrap_or(denoised), sigma_down));
    }
    Ok(x)
}

/// `noise_scaler(λ)` of ER-SDE, with torch's special cases of `x ** exponent`.
fn er_sde_noise_scaler(scaler: ErSdeNoiseScaler, value: f32) -> f32 {
    match scaler {
        ErSdeNoiseScaler::ErSde => value * (torch_pow(value, 0.3).exp() + 10.0),
        ErSdeNoiseScaler::Power(exponent) => torch_pow(value, exponent),
    }
}

/// ER-SDE-Solver (VP, arXiv 2309.06169) up to `max_stage` stages, with 200-point integrals; by
/// default ComfyUI's noise scaler λ·(e^{λ^0.3} + 10), three stages.
pub(super) fn er_sde(run: &mut Run, mut x: Tensor, options: &ErSdeOptions) -> Result<Tensor> {
    const POINTS: usize = 200;
    let scaler = |v: f32| er_sde_noise_scaler(options.noise_scaler, v);
    let s_noise = options.s_noise as f32;
    let mut noise = run.step_noise(&x);
    run.offset_first_sigma_for_snr();
    let er_lambdas: Vec<f32> = run.sigmas.iter().map(|s| (-run.half_log_snr(*s)).exp()).collect();
    let mut old_denoised: Option<Tensor> = None;
    let mut old_denoised_d: Option<Tensor> = None;
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        run.report(i, &x, &denoised)?;
        let stage = options.max_stage.min(i + 1);
        if sigma_next == 0.0 {
            x = denoised.clone();
        } else {
            let (lambda_s, lambda_t) = (er_lambdas[i], er_lambdas[i + 1]);
            let alpha_s = sigma / lambda_s;
            let alpha_t = sigma_next / lambda_t;
            let r_alpha = alpha_t / alpha_s;
            let r = scaler(lambda_t) / scaler(lambda_s);
            x = combine(r_alpha * r, &x, alpha_t * (1.0 - r), &denoised)?;
            if stage >= 2 {
                let old = old_denoised
                    .as_ref()
                    .ok_or_else(|| candle_core::Error::Msg("er_sde: stage 2 without a previous step".into()))?;
                let dt = lambda_t - lambda_s;
                let step_size = -dt / POINTS as f32;
                let positions: Vec<f32> = (0..POINTS).map(|p| lambda_t + p as f32 * step_size).collect();
                let s: f64 = positions.iter().map(|p| 1.0 / f64::from(scaler(*p))).sum();
                let s = s as f32 * step_size;
                let denoised_d = ((&denoised - old)? / f64::from(lambda_s - er_lambdas[i - 1]))?;
                x = (x + (&denoised_d * f64::from(alpha_t * (dt + s * scaler(lambda_t))))?)?;
                if stage >= 3 {
                    let old_d = old_denoised_d
                        .as_ref()
                        .ok_or_else(|| candle_core::Error::Msg("er_sde: stage 3 without stage 2".into()))?;
                    let s_u: f64 = positions
                        .iter()
                        .map(|p| f64::from(p - lambda_s) / f64::from(scaler(*p)))
                        .sum();
                    let s_u = s_u as f32 * step_size;
                    let denoised_u = ((&denoised_d - old_d)? / f64::from((lambda_s - er_lambdas[i - 2]) / 2.0))?;
                    x = (x + (denoised_u * f64::from(alpha_t * (dt * dt / 2.0 + s_u * scaler(lambda_t))))?)?;
                }
                old_denoised_d = Some(denoised_d);
            }
            if options.s_noise > 0.0 {
                let spread = (lambda_t * lambda_t - lambda_s * lambda_s * r * r).sqrt();
                let spread = if spread.is_nan() { 0.0 } else { spread };
                let fresh = ((noise.next(sigma, sigma_next)? * f64::from(alpha_t))? * f64::from(s_noise))?;
                x = (x + (fresh * f64::from(spread))?)?;
            }
        }
        old_denoised = Some(denoised);
    }
    Ok(x)
}

/// `h·φ₁(h) = e^h − 1` and `h·φ₂(h) = (e^h − 1 − h)/h`.
fn h_phi_1(h: f32) -> f32 {
    h.exp_m1()
}

fn h_phi_2(h: f32) -> f32 {
    (h.exp_m1() - h) / h
}

/// One stochastic sub-step of SEEDS: the noise carried over from the previous stage decays by
/// e^{(r_from − r_to)·h} and fresh noise fills up the variance.
fn carry_sde_noise(
    previous: Option<Tensor>,
    segment_factor: f32,
    noise: &mut dyn NoiseSource,
    sigma_from: f32,
    sigma_to: f32,
) -> Result<Tensor> {
    let fresh = (noise.next(sigma_from, sigma_to)? * f64::from((-(2.0 * segment_factor).exp_m1()).sqrt()))?;
    match previous {
        Some(previous) => (previous * f64::from(segment_factor.exp()))? + fresh,
        None => Ok(fresh),
    }
}

/// SEEDS-2 (arXiv 2305.14267), r = ½, φ₁ solver, η = 1.
pub(super) fn seeds_2(run: &mut Run, mut x: Tensor) -> Result<Tensor> {
    const R: f32 = 0.5;
    let mut noise = run.step_noise(&x);
    run.offset_first_sigma_for_snr();
    let fac = 1.0 / (2.0 * R);
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        run.report(i, &x, &denoised)?;
        if sigma_next == 0.0 {
            x = denoised;
            continue;
        }
        let (lambda_s, lambda_t) = (run.half_log_snr(sigma), run.half_log_snr(sigma_next));
        let h = lambda_t - lambda_s;
        let h_eta = h * 2.0;
        let lambda_s_1 = lerp(lambda_s, lambda_t, R);
        let sigma_s_1 = run.sigma_from_half_log_snr(lambda_s_1);
        let alpha_s_1 = sigma_s_1 * lambda_s_1.exp();
        let alpha_t = sigma_next * lambda_t.exp();

        let mut x_2 = combine(
            sigma_s_1 / sigma * (-R * h).exp(),
            &x,
            -(alpha_s_1 * h_phi_1(-R * h_eta)),
            &denoised,
        )?;
        let sde_noise = carry_sde_noise(None, -R * h, &mut noise, sigma, sigma_s_1)?;
        x_2 = (x_2 + (&sde_noise * f64::from(sigma_s_1))?)?;
        let denoised_2 = run.denoise(&x_2, sigma_s_1)?;

        let denoised_d = lerp_tensors(&denoised, &denoised_2, fac)?;
        x = combine(
            sigma_next / sigma * (-h).exp(),
            &x,
            -(alpha_t * h_phi_1(-h_eta)),
            &denoised_d,
        )?;
        let sde_noise = carry_sde_noise(Some(sde_noise), (R - 1.0) * h, &mut noise, sigma_s_1, sigma_next)?;
        x = (x + (sde_noise * f64::from(sigma_next))?)?;
    }
    Ok(x)
}

/// SEEDS-3, r₁ = ⅓, r₂ = ⅔, η = 1.
pub(super) fn seeds_3(run: &mut Run, mut x: Tensor) -> Result<Tensor> {
    const R_1: f32 = 1.0 / 3.0;
    const R_2: f32 = 2.0 / 3.0;
    let mut noise = run.step_noise(&x);
    run.offset_first_sigma_for_snr();
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        run.report(i, &x, &denoised)?;
        if sigma_next == 0.0 {
            x = denoised;
            continue;
        }
        let (lambda_s, lambda_t) = (run.half_log_snr(sigma), run.half_log_snr(sigma_next));
        let h = lambda_t - lambda_s;
        let h_eta = h * 2.0;
        let lambda_s_1 = lerp(lambda_s, lambda_t, R_1);
        let lambda_s_2 = lerp(lambda_s, lambda_t, R_2);
        let sigma_s_1 = run.sigma_from_half_log_snr(lambda_s_1);
        let sigma_s_2 = run.sigma_from_half_log_snr(lambda_s_2);
        let alpha_s_1 = sigma_s_1 * lambda_s_1.exp();
        let alpha_s_2 = sigma_s_2 * lambda_s_2.exp();
        let alpha_t = sigma_next * lambda_t.exp();

        let mut x_2 = combine(
            sigma_s_1 / sigma * (-R_1 * h).exp(),
            &x,
            -(alpha_s_1 * h_phi_1(-R_1 * h_eta)),
            &denoised,
        )?;
        let sde_noise = carry_sde_noise(None, -R_1 * h, &mut noise, sigma, sigma_s_1)?;
        x_2 = (x_2 + (&sde_noise * f64::from(sigma_s_1))?)?;
        let denoised_2 = run.denoise(&x_2, sigma_s_1)?;

        let a3_2 = R_2 / R_1 * h_phi_2(-R_2 * h_eta);
        let a3_1 = h_phi_1(-R_2 * h_eta) - a3_2;
        let blended = combine(a3_1, &denoised, a3_2, &denoised_2)?;
        let mut x_3 = ((&x * f64::from(sigma_s_2 / sigma * (-R_2 * h).exp()))? - (blended * f64::from(alpha_s_2))?)?;
        let sde_noise = carry_sde_noise(Some(sde_noise), (R_1 - R_2) * h, &mut noise, sigma_s_1, sigma_s_2)?;
        x_3 = (x_3 + (&sde_noise * f64::from(sigma_s_2))?)?;
        let denoised_3 = run.denoise(&x_3, sigma_s_2)?;

        let b3 = h_phi_2(-h_eta) / R_2;
        let b1 = h_phi_1(-h_eta) - b3;
        let blended = combine(b1, &denoised, b3, &denoised_3)?;
        x = ((&x * f64::from(sigma_next / sigma * (-h).exp()))? - (blended * f64::from(alpha_t))?)?;
        let sde_noise = carry_sde_noise(Some(sde_noise), (R_2 - 1.0) * h, &mut noise, sigma_s_2, sigma_next)?;
        x = (x + (sde_noise * f64::from(sigma_next))?)?;
    }
    Ok(x)
}
