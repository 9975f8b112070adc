//! CLIP text encoders, read in either key layout ComfyUI accepts: transformers'
//! (`text_model.embeddings`, `text_model.encoder.layers.N`, `text_model.final_layer_norm`,
//! `text_projection.weight`) — CLIP-L of SD1.x/SDXL and the standalone text-encoder files — and
//! OpenCLIP's (`token_embedding`, `transformer.resblocks.N` with fused `attn.in_proj_weight`,
//! `ln_final`, `text_projection`), which SD2.x (OpenCLIP-H) and SDXL (OpenCLIP-bigG) checkpoints
//! use and which ComfyUI converts at load: here it is read as it lies. Width, depth and MLP size
//! come from the weights; heads are 64 wide, as in every released CLIP.
//!
//! [`ClipTextEncoder::encode_weighted`] is ComfyUI's `ClipTokenWeightEncoder`
//! ([`encode_token_weights`]) with an empty prompt of start, end and padding tokens.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::LayerNorm;

use crate::architectures::clip_encoder::{layer_tensor, Activation, ClipNaming, EncoderLayer, LayerShape, LayerTensor};
use crate::checkpoint::DetectError;
use crate::text::token_weights::encode_token_weights;
use crate::text::tokenizer::{TokenItem, WeightedToken, END_TOKEN, START_TOKEN};
use crate::weights::{TensorShapes, WeightMatrix, Weights};

#[derive(Clone, Debug, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub max_positions: usize,
    pub activation: Activation,
    pub naming: ClipNaming,
    /// Whether the file has the projection of the pooled vector (`text_projection`).
    pub projection: bool,
}

impl ClipTextConfig {
    /// Reads the architecture from the tensors under `prefix`, the encoder's root (the part
    /// before `text_model.` or before OpenCLIP's `token_embedding`).
    pub fn infer(
        file: &dyn TensorShapes,
        prefix: &str,
        activation: Activation,
    ) -> std::result::Result<Self, DetectError> {
        let naming = if file.has(&format!("{prefix}token_embedding.weight")) {
            ClipNaming::OpenClip
        } else {
            ClipNaming::Transformers
        };
        let names = TensorNames(naming);
        let required = |key: String| {
            file.shape(&format!("{prefix}{key}"))
                .map(<[usize]>::to_vec)
                .ok_or_else(|| DetectError::MissingTensor(format!("{prefix}{key}")))
        };
        let token_embedding = required(names.token_embedding())?;
        let positions = required(names.position_embedding())?;
        let fc1_of = |layer: usize| {
            format!(
                "{prefix}{}.{}.weight",
                names.layer(layer),
                layer_tensor(naming, LayerTensor::Fc1)
            )
        };
        let fc1 = file
            .shape(&fc1_of(0))
            .map(<[usize]>::to_vec)
            .ok_or_else(|| DetectError::MissingTensor(fc1_of(0)))?;
        let layers = (0..).take_while(|&layer| file.has(&fc1_of(layer))).count();
        let hidden_size = token_embedding[1];
        Ok(ClipTextConfig {
            vocab_size: token_embedding[0],
            hidden_size,
            intermediate_size: fc1[0],
            layers,
            heads: (hidden_size / 64).max(1),
            max_positions: positions[0],
            activation,
            naming,
            projection: file.has(&format!("{prefix}{}", names.projection())),
        })
    }

    fn layer_shape(&self) -> LayerShape {
        LayerShape {
            width: self.hidden_size,
            intermediate: self.intermediate_size,
            heads: self.heads,
            activation: self.activation,
            naming: self.naming,
            eps: 1e-5,
        }
    }
}

/// Tensor names in one [`ClipNaming`].
#[derive(Clone, Copy)]
struct TensorNames(ClipNaming);

impl TensorNames {
    fn token_embedding(self) -> String {
        match self.0 {
            ClipNaming::Transformers => "text_model.embeddings.token_embedding.weight".into(),
            ClipNaming::OpenClip => "token_embedding.weight".into(),
        }
    }

    fn position_embedding(self) -> String {
        match self.0 {
            ClipNaming::Transformers => "text_model.embeddings.position_embedding.weight".into(),
            ClipNaming::OpenClip => "positional_embedding".into(),
        }
    }

    fn final_layer_norm(self) -> &'static str {
        match self.0 {
            ClipNaming::Transformers => "text_model.final_layer_norm",
            ClipNaming::OpenClip => "ln_final",
        }
    }

    /// The pooled projection: a [out, in] `weight` (transformers) or an [in, out] matrix.
    fn projection(self) -> &'static str {
        match self.0 {
            ClipNaming::Transformers => "text_projection.weight",
            ClipNaming::OpenClip => "text_projection",
        }
    }

    /// The root of layer `layer`.
    fn layer(self, layer: usize) -> String {
        match self.0 {
            ClipNaming::Transformers => format!("text_model.encoder.layers.{layer}"),
            ClipNaming::OpenClip => format!("transformer.resblocks.{layer}"),
        }
    }
}

/// Which hidden state is the output: the last layer's, or an earlier one (CLIPSetLastLayer,
/// counted from the end: -1 is the last layer, -2 the one before).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputLayer {
    Last,
    FromEnd(usize),
}

/// How ComfyUI reads an encoder's output (`SDClipModel`'s options, which differ per model
/// family): the hidden state taken, whether the final layer norm applies to an earlier layer's,
/// whether the pooled vector is projected, and the token that pads chunks and the empty prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodeOptions {
    pub layer: OutputLayer,
    pub layer_norm_hidden: bool,
    pub project_pooled: bool,
    pub pad_token: u32,
}

pub struct ClipTextEncoder {
    config: ClipTextConfig,
    token_embedding: WeightMatrix,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    /// [hidden, projection] (OpenCLIP's orientation), when the file has it.
    text_projection: Option<Tensor>,
}

/// An encoded prompt: [1, 77·chunks, hidden] and the pooled vector of the first chunk [1, width].
pub struct Encoded {
    pub hidden: Tensor,
    pub pooled: Tensor,
}

impl ClipTextEncoder {
    /// The width of a token vector (768 for CLIP-L), which textual inversions must match.
    pub fn width(&self) -> usize {
        self.config.hidden_size
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// The encoder whose tensors lie under `vb` (its root, see [`ClipTextConfig::infer`]).
    pub fn new(config: ClipTextConfig, vb: Weights) -> Result<Self> {
        let names = TensorNames(config.naming);
        let hidden = config.hidden_size;
        let token_embedding = vb.matrix((config.vocab_size, hidden), &names.token_embedding())?;
        let position_embedding = vb.get((config.max_positions, hidden), &names.position_embedding())?;
        let layers = (0..config.layers)
            .map(|layer| EncoderLayer::new(&config.layer_shape(), vb.pp(names.layer(layer))))
            .collect::<Result<_>>()?;
        let final_layer_norm = vb.pp(names.final_layer_norm()).layer_norm(hidden, 1e-5)?;
        let text_projection = match (config.projection, config.naming) {
            (false, _) => None,
            (true, ClipNaming::OpenClip) => Some(vb.get((hidden, hidden), names.projection())?),
            (true, ClipNaming::Transformers) => Some(vb.get((hidden, hidden), names.projection())?.t()?.contiguous()?),
        };
        Ok(ClipTextEncoder {
            config,
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
        })
    }

    /// Encodes chunks of weighted tokens as ComfyUI does (see the module documentation); the
    /// pooled vector is the first chunk's.
    pub fn encode_weighted(&self, chunks: &[Vec<WeightedToken>], options: EncodeOptions) -> Result<Encoded> {
        let (hidden, pooled) = encode_token_weights(chunks, &[START_TOKEN, END_TOKEN], options.pad_token, |batch| {
            self.forward(batch, options)
        })?;
        Ok(Encoded {
            hidden,
            pooled: pooled.narrow(0, 0, 1)?,
        })
    }

    /// Runs the transformer on a batch of token rows of equal length; returns the selected hidden
    /// states [B, N, hidden] and the pooled vectors [B, width] taken from the final layer norm's
    /// output at each row's first end token (projected when the options ask and the file has
    /// the projection).
    pub fn forward(&self, batch: &[Vec<TokenItem>], options: EncodeOptions) -> Result<(Tensor, Tensor)> {
        let device = self.position_embedding.device().clone();
        let length = batch.first().map_or(0, Vec::len);
        let rows = batch
            .iter()
            .map(|row| self.embed_row(row, &device))
            .collect::<Result<Vec<_>>>()?;
        let mut x = Tensor::stack(&rows, 0)?.broadcast_add(&self.position_embedding.narrow(0, 0, length)?)?;
        let mask = causal_mask(length, &device)?;
        let keep = match options.layer {
            OutputLayer::Last => None,
            OutputLayer::FromEnd(from_end) if from_end >= 1 && from_end <= self.layers.len() => {
                Some(self.layers.len() - from_end)
            }
            OutputLayer::FromEnd(_) => None,
        };
        let mut intermediate = None;
        for (index, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, Some(&mask))?;
            if Some(index) == keep {
                intermediate = Some(x.clone());
            }
        }
        let x = self.final_layer_norm.forward(&x)?;
        let hidden = match intermediate {
            Some(intermediate) if options.layer_norm_hidden => self.final_layer_norm.forward(&intermediate)?,
            Some(intermediate) => intermediate,
            None => x.clone(),
        };
        let end_positions: Vec<usize> = batch
            .iter()
            .map(|row| {
                row.iter()
                    .position(|item| *item == TokenItem::Token(END_TOKEN))
                    .unwrap_or(row.len() - 1)
            })
            .collect();
        let pooled = (0..batch.len())
            .map(|row| x.get(row)?.get(end_positions[row]))
            .collect::<Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&pooled, 0)?;
        let pooled = match &self.text_projection {
            Some(projection) if options.project_pooled => pooled.matmul(projection)?,
            _ => pooled,
        };
        Ok((hidden, pooled))
    }

    fn embed_row(&self, row: &[TokenItem], device: &Device) -> Result<Tensor> {
        let vectors = row
            .iter()
            .map(|item| match item {
                TokenItem::Token(token) => {
                    let token = (*token as usize).min(self.config.vocab_size - 1);
                    self.token_embedding.row(token, device)
                }
                TokenItem::Embedding(values) => Tensor::from_vec(values.clone(), self.config.hidden_size, device),
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&vectors, 0)?.to_dtype(DType::F32)
    }
}

/// −max(f32) above the diagonal, as ComfyUI builds it.
fn causal_mask(length: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..length)
        .flat_map(|row| (0..length).map(move |column| if column > row { -f32::MAX } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (length, length), device)
}
