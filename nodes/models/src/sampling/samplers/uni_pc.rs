//! UniPC (bh1 / bh2), multistep, data prediction, as ComfyUI runs it: on the variance-preserving
//! latent x/√(1 + σ²) with the σ values themselves as time grid (a final 0 becomes 0.001), order
//! min(3, steps − 1) with lower orders at the end, and the model seen as ε-prediction.

use candle_core::{Result, Tensor};

use super::{solve_linear, weighted_sum, Run};

/// UniPC's B(h): h (bh1) or e^h − 1 (bh2).
#[derive(Clone, Copy)]
pub(super) enum Variant {
    Bh1,
    Bh2,
}

/// ComfyUI's `SigmaConvert`: the VP quantities of a σ.
fn log_mean_coeff(sigma: f32) -> f32 {
    0.5 * (1.0 / (sigma * sigma + 1.0)).ln()
}

fn marginal_alpha(sigma: f32) -> f32 {
    log_mean_coeff(sigma).exp()
}

fn marginal_std(sigma: f32) -> f32 {
    (1.0 - (2.0 * log_mean_coeff(sigma)).exp()).sqrt()
}

fn marginal_lambda(sigma: f32) -> f32 {
    let log_mean = log_mean_coeff(sigma);
    log_mean - 0.5 * (1.0 - (2.0 * log_mean).exp()).ln()
}

struct UniPc<'r, 'a> {
    run: &'r mut Run<'a>,
    variant: Variant,
}

impl UniPc<'_, '_> {
    /// The data prediction at VP latent x and σ: the denoiser sees x·√(σ² + 1); its ε is
    /// converted back to x₀ in VP terms.
    fn data_prediction(&mut self, x: &Tensor, sigma: f32) -> Result<Tensor> {
        let input = (x * f64::from((sigma * sigma + 1.0).sqrt()))?;
        let eps = ((&input - self.run.denoise(&input, sigma)?)? / f64::from(sigma))?;
        (x - (eps * f64::from(marginal_std(sigma)))?)? / f64::from(marginal_alpha(sigma))
    }

    /// `multistep_uni_pc_bh_update`: predictor from the stored model outputs, then (if asked)
    /// the corrector with a fresh model evaluation at t, which is returned for reuse.
    fn update(
        &mut self,
        x: &Tensor,
        model_prev: &[Tensor],
        t_prev: &[f32],
        t: f32,
        order: usize,
        use_corrector: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let t_prev_0 = t_prev[t_prev.len() - 1];
        let model_prev_0 = &model_prev[model_prev.len() - 1];
        let (lambda_prev_0, lambda_t) = (marginal_lambda(t_prev_0), marginal_lambda(t));
        let (sigma_prev_0, sigma_t) = (marginal_std(t_prev_0), marginal_std(t));
        let alpha_t = log_mean_coeff(t).exp();
        let h = lambda_t - lambda_prev_0;

        let mut rks: Vec<f32> = Vec::new();
        let mut d1s: Vec<Tensor> = Vec::new();
        for i in 1..order {
            let lambda_prev_i = marginal_lambda(t_prev[t_prev.len() - 1 - i]);
            let rk = (lambda_prev_i - lambda_prev_0) / h;
            rks.push(rk);
            d1s.push(((&model_prev[model_prev.len() - 1 - i] - model_prev_0)? / f64::from(rk))?);
        }
        rks.push(1.0);

        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0f32;
        let b_h = match self.variant {
            Variant::Bh1 => hh,
            Variant::Bh2 => hh.exp_m1(),
        };
        let mut rows: Vec<Vec<f64>> = Vec::new();
        let mut b: Vec<f64> = Vec::new();
        for i in 1..=order {
            rows.push(rks.iter().map(|rk| f64::from(rk.powi(i as i32 - 1))).collect());
            b.push(f64::from(h_phi_k * factorial / b_h));
            factorial *= (i + 1) as f32;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }

        let x_t_ = ((x * f64::from(sigma_t / sigma_prev_0))? - (model_prev_0 * f64::from(alpha_t * h_phi_1))?)?;
        let scale = f64::from(alpha_t * b_h);
        let x_t = if d1s.is_empty() {
            x_t_.clone()
        } else {
            let rhos_p = if order == 2 {
                vec![0.5]
            } else {
                let reduced: Vec<Vec<f64>> = rows[..order - 1].iter().map(|row| row[..order - 1].to_vec()).collect();
                solve_linear(reduced, b[..order - 1].to_vec())
            };
            let terms: Vec<(f64, &Tensor)> = rhos_p.iter().map(|r| f64::from(*r as f32)).zip(&d1s).collect();
            (&x_t_ - (weighted_sum(&terms)? * scale)?)?
        };
        if !use_corrector {
            return Ok((x_t, None));
        }
        let rhos_c = if order == 1 { vec![0.5] } else { solve_linear(rows, b) };
        let model_t = self.data_prediction(&x_t, t)?;
        let d1_t = (&model_t - model_prev_0)?;
        let last = f64::from(rhos_c[rhos_c.len() - 1] as f32);
        let correction = if d1s.is_empty() {
            (d1_t * last)?
        } else {
            let terms: Vec<(f64, &Tensor)> = rhos_c.iter().map(|r| f64::from(*r as f32)).zip(&d1s).collect();
            (weighted_sum(&terms)? + (d1_t * last)?)?
        };
        Ok(((x_t_ - (correction * scale)?)?, Some(model_t)))
    }
}

pub(super) fn uni_pc(run: &mut Run, noise: Tensor, variant: Variant) -> Result<Tensor> {
    let mut timesteps = run.sigmas.clone();
    if timesteps.len() < 2 {
        return Ok(noise);
    }
    if let Some(last) = timesteps.last_mut().filter(|last| **last == 0.0) {
        *last = 0.001;
    }
    let steps = timesteps.len() - 1;
    let order = 3.min(timesteps.len() - 2);
    let mut x = (noise / f64::from((1.0 + timesteps[0] * timesteps[0]).sqrt()))?;
    let mut solver = UniPc { run, variant };
    let mut model_prev: Vec<Tensor> = Vec::new();
    let mut t_prev: Vec<f32> = Vec::new();
    for step_index in 0..steps {
        if step_index == 0 {
            model_prev.push(solver.data_prediction(&x, timesteps[0])?);
            t_prev.push(timesteps[0]);
        } else if step_index < order {
            let t = timesteps[step_index];
            let (next, model_x) = solver.update(&x, &model_prev, &t_prev, t, step_index, true)?;
            x = next;
            let model_x = match model_x {
                Some(model_x) => model_x,
                None => solver.data_prediction(&x, t)?,
            };
            model_prev.push(model_x);
            t_prev.push(t);
        } else {
            let last = if step_index == steps - 1 {
                step_index + 1
            } else {
                step_index
            };
            for (step, &t) in timesteps.iter().enumerate().take(last + 1).skip(step_index) {
                let step_order = order.min(steps + 1 - step);
                let (next, model_x) = solver.update(&x, &model_prev, &t_prev, t, step_order, step != steps)?;
                x = next;
                for i in 0..order - 1 {
                    t_prev[i] = t_prev[i + 1];
                    model_prev[i] = model_prev[i + 1].clone();
                }
                t_prev[order - 1] = t;
                if step < steps {
                    model_prev[order - 1] = match model_x {
                        Some(model_x) => model_x,
                        None => solver.data_prediction(&x, t)?,
                    };
                }
            }
        }
        let denoised = model_prev[model_prev.len() - 1].clone();
        solver.run.report(step_index, &x, &denoised)?;
    }
    x / f64::from(marginal_alpha(timesteps[steps]))
}
