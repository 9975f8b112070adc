//! Single-precision matrix multiplication for the CPU kernels: a packed AVX-512 kernel
//! (6×32 register tile, BLIS-style blocking) where the CPU has AVX-512F, the `gemm` crate's
//! AVX2/portable kernels elsewhere. Single-threaded: callers split the work across threads.

use std::cell::RefCell;
use std::thread::LocalKey;

/// A strided matrix inside a slice: element (r, c) is `data[r·row_stride + c·col_stride]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl View<'_> {
    /// A row-major matrix of `rows × cols` at the start of `data`.
    pub fn row_major(data: &[f32], rows: usize, cols: usize) -> View<'_> {
        View {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride < self.data.len()
    }

    fn at(&self, row: usize, col: usize) -> f32 {
        self.data[row * self.row_stride + col * self.col_stride]
    }
}

/// The right-hand matrix of [`gemm_from`], read a row segment at a time while the GEMM packs
/// it, so that it need not exist in memory (a convolution's unfolded input).
pub trait RhsSource {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    /// Writes row `row`, columns `col..col + out.len()`, into `out`.
    fn read_row(&self, row: usize, col: usize, out: &mut [f32]);
}

impl RhsSource for View<'_> {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn read_row(&self, row: usize, col: usize, out: &mut [f32]) {
        if self.col_stride == 1 {
            let start = row * self.row_stride + col;
            out.copy_from_slice(&self.data[start..start + out.len()]);
        } else {
            for (c, value) in out.iter_mut().enumerate() {
                *value = self.at(row, col + c);
            }
        }
    }
}

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

/// As [`gemm_into`], with the right-hand matrix read from `rhs` while it is packed. Without
/// AVX-512 the matrix is first written out whole.
pub fn gemm_from(
    dst: &mut [f32],
    dst_row_stride: usize,
    lhs: View,
    rhs: &impl RhsSource,
    scale: f32,
    accumulate: bool,
) {
    if !needs_product(dst, dst_row_stride, lhs, rhs, accumulate) {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; `needs_product` checked the shapes.
        unsafe { avx512::gemm(dst, dst_row_stride, lhs, rhs, scale, accumulate) };
        return;
    }
    let (rows, cols) = (rhs.rows(), rhs.cols());
    with_scratch(&WRITTEN_OUT_RHS, rows * cols, |matrix| {
        for (row, values) in matrix.chunks_mut(cols).enumerate() {
            rhs.read_row(row, 0, values);
        }
        gemm_into(
            dst,
            dst_row_stride,
            lhs,
            View::row_major(matrix, rows, cols),
            scale,
            accumulate,
        );
    });
}

thread_local! {
    /// Each thread's buffer for the right-hand matrix [`gemm_from`] writes out without AVX-512.
    static WRITTEN_OUT_RHS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `dst = scale·(lhs·rhs)`, or `dst += scale·(lhs·rhs)` when `accumulate`; `dst` is row-major
/// with row stride `dst_row_stride`.
pub fn gemm_into(dst: &mut [f32], dst_row_stride: usize, lhs: View, rhs: View, scale: f32, accumulate: bool) {
    assert!(rhs.fits(), "matrix views out of bounds");
    if !needs_product(dst, dst_row_stride, lhs, &rhs, accumulate) {
        return;
    }
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; the checks above bound every access.
        unsafe { avx512::gemm(dst, dst_row_stride, lhs, &rhs, scale, accumulate) };
        return;
    }
    // SAFETY: the asserts above keep every index gemm computes inside the three slices.
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
            gemm::Parallelism::None,
        );
    }
}

/// Runs `f` on a thread's reusable buffer of at least `len` floats (contents unspecified).
pub(crate) fn with_scratch<R>(
    key: &'static LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffer) => {
            if buffer.len() < len {
                buffer.resize(len, 0.0);
            }
            f(&mut buffer[..len])
        }
        Err(_) => f(&mut vec![0f32; len]),
    })
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    use super::{with_scratch, RhsSource, View};

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
    ) {
        let (m, n, k) = (lhs.rows, rhs.cols(), lhs.cols);
        let a_len = MC.min(m).div_ceil(MR) * MR * KC.min(k);
        let b_len = NC.min(n).div_ceil(NR) * NR * KC.min(k);
        with_scratch(&PACKED_A, a_len, |packed_a| {
            with_scratch(&PACKED_B, b_len, |packed_b| {
                gemm_blocked(dst, ldc, lhs, rhs, scale, accumulate, packed_a, packed_b)
            })
        })
    }

    thread_local! {
        static PACKED_A: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
        static PACKED_B: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn gemm_blocked(
        dst: &mut [f32],
        ldc: usize,
        lhs: View,
        rhs: &impl RhsSource,
        scale: f32,
        accumulate: bool,
        packed_a: &mut [f32],
        packed_b: &mut [f32],
    ) {
        let (m, n, k) = (lhs.rows, rhs.cols(), lhs.cols);
        let mut tile = [0f32; MR * NR];
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                pack_b(packed_b, rhs, pc, kc, jc, nc);
                let add_to_dst = accumulate || pc > 0;
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    pack_a(packed_a, lhs, ic, mc, pc, kc);
                    for jr in (0..nc).step_by(NR) {
                        let b_panel = packed_b.as_ptr().add(jr / NR * NR * kc);
                        for ir in (0..mc).step_by(MR) {
                            let a_panel = packed_a.as_ptr().add(ir / MR * MR * kc);
                            kernel(kc, a_panel, b_panel, &mut tile);
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

    /// B[pc.., jc..] as column panels of NR: panel-major, then k, then the NR columns
    /// (zero-padded past the edge).
    fn pack_b(packed: &mut [f32], rhs: &impl RhsSource, pc: usize, kc: usize, jc: usize, nc: usize) {
        for (panel, j0) in (0..nc).step_by(NR).enumerate() {
            let cols = NR.min(nc - j0);
            let base = panel * NR * kc;
            for p in 0..kc {
                let row = &mut packed[base + p * NR..base + (p + 1) * NR];
                rhs.read_row(pc + p, jc + j0, &mut row[..cols]);
                row[cols..].fill(0.0);
            }
        }
    }

    /// A[ic.., pc..] as row panels of MR: panel-major, then k, then the MR rows (zero-padded).
    fn pack_a(packed: &mut [f32], lhs: View, ic: usize, mc: usize, pc: usize, kc: usize) {
        for (panel, i0) in (0..mc).step_by(MR).enumerate() {
            let rows = MR.min(mc - i0);
            let base = panel * MR * kc;
            for p in 0..kc {
                let column = &mut packed[base + p * MR..base + (p + 1) * MR];
                for (r, value) in column.iter_mut().enumerate() {
                    *value = if r < rows { lhs.at(ic + i0 + r, pc + p) } else { 0.0 };
                }
            }
        }
    }

    /// tile = Σₚ a[p]·b[p] over kc steps: 12 accumulators, two loads of B and six broadcasts
    /// of A per step.
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
