//! Image nodes of ComfyUI's `comfy_extras/nodes_images.py` that rearrange or resample pixels, or
//! batches: ImageRotate (`torch.rot90`), ImageFlip (`torch.flip`), ImageScaleToMaxDimension,
//! RepeatImageBatch, ImageFromBatch and ImageAddNoise (torch's CPU `randn`).

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec, MAX_RESOLUTION};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services};
use easel_models::sampling::noise::CpuGenerator;

use crate::image::nodes::image_result;
use crate::image::resample::common_upscale;
use crate::image::Image;
use crate::runtime::ensure_fits;

const MODULE: &str = "comfy_extras.nodes_images";

/// Each pixel of a new `height`×`width` image (same batch and channels as `image`) taken from
/// the source position `source(y, x)` returns.
fn remap(image: &Image, height: usize, width: usize, source: impl Fn(usize, usize) -> (usize, usize)) -> Image {
    let channels = image.channels;
    let mut data = Vec::with_capacity(image.batch * height * width * channels);
    for b in 0..image.batch {
        for y in 0..height {
            for x in 0..width {
                let (sy, sx) = source(y, x);
                let start = image.index(b, sy, sx, 0);
                data.extend_from_slice(&image.data[start..start + channels]);
            }
        }
    }
    Image {
        batch: image.batch,
        height,
        width,
        channels,
        data,
    }
}

/// `ImageRotate`: `torch.rot90(image, k, dims=[2, 1])`, clockwise by 90° `k` times.
pub struct ImageRotate;

impl Node for ImageRotate {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ImageRotate", MODULE, "image/transform")
            .required("image", InputSpec::of("IMAGE"))
            .required(
                "rotation",
                InputSpec::combo(&["none", "90 degrees", "180 degrees", "270 degrees"]),
            )
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let (h, w) = (image.height, image.width);
        let rotation = inputs.string("rotation")?;
        let rotated = if rotation.starts_with("90") {
            remap(image, w, h, |y, x| (h - 1 - x, y))
        } else if rotation.starts_with("180") {
            remap(image, h, w, |y, x| (h - 1 - y, w - 1 - x))
        } else if rotation.starts_with("270") {
            remap(image, w, h, |y, x| (x, w - 1 - y))
        } else {
            image.clone()
        };
        Ok(image_result(rotated))
    }
}

/// `ImageFlip`: upside down (`x-axis`) or mirrored (`y-axis`).
pub struct ImageFlip;

impl Node for ImageFlip {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ImageFlip", MODULE, "image/transform")
            .required("image", InputSpec::of("IMAGE"))
            .required(
                "flip_method",
                InputSpec::combo(&["x-axis: vertically", "y-axis: horizontally"]),
            )
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let (h, w) = (image.height, image.width);
        let method = inputs.string("flip_method")?;
        let flipped = if method.starts_with('x') {
            remap(image, h, w, |y, x| (h - 1 - y, x))
        } else if method.starts_with('y') {
            remap(image, h, w, |y, x| (y, w - 1 - x))
        } else {
            image.clone()
        };
        Ok(image_result(flipped))
    }
}

/// `ImageScaleToMaxDimension`: the longer side scaled to `largest_size`, the other in
/// proportion (Python's `round`, half to even).
pub struct ImageScaleToMaxDimension;

impl Node for ImageScaleToMaxDimension {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ImageScaleToMaxDimension", MODULE, "image/upscaling")
            .required("image", InputSpec::of("IMAGE"))
            .required(
                "upscale_method",
                InputSpec::combo(&["area", "lanczos", "bilinear", "nearest-exact", "bilinear", "bicubic"]),
            )
            .required("largest_size", InputSpec::int(512, 0, MAX_RESOLUTION).opt("step", 1))
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let largest = inputs.int("largest_size")?.max(0) as f64;
        let (h, w) = (image.height as f64, image.width as f64);
        let (width, height) = if h > w {
            ((w / h * largest).round_ties_even(), largest)
        } else if w > h {
            (largest, (h / w * largest).round_ties_even())
        } else {
            (largest, largest)
        };
        let method = inputs.string("upscale_method")?.parse()?;
        Ok(image_result(common_upscale(
            image,
            width as usize,
            height as usize,
            method,
            false,
            true,
        )?))
    }
}

/// `RepeatImageBatch`: the batch `amount` times over.
pub struct RepeatImageBatch;

impl Node for RepeatImageBatch {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("RepeatImageBatch", MODULE, "image/batch")
            .required("image", InputSpec::of("IMAGE"))
            .required("amount", InputSpec::int(1, 1, 4096))
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let amount = inputs.int("amount")?.max(0) as usize;
        let batch = image.batch * amount;
        ensure_fits(&[batch, image.height, image.width, image.channels], || {
            format!("{amount} copies of a batch of {} images", image.batch)
        })?;
        Ok(image_result(image.repeat_to_batch(batch)))
    }
}

/// `ImageFromBatch`: `length` images from `batch_index`, both kept within the batch.
pub struct ImageFromBatch;

impl Node for ImageFromBatch {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ImageFromBatch", MODULE, "image/batch")
            .required("image", InputSpec::of("IMAGE"))
            .required("batch_index", InputSpec::int(0, 0, 4095))
            .required("length", InputSpec::int(1, 1, 4096))
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let last = image.batch.saturating_sub(1);
        let start = (inputs.int("batch_index")?.max(0) as usize).min(last);
        let length = (inputs.int("length")?.max(0) as usize).min(image.batch - start);
        let frame = image.frame_len();
        Ok(image_result(Image {
            batch: length,
            data: image.data[start * frame..(start + length) * frame].to_vec(),
            ..image.clone()
        }))
    }
}

/// `ImageAddNoise`: `clip(image + strength · randn(image.shape), 0, 1)`, the noise from torch's
/// CPU generator seeded with `seed`, in float32.
pub struct ImageAddNoise;

impl Node for ImageAddNoise {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ImageAddNoise", MODULE, "image")
            .required("image", InputSpec::of("IMAGE"))
            .required(
                "seed",
                InputSpec::of("INT")
                    .opt("default", 0)
                    .opt("min", 0)
                    .opt("max", u64::MAX)
                    .opt("control_after_generate", true)
                    .opt("tooltip", "The random seed used for creating the noise."),
            )
            .required("strength", InputSpec::float(0.5, 0.0, 1.0).opt("step", 0.01))
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let seed = inputs
            .get("seed")
            .and_then(|value| value.as_json())
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| NodeError::value("seed must be an integer from 0 to 2^64 - 1"))?;
        let strength = inputs.float("strength")? as f32;
        let noise = CpuGenerator::new(seed).randn(image.data.len());
        let data = image
            .data
            .iter()
            .zip(noise)
            .map(|(&value, noise)| (value + strength * noise).clamp(0.0, 1.0))
            .collect();
        Ok(image_result(Image { data, ..image.clone() }))
    }
}
