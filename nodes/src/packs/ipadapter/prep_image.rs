//! `PrepImageForClipVision`: an image cropped (at a side, a corner's edge or the centre) or padded
//! to a square, resized to 224×224 by Pillow with the chosen filter on 8-bit values (torchvision's
//! `ToPILImage` truncates), and optionally sharpened by contrast-adaptive sharpening.

use candle_core::{Device, Tensor};
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};

use crate::image::resample::{pillow_resize, PillowFilter};
use crate::image::{from_u8, to_u8, Image};
use crate::runtime::tensor_error;

/// The side the pack prepares images to.
const SIZE: usize = 224;
const INTERPOLATIONS: [&str; 6] = ["LANCZOS", "BICUBIC", "HAMMING", "BILINEAR", "BOX", "NEAREST"];
const CROP_POSITIONS: [&str; 6] = ["top", "bottom", "left", "right", "center", "pad"];

/// `PrepImageForClipVision` ("Prep Image For ClipVision").
pub struct PrepImageForClipVision;

impl Node for PrepImageForClipVision {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("PrepImageForClipVision", super::nodes::MODULE, "ipadapter/utils")
            .display("Prep Image For ClipVision")
            .required("image", InputSpec::of("IMAGE"))
            .required("interpolation", InputSpec::combo(&INTERPOLATIONS))
            .required("crop_position", InputSpec::combo(&CROP_POSITIONS))
            .required(
                "sharpening",
                InputSpec::of("FLOAT")
                    .opt("default", 0.0)
                    .opt("min", 0)
                    .opt("max", 1)
                    .opt("step", 0.05),
            )
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let squared = square(image, inputs.string("crop_position")?);
        let resized = match inputs.string("interpolation")? {
            "NEAREST" => nearest(&squared, SIZE),
            name => {
                let filter = PillowFilter::from_name(name)
                    .ok_or_else(|| NodeError::value(format!("unknown interpolation {name}")))?;
                pillow_resize(&quantised(&squared), SIZE, SIZE, filter)?
            }
        };
        let sharpening = inputs.float("sharpening")?;
        let out = match sharpening > 0.0 {
            true => contrast_adaptive_sharpening(&resized, sharpening).map_err(tensor_error)?,
            false => resized,
        };
        Ok(NodeOutput::values(vec![Value::object(out)]))
    }
}

/// The image as `ToPILImage` and `ToTensor` leave it: each value truncated to 8 bits.
fn quantised(image: &Image) -> Image {
    Image {
        data: image.data.iter().map(|&v| from_u8(to_u8(v))).collect(),
        ..image.clone()
    }
}

/// The image cut to a square at `position` (the shorter side kept; for top/bottom/left/right
/// the other axis centred), or with "pad" padded with black to one (`(long − short) / 2` on
/// both sides, which leaves it one short when the difference is odd, as the pack does).
fn square(image: &Image, position: &str) -> Image {
    let (height, width) = (image.height, image.width);
    if position == "pad" {
        let pad = height.abs_diff(width) / 2;
        let (pad_y, pad_x) = if height > width { (0, pad) } else { (pad, 0) };
        let (out_h, out_w) = (height + 2 * pad_y, width + 2 * pad_x);
        let mut out = Image::filled(image.batch, out_h, out_w, image.channels, 0.0);
        for b in 0..image.batch {
            for y in 0..height {
                for x in 0..width {
                    for c in 0..image.channels {
                        let to = out.index(b, y + pad_y, x + pad_x, c);
                        out.data[to] = image.data[image.index(b, y, x, c)];
                    }
                }
            }
        }
        return out;
    }
    let side = height.min(width);
    let (mut x, mut y) = ((width - side) / 2, (height - side) / 2);
    match position {
        "top" => y = 0,
        "bottom" => y = height - side,
        "left" => x = 0,
        "right" => x = width - side,
        _ => {}
    }
    image.crop(y, y + side, x, x + side)
}

/// Pillow's NEAREST resize (an affine transform sampling pixel `⌊(i + ½)·in/out⌋`), on the 8-bit
/// values.
fn nearest(image: &Image, size: usize) -> Image {
    let image = quantised(image);
    let source = |i: usize, length: usize| (((i as f64 + 0.5) * length as f64 / size as f64) as usize).min(length - 1);
    let mut out = Image::filled(image.batch, size, size, image.channels, 0.0);
    for b in 0..image.batch {
        for y in 0..size {
            for x in 0..size {
                for c in 0..image.channels {
                    let to = out.index(b, y, x, c);
                    out.data[to] = image.data[image.index(b, source(y, image.height), source(x, image.width), c)];
                }
            }
        }
    }
    out
}

/// The pack's `contrast_adaptive_sharpening` (AMD's CAS): each pixel pushed away from its cross
/// neighbours by an amount from the local contrast, clamped to 0..1.
fn contrast_adaptive_sharpening(image: &Image, amount: f64) -> candle_core::Result<Image> {
    let (batch, height, width, channels) = (image.batch, image.height, image.width, image.channels);
    let pixels = Tensor::from_slice(&image.data, (batch, height, width, channels), &Device::Cpu)?
        .permute((0, 3, 1, 2))?
        .pad_with_zeros(2, 1, 1)?
        .pad_with_zeros(3, 1, 1)?;
    let at = |dy: usize, dx: usize| pixels.narrow(2, dy, height).and_then(|t| t.narrow(3, dx, width));
    let (a, b, c) = (at(0, 0)?, at(0, 1)?, at(0, 2)?);
    let (d, e, f) = (at(1, 0)?, at(1, 1)?, at(1, 2)?);
    let (g, h, i) = (at(2, 0)?, at(2, 1)?, at(2, 2)?);
    let minimum = |list: &[&Tensor]| -> candle_core::Result<Tensor> {
        list[1..]
            .iter()
            .try_fold(list[0].clone(), |m, t| m.minimum(*t))?
            .clamp(0f32, f32::MAX)
    };
    let maximum = |list: &[&Tensor]| -> candle_core::Result<Tensor> {
        list[1..]
            .iter()
            .try_fold(list[0].clone(), |m, t| m.maximum(*t))?
            .clamp(f32::MIN, 1f32)
    };
    let cross = [&b, &d, &e, &f, &h];
    let diagonal = [&a, &c, &g, &i];
    let mx = (maximum(&cross)? + maximum(&diagonal)?)?;
    let mn = (minimum(&cross)? + minimum(&diagonal)?)?;
    let inv_mx = mx.recip()?;
    let amp = (inv_mx * mn.minimum(&(2.0 - &mx)?)?)?.sqrt()?;
    let w = (amp * -(amount * (1.0 / 5.0 - 1.0 / 8.0) + 1.0 / 8.0))?;
    let div = ((&w * 4.0)? + 1.0)?.recip()?;
    let output = ((((((&b + &d)? + &f)? + &h)? * &w)? + &e)? * div)?;
    let values: Vec<f32> = output
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) })
        .collect();
    Image::new(batch, height, width, channels, values).map_err(|error| candle_core::Error::Msg(error.to_string()))
}
