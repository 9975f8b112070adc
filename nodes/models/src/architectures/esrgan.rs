//! ESRGAN's RRDBNet (spandrel's `ESRGAN` architecture, which ComfyUI's UpscaleModelLoader
//! runs): a 3×3 convolution into `features` channels, a trunk of residual-in-residual dense
//! blocks (three five-convolution dense blocks each, every convolution but the last followed by
//! LeakyReLU(0.2), each block's output scaled by 0.2 and added to its input) closed by a
//! convolution and added back to the trunk's input, ×2 nearest-neighbour upsamplings each
//! followed by a convolution and LeakyReLU, a convolution with LeakyReLU and the output
//! convolution. Real-ESRGAN's 1× and 2× models first pixel-unshuffle the image. As spandrel's
//! model call does, the image is first padded to its size requirements (at least 2 pixels a
//! side; a multiple of 4 for the unshuffling models) by reflection, then by repeating the edge,
//! and the result cropped back.
//!
//! The model reads the original ESRGAN layout (`model.0`, `model.1.sub.N.RDBk.convj.0`,
//! `model.3`, …); [`old_layout_name`] gives Real-ESRGAN's (`conv_first`, `body.N.rdbk.convj`,
//! `conv_body`, `conv_upN`, `conv_hr`, `conv_last`) and BSRGAN's (`RRDB_trunk`, `trunk_conv`,
//! `upconvN`, `HRconv`) names theirs, as spandrel converts them.

use candle_core::{Module, Result, Tensor};

use crate::checkpoint::DetectError;
use crate::kernels::conv::Conv2d;
use crate::weights::{TensorShapes, Weights};

/// The smallest side spandrel lets an RRDBNet see, and the multiple an unshuffling one needs.
const MINIMUM_SIDE: usize = 2;
const UNSHUFFLED_MULTIPLE: usize = 4;
/// The slope of every LeakyReLU.
const NEGATIVE_SLOPE: f64 = 0.2;
/// The scale of each dense block's and residual-in-residual block's output before it is added.
const RESIDUAL_SCALE: f64 = 0.2;

/// Whether `file` holds an RRDBNet in one of the layouts spandrel detects (original ESRGAN,
/// Real-ESRGAN, BSRGAN/RealSR; ESRGAN+ is told apart by [`EsrganConfig::infer`]).
pub fn is_esrgan(file: &dyn TensorShapes) -> bool {
    let all = |names: &[&str]| names.iter().all(|name| file.has(name));
    all(&["model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight"])
        || all(&["model.0.weight", "model.1.sub.0.RDB1.conv1x1.weight"])
        || all(&[
            "conv_first.weight",
            "body.0.rdb1.conv1.weight",
            "conv_body.weight",
            "conv_last.weight",
        ])
        || all(&[
            "conv_first.weight",
            "RRDB_trunk.0.RDB1.conv1.weight",
            "trunk_conv.weight",
            "conv_last.weight",
        ])
}

/// The original ESRGAN layout's name for tensor `name` of a file in Real-ESRGAN's or BSRGAN's
/// names, whose trunk has `blocks` blocks and which upsamples `upsamplings` times; other names
/// (the original layout's own) as they are.
pub fn old_layout_name(name: &str, blocks: usize, upsamplings: usize) -> String {
    let Some((stem, end)) = name.rsplit_once('.') else {
        return name.to_string();
    };
    let numbered = |prefix: &str| stem.strip_prefix(prefix).and_then(|n| n.parse::<usize>().ok());
    let layer = match stem {
        "conv_first" => Some("model.0".to_string()),
        "conv_body" | "trunk_conv" => Some(format!("model.1.sub.{blocks}")),
        "conv_hr" | "HRconv" => Some(format!("model.{}", 3 * upsamplings + 2)),
        "conv_last" => Some(format!("model.{}", 3 * upsamplings + 4)),
        _ => numbered("conv_up")
            .or_else(|| numbered("upconv"))
            .map(|n| format!("model.{}", 3 * n)),
    };
    if let Some(layer) = layer {
        return format!("{layer}.{end}");
    }
    for (trunk, block) in [("body.", ".rdb"), ("RRDB_trunk.", ".RDB")] {
        let Some(rest) = stem.strip_prefix(trunk) else {
            continue;
        };
        if let Some((index, inner)) = rest.split_once(block) {
            return format!("model.1.sub.{index}.RDB{inner}.0.{end}");
        }
    }
    name.to_string()
}

/// How many trunk blocks and ×2 upsamplings a file in Real-ESRGAN's or BSRGAN's names has (for
/// [`old_layout_name`]); `None` for a file in the original layout.
pub fn new_layout_counts(file: &dyn TensorShapes) -> Option<(usize, usize)> {
    if !file.has("conv_first.weight") {
        return None;
    }
    let highest = |prefixes: [&str; 2]| prefixes.map(|prefix| file.count_indices(prefix)).into_iter().max();
    let blocks = highest(["body.", "RRDB_trunk."]).unwrap_or(0);
    // `conv_up1`, `conv_up2`: the highest number is the count.
    let upsamplings = highest(["conv_up", "upconv"]).unwrap_or(0).saturating_sub(1);
    Some((blocks, upsamplings))
}

/// An RRDBNet's shape, read from its weights (original layout).
#[derive(Clone, Debug, PartialEq)]
pub struct EsrganConfig {
    /// Channels the first convolution takes (the image's, times the unshuffle factor²).
    pub in_channels: usize,
    pub out_channels: usize,
    /// The trunk's width (`nf`, 64 in 4x-UltraSharp).
    pub features: usize,
    /// The channels each dense convolution adds (`gc`, 32).
    pub growth: usize,
    /// Residual-in-residual dense blocks (`nb`, 23).
    pub blocks: usize,
    /// ×2 upsamplings.
    pub upsamplings: usize,
    /// Real-ESRGAN's pixel-unshuffle factor (2 or 4), if the model takes the image unshuffled.
    pub unshuffle: Option<usize>,
}

impl EsrganConfig {
    pub fn infer(file: &dyn TensorShapes) -> std::result::Result<Self, DetectError> {
        let shape = |name: &str| {
            file.shape(name)
                .map(<[usize]>::to_vec)
                .ok_or_else(|| DetectError::MissingTensor(name.to_string()))
        };
        if file.has("model.1.sub.0.RDB1.conv1x1.weight") {
            return Err(DetectError::NotYetSupported(
                "ESRGAN+ (RRDBNet with 1×1 residual paths)",
            ));
        }
        let first = shape("model.0.weight")?;
        let &[features, in_channels, ..] = first.as_slice() else {
            return Err(DetectError::Unrecognised(format!(
                "'model.0.weight' has shape {first:?}"
            )));
        };
        let growth = shape("model.1.sub.0.RDB1.conv1.0.weight")?[0];
        let blocks = (0..)
            .take_while(|n| file.has(&format!("model.1.sub.{n}.RDB1.conv1.0.weight")))
            .count();
        let length = file.count_indices("model.");
        if length < 5 || !(length - 5).is_multiple_of(3) {
            return Err(DetectError::Unrecognised(format!(
                "an RRDBNet whose sequence has {length} layers"
            )));
        }
        let out_channels = shape(&format!("model.{}.weight", length - 1))?[0];
        let unshuffle = [2, 4]
            .into_iter()
            .find(|factor| in_channels == out_channels * factor * factor);
        Ok(EsrganConfig {
            in_channels,
            out_channels,
            features,
            growth,
            blocks,
            upsamplings: (length - 5) / 3,
            unshuffle,
        })
    }

    /// How many times larger the output is than the image.
    pub fn scale(&self) -> usize {
        (1 << self.upsamplings) / self.unshuffle.unwrap_or(1)
    }

    /// Channels of the image the model takes.
    pub fn image_channels(&self) -> usize {
        self.in_channels / self.unshuffle.map_or(1, |factor| factor * factor)
    }
}

/// A 3×3 convolution keeping the size.
fn conv3(in_channels: usize, out_channels: usize, weights: Weights) -> Result<Conv2d> {
    Conv2d::same(in_channels, out_channels, 3, 1, weights)
}

fn leaky_relu(x: &Tensor) -> Result<Tensor> {
    x.maximum(&(x * NEGATIVE_SLOPE)?)
}

/// Five convolutions, each taking the block's input and every earlier output.
struct DenseBlock {
    convs: Vec<Conv2d>,
}

impl DenseBlock {
    fn new(features: usize, growth: usize, weights: Weights) -> Result<Self> {
        let convs = (0..5)
            .map(|j| {
                let out = if j == 4 { features } else { growth };
                conv3(features + j * growth, out, weights.pp(format!("conv{}.0", j + 1)))
            })
            .collect::<Result<_>>()?;
        Ok(DenseBlock { convs })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut inputs = vec![x.clone()];
        for conv in &self.convs[..4] {
            let out = leaky_relu(&conv.forward(&Tensor::cat(&inputs, 1)?)?)?;
            inputs.push(out);
        }
        let last = self.convs[4].forward(&Tensor::cat(&inputs, 1)?)?;
        (last * RESIDUAL_SCALE)? + x
    }
}

/// Three dense blocks in a row, their result scaled and added to the input.
struct ResidualInResidual {
    blocks: [DenseBlock; 3],
}

impl ResidualInResidual {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = x.clone();
        for block in &self.blocks {
            out = block.forward(&out)?;
        }
        (out * RESIDUAL_SCALE)? + x
    }
}

pub struct Esrgan {
    config: EsrganConfig,
    first: Conv2d,
    trunk: Vec<ResidualInResidual>,
    trunk_close: Conv2d,
    upsamplings: Vec<Conv2d>,
    hr: Conv2d,
    last: Conv2d,
}

impl Esrgan {
    /// The network of `config` under `weights` (original layout).
    pub fn new(config: EsrganConfig, weights: Weights) -> Result<Self> {
        let (features, growth) = (config.features, config.growth);
        let model = weights.pp("model");
        let trunk = (0..config.blocks)
            .map(|n| {
                let block = |k: usize| DenseBlock::new(features, growth, model.pp(format!("1.sub.{n}.RDB{k}")));
                Ok(ResidualInResidual {
                    blocks: [block(1)?, block(2)?, block(3)?],
                })
            })
            .collect::<Result<_>>()?;
        let ups = config.upsamplings;
        Ok(Esrgan {
            first: conv3(config.in_channels, features, model.pp("0"))?,
            trunk,
            trunk_close: conv3(features, features, model.pp(format!("1.sub.{}", config.blocks)))?,
            upsamplings: (1..=ups)
                .map(|n| conv3(features, features, model.pp(3 * n)))
                .collect::<Result<_>>()?,
            hr: conv3(features, features, model.pp(3 * ups + 2))?,
            last: conv3(features, config.out_channels, model.pp(3 * ups + 4))?,
            config,
        })
    }

    pub fn config(&self) -> &EsrganConfig {
        &self.config
    }

    /// The upscaled image [B, out_channels, H·scale, W·scale] of `x` [B, C, H, W] (values 0..1),
    /// not clamped.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, height, width) = x.dims4()?;
        let multiple = self.config.unshuffle.map_or(1, |_| UNSHUFFLED_MULTIPLE);
        let padded = pad_to_requirements(x, multiple)?;
        let input = match self.config.unshuffle {
            Some(factor) => candle_nn::ops::pixel_unshuffle(&padded, factor)?,
            None => padded,
        };
        let features = self.first.forward(&input)?;
        let mut trunk = features.clone();
        for block in &self.trunk {
            trunk = block.forward(&trunk)?;
        }
        let mut h = (features + self.trunk_close.forward(&trunk)?)?;
        for conv in &self.upsamplings {
            let (_, _, rows, cols) = h.dims4()?;
            h = leaky_relu(&conv.forward(&h.upsample_nearest2d(2 * rows, 2 * cols)?)?)?;
        }
        let out = self.last.forward(&leaky_relu(&self.hr.forward(&h)?)?)?;
        let scale = self.config.scale();
        out.narrow(2, 0, height * scale)?.narrow(3, 0, width * scale)
    }
}

/// `x` [B, C, H, W] padded at the bottom and right to at least [`MINIMUM_SIDE`] and a multiple
/// of `multiple` a side, as spandrel's `pad_tensor` pads: by reflection (the edge itself left
/// out) as far as the side allows, then by repeating the last row or column.
fn pad_to_requirements(x: &Tensor, multiple: usize) -> Result<Tensor> {
    let (_, _, height, width) = x.dims4()?;
    let mut padded = x.clone();
    for (dim, size) in [(2, height), (3, width)] {
        let pad = size.max(MINIMUM_SIDE).div_ceil(multiple) * multiple - size;
        if pad == 0 {
            continue;
        }
        let reflected = pad.min(size.saturating_sub(1));
        let mut parts = vec![padded.clone()];
        for i in 0..reflected {
            parts.push(padded.narrow(dim, size - 2 - i, 1)?);
        }
        let edge = match parts.last() {
            Some(last) => last.narrow(dim, last.dim(dim)? - 1, 1)?,
            None => candle_core::bail!("nothing to pad"),
        };
        parts.extend(std::iter::repeat_n(edge, pad - reflected));
        padded = Tensor::cat(&parts, dim)?;
    }
    Ok(padded)
}
