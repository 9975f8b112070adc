//! CLIPVisionLoader and CLIPVisionEncode (`nodes.py`).

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use serde_json::{Map, Value as Json};

use super::{load_clip_vision, ClipVisionModel};
use crate::image::Image;
use crate::loaders::model_files_fingerprint;
use crate::loaders::models::{cached, file_names, model_file};
use crate::runtime::device;

const FOLDER: &str = "clip_vision";

/// `CLIPVisionLoader` ("Load CLIP Vision").
pub struct ClipVisionLoader;

impl Node for ClipVisionLoader {
    fn schema(&self, services: &Services) -> NodeSchema {
        NodeSchema::v1("CLIPVisionLoader", "nodes", "loaders")
            .display("Load CLIP Vision")
            .required("clip_name", InputSpec::combo(&file_names(services, FOLDER)))
            .model_folder("clip_name", FOLDER)
            .output(OutputSpec::of("CLIP_VISION"))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &[("clip_name", FOLDER)])
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let path = model_file(ctx, FOLDER, inputs.string("clip_name")?)?;
        let device = device(ctx.services);
        let encoder = cached(ctx, &path, "clip_vision", || load_clip_vision(&path, &device))?;
        Ok(NodeOutput::values(vec![Value::object(ClipVisionModel(encoder))]))
    }
}

/// `CLIPVisionEncode`: `crop` "center" takes the centre square, "none" stretches the image.
pub struct ClipVisionEncode;

impl Node for ClipVisionEncode {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("CLIPVisionEncode", "nodes", "conditioning")
            .display("CLIP Vision Encode")
            .required("clip_vision", InputSpec::of("CLIP_VISION"))
            .required("image", InputSpec::of("IMAGE"))
            .required("crop", InputSpec::combo(&["center", "none"]))
            .output(OutputSpec::of("CLIP_VISION_OUTPUT"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let encoder = inputs.object::<ClipVisionModel>("clip_vision")?;
        let image = inputs.object::<Image>("image")?;
        let output = encoder.encode(image, inputs.string("crop")? == "center")?;
        Ok(NodeOutput::values(vec![Value::object(output)]))
    }
}
