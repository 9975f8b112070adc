//! CLIP text encoders in the transformers key layout (`text_model.embeddings`,
//! `text_model.encoder.layers.N`, `text_model.final_layer_norm`): CLIP-L of SD1.x and, with the
//! GELU activation, the OpenCLIP encoders that ComfyUI converts to this layout. Width, depth and
//! MLP size come from the weights; heads are 64 wide, as in every released CLIP.
//!
//! [`ClipTextEncoder::encode_weighted`] is ComfyUI's `ClipTokenWeightEncoder`: chunks are encoded
//! in one batch together with an empty prompt, and a token of weight w becomes
//! `empty + (token − empty)·w`.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::LayerNorm;

use super::attention::attention;
use super::linear::{linear, Linear};
use super::tokenizer::{TokenItem, WeightedToken, CHUNK_LENGTH, END_TOKEN, START_TOKEN};
use super::weights::{TensorShapes, WeightMatrix, Weights};
use super::DetectError;

/// The MLP activation: CLIP-L uses the sigmoid approximation, OpenCLIP exact GELU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    QuickGelu,
    Gelu,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub max_positions: usize,
    pub activation: Activation,
}

impl ClipTextConfig {
    /// Reads the architecture from the tensors under `prefix` (ending in `text_model.`).
    pub fn infer(
        file: &dyn TensorShapes,
        prefix: &str,
        activation: Activation,
    ) -> std::result::Result<Self, DetectError> {
        let required = |key: &str| {
            file.shape(&format!("{prefix}{key}"))
                .map(<[usize]>::to_vec)
                .ok_or_else(|| DetectError::MissingTensor(format!("{prefix}{key}")))
        };
        let token_embedding = required("embeddings.token_embedding.weight")?;
        let positions = required("embeddings.position_embedding.weight")?;
        let fc1 = required("encoder.layers.0.mlp.fc1.weight")?;
        let layers = (0..)
            .take_while(|layer| file.has(&format!("{prefix}encoder.layers.{layer}.mlp.fc1.weight")))
            .count();
        let hidden_size = token_embedding[1];
        Ok(ClipTextConfig {
            vocab_size: token_embedding[0],
            hidden_size,
            intermediate_size: fc1[0],
            layers,
            heads: (hidden_size / 64).max(1),
            max_positions: positions[0],
            activation,
        })
    }
}

/// Which hidden state is the output: the last layer's, or an earlier one (CLIPSetLastLayer,
/// counted from the end: -1 is the last layer, -2 the one before).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputLayer {
    Last,
    FromEnd(usize),
}

pub struct ClipTextEncoder {
    config: ClipTextConfig,
    token_embedding: WeightMatrix,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
}

/// An encoded prompt: [1, 77·chunks, hidden] and the pooled vector of the first chunk [1, hidden].
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

    pub fn new(config: ClipTextConfig, vb: Weights) -> Result<Self> {
        let embeddings = vb.pp("embeddings");
        let token_embedding = embeddings
            .pp("token_embedding")
            .matrix((config.vocab_size, config.hidden_size), "weight")?;
        let position_embedding = embeddings
            .pp("position_embedding")
            .get((config.max_positions, config.hidden_size), "weight")?;
        let layers = (0..config.layers)
            .map(|layer| EncoderLayer::new(&config, vb.pp(format!("encoder.layers.{layer}"))))
            .collect::<Result<_>>()?;
        let final_layer_norm = candle_nn::layer_norm(config.hidden_size, 1e-5, vb.pp("final_layer_norm").into())?;
        Ok(ClipTextEncoder {
            config,
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
        })
    }

    /// Encodes chunks of weighted tokens as ComfyUI does (see the module documentation).
    pub fn encode_weighted(&self, chunks: &[Vec<WeightedToken>], output: OutputLayer) -> Result<Encoded> {
        let has_weights = chunks.iter().flatten().any(|(_, weight)| *weight != 1.0);
        let mut batch: Vec<Vec<TokenItem>> = chunks
            .iter()
            .map(|chunk| chunk.iter().map(|(item, _)| item.clone()).collect())
            .collect();
        let longest = batch.iter().map(Vec::len).max().unwrap_or(CHUNK_LENGTH);
        if has_weights || batch.is_empty() {
            let mut empty = vec![TokenItem::Token(START_TOKEN), TokenItem::Token(END_TOKEN)];
            empty.resize(longest.max(2), TokenItem::Token(END_TOKEN));
            batch.push(empty);
        }
        let (hidden, pooled) = self.forward(&batch, output)?;
        let pooled = pooled.narrow(0, 0, 1)?;
        if chunks.is_empty() {
            let last = hidden.dim(0)? - 1;
            return Ok(Encoded {
                hidden: hidden.narrow(0, last, 1)?,
                pooled,
            });
        }
        let mut outputs = Vec::with_capacity(chunks.len());
        for (index, chunk) in chunks.iter().enumerate() {
            let z = hidden.get(index)?;
            let z = if has_weights {
                let empty = hidden.get(hidden.dim(0)? - 1)?;
                let weights: Vec<f32> = chunk.iter().map(|(_, weight)| *weight as f32).collect();
                let weights = Tensor::from_vec(weights, (chunk.len(), 1), hidden.device())?;
                // Only positions with a weight ≠ 1 change; for the others (z − e)·1 + e is z itself.
                let weighted = (z.broadcast_sub(&empty)?.broadcast_mul(&weights)? + &empty)?;
                let changed: Vec<u8> = chunk.iter().map(|(_, weight)| u8::from(*weight != 1.0)).collect();
                let changed = Tensor::from_vec(changed, (chunk.len(), 1), hidden.device())?;
                changed.broadcast_as(z.shape())?.where_cond(&weighted, &z)?
            } else {
                z
            };
            outputs.push(z.unsqueeze(0)?);
        }
        Ok(Encoded {
            hidden: Tensor::cat(&outputs, 1)?,
            pooled,
        })
    }

    /// Runs the transformer on a batch of token rows of equal length; returns the selected hidden
    /// states [B, N, hidden] (after the final layer norm) and the pooled vectors [B, hidden] taken
    /// at each row's first end token.
    pub fn forward(&self, batch: &[Vec<TokenItem>], output: OutputLayer) -> Result<(Tensor, Tensor)> {
        let device = self.position_embedding.device().clone();
        let length = batch.first().map_or(0, Vec::len);
        let rows = batch
            .iter()
            .map(|row| self.embed_row(row, &device))
            .collect::<Result<Vec<_>>>()?;
        let mut x = Tensor::stack(&rows, 0)?.broadcast_add(&self.position_embedding.narrow(0, 0, length)?)?;
        let mask = causal_mask(length, &device)?;
        let keep = match output {
            OutputLayer::Last => None,
            OutputLayer::FromEnd(from_end) if from_end >= 1 && from_end <= self.layers.len() => {
                Some(self.layers.len() - from_end)
            }
            OutputLayer::FromEnd(_) => None,
        };
        let mut intermediate = None;
        for (index, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &mask)?;
            if Some(index) == keep {
                intermediate = Some(x.clone());
            }
        }
        let x = self.final_layer_norm.forward(&x)?;
        let hidden = match intermediate {
            Some(intermediate) => self.final_layer_norm.forward(&intermediate)?,
            None => x.clone(),
        };
        let end_positions: Vec<u32> = batch
            .iter()
            .map(|row| {
                row.iter()
                    .position(|item| *item == TokenItem::Token(END_TOKEN))
                    .unwrap_or(row.len() - 1) as u32
            })
            .collect();
        let pooled = (0..batch.len())
            .map(|row| x.get(row)?.get(end_positions[row] as usize))
            .collect::<Result<Vec<_>>>()?;
        Ok((hidden, Tensor::stack(&pooled, 0)?))
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

struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    activation: Activation,
}

impl EncoderLayer {
    fn new(config: &ClipTextConfig, vb: Weights) -> Result<Self> {
        let hidden = config.hidden_size;
        let attention = vb.pp("self_attn");
        Ok(EncoderLayer {
            layer_norm1: candle_nn::layer_norm(hidden, 1e-5, vb.pp("layer_norm1").into())?,
            q_proj: linear(hidden, hidden, attention.pp("q_proj"))?,
            k_proj: linear(hidden, hidden, attention.pp("k_proj"))?,
            v_proj: linear(hidden, hidden, attention.pp("v_proj"))?,
            out_proj: linear(hidden, hidden, attention.pp("out_proj"))?,
            layer_norm2: candle_nn::layer_norm(hidden, 1e-5, vb.pp("layer_norm2").into())?,
            fc1: linear(hidden, config.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(config.intermediate_size, hidden, vb.pp("mlp.fc2"))?,
            heads: config.heads,
            activation: config.activation,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let attended = attention(
            &self.q_proj.forward(&h)?,
            &self.k_proj.forward(&h)?,
            &self.v_proj.forward(&h)?,
            self.heads,
            Some(mask),
        )?;
        let x = (x + self.out_proj.forward(&attended)?)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = match self.activation {
            Activation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
            Activation::Gelu => h.gelu_erf()?,
        };
        x + self.fc2.forward(&h)?
    }
}
