//! `HypernetworkLoader` (`comfy_extras/nodes_hypernetwork.py`): a MODEL whose attentions' key
//! and value inputs a hypernetwork from `models/hypernetworks` changes
//! ([`easel_models::architectures::hypernetwork`]), in self-attention and cross-attention alike
//! (ComfyUI sets the patch as both `attn1_patch` and `attn2_patch`).

use std::sync::Arc;

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use easel_models::architectures::hypernetwork::{is_pickled, Hypernetwork, HypernetworkError};
use serde_json::{Map, Value as Json};

use crate::loaders::model_files_fingerprint;
use crate::loaders::models::{file_names, model_file};
use crate::model::diffusion_model::Model;
use crate::model::patch_nodes::patched;

const FOLDER: &str = "hypernetworks";

/// The hypernetwork in the file at `path`, at `strength`; `None` (logged, as ComfyUI does) for
/// one whose activation ComfyUI does not know.
fn read_hypernetwork(path: &std::path::Path, strength: f64) -> Result<Option<Hypernetwork>, NodeError> {
    let bytes = std::fs::read(path).map_err(|error| NodeError::typed("OSError", error.to_string()))?;
    let hypernetwork_error = |error: HypernetworkError| NodeError::value(format!("{}: {error}", path.display()));
    let metadata = match safetensors::SafeTensors::read_metadata(&bytes) {
        Ok((_, header)) => header.metadata().clone(),
        Err(_) if is_pickled(&bytes) => return Err(hypernetwork_error(HypernetworkError::Pickled)),
        Err(error) => return Err(hypernetwork_error(HypernetworkError::Format(error.to_string()))),
    };
    let options = match Hypernetwork::options(metadata.as_ref()) {
        Ok(options) => options,
        Err(activation) => {
            tracing::error!(
                "Unsupported Hypernetwork format, if you report it I might implement it. {} {activation}",
                path.display()
            );
            return Ok(None);
        }
    };
    Hypernetwork::from_safetensors(&bytes, options, strength)
        .map(Some)
        .map_err(hypernetwork_error)
}

/// `HypernetworkLoader`.
pub struct HypernetworkLoader;

impl Node for HypernetworkLoader {
    fn schema(&self, services: &Services) -> NodeSchema {
        NodeSchema::v1("HypernetworkLoader", "comfy_extras.nodes_hypernetwork", "loaders")
            .required("model", InputSpec::of("MODEL"))
            .required("hypernetwork_name", InputSpec::combo(&file_names(services, FOLDER)))
            .model_folder("hypernetwork_name", FOLDER)
            .required("strength", InputSpec::float(1.0, -10.0, 10.0).opt("step", 0.01))
            .output(OutputSpec::of("MODEL"))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &[("hypernetwork_name", FOLDER)])
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let path = model_file(ctx, FOLDER, inputs.string("hypernetwork_name")?)?;
        let Some(hypernetwork) = read_hypernetwork(&path, inputs.float("strength")?)? else {
            let model = inputs.object::<Model>("model")?;
            return Ok(NodeOutput::values(vec![Value::object(model.clone())]));
        };
        patched(inputs, |patches| patches.with_unet_patch(Arc::new(hypernetwork)))
    }
}
