//! ggml's tensor types as GGUF files store them: plain floats (F32, F16, BF16) and the block
//! quantizations (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 of 32 weights; the K-quants Q2_K…Q6_K of 256),
//! with their block layouts and dequantization.
//!
//! Dequantization reproduces ComfyUI-GGUF's default (`dequant_dtype` unset): the scales are f16
//! and every product and sum of the PyTorch expression is rounded to f16, as PyTorch computes
//! f16 tensors on the CPU (each operation in f32, rounded to f16). So every weight is an f16
//! value, bit for bit the one ComfyUI multiplies with.

use half::{bf16, f16};

/// Weights per K-quant super-block.
const QK_K: usize = 256;

/// A ggml tensor type Easel reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    /// The type of ggml's id, if Easel reads it.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// ggml's id of the type.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// ggml's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
        }
    }

    /// Weights per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => 32,
            GgmlType::Q2K | GgmlType::Q3K | GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q2K => 84,
            GgmlType::Q3K => 110,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    /// Whether the type is a block quantization (not plain floats).
    pub fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Bytes of `elements` weights of this type, `None` unless they fill whole blocks.
    pub fn bytes_of(self, elements: usize) -> Option<usize> {
        elements
            .is_multiple_of(self.block_size())
            .then(|| elements / self.block_size() * self.block_bytes())
    }

    /// Writes the weights of `block` (one block's bytes) into `out` (`block_size` values).
    pub fn dequantize_block(self, block: &[u8], out: &mut [f32]) {
        match self {
            GgmlType::F32 => out[0] = f32::from_le_bytes([block[0], block[1], block[2], block[3]]),
            GgmlType::F16 => out[0] = half_at(block, 0),
            GgmlType::BF16 => out[0] = bf16::from_le_bytes([block[0], block[1]]).to_f32(),
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
                // d, (m for the _1 types), (32 fifth bits for Q5), 16 bytes of nibbles: low
                // nibbles the first 16 weights, high the next; the _0 types are centred.
                let with_min = matches!(self, GgmlType::Q4_1 | GgmlType::Q5_1);
                let (offset, rest) = if with_min {
                    (Some(half_at(block, 2)), &block[4..])
                } else {
                    (None, &block[2..])
                };
                let (high_bits, nibbles) = match self {
                    GgmlType::Q5_0 | GgmlType::Q5_1 => {
                        (u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]), &rest[4..20])
                    }
                    _ => (0, &rest[..16]),
                };
                let fifth = |i: usize| (((high_bits >> i) & 1) as u8) << 4;
                let zero = match self {
                    GgmlType::Q4_0 => 8,
                    GgmlType::Q5_0 => 16,
                    _ => 0,
                };
                let mut quants = [0i8; 32];
                for (i, &byte) in nibbles.iter().enumerate() {
                    quants[i] = ((byte & 0x0f) | fifth(i)) as i8 - zero;
                    quants[i + 16] = ((byte >> 4) | fifth(i + 16)) as i8 - zero;
                }
                scale_quants(&quants, half_at(block, 0), offset, &mut out[..32]);
            }
            GgmlType::Q8_0 => {
                let mut quants = [0i8; 32];
                for (quant, &byte) in quants.iter_mut().zip(&block[2..34]) {
                    *quant = byte as i8;
                }
                scale_quants(&quants, half_at(block, 0), None, &mut out[..32]);
            }
            GgmlType::Q2K => dequantize_q2k(block, out),
            GgmlType::Q3K => dequantize_q3k(block, out),
            GgmlType::Q4K | GgmlType::Q5K => dequantize_q4k_q5k(self, block, out),
            GgmlType::Q6K => dequantize_q6k(block, out),
        }
    }
}

impl GgmlType {
    /// Elements `start..start + out.len()` of a tensor of this type (`bytes`, whole blocks),
    /// dequantized block by block.
    pub fn dequantize_range(self, bytes: &[u8], start: usize, out: &mut [f32]) {
        let (size, block_bytes) = (self.block_size(), self.block_bytes());
        let mut partial = [0f32; QK_K];
        let (mut index, mut written) = (start, 0);
        while written < out.len() {
            let (block, within) = (index / size, index % size);
            let count = (size - within).min(out.len() - written);
            let block = &bytes[block * block_bytes..(block + 1) * block_bytes];
            if count == size {
                self.dequantize_block(block, &mut out[written..written + size]);
            } else {
                self.dequantize_block(block, &mut partial[..size]);
                out[written..written + count].copy_from_slice(&partial[within..within + count]);
            }
            index += count;
            written += count;
        }
    }

    /// Elements `start`, `start + stride`, … of a tensor of this type, each block decoded once
    /// for the run of elements in it.
    pub fn dequantize_strided(self, bytes: &[u8], start: usize, stride: usize, out: &mut [f32]) {
        let (size, block_bytes) = (self.block_size(), self.block_bytes());
        let mut decoded = [0f32; QK_K];
        let mut decoded_block = usize::MAX;
        for (i, value) in out.iter_mut().enumerate() {
            let index = start + i * stride;
            let block = index / size;
            if block != decoded_block {
                self.dequantize_block(
                    &bytes[block * block_bytes..(block + 1) * block_bytes],
                    &mut decoded[..size],
                );
                decoded_block = block;
            }
            *value = decoded[index % size];
        }
    }
}

/// `value` rounded to f16, as PyTorch rounds each f16 operation's result.
fn h(value: f32) -> f32 {
    f16::from_f32(value).to_f32()
}

/// Every value rounded to the nearest f16 (ties to even), as each result of PyTorch's f16
/// arithmetic is; with AVX-512 sixteen at a time.
fn round_to_f16(values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        unsafe { round_to_f16_avx512(values) };
        return;
    }
    values.iter_mut().for_each(|value| *value = h(*value));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn round_to_f16_avx512(values: &mut [f32]) {
    use std::arch::x86_64::{_mm512_cvtph_ps, _mm512_cvtps_ph, _mm512_loadu_ps, _mm512_storeu_ps};
    let mut chunks = values.chunks_exact_mut(16);
    for chunk in &mut chunks {
        // SAFETY: the chunk holds 16 values.
        unsafe {
            let rounded =
                _mm512_cvtps_ph::<{ std::arch::x86_64::_MM_FROUND_TO_NEAREST_INT }>(_mm512_loadu_ps(chunk.as_ptr()));
            _mm512_storeu_ps(chunk.as_mut_ptr(), _mm512_cvtph_ps(rounded));
        }
    }
    chunks.into_remainder().iter_mut().for_each(|value| *value = h(*value));
}

/// `out[i] = h(scale·quants[i])`, then with an offset `h(out[i] + offset)`: ggml's `d·q` and
/// `d·q + m` in f16 arithmetic. scale·q is exact in f32 (an f16 scale times a quant of at most
/// 8 bits), so one rounding gives PyTorch's f16 product; with AVX-512 sixteen at a time.
fn scale_quants(quants: &[i8], scale: f32, offset: Option<f32>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if quants.len().is_multiple_of(16) && is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; the quants come in whole runs of 16.
        unsafe { scale_quants_avx512(quants, scale, offset, out) };
        return;
    }
    scale_quants_scalar(quants, scale, offset, out);
}

fn scale_quants_scalar(quants: &[i8], scale: f32, offset: Option<f32>, out: &mut [f32]) {
    for (value, &quant) in out.iter_mut().zip(quants) {
        *value = scale * f32::from(quant);
    }
    round_to_f16(out);
    if let Some(offset) = offset {
        out.iter_mut().for_each(|value| *value += offset);
        round_to_f16(out);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scale_quants_avx512(quants: &[i8], scale: f32, offset: Option<f32>, out: &mut [f32]) {
    use std::arch::x86_64::{
        __m128i, __m512, _mm512_add_ps, _mm512_cvtepi32_ps, _mm512_cvtepi8_epi32, _mm512_cvtph_ps, _mm512_cvtps_ph,
        _mm512_mul_ps, _mm512_set1_ps, _mm512_storeu_ps, _mm_loadu_si128, _MM_FROUND_TO_NEAREST_INT,
    };
    let rounded = |values: __m512| _mm512_cvtph_ps(_mm512_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(values));
    let scale = _mm512_set1_ps(scale);
    for (run, values) in quants.chunks_exact(16).zip(out.chunks_exact_mut(16)) {
        // SAFETY: `run` holds 16 bytes and `values` 16 floats.
        unsafe {
            let bytes = _mm_loadu_si128(run.as_ptr().cast::<__m128i>());
            let mut weights = rounded(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)), scale));
            if let Some(offset) = offset {
                weights = rounded(_mm512_add_ps(weights, _mm512_set1_ps(offset)));
            }
            _mm512_storeu_ps(values.as_mut_ptr(), weights);
        }
    }
}

/// The little-endian f16 at `offset` of `bytes`.
fn half_at(bytes: &[u8], offset: usize) -> f32 {
    f16::from_le_bytes([bytes[offset], bytes[offset + 1]]).to_f32()
}

/// Q2_K: 16 scales (low nibble: scale, high: min) for 16 weights each, 2-bit weights packed four
/// to a byte (32 bytes per 128 weights, shift 0, 2, 4, 6 taking 32 weights each), d and dmin.
fn dequantize_q2k(block: &[u8], out: &mut [f32]) {
    let (scales, quants) = (&block[0..16], &block[16..80]);
    let (d, dmin) = (half_at(block, 80), half_at(block, 82));
    for (group, values) in out[..QK_K].chunks_mut(16).enumerate() {
        let scale = scales[group];
        let (dl, ml) = (h(d * f32::from(scale & 0x0f)), h(dmin * f32::from(scale >> 4)));
        let (bytes, shift) = two_bit_run(quants, group);
        let mut run = [0i8; 16];
        for (quant, &byte) in run.iter_mut().zip(bytes) {
            *quant = ((byte >> shift) & 3) as i8;
        }
        scale_quants(&run, dl, Some(-ml), values);
    }
}

/// The bytes and the shift of the 2-bit weights of group `group` (16 weights) in Q2_K's and
/// Q3_K's layout; the bytes are also the positions of Q3_K's high-bit mask bytes.
fn two_bit_run(quants: &[u8], group: usize) -> (&[u8], usize) {
    let first = group * 16;
    let (half, shift) = (first / 128, (first % 128) / 32);
    (&quants[half * 32 + first % 32..][..16], 2 * shift)
}

/// Q3_K: a high-bit mask (bit b of byte l for weight 32·b + l), 2-bit weights as Q2_K, 16 6-bit
/// scales (low nibbles in bytes 0..8, high bit pairs in bytes 8..12) offset by 32, and d.
fn dequantize_q3k(block: &[u8], out: &mut [f32]) {
    let (mask, quants, packed) = (&block[0..32], &block[32..96], &block[96..108]);
    let d = half_at(block, 108);
    let scale = |s: usize| {
        let low = (packed[s % 8] >> (4 * (s / 8))) & 0x0f;
        let high = (packed[8 + s % 4] >> (2 * (s / 4))) & 3;
        f32::from((low | (high << 4)) as i8 - 32)
    };
    for (group, values) in out[..QK_K].chunks_mut(16).enumerate() {
        let dl = h(d * scale(group));
        let (bytes, shift) = two_bit_run(quants, group);
        let (mask_bytes, mask_bit) = (&mask[(group * 16) % 32..][..16], group * 16 / 32);
        let mut run = [0i8; 16];
        for ((quant, &byte), &mask_byte) in run.iter_mut().zip(bytes).zip(mask_bytes) {
            let high_clear = 1 - ((mask_byte >> mask_bit) & 1);
            *quant = ((byte >> shift) & 3) as i8 - 4 * high_clear as i8;
        }
        scale_quants(&run, dl, None, values);
    }
}

/// The 6-bit scale and min of sub-block `j` (of 8) in the 12 packed bytes of Q4_K and Q5_K.
fn scale_and_min(packed: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        (
            (packed[j + 4] & 0x0f) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    }
}

/// Q4_K and Q5_K: d, dmin, 8 packed 6-bit scale/min pairs for 32 weights each, (Q5_K: a fifth
/// bit per weight, bit j of byte l for weight 32·j + l), 4-bit weights (32 bytes per 64
/// weights: low nibbles the first 32, high the next).
fn dequantize_q4k_q5k(kind: GgmlType, block: &[u8], out: &mut [f32]) {
    let (d, dmin, packed) = (half_at(block, 0), half_at(block, 2), &block[4..16]);
    let (fifth_bits, quants) = match kind {
        GgmlType::Q5K => (Some(&block[16..48]), &block[48..176]),
        _ => (None, &block[16..144]),
    };
    for (sub, values) in out.chunks_mut(32).take(8).enumerate() {
        let (scale, min) = scale_and_min(packed, sub);
        let (dl, ml) = (h(d * f32::from(scale)), h(dmin * f32::from(min)));
        let shift = 4 * (sub % 2);
        let mut run = [0i8; 32];
        for (quant, &byte) in run.iter_mut().zip(&quants[(sub / 2) * 32..][..32]) {
            *quant = ((byte >> shift) & 0x0f) as i8;
        }
        if let Some(bits) = fifth_bits {
            for (quant, &byte) in run.iter_mut().zip(bits) {
                *quant |= (((byte >> sub) & 1) << 4) as i8;
            }
        }
        scale_quants(&run, dl, Some(-ml), values);
    }
}

/// Q6_K: low 4 bits (64 bytes per 128 weights), high 2 bits (32 bytes per 128), 16 signed
/// scales for 16 weights each, d; weights offset by 32.
fn dequantize_q6k(block: &[u8], out: &mut [f32]) {
    let (low, high, scales) = (&block[0..128], &block[128..192], &block[192..208]);
    let d = half_at(block, 208);
    for (group, values) in out[..QK_K].chunks_mut(16).enumerate() {
        let dl = h(d * f32::from(scales[group] as i8));
        let first = group * 16;
        let (half, part, l) = (first / 128, (first % 128) / 32, first % 32);
        let low_bytes = &low[half * 64 + (part % 2) * 32 + l..][..16];
        let high_bytes = &high[half * 32 + l..][..16];
        let mut run = [0i8; 16];
        for ((quant, &low_byte), &high_byte) in run.iter_mut().zip(low_bytes).zip(high_bytes) {
            let low_bits = (low_byte >> (4 * (part / 2))) & 0x0f;
            let high_bits = (high_byte >> (2 * part)) & 3;
            *quant = (low_bits | (high_bits << 4)) as i8 - 32;
        }
        scale_quants(&run, dl, None, values);
    }
}

/// Quantizers for the test models Easel writes itself (round to nearest, no search for the
/// best scales: valid files, not the best quantization).
pub mod quantize {
    use super::*;

    /// `values` (whole blocks of `kind`) quantized; `None` for the types Easel writes no test
    /// tensors in (all but F32, F16, BF16, Q8_0 and Q4_K).
    pub fn quantize(kind: GgmlType, values: &[f32]) -> Option<Vec<u8>> {
        let mut bytes = Vec::with_capacity(kind.bytes_of(values.len()).unwrap_or(0));
        for block in values.chunks(kind.block_size()) {
            match kind {
                GgmlType::F32 => bytes.extend(block[0].to_le_bytes()),
                GgmlType::F16 => bytes.extend(f16::from_f32(block[0]).to_le_bytes()),
                GgmlType::BF16 => bytes.extend(bf16::from_f32(block[0]).to_le_bytes()),
                GgmlType::Q8_0 => {
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    bytes.extend(f16::from_f32(d).to_le_bytes());
                    let inverse = if d > 0.0 { 1.0 / d } else { 0.0 };
                    bytes.extend(
                        block
                            .iter()
                            .map(|v| (v * inverse).round().clamp(-127.0, 127.0) as i8 as u8),
                    );
                }
                GgmlType::Q4K => quantize_q4k(block, &mut bytes),
                _ => return None,
            }
        }
        Some(bytes)
    }

    /// `count` blocks of a quantized `kind` with random quants and small scales: data for
    /// timing the kernels of the types Easel writes no test tensors in. `None` for F32, F16
    /// and BF16 (random bytes there would be NaNs; [`quantize`] writes them).
    pub fn random_blocks(kind: GgmlType, count: usize, seed: u64) -> Option<Vec<u8>> {
        // The offsets of the block's f16 scales (d, and the min or dmin where it has one).
        let scale_offsets: &[usize] = match kind {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => return None,
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
            GgmlType::Q2K => &[80, 82],
            GgmlType::Q3K => &[108],
            GgmlType::Q6K => &[208],
        };
        let mut state = seed | 1;
        let mut bytes: Vec<u8> = (0..count * kind.block_bytes())
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect();
        for block in bytes.chunks_exact_mut(kind.block_bytes()) {
            for &offset in scale_offsets {
                let scale = f16::from_f32(1e-3 * f32::from(block[offset] % 16 + 1));
                block[offset..offset + 2].copy_from_slice(&scale.to_le_bytes());
            }
        }
        Some(bytes)
    }

    /// Q4_K: per 32 weights a scale and a min (6 bits each, against the block's d and dmin).
    fn quantize_q4k(block: &[f32], bytes: &mut Vec<u8>) {
        let subs: Vec<(f32, f32)> = block
            .chunks(32)
            .map(|sub| {
                let min = sub.iter().fold(f32::INFINITY, |m, &v| m.min(v)).min(0.0);
                let max = sub.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                ((max - min) / 15.0, -min)
            })
            .collect();
        let d = subs.iter().fold(0f32, |m, s| m.max(s.0)) / 63.0;
        let dmin = subs.iter().fold(0f32, |m, s| m.max(s.1)) / 63.0;
        let (d, dmin) = (f16::from_f32(d).to_f32(), f16::from_f32(dmin).to_f32());
        let code = |value: f32, unit: f32| {
            if unit > 0.0 {
                (value / unit).round().clamp(0.0, 63.0) as u8
            } else {
                0
            }
        };
        let codes: Vec<(u8, u8)> = subs
            .iter()
            .map(|&(scale, min)| (code(scale, d), code(min, dmin)))
            .collect();
        let mut packed = [0u8; 12];
        for (j, &(scale, min)) in codes.iter().enumerate() {
            if j < 4 {
                packed[j] |= scale;
                packed[j + 4] |= min;
            } else {
                packed[j + 4] = (scale & 0x0f) | ((min & 0x0f) << 4);
                packed[j - 4] |= (scale >> 4) << 6;
                packed[j] |= (min >> 4) << 6;
            }
        }
        bytes.extend(f16::from_f32(d).to_le_bytes());
        bytes.extend(f16::from_f32(dmin).to_le_bytes());
        bytes.extend(packed);
        let mut quants = [0u8; 128];
        for (sub, values) in block.chunks(32).enumerate() {
            let (scale, min) = (d * f32::from(codes[sub].0), dmin * f32::from(codes[sub].1));
            for (l, &value) in values.iter().enumerate() {
                let q = if scale > 0.0 {
                    ((value + min) / scale).round().clamp(0.0, 15.0) as u8
                } else {
                    0
                };
                quants[(sub / 2) * 32 + l] |= q << (4 * (sub % 2));
            }
        }
        bytes.extend(quants);
    }
}

#[cfg(test)]
mod tests {
    use super::quantize::quantize;
    use super::*;

    fn dequantize(kind: GgmlType, bytes: &[u8]) -> Vec<f32> {
        let mut out = vec![0f32; bytes.len() / kind.block_bytes() * kind.block_size()];
        for (block, values) in bytes.chunks(kind.block_bytes()).zip(out.chunks_mut(kind.block_size())) {
            kind.dequantize_block(block, values);
        }
        out
    }

    fn half(value: f32) -> [u8; 2] {
        f16::from_f32(value).to_le_bytes()
    }

    #[test]
    fn legacy_blocks_decode_to_known_values() {
        // Q8_0: d = 0.5, q = -128, -1, 0, 1, 127, then zeros.
        let mut q8 = half(0.5).to_vec();
        q8.extend([0x80, 0xff, 0, 1, 127]);
        q8.resize(34, 0);
        assert_eq!(
            &dequantize(GgmlType::Q8_0, &q8)[..6],
            &[-64.0, -0.5, 0.0, 0.5, 63.5, 0.0]
        );
        // Q4_0: d = 2, byte 0 = 0x9f: weight 0 = 2·(15 − 8) = 14, weight 16 = 2·(9 − 8) = 2.
        let mut q4 = half(2.0).to_vec();
        q4.extend([0x9f; 1]);
        q4.resize(18, 0x88);
        let values = dequantize(GgmlType::Q4_0, &q4);
        assert_eq!((values[0], values[16], values[1]), (14.0, 2.0, 0.0));
        // Q4_1: d = 0.25, m = −1: nibble 4 → 0, nibble 15 → 2.75.
        let mut q41 = [half(0.25), half(-1.0)].concat();
        q41.extend([0xf4]);
        q41.resize(20, 0);
        let values = dequantize(GgmlType::Q4_1, &q41);
        assert_eq!((values[0], values[16], values[1]), (0.0, 2.75, -1.0));
        // Q5_0: d = 1, high bits of weights 0 and 17 set: weight 0 = (0x10|3) − 16 = 3, weight
        // 16 = 5 − 16 = −11, weight 17 = (0x10|0) − 16 = 0, weight 1 = −16.
        let mut q5 = half(1.0).to_vec();
        q5.extend((1u32 | 1 << 17).to_le_bytes());
        q5.extend([0x53]);
        q5.resize(22, 0);
        let values = dequantize(GgmlType::Q5_0, &q5);
        assert_eq!((values[0], values[16], values[17], values[1]), (3.0, -11.0, 0.0, -16.0));
        // Q5_1: d = 0.5, m = 1: weight 0 = 0.5·19 + 1 = 10.5.
        let mut q51 = [half(0.5), half(1.0)].concat();
        q51.extend(1u32.to_le_bytes());
        q51.extend([0x03]);
        q51.resize(24, 0);
        assert_eq!(dequantize(GgmlType::Q5_1, &q51)[0], 10.5);
    }

    /// Products are rounded to f16 as PyTorch's f16 arithmetic rounds them: d = 1 + 2⁻¹⁰ times
    /// q = 127 is 127.124…, which f16 holds as 127.125.
    /// The vector rounding equals `half`'s scalar one over every f16 range: subnormals, ties,
    /// overflow to infinity, NaN.
    #[test]
    fn vector_f16_rounding_equals_scalar_rounding() {
        let mut values: Vec<f32> = (0..200_003u32)
            .map(|i| f32::from_bits((i.wrapping_mul(2_654_435_761) % 0x7f80_0000) | ((i & 1) << 31)))
            .filter(|value| value.abs() < 1e6)
            .chain([
                65519.0,
                65520.0,
                -65520.0,
                1e-8,
                2.9802322e-8,
                5.96e-8,
                f32::INFINITY,
                f32::NAN,
                1.0009766,
            ])
            .collect();
        let expected: Vec<u32> = values.iter().map(|v| h(*v).to_bits()).collect();
        round_to_f16(&mut values);
        let got: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
        assert_eq!(got, expected);
    }

    /// The vector path of `scale_quants` gives the scalar path's bits for every quant, with and
    /// without an offset, from subnormal products to overflow.
    #[test]
    fn vector_scaled_quants_equal_scalar_ones() {
        let quants: Vec<i8> = (0..=255u8).map(|byte| byte as i8).collect();
        for scale in [1e-7f32, 3.1e-5, 0.0123, 1.0009766, 77.0, 600.0] {
            let scale = h(scale);
            for offset in [None, Some(0.0), Some(-0.37), Some(3.5), Some(-h(scale * 9.0))] {
                let (mut fast, mut slow) = ([0f32; 256], [0f32; 256]);
                scale_quants(&quants, scale, offset, &mut fast);
                scale_quants_scalar(&quants, scale, offset, &mut slow);
                let bits = |values: &[f32]| values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fast), bits(&slow), "scale {scale}, offset {offset:?}");
            }
        }
    }

    /// Q8_0 blocks of every scale (subnormal products, large ones) decode to h(d·q) per weight.
    #[test]
    fn q8_0_blocks_decode_to_rounded_products() {
        for (n, d) in [1e-7f32, 3e-5, 0.0123, 1.0, 77.0, 500.0].into_iter().enumerate() {
            let mut block = f16::from_f32(d).to_le_bytes().to_vec();
            block.extend((0..32u8).map(|i| (i.wrapping_mul(37).wrapping_add(n as u8 * 11)) as i8 as u8));
            let mut out = [0f32; 32];
            GgmlType::Q8_0.dequantize_block(&block, &mut out);
            let d = f16::from_f32(d).to_f32();
            for (value, &byte) in out.iter().zip(&block[2..]) {
                assert_eq!(
                    value.to_bits(),
                    h(d * f32::from(byte as i8)).to_bits(),
                    "d {d}, q {}",
                    byte as i8
                );
            }
        }
    }

    #[test]
    fn products_are_rounded_to_f16() {
        let mut q8 = half(1.0 + 2f32.powi(-10)).to_vec();
        q8.extend([127]);
        q8.resize(34, 0);
        assert_eq!(dequantize(GgmlType::Q8_0, &q8)[0], 127.125);
    }

    #[test]
    fn k_quant_blocks_decode_to_known_values() {
        // Q4_K: d = 0.5, dmin = 0.25; sub-block 0 scale 3, min 4; sub-block 5 scale 1 + 16·2
        // = 33 (high bits in byte 1), min 2 + 16·1 = 18 (high bits in byte 5).
        let mut packed = [0u8; 12];
        packed[0] = 3;
        packed[4] = 4;
        packed[9] = 1 | (2 << 4);
        packed[1] |= 2 << 6;
        packed[5] |= 1 << 6;
        let mut quants = [0u8; 128];
        quants[0] = 0x0a; // weight 0: nibble 10 of sub-block 0
        quants[2 * 32 + 1] = 0x70; // weight 5·32 + 1: high nibble 7 of sub-block 5
        let block = [&half(0.5)[..], &half(0.25)[..], &packed[..], &quants[..]].concat();
        let values = dequantize(GgmlType::Q4K, &block);
        assert_eq!(values[0], 0.5 * 3.0 * 10.0 - 0.25 * 4.0);
        assert_eq!(values[5 * 32 + 1], 0.5 * 33.0 * 7.0 - 0.25 * 18.0);
        assert_eq!(values[1], -1.0);

        // Q6_K: d = 0.5, scale of weights 64..80 = −3; weight 64 (part 2: high nibble of low
        // byte 0, bits 4..6 of high byte 0) = (0x5 | 2 << 4) − 32 = 5.
        let (mut low, mut high, mut scales) = ([0u8; 128], [0u8; 64], [0u8; 16]);
        low[0] = 0x50;
        high[0] = 2 << 4;
        scales[4] = (-3i8) as u8;
        let block = [&low[..], &high[..], &scales[..], &half(0.5)[..]].concat();
        let values = dequantize(GgmlType::Q6K, &block);
        assert_eq!(values[64], 0.5 * -3.0 * 5.0);
        assert_eq!(values[0], 0.0, "scale 0");

        // Q3_K: d = 2, scale 0 = (low 5 | high 2 << 4) − 32 = 5; weight 0: bits 3 with the high
        // mask bit set → 3; weight 1: bits 1, mask clear → 1 − 4 = −3.
        let (mut mask, mut quants, mut packed) = ([0u8; 32], [0u8; 64], [0u8; 12]);
        mask[0] = 1;
        quants[0] = 3;
        quants[1] = 1;
        packed[0] = 5;
        packed[8] = 2;
        let block = [&mask[..], &quants[..], &packed[..], &half(2.0)[..]].concat();
        let values = dequantize(GgmlType::Q3K, &block);
        assert_eq!((values[0], values[1]), (2.0 * 5.0 * 3.0, 2.0 * 5.0 * -3.0));

        // Q2_K: d = 1, dmin = 0.5, scale 0 = 3 with min 2; weight 32 (shift 2 of byte 0) = 2.
        let (mut scales, mut quants) = ([0u8; 16], [0u8; 64]);
        scales[2] = 3 | (2 << 4);
        quants[0] = 2 << 2;
        let block = [&scales[..], &quants[..], &half(1.0)[..], &half(0.5)[..]].concat();
        let values = dequantize(GgmlType::Q2K, &block);
        assert_eq!(values[32], 3.0 * 2.0 - 0.5 * 2.0);
        assert_eq!(values[0], 0.0);

        // Q5_K: as Q4_K with a fifth bit: weight 0 with bit 0 of byte 0 set = 16 + nibble.
        let mut packed = [0u8; 12];
        packed[0] = 1;
        let mut fifth = [0u8; 32];
        fifth[0] = 1;
        let mut quants = [0u8; 128];
        quants[0] = 2;
        let block = [&half(0.5)[..], &half(0.0)[..], &packed[..], &fifth[..], &quants[..]].concat();
        assert_eq!(dequantize(GgmlType::Q5K, &block)[0], 0.5 * 18.0);
    }

    #[test]
    fn quantized_test_weights_round_trip_within_their_step() {
        let values: Vec<f32> = (0..512).map(|i| (i as f32 * 0.37).sin() * 0.8).collect();
        for (kind, tolerance) in [(GgmlType::Q8_0, 0.01), (GgmlType::Q4K, 0.12), (GgmlType::F16, 1e-3)] {
            let bytes = quantize(kind, &values).expect("a type the test models use");
            assert_eq!(Some(bytes.len()), kind.bytes_of(values.len()));
            let restored = dequantize(kind, &bytes);
            let worst = values
                .iter()
                .zip(&restored)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst < tolerance, "{kind:?}: {worst}");
        }
    }
}
