//! CPU kernels for the two operations that dominate diffusion models, on contiguous f32 data:
//! 2-D convolution as GEMM over the unfolded (im2col) input, read in place while it is packed, and
//! attention fused per block of queries (scores, softmax and weighted sum while the scores are
//! still in cache). Both run on [`crate::kernels::sgemm`]; callers fall back to candle's operations on
//! other devices and dtypes.

use candle_core::{DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

use std::cell::RefCell;

use crate::kernels::sgemm::{gemm_into, with_scratch, Elements, Precision, RhsSource, View};

thread_local! {
    /// Each thread's buffer for a block of attention scores.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on the elements of CPU f32 tensors (made contiguous), or returns `None` when one
/// of them lives elsewhere or has another dtype.
pub fn with_cpu_f32<const N: usize, R>(tensors: [&Tensor; N], f: impl FnOnce([&[f32]; N]) -> R) -> Result<Option<R>> {
    if tensors
        .iter()
        .any(|tensor| !matches!(tensor.device(), Device::Cpu) || tensor.dtype() != DType::F32)
    {
        return Ok(None);
    }
    let owned = tensors
        .iter()
        .map(|tensor| tensor.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = owned.iter().map(|tensor| tensor.storage_and_layout()).collect();
    let mut slices: Vec<&[f32]> = Vec::with_capacity(N);
    for ((storage, layout), tensor) in guards.iter().zip(&owned) {
        let Storage::Cpu(cpu) = &**storage else {
            return Ok(None);
        };
        let start = layout.start_offset();
        slices.push(&cpu.as_slice::<f32>()?[start..start + tensor.elem_count()]);
    }
    let slices: [&[f32]; N] = slices
        .try_into()
        .map_err(|_| candle_core::Error::Msg("tensor count mismatch".into()))?;
    Ok(Some(f(slices)))
}

/// The geometry of one convolution.
#[derive(Clone, Copy, Debug)]
pub struct ConvShape {
    pub batch: usize,
    pub in_channels: usize,
    pub height: usize,
    pub width: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvShape {
    pub fn out_height(&self) -> usize {
        (self.height + 2 * self.padding - self.kernel) / self.stride + 1
    }

    pub fn out_width(&self) -> usize {
        (self.width + 2 * self.padding - self.kernel) / self.stride + 1
    }
}

/// Upper bound on the unfolded input of one GEMM call: it sizes the column chunks (and the copy
/// written out where the GEMM cannot read it in place, without AVX-512).
const UNFOLDED_BYTES: usize = 32 << 20;

/// Convolution of `input` [B, C, H, W] with `weight` [O, C·k·k] and `bias` [O], multiplied in
/// `precision`: returns [B, O, H_out, W_out] in row-major order.
pub fn conv2d(input: &[f32], weight: Elements, bias: &[f32], shape: ConvShape, precision: Precision) -> Vec<f32> {
    let ConvShape {
        batch,
        in_channels,
        height,
        width,
        out_channels,
        kernel,
        stride,
        padding,
    } = shape;
    let (out_height, out_width) = (shape.out_height(), shape.out_width());
    let plane = out_height * out_width;
    let depth = in_channels * kernel * kernel;
    assert_eq!(input.len(), batch * in_channels * height * width, "input size");
    assert_eq!(weight.len(), out_channels * depth, "weight size");
    assert_eq!(bias.len(), out_channels, "bias size");
    let weights = View::row_major(weight, out_channels, depth);
    let pointwise = kernel == 1 && stride == 1 && padding == 0;
    // Chunks of output rows: small enough to bound the unfolded input, and at least two per
    // thread so that every core has work.
    let splits_per_item = (2 * rayon::current_num_threads()).div_ceil(batch).max(1);
    let rows_per_chunk = (UNFOLDED_BYTES / (depth * out_width * 4).max(1))
        .min(out_height.div_ceil(splits_per_item))
        .max(1);
    let chunks: Vec<(usize, usize)> = (0..batch)
        .flat_map(|b| (0..out_height).step_by(rows_per_chunk).map(move |row| (b, row)))
        .collect();
    let results: Vec<Vec<f32>> = chunks
        .par_iter()
        .map(|&(b, first_row)| {
            let image = &input[b * in_channels * height * width..(b + 1) * in_channels * height * width];
            let rows = rows_per_chunk.min(out_height - first_row);
            let columns = rows * out_width;
            let mut result = vec![0f32; out_channels * columns];
            for (values, value) in result.chunks_mut(columns).zip(bias) {
                values.fill(*value);
            }
            if pointwise {
                let pixels = View {
                    data: image[first_row * out_width..].into(),
                    rows: in_channels,
                    cols: columns,
                    row_stride: plane,
                    col_stride: 1,
                };
                gemm_into(&mut result, columns, weights, &pixels, 1.0, true, precision);
                return result;
            }
            let unfolded = UnfoldedInput {
                image,
                shape,
                first_row,
                columns,
            };
            gemm_into(&mut result, columns, weights, &unfolded, 1.0, true, precision);
            result
        })
        .collect();
    let mut output = vec![0f32; batch * out_channels * plane];
    for (&(b, first_row), result) in chunks.iter().zip(results) {
        let columns = result.len() / out_channels;
        for (channel, values) in result.chunks(columns).enumerate() {
            let start = (b * out_channels + channel) * plane + first_row * out_width;
            output[start..start + columns].copy_from_slice(values);
        }
    }
    output
}

/// The unfolded (im2col) input of one image for the output rows from `first_row`, read in place
/// while the GEMM packs it: row (channel, ky, kx), one column per output pixel, holding the input
/// pixel that output pixel sees through that kernel tap (0 in the padding).
struct UnfoldedInput<'a> {
    image: &'a [f32],
    shape: ConvShape,
    first_row: usize,
    columns: usize,
}

impl RhsSource for UnfoldedInput<'_> {
    fn rows(&self) -> usize {
        self.shape.in_channels * self.shape.kernel * self.shape.kernel
    }

    fn cols(&self) -> usize {
        self.columns
    }

    fn read_row(&self, index: usize, first_column: usize, out: &mut [f32]) {
        let ConvShape {
            height,
            width,
            kernel,
            stride,
            padding,
            ..
        } = self.shape;
        let out_width = self.shape.out_width();
        let channel = index / (kernel * kernel);
        let ky = (index / kernel) % kernel;
        let kx = index % kernel;
        let source = &self.image[channel * height * width..(channel + 1) * height * width];
        // Output x reads input x·stride + kx − padding; with stride 1 the valid x are first..last.
        let first = padding.saturating_sub(kx).min(out_width);
        let last = (width + padding).saturating_sub(kx).clamp(first, out_width);
        let mut column = first_column;
        let mut filled = 0;
        while filled < out.len() {
            // One output row at a time: from x0 to the row's end or the segment's.
            let x0 = column % out_width;
            let run = (out_width - x0).min(out.len() - filled);
            let values = &mut out[filled..filled + run];
            let iy = ((self.first_row + column / out_width) * stride + ky) as isize - padding as isize;
            if iy < 0 || iy >= height as isize {
                values.fill(0.0);
            } else {
                let line = &source[iy as usize * width..(iy as usize + 1) * width];
                if stride == 1 {
                    let lo = first.clamp(x0, x0 + run);
                    let hi = last.clamp(lo, x0 + run);
                    values[..lo - x0].fill(0.0);
                    if hi > lo {
                        let start = lo + kx - padding;
                        values[lo - x0..hi - x0].copy_from_slice(&line[start..start + (hi - lo)]);
                    }
                    values[hi - x0..].fill(0.0);
                } else {
                    for (offset, value) in values.iter_mut().enumerate() {
                        let ix = ((x0 + offset) * stride + kx) as isize - padding as isize;
                        *value = if ix < 0 || ix >= width as isize {
                            0.0
                        } else {
                            line[ix as usize]
                        };
                    }
                }
            }
            filled += run;
            column += run;
        }
    }
}

/// Queries per attention task: their scores against all keys stay within a few MB.
const QUERY_BLOCK: usize = 128;

/// Fused multi-head attention on [BH, N, D] tensors: `softmax(q·kᵀ·scale + mask)·v`, `mask`
/// [Nq, Nk] shared by every head. Returns [BH, Nq, D].
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[f32]>,
    heads: usize,
    query_length: usize,
    key_length: usize,
    head_dim: usize,
    scale: f32,
) -> Vec<f32> {
    assert_eq!(q.len(), heads * query_length * head_dim, "query size");
    assert_eq!(k.len(), heads * key_length * head_dim, "key size");
    assert_eq!(v.len(), k.len(), "value size");
    if let Some(mask) = mask {
        assert_eq!(mask.len(), query_length * key_length, "mask size");
    }
    let mut output = vec![0f32; q.len()];
    if output.is_empty() {
        return output;
    }
    let tasks = output
        .par_chunks_mut(query_length * head_dim)
        .enumerate()
        .flat_map(|(head, out)| {
            out.par_chunks_mut(QUERY_BLOCK * head_dim)
                .enumerate()
                .map(move |(block, out)| (head, block, out))
        });
    tasks.for_each(|(head, block, out)| {
        let first = block * QUERY_BLOCK;
        let rows = QUERY_BLOCK.min(query_length - first);
        let out = &mut out[..rows * head_dim];
        let queries = View {
            data: q[(head * query_length + first) * head_dim..].into(),
            rows,
            cols: head_dim,
            row_stride: head_dim,
            col_stride: 1,
        };
        let keys = &k[head * key_length * head_dim..(head + 1) * key_length * head_dim];
        let values = &v[head * key_length * head_dim..(head + 1) * key_length * head_dim];
        let keys_transposed = View::transpose_of(keys, key_length, head_dim);
        with_scratch(&SCRATCH, rows * key_length, |scores| {
            gemm_into(
                scores,
                key_length,
                queries,
                &keys_transposed,
                scale,
                false,
                Precision::F32,
            );
            let mut sums = vec![0f32; rows];
            for (r, row) in scores.chunks_mut(key_length).enumerate() {
                if let Some(mask) = mask {
                    let mask_row = &mask[(first + r) * key_length..(first + r + 1) * key_length];
                    row.iter_mut().zip(mask_row).for_each(|(s, m)| *s += m);
                }
                sums[r] = softmax_numerator(row);
            }
            // out = P·V is computed as outᵀ = Vᵀ·Pᵀ: the narrow head dimension then fills the
            // GEMM's 6-row side instead of wasting most of a 32-column panel.
            let values_transposed = View::transpose_of(values, key_length, head_dim);
            let probabilities_transposed = View::transpose_of(&*scores, rows, key_length);
            let mut transposed = vec![0f32; head_dim * rows];
            gemm_into(
                &mut transposed,
                rows,
                values_transposed,
                &probabilities_transposed,
                1.0,
                false,
                Precision::F32,
            );
            for (r, (row, sum)) in out.chunks_mut(head_dim).zip(&sums).enumerate() {
                let inverse = 1.0 / sum;
                for (d, value) in row.iter_mut().enumerate() {
                    *value = transposed[d * rows + r] * inverse;
                }
            }
        });
    });
    output
}

/// GEGLU on rows of `2·half` values: `a · gelu(b)` with `a` the first half of each row and
/// `b` the second, gelu by the error function as torch's default.
pub fn geglu(projected: &[f32], half: usize) -> Vec<f32> {
    let rows = projected.len() / (2 * half).max(1);
    let mut output = vec![0f32; rows * half];
    output
        .par_chunks_mut(half)
        .zip(projected.par_chunks(2 * half))
        .with_min_len(64)
        .for_each(|(out, row)| {
            let (values, gates) = row.split_at(half);
            for ((o, v), g) in out.iter_mut().zip(values).zip(gates) {
                *o = v * gelu_erf(*g);
            }
        });
    output
}

/// GELU (by the error function, as torch's default) of every value, in parallel.
pub fn gelu(values: &[f32]) -> Vec<f32> {
    let mut output = vec![0f32; values.len()];
    output
        .par_chunks_mut(4096)
        .zip(values.par_chunks(4096))
        .for_each(|(out, values)| {
            for (o, v) in out.iter_mut().zip(values) {
                *o = gelu_erf(*v);
            }
        });
    output
}

/// `x·Φ(x) = ½·x·(1 + erf(x/√2))`, erf by Abramowitz & Stegun 7.1.26 (absolute error ≤ 1.5e-7).
#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    let z = (x * std::f32::consts::FRAC_1_SQRT_2).abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let polynomial = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152 + t * 1.061_405_4))));
    let erf_abs = 1.0 - polynomial * fast_exp(-z * z);
    let erf = if x < 0.0 { -erf_abs } else { erf_abs };
    0.5 * x * (1.0 + erf)
}

/// Replaces `row` by `exp(row − max(row))` and returns its sum.
fn softmax_numerator(row: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        return unsafe { softmax_numerator_avx2(row) };
    }
    softmax_numerator_portable(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_numerator_avx2(row: &mut [f32]) -> f32 {
    softmax_numerator_portable(row)
}

/// Written in 8 independent lanes without branches so that the compiler vectorises it.
#[inline(always)]
fn softmax_numerator_portable(row: &mut [f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, value) in lanes.iter_mut().zip(chunk) {
            *lane = if *value > *lane { *value } else { *lane };
        }
    }
    let mut max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for value in chunks.remainder() {
        max = max.max(*value);
    }
    if max == f32::NEG_INFINITY {
        max = 0.0;
    }
    let mut sums = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for chunk in &mut chunks {
        for (lane, value) in sums.iter_mut().zip(chunk.iter_mut()) {
            *value = fast_exp(*value - max);
            *lane += *value;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for value in chunks.into_remainder() {
        *value = fast_exp(*value - max);
        sum += *value;
    }
    sum
}

/// eˣ by Cephes' `expf` (range reduction by ln 2, degree-5 polynomial), within 2 ulp down to
/// the underflow limit. The power of two comes from the low bits of x·log₂e + 1.5·2²³ (the
/// rounded exponent), so every step is a plain float or integer lane operation and the loop
/// vectorises.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const SHIFTER: f32 = 12_582_912.0;
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.3);
    let shifted = x * LOG2E + SHIFTER;
    let n = shifted - SHIFTER;
    let r = x - n * LN2_HIGH - n * LN2_LOW;
    let z = r * r;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * z + r + 1.0;
    y * f32::from_bits(shifted.to_bits().wrapping_add(127) << 23)
}
