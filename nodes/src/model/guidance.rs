//! Guidance patches (`advanced/guidance` and friends): functions the sampler calls around
//! classifier-free guidance, each the arithmetic of its ComfyUI node (`comfy_extras/nodes_cfg.py`,
//! `nodes_model_advanced.py`, `nodes_mahiro.py`, `nodes_eps.py`, `nodes_apg.py`,
//! `nodes_tcfg.py`, `nodes_fresca.py`, `nodes_pag.py`). Predictions are denoised latents
//! [B, C, H, W]; where ComfyUI works on the noise `x − denoised` the same formula is applied to it.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Result, Tensor, D};
use easel_models::architectures::unet_patches::{
    AttentionKind, AttentionReplace, AttentionSite, BlockPosition, ReplaceKey, UNetPatches,
};

use crate::model::fourier::fourier_filter;
use crate::model::patches::{
    CallPatches, CfgFunction, GuidanceArgs, GuidedPredictions, PostCfgFunction, PreCfgFunction,
};

/// `t` [B, …] as [B, N].
fn per_item(t: &Tensor) -> Result<Tensor> {
    t.flatten_from(1)
}

/// Per-item factors [B] shaped to multiply `like` [B, …].
fn broadcastable(factors: &Tensor, like: &Tensor) -> Result<Tensor> {
    let mut shape = vec![1; like.rank()];
    shape[0] = like.dim(0)?;
    factors.reshape(shape)
}

/// The L2 norm of each batch item, [B].
fn item_norms(t: &Tensor) -> Result<Tensor> {
    per_item(t)?.sqr()?.sum(1)?.sqrt()
}

/// RescaleCFG: guidance computed on the v-prediction, whose standard deviation is then brought
/// back towards the positive prediction's by `multiplier`.
pub struct RescaleCfg {
    pub multiplier: f64,
}

impl CfgFunction for RescaleCfg {
    fn guide(&self, args: &GuidanceArgs, cond: &Tensor, uncond: &Tensor) -> Result<Tensor> {
        let sigma = f64::from(args.sigma);
        let variance = sigma * sigma + 1.0;
        let scaled = (args.x / variance)?;
        let to_v = |denoised: &Tensor| -> Result<Tensor> { (&scaled - denoised)? * (variance.sqrt() / sigma) };
        let (cond_v, uncond_v) = (to_v(cond)?, to_v(uncond)?);
        let guided = (&uncond_v + ((&cond_v - &uncond_v)? * args.cond_scale)?)?;
        let std = |t: &Tensor| -> Result<Tensor> { per_item(t)?.var_keepdim(1)?.sqrt() };
        let ratio = broadcastable(&(std(&cond_v)? / std(&guided)?)?.flatten_all()?, &guided)?;
        let rescaled = guided.broadcast_mul(&ratio)?;
        let blended = ((rescaled * self.multiplier)? + (&guided * (1.0 - self.multiplier))?)?;
        scaled - (blended * (sigma / variance.sqrt()))?
    }
}

/// CFGZeroStar: the negative prediction rescaled by the optimal projection of the positive
/// noise onto the negative one.
pub struct CfgZeroStar;

impl PostCfgFunction for CfgZeroStar {
    fn apply(&self, args: &GuidanceArgs, predictions: &GuidedPredictions, denoised: Tensor) -> Result<Tensor> {
        let positive = per_item(&(args.x - &predictions.cond)?)?;
        let negative = per_item(&(args.x - &predictions.uncond)?)?;
        let dot = (&positive * &negative)?.sum(1)?;
        let squared_norm = (negative.sqr()?.sum(1)? + 1e-8)?;
        let alpha = broadcastable(&(dot / squared_norm)?, &denoised)?;
        let uncond = &predictions.uncond;
        let shift = uncond.broadcast_mul(&(&alpha - 1.0)?)?;
        let towards = (uncond.broadcast_mul(&alpha.affine(-1.0, 1.0)?)? * args.cond_scale)?;
        (denoised + shift)? + towards
    }
}

/// CFGNorm: the guided prediction's channel norm capped at the positive prediction's, times
/// `strength`.
pub struct CfgNorm {
    pub strength: f64,
}

impl PostCfgFunction for CfgNorm {
    fn apply(&self, _: &GuidanceArgs, predictions: &GuidedPredictions, denoised: Tensor) -> Result<Tensor> {
        let channel_norm = |t: &Tensor| -> Result<Tensor> { t.sqr()?.sum_keepdim(1)?.sqrt() };
        let scale = channel_norm(&predictions.cond)?
            .div(&(channel_norm(&denoised)? + 1e-8)?)?
            .clamp(0f32, 1f32)?;
        denoised.broadcast_mul(&scale)? * self.strength
    }
}

/// Mahiro: the guided prediction blended with the positive one scaled by cfg, as far as the
/// signed square roots of the negative leap and the merge agree (cosine similarity over the
/// channels, averaged).
pub struct Mahiro;

impl PostCfgFunction for Mahiro {
    fn apply(&self, args: &GuidanceArgs, predictions: &GuidedPredictions, denoised: Tensor) -> Result<Tensor> {
        let leap = (&predictions.cond * args.cond_scale)?;
        let negative_leap = (&predictions.uncond * args.cond_scale)?;
        let merge = ((&leap + &denoised)? / 2.0)?;
        let signed_root = |t: &Tensor| -> Result<Tensor> { t.abs()?.sqrt()? * t.sign()? };
        let (a, b) = (signed_root(&negative_leap)?, signed_root(&merge)?);
        let dot = (&a * &b)?.sum(1)?;
        let norms = (a.sqr()?.sum(1)?.sqrt()? * b.sqr()?.sum(1)?.sqrt()?)?.maximum(1e-8f32)?;
        let similarity = (dot / norms)?.mean_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let weight = 2.0 * (similarity + 1.0);
        ((denoised * weight)? + (leap * (4.0 - weight))?)? / 4.0
    }
}

/// Epsilon Scaling: the guided noise divided by `factor` (exposure bias).
pub struct EpsilonScaling {
    pub factor: f64,
}

impl PostCfgFunction for EpsilonScaling {
    fn apply(&self, args: &GuidanceArgs, _: &GuidedPredictions, denoised: Tensor) -> Result<Tensor> {
        args.x - ((args.x - denoised)? / self.factor)?
    }
}

/// APG (adaptive projected guidance): the guidance direction (optionally a running average,
/// reset when σ rises), its norm capped, its part along the positive prediction scaled by `eta`;
/// the positive prediction rewritten so that plain CFG gives that.
pub struct AdaptiveProjectedGuidance {
    pub eta: f64,
    pub norm_threshold: f64,
    pub momentum: f64,
    /// The running average and the σ of the last step (kept across runs, as ComfyUI's closure
    /// keeps them).
    pub state: Mutex<(Option<Tensor>, Option<f32>)>,
}

impl PreCfgFunction for AdaptiveProjectedGuidance {
    fn apply(&self, args: &GuidanceArgs, [cond, uncond]: [Tensor; 2]) -> Result<[Tensor; 2]> {
        let mut guidance = (&cond - &uncond)?;
        {
            let mut state = self
                .state
                .lock()
                .map_err(|_| candle_core::Error::Msg("APG's state was poisoned".into()))?;
            let (running, previous_sigma) = &mut *state;
            if previous_sigma.is_some_and(|previous| args.sigma > previous) {
                *running = None;
            }
            *previous_sigma = Some(args.sigma);
            if self.momentum != 0.0 {
                let average = match running.take() {
                    Some(average) if average.dims() == guidance.dims() => ((average * self.momentum)? + &guidance)?,
                    _ => guidance.clone(),
                };
                *running = Some(average.clone());
                guidance = average;
            }
        }
        if self.norm_threshold > 0.0 {
            let norms = item_norms(&guidance)?;
            let scale = norms.recip()?.affine(self.norm_threshold, 0.0)?.minimum(1f32)?;
            guidance = guidance.broadcast_mul(&broadcastable(&scale, &guidance)?)?;
        }
        let unit = cond.broadcast_div(&broadcastable(&item_norms(&cond)?.maximum(1e-12f32)?, &cond)?)?;
        let along = broadcastable(&per_item(&(&guidance * &unit)?)?.sum(1)?, &unit)?;
        let parallel = unit.broadcast_mul(&along)?;
        let orthogonal = (&guidance - &parallel)?;
        let modified = (orthogonal + (parallel * self.eta)?)?;
        let cond = ((&uncond + modified)? + ((&cond - &uncond)? / args.cond_scale)?)?;
        Ok([cond, uncond])
    }
}

/// TCFG (tangential damping): the negative noise projected on the first right singular vector of
/// the [negative noise; positive noise] matrix of each item.
pub struct TangentialDamping;

impl PreCfgFunction for TangentialDamping {
    fn apply(&self, args: &GuidanceArgs, [cond, uncond]: [Tensor; 2]) -> Result<[Tensor; 2]> {
        if args.uncond.is_none() {
            return Ok([cond, uncond]);
        }
        let positive = per_item(&(args.x - &cond)?)?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let negative = per_item(&(args.x - &uncond)?)?.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let damped: Vec<f32> = positive
            .iter()
            .zip(&negative)
            .flat_map(|(positive, negative)| tangentially_damped(negative, positive))
            .collect();
        let damped = Tensor::from_vec(damped, uncond.shape(), uncond.device())?.to_dtype(uncond.dtype())?;
        Ok([cond, (args.x - damped)?])
    }
}

/// `negative` projected on the first right singular vector of the 2×N matrix [negative;
/// positive]: that vector is along `e₀·negative + e₁·positive` for the top eigenvector e of the
/// 2×2 Gram matrix.
fn tangentially_damped(negative: &[f64], positive: &[f64]) -> Vec<f32> {
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let (nn, np, pp) = (
        dot(negative, negative),
        dot(negative, positive),
        dot(positive, positive),
    );
    let half_gap = (nn - pp) / 2.0;
    let top = (nn + pp) / 2.0 + (half_gap * half_gap + np * np).sqrt();
    let (e0, e1) = if np == 0.0 {
        if nn >= pp {
            (1.0, 0.0)
        } else {
            (0.0, 1.0)
        }
    } else if (top - pp).abs() >= (top - nn).abs() {
        (top - pp, np)
    } else {
        (np, top - nn)
    };
    let direction: Vec<f64> = negative.iter().zip(positive).map(|(n, p)| e0 * n + e1 * p).collect();
    let length = dot(&direction, &direction);
    if length == 0.0 {
        return vec![0.0; negative.len()];
    }
    let factor = dot(negative, &direction) / length;
    direction.iter().map(|d| (d * factor) as f32).collect()
}

/// FreSca: the guidance scaled by `scale_low` at the `freq_cutoff` lowest frequencies (each way
/// from the centre of the spectrum) and by `scale_high` elsewhere.
pub struct FrequencyScaling {
    pub scale_low: f32,
    pub scale_high: f32,
    pub freq_cutoff: usize,
}

impl PreCfgFunction for FrequencyScaling {
    fn apply(&self, args: &GuidanceArgs, [cond, uncond]: [Tensor; 2]) -> Result<[Tensor; 2]> {
        if args.uncond.is_none() {
            return Ok([cond, uncond]);
        }
        let guidance = (&cond - &uncond)?;
        let (height, width) = (guidance.dim(D::Minus2)?, guidance.dim(D::Minus1)?);
        let low = |centre: usize| centre - self.freq_cutoff.min(centre)..centre + self.freq_cutoff.min(centre);
        let (rows, columns) = (low(height / 2), low(width / 2));
        let filtered = fourier_filter(&guidance, |row, column| {
            if rows.contains(&row) && columns.contains(&column) {
                self.scale_low
            } else {
                self.scale_high
            }
        })?;
        Ok([(filtered + &uncond)?, uncond])
    }
}

/// PerturbedAttentionGuidance: the positive side predicted again with the middle block's
/// self-attention replaced by its values (an identity attention map), and the guided result
/// pushed away from that by `scale`.
pub struct PerturbedAttention {
    pub scale: f64,
}

/// Self-attention whose every query attends to itself only: the values.
struct IdentityAttention;

impl AttentionReplace for IdentityAttention {
    fn attend(&self, _: &AttentionSite, _: &Tensor, _: &Tensor, v: &Tensor) -> Result<Tensor> {
        Ok(v.clone())
    }
}

impl PerturbedAttention {
    /// The patches of the perturbed prediction: the middle block's self-attentions replaced.
    pub fn perturbed_patches() -> UNetPatches {
        let mut perturbed = UNetPatches::default();
        perturbed.replace(
            ReplaceKey {
                kind: AttentionKind::SelfAttention,
                block: BlockPosition::Middle,
                block_index: None,
            },
            Arc::new(IdentityAttention),
        );
        perturbed
    }
}

impl PostCfgFunction for PerturbedAttention {
    fn apply(&self, args: &GuidanceArgs, predictions: &GuidedPredictions, denoised: Tensor) -> Result<Tensor> {
        if self.scale == 0.0 {
            return Ok(denoised);
        }
        let perturbed = CallPatches {
            unet: Self::perturbed_patches(),
            ..CallPatches::default()
        };
        let prediction = args.model.predict_side(args.cond, args.x, args.sigma, &perturbed)?;
        denoised + ((&predictions.cond - prediction)? * self.scale)?
    }
}
