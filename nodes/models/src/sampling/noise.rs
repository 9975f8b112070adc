//! Bit-exact reproduction of PyTorch's CPU `torch.randn` (float32), which ComfyUI uses for every
//! initial noise (`comfy.sample.prepare_noise`) and for the per-step noise of ancestral samplers
//! run on a CPU.
//!
//! The generator is MT19937 seeded with the low 32 bits of the seed. Tensors of 16 or more
//! values take torch's vectorised path (uniform floats, Box–Muller in blocks of 16 with the
//! Cephes `log256_ps` / `sincos256_ps` polynomials of `avx_mathfun.h`, fused multiply-adds where
//! GCC contracts them); this is what x86-64 machines with AVX2 or AVX-512 compute. Smaller
//! tensors use double-precision Box–Muller with one cached value.
//!
//! torch's global CPU generator (`torch.default_generator`), which ComfyUI's code draws from
//! without naming a generator (`torch.randint` in HyperTile and ToMe, `torch.randn_like` in some
//! samplers), is kept per thread: [`set_global_generator`] and [`with_global_generator`].

use std::cell::RefCell;

/// Mersenne Twister MT19937, identical in output to `std::mt19937` and `at::mt19937`.
#[derive(Clone)]
struct Mt19937 {
    state: [u32; 624],
    index: usize,
}

impl Mt19937 {
    fn new(seed: u32) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed;
        for i in 1..624 {
            let previous = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(previous ^ (previous >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn twist(&mut self) {
        for i in 0..624 {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
            let mut next = self.state[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn next_u64(&mut self) -> u64 {
        let high = u64::from(self.next_u32());
        (high << 32) | u64::from(self.next_u32())
    }
}

/// torch's CPU generator (`torch.Generator("cpu")` after `manual_seed(seed)`).
#[derive(Clone)]
pub struct CpuGenerator {
    engine: Mt19937,
    cached_normal: Option<f64>,
}

impl CpuGenerator {
    /// Seeds like `torch.manual_seed`: only the low 32 bits of the seed matter.
    pub fn new(seed: u64) -> Self {
        CpuGenerator {
            engine: Mt19937::new(seed as u32),
            cached_normal: None,
        }
    }

    /// `torch.randn(numel, dtype=float32, generator=self)`, values in row-major order.
    pub fn randn(&mut self, numel: usize) -> Vec<f32> {
        if numel < 16 {
            return (0..numel).map(|_| self.normal_f64() as f32).collect();
        }
        let mut values: Vec<f32> = (0..numel).map(|_| self.uniform_f32()).collect();
        for start in (0..numel - 15).step_by(16) {
            box_muller_block(&mut values[start..start + 16]);
        }
        if numel & 15 != 0 {
            let tail = &mut values[numel - 16..];
            for value in tail.iter_mut() {
                *value = self.uniform_f32();
            }
            box_muller_block(tail);
        }
        values
    }

    /// `torch.randn` filling a tensor that is not contiguous (a permuted view's memory order):
    /// PyTorch's serial path, one `at::normal_distribution<double>` value each.
    pub fn randn_serial(&mut self, numel: usize) -> Vec<f32> {
        (0..numel).map(|_| self.normal_f64() as f32).collect()
    }

    /// `torch.rand(numel, dtype=float32, generator=self)`: 24 random bits per value.
    pub fn rand(&mut self, numel: usize) -> Vec<f32> {
        (0..numel).map(|_| self.uniform_f32()).collect()
    }

    /// One value of `torch.randint(low, low + range, …)` less `low` (`random_from_to`): a 32-bit
    /// draw modulo `range`, or a 64-bit one (two draws, the first the high half) for ranges of
    /// 2²⁸ and more, where torch's release builds switch to keep the modulo's skew small. torch
    /// refuses an empty range; here a range of 0 is taken as 1.
    pub fn random_below(&mut self, range: u64) -> u64 {
        let range = range.max(1);
        if range >= 1 << 28 {
            self.engine.next_u64() % range
        } else {
            u64::from(self.engine.next_u32()) % range
        }
    }

    fn uniform_f32(&mut self) -> f32 {
        (self.engine.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    fn uniform_f64(&mut self) -> f64 {
        (self.engine.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `at::normal_distribution<double>(0, 1)`: Box–Muller keeping the second value for the next call.
    fn normal_f64(&mut self) -> f64 {
        if let Some(value) = self.cached_normal.take() {
            return value;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(radius * theta.sin());
        radius * theta.cos()
    }
}

/// The initial noise of `comfy.sample.prepare_noise` for a latent of `shape` ([B, C, H, W] or
/// any other), flattened in row-major order. With `batch_index`, one [1, …] draw is made per
/// index up to the largest and row k of the result is draw number `batch_index[k]`.
pub fn prepare_noise(seed: u64, shape: &[usize], batch_index: Option<&[usize]>) -> Vec<f32> {
    prepare_noise_and_generator(seed, shape, batch_index).0
}

/// [`prepare_noise`], and the generator as the draws leave it: `prepare_noise` seeds torch's
/// global generator (`torch.manual_seed`), which samplers calling `torch.randn_like` go on with.
pub fn prepare_noise_and_generator(
    seed: u64,
    shape: &[usize],
    batch_index: Option<&[usize]>,
) -> (Vec<f32>, CpuGenerator) {
    let mut generator = CpuGenerator::new(seed);
    let numel: usize = shape.iter().product();
    let Some(indices) = batch_index else {
        let noise = generator.randn(numel);
        return (noise, generator);
    };
    let per_item: usize = shape.iter().skip(1).product();
    let Some(&largest) = indices.iter().max() else {
        return (Vec::new(), generator);
    };
    let draws: Vec<Vec<f32>> = (0..=largest)
        .map(|draw| {
            let values = generator.randn(per_item);
            if indices.contains(&draw) {
                values
            } else {
                Vec::new()
            }
        })
        .collect();
    let noise = indices.iter().flat_map(|&draw| draws[draw].iter().copied()).collect();
    (noise, generator)
}

/// torch's `default_rng_seed_val`: the global generator's seed until something seeds it.
const TORCH_DEFAULT_SEED: u64 = 67_280_421_310_721;

thread_local! {
    /// This thread's stand-in for torch's global CPU generator.
    static GLOBAL_GENERATOR: RefCell<CpuGenerator> = RefCell::new(CpuGenerator::new(TORCH_DEFAULT_SEED));
}

/// Makes `generator` torch's global CPU generator on this thread, as `torch.manual_seed` and the
/// draws after it leave it (a sampling run sets the generator its initial noise came from).
pub fn set_global_generator(generator: CpuGenerator) {
    GLOBAL_GENERATOR.with(|global| *global.borrow_mut() = generator);
}

/// Draws from this thread's global generator (ComfyUI's `torch.randint(…)` or
/// `torch.randn_like(…)` without a generator, on the CPU). `draw` must not call this again.
pub fn with_global_generator<T>(draw: impl FnOnce(&mut CpuGenerator) -> T) -> T {
    GLOBAL_GENERATOR.with(|global| draw(&mut global.borrow_mut()))
}

/// Box–Muller on one block of 16 uniforms: value j pairs with value j + 8.
fn box_muller_block(block: &mut [f32]) {
    const TWO_PI: f32 = std::f32::consts::TAU;
    for j in 0..8 {
        let u1 = 1.0 - block[j];
        let u2 = block[j + 8];
        let radius = (-2.0 * log_ps(u1)).sqrt();
        let (sin, cos) = sincos_ps(TWO_PI * u2);
        block[j] = radius * cos;
        block[j + 8] = radius * sin;
    }
}

/// One lane of `log256_ps` from `avx_mathfun.h`, with GCC's fused multiply-adds. The constants
/// are written as published; they round to the float32 values torch uses.
#[allow(clippy::excessive_precision)]
fn log_ps(x: f32) -> f32 {
    const POLYNOMIAL: [f32; 8] = [
        -1.151_461_031_0E-1,
        1.167_699_874_0E-1,
        -1.242_014_084_6E-1,
        1.424_932_278_7E-1,
        -1.666_805_766_5E-1,
        2.000_071_476_5E-1,
        -2.499_999_399_3E-1,
        3.333_333_117_4E-1,
    ];
    let bits = x.max(f32::MIN_POSITIVE).to_bits();
    let mut exponent = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    let mut mantissa = f32::from_bits((bits & !0x7f80_0000) | 0x3f00_0000);
    if mantissa < std::f32::consts::FRAC_1_SQRT_2 {
        exponent -= 1.0;
        mantissa = (mantissa - 1.0) + mantissa;
    } else {
        mantissa -= 1.0;
    }
    let square = mantissa * mantissa;
    let mut y = 7.037_683_629_2E-2f32;
    for coefficient in POLYNOMIAL {
        y = y.mul_add(mantissa, coefficient);
    }
    y *= mantissa;
    y = y.mul_add(square, exponent * -2.121_944_40e-4);
    y = (-square).mul_add(0.5, y);
    exponent.mul_add(0.693_359_375, mantissa + y)
}

/// One lane of `sincos256_ps` from `avx_mathfun.h` for x ≥ 0, with GCC's fused multiply-adds.
#[allow(clippy::excessive_precision)]
fn sincos_ps(x: f32) -> (f32, f32) {
    let mut octant = (x * 1.273_239_544_735_16) as i32;
    octant = (octant + 1) & !1;
    let y = octant as f32;
    let sin_negative = octant & 4 != 0;
    let cos_negative = (octant - 2) & 4 == 0;
    let sine_polynomial_is_sin = octant & 2 == 0;
    let mut x = y.mul_add(-0.785_156_25, x);
    x = y.mul_add(-2.418_756_484_985_351_562_5e-4, x);
    x = y.mul_add(-3.774_894_977_445_941_08e-8, x);
    let z = x * x;
    let mut cosine = 2.443_315_711_809_948e-5f32.mul_add(z, -1.388_731_625_493_765e-3);
    cosine = cosine.mul_add(z, 4.166_664_568_298_827e-2);
    cosine *= z;
    cosine = cosine.mul_add(z, -(z * 0.5));
    cosine += 1.0;
    let mut sine = (-1.951_529_589_1e-4f32).mul_add(z, 8.332_160_873_6e-3);
    sine = sine.mul_add(z, -1.666_665_461_1e-1);
    sine *= z;
    sine = sine.mul_add(x, x);
    let (sin, cos) = if sine_polynomial_is_sin {
        (sine, cosine)
    } else {
        (cosine, sine)
    };
    (
        if sin_negative { -sin } else { sin },
        if cos_negative { -cos } else { cos },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_standard_sequence() {
        let mut engine = Mt19937::new(0);
        assert_eq!(
            [engine.next_u32(), engine.next_u32(), engine.next_u32()],
            [2357136044, 2546248239, 3071714933]
        );
    }

    #[test]
    fn uniforms_match_torch() {
        let mut generator = CpuGenerator::new(0);
        let uniforms: Vec<f32> = (0..3).map(|_| generator.uniform_f32()).collect();
        assert_eq!(uniforms, [0.496_256_6, 0.768_221_8, 0.088_477_43]);
    }
}
