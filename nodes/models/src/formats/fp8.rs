//! The two 8-bit float formats of model files and of ComfyUI's `weight_dtype` options: e4m3fn
//! (safetensors `F8_E4M3`: 4 exponent bits, bias 7, no infinities, 0x7f and 0xff are NaN) and
//! e5m2 (`F8_E5M2`: the upper byte of an f16). Values are decoded by table, and rounded from
//! f32 as PyTorch's casts round: to nearest, ties to even, subnormals kept; beyond the largest
//! finite value e4m3fn gives NaN and e5m2 infinity.

use std::sync::LazyLock;

use half::f16;
use safetensors::tensor::Dtype as FileDtype;

/// An 8-bit float format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fp8Format {
    E4M3Fn,
    E5M2,
}

static E4M3FN_VALUES: LazyLock<[f32; 256]> = LazyLock::new(|| decode_table(Fp8Format::E4M3Fn));
static E5M2_VALUES: LazyLock<[f32; 256]> = LazyLock::new(|| decode_table(Fp8Format::E5M2));
/// Every f16's code, by the f16's bits: f16 weights (most files) are rounded by lookup.
static E4M3FN_OF_F16: LazyLock<Box<[u8]>> = LazyLock::new(|| f16_encode_table(Fp8Format::E4M3Fn));
static E5M2_OF_F16: LazyLock<Box<[u8]>> = LazyLock::new(|| f16_encode_table(Fp8Format::E5M2));

fn decode_table(format: Fp8Format) -> [f32; 256] {
    std::array::from_fn(|byte| format.decode_bits(byte as u8))
}

fn f16_encode_table(format: Fp8Format) -> Box<[u8]> {
    (0..=u16::MAX)
        .map(|bits| format.encode(f16::from_bits(bits).to_f32()))
        .collect()
}

impl Fp8Format {
    /// The format of a safetensors dtype, if it is an 8-bit float.
    pub fn of(dtype: FileDtype) -> Option<Self> {
        match dtype {
            FileDtype::F8_E4M3 => Some(Fp8Format::E4M3Fn),
            FileDtype::F8_E5M2 => Some(Fp8Format::E5M2),
            _ => None,
        }
    }

    /// ComfyUI's name of the format (`weight_dtype` values).
    pub fn name(self) -> &'static str {
        match self {
            Fp8Format::E4M3Fn => "fp8_e4m3fn",
            Fp8Format::E5M2 => "fp8_e5m2",
        }
    }

    /// Every byte's value, by byte.
    pub fn values(self) -> &'static [f32; 256] {
        match self {
            Fp8Format::E4M3Fn => &E4M3FN_VALUES,
            Fp8Format::E5M2 => &E5M2_VALUES,
        }
    }

    /// Bytes of this format widened to f32 (exactly: every fp8 value is an f16 and an f32).
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) {
        let values = self.values();
        for (value, &byte) in out.iter_mut().zip(bytes) {
            *value = values[usize::from(byte)];
        }
    }

    fn decode_bits(self, byte: u8) -> f32 {
        let sign = if byte & 0x80 != 0 { -1.0f32 } else { 1.0 };
        let (exponent_bits, bias) = match self {
            Fp8Format::E4M3Fn => (4, 7),
            Fp8Format::E5M2 => (5, 15),
        };
        let mantissa_bits = 7 - exponent_bits;
        let exponent = i32::from((byte & 0x7f) >> mantissa_bits);
        let mantissa = f32::from(byte & ((1 << mantissa_bits) - 1)) / (1 << mantissa_bits) as f32;
        let max_exponent = (1 << exponent_bits) - 1;
        let magnitude = match (self, exponent) {
            (Fp8Format::E4M3Fn, _) if byte & 0x7f == 0x7f => f32::NAN,
            (Fp8Format::E5M2, e) if e == max_exponent && mantissa == 0.0 => f32::INFINITY,
            (Fp8Format::E5M2, e) if e == max_exponent => f32::NAN,
            (_, 0) => mantissa * 2f32.powi(1 - bias),
            (_, e) => (1.0 + mantissa) * 2f32.powi(e - bias),
        };
        sign * magnitude
    }

    /// `value` rounded to this format, as [`Fp8Format::encode`] rounds its f32 value.
    pub fn encode_f16(self, value: f16) -> u8 {
        let table = match self {
            Fp8Format::E4M3Fn => &E4M3FN_OF_F16,
            Fp8Format::E5M2 => &E5M2_OF_F16,
        };
        table[usize::from(value.to_bits())]
    }

    /// `value` rounded to this format (nearest, ties to even).
    pub fn encode(self, value: f32) -> u8 {
        let (exponent_bits, bias) = match self {
            Fp8Format::E4M3Fn => (4u32, 7i32),
            Fp8Format::E5M2 => (5, 15),
        };
        let mantissa_bits = 7 - exponent_bits;
        let sign = if value.is_sign_negative() { 0x80u8 } else { 0 };
        let magnitude = value.abs();
        let (nan, overflow) = match self {
            Fp8Format::E4M3Fn => (0x7f, 0x7f),
            Fp8Format::E5M2 => (0x7f, 0x7c),
        };
        if magnitude.is_nan() {
            return sign | nan;
        }
        // The binade of `magnitude` (f32 subnormals and zero lie far below every fp8 binade);
        // below the smallest normal exponent, 1 - bias, the spacing stays 2^(1 - bias - m).
        let exponent = ((magnitude.to_bits() >> 23) as i32) - 127;
        let step_exponent = exponent.max(1 - bias) - mantissa_bits as i32;
        let units = round_half_even(magnitude / 2f32.powi(step_exponent));
        // `units` steps of 2^step_exponent: re-encode, carrying into the exponent when rounding up
        // reached the next binade.
        let code = if exponent < 1 - bias {
            // Subnormal (or rounded up to the smallest normal: units == 2^m, which is its code).
            units as u32
        } else {
            let (exponent, units) = if units >= (2 << mantissa_bits) as f32 {
                (exponent + 1, units / 2.0)
            } else {
                (exponent, units)
            };
            ((exponent + bias) as u32) << mantissa_bits | (units as u32 - (1 << mantissa_bits))
        };
        let largest_finite = match self {
            Fp8Format::E4M3Fn => 0x7e,
            Fp8Format::E5M2 => 0x7b,
        };
        if code > largest_finite {
            sign | overflow
        } else {
            sign | code as u8
        }
    }
}

/// `value` rounded to an integer, ties to even.
fn round_half_even(value: f32) -> f32 {
    let rounded = value.round();
    if (rounded - value).abs() == 0.5 && rounded % 2.0 != 0.0 {
        rounded - value.signum()
    } else {
        rounded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_decode_to_their_values() {
        let e4m3 = Fp8Format::E4M3Fn.values();
        assert_eq!(e4m3[0x38], 1.0);
        assert_eq!(e4m3[0x7e], 448.0);
        assert_eq!(e4m3[0x01], 2f32.powi(-9));
        assert_eq!(e4m3[0x08], 2f32.powi(-6));
        assert_eq!(e4m3[0xb8], -1.0);
        assert!(e4m3[0x7f].is_nan() && e4m3[0xff].is_nan());
        let e5m2 = Fp8Format::E5M2.values();
        for byte in 0..=255u8 {
            let as_f16 = half::f16::from_bits(u16::from(byte) << 8).to_f32();
            assert!(e5m2[usize::from(byte)] == as_f16 || as_f16.is_nan() && e5m2[usize::from(byte)].is_nan());
        }
    }

    /// Rounding against a search over every finite value: the nearest, ties to the even code.
    #[test]
    fn values_round_to_the_nearest_code_ties_to_even() {
        for format in [Fp8Format::E4M3Fn, Fp8Format::E5M2] {
            let values = format.values();
            let finite: Vec<u8> = (0..=0x7fu8).filter(|&b| values[usize::from(b)].is_finite()).collect();
            let largest = values[usize::from(*finite.last().expect("finite codes"))];
            let mut probes = vec![0.0f32, 1e-30, 0.3, 1.0, 1.0625, 3.3, 100.0, largest];
            for pair in finite.windows(2) {
                let (low, high) = (values[usize::from(pair[0])], values[usize::from(pair[1])]);
                probes.extend([(low + high) / 2.0, low + (high - low) * 0.25, low + (high - low) * 0.75]);
            }
            for probe in probes {
                let nearest = finite
                    .iter()
                    .copied()
                    .min_by(|&a, &b| {
                        let (da, db) = (
                            (values[usize::from(a)] - probe).abs(),
                            (values[usize::from(b)] - probe).abs(),
                        );
                        da.total_cmp(&db).then((a & 1).cmp(&(b & 1)))
                    })
                    .expect("finite codes");
                assert_eq!(format.encode(probe), nearest, "{format:?} {probe}");
                assert_eq!(format.encode(-probe), nearest | 0x80, "{format:?} -{probe}");
            }
        }
    }

    #[test]
    fn values_beyond_the_range_become_nan_or_infinity() {
        assert_eq!(
            Fp8Format::E4M3Fn.encode(464.0),
            0x7e,
            "the tie below the NaN code rounds down"
        );
        assert_eq!(Fp8Format::E4M3Fn.encode(480.0), 0x7f);
        assert_eq!(Fp8Format::E4M3Fn.encode(-1e6), 0xff);
        assert_eq!(Fp8Format::E5M2.encode(57344.0), 0x7b);
        assert_eq!(Fp8Format::E5M2.encode(1e6), 0x7c);
        assert_eq!(Fp8Format::E5M2.encode(f32::NAN), 0x7f);
    }
}
