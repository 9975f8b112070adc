//! Reading image files as ComfyUI's `LoadImage` does (Pillow: EXIF orientation, every frame of an
//! animation) and writing PNGs with ComfyUI's `tEXt` metadata.

use std::io::{BufReader, Cursor};
use std::path::Path;

use easel_engine::NodeError;
use image::codecs::gif::GifDecoder;
use image::{AnimationDecoder, DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use crate::image::{from_u8, to_u8, Image};

/// One decoded frame: 8-bit RGBA plus whether the file had an alpha channel.
pub struct Frame {
    pub rgba: image::RgbaImage,
    pub has_alpha: bool,
}

fn read_error(path: &Path, error: impl std::fmt::Display) -> NodeError {
    NodeError::typed(
        "OSError",
        format!("cannot identify image file '{}': {error}", path.display()),
    )
}

/// The largest image side Easel decodes (ComfyUI's `MAX_RESOLUTION`).
pub const MAX_IMAGE_SIDE: u32 = 16384;

/// What a decoder may allocate: a 16384² RGBA image with 16-bit channels.
const MAX_DECODE_BYTES: u64 = 2 << 30;

/// Pillow's `Image.MAX_IMAGE_PIXELS`. ComfyUI inherits Pillow's decompression-bomb check, which
/// refuses an image of more than twice this many pixels.
const PILLOW_MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// Pillow's `DecompressionBombError` for an image of more than twice [`PILLOW_MAX_IMAGE_PIXELS`],
/// checked on the header's size before anything is decoded.
fn check_decompression_bomb((width, height): (u32, u32)) -> Result<(), NodeError> {
    let pixels = u64::from(width) * u64::from(height);
    let limit = 2 * PILLOW_MAX_IMAGE_PIXELS;
    if pixels > limit {
        return Err(NodeError::typed(
            "PIL.Image.DecompressionBombError",
            format!(
                "Image size ({pixels} pixels) exceeds limit of {limit} pixels, could be decompression bomb DOS attack."
            ),
        ));
    }
    Ok(())
}

/// Limits against decompression bombs: a small file that claims an enormous image is refused
/// before anything is allocated.
fn decode_limits() -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    limits
}

/// Decodes every frame of an image file, each turned upright by its EXIF orientation.
pub fn load_frames(path: &Path) -> Result<Vec<Frame>, NodeError> {
    let bytes =
        std::fs::read(path).map_err(|e| NodeError::typed("FileNotFoundError", format!("{}: {e}", path.display())))?;
    let mut reader = ImageReader::new(Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| read_error(path, e))?;
    reader.limits(decode_limits());
    if reader.format() == Some(ImageFormat::Gif) {
        let mut decoder = GifDecoder::new(BufReader::new(Cursor::new(&bytes))).map_err(|e| read_error(path, e))?;
        decoder.set_limits(decode_limits()).map_err(|e| read_error(path, e))?;
        check_decompression_bomb(decoder.dimensions())?;
        let frames = decoder
            .into_frames()
            .collect_frames()
            .map_err(|e| read_error(path, e))?;
        // Pillow gives GIF frames an alpha band only when the GIF has transparency.
        return Ok(frames
            .into_iter()
            .map(|f| {
                let rgba = f.into_buffer();
                let has_alpha = rgba.pixels().any(|p| p.0[3] != 255);
                Frame { rgba, has_alpha }
            })
            .collect());
    }
    let mut decoder = reader.into_decoder().map_err(|e| read_error(path, e))?;
    check_decompression_bomb(decoder.dimensions())?;
    let orientation = decoder.orientation().map_err(|e| read_error(path, e))?;
    let mut decoded = DynamicImage::from_decoder(decoder).map_err(|e| read_error(path, e))?;
    decoded.apply_orientation(orientation);
    let has_alpha = decoded.color().has_alpha();
    Ok(vec![Frame {
        rgba: to_rgba8_like_pillow(&decoded),
        has_alpha,
    }])
}

/// 8-bit RGBA as Pillow opens the file: 16-bit colour keeps the high byte, 16-bit grey is clipped
/// (Pillow's `I;16` → `RGB` conversion).
fn to_rgba8_like_pillow(decoded: &DynamicImage) -> image::RgbaImage {
    match decoded {
        DynamicImage::ImageRgb16(_) | DynamicImage::ImageRgba16(_) => {
            let wide = decoded.to_rgba16();
            image::RgbaImage::from_fn(wide.width(), wide.height(), |x, y| {
                let p = wide.get_pixel(x, y).0;
                image::Rgba([
                    (p[0] >> 8) as u8,
                    (p[1] >> 8) as u8,
                    (p[2] >> 8) as u8,
                    (p[3] >> 8) as u8,
                ])
            })
        }
        DynamicImage::ImageLuma16(_) | DynamicImage::ImageLumaA16(_) => {
            let wide = decoded.to_luma_alpha16();
            image::RgbaImage::from_fn(wide.width(), wide.height(), |x, y| {
                let p = wide.get_pixel(x, y).0;
                let v = p[0].min(255) as u8;
                image::Rgba([v, v, v, (p[1] >> 8) as u8])
            })
        }
        other => other.to_rgba8(),
    }
}

/// The RGB channels of frames as an `IMAGE` (`np.float32(v) / 255`).
pub fn frames_to_image(frames: &[&Frame]) -> Result<Image, NodeError> {
    let first = frames.first().ok_or_else(|| NodeError::new("image has no frames"))?;
    let (w, h) = first.rgba.dimensions();
    // The image and its mask, in f32.
    crate::runtime::ensure_fits(&[frames.len(), h as usize, w as usize, 4], || {
        format!("an image of {w}×{h} ({} frames)", frames.len())
    })?;
    let mut data = Vec::with_capacity(frames.len() * (w * h * 3) as usize);
    for frame in frames {
        for pixel in frame.rgba.pixels() {
            data.extend(pixel.0[..3].iter().map(|&v| from_u8(v)));
        }
    }
    Image::new(frames.len(), h as usize, w as usize, 3, data)
}

/// 8-bit pixels of one batch item, for PNG encoding (1, 3 or 4 channels).
pub fn image_to_u8(image: &Image, index: usize) -> Vec<u8> {
    image.frame(index).iter().map(|&v| to_u8(v)).collect()
}

/// How hard zlib works (Pillow's `compress_level`).
#[derive(Debug, Clone, Copy)]
pub enum PngCompression {
    /// `compress_level=1` (previews).
    Fast,
    /// `compress_level=4` (saved images).
    Balanced,
}

/// A PNG with `tEXt` chunks before the image data, as Pillow's `PngInfo.add_text` writes them.
pub fn encode_png(
    pixels: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    text: &[(String, String)],
    compression: PngCompression,
) -> Result<Vec<u8>, NodeError> {
    let color = match channels {
        1 => png::ColorType::Grayscale,
        2 => png::ColorType::GrayscaleAlpha,
        3 => png::ColorType::Rgb,
        4 => png::ColorType::Rgba,
        other => {
            return Err(NodeError::typed(
                "TypeError",
                format!("Cannot handle this data type: {other} channels"),
            ))
        }
    };
    let (w, h) = (
        u32::try_from(width).map_err(|_| NodeError::value("image too wide"))?,
        u32::try_from(height).map_err(|_| NodeError::value("image too tall"))?,
    );
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, w, h);
        encoder.set_color(color);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_compression(match compression {
            PngCompression::Fast => png::Compression::Fast,
            PngCompression::Balanced => png::Compression::Balanced,
        });
        for (key, value) in text {
            encoder.add_text_chunk(key.clone(), value.clone()).map_err(png_error)?;
        }
        let mut writer = encoder.write_header().map_err(png_error)?;
        writer.write_image_data(pixels).map_err(png_error)?;
        writer.finish().map_err(png_error)?;
    }
    Ok(out)
}

fn png_error(error: png::EncodingError) -> NodeError {
    NodeError::typed("OSError", format!("PNG encoding failed: {error}"))
}

/// The `tEXt`/`iTXt` chunks of a PNG, as (keyword, text) pairs (empty for other formats).
pub fn png_text_chunks(bytes: &[u8]) -> Vec<(String, String)> {
    let Ok(reader) = png::Decoder::new(Cursor::new(bytes)).read_info() else {
        return Vec::new();
    };
    let info = reader.info();
    let latin1 = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()));
    let utf8 = info
        .utf8_text
        .iter()
        .filter_map(|t| t.get_text().ok().map(|text| (t.keyword.clone(), text)));
    latin1.chain(utf8).collect()
}

fn decode(bytes: &[u8]) -> Result<DynamicImage, NodeError> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| NodeError::value(format!("unreadable image: {e}")))?;
    reader.limits(decode_limits());
    let unreadable = |e: image::ImageError| NodeError::value(format!("unreadable image: {e}"));
    let decoder = reader.into_decoder().map_err(unreadable)?;
    check_decompression_bomb(decoder.dimensions())?;
    DynamicImage::from_decoder(decoder).map_err(unreadable)
}

/// ComfyUI's `/upload/mask`: the original's RGB with the mask's alpha, as PNG, keeping the
/// original's text chunks.
pub fn replace_alpha(original: &[u8], mask: &[u8]) -> Result<Vec<u8>, NodeError> {
    let text = png_text_chunks(original);
    let mut image = decode(original)?.to_rgba8();
    let alpha = decode(mask)?.to_rgba8();
    if image.dimensions() != alpha.dimensions() {
        return Err(NodeError::value(format!(
            "the mask is {:?} but the image is {:?}",
            alpha.dimensions(),
            image.dimensions()
        )));
    }
    for (pixel, mask_pixel) in image.pixels_mut().zip(alpha.pixels()) {
        pixel.0[3] = mask_pixel.0[3];
    }
    let (w, h) = image.dimensions();
    encode_png(
        image.as_raw(),
        w as usize,
        h as usize,
        4,
        &text,
        PngCompression::Balanced,
    )
}

/// What `/view` sends for `channel`: `rgb` (a PNG without alpha) or `a` (an RGBA PNG whose colour
/// is black and whose alpha is the file's, 255 where it has none).
pub fn view_channel(bytes: &[u8], channel: &str) -> Result<Vec<u8>, NodeError> {
    let image = decode(bytes)?;
    let (w, h) = (image.width() as usize, image.height() as usize);
    match channel {
        "rgb" => encode_png(image.to_rgb8().as_raw(), w, h, 3, &[], PngCompression::Fast),
        _ => {
            let mut rgba = image.to_rgba8();
            for pixel in rgba.pixels_mut() {
                pixel.0 = [0, 0, 0, pixel.0[3]];
            }
            encode_png(rgba.as_raw(), w, h, 4, &[], PngCompression::Fast)
        }
    }
}

/// `/view?preview=jpeg;Q` or `webp;Q`: the image re-encoded at quality Q as PIL does it (JPEG, or
/// lossy WebP keeping any alpha losslessly), with its MIME type. `rgb_only` drops alpha first.
pub fn view_preview(
    bytes: &[u8],
    format: PreviewFormat,
    quality: u8,
    rgb_only: bool,
) -> Result<(Vec<u8>, &'static str), NodeError> {
    let image = decode(bytes)?;
    let (width, height) = (image.width(), image.height());
    let keep_alpha = !rgb_only && image.color().has_alpha();
    match format {
        PreviewFormat::Jpeg => {
            let mut out = Vec::new();
            let rgb = DynamicImage::ImageRgb8(image.to_rgb8());
            let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100));
            rgb.write_with_encoder(encoder)
                .map_err(|e| NodeError::new(format!("cannot encode the preview: {e}")))?;
            Ok((out, "image/jpeg"))
        }
        PreviewFormat::WebP => {
            let pixels = if keep_alpha {
                image.to_rgba8().into_raw()
            } else {
                image.to_rgb8().into_raw()
            };
            let encoder = if keep_alpha {
                webp::Encoder::from_rgba(&pixels, width, height)
            } else {
                webp::Encoder::from_rgb(&pixels, width, height)
            };
            let encoded = encoder
                .encode_simple(false, f32::from(quality.min(100)))
                .map_err(|e| NodeError::new(format!("cannot encode the preview: {e:?}")))?;
            Ok((encoded.to_vec(), "image/webp"))
        }
    }
}

/// The formats `/view?preview=` converts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreviewFormat {
    Jpeg,
    WebP,
}
