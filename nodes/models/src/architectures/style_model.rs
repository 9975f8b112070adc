//! Style models (`comfy.sd.load_style_model`): networks turning a vision encoder's last hidden
//! state into extra text tokens.
//!
//! - FLUX Redux (`ReduxImageEncoder`): `redux_up` → SiLU → `redux_down`, SigLIP's 1152-wide
//!   tokens to FLUX's 4096-wide text tokens, one per image token.
//! - The SD1.5 T2I style adapter (`StyleAdapter`): learned style tokens appended to CLIP ViT-L's
//!   tokens, `ln_pre`, OpenCLIP transformer layers (quick GELU, 8 heads as ComfyUI builds it),
//!   `ln_post` on the style tokens and a projection to the text width.
//!
//! Sizes come from the weights.

use candle_core::{Module, Result, Tensor};
use candle_nn::LayerNorm;

use crate::architectures::clip_encoder::{Activation, ClipNaming, EncoderLayer, LayerShape};
use crate::checkpoint::DetectError;
use crate::kernels::linear::{linear, Linear};
use crate::weights::{TensorShapes, Weights};

/// The tensor that marks a Redux file, and one that marks a style adapter.
pub const REDUX_MARKER: &str = "redux_down.weight";
pub const STYLE_ADAPTER_MARKER: &str = "style_embedding";
/// The style adapter's heads (`StyleAdapter(num_head=8)` in `load_style_model`).
const ADAPTER_HEADS: usize = 8;

#[derive(Clone, Debug, PartialEq)]
pub enum StyleModelConfig {
    Redux {
        /// The vision tokens' width (1152).
        vision_width: usize,
        hidden: usize,
        /// The text tokens' width (4096).
        text_width: usize,
    },
    Adapter {
        width: usize,
        tokens: usize,
        layers: usize,
        /// The text tokens' width (768).
        context_width: usize,
    },
}

impl StyleModelConfig {
    pub fn infer(file: &dyn TensorShapes) -> std::result::Result<Self, DetectError> {
        let shape = |name: &str| file.shape(name).ok_or_else(|| DetectError::MissingTensor(name.into()));
        if file.has(REDUX_MARKER) {
            let up = shape("redux_up.weight")?;
            let down = shape(REDUX_MARKER)?;
            return Ok(StyleModelConfig::Redux {
                vision_width: up[1],
                hidden: up[0],
                text_width: down[0],
            });
        }
        let style = shape(STYLE_ADAPTER_MARKER)?;
        let projection = shape("proj")?;
        let layers = (0..)
            .take_while(|layer| file.has(&format!("transformer_layes.{layer}.ln_1.weight")))
            .count();
        Ok(StyleModelConfig::Adapter {
            width: style[2],
            tokens: style[1],
            layers,
            context_width: projection[1],
        })
    }
}

pub enum StyleModel {
    Redux {
        up: Linear,
        down: Linear,
    },
    Adapter {
        style_embedding: Tensor,
        ln_pre: LayerNorm,
        layers: Vec<EncoderLayer>,
        ln_post: LayerNorm,
        /// [width, context width].
        projection: Tensor,
    },
}

impl StyleModel {
    pub fn new(config: &StyleModelConfig, vb: Weights) -> Result<Self> {
        Ok(match *config {
            StyleModelConfig::Redux {
                vision_width,
                hidden,
                text_width,
            } => StyleModel::Redux {
                up: linear(vision_width, hidden, vb.pp("redux_up"))?,
                down: linear(hidden, text_width, vb.pp("redux_down"))?,
            },
            StyleModelConfig::Adapter {
                width,
                tokens,
                layers,
                context_width,
            } => {
                let shape = LayerShape {
                    width,
                    intermediate: 4 * width,
                    heads: ADAPTER_HEADS,
                    activation: Activation::QuickGelu,
                    naming: ClipNaming::OpenClip,
                    eps: 1e-5,
                };
                StyleModel::Adapter {
                    style_embedding: vb.get((1, tokens, width), STYLE_ADAPTER_MARKER)?,
                    ln_pre: vb.pp("ln_pre").layer_norm(width, 1e-5)?,
                    layers: (0..layers)
                        .map(|layer| EncoderLayer::new(&shape, vb.pp(format!("transformer_layes.{layer}"))))
                        .collect::<Result<_>>()?,
                    ln_post: vb.pp("ln_post").layer_norm(width, 1e-5)?,
                    projection: vb.get((width, context_width), "proj")?,
                }
            }
        })
    }

    /// The tokens [B, N, text width] for a vision encoder's last hidden state [B, tokens, width]
    /// (`StyleModel.get_cond`).
    pub fn tokens(&self, last_hidden_state: &Tensor) -> Result<Tensor> {
        match self {
            StyleModel::Redux { up, down } => down.forward(&up.forward(last_hidden_state)?.silu()?),
            StyleModel::Adapter {
                style_embedding,
                ln_pre,
                layers,
                ln_post,
                projection,
            } => {
                let batch = last_hidden_state.dim(0)?;
                let (_, tokens, width) = style_embedding.dims3()?;
                let style = style_embedding.broadcast_as((batch, tokens, width))?;
                let mut x = ln_pre.forward(&Tensor::cat(&[last_hidden_state, &style.contiguous()?], 1)?)?;
                for layer in layers {
                    x = layer.forward(&x, None)?;
                }
                let length = x.dim(1)?;
                ln_post
                    .forward(&x.narrow(1, length - tokens, tokens)?)?
                    .broadcast_matmul(projection)
            }
        }
    }
}
