//! The pack's AIO_Preprocessor ("AIO Aux Preprocessor"): runs the preprocessor it is told with
//! that preprocessor's defaults and the node's resolution; "none" passes the image through.
//! Its list holds the preprocessors Easel has (the pack's lists every one it could import).

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};

use super::canny::{canny_edges, DEFAULT_HIGH, DEFAULT_LOW};
use super::depth_anything::{depth_maps, DEFAULT_CHECKPOINT};
use super::{optional_int, optional_string, resolution_input, CONTROLNET_AUX_MODULE, DEFAULT_RESOLUTION};
use crate::image::Image;

/// `PREPROCESSOR_OPTIONS` as far as Easel has them, in the pack's order ("none" first).
const PREPROCESSORS: [&str; 3] = ["none", "CannyEdgePreprocessor", "DepthAnythingV2Preprocessor"];

pub struct AioPreprocessor;

impl Node for AioPreprocessor {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("AIO_Preprocessor", CONTROLNET_AUX_MODULE, "ControlNet Preprocessors")
            .display("AIO Aux Preprocessor")
            .required("image", InputSpec::of("IMAGE"))
            .optional("preprocessor", InputSpec::combo(&PREPROCESSORS).opt("default", "none"))
            .optional("resolution", resolution_input())
            .output(OutputSpec::of("IMAGE"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let resolution = optional_int(inputs, "resolution", DEFAULT_RESOLUTION)?;
        let preprocessor = optional_string(inputs, "preprocessor", "none")?;
        let out = match preprocessor {
            "none" => image.clone(),
            "CannyEdgePreprocessor" => canny_edges(image, DEFAULT_LOW, DEFAULT_HIGH, resolution)?,
            "DepthAnythingV2Preprocessor" => depth_maps(ctx, image, DEFAULT_CHECKPOINT, resolution)?,
            other => return Err(NodeError::typed("KeyError", format!("'{other}'"))),
        };
        Ok(NodeOutput::values(vec![Value::object(out)]))
    }
}
