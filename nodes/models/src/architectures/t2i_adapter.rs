//! T2I-Adapter (`comfy/t2i_adapter/adapter.py`): a small convolutional network that turns the
//! control image, pixel-unshuffled to the latent's size (÷8, or ÷16 for SDXL's), into one
//! feature map per UNet level, added to the output of that level's last encoder block (SDXL's
//! last one to the middle block). It sees neither the latent nor the timestep, so its features
//! are computed once per image and size. Two kinds: the full adapter (`conv_in`, then two
//! residual blocks a level) and the light one (an `extractor` a level: 1×1 in, light residual
//! blocks at a quarter of the channels, 1×1 out). The architecture is inferred from the weights
//! in ComfyUI's names (`body.…`; diffusers' are renamed by
//! [`crate::diffusers_layout::ConvertedWeights::diffusers_t2i_adapter`]).

use candle_core::{Module, Result, Tensor};

use super::unet::ControlResiduals;
use crate::checkpoint::DetectError;
use crate::kernels::conv::Conv2d;
use crate::weights::{TensorShapes, Weights};

/// The encoder blocks (of an SD1.x/SD2.x UNet's twelve) after which each level's features are
/// added: the last block of each level.
const SD_FEATURE_BLOCKS: [usize; 4] = [2, 5, 8, 11];
/// The same for SDXL's nine encoder blocks; its fourth level's features go to the middle block.
const XL_FEATURE_BLOCKS: [usize; 3] = [3, 5, 8];
/// Residual blocks a level of the full adapter (fixed in ComfyUI's loader).
const FULL_BLOCKS_PER_LEVEL: usize = 2;

/// Which adapter the weights hold.
#[derive(Clone, Debug, PartialEq)]
pub enum AdapterKind {
    /// `Adapter`: residual blocks of `kernel`-sized convolutions; levels after the first start
    /// with a stride-2 convolution (`conv_downsample`) or a 2×2 average pool.
    Full { kernel: usize, conv_downsample: bool },
    /// `Adapter_light`: each level an `extractor` of `blocks_per_level` light residual blocks.
    Light { blocks_per_level: usize },
}

/// The architecture of one T2I-Adapter, as found in its weights.
#[derive(Clone, Debug, PartialEq)]
pub struct T2IAdapterConfig {
    pub kind: AdapterKind,
    /// Channels after pixel-unshuffling: the hint's channels × `unshuffle()`².
    pub in_channels: usize,
    /// Feature channels of the four levels.
    pub channels: [usize; 4],
    /// SDXL's full adapter: unshuffled by 16, its levels placed on SDXL's blocks.
    pub xl: bool,
}

impl T2IAdapterConfig {
    /// Reads the architecture from ComfyUI's names (`load_t2i_adapter`'s checks); `None` when the
    /// tensors are no T2I-Adapter's.
    pub fn infer(file: &dyn TensorShapes) -> std::result::Result<Option<Self>, DetectError> {
        let shape = |name: &str| {
            file.shape(name)
                .ok_or_else(|| DetectError::MissingTensor(name.to_string()))
        };
        if let Some(in_conv) = file.shape("body.0.in_conv.weight") {
            let in_channels = in_conv[1];
            let mut channels = [0; 4];
            for (level, channel) in channels.iter_mut().enumerate() {
                *channel = shape(&format!("body.{level}.out_conv.weight"))?[0];
            }
            let blocks_per_level = (0..)
                .take_while(|block| file.has(&format!("body.0.body.{block}.block1.weight")))
                .count();
            return Ok(Some(T2IAdapterConfig {
                kind: AdapterKind::Light { blocks_per_level },
                in_channels,
                channels,
                xl: false,
            }));
        }
        let Some(conv_in) = file.shape("conv_in.weight") else {
            return Ok(None);
        };
        let (channel, in_channels) = (conv_in[0], conv_in[1]);
        let kernel = shape("body.0.block2.weight")?[2];
        let conv_downsample = file.tensor_names().any(|name| name.ends_with("down_opt.op.weight"));
        Ok(Some(T2IAdapterConfig {
            kind: AdapterKind::Full {
                kernel,
                conv_downsample,
            },
            in_channels,
            channels: [channel, channel * 2, channel * 4, channel * 4],
            xl: in_channels == 256 || in_channels == 768,
        }))
    }

    /// The pixel-unshuffle factor: image pixels a feature pixel of the first level covers.
    pub fn unshuffle(&self) -> usize {
        if self.xl {
            16
        } else {
            8
        }
    }

    /// Channels of the hint image it takes (3, or 1 for a greyscale adapter).
    pub fn hint_channels(&self) -> usize {
        self.in_channels / (self.unshuffle() * self.unshuffle())
    }
}

/// `Downsample` without a convolution: a 2×2 average pool, an odd side padded by one zero on
/// each side (counted in the average, as PyTorch's `AvgPool2d` does).
fn average_pool(x: &Tensor) -> Result<Tensor> {
    let (_, _, height, width) = x.dims4()?;
    let x = x.pad_with_zeros(2, height % 2, height % 2)?;
    let x = x.pad_with_zeros(3, width % 2, width % 2)?;
    x.avg_pool2d(2)
}

/// `ResnetBlock` (with ComfyUI's `sk=True`): optionally downsampled, a convolution where the
/// channels change, then `x + block2(relu(block1(x)))`.
struct ResidualBlock {
    downsample: Option<Option<Conv2d>>,
    in_conv: Option<Conv2d>,
    block1: Conv2d,
    block2: Conv2d,
}

impl ResidualBlock {
    fn forward(&self, mut x: Tensor) -> Result<Tensor> {
        match &self.downsample {
            Some(Some(conv)) => x = conv.forward(&x)?,
            Some(None) => x = average_pool(&x)?,
            None => {}
        }
        if let Some(in_conv) = &self.in_conv {
            x = in_conv.forward(&x)?;
        }
        let h = self.block2.forward(&self.block1.forward(&x)?.relu()?)?;
        h + x
    }
}

/// One level of the light adapter (`extractor`): average-pooled after the first level, a 1×1
/// convolution to a quarter of the channels, light residual blocks, a 1×1 convolution out.
struct Extractor {
    downsample: bool,
    in_conv: Conv2d,
    blocks: Vec<ResidualBlock>,
    out_conv: Conv2d,
}

impl Extractor {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.downsample { average_pool(x)? } else { x.clone() };
        let mut h = self.in_conv.forward(&x)?;
        for block in &self.blocks {
            h = block.forward(h)?;
        }
        self.out_conv.forward(&h)
    }
}

enum Body {
    Full {
        conv_in: Conv2d,
        blocks: Vec<ResidualBlock>,
    },
    Light(Vec<Extractor>),
}

pub struct T2IAdapter {
    config: T2IAdapterConfig,
    body: Body,
}

impl T2IAdapter {
    pub fn new(config: T2IAdapterConfig, vb: Weights) -> Result<Self> {
        let channels = config.channels;
        let body = match config.kind {
            AdapterKind::Full {
                kernel,
                conv_downsample,
            } => {
                let conv_in = Conv2d::same(config.in_channels, channels[0], 3, 1, vb.pp("conv_in"))?;
                let mut blocks = Vec::new();
                for level in 0..channels.len() {
                    for index in 0..FULL_BLOCKS_PER_LEVEL {
                        let vb = vb.pp(format!("body.{}", level * FULL_BLOCKS_PER_LEVEL + index));
                        let from = if index == 0 && level > 0 {
                            channels[level - 1]
                        } else {
                            channels[level]
                        };
                        let downsampled = index == 0 && if config.xl { level == 2 } else { level > 0 };
                        let downsample = downsampled
                            .then(|| {
                                conv_downsample
                                    .then(|| Conv2d::same(from, from, 3, 2, vb.pp("down_opt.op")))
                                    .transpose()
                            })
                            .transpose()?;
                        let to = channels[level];
                        blocks.push(ResidualBlock {
                            downsample,
                            in_conv: (from != to)
                                .then(|| Conv2d::same(from, to, kernel, 1, vb.pp("in_conv")))
                                .transpose()?,
                            block1: Conv2d::same(to, to, 3, 1, vb.pp("block1"))?,
                            block2: Conv2d::same(to, to, kernel, 1, vb.pp("block2"))?,
                        });
                    }
                }
                Body::Full { conv_in, blocks }
            }
            AdapterKind::Light { blocks_per_level } => {
                let mut levels = Vec::new();
                for (level, &to) in channels.iter().enumerate() {
                    let vb = vb.pp(format!("body.{level}"));
                    let from = if level == 0 {
                        config.in_channels
                    } else {
                        channels[level - 1]
                    };
                    let inner = to / 4;
                    let blocks = (0..blocks_per_level)
                        .map(|block| {
                            let vb = vb.pp(format!("body.{block}"));
                            Ok(ResidualBlock {
                                downsample: None,
                                in_conv: None,
                                block1: Conv2d::same(inner, inner, 3, 1, vb.pp("block1"))?,
                                block2: Conv2d::same(inner, inner, 3, 1, vb.pp("block2"))?,
                            })
                        })
                        .collect::<Result<_>>()?;
                    levels.push(Extractor {
                        downsample: level > 0,
                        in_conv: Conv2d::same(from, inner, 1, 1, vb.pp("in_conv"))?,
                        blocks,
                        out_conv: Conv2d::same(inner, to, 1, 1, vb.pp("out_conv"))?,
                    });
                }
                Body::Light(levels)
            }
        };
        Ok(T2IAdapter { config, body })
    }

    pub fn config(&self) -> &T2IAdapterConfig {
        &self.config
    }

    /// The features of `hint` ([B, hint_channels, H, W], H and W multiples of `unshuffle()`),
    /// placed where the UNet adds them: `input` by encoder block (`None` where nothing is
    /// added), SDXL's last level as `middle`.
    pub fn forward(&self, hint: &Tensor) -> Result<ControlResiduals> {
        let x = candle_nn::ops::pixel_unshuffle(hint, self.config.unshuffle())?;
        let features = match &self.body {
            Body::Full { conv_in, blocks } => {
                let mut h = conv_in.forward(&x)?;
                let mut features = Vec::with_capacity(self.config.channels.len());
                for level in blocks.chunks(FULL_BLOCKS_PER_LEVEL) {
                    for block in level {
                        h = block.forward(h)?;
                    }
                    features.push(h.clone());
                }
                features
            }
            Body::Light(levels) => {
                let mut h = x;
                let mut features = Vec::with_capacity(levels.len());
                for level in levels {
                    h = level.forward(&h)?;
                    features.push(h.clone());
                }
                features
            }
        };
        let blocks: &[usize] = if self.config.xl {
            &XL_FEATURE_BLOCKS
        } else {
            &SD_FEATURE_BLOCKS
        };
        let mut residuals = ControlResiduals::default();
        let mut features = features.into_iter();
        for (&block, feature) in blocks.iter().zip(features.by_ref()) {
            residuals.input.resize(block + 1, None);
            residuals.input[block] = Some(feature);
        }
        residuals.middle = features.next();
        Ok(residuals)
    }
}
