//! Single-precision matrix multiplication for the CPU kernels: a packed AVX-512 kernel
//! (6×32 register tile, BLIS-style blocking) where the CPU has AVX-512F, the `gemm` crate's
//! AVX2/portable kernels elsewhere; and a bf16 variant of the packed kernel (AVX512-BF16) for
//! models run in bf16 ([`Precision`]). Single-threaded: callers split the work across threads.
//!
//! Operands may hold f16, bf16, fp8 or ggml blocks (weights read in place from a model file):
//! they are widened or dequantized to f32 while the GEMM packs them, so the arithmetic is the
//! same as on f32 copies, and quantized weights are never expanded beyond a packed panel.

use std::cell::RefCell;
use std::thread::LocalKey;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::formats::fp8::Fp8Format;
use crate::formats::ggml_quants::GgmlType;

/// The elements of a matrix, in the precision they are stored in.
#[derive(Clone, Copy)]
pub enum Elements<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    F8(&'a [u8], Fp8Format),
    /// Whole blocks of a ggml type (a GGUF tensor in place).
    Ggml(&'a [u8], GgmlType),
}

impl<'a> From<&'a [f32]> for Elements<'a> {
    fn from(values: &'a [f32]) -> Self {
        Elements::F32(values)
    }
}

impl<'a> From<&'a Vec<f32>> for Elements<'a> {
    fn from(values: &'a Vec<f32>) -> Self {
        Elements::F32(values)
    }
}

impl<'a> Elements<'a> {
    pub fn len(&self) -> usize {
        match self {
            Elements::F32(values) => values.len(),
            Elements::F16(values) => values.len(),
            Elements::BF16(values) => values.len(),
            Elements::F8(bytes, _) => bytes.len(),
            Elements::Ggml(bytes, kind) => bytes.len() / kind.block_bytes() * kind.block_size(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `start..start + count`; `None` for ggml blocks unless both are whole blocks.
    pub fn range(&self, start: usize, count: usize) -> Option<Elements<'a>> {
        Some(match *self {
            Elements::F32(values) => Elements::F32(values.get(start..start + count)?),
            Elements::F16(values) => Elements::F16(values.get(start..start + count)?),
            Elements::BF16(values) => Elements::BF16(values.get(start..start + count)?),
            Elements::F8(bytes, format) => Elements::F8(bytes.get(start..start + count)?, format),
            Elements::Ggml(bytes, kind) => {
                let (size, block_bytes) = (kind.block_size(), kind.block_bytes());
                if !start.is_multiple_of(size) || !count.is_multiple_of(size) {
                    return None;
                }
                let first = start / size * block_bytes;
                Elements::Ggml(bytes.get(first..first + count / size * block_bytes)?, kind)
            }
        })
    }

    /// `out[i] = self[start + i·stride]` as f32.
    pub fn read(&self, start: usize, stride: usize, out: &mut [f32]) {
        match *self {
            Elements::F32(values) if stride == 1 => out.copy_from_slice(&values[start..start + out.len()]),
            Elements::F16(values) if stride == 1 => values[start..start + out.len()].convert_to_f32_slice(out),
            Elements::BF16(values) if stride == 1 => values[start..start + out.len()].convert_to_f32_slice(out),
            Elements::F8(bytes, format) if stride == 1 => format.decode(&bytes[start..start + out.len()], out),
            Elements::Ggml(bytes, kind) if stride == 1 => kind.dequantize_range(bytes, start, out),
            Elements::F32(values) => gather(values, start, stride, out, |value| value),
            Elements::F16(values) => gather(values, start, stride, out, f16::to_f32),
            Elements::BF16(values) => gather(values, start, stride, out, bf16::to_f32),
            Elements::F8(bytes, format) => {
                let values = format.values();
                gather(bytes, start, stride, out, |byte| values[usize::from(byte)])
            }
            Elements::Ggml(bytes, kind) => kind.dequantize_strided(bytes, start, stride, out),
        }
    }
}

fn gather<T: Copy>(values: &[T], start: usize, stride: usize, out: &mut [f32], widen: impl Fn(T) -> f32) {
    for (i, value) in out.iter_mut().enumerate() {
        *value = widen(values[start + i * stride]);
    }
}

/// A strided matrix inside a slice: element (r, c) is `data[r·row_stride + c·col_stride]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: Elements<'a>,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> View<'a> {
    /// A row-major matrix of `rows × cols` at the start of `data`.
    pub fn row_major(data: impl Into<Elements<'a>>, rows: usize, cols: usize) -> View<'a> {
        View {
            data: data.into(),
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major `rows × cols` matrix at the start of `data` (a linear
    /// layer's [out, in] weight seen as [in, out]).
    pub fn transpose_of(data: impl Into<Elements<'a>>, rows: usize, cols: usize) -> View<'a> {
        View {
            data: data.into(),
            rows: cols,
            cols: rows,
            row_stride: 1,
            col_stride: cols,
        }
    }

    /// This view's shape and strides over f32 `data` (the elements themselves, or a widened copy).
    fn with_f32<'d>(&self, data: &'d [f32]) -> F32Matrix<'d> {
        F32Matrix {
            data,
            rows: self.rows,
            cols: self.cols,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < self.data.len()
    }

    /// Writes column `col`, rows `row..row + out.len()`, into `out`.
    fn read_column(&self, row: usize, col: usize, out: &mut [f32]) {
        self.data
            .read(row * self.row_stride + col * self.col_stride, self.row_stride, out)
    }
}

/// The right-hand matrix of [`gemm_into`], read a block at a time while the GEMM packs it, so
/// that it need not exist in memory (a convolution's unfolded input).
pub trait RhsSource {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    /// Writes row `row`, columns `col..col + out.len()`, into `out`.
    fn read_row(&self, row: usize, col: usize, out: &mut [f32]);

    /// Writes rows `row..row + rows`, columns `col..col + cols` into `block`, row p at
    /// `block[p·width..p·width + cols]`.
    fn read_block(&self, row: usize, rows: usize, col: usize, cols: usize, block: &mut [f32], width: usize) {
        for p in 0..rows {
            self.read_row(row + p, col, &mut block[p * width..p * width + cols]);
        }
    }

    /// The matrix as a strided view of its elements, where it is one.
    fn as_view(&self) -> Option<View<'_>> {
        None
    }
}

impl RhsSource for View<'_> {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn read_row(&self, row: usize, col: usize, out: &mut [f32]) {
        self.data
            .read(row * self.row_stride + col * self.col_stride, self.col_stride, out)
    }

    /// Column by column where the columns are contiguous (a transposed matrix), so that the
    /// reads are sequential.
    fn read_block(&self, row: usize, rows: usize, col: usize, cols: usize, block: &mut [f32], width: usize) {
        if self.row_stride != 1 || self.col_stride == 1 {
            for p in 0..rows {
                self.read_row(row + p, col, &mut block[p * width..p * width + cols]);
            }
            return;
        }
        let mut column = [0f32; COLUMN_SEGMENT];
        for first in (0..rows).step_by(COLUMN_SEGMENT) {
            let count = COLUMN_SEGMENT.min(rows - first);
            for c in 0..cols {
                self.read_column(row + first, col + c, &mut column[..count]);
                for (p, value) in column[..count].iter().enumerate() {
                    block[(first + p) * width + c] = *value;
                }
            }
        }
    }

    fn as_view(&self) -> Option<View<'_>> {
        Some(*self)
    }
}

/// Elements of a column read at once when a transposed operand is packed.
const COLUMN_SEGMENT: usize = 256;

/// Checks the shapes of `dst = lhs·rhs` and handles the empty cases; `true` when there is a
/// product to compute.
fn needs_product(dst: &mut [f32], dst_row_stride: usize, lhs: View, rhs: &impl RhsSource, accumulate: bool) -> bool {
    let (m, n, k) = (lhs.rows, rhs.cols(), lhs.cols);
    assert!(lhs.fits() && rhs.rows() == k, "matrix views out of bounds");
    assert!(
        m == 0 || n == 0 || (m - 1) * dst_row_stride + n <= dst.len(),
        "destination out of bounds"
    );
    if m == 0 || n == 0 {
        return false;
    }
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_row_stride)
                .take(m)
                .for_each(|row| row[..n].fill(0.0));
        }
        return false;
    }
    true
}

/// How the GEMM multiplies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 operands and arithmetic: the same results as PyTorch's f32 on the CPU, within
    /// summation order.
    #[default]
    F32,
    /// Operands rounded to bf16 with f32 accumulation, as PyTorch's bf16 matmul computes, where
    /// the CPU has AVX512-BF16; f32 elsewhere.
    Bf16,
}

impl Precision {
    /// Whether this CPU multiplies in bf16 when asked to.
    pub fn bf16_supported() -> bool {
        #[cfg(target_arch = "x86_64")]
        return is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16");
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

/// `dst = scale·(lhs·rhs)`, or `dst += scale·(lhs·rhs)` when `accumulate`; `dst` is row-major
/// with row stride `dst_row_stride`. The right-hand matrix is read from `rhs` while it is
/// packed. The portable GEMM multiplies in f32 whatever the precision.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub fn gemm_into(
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: View,
    rhs: &impl RhsSource,
    scale: f32,
    accumulate: bool,
    precision: Precision,
) {
    if !needs_product(dst, dst_row_stride, lhs, rhs, accumulate) {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; `needs_product` checked the shapes.
        unsafe { avx512::gemm(dst, dst_row_stride, lhs, rhs, scale, accumulate, precision) };
        return;
    }
    in_f32(&WRITTEN_OUT_LHS, &lhs, |lhs| {
        in_f32(&WRITTEN_OUT_RHS, rhs, |rhs| {
            portable_gemm(dst, dst_row_stride, lhs, rhs, scale, accumulate)
        })
    });
}

thread_local! {
    /// Each thread's buffers for the operands written out in f32 for the portable GEMM.
    static WRITTEN_OUT_LHS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static WRITTEN_OUT_RHS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// An f32 matrix in place, as the `gemm` crate reads it: element (r, c) is
/// `data[r·row_stride + c·col_stride]`.
pub struct F32Matrix<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl F32Matrix<'_> {
    fn fits(&self) -> bool {
        (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < self.data.len()
    }
}

/// Runs `f` on `source` as f32 data: an f32 view in place; a dense view (row- or column-major)
/// of other elements widened element for element with its strides kept, so that the portable
/// GEMM sees the layout an f32 copy of it would have and sums in the same order (half-precision
/// operands give exactly the product of their f32 widenings); anything else written out whole,
/// row-major, into the thread's buffer `key`.
fn in_f32<R>(key: &'static LocalKey<RefCell<Vec<f32>>>, source: &impl RhsSource, f: impl FnOnce(F32Matrix) -> R) -> R {
    let (rows, cols) = (source.rows(), source.cols());
    if let Some(view) = source.as_view() {
        if let Elements::F32(data) = view.data {
            return f(view.with_f32(data));
        }
        let span = (rows - 1) * view.row_stride + (cols - 1) * view.col_stride + 1;
        if span == rows * cols {
            return with_scratch(key, span, |data| {
                view.data.read(0, 1, data);
                f(view.with_f32(data))
            });
        }
    }
    with_scratch(key, rows * cols, |data| {
        source.read_block(0, rows, 0, cols, data, cols);
        f(F32Matrix {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        })
    })
}

/// The `gemm` crate's kernels on f32 operands.
fn portable_gemm(dst: &mut [f32], dst_row_stride: usize, lhs: F32Matrix, rhs: F32Matrix, scale: f32, accumulate: bool) {
    assert!(lhs.fits() && rhs.fits(), "matrix views out of bounds");
    // SAFETY: `needs_product` bounded the destination and excluded empty shapes; the assert above
    // keeps every index gemm computes inside the operands.
    unsafe {
        gemm::gemm(
            lhs.rows,
            rhs.cols,
            lhs.cols,
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
            gemm::Parallelism::None,
        );
    }
}

/// Runs `f` on a thread's reusable buffer of at least `len` values (contents unspecified).
pub(crate) fn with_scratch<T: Copy + Default, R>(
    key: &'static LocalKey<RefCell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffer) => {
            if buffer.len() < len {
                buffer.resize(len, T::default());
            }
            f(&mut buffer[..len])
        }
        Err(_) => f(&mut vec![T::default(); len]),
    })
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::cell::RefCell;
    use std::thread::LocalKey;

    use super::{with_scratch, Precision, RhsSource, View};

    /// Register tile: 6 rows of A against 32 columns (two zmm registers) of B.
    const MR: usize = 6;
    const NR: usize = 32;
    /// Cache blocks: a packed A block (MC × KC) stays in L2, a packed B panel (KC × NR) in L1.
    const KC: usize = 256;
    const MC: usize = 96;
    const NC: usize = 2048;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gemm(
        dst: &mut [f32],
        ldc: usize,
        lhs: View,
        rhs: &impl RhsSource,
        scale: f32,
        accumulate: bool,
        precision: Precision,
    ) {
        if precision == Precision::Bf16 && is_x86_feature_detected!("avx512bf16") {
            gemm_packed::<Bf16Pairs>(dst, ldc, lhs, rhs, scale, accumulate)
        } else {
            gemm_packed::<F32Values>(dst, ldc, lhs, rhs, scale, accumulate)
        }
    }

    /// How blocks of A and B are packed and multiplied.
    trait Packing {
        type Packed: Copy + Default + 'static;
        /// Packed elements per row (of A) or column (of B) for `kc` steps of k.
        fn depth(kc: usize) -> usize;
        /// Each thread's buffers for the packed A block and B panels.
        fn buffers() -> [&'static LocalKey<RefCell<Vec<Self::Packed>>>; 2];
        fn pack_a(packed: &mut [Self::Packed], lhs: View, ic: usize, mc: usize, pc: usize, kc: usize);
        fn pack_b(packed: &mut [Self::Packed], rhs: &impl RhsSource, pc: usize, kc: usize, jc: usize, nc: usize);
        /// tile = product of an MR-row panel of A and an NR-column panel of B, `depth` deep.
        ///
        /// # Safety
        /// The CPU has the instructions the implementation uses; the panels hold `depth`
        /// packed steps.
        unsafe fn kernel(depth: usize, a: *const Self::Packed, b: *const Self::Packed, tile: &mut [f32; MR * NR]);
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn gemm_packed<P: Packing>(
        dst: &mut [f32],
        ldc: usize,
        lhs: View,
        rhs: &impl RhsSource,
        scale: f32,
        accumulate: bool,
    ) {
        let (m, n, k) = (lhs.rows, rhs.cols(), lhs.cols);
        let depth = P::depth(KC.min(k));
        let [a_buffer, b_buffer] = P::buffers();
        with_scratch(a_buffer, MC.min(m).div_ceil(MR) * MR * depth, |packed_a| {
            with_scratch(b_buffer, NC.min(n).div_ceil(NR) * NR * depth, |packed_b| {
                gemm_blocked::<P>(dst, ldc, lhs, rhs, scale, accumulate, packed_a, packed_b)
            })
        })
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn gemm_blocked<P: Packing>(
        dst: &mut [f32],
        ldc: usize,
        lhs: View,
        rhs: &impl RhsSource,
        scale: f32,
        accumulate: bool,
        packed_a: &mut [P::Packed],
        packed_b: &mut [P::Packed],
    ) {
        let (m, n, k) = (lhs.rows, rhs.cols(), lhs.cols);
        let mut tile = [0f32; MR * NR];
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                let depth = P::depth(kc);
                P::pack_b(packed_b, rhs, pc, kc, jc, nc);
                let add_to_dst = accumulate || pc > 0;
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    P::pack_a(packed_a, lhs, ic, mc, pc, kc);
                    for jr in (0..nc).step_by(NR) {
                        let b_panel = packed_b.as_ptr().add(jr / NR * NR * depth);
                        for ir in (0..mc).step_by(MR) {
                            let a_panel = packed_a.as_ptr().add(ir / MR * MR * depth);
                            P::kernel(depth, a_panel, b_panel, &mut tile);
                            let rows = MR.min(mc - ir);
                            let cols = NR.min(nc - jr);
                            for r in 0..rows {
                                let start = (ic + ir + r) * ldc + jc + jr;
                                let out = &mut dst[start..start + cols];
                                let values = &tile[r * NR..r * NR + cols];
                                if add_to_dst {
                                    out.iter_mut().zip(values).for_each(|(o, v)| *o += scale * v);
                                } else {
                                    out.iter_mut().zip(values).for_each(|(o, v)| *o = scale * v);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// f32 operands, multiplied with f32 fused multiply-adds.
    struct F32Values;

    thread_local! {
        static PACKED_A: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        static PACKED_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    impl Packing for F32Values {
        type Packed = f32;

        fn depth(kc: usize) -> usize {
            kc
        }

        fn buffers() -> [&'static LocalKey<RefCell<Vec<f32>>>; 2] {
            [&PACKED_A, &PACKED_B]
        }

        /// A[ic.., pc..] as row panels of MR: panel-major, then k, then the MR rows
        /// (zero-padded). Read along whichever direction is contiguous.
        fn pack_a(packed: &mut [f32], lhs: View, ic: usize, mc: usize, pc: usize, kc: usize) {
            let mut row_segment = [0f32; KC];
            for (panel, i0) in (0..mc).step_by(MR).enumerate() {
                let rows = MR.min(mc - i0);
                let block = &mut packed[panel * MR * kc..(panel + 1) * MR * kc];
                if lhs.row_stride == 1 && lhs.col_stride != 1 {
                    for (p, column) in block.chunks_mut(MR).enumerate() {
                        lhs.read_column(ic + i0, pc + p, &mut column[..rows]);
                        column[rows..].fill(0.0);
                    }
                    continue;
                }
                for r in 0..MR {
                    if r < rows {
                        lhs.read_row(ic + i0 + r, pc, &mut row_segment[..kc]);
                        for (p, value) in row_segment[..kc].iter().enumerate() {
                            block[p * MR + r] = *value;
                        }
                    } else {
                        block.chunks_mut(MR).for_each(|column| column[r] = 0.0);
                    }
                }
            }
        }

        /// B[pc.., jc..] as column panels of NR: panel-major, then k, then the NR columns
        /// (zero-padded past the edge).
        fn pack_b(packed: &mut [f32], rhs: &impl RhsSource, pc: usize, kc: usize, jc: usize, nc: usize) {
            for (panel, j0) in (0..nc).step_by(NR).enumerate() {
                let cols = NR.min(nc - j0);
                let block = &mut packed[panel * NR * kc..(panel + 1) * NR * kc];
                rhs.read_block(pc, kc, jc + j0, cols, block, NR);
                if cols < NR {
                    block.chunks_mut(NR).for_each(|row| row[cols..].fill(0.0));
                }
            }
        }

        /// Σₚ a[p]·b[p] over the steps: 12 accumulators, two loads of B and six broadcasts of
        /// A per step.
        #[target_feature(enable = "avx512f")]
        unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, tile: &mut [f32; MR * NR]) {
            let mut c = [_mm512_setzero_ps(); 2 * MR];
            for p in 0..kc {
                let b0 = _mm512_loadu_ps(b.add(p * NR));
                let b1 = _mm512_loadu_ps(b.add(p * NR + 16));
                let a_column = a.add(p * MR);
                for r in 0..MR {
                    let broadcast = _mm512_set1_ps(*a_column.add(r));
                    c[2 * r] = _mm512_fmadd_ps(broadcast, b0, c[2 * r]);
                    c[2 * r + 1] = _mm512_fmadd_ps(broadcast, b1, c[2 * r + 1]);
                }
            }
            for r in 0..MR {
                _mm512_storeu_ps(tile.as_mut_ptr().add(r * NR), c[2 * r]);
                _mm512_storeu_ps(tile.as_mut_ptr().add(r * NR + 16), c[2 * r + 1]);
            }
        }
    }

    /// Operands rounded to bf16 (to nearest even), multiplied in pairs of k steps with f32
    /// accumulation by AVX512-BF16's `vdpbf16ps`. A packed element holds two consecutive k steps
    /// of one row or column: the earlier in the low half.
    struct Bf16Pairs;

    thread_local! {
        static PACKED_PAIRS_A: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
        static PACKED_PAIRS_B: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    }

    /// Interleaves the k steps of a packed f32 panel (`width` values per step) into bf16 pairs;
    /// an odd last step is paired with 0.
    fn pair_steps(values: &[f32], width: usize, kc: usize, pairs: &mut [u32]) {
        let bits = |value: f32| u32::from(half::bf16::from_f32(value).to_bits());
        for (p, out) in pairs.chunks_mut(width).take(kc.div_ceil(2)).enumerate() {
            let low = &values[2 * p * width..(2 * p + 1) * width];
            if 2 * p + 1 < kc {
                let high = &values[(2 * p + 1) * width..(2 * p + 2) * width];
                for ((pair, low), high) in out.iter_mut().zip(low).zip(high) {
                    *pair = bits(*low) | bits(*high) << 16;
                }
            } else {
                for (pair, low) in out.iter_mut().zip(low) {
                    *pair = bits(*low);
                }
            }
        }
    }

    impl Packing for Bf16Pairs {
        type Packed = u32;

        fn depth(kc: usize) -> usize {
            kc.div_ceil(2)
        }

        fn buffers() -> [&'static LocalKey<RefCell<Vec<u32>>>; 2] {
            [&PACKED_PAIRS_A, &PACKED_PAIRS_B]
        }

        /// As f32 (one MR-row panel at a time), then paired.
        fn pack_a(packed: &mut [u32], lhs: View, ic: usize, mc: usize, pc: usize, kc: usize) {
            let mut panel = [0f32; MR * KC];
            let depth = Self::depth(kc);
            for (index, i0) in (0..mc).step_by(MR).enumerate() {
                let rows = MR.min(mc - i0);
                F32Values::pack_a(&mut panel[..MR * kc], lhs, ic + i0, rows, pc, kc);
                pair_steps(
                    &panel,
                    MR,
                    kc,
                    &mut packed[index * MR * depth..(index + 1) * MR * depth],
                );
            }
        }

        /// As f32 (one NR-column panel at a time), then paired.
        fn pack_b(packed: &mut [u32], rhs: &impl RhsSource, pc: usize, kc: usize, jc: usize, nc: usize) {
            let mut panel = [0f32; NR * KC];
            let depth = Self::depth(kc);
            for (index, j0) in (0..nc).step_by(NR).enumerate() {
                let cols = NR.min(nc - j0);
                F32Values::pack_b(&mut panel[..NR * kc], rhs, pc, kc, jc + j0, cols);
                pair_steps(
                    &panel,
                    NR,
                    kc,
                    &mut packed[index * NR * depth..(index + 1) * NR * depth],
                );
            }
        }

        /// As [`F32Values::kernel`], two k steps per instruction.
        #[target_feature(enable = "avx512f,avx512bf16")]
        unsafe fn kernel(depth: usize, a: *const u32, b: *const u32, tile: &mut [f32; MR * NR]) {
            let mut c = [_mm512_setzero_ps(); 2 * MR];
            for p in 0..depth {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR).cast()));
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16).cast()));
                let a_pairs = a.add(p * MR);
                for r in 0..MR {
                    let broadcast: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a_pairs.add(r) as i32));
                    c[2 * r] = _mm512_dpbf16_ps(c[2 * r], broadcast, b0);
                    c[2 * r + 1] = _mm512_dpbf16_ps(c[2 * r + 1], broadcast, b1);
                }
            }
            for r in 0..MR {
                _mm512_storeu_ps(tile.as_mut_ptr().add(r * NR), c[2 * r]);
                _mm512_storeu_ps(tile.as_mut_ptr().add(r * NR + 16), c[2 * r + 1]);
            }
        }
    }
}
