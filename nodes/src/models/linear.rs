//! The fully connected layer of the UNet and the text encoders (`weight` [out, in], optional
//! `bias`): x·Wᵀ + b by the GEMM of [`super::sgemm`] on the CPU in f32, split into row blocks
//! across threads, reading the weights in place ([`WeightMatrix`]); by candle elsewhere.

use candle_core::{Device, Module, Result, Tensor};
use rayon::prelude::*;

use super::cpu_kernels::with_cpu_f32;
use super::sgemm::{gemm_into, Elements, Precision, View};
use super::weights::{WeightMatrix, Weights};

pub struct Linear {
    weight: WeightMatrix,
    bias: Option<Tensor>,
}

/// A layer with a bias.
pub fn linear(in_features: usize, out_features: usize, weights: Weights) -> Result<Linear> {
    linear_named(in_features, out_features, weights, ("weight", "bias"))
}

/// A layer with a bias whose tensors have other names than `weight` and `bias` (OpenCLIP's
/// fused `in_proj_weight` / `in_proj_bias`).
pub fn linear_named(
    in_features: usize,
    out_features: usize,
    weights: Weights,
    (weight, bias): (&str, &str),
) -> Result<Linear> {
    Ok(Linear {
        weight: weights.matrix((out_features, in_features), weight)?,
        bias: Some(weights.get(out_features, bias)?),
    })
}

/// A layer without a bias.
pub fn linear_no_bias(in_features: usize, out_features: usize, weights: Weights) -> Result<Linear> {
    Ok(Linear {
        weight: weights.matrix((out_features, in_features), "weight")?,
        bias: None,
    })
}

/// Rows per task: enough to keep the GEMM efficient.
const MIN_ROWS_PER_TASK: usize = 32;

/// x·Wᵀ + b for the rows of `x`, with `weight` [out_features, in_features] multiplied in
/// `precision`.
fn forward_rows(
    x: &[f32],
    weight: Elements,
    bias: Option<&[f32]>,
    (out_features, in_features): (usize, usize),
    precision: Precision,
) -> Vec<f32> {
    let rows = x.len() / in_features;
    let mut output = vec![0f32; rows * out_features];
    let tasks = 2 * rayon::current_num_threads();
    let rows_per_task = rows.div_ceil(tasks).max(MIN_ROWS_PER_TASK);
    let weight_t = View {
        data: weight,
        rows: in_features,
        cols: out_features,
        row_stride: 1,
        col_stride: in_features,
    };
    output
        .par_chunks_mut(rows_per_task * out_features)
        .zip(x.par_chunks(rows_per_task * in_features))
        .for_each(|(out, input)| {
            let count = input.len() / in_features;
            if let Some(bias) = bias {
                out.chunks_mut(out_features).for_each(|row| row.copy_from_slice(bias));
            }
            let lhs = View::row_major(input, count, in_features);
            gemm_into(out, out_features, lhs, &weight_t, 1.0, bias.is_some(), precision);
        });
    output
}

impl Linear {
    /// candle's layer, for other devices and dtypes.
    fn candle_forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::Linear::new(self.weight.tensor()?, self.bias.clone()).forward(x)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [out_features, in_features] = self.weight.dims() else {
            return self.candle_forward(x);
        };
        let (out_features, in_features) = (*out_features, *in_features);
        let dims = x.dims();
        if dims.last() != Some(&in_features) {
            return self.candle_forward(x);
        }
        let (features, precision) = ((out_features, in_features), self.weight.precision());
        let values = match &self.bias {
            Some(bias) => with_cpu_f32([x, bias], |[x, bias]| {
                self.weight
                    .with_elements(|weight| forward_rows(x, weight, Some(bias), features, precision))
            })?,
            None => with_cpu_f32([x], |[x]| {
                self.weight
                    .with_elements(|weight| forward_rows(x, weight, None, features, precision))
            })?,
        }
        .transpose()?
        .flatten();
        match values {
            Some(values) => {
                let mut shape = dims.to_vec();
                if let Some(last) = shape.last_mut() {
                    *last = out_features;
                }
                Tensor::from_vec(values, shape, &Device::Cpu)
            }
            None => self.candle_forward(x),
        }
    }
}
