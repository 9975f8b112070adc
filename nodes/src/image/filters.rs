//! Post-processing filters of ComfyUI's `comfy_extras/nodes_post_processing.py` and
//! `nodes_morphology.py` (`image/postprocessing`): ImageBlend, ImageBlur, ImageSharpen,
//! ImageQuantize and Morphology; and the PyTorch arithmetic under them that the latent
//! operations share ([`gaussian_kernel`], [`sharpen_kernel`], [`convolve_reflect`],
//! [`torch_sum`]).
//!
//! Reference: PyTorch 2.8's x86-64 CPU build on an AVX2 machine, Pillow 13 and kornia 0.9.
//! Values are float32 and computed in PyTorch's order of operations, bit for bit, except:
//! - `torch.sqrt` and `torch.exp` on float32 tensors run through Intel MKL's vector math, whose
//!   results are not correctly rounded and depend on the CPU (on the AMD EPYC reference machine
//!   17% of square roots and 0.13% of exponentials come out as the other float neighbour of the
//!   exact value). Easel rounds them correctly. They enter the Gaussian kernels (ImageBlur,
//!   ImageSharpen, LatentOperationSharpen) and ImageBlend's `soft_light`, which therefore differ
//!   from ComfyUI's results in the last bits (`tests/image_nodes.rs` bounds the difference, and
//!   checks the rest bit for bit against ComfyUI run with correctly rounded square roots and
//!   exponentials).
//! - The convolutions add each window's products with fused multiply-adds, row by row, as
//!   oneDNN's depthwise, brgemm and GEMM kernels do; for some latent shapes (large radii on large
//!   latents) oneDNN falls back to its reference kernel, which rounds each product first, and
//!   single-channel images take a kernel whose order is not reproduced; the last bits differ
//!   there.
//! - [`torch_sum`] follows PyTorch's single-thread order; above 32768 values PyTorch splits a
//!   sum between its threads, and the last bits then depend on its thread count.
//! - ImageQuantize reproduces Pillow's median cut and palette mapping exactly, except in one
//!   case: an image of more than 65536 colours whose reduced colours share Pillow's colour hash
//!   (rare), where the colour that stands for the merged entry may differ.
//! - Morphology is exact; only the sign of a zero result may differ.

use std::collections::HashMap;

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services};
use easel_models::sampling::schedule::linspace_f32;

use crate::image::nodes::image_result;
use crate::image::resample::{common_upscale, ResizeMethod};
use crate::image::{from_u8, Image};
use crate::runtime::broadcast;

const MODULE: &str = "comfy_extras.nodes_post_processing";
const CATEGORY: &str = "image/postprocessing";

/// Float lanes of PyTorch's AVX2 vectors.
const LANES: usize = 8;

/// `tensor.sum()` of contiguous float32 values in PyTorch's CPU order (`cascade_sum`): 8-lane
/// vectors summed as four interleaved rows, each accumulated in levels of 16, then the leftover
/// values, then the lanes, added to the zero-filled output. (PyTorch's AVX-512 kernels add
/// 16-lane vectors; on such machines the last bits of its sums differ.)
pub(crate) fn torch_sum(values: &[f32]) -> f32 {
    if values.len() < LANES {
        return 0.0 + row_sum(values.len(), 0.0f32, |a, b| a + b, |i| values[i]);
    }
    let vectors = values.len() / LANES;
    let lanes = row_sum(vectors, [0.0f32; LANES], add_lanes, |i| {
        let mut lanes = [0.0f32; LANES];
        lanes.copy_from_slice(&values[i * LANES..(i + 1) * LANES]);
        lanes
    });
    let mut total = 0.0f32;
    for value in &values[vectors * LANES..] {
        total += value;
    }
    for lane in lanes {
        total += lane;
    }
    0.0 + total
}

fn add_lanes(mut a: [f32; LANES], b: [f32; LANES]) -> [f32; LANES] {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
    a
}

/// PyTorch's `row_sum`: `size` items as rows of four, summed by [`multi_row_sum`], the leftover
/// items into the first sum, then the four sums.
fn row_sum<T: Copy>(size: usize, zero: T, add: impl Fn(T, T) -> T + Copy, item: impl Fn(usize) -> T) -> T {
    let rows = size / 4;
    let mut sums = multi_row_sum(rows, zero, add, |row, k| item(row * 4 + k));
    for i in rows * 4..size {
        sums[0] = add(sums[0], item(i));
    }
    let [first, second, third, fourth] = sums;
    add(add(add(first, second), third), fourth)
}

/// PyTorch's `multi_row_sum`: four running sums over `rows` rows, accumulated in four levels,
/// a level carried into the next every `2^level_power` rows.
fn multi_row_sum<T: Copy>(rows: usize, zero: T, add: impl Fn(T, T) -> T, item: impl Fn(usize, usize) -> T) -> [T; 4] {
    const LEVELS: usize = 4;
    let ceil_log2 = if rows <= 1 {
        0
    } else {
        (usize::BITS - (rows - 1).leading_zeros()) as usize
    };
    let level_power = 4usize.max(ceil_log2 / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[zero; 4]; LEVELS];
    let mut row = 0;
    while row + level_step <= rows {
        for _ in 0..level_step {
            for (k, sum) in acc[0].iter_mut().enumerate() {
                *sum = add(*sum, item(row, k));
            }
            row += 1;
        }
        for level in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(level);
            for (sum, carried) in upper[0].iter_mut().zip(lower[level - 1].iter_mut()) {
                *sum = add(*sum, *carried);
                *carried = zero;
            }
            if row & (level_mask << (level * level_power)) != 0 {
                break;
            }
        }
    }
    while row < rows {
        for (k, sum) in acc[0].iter_mut().enumerate() {
            *sum = add(*sum, item(row, k));
        }
        row += 1;
    }
    let [mut total, higher @ ..] = acc;
    for level in higher {
        for (sum, value) in total.iter_mut().zip(level) {
            *sum = add(*sum, value);
        }
    }
    total
}

/// ComfyUI's `gaussian_kernel(size, sigma)`: `exp(−d²/(2σ²))` at the points of a
/// `size`×`size` grid spanning −1…1, divided by its sum; row-major float32.
pub(crate) fn gaussian_kernel(size: usize, sigma: f64) -> Vec<f32> {
    let positions = linspace_f32(-1.0, 1.0, size);
    let divisor = (2.0 * sigma * sigma) as f32;
    let weights: Vec<f32> = (0..size * size)
        .map(|n| {
            let (x, y) = (positions[n / size], positions[n % size]);
            let distance = (x * x + y * y).sqrt();
            (f64::from(-(distance * distance) / divisor)).exp() as f32
        })
        .collect();
    let total = torch_sum(&weights);
    weights.iter().map(|w| w / total).collect()
}

/// The kernel of ImageSharpen and LatentOperationSharpen: the Gaussian times `factor`
/// (−10·alpha), its centre then raised so that the kernel sums to one.
pub(crate) fn sharpen_kernel(size: usize, sigma: f64, factor: f64) -> Vec<f32> {
    let factor = factor as f32;
    let mut kernel: Vec<f32> = gaussian_kernel(size, sigma).iter().map(|w| w * factor).collect();
    let total = torch_sum(&kernel);
    let centre = (size / 2) * size + size / 2;
    kernel[centre] = kernel[centre] - total + 1.0;
    kernel
}

/// PyTorch's refusal to reflect-pad a dimension by as much as its size; `dims` is the NCHW shape
/// it sees.
pub(crate) fn check_reflect_padding(radius: usize, dims: [usize; 4]) -> Result<(), NodeError> {
    let shape = format!("[{}]", dims.map(|d| d.to_string()).join(", "));
    for (argument, dim) in [(4, 3), (6, 2)] {
        if radius >= dims[dim] {
            return Err(NodeError::typed(
                "RuntimeError",
                format!(
                    "Argument #{argument}: Padding size should be less than the corresponding input dimension, \
                     but got: padding ({radius}, {radius}) at dimension {dim} of input {shape}"
                ),
            ));
        }
    }
    Ok(())
}

/// One `height`×`width` plane reflect-padded by `radius` (`F.pad(…, 'reflect')`) and correlated
/// with the `(2·radius + 1)²` kernel, as ComfyUI's blur and sharpen call `F.conv2d`: each output
/// sums its window's products row by row from zero with fused multiply-adds, as oneDNN's kernels
/// do. [`check_reflect_padding`] first.
pub(crate) fn convolve_reflect(plane: &[f32], height: usize, width: usize, kernel: &[f32], radius: usize) -> Vec<f32> {
    let size = 2 * radius + 1;
    let padded_width = width + 2 * radius;
    let reflect = |position: usize, length: usize| -> usize {
        let offset = position as isize - radius as isize;
        if offset < 0 {
            (-offset) as usize
        } else if offset as usize >= length {
            2 * (length - 1) - offset as usize
        } else {
            offset as usize
        }
    };
    let mut padded = Vec::with_capacity((height + 2 * radius) * padded_width);
    for y in 0..height + 2 * radius {
        let row = &plane[reflect(y, height) * width..][..width];
        padded.extend((0..padded_width).map(|x| row[reflect(x, width)]));
    }
    let mut out = Vec::with_capacity(height * width);
    let mut acc = vec![0.0f32; width];
    for y in 0..height {
        acc.fill(0.0);
        for i in 0..size {
            let row = &padded[(y + i) * padded_width..][..padded_width];
            for j in 0..size {
                fused_multiply_add(&mut acc, &row[j..j + width], kernel[i * size + j]);
            }
        }
        out.extend_from_slice(&acc);
    }
    out
}

/// `acc[x] = source[x]·weight + acc[x]`, rounded once.
fn fused_multiply_add(acc: &mut [f32], source: &[f32], weight: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA.
        unsafe { fused_multiply_add_fma(acc, source, weight) };
        return;
    }
    for (a, &s) in acc.iter_mut().zip(source) {
        *a = s.mul_add(weight, *a);
    }
}

/// [`fused_multiply_add`] compiled for FMA, so that it vectorises instead of calling `fmaf`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma,avx2")]
unsafe fn fused_multiply_add_fma(acc: &mut [f32], source: &[f32], weight: f32) {
    for (a, &s) in acc.iter_mut().zip(source) {
        *a = s.mul_add(weight, *a);
    }
}

/// Every `[height, width]` plane of `image` (per item and channel) through `filter`, which
/// returns a plane of the same size.
fn map_planes(image: &Image, mut filter: impl FnMut(&[f32]) -> Vec<f32>) -> Image {
    let (h, w, c) = (image.height, image.width, image.channels);
    let mut out = image.clone();
    let mut plane = vec![0.0f32; h * w];
    for b in 0..image.batch {
        let frame = b * h * w * c;
        for channel in 0..c {
            for (p, value) in plane.iter_mut().enumerate() {
                *value = image.data[frame + p * c + channel];
            }
            for (p, value) in filter(&plane).into_iter().enumerate() {
                out.data[frame + p * c + channel] = value;
            }
        }
    }
    out
}

/// A size input (radius, kernel size) that must not be negative.
fn non_negative(inputs: &NodeInputs, name: &str) -> Result<usize, NodeError> {
    let value = inputs.int(name)?;
    usize::try_from(value).map_err(|_| NodeError::value(format!("{name} must not be negative, got {value}")))
}

/// Correlates every plane of `image` with `kernel` over reflect padding.
fn filter_image(image: &Image, kernel: &[f32], radius: usize) -> Result<Image, NodeError> {
    check_reflect_padding(radius, [image.batch, image.channels, image.height, image.width])?;
    Ok(map_planes(image, |plane| {
        convolve_reflect(plane, image.height, image.width, kernel, radius)
    }))
}

/// ImageBlend's `blend_mode`.
#[derive(Clone, Copy)]
enum BlendMode {
    Normal,
    Multiply,
    Screen,
    Overlay,
    SoftLight,
    Difference,
}

const BLEND_MODES: [&str; 6] = ["normal", "multiply", "screen", "overlay", "soft_light", "difference"];

impl BlendMode {
    fn parse(name: &str) -> Result<Self, NodeError> {
        Ok(match name {
            "normal" => BlendMode::Normal,
            "multiply" => BlendMode::Multiply,
            "screen" => BlendMode::Screen,
            "overlay" => BlendMode::Overlay,
            "soft_light" => BlendMode::SoftLight,
            "difference" => BlendMode::Difference,
            other => return Err(NodeError::value(format!("Unsupported blend mode: {other}"))),
        })
    }

    /// The blended value of `a` (image1) and `b` (image2), in float32 as PyTorch evaluates it.
    fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            BlendMode::Normal => b,
            BlendMode::Multiply => a * b,
            BlendMode::Screen => 1.0 - (1.0 - a) * (1.0 - b),
            BlendMode::Overlay if a <= 0.5 => 2.0 * a * b,
            BlendMode::Overlay => 1.0 - 2.0 * (1.0 - a) * (1.0 - b),
            BlendMode::SoftLight if b <= 0.5 => a - (1.0 - 2.0 * b) * a * (1.0 - a),
            BlendMode::SoftLight => {
                let g = if a <= 0.25 {
                    ((16.0 * a - 12.0) * a + 4.0) * a
                } else {
                    a.sqrt()
                };
                a + (2.0 * b - 1.0) * (g - a)
            }
            BlendMode::Difference => a - b,
        }
    }
}

/// `ImageBlend`: `image1·(1 − blend_factor) + blend_mode(image1, image2)·blend_factor`,
/// clamped to 0…1. image2 first loses channels image1 lacks (or image1 gains an opaque alpha), is
/// resized to image1 (bicubic, centre crop) when the shapes differ, and broadcasts over a batch
/// or channel dimension of size 1.
pub struct ImageBlend;

impl Node for ImageBlend {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("ImageBlend", MODULE, CATEGORY)
            .required("image1", InputSpec::of("IMAGE"))
            .required("image2", InputSpec::of("IMAGE"))
            .required("blend_factor", InputSpec::float(0.5, 0.0, 1.0).opt("step", 0.01))
            .required("blend_mode", InputSpec::combo_v3(&BLEND_MODES))
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let mut first = inputs.object::<Image>("image1")?.clone();
        let mut second = inputs.object::<Image>("image2")?.clone();
        let factor = inputs.float("blend_factor")?;
        let mode = BlendMode::parse(inputs.string("blend_mode")?)?;
        if first.channels < second.channels {
            second = second.first_channels(first.channels);
        } else if first.channels > second.channels {
            first = first.with_extra_channel(1.0);
        }
        let shape = |i: &Image| (i.batch, i.height, i.width, i.channels);
        if shape(&first) != shape(&second) {
            second = common_upscale(&second, first.width, first.height, ResizeMethod::Bicubic, true, true)?;
        }
        let batch = broadcast(first.batch, second.batch, 0)?;
        let channels = broadcast(first.channels, second.channels, 3)?;
        let (keep, weight) = ((1.0 - factor) as f32, factor as f32);
        let pixels = first.height * first.width;
        let mut data = Vec::with_capacity(batch * pixels * channels);
        for b in 0..batch {
            for p in 0..pixels {
                for c in 0..channels {
                    let at = |image: &Image| {
                        let item = if image.batch == 1 { 0 } else { b };
                        let channel = if image.channels == 1 { 0 } else { c };
                        image.data[(item * pixels + p) * image.channels + channel]
                    };
                    let (a, bv) = (at(&first), at(&second));
                    data.push((a * keep + mode.apply(a, bv) * weight).clamp(0.0, 1.0));
                }
            }
        }
        Ok(image_result(Image::new(
            batch,
            first.height,
            first.width,
            channels,
            data,
        )?))
    }
}

/// `ImageBlur`: a Gaussian blur of `2·blur_radius + 1` pixels square (the kernel spans ±1 at
/// the window's edges, so `sigma` is relative to the radius) over reflected borders.
pub struct ImageBlur;

impl Node for ImageBlur {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("ImageBlur", MODULE, CATEGORY)
            .required("image", InputSpec::of("IMAGE"))
            .required("blur_radius", InputSpec::int(1, 1, 31).opt("step", 1))
            .required("sigma", InputSpec::float(1.0, 0.1, 10.0).opt("step", 0.1))
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let radius = non_negative(inputs, "blur_radius")?;
        if radius == 0 {
            return Ok(image_result(image.clone()));
        }
        let kernel = gaussian_kernel(2 * radius + 1, inputs.float("sigma")?);
        Ok(image_result(filter_image(image, &kernel, radius)?))
    }
}

/// `ImageSharpen`: the image minus `10·alpha` times its Gaussian blur, plus that much of
/// itself (a kernel summing to one), clamped to 0…1.
pub struct ImageSharpen;

impl Node for ImageSharpen {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("ImageSharpen", MODULE, CATEGORY)
            .required("image", InputSpec::of("IMAGE"))
            .required("sharpen_radius", InputSpec::int(1, 1, 31).opt("step", 1))
            .required("sigma", InputSpec::float(1.0, 0.1, 10.0).opt("step", 0.01))
            .required("alpha", InputSpec::float(1.0, 0.0, 5.0).opt("step", 0.01))
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let radius = non_negative(inputs, "sharpen_radius")?;
        if radius == 0 {
            return Ok(image_result(image.clone()));
        }
        let alpha = inputs.float("alpha")?;
        let kernel = sharpen_kernel(2 * radius + 1, inputs.float("sigma")?, -(alpha * 10.0));
        let mut sharpened = filter_image(image, &kernel, radius)?;
        for value in &mut sharpened.data {
            *value = value.clamp(0.0, 1.0);
        }
        Ok(image_result(sharpened))
    }
}

/// The larger (`dilate`) or smaller of two values, NaN if either is, like `torch.maximum`.
fn extreme(a: f32, b: f32, dilate: bool) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if dilate {
        a.max(b)
    } else {
        a.min(b)
    }
}

/// The maximum (`dilate`) or minimum of `line` over each window `[i − before, i + after]`, the
/// part outside the line ignored (kornia's `geodesic` border); van Herk's running blocks.
fn running_extreme(line: &[f32], before: usize, after: usize, dilate: bool) -> Vec<f32> {
    let identity = if dilate { f32::NEG_INFINITY } else { f32::INFINITY };
    let size = before + after + 1;
    let padded: Vec<f32> = (0..line.len() + size - 1)
        .map(|j| {
            j.checked_sub(before)
                .and_then(|i| line.get(i))
                .copied()
                .unwrap_or(identity)
        })
        .collect();
    let (mut prefix, mut suffix) = (padded.clone(), padded.clone());
    for j in 1..padded.len() {
        if j % size != 0 {
            prefix[j] = extreme(prefix[j - 1], padded[j], dilate);
        }
    }
    for j in (0..padded.len() - 1).rev() {
        if (j + 1) % size != 0 {
            suffix[j] = extreme(suffix[j + 1], padded[j], dilate);
        }
    }
    (0..line.len())
        .map(|i| extreme(suffix[i], prefix[i + size - 1], dilate))
        .collect()
}

/// kornia's `dilation` (`dilate`) or `erosion` of a `height`×`width` plane with a flat
/// `size`×`size` kernel anchored at `size / 2`: the maximum or minimum over the window, rows then
/// columns. Dilation reflects the kernel, so an even window reaches one pixel further forward.
fn dilate_or_erode(plane: &[f32], height: usize, width: usize, size: usize, dilate: bool) -> Vec<f32> {
    let origin = size / 2;
    let (before, after) = if dilate {
        (size - 1 - origin, origin)
    } else {
        (origin, size - 1 - origin)
    };
    let mut rows = Vec::with_capacity(plane.len());
    for row in plane.chunks(width) {
        rows.extend(running_extreme(row, before, after, dilate));
    }
    let mut out = vec![0.0f32; plane.len()];
    let mut column = vec![0.0f32; height];
    for x in 0..width {
        for (y, value) in column.iter_mut().enumerate() {
            *value = rows[y * width + x];
        }
        for (y, value) in running_extreme(&column, before, after, dilate).into_iter().enumerate() {
            out[y * width + x] = value;
        }
    }
    out
}

const MORPHOLOGY_OPERATIONS: [&str; 7] = ["erode", "dilate", "open", "close", "gradient", "bottom_hat", "top_hat"];

/// `Morphology` ("ImageMorphology"): kornia's grey-scale morphology with a `kernel_size`
/// square of ones on every channel: erode, dilate, open (erode then dilate), close, gradient
/// (dilation − erosion), top_hat (image − opening) and bottom_hat (closing − image).
pub struct Morphology;

impl Node for Morphology {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("Morphology", "comfy_extras.nodes_morphology", CATEGORY)
            .display("ImageMorphology")
            .required("image", InputSpec::of("IMAGE"))
            .required("operation", InputSpec::combo_v3(&MORPHOLOGY_OPERATIONS))
            .required("kernel_size", InputSpec::int(3, 3, 999).opt("step", 1))
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let size = non_negative(inputs, "kernel_size")?.max(1);
        let operation = inputs.string("operation")?;
        if !MORPHOLOGY_OPERATIONS.contains(&operation) {
            return Err(NodeError::value(format!(
                "Invalid operation {operation} for morphology. Must be one of 'erode', 'dilate', 'open', \
                 'close', 'gradient', 'tophat', 'bottomhat'"
            )));
        }
        if image.data.is_empty() {
            return Ok(image_result(image.clone()));
        }
        let (h, w) = (image.height, image.width);
        let pass = |plane: &[f32], dilate: bool| dilate_or_erode(plane, h, w, size, dilate);
        let difference = |a: Vec<f32>, b: &[f32]| -> Vec<f32> { a.iter().zip(b).map(|(x, y)| x - y).collect() };
        Ok(image_result(map_planes(image, |plane| match operation {
            "erode" => pass(plane, false),
            "dilate" => pass(plane, true),
            "open" => pass(&pass(plane, false), true),
            "close" => pass(&pass(plane, true), false),
            "gradient" => difference(pass(plane, true), &pass(plane, false)),
            "top_hat" => {
                let opened = pass(&pass(plane, false), true);
                difference(plane.to_vec(), &opened)
            }
            _ => difference(pass(&pass(plane, true), false), plane),
        })))
    }
}

/// Pillow's colour hash (`PIXEL_HASH`) of a colour with `scale` low bits dropped; the median
/// cut counts colours by it, so colours with the same hash count as one.
fn pixel_hash([r, g, b]: [u8; 3], scale: u32) -> u32 {
    let (r, g, b) = (u32::from(r >> scale), u32::from(g >> scale), u32::from(b >> scale));
    r.wrapping_mul(463) ^ (g << 8).wrapping_mul(10069) ^ (b << 16).wrapping_mul(64997)
}

/// The most distinct colours Pillow's median cut counts before dropping a bit of each channel.
const MAX_HASH_ENTRIES: usize = 65536;

/// A box of Pillow's median cut: its colours (indices into the colour list) and pixel count.
struct ColourBox {
    colours: Vec<usize>,
    pixels: u32,
    children: Option<(usize, usize)>,
}

/// Pillow's box order (`box_heap_cmp`): by pixel count, as a C `int` difference.
fn box_order(boxes: &[ColourBox], a: usize, b: usize) -> i32 {
    (boxes[a].pixels as i32).wrapping_sub(boxes[b].pixels as i32)
}

/// Pillow's quantizer heap (`QuantHeap.c`): 1-based, the largest box on top.
struct BoxHeap(Vec<usize>);

impl BoxHeap {
    fn push(&mut self, boxes: &[ColourBox], value: usize) {
        self.0.push(value);
        let mut k = self.0.len() - 1;
        while k != 1 {
            if box_order(boxes, value, self.0[k / 2]) <= 0 {
                break;
            }
            self.0[k] = self.0[k / 2];
            k >>= 1;
        }
        self.0[k] = value;
    }

    fn pop(&mut self, boxes: &[ColourBox]) -> Option<usize> {
        if self.0.len() <= 1 {
            return None;
        }
        let top = self.0[1];
        let last = self.0.pop()?;
        let count = self.0.len() - 1;
        let mut k = 1;
        while k * 2 <= count {
            let mut l = k * 2;
            if l < count && box_order(boxes, self.0[l], self.0[l + 1]) < 0 {
                l += 1;
            }
            if box_order(boxes, last, self.0[l]) > 0 {
                break;
            }
            self.0[k] = self.0[l];
            k = l;
        }
        if k <= count {
            self.0[k] = last;
        }
        Some(top)
    }
}

/// Pillow's median-cut palette (`Image.quantize(colors)` on an RGB image, `Quant.c`): colours
/// counted by hash (a low bit of each channel dropped while there are more than 65536), boxes
/// split at the median of their widest luminance-weighted channel, largest box first, until
/// `colors` boxes; each palette entry the rounded mean of its box's pixels.
fn median_cut_palette(pixels: &[[u8; 3]], colors: usize) -> Result<Vec<[u8; 3]>, NodeError> {
    // Distinct colours by hash: the first pixel seen stands for its entry.
    let mut scale = 0u32;
    let mut index: HashMap<u32, usize> = HashMap::new();
    let mut entries: Vec<([u8; 3], u32)> = Vec::new();
    for &pixel in pixels {
        match index.get(&pixel_hash(pixel, scale)) {
            Some(&i) => entries[i].1 += 1,
            None => {
                index.insert(pixel_hash(pixel, scale), entries.len());
                entries.push((pixel, 1));
            }
        }
        while entries.len() > MAX_HASH_ENTRIES {
            scale += 1;
            index.clear();
            for (colour, count) in std::mem::take(&mut entries) {
                match index.get(&pixel_hash(colour, scale)) {
                    Some(&i) => entries[i].1 += count,
                    None => {
                        index.insert(pixel_hash(colour, scale), entries.len());
                        entries.push((colour, count));
                    }
                }
            }
        }
    }
    let colours: Vec<[u8; 3]> = entries.iter().map(|(c, _)| c.map(|v| v >> scale)).collect();
    let counts: Vec<u32> = entries.iter().map(|(_, n)| *n).collect();

    let mut boxes = vec![ColourBox {
        colours: (0..colours.len()).collect(),
        pixels: pixels.len() as u32,
        children: None,
    }];
    let mut heap = BoxHeap(vec![usize::MAX]);
    heap.push(&boxes, 0);
    'cut: for _ in 1..colors {
        let node = loop {
            let Some(node) = heap.pop(&boxes) else {
                break 'cut;
            };
            if box_volume(&colours, &boxes[node].colours) != 1 {
                break node;
            }
        };
        let (left, right) = split_box(&colours, &counts, &boxes[node]);
        let first = boxes.len();
        boxes.push(left);
        boxes.push(right);
        boxes[node].children = Some((first, first + 1));
        heap.push(&boxes, first);
        heap.push(&boxes, first + 1);
    }

    // Palette entries: the leaves, left before right.
    let mut box_of_entry = vec![0usize; colours.len()];
    let mut leaves = 0;
    let mut stack = vec![0usize];
    while let Some(node) = stack.pop() {
        match boxes[node].children {
            Some((left, right)) => {
                stack.push(right);
                stack.push(left);
            }
            None => {
                for &colour in &boxes[node].colours {
                    box_of_entry[colour] = leaves;
                }
                leaves += 1;
            }
        }
    }
    let mut sums = vec![[0u32; 3]; leaves];
    let mut members = vec![0u32; leaves];
    for &pixel in pixels {
        // A pixel counted under a colour it only shared a hash with may have lost it when a bit
        // was dropped; Pillow fails there too.
        let entry = index
            .get(&pixel_hash(pixel, scale))
            .ok_or_else(|| NodeError::value("quantization error"))?;
        let leaf = box_of_entry[*entry];
        for (sum, value) in sums[leaf].iter_mut().zip(pixel) {
            *sum = sum.wrapping_add(u32::from(value));
        }
        members[leaf] = members[leaf].wrapping_add(1);
    }
    Ok(sums
        .iter()
        .zip(&members)
        .map(|(sum, &count)| sum.map(|s| (0.5 + f64::from(s) / f64::from(count)) as i32 as u8))
        .collect())
}

/// `(high − low + 1)` multiplied over the channels of a box's colours.
fn box_volume(colours: &[[u8; 3]], members: &[usize]) -> i32 {
    let (low, high) = channel_ranges(colours, members);
    (0..3).map(|c| i32::from(high[c]) - i32::from(low[c]) + 1).product()
}

fn channel_ranges(colours: &[[u8; 3]], members: &[usize]) -> ([u8; 3], [u8; 3]) {
    let mut low = [u8::MAX; 3];
    let mut high = [0u8; 3];
    for &m in members {
        for c in 0..3 {
            low[c] = low[c].min(colours[m][c]);
            high[c] = high[c].max(colours[m][c]);
        }
    }
    (low, high)
}

/// Pillow's `split`: along the channel of the largest `range × (77, 150, 29)` (the first on
/// ties), the colours at or above the value where the cumulative pixel count (from the top)
/// passes half go left, the rest right; when none would go right, the lowest value does.
fn split_box(colours: &[[u8; 3]], counts: &[u32], node: &ColourBox) -> (ColourBox, ColourBox) {
    let (low, high) = channel_ranges(colours, &node.colours);
    let weights = [77, 150, 29];
    let mut axis = 0;
    let mut best = (i32::from(high[0]) - i32::from(low[0])) * weights[0];
    for c in 1..3 {
        let f = (i32::from(high[c]) - i32::from(low[c])) * weights[c];
        if best < f {
            best = f;
            axis = c;
        }
    }
    let mut sorted = node.colours.clone();
    sorted.sort_by(|a, b| colours[*b][axis].cmp(&colours[*a][axis]));
    let mut cumulative = 0u32;
    let mut split_value = None;
    for &m in &sorted {
        cumulative = cumulative.wrapping_add(counts[m]);
        if cumulative.wrapping_mul(2) > node.pixels {
            split_value = Some(colours[m][axis]);
            break;
        }
    }
    // At or above the split value, unless that leaves nothing below it: then above the lowest.
    let threshold = match split_value {
        Some(split) if split > low[axis] => split,
        _ => low[axis] + 1,
    };
    let goes_left = |m: usize| colours[m][axis] >= threshold;
    let (left, right): (Vec<usize>, Vec<usize>) = node.colours.iter().partition(|&&m| goes_left(m));
    let total = |members: &[usize]| members.iter().fold(0u32, |t, &m| t.wrapping_add(counts[m]));
    let side = |colours: Vec<usize>| ColourBox {
        pixels: total(&colours),
        colours,
        children: None,
    };
    (side(left), side(right))
}

/// Pillow's palette lookup when converting RGB to a palette image (`ImagingPaletteCacheUpdate`):
/// the entry nearest (squared distance, lowest index on ties) to the colour with its two low
/// bits cleared, cached per 6-bit colour.
struct PaletteLookup<'a> {
    palette: &'a [[u8; 3]],
    cache: Vec<i16>,
}

impl<'a> PaletteLookup<'a> {
    fn new(palette: &'a [[u8; 3]]) -> Self {
        PaletteLookup {
            palette,
            cache: vec![-1; 64 * 64 * 64],
        }
    }

    fn nearest(&mut self, [r, g, b]: [u8; 3]) -> usize {
        let slot = usize::from(r >> 2) + usize::from(g >> 2) * 64 + usize::from(b >> 2) * 4096;
        if self.cache[slot] < 0 {
            let corner = [r & 0xfc, g & 0xfc, b & 0xfc];
            let distance = |entry: &[u8; 3]| -> i32 {
                (0..3)
                    .map(|c| (i32::from(corner[c]) - i32::from(entry[c])).pow(2))
                    .sum()
            };
            let mut best = 0;
            for (i, entry) in self.palette.iter().enumerate() {
                if distance(entry) < distance(&self.palette[best]) {
                    best = i;
                }
            }
            self.cache[slot] = best as i16;
        }
        self.cache[slot] as usize
    }
}

/// Pillow's Floyd–Steinberg conversion to a palette (`topalette_colour_floyd_steinberg`):
/// integer errors, 7/16 to the right and 3/16, 5/16, 1/16 to the row below, each sum divided by
/// 16 towards zero. As in Pillow, the last column of each row receives the blue channel's
/// errors in all three channels.
fn floyd_steinberg(pixels: &[[u8; 3]], width: usize, lookup: &mut PaletteLookup) -> Vec<usize> {
    let mut out = Vec::with_capacity(pixels.len());
    // errors[j]: what the row above left for column j − 1.
    let mut errors = vec![[0i32; 3]; width + 1];
    for row in pixels.chunks(width) {
        // 7·error of the pixel to the left; 5·error + the error before it (for the next column
        // below); the error of the pixel to the left.
        let (mut right, mut below, mut previous) = ([0i32; 3], [0i32; 3], [0i32; 3]);
        for (x, pixel) in row.iter().enumerate() {
            let mut colour = [0u8; 3];
            for c in 0..3 {
                let value = i32::from(pixel[c]) + (right[c] + errors[x + 1][c]) / 16;
                colour[c] = value.clamp(0, 255) as u8;
            }
            let index = lookup.nearest(colour);
            out.push(index);
            for c in 0..3 {
                let error = i32::from(colour[c]) - i32::from(lookup.palette[index][c]);
                errors[x][c] = 3 * error + below[c];
                below[c] = 5 * error + previous[c];
                previous[c] = error;
                right[c] = 7 * error;
            }
        }
        errors[row.len()] = [below[2], previous[2], previous[2]];
    }
    out
}

/// ComfyUI's normalised Bayer matrix of size `2^level`, as numpy computes it in float32.
fn bayer_matrix(level: u32) -> Vec<f32> {
    let mut matrix = vec![0.0f32];
    for n in 1..=level {
        let q = 4f32.powi(n as i32);
        let half = 1usize << (n - 1);
        let size = half * 2;
        let mut next = vec![0.0f32; size * size];
        for y in 0..size {
            for x in 0..size {
                let m = q * matrix[(y % half) * half + x % half];
                let offset = match (y < half, x < half) {
                    (true, true) => -1.5,
                    (true, false) => 0.5,
                    (false, true) => 1.5,
                    (false, false) => -0.5,
                };
                next[y * size + x] = (m + offset) / q;
            }
        }
        matrix = next;
    }
    matrix
}

const DITHERS: [&str; 6] = ["none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16"];

/// `ImageQuantize`: each image reduced to a palette of at most `colors` colours by Pillow's
/// median cut, then mapped to it with no dithering, Floyd–Steinberg, or an ordered Bayer
/// pattern added first (its spread `512 / palette size`).
pub struct ImageQuantize;

impl Node for ImageQuantize {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("ImageQuantize", MODULE, CATEGORY)
            .required("image", InputSpec::of("IMAGE"))
            .required("colors", InputSpec::int(256, 1, 256).opt("step", 1))
            .required("dither", InputSpec::combo_v3(&DITHERS))
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        if image.channels != 3 {
            return Err(NodeError::value(format!(
                "ImageQuantize takes RGB images (3 channels), got {} channels",
                image.channels
            )));
        }
        let colors = inputs.int("colors")?;
        if !(1..=256).contains(&colors) {
            return Err(NodeError::value("bad number of colors"));
        }
        let dither = inputs.string("dither")?;
        let bayer_level = match dither {
            "none" | "floyd-steinberg" => None,
            other => match other.strip_prefix("bayer-").and_then(|o| o.parse::<u32>().ok()) {
                Some(order) if order.is_power_of_two() => Some(order.trailing_zeros()),
                _ => return Err(NodeError::value(format!("unknown dither {other}"))),
            },
        };
        let mut out = image.clone();
        if image.data.is_empty() {
            return Ok(image_result(out));
        }
        let frame_len = image.frame_len();
        for b in 0..image.batch {
            // `(image * 255).to(torch.uint8)`: truncation, wrapping outside 0..255.
            let pixels: Vec<[u8; 3]> = image
                .frame(b)
                .chunks(3)
                .map(|p| [0, 1, 2].map(|c| (p[c] * 255.0) as i32 as u8))
                .collect();
            let palette = median_cut_palette(&pixels, colors as usize)?;
            let mut lookup = PaletteLookup::new(&palette);
            let indices: Vec<usize> = match bayer_level {
                None if dither == "none" => pixels.iter().map(|&p| lookup.nearest(p)).collect(),
                None => floyd_steinberg(&pixels, image.width, &mut lookup),
                Some(level) => {
                    let spread = (2.0 * 256.0 / palette.len() as f64) as f32;
                    let matrix = bayer_matrix(level);
                    let size = 1usize << level;
                    pixels
                        .iter()
                        .enumerate()
                        .map(|(i, p)| {
                            let (y, x) = (i / image.width, i % image.width);
                            let offset = spread * matrix[(y % size) * size + x % size] + 0.5;
                            let colour = p.map(|v| (f32::from(v) + offset).clamp(0.0, 255.0) as u8);
                            lookup.nearest(colour)
                        })
                        .collect()
                }
            };
            let frame = &mut out.data[b * frame_len..(b + 1) * frame_len];
            for (pixel, index) in frame.chunks_mut(3).zip(indices) {
                for (value, channel) in pixel.iter_mut().zip(palette[index]) {
                    *value = from_u8(channel);
                }
            }
        }
        Ok(image_result(out))
    }
}
