//! The T5 v1.1 encoder (T5-XXL for FLUX and SD3) in the transformers key layout ComfyUI's
//! `t5xxl_*.safetensors` files use (`shared`, `encoder.block.N.layer.0.SelfAttention.{q,k,v,o}`,
//! `encoder.block.N.layer.1.DenseReluDense.{wi_0,wi_1,wo}`, `encoder.final_layer_norm`), with
//! the configuration read from the weights: width, depth, heads (from the relative-position
//! bias), head width, feed-forward width.
//!
//! As ComfyUI runs it for FLUX: no attention mask (padding tokens attend too), unscaled
//! attention scores plus the relative-position bias of the first layer, RMS norms, and the
//! gated tanh-GELU feed-forward.

use candle_core::{DType, Device, Module, Result, Tensor, D};

use crate::architectures::clip_text::OutputLayer;
use crate::checkpoint::DetectError;
use crate::kernels::attention::attention;
use crate::kernels::linear::{linear_no_bias, Linear};
use crate::text::t5_tokenizer::{T5_END_TOKEN, T5_PAD_TOKEN};
use crate::text::token_weights::encode_token_weights;
use crate::text::tokenizer::{TokenItem, WeightedToken};
use crate::weights::{TensorShapes, WeightMatrix, Weights};

/// Relative positions are bucketed into 32 buckets (16 per direction) up to distance 128.
const BUCKETS: usize = 32;
const MAX_DISTANCE: f32 = 128.0;
const EPS: f64 = 1e-6;

/// A T5 encoder's shape, read from its weights.
#[derive(Clone, Debug, PartialEq)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub layers: usize,
    pub heads: usize,
    pub d_kv: usize,
    pub d_ff: usize,
}

impl T5Config {
    /// The configuration of the encoder under `prefix` (with its dot, or empty).
    pub fn infer(file: &dyn TensorShapes, prefix: &str) -> std::result::Result<Self, DetectError> {
        let matrix = |key: &str| -> std::result::Result<(usize, usize), DetectError> {
            match file.shape(&format!("{prefix}{key}")) {
                Some(&[rows, cols]) => Ok((rows, cols)),
                Some(other) => Err(DetectError::Unrecognised(format!(
                    "'{prefix}{key}' has shape {other:?}"
                ))),
                None => Err(DetectError::MissingTensor(format!("{prefix}{key}"))),
            }
        };
        let (vocab_size, d_model) = matrix("shared.weight")?;
        let (_, heads) = matrix("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")?;
        let (inner, _) = matrix("encoder.block.0.layer.0.SelfAttention.q.weight")?;
        let (d_ff, _) = matrix("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")?;
        let layers = (0..)
            .take_while(|n| file.has(&format!("{prefix}encoder.block.{n}.layer.0.SelfAttention.q.weight")))
            .count();
        Ok(T5Config {
            vocab_size,
            d_model,
            layers,
            heads,
            d_kv: inner / heads.max(1),
            d_ff,
        })
    }
}

/// T5's layer norm: x / √(mean(x²) + ε) · weight, without centring or bias.
struct RmsNorm {
    weight: Tensor,
}

impl RmsNorm {
    fn new(size: usize, weights: &Weights) -> Result<Self> {
        Ok(RmsNorm {
            weight: weights.get(size, "weight")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rms = (x.sqr()?.mean_keepdim(D::Minus1)? + EPS)?.sqrt()?;
        x.broadcast_div(&rms)?.broadcast_mul(&self.weight)
    }
}

struct Block {
    attention_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    feed_forward_norm: RmsNorm,
    wi_0: Linear,
    wi_1: Linear,
    wo: Linear,
}

impl Block {
    fn new(config: &T5Config, weights: Weights) -> Result<Self> {
        let (model, inner) = (config.d_model, config.heads * config.d_kv);
        let attention = weights.pp("layer.0.SelfAttention");
        let feed_forward = weights.pp("layer.1.DenseReluDense");
        Ok(Block {
            attention_norm: RmsNorm::new(model, &weights.pp("layer.0.layer_norm"))?,
            q: linear_no_bias(model, inner, attention.pp("q"))?,
            k: linear_no_bias(model, inner, attention.pp("k"))?,
            v: linear_no_bias(model, inner, attention.pp("v"))?,
            o: linear_no_bias(inner, model, attention.pp("o"))?,
            feed_forward_norm: RmsNorm::new(model, &weights.pp("layer.1.layer_norm"))?,
            wi_0: linear_no_bias(model, config.d_ff, feed_forward.pp("wi_0"))?,
            wi_1: linear_no_bias(model, config.d_ff, feed_forward.pp("wi_1"))?,
            wo: linear_no_bias(config.d_ff, model, feed_forward.pp("wo"))?,
        })
    }

    /// `position_bias`: per head, [heads, L, L].
    fn forward(&self, x: &Tensor, position_bias: &Tensor, config: &T5Config) -> Result<Tensor> {
        let normed = self.attention_norm.forward(x)?;
        let (q, k, v) = (
            self.q.forward(&normed)?,
            self.k.forward(&normed)?,
            self.v.forward(&normed)?,
        );
        // ComfyUI scales the keys by √d so that the attention's 1/√d leaves the scores unscaled.
        let k = (k * (config.d_kv as f64).sqrt())?;
        let d = config.d_kv;
        let heads = (0..config.heads)
            .map(|h| {
                let head = |t: &Tensor| t.narrow(D::Minus1, h * d, d);
                attention(&head(&q)?, &head(&k)?, &head(&v)?, 1, Some(&position_bias.get(h)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let x = (x + self.o.forward(&Tensor::cat(&heads, D::Minus1)?)?)?;
        let normed = self.feed_forward_norm.forward(&x)?;
        let gated = (self.wi_0.forward(&normed)?.gelu()? * self.wi_1.forward(&normed)?)?;
        x + self.wo.forward(&gated)?
    }
}

/// The T5 encoder.
pub struct T5Encoder {
    config: T5Config,
    shared: WeightMatrix,
    relative_attention_bias: Tensor,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
}

impl T5Encoder {
    pub fn new(config: T5Config, weights: Weights) -> Result<Self> {
        let encoder = weights.pp("encoder");
        let blocks = (0..config.layers)
            .map(|n| Block::new(&config, encoder.pp(format!("block.{n}"))))
            .collect::<Result<_>>()?;
        Ok(T5Encoder {
            shared: weights.matrix((config.vocab_size, config.d_model), "shared.weight")?,
            relative_attention_bias: encoder.get(
                (BUCKETS, config.heads),
                "block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            )?,
            blocks,
            final_norm: RmsNorm::new(config.d_model, &encoder.pp("final_layer_norm"))?,
            config,
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.config
    }

    /// The hidden states [B, L, d_model] of a batch of equal-length token rows: the last block's,
    /// or for `OutputLayer::FromEnd(n)` the n-th block's from the end (CLIPSetLastLayer), both
    /// through the final norm as ComfyUI reads T5's intermediate output.
    pub fn forward(&self, batch: &[Vec<TokenItem>], layer: OutputLayer) -> Result<Tensor> {
        let device = self.relative_attention_bias.device();
        let rows = batch
            .iter()
            .map(|row| self.embed_row(row, device))
            .collect::<Result<Vec<_>>>()?;
        let mut x = Tensor::stack(&rows, 0)?;
        let length = batch.first().map_or(0, Vec::len);
        let position_bias = self.position_bias(length, device)?;
        let blocks_run = match layer {
            OutputLayer::FromEnd(from_end) if from_end >= 1 && from_end <= self.blocks.len() => {
                self.blocks.len() - from_end + 1
            }
            _ => self.blocks.len(),
        };
        for block in &self.blocks[..blocks_run] {
            x = block.forward(&x, &position_bias, &self.config)?;
        }
        self.final_norm.forward(&x)
    }

    /// Encodes chunks of weighted tokens as ComfyUI does ([`encode_token_weights`], with an
    /// empty prompt of `</s>` and padding): [1, L·chunks, d_model].
    pub fn encode_weighted(&self, chunks: &[Vec<WeightedToken>], layer: OutputLayer) -> Result<Tensor> {
        let (hidden, ()) = encode_token_weights(chunks, &[T5_END_TOKEN], T5_PAD_TOKEN, |batch| {
            Ok((self.forward(batch, layer)?, ()))
        })?;
        Ok(hidden)
    }

    /// The embeddings [L, d_model] of one row: vocabulary rows, or textual-inversion vectors.
    fn embed_row(&self, row: &[TokenItem], device: &Device) -> Result<Tensor> {
        let vectors = row
            .iter()
            .map(|item| match item {
                TokenItem::Token(token) => self.shared.row(*token as usize, device),
                TokenItem::Embedding(values) => Tensor::from_vec(values.clone(), self.config.d_model, device),
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&vectors, 0)?.to_dtype(DType::F32)
    }

    /// The learnt bias of each head for each (query, key) pair, by bucketed relative position:
    /// [heads, L, L].
    fn position_bias(&self, length: usize, device: &Device) -> Result<Tensor> {
        let buckets: Vec<u32> = (0..length)
            .flat_map(|query| (0..length).map(move |key| relative_position_bucket(key as i64 - query as i64)))
            .collect();
        let buckets = Tensor::from_vec(buckets, length * length, device)?;
        self.relative_attention_bias
            .index_select(&buckets, 0)?
            .reshape((length, length, self.config.heads))?
            .permute((2, 0, 1))?
            .contiguous()
    }
}

/// llama.cpp's names of T5 tensors (GGUF files) and the transformers names they stand for, in
/// the order ComfyUI-GGUF replaces them (`enc.blk.0.attn_q.weight` →
/// `encoder.block.0.layer.0.SelfAttention.q.weight`).
const LLAMA_CPP_NAMES: [(&str, &str); 14] = [
    ("enc.", "encoder."),
    (".blk.", ".block."),
    ("token_embd", "shared"),
    ("output_norm", "final_layer_norm"),
    ("attn_q", "layer.0.SelfAttention.q"),
    ("attn_k", "layer.0.SelfAttention.k"),
    ("attn_v", "layer.0.SelfAttention.v"),
    ("attn_o", "layer.0.SelfAttention.o"),
    ("attn_norm", "layer.0.layer_norm"),
    ("attn_rel_b", "layer.0.SelfAttention.relative_attention_bias"),
    ("ffn_up", "layer.1.DenseReluDense.wi_1"),
    ("ffn_down", "layer.1.DenseReluDense.wo"),
    ("ffn_gate", "layer.1.DenseReluDense.wi_0"),
    ("ffn_norm", "layer.1.layer_norm"),
];

/// The transformers name of a T5 tensor named as llama.cpp names it.
pub fn t5_name_from_llama_cpp(name: &str) -> String {
    LLAMA_CPP_NAMES
        .iter()
        .fold(name.to_string(), |name, (from, to)| name.replace(from, to))
}

/// The llama.cpp name of a T5 tensor (for test models written as GGUF).
pub fn t5_name_to_llama_cpp(name: &str) -> String {
    LLAMA_CPP_NAMES
        .iter()
        .rev()
        .fold(name.to_string(), |name, (llama_cpp, transformers)| {
            name.replace(transformers, llama_cpp)
        })
}

/// T5's bidirectional bucket of a relative position (key − query): the sign picks the half,
/// distances below 8 have a bucket each, longer ones share logarithmically wider buckets up to
/// distance 128 (computed in f32, as PyTorch does).
pub fn relative_position_bucket(relative: i64) -> u32 {
    let half = (BUCKETS / 2) as u32;
    let max_exact = half / 2;
    let offset = if relative > 0 { half } else { 0 };
    let distance = relative.unsigned_abs() as u32;
    if distance < max_exact {
        return offset + distance;
    }
    let exact = max_exact as f32;
    let scaled = (distance as f32 / exact).ln() / (MAX_DISTANCE / exact).ln() * (half - max_exact) as f32;
    offset + (max_exact + scaled as u32).min(half - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testmodels::{t5_layout, tiny_t5};

    #[test]
    fn llama_cpp_names_map_to_transformers_names_and_back() {
        assert_eq!(
            t5_name_from_llama_cpp("enc.blk.3.attn_rel_b.weight"),
            "encoder.block.3.layer.0.SelfAttention.relative_attention_bias.weight"
        );
        assert_eq!(
            t5_name_from_llama_cpp("enc.output_norm.weight"),
            "encoder.final_layer_norm.weight"
        );
        assert_eq!(t5_name_from_llama_cpp("token_embd.weight"), "shared.weight");
        assert_eq!(
            t5_name_from_llama_cpp("enc.blk.0.ffn_gate.weight"),
            "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
        );
        for spec in t5_layout(&tiny_t5(), "").expect("layout") {
            let llama_cpp = t5_name_to_llama_cpp(&spec.name);
            assert!(!llama_cpp.contains("layer."), "{llama_cpp}");
            assert_eq!(t5_name_from_llama_cpp(&llama_cpp), spec.name);
        }
    }

    #[test]
    fn relative_positions_fall_in_t5s_buckets() {
        // Exact below 8, the other direction offset by 16, logarithmic above, capped at 15.
        assert_eq!(relative_position_bucket(0), 0);
        assert_eq!(relative_position_bucket(-7), 7);
        assert_eq!(relative_position_bucket(7), 23);
        assert_eq!(relative_position_bucket(-8), 8);
        // 8 + ⌊ln(16/8)/ln(16)·8⌋ = 8 + 2.
        assert_eq!(relative_position_bucket(-16), 10);
        assert_eq!(relative_position_bucket(-127), 15);
        assert_eq!(relative_position_bucket(-1000), 15);
        assert_eq!(relative_position_bucket(1000), 31);
    }
}
