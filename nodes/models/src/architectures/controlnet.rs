//! ControlNet (`comfy.cldm.cldm.ControlNet`) for SD1.x, SD2.x and SDXL, read from the LDM key
//! layout (`input_blocks`, `zero_convs`, `input_hint_block`, `middle_block_out`, under
//! `control_model.` in the original `.pth` conversions). It is a copy of the UNet's encoder
//! ([`super::unet`]) whose first block also takes the hint image through a small convolutional
//! stack, and whose blocks each give a residual through a 1×1 "zero" convolution: one per
//! encoder block (added to the skip connections the decoder takes) and one after the middle
//! block. The architecture is inferred from the weights as the UNet's is.
//!
//! A union ControlNet (xinsir's ControlNet++ for SDXL, as ComfyUI runs it) also embeds the
//! control type it is told (one-hot, through sinusoids and two linear layers) into its time
//! embedding, and with a type shifts the hint's features by a vector that a one-token
//! transformer block makes from their mean and the type's learned embedding ([`UnionParts`]).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::LayerNorm;

use super::unet::{
    halves_equal, repeated_to, rows_for, timestep_embedding, Context, ControlResiduals, Encoder, HeadLayout, UNetConfig,
};
use crate::checkpoint::DetectError;
use crate::kernels::attention::attention;
use crate::kernels::conv::Conv2d;
use crate::kernels::linear::{linear, Linear};
use crate::weights::{TensorShapes, Weights};

/// The control types of union ControlNets, by index (ComfyUI's `UNION_CONTROLNET_TYPES`; the
/// "promax" model has all eight, the first one six).
pub const UNION_CONTROL_TYPES: [&str; 8] = [
    "openpose",
    "depth",
    "hed/pidi/scribble/ted",
    "canny/lineart/anime_lineart/mlsd",
    "normal",
    "segment",
    "tile",
    "repaint",
];
/// The tensor that marks a union ControlNet (ComfyUI's test in `load_controlnet_state_dict`).
pub const UNION_CONTROLNET_MARKER: &str = "control_add_embedding.linear_1.bias";
/// Sinusoid width a union ControlNet embeds each control type's one-hot value in.
const UNION_TYPE_WIDTH: usize = 256;
/// Heads of a union ControlNet's transformer block.
const UNION_HEADS: usize = 8;

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
    /// A union ControlNet's number of control types and the width of its type embeddings.
    pub union: Option<(usize, usize)>,
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
            union: None,
        }
    }

    /// Reads the architecture from the tensors under `prefix` (`""`, or `control_model.`).
    /// `heads` as for the UNet of the same family (SD1.x: 8 heads, else 64 channels each).
    pub fn infer(file: &dyn TensorShapes, prefix: &str, heads: HeadLayout) -> std::result::Result<Self, DetectError> {
        let hint = format!("{prefix}input_hint_block.0.weight");
        let hint_channels = file.shape(&hint).ok_or(DetectError::MissingTensor(hint))?[1];
        let union = if file.has(&format!("{prefix}{UNION_CONTROLNET_MARKER}")) {
            let name = format!("{prefix}task_embedding");
            let shape = file.shape(&name).ok_or(DetectError::MissingTensor(name))?;
            Some((shape[0], shape[1]))
        } else {
            None
        };
        Ok(ControlNetConfig {
            encoder: UNetConfig::infer_encoder(file, prefix, heads)?,
            hint_channels,
            union,
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
    pub hint: ControlHint<'a>,
    pub timesteps: &'a Tensor,
    pub context: &'a Tensor,
    /// Class conditioning (SDXL).
    pub y: Option<&'a Tensor>,
    /// A union ControlNet's control type (an index of [`UNION_CONTROL_TYPES`]); `None` is
    /// "auto". Other ControlNets leave it unread.
    pub control_type: Option<usize>,
}

/// The control image of a call.
#[derive(Clone, Copy)]
pub enum ControlHint<'a> {
    /// The image, [B, hint_channels, 8·H, 8·W], values in 0..1: run through the hint block on
    /// this call.
    Image(&'a Tensor),
    /// The image already through the hint block ([`ControlNet::guided_hint`]), [B,
    /// model_channels, H, W]: the hint is the same on every step of a sampling, so callers
    /// compute this once.
    Guided(&'a Tensor),
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
        ControlResiduals {
            input: Vec::new(),
            output: self.encoder.iter().rev().cloned().map(Some).collect(),
            middle: Some(self.middle.clone()),
        }
        .scaled(strength)
    }
}

pub struct ControlNet {
    config: ControlNetConfig,
    encoder: Encoder,
    hint_block: Vec<Conv2d>,
    zero_convs: Vec<Conv2d>,
    middle_out: Conv2d,
    union: Option<UnionParts>,
}

/// A union ControlNet's own parts (ComfyUI's `task_embedding`, `transformer_layes`,
/// `spatial_ch_projs` and `control_add_embedding`).
struct UnionParts {
    types: usize,
    /// One learned vector per control type, [types, width].
    task_embedding: Tensor,
    block: UnionTransformerBlock,
    spatial_projection: Linear,
    type_embedding: (Linear, Linear),
}

/// `ResBlockUnionControlnet`: pre-norm self-attention (fused query-key-value projection) and a
/// QuickGELU MLP, each added to its input.
struct UnionTransformerBlock {
    width: usize,
    norm1: LayerNorm,
    in_proj: Linear,
    out_proj: Linear,
    norm2: LayerNorm,
    fc: Linear,
    proj: Linear,
}

impl UnionTransformerBlock {
    fn new(width: usize, vb: Weights) -> Result<Self> {
        Ok(UnionTransformerBlock {
            width,
            norm1: vb.pp("ln_1").layer_norm(width, 1e-5)?,
            in_proj: linear(width, 3 * width, vb.pp("attn.in_proj"))?,
            out_proj: linear(width, width, vb.pp("attn.out_proj"))?,
            norm2: vb.pp("ln_2").layer_norm(width, 1e-5)?,
            fc: linear(width, 4 * width, vb.pp("mlp.c_fc"))?,
            proj: linear(4 * width, width, vb.pp("mlp.c_proj"))?,
        })
    }

    /// x: [B, tokens, width].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let qkv = self.in_proj.forward(&self.norm1.forward(x)?)?;
        let part = |n: usize| qkv.narrow(2, n * self.width, self.width);
        let attended = attention(&part(0)?, &part(1)?, &part(2)?, UNION_HEADS, None)?;
        let x = (x + self.out_proj.forward(&attended)?)?;
        let h = self.fc.forward(&self.norm2.forward(&x)?)?;
        let h = (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?;
        x + self.proj.forward(&h)?
    }
}

impl UnionParts {
    fn new(types: usize, width: usize, time_embed_dim: usize, vb: &Weights) -> Result<Self> {
        let embedding = vb.pp("control_add_embedding");
        Ok(UnionParts {
            types,
            task_embedding: vb.get((types, width), "task_embedding")?,
            block: UnionTransformerBlock::new(width, vb.pp("transformer_layes.0"))?,
            spatial_projection: linear(width, width, vb.pp("spatial_ch_projs"))?,
            type_embedding: (
                linear(UNION_TYPE_WIDTH * types, time_embed_dim, embedding.pp("linear_1"))?,
                linear(time_embed_dim, time_embed_dim, embedding.pp("linear_2"))?,
            ),
        })
    }

    /// What the control type adds to the time embedding, [1, time_embed_dim]: the one-hot
    /// vector of the type (all zeros for "auto") embedded value by value.
    fn type_embedding(&self, control_type: Option<usize>, dtype: DType) -> Result<Tensor> {
        let one_hot: Vec<f32> = (0..self.types)
            .map(|index| if Some(index) == control_type { 1.0 } else { 0.0 })
            .collect();
        let device = self.task_embedding.device();
        let sinusoids = timestep_embedding(&Tensor::from_vec(one_hot, self.types, device)?, UNION_TYPE_WIDTH)?
            .to_dtype(dtype)?
            .reshape((1, self.types * UNION_TYPE_WIDTH))?;
        let (first, second) = &self.type_embedding;
        second.forward(&candle_nn::ops::silu(&first.forward(&sinusoids)?)?)
    }

    /// `union_controlnet_merge` for one control type: the hint's features [B, C, H, W] shifted
    /// channel by channel.
    fn merged_hint(&self, features: &Tensor, control_type: usize) -> Result<Tensor> {
        let type_vector = self.task_embedding.get(control_type)?.to_dtype(features.dtype())?;
        let tokens = features.mean((2, 3))?.broadcast_add(&type_vector)?.unsqueeze(1)?;
        let tokens = self.block.forward(&tokens)?;
        let shift = self.spatial_projection.forward(&tokens.squeeze(1)?)?;
        features.broadcast_add(&shift.unsqueeze(2)?.unsqueeze(3)?)
    }

    /// The error ComfyUI raises for a type beyond the model's.
    fn check(&self, control_type: Option<usize>) -> Result<()> {
        match control_type {
            Some(index) if index >= self.types => Err(candle_core::Error::Msg(format!(
                "Control type {}({index}) is out of range for the number of control types({}) supported.\n\
                 Please consider using the ProMax ControlNet Union model.\n\
                 https://huggingface.co/xinsir/controlnet-union-sdxl-1.0/tree/main",
                UNION_CONTROL_TYPES.get(index).copied().unwrap_or("unknown"),
                self.types
            ))),
            _ => Ok(()),
        }
    }
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
        let time_embed_dim = 4 * config.encoder.model_channels;
        let union = config
            .union
            .map(|(types, width)| UnionParts::new(types, width, time_embed_dim, &vb))
            .transpose()?;
        Ok(ControlNet {
            config,
            encoder,
            hint_block,
            zero_convs,
            middle_out,
            union,
        })
    }

    pub fn config(&self) -> &ControlNetConfig {
        &self.config
    }

    /// The hint image through its convolutional stack (`input_hint_block`), in `dtype`: [B,
    /// model_channels, H, W].
    pub fn guided_hint(&self, hint: &Tensor, dtype: DType) -> Result<Tensor> {
        let mut h = hint.to_dtype(dtype)?;
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
        let mut hint = match input.hint {
            ControlHint::Image(image) => self.guided_hint(image, dtype)?,
            ControlHint::Guided(guided) => guided.to_dtype(dtype)?,
        };
        let mut type_embedding = None;
        if let Some(union) = &self.union {
            union.check(input.control_type)?;
            type_embedding = Some(union.type_embedding(input.control_type, dtype)?);
            if let Some(control_type) = input.control_type {
                hint = union.merged_hint(&hint, control_type)?;
            }
        }
        // A hint whose items differ tells the copies of a shared batch apart.
        let may_share = hint.dim(0)? == 1 || halves_equal(&hint)?;
        let mut guided_hint = Some(hint);
        let emb = self
            .encoder
            .embedding(input.timesteps, type_embedding.as_ref(), input.y, dtype)?;
        let context = Context {
            emb: &emb,
            text: input.context,
            patches: None,
        };
        let batch = input.x.dim(0)?;
        let mut residuals = Vec::with_capacity(self.zero_convs.len());
        let h = self
            .encoder
            .forward(input.x.clone(), &context, may_share, |index, mut h| {
                if let Some(hint) = guided_hint.take() {
                    h = h.broadcast_add(&rows_for(&hint, &h)?)?;
                }
                let zero_conv = self
                    .zero_convs
                    .get(index)
                    .ok_or_else(|| candle_core::Error::Msg(format!("the ControlNet has no zero_convs.{index}")))?;
                residuals.push(repeated_to(&zero_conv.forward(&h)?, batch)?);
                Ok(h)
            })?;
        Ok(ControlOutputs {
            encoder: residuals,
            middle: self.middle_out.forward(&h)?,
        })
    }
}
