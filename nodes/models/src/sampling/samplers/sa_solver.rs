//! SA-Solver (stochastic Adams, NeurIPS 2023) as ComfyUI runs it: data prediction in the
//! half-log-SNR λ with predictor and corrector orders (3 and 4 by default), stochasticity τ = η
//! within a σ interval (by default η = 1 between the model's 20 % and 80 % points) and 0
//! elsewhere; PECE re-evaluates the corrected state. Like ComfyUI, it returns the corrected
//! state, which on a schedule ending above σ = 0 is the one at the penultimate σ.

use candle_core::{Result, Tensor};

use super::{solve_linear, weighted_sum, NoiseSource, Run, SaSolverOptions, TauInterval};

/// `(1 + τ²)·∫ₛᵗ e^{(1+τ²)(x−t)}·x^p dx` for p = 0…order−1, by the integration-by-parts recursion.
fn exponential_coefficients(s: f64, t: f64, order: usize, tau: f64) -> Vec<f64> {
    let tau_mul = 1.0 + tau * tau;
    let h = t - s;
    let product_terms: Vec<f64> = (0..order)
        .map(|p| t.powi(p as i32) - s.powi(p as i32) * (-tau_mul * h).exp())
        .collect();
    let factorial = |n: usize| (1..=n).map(|k| k as f64).product::<f64>();
    (0..order)
        .map(|i| {
            (0..=i)
                .map(|j| {
                    let depth = (i - j) as i32;
                    let sign = if depth % 2 == 0 { 1.0 } else { -1.0 };
                    let tau_factor = if tau > 0.0 { tau_mul.powi(-depth) } else { 1.0 };
                    sign * factorial(i) / factorial(j) * tau_factor * product_terms[j]
                })
                .sum()
        })
        .collect()
}

/// `compute_stochastic_adams_b_coeffs`: the weights of the stored predictions whose λ values
/// are `lambdas`, for a step from λ_s to λ_t ending at σ_next.
fn adams_coefficients(sigma_next: f32, lambdas: &[f32], lambda_s: f32, lambda_t: f32, tau: f64) -> Vec<f64> {
    let order = lambdas.len();
    let integrals = exponential_coefficients(f64::from(lambda_s), f64::from(lambda_t), order, tau);
    let vandermonde_t: Vec<Vec<f64>> = (0..order)
        .map(|power| lambdas.iter().map(|l| f64::from(*l).powi(power as i32)).collect())
        .collect();
    let lagrange = solve_linear(vandermonde_t, integrals);
    let alpha_t = f64::from(sigma_next * lambda_t.exp());
    lagrange
        .into_iter()
        .map(|value| f64::from((alpha_t * value) as f32))
        .collect()
}

/// `compute_simple_stochastic_adams_b_coeffs`: the paper's simplified order-2 weights (oldest
/// first), in float32 as ComfyUI computes them.
fn simple_adams_coefficients(
    sigma_next: f32,
    lambdas: &[f32],
    lambda_s: f32,
    lambda_t: f32,
    tau: f64,
    corrector: bool,
) -> Vec<f64> {
    let tau_mul = (1.0 + tau * tau) as f32;
    let h = lambda_t - lambda_s;
    let alpha_t = sigma_next * lambda_t.exp();
    let decay = -(-h * tau_mul).exp_m1();
    let (older, newer) = if corrector {
        let newer = alpha_t * (0.5 * tau_mul * h);
        (alpha_t * decay - newer, newer)
    } else {
        let older = alpha_t * (0.5 * tau_mul * (h * h)) / (lambdas[0] - lambda_s);
        (older, alpha_t * decay - older)
    };
    vec![f64::from(older), f64::from(newer)]
}

/// `Σ_k b_k · prediction_k` over the last `b.len()` predictions.
fn combine_predictions(predictions: &[Tensor], b: &[f64]) -> Result<Tensor> {
    let recent = &predictions[predictions.len() - b.len()..];
    let terms: Vec<(f64, &Tensor)> = b.iter().copied().zip(recent).collect();
    weighted_sum(&terms)
}

pub(super) fn sa_solver(run: &mut Run, x: Tensor, options: &SaSolverOptions) -> Result<Tensor> {
    if run.sigmas.len() <= 1 {
        return Ok(x);
    }
    let mut noise = run.step_noise(&x);
    run.offset_first_sigma_for_snr();
    let sigmas = run.sigmas.clone();
    let lambdas: Vec<f32> = sigmas.iter().map(|s| run.half_log_snr(*s)).collect();
    let interval = options.tau.unwrap_or_else(|| TauInterval {
        start_sigma: run.schedule.percent_to_sigma(0.2),
        end_sigma: run.schedule.percent_to_sigma(0.8),
        eta: 1.0,
    });
    let coefficients = |sigma_next: f32, points: &[f32], lambda_s: f32, lambda_t: f32, tau: f64, corrector: bool| {
        if options.simple_order_2 && points.len() == 2 {
            simple_adams_coefficients(sigma_next, points, lambda_s, lambda_t, tau, corrector)
        } else {
            adams_coefficients(sigma_next, points, lambda_s, lambda_t, tau)
        }
    };
    let max_used_order = options.predictor_order.max(options.corrector_order);
    let noisy = |tau: f64| tau > 0.0 && options.s_noise > 0.0;
    let n = sigmas.len();
    let lower_order_to_end = sigmas[n - 1] == 0.0;

    let mut x = x;
    let mut x_pred = x.clone();
    let mut h = 0.0f32;
    let mut tau_t = 0.0f64;
    let mut step_noise: Option<Tensor> = None;
    let mut predictions: Vec<Tensor> = Vec::new();
    for i in 0..run.steps() {
        let mut denoised = run.denoise(&x_pred, sigmas[i])?;
        run.report(i, &x_pred, &denoised)?;
        predictions.push(denoised.clone());
        if predictions.len() > max_used_order {
            predictions.remove(0);
        }
        let mut predictor_order = options.predictor_order.min(predictions.len());
        let mut corrector_order = if i == 0 || (sigmas[i + 1] == 0.0 && !options.use_pece) {
            0
        } else {
            options.corrector_order.min(predictions.len())
        };
        if lower_order_to_end {
            predictor_order = predictor_order.min(n - 2 - i);
            corrector_order = corrector_order.min(n - 1 - i);
        }

        if corrector_order == 0 {
            x = x_pred.clone();
        } else {
            let points = &lambdas[i + 1 - corrector_order..=i];
            let b = coefficients(sigmas[i], points, lambdas[i - 1], lambdas[i], tau_t, true);
            let corrected = combine_predictions(&predictions, &b)?;
            let decay = sigmas[i] / sigmas[i - 1] * ((-(tau_t * tau_t)) as f32 * h).exp();
            x = ((&x * f64::from(decay))? + corrected)?;
            if let Some(step_noise) = step_noise.as_ref().filter(|_| noisy(tau_t)) {
                x = (x + step_noise)?;
            }
            if options.use_pece {
                denoised = run.denoise(&x, sigmas[i])?;
                let last = predictions.len() - 1;
                predictions[last] = denoised.clone();
            }
        }

        if sigmas[i + 1] == 0.0 {
            x = denoised;
        } else {
            tau_t = interval.tau(sigmas[i + 1]);
            let points = &lambdas[i + 1 - predictor_order..=i];
            let b = coefficients(sigmas[i + 1], points, lambdas[i], lambdas[i + 1], tau_t, false);
            let predicted = combine_predictions(&predictions, &b)?;
            h = lambdas[i + 1] - lambdas[i];
            let decay = sigmas[i + 1] / sigmas[i] * ((-(tau_t * tau_t)) as f32 * h).exp();
            x_pred = ((&x * f64::from(decay))? + predicted)?;
            if noisy(tau_t) {
                let amount = (-((-2.0 * tau_t * tau_t) as f32 * h).exp_m1()).sqrt();
                let fresh = ((noise.next(sigmas[i], sigmas[i + 1])? * f64::from(sigmas[i + 1]))? * f64::from(amount))?;
                let fresh = (fresh * f64::from(options.s_noise as f32))?;
                x_pred = (x_pred + &fresh)?;
                step_noise = Some(fresh);
            }
        }
    }
    Ok(x)
}
