//! WAS Node Suite (`custom_nodes.was-node-suite-comfyui`): "Image Blending Mode", the CSS blend
//! modes the relight route uses to carry the subject's colours back onto the relit picture.
//!
//! The suite blends with pilgram on 8-bit Pillow images, and this module follows it level for
//! level: each image quantised as the suite's `tensor2pil` does (truncated), blended in pilgram's
//! arithmetic (Pillow's integer `ImageChops`, its float32 `ImageMath` for the dodge and the
//! non-separable modes, its `convert("L")` luma and truncating float-to-8-bit conversion), then
//! mixed with `image_a` by `blend_percentage` as `Image.composite` does with a constant mask.

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, NodeRegistry, Services, Value};

use crate::image::{from_u8, to_u8, Image};

/// The pack's module name, as ComfyUI names a custom node pack's module.
const MODULE: &str = "custom_nodes.was-node-suite-comfyui";

/// The node's modes, in its order.
pub const BLEND_MODES: [&str; 14] = [
    "add",
    "color",
    "color_burn",
    "color_dodge",
    "darken",
    "difference",
    "exclusion",
    "hard_light",
    "hue",
    "lighten",
    "multiply",
    "overlay",
    "screen",
    "soft_light",
];

/// Adds the pack's nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    registry.register(ImageBlendingMode);
}

/// A CSS blend mode as pilgram computes it, `a` the backdrop and `b` the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlendMode {
    /// The suite's "add" is pilgram's `normal`: the source.
    Normal,
    Color,
    ColorBurn,
    ColorDodge,
    Darken,
    Difference,
    Exclusion,
    HardLight,
    Hue,
    Lighten,
    Multiply,
    Overlay,
    Screen,
    SoftLight,
}

impl BlendMode {
    /// The mode the node's `mode` names.
    pub fn parse(name: &str) -> Option<BlendMode> {
        Some(match name {
            "add" => BlendMode::Normal,
            "color" => BlendMode::Color,
            "color_burn" => BlendMode::ColorBurn,
            "color_dodge" => BlendMode::ColorDodge,
            "darken" => BlendMode::Darken,
            "difference" => BlendMode::Difference,
            "exclusion" => BlendMode::Exclusion,
            "hard_light" => BlendMode::HardLight,
            "hue" => BlendMode::Hue,
            "lighten" => BlendMode::Lighten,
            "multiply" => BlendMode::Multiply,
            "overlay" => BlendMode::Overlay,
            "screen" => BlendMode::Screen,
            "soft_light" => BlendMode::SoftLight,
            _ => return None,
        })
    }

    /// One pixel blended: backdrop `a`, source `b`.
    pub fn blend(self, a: [u8; 3], b: [u8; 3]) -> [u8; 3] {
        match self {
            BlendMode::Color => color(a, b),
            BlendMode::Hue => hue(a, b),
            separable => [0, 1, 2].map(|c| separable.blend_channel(a[c], b[c])),
        }
    }

    /// One channel of a separable mode.
    fn blend_channel(self, a: u8, b: u8) -> u8 {
        match self {
            BlendMode::Normal => b,
            BlendMode::Multiply => multiply(a, b),
            BlendMode::Screen => screen(a, b),
            BlendMode::Darken => a.min(b),
            BlendMode::Lighten => a.max(b),
            BlendMode::Difference => a.abs_diff(b),
            // numpy's uint8 subtraction.
            BlendMode::Exclusion => screen(a, b).wrapping_sub(multiply(a, b)),
            BlendMode::HardLight => hard_light(a, b),
            BlendMode::Overlay => hard_light(b, a),
            BlendMode::SoftLight => soft_light(a, b),
            BlendMode::ColorDodge => color_dodge(a, b),
            BlendMode::ColorBurn => color_burn(a, b),
            BlendMode::Color | BlendMode::Hue => b,
        }
    }
}

/// `ImageChops.multiply`.
fn multiply(a: u8, b: u8) -> u8 {
    (u32::from(a) * u32::from(b) / 255) as u8
}

/// `ImageChops.screen`.
fn screen(a: u8, b: u8) -> u8 {
    (255 - (255 - u32::from(a)) * (255 - u32::from(b)) / 255) as u8
}

/// `2·v` and `2·v − 255`, clipped to 8 bits (pilgram's look-up tables).
fn twice(v: u8) -> u8 {
    (2 * u32::from(v)).min(255) as u8
}

fn twice_less_one(v: u8) -> u8 {
    (2 * i32::from(v) - 255).clamp(0, 255) as u8
}

fn hard_light(a: u8, b: u8) -> u8 {
    if b < 128 {
        multiply(a, twice(b))
    } else {
        screen(a, twice_less_one(b))
    }
}

/// pilgram's soft light, from its four look-up tables.
fn soft_light(a: u8, b: u8) -> u8 {
    let level = f64::from(a);
    let backdrop_term = (level * (1.0 - level / 255.0)).clamp(0.0, 255.0).round_ties_even() as u8;
    let darker = i32::from(a) - i32::from(multiply((255 - 2 * i32::from(b)).clamp(0, 255) as u8, backdrop_term));
    let fraction = level / 255.0;
    let d = if fraction <= 0.25 {
        ((16.0 * fraction - 12.0) * fraction + 4.0) * fraction
    } else {
        fraction.sqrt()
    };
    let lift = ((d - fraction) * 255.0).round_ties_even() as u8;
    let lighter = i32::from(a) + i32::from(multiply(twice_less_one(b), lift));
    if b <= 128 {
        darker.max(0) as u8
    } else {
        lighter.min(255) as u8
    }
}

/// Pillow's `ImageMath` division: zero where the divisor is zero.
fn divide(numerator: f32, denominator: f32) -> f32 {
    if denominator != 0.0 {
        numerator / denominator
    } else {
        0.0
    }
}

/// Pillow's float-to-8-bit conversion: clipped, truncated.
fn float_to_level(value: f32) -> u8 {
    if value <= 0.0 {
        0
    } else if value >= 255.0 {
        255
    } else {
        value as u8
    }
}

fn color_dodge(a: u8, b: u8) -> u8 {
    let inverse = f32::from(255 - b);
    let saturated = if a != 0 && inverse == 0.0 { 1.0 } else { 0.0 };
    float_to_level((saturated + divide(f32::from(a), inverse)) * 255.0)
}

/// In `ImageMath`'s 32-bit integers (C division, truncating).
fn color_burn(a: u8, b: u8) -> u8 {
    if a == 255 {
        255
    } else if b > 0 {
        (255 - (255 - i32::from(a)) * 255 / i32::from(b)).clamp(0, 255) as u8
    } else {
        0
    }
}

/// Pillow's `convert("L")`: ITU-R 601-2 luma in 16-bit fixed point, rounded.
fn pillow_luma(c: [u8; 3]) -> f32 {
    let [r, g, b] = c.map(u32::from);
    ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as f32
}

/// The W3C `Lum`, in float32 as pilgram writes it.
fn lum(c: [f32; 3]) -> f32 {
    c[0] * 0.3 + c[1] * 0.59 + c[2] * 0.11
}

fn max3(c: [f32; 3]) -> f32 {
    c[0].max(c[1]).max(c[2])
}

fn min3(c: [f32; 3]) -> f32 {
    c[0].min(c[1]).min(c[2])
}

/// pilgram's `ClipColor` (its low and high corrections both measured on the unclipped colour).
fn clip_color(c: [f32; 3]) -> [f32; 3] {
    let (l, low, high) = (lum(c), min3(c), max3(c));
    c.map(|v| {
        let v = if low < 0.0 { divide(l * (v - low), l - low) } else { v };
        if high > 255.0 {
            l + divide((v - l) * (255.0 - l), high - l)
        } else {
            v
        }
    })
}

/// pilgram's `SetSat`: the middle channel (every channel equal to it) scaled, the largest set
/// to `s`, the rest zero.
fn set_sat(c: [f32; 3], s: f32) -> [f32; 3] {
    let (high, low) = (max3(c), min3(c));
    let mid = c[0] + c[1] + c[2] - high - low;
    let scaled_mid = divide((mid - low) * s, high - low);
    c.map(|v| {
        if high <= low {
            0.0
        } else if v == high {
            s
        } else if v == mid {
            scaled_mid
        } else {
            0.0
        }
    })
}

/// `color`: the source's hue and saturation with the backdrop's luminosity.
fn color(a: [u8; 3], b: [u8; 3]) -> [u8; 3] {
    let d = pillow_luma(a) - pillow_luma(b);
    clip_color(b.map(|v| f32::from(v) + d)).map(float_to_level)
}

/// `hue`: the source's hue with the backdrop's saturation and luminosity.
fn hue(a: [u8; 3], b: [u8; 3]) -> [u8; 3] {
    let backdrop = a.map(f32::from);
    let saturated = set_sat(b.map(f32::from), max3(backdrop) - min3(backdrop));
    let d = pillow_luma(a) - lum(saturated);
    clip_color(saturated.map(|v| v + d)).map(float_to_level)
}

/// Pillow's `Image.composite(a, blended, mask)` with a constant mask of `weight_of_a`:
/// `(blended·(255 − m) + a·m) / 255`, rounded as Pillow's `DIV255`.
fn composite(a: u8, blended: u8, weight_of_a: u8) -> u8 {
    let m = u32::from(weight_of_a);
    let v = u32::from(blended) * (255 - m) + u32::from(a) * m + 128;
    (((v >> 8) + v) >> 8) as u8
}

/// The node's blend of two RGB images of one size: each item of the longer batch with the
/// other's (repeated as ComfyUI repeats batches), `blend_percentage` of the blend over `a`.
pub fn blend_images(a: &Image, b: &Image, mode: BlendMode, blend_percentage: f64) -> Result<Image, NodeError> {
    if a.channels != 3 || b.channels != 3 {
        return Err(NodeError::value(format!(
            "Image Blending Mode blends RGB images; got {} and {} channels",
            a.channels, b.channels
        )));
    }
    if (a.height, a.width) != (b.height, b.width) {
        return Err(NodeError::value("images do not match"));
    }
    let batch = a.batch.max(b.batch);
    let (a, b) = (a.repeat_to_batch(batch), b.repeat_to_batch(batch));
    // `ImageOps.invert` of a mask of `round(percentage·255)`.
    let weight_of_a = 255 - (blend_percentage.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8;
    let mut data = Vec::with_capacity(a.data.len());
    for (pixel_a, pixel_b) in a.data.chunks_exact(3).zip(b.data.chunks_exact(3)) {
        let levels_a = [pixel_a[0], pixel_a[1], pixel_a[2]].map(to_u8);
        let levels_b = [pixel_b[0], pixel_b[1], pixel_b[2]].map(to_u8);
        let blended = mode.blend(levels_a, levels_b);
        data.extend((0..3).map(|c| from_u8(composite(levels_a[c], blended[c], weight_of_a))));
    }
    Image::new(batch, a.height, a.width, 3, data)
}

/// `Image Blending Mode`.
pub struct ImageBlendingMode;

impl Node for ImageBlendingMode {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("Image Blending Mode", MODULE, "WAS Suite/Image")
            .required("image_a", InputSpec::of("IMAGE"))
            .required("image_b", InputSpec::of("IMAGE"))
            .required("mode", InputSpec::combo(&BLEND_MODES))
            .required("blend_percentage", InputSpec::float(1.0, 0.0, 1.0).opt("step", 0.01))
            .output(OutputSpec::of("IMAGE").named("image"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let mode = inputs.string("mode")?;
        let mode = BlendMode::parse(mode).ok_or_else(|| NodeError::value(format!("unknown blending mode '{mode}'")))?;
        let blended = blend_images(
            inputs.object::<Image>("image_a")?,
            inputs.object::<Image>("image_b")?,
            mode,
            inputs.float("blend_percentage")?,
        )?;
        Ok(NodeOutput::values(vec![Value::object(blended)]))
    }
}
