//! Linear multistep samplers on the derivative d = (x − D)/σ: LMS (of any order), iPNDM (fixed and variable
//! step) and DEIS (tAB coefficients integrated in the VP time of the EDM σ range).

use candle_core::{Result, Tensor};

use super::{step, to_d, weighted_sum, Run};

/// The 4-point Gauss–Legendre rule on [−1, 1] (nodes, weights): exact for polynomials up to
/// degree 7, which covers the Lagrange bases of LMS up to order 8.
const GAUSS_LEGENDRE_4: [(f64, f64); 4] = [
    (-0.861_136_311_594_052_6, 0.347_854_845_137_453_85),
    (-0.339_981_043_584_856_3, 0.652_145_154_862_546_1),
    (0.339_981_043_584_856_3, 0.652_145_154_862_546_1),
    (0.861_136_311_594_052_6, 0.347_854_845_137_453_85),
];

/// The `points`-point Gauss–Legendre rule on [−1, 1]: the roots of the Legendre polynomial
/// P_points by Newton's method, with their weights. Exact for polynomials up to degree
/// 2·points − 1.
fn gauss_legendre(points: usize) -> Vec<(f64, f64)> {
    if points == GAUSS_LEGENDRE_4.len() {
        return GAUSS_LEGENDRE_4.to_vec();
    }
    let n = points as f64;
    (0..points)
        .map(|i| {
            let mut z = (std::f64::consts::PI * (i as f64 + 0.75) / (n + 0.5)).cos();
            let mut derivative = 1.0;
            for _ in 0..100 {
                let (mut p1, mut p2) = (1.0f64, 0.0f64);
                for j in 1..=points {
                    let p3 = p2;
                    p2 = p1;
                    p1 = ((2 * j - 1) as f64 * z * p2 - (j - 1) as f64 * p3) / j as f64;
                }
                derivative = n * (z * p1 - p2) / (z * z - 1.0);
                let previous = z;
                z = previous - p1 / derivative;
                if (z - previous).abs() <= 1e-15 {
                    break;
                }
            }
            (-z, 2.0 / ((1.0 - z * z) * derivative * derivative))
        })
        .collect()
}

/// `∫_a^b f` by the Gauss–Legendre rule `rule`.
fn integrate(rule: &[(f64, f64)], f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
    rule.iter().map(|(x, w)| w * f(mid + half * x)).sum::<f64>() * half
}

/// The product of Lagrange factors `Π_{k≠j} (τ − t_k)/(t_j − t_k)` over the points `points`.
fn lagrange_basis(points: &[f64], j: usize, tau: f64) -> f64 {
    points
        .iter()
        .enumerate()
        .filter(|(k, _)| *k != j)
        .map(|(_, t_k)| (tau - t_k) / (points[j] - t_k))
        .product()
}

/// k-diffusion's LMS of the given order: coefficients are the integrals of the Lagrange bases
/// through the last σ values over [σ_i, σ_{i+1}] (exactly, as `scipy.integrate.quad` gets them).
pub(super) fn lms(run: &mut Run, mut x: Tensor, order: usize) -> Result<Tensor> {
    let order = order.max(1);
    let rule = gauss_legendre(order.div_ceil(2).max(GAUSS_LEGENDRE_4.len()));
    let sigmas: Vec<f64> = run.sigmas.iter().map(|s| f64::from(*s)).collect();
    let mut ds: Vec<Tensor> = Vec::new();
    for i in 0..run.steps() {
        let sigma = run.sigmas[i];
        let denoised = run.denoise(&x, sigma)?;
        ds.push(to_d(&x, sigma, &denoised)?);
        if ds.len() > order {
            ds.remove(0);
        }
        run.report(i, &x, &denoised)?;
        if run.sigmas[i + 1] == 0.0 {
            x = denoised;
            continue;
        }
        let current_order = order.min(i + 1);
        let points: Vec<f64> = (0..current_order).map(|k| sigmas[i - k]).collect();
        let terms: Vec<(f64, &Tensor)> = (0..current_order)
            .map(|j| {
                let basis = |tau| lagrange_basis(&points, j, tau);
                let coefficient = integrate(&rule, basis, sigmas[i], sigmas[i + 1]);
                (f64::from(coefficient as f32), &ds[ds.len() - 1 - j])
            })
            .collect();
        x = (x + weighted_sum(&terms)?)?;
    }
    Ok(x)
}

/// Keeps the last `max_order − 1` derivatives, newest last.
fn remember(history: &mut Vec<Tensor>, d: Tensor, max_order: usize) {
    if history.len() == max_order - 1 {
        history.remove(0);
    }
    history.push(d);
}

/// iPNDM with the fixed Adams–Bashforth weights of orders 1–4.
pub(super) fn ipndm(run: &mut Run, x: Tensor) -> Result<Tensor> {
    const MAX_ORDER: usize = 4;
    let mut x_next = x;
    let mut history: Vec<Tensor> = Vec::new();
    for i in 0..run.steps() {
        let (t_cur, t_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let x_cur = x_next;
        let denoised = run.denoise(&x_cur, t_cur)?;
        run.report(i, &x_cur, &denoised)?;
        let d_cur = to_d(&x_cur, t_cur, &denoised)?;
        let n = history.len();
        x_next = if t_next == 0.0 {
            denoised
        } else {
            let slope = match MAX_ORDER.min(i + 1) {
                1 => d_cur.clone(),
                2 => (weighted_sum(&[(3.0, &d_cur), (-1.0, &history[n - 1])])? / 2.0)?,
                3 => (weighted_sum(&[(23.0, &d_cur), (-16.0, &history[n - 1]), (5.0, &history[n - 2])])? / 12.0)?,
                _ => {
                    let sum = weighted_sum(&[
                        (55.0, &d_cur),
                        (-59.0, &history[n - 1]),
                        (37.0, &history[n - 2]),
                        (-9.0, &history[n - 3]),
                    ])?;
                    (sum / 24.0)?
                }
            };
            step(&x_cur, &slope, t_next - t_cur)?
        };
        remember(&mut history, d_cur, MAX_ORDER);
    }
    Ok(x_next)
}

/// iPNDM with weights for variable step sizes.
pub(super) fn ipndm_v(run: &mut Run, x: Tensor) -> Result<Tensor> {
    const MAX_ORDER: usize = 4;
    let t = run.sigmas.clone();
    let mut x_next = x;
    let mut history: Vec<Tensor> = Vec::new();
    for i in 0..run.steps() {
        let (t_cur, t_next) = (t[i], t[i + 1]);
        let x_cur = x_next;
        let denoised = run.denoise(&x_cur, t_cur)?;
        run.report(i, &x_cur, &denoised)?;
        let d_cur = to_d(&x_cur, t_cur, &denoised)?;
        let n = history.len();
        let h_n = t_next - t_cur;
        x_next = if t_next == 0.0 {
            denoised
        } else {
            let slope = match MAX_ORDER.min(i + 1) {
                1 => d_cur.clone(),
                2 => {
                    let h_n_1 = t_cur - t[i - 1];
                    let coeff1 = (2.0 + h_n / h_n_1) / 2.0;
                    let coeff2 = -(h_n / h_n_1) / 2.0;
                    weighted_sum(&[(coeff1.into(), &d_cur), (coeff2.into(), &history[n - 1])])?
                }
                3 => {
                    let h_n_1 = t_cur - t[i - 1];
                    let h_n_2 = t[i - 1] - t[i - 2];
                    let temp =
                        (1.0 - h_n / (3.0 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2.0;
                    let coeff1 = (2.0 + h_n / h_n_1) / 2.0 + temp;
                    let coeff2 = -(h_n / h_n_1) / 2.0 - (1.0 + h_n_1 / h_n_2) * temp;
                    let coeff3 = temp * h_n_1 / h_n_2;
                    weighted_sum(&[
                        (coeff1.into(), &d_cur),
                        (coeff2.into(), &history[n - 1]),
                        (coeff3.into(), &history[n - 2]),
                    ])?
                }
                _ => {
                    let h_n_1 = t_cur - t[i - 1];
                    let h_n_2 = t[i - 1] - t[i - 2];
                    let h_n_3 = t[i - 2] - t[i - 3];
                    let temp1 =
                        (1.0 - h_n / (3.0 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1)) / (h_n_1 * (h_n_1 + h_n_2))) / 2.0;
                    let temp2 = ((1.0 - h_n / (3.0 * (h_n + h_n_1))) / 2.0
                        + (1.0 - h_n / (2.0 * (h_n + h_n_1))) * h_n / (6.0 * (h_n + h_n_1 + h_n_2)))
                        * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2))
                        / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3));
                    let ratio = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3));
                    let coeff1 = (2.0 + h_n / h_n_1) / 2.0 + temp1 + temp2;
                    let coeff2 =
                        -(h_n / h_n_1) / 2.0 - (1.0 + h_n_1 / h_n_2) * temp1 - (1.0 + h_n_1 / h_n_2 + ratio) * temp2;
                    let coeff3 = temp1 * h_n_1 / h_n_2 + (h_n_1 / h_n_2 + ratio * (1.0 + h_n_2 / h_n_3)) * temp2;
                    let coeff4 = -temp2 * ratio * h_n_1 / h_n_2;
                    weighted_sum(&[
                        (coeff1.into(), &d_cur),
                        (coeff2.into(), &history[n - 1]),
                        (coeff3.into(), &history[n - 2]),
                        (coeff4.into(), &history[n - 3]),
                    ])?
                }
            };
            step(&x_cur, &slope, h_n)?
        };
        remember(&mut history, d_cur, MAX_ORDER);
    }
    Ok(x_next)
}

/// DEIS's VP time for EDM σ values (ε_s = 1e-3 on the EDM range σ ∈ [0.002, 80]), and the
/// schedule's β₀, β₁.
struct VpTime {
    beta_0: f64,
    beta_1: f64,
    beta_d: f64,
}

impl VpTime {
    fn edm() -> Self {
        const EPSILON_S: f64 = 1e-3;
        let (sigma_min, sigma_max) = (0.002f64, 80.0f64);
        let beta_d = 2.0 * ((sigma_min * sigma_min + 1.0).ln() / EPSILON_S - (sigma_max * sigma_max + 1.0).ln())
            / (EPSILON_S - 1.0);
        let beta_min = (sigma_max * sigma_max + 1.0).ln() - 0.5 * beta_d;
        VpTime {
            beta_0: beta_min,
            beta_1: beta_d + beta_min,
            beta_d,
        }
    }

    fn t(&self, sigma: f64) -> f64 {
        ((self.beta_0 * self.beta_0 + 2.0 * self.beta_d * (sigma * sigma + 1.0).ln()).sqrt() - self.beta_0)
            / self.beta_d
    }

    /// −½·(d ln α/dτ) / √(α(1 − α)) with α(τ) = exp(−½τ²(β₁ − β₀) − τβ₀).
    fn integrand(&self, tau: f64) -> f64 {
        let alpha = (-0.5 * tau * tau * (self.beta_1 - self.beta_0) - tau * self.beta_0).exp();
        let d_log_alpha = -tau * (self.beta_1 - self.beta_0) - self.beta_0;
        -0.5 * d_log_alpha / (alpha * (1.0 - alpha)).sqrt()
    }
}

/// DEIS tAB coefficients for step i of the given order: Riemann sums over 10 000 points of the
/// integrand times each Lagrange basis through the last `order` VP times.
fn deis_coefficients(vp: &VpTime, t_steps: &[f64], i: usize, order: usize) -> Vec<f64> {
    const POINTS: usize = 10_000;
    let (t_cur, t_next) = (t_steps[i], t_steps[i + 1]);
    let dtau = (t_next - t_cur) / POINTS as f64;
    let previous: Vec<f64> = (0..order).map(|k| t_steps[i - k]).collect();
    let taus: Vec<f64> = (0..POINTS)
        .map(|n| t_cur + (t_next - t_cur) * n as f64 / (POINTS - 1) as f64)
        .collect();
    (0..order)
        .map(|j| {
            taus.iter()
                .map(|tau| vp.integrand(*tau) * lagrange_basis(&previous, j, *tau))
                .sum::<f64>()
                * dtau
        })
        .collect()
}

pub(super) fn deis(run: &mut Run, x: Tensor) -> Result<Tensor> {
    const MAX_ORDER: usize = 3;
    let vp = VpTime::edm();
    let t_steps: Vec<f64> = run.sigmas.iter().map(|s| vp.t(f64::from(*s))).collect();
    let mut x_next = x;
    let mut history: Vec<Tensor> = Vec::new();
    for i in 0..run.steps() {
        let (t_cur, t_next) = (run.sigmas[i], run.sigmas[i + 1]);
        let x_cur = x_next;
        let denoised = run.denoise(&x_cur, t_cur)?;
        run.report(i, &x_cur, &denoised)?;
        let d_cur = to_d(&x_cur, t_cur, &denoised)?;
        let order = if t_next <= 0.0 { 1 } else { MAX_ORDER.min(i + 1) };
        x_next = if order == 1 {
            step(&x_cur, &d_cur, t_next - t_cur)?
        } else {
            let coefficients = deis_coefficients(&vp, &t_steps, i, order);
            let n = history.len();
            let mut terms: Vec<(f64, &Tensor)> = vec![(f64::from(coefficients[0] as f32), &d_cur)];
            for (k, coefficient) in coefficients.iter().enumerate().skip(1) {
                terms.push((f64::from(*coefficient as f32), &history[n - k]));
            }
            (&x_cur + weighted_sum(&terms)?)?
        };
        remember(&mut history, d_cur, MAX_ORDER);
    }
    Ok(x_next)
}
