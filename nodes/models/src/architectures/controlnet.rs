//! ControlNet (`comfy.cldm.cldm.ControlNet`) for SD1.x, SD2.x and SDXL, read from the LDM key
//! layout (`input_blocks`, `zero_convs`, `input_hint_block`, `middle_block_out`, under
//! `control_model.` in the original `.pth` conversions). It is a copy of the UNet's encoder
//! ([`super::unet`]) whose first block also takes the hint image through a small convolutional
//! stack, and whose blocks each give a residual through a 1×1 "zero" convolution: one per
//! encoder block (added to the skip connections the decoder takes) and one after the middle
//! block. The architecture is inferred from the weights as the UNet's is.

use candle_core::{Module, Result, Tensor};

use super::unet::{Context, ControlResiduals, Encoder, HeadLayout, UNetConfig};
use crate::checkpoint::DetectError;
use crate::kernels::conv::Conv2d;
use crate::weights::{TensorShapes, Weights};

/// The hint stack's convolutions after the first: output channels and stride (the last one's
/// output is the network's `model_channels`).
const HINT_LAYERS: [(usize, usize); 6] = [(16, 1), (32, 2), (32, 1), (96, 2), (96, 1), (256, 2)];

/// The architecture of one ControlNet, as found in its weights.
#[derive(Clone, Debug, PartialEq)]
pub struct ControlNetConfig {
    /// The encoder it copies (no decoder: `out_channels` 0, no `output_depths`).
    pub encoder: UNetConfig,
    /// Channels of the hint image (3 for an RGB control image).
    pub hint_channels: usize,
}

impl ControlNetConfig {
    /// The ControlNet of a UNet: a copy of its encoder, taking a hint of `hint_channels`.
    pub fn copying(unet: &UNetConfig, hint_channels: usize) -> Self {
        ControlNetConfig {
            encoder: UNetConfig {
                out_channels: 0,
                output_depths: Vec::new(),
                ..unet.clone()
            },
            hint_channels,
        }
    }

    /// Reads the architecture from the tensors under `prefix` (`""`, or `control_model.`).
    /// `heads` as for the UNet of the same family (SD1.x: 8 heads, else 64 channels each).
    pub fn infer(file: &dyn TensorShapes, prefix: &str, heads: HeadLayout) -> std::result::Result<Self, DetectError> {
        let hint = format!("{prefix}input_hint_block.0.weight");
        let hint_channels = file.shape(&hint).ok_or(DetectError::MissingTensor(hint))?[1];
        Ok(ControlNetConfig {
            encoder: UNetConfig::infer_encoder(file, prefix, heads)?,
            hint_channels,
        })
    }

    /// SD1.x ControlNets take 8 heads, SD2.x and SDXL ones 64 channels a head: told apart by how
    /// their transformers project (SD1.x with 1×1 convolutions, the others with linear layers).
    pub fn heads_for(file: &dyn TensorShapes, prefix: &str) -> std::result::Result<HeadLayout, DetectError> {
        let config = UNetConfig::infer_encoder(file, prefix, HeadLayout::Count(8))?;
        Ok(if config.linear_projection {
            HeadLayout::Width(64)
        } else {
            HeadLayout::Count(8)
        })
    }
}

/// One call of the ControlNet.
pub struct ControlNetInput<'a> {
    /// The latent the UNet is called with, [B, in_channels, H, W].
    pub x: &'a Tensor,
    /// The control image, [B, hint_channels, 8·H, 8·W], values in 0..1.
    pub hint: &'a Tensor,
    pub timesteps: &'a Tensor,
    pub context: &'a Tensor,
    /// Class conditioning (SDXL).
    pub y: Option<&'a Tensor>,
}

/// What a ControlNet gives: a residual per encoder block, in block order (the UNet adds the
/// last to the skip its first decoder block takes), and one for the middle block.
#[derive(Debug, Clone)]
pub struct ControlOutputs {
    pub encoder: Vec<Tensor>,
    pub middle: Tensor,
}

impl ControlOutputs {
    /// The residuals scaled by `strength`, where the UNet adds them: the last encoder block's to
    /// the skip its first decoder block takes (ComfyUI pops them from the end).
    pub fn residuals(&self, strength: f64) -> Result<ControlResiduals> {
        Ok(ControlResiduals {
            input: Vec::new(),
            output: self
                .encoder
                .iter()
                .rev()
                .map(|residual| (residual * strength).map(Some))
                .collect::<Result<_>>()?,
            middle: Some((&self.middle * strength)?),
        })
    }
}

pub struct ControlNet {
    config: ControlNetConfig,
    encoder: Encoder,
    hint_block: Vec<Conv2d>,
    zero_convs: Vec<Conv2d>,
    middle_out: Conv2d,
}

impl ControlNet {
    pub fn new(config: ControlNetConfig, vb: Weights) -> Result<Self> {
        let (encoder, block_channels) = Encoder::new(&config.encoder, &vb, &std::cell::Cell::new(0))?;
        let mut hint_block = vec![Conv2d::same(
            config.hint_channels,
            16,
            3,
            1,
            vb.pp("input_hint_block.0"),
        )?];
        let mut channels = 16;
        let last = (HINT_LAYERS.len(), config.encoder.model_channels, 1);
        let layers = HINT_LAYERS
            .iter()
            .enumerate()
            .map(|(n, &(out, stride))| (n, out, stride));
        for (n, out, stride) in layers.chain([last]) {
            let vb = vb.pp(format!("input_hint_block.{}", 2 * (n + 1)));
            hint_block.push(Conv2d::same(channels, out, 3, stride, vb)?);
            channels = out;
        }
        let zero_convs = block_channels
            .iter()
            .enumerate()
            .map(|(n, &channels)| Conv2d::same(channels, channels, 1, 1, vb.pp(format!("zero_convs.{n}.0"))))
            .collect::<Result<Vec<_>>>()?;
        let middle_channels = block_channels.last().copied().unwrap_or(config.encoder.model_channels);
        let middle_out = Conv2d::same(middle_channels, middle_channels, 1, 1, vb.pp("middle_block_out.0"))?;
        Ok(ControlNet {
            config,
            encoder,
            hint_block,
            zero_convs,
            middle_out,
        })
    }

    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// The hint image through its convolutional stack: [B, model_channels, H, W].
    fn guided_hint(&self, hint: &Tensor) -> Result<Tensor> {
        let mut h = hint.clone();
        for (n, conv) in self.hint_block.iter().enumerate() {
            h = conv.forward(&h)?;
            if n + 1 < self.hint_block.len() {
                h = candle_nn::ops::silu(&h)?;
            }
        }
        Ok(h)
    }

    pub fn forward(&self, input: &ControlNetInput) -> Result<ControlOutputs> {
        let dtype = input.x.dtype();
        let mut guided_hint = Some(self.guided_hint(&input.hint.to_dtype(dtype)?)?);
        let emb = self.encoder.embedding(input.timesteps, input.y, dtype)?;
        let context = Context {
            emb: &emb,
            text: input.context,
            patches: None,
        };
        let mut residuals = Vec::with_capacity(self.zero_convs.len());
        let h = self.encoder.forward(input.x.clone(), &context, |index, mut h| {
            if let Some(hint) = guided_hint.take() {
                h = h.broadcast_add(&hint)?;
            }
            let zero_conv = self
                .zero_convs
                .get(index)
                .ok_or_else(|| candle_core::Error::Msg(format!("the ControlNet has no zero_convs.{index}")))?;
            residuals.push(zero_conv.forward(&h)?);
            Ok(h)
        })?;
        Ok(ControlOutputs {
            encoder: residuals,
            middle: self.middle_out.forward(&h)?,
        })
    }
}
