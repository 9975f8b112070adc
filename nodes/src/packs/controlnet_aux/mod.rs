//! Fannovel16's comfyui_controlnet_aux, the preprocessors that make control images: its
//! InpaintPreprocessor ([`inpaint`]), CannyEdgePreprocessor ([`canny`]),
//! DepthAnythingV2Preprocessor ([`depth_anything`]) and AIO_Preprocessor running any of them
//! ([`aio`]); and the way the pack runs an annotator on a batch (`common_annotator_call`): each
//! image as 8-bit pixels, resized so that the shorter side is the node's `resolution`
//! (`resize_image_with_pad`, with OpenCV's resizes and Canny from [`opencv`]).

mod aio;
mod canny;
mod depth_anything;
mod inpaint;
pub mod opencv;

use easel_engine::schema::InputSpec;
use easel_engine::{NodeError, NodeInputs, NodeRegistry};

use crate::image::{from_u8, to_u8, Image};
use opencv::{resize_area_u8, resize_cubic_u8, Pixels};

pub use depth_anything::{
    find_depth_anything_v2, installed_depth_anything_v2, load_depth_anything_v2, relative_depth,
    DEPTH_ANYTHING_V2_CHECKPOINTS, DEPTH_ANYTHING_V2_FOLDER,
};

/// The pack's module name, as ComfyUI names a custom node pack's module.
const CONTROLNET_AUX_MODULE: &str = "custom_nodes.comfyui_controlnet_aux";

/// `INPUT.RESOLUTION()`'s default, and what `common_annotator_call` uses below its minimum.
const DEFAULT_RESOLUTION: i64 = 512;
const MIN_RESOLUTION: i64 = 64;

/// `INPUT.RESOLUTION()`'s maximum (ComfyUI's `MAX_RESOLUTION`).
const MAX_RESOLUTION: i64 = 16384;

pub fn register(registry: &mut NodeRegistry) {
    registry.register(inpaint::InpaintPreprocessor);
    registry.register(canny::CannyEdgePreprocessor);
    registry.register(depth_anything::DepthAnythingV2Preprocessor);
    registry.register(aio::AioPreprocessor);
}

/// `INPUT.RESOLUTION()`: the shorter side of the control image the preprocessor makes.
fn resolution_input() -> InputSpec {
    InputSpec::int(DEFAULT_RESOLUTION, MIN_RESOLUTION, MAX_RESOLUTION).opt("step", 64)
}

/// An optional INT input, or its default where the prompt leaves it out.
fn optional_int(inputs: &NodeInputs, name: &str, default: i64) -> Result<i64, NodeError> {
    match inputs.get(name) {
        Some(_) => inputs.int(name),
        None => Ok(default),
    }
}

/// An optional STRING or combo input, or its default where the prompt leaves it out.
fn optional_string<'a>(inputs: &'a NodeInputs, name: &str, default: &'a str) -> Result<&'a str, NodeError> {
    match inputs.get(name) {
        Some(_) => inputs.string(name),
        None => Ok(default),
    }
}

/// `common_annotator_call`: runs `annotate` on each image of the batch as 8-bit RGB pixels, with
/// the resolution (the shorter side its result should have; below the minimum, the default),
/// and stacks the 8-bit results, made RGB, as an IMAGE.
fn annotate_batch(
    image: &Image,
    resolution: i64,
    mut annotate: impl FnMut(&Pixels<u8>, usize) -> Result<Pixels<u8>, NodeError>,
) -> Result<Image, NodeError> {
    let resolution = if resolution >= MIN_RESOLUTION {
        resolution
    } else {
        DEFAULT_RESOLUTION
    } as usize;
    let pixels_per_image = image.height * image.width * image.channels;
    let mut outputs = Vec::with_capacity(image.batch);
    for index in 0..image.batch {
        let data = &image.data[index * pixels_per_image..(index + 1) * pixels_per_image];
        let pixels = Pixels {
            height: image.height,
            width: image.width,
            channels: image.channels,
            data: data.iter().map(|&value| to_u8(value)).collect(),
        };
        outputs.push(rgb(annotate(&rgb(pixels)?, resolution)?)?);
    }
    let first = outputs
        .first()
        .ok_or_else(|| NodeError::value("the image batch is empty"))?;
    let (height, width, channels) = (first.height, first.width, first.channels);
    let data = outputs
        .iter()
        .flat_map(|pixels| pixels.data.iter().map(|&value| from_u8(value)))
        .collect();
    Image::new(outputs.len(), height, width, channels, data)
}

/// `HWC3`: greyscale repeated to three channels, RGBA composited on white, RGB as it is.
fn rgb(pixels: Pixels<u8>) -> Result<Pixels<u8>, NodeError> {
    let data = match pixels.channels {
        3 => return Ok(pixels),
        1 => pixels.data.iter().flat_map(|&value| [value; 3]).collect(),
        4 => pixels
            .data
            .chunks_exact(4)
            .flat_map(|pixel| {
                let alpha = f32::from(pixel[3]) / 255.0;
                let blend = |value: u8| (f32::from(value) * alpha + 255.0 * (1.0 - alpha)).clamp(0.0, 255.0) as u8;
                [blend(pixel[0]), blend(pixel[1]), blend(pixel[2])]
            })
            .collect(),
        channels => {
            return Err(NodeError::typed(
                "AssertionError",
                format!("images of {channels} channels cannot be annotated (1, 3 or 4 can)"),
            ))
        }
    };
    Ok(Pixels {
        channels: 3,
        data,
        ..pixels
    })
}

/// `resize_image_with_pad(…, resolution, "INTER_CUBIC")`: the shorter side scaled to
/// `resolution` (sides rounded half to even), bicubic when growing, area when shrinking, then
/// padded (edge pixels repeated) to multiples of 64; also the size before padding.
fn resize_with_pad(pixels: &Pixels<u8>, resolution: usize) -> (Pixels<u8>, (usize, usize)) {
    let resized = resize_to_resolution(pixels, resolution);
    let (height, width) = (resized.height, resized.width);
    let (padded_height, padded_width) = (height.div_ceil(64) * 64, width.div_ceil(64) * 64);
    let channels = resized.channels;
    let mut data = Vec::with_capacity(padded_height * padded_width * channels);
    for y in 0..padded_height {
        let row = &resized.data[y.min(height - 1) * width * channels..][..width * channels];
        data.extend_from_slice(row);
        let last = &row[(width - 1) * channels..];
        for _ in width..padded_width {
            data.extend_from_slice(last);
        }
    }
    let padded = Pixels {
        height: padded_height,
        width: padded_width,
        channels,
        data,
    };
    (padded, (height, width))
}

/// [`resize_with_pad`] with its padding removed (`remove_pad`): just the resize.
fn resize_to_resolution(pixels: &Pixels<u8>, resolution: usize) -> Pixels<u8> {
    let scale = resolution as f64 / pixels.height.min(pixels.width) as f64;
    let height = (pixels.height as f64 * scale).round_ties_even() as usize;
    let width = (pixels.width as f64 * scale).round_ties_even() as usize;
    if scale > 1.0 {
        resize_cubic_u8(pixels, height, width)
    } else {
        resize_area_u8(pixels, height, width)
    }
}
