//! ImageRGBToYUV and ImageYUVToRGB of ComfyUI's `comfy_extras/nodes_morphology.py`
//! (`image/batch`): kornia's full-range YCbCr conversions (`rgb_to_ycbcr`, `ycbcr_to_rgb`, kornia
//! 0.9: the exact inverse coefficients and the clamp to 0..1), with Y, U (Cb) and V (Cr) carried
//! as three-channel images whose channels are equal, as ComfyUI splits them.
//!
//! Float32 arithmetic in PyTorch's order of operations (each product and sum rounded).

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};

use crate::image::nodes::image_result;
use crate::image::Image;

const MODULE: &str = "comfy_extras.nodes_morphology";
const CATEGORY: &str = "image/batch";

/// kornia's `rgb_to_ycbcr` of one pixel: `(y, cb, cr)`.
pub fn rgb_to_ycbcr(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let y = 0.299f32 * r + 0.587f32 * g + 0.114f32 * b;
    let cb = (b - y) * 0.564f32 + 0.5;
    let cr = (r - y) * 0.713f32 + 0.5;
    (y, cb, cr)
}

/// kornia's `ycbcr_to_rgb` of one pixel, clamped to 0..1: `(r, g, b)` (its coefficients
/// 1.4025245442, 0.7144034731, 0.3443401356 and 1.7730496454 rounded to float32, as PyTorch
/// applies a Python float to a float32 tensor).
pub fn ycbcr_to_rgb(y: f32, cb: f32, cr: f32) -> (f32, f32, f32) {
    let (cb, cr) = (cb - 0.5, cr - 0.5);
    let r = y + 1.402_524_6f32 * cr;
    let g = y - 0.714_403_45f32 * cr - 0.344_340_15f32 * cb;
    let b = y + 1.773_049_6f32 * cb;
    (r.clamp(0.0, 1.0), g.clamp(0.0, 1.0), b.clamp(0.0, 1.0))
}

/// An image of `source`'s size with three channels, each pixel's all set to `value(pixel)`.
fn three_equal_channels(source: &Image, values: impl Iterator<Item = f32>) -> Image {
    let data = values.flat_map(|value| [value; 3]).collect();
    Image {
        channels: 3,
        data,
        ..source.clone()
    }
}

/// `ImageRGBToYUV`: an RGB image split into its Y, U and V planes, each as a three-channel image.
pub struct ImageRgbToYuv;

impl Node for ImageRgbToYuv {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("ImageRGBToYUV", MODULE, CATEGORY)
            .required("image", InputSpec::of("IMAGE"))
            .output(OutputSpec::of("IMAGE").named("Y"))
            .output(OutputSpec::of("IMAGE").named("U"))
            .output(OutputSpec::of("IMAGE").named("V"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        if image.channels != 3 {
            return Err(NodeError::value(format!(
                "Input size must have a shape of (*, 3, H, W). Got an image of {} channels",
                image.channels
            )));
        }
        let pixels: Vec<(f32, f32, f32)> = image
            .data
            .chunks_exact(3)
            .map(|rgb| rgb_to_ycbcr(rgb[0], rgb[1], rgb[2]))
            .collect();
        let plane =
            |pick: fn(&(f32, f32, f32)) -> f32| Value::object(three_equal_channels(image, pixels.iter().map(pick)));
        Ok(NodeOutput::values(vec![plane(|p| p.0), plane(|p| p.1), plane(|p| p.2)]))
    }
}

/// `torch.mean(image, dim=-1)`: each pixel's channel mean (NaN for an image without channels).
fn channel_means(image: &Image) -> Vec<f32> {
    let count = image.height * image.width * image.batch;
    if image.channels == 0 {
        return vec![f32::NAN; count];
    }
    image
        .data
        .chunks_exact(image.channels)
        .map(|pixel| pixel.iter().fold(0.0f32, |sum, v| sum + v) / image.channels as f32)
        .collect()
}

/// `ImageYUVToRGB`: Y, U and V images (each reduced to its channel mean) joined into RGB.
pub struct ImageYuvToRgb;

impl Node for ImageYuvToRgb {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3("ImageYUVToRGB", MODULE, CATEGORY)
            .required("Y", InputSpec::of("IMAGE"))
            .required("U", InputSpec::of("IMAGE"))
            .required("V", InputSpec::of("IMAGE"))
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let y = inputs.object::<Image>("Y")?;
        let u = inputs.object::<Image>("U")?;
        let v = inputs.object::<Image>("V")?;
        let size = |image: &Image| (image.batch, image.height, image.width);
        if size(u) != size(y) || size(v) != size(y) {
            return Err(NodeError::value(format!(
                "Sizes of tensors must match: Y, U and V are {:?}, {:?} and {:?} (batch, height, width)",
                size(y),
                size(u),
                size(v)
            )));
        }
        let (y_means, u_means, v_means) = (channel_means(y), channel_means(u), channel_means(v));
        let mut data = Vec::with_capacity(y_means.len() * 3);
        for ((luma, cb), cr) in y_means.into_iter().zip(u_means).zip(v_means) {
            let (r, g, b) = ycbcr_to_rgb(luma, cb, cr);
            data.extend([r, g, b]);
        }
        Ok(image_result(Image::new(y.batch, y.height, y.width, 3, data)?))
    }
}
