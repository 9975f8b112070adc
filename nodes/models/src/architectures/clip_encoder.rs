//! CLIP's pre-norm transformer layer (`CLIPLayer` in ComfyUI's `clip_model.py`), shared by the
//! text encoders ([`super::clip_text`]), the vision encoders ([`super::clip_vision`]) and the
//! SD1.5 style adapter ([`super::style_model`]): layer norm → self-attention → residual, layer
//! norm → MLP → residual. It reads transformers' names (`layer_norm1`, `self_attn.q_proj`, …,
//! `mlp.fc1`) or OpenCLIP's (`ln_1`, a fused `attn.in_proj_weight`, `mlp.c_fc`, …), relative to
//! the layer's root.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::LayerNorm;

use crate::kernels::attention::attention;
use crate::kernels::cpu::{self, with_cpu_f32};
use crate::kernels::linear::{linear, linear_named, Linear};
use crate::weights::Weights;

/// The MLP activation: OpenAI's CLIP-L uses the sigmoid approximation, OpenCLIP exact GELU,
/// SigLIP the tanh approximation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    QuickGelu,
    Gelu,
    GeluTanh,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Activation::Gelu => match with_cpu_f32([x], |[values]| cpu::gelu(values))? {
                // The CPU kernel runs on every core (candle's is one loop of libm's erf).
                Some(values) => Tensor::from_vec(values, x.shape(), x.device()),
                None => x.gelu_erf(),
            },
            Activation::GeluTanh => x.gelu(),
        }
    }
}

/// How a file names a layer's tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipNaming {
    /// transformers' `CLIPEncoderLayer` names.
    Transformers,
    /// OpenCLIP's names, with query, key and value in one `in_proj` matrix.
    OpenClip,
}

/// The tensors of one layer, named by [`layer_tensor`].
#[derive(Clone, Copy)]
pub(crate) enum LayerTensor {
    Norm1,
    Norm2,
    Fc1,
    Fc2,
    OutProj,
}

/// The module of `tensor` under a layer's root (without `.weight`/`.bias`).
pub(crate) fn layer_tensor(naming: ClipNaming, tensor: LayerTensor) -> &'static str {
    match (naming, tensor) {
        (ClipNaming::Transformers, LayerTensor::Norm1) => "layer_norm1",
        (ClipNaming::Transformers, LayerTensor::Norm2) => "layer_norm2",
        (ClipNaming::Transformers, LayerTensor::Fc1) => "mlp.fc1",
        (ClipNaming::Transformers, LayerTensor::Fc2) => "mlp.fc2",
        (ClipNaming::Transformers, LayerTensor::OutProj) => "self_attn.out_proj",
        (ClipNaming::OpenClip, LayerTensor::Norm1) => "ln_1",
        (ClipNaming::OpenClip, LayerTensor::Norm2) => "ln_2",
        (ClipNaming::OpenClip, LayerTensor::Fc1) => "mlp.c_fc",
        (ClipNaming::OpenClip, LayerTensor::Fc2) => "mlp.c_proj",
        (ClipNaming::OpenClip, LayerTensor::OutProj) => "attn.out_proj",
    }
}

/// The sizes and kind of every layer of an encoder.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerShape {
    pub width: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub activation: Activation,
    pub naming: ClipNaming,
    pub eps: f64,
}

/// The query, key and value projections: three layers, or OpenCLIP's one fused layer.
enum QkvProjection {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

impl QkvProjection {
    fn new(shape: &LayerShape, vb: &Weights) -> Result<Self> {
        let width = shape.width;
        Ok(match shape.naming {
            ClipNaming::Transformers => {
                let attention = vb.pp("self_attn");
                QkvProjection::Separate {
                    q: linear(width, width, attention.pp("q_proj"))?,
                    k: linear(width, width, attention.pp("k_proj"))?,
                    v: linear(width, width, attention.pp("v_proj"))?,
                }
            }
            ClipNaming::OpenClip => QkvProjection::Fused(linear_named(
                width,
                3 * width,
                vb.pp("attn"),
                ("in_proj_weight", "in_proj_bias"),
            )?),
        })
    }

    fn forward(&self, h: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        match self {
            QkvProjection::Separate { q, k, v } => Ok((q.forward(h)?, k.forward(h)?, v.forward(h)?)),
            QkvProjection::Fused(qkv) => {
                let fused = qkv.forward(h)?;
                let width = fused.dim(D::Minus1)? / 3;
                let part = |index: usize| fused.narrow(D::Minus1, index * width, width);
                Ok((part(0)?, part(1)?, part(2)?))
            }
        }
    }
}

/// One transformer layer.
pub struct EncoderLayer {
    layer_norm1: LayerNorm,
    qkv: QkvProjection,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    activation: Activation,
}

impl EncoderLayer {
    /// The layer whose tensors lie under `vb` (its root).
    pub fn new(shape: &LayerShape, vb: Weights) -> Result<Self> {
        let width = shape.width;
        let module = |tensor: LayerTensor| vb.pp(layer_tensor(shape.naming, tensor));
        Ok(EncoderLayer {
            layer_norm1: module(LayerTensor::Norm1).layer_norm(width, shape.eps)?,
            qkv: QkvProjection::new(shape, &vb)?,
            out_proj: linear(width, width, module(LayerTensor::OutProj))?,
            layer_norm2: module(LayerTensor::Norm2).layer_norm(width, shape.eps)?,
            fc1: linear(width, shape.intermediate, module(LayerTensor::Fc1))?,
            fc2: linear(shape.intermediate, width, module(LayerTensor::Fc2))?,
            heads: shape.heads,
            activation: shape.activation,
        })
    }

    /// `x` [B, N, width] through the layer; `mask` is added to the attention scores.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let (q, k, v) = self.qkv.forward(&h)?;
        let attended = attention(&q, &k, &v, self.heads, mask)?;
        let x = (x + self.out_proj.forward(&attended)?)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        x + self.fc2.forward(&self.activation.apply(&h)?)?
    }
}
