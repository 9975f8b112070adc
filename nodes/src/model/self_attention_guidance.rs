//! SelfAttentionGuidance (`comfy_extras/nodes_sag.py`): the middle block's first self-attention
//! is computed with its attention map kept for the negative side; after guidance, the negative
//! prediction is blurred where that map says the model attends most, noised back, predicted again,
//! and the guided result pushed away from that prediction by `scale`.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor, D};
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use easel_models::architectures::unet_patches::{
    AttentionKind, AttentionReplace, AttentionSite, BatchPart, BlockPosition, ReplaceKey,
};

use crate::model::diffusion_model::{DiffusionModel, Model};
use crate::model::patches::{GuidanceArgs, GuidedPredictions, PostCfgFunction};
use crate::runtime::experimental;

/// The attention map of the negative side's last middle-block call, [B·heads, queries, keys].
type RecordedMap = Arc<Mutex<Option<Tensor>>>;

/// The middle block's first self-attention, computed plainly, keeping the negative chunk's map.
struct RecordingAttention {
    map: RecordedMap,
}

/// Attention returning the values and the softmaxed map (`attention_basic_with_sim`).
pub fn attention_with_map(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<(Tensor, Tensor)> {
    let (batch, queries, width) = q.dims3()?;
    let keys = k.dim(1)?;
    let head_dim = width / heads;
    let split = |t: &Tensor, length: usize| -> Result<Tensor> {
        t.reshape((batch, length, heads, head_dim))?
            .transpose(1, 2)?
            .reshape((batch * heads, length, head_dim))?
            .to_dtype(DType::F32)?
            .contiguous()
    };
    let (q, k, v) = (split(q, queries)?, split(k, keys)?, split(v, keys)?);
    let scores = (q.matmul(&k.t()?)? * (head_dim as f64).powf(-0.5))?;
    let shifted = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?.exp()?;
    let map = shifted.broadcast_div(&shifted.sum_keepdim(D::Minus1)?)?;
    let out = map
        .matmul(&v)?
        .reshape((batch, heads, queries, head_dim))?
        .transpose(1, 2)?
        .reshape((batch, queries, width))?;
    Ok((out, map))
}

impl AttentionReplace for RecordingAttention {
    fn attend(&self, site: &AttentionSite, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (out, map) = attention_with_map(q, k, v, site.heads)?;
        let parts = &site.call.parts;
        if let Some(index) = parts.iter().position(|part| *part == BatchPart::Uncond) {
            let per_part = site.heads * (q.dim(0)? / parts.len().max(1));
            let recorded = map.narrow(0, per_part * index, per_part)?;
            *self
                .map
                .lock()
                .map_err(|_| candle_core::Error::Msg("SAG's attention map was poisoned".into()))? = Some(recorded);
        }
        out.to_dtype(q.dtype())
    }
}

/// The post-CFG half of SAG.
struct SelfAttentionGuidance {
    scale: f64,
    blur_sigma: f64,
    map: RecordedMap,
}

/// What the attention map marks of each item: for every key position, whether the heads'
/// mean attention summed over the queries passes 1, [B, keys] as 0/1.
fn attended_keys(map: &Tensor, batch: usize) -> Result<Tensor> {
    let (_, queries, keys) = map.dims3()?;
    let mean = map.reshape((batch, (), queries, keys))?.mean(1)?;
    mean.sum(1)?.gt(1.0)?.to_dtype(DType::F32)
}

/// ComfyUI's `create_blur_map`: `x0` [B, C, H, W] blurred (Gaussian, 9 taps) where the map's
/// marked positions are, the marks laid out as the closest-to-the-latent's-aspect grid and
/// scaled to the latent with nearest-neighbour sampling.
pub fn blur_where_attended(x0: &Tensor, map: &Tensor, sigma: f64) -> Result<Tensor> {
    let (batch, _, height, width) = x0.dims4()?;
    let marks = attended_keys(map, batch)?;
    let total = marks.dim(1)?;
    let guess = ((height as f64 / width as f64) * total as f64).sqrt().round_ties_even() as usize;
    let rows = (0..((total as f64).sqrt() / 2.0).floor() as usize)
        .find_map(|i| {
            [guess + i, guess.saturating_sub(i).max(1)]
                .into_iter()
                .find(|j| total % j == 0)
        })
        .ok_or_else(|| candle_core::Error::Msg(format!("no grid of {total} attention positions fits the latent")))?;
    let columns = total / rows;
    // F.interpolate's default (legacy) nearest: source index floor(out · in / out_size).
    let pick = |size: usize, from: usize| -> Vec<u32> {
        (0..size)
            .map(|i| ((i as f64 * from as f64 / size as f64).floor() as usize).min(from - 1) as u32)
            .collect()
    };
    let device = x0.device();
    let mask = marks
        .reshape((batch, 1, rows, columns))?
        .index_select(&Tensor::new(pick(height, rows).as_slice(), device)?, 2)?
        .index_select(&Tensor::new(pick(width, columns).as_slice(), device)?, 3)?;
    let blurred = gaussian_blur(x0, sigma)?;
    (blurred.broadcast_mul(&mask)? + x0.broadcast_mul(&mask.affine(-1.0, 1.0)?)?)?.contiguous()
}

/// ComfyUI's `gaussian_blur_2d` with 9 taps: each channel convolved with the outer product of a
/// normalised Gaussian over −4…4, the image reflect-padded by 4.
fn gaussian_blur(x: &Tensor, sigma: f64) -> Result<Tensor> {
    const TAPS: usize = 9;
    const HALF: usize = TAPS / 2;
    let (batch, channels, height, width) = x.dims4()?;
    let pdf: Vec<f32> = (0..TAPS)
        .map(|i| {
            let offset = (i as f32 - HALF as f32) / sigma as f32;
            (-0.5 * offset * offset).exp()
        })
        .collect();
    let total: f32 = pdf.iter().sum();
    let taps: Vec<f32> = pdf.iter().map(|p| p / total).collect();
    let values: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let reflect = |index: isize, size: usize| -> usize {
        let size = size as isize;
        let mirrored = if index < 0 { -index } else { index };
        (if mirrored >= size {
            2 * (size - 1) - mirrored
        } else {
            mirrored
        }) as usize
    };
    let mut out = vec![0f32; values.len()];
    for plane in 0..batch * channels {
        let source = &values[plane * height * width..(plane + 1) * height * width];
        let target = &mut out[plane * height * width..(plane + 1) * height * width];
        for row in 0..height {
            for column in 0..width {
                let mut sum = 0f32;
                for (dy, ky) in taps.iter().enumerate() {
                    let y = reflect(row as isize + dy as isize - HALF as isize, height);
                    for (dx, kx) in taps.iter().enumerate() {
                        let x = reflect(column as isize + dx as isize - HALF as isize, width);
                        sum += ky * kx * source[y * width + x];
                    }
                }
                target[row * width + column] = sum;
            }
        }
    }
    Tensor::from_vec(out, (batch, channels, height, width), &Device::Cpu)?
        .to_device(x.device())?
        .to_dtype(x.dtype())
}

impl PostCfgFunction for SelfAttentionGuidance {
    fn apply(&self, args: &GuidanceArgs, predictions: &GuidedPredictions, denoised: Tensor) -> Result<Tensor> {
        let (height, width) = (denoised.dim(D::Minus2)?, denoised.dim(D::Minus1)?);
        if height.min(width) <= 4 {
            return Ok(denoised);
        }
        let Some(uncond) = args.uncond else {
            return Ok(denoised);
        };
        let map = self
            .map
            .lock()
            .map_err(|_| candle_core::Error::Msg("SAG's attention map was poisoned".into()))?
            .clone()
            .ok_or_else(|| candle_core::Error::Msg("SAG found no attention map of the negative side".into()))?;
        let degraded = blur_where_attended(&predictions.uncond, &map, self.blur_sigma)?;
        let noised = ((&degraded + args.x)? - &predictions.uncond)?;
        let prediction = args
            .model
            .predict_side(uncond, &noised, args.sigma, &Default::default())?;
        denoised + ((degraded - prediction)? * self.scale)?
    }
}

/// `SelfAttentionGuidance` ("Self-Attention Guidance").
pub struct SelfAttentionGuidanceNode;

impl Node for SelfAttentionGuidanceNode {
    fn schema(&self, _: &Services) -> NodeSchema {
        experimental(
            NodeSchema::v3("SelfAttentionGuidance", "comfy_extras.nodes_sag", "_for_testing")
                .display("Self-Attention Guidance")
                .required("model", InputSpec::of("MODEL"))
                .required("scale", InputSpec::float(0.5, -2.0, 5.0).opt("step", 0.01))
                .required("blur_sigma", InputSpec::float(2.0, 0.0, 10.0).opt("step", 0.1))
                .output(OutputSpec::of("MODEL")),
        )
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> std::result::Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        if model.0.network.unet().is_none() {
            return Err(NodeError::value(
                "SelfAttentionGuidance patches a UNet's middle block; this model has none",
            ));
        }
        let map = RecordedMap::default();
        let mut patches = model.0.patches.with_post_cfg(Arc::new(SelfAttentionGuidance {
            scale: inputs.float("scale")?,
            blur_sigma: inputs.float("blur_sigma")?,
            map: map.clone(),
        }));
        patches.disable_cfg1_optimization = true;
        patches.unet.replace(
            ReplaceKey {
                kind: AttentionKind::SelfAttention,
                block: BlockPosition::Middle,
                block_index: Some(0),
            },
            Arc::new(RecordingAttention { map }),
        );
        Ok(NodeOutput::values(vec![Value::object(Model(Arc::new(
            DiffusionModel {
                patches,
                ..(*model.0).clone()
            },
        )))]))
    }
}
