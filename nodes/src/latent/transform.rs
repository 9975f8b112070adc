//! Latent transforms and compositing, as ComfyUI's `LatentFlip`, `LatentRotate`, `LatentCrop`,
//! `LatentComposite`, `LatentCompositeMasked` and `LatentBlend`. Positions and sizes are in
//! pixels and divided by 8, as ComfyUI does; every other field of the LATENT (batch indices,
//! noise mask) is kept as it was.

use candle_core::{DType, Device, Tensor};
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec, MAX_RESOLUTION};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};

use crate::image::nodes::composite;
use crate::image::Mask;
use crate::latent::nodes::{image_as_latents, latents_as_image, upscale_latent};
use crate::latent::Latent;
use crate::runtime::tensor_error;

fn with_samples(latent: &Latent, samples: Tensor) -> NodeOutput {
    NodeOutput::values(vec![Value::object(Latent {
        samples,
        ..latent.clone()
    })])
}

/// `t` reversed along `dim`.
fn flip(t: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
    let size = t.dim(dim)?;
    let reversed: Vec<u32> = (0..size as u32).rev().collect();
    t.index_select(&Tensor::new(reversed.as_slice(), t.device())?, dim)
}

/// A pixel position or size input as latent pixels.
fn in_latent_pixels(inputs: &NodeInputs, name: &str) -> Result<usize, NodeError> {
    Ok((inputs.int(name)?.max(0) / 8) as usize)
}

fn position(default: i64) -> InputSpec {
    InputSpec::int(default, 0, MAX_RESOLUTION).opt("step", 8)
}

/// `LatentFlip`: upside down (x-axis) or mirrored (y-axis).
pub struct LatentFlip;

impl Node for LatentFlip {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("LatentFlip", "nodes", "latent/transform")
            .display("Flip Latent")
            .required("samples", InputSpec::of("LATENT"))
            .required(
                "flip_method",
                InputSpec::combo(&["x-axis: vertically", "y-axis: horizontally"]),
            )
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let latent = inputs.object::<Latent>("samples")?;
        let dim = if inputs.string("flip_method")?.starts_with("x-axis") {
            2
        } else {
            3
        };
        let samples = flip(&latent.samples, dim).map_err(tensor_error)?;
        Ok(with_samples(latent, samples))
    }
}

/// `LatentRotate`: clockwise by quarter turns (`torch.rot90(x, k, dims=[3, 2])`).
pub struct LatentRotate;

impl Node for LatentRotate {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("LatentRotate", "nodes", "latent/transform")
            .display("Rotate Latent")
            .required("samples", InputSpec::of("LATENT"))
            .required(
                "rotation",
                InputSpec::combo(&["none", "90 degrees", "180 degrees", "270 degrees"]),
            )
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let latent = inputs.object::<Latent>("samples")?;
        let samples = &latent.samples;
        let rotated = match inputs.string("rotation")? {
            "90 degrees" => flip(samples, 2).and_then(|t| t.transpose(2, 3)?.contiguous()),
            "180 degrees" => flip(samples, 2).and_then(|t| flip(&t, 3)),
            "270 degrees" => flip(samples, 3).and_then(|t| t.transpose(2, 3)?.contiguous()),
            _ => Ok(samples.clone()),
        }
        .map_err(tensor_error)?;
        Ok(with_samples(latent, rotated))
    }
}

/// `LatentCrop`: a `width`×`height` window at (`x`, `y`), kept at least 8 latent pixels from the
/// right and bottom edges as ComfyUI does.
pub struct LatentCrop;

impl Node for LatentCrop {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("LatentCrop", "nodes", "latent/transform")
            .display("Crop Latent")
            .required("samples", InputSpec::of("LATENT"))
            .required("width", InputSpec::int(512, 64, MAX_RESOLUTION).opt("step", 8))
            .required("height", InputSpec::int(512, 64, MAX_RESOLUTION).opt("step", 8))
            .required("x", position(0))
            .required("y", position(0))
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let latent = inputs.object::<Latent>("samples")?;
        let (_, _, height, width) = latent.samples.dims4().map_err(tensor_error)?;
        // ComfyUI moves a start closer than 8 to the edge back to size − 8 (0 for smaller latents).
        let start = |value: usize, size: usize| -> usize {
            if value + 8 > size {
                size.saturating_sub(8)
            } else {
                value
            }
        };
        let x = start(in_latent_pixels(inputs, "x")?, width);
        let y = start(in_latent_pixels(inputs, "y")?, height);
        let new_width = in_latent_pixels(inputs, "width")?.min(width - x);
        let new_height = in_latent_pixels(inputs, "height")?.min(height - y);
        let samples = latent
            .samples
            .narrow(2, y, new_height)
            .and_then(|t| t.narrow(3, x, new_width))
            .map_err(tensor_error)?;
        Ok(with_samples(latent, samples))
    }
}

/// `LatentComposite`: `samples_from` pasted into `samples_to` at (`x`, `y`), its inner edges
/// faded over `feather` pixels where it does not touch the border.
pub struct LatentComposite;

impl Node for LatentComposite {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("LatentComposite", "nodes", "latent")
            .display("Latent Composite")
            .required("samples_to", InputSpec::of("LATENT"))
            .required("samples_from", InputSpec::of("LATENT"))
            .required("x", position(0))
            .required("y", position(0))
            .required("feather", position(0))
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let to = inputs.object::<Latent>("samples_to")?;
        let from = inputs.object::<Latent>("samples_from")?;
        let (x, y) = (in_latent_pixels(inputs, "x")?, in_latent_pixels(inputs, "y")?);
        let feather = in_latent_pixels(inputs, "feather")?;
        let samples = paste_feathered(&to.samples, &from.samples, x, y, feather).map_err(tensor_error)?;
        Ok(with_samples(to, samples))
    }
}

fn paste_feathered(to: &Tensor, from: &Tensor, x: usize, y: usize, feather: usize) -> candle_core::Result<Tensor> {
    let (batch, channels, height, width) = to.dims4()?;
    let (from_batch, from_channels, from_height, from_width) = from.dims4()?;
    if (from_batch != batch && from_batch != 1) || from_channels != channels {
        return Err(candle_core::Error::Msg(format!(
            "cannot paste latents of shape {:?} into latents of shape {:?}",
            from.dims(),
            to.dims()
        )));
    }
    // The pasted part: what fits below and right of (x, y).
    let rows = from_height.min(height.saturating_sub(y));
    let cols = from_width.min(width.saturating_sub(x));
    let mut mask = vec![1f32; rows * cols];
    // ComfyUI scales the t-th row and column from each inner edge with Python slices, whose
    // negative bounds count from the end: a feather wider than the pasted part scales some
    // rows or columns again from the other side.
    for t in 0..feather as isize {
        let factor = (1.0 / feather as f64 * (t + 1) as f64) as f32;
        let (rows_i, cols_i) = (rows as isize, cols as isize);
        let mut scaled_rows = Vec::new();
        if y != 0 {
            scaled_rows.extend(python_range(t, t + 1, rows));
        }
        if y + from_height < height {
            scaled_rows.extend(python_range(rows_i - 1 - t, rows_i - t, rows));
        }
        for r in scaled_rows {
            mask[r * cols..(r + 1) * cols].iter_mut().for_each(|m| *m *= factor);
        }
        let mut scaled_cols = Vec::new();
        if x != 0 {
            scaled_cols.extend(python_range(t, t + 1, cols));
        }
        if x + from_width < width {
            scaled_cols.extend(python_range(cols_i - 1 - t, cols_i - t, cols));
        }
        for c in scaled_cols {
            (0..rows).for_each(|r| mask[r * cols + c] *= factor);
        }
    }
    let to_values: Vec<f32> = to.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let from_values: Vec<f32> = from.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut out = to_values;
    for b in 0..batch {
        let source_item = if from_batch == 1 { 0 } else { b };
        for c in 0..channels {
            for r in 0..rows {
                for col in 0..cols {
                    let target = ((b * channels + c) * height + y + r) * width + x + col;
                    let source = ((source_item * channels + c) * from_height + r) * from_width + col;
                    out[target] = if feather == 0 {
                        from_values[source]
                    } else {
                        let m = mask[r * cols + col];
                        from_values[source] * m + out[target] * (1.0 - m)
                    };
                }
            }
        }
    }
    Tensor::from_vec(out, (batch, channels, height, width), &Device::Cpu)?
        .to_device(to.device())?
        .to_dtype(to.dtype())
}

/// The indices Python's `sequence[start:end]` takes from a sequence of `len` items: negative
/// bounds count from the end, bounds are clamped, a reversed range is empty.
fn python_range(start: isize, end: isize, len: usize) -> std::ops::Range<usize> {
    let len = len as isize;
    let bound = |i: isize| (if i < 0 { i + len } else { i }).clamp(0, len) as usize;
    let (start, end) = (bound(start), bound(end));
    start..end.max(start)
}

/// `LatentCompositeMasked`: `source` pasted into `destination` at (`x`, `y`) through `mask`
/// (resized to the source), as ComfyUI's `composite` with multiplier 8.
pub struct LatentCompositeMasked;

impl Node for LatentCompositeMasked {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("LatentCompositeMasked", "comfy_extras.nodes_mask", "latent")
            .required("destination", InputSpec::of("LATENT"))
            .required("source", InputSpec::of("LATENT"))
            .required("x", position(0))
            .required("y", position(0))
            .required("resize_source", InputSpec::boolean(false))
            .optional("mask", InputSpec::of("MASK"))
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let destination = inputs.object::<Latent>("destination")?;
        let source = inputs.object::<Latent>("source")?;
        let position = (inputs.int("x")?.max(0) as usize, inputs.int("y")?.max(0) as usize);
        let mask = inputs.optional_object::<Mask>("mask")?;
        let mut pasted = latents_as_image(&destination.samples)?;
        let source_image = latents_as_image(&source.samples)?;
        if source_image.channels != pasted.channels {
            return Err(NodeError::new(format!(
                "cannot paste latents with {} channels into latents with {}",
                source_image.channels, pasted.channels
            )));
        }
        composite(
            &mut pasted,
            &source_image,
            position,
            8,
            mask,
            inputs.bool("resize_source")?,
        )?;
        let samples = image_as_latents(pasted, destination.samples.device())?;
        Ok(with_samples(destination, samples))
    }
}

/// `LatentBlend`: `samples1·f + samples2·(1 − f)`, `samples2` resized (bicubic, centre crop) to
/// `samples1`'s size first when they differ.
pub struct LatentBlend;

impl Node for LatentBlend {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("LatentBlend", "nodes", "_for_testing")
            .display("Latent Blend")
            .required("samples1", InputSpec::of("LATENT"))
            .required("samples2", InputSpec::of("LATENT"))
            .required(
                "blend_factor",
                InputSpec::of("FLOAT")
                    .opt("default", 0.5)
                    .opt("min", 0)
                    .opt("max", 1)
                    .opt("step", 0.01),
            )
            .output(OutputSpec::of("LATENT"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let first = inputs.object::<Latent>("samples1")?;
        let second = inputs.object::<Latent>("samples2")?;
        let factor = inputs.float("blend_factor")?;
        let (_, _, height, width) = first.samples.dims4().map_err(tensor_error)?;
        let second = if second.samples.dims() == first.samples.dims() {
            second.samples.clone()
        } else {
            upscale_latent(second, "bicubic", width, height, true)?.samples
        };
        let blended = (&first.samples * factor)
            .and_then(|a| a.broadcast_add(&(second * (1.0 - factor))?))
            .map_err(tensor_error)?;
        Ok(with_samples(first, blended))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-row paste feathered over five rows: t = 3 reaches back to row 0 through Python's
    /// negative slice `[-2:-1]`, so row 0 is scaled by 0.2·0.4·0.8 and row 1 by 0.2·0.4.
    #[test]
    fn a_feather_wider_than_the_paste_scales_as_python_slices_do() {
        let to = Tensor::zeros((1, 1, 6, 1), DType::F32, &Device::Cpu).expect("zeros");
        let from = Tensor::ones((1, 1, 2, 1), DType::F32, &Device::Cpu).expect("ones");
        let pasted = paste_feathered(&to, &from, 0, 2, 5).expect("pasted");
        let values: Vec<f32> = pasted.flatten_all().and_then(|t| t.to_vec1()).expect("values");
        let expected = [0.2f32 * 0.4 * 0.8, 0.2 * 0.4];
        assert!((values[2] - expected[0]).abs() < 1e-6, "{values:?}");
        assert!((values[3] - expected[1]).abs() < 1e-6, "{values:?}");
        assert_eq!(python_range(-2, -1, 2), 0..1);
        assert_eq!(python_range(-1, 0, 2), 1..1);
        assert_eq!(python_range(3, 4, 2), 2..2);
    }
}
