//! ComfyUI's image nodes: loading, saving and previewing files, and the pixel operations of
//! `nodes.py`, `comfy_extras/nodes_images.py` and `comfy_extras/nodes_mask.py`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use easel_engine::pyjson::dumps;
use easel_engine::schema::{CustomValidation, InputSpec, NodeSchema, OutputSpec, MAX_RESOLUTION};
use easel_engine::{HiddenInput, Node, NodeContext, NodeError, NodeInputs, NodeOutput, Preview, Services, Value};
use rand::Rng;
use serde_json::{json, Map, Value as Json};
use sha2::{Digest, Sha256};

use crate::image::io::{encode_png, frames_to_image, image_to_u8, load_frames, PngCompression};
use crate::image::resample::{common_upscale, interpolate_mask, resize, ResizeMethod, UPSCALE_METHODS};
use crate::image::{Image, Mask};
use crate::paths::{normalize, write_replacing, Paths};
use crate::runtime::ensure_fits;

/// Whether saved images carry the prompt and workflow (ComfyUI's `--disable-metadata` turns it off).
#[derive(Debug, Clone, Copy)]
pub struct ImageMetadata {
    pub enabled: bool,
}

pub(crate) fn image_result(image: Image) -> NodeOutput {
    NodeOutput::values(vec![Value::object(image)])
}

fn non_negative(inputs: &NodeInputs, name: &str) -> Result<usize, NodeError> {
    let value = inputs.int(name)?;
    usize::try_from(value).map_err(|_| NodeError::value(format!("{name} must not be negative, got {value}")))
}

pub(crate) fn sha256_file(path: &Path) -> Result<String, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    Ok(Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}

/// The file an image input names, if it exists inside its directory.
fn existing_image(services: &Services, name: &str) -> Option<PathBuf> {
    services
        .get::<Paths>()?
        .annotated_filepath(name)
        .filter(|p| p.is_file())
}

fn image_name_fingerprint(services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
    let name = inputs.get("image").and_then(Json::as_str).unwrap_or_default();
    let path = existing_image(services, name).ok_or_else(|| format!("Invalid image file: {name}"));
    Some(path.and_then(|p| sha256_file(&p)).map(Json::String))
}

fn validate_image_name(services: &Services, inputs: &Map<String, Json>) -> Result<(), String> {
    let name = inputs
        .get("image")
        .map(easel_engine::pyjson::py_str)
        .unwrap_or_default();
    match existing_image(services, &name) {
        Some(_) => Ok(()),
        None => Err(format!("Invalid image file: {name}")),
    }
}

fn image_file(ctx: &NodeContext, inputs: &NodeInputs) -> Result<PathBuf, NodeError> {
    let name = inputs.string("image")?;
    existing_image(ctx.services, name)
        .ok_or_else(|| NodeError::typed("FileNotFoundError", format!("Invalid image file: {name}")))
}

/// `LoadImage`: every frame of the same size as the first, as RGB, and the inverted alpha as mask.
pub struct LoadImage;

impl Node for LoadImage {
    fn schema(&self, services: &Services) -> NodeSchema {
        let files = services.get::<Paths>().map(Paths::input_images).unwrap_or_default();
        NodeSchema::v1("LoadImage", "nodes", "image")
            .display("Load Image")
            .required("image", InputSpec::combo(&files).opt("image_upload", true))
            .output(OutputSpec::of("IMAGE"))
            .output(OutputSpec::of("MASK"))
            .validated_by(CustomValidation::Inputs(vec!["image".into()]))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let frames = load_frames(&image_file(ctx, inputs)?)?;
        let first_size = frames
            .first()
            .map(|f| f.rgba.dimensions())
            .ok_or_else(|| NodeError::new("image has no frames"))?;
        let kept: Vec<_> = frames.iter().filter(|f| f.rgba.dimensions() == first_size).collect();
        let image = frames_to_image(&kept)?;
        let masks: Vec<Mask> = kept
            .iter()
            .map(|frame| {
                if frame.has_alpha {
                    let (w, h) = frame.rgba.dimensions();
                    let data = frame
                        .rgba
                        .pixels()
                        .map(|p| 1.0 - crate::image::from_u8(p.0[3]))
                        .collect();
                    Mask {
                        batch: 1,
                        height: h as usize,
                        width: w as usize,
                        data,
                    }
                } else {
                    Mask::filled(1, 64, 64, 0.0)
                }
            })
            .collect();
        let mask = concat_masks(&masks)?;
        Ok(NodeOutput::values(vec![Value::object(image), Value::object(mask)]))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        image_name_fingerprint(services, inputs)
    }

    fn validate_inputs(&self, services: &Services, inputs: &Map<String, Json>) -> Result<(), String> {
        validate_image_name(services, inputs)
    }
}

fn concat_masks(masks: &[Mask]) -> Result<Mask, NodeError> {
    let first = masks.first().ok_or_else(|| NodeError::new("no masks"))?;
    if masks.iter().any(|m| (m.height, m.width) != (first.height, first.width)) {
        return Err(NodeError::new("masks to concatenate differ in size"));
    }
    Ok(Mask {
        batch: masks.iter().map(|m| m.batch).sum(),
        height: first.height,
        width: first.width,
        data: masks.iter().flat_map(|m| m.data.iter().copied()).collect(),
    })
}

/// `LoadImageMask`: one channel of the first frame (alpha inverted).
pub struct LoadImageMask;

impl Node for LoadImageMask {
    fn schema(&self, services: &Services) -> NodeSchema {
        let files = services.get::<Paths>().map(Paths::input_files).unwrap_or_default();
        NodeSchema::v1("LoadImageMask", "nodes", "mask")
            .display("Load Image (as Mask)")
            .required("image", InputSpec::combo(&files).opt("image_upload", true))
            .required("channel", InputSpec::combo(&["alpha", "red", "green", "blue"]))
            .output(OutputSpec::of("MASK"))
            .validated_by(CustomValidation::Inputs(vec!["image".into()]))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let frames = load_frames(&image_file(ctx, inputs)?)?;
        let frame = frames.first().ok_or_else(|| NodeError::new("image has no frames"))?;
        let channel = match inputs.string("channel")? {
            "red" => 0,
            "green" => 1,
            "blue" => 2,
            "alpha" => 3,
            other => return Err(NodeError::value(format!("unknown channel {other}"))),
        };
        let (w, h) = frame.rgba.dimensions();
        let data = frame
            .rgba
            .pixels()
            .map(|p| {
                let v = crate::image::from_u8(p.0[channel]);
                if channel == 3 {
                    1.0 - v
                } else {
                    v
                }
            })
            .collect();
        Ok(NodeOutput::values(vec![Value::object(Mask {
            batch: 1,
            height: h as usize,
            width: w as usize,
            data,
        })]))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        image_name_fingerprint(services, inputs)
    }

    fn validate_inputs(&self, services: &Services, inputs: &Map<String, Json>) -> Result<(), String> {
        validate_image_name(services, inputs)
    }
}

/// ComfyUI's `get_save_image_path`: the folder, file stem, first counter and subfolder for a prefix.
pub struct SaveTarget {
    pub folder: PathBuf,
    pub filename: String,
    pub counter: u64,
    pub subfolder: String,
}

pub fn save_target(prefix: &str, output_dir: &Path, width: usize, height: usize) -> Result<SaveTarget, NodeError> {
    let mut prefix = prefix.to_string();
    if prefix.contains('%') {
        let now = chrono::Local::now();
        for (key, value) in [
            ("%width%", width.to_string()),
            ("%height%", height.to_string()),
            ("%year%", now.format("%Y").to_string()),
            ("%month%", now.format("%m").to_string()),
            ("%day%", now.format("%d").to_string()),
            ("%hour%", now.format("%H").to_string()),
            ("%minute%", now.format("%M").to_string()),
            ("%second%", now.format("%S").to_string()),
        ] {
            prefix = prefix.replace(key, &value);
        }
    }
    let normalized = normalize(Path::new(&prefix));
    let filename = normalized
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let subfolder = normalized
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let folder = normalize(&output_dir.join(&subfolder));
    if !folder.starts_with(output_dir) {
        let common: PathBuf = folder
            .components()
            .zip(output_dir.components())
            .take_while(|(a, b)| a == b)
            .map(|(a, _)| a.as_os_str())
            .collect();
        return Err(NodeError::new(format!(
            "**** ERROR: Saving image outside the output folder is not allowed.\n full_output_folder: {}\n         output_dir: {}\n         commonpath: {}",
            folder.display(),
            output_dir.display(),
            common.display()
        )));
    }
    // The counter: 1 + the highest `<prefix>_<number>…` in the folder (the basename of the prefix
    // as written decides how many characters are compared, as in ComfyUI).
    let prefix_len = Path::new(&prefix)
        .file_name()
        .map(|f| f.to_string_lossy().chars().count())
        .unwrap_or(0);
    let counter = match std::fs::read_dir(&folder) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name();
                let name = name.to_str()?;
                // The first `prefix_len` characters must be the file name, followed by `_`.
                let split = name.char_indices().nth(prefix_len).map(|(at, _)| at)?;
                let (stem, rest) = name.split_at(split);
                let tail = rest.strip_prefix('_')?;
                if stem != filename {
                    return None;
                }
                Some(
                    tail.split('_')
                        .next()
                        .and_then(|d| d.trim().parse::<u64>().ok())
                        .unwrap_or(0),
                )
            })
            .max()
            .map_or(1, |highest| highest + 1),
        Err(_) => {
            std::fs::create_dir_all(&folder).map_err(|e| NodeError::typed("OSError", e.to_string()))?;
            1
        }
    };
    Ok(SaveTarget {
        folder,
        filename,
        counter,
        subfolder,
    })
}

/// Writes each image of the batch as a PNG and returns the UI `{"images": [...]}`.
pub(crate) fn save_batch(
    ctx: &NodeContext,
    images: &Image,
    prefix: &str,
    dir: &Path,
    kind: &str,
    compression: PngCompression,
) -> Result<NodeOutput, NodeError> {
    let target = save_target(prefix, dir, images.width, images.height)?;
    let metadata = ctx.services.get::<ImageMetadata>().is_none_or(|m| m.enabled);
    let mut text = Vec::new();
    if metadata {
        text.push(("prompt".to_string(), dumps(ctx.prompt)));
        if let Some(Json::Object(extra)) = ctx.extra_pnginfo {
            for (key, value) in extra {
                text.push((key.clone(), dumps(value)));
            }
        }
    }
    let mut results = Vec::with_capacity(images.batch);
    for index in 0..images.batch {
        let stem = target.filename.replace("%batch_num%", &index.to_string());
        let file = format!("{stem}_{:05}_.png", target.counter + index as u64);
        let png = encode_png(
            &image_to_u8(images, index),
            images.width,
            images.height,
            images.channels,
            &text,
            compression,
        )?;
        write_replacing(&target.folder.join(&file), &png).map_err(|e| NodeError::typed("OSError", e.to_string()))?;
        results.push(json!({"filename": file, "subfolder": target.subfolder, "type": kind}));
    }
    let mut ui = Map::new();
    ui.insert("images".into(), Json::Array(results));
    Ok(NodeOutput::ui(ui))
}

/// `SaveImage`: PNGs in the output directory with the prompt and workflow as `tEXt`.
pub struct SaveImage;

impl Node for SaveImage {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("SaveImage", "nodes", "image")
            .display("Save Image")
            .description("Saves the input images to your ComfyUI output directory.")
            .output_node()
            .required("images", InputSpec::of("IMAGE").opt("tooltip", "The images to save."))
            .required(
                "filename_prefix",
                InputSpec::string("ComfyUI").opt("tooltip", "The prefix for the file to save. This may include formatting information such as %date:yyyy-MM-dd% or %Empty Latent Image.width% to include values from nodes."),
            )
            .hidden("prompt", HiddenInput::Prompt)
            .hidden("extra_pnginfo", HiddenInput::ExtraPngInfo)
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let paths = ctx.services.require::<Paths>()?;
        let images = inputs.object::<Image>("images")?;
        save_batch(
            ctx,
            images,
            inputs.string("filename_prefix")?,
            &paths.output,
            "output",
            PngCompression::Balanced,
        )
    }
}

/// `PreviewImage`: PNGs in the temp directory under `ComfyUI_temp_<5 random letters>`, the letters
/// fixed per node for the life of the process (ComfyUI keeps them per cached node instance).
#[derive(Default)]
pub struct PreviewImage {
    suffixes: Mutex<HashMap<String, String>>,
}

impl PreviewImage {
    /// `ComfyUI_temp_` and this node's five letters.
    pub(crate) fn prefix(&self, node_id: &str) -> String {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstupvxyz";
        let mut suffixes = self.suffixes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let suffix = suffixes.entry(node_id.to_string()).or_insert_with(|| {
            let mut rng = rand::rng();
            (0..5)
                .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
                .collect()
        });
        format!("ComfyUI_temp_{suffix}")
    }
}

impl Node for PreviewImage {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("PreviewImage", "nodes", "image")
            .display("Preview Image")
            .description("Saves the input images to your ComfyUI output directory.")
            .output_node()
            .required("images", InputSpec::of("IMAGE"))
            .hidden("prompt", HiddenInput::Prompt)
            .hidden("extra_pnginfo", HiddenInput::ExtraPngInfo)
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let paths = ctx.services.require::<Paths>()?;
        let images = inputs.object::<Image>("images")?;
        save_batch(
            ctx,
            images,
            &self.prefix(ctx.node_id),
            &paths.temp,
            "temp",
            PngCompression::Fast,
        )
    }
}

fn upscale_method_input() -> InputSpec {
    InputSpec::combo(&UPSCALE_METHODS)
}

/// `ImageScale` ("Upscale Image").
pub struct ImageScale;

impl Node for ImageScale {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ImageScale", "nodes", "image/upscaling")
            .display("Upscale Image")
            .required("image", InputSpec::of("IMAGE"))
            .required("upscale_method", upscale_method_input())
            .required("width", InputSpec::int(512, 0, MAX_RESOLUTION).opt("step", 1))
            .required("height", InputSpec::int(512, 0, MAX_RESOLUTION).opt("step", 1))
            .required("crop", InputSpec::combo(&["disabled", "center"]))
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let (mut width, mut height) = (non_negative(inputs, "width")?, non_negative(inputs, "height")?);
        if width == 0 && height == 0 {
            return Ok(image_result(image.clone()));
        }
        if width == 0 {
            width = ((image.width * height) as f64 / image.height as f64)
                .round_ties_even()
                .max(1.0) as usize;
        } else if height == 0 {
            height = ((image.height * width) as f64 / image.width as f64)
                .round_ties_even()
                .max(1.0) as usize;
        }
        let method: ResizeMethod = inputs.string("upscale_method")?.parse()?;
        let center = inputs.string("crop")? == "center";
        Ok(image_result(common_upscale(
            image, width, height, method, center, true,
        )?))
    }
}

/// `ImageScaleBy` ("Upscale Image By").
pub struct ImageScaleBy;

impl Node for ImageScaleBy {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ImageScaleBy", "nodes", "image/upscaling")
            .display("Upscale Image By")
            .required("image", InputSpec::of("IMAGE"))
            .required("upscale_method", upscale_method_input())
            .required("scale_by", InputSpec::float(1.0, 0.01, 8.0).opt("step", 0.01))
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let scale = inputs.float("scale_by")?;
        let width = (image.width as f64 * scale).round_ties_even() as usize;
        let height = (image.height as f64 * scale).round_ties_even() as usize;
        let method: ResizeMethod = inputs.string("upscale_method")?.parse()?;
        Ok(image_result(common_upscale(image, width, height, method, false, true)?))
    }
}

/// `ImageInvert`: `1 − image`.
pub struct ImageInvert;

impl Node for ImageInvert {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ImageInvert", "nodes", "image")
            .display("Invert Image")
            .required("image", InputSpec::of("IMAGE"))
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        Ok(image_result(Image {
            data: image.data.iter().map(|v| 1.0 - v).collect(),
            ..image.clone()
        }))
    }
}

/// `ImageCrop`: `image[:, y:y+height, x:x+width]` with x, y clamped inside the image.
pub struct ImageCrop;

impl Node for ImageCrop {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ImageCrop", "comfy_extras.nodes_images", "image/transform")
            .display("Image Crop")
            .required("image", InputSpec::of("IMAGE"))
            .required("width", InputSpec::int(512, 1, MAX_RESOLUTION).opt("step", 1))
            .required("height", InputSpec::int(512, 1, MAX_RESOLUTION).opt("step", 1))
            .required("x", InputSpec::int(0, 0, MAX_RESOLUTION).opt("step", 1))
            .required("y", InputSpec::int(0, 0, MAX_RESOLUTION).opt("step", 1))
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let x = non_negative(inputs, "x")?.min(image.width.saturating_sub(1));
        let y = non_negative(inputs, "y")?.min(image.height.saturating_sub(1));
        let x1 = (x + non_negative(inputs, "width")?).min(image.width);
        let y1 = (y + non_negative(inputs, "height")?).min(image.height);
        Ok(image_result(image.crop(y, y1, x, x1)))
    }
}

/// `ImageBatch`: appends image2 to image1, first matching its channels and size.
pub struct ImageBatch;

impl Node for ImageBatch {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ImageBatch", "nodes", "image")
            .display("Batch Images")
            .required("image1", InputSpec::of("IMAGE"))
            .required("image2", InputSpec::of("IMAGE"))
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let mut first = inputs.object::<Image>("image1")?.clone();
        let mut second = inputs.object::<Image>("image2")?.clone();
        if first.channels > second.channels {
            second = second.with_extra_channel(1.0);
        } else if first.channels < second.channels {
            first = first.with_extra_channel(1.0);
        }
        if (first.height, first.width, first.channels) != (second.height, second.width, second.channels) {
            second = common_upscale(&second, first.width, first.height, ResizeMethod::Bilinear, true, true)?;
        }
        Ok(image_result(Image::concat(&[first, second])?))
    }
}

/// `ImagePadForOutpaint`: a grey border, and a mask of the border feathered into the image.
pub struct ImagePadForOutpaint;

impl Node for ImagePadForOutpaint {
    fn schema(&self, _: &Services) -> NodeSchema {
        let side = || InputSpec::int(0, 0, MAX_RESOLUTION).opt("step", 8);
        NodeSchema::v1("ImagePadForOutpaint", "nodes", "image")
            .display("Pad Image for Outpainting")
            .required("image", InputSpec::of("IMAGE"))
            .required("left", side())
            .required("top", side())
            .required("right", side())
            .required("bottom", side())
            .required("feathering", InputSpec::int(40, 0, MAX_RESOLUTION).opt("step", 1))
            .output(OutputSpec::of("IMAGE"))
            .output(OutputSpec::of("MASK"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let [left, top, right, bottom, feathering] =
            ["left", "top", "right", "bottom", "feathering"].map(|n| non_negative(inputs, n));
        let (left, top, right, bottom, feathering) = (left?, top?, right?, bottom?, feathering?);
        let (h, w, c) = (image.height, image.width, image.channels);
        let (new_h, new_w) = (h + top + bottom, w + left + right);
        ensure_fits(&[image.batch + 1, new_h, new_w, c], || {
            format!("an outpainting pad to {new_w}×{new_h} (batch {})", image.batch)
        })?;
        let mut padded = Image::filled(image.batch, new_h, new_w, c, 0.5);
        for b in 0..image.batch {
            for y in 0..h {
                let src = image.index(b, y, 0, 0);
                let dst = padded.index(b, y + top, left, 0);
                padded.data[dst..dst + w * c].copy_from_slice(&image.data[src..src + w * c]);
            }
        }
        let mut mask = Mask::filled(1, new_h, new_w, 1.0);
        for i in 0..h {
            for j in 0..w {
                let mut value = 0.0f32;
                if feathering > 0 && feathering * 2 < h && feathering * 2 < w {
                    let dt = if top != 0 { i } else { h };
                    let db = if bottom != 0 { h - i } else { h };
                    let dl = if left != 0 { j } else { w };
                    let dr = if right != 0 { w - j } else { w };
                    let d = dt.min(db).min(dl).min(dr);
                    if d < feathering {
                        let v = (feathering - d) as f64 / feathering as f64;
                        value = (v * v) as f32;
                    }
                }
                mask.data[(i + top) * new_w + j + left] = value;
            }
        }
        Ok(NodeOutput::values(vec![Value::object(padded), Value::object(mask)]))
    }
}

/// `ImageCompositeMasked`: pastes `source` at (x, y) through an optional mask.
pub struct ImageCompositeMasked;

impl Node for ImageCompositeMasked {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ImageCompositeMasked", "comfy_extras.nodes_mask", "image")
            .required("destination", InputSpec::of("IMAGE"))
            .required("source", InputSpec::of("IMAGE"))
            .required("x", InputSpec::int(0, 0, MAX_RESOLUTION).opt("step", 1))
            .required("y", InputSpec::int(0, 0, MAX_RESOLUTION).opt("step", 1))
            .required("resize_source", InputSpec::boolean(false))
            .optional("mask", InputSpec::of("MASK"))
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let mut destination = inputs.object::<Image>("destination")?.clone();
        let mut source = inputs.object::<Image>("source")?.clone();
        if destination.channels < source.channels {
            source = source.first_channels(destination.channels);
        } else if destination.channels > source.channels {
            destination = destination.with_extra_channel(1.0);
        }
        if destination.channels != source.channels {
            return Err(NodeError::new(format!(
                "The size of tensor a ({}) must match the size of tensor b ({}) at non-singleton dimension 1",
                source.channels, destination.channels
            )));
        }
        let mask = inputs.optional_object::<Mask>("mask")?;
        let x = non_negative(inputs, "x")?;
        let y = non_negative(inputs, "y")?;
        composite(
            &mut destination,
            &source,
            (x, y),
            1,
            mask,
            inputs.bool("resize_source")?,
        )?;
        Ok(image_result(destination))
    }
}

/// ComfyUI's `composite(destination, source, x, y, mask, multiplier, resize_source)`: `x` and
/// `y` are in units of `multiplier` destination pixels (8 for latents). Images reach ComfyUI's
/// function channels-last (their channels moved to dimension 1), latents in plain NCHW, which
/// picks PyTorch's bilinear kernel when the source is resized.
pub fn composite(
    destination: &mut Image,
    source: &Image,
    (x, y): (usize, usize),
    multiplier: usize,
    mask: Option<&Mask>,
    resize_source: bool,
) -> Result<(), NodeError> {
    let mut source = source.clone();
    if resize_source {
        source = resize(
            &source,
            destination.height,
            destination.width,
            ResizeMethod::Bilinear,
            multiplier == 1,
        )?;
    }
    let source = source.repeat_to_batch(destination.batch);
    let left = x.min(destination.width * multiplier) / multiplier;
    let top = y.min(destination.height * multiplier) / multiplier;
    let mask = match mask {
        Some(mask) => Some(interpolate_mask(mask, source.height, source.width)?.repeat_to_batch(source.batch)),
        None => None,
    };
    let visible_w = (destination.width - left).min(source.width);
    let visible_h = (destination.height - top).min(source.height);
    for b in 0..destination.batch {
        for yy in 0..visible_h {
            for xx in 0..visible_w {
                let m = mask.as_ref().map_or(1.0, |m| m.data[m.index(b, yy, xx, 0)]);
                for c in 0..destination.channels {
                    let d = destination.index(b, top + yy, left + xx, c);
                    let s = source.data[source.index(b, yy, xx, c)];
                    destination.data[d] = m * s + (1.0 - m) * destination.data[d];
                }
            }
        }
    }
    Ok(())
}

/// `EmptyImage`: a solid colour from a 0xRRGGBB integer.
pub struct EmptyImage;

impl Node for EmptyImage {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("EmptyImage", "nodes", "image")
            .required("width", InputSpec::int(512, 1, MAX_RESOLUTION).opt("step", 1))
            .required("height", InputSpec::int(512, 1, MAX_RESOLUTION).opt("step", 1))
            .required("batch_size", InputSpec::int(1, 1, 4096))
            .required(
                "color",
                InputSpec::int(0, 0, 0xFFFFFF).opt("step", 1).opt("display", "color"),
            )
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let (width, height, batch) = (
            non_negative(inputs, "width")?,
            non_negative(inputs, "height")?,
            non_negative(inputs, "batch_size")?,
        );
        let color = inputs.int("color")?;
        let channel = |shift: i64| (((color >> shift) & 0xFF) as f64 / 255.0) as f32;
        let rgb = [channel(16), channel(8), channel(0)];
        ensure_fits(&[batch, height, width, 3], || {
            format!("an empty image of {width}×{height} (batch {batch})")
        })?;
        let data = (0..batch * height * width).flat_map(|_| rgb).collect();
        Ok(image_result(Image::new(batch, height, width, 3, data)?))
    }
}

/// `SaveImageWebsocket` (ComfyUI's shipped `custom_nodes/websocket_image_save.py`): sends each image
/// as a PNG preview to the submitting client and writes nothing. Its fingerprint is the time, so it
/// never comes from the cache.
pub struct SaveImageWebsocket;

impl Node for SaveImageWebsocket {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("SaveImageWebsocket", "custom_nodes.websocket_image_save", "api/image")
            .output_node()
            .required("images", InputSpec::of("IMAGE"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let images = inputs.object::<Image>("images")?;
        for index in 0..images.batch {
            let pixels = image_to_u8(images, index);
            let png = encode_png(
                &pixels,
                images.width,
                images.height,
                images.channels,
                &[],
                PngCompression::Fast,
            )?;
            let preview = Preview {
                image_type: "image/png",
                bytes: png,
            };
            ctx.progress_with_preview(index as u64, images.batch as u64, preview)?;
        }
        Ok(NodeOutput::default())
    }

    fn fingerprint(&self, _: &Services, _: &Map<String, Json>) -> Option<Result<Json, String>> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64());
        Some(now.map(Json::from).map_err(|e| e.to_string()))
    }
}
