//! Nodes that show values to the user: LoadImageOutput (`nodes.py`), GetImageSize
//! (`comfy_extras/nodes_images.py`), PreviewAny (`comfy_extras/nodes_preview_any.py`) and
//! MaskPreview (`comfy_extras/nodes_mask.py`).

use easel_engine::pyjson::{dumps, py_str};
use easel_engine::schema::{CustomValidation, InputSpec, NodeSchema, OutputSpec};
use easel_engine::{HiddenInput, Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use serde_json::{json, Map, Value as Json};

use crate::image::io::PngCompression;
use crate::image::nodes::{save_batch, LoadImage, PreviewImage};
use crate::image::{Image, Mask};
use crate::paths::Paths;
use crate::runtime::{ensure_fits, experimental};

/// `LoadImageOutput` ("Load Image (from Outputs)"): LoadImage with a widget the frontend fills
/// from the output folder (`/internal/files/output`); the names it sends carry ` [output]`, which
/// LoadImage's path resolution, validation and fingerprint follow.
pub struct LoadImageOutput;

impl Node for LoadImageOutput {
    fn schema(&self, _: &Services) -> NodeSchema {
        let remote = json!({
            "route": "/internal/files/output",
            "refresh_button": true,
            "control_after_refresh": "first",
        });
        experimental(NodeSchema::v1("LoadImageOutput", "nodes", "image")
            .display("Load Image (from Outputs)")
            .description("Load an image from the output folder. When the refresh button is clicked, the node will update the image list and automatically select the first image, allowing for easy iteration.")
            .required(
                "image",
                InputSpec::of("COMBO")
                    .opt("image_upload", true)
                    .opt("image_folder", "output")
                    .opt("remote", remote),
            )
            .output(OutputSpec::of("IMAGE"))
            .output(OutputSpec::of("MASK"))
            .validated_by(CustomValidation::Inputs(vec!["image".into()])))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        LoadImage.execute(ctx, inputs)
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        LoadImage.fingerprint(services, inputs)
    }

    fn validate_inputs(&self, services: &Services, inputs: &Map<String, Json>) -> Result<(), String> {
        LoadImage.validate_inputs(services, inputs)
    }
}

/// `GetImageSize`: the width, height and batch size of an image, also shown on the node as
/// progress text.
pub struct GetImageSize;

impl Node for GetImageSize {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("GetImageSize", "comfy_extras.nodes_images", "image")
            .display("Get Image Size")
            .description("Returns width and height of the image, and passes it through unchanged.")
            .required("image", InputSpec::of("IMAGE"))
            .hidden("unique_id", HiddenInput::UniqueId)
            .output(OutputSpec::of("INT").named("width"))
            .output(OutputSpec::of("INT").named("height"))
            .output(OutputSpec::of("INT").named("batch_size"))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let image = inputs.object::<Image>("image")?;
        let (width, height, batch) = (image.width, image.height, image.batch);
        ctx.progress_text(&format!("width: {width}, height: {height}\n batch size: {batch}"));
        Ok(NodeOutput::values(vec![
            Value::Json(json!(width)),
            Value::Json(json!(height)),
            Value::Json(json!(batch)),
        ]))
    }
}

/// `PreviewAny`: any value as text in the UI (`{"text": [text]}`).
pub struct PreviewAny;

/// PreviewAny's text: strings as they are; `None`, booleans and numbers as Python's `str()`
/// writes them; lists and dicts as `json.dumps` writes them. ComfyUI falls back to `str()` for
/// values JSON cannot hold (tensors, models); those show their short description here
/// ([`NodeObject::describe`](easel_engine::NodeObject::describe)).
fn preview_text(value: &Value) -> String {
    match value {
        Value::Json(json @ (Json::Array(_) | Json::Object(_))) => dumps(json),
        Value::Json(scalar) => py_str(scalar),
        Value::Object(object) => object.describe(),
        Value::List(items) => match items.iter().map(Value::as_json).collect::<Option<Vec<_>>>() {
            Some(values) => dumps(&values),
            None => py_str(&value.error_display()),
        },
    }
}

impl Node for PreviewAny {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("PreviewAny", "comfy_extras.nodes_preview_any", "utils")
            .display("Preview Any")
            .output_node()
            .required("source", InputSpec::of("*").with_options())
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let text = inputs.get("source").map_or_else(|| "None".to_string(), preview_text);
        let mut ui = Map::new();
        ui.insert("text".into(), json!([text]));
        Ok(NodeOutput::ui(ui))
    }
}

/// `MaskPreview`: the mask as a grey image, saved like PreviewImage (temp directory, the node's
/// `ComfyUI_temp_<letters>` prefix, metadata) but at SaveImage's compression level 4.
#[derive(Default)]
pub struct MaskPreview {
    /// Draws and keeps each node's five letters.
    previews: PreviewImage,
}

impl Node for MaskPreview {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("MaskPreview", "comfy_extras.nodes_mask", "mask")
            .description("Saves the input images to your ComfyUI output directory.")
            .output_node()
            .required("mask", InputSpec::of("MASK"))
            .hidden("prompt", HiddenInput::Prompt)
            .hidden("extra_pnginfo", HiddenInput::ExtraPngInfo)
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let paths = ctx.services.require::<Paths>()?;
        let mask = inputs.object::<Mask>("mask")?;
        ensure_fits(&[mask.batch, mask.height, mask.width, 3], || {
            format!(
                "a preview of a {}×{} mask (batch {})",
                mask.width, mask.height, mask.batch
            )
        })?;
        let data = mask.data.iter().flat_map(|&v| [v; 3]).collect();
        let image = Image::new(mask.batch, mask.height, mask.width, 3, data)?;
        save_batch(
            ctx,
            &image,
            &self.previews.prefix(ctx.node_id),
            &paths.temp,
            "temp",
            PngCompression::Balanced,
        )
    }
}
