//! Real-ESRGAN's compact network, SRVGGNetCompact (spandrel's `Compact` architecture, e.g.
//! `realesr-general-x4v3`): a 3×3 convolution into `features` channels and `convs` more, each
//! followed by a per-channel PReLU, a last convolution into `out·scale²` channels
//! pixel-shuffled to the output size, plus the image enlarged by nearest neighbour.
//!
//! Layout: `body.0` (convolution), `body.1` (its PReLU's slopes), … `body.N` (the last
//! convolution), as spandrel reads it.

use candle_core::{Module, Result, Tensor};

use crate::checkpoint::DetectError;
use crate::kernels::conv::Conv2d;
use crate::weights::{TensorShapes, Weights};

/// Whether `file` holds an SRVGGNetCompact (spandrel's test).
pub fn is_compact(file: &dyn TensorShapes) -> bool {
    file.has("body.0.weight") && file.has("body.1.weight")
}

/// An SRVGGNetCompact's shape, read from its weights.
#[derive(Clone, Debug, PartialEq)]
pub struct CompactConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub features: usize,
    /// Convolutions between the first and the last.
    pub convs: usize,
    pub scale: usize,
}

impl CompactConfig {
    pub fn infer(file: &dyn TensorShapes) -> std::result::Result<Self, DetectError> {
        let first = file
            .shape("body.0.weight")
            .ok_or_else(|| DetectError::MissingTensor("body.0.weight".into()))?;
        let &[features, in_channels, ..] = first else {
            return Err(DetectError::Unrecognised(format!(
                "'body.0.weight' has shape {first:?}"
            )));
        };
        let last = file.count_indices("body.").saturating_sub(1);
        if last < 2 || !last.is_multiple_of(2) {
            return Err(DetectError::Unrecognised(format!(
                "an SRVGGNetCompact whose last layer is body.{last}"
            )));
        }
        let shuffled = file
            .shape(&format!("body.{last}.bias"))
            .and_then(<[usize]>::first)
            .copied()
            .ok_or_else(|| DetectError::MissingTensor(format!("body.{last}.bias")))?;
        // spandrel's `get_scale_and_output_channels`: the first of the input's channels, 3, 4
        // and 1 that leaves a square.
        let (scale, out_channels) = [in_channels, 3, 4, 1]
            .into_iter()
            .find_map(|channels| {
                let square = shuffled.checked_rem(channels)? == 0;
                let side = ((shuffled / channels) as f64).sqrt().round() as usize;
                (square && side * side * channels == shuffled).then_some((side, channels))
            })
            .ok_or_else(|| DetectError::Unrecognised(format!("an SRVGGNetCompact ending in {shuffled} channels")))?;
        Ok(CompactConfig {
            in_channels,
            out_channels,
            features,
            convs: (last - 2) / 2,
            scale,
        })
    }
}

/// A convolution followed by its PReLU's per-channel slopes.
struct ConvPrelu {
    conv: Conv2d,
    slopes: Tensor,
}

pub struct Compact {
    config: CompactConfig,
    body: Vec<ConvPrelu>,
    last: Conv2d,
}

impl Compact {
    pub fn new(config: CompactConfig, weights: Weights) -> Result<Self> {
        let body_weights = weights.pp("body");
        let layer = |n: usize, in_channels: usize| -> Result<ConvPrelu> {
            Ok(ConvPrelu {
                conv: Conv2d::same(in_channels, config.features, 3, 1, body_weights.pp(2 * n))?,
                slopes: body_weights.pp(2 * n + 1).get(config.features, "weight")?.reshape((
                    1,
                    config.features,
                    1,
                    1,
                ))?,
            })
        };
        let mut body = vec![layer(0, config.in_channels)?];
        for n in 1..=config.convs {
            body.push(layer(n, config.features)?);
        }
        let last = Conv2d::same(
            config.features,
            config.out_channels * config.scale * config.scale,
            3,
            1,
            body_weights.pp(2 * config.convs + 2),
        )?;
        Ok(Compact { config, body, last })
    }

    pub fn config(&self) -> &CompactConfig {
        &self.config
    }

    /// The upscaled image [B, out_channels, H·scale, W·scale] of `x` [B, C, H, W], not clamped.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for layer in &self.body {
            h = layer.conv.forward(&h)?;
            h = (h.relu()? + h.minimum(0f32)?.broadcast_mul(&layer.slopes)?)?;
        }
        let out = candle_nn::ops::pixel_shuffle(&self.last.forward(&h)?, self.config.scale)?;
        let (_, _, height, width) = x.dims4()?;
        let scale = self.config.scale;
        out + x.upsample_nearest2d(height * scale, width * scale)?
    }
}
