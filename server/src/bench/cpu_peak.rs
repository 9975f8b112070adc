//! The arithmetic peak of one core, for reading the model timings: f32 fused multiply-adds
//! (AVX-512F) against bf16 pair dot products (AVX512-BF16 `vdpbf16ps`, two multiply-adds per
//! lane). A bf16 compute path only pays where the second is well above the first; on the
//! development Xeon it is half of it.

use std::time::Instant;

/// Independent accumulators per loop: enough to hide the instructions' latency.
const ACCUMULATORS: usize = 12;
const ITERATIONS: usize = 20_000_000;

/// `(f32 FMA, bf16 dot)` GFLOP/s of the calling thread, each `None` where the CPU lacks it.
pub fn measure() -> (Option<f64>, Option<f64>) {
    #[cfg(target_arch = "x86_64")]
    {
        let fma = is_x86_feature_detected!("avx512f").then(|| {
            // SAFETY: the CPU has AVX-512F.
            gflops(ACCUMULATORS * 16 * 2, || unsafe { x86::fma_loop(ITERATIONS) })
        });
        let bf16 = (is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")).then(|| {
            // SAFETY: the CPU has AVX-512F and AVX512-BF16.
            gflops(ACCUMULATORS * 32 * 2, || unsafe { x86::bf16_dot_loop(ITERATIONS) })
        });
        (fma, bf16)
    }
    #[cfg(not(target_arch = "x86_64"))]
    (None, None)
}

/// GFLOP/s of `run`, which does `ITERATIONS` rounds of `flops_per_iteration`.
fn gflops(flops_per_iteration: usize, run: impl Fn() -> f32) -> f64 {
    let started = Instant::now();
    std::hint::black_box(run());
    (ITERATIONS * flops_per_iteration) as f64 / started.elapsed().as_secs_f64() / 1e9
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::ACCUMULATORS;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_loop(iterations: usize) -> f32 {
        let (a, b) = (_mm512_set1_ps(1.0001), _mm512_set1_ps(0.9999));
        let mut sums = [_mm512_setzero_ps(); ACCUMULATORS];
        for _ in 0..iterations {
            for sum in &mut sums {
                *sum = _mm512_fmadd_ps(a, b, *sum);
            }
        }
        sums.iter().map(|&sum| _mm512_reduce_add_ps(sum)).sum()
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn bf16_dot_loop(iterations: usize) -> f32 {
        let a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1.0001), _mm512_set1_ps(1.0001));
        let b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.9999), _mm512_set1_ps(0.9999));
        let mut sums = [_mm512_setzero_ps(); ACCUMULATORS];
        for _ in 0..iterations {
            for sum in &mut sums {
                *sum = _mm512_dpbf16_ps(*sum, a, b);
            }
        }
        sums.iter().map(|&sum| _mm512_reduce_add_ps(sum)).sum()
    }
}
