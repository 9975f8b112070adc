//! The fully connected layer of the UNet and the text encoders (`weight` [out, in], optional
//! `bias`): x·Wᵀ + b by the GEMM of [`crate::kernels::sgemm`] on the CPU in f32, split across threads by
//! input rows or by output columns, reading the weights in place ([`WeightMatrix`]), plus
//! `factor·(x·downᵀ)·upᵀ` for each low-rank update of quantized weights a LoRA patches; by
//! candle elsewhere.

use candle_core::{Device, Module, Result, Tensor};
use rayon::prelude::*;

use crate::kernels::cpu::with_cpu_f32;
use crate::kernels::sgemm::{gemm_into, Elements, Precision, View};
use crate::weights::{LowRankUpdate, WeightMatrix, Weights};

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

/// Rows per task when the threads share the input rows: enough to keep the GEMM efficient.
const MIN_ROWS_PER_TASK: usize = 32;

/// Input rows multiplied per pass when the threads share the output columns: each pass reads
/// (decodes) every weight once, and each thread's block of products holds this many rows.
const ROWS_PER_PASS: usize = 512;

/// Output columns of a task are a multiple of this (the GEMM's register tile is 32 wide).
const COLUMN_ALIGN: usize = 64;

/// x·Wᵀ + b for the rows of `x`, with `weight` [out_features, in_features] multiplied in
/// `precision`. The GEMM reads (and widens or decodes) the weights while it packs them, once
/// per task: so where the output is wide enough to keep every thread busy, the threads share
/// the output columns (each weight read once per pass of rows), else the input rows.
fn forward_rows(
    x: &[f32],
    weight: Elements,
    bias: Option<&[f32]>,
    features: (usize, usize),
    precision: Precision,
) -> Vec<f32> {
    match column_blocks(weight, features) {
        Some(blocks) if blocks.len() >= rayon::current_num_threads() => {
            forward_by_columns(x, &blocks, bias, features, precision)
        }
        _ => forward_by_rows(x, weight, bias, features, precision),
    }
}

/// The threads' shares of the output columns: (first column, columns, their weight rows);
/// `None` where a share would split a ggml block.
fn column_blocks(
    weight: Elements,
    (out_features, in_features): (usize, usize),
) -> Option<Vec<(usize, usize, Elements)>> {
    let tasks = 2 * rayon::current_num_threads();
    let width = out_features.div_ceil(tasks).next_multiple_of(COLUMN_ALIGN);
    (0..out_features)
        .step_by(width)
        .map(|first| {
            let columns = width.min(out_features - first);
            let rows = weight.range(first * in_features, columns * in_features)?;
            Some((first, columns, rows))
        })
        .collect()
}

fn forward_by_columns(
    x: &[f32],
    blocks: &[(usize, usize, Elements)],
    bias: Option<&[f32]>,
    (out_features, in_features): (usize, usize),
    precision: Precision,
) -> Vec<f32> {
    let rows = x.len() / in_features;
    let mut output = vec![0f32; rows * out_features];
    for (out, input) in output
        .chunks_mut(ROWS_PER_PASS * out_features)
        .zip(x.chunks(ROWS_PER_PASS * in_features))
    {
        let count = input.len() / in_features;
        let lhs = View::row_major(input, count, in_features);
        let products: Vec<Vec<f32>> = blocks
            .par_iter()
            .map(|&(first, columns, weight)| {
                let mut product = match bias {
                    Some(bias) => bias[first..first + columns].repeat(count),
                    None => vec![0f32; count * columns],
                };
                let weight_t = View::transpose_of(weight, columns, in_features);
                gemm_into(&mut product, columns, lhs, &weight_t, 1.0, bias.is_some(), precision);
                product
            })
            .collect();
        for (&(first, columns, _), product) in blocks.iter().zip(&products) {
            for (out_row, product_row) in out.chunks_mut(out_features).zip(product.chunks(columns)) {
                out_row[first..first + columns].copy_from_slice(product_row);
            }
        }
    }
    output
}

fn forward_by_rows(
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
    let weight_t = View::transpose_of(weight, out_features, in_features);
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

/// Adds `factor·(x·downᵀ)·upᵀ` of each update to `output` (x's rows × out_features), the
/// threads sharing the rows.
fn add_low_rank(
    x: &[f32],
    output: &mut [f32],
    updates: &[LowRankUpdate],
    (out_features, in_features): (usize, usize),
) -> Result<()> {
    if updates.is_empty() {
        return Ok(());
    }
    let rows = x.len() / in_features;
    let rows_per_task = rows.div_ceil(2 * rayon::current_num_threads()).max(MIN_ROWS_PER_TASK);
    LowRankUpdate::with_factors(updates, |factors| {
        output
            .par_chunks_mut(rows_per_task * out_features)
            .zip(x.par_chunks(rows_per_task * in_features))
            .for_each(|(out, input)| {
                let count = input.len() / in_features;
                for update in factors {
                    let rank = update.rank;
                    let mut projected = vec![0f32; count * rank];
                    let down_t = View::transpose_of(update.down, rank, in_features);
                    let lhs = View::row_major(input, count, in_features);
                    gemm_into(&mut projected, rank, lhs, &down_t, 1.0, false, Precision::F32);
                    let up_t = View::transpose_of(update.up, out_features, rank);
                    let lhs = View::row_major(&projected, count, rank);
                    gemm_into(out, out_features, lhs, &up_t, update.factor, true, Precision::F32);
                }
            })
    })
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
        let product = |x: &[f32], bias: Option<&[f32]>| -> Result<Option<Vec<f32>>> {
            let output = self
                .weight
                .with_base_elements(|weight| forward_rows(x, weight, bias, features, precision))?;
            let Some(mut output) = output else {
                return Ok(None);
            };
            add_low_rank(x, &mut output, self.weight.low_rank(), features)?;
            Ok(Some(output))
        };
        let values = match &self.bias {
            Some(bias) => with_cpu_f32([x, bias], |[x, bias]| product(x, Some(bias)))?,
            None => with_cpu_f32([x], |[x]| product(x, None))?,
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

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;
    use crate::formats::ggml_quants::{quantize::quantize, GgmlType};

    /// Shared out by output columns, in passes of input rows, stored weights give the f32
    /// product of their decoded values as the row split does, bit for bit, with partial column
    /// blocks and a partial last pass.
    #[test]
    fn column_split_gives_the_row_split_product_of_the_decoded_values() {
        let (out_features, in_features, rows) = (200, 64, ROWS_PER_PASS + 37);
        let wave = |i: usize, step: f32| (i as f32 * step).sin();
        let weights: Vec<f32> = (0..out_features * in_features).map(|i| wave(i, 0.37)).collect();
        let x: Vec<f32> = (0..rows * in_features).map(|i| wave(i, 0.11)).collect();
        let bias: Vec<f32> = (0..out_features).map(|i| wave(i, 1.3)).collect();
        let q8_0 = quantize(GgmlType::Q8_0, &weights).expect("Q8_0 test weights");
        let f16s: Vec<f16> = weights.iter().map(|&w| f16::from_f32(w)).collect();
        for stored in [
            Elements::Ggml(&q8_0, GgmlType::Q8_0),
            Elements::F16(&f16s),
            Elements::F32(&weights),
        ] {
            let blocks = column_blocks(stored, (out_features, in_features)).expect("whole blocks");
            assert!(blocks.len() > 1 && blocks.len() >= rayon::current_num_threads());
            let mut decoded = vec![0f32; weights.len()];
            stored.read(0, 1, &mut decoded);
            for bias in [Some(bias.as_slice()), None] {
                let features = (out_features, in_features);
                let expected = forward_by_rows(&x, Elements::F32(&decoded), bias, features, Precision::F32);
                assert!(forward_rows(&x, stored, bias, features, Precision::F32) == expected);
            }
        }
    }
}
