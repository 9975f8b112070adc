//! GLIGEN (`comfy/gligen.py`): grounding boxes for the UNet. A position net embeds each box's
//! text (a pooled text vector) with Fourier features of its corners into up to 30 object tokens;
//! after every transformer block's self-attention a gated self-attention over the block's tokens
//! and the object tokens adds what the objects say, then a gated GEGLU feed-forward
//! (`GatedSelfAttentionDense`, one module per UNet block in the file's order:
//! `…blocks.N.….fuser.`). Sizes come from the weights; heads are 8 for SD1.x files (768-wide
//! text), 64 wide otherwise, as ComfyUI builds them.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::LayerNorm;

use crate::architectures::unet::{CrossAttention, GegluFeedForward};
use crate::checkpoint::DetectError;
use crate::kernels::linear::{linear, Linear};
use crate::weights::{TensorShapes, Weights};

/// The object tokens a call gets, boxes beyond the given ones empty (`max_objs`).
pub const MAX_OBJECTS: usize = 30;
/// Frequencies of the corners' Fourier features (`fourier_freqs`) and their temperature.
const FOURIER_FREQUENCIES: usize = 8;
const FOURIER_TEMPERATURE: f32 = 100.0;
/// Width of the corners' features: sine and cosine of four coordinates at each frequency.
const POSITION_WIDTH: usize = FOURIER_FREQUENCIES * 2 * 4;
/// The position net's hidden width.
const POSITION_HIDDEN: usize = 512;
/// The text width for which ComfyUI gives the modules 8 heads (SD1.x's CLIP-L).
const SD1_TEXT_WIDTH: usize = 768;

#[derive(Clone, Debug, PartialEq)]
pub struct GligenConfig {
    /// Each module's root (before `.fuser.`) and width, in ComfyUI's order.
    pub modules: Vec<(String, usize)>,
    /// The object tokens' width (the modules' `linear` input).
    pub key_dim: usize,
    /// The boxes' text width (`null_positive_feature`).
    pub text_dim: usize,
}

impl GligenConfig {
    pub fn infer(file: &dyn TensorShapes) -> std::result::Result<Self, DetectError> {
        let names: Vec<&str> = file.tensor_names().collect();
        let mut modules = Vec::new();
        for part in ["input_blocks", "middle_block", "output_blocks"] {
            for block in 0..20 {
                let start = format!("{part}.{block}.");
                let root = names
                    .iter()
                    .filter(|name| name.contains(&start))
                    .find_map(|name| name.split_once(".fuser.").map(|(root, _)| root.to_string()));
                if let Some(root) = root {
                    let linear = format!("{root}.fuser.linear.weight");
                    let shape = file.shape(&linear).ok_or(DetectError::MissingTensor(linear))?;
                    modules.push((root, shape[0]));
                }
            }
        }
        let key_dim = match modules.last() {
            Some((root, _)) => {
                let linear = format!("{root}.fuser.linear.weight");
                file.shape(&linear).ok_or(DetectError::MissingTensor(linear))?[1]
            }
            None => return Err(DetectError::Unrecognised("a GLIGEN file without fuser modules".into())),
        };
        let null = "position_net.null_positive_feature";
        let text_dim = file
            .shape(null)
            .ok_or_else(|| DetectError::MissingTensor(null.into()))?[0];
        Ok(GligenConfig {
            modules,
            key_dim,
            text_dim,
        })
    }

    fn heads(&self, width: usize) -> usize {
        match self.key_dim {
            SD1_TEXT_WIDTH => 8,
            _ => (width / 64).max(1),
        }
    }
}

/// `GatedSelfAttentionDense`.
struct GatedSelfAttention {
    linear: Linear,
    attention: CrossAttention,
    feed_forward: GegluFeedForward,
    norm1: LayerNorm,
    norm2: LayerNorm,
    /// tanh of `alpha_attn` and of `alpha_dense`.
    attention_gate: Tensor,
    dense_gate: Tensor,
}

impl GatedSelfAttention {
    fn new(width: usize, key_dim: usize, heads: usize, vb: Weights) -> Result<Self> {
        Ok(GatedSelfAttention {
            linear: linear(key_dim, width, vb.pp("linear"))?,
            attention: CrossAttention::new(width, width, heads, vb.pp("attn"))?,
            feed_forward: GegluFeedForward::new(width, vb.pp("ff"))?,
            norm1: vb.pp("norm1").layer_norm(width, 1e-5)?,
            norm2: vb.pp("norm2").layer_norm(width, 1e-5)?,
            attention_gate: vb.get((), "alpha_attn")?.tanh()?,
            dense_gate: vb.get((), "alpha_dense")?.tanh()?,
        })
    }

    /// `x` [B, N, width] with the objects [B, 30, key_dim] attended to.
    fn forward(&self, x: &Tensor, objects: &Tensor) -> Result<Tensor> {
        let visual = x.dim(1)?;
        let objects = self.linear.forward(objects)?;
        let normed = self.norm1.forward(&Tensor::cat(&[x, &objects], 1)?)?;
        let attended = self.attention.forward(&normed, &normed)?.narrow(1, 0, visual)?;
        let x = (x + attended.broadcast_mul(&self.attention_gate)?)?;
        let dense = self.feed_forward.forward(&self.norm2.forward(&x)?)?;
        x + dense.broadcast_mul(&self.dense_gate)?
    }
}

/// `PositionNet`: box texts and corners to object tokens.
struct PositionNet {
    linears: [Linear; 3],
    null_text: Tensor,
    null_position: Tensor,
}

impl PositionNet {
    fn new(text_dim: usize, out_dim: usize, vb: Weights) -> Result<Self> {
        Ok(PositionNet {
            linears: [
                linear(text_dim + POSITION_WIDTH, POSITION_HIDDEN, vb.pp("linears.0"))?,
                linear(POSITION_HIDDEN, POSITION_HIDDEN, vb.pp("linears.2"))?,
                linear(POSITION_HIDDEN, out_dim, vb.pp("linears.4"))?,
            ],
            null_text: vb.get(text_dim, "null_positive_feature")?,
            null_position: vb.get(POSITION_WIDTH, "null_position_feature")?,
        })
    }

    /// `boxes` [B, N, 4] (x1, y1, x2, y2 in 0..1), `masks` [B, N] (1 for a box, 0 for padding),
    /// `texts` [B, N, text_dim] to [B, N, out_dim].
    fn forward(&self, boxes: &Tensor, masks: &Tensor, texts: &Tensor) -> Result<Tensor> {
        let masks = masks.unsqueeze(D::Minus1)?;
        let unmasked = (1.0 - &masks)?;
        let with_null = |x: &Tensor, null: &Tensor| -> Result<Tensor> {
            x.broadcast_mul(&masks)? + unmasked.broadcast_mul(&null.reshape((1, 1, ()))?)?
        };
        let texts = with_null(texts, &self.null_text)?;
        let corners = with_null(&fourier_features(boxes)?, &self.null_position)?;
        let x = self.linears[0].forward(&Tensor::cat(&[&texts, &corners], D::Minus1)?)?;
        let x = self.linears[1].forward(&x.silu()?)?;
        self.linears[2].forward(&x.silu()?)
    }
}

/// `FourierEmbedder`: sin(f·x) and cos(f·x) of every coordinate for each frequency
/// `f = 100^(i/8)`, frequency by frequency.
fn fourier_features(x: &Tensor) -> Result<Tensor> {
    let parts = (0..FOURIER_FREQUENCIES)
        .map(|i| {
            let frequency = FOURIER_TEMPERATURE.powf(i as f32 / FOURIER_FREQUENCIES as f32);
            let scaled = (x * f64::from(frequency))?;
            Ok([scaled.sin()?, scaled.cos()?])
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts.iter().flatten().collect::<Vec<_>>(), D::Minus1)
}

/// A box: its text's pooled vector [1, text_dim] and its place in latent pixels.
#[derive(Clone, Debug)]
pub struct TextBox {
    pub text: Tensor,
    pub height: usize,
    pub width: usize,
    pub y: usize,
    pub x: usize,
}

pub struct Gligen {
    config: GligenConfig,
    modules: Vec<GatedSelfAttention>,
    position_net: PositionNet,
}

impl Gligen {
    pub fn new(config: GligenConfig, vb: Weights) -> Result<Self> {
        let modules = config
            .modules
            .iter()
            .map(|(root, width)| {
                GatedSelfAttention::new(
                    *width,
                    config.key_dim,
                    config.heads(*width),
                    vb.pp(format!("{root}.fuser")),
                )
            })
            .collect::<Result<_>>()?;
        Ok(Gligen {
            position_net: PositionNet::new(config.text_dim, config.key_dim, vb.pp("position_net"))?,
            modules,
            config,
        })
    }

    pub fn config(&self) -> &GligenConfig {
        &self.config
    }

    /// The object tokens [batch, 30, key_dim] of `boxes` for a latent of `height × width`
    /// (`set_position`); at most 30 boxes.
    pub fn objects(&self, boxes: &[TextBox], batch: usize, height: usize, width: usize) -> Result<Tensor> {
        if boxes.len() > MAX_OBJECTS {
            candle_core::bail!("GLIGEN takes at most {MAX_OBJECTS} boxes, not {}", boxes.len());
        }
        let device = self.position_net.null_text.device();
        let padding = MAX_OBJECTS - boxes.len();
        let mut corners = Vec::with_capacity(MAX_OBJECTS * 4);
        for b in boxes {
            let (w, h) = (width as f64, height as f64);
            corners.extend([
                b.x as f64 / w,
                b.y as f64 / h,
                (b.x + b.width) as f64 / w,
                (b.y + b.height) as f64 / h,
            ]);
        }
        corners.resize(MAX_OBJECTS * 4, 0.0);
        let corners: Vec<f32> = corners.into_iter().map(|v| v as f32).collect();
        let masks: Vec<f32> = (0..MAX_OBJECTS).map(|i| f32::from(u8::from(i < boxes.len()))).collect();
        let mut texts = boxes
            .iter()
            .map(|b| {
                b.text
                    .to_device(device)?
                    .to_dtype(DType::F32)?
                    .reshape((1, self.config.text_dim))
            })
            .collect::<Result<Vec<_>>>()?;
        texts.push(Tensor::zeros((padding, self.config.text_dim), DType::F32, device)?);
        let texts = Tensor::cat(&texts, 0)?.unsqueeze(0)?;
        let corners = Tensor::from_vec(corners, (1, MAX_OBJECTS, 4), device)?;
        let masks = Tensor::from_vec(masks, (1, MAX_OBJECTS), device)?;
        let objects = self.position_net.forward(&corners, &masks, &texts)?;
        objects.repeat((batch, 1, 1))
    }

    /// `x` [B, N, width] of transformer block `transformer_index` (counted over the whole UNet)
    /// after its self-attention, with `objects` attended to.
    pub fn after_self_attention(&self, transformer_index: usize, x: &Tensor, objects: &Tensor) -> Result<Tensor> {
        let Some(module) = self.modules.get(transformer_index) else {
            candle_core::bail!(
                "this GLIGEN model has {} modules; the UNet's transformer {transformer_index} has none",
                self.modules.len()
            );
        };
        module.forward(x, &objects.to_dtype(x.dtype())?)
    }
}
