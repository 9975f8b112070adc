//! UNet block patches: FreeU and FreeU_V2 (`comfy_extras/nodes_freelunch.py`: the backbone
//! features amplified and the skip features' lowest frequencies damped, at the decoder levels of
//! 4× and 2× the model's channels) and Kohya's deep shrink (`nodes_model_downscale.py`: one input
//! block's output shrunk while σ is in a range, the decoder scaled back to the skips' size).

use candle_core::{DType, Result, Tensor, D};
use easel_models::architectures::unet_patches::{CallInfo, UNetPatch};

use crate::image::resample::{common_upscale, ResizeMethod};
use crate::latent::nodes::{image_as_latents, latents_as_image};
use crate::model::fourier::fourier_filter;

/// FreeU's scales for one decoder width: the backbone factor `b`, the skip factor `s`.
#[derive(Clone, Copy, Debug)]
pub struct FreeUScales {
    pub backbone: f64,
    pub skip: f64,
}

/// FreeU (`adaptive` false) or FreeU_V2 (`adaptive` true) on a UNet of `model_channels`.
pub struct FreeU {
    pub model_channels: usize,
    /// At 4× and at 2× the model's channels.
    pub scales: [FreeUScales; 2],
    pub adaptive: bool,
}

impl FreeU {
    fn scales_for(&self, channels: usize) -> Option<FreeUScales> {
        if channels == self.model_channels * 4 {
            Some(self.scales[0])
        } else if channels == self.model_channels * 2 {
            Some(self.scales[1])
        } else {
            None
        }
    }
}

impl UNetPatch for FreeU {
    fn output_block(&self, _: &CallInfo, _: usize, h: Tensor, skip: Tensor) -> Result<(Tensor, Tensor)> {
        let channels = h.dim(1)?;
        let Some(scales) = self.scales_for(channels) else {
            return Ok((h, skip));
        };
        let half = channels / 2;
        let backbone = h.narrow(1, 0, half)?;
        let factor = if self.adaptive {
            // The channel mean normalised to [0, 1] per item: (b − 1)·mean + 1.
            let mean = h.mean_keepdim(1)?;
            let flat = mean.flatten_from(1)?;
            let (low, high) = (flat.min_keepdim(D::Minus1)?, flat.max_keepdim(D::Minus1)?);
            let shape = [h.dim(0)?, 1, 1, 1];
            let normalised = mean
                .broadcast_sub(&low.reshape(&shape[..])?)?
                .broadcast_div(&(high - &low)?.reshape(&shape[..])?)?;
            backbone.broadcast_mul(&normalised.affine(scales.backbone - 1.0, 1.0)?)?
        } else {
            (backbone * scales.backbone)?
        };
        let h = Tensor::cat(&[&factor, &h.narrow(1, half, channels - half)?], 1)?;
        let (height, width) = (skip.dim(D::Minus2)?, skip.dim(D::Minus1)?);
        let (centre_row, centre_column) = (height / 2, width / 2);
        let rows = centre_row.saturating_sub(1)..centre_row + 1;
        let columns = centre_column.saturating_sub(1)..centre_column + 1;
        let skip_scale = scales.skip as f32;
        let skip = fourier_filter(&skip.to_dtype(DType::F32)?, |row, column| {
            if rows.contains(&row) && columns.contains(&column) {
                skip_scale
            } else {
                1.0
            }
        })?
        .to_dtype(skip.dtype())?;
        Ok((h, skip))
    }
}

/// PatchModelAddDownscale (Kohya deep shrink): input block `block` shrunk by `factor` while σ
/// is within [`sigma_end`, `sigma_start`], and every decoder input whose size differs from its
/// skip's resized to it.
pub struct DeepShrink {
    pub block: usize,
    pub factor: f64,
    pub sigma_start: f64,
    pub sigma_end: f64,
    pub after_skip: bool,
    pub downscale: ResizeMethod,
    pub upscale: ResizeMethod,
}

impl DeepShrink {
    fn shrink(&self, call: &CallInfo, index: usize, h: Tensor) -> Result<Tensor> {
        let sigma = f64::from(call.sigma);
        if index != self.block || sigma > self.sigma_start || sigma < self.sigma_end {
            return Ok(h);
        }
        let (height, width) = (h.dim(D::Minus2)?, h.dim(D::Minus1)?);
        let scaled = |size: usize| ((size as f64) * (1.0 / self.factor)).round_ties_even() as usize;
        resize_hidden(&h, scaled(width), scaled(height), self.downscale)
    }
}

impl UNetPatch for DeepShrink {
    fn input_block(&self, call: &CallInfo, index: usize, h: Tensor) -> Result<Tensor> {
        match self.after_skip {
            true => Ok(h),
            false => self.shrink(call, index, h),
        }
    }

    fn input_block_after_skip(&self, call: &CallInfo, index: usize, h: Tensor) -> Result<Tensor> {
        match self.after_skip {
            true => self.shrink(call, index, h),
            false => Ok(h),
        }
    }

    fn output_block(&self, _: &CallInfo, _: usize, h: Tensor, skip: Tensor) -> Result<(Tensor, Tensor)> {
        if h.dim(2)? == skip.dim(2)? {
            return Ok((h, skip));
        }
        let (height, width) = (skip.dim(D::Minus2)?, skip.dim(D::Minus1)?);
        Ok((resize_hidden(&h, width, height, self.upscale)?, skip))
    }
}

/// Hidden states [B, C, H, W] resized as `common_upscale(…, crop="disabled")` resizes them.
fn resize_hidden(h: &Tensor, width: usize, height: usize, method: ResizeMethod) -> Result<Tensor> {
    let message = |error: easel_engine::NodeError| candle_core::Error::Msg(error.to_string());
    let image = latents_as_image(h).map_err(message)?;
    let resized = common_upscale(&image, width.max(1), height.max(1), method, false, false).map_err(message)?;
    image_as_latents(resized, h.device())
        .map_err(message)?
        .to_dtype(h.dtype())
}
