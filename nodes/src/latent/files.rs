//! ComfyUI's latent files (`nodes.py`): SaveLatent writes a `.latent` file, safetensors holding
//! `latent_tensor` and the empty marker `latent_format_version_0`, with the prompt and workflow
//! as metadata; LoadLatent reads one back from the input directory. Files without the marker come
//! from ComfyUI's first format, which stored latents scaled by 0.18215, and are scaled back.

use std::path::PathBuf;

use candle_core::safetensors::Load;
use candle_core::{DType, Tensor};
use easel_engine::pyjson::py_str;
use easel_engine::schema::{CustomValidation, InputSpec, NodeSchema, OutputSpec};
use easel_engine::{HiddenInput, Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use serde_json::{json, Map, Value as Json};

use crate::image::nodes::{save_target, sha256_file};
use crate::latent::Latent;
use crate::paths::{write_replacing, Paths};
use crate::runtime::{device, tensor_error};
use crate::saved_files::{prompt_metadata, tensor_bytes};

/// The tensor whose presence marks a latent file of the current format.
const VERSION_MARKER: &str = "latent_format_version_0";

/// ComfyUI's factor for latents saved before the format marker existed.
const LEGACY_SCALE: f64 = 1.0 / 0.18215;

/// The `.latent` file an input names, if it exists inside its directory.
fn existing_latent(services: &Services, name: &str) -> Option<PathBuf> {
    services
        .get::<Paths>()?
        .annotated_filepath(name)
        .filter(|path| path.is_file())
}

fn safetensors_error(error: impl std::fmt::Debug) -> NodeError {
    NodeError::typed(
        "safetensors_rust.SafetensorError",
        format!("Error while deserializing header: {error:?}"),
    )
}

/// `LoadLatent`: a `.latent` file of the input directory as float32 `LATENT` samples.
pub struct LoadLatent;

impl Node for LoadLatent {
    fn schema(&self, services: &Services) -> NodeSchema {
        let files: Vec<String> = services
            .get::<Paths>()
            .map(Paths::input_files)
            .unwrap_or_default()
            .into_iter()
            .filter(|name| name.ends_with(".latent"))
            .collect();
        NodeSchema::v1("LoadLatent", "nodes", "_for_testing")
            .required("latent", InputSpec::combo(&files))
            .output(OutputSpec::of("LATENT"))
            .validated_by(CustomValidation::Inputs(vec!["latent".into()]))
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let name = inputs.string("latent")?;
        let path = existing_latent(ctx.services, name)
            .ok_or_else(|| NodeError::typed("FileNotFoundError", format!("Invalid latent file: {name}")))?;
        let bytes =
            std::fs::read(&path).map_err(|e| NodeError::typed("OSError", format!("{}: {e}", path.display())))?;
        let file = safetensors::SafeTensors::deserialize(&bytes).map_err(safetensors_error)?;
        let samples = file
            .tensor("latent_tensor")
            .map_err(|_| NodeError::typed("KeyError", "'latent_tensor'"))?
            .load(&device(ctx.services))
            .and_then(|tensor| tensor.to_dtype(DType::F32))
            .map_err(tensor_error)?;
        let samples = if file.tensor(VERSION_MARKER).is_ok() {
            samples
        } else {
            // PyTorch multiplies float32 by a Python float in float32.
            let scale = Tensor::new(LEGACY_SCALE as f32, samples.device()).map_err(tensor_error)?;
            samples.broadcast_mul(&scale).map_err(tensor_error)?
        };
        Ok(NodeOutput::values(vec![Value::object(Latent::new(samples))]))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        let name = inputs.get("latent").and_then(Json::as_str).unwrap_or_default();
        let path = existing_latent(services, name).ok_or_else(|| format!("Invalid latent file: {name}"));
        Some(path.and_then(|path| sha256_file(&path)).map(Json::String))
    }

    fn validate_inputs(&self, services: &Services, inputs: &Map<String, Json>) -> Result<(), String> {
        let name = inputs.get("latent").map(py_str).unwrap_or_default();
        match existing_latent(services, &name) {
            Some(_) => Ok(()),
            None => Err(format!("Invalid latent file: {name}")),
        }
    }
}

/// `SaveLatent`: the samples as `<prefix>_<counter>_.latent` in the output directory, in their
/// own precision, with `prompt` and each `extra_pnginfo` entry (JSON text) as metadata unless
/// metadata is off (`--disable-metadata`).
pub struct SaveLatent;

impl Node for SaveLatent {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("SaveLatent", "nodes", "_for_testing")
            .output_node()
            .required("samples", InputSpec::of("LATENT"))
            .required("filename_prefix", InputSpec::string("latents/ComfyUI"))
            .hidden("prompt", HiddenInput::Prompt)
            .hidden("extra_pnginfo", HiddenInput::ExtraPngInfo)
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let paths = ctx.services.require::<Paths>()?;
        let latent = inputs.object::<Latent>("samples")?;
        let target = save_target(inputs.string("filename_prefix")?, &paths.output, 0, 0)?;
        let metadata = prompt_metadata(ctx);
        let (dtype, data) = tensor_bytes(&latent.samples).map_err(tensor_error)?;
        let invalid = |error: safetensors::SafeTensorError| NodeError::new(error.to_string());
        let samples =
            safetensors::tensor::TensorView::new(dtype, latent.samples.dims().to_vec(), &data).map_err(invalid)?;
        let marker = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![0], &[]).map_err(invalid)?;
        let bytes = safetensors::tensor::serialize([("latent_tensor", samples), (VERSION_MARKER, marker)], metadata)
            .map_err(invalid)?;
        let file = format!("{}_{:05}_.latent", target.filename, target.counter);
        write_replacing(&target.folder.join(&file), &bytes).map_err(|e| NodeError::typed("OSError", e.to_string()))?;
        let mut ui = Map::new();
        ui.insert(
            "latents".into(),
            json!([{"filename": file, "subfolder": target.subfolder, "type": "output"}]),
        );
        Ok(NodeOutput::ui(ui))
    }
}
