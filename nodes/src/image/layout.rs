//! Image nodes that change an image's size or a batch's grouping: ImageStitch and
//! ResizeAndPadImage (`comfy_extras/nodes_images.py`), ImageScaleToTotalPixels
//! (`nodes_post_processing.py`) and RebatchImages (`nodes_rebatch.py`). Resampling is
//! [`common_upscale`], bit for bit with PyTorch and Pillow.

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec, MAX_RESOLUTION};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};

use crate::image::nodes::image_result;
use crate::image::resample::{common_upscale, ResizeMethod, UPSCALE_METHODS};
use crate::image::Image;
use crate::runtime::ensure_fits;

/// Whether a stitch direction lays the images side by side (`left`, `right`) or stacked.
fn horizontal(direction: &str) -> bool {
    matches!(direction, "left" | "right")
}

/// `image` with its last item repeated up to `batch` items.
fn extend_batch(image: &Image, batch: usize) -> Result<Image, NodeError> {
    if image.batch >= batch || image.batch == 0 {
        return Ok(image.clone());
    }
    ensure_fits(&[batch, image.height, image.width, image.channels], || {
        format!("a batch of {batch} images of {}×{}", image.width, image.height)
    })?;
    let mut data = image.data.clone();
    let last = image.frame(image.batch - 1);
    for _ in image.batch..batch {
        data.extend_from_slice(last);
    }
    Ok(Image {
        batch,
        data,
        ..image.clone()
    })
}

/// `image` padded with `value` by `before` and `after` rows (`vertical`) or columns.
fn pad(image: &Image, before: usize, after: usize, vertical: bool, value: f32) -> Result<Image, NodeError> {
    let (height, width) = if vertical {
        (image.height + before + after, image.width)
    } else {
        (image.height, image.width + before + after)
    };
    let (top, left) = if vertical { (before, 0) } else { (0, before) };
    ensure_fits(&[image.batch, height, width, image.channels], || {
        format!("a padded image of {width}×{height} (batch {})", image.batch)
    })?;
    let mut out = Image::filled(image.batch, height, width, image.channels, value);
    paste(&mut out, image, top, left);
    Ok(out)
}

/// Copies `source` into `target` with its top-left corner at (`top`, `left`); batches equal.
fn paste(target: &mut Image, source: &Image, top: usize, left: usize) {
    let row = source.width * source.channels;
    for b in 0..source.batch {
        for y in 0..source.height {
            let from = source.index(b, y, 0, 0);
            let to = target.index(b, top + y, left, 0);
            target.data[to..to + row].copy_from_slice(&source.data[from..from + row]);
        }
    }
}

/// `image` with channels of ones appended up to `channels`.
fn with_channels(image: &Image, channels: usize) -> Image {
    let mut out = image.clone();
    while out.channels < channels {
        out = out.with_extra_channel(1.0);
    }
    out
}

/// Concatenates images of equal batch and channels along the width (`horizontal`) or height,
/// failing as `torch.cat` does where the other dimension differs.
fn concatenate(images: &[&Image], horizontal: bool) -> Result<Image, NodeError> {
    let first = images[0];
    let (dim, other) = if horizontal { (2, 1) } else { (1, 2) };
    for (n, image) in images.iter().enumerate().skip(1) {
        let sizes = |i: &Image| [i.batch, i.height, i.width, i.channels];
        let (expected, got) = (sizes(first), sizes(image));
        for d in [0, other, 3] {
            if expected[d] != got[d] {
                return Err(NodeError::typed(
                    "RuntimeError",
                    format!(
                        "Sizes of tensors must match except in dimension {dim}. Expected size {} but got size {} \
                         for tensor number {n} in the list.",
                        expected[d], got[d]
                    ),
                ));
            }
        }
    }
    let (height, width) = if horizontal {
        (first.height, images.iter().map(|i| i.width).sum())
    } else {
        (images.iter().map(|i| i.height).sum(), first.width)
    };
    ensure_fits(&[first.batch, height, width, first.channels], || {
        format!("a stitched image of {width}×{height} (batch {})", first.batch)
    })?;
    let mut out = Image::filled(first.batch, height, width, first.channels, 0.0);
    let mut offset = 0;
    for image in images {
        if horizontal {
            paste(&mut out, image, 0, offset);
            offset += image.width;
        } else {
            paste(&mut out, image, offset, 0);
            offset += image.height;
        }
    }
    Ok(out)
}

/// `ImageStitch`: image2 beside or below (or left of, above) image1. With `match_image_size`
/// image2 is resized (Lanczos) to image1's height (or width) keeping its aspect ratio;
/// otherwise the smaller is centred with padding of the spacing colour (0 for red, green and
/// blue). Batches are evened by repeating the last image, channels by opaque alpha, and an
/// optional strip of `spacing_width` (rounded up to even) goes between.
pub struct ImageStitch;

impl Node for ImageStitch {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ImageStitch", "comfy_extras.nodes_images", "image/transform")
            .display("Image Stitch")
            .description(
                "\nStitches image2 to image1 in the specified direction.\nIf image2 is not provided, returns image1 \
                 unchanged.\nOptional spacing can be added between images.\n",
            )
            .required("image1", InputSpec::of("IMAGE"))
            .required(
                "direction",
                InputSpec::combo(&["right", "down", "left", "up"]).opt("default", "right"),
            )
            .required("match_image_size", InputSpec::boolean(true))
            .required("spacing_width", InputSpec::int(0, 0, 1024).opt("step", 2))
            .required(
                "spacing_color",
                InputSpec::combo(&["white", "black", "red", "green", "blue"]).opt("default", "white"),
            )
            .optional("image2", InputSpec::of("IMAGE"))
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image1 = inputs.object::<Image>("image1")?;
        let Some(image2) = inputs.optional_object::<Image>("image2")? else {
            return Ok(image_result(image1.clone()));
        };
        let direction = inputs.string("direction")?;
        let side_by_side = horizontal(direction);
        let batch = image1.batch.max(image2.batch);
        let mut first = extend_batch(image1, batch)?;
        let mut second = extend_batch(image2, batch)?;
        let match_size = inputs.bool("match_image_size")?;
        if match_size {
            let aspect = second.width as f64 / second.height as f64;
            let (width, height) = if side_by_side {
                ((first.height as f64 * aspect) as usize, first.height)
            } else {
                (first.width, (first.width as f64 / aspect) as usize)
            };
            second = common_upscale(&second, width, height, ResizeMethod::Lanczos, false, true)?;
        }
        let colour = match inputs.string("spacing_color")? {
            "white" => [1.0, 1.0, 1.0],
            "black" => [0.0, 0.0, 0.0],
            "red" => [1.0, 0.0, 0.0],
            "green" => [0.0, 1.0, 0.0],
            "blue" => [0.0, 0.0, 1.0],
            other => return Err(NodeError::typed("KeyError", format!("'{other}'"))),
        };
        let grey = colour[0] == colour[1] && colour[1] == colour[2];
        if !match_size {
            // Centre the smaller across the other dimension; padding takes white or black, else 0.
            let value = if grey { colour[0] } else { 0.0 };
            let size = |i: &Image| if side_by_side { i.height } else { i.width };
            let target = size(&first).max(size(&second));
            for image in [&mut first, &mut second] {
                let missing = target - size(image);
                if missing > 0 {
                    *image = pad(image, missing / 2, missing - missing / 2, side_by_side, value)?;
                }
            }
        }
        let channels = first.channels.max(second.channels);
        let (first, second) = (with_channels(&first, channels), with_channels(&second, channels));
        let mut spacing_width = usize::try_from(inputs.int("spacing_width")?).unwrap_or(0);
        spacing_width += spacing_width % 2;
        let (before, after) = if matches!(direction, "left" | "up") {
            (&second, &first)
        } else {
            (&first, &second)
        };
        if spacing_width == 0 {
            return Ok(image_result(concatenate(&[before, after], side_by_side)?));
        }
        let (height, width) = if side_by_side {
            (first.height.max(second.height), spacing_width)
        } else {
            (spacing_width, first.width.max(second.width))
        };
        ensure_fits(&[first.batch, height, width, channels], || {
            format!("a spacing strip of {width}×{height}")
        })?;
        let mut pixel = vec![0.0f32; channels];
        for (value, c) in pixel.iter_mut().zip(colour) {
            *value = c;
        }
        if channels == 4 {
            pixel[3] = 1.0;
        }
        let data = (0..first.batch * height * width)
            .flat_map(|_| pixel.iter().copied())
            .collect();
        let strip = Image::new(first.batch, height, width, channels, data)?;
        let stitched = concatenate(&[before, &strip, after], side_by_side)?;
        Ok(image_result(stitched))
    }
}

/// `ResizeAndPadImage`: scaled to fit `target_width`×`target_height` keeping its aspect ratio
/// (sizes truncated), centred on a white or black canvas of that size.
pub struct ResizeAndPadImage;

impl Node for ResizeAndPadImage {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ResizeAndPadImage", "comfy_extras.nodes_images", "image/transform")
            .required("image", InputSpec::of("IMAGE"))
            .required("target_width", InputSpec::int(512, 1, MAX_RESOLUTION).opt("step", 1))
            .required("target_height", InputSpec::int(512, 1, MAX_RESOLUTION).opt("step", 1))
            .required("padding_color", InputSpec::combo(&["white", "black"]))
            .required(
                "interpolation",
                InputSpec::combo(&["area", "bicubic", "nearest-exact", "bilinear", "lanczos"]),
            )
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let size = |name: &str| -> Result<usize, NodeError> {
            let value = inputs.int(name)?;
            usize::try_from(value)
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| NodeError::value(format!("{name} must be at least 1, got {value}")))
        };
        let (target_width, target_height) = (size("target_width")?, size("target_height")?);
        let scale = (target_width as f64 / image.width as f64).min(target_height as f64 / image.height as f64);
        let width = (image.width as f64 * scale) as usize;
        let height = (image.height as f64 * scale) as usize;
        let method: ResizeMethod = inputs.string("interpolation")?.parse()?;
        let resized = common_upscale(image, width, height, method, false, true)?;
        let value = if inputs.string("padding_color")? == "black" {
            0.0
        } else {
            1.0
        };
        ensure_fits(&[image.batch, target_height, target_width, image.channels], || {
            format!(
                "a padded image of {target_width}×{target_height} (batch {})",
                image.batch
            )
        })?;
        let mut out = Image::filled(image.batch, target_height, target_width, image.channels, value);
        paste(
            &mut out,
            &resized,
            (target_height - height.min(target_height)) / 2,
            (target_width - width.min(target_width)) / 2,
        );
        Ok(image_result(out))
    }
}

/// `ImageScaleToTotalPixels`: resized to about `megapixels` million pixels (of 1024²) keeping
/// its aspect ratio, each side rounded half to even.
pub struct ImageScaleToTotalPixels;

impl Node for ImageScaleToTotalPixels {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3(
            "ImageScaleToTotalPixels",
            "comfy_extras.nodes_post_processing",
            "image/upscaling",
        )
        .required("image", InputSpec::of("IMAGE"))
        .required("upscale_method", InputSpec::combo_v3(&UPSCALE_METHODS))
        .required("megapixels", InputSpec::float(1.0, 0.01, 16.0).opt("step", 0.01))
        .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let total = (inputs.float("megapixels")? * 1024.0 * 1024.0).trunc();
        let scale = (total / (image.width * image.height) as f64).sqrt();
        let width = (image.width as f64 * scale).round_ties_even() as usize;
        let height = (image.height as f64 * scale).round_ties_even() as usize;
        let method: ResizeMethod = inputs.string("upscale_method")?.parse()?;
        Ok(image_result(common_upscale(image, width, height, method, false, true)?))
    }
}

/// The list items of an `INPUT_IS_LIST` input.
pub(crate) fn list_items<'a>(inputs: &'a NodeInputs, name: &str) -> Result<&'a [Value], NodeError> {
    match inputs.get(name) {
        Some(Value::List(items)) => Ok(items),
        Some(value) => Ok(std::slice::from_ref(value)),
        None => Err(NodeError::value(format!("Required input '{name}' is missing"))),
    }
}

/// The first `batch_size` of a list input, as ComfyUI's rebatch nodes take it.
pub(crate) fn list_batch_size(inputs: &NodeInputs) -> Result<usize, NodeError> {
    let first = list_items(inputs, "batch_size")?
        .first()
        .and_then(|value| value.as_json())
        .and_then(serde_json::Value::as_i64)
        .ok_or_else(|| NodeError::value("batch_size must be an integer"))?;
    usize::try_from(first)
        .ok()
        .filter(|&size| size > 0)
        .ok_or_else(|| NodeError::value(format!("batch_size must be at least 1, got {first}")))
}

/// `RebatchImages`: every image of every input batch, in order, regrouped into batches of
/// `batch_size` (the last may be smaller); a list output.
pub struct RebatchImages;

impl Node for RebatchImages {
    fn schema(&self, _: &Services) -> NodeSchema {
        let mut schema = NodeSchema::v3("RebatchImages", "comfy_extras.nodes_rebatch", "image/batch")
            .display("Rebatch Images")
            .required("images", InputSpec::of("IMAGE"))
            .required("batch_size", InputSpec::int(1, 1, 4096))
            .output(OutputSpec::of("IMAGE").list());
        schema.input_is_list = true;
        schema
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let batch_size = list_batch_size(inputs)?;
        let mut frames: Vec<Image> = Vec::new();
        for value in list_items(inputs, "images")? {
            let image = value
                .downcast::<Image>()
                .ok_or_else(|| NodeError::value(format!("Input 'images' expects Image, got {}", value.kind())))?;
            for b in 0..image.batch {
                frames.push(Image {
                    batch: 1,
                    data: image.frame(b).to_vec(),
                    ..image.clone()
                });
            }
        }
        let mut batches = Vec::with_capacity(frames.len().div_ceil(batch_size));
        for group in frames.chunks(batch_size) {
            for (n, frame) in group.iter().enumerate().skip(1) {
                let (first, sizes) = (&group[0], |i: &Image| [i.height, i.width, i.channels]);
                if let Some(d) = (0..3).find(|&d| sizes(first)[d] != sizes(frame)[d]) {
                    return Err(NodeError::typed(
                        "RuntimeError",
                        format!(
                            "Sizes of tensors must match except in dimension 0. Expected size {} but got size {} \
                             for tensor number {n} in the list.",
                            sizes(first)[d],
                            sizes(frame)[d]
                        ),
                    ));
                }
            }
            batches.push(Value::object(Image::concat(group)?));
        }
        Ok(NodeOutput::values(vec![Value::List(batches)]))
    }
}
