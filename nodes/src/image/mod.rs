//! The image category: ComfyUI's `IMAGE` and `MASK` values (float32 batches in ComfyUI's
//! layouts, defined here) and the nodes that load, save, scale, crop, compose and filter images.
//!
//! `IMAGE` is `[B, H, W, C]` (channel-last, values 0..1); `MASK` is `[B, H, W]` (1 = masked). The
//! nodes that build them reproduce ComfyUI's arithmetic on these plain buffers.
//!
//! - [`nodes`]: LoadImage, LoadImageMask, SaveImage, PreviewImage, ImageScale(By), ImageInvert,
//!   ImageCrop, ImageBatch, ImagePadForOutpaint, ImageCompositeMasked, EmptyImage,
//!   SaveImageWebsocket;
//! - [`transform`]: ImageRotate, ImageFlip, ImageScaleToMaxDimension, RepeatImageBatch,
//!   ImageFromBatch, ImageAddNoise;
//! - [`filters`]: ImageBlend, ImageBlur, ImageSharpen, ImageQuantize, Morphology
//!   (`image/postprocessing`);
//! - [`layout`]: ImageStitch, ResizeAndPadImage, ImageScaleToTotalPixels, RebatchImages;
//! - [`alpha`]: PorterDuffImageComposite, SplitImageWithAlpha, JoinImageWithAlpha
//!   (`mask/compositing`);
//! - [`canny`]: Canny (`image/preprocessors`);
//! - [`yuv`]: ImageRGBToYUV, ImageYUVToRGB (`image/batch`);
//! - [`animated`]: SaveAnimatedWEBP, SaveAnimatedPNG;
//! - [`output_nodes`]: LoadImageOutput, GetImageSize, PreviewAny, MaskPreview;
//! - [`io`]: decoding image files and writing PNGs with metadata;
//! - [`resample`]: PyTorch's and Pillow's resampling, as ComfyUI uses them.

pub mod alpha;
pub mod animated;
pub mod canny;
pub mod filters;
pub mod io;
pub mod layout;
pub mod nodes;
pub mod output_nodes;
pub mod resample;
pub mod transform;
pub mod yuv;

use easel_engine::{NodeError, NodeObject, NodeRegistry};

/// Adds the image nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    registry.register(nodes::LoadImage);
    registry.register(nodes::LoadImageMask);
    registry.register(nodes::SaveImage);
    registry.register(nodes::PreviewImage::default());
    registry.register(nodes::ImageScale);
    registry.register(nodes::ImageScaleBy);
    registry.register(nodes::ImageInvert);
    registry.register(nodes::ImageCrop);
    registry.register(nodes::ImageBatch);
    registry.register(nodes::ImagePadForOutpaint);
    registry.register(nodes::ImageCompositeMasked);
    registry.register(nodes::EmptyImage);
    registry.register(canny::Canny);
    registry.register(nodes::SaveImageWebsocket);
    registry.register(transform::RepeatImageBatch);
    registry.register(transform::ImageFromBatch);
    registry.register(transform::ImageAddNoise);
    registry.register(transform::ImageRotate);
    registry.register(transform::ImageFlip);
    registry.register(transform::ImageScaleToMaxDimension);
    registry.register(filters::ImageBlend);
    registry.register(filters::ImageBlur);
    registry.register(filters::ImageSharpen);
    registry.register(filters::ImageQuantize);
    registry.register(filters::Morphology);
    registry.register(yuv::ImageRgbToYuv);
    registry.register(yuv::ImageYuvToRgb);
    registry.register(layout::ImageStitch);
    registry.register(layout::ResizeAndPadImage);
    registry.register(layout::ImageScaleToTotalPixels);
    registry.register(layout::RebatchImages);
    registry.register(alpha::PorterDuffImageComposite);
    registry.register(alpha::SplitImageWithAlpha);
    registry.register(alpha::JoinImageWithAlpha);
    registry.register(animated::SaveAnimatedWebp);
    registry.register(animated::SaveAnimatedPng);
    registry.register(output_nodes::LoadImageOutput);
    registry.register(output_nodes::GetImageSize);
    registry.register(output_nodes::PreviewAny);
    registry.register(output_nodes::MaskPreview::default());
}

/// An `IMAGE` batch, `[batch, height, width, channels]`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub channels: usize,
    pub data: Vec<f32>,
}

impl NodeObject for Image {
    fn type_name(&self) -> &'static str {
        "IMAGE"
    }
    fn describe(&self) -> String {
        format!(
            "IMAGE[{}, {}, {}, {}]",
            self.batch, self.height, self.width, self.channels
        )
    }
}

impl Image {
    /// An image batch filled with `value`.
    pub fn filled(batch: usize, height: usize, width: usize, channels: usize, value: f32) -> Self {
        Image {
            batch,
            height,
            width,
            channels,
            data: vec![value; batch * height * width * channels],
        }
    }

    /// Builds an image, checking that `data` has `batch·height·width·channels` values.
    pub fn new(batch: usize, height: usize, width: usize, channels: usize, data: Vec<f32>) -> Result<Self, NodeError> {
        if data.len() != batch * height * width * channels {
            return Err(NodeError::new(format!(
                "image buffer has {} values, expected {batch}x{height}x{width}x{channels}",
                data.len()
            )));
        }
        Ok(Image {
            batch,
            height,
            width,
            channels,
            data,
        })
    }

    pub fn frame_len(&self) -> usize {
        self.height * self.width * self.channels
    }

    /// The values of batch item `index`.
    pub fn frame(&self, index: usize) -> &[f32] {
        let len = self.frame_len();
        &self.data[index * len..(index + 1) * len]
    }

    pub fn index(&self, b: usize, y: usize, x: usize, c: usize) -> usize {
        ((b * self.height + y) * self.width + x) * self.channels + c
    }

    /// Rows `y0..y1` and columns `x0..x1` of every item (ranges already clipped).
    pub fn crop(&self, y0: usize, y1: usize, x0: usize, x1: usize) -> Image {
        let (height, width) = (y1.saturating_sub(y0), x1.saturating_sub(x0));
        let mut data = Vec::with_capacity(self.batch * height * width * self.channels);
        for b in 0..self.batch {
            for y in y0..y1.max(y0) {
                let start = self.index(b, y, x0, 0);
                data.extend_from_slice(&self.data[start..start + width * self.channels]);
            }
        }
        Image {
            batch: self.batch,
            height,
            width,
            channels: self.channels,
            data,
        }
    }

    /// ComfyUI's `repeat_to_batch_size`: truncates, or tiles then truncates.
    pub fn repeat_to_batch(&self, batch: usize) -> Image {
        let len = self.frame_len();
        let data = (0..batch)
            .flat_map(|b| self.frame(b % self.batch.max(1)).iter().copied())
            .collect::<Vec<_>>();
        debug_assert_eq!(data.len(), batch * len);
        Image {
            batch,
            data,
            ..self.clone()
        }
    }

    /// Adds one channel set to `value` (ComfyUI's `torch.nn.functional.pad(x, (0, 1), value=…)`).
    pub fn with_extra_channel(&self, value: f32) -> Image {
        let mut data = Vec::with_capacity(self.batch * self.height * self.width * (self.channels + 1));
        for pixel in self.data.chunks(self.channels.max(1)) {
            data.extend_from_slice(pixel);
            data.push(value);
        }
        Image {
            channels: self.channels + 1,
            data,
            ..self.clone()
        }
    }

    /// Keeps the first `channels` channels.
    pub fn first_channels(&self, channels: usize) -> Image {
        let data = self
            .data
            .chunks(self.channels.max(1))
            .flat_map(|p| p[..channels].iter().copied())
            .collect();
        Image {
            channels,
            data,
            ..self.clone()
        }
    }

    /// Concatenates batches of equal-shaped images.
    pub fn concat(images: &[Image]) -> Result<Image, NodeError> {
        let first = images
            .first()
            .ok_or_else(|| NodeError::new("no images to concatenate"))?;
        let batch: usize = images.iter().map(|i| i.batch).sum();
        crate::runtime::ensure_fits(&[batch, first.height, first.width, first.channels], || {
            format!("a batch of {batch} images of {}×{}", first.width, first.height)
        })?;
        let mut data = Vec::new();
        for image in images {
            if (image.height, image.width, image.channels) != (first.height, first.width, first.channels) {
                return Err(NodeError::new("images to concatenate differ in size"));
            }
            data.extend_from_slice(&image.data);
        }
        Ok(Image {
            batch,
            data,
            ..first.clone()
        })
    }
}

/// A `MASK` batch, `[batch, height, width]`. ComfyUI's occasional 2-D masks are batch 1 here.
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

impl NodeObject for Mask {
    fn type_name(&self) -> &'static str {
        "MASK"
    }
    fn describe(&self) -> String {
        format!("MASK[{}, {}, {}]", self.batch, self.height, self.width)
    }
}

impl Mask {
    pub fn filled(batch: usize, height: usize, width: usize, value: f32) -> Self {
        Mask {
            batch,
            height,
            width,
            data: vec![value; batch * height * width],
        }
    }

    pub fn frame(&self, index: usize) -> &[f32] {
        let len = self.height * self.width;
        &self.data[index * len..(index + 1) * len]
    }

    /// Applies `f` to every value.
    pub fn map(&self, f: impl Fn(f32) -> f32) -> Mask {
        Mask {
            data: self.data.iter().map(|&v| f(v)).collect(),
            ..self.clone()
        }
    }

    /// Items `start..start + count`, as far as the mask has them.
    pub fn items(&self, start: usize, count: usize) -> Mask {
        let len = self.height * self.width;
        let start = start.min(self.batch);
        let end = (start + count).min(self.batch);
        Mask {
            batch: end - start,
            data: self.data[start * len..end * len].to_vec(),
            ..self.clone()
        }
    }

    /// ComfyUI's `repeat_to_batch_size`: truncates, or tiles then truncates.
    pub fn repeat_to_batch(&self, batch: usize) -> Mask {
        Mask {
            batch,
            data: self.as_image().repeat_to_batch(batch).data,
            ..self.clone()
        }
    }

    /// The mask as a one-channel image `[B, H, W, 1]`.
    pub fn as_image(&self) -> Image {
        Image {
            batch: self.batch,
            height: self.height,
            width: self.width,
            channels: 1,
            data: self.data.clone(),
        }
    }
}

/// [B, rows, columns] as [B, columns, rows]: an image's [B, H·W, C] pixels as its [B, C, H·W]
/// channel planes, and back.
pub(crate) fn transposed(data: &[f32], batch: usize, rows: usize, columns: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for b in 0..batch {
        let (from, to) = (
            &data[b * rows * columns..][..rows * columns],
            &mut out[b * rows * columns..][..rows * columns],
        );
        for r in 0..rows {
            for c in 0..columns {
                to[c * rows + r] = from[r * columns + c];
            }
        }
    }
    out
}

/// ComfyUI's `np.clip(255. * x, 0, 255).astype(np.uint8)`: float32 product, then truncation.
pub fn to_u8(value: f32) -> u8 {
    let scaled = 255.0f32 * value;
    if scaled.is_nan() {
        0
    } else {
        scaled.clamp(0.0, 255.0) as u8
    }
}

/// `np.float32(v) / 255.0`.
pub fn from_u8(value: u8) -> f32 {
    value as f32 / 255.0
}
