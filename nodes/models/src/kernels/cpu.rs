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

/// Below this many output pixels per task, the tasks share out the output channels instead of
/// the pixels: the GEMM packs (and widens) the weights of its rows once per call, so splitting
/// a small output's pixels would have every task pack all the weights.
const MIN_TASK_COLUMNS: usize = 256;

/// Output channels per task are rounded to whole register tiles of the GEMM (6 rows).
const CHANNEL_ALIGN: usize = 6;

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
    let plane = shape.out_height() * shape.out_width();
    let depth = in_channels * kernel * kernel;
    assert_eq!(input.len(), batch * in_channels * height * width, "input size");
    assert_eq!(weight.len(), out_channels * depth, "weight size");
    assert_eq!(bias.len(), out_channels, "bias size");
    let pointwise = kernel == 1 && stride == 1 && padding == 0;
    let tasks = conv_tasks(shape, weight);
    let results: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|task| {
            let mut result = vec![0f32; task.channels * task.columns];
            for (values, value) in result.chunks_mut(task.columns).zip(&bias[task.first_channel..]) {
                values.fill(*value);
            }
            let weights = View::row_major(task.weight, task.channels, depth);
            let (image, pixel) = (task.first_column / plane, task.first_column % plane);
            if pointwise && pixel + task.columns <= plane {
                let pixels = View {
                    data: input[image * in_channels * plane + pixel..].into(),
                    rows: in_channels,
                    cols: task.columns,
                    row_stride: plane,
                    col_stride: 1,
                };
                gemm_into(&mut result, task.columns, weights, &pixels, 1.0, true, precision);
            } else {
                let unfolded = UnfoldedInput {
                    input,
                    shape,
                    first_column: task.first_column,
                    columns: task.columns,
                };
                gemm_into(&mut result, task.columns, weights, &unfolded, 1.0, true, precision);
            }
            result
        })
        .collect();
    let mut output = vec![0f32; batch * out_channels * plane];
    for (task, result) in tasks.iter().zip(results) {
        for (offset, values) in result.chunks(task.columns).enumerate() {
            let channel = task.first_channel + offset;
            // The task's columns run on across the images of the batch.
            let mut column = task.first_column;
            for run in split_at_planes(values, column, plane) {
                let (image, pixel) = (column / plane, column % plane);
                let start = (image * out_channels + channel) * plane + pixel;
                output[start..start + run.len()].copy_from_slice(run);
                column += run.len();
            }
        }
    }
    output
}

/// `values`, the outputs from pixel `first_column` on (counted across the batch's images), cut
/// where one image's plane ends.
fn split_at_planes(values: &[f32], first_column: usize, plane: usize) -> impl Iterator<Item = &[f32]> {
    let mut rest = values;
    let mut column = first_column;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (run, tail) = rest.split_at((plane - column % plane).min(rest.len()));
        rest = tail;
        column += run.len();
        Some(run)
    })
}

/// One GEMM of a convolution: output channels `first_channel..` (their weight rows in `weight`)
/// at output pixels `first_column..`, counted across the batch's images.
struct ConvTask<'a> {
    first_column: usize,
    columns: usize,
    first_channel: usize,
    channels: usize,
    weight: Elements<'a>,
}

/// The tasks of a convolution, at least one per thread: a small output (all its pixels under
/// [`MIN_TASK_COLUMNS`] per task) is shared out by output channels, every task taking all the
/// pixels; else by rows of output pixels within one image, small enough to bound the unfolded
/// input and at least two per thread so that every core has work.
fn conv_tasks(shape: ConvShape, weight: Elements<'_>) -> Vec<ConvTask<'_>> {
    let (out_height, out_width) = (shape.out_height(), shape.out_width());
    let plane = out_height * out_width;
    let depth = shape.in_channels * shape.kernel * shape.kernel;
    let out_channels = shape.out_channels;
    let threads = rayon::current_num_threads();
    let max_columns = (UNFOLDED_BYTES / (depth * 4).max(1)).max(1);
    let columns = shape.batch * plane;
    if columns == 0 {
        return Vec::new();
    }
    if threads > 1 && columns <= max_columns && columns < 2 * threads * MIN_TASK_COLUMNS {
        let share = out_channels.div_ceil(threads).next_multiple_of(CHANNEL_ALIGN);
        let by_channels: Option<Vec<ConvTask>> = (0..out_channels)
            .step_by(share)
            .map(|first_channel| {
                let channels = share.min(out_channels - first_channel);
                Some(ConvTask {
                    first_column: 0,
                    columns,
                    first_channel,
                    channels,
                    weight: weight.range(first_channel * depth, channels * depth)?,
                })
            })
            .collect();
        if let Some(tasks) = by_channels {
            return tasks;
        }
    }
    let splits_per_item = (2 * threads).div_ceil(shape.batch).max(1);
    let rows_per_task = (max_columns / out_width.max(1))
        .min(out_height.div_ceil(splits_per_item))
        .max(1);
    (0..shape.batch)
        .flat_map(|image| (0..out_height).step_by(rows_per_task).map(move |row| (image, row)))
        .map(|(image, first_row)| ConvTask {
            first_column: image * plane + first_row * out_width,
            columns: rows_per_task.min(out_height - first_row) * out_width,
            first_channel: 0,
            channels: out_channels,
            weight,
        })
        .collect()
}

/// The unfolded (im2col) input of the batch for the output pixels `first_column..` (counted
/// across its images), read in place while the GEMM packs it: row (channel, ky, kx), one column
/// per output pixel, holding the input pixel that output pixel sees through that kernel tap (0
/// in the padding).
struct UnfoldedInput<'a> {
    input: &'a [f32],
    shape: ConvShape,
    first_column: usize,
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
            in_channels,
            height,
            width,
            kernel,
            stride,
            padding,
            ..
        } = self.shape;
        let out_width = self.shape.out_width();
        let plane = self.shape.out_height() * out_width;
        let channel = index / (kernel * kernel);
        let ky = (index / kernel) % kernel;
        let kx = index % kernel;
        // Output x reads input x·stride + kx − padding; with stride 1 the valid x are first..last.
        let first = padding.saturating_sub(kx).min(out_width);
        let last = (width + padding).saturating_sub(kx).clamp(first, out_width);
        let mut column = self.first_column + first_column;
        let mut filled = 0;
        while filled < out.len() {
            // One output row at a time: from x0 to the row's end or the segment's.
            let (image, pixel) = (column / plane, column % plane);
            let x0 = pixel % out_width;
            let run = (out_width - x0).min(out.len() - filled);
            let values = &mut out[filled..filled + run];
            let iy = ((pixel / out_width) * stride + ky) as isize - padding as isize;
            if iy < 0 || iy >= height as isize {
                values.fill(0.0);
            } else {
                let source = (image * in_channels + channel) * height * width + iy as usize * width;
                let line = &self.input[source..source + width];
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
