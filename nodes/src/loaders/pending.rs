//! Loaders of model kinds Easel cannot run yet — img2vid checkpoints — declared with ComfyUI's
//! exact schemas and file lists, so that clients see ComfyUI's node set (the official frontend
//! 1.27 builds its model-to-node map from these classes and fails to create any model-loading
//! widget when one is missing); running one fails the prompt with an error that says what is not
//! supported yet.

use easel_engine::{InputSpec, Node, NodeContext, NodeError, NodeInputs, NodeOutput, NodeSchema, OutputSpec, Services};

use crate::loaders::models::file_names;

/// One loader: its class, where it lists files from, and what it would load.
pub struct PendingLoader {
    class: &'static str,
    display_name: &'static str,
    python_module: &'static str,
    category: &'static str,
    input: &'static str,
    folder: &'static str,
    outputs: &'static [&'static str],
    /// What the model is, for the error: "img2vid checkpoints".
    models: &'static str,
    /// A schema-based (V3) node: the files as a `COMBO` with options.
    v3: bool,
}

/// Every loader of this module.
pub const PENDING_LOADERS: [PendingLoader; 1] = [PendingLoader {
    class: "ImageOnlyCheckpointLoader",
    display_name: "Image Only Checkpoint Loader (img2vid model)",
    python_module: "comfy_extras.nodes_video_model",
    category: "loaders/video_models",
    input: "ckpt_name",
    folder: "checkpoints",
    outputs: &["MODEL", "CLIP_VISION", "VAE"],
    models: "img2vid checkpoints",
    v3: false,
}];

impl Node for &'static PendingLoader {
    fn schema(&self, services: &Services) -> NodeSchema {
        let files = file_names(services, self.folder);
        let (schema, input) = if self.v3 {
            let files = InputSpec::combo_v3(&files);
            (NodeSchema::v3(self.class, self.python_module, self.category), files)
        } else {
            (
                NodeSchema::v1(self.class, self.python_module, self.category),
                InputSpec::combo(&files),
            )
        };
        let schema = schema
            .display(self.display_name)
            .required(self.input, input)
            .model_folder(self.input, self.folder);
        self.outputs
            .iter()
            .fold(schema, |schema, output| schema.output(OutputSpec::of(output)))
    }

    fn execute(&self, _ctx: &NodeContext, _inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        Err(NodeError::new(format!(
            "{}: Easel cannot run {} yet",
            self.class, self.models
        )))
    }
}
