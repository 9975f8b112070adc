//! The IP-Adapter's cross-attention (`CrossAttentionPatch.py`): a replacement of the UNet's
//! cross-attentions that computes the text attention as before and adds, for every IP-Adapter
//! applied there whose σ range holds the step, the attention of the same queries to the image
//! tokens' keys and values, weighted by the weight type and masked by the attention mask.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Result, Tensor, D};
use easel_models::architectures::ip_adapter::IpAdapter;
use easel_models::architectures::unet_patches::{AttentionReplace, AttentionSite, BatchPart, BlockPosition};
use easel_models::kernels::attention::attention;

use crate::image::resample::interpolate_mask;
use crate::image::Mask;

/// The pack's `WEIGHT_TYPES`.
pub const WEIGHT_TYPES: [&str; 15] = [
    "linear",
    "ease in",
    "ease out",
    "ease in-out",
    "reverse in-out",
    "weak input",
    "weak output",
    "weak middle",
    "strong middle",
    "style transfer",
    "composition",
    "strong style transfer",
    "style and composition",
    "style transfer precise",
    "composition precise",
];

/// How IPAdapterAdvanced can combine the embeddings of several images.
pub const COMBINE_METHODS: [&str; 5] = ["concat", "add", "subtract", "average", "norm average"];

/// The pack's `embeds_scaling` choices.
pub const EMBEDS_SCALINGS: [&str; 4] = ["V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"];

/// How the image attention is scaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbedsScaling {
    /// The attention's output times the weight.
    ValueOnly,
    /// Keys and values times the weight.
    KeyValue,
    /// Keys and values times the weight and the inner width over 1280.
    KeyValuePenalty,
    /// Keys times that, the values' mean over the tokens times it.
    KeyMeanValuePenalty,
}

impl EmbedsScaling {
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "V only" => EmbedsScaling::ValueOnly,
            "K+V" => EmbedsScaling::KeyValue,
            "K+V w/ C penalty" => EmbedsScaling::KeyValuePenalty,
            "K+mean(V) w/ C penalty" => EmbedsScaling::KeyMeanValuePenalty,
            _ => return None,
        })
    }
}

/// The weight of one application: one number, or one per transformer (the layer-dependent weight
/// types, keyed by transformer index; transformers left out get nothing).
#[derive(Clone, Debug, PartialEq)]
pub enum LayerWeight {
    Uniform(f64),
    PerTransformer(BTreeMap<usize, f64>),
}

/// One IP-Adapter applied to a model (the pack's `patch_kwargs` less `module_key`).
pub struct IpAdapterApplication {
    pub adapter: Arc<IpAdapter>,
    pub weight: LayerWeight,
    /// The weight type's name, one of [`WEIGHT_TYPES`].
    pub weight_type: &'static str,
    /// Image tokens [images, T, width] for the conditional and unconditional chunks.
    pub cond: Tensor,
    pub uncond: Tensor,
    pub mask: Option<Mask>,
    pub sigma_start: f32,
    pub sigma_end: f32,
    /// Each batch item takes its own image (IPAdapterBatch) rather than all of them.
    pub unfold_batch: bool,
    pub embeds_scaling: EmbedsScaling,
    /// The mask resized per token grid.
    resized_masks: Mutex<HashMap<(usize, usize), Tensor>>,
}

impl IpAdapterApplication {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        adapter: Arc<IpAdapter>,
        weight: LayerWeight,
        weight_type: &'static str,
        cond: Tensor,
        uncond: Tensor,
        mask: Option<Mask>,
        sigma_range: (f32, f32),
        unfold_batch: bool,
        embeds_scaling: EmbedsScaling,
    ) -> Self {
        IpAdapterApplication {
            adapter,
            weight,
            weight_type,
            cond,
            uncond,
            mask,
            sigma_start: sigma_range.0,
            sigma_end: sigma_range.1,
            unfold_batch,
            embeds_scaling,
            resized_masks: Mutex::new(HashMap::new()),
        }
    }

    /// `ipadapter_attention`: what this application adds to the attention output `out`
    /// [B, N, inner] of queries `q` at module `module` (`None`: nothing at this transformer).
    fn attend(&self, module: usize, site: &AttentionSite, q: &Tensor) -> Result<Option<Tensor>> {
        let transformer = site.transformer_index;
        let layers = self.adapter.config().transformer_count();
        let (mut cond, mut uncond) = (self.cond.clone(), self.uncond.clone());
        let layers_f = layers as f64;
        let t = transformer as f64;
        let weight = match (&self.weight, self.weight_type) {
            (LayerWeight::Uniform(weight), kind) => {
                weight
                    * match (kind, site.block) {
                        ("ease in", _) => 0.05 + 0.95 * (1.0 - t / layers_f),
                        ("ease out", _) => 0.05 + 0.95 * (t / layers_f),
                        ("ease in-out", _) => 0.05 + 0.95 * (1.0 - (t - layers_f / 2.0).abs() / (layers_f / 2.0)),
                        ("reverse in-out", _) => 0.05 + 0.95 * ((t - layers_f / 2.0).abs() / (layers_f / 2.0)),
                        ("weak input", BlockPosition::Input(_))
                        | ("weak middle", BlockPosition::Middle)
                        | ("weak output", BlockPosition::Output(_))
                        | ("strong middle", BlockPosition::Input(_) | BlockPosition::Output(_)) => 0.2,
                        _ => 1.0,
                    }
            }
            (LayerWeight::PerTransformer(weights), kind) => {
                let Some(&weight) = weights.get(&transformer) else {
                    return Ok(None);
                };
                let composition_layer = match layers {
                    11 => transformer == 3,
                    _ => transformer == 4 || transformer == 5,
                };
                let swapped = match kind {
                    "style transfer precise" => composition_layer,
                    "composition precise" => !composition_layer,
                    _ => false,
                };
                if swapped {
                    uncond = cond.clone();
                    cond = cond.zeros_like()?;
                }
                weight
            }
        };
        if weight == 0.0 {
            return Ok(None);
        }
        let parts = &site.call.parts;
        let batch = q.dim(0)?;
        let per_part = batch / parts.len().max(1);
        let key_value = |tokens: &Tensor| -> Result<(Tensor, Tensor)> {
            match self.adapter.key_value(module, tokens)? {
                Some(key_value) => Ok(key_value),
                None => candle_core::bail!("this IP-Adapter has no module {module}"),
            }
        };
        let (k_cond, v_cond) = key_value(&cond)?;
        let (k_uncond, v_uncond) = key_value(&uncond)?;
        let inner = k_cond.dim(D::Minus1)?;
        let scale = match self.embeds_scaling {
            EmbedsScaling::KeyValuePenalty | EmbedsScaling::KeyMeanValuePenalty => weight * inner as f64 / 1280.0,
            _ => weight,
        };
        let scaled = |k: Tensor, v: Tensor| -> Result<(Tensor, Tensor)> {
            Ok(match self.embeds_scaling {
                EmbedsScaling::ValueOnly => (k, v),
                EmbedsScaling::KeyValue | EmbedsScaling::KeyValuePenalty => ((k * scale)?, (v * scale)?),
                EmbedsScaling::KeyMeanValuePenalty => {
                    let mean = v.mean_keepdim(1)?;
                    (
                        (k * scale)?,
                        ((v.broadcast_sub(&mean))?.broadcast_add(&(mean * scale)?))?,
                    )
                }
            })
        };
        let (k_cond, v_cond) = scaled(k_cond, v_cond)?;
        let (k_uncond, v_uncond) = scaled(k_uncond, v_uncond)?;
        // Each chunk's keys for its `per_part` items: every image's tokens one after another
        // (the pack's view of the repeated batch), or one image per item when unfolded.
        let for_items = |t: &Tensor| -> Result<Tensor> {
            if self.unfold_batch {
                return to_size(t, per_part);
            }
            let (images, tokens, width) = t.dims3()?;
            t.reshape((1, images * tokens, width))?.repeat((per_part, 1, 1))
        };
        let chunks = |cond: &Tensor, uncond: &Tensor| -> Result<Tensor> {
            let (cond, uncond) = (for_items(cond)?, for_items(uncond)?);
            let pieces: Vec<&Tensor> = parts
                .iter()
                .map(|part| match part {
                    BatchPart::Cond => &cond,
                    BatchPart::Uncond => &uncond,
                })
                .collect();
            Tensor::cat(&pieces, 0)
        };
        let (ip_k, ip_v) = (chunks(&k_cond, &k_uncond)?, chunks(&v_cond, &v_uncond)?);
        let mut out = attention(
            q,
            &ip_k.to_dtype(q.dtype())?,
            &ip_v.to_dtype(q.dtype())?,
            site.heads,
            None,
        )?;
        if self.embeds_scaling == EmbedsScaling::ValueOnly {
            out = (out * weight)?;
        }
        if let Some(mask) = &self.mask {
            out = out.broadcast_mul(&self.token_mask(mask, site, out.dim(1)?, per_part, parts.len())?)?;
        }
        Ok(Some(out))
    }

    /// The attention mask over this call's tokens [B, N, 1]: resized bilinearly to the token
    /// grid (its height from the latent's aspect ratio), one per item, padded or cropped to the
    /// tokens where the grid does not fit them exactly.
    fn token_mask(
        &self,
        mask: &Mask,
        site: &AttentionSite,
        tokens: usize,
        per_part: usize,
        parts: usize,
    ) -> Result<Tensor> {
        let [_, _, height, width] = site.call.original_shape;
        let (height, width) = (height as f64, width as f64);
        let mask_h = (height / (height * width / tokens as f64).sqrt()) as usize;
        let mask_h = mask_h.max(1);
        let mask_h = mask_h + usize::from(!tokens.is_multiple_of(mask_h));
        let mask_w = tokens / mask_h;
        let resized = {
            let mut cache = self
                .resized_masks
                .lock()
                .map_err(|_| candle_core::Error::Msg("the IP-Adapter's mask cache was poisoned".into()))?;
            match cache.get(&(mask_h, mask_w)) {
                Some(resized) => resized.clone(),
                None => {
                    let image = interpolate_mask(mask, mask_h, mask_w)
                        .map_err(|error| candle_core::Error::Msg(error.to_string()))?;
                    let resized = Tensor::from_vec(image.data, (image.batch, mask_h * mask_w), self.cond.device())?;
                    cache.insert((mask_h, mask_w), resized.clone());
                    resized
                }
            }
        };
        let per_item = to_size(&resized, per_part)?.repeat((parts, 1))?;
        let length = mask_h * mask_w;
        let fitted = if length < tokens {
            let pad = tokens - length;
            per_item.pad_with_zeros(1, pad / 2, pad - pad / 2)?
        } else {
            per_item.narrow(1, (length - tokens) / 2, tokens)?
        };
        fitted.unsqueeze(D::Minus1)?.to_dtype(DType::F32)
    }
}

/// The pack's `tensor_to_size`: the first `size` items, the last repeated when there are fewer.
pub fn to_size(t: &Tensor, size: usize) -> Result<Tensor> {
    let items = t.dim(0)?;
    if items >= size {
        return t.narrow(0, 0, size);
    }
    let last = t.narrow(0, items - 1, 1)?;
    let mut repeat = vec![1; t.rank()];
    repeat[0] = size - items;
    Tensor::cat(&[t, &last.repeat(repeat.as_slice())?], 0)
}

/// The replacement of one cross-attention: the IP-Adapters applied there, in order, each with
/// its module number there (`Attn2Replace`).
#[derive(Clone)]
pub struct IpAdapterAttention {
    applications: Vec<(Arc<IpAdapterApplication>, usize)>,
}

impl IpAdapterAttention {
    /// `existing`'s applications (when it is an IP-Adapter replacement) followed by `added` at
    /// module `module`.
    pub fn extended(existing: Option<&dyn AttentionReplace>, added: Arc<IpAdapterApplication>, module: usize) -> Self {
        let mut applications = existing
            .and_then(|existing| (existing as &dyn Any).downcast_ref::<IpAdapterAttention>())
            .map(|existing| existing.applications.clone())
            .unwrap_or_default();
        applications.push((added, module));
        IpAdapterAttention { applications }
    }
}

impl AttentionReplace for IpAdapterAttention {
    fn attend(&self, site: &AttentionSite, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let mut out = attention(q, k, v, site.heads, None)?;
        let sigma = site.call.sigma;
        for (application, module) in &self.applications {
            if sigma <= application.sigma_start && sigma >= application.sigma_end {
                if let Some(added) = application.attend(*module, site, q)? {
                    out = (out + added)?;
                }
            }
        }
        Ok(out)
    }
}
