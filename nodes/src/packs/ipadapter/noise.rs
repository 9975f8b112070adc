//! `IPAdapterNoise`: the pack's noise image for negative image prompts, drawn as the pack draws
//! it with torch's global generator.
//!
//! The image (black without one) is made a 224² square (centre crop, antialiased bicubic); the
//! sum of its values, truncated, modulo 1 000 000 007 seeds the generator. Then `fade` mixes in
//! uniform noise, `dissolve` swaps pixels for it, `gaussian` adds normal noise, and `shuffle`
//! warps the image (torchvision's ElasticTransform: a blurred random displacement field applied
//! with bilinear `grid_sample`, zero outside, times the warped coverage), flips it both ways and
//! mixes in normal noise; the result is clamped to 0…1 and optionally blurred (torchvision's
//! `gaussian_blur`).
//!
//! The order of the draws follows the tensors' memory: the square image stays row-major
//! (torchvision keeps ComfyUI's channels-last layout), shuffle's warped image is channel-planar
//! (`grid_sample` writes [B, C, H, W]); torch fills such a permuted view's normal noise one
//! `normal_distribution<double>` value at a time, a contiguous tensor's by its vectorised
//! Box–Muller. As in [`crate::image::filters`], `exp` is rounded
//! correctly where PyTorch uses MKL's, so blurred results may differ in the last bits.

use candle_core::{Device, Tensor};
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use easel_models::sampling::noise::{set_global_generator, CpuGenerator};
use easel_models::sampling::schedule::linspace_f32;

use super::nodes::{square_resized, MODULE};
use crate::image::filters::{check_reflect_padding, convolve_reflect, torch_sum};
use crate::image::{transposed, Image};
use crate::runtime::tensor_error;

/// The side of the noise image (CLIP vision's input).
const SIDE: usize = 224;
const TYPES: [&str; 4] = ["fade", "dissolve", "gaussian", "shuffle"];

/// Images of `channels` planes of SIDE², `batch` of them, in one of two memory orders.
struct Planes {
    batch: usize,
    channels: usize,
    /// Channel-planar ([B, C, H, W]) rather than row-major ([B, H, W, C]).
    planar: bool,
    data: Vec<f32>,
}

impl Planes {
    /// The pack's `image`: `image_optional` made square, or one black image.
    fn of(image: Option<&Image>) -> Result<Planes, NodeError> {
        let Some(image) = image else {
            return Ok(Planes {
                batch: 1,
                channels: 3,
                planar: false,
                data: vec![0.0; SIDE * SIDE * 3],
            });
        };
        let shape = (image.batch, image.height, image.width, image.channels);
        let square = Tensor::from_slice(&image.data, shape, &Device::Cpu)
            .and_then(|images| images.permute((0, 3, 1, 2)))
            .and_then(|images| square_resized(&images, SIDE))
            .and_then(|square| square.permute((0, 2, 3, 1))?.flatten_all()?.to_vec1::<f32>())
            .map_err(tensor_error)?;
        Ok(Planes {
            batch: image.batch,
            channels: image.channels,
            planar: false,
            data: square,
        })
    }

    /// Each [SIDE, SIDE] plane, in [B, C] order.
    fn planes_mut(&mut self) -> impl Iterator<Item = &mut [f32]> {
        self.make_planar();
        self.data.chunks_exact_mut(SIDE * SIDE)
    }

    fn make_planar(&mut self) {
        if !self.planar {
            self.data = transposed(&self.data, self.batch, SIDE * SIDE, self.channels);
            self.planar = true;
        }
    }

    /// torch's normal noise for a tensor of this layout.
    fn randn_like(&self, generator: &mut CpuGenerator) -> Vec<f32> {
        match self.planar {
            true => generator.randn_serial(self.data.len()),
            false => generator.randn(self.data.len()),
        }
    }

    fn into_image(mut self) -> Result<Image, NodeError> {
        if self.planar {
            self.data = transposed(&self.data, self.batch, self.channels, SIDE * SIDE);
        }
        Image::new(self.batch, SIDE, SIDE, self.channels, self.data)
    }
}

/// torchvision's `_get_gaussian_kernel1d`: `exp(−x²/(2σ²))` at `size` points from −(size−1)/2
/// to (size−1)/2, over its sum.
fn gaussian_kernel_1d(size: usize, sigma: f64) -> Vec<f32> {
    let half = (size as f64 - 1.0) * 0.5;
    let sigma = sigma as f32;
    let pdf: Vec<f32> = linspace_f32(-half as f32, half as f32, size)
        .into_iter()
        .map(|x| {
            let scaled = x / sigma;
            f64::from(-0.5 * (scaled * scaled)).exp() as f32
        })
        .collect();
    let total = torch_sum(&pdf);
    pdf.iter().map(|p| p / total).collect()
}

/// torchvision's `gaussian_blur(img, [size, size], [sigma, sigma])` of every plane: the outer
/// product of the 1-D kernels, reflect padding, one 2-D correlation.
fn gaussian_blur(planes: &mut Planes, size: usize, sigma: f64) -> Result<(), NodeError> {
    let line = gaussian_kernel_1d(size, sigma);
    let kernel: Vec<f32> = line.iter().flat_map(|y| line.iter().map(move |x| y * x)).collect();
    let radius = size / 2;
    check_reflect_padding(radius, [planes.batch, planes.channels, SIDE, SIDE])?;
    for plane in planes.planes_mut() {
        let blurred = convolve_reflect(plane, SIDE, SIDE, &kernel, radius);
        plane.copy_from_slice(&blurred);
    }
    Ok(())
}

/// One displacement axis of ElasticTransform's `get_params`: uniform in −1…1, blurred when
/// `sigma` > 0, times `alpha / size`.
fn displacement(generator: &mut CpuGenerator, sigma: f64, alpha: f32) -> Result<Vec<f32>, NodeError> {
    let mut field = Planes {
        batch: 1,
        channels: 1,
        planar: true,
        data: generator.rand(SIDE * SIDE).iter().map(|u| u * 2.0 - 1.0).collect(),
    };
    if sigma > 0.0 {
        // torchvision makes an even kernel size odd.
        let size = (8.0 * sigma + 1.0) as usize | 1;
        gaussian_blur(&mut field, size, sigma)?;
    }
    Ok(field.data.iter().map(|d| d * alpha / SIDE as f32).collect())
}

/// `grid_sample(…, bilinear, zeros, align_corners=False)` of one plane at the grid's points
/// (`x`, `y` in −1…1), each output also returned with its in-bounds weight (the warped
/// coverage).
fn sample_bilinear(plane: &[f32], x: f32, y: f32) -> (f32, f32) {
    let scale = SIDE as f32 / 2.0;
    let (x, y) = ((x + 1.0) * scale - 0.5, (y + 1.0) * scale - 0.5);
    let (west, north) = (x.floor(), y.floor());
    let (w, n) = (x - west, y - north);
    let (e, s) = (1.0 - w, 1.0 - n);
    let corners = [
        (west, north, s * e),
        (west + 1.0, north, s * w),
        (west, north + 1.0, n * e),
        (west + 1.0, north + 1.0, n * w),
    ];
    let inside = |cx: f32, cy: f32| cx >= 0.0 && cy >= 0.0 && cx < SIDE as f32 && cy < SIDE as f32;
    let mut value = 0.0f32;
    let mut coverage = 0.0f32;
    for (index, (cx, cy, weight)) in corners.into_iter().enumerate() {
        let (level, one) = match inside(cx, cy) {
            true => (plane[cy as usize * SIDE + cx as usize], 1.0),
            false => (0.0, 0.0),
        };
        if index == 0 {
            value = level * weight;
            coverage = one * weight;
        } else {
            value += level * weight;
            coverage += one * weight;
        }
    }
    (value, coverage)
}

/// The shuffle transforms: ElasticTransform(alpha 75, sigma), then both flips (each a draw).
fn shuffle(planes: &mut Planes, generator: &mut CpuGenerator, sigma: f64) -> Result<(), NodeError> {
    const ALPHA: f32 = 75.0;
    let dx = displacement(generator, sigma, ALPHA)?;
    let dy = displacement(generator, sigma, ALPHA)?;
    let end = ((SIDE as f64 - 1.0) / SIDE as f64) as f32;
    let identity = linspace_f32(-end, end, SIDE);
    let grid: Vec<(f32, f32)> = (0..SIDE * SIDE)
        .map(|i| (identity[i % SIDE] + dx[i], identity[i / SIDE] + dy[i]))
        .collect();
    // RandomVerticalFlip(p=1) and RandomHorizontalFlip(p=1) each draw `torch.rand(1)`.
    generator.rand(2);
    for plane in planes.planes_mut() {
        let warped: Vec<f32> = grid
            .iter()
            .map(|&(x, y)| {
                let (value, coverage) = sample_bilinear(plane, x, y);
                value * coverage
            })
            .collect();
        for (i, value) in plane.iter_mut().enumerate() {
            let (row, column) = (i / SIDE, i % SIDE);
            *value = warped[(SIDE - 1 - row) * SIDE + (SIDE - 1 - column)];
        }
    }
    Ok(())
}

/// `IPAdapterNoise`.
pub struct IpAdapterNoise;

impl Node for IpAdapterNoise {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("IPAdapterNoise", MODULE, "ipadapter/utils")
            .display("IPAdapter Noise")
            .required("type", InputSpec::combo(&TYPES))
            .required(
                "strength",
                InputSpec::of("FLOAT")
                    .opt("default", 1.0)
                    .opt("min", 0)
                    .opt("max", 1)
                    .opt("step", 0.05),
            )
            .required("blur", InputSpec::int(0, 0, 32).opt("step", 1))
            .optional("image_optional", InputSpec::of("IMAGE"))
            .output(OutputSpec::of("IMAGE").named("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let kind = inputs.string("type")?;
        let strength = inputs.float("strength")?;
        let blur = usize::try_from(inputs.int("blur")?).unwrap_or(0);
        let mut planes = Planes::of(inputs.optional_object::<Image>("image_optional")?)?;
        let seed = (f64::from(torch_sum(&planes.data)).trunc() as i64).rem_euclid(1_000_000_007);
        let mut generator = CpuGenerator::new(seed as u64);
        let mixed: Vec<f32> = match kind {
            "fade" => {
                let noise = generator.rand(planes.data.len());
                let (keep, add) = ((1.0 - strength) as f32, strength as f32);
                planes.data.iter().zip(noise).map(|(v, n)| v * keep + n * add).collect()
            }
            "dissolve" => {
                let threshold = strength as f32;
                let mask = generator.rand(planes.data.len());
                let noise = generator.rand(planes.data.len());
                let swaps = mask.iter().map(|&m| if m < threshold { 1.0f32 } else { 0.0 });
                planes
                    .data
                    .iter()
                    .zip(swaps.zip(noise))
                    .map(|(v, (m, n))| v * (1.0 - m) + n * m)
                    .collect()
            }
            "gaussian" => {
                let noise = planes.randn_like(&mut generator);
                let scale = strength as f32;
                planes.data.iter().zip(noise).map(|(v, n)| v + n * scale).collect()
            }
            "shuffle" => {
                shuffle(&mut planes, &mut generator, (1.0 - strength) * 3.5)?;
                let scale = (strength * 0.75) as f32;
                let noise = planes.randn_like(&mut generator);
                planes
                    .data
                    .iter()
                    .zip(noise)
                    .map(|(v, n)| {
                        let n = n * scale;
                        v * (1.0 - n) + n
                    })
                    .collect()
            }
            other => return Err(NodeError::value(format!("unknown noise type '{other}'"))),
        };
        planes.data = mixed.into_iter().map(|v| v.clamp(0.0, 1.0)).collect();
        if blur > 0 {
            let size = blur | 1;
            gaussian_blur(&mut planes, size, size as f64 * 0.15 + 0.35)?;
        }
        // The pack seeded torch's global generator; later global draws go on from here.
        set_global_generator(generator);
        Ok(NodeOutput::values(vec![Value::object(planes.into_image()?)]))
    }
}
