//! ComfyUI's animation savers (`comfy_extras/nodes_images.py`): SaveAnimatedWEBP and
//! SaveAnimatedPNG write a whole image batch as one animated file in the output directory, with
//! the prompt and workflow as Pillow stores them (EXIF in WebP, private `comf` chunks in APNG).

use easel_engine::pyjson::dumps;
use easel_engine::schema::{InputSpec, NodeSchema};
use easel_engine::{HiddenInput, Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services};
use serde_json::{json, Map, Value as Json};

use crate::image::io::image_to_u8;
use crate::image::nodes::{save_target, ImageMetadata, SaveTarget};
use crate::image::Image;
use crate::paths::{write_replacing, Paths};

/// The inputs both savers share, in ComfyUI's order.
fn animation_schema(name: &str) -> NodeSchema {
    NodeSchema::v1(name, "comfy_extras.nodes_images", "image/animation")
        .output_node()
        .required("images", InputSpec::of("IMAGE"))
        .required("filename_prefix", InputSpec::string("ComfyUI"))
        .required("fps", InputSpec::float(6.0, 0.01, 1000.0).opt("step", 0.01))
}

/// The batch as 8-bit frames (Pillow's `Image.fromarray`, which takes LA, RGB and RGBA), the
/// frame duration ComfyUI passes (`int(1000.0 / fps)` milliseconds) and where the file goes.
struct Animation {
    frames: Vec<Vec<u8>>,
    width: usize,
    height: usize,
    channels: usize,
    duration_ms: u64,
    target: SaveTarget,
}

impl Animation {
    fn new(ctx: &NodeContext, inputs: &NodeInputs) -> Result<Self, NodeError> {
        let paths = ctx.services.require::<Paths>()?;
        let images = inputs.object::<Image>("images")?;
        if images.batch == 0 {
            return Err(NodeError::typed(
                "IndexError",
                "index 0 is out of bounds for dimension 0 with size 0",
            ));
        }
        if !(2..=4).contains(&images.channels) {
            return Err(NodeError::typed(
                "TypeError",
                format!("Cannot handle this data type: (1, 1, {}), |u1", images.channels),
            ));
        }
        let fps = inputs.float("fps")?;
        if fps == 0.0 {
            return Err(NodeError::typed("ZeroDivisionError", "float division by zero"));
        }
        let target = save_target(
            inputs.string("filename_prefix")?,
            &paths.output,
            images.width,
            images.height,
        )?;
        Ok(Animation {
            frames: (0..images.batch).map(|index| image_to_u8(images, index)).collect(),
            width: images.width,
            height: images.height,
            channels: images.channels,
            duration_ms: (1000.0 / fps) as u64,
            target,
        })
    }

    /// Writes `bytes` as the counter's file with `extension`; returns the UI's `images` item.
    fn write(&self, extension: &str, bytes: &[u8]) -> Result<Json, NodeError> {
        let file = format!("{}_{:05}_.{extension}", self.target.filename, self.target.counter);
        write_replacing(&self.target.folder.join(&file), bytes)
            .map_err(|e| NodeError::typed("OSError", e.to_string()))?;
        Ok(json!({"filename": file, "subfolder": self.target.subfolder, "type": "output"}))
    }
}

/// `{"images": [item], "animated": [animated]}`.
fn animation_ui(item: Json, animated: bool) -> NodeOutput {
    let mut ui = Map::new();
    ui.insert("images".into(), json!([item]));
    ui.insert("animated".into(), json!([animated]));
    NodeOutput::ui(ui)
}

/// The metadata ComfyUI saves, as (key, `json.dumps(value)`) pairs: the prompt, then each entry of
/// `extra_pnginfo` (the workflow); none with `--disable-metadata`.
fn metadata_entries(ctx: &NodeContext) -> Vec<(String, String)> {
    if !ctx.services.get::<ImageMetadata>().is_none_or(|m| m.enabled) {
        return Vec::new();
    }
    let mut entries = vec![("prompt".to_string(), dumps(ctx.prompt))];
    if let Some(Json::Object(extra)) = ctx.extra_pnginfo {
        entries.extend(extra.iter().map(|(key, value)| (key.clone(), dumps(value))));
    }
    entries
}

/// Consecutive frames that are pixel-identical, merged into one shown for their summed time (as
/// both libwebp's animation encoder and Pillow's APNG writer do): (frame index, duration) pairs.
/// `fits` says whether a merged duration can still be written.
fn merge_repeats(frames: &[Vec<u8>], duration: u64, fits: impl Fn(u64) -> bool) -> Vec<(usize, u64)> {
    let mut shown: Vec<(usize, u64)> = Vec::with_capacity(frames.len());
    for (index, frame) in frames.iter().enumerate() {
        if let Some((previous, time)) = shown.last_mut() {
            if frames[*previous] == *frame && fits(*time + duration) {
                *time += duration;
                continue;
            }
        }
        shown.push((index, duration));
    }
    shown
}

/// `SaveAnimatedWEBP`: the batch as one WebP animation (a still image for a single frame, as
/// Pillow writes it), lossless or lossy at `quality` with libwebp's `method` effort. The prompt
/// and workflow go into EXIF: tag 0x0110 holds `prompt:<json>`, tags 0x010F downwards
/// `<key>:<json>` for each `extra_pnginfo` entry.
///
/// Every frame is encoded whole, so files are larger than libwebp's animation encoder makes them
/// (it stores only the changed rectangle of most frames); they decode to the same frames.
pub struct SaveAnimatedWebp;

/// ComfyUI's `methods`: libwebp's effort for each choice.
const WEBP_METHODS: [(&str, i32); 3] = [("default", 4), ("fastest", 0), ("slowest", 6)];

/// The longest frame duration a WebP `ANMF` chunk holds (24 bits of milliseconds).
const WEBP_MAX_DURATION: u64 = (1 << 24) - 1;

impl Node for SaveAnimatedWebp {
    fn schema(&self, _: &Services) -> NodeSchema {
        let methods: Vec<&str> = WEBP_METHODS.iter().map(|(name, _)| *name).collect();
        animation_schema("SaveAnimatedWEBP")
            .required("lossless", InputSpec::boolean(true))
            .required("quality", InputSpec::int(80, 0, 100))
            .required("method", InputSpec::combo(&methods))
            .hidden("prompt", HiddenInput::Prompt)
            .hidden("extra_pnginfo", HiddenInput::ExtraPngInfo)
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let method_name = inputs.string("method")?;
        let method = WEBP_METHODS
            .iter()
            .find(|(name, _)| *name == method_name)
            .map(|(_, method)| *method)
            .ok_or_else(|| NodeError::value(format!("unknown method {method_name}")))?;
        let mut config =
            webp::WebPConfig::new().map_err(|_| NodeError::typed("OSError", "cannot set up the WebP encoder"))?;
        config.lossless = i32::from(inputs.bool("lossless")?);
        config.quality = inputs.int("quality")? as f32;
        config.alpha_quality = 100;
        config.method = method;
        config.exact = 0;
        let animation = Animation::new(ctx, inputs)?;
        if animation.duration_ms > WEBP_MAX_DURATION {
            return Err(webp_error(format!(
                "a frame of {} ms is too long",
                animation.duration_ms
            )));
        }
        let exif = exif_bytes(&metadata_entries(ctx));
        let bytes = if animation.frames.len() == 1 {
            // Pillow saves a single frame with the still-image API, which drops EXIF's `Exif\0\0`.
            let frame = encode_webp_frame(&animation, &animation.frames[0], &config)?;
            webp_still(&animation, &frame, &exif[EXIF_PREFIX.len()..])?
        } else {
            let shown = merge_repeats(&animation.frames, animation.duration_ms, |d| d <= WEBP_MAX_DURATION);
            if shown.len() == 1 {
                // libwebp stores an animation of one distinct frame as a still image.
                let frame = encode_webp_frame(&animation, &animation.frames[0], &config)?;
                webp_still(&animation, &frame, &exif)?
            } else {
                webp_animation(&animation, &shown, &config, &exif)?
            }
        };
        let item = animation.write("webp", &bytes)?;
        Ok(animation_ui(item, animation.frames.len() != 1))
    }
}

/// What Pillow's `Image.Exif.tobytes()` starts with.
const EXIF_PREFIX: &[u8] = b"Exif\0\0";

/// Pillow's `Image.Exif` holding ComfyUI's metadata, as `tobytes()` writes it: `Exif\0\0`, a
/// big-endian TIFF header and one IFD of ASCII entries sorted by tag, each value NUL-terminated
/// (characters outside ASCII as `?`), stored inline when it fits in 4 bytes, else after the IFD
/// padded to an even length.
fn exif_bytes(entries: &[(String, String)]) -> Vec<u8> {
    // The prompt (the first entry) is tag 0x0110, the entries after it 0x010F, 0x010E, …
    let mut tags: Vec<(u16, Vec<u8>)> = entries
        .iter()
        .enumerate()
        .map(|(index, (key, value))| {
            let mut ascii: Vec<u8> = format!("{key}:{value}")
                .chars()
                .map(|c| if c.is_ascii() { c as u8 } else { b'?' })
                .collect();
            ascii.push(0);
            (0x0110u16.wrapping_sub(index as u16), ascii)
        })
        .collect();
    tags.sort_by_key(|(tag, _)| *tag);
    let mut out = EXIF_PREFIX.to_vec();
    out.extend_from_slice(b"MM\0*\0\0\0\x08");
    out.extend_from_slice(&(tags.len() as u16).to_be_bytes());
    let mut offset = 8 + 2 + 12 * tags.len() + 4;
    let mut data = Vec::new();
    for (tag, value) in &tags {
        out.extend_from_slice(&tag.to_be_bytes());
        out.extend_from_slice(&2u16.to_be_bytes());
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        if value.len() <= 4 {
            let mut inline = [0u8; 4];
            inline[..value.len()].copy_from_slice(value);
            out.extend_from_slice(&inline);
        } else {
            out.extend_from_slice(&(offset as u32).to_be_bytes());
            data.extend_from_slice(value);
            if value.len() % 2 == 1 {
                data.push(0);
            }
            offset += value.len().div_ceil(2) * 2;
        }
    }
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&data);
    out
}

/// One RIFF chunk: its four-character code and its data.
type RiffChunk<'a> = (&'a [u8], &'a [u8]);

fn webp_error(message: impl std::fmt::Display) -> NodeError {
    NodeError::typed("OSError", format!("cannot write file as WebP: {message}"))
}

/// One frame encoded alone by libwebp with `config`: a complete still WebP file.
fn encode_webp_frame(animation: &Animation, frame: &[u8], config: &webp::WebPConfig) -> Result<Vec<u8>, NodeError> {
    let (width, height) = (
        u32::try_from(animation.width).map_err(webp_error)?,
        u32::try_from(animation.height).map_err(webp_error)?,
    );
    // Pillow converts LA frames to RGBA before encoding.
    let rgba;
    let (pixels, layout) = match animation.channels {
        2 => {
            rgba = frame
                .chunks(2)
                .flat_map(|p| [p[0], p[0], p[0], p[1]])
                .collect::<Vec<u8>>();
            (rgba.as_slice(), webp::PixelLayout::Rgba)
        }
        3 => (frame, webp::PixelLayout::Rgb),
        _ => (frame, webp::PixelLayout::Rgba),
    };
    let encoded = webp::Encoder::new(pixels, layout, width, height)
        .encode_advanced(config)
        .map_err(|e| webp_error(format!("{e:?}")))?;
    Ok(encoded.to_vec())
}

/// The chunks of a WebP file, after its `RIFF` header.
fn riff_chunks(file: &[u8]) -> Result<Vec<RiffChunk<'_>>, NodeError> {
    if file.len() < 12 || &file[..4] != b"RIFF" || &file[8..12] != b"WEBP" {
        return Err(webp_error("the encoder returned no WebP file"));
    }
    let mut chunks = Vec::new();
    let mut at = 12;
    while at + 8 <= file.len() {
        let size = u32::from_le_bytes([file[at + 4], file[at + 5], file[at + 6], file[at + 7]]) as usize;
        let data = file
            .get(at + 8..at + 8 + size)
            .ok_or_else(|| webp_error("the encoder returned a truncated chunk"))?;
        chunks.push((&file[at..at + 4], data));
        at += 8 + size + size % 2;
    }
    Ok(chunks)
}

/// A still WebP file's image chunks (`ALPH`, `VP8 `, `VP8L`) without its `VP8X` header, and
/// whether the image has transparency.
fn image_chunks(file: &[u8]) -> Result<(Vec<RiffChunk<'_>>, bool), NodeError> {
    let chunks = riff_chunks(file)?;
    let mut alpha = false;
    let mut image = Vec::with_capacity(chunks.len());
    for (fourcc, data) in chunks {
        match fourcc {
            b"VP8X" => continue,
            b"ALPH" => alpha = true,
            // The VP8L header: a signature byte, then 14 + 14 bits of size and the alpha bit.
            b"VP8L" => alpha |= data.get(4).is_some_and(|bits| bits & 0x10 != 0),
            _ => {}
        }
        image.push((fourcc, data));
    }
    Ok((image, alpha))
}

fn push_chunk(out: &mut Vec<u8>, fourcc: &[u8], data: &[u8]) {
    out.extend_from_slice(fourcc);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
    if data.len() % 2 == 1 {
        out.push(0);
    }
}

/// A 24-bit little-endian field.
fn push_u24(out: &mut Vec<u8>, value: usize) {
    out.extend_from_slice(&(value as u32).to_le_bytes()[..3]);
}

/// The `VP8X` header: ALPHA (0x10), EXIF (0x08) and ANIMATION (0x02) flags and the canvas size.
fn vp8x(animation: &Animation, alpha: bool, animated: bool) -> Vec<u8> {
    let flags = 0x08 | if alpha { 0x10 } else { 0 } | if animated { 0x02 } else { 0 };
    let mut data = vec![flags, 0, 0, 0];
    push_u24(&mut data, animation.width - 1);
    push_u24(&mut data, animation.height - 1);
    data
}

/// A RIFF WebP file around `body`.
fn riff(body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + body.len());
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(4 + body.len() as u32).to_le_bytes());
    out.extend_from_slice(b"WEBP");
    out.extend_from_slice(&body);
    out
}

/// An encoded still frame in the extended format, followed by an `EXIF` chunk.
fn webp_still(animation: &Animation, frame: &[u8], exif: &[u8]) -> Result<Vec<u8>, NodeError> {
    let (chunks, alpha) = image_chunks(frame)?;
    let mut body = Vec::new();
    push_chunk(&mut body, b"VP8X", &vp8x(animation, alpha, false));
    for (fourcc, data) in chunks {
        push_chunk(&mut body, fourcc, data);
    }
    push_chunk(&mut body, b"EXIF", exif);
    Ok(riff(body))
}

/// An animated WebP: `VP8X`, `ANIM` (transparent background, endless loop, Pillow's defaults),
/// one whole-canvas `ANMF` per shown frame that replaces the canvas (no blending, no disposal),
/// then `EXIF`.
fn webp_animation(
    animation: &Animation,
    shown: &[(usize, u64)],
    config: &webp::WebPConfig,
    exif: &[u8],
) -> Result<Vec<u8>, NodeError> {
    let encoded = shown
        .iter()
        .map(|(index, _)| encode_webp_frame(animation, &animation.frames[*index], config))
        .collect::<Result<Vec<_>, _>>()?;
    let mut frames = Vec::with_capacity(encoded.len());
    let mut alpha = false;
    for file in &encoded {
        let (chunks, has_alpha) = image_chunks(file)?;
        alpha |= has_alpha;
        frames.push(chunks);
    }
    let mut body = Vec::new();
    push_chunk(&mut body, b"VP8X", &vp8x(animation, alpha, true));
    push_chunk(&mut body, b"ANIM", &[0, 0, 0, 0, 0, 0]);
    for (chunks, (_, duration)) in frames.iter().zip(shown) {
        let mut frame = Vec::new();
        push_u24(&mut frame, 0);
        push_u24(&mut frame, 0);
        push_u24(&mut frame, animation.width - 1);
        push_u24(&mut frame, animation.height - 1);
        push_u24(&mut frame, *duration as usize);
        frame.push(0x02);
        for (fourcc, data) in chunks {
            push_chunk(&mut frame, fourcc, data);
        }
        push_chunk(&mut body, b"ANMF", &frame);
    }
    push_chunk(&mut body, b"EXIF", exif);
    Ok(riff(body))
}

/// `SaveAnimatedPNG`: the batch as one APNG at zlib level `compress_level`, written as Pillow
/// writes it: each frame after the first stores only the rectangle that changed, repeated frames
/// are merged, a single frame is a plain PNG. The prompt and workflow follow the image data as
/// private `comf` chunks, `<key>\0<json>`.
pub struct SaveAnimatedPng;

impl Node for SaveAnimatedPng {
    fn schema(&self, _: &Services) -> NodeSchema {
        animation_schema("SaveAnimatedPNG")
            .required("compress_level", InputSpec::int(4, 0, 9))
            .hidden("prompt", HiddenInput::Prompt)
            .hidden("extra_pnginfo", HiddenInput::ExtraPngInfo)
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let level = inputs.int("compress_level")?;
        let level = u8::try_from(level)
            .ok()
            .filter(|level| *level <= 9)
            .ok_or_else(|| NodeError::value(format!("compress_level must be 0 to 9, got {level}")))?;
        let animation = Animation::new(ctx, inputs)?;
        let comf = metadata_entries(ctx)
            .into_iter()
            .map(|(key, value)| {
                let mut data = latin1(&key)?;
                data.push(0);
                data.extend_from_slice(&latin1(&value)?);
                Ok(data)
            })
            .collect::<Result<Vec<_>, NodeError>>()?;
        let bytes = encode_apng(&animation, level, &comf)?;
        let item = animation.write("png", &bytes)?;
        Ok(animation_ui(item, true))
    }
}

/// Python's `text.encode("latin-1", "strict")`.
fn latin1(text: &str) -> Result<Vec<u8>, NodeError> {
    text.chars()
        .enumerate()
        .map(|(position, c)| {
            u8::try_from(u32::from(c)).map_err(|_| {
                let code = u32::from(c);
                let escaped = if code > 0xFFFF {
                    format!("\\U{code:08x}")
                } else {
                    format!("\\u{code:04x}")
                };
                NodeError::typed(
                    "UnicodeEncodeError",
                    format!("'latin-1' codec can't encode character '{escaped}' in position {position}: ordinal not in range(256)"),
                )
            })
        })
        .collect()
}

/// A frame delay of `ms` milliseconds as Pillow writes it: `Fraction(ms / 1000)` in lowest terms
/// (its `limit_denominator(65535)` finds exactly that); `None` when the numerator exceeds 16 bits.
fn apng_delay(ms: u64) -> Option<(u16, u16)> {
    let (mut a, mut b) = (ms, 1000u64);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    let divisor = if ms == 0 { 1000 } else { a };
    Some((u16::try_from(ms / divisor).ok()?, u16::try_from(1000 / divisor).ok()?))
}

/// The smallest rectangle `(x0, y0, x1, y1)` holding every pixel that differs between two frames
/// (Pillow's `ImageChops.subtract_modulo(...).getbbox()`), `None` when they are equal.
fn changed_box(before: &[u8], after: &[u8], width: usize, channels: usize) -> Option<(usize, usize, usize, usize)> {
    let row = width * channels;
    let mut found: Option<(usize, usize, usize, usize)> = None;
    for (y, (a, b)) in before.chunks(row).zip(after.chunks(row)).enumerate() {
        for (x, (p, q)) in a.chunks(channels).zip(b.chunks(channels)).enumerate() {
            if p != q {
                found = Some(match found {
                    None => (x, y, x + 1, y + 1),
                    Some((x0, y0, x1, y1)) => (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1)),
                });
            }
        }
    }
    found
}

fn png_error(error: png::EncodingError) -> NodeError {
    NodeError::typed("OSError", format!("PNG encoding failed: {error}"))
}

/// The APNG file: `IHDR`, `acTL` with an endless loop, then per frame an `fcTL` (delay, the
/// changed rectangle, no disposal, source blending) with its data (`IDAT` for the first, `fdAT`
/// after), then the `comf` chunks and `IEND`.
fn encode_apng(animation: &Animation, level: u8, comf: &[Vec<u8>]) -> Result<Vec<u8>, NodeError> {
    let cannot = || NodeError::value("cannot write duration");
    let shown = merge_repeats(&animation.frames, animation.duration_ms, |ms| apng_delay(ms).is_some());
    let (width, height, channels) = (animation.width, animation.height, animation.channels);
    let mut out = Vec::new();
    {
        let (w, h) = (
            u32::try_from(width).map_err(|_| NodeError::value("image too wide"))?,
            u32::try_from(height).map_err(|_| NodeError::value("image too tall"))?,
        );
        let mut encoder = png::Encoder::new(&mut out, w, h);
        encoder.set_color(match channels {
            2 => png::ColorType::GrayscaleAlpha,
            3 => png::ColorType::Rgb,
            _ => png::ColorType::Rgba,
        });
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_deflate_compression(match level {
            0 => png::DeflateCompression::NoCompression,
            level => png::DeflateCompression::Level(level),
        });
        if shown.len() > 1 {
            encoder.set_animated(shown.len() as u32, 0).map_err(png_error)?;
        }
        let mut writer = encoder.write_header().map_err(png_error)?;
        let mut previous: Option<usize> = None;
        for &(index, ms) in &shown {
            let frame = &animation.frames[index];
            let changed = previous.and_then(|p| changed_box(&animation.frames[p], frame, width, channels));
            previous = Some(index);
            if shown.len() == 1 {
                writer.write_image_data(frame).map_err(png_error)?;
                continue;
            }
            let (x0, y0, x1, y1) = changed.unwrap_or((0, 0, width, height));
            let (numerator, denominator) = apng_delay(ms).ok_or_else(cannot)?;
            writer.set_frame_delay(numerator, denominator).map_err(png_error)?;
            writer.reset_frame_position().map_err(png_error)?;
            writer
                .set_frame_dimension((x1 - x0) as u32, (y1 - y0) as u32)
                .map_err(png_error)?;
            writer.set_frame_position(x0 as u32, y0 as u32).map_err(png_error)?;
            let row = width * channels;
            let cropped: Vec<u8> = frame
                .chunks(row)
                .skip(y0)
                .take(y1 - y0)
                .flat_map(|line| &line[x0 * channels..x1 * channels])
                .copied()
                .collect();
            writer.write_image_data(&cropped).map_err(png_error)?;
        }
        for data in comf {
            writer
                .write_chunk(png::chunk::ChunkType(*b"comf"), data)
                .map_err(png_error)?;
        }
        writer.finish().map_err(png_error)?;
    }
    Ok(out)
}
