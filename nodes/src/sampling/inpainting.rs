//! Denoisers wrapped around the guider for inpainting: a latent noise mask keeps the unmasked
//! parts on the original latent (noised to the current σ) at every step, and DifferentialDiffusion
//! thresholds a soft mask by the step's progress.

use candle_core::{DType, Tensor};
use easel_models::sampling::samplers::Denoiser;
use easel_models::sampling::schedule::SigmaSchedule;

use crate::model::diffusion_model::Prediction;

/// ComfyUI's `KSamplerX0Inpaint`: where the denoise mask is 0 the network sees the original
/// latent noised to the current σ, and its prediction is replaced by the original latent, so
/// that sampling changes only the masked part.
pub(crate) struct Inpainting<'a> {
    pub(crate) inner: &'a mut dyn Denoiser,
    pub(crate) mask: Tensor,
    /// 1 − mask.
    pub(crate) keep: Tensor,
    /// The original latent, in model space.
    pub(crate) latent: Tensor,
    /// The initial noise, before scaling.
    pub(crate) noise: Tensor,
    /// How the model noises latents.
    pub(crate) prediction: Prediction,
    pub(crate) differential: Option<DifferentialDiffusion<'a>>,
}

impl Inpainting<'_> {
    /// The mask at σ and its complement: the denoise mask, or DifferentialDiffusion's
    /// thresholding of it.
    fn masks_at(&self, sigma: f32) -> candle_core::Result<(Tensor, Tensor)> {
        match &self.differential {
            Some(differential) => {
                let mask = differential.mask_at(&self.mask, sigma)?;
                let keep = (1.0 - &mask)?;
                Ok((mask, keep))
            }
            None => Ok((self.mask.clone(), self.keep.clone())),
        }
    }

    fn network_input(&self, x: &Tensor, sigma: f32, (mask, keep): &(Tensor, Tensor)) -> candle_core::Result<Tensor> {
        let noised = self.prediction.noise_scaling(sigma, &self.noise, &self.latent, false)?;
        (x * mask)? + (noised * keep)?
    }

    fn kept(&self, denoised: &Tensor, (mask, keep): &(Tensor, Tensor)) -> candle_core::Result<Tensor> {
        (denoised * mask)? + (&self.latent * keep)?
    }
}

impl Denoiser for Inpainting<'_> {
    fn denoise(&mut self, x: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
        let masks = self.masks_at(sigma)?;
        let input = self.network_input(x, sigma, &masks)?;
        let denoised = self.inner.denoise(&input, sigma)?;
        self.kept(&denoised, &masks)
    }

    fn denoise_with_uncond(&mut self, x: &Tensor, sigma: f32) -> candle_core::Result<(Tensor, Tensor)> {
        let masks = self.masks_at(sigma)?;
        let input = self.network_input(x, sigma, &masks)?;
        let (guided, uncond) = self.inner.denoise_with_uncond(&input, sigma)?;
        Ok((self.kept(&guided, &masks)?, uncond))
    }
}

/// ComfyUI's DifferentialDiffusion (`denoise_mask_function`): at each step the mask keeps the
/// parts whose value reaches the step's progress, `threshold = (t(σ) − t_to) / (t_from − t_to)`
/// between the run's first timestep and its last (at least σ_min's); a strength below 1 blends
/// that binary mask with the original one (a strength of 0 counts as none, as in ComfyUI).
pub(crate) struct DifferentialDiffusion<'a> {
    strength: f64,
    schedule: &'a SigmaSchedule,
    timestep_from: f32,
    timestep_to: f32,
}

impl<'a> DifferentialDiffusion<'a> {
    pub(crate) fn new(strength: f64, schedule: &'a SigmaSchedule, sigmas: &[f32]) -> Self {
        let sigma_from = sigmas.first().copied().unwrap_or(0.0);
        let sigma_to = sigmas.last().copied().unwrap_or(0.0).max(schedule.sigma_min());
        DifferentialDiffusion {
            strength,
            schedule,
            timestep_from: schedule.timestep(sigma_from),
            timestep_to: schedule.timestep(sigma_to),
        }
    }

    fn mask_at(&self, mask: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
        let threshold = (self.schedule.timestep(sigma) - self.timestep_to) / (self.timestep_from - self.timestep_to);
        let threshold = Tensor::new(threshold, mask.device())?.broadcast_as(mask.shape())?;
        let binary = mask.ge(&threshold)?.to_dtype(DType::F32)?;
        if self.strength > 0.0 && self.strength < 1.0 {
            (binary * self.strength)? + (mask * (1.0 - self.strength))?
        } else {
            Ok(binary)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// DifferentialDiffusion keeps, at each step, the parts of the mask that reach the step's
    /// progress between the first timestep and the last (σ_min's at least); a strength below 1
    /// blends that with the mask, 0 counts as 1 (ComfyUI's `if strength and strength < 1`).
    #[test]
    fn differential_diffusion_thresholds_the_mask_by_progress() {
        let schedule = SigmaSchedule::flow(1.0, 1.0);
        let sigma_min = schedule.sigma_min();
        let sigmas = [1.0, 0.75, 0.5, 0.0];
        let mask = Tensor::new(&[0.2f32, 0.5, 0.7, 0.9], &Device::Cpu).unwrap();
        let values = |t: Tensor| t.to_vec1::<f32>().unwrap();
        let threshold = (0.75 * 1.0 - sigma_min) / (1.0 - sigma_min);
        assert!(threshold > 0.7 && threshold < 0.75, "{threshold}");
        for (strength, expected) in [
            (1.0, vec![0.0, 0.0, 0.0, 1.0]),
            (0.0, vec![0.0, 0.0, 0.0, 1.0]),
            (0.5, vec![0.1, 0.25, 0.35, 0.95]),
        ] {
            let differential = DifferentialDiffusion::new(strength, &schedule, &sigmas);
            let got = values(differential.mask_at(&mask, 0.75).unwrap());
            for (got, expected) in got.iter().zip(&expected) {
                assert!(
                    (got - expected).abs() < 1e-6,
                    "strength {strength}: {got} vs {expected}"
                );
            }
        }
        // At the first step everything below 1 is kept; at σ_min everything is changed.
        let differential = DifferentialDiffusion::new(1.0, &schedule, &sigmas);
        assert_eq!(values(differential.mask_at(&mask, 1.0).unwrap()), vec![0.0; 4]);
        assert_eq!(values(differential.mask_at(&mask, sigma_min).unwrap()), vec![1.0; 4]);
    }
}
