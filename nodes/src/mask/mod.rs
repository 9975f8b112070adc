//! The mask category: ComfyUI's mask nodes (`comfy_extras/nodes_mask.py`): ImageToMask,
//! MaskToImage, SolidMask, InvertMask, GrowMask, FeatherMask, ThresholdMask, CropMask, and
//! MaskComposite and ImageColorToMask ([`composite`]). The `MASK` value is [`crate::image::Mask`];
//! LoadImageMask is with LoadImage in [`crate::image::nodes`].

pub mod composite;

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec, MAX_RESOLUTION};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, NodeRegistry, Services, Value};

use crate::image::nodes::image_result;
use crate::image::{Image, Mask};
use crate::runtime::ensure_fits;

/// Adds the mask nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    registry.register(ImageToMask);
    registry.register(MaskToImage);
    registry.register(SolidMask);
    registry.register(InvertMask);
    registry.register(GrowMask);
    registry.register(FeatherMask);
    registry.register(ThresholdMask);
    registry.register(CropMask);
    registry.register(composite::MaskComposite);
    registry.register(composite::ImageColorToMask);
}

const MODULE: &str = "comfy_extras.nodes_mask";

fn mask_result(mask: Mask) -> NodeOutput {
    NodeOutput::values(vec![Value::object(mask)])
}

fn mask_node(name: &str) -> NodeSchema {
    NodeSchema::v1(name, MODULE, "mask")
}

fn size_input(default: i64) -> InputSpec {
    InputSpec::int(default, 1, MAX_RESOLUTION).opt("step", 1)
}

fn offset_input() -> InputSpec {
    InputSpec::int(0, 0, MAX_RESOLUTION).opt("step", 1)
}

fn count(inputs: &NodeInputs, name: &str) -> Result<usize, NodeError> {
    let value = inputs.int(name)?;
    usize::try_from(value).map_err(|_| NodeError::value(format!("{name} must not be negative, got {value}")))
}

/// `ImageToMask`: one channel of an image.
pub struct ImageToMask;

impl Node for ImageToMask {
    fn schema(&self, _: &Services) -> NodeSchema {
        mask_node("ImageToMask")
            .display("Convert Image to Mask")
            .required("image", InputSpec::of("IMAGE"))
            .required("channel", InputSpec::combo(&["red", "green", "blue", "alpha"]))
            .output(OutputSpec::of("MASK"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let channel = ["red", "green", "blue", "alpha"]
            .iter()
            .position(|c| *c == inputs.string("channel").unwrap_or_default())
            .ok_or_else(|| NodeError::value("unknown channel"))?;
        if channel >= image.channels {
            return Err(NodeError::typed(
                "IndexError",
                format!(
                    "index {channel} is out of bounds for dimension 3 with size {}",
                    image.channels
                ),
            ));
        }
        let data = image.data.chunks(image.channels).map(|p| p[channel]).collect();
        Ok(mask_result(Mask {
            batch: image.batch,
            height: image.height,
            width: image.width,
            data,
        }))
    }
}

/// `MaskToImage`: the mask repeated to three channels.
pub struct MaskToImage;

impl Node for MaskToImage {
    fn schema(&self, _: &Services) -> NodeSchema {
        mask_node("MaskToImage")
            .display("Convert Mask to Image")
            .required("mask", InputSpec::of("MASK"))
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let mask = inputs.object::<Mask>("mask")?;
        ensure_fits(&[mask.batch, mask.height, mask.width, 3], || {
            format!("an image of {}×{} (batch {})", mask.width, mask.height, mask.batch)
        })?;
        let data = mask.data.iter().flat_map(|&v| [v, v, v]).collect();
        Ok(image_result(Image::new(mask.batch, mask.height, mask.width, 3, data)?))
    }
}

/// `SolidMask`: `[1, H, W]` filled with a value.
pub struct SolidMask;

impl Node for SolidMask {
    fn schema(&self, _: &Services) -> NodeSchema {
        mask_node("SolidMask")
            .required("value", InputSpec::float(1.0, 0.0, 1.0).opt("step", 0.01))
            .required("width", size_input(512))
            .required("height", size_input(512))
            .output(OutputSpec::of("MASK"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let value = inputs.float("value")? as f32;
        let (height, width) = (count(inputs, "height")?, count(inputs, "width")?);
        ensure_fits(&[height, width], || format!("a mask of {width}×{height}"))?;
        Ok(mask_result(Mask::filled(1, height, width, value)))
    }
}

/// `InvertMask`: `1 − mask`.
pub struct InvertMask;

impl Node for InvertMask {
    fn schema(&self, _: &Services) -> NodeSchema {
        mask_node("InvertMask")
            .required("mask", InputSpec::of("MASK"))
            .output(OutputSpec::of("MASK"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        Ok(mask_result(inputs.object::<Mask>("mask")?.map(|v| 1.0 - v)))
    }
}

/// `CropMask`: `mask[:, y:y+height, x:x+width]` (clipped by the mask's bounds).
pub struct CropMask;

impl Node for CropMask {
    fn schema(&self, _: &Services) -> NodeSchema {
        mask_node("CropMask")
            .required("mask", InputSpec::of("MASK"))
            .required("x", offset_input())
            .required("y", offset_input())
            .required("width", size_input(512))
            .required("height", size_input(512))
            .output(OutputSpec::of("MASK"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let mask = inputs.object::<Mask>("mask")?;
        let x0 = count(inputs, "x")?.min(mask.width);
        let y0 = count(inputs, "y")?.min(mask.height);
        let x1 = (x0 + count(inputs, "width")?).min(mask.width);
        let y1 = (y0 + count(inputs, "height")?).min(mask.height);
        let cropped = mask.as_image().crop(y0, y1, x0, x1);
        Ok(mask_result(Mask {
            batch: mask.batch,
            height: cropped.height,
            width: cropped.width,
            data: cropped.data,
        }))
    }
}

/// `GrowMask`: repeated 3×3 grey dilation (or erosion), corners optional, edges reflected (SciPy).
pub struct GrowMask;

impl Node for GrowMask {
    fn schema(&self, _: &Services) -> NodeSchema {
        mask_node("GrowMask")
            .required("mask", InputSpec::of("MASK"))
            .required(
                "expand",
                InputSpec::int(0, -MAX_RESOLUTION, MAX_RESOLUTION).opt("step", 1),
            )
            .required("tapered_corners", InputSpec::boolean(true))
            .output(OutputSpec::of("MASK"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let mask = inputs.object::<Mask>("mask")?;
        let expand = inputs.int("expand")?;
        let corners = !inputs.bool("tapered_corners")?;
        let (h, w) = (mask.height, mask.width);
        let mut data = mask.data.clone();
        for b in 0..mask.batch {
            let frame = &mut data[b * h * w..(b + 1) * h * w];
            for _ in 0..expand.unsigned_abs() {
                ctx.check_interrupt()?;
                let grown = morphology_step(frame, h, w, corners, expand > 0);
                frame.copy_from_slice(&grown);
            }
        }
        Ok(mask_result(Mask { data, ..mask.clone() }))
    }
}

/// One grey dilation (`max`) or erosion (`min`) over the cross (and, with `corners`, the full 3×3)
/// footprint; out-of-range neighbours reflect to the edge, as SciPy's `mode="reflect"` does for 3×3.
fn morphology_step(frame: &[f32], h: usize, w: usize, corners: bool, dilate: bool) -> Vec<f32> {
    let at = |y: isize, x: isize| {
        let y = y.clamp(0, h as isize - 1) as usize;
        let x = x.clamp(0, w as isize - 1) as usize;
        frame[y * w + x]
    };
    let mut out = vec![0.0; h * w];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let mut value = at(y, x);
            for (dy, dx) in [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)] {
                if !corners && dy != 0 && dx != 0 {
                    continue;
                }
                let v = at(y + dy, x + dx);
                value = if dilate { value.max(v) } else { value.min(v) };
            }
            out[y as usize * w + x as usize] = value;
        }
    }
    out
}

/// `FeatherMask`: linear ramps on each side, reproducing ComfyUI's indexing (the right and bottom
/// ramps start at index `-0`, i.e. the first column/row).
pub struct FeatherMask;

impl Node for FeatherMask {
    fn schema(&self, _: &Services) -> NodeSchema {
        mask_node("FeatherMask")
            .required("mask", InputSpec::of("MASK"))
            .required("left", offset_input())
            .required("top", offset_input())
            .required("right", offset_input())
            .required("bottom", offset_input())
            .output(OutputSpec::of("MASK"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let mask = inputs.object::<Mask>("mask")?;
        let (h, w) = (mask.height, mask.width);
        let left = count(inputs, "left")?.min(w);
        let right = count(inputs, "right")?.min(w);
        let top = count(inputs, "top")?.min(h);
        let bottom = count(inputs, "bottom")?.min(h);
        let mut out = mask.clone();
        // Python's `output[:, :, -x]`: index -0 is 0, -x is w - x.
        let from_end = |x: usize, len: usize| if x == 0 { 0 } else { len - x };
        let scale_column = |x: usize, rate: f32, out: &mut Mask| {
            for b in 0..out.batch {
                for y in 0..h {
                    out.data[(b * h + y) * w + x] *= rate;
                }
            }
        };
        for x in 0..left {
            scale_column(x, ((x as f64 + 1.0) / left as f64) as f32, &mut out);
        }
        for x in 0..right {
            scale_column(from_end(x, w), ((x as f64 + 1.0) / right as f64) as f32, &mut out);
        }
        let scale_row = |y: usize, rate: f32, out: &mut Mask| {
            for b in 0..out.batch {
                for v in &mut out.data[(b * h + y) * w..(b * h + y + 1) * w] {
                    *v *= rate;
                }
            }
        };
        for y in 0..top {
            scale_row(y, ((y as f64 + 1.0) / top as f64) as f32, &mut out);
        }
        for y in 0..bottom {
            scale_row(from_end(y, h), ((y as f64 + 1.0) / bottom as f64) as f32, &mut out);
        }
        Ok(mask_result(out))
    }
}

/// `ThresholdMask`: `mask > value` as 0/1.
pub struct ThresholdMask;

impl Node for ThresholdMask {
    fn schema(&self, _: &Services) -> NodeSchema {
        mask_node("ThresholdMask")
            .required("mask", InputSpec::of("MASK"))
            .required("value", InputSpec::float(0.5, 0.0, 1.0).opt("step", 0.01))
            .output(OutputSpec::of("MASK"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let threshold = inputs.float("value")? as f32;
        Ok(mask_result(inputs.object::<Mask>("mask")?.map(|v| {
            if v > threshold {
                1.0
            } else {
                0.0
            }
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dilation_with_and_without_corners() {
        let mut frame = vec![0.0; 25];
        frame[12] = 1.0;
        let cross = morphology_step(&frame, 5, 5, false, true);
        assert_eq!(cross.iter().filter(|&&v| v == 1.0).count(), 5);
        let square = morphology_step(&frame, 5, 5, true, true);
        assert_eq!(square.iter().filter(|&&v| v == 1.0).count(), 9);
        let eroded = morphology_step(&square, 5, 5, true, false);
        assert_eq!(eroded, frame);
    }
}
