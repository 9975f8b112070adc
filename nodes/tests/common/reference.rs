//! The pieces of transformer forward passes written out in f64 loops over a file's weights, for
//! the tests that check a network against its formulas (FLUX, SD3's MMDiT).

use candle_core::{DType, Device, Tensor};
use easel_models::weights::{MappedWeights, SafetensorsFile};

/// One row of features per token.
pub type Rows = Vec<Vec<f64>>;

/// A deterministic tensor of `shape` with values in [-1, 1].
pub fn wave(shape: &[usize], step: f32) -> Tensor {
    let count = shape.iter().product::<usize>();
    let values: Vec<f32> = (0..count).map(|i| (i as f32 * step + 0.3).sin()).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// Every element of `tensor`, in order.
pub fn values(tensor: &Tensor) -> Vec<f32> {
    tensor.flatten_all().unwrap().to_vec1().unwrap()
}

/// Every element of `tensor` as f64, in order.
pub fn values64(tensor: &Tensor) -> Vec<f64> {
    values(tensor).into_iter().map(f64::from).collect()
}

/// The weights of a file, read as f64.
pub struct FileWeights<'a>(pub &'a SafetensorsFile);

impl FileWeights<'_> {
    pub fn tensor(&self, name: &str) -> Vec<f64> {
        values64(&self.0.load(name, DType::F32, &Device::Cpu).unwrap())
    }

    /// x·Wᵀ + b of the layer `name` (`name.weight`, `name.bias`).
    pub fn linear(&self, x: &Rows, name: &str) -> Rows {
        let weight = self.tensor(&format!("{name}.weight"));
        let bias = self.tensor(&format!("{name}.bias"));
        x.iter()
            .map(|row| {
                bias.iter()
                    .enumerate()
                    .map(|(o, b)| b + dot(&weight[o * row.len()..(o + 1) * row.len()], row))
                    .collect()
            })
            .collect()
    }

    /// Linear, SiLU, linear: the layers `first` and `second` on the vector `x`.
    pub fn mlp(&self, x: &[f64], first: &str, second: &str) -> Vec<f64> {
        let hidden = self.linear(&vec![x.to_vec()], first);
        let hidden = vec![hidden[0].iter().map(|&v| silu(v)).collect()];
        self.linear(&hidden, second).remove(0)
    }

    /// `x += gate·second(GELU(first(modulated x)))` per token: a DiT stream's MLP, modulated by
    /// `modulation[3]` (shift) and `[4]` (scale), gated by `[5]`.
    pub fn add_gated_mlp(&self, x: &mut Rows, modulation: &Rows, first: &str, second: &str) {
        let hidden = self.linear(&modulate(x, &modulation[3], &modulation[4]), first);
        let hidden: Rows = hidden
            .iter()
            .map(|row| row.iter().map(|&v| gelu(v)).collect())
            .collect();
        let out = self.linear(&hidden, second);
        add_gated(x, &out, &modulation[5]);
    }

    /// `count` modulation vectors from `vec` by the layer `name` (after SiLU).
    pub fn modulation(&self, vec: &[f64], name: &str, count: usize) -> Rows {
        let activated: Vec<f64> = vec.iter().map(|&v| silu(v)).collect();
        let out = self.linear(&vec![activated], name).remove(0);
        out.chunks(out.len() / count).map(<[f64]>::to_vec).collect()
    }
}

/// softmax(q·kᵀ/√d)·v per head (`q[h][token]`), the heads joined per token.
pub fn softmax_attention(q: &[Rows], k: &[Rows], v: &[Rows]) -> Rows {
    let tokens = q[0].len();
    let keys = k[0].len();
    let head_dim = q[0][0].len();
    (0..tokens)
        .map(|t| {
            (0..q.len())
                .flat_map(|h| {
                    let scores: Vec<f64> = (0..keys)
                        .map(|s| dot(&q[h][t], &k[h][s]) / (head_dim as f64).sqrt())
                        .collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    (0..head_dim)
                        .map(|d| (0..keys).map(|s| weights[s] / total * v[h][s][d]).sum::<f64>())
                        .collect::<Vec<_>>()
                })
                .collect()
        })
        .collect()
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

/// GELU with the tanh approximation.
pub fn gelu(v: f64) -> f64 {
    0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh())
}

/// The 256-wide sinusoid of `t`, cosines first.
pub fn sinusoid(t: f64) -> Vec<f64> {
    let arguments: Vec<f64> = (0..128)
        .map(|i| t * (-(10000f64.ln()) * i as f64 / 128.0).exp())
        .collect();
    arguments
        .iter()
        .map(|a| a.cos())
        .chain(arguments.iter().map(|a| a.sin()))
        .collect()
}

/// `(1 + scale)·LayerNorm(x) + shift` per token.
pub fn modulate(x: &Rows, shift: &[f64], scale: &[f64]) -> Rows {
    x.iter()
        .map(|row| {
            let mean = row.iter().sum::<f64>() / row.len() as f64;
            let variance = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / row.len() as f64;
            row.iter()
                .zip(shift.iter().zip(scale))
                .map(|(v, (sh, sc))| (1.0 + sc) * (v - mean) / (variance + 1e-6).sqrt() + sh)
                .collect()
        })
        .collect()
}

/// `x += gate·out` per token.
pub fn add_gated(x: &mut Rows, out: &Rows, gate: &[f64]) {
    for (row, out) in x.iter_mut().zip(out) {
        for ((v, o), g) in row.iter_mut().zip(out).zip(gate) {
            *v += g * o;
        }
    }
}

/// x / rms(x) · scale, ε = 1e-6.
pub fn rms_norm(x: &[f64], scale: &[f64]) -> Vec<f64> {
    let rms = (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + 1e-6).sqrt();
    x.iter().zip(scale).map(|(v, s)| v / rms * s).collect()
}

/// Each element of `ours` within 1e-4 of the largest reference value of `expected`.
pub fn assert_close_to_reference(ours: &Tensor, expected: &[f64]) {
    let ours = values(ours);
    assert_eq!(ours.len(), expected.len());
    let scale = expected.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(scale > 1e-3, "a prediction to compare: {scale}");
    for (i, (ours, expected)) in ours.iter().zip(expected).enumerate() {
        assert!(
            (f64::from(*ours) - expected).abs() < 1e-4 * scale,
            "element {i}: {ours} vs {expected}"
        );
    }
}
