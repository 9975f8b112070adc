//! Live previews of sampling (ComfyUI's `latent_preview`): the current denoised estimate of the
//! first latent, coloured with the latent format's RGB factors, scaled to fit the preview size
//! and sent as JPEG with each step's progress.

use std::io::Cursor;

use candle_core::Tensor;
use easel_engine::Preview;
use image::imageops::FilterType;
use image::{DynamicImage, RgbImage};

use crate::latent::LatentFormat;

/// `--preview-method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreviewMethod {
    None,
    Auto,
    Latent2Rgb,
    Taesd,
}

/// How previews are made, a service of the node registry (no service: no previews).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PreviewSettings {
    pub method: PreviewMethod,
    /// Previews are scaled to fit a square of this many pixels.
    pub max_size: u32,
}

impl PreviewSettings {
    /// The preview of `denoised` ([B, C, H, W] in model space), or `None` when previews are off.
    /// TAESD decoders are not available yet, so `auto` and `taesd` use the RGB factors, as
    /// ComfyUI does when it finds no TAESD model.
    pub fn preview(&self, format: &LatentFormat, denoised: &Tensor) -> candle_core::Result<Option<Preview>> {
        if self.method == PreviewMethod::None || format.rgb_factors.is_empty() {
            return Ok(None);
        }
        let first = denoised.get(0)?.permute((1, 2, 0))?.contiguous()?;
        let (height, width, channels) = first.dims3()?;
        let factors: Vec<f32> = format.rgb_factors.iter().take(channels).flatten().copied().collect();
        let factors = Tensor::from_vec(factors, (channels, 3), first.device())?;
        let bias = Tensor::new(&format.rgb_bias, first.device())?;
        let rgb = first
            .reshape((height * width, channels))?
            .matmul(&factors)?
            .broadcast_add(&bias)?;
        let rgb = ((rgb + 1.0)? / 2.0)?.clamp(0f32, 1f32)?;
        let bytes: Vec<u8> = (rgb * 255.0)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|v| v as u8)
            .collect();
        let Some(image) = RgbImage::from_raw(width as u32, height as u32, bytes) else {
            return Ok(None);
        };
        Ok(Some(encode_preview(DynamicImage::ImageRgb8(image), self.max_size)))
    }
}

/// Scales to fit `max_size` (up or down, bilinear, as PIL's `ImageOps.contain`) and encodes as
/// JPEG quality 95.
fn encode_preview(image: DynamicImage, max_size: u32) -> Preview {
    let ratio = f64::from(max_size) / f64::from(image.width().max(image.height()).max(1));
    let width = ((f64::from(image.width()) * ratio).round() as u32).max(1);
    let height = ((f64::from(image.height()) * ratio).round() as u32).max(1);
    let resized = image.resize_exact(width, height, FilterType::Triangle);
    let mut bytes = Vec::new();
    let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(Cursor::new(&mut bytes), 95);
    if resized.to_rgb8().write_with_encoder(encoder).is_err() {
        bytes.clear();
    }
    Preview {
        image_type: "image/jpeg",
        bytes,
    }
}
