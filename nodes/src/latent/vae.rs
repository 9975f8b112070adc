//! The VAE nodes: latents to images and back, whole or in feathered tiles (ComfyUI's
//! `VAEDecode`, `VAEEncode`, `VAEDecodeTiled`, `VAEEncodeTiled`).

use candle_core::{DType, Device, Tensor};
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use easel_models::architectures::vae::Vae;
use easel_models::memory;

use crate::conditioning::{ConcatImage, CondEntry, Conditioning};
use crate::image::resample::interpolate_mask;
use crate::image::{Image, Mask};
use crate::latent::Latent;
use crate::model::vae::VaeModel;
use crate::runtime::{device, out_of_memory, size_mismatch, tensor_error};

/// `VAEDecode`: latents to images.
pub struct VaeDecode;

impl Node for VaeDecode {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("VAEDecode", "nodes", "latent")
            .display("VAE Decode")
            .description("Decodes latent images back into pixel space images.")
            .required(
                "samples",
                InputSpec::of("LATENT").opt("tooltip", "The latent to be decoded."),
            )
            .required(
                "vae",
                InputSpec::of("VAE").opt("tooltip", "The VAE model used for decoding the latent."),
            )
            .output(OutputSpec::of("IMAGE").tooltip("The decoded image."))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let latent = inputs.object::<Latent>("samples")?;
        let vae = inputs.optional_object::<VaeModel>("vae")?.ok_or_else(|| {
            NodeError::typed(
                "RuntimeError",
                "ERROR: VAE is invalid: None\n\nIf the VAE is from a checkpoint loader node your checkpoint does not contain a valid VAE.",
            )
        })?;
        let samples = latent.samples.to_dtype(DType::F32).map_err(tensor_error)?;
        let decoded = run_within_memory(&vae.network, &samples, vae.network.downscale(), Direction::Decode)?;
        Ok(NodeOutput::values(vec![Value::object(
            tensor_to_image(&decoded).map_err(tensor_error)?,
        )]))
    }
}

/// `VAEEncode`: images to latents (the image is centre-cropped to a multiple of 8).
pub struct VaeEncode;

impl Node for VaeEncode {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("VAEEncode", "nodes", "latent")
            .display("VAE Encode")
            .required("pixels", InputSpec::of("IMAGE"))
            .required("vae", InputSpec::of("VAE"))
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("pixels")?;
        let vae = inputs.object::<VaeModel>("vae")?;
        let samples = encode_image(&vae.network, image, &device(ctx.services))?;
        Ok(NodeOutput::values(vec![Value::object(Latent::new(samples))]))
    }
}

/// `VAEEncodeForInpaint`: images to latents for inpainting with a regular model: the masked
/// pixels are set to grey before encoding, and the mask, grown by `grow_mask_by` pixels, becomes
/// the latent's noise mask.
pub struct VaeEncodeForInpaint;

impl Node for VaeEncodeForInpaint {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("VAEEncodeForInpaint", "nodes", "latent/inpaint")
            .display("VAE Encode (for Inpainting)")
            .required("pixels", InputSpec::of("IMAGE"))
            .required("vae", InputSpec::of("VAE"))
            .required("mask", InputSpec::of("MASK"))
            .required("grow_mask_by", InputSpec::int(6, 0, 64).opt("step", 1))
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("pixels")?;
        let vae = inputs.object::<VaeModel>("vae")?;
        let mask = inputs.object::<Mask>("mask")?;
        let grow = inputs.int("grow_mask_by")?.max(0) as usize;
        let (pixels, resized_mask) = grey_out_masked(image, mask, vae.network.downscale())?;
        let noise_mask = grow_mask(&resized_mask, grow);
        let samples = encode_image(&vae.network, &pixels, &device(ctx.services))?;
        Ok(NodeOutput::values(vec![Value::object(Latent {
            noise_mask: Some(noise_mask),
            ..Latent::new(samples)
        })]))
    }
}

/// `InpaintModelConditioning`: the image with its masked part greyed out, encoded, and the mask
/// become both conditionings' `concat_latent_image` / `concat_mask` (the extra input channels
/// of inpainting models); the latent is the whole image encoded, with the mask as its noise mask
/// when `noise_mask` is set.
pub struct InpaintModelConditioning;

impl Node for InpaintModelConditioning {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("InpaintModelConditioning", "nodes", "conditioning/inpaint")
            .display("InpaintModelConditioning")
            .required("positive", InputSpec::of("CONDITIONING"))
            .required("negative", InputSpec::of("CONDITIONING"))
            .required("vae", InputSpec::of("VAE"))
            .required("pixels", InputSpec::of("IMAGE"))
            .required("mask", InputSpec::of("MASK"))
            .required(
                "noise_mask",
                InputSpec::of("BOOLEAN").opt("default", true).opt(
                    "tooltip",
                    "Add a noise mask to the latent so sampling will only happen within the mask. Might improve results or completely break things depending on the model.",
                ),
            )
            .output(OutputSpec::of("CONDITIONING").named("positive"))
            .output(OutputSpec::of("CONDITIONING").named("negative"))
            .output(OutputSpec::of("LATENT").named("latent"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let conditioned = inpaint_conditioning(ctx, inputs)?;
        let latent = Latent {
            noise_mask: inputs.bool("noise_mask")?.then(|| conditioned.mask.clone()),
            ..Latent::new(conditioned.latent)
        };
        Ok(NodeOutput::values(vec![
            conditioned.positive,
            conditioned.negative,
            Value::object(latent),
        ]))
    }
}

/// What InpaintModelConditioning makes of its inputs (`positive`, `negative`, `vae`, `pixels`,
/// `mask`).
pub(crate) struct InpaintConditioning {
    /// Both conditionings with the greyed-out image's latent and the mask as their
    /// `concat_latent_image` and `concat_mask`.
    pub positive: Value,
    pub negative: Value,
    /// The greyed-out image's latent (`concat_latent_image`).
    pub concat_latent: Tensor,
    /// The whole image's latent.
    pub latent: Tensor,
    /// The mask resized to the image (not rounded).
    pub mask: Mask,
}

/// InpaintModelConditioning's work on a node's `positive`, `negative`, `vae`, `pixels` and
/// `mask` inputs (its own, and the nodes that build on it).
pub(crate) fn inpaint_conditioning(ctx: &NodeContext, inputs: &NodeInputs) -> Result<InpaintConditioning, NodeError> {
    let image = inputs.object::<Image>("pixels")?;
    let vae = inputs.object::<VaeModel>("vae")?;
    let mask = inputs.object::<Mask>("mask")?;
    let device = device(ctx.services);
    let (greyed, resized_mask) = grey_out_masked(image, mask, vae.network.downscale())?;
    let concat = ConcatImage {
        latent: encode_image(&vae.network, &greyed, &device)?,
        mask: Some(resized_mask.clone()),
    };
    let with_image = |name: &str| with_concat_image(inputs, name, &concat);
    Ok(InpaintConditioning {
        positive: with_image("positive")?,
        negative: with_image("negative")?,
        latent: encode_image(&vae.network, image, &device)?,
        concat_latent: concat.latent,
        mask: resized_mask,
    })
}

/// `InstructPixToPixConditioning`: the image, encoded, becomes both conditionings'
/// `concat_latent_image` (the extra input channels of InstructPix2Pix models and FLUX's canny
/// and depth models); the latent is zeros of its shape.
pub struct InstructPixToPixConditioning;

impl Node for InstructPixToPixConditioning {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v3(
            "InstructPixToPixConditioning",
            "comfy_extras.nodes_ip2p",
            "conditioning/instructpix2pix",
        )
        .required("positive", InputSpec::of("CONDITIONING"))
        .required("negative", InputSpec::of("CONDITIONING"))
        .required("vae", InputSpec::of("VAE"))
        .required("pixels", InputSpec::of("IMAGE"))
        .output(OutputSpec::of("CONDITIONING").named("positive"))
        .output(OutputSpec::of("CONDITIONING").named("negative"))
        .output(OutputSpec::of("LATENT").named("latent"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("pixels")?;
        let vae = inputs.object::<VaeModel>("vae")?;
        let concat_latent = encode_image(&vae.network, image, &device(ctx.services))?;
        let zeros = concat_latent.zeros_like().map_err(tensor_error)?;
        let concat = ConcatImage {
            latent: concat_latent,
            mask: None,
        };
        let with_image = |name: &str| with_concat_image(inputs, name, &concat);
        Ok(NodeOutput::values(vec![
            with_image("positive")?,
            with_image("negative")?,
            Value::object(Latent::new(zeros)),
        ]))
    }
}

/// The conditioning input `name` with `concat` on every entry.
fn with_concat_image(inputs: &NodeInputs, name: &str, concat: &ConcatImage) -> Result<Value, NodeError> {
    let entries = inputs
        .object::<Conditioning>(name)?
        .0
        .iter()
        .map(|entry| CondEntry {
            concat_image: Some(concat.clone()),
            ..entry.clone()
        })
        .collect();
    Ok(Value::object(Conditioning(entries)))
}

/// The pixel side of inpainting: the mask resized (bilinear) to the image, both centre-cropped
/// to a multiple of `multiple`, and the pixels under the rounded mask set to 0.5. Returns the
/// pixels and the resized mask (not rounded).
pub(crate) fn grey_out_masked(image: &Image, mask: &Mask, multiple: usize) -> Result<(Image, Mask), NodeError> {
    if mask.batch != 1 && mask.batch != image.batch {
        return Err(size_mismatch(image.batch, mask.batch, 0));
    }
    let (height, width) = (image.height / multiple * multiple, image.width / multiple * multiple);
    let (top, left) = ((image.height % multiple) / 2, (image.width % multiple) / 2);
    let resized = interpolate_mask(mask, image.height, image.width)?.crop(top, top + height, left, left + width);
    let mut pixels = image.crop(top, top + height, left, left + width);
    let plane = height * width;
    for b in 0..pixels.batch {
        let item = if mask.batch == 1 { 0 } else { b };
        for (pixel, m) in resized.data[item * plane..(item + 1) * plane].iter().enumerate() {
            let keep = 1.0 - m.round_ties_even();
            let start = (b * plane + pixel) * pixels.channels;
            for value in &mut pixels.data[start..start + pixels.channels.min(3)] {
                *value = (*value - 0.5) * keep + 0.5;
            }
        }
    }
    let resized = Mask {
        batch: mask.batch,
        height,
        width,
        data: resized.data,
    };
    Ok((pixels, resized))
}

/// `VAEEncodeForInpaint`'s noise mask: the rounded mask grown by a `grow`×`grow` box (clamped
/// to 1), rounded.
fn grow_mask(mask: &Mask, grow: usize) -> Mask {
    let (height, width) = (mask.height, mask.width);
    let plane = height * width;
    let rounded: Vec<f32> = mask.data.iter().map(|v| v.round_ties_even()).collect();
    let grown = if grow == 0 {
        mask.data.clone()
    } else {
        // conv2d with a box of ones, padding ⌈(grow − 1)/2⌉, cut to the image's size.
        let padding = grow / 2;
        let mut grown = vec![0f32; rounded.len()];
        for (item, out) in grown.chunks_mut(plane).enumerate() {
            let source = &rounded[item * plane..(item + 1) * plane];
            for y in 0..height {
                for x in 0..width {
                    let mut sum = 0f32;
                    for dy in 0..grow {
                        let Some(sy) = (y + dy).checked_sub(padding).filter(|sy| *sy < height) else {
                            continue;
                        };
                        for dx in 0..grow {
                            if let Some(sx) = (x + dx).checked_sub(padding).filter(|sx| *sx < width) {
                                sum += source[sy * width + sx];
                            }
                        }
                    }
                    out[y * width + x] = sum.clamp(0.0, 1.0);
                }
            }
        }
        grown
    };
    Mask {
        batch: mask.batch,
        height,
        width,
        data: grown.iter().map(|v| v.round_ties_even()).collect(),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Direction {
    Decode,
    Encode,
}

/// Decodes or encodes as ComfyUI does within its memory: as many batch items at a time as
/// fit, and when not even one image fits, in tiles (64-latent tiles with overlap 16 to decode,
/// 512-pixel tiles with overlap 64 to encode). `to_pixels` is the input's pixel scale.
fn run_within_memory(vae: &Vae, input: &Tensor, to_pixels: usize, direction: Direction) -> Result<Tensor, NodeError> {
    let (batch, _, height, width) = input.dims4().map_err(tensor_error)?;
    let per_item = vae.working_memory(height * to_pixels, width * to_pixels);
    let available = memory::available_for(per_item.saturating_mul(batch as u64));
    let run = |part: &Tensor| match direction {
        Direction::Decode => vae.decode(part),
        Direction::Encode => vae.encode(part),
    };
    if available.is_some_and(|available| per_item > available) {
        let (tile, overlap, tile_pixels) = match direction {
            Direction::Decode => (64, 16, 64 * vae.downscale()),
            Direction::Encode => (512, 64, 512),
        };
        memory::ensure_available(vae.working_memory(tile_pixels, tile_pixels), || {
            format!("a VAE tile of {tile_pixels}×{tile_pixels}")
        })
        .map_err(out_of_memory)?;
        tracing::warn!("not enough memory for the whole image, running the VAE in tiles");
        let tiled = match direction {
            Direction::Decode => vae.decode_tiled(input, tile, overlap),
            Direction::Encode => vae.encode_tiled(input, tile, overlap),
        };
        return tiled.map_err(tensor_error);
    }
    let per_run = available.map_or(batch, |available| (available / per_item.max(1)).max(1) as usize);
    let parts = (0..batch)
        .step_by(per_run)
        .map(|start| run(&input.narrow(0, start, per_run.min(batch - start))?))
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(tensor_error)?;
    Tensor::cat(&parts, 0).map_err(tensor_error)
}

/// VAE output [B, 3, H, W] in [-1, 1] to an IMAGE [B, H, W, 3] in [0, 1].
fn tensor_to_image(decoded: &Tensor) -> candle_core::Result<Image> {
    let (batch, channels, height, width) = decoded.dims4()?;
    let image = ((decoded + 1.0)? / 2.0)?.clamp(0f32, 1f32)?.permute((0, 2, 3, 1))?;
    let data = image.flatten_all()?.to_vec1::<f32>()?;
    Ok(Image {
        batch,
        height,
        width,
        channels,
        data,
    })
}

/// `image` encoded whole by `vae` (centre-cropped to its downscale factor), within memory.
pub(crate) fn encode_image(vae: &Vae, image: &Image, device: &Device) -> Result<Tensor, NodeError> {
    let pixels = image_to_tensor(image, vae.downscale(), device).map_err(tensor_error)?;
    run_within_memory(vae, &pixels, 1, Direction::Encode)
}

/// IMAGE [B, H, W, C] (first three channels, centre-cropped to a multiple of `multiple`) to
/// [B, 3, H, W] in [-1, 1].
fn image_to_tensor(image: &Image, multiple: usize, device: &Device) -> candle_core::Result<Tensor> {
    let tensor = Tensor::from_slice(
        &image.data,
        (image.batch, image.height, image.width, image.channels),
        device,
    )?;
    let tensor = tensor.narrow(3, 0, image.channels.min(3))?;
    let height = image.height / multiple * multiple;
    let width = image.width / multiple * multiple;
    let tensor =
        tensor
            .narrow(1, (image.height % multiple) / 2, height)?
            .narrow(2, (image.width % multiple) / 2, width)?;
    (tensor.permute((0, 3, 1, 2))?.contiguous()? * 2.0)? - 1.0
}

/// The temporal inputs of the tiled VAE nodes; they only matter for video VAEs.
fn with_temporal_inputs(schema: NodeSchema, action: &str) -> NodeSchema {
    schema
        .required(
            "temporal_size",
            InputSpec::int(64, 8, 4096).opt("step", 4).opt(
                "tooltip",
                format!("Only used for video VAEs: Amount of frames to {action} at a time."),
            ),
        )
        .required(
            "temporal_overlap",
            InputSpec::int(8, 4, 4096)
                .opt("step", 4)
                .opt("tooltip", "Only used for video VAEs: Amount of frames to overlap."),
        )
}

/// A tile or overlap input as a size (the schema keeps them positive).
fn size_input(inputs: &NodeInputs, name: &str) -> Result<usize, NodeError> {
    let value = inputs.int(name)?;
    usize::try_from(value).map_err(|_| NodeError::typed("ValueError", format!("{name} must not be negative")))
}

/// `VAEDecodeTiled`: decodes in overlapping tiles (three tilings averaged) to bound memory.
pub struct VaeDecodeTiled;

impl Node for VaeDecodeTiled {
    fn schema(&self, _: &Services) -> NodeSchema {
        let schema = NodeSchema::v1("VAEDecodeTiled", "nodes", "_for_testing")
            .display("VAE Decode (Tiled)")
            .required("samples", InputSpec::of("LATENT"))
            .required("vae", InputSpec::of("VAE"))
            .required("tile_size", InputSpec::int(512, 64, 4096).opt("step", 32))
            .required("overlap", InputSpec::int(64, 0, 4096).opt("step", 32));
        with_temporal_inputs(schema, "decode").output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let latent = inputs.object::<Latent>("samples")?;
        let vae = inputs.object::<VaeModel>("vae")?;
        let tile_size = size_input(inputs, "tile_size")?;
        let mut overlap = size_input(inputs, "overlap")?;
        if tile_size < overlap * 4 {
            overlap = tile_size / 4;
        }
        let compression = vae.network.downscale();
        let samples = latent.samples.to_dtype(DType::F32).map_err(tensor_error)?;
        let decoded = vae
            .network
            .decode_tiled(&samples, tile_size / compression, overlap / compression)
            .map_err(tensor_error)?;
        Ok(NodeOutput::values(vec![Value::object(
            tensor_to_image(&decoded).map_err(tensor_error)?,
        )]))
    }
}

/// `VAEEncodeTiled`: encodes in overlapping pixel tiles (three tilings averaged).
pub struct VaeEncodeTiled;

impl Node for VaeEncodeTiled {
    fn schema(&self, _: &Services) -> NodeSchema {
        let schema = NodeSchema::v1("VAEEncodeTiled", "nodes", "_for_testing")
            .display("VAE Encode (Tiled)")
            .required("pixels", InputSpec::of("IMAGE"))
            .required("vae", InputSpec::of("VAE"))
            .required("tile_size", InputSpec::int(512, 64, 4096).opt("step", 64))
            .required("overlap", InputSpec::int(64, 0, 4096).opt("step", 32));
        with_temporal_inputs(schema, "encode").output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("pixels")?;
        let vae = inputs.object::<VaeModel>("vae")?;
        let tile_size = size_input(inputs, "tile_size")?;
        let overlap = size_input(inputs, "overlap")?;
        let pixels = image_to_tensor(image, vae.network.downscale(), &device(ctx.services)).map_err(tensor_error)?;
        let samples = vae
            .network
            .encode_tiled(&pixels, tile_size, overlap)
            .map_err(|error| NodeError::typed("ValueError", error.to_string()))?;
        Ok(NodeOutput::values(vec![Value::object(Latent::new(samples))]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inpaint_pixels_turn_grey_under_the_mask_and_even_boxes_grow_as_torch_pads_them() {
        let (height, width) = (18, 20);
        let data: Vec<f32> = (0..height * width * 4).map(|i| (i % 11) as f32 / 11.0).collect();
        let image = Image::new(1, height, width, 4, data).expect("image");
        let mut mask = Mask::filled(1, height, width, 0.0);
        mask.data[6 * width + 8] = 1.0;
        let (pixels, resized) = grey_out_masked(&image, &mask, 8).expect("greyed");
        let noise_mask = grow_mask(&resized, 6);
        let cropped = image.crop(1, 17, 2, 18);
        for y in 0..16 {
            for x in 0..16 {
                for c in 0..4 {
                    let index = pixels.index(0, y, x, c);
                    let expected = if (y, x) == (5, 6) && c < 3 {
                        0.5
                    } else {
                        cropped.data[index]
                    };
                    assert_eq!(pixels.data[index], expected, "({y}, {x}, {c})");
                }
                // A 6-wide box with padding 3 reaches from 3 before to 2 after.
                let grown = (3..=8).contains(&y) && (4..=9).contains(&x);
                assert_eq!(noise_mask.data[y * 16 + x], if grown { 1.0 } else { 0.0 }, "({y}, {x})");
            }
        }
        assert_eq!(grow_mask(&resized, 0).data.iter().filter(|v| **v == 1.0).count(), 1);
        let two = Mask::filled(2, height, width, 0.0);
        assert!(grey_out_masked(&image, &two, 8).is_err());
    }
}
