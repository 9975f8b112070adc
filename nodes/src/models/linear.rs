//! The fully connected layer of the UNet and the text encoders (`weight` [out, in], optional
//! `bias`): x·Wᵀ + b by the GEMM of [`super::sgemm`] on the CPU in f32, split into row blocks
//! across threads; by candle elsewhere. The weights are used in place.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::cpu_kernels::with_cpu_f32;
use super::sgemm::{gemm_into, View};

pub struct Linear(candle_nn::Linear);

/// A layer with a bias.
pub fn linear(in_features: usize, out_features: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear(candle_nn::linear(in_features, out_features, vb)?))
}

/// A layer without a bias.
pub fn linear_no_bias(in_features: usize, out_features: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear(candle_nn::linear_no_bias(in_features, out_features, vb)?))
}

/// Rows per task: enough to keep the GEMM efficient.
const MIN_ROWS_PER_TASK: usize = 32;

fn forward_rows(x: &[f32], weight: &[f32], bias: Option<&[f32]>, in_features: usize, out_features: usize) -> Vec<f32> {
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
            gemm_into(out, out_features, lhs, weight_t, 1.0, bias.is_some());
        });
    output
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let weight = self.0.weight();
        let (out_features, in_features) = weight.dims2()?;
        let dims = x.dims();
        if dims.last() != Some(&in_features) {
            return self.0.forward(x);
        }
        let values = match self.0.bias() {
            Some(bias) => with_cpu_f32([x, weight, bias], |[x, weight, bias]| {
                forward_rows(x, weight, Some(bias), in_features, out_features)
            })?,
            None => with_cpu_f32([x, weight], |[x, weight]| {
                forward_rows(x, weight, None, in_features, out_features)
            })?,
        };
        match values {
            Some(values) => {
                let mut shape = dims.to_vec();
                if let Some(last) = shape.last_mut() {
                    *last = out_features;
                }
                Tensor::from_vec(values, shape, &Device::Cpu)
            }
            None => self.0.forward(x),
        }
    }
}
