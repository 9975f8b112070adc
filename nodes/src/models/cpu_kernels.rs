//! CPU kernels for the two operations that dominate diffusion models, on contiguous f32 data:
//! 2-D convolution as im2col + GEMM (in column chunks, so the unfolded input stays small) and
//! attention fused per block of queries (scores, softmax and weighted sum while the scores are
//! still in cache). Both call the `gemm` crate — candle's own GEMM — directly; callers fall back
//! to candle's operations on other devices and dtypes.

use candle_core::{DType, Device, Result, Storage, Tensor};
use rayon::prelude::*;

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

/// A strided matrix inside a slice: element (r, c) is `data[r·row_stride + c·col_stride]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl View<'_> {
    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < self.data.len()
    }
}

/// `dst = scale·(lhs·rhs) (+ dst when accumulate)`, dst row-major with `dst_row_stride`.
fn gemm_into(
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: View,
    rhs: View,
    scale: f32,
    accumulate: bool,
    parallel: bool,
) {
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    assert!(lhs.fits() && rhs.fits() && rhs.rows == k, "matrix views out of bounds");
    assert!(
        m == 0 || n == 0 || (m - 1) * dst_row_stride + n <= dst.len(),
        "destination out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every index gemm computes from these strides and sizes
    // inside the three slices; dst is borrowed mutably and does not alias lhs or rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
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

/// Upper bound on the unfolded input of one GEMM call.
const UNFOLDED_BYTES: usize = 32 << 20;

/// Convolution of `input` [B, C, H, W] with `weight` [O, C·k·k] and `bias` [O]: returns
/// [B, O, H_out, W_out] in row-major order.
pub fn conv2d(input: &[f32], weight: &[f32], bias: Option<&[f32]>, shape: ConvShape) -> Vec<f32> {
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
    let mut output = vec![0f32; batch * out_channels * plane];
    if let Some(bias) = bias {
        for (channel, values) in output.chunks_mut(plane).enumerate() {
            values.fill(bias[channel % out_channels]);
        }
    }
    let weights = View {
        data: weight,
        rows: out_channels,
        cols: depth,
        row_stride: depth,
        col_stride: 1,
    };
    let pointwise = kernel == 1 && stride == 1 && padding == 0;
    let rows_per_chunk = (UNFOLDED_BYTES / (depth * out_width * 4).max(1)).clamp(1, out_height);
    let mut unfolded = Vec::new();
    for b in 0..batch {
        let image = &input[b * in_channels * height * width..(b + 1) * in_channels * height * width];
        let out = &mut output[b * out_channels * plane..(b + 1) * out_channels * plane];
        if pointwise {
            let pixels = View {
                data: image,
                rows: in_channels,
                cols: plane,
                row_stride: plane,
                col_stride: 1,
            };
            gemm_into(out, plane, weights, pixels, 1.0, bias.is_some(), true);
            continue;
        }
        let mut first_row = 0;
        while first_row < out_height {
            let rows = rows_per_chunk.min(out_height - first_row);
            let columns = rows * out_width;
            unfolded.resize(depth * columns, 0.0);
            unfolded.par_chunks_mut(columns).enumerate().for_each(|(index, row)| {
                let channel = index / (kernel * kernel);
                let ky = (index / kernel) % kernel;
                let kx = index % kernel;
                let source = &image[channel * height * width..(channel + 1) * height * width];
                for (r, values) in row.chunks_mut(out_width).enumerate() {
                    let iy = ((first_row + r) * stride + ky) as isize - padding as isize;
                    if iy < 0 || iy >= height as isize {
                        values.fill(0.0);
                        continue;
                    }
                    let line = &source[iy as usize * width..(iy as usize + 1) * width];
                    for (ox, value) in values.iter_mut().enumerate() {
                        let ix = (ox * stride + kx) as isize - padding as isize;
                        *value = if ix < 0 || ix >= width as isize {
                            0.0
                        } else {
                            line[ix as usize]
                        };
                    }
                }
            });
            let columns_view = View {
                data: &unfolded,
                rows: depth,
                cols: columns,
                row_stride: columns,
                col_stride: 1,
            };
            let offset = first_row * out_width;
            gemm_into(
                &mut out[offset..],
                plane,
                weights,
                columns_view,
                1.0,
                bias.is_some(),
                true,
            );
            first_row += rows;
        }
    }
    output
}

/// Queries per attention task: their scores against all keys stay within a few MB.
const QUERY_BLOCK: usize = 64;

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
            data: &q[(head * query_length + first) * head_dim..],
            rows,
            cols: head_dim,
            row_stride: head_dim,
            col_stride: 1,
        };
        let keys = &k[head * key_length * head_dim..(head + 1) * key_length * head_dim];
        let values = &v[head * key_length * head_dim..(head + 1) * key_length * head_dim];
        let keys_transposed = View {
            data: keys,
            rows: head_dim,
            cols: key_length,
            row_stride: 1,
            col_stride: head_dim,
        };
        let mut scores = vec![0f32; rows * key_length];
        gemm_into(&mut scores, key_length, queries, keys_transposed, scale, false, false);
        let mut sums = vec![0f32; rows];
        for (r, row) in scores.chunks_mut(key_length).enumerate() {
            if let Some(mask) = mask {
                let mask_row = &mask[(first + r) * key_length..(first + r + 1) * key_length];
                row.iter_mut().zip(mask_row).for_each(|(s, m)| *s += m);
            }
            sums[r] = softmax_numerator(row);
        }
        let probabilities = View {
            data: &scores,
            rows,
            cols: key_length,
            row_stride: key_length,
            col_stride: 1,
        };
        let values_view = View {
            data: values,
            rows: key_length,
            cols: head_dim,
            row_stride: head_dim,
            col_stride: 1,
        };
        gemm_into(out, head_dim, probabilities, values_view, 1.0, false, false);
        for (row, sum) in out.chunks_mut(head_dim).zip(&sums) {
            let inverse = 1.0 / sum;
            row.iter_mut().for_each(|value| *value *= inverse);
        }
    });
    output
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

/// eˣ by Cephes' `expf` (range reduction by ln 2, degree-5 polynomial), within 2 ulp for
/// x ≤ 0 down to the underflow limit, branch-free so that it vectorises.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HIGH - n * LN2_LOW;
    let z = r * r;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * z + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    y * scale
}
