//! Depth Anything V2 (`DepthAnythingV2` of the comfyui_controlnet_aux pack and of the upstream
//! project): a DINOv2 encoder ([`super::dinov2`]) whose outputs at four blocks feed a DPT head.
//! The head projects each block's patch grid to its own width and scale (×4 and ×2 by transposed
//! convolutions, ×1, ×½ by a strided convolution), fuses them coarse to fine through residual
//! convolution units and `align_corners` bilinear upsampling, and ends in convolutions giving
//! one relative (inverse) depth per pixel of the patch grid × 14. The architecture is read from
//! the weights in the original names (`pretrained.…`, `depth_head.…`): the encoder's size picks
//! the four blocks as the released models do.

use candle_core::{Module, Result, Tensor};

use super::dinov2::{Dinov2, Dinov2Config};
use crate::checkpoint::DetectError;
use crate::kernels::conv::Conv2d;
use crate::kernels::interpolate::bilinear_align_corners;
use crate::weights::{TensorShapes, Weights};

const ENCODER_PREFIX: &str = "pretrained.";
const HEAD_PREFIX: &str = "depth_head.";
/// Channels between the head's last two convolutions (`head_features_2`).
const HEAD_HIDDEN: usize = 32;

#[derive(Clone, Debug, PartialEq)]
pub struct DepthAnythingV2Config {
    pub encoder: Dinov2Config,
    /// Width of the fused features (`features`: 64 for ViT-S, 128 ViT-B, 256 ViT-L).
    pub features: usize,
    /// Width of each of the four projected block outputs.
    pub out_channels: [usize; 4],
}

impl DepthAnythingV2Config {
    pub fn infer(file: &dyn TensorShapes) -> std::result::Result<Self, DetectError> {
        let encoder = Dinov2Config::infer(file, ENCODER_PREFIX)?;
        let shape = |name: &str| {
            let name = format!("{HEAD_PREFIX}{name}");
            file.shape(&name).ok_or(DetectError::MissingTensor(name))
        };
        let mut out_channels = [0; 4];
        for (index, channels) in out_channels.iter_mut().enumerate() {
            *channels = shape(&format!("projects.{index}.weight"))?[0];
        }
        let config = DepthAnythingV2Config {
            features: shape("scratch.layer1_rn.weight")?[0],
            out_channels,
            encoder,
        };
        config.feature_layers()?;
        Ok(config)
    }

    /// The encoder blocks whose outputs the head takes (`intermediate_layer_idx`), by depth.
    pub fn feature_layers(&self) -> std::result::Result<[usize; 4], DetectError> {
        match self.encoder.depth {
            12 => Ok([2, 5, 8, 11]),
            24 => Ok([4, 11, 17, 23]),
            40 => Ok([9, 19, 29, 39]),
            depth => Err(DetectError::Unrecognised(format!(
                "a Depth Anything V2 encoder of {depth} blocks (the released ones have 12, 24 or 40)"
            ))),
        }
    }
}

/// `nn.ConvTranspose2d` whose kernel equals its stride (no overlap): each input pixel becomes a
/// `factor`×`factor` patch, a matrix product away.
struct PatchExpand {
    weight: Tensor,
    bias: Tensor,
    factor: usize,
}

impl PatchExpand {
    fn new(channels: usize, factor: usize, vb: Weights) -> Result<Self> {
        Ok(PatchExpand {
            weight: vb
                .get((channels, channels, factor, factor), "weight")?
                .reshape((channels, channels * factor * factor))?,
            bias: vb.get(channels, "bias")?,
            factor,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        let factor = self.factor;
        let out_channels = self.bias.dim(0)?;
        let rows = x.permute((0, 2, 3, 1))?.reshape((batch * height * width, channels))?;
        rows.matmul(&self.weight)?
            .reshape((batch, height, width, out_channels, factor, factor))?
            .permute((0, 3, 1, 4, 2, 5))?
            .reshape((batch, out_channels, height * factor, width * factor))?
            .broadcast_add(&self.bias.reshape((1, out_channels, 1, 1))?)
    }
}

/// How a block output is brought to its level's scale (`resize_layers`).
enum Resize {
    Expand(PatchExpand),
    Keep,
    Halve(Conv2d),
}

impl Resize {
    fn forward(&self, x: Tensor) -> Result<Tensor> {
        match self {
            Resize::Expand(expand) => expand.forward(&x),
            Resize::Keep => Ok(x),
            Resize::Halve(conv) => conv.forward(&x),
        }
    }
}

/// `ResidualConvUnit`: `x + conv2(relu(conv1(relu(x))))`.
struct ResidualUnit {
    conv1: Conv2d,
    conv2: Conv2d,
}

impl ResidualUnit {
    fn new(features: usize, vb: Weights) -> Result<Self> {
        Ok(ResidualUnit {
            conv1: Conv2d::same(features, features, 3, 1, vb.pp("conv1"))?,
            conv2: Conv2d::same(features, features, 3, 1, vb.pp("conv2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&x.relu()?)?;
        self.conv2.forward(&h.relu()?)? + x
    }
}

/// `FeatureFusionBlock`: adds the skip features (through a residual unit) to the coarser path,
/// runs a second unit, upsamples to the next level's size (or ×2), then a 1×1 convolution.
struct FusionBlock {
    skip_unit: ResidualUnit,
    unit: ResidualUnit,
    out_conv: Conv2d,
}

impl FusionBlock {
    fn new(features: usize, vb: Weights) -> Result<Self> {
        Ok(FusionBlock {
            skip_unit: ResidualUnit::new(features, vb.pp("resConfUnit1"))?,
            unit: ResidualUnit::new(features, vb.pp("resConfUnit2"))?,
            out_conv: Conv2d::new(features, features, 1, 1, 0, vb.pp("out_conv"))?,
        })
    }

    fn forward(&self, path: &Tensor, skip: Option<&Tensor>, size: Option<(usize, usize)>) -> Result<Tensor> {
        let mut x = path.clone();
        if let Some(skip) = skip {
            x = (x + self.skip_unit.forward(skip)?)?;
        }
        let x = self.unit.forward(&x)?;
        let (_, _, height, width) = x.dims4()?;
        let (height, width) = size.unwrap_or((height * 2, width * 2));
        self.out_conv.forward(&bilinear_align_corners(&x, height, width)?)
    }
}

pub struct DepthAnythingV2 {
    config: DepthAnythingV2Config,
    encoder: Dinov2,
    projects: Vec<Conv2d>,
    resizes: Vec<Resize>,
    layers_rn: Vec<Conv2d>,
    /// refinenet1 … refinenet4.
    fusion: Vec<FusionBlock>,
    output_conv1: Conv2d,
    output_conv2: (Conv2d, Conv2d),
}

impl DepthAnythingV2 {
    pub fn new(config: DepthAnythingV2Config, vb: Weights) -> Result<Self> {
        let encoder = Dinov2::new(config.encoder.clone(), vb.pp("pretrained"))?;
        let head = vb.pp("depth_head");
        let (width, features, out) = (config.encoder.embed_dim, config.features, config.out_channels);
        let projects = (0..4)
            .map(|index| Conv2d::new(width, out[index], 1, 1, 0, head.pp(format!("projects.{index}"))))
            .collect::<Result<Vec<_>>>()?;
        let resizes = vec![
            Resize::Expand(PatchExpand::new(out[0], 4, head.pp("resize_layers.0"))?),
            Resize::Expand(PatchExpand::new(out[1], 2, head.pp("resize_layers.1"))?),
            Resize::Keep,
            Resize::Halve(Conv2d::new(out[3], out[3], 3, 2, 1, head.pp("resize_layers.3"))?),
        ];
        let scratch = head.pp("scratch");
        let layers_rn = (0..4)
            .map(|index| {
                Conv2d::without_bias(
                    out[index],
                    features,
                    3,
                    1,
                    1,
                    scratch.pp(format!("layer{}_rn", index + 1)),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let fusion = (1..=4)
            .map(|index| FusionBlock::new(features, scratch.pp(format!("refinenet{index}"))))
            .collect::<Result<Vec<_>>>()?;
        let half = features / 2;
        Ok(DepthAnythingV2 {
            encoder,
            projects,
            resizes,
            layers_rn,
            fusion,
            output_conv1: Conv2d::same(features, half, 3, 1, scratch.pp("output_conv1"))?,
            output_conv2: (
                Conv2d::same(half, HEAD_HIDDEN, 3, 1, scratch.pp("output_conv2.0"))?,
                Conv2d::new(HEAD_HIDDEN, 1, 1, 1, 0, scratch.pp("output_conv2.2"))?,
            ),
            config,
        })
    }

    /// The patch size: input sides must be multiples of it.
    pub fn patch_size(&self) -> usize {
        self.config.encoder.patch_size
    }

    /// Relative depth [B, H, W] (larger is nearer, ≥ 0) of normalised pixels [B, 3, H, W].
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (batch, _, height, width) = pixels.dims4()?;
        let patch = self.patch_size();
        let (rows, columns) = (height / patch, width / patch);
        let layers = self
            .config
            .feature_layers()
            .map_err(|error| candle_core::Error::Msg(error.to_string()))?;
        let features = self.encoder.intermediate_layers(pixels, &layers)?;
        let mut levels = Vec::with_capacity(4);
        for (index, tokens) in features.into_iter().enumerate() {
            let grid = tokens
                .transpose(1, 2)?
                .reshape((batch, self.config.encoder.embed_dim, rows, columns))?;
            let projected = self.resizes[index].forward(self.projects[index].forward(&grid)?)?;
            levels.push(self.layers_rn[index].forward(&projected)?);
        }
        let size = |level: &Tensor| -> Result<Option<(usize, usize)>> {
            let (_, _, height, width) = level.dims4()?;
            Ok(Some((height, width)))
        };
        let path = self.fusion[3].forward(&levels[3], None, size(&levels[2])?)?;
        let path = self.fusion[2].forward(&path, Some(&levels[2]), size(&levels[1])?)?;
        let path = self.fusion[1].forward(&path, Some(&levels[1]), size(&levels[0])?)?;
        let path = self.fusion[0].forward(&path, Some(&levels[0]), None)?;
        let out = self.output_conv1.forward(&path)?;
        let out = bilinear_align_corners(&out, rows * patch, columns * patch)?;
        let out = self.output_conv2.0.forward(&out)?.relu()?;
        self.output_conv2.1.forward(&out)?.relu()?.squeeze(1)
    }
}
