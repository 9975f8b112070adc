//! The pack's CannyEdgePreprocessor ("Canny Edge"): OpenCV's Canny edges of the image resized to
//! the node's resolution (and padded to multiples of 64 while the edges are found, as the pack
//! pads it), white on black.

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};

use super::opencv::{canny_u8, Pixels};
use super::{
    annotate_batch, optional_int, resize_with_pad, resolution_input, CONTROLNET_AUX_MODULE, DEFAULT_RESOLUTION,
};
use crate::image::Image;

/// The thresholds' defaults (AIO_Preprocessor runs it with them).
pub(super) const DEFAULT_LOW: i64 = 100;
pub(super) const DEFAULT_HIGH: i64 = 200;

pub struct CannyEdgePreprocessor;

impl Node for CannyEdgePreprocessor {
    fn schema(&self, _: &Services) -> NodeSchema {
        let threshold = |default: i64| InputSpec::int(default, 0, 255).opt("step", 1);
        NodeSchema::v1(
            "CannyEdgePreprocessor",
            CONTROLNET_AUX_MODULE,
            "ControlNet Preprocessors/Line Extractors",
        )
        .display("Canny Edge")
        .required("image", InputSpec::of("IMAGE"))
        .optional("low_threshold", threshold(DEFAULT_LOW))
        .optional("high_threshold", threshold(DEFAULT_HIGH))
        .optional("resolution", resolution_input())
        .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let out = canny_edges(
            image,
            optional_int(inputs, "low_threshold", DEFAULT_LOW)?,
            optional_int(inputs, "high_threshold", DEFAULT_HIGH)?,
            optional_int(inputs, "resolution", DEFAULT_RESOLUTION)?,
        )?;
        Ok(NodeOutput::values(vec![Value::object(out)]))
    }
}

/// `CannyDetector`: each image resized and padded, its edges found, the padding removed.
pub(super) fn canny_edges(image: &Image, low: i64, high: i64, resolution: i64) -> Result<Image, NodeError> {
    let clamp = |threshold: i64| threshold.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32;
    annotate_batch(image, resolution, |pixels, resolution| {
        let (padded, (height, width)) = resize_with_pad(pixels, resolution);
        let edges = canny_u8(&padded, clamp(low), clamp(high));
        let data = edges
            .chunks_exact(padded.width)
            .take(height)
            .flat_map(|row| row[..width].to_vec())
            .collect();
        Ok(Pixels {
            height,
            width,
            channels: 1,
            data,
        })
    })
}
