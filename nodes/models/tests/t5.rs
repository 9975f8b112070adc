//! The T5 encoder against T5's formulas written out in f64 on a tiny model.

use candle_core::{DType, Device, Tensor};
use easel_models::architectures::clip_text::OutputLayer;
use easel_models::architectures::t5::{relative_position_bucket, T5Config, T5Encoder};
use easel_models::testmodels::{t5_layout, tiny_t5, write_checkpoint};
use easel_models::text::tokenizer::{TokenItem, WeightedToken};
use easel_models::weights::{MappedWeights, SafetensorsFile, Weights};
use std::sync::Arc;

type Rows = Vec<Vec<f64>>;

struct Reference<'a> {
    file: &'a SafetensorsFile,
    config: T5Config,
}

impl Reference<'_> {
    fn tensor(&self, name: &str) -> Vec<f64> {
        let tensor = self.file.load(name, DType::F32, &Device::Cpu).unwrap();
        tensor
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    }

    /// x·Wᵀ for a [out, in] weight.
    fn project(&self, x: &Rows, name: &str) -> Rows {
        let weight = self.tensor(name);
        x.iter()
            .map(|row| {
                let outputs = weight.len() / row.len();
                (0..outputs)
                    .map(|o| row.iter().enumerate().map(|(i, v)| weight[o * row.len() + i] * v).sum())
                    .collect()
            })
            .collect()
    }

    fn norm(&self, x: &Rows, name: &str) -> Rows {
        let weight = self.tensor(name);
        x.iter()
            .map(|row| {
                let rms = (row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64 + 1e-6).sqrt();
                row.iter().zip(&weight).map(|(v, w)| v / rms * w).collect()
            })
            .collect()
    }

    /// The final-normed output of the first `blocks` blocks.
    fn forward(&self, tokens: &[u32], blocks: usize) -> Rows {
        let shared = self.tensor("shared.weight");
        let d = self.config.d_model;
        let mut x: Rows = tokens
            .iter()
            .map(|&t| shared[t as usize * d..(t as usize + 1) * d].to_vec())
            .collect();
        let bias = self.tensor("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight");
        let (heads, d_kv, length) = (self.config.heads, self.config.d_kv, tokens.len());
        for layer in 0..blocks {
            let block = format!("encoder.block.{layer}");
            let normed = self.norm(&x, &format!("{block}.layer.0.layer_norm.weight"));
            let attention = |name: &str| self.project(&normed, &format!("{block}.layer.0.SelfAttention.{name}.weight"));
            let (q, k, v) = (attention("q"), attention("k"), attention("v"));
            let mut out = vec![vec![0.0; heads * d_kv]; length];
            for h in 0..heads {
                for (i, out_row) in out.iter_mut().enumerate() {
                    let scores: Vec<f64> = (0..length)
                        .map(|j| {
                            let dot: f64 = (0..d_kv).map(|e| q[i][h * d_kv + e] * k[j][h * d_kv + e]).sum();
                            let bucket = relative_position_bucket(j as i64 - i as i64) as usize;
                            dot + bias[bucket * heads + h]
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    for e in 0..d_kv {
                        out_row[h * d_kv + e] = (0..length).map(|j| weights[j] / total * v[j][h * d_kv + e]).sum();
                    }
                }
            }
            let projected = self.project(&out, &format!("{block}.layer.0.SelfAttention.o.weight"));
            add(&mut x, &projected);
            let normed = self.norm(&x, &format!("{block}.layer.1.layer_norm.weight"));
            let ff = |name: &str| self.project(&normed, &format!("{block}.layer.1.DenseReluDense.{name}.weight"));
            let (gate, up) = (ff("wi_0"), ff("wi_1"));
            let gated: Rows = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g.iter().zip(u).map(|(g, u)| gelu(*g) * u).collect())
                .collect();
            let down = self.project(&gated, &format!("{block}.layer.1.DenseReluDense.wo.weight"));
            add(&mut x, &down);
        }
        self.norm(&x, "encoder.final_layer_norm.weight")
    }
}

fn gelu(v: f64) -> f64 {
    0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh())
}

fn add(x: &mut Rows, y: &Rows) {
    for (row, other) in x.iter_mut().zip(y) {
        for (a, b) in row.iter_mut().zip(other) {
            *a += b;
        }
    }
}

#[test]
fn t5_encoder_matches_the_formulas_written_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny_t5.safetensors");
    write_checkpoint(&path, &t5_layout(&tiny_t5(), "").unwrap()).unwrap();
    let file = Arc::new(SafetensorsFile::open(&path).unwrap());
    let config = T5Config::infer(file.as_ref(), "").unwrap();
    assert_eq!(config, tiny_t5());
    let encoder = T5Encoder::new(
        config.clone(),
        Weights::from_file(file.clone(), DType::F32, &Device::Cpu),
    )
    .unwrap();
    // Long enough for relative distances in the logarithmic buckets, with a repeated token.
    let tokens: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 64).chain([5, 5, 1]).collect();
    let reference = Reference { file: &file, config };
    let row = |tokens: &[u32]| tokens.iter().map(|&t| TokenItem::Token(t)).collect::<Vec<_>>();
    let close = |ours: &Tensor, expected: &[f64]| {
        let ours: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(ours.len(), expected.len());
        let scale = expected.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (i, (ours, expected)) in ours.iter().zip(expected).enumerate() {
            assert!(
                (f64::from(*ours) - expected).abs() < 1e-4 * scale,
                "element {i}: {ours} vs {expected}"
            );
        }
    };
    let ours = encoder.forward(&[row(&tokens)], OutputLayer::Last).unwrap();
    assert_eq!(ours.dims(), &[1, tokens.len(), 32]);
    close(&ours, &reference.forward(&tokens, 2).concat());
    // CLIPSetLastLayer -2: the first block's output, through the final norm.
    let ours = encoder.forward(&[row(&tokens)], OutputLayer::FromEnd(2)).unwrap();
    close(&ours, &reference.forward(&tokens, 1).concat());
    assert!(
        encoder.forward(&[row(&[64])], OutputLayer::Last).is_err(),
        "a token beyond the vocabulary"
    );

    // Weighted tokens: empty + (z − empty)·w where w ≠ 1, the empty prompt being </s> and padding.
    let weighted: Vec<WeightedToken> = [(7, 1.0), (9, 1.5), (11, 1.0), (1, 0.5)]
        .into_iter()
        .map(|(t, w)| (TokenItem::Token(t), w))
        .collect();
    let ours = encoder
        .encode_weighted(std::slice::from_ref(&weighted), OutputLayer::Last)
        .unwrap();
    let z = reference.forward(&[7, 9, 11, 1], 2);
    let empty = reference.forward(&[1, 0, 0, 0], 2);
    let expected: Vec<f64> = z
        .iter()
        .zip(&empty)
        .zip(&weighted)
        .flat_map(|((z, e), (_, w))| {
            z.iter()
                .zip(e)
                .map(move |(z, e)| if *w == 1.0 { *z } else { e + (z - e) * w })
        })
        .collect();
    close(&ours, &expected);
}
