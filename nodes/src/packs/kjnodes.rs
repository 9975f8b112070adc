//! kijai's ComfyUI-KJNodes (`custom_nodes.ComfyUI-KJNodes`): the two range remaps IC-Light
//! workflows shape their light maps with.
//!
//! - RemapImageRange: `min + image·(max − min)`, optionally clamped to 0…1.
//! - RemapMaskRange: the mask over its largest value (1 when that is not positive), times
//!   `max − min`, plus `min`, clamped to 0…1.
//!
//! Both in float32 with the range's width rounded to float32 first, as PyTorch multiplies a
//! float32 tensor by a Python float.

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, NodeRegistry, Services, Value};

use crate::image::{Image, Mask};

/// The pack's module name, as ComfyUI names a custom node pack's module.
const MODULE: &str = "custom_nodes.ComfyUI-KJNodes";

/// Adds the pack's nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    registry.register(RemapImageRange);
    registry.register(RemapMaskRange);
}

/// The `min` and `max` inputs both nodes share.
fn with_range(schema: NodeSchema) -> NodeSchema {
    schema
        .required("min", InputSpec::float(0.0, -10.0, 1.0).opt("step", 0.01))
        .required("max", InputSpec::float(1.0, 0.0, 10.0).opt("step", 0.01))
}

/// `(min, max − min)` as float32.
fn range(inputs: &NodeInputs) -> Result<(f32, f32), NodeError> {
    let (min, max) = (inputs.float("min")?, inputs.float("max")?);
    Ok((min as f32, (max - min) as f32))
}

/// RemapImageRange's arithmetic on each value.
pub fn remap_image_range(image: &Image, min: f32, width: f32, clamp: bool) -> Image {
    let data = image
        .data
        .iter()
        .map(|&value| {
            let remapped = min + value * width;
            if clamp {
                remapped.clamp(0.0, 1.0)
            } else {
                remapped
            }
        })
        .collect();
    Image { data, ..image.clone() }
}

/// RemapMaskRange's arithmetic: the whole batch shares its largest value.
pub fn remap_mask_range(mask: &Mask, min: f32, width: f32) -> Mask {
    let largest = mask.data.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let largest = if largest > 0.0 { largest } else { 1.0 };
    mask.map(|value| (value / largest * width + min).clamp(0.0, 1.0))
}

/// `RemapImageRange`.
pub struct RemapImageRange;

impl Node for RemapImageRange {
    fn schema(&self, _: &Services) -> NodeSchema {
        let schema = NodeSchema::v1("RemapImageRange", MODULE, "KJNodes/image")
            .display("Remap Image Range")
            .description("\nRemaps the image values to the specified range. \n")
            .required("image", InputSpec::of("IMAGE"));
        with_range(schema)
            .required("clamp", InputSpec::boolean(true))
            .output(OutputSpec::of("IMAGE").named("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let (min, width) = range(inputs)?;
        let image = inputs.object::<Image>("image")?;
        let remapped = remap_image_range(image, min, width, inputs.bool("clamp")?);
        Ok(NodeOutput::values(vec![Value::object(remapped)]))
    }
}

/// `RemapMaskRange`.
pub struct RemapMaskRange;

impl Node for RemapMaskRange {
    fn schema(&self, _: &Services) -> NodeSchema {
        let schema = NodeSchema::v1("RemapMaskRange", MODULE, "KJNodes/masking")
            .display("Remap Mask Range")
            .description("\nSets new min and max values for the mask.\n")
            .required("mask", InputSpec::of("MASK"));
        with_range(schema).output(OutputSpec::of("MASK").named("mask"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let (min, width) = range(inputs)?;
        let remapped = remap_mask_range(inputs.object::<Mask>("mask")?, min, width);
        Ok(NodeOutput::values(vec![Value::object(remapped)]))
    }
}
