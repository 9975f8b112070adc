//! Image resampling as ComfyUI does it (`comfy.utils.common_upscale`).
//!
//! `nearest-exact`, `bilinear`, `bicubic` and `area` reproduce PyTorch's CPU `interpolate` kernels for
//! float32 (`align_corners=False`, no antialias), including the order of their float operations;
//! `lanczos` reproduces Pillow's 8-bit `Image.resize(LANCZOS)`, which ComfyUI calls per image
//! ([`pillow_resize`] with Pillow's other filters too).
//!
//! Reference builds: PyTorch 2.8 x86-64 wheels (compiled with FMA contraction) running more than one
//! thread, and Pillow 13. `tests/image_ops.rs` checks every method bit for bit against them.

use std::str::FromStr;

use easel_engine::NodeError;
use easel_models::kernels::interpolate::cubic_weights;

use crate::image::{from_u8, to_u8, Image, Mask};
use crate::runtime::ensure_fits;

/// The `upscale_method` combo of the image nodes.
pub const UPSCALE_METHODS: [&str; 5] = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeMethod {
    NearestExact,
    Bilinear,
    Area,
    Bicubic,
    Lanczos,
    /// Latents only: bilinear positions, spherical interpolation of the channel vectors.
    Bislerp,
}

impl FromStr for ResizeMethod {
    type Err = NodeError;
    fn from_str(name: &str) -> Result<Self, NodeError> {
        Ok(match name {
            "nearest-exact" => ResizeMethod::NearestExact,
            "bilinear" => ResizeMethod::Bilinear,
            "area" => ResizeMethod::Area,
            "bicubic" => ResizeMethod::Bicubic,
            "lanczos" => ResizeMethod::Lanczos,
            "bislerp" => ResizeMethod::Bislerp,
            other => return Err(NodeError::value(format!("unknown upscale method {other}"))),
        })
    }
}

/// `common_upscale(image, width, height, method, crop)`: optional centre crop to the new aspect
/// ratio, then resampling. `channels_last` says how PyTorch holds the tensor: images (moved to
/// NCHW from NHWC) are channels-last, latents are plain NCHW.
pub fn common_upscale(
    image: &Image,
    width: usize,
    height: usize,
    method: ResizeMethod,
    center_crop: bool,
    channels_last: bool,
) -> Result<Image, NodeError> {
    if width == 0 || height == 0 {
        return Err(NodeError::value(format!("cannot resize to {width}x{height}")));
    }
    ensure_fits(&[image.batch, height, width, image.channels], || {
        format!("an image of {width}×{height} (batch {})", image.batch)
    })?;
    let mut source = image.clone();
    let mut cropped = false;
    if center_crop {
        let (old_w, old_h) = (image.width as f64, image.height as f64);
        let old_aspect = old_w / old_h;
        let new_aspect = width as f64 / height as f64;
        let (mut x, mut y) = (0usize, 0usize);
        if old_aspect > new_aspect {
            x = ((old_w - old_w * (new_aspect / old_aspect)) / 2.0).round_ties_even() as usize;
        } else if old_aspect < new_aspect {
            y = ((old_h - old_h * (old_aspect / new_aspect)) / 2.0).round_ties_even() as usize;
        }
        if x > 0 || y > 0 {
            source = image.crop(y, image.height - y, x, image.width - x);
            cropped = true;
        }
    }
    resize(&source, height, width, method, channels_last && !cropped)
}

/// ComfyUI's `interpolate(mask.reshape((-1, 1, h, w)), size, mode="bilinear")`: a mask resized
/// as the plain NCHW tensor PyTorch sees, returned as a one-channel image.
pub fn interpolate_mask(mask: &Mask, height: usize, width: usize) -> Result<Image, NodeError> {
    resize(&mask.as_image(), height, width, ResizeMethod::Bilinear, false)
}

/// Resizes every item and channel to `out_h × out_w`. `channels_last` says whether PyTorch would see
/// the tensor as channels-last contiguous, which selects its bilinear kernel (and so its rounding).
pub fn resize(
    image: &Image,
    out_h: usize,
    out_w: usize,
    method: ResizeMethod,
    channels_last: bool,
) -> Result<Image, NodeError> {
    if image.height == 0 || image.width == 0 {
        return Err(NodeError::value("cannot resize an empty image"));
    }
    match method {
        ResizeMethod::Lanczos => return lanczos(image, out_h, out_w),
        ResizeMethod::Bislerp => return bislerp(image, out_h, out_w),
        _ => {}
    }
    let mut out = Image::filled(image.batch, out_h, out_w, image.channels, 0.0);
    match method {
        ResizeMethod::NearestExact => {
            let rows = nearest_exact_indices(image.height, out_h);
            let cols = nearest_exact_indices(image.width, out_w);
            for_each_output(image, &mut out, |b, c, y, x| {
                image.data[image.index(b, rows[y], cols[x], c)]
            });
        }
        ResizeMethod::Bilinear => {
            // PyTorch's vectorised channels-last kernel premultiplies the weights; its generic kernel
            // interpolates along rows, then columns. The two also compute source indices differently.
            let premultiplied = (channels_last && image.channels > 3) || out_h + out_w <= 128;
            let rows = linear_taps(image.height, out_h, premultiplied);
            let cols = linear_taps(image.width, out_w, premultiplied);
            for_each_output(image, &mut out, |b, c, y, x| {
                let (h0, h1, hl0, hl1) = rows[y];
                let (w0, w1, wl0, wl1) = cols[x];
                let v = |yy: usize, xx: usize| image.data[image.index(b, yy, xx, c)];
                if premultiplied {
                    dot(
                        &[v(h0, w0), v(h0, w1), v(h1, w0), v(h1, w1)],
                        &[hl0 * wl0, hl0 * wl1, hl1 * wl0, hl1 * wl1],
                    )
                } else {
                    let top = dot(&[v(h0, w0), v(h0, w1)], &[wl0, wl1]);
                    let bottom = dot(&[v(h1, w0), v(h1, w1)], &[wl0, wl1]);
                    dot(&[top, bottom], &[hl0, hl1])
                }
            });
        }
        ResizeMethod::Bicubic => {
            let rows = cubic_taps(image.height, out_h);
            let cols = cubic_taps(image.width, out_w);
            for_each_output(image, &mut out, |b, c, y, x| {
                let (row_idx, row_w) = &rows[y];
                let (col_idx, col_w) = &cols[x];
                let row = |yy: usize| dot(&col_idx.map(|xx| image.data[image.index(b, yy, xx, c)]), col_w);
                dot(&row_idx.map(row), row_w)
            });
        }
        ResizeMethod::Area => {
            for_each_output(image, &mut out, |b, c, y, x| {
                let (y0, y1) = (y * image.height / out_h, ((y + 1) * image.height).div_ceil(out_h));
                let (x0, x1) = (x * image.width / out_w, ((x + 1) * image.width).div_ceil(out_w));
                let mut sum = 0.0f32;
                for yy in y0..y1 {
                    for xx in x0..x1 {
                        sum += image.data[image.index(b, yy, xx, c)];
                    }
                }
                sum / (y1 - y0) as f32 / (x1 - x0) as f32
            });
        }
        ResizeMethod::Lanczos | ResizeMethod::Bislerp => unreachable!("handled above"),
    }
    Ok(out)
}

fn for_each_output(image: &Image, out: &mut Image, value: impl Fn(usize, usize, usize, usize) -> f32) {
    let (h, w, ch) = (out.height, out.width, out.channels);
    for b in 0..image.batch {
        for y in 0..h {
            for x in 0..w {
                for c in 0..ch {
                    out.data[((b * h + y) * w + x) * ch + c] = value(b, c, y, x);
                }
            }
        }
    }
}

/// ComfyUI's `bislerp`: along the width, then along the height, each output vector (over the
/// channels) is the slerp of its two bilinear source vectors, scaled to their interpolated norm.
fn bislerp(image: &Image, out_h: usize, out_w: usize) -> Result<Image, NodeError> {
    let channels = image.channels;
    let columns = bilinear_sources(image.width, out_w)?;
    let mut wide = Image::filled(image.batch, image.height, out_w, channels, 0.0);
    for b in 0..image.batch {
        for y in 0..image.height {
            for (x, (first, second, ratio)) in columns.iter().enumerate() {
                let start = |xx: usize| image.index(b, y, xx, 0);
                let target = wide.index(b, y, x, 0);
                slerp(
                    &image.data[start(*first)..start(*first) + channels],
                    &image.data[start(*second)..start(*second) + channels],
                    *ratio,
                    &mut wide.data[target..target + channels],
                );
            }
        }
    }
    let rows = bilinear_sources(image.height, out_h)?;
    let mut out = Image::filled(image.batch, out_h, out_w, channels, 0.0);
    for b in 0..image.batch {
        for (y, (first, second, ratio)) in rows.iter().enumerate() {
            for x in 0..out_w {
                let start = |yy: usize| wide.index(b, yy, x, 0);
                let target = out.index(b, y, x, 0);
                slerp(
                    &wide.data[start(*first)..start(*first) + channels],
                    &wide.data[start(*second)..start(*second) + channels],
                    *ratio,
                    &mut out.data[target..target + channels],
                );
            }
        }
    }
    Ok(out)
}

/// bislerp's `generate_bilinear_data`: the bilinearly resized index ramps `0…n−1` and
/// `1…n−1, n−1` give each output position its two sources and the fraction between them.
fn bilinear_sources(input: usize, output: usize) -> Result<Vec<(usize, usize, f32)>, NodeError> {
    let ramp = |values: Vec<f32>| {
        let line = Image {
            batch: 1,
            height: 1,
            width: input,
            channels: 1,
            data: values,
        };
        resize(&line, 1, output, ResizeMethod::Bilinear, false).map(|resized| resized.data)
    };
    let first = ramp((0..input).map(|i| i as f32).collect())?;
    let second = ramp((0..input).map(|i| (i + 1).min(input - 1) as f32).collect())?;
    Ok(first
        .iter()
        .zip(&second)
        .map(|(a, b)| (*a as usize, *b as usize, a - a.floor()))
        .collect())
}

/// bislerp's `slerp` of two channel vectors at ratio r, written to `out`.
fn slerp(b1: &[f32], b2: &[f32], r: f32, out: &mut [f32]) {
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let (norm1, norm2) = (norm(b1), norm(b2));
    let normalized = |v: &[f32], n: f32| -> Vec<f32> { v.iter().map(|x| if n == 0.0 { 0.0 } else { x / n }).collect() };
    let (n1, n2) = (normalized(b1, norm1), normalized(b2, norm2));
    let dot: f32 = n1.iter().zip(&n2).map(|(a, b)| a * b).sum();
    if dot > 1.0 - 1e-5 {
        out.copy_from_slice(b1);
        return;
    }
    if dot < 1e-5 - 1.0 {
        for ((o, a), b) in out.iter_mut().zip(b1).zip(b2) {
            *o = a * (1.0 - r) + b * r;
        }
        return;
    }
    let omega = dot.acos();
    let so = omega.sin();
    let (w1, w2) = (((1.0 - r) * omega).sin() / so, (r * omega).sin() / so);
    let length = norm1 * (1.0 - r) + norm2 * r;
    for ((o, a), b) in out.iter_mut().zip(&n1).zip(&n2) {
        *o = (w1 * a + w2 * b) * length;
    }
}

/// `input / output` as PyTorch's float `area_pixel_compute_scale`.
fn scale(input: usize, output: usize) -> f32 {
    input as f32 / output as f32
}

fn nearest_exact_indices(input: usize, output: usize) -> Vec<usize> {
    let s = scale(input, output);
    (0..output)
        .map(|i| (((i as f32 + 0.5) * s).floor() as usize).min(input - 1))
        .collect()
}

/// PyTorch's `guard_index_and_lambda`.
fn guard(real: f32, input: usize) -> (i64, f32) {
    let index = (real.floor() as i64).min(input as i64 - 1);
    let lambda = (real - index as f32).clamp(0.0, 1.0);
    (index, lambda)
}

/// `Σ values·weights` rounded as PyTorch's compiled kernels round it: GCC contracts
/// `v0·w0 + v1·w1 + …` into `fma(v0, w0, v1·w1)`, then `fma(vk, wk, acc)` for each further term.
fn dot(values: &[f32], weights: &[f32]) -> f32 {
    let mut acc = values[0].mul_add(weights[0], values[1] * weights[1]);
    for (v, w) in values.iter().zip(weights).skip(2) {
        acc = v.mul_add(*w, acc);
    }
    acc
}

/// `scale·(i + 0.5) − 0.5`, fused or not as the kernel was compiled.
fn source_index(scale: f32, i: usize, fused: bool) -> f32 {
    if fused {
        scale.mul_add(i as f32 + 0.5, -0.5)
    } else {
        scale * (i as f32 + 0.5) - 0.5
    }
}

/// Source rows and weights for bilinear: `(i0, i1, λ0, λ1)` per output index.
fn linear_taps(input: usize, output: usize, fused_index: bool) -> Vec<(usize, usize, f32, f32)> {
    let s = scale(input, output);
    (0..output)
        .map(|i| {
            if input == output {
                return (i, i, 1.0, 0.0);
            }
            let real = source_index(s, i, fused_index).max(0.0);
            let (i0, l1) = guard(real, input);
            let i0 = i0.max(0) as usize;
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

/// Source indices (clamped) and weights for bicubic (A = −0.75), per output index.
fn cubic_taps(input: usize, output: usize) -> Vec<([usize; 4], [f32; 4])> {
    let s = scale(input, output);
    (0..output)
        .map(|i| {
            let (index, t) = guard(source_index(s, i, true), input);
            let weights = cubic_weights(t);
            let clamp = |k: i64| (index - 1 + k).clamp(0, input as i64 - 1) as usize;
            ([clamp(0), clamp(1), clamp(2), clamp(3)], weights)
        })
        .collect()
}

/// Pillow's fixed-point precision for 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's resampling filters (`Image.Resampling`), by their support and kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PillowFilter {
    Box,
    Bilinear,
    Hamming,
    Bicubic,
    Lanczos,
}

impl PillowFilter {
    /// The filter named as Pillow names it (`LANCZOS`, `BICUBIC`, …).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "BOX" => PillowFilter::Box,
            "BILINEAR" => PillowFilter::Bilinear,
            "HAMMING" => PillowFilter::Hamming,
            "BICUBIC" => PillowFilter::Bicubic,
            "LANCZOS" => PillowFilter::Lanczos,
            _ => return None,
        })
    }

    fn support(self) -> f64 {
        match self {
            PillowFilter::Box => 0.5,
            PillowFilter::Bilinear | PillowFilter::Hamming => 1.0,
            PillowFilter::Bicubic => 2.0,
            PillowFilter::Lanczos => 3.0,
        }
    }

    /// The kernel at `x` (Pillow's `box_filter`, `bilinear_filter`, `hamming_filter`,
    /// `bicubic_filter` with a = −0.5, `lanczos_filter`).
    fn weight(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x
            }
        }
        match self {
            PillowFilter::Box => f64::from(u8::from(x > -0.5 && x <= 0.5)),
            PillowFilter::Bilinear => (1.0 - x.abs()).max(0.0),
            PillowFilter::Hamming => {
                let x = x.abs();
                match x {
                    0.0 => 1.0,
                    x if x >= 1.0 => 0.0,
                    x => {
                        let x = x * std::f64::consts::PI;
                        // Pillow writes the constants as C floats.
                        x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
                    }
                }
            }
            PillowFilter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            PillowFilter::Lanczos => match (-3.0..3.0).contains(&x) {
                true => sinc(x) * sinc(x / 3.0),
                false => 0.0,
            },
        }
    }
}

/// Pillow's `precompute_coeffs` for `filter`, normalised to fixed point: per output index, the
/// first source index and the integer weights.
fn pillow_coefficients(input: usize, output: usize, filter: PillowFilter) -> Vec<(usize, Vec<i32>)> {
    let scale = input as f64 / output as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..output)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(input as i64) as usize;
            let weights: Vec<f64> = (0..xmax.saturating_sub(xmin))
                .map(|x| filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let scaled = w * f64::from(1u32 << PRECISION_BITS);
                    if w < 0.0 {
                        (-0.5 + scaled) as i32
                    } else {
                        (0.5 + scaled) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One separable pass of `filter` over `[lines][length][channels]` u8 data along `length`.
#[allow(clippy::too_many_arguments)]
fn pillow_pass(
    data: &[u8],
    lines: usize,
    length: usize,
    stride_line: usize,
    stride_pos: usize,
    channels: usize,
    out_len: usize,
    filter: PillowFilter,
) -> Vec<u8> {
    let coefficients = pillow_coefficients(length, out_len, filter);
    let mut out = vec![0u8; lines * out_len * channels];
    for line in 0..lines {
        for (o, (start, weights)) in coefficients.iter().enumerate() {
            for c in 0..channels {
                let mut sum: i32 = 1 << (PRECISION_BITS - 1);
                for (k, w) in weights.iter().enumerate() {
                    let v = data[line * stride_line + (start + k) * stride_pos + c];
                    sum = sum.wrapping_add(i32::from(v).wrapping_mul(*w));
                }
                out[(line * out_len + o) * channels + c] = clip8(sum);
            }
        }
    }
    out
}

/// Pillow's `Image.resize((w, h), LANCZOS)` on each item quantised to 8 bits, as ComfyUI's `lanczos`.
fn lanczos(image: &Image, out_h: usize, out_w: usize) -> Result<Image, NodeError> {
    pillow_resize(image, out_h, out_w, PillowFilter::Lanczos)
}

/// Pillow's `Image.resize((w, h), filter)` on each item quantised to 8 bits (truncated, as
/// `Image.fromarray` of `255·x` as uint8 and torchvision's `ToPILImage` do). RGBA is resized
/// premultiplied, as Pillow does.
pub fn pillow_resize(image: &Image, out_h: usize, out_w: usize, filter: PillowFilter) -> Result<Image, NodeError> {
    let (h, w, ch) = (image.height, image.width, image.channels);
    let mut frames = Vec::with_capacity(image.batch);
    for b in 0..image.batch {
        let mut pixels: Vec<u8> = image.frame(b).iter().map(|&v| to_u8(v)).collect();
        if ch == 4 {
            premultiply(&mut pixels);
        }
        // Pillow 13 runs the vertical pass first when the height shrinks by more than twice what
        // the width shrinks (read from its `ImagingResample`), else the horizontal pass first; a
        // pass whose size is unchanged is skipped.
        let vertical_first = h > out_h && (h - out_h) as i64 > 2 * (w as i64 - out_w as i64);
        let mut data = pixels;
        let mut width = w;
        let mut height = h;
        for vertical in if vertical_first { [true, false] } else { [false, true] } {
            if vertical && out_h != height {
                // Treat columns as lines: line stride = one pixel, position stride = one row.
                let transposed = pillow_pass(&data, width, height, ch, width * ch, ch, out_h, filter);
                data = vec![0u8; out_h * width * ch];
                for x in 0..width {
                    for y in 0..out_h {
                        let (to, from) = ((y * width + x) * ch, (x * out_h + y) * ch);
                        data[to..to + ch].copy_from_slice(&transposed[from..from + ch]);
                    }
                }
                height = out_h;
            } else if !vertical && out_w != width {
                data = pillow_pass(&data, height, width, width * ch, ch, ch, out_w, filter);
                width = out_w;
            }
        }
        if ch == 4 {
            unpremultiply(&mut data);
        }
        frames.extend(data.into_iter().map(from_u8));
    }
    Image::new(image.batch, out_h, out_w, ch, frames)
}

/// Pillow's RGBA → RGBa conversion.
fn premultiply(pixels: &mut [u8]) {
    for p in pixels.chunks_mut(4) {
        let alpha = u32::from(p[3]);
        if alpha == 255 {
            continue;
        }
        for v in &mut p[..3] {
            let t = u32::from(*v) * alpha + 128;
            *v = (((t >> 8) + t) >> 8) as u8;
        }
    }
}

/// Pillow's RGBa → RGBA conversion.
fn unpremultiply(pixels: &mut [u8]) {
    for p in pixels.chunks_mut(4) {
        let alpha = u32::from(p[3]);
        if alpha == 255 || alpha == 0 {
            continue;
        }
        for v in &mut p[..3] {
            *v = ((255 * u32::from(*v)) / alpha).min(255) as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(h: usize, w: usize) -> Image {
        let data = (0..h * w).map(|i| i as f32 / (h * w) as f32).collect();
        Image::new(1, h, w, 1, data).unwrap()
    }

    #[test]
    fn identity_sizes_keep_values() {
        let img = ramp(5, 7);
        for method in [
            ResizeMethod::NearestExact,
            ResizeMethod::Bilinear,
            ResizeMethod::Area,
            ResizeMethod::Bicubic,
        ] {
            assert_eq!(resize(&img, 5, 7, method, true).unwrap(), img, "{method:?}");
        }
    }

    #[test]
    fn bilinear_upsample_matches_torch() {
        // torch.nn.functional.interpolate(torch.tensor([[[[0., 1.], [2., 3.]]]]), size=(4, 4), mode="bilinear")
        let img = Image::new(1, 2, 2, 1, vec![0.0, 1.0, 2.0, 3.0]).unwrap();
        let out = resize(&img, 4, 4, ResizeMethod::Bilinear, true).unwrap();
        let expected = [
            0.0, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5, 1.5, 1.75, 2.25, 2.5, 2.0, 2.25, 2.75, 3.0,
        ];
        assert_eq!(out.data, expected);
    }

    #[test]
    fn area_and_nearest_downsample() {
        let img = Image::new(1, 1, 4, 1, vec![0.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(resize(&img, 1, 2, ResizeMethod::Area, true).unwrap().data, [0.5, 2.5]);
        assert_eq!(
            resize(&img, 1, 2, ResizeMethod::NearestExact, true).unwrap().data,
            [1.0, 3.0]
        );
        assert_eq!(
            resize(&img, 1, 3, ResizeMethod::Area, true).unwrap().data,
            [0.5, 1.5, 2.5]
        );
    }

    #[test]
    fn bicubic_upsample_matches_torch() {
        // torch.nn.functional.interpolate(torch.tensor([[[[0., 1.]]]]), size=(1, 4), mode="bicubic")
        let img = Image::new(1, 1, 2, 1, vec![0.0, 1.0]).unwrap();
        let out = resize(&img, 1, 4, ResizeMethod::Bicubic, true).unwrap();
        // Weights from the A = −0.75 kernel with clamped borders.
        let expected = [-27.0f32, 58.0, 198.0, 283.0].map(|v| v / 256.0);
        for (a, e) in out.data.iter().zip(expected) {
            assert!((a - e).abs() < 1e-6, "{:?}", out.data);
        }
    }

    #[test]
    fn lanczos_weights_sum_to_one_in_fixed_point() {
        for (input, output) in [(10, 3), (3, 10), (64, 64)] {
            for (_, weights) in pillow_coefficients(input, output, PillowFilter::Lanczos) {
                let total: i32 = weights.iter().sum();
                assert!((total - (1 << PRECISION_BITS)).abs() <= weights.len() as i32);
            }
        }
    }

    #[test]
    fn lanczos_keeps_flat_images_flat() {
        let img = Image::filled(1, 6, 9, 3, 0.5);
        let out = resize(&img, 4, 13, ResizeMethod::Lanczos, true).unwrap();
        assert!(out.data.iter().all(|&v| v == 127.0 / 255.0));
    }
}
