//! MaskComposite and ImageColorToMask (`comfy_extras/nodes_mask.py`): a source mask combined into
//! a destination at an offset, and the pixels of one exact colour as a mask.

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services};

use super::{mask_node, mask_result, offset_input};
use crate::image::{Image, Mask};

/// `MaskComposite`: the source combined with the part of the destination it covers at
/// (`x`, `y`) — multiply, add, subtract, or a logical and/or/xor of the values rounded half to
/// even — then everything clamped to 0..1. A one-item source applies to every destination item.
pub struct MaskComposite;

impl Node for MaskComposite {
    fn schema(&self, _: &Services) -> NodeSchema {
        mask_node("MaskComposite")
            .required("destination", InputSpec::of("MASK"))
            .required("source", InputSpec::of("MASK"))
            .required("x", offset_input())
            .required("y", offset_input())
            .required(
                "operation",
                InputSpec::combo(&["multiply", "add", "subtract", "and", "or", "xor"]),
            )
            .output(OutputSpec::of("MASK"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let destination = inputs.object::<Mask>("destination")?;
        let source = inputs.object::<Mask>("source")?;
        let (left, top) = (inputs.int("x")?.max(0) as usize, inputs.int("y")?.max(0) as usize);
        if left > destination.width || top > destination.height {
            return Err(NodeError::typed(
                "RuntimeError",
                format!(
                    "the source at ({left}, {top}) lies outside the {}×{} destination",
                    destination.width, destination.height
                ),
            ));
        }
        if source.batch != destination.batch && source.batch != 1 {
            return Err(NodeError::typed(
                "RuntimeError",
                format!(
                    "a batch of {} source masks cannot combine with {} destination masks",
                    source.batch, destination.batch
                ),
            ));
        }
        let visible_width = source.width.min(destination.width - left);
        let visible_height = source.height.min(destination.height - top);
        let combine: fn(f32, f32) -> f32 = match inputs.string("operation")? {
            "multiply" => |d, s| d * s,
            "add" => |d, s| d + s,
            "subtract" => |d, s| d - s,
            "and" => |d, s| f32::from(u8::from(truthy(d) && truthy(s))),
            "or" => |d, s| f32::from(u8::from(truthy(d) || truthy(s))),
            "xor" => |d, s| f32::from(u8::from(truthy(d) != truthy(s))),
            _ => |d, _| d,
        };
        let mut output = destination.clone();
        for b in 0..destination.batch {
            let source_frame = source.frame(b % source.batch);
            for y in 0..visible_height {
                for x in 0..visible_width {
                    let at = (b * destination.height + top + y) * destination.width + left + x;
                    output.data[at] = combine(output.data[at], source_frame[y * source.width + x]);
                }
            }
        }
        for value in &mut output.data {
            *value = value.clamp(0.0, 1.0);
        }
        Ok(mask_result(output))
    }
}

/// torch's `value.round().bool()`: whether the value rounds (half to even) to something other
/// than zero.
fn truthy(value: f32) -> bool {
    value.round_ties_even() != 0.0
}

/// `ImageColorToMask`: 1 where a pixel's 8-bit colour (`round(clamp(v) · 255)` per channel,
/// packed as 0xRRGGBB) is `color`, else 0.
pub struct ImageColorToMask;

impl Node for ImageColorToMask {
    fn schema(&self, _: &Services) -> NodeSchema {
        mask_node("ImageColorToMask")
            .required("image", InputSpec::of("IMAGE"))
            .required(
                "color",
                InputSpec::int(0, 0, 0xFF_FFFF).opt("step", 1).opt("display", "color"),
            )
            .output(OutputSpec::of("MASK"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        if image.channels < 3 {
            return Err(NodeError::typed(
                "IndexError",
                format!("an image of {} channels has no RGB colour", image.channels),
            ));
        }
        let color = inputs.int("color")?;
        let byte = |value: f32| i64::from((value.clamp(0.0, 1.0) * 255.0).round_ties_even() as i32);
        let data = image
            .data
            .chunks(image.channels)
            .map(|pixel| {
                let packed = (byte(pixel[0]) << 16) + (byte(pixel[1]) << 8) + byte(pixel[2]);
                if packed == color {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        Ok(mask_result(Mask {
            batch: image.batch,
            height: image.height,
            width: image.width,
            data,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use easel_engine::{call_standalone, Value};
    use serde_json::json;

    fn composite(destination: &Mask, source: &Mask, x: i64, y: i64, operation: &str) -> Vec<f32> {
        let inputs = NodeInputs::new(
            [
                ("destination", Value::object(destination.clone())),
                ("source", Value::object(source.clone())),
                ("x", Value::Json(json!(x))),
                ("y", Value::Json(json!(y))),
                ("operation", Value::Json(json!(operation))),
            ]
            .into_iter()
            .map(|(name, value)| (name.to_string(), value))
            .collect(),
        );
        let output = call_standalone(&MaskComposite, &Services::new(), &inputs).unwrap();
        output.outputs[0].downcast::<Mask>().unwrap().data.clone()
    }

    #[test]
    fn sources_combine_where_they_cover_the_destination_and_clamp() {
        let destination = Mask {
            batch: 1,
            height: 2,
            width: 3,
            data: vec![0.5, 0.5, 0.5, 0.5, 0.5, 0.5],
        };
        let source = Mask::filled(1, 2, 2, 0.75);
        assert_eq!(
            composite(&destination, &source, 2, 1, "add"),
            [0.5, 0.5, 0.5, 0.5, 0.5, 1.0]
        );
        assert_eq!(
            composite(&destination, &source, 0, 0, "subtract"),
            [0.0, 0.0, 0.5, 0.0, 0.0, 0.5]
        );
        // 0.5 rounds to 0 (half to even), 0.75 to 1.
        assert_eq!(
            composite(&destination, &source, 1, 0, "xor"),
            [0.5, 1.0, 1.0, 0.5, 1.0, 1.0]
        );
        assert_eq!(
            composite(&destination, &source, 1, 0, "and"),
            [0.5, 0.0, 0.0, 0.5, 0.0, 0.0]
        );
        assert_eq!(composite(&destination, &source, 3, 0, "multiply"), destination.data);
    }

    #[test]
    fn a_colour_is_matched_on_its_rounded_bytes() {
        // 0xFF8000 and a pixel off by less than half a step in green.
        let image = Image::new(1, 1, 2, 3, vec![1.0, 0.5, 0.0, 1.0, 0.4985, 0.0]).unwrap();
        let inputs = NodeInputs::new(
            [
                ("image".to_string(), Value::object(image)),
                ("color".to_string(), Value::Json(json!(0xFF8000))),
            ]
            .into_iter()
            .collect(),
        );
        let output = call_standalone(&ImageColorToMask, &Services::new(), &inputs).unwrap();
        assert_eq!(output.outputs[0].downcast::<Mask>().unwrap().data, [1.0, 0.0]);
    }
}
