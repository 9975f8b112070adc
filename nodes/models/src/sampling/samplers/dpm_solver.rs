//! DPM-Solver (fast fixed-step and adaptive, on ε in t = −ln σ) and DPM-Solver++ (on x₀ in the
//! half-log-SNR λ): 2S ancestral, 2M, and the SDE variants driven by Brownian-tree noise.

use std::collections::HashMap;

use candle_core::{Result, Tensor};

use super::{ancestral_step, combine, flow_ancestral_step, scaled_noise, step, to_d, NoiseSource, Run};
use super::{AncestralNoise, DpmAdaptiveOptions, SolverType};
use crate::sampling::schedule::linspace_f32;

/// k-diffusion's `DPMSolver`: ε(x, t) = (x − D(x, σ(t)))/σ(t) with t = −ln σ.
struct DpmSolver<'r, 'a> {
    run: &'r mut Run<'a>,
    evaluations: HashMap<&'static str, Tensor>,
}

fn sigma_of(t: f32) -> f32 {
    (-t).exp()
}

fn t_of(sigma: f32) -> f32 {
    -sigma.ln()
}

impl DpmSolver<'_, '_> {
    /// ε at (x, t), cached under `key` for the current step.
    fn eps(&mut self, key: &'static str, x: &Tensor, t: f32) -> Result<Tensor> {
        if let Some(eps) = self.evaluations.get(key) {
            return Ok(eps.clone());
        }
        let sigma = sigma_of(t);
        let eps = ((x - self.run.denoise(x, sigma)?)? / f64::from(sigma))?;
        self.evaluations.insert(key, eps.clone());
        Ok(eps)
    }

    fn first_order(&mut self, x: &Tensor, t: f32, t_next: f32) -> Result<Tensor> {
        let h = t_next - t;
        let eps = self.eps("eps", x, t)?;
        x - (eps * f64::from(sigma_of(t_next) * h.exp_m1()))?
    }

    fn second_order(&mut self, x: &Tensor, t: f32, t_next: f32, r1: f32) -> Result<Tensor> {
        let h = t_next - t;
        let eps = self.eps("eps", x, t)?;
        let s1 = t + r1 * h;
        let u1 = (x - (&eps * f64::from(sigma_of(s1) * (r1 * h).exp_m1()))?)?;
        let eps_r1 = self.eps("eps_r1", &u1, s1)?;
        let sigma_next = sigma_of(t_next);
        let x_2 = (x - (&eps * f64::from(sigma_next * h.exp_m1()))?)?;
        x_2 - ((eps_r1 - eps)? * f64::from(sigma_next / (2.0 * r1) * h.exp_m1()))?
    }

    fn third_order(&mut self, x: &Tensor, t: f32, t_next: f32) -> Result<Tensor> {
        let (r1, r2) = (1.0f32 / 3.0, 2.0f32 / 3.0);
        let h = t_next - t;
        let eps = self.eps("eps", x, t)?;
        let (s1, s2) = (t + r1 * h, t + r2 * h);
        let u1 = (x - (&eps * f64::from(sigma_of(s1) * (r1 * h).exp_m1()))?)?;
        let eps_r1 = self.eps("eps_r1", &u1, s1)?;
        let phi_r2 = (r2 * h).exp_m1() / (r2 * h) - 1.0;
        let u2 = ((x - (&eps * f64::from(sigma_of(s2) * (r2 * h).exp_m1()))?)?
            - ((&eps_r1 - &eps)? * f64::from(sigma_of(s2) * (r2 / r1) * phi_r2))?)?;
        let eps_r2 = self.eps("eps_r2", &u2, s2)?;
        let sigma_next = sigma_of(t_next);
        let x_3 = (x - (&eps * f64::from(sigma_next * h.exp_m1()))?)?;
        x_3 - ((eps_r2 - eps)? * f64::from(sigma_next / r2 * (h.exp_m1() / h - 1.0)))?
    }
}

/// KSampler's range for the DPM-Solver samplers: (σ_min, σ_max), skipping a final 0.
fn solver_range(run: &Run) -> Result<(f32, f32)> {
    let n = run.sigmas.len();
    let mut sigma_min = run.sigmas[n - 1];
    if sigma_min == 0.0 {
        sigma_min = run.sigmas[n - 2];
    }
    let sigma_max = run.sigmas[0];
    if sigma_min <= 0.0 || sigma_max <= 0.0 {
        return Err(candle_core::Error::Msg("sigma_min and sigma_max must not be 0".into()));
    }
    Ok((sigma_min, sigma_max))
}

/// DPM-Solver-fast: as many third-order steps as the step budget allows, uniform in t.
pub(super) fn dpm_fast(run: &mut Run, mut x: Tensor) -> Result<Tensor> {
    if run.sigmas.len() <= 1 {
        return Ok(x);
    }
    let (sigma_min, sigma_max) = solver_range(run)?;
    let nfe = run.steps();
    let m = nfe / 3 + 1;
    let ts = linspace_f32(t_of(sigma_max), t_of(sigma_min), m + 1);
    let multiple_of_three = nfe.is_multiple_of(3);
    let mut orders = vec![3usize; m.saturating_sub(if multiple_of_three { 2 } else { 1 })];
    if multiple_of_three {
        orders.extend([2, 1]);
    } else {
        orders.push(nfe % 3);
    }
    let mut solver = DpmSolver {
        run,
        evaluations: HashMap::new(),
    };
    for (i, order) in orders.into_iter().enumerate() {
        solver.evaluations.clear();
        let (t, t_next) = (ts[i], ts[i + 1]);
        let eps = solver.eps("eps", &x, t)?;
        let denoised = (&x - (eps * f64::from(sigma_of(t)))?)?;
        solver.run.report(i, &x, &denoised)?;
        x = match order {
            1 => solver.first_order(&x, t, t_next)?,
            2 => solver.second_order(&x, t, t_next, 0.5)?,
            _ => solver.third_order(&x, t, t_next)?,
        };
    }
    Ok(x)
}

/// k-diffusion's `PIDStepSizeController`, in Python's double precision.
struct StepSizeController {
    h: f64,
    exponents: [f64; 3],
    accept_safety: f64,
    inverse_errors: Option<[f64; 3]>,
}

impl StepSizeController {
    fn new(h: f64, options: &DpmAdaptiveOptions, order: f64) -> Self {
        let (p, i, d) = (options.pcoeff, options.icoeff, options.dcoeff);
        StepSizeController {
            h,
            exponents: [(p + i + d) / order, -(p + 2.0 * d) / order, d / order],
            accept_safety: options.accept_safety,
            inverse_errors: None,
        }
    }

    /// Scales the step size by the error just measured; whether the step is accepted.
    fn propose_step(&mut self, error: f32) -> bool {
        const EPSILON: f64 = 1e-8;
        let inverse_error = 1.0 / (f64::from(error) + EPSILON);
        let errors = self.inverse_errors.get_or_insert([inverse_error; 3]);
        errors[0] = inverse_error;
        let [b1, b2, b3] = self.exponents;
        let factor = errors[0].powf(b1) * errors[1].powf(b2) * errors[2].powf(b3);
        let factor = 1.0 + (factor - 1.0).atan();
        let accept = factor >= self.accept_safety;
        if accept {
            errors[2] = errors[1];
            errors[1] = errors[0];
        }
        self.h *= factor;
        accept
    }
}

/// DPM-Solver-12 or -23 with PID step-size control, from σ_max down to σ_min (or up, for a
/// reversed schedule without noise).
pub(super) fn dpm_adaptive(run: &mut Run, mut x: Tensor, options: &DpmAdaptiveOptions) -> Result<Tensor> {
    const MAX_ATTEMPTS: usize = 10_000;
    if run.sigmas.len() <= 1 {
        return Ok(x);
    }
    let (sigma_min, sigma_max) = solver_range(run)?;
    if !matches!(options.order, 2 | 3) {
        return Err(candle_core::Error::Msg("order should be 2 or 3".into()));
    }
    let (t_start, t_end) = (t_of(sigma_max), t_of(sigma_min));
    let forward = t_end > t_start;
    let noisy = options.eta != 0.0;
    if !forward && noisy {
        return Err(candle_core::Error::Msg("eta must be 0 for reverse sampling".into()));
    }
    let h_init = options.h_init.abs() * if forward { 1.0 } else { -1.0 };
    let (rtol, atol) = (f64::from(options.rtol as f32), options.atol as f32);
    let mut noise = run.step_noise(&x);
    let controller_order = if noisy { 1.5 } else { options.order as f64 };
    let mut controller = StepSizeController::new(h_init, options, controller_order);
    let mut s = t_start;
    let mut x_prev = x.clone();
    let mut solver = DpmSolver {
        run,
        evaluations: HashMap::new(),
    };
    let mut attempts = 0;
    while if forward { s < t_end - 1e-5 } else { s > t_end + 1e-5 } {
        if attempts == MAX_ATTEMPTS {
            return Err(candle_core::Error::Msg(
                "dpm_adaptive did not reach the end of the schedule (the model output is not finite?)".into(),
            ));
        }
        solver.evaluations.clear();
        let proposed = s + controller.h as f32;
        let t = if forward {
            t_end.min(proposed)
        } else {
            t_end.max(proposed)
        };
        let (t_step, sigma_up) = if noisy {
            let (sigma_down, _) = ancestral_step(sigma_of(s), sigma_of(t), options.eta as f32);
            let t_down = t_end.min(t_of(sigma_down));
            let sigma_up = (sigma_of(t).powi(2) - sigma_of(t_down).powi(2)).sqrt();
            (t_down, sigma_up)
        } else {
            (t, 0.0)
        };
        let eps = solver.eps("eps", &x, s)?;
        let denoised = (&x - (eps * f64::from(sigma_of(s)))?)?;
        let (x_low, x_high) = if options.order == 2 {
            let x_low = solver.first_order(&x, s, t_step)?;
            (x_low, solver.second_order(&x, s, t_step, 0.5)?)
        } else {
            let x_low = solver.second_order(&x, s, t_step, 1.0 / 3.0)?;
            (x_low, solver.third_order(&x, s, t_step)?)
        };
        let delta = x_low.abs()?.maximum(&x_prev.abs()?)?.affine(rtol, 0.0)?.maximum(atol)?;
        let scaled = ((&x_low - &x_high)? / delta)?;
        let error = scaled.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt() / (x.elem_count() as f64).sqrt() as f32;
        if controller.propose_step(error) {
            x_prev = x_low;
            x = if noisy {
                let amount = sigma_up * options.s_noise as f32;
                (x_high + (noise.next(sigma_of(s), sigma_of(t))? * f64::from(amount))?)?
            } else {
                x_high
            };
            s = t;
        }
        solver.run.report(attempts, &x, &denoised)?;
        attempts += 1;
    }
    Ok(x)
}

pub(super) fn dpmpp_2s_ancestral(run: &mut Run, mut x: Tensor, options: AncestralNoise) -> Result<Tensor> {
    if run.is_flow() {
        return dpmpp_2s_ancestral_flow(run, x, options);
    }
    let mut noise = run.step_noise(&x);
    let (eta, s_noise) = (options.eta as f32, options.s_noise as f32);
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        let (sigma_down, sigma_up) = ancestral_step(sigma, sigma_next, eta);
        run.report(i, &x, &denoised)?;
        if sigma_down == 0.0 {
            let d = to_d(&x, sigma, &denoised)?;
            x = step(&x, &d, sigma_down - sigma)?;
        } else {
            let (t, t_next) = (t_of(sigma), t_of(sigma_down));
            let h = t_next - t;
            let s = t + 0.5 * h;
            let x_2 = combine(sigma_of(s) / sigma_of(t), &x, -(-h * 0.5).exp_m1(), &denoised)?;
            let denoised_2 = run.denoise(&x_2, sigma_of(s))?;
            x = combine(sigma_of(t_next) / sigma_of(t), &x, -(-h).exp_m1(), &denoised_2)?;
        }
        if sigma_next > 0.0 {
            x = (x + scaled_noise(&mut noise, sigma, sigma_next, s_noise, sigma_up)?)?;
        }
    }
    Ok(x)
}

/// The flow (CONST) form of DPM-Solver++(2S) ancestral.
fn dpmpp_2s_ancestral_flow(run: &mut Run, mut x: Tensor, options: AncestralNoise) -> Result<Tensor> {
    let mut noise = run.step_noise(&x);
    let (eta, s_noise) = (options.eta as f32, options.s_noise as f32);
    let lambda = |sigma: f32| ((1.0 - sigma) / sigma).ln();
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        let (sigma_down, renoise_scale, renoise) = flow_ancestral_step(sigma, sigma_next, eta);
        run.report(i, &x, &denoised)?;
        if sigma_next == 0.0 {
            let d = to_d(&x, sigma, &denoised)?;
            x = step(&x, &d, sigma_down - sigma)?;
        } else {
            let sigma_s = if sigma == 1.0 {
                0.9999
            } else {
                let (t_i, t_down) = (lambda(sigma), lambda(sigma_down));
                let s = t_i + 0.5 * (t_down - t_i);
                1.0 / (s.exp() + 1.0)
            };
            let ratio = sigma_s / sigma;
            let u = combine(ratio, &x, 1.0 - ratio, &denoised)?;
            let denoised_2 = run.denoise(&u, sigma_s)?;
            let down_ratio = sigma_down / sigma;
            x = combine(down_ratio, &x, 1.0 - down_ratio, &denoised_2)?;
            if options.eta > 0.0 {
                let fresh = scaled_noise(&mut noise, sigma, sigma_next, s_noise, renoise)?;
                x = ((x * f64::from(renoise_scale))? + fresh)?;
            }
        }
    }
    Ok(x)
}

pub(super) fn dpmpp_2m(run: &mut Run, mut x: Tensor) -> Result<Tensor> {
    let mut old_denoised: Option<Tensor> = None;
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        run.report(i, &x, &denoised)?;
        let (t, t_next) = (t_of(sigma), t_of(sigma_next));
        let h = t_next - t;
        let ratio = sigma_of(t_next) / sigma_of(t);
        let factor = -(-h).exp_m1();
        x = match &old_denoised {
            Some(old) if sigma_next != 0.0 => {
                let r = (t - t_of(run.sigmas[i - 1])) / h;
                let blended = combine(1.0 + 1.0 / (2.0 * r), &denoised, -(1.0 / (2.0 * r)), old)?;
                combine(ratio, &x, factor, &blended)?
            }
            _ => combine(ratio, &x, factor, &denoised)?,
        };
        old_denoised = Some(denoised);
    }
    Ok(x)
}

/// DPM-Solver++ (stochastic): an intermediate step to the fraction `r` of the step in λ, then
/// the full step, each with Brownian-tree noise.
pub(super) fn dpmpp_sde(run: &mut Run, mut x: Tensor, options: AncestralNoise, r: f64) -> Result<Tensor> {
    if run.sigmas.len() <= 1 {
        return Ok(x);
    }
    if r == 0.0 {
        return Err(candle_core::Error::Msg(
            "dpmpp_sde: r must not be 0 (float division by zero)".into(),
        ));
    }
    let mut noise = run.brownian_noise(&x);
    run.offset_first_sigma_for_snr();
    let (eta, s_noise) = (options.eta as f32, options.s_noise as f32);
    let noisy = options.eta > 0.0 && options.s_noise > 0.0;
    let fac = 1.0 / (2.0 * r);
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
        let lambda_s_1 = lambda_s + r as f32 * h;
        let sigma_s_1 = run.sigma_from_half_log_snr(lambda_s_1);
        let alpha_s = sigma * lambda_s.exp();
        let alpha_s_1 = sigma_s_1 * lambda_s_1.exp();
        let alpha_t = sigma_next * lambda_t.exp();

        let (sd, su) = ancestral_step((-lambda_s).exp(), (-lambda_s_1).exp(), eta);
        let h_ = -sd.ln() - lambda_s;
        let mut x_2 = combine(
            alpha_s_1 / alpha_s * (-h_).exp(),
            &x,
            -alpha_s_1 * (-h_).exp_m1(),
            &denoised,
        )?;
        if noisy {
            let fresh = ((noise.next(sigma, sigma_s_1)? * f64::from(alpha_s_1))? * f64::from(s_noise))?;
            x_2 = (x_2 + (fresh * f64::from(su))?)?;
        }
        let denoised_2 = run.denoise(&x_2, sigma_s_1)?;

        let (sd, su) = ancestral_step((-lambda_s).exp(), (-lambda_t).exp(), eta);
        let h_ = -sd.ln() - lambda_s;
        let denoised_d = combine((1.0 - fac) as f32, &denoised, fac as f32, &denoised_2)?;
        x = combine(
            alpha_t / alpha_s * (-h_).exp(),
            &x,
            -alpha_t * (-h_).exp_m1(),
            &denoised_d,
        )?;
        if noisy {
            let fresh = ((noise.next(sigma, sigma_next)? * f64::from(alpha_t))? * f64::from(s_noise))?;
            x = (x + (fresh * f64::from(su))?)?;
        }
    }
    Ok(x)
}

/// The part every DPM-Solver++ multistep SDE step shares: the first-order SDE update
/// `σ_{i+1}/σ_i·e^{−ηh}·x + α_t·(1 − e^{−(η+1)h})·D`. Returns it with α_t, h and (η + 1)·h.
fn sde_first_order(run: &Run, x: &Tensor, denoised: &Tensor, i: usize, eta: f64) -> Result<(Tensor, f32, f32, f32)> {
    let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
    let (lambda_s, lambda_t) = (run.half_log_snr(sigma), run.half_log_snr(sigma_next));
    let h = lambda_t - lambda_s;
    let h_eta = h * (eta + 1.0) as f32;
    let alpha_t = sigma_next * lambda_t.exp();
    let x = combine(
        sigma_next / sigma * (-h * eta as f32).exp(),
        x,
        alpha_t * -(-h_eta).exp_m1(),
        denoised,
    )?;
    Ok((x, alpha_t, h, h_eta))
}

/// The SDE noise term `n·σ_{i+1}·√(1 − e^{−2ηh})·s_noise`, where η and s_noise are positive.
fn add_sde_noise(
    x: Tensor,
    noise: &mut dyn NoiseSource,
    (sigma, sigma_next): (f32, f32),
    h: f32,
    options: AncestralNoise,
) -> Result<Tensor> {
    if options.eta <= 0.0 || options.s_noise <= 0.0 {
        return Ok(x);
    }
    let amount = (-(-2.0 * h * options.eta as f32).exp_m1()).sqrt();
    let fresh = ((noise.next(sigma, sigma_next)? * f64::from(sigma_next))? * f64::from(amount))?;
    x + (fresh * f64::from(options.s_noise as f32))?
}

pub(super) fn dpmpp_2m_sde(
    run: &mut Run,
    mut x: Tensor,
    options: AncestralNoise,
    solver: SolverType,
) -> Result<Tensor> {
    if run.sigmas.len() <= 1 {
        return Ok(x);
    }
    let mut noise = run.brownian_noise(&x);
    run.offset_first_sigma_for_snr();
    let mut old_denoised: Option<Tensor> = None;
    let mut h_last: Option<f32> = None;
    let mut h: Option<f32> = None;
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        run.report(i, &x, &denoised)?;
        if sigma_next == 0.0 {
            x = denoised.clone();
        } else {
            let (updated, alpha_t, step_h, h_eta) = sde_first_order(run, &x, &denoised, i, options.eta)?;
            x = updated;
            h = Some(step_h);
            if let (Some(old), Some(h_last)) = (&old_denoised, h_last) {
                let r = h_last / step_h;
                let coefficient = match solver {
                    SolverType::Midpoint => 0.5 * alpha_t * -(-h_eta).exp_m1() * (1.0 / r),
                    SolverType::Heun => alpha_t * (-(-h_eta).exp_m1() / (-h_eta) + 1.0) * (1.0 / r),
                };
                x = (x + ((&denoised - old)? * f64::from(coefficient))?)?;
            }
            x = add_sde_noise(x, &mut noise, (sigma, sigma_next), step_h, options)?;
        }
        old_denoised = Some(denoised);
        h_last = h;
    }
    Ok(x)
}

pub(super) fn dpmpp_3m_sde(run: &mut Run, mut x: Tensor, options: AncestralNoise) -> Result<Tensor> {
    if run.sigmas.len() <= 1 {
        return Ok(x);
    }
    let mut noise = run.brownian_noise(&x);
    run.offset_first_sigma_for_snr();
    let (mut denoised_1, mut denoised_2): (Option<Tensor>, Option<Tensor>) = (None, None);
    let (mut h, mut h_1, mut h_2): (Option<f32>, Option<f32>, Option<f32>) = (None, None, None);
    for i in 0..run.steps() {
        let (sigma, sigma_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        run.report(i, &x, &denoised)?;
        if sigma_next == 0.0 {
            x = denoised.clone();
        } else {
            let (updated, alpha_t, step_h, h_eta) = sde_first_order(run, &x, &denoised, i, options.eta)?;
            x = updated;
            h = Some(step_h);
            let phi_2 = (-h_eta).exp_m1() / h_eta + 1.0;
            match (&denoised_1, &denoised_2, h_1, h_2) {
                (Some(d_1), Some(d_2), Some(h_1), Some(h_2)) => {
                    let r0 = h_1 / step_h;
                    let r1 = h_2 / step_h;
                    let d1_0 = ((&denoised - d_1)? / f64::from(r0))?;
                    let d1_1 = ((d_1 - d_2)? / f64::from(r1))?;
                    let d1 = (&d1_0 + ((&d1_0 - &d1_1)? * f64::from(r0 / (r0 + r1)))?)?;
                    let d2 = ((&d1_0 - &d1_1)? / f64::from(r0 + r1))?;
                    let phi_3 = phi_2 / h_eta - 0.5;
                    x = ((x + (d1 * f64::from(alpha_t * phi_2))?)? - (d2 * f64::from(alpha_t * phi_3))?)?;
                }
                (Some(d_1), _, Some(h_1), _) => {
                    let r = h_1 / step_h;
                    let d = ((&denoised - d_1)? / f64::from(r))?;
                    x = (x + (d * f64::from(alpha_t * phi_2))?)?;
                }
                _ => {}
            }
            x = add_sde_noise(x, &mut noise, (sigma, sigma_next), step_h, options)?;
        }
        denoised_2 = denoised_1.replace(denoised);
        h_2 = h_1;
        h_1 = h;
    }
    Ok(x)
}
