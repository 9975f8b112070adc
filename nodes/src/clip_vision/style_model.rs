//! Style models (`nodes.py`): the STYLE_MODEL value, StyleModelLoader and StyleModelApply, which
//! appends the tokens a style model makes of a CLIP vision output to each entry's text tokens.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeObject, NodeOutput, NodeRegistry, Services, Value};
use easel_models::architectures::style_model::{StyleModel, StyleModelConfig, REDUX_MARKER, STYLE_ADAPTER_MARKER};
use easel_models::kernels::sgemm::Precision;
use easel_models::weights::WeightSource;
use serde_json::{Map, Value as Json};

use super::ClipVisionOutput;
use crate::conditioning::{CondEntry, Conditioning};
use crate::loaders::model_files_fingerprint;
use crate::loaders::models::{cached, file_names, file_size, model_file, open_weight_file};
use crate::runtime::{device, tensor_error};

const FOLDER: &str = "style_models";

pub(super) fn register(registry: &mut NodeRegistry) {
    registry.register(StyleModelLoader);
    registry.register(StyleModelApply);
}

/// The STYLE_MODEL socket.
#[derive(Clone)]
pub struct LoadedStyleModel(pub Arc<StyleModel>);

impl std::fmt::Debug for LoadedStyleModel {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("StyleModel")
    }
}

impl NodeObject for LoadedStyleModel {
    fn type_name(&self) -> &'static str {
        "STYLE_MODEL"
    }
}

/// `comfy.sd.load_style_model`: a FLUX Redux or SD1.5 style-adapter file, and its size.
pub fn load_style_model(path: &Path, device: &Device) -> Result<(StyleModel, u64), NodeError> {
    let file = open_weight_file(path)?;
    if !file.has(REDUX_MARKER) && !file.has(STYLE_ADAPTER_MARKER) {
        return Err(NodeError::new(format!("invalid style model {}", path.display())));
    }
    let config = StyleModelConfig::infer(file.as_ref())
        .map_err(|error| NodeError::new(format!("invalid style model {}: {error}", path.display())))?;
    let source = WeightSource::new(file, "", device, Precision::F32);
    let model = StyleModel::new(&config, source.weights()).map_err(tensor_error)?;
    Ok((model, file_size(path)))
}

/// `StyleModelLoader` ("Load Style Model").
pub struct StyleModelLoader;

impl Node for StyleModelLoader {
    fn schema(&self, services: &Services) -> NodeSchema {
        NodeSchema::v1("StyleModelLoader", "nodes", "loaders")
            .display("Load Style Model")
            .required("style_model_name", InputSpec::combo(&file_names(services, FOLDER)))
            .model_folder("style_model_name", FOLDER)
            .output(OutputSpec::of("STYLE_MODEL"))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &[("style_model_name", FOLDER)])
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let path = model_file(ctx, FOLDER, inputs.string("style_model_name")?)?;
        let device = device(ctx.services);
        let model = cached(ctx, &path, "style_model", || load_style_model(&path, &device))?;
        Ok(NodeOutput::values(vec![Value::object(LoadedStyleModel(model))]))
    }
}

/// `StyleModelApply` ("Apply Style Model"): the style tokens of every image, one after another,
/// appended to each entry's text. `multiply` scales them by the strength; `attn_bias` leaves them
/// and instead biases every other token's attention to them by ln(strength) (an entry's
/// `attention_mask`, made or widened here, which FLUX reads).
pub struct StyleModelApply;

impl Node for StyleModelApply {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("StyleModelApply", "nodes", "conditioning/style_model")
            .display("Apply Style Model")
            .required("conditioning", InputSpec::of("CONDITIONING"))
            .required("style_model", InputSpec::of("STYLE_MODEL"))
            .required("clip_vision_output", InputSpec::of("CLIP_VISION_OUTPUT"))
            .required("strength", InputSpec::float(1.0, 0.0, 10.0).opt("step", 0.001))
            .required("strength_type", InputSpec::combo(&["multiply", "attn_bias"]))
            .output(OutputSpec::of("CONDITIONING"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let conditioning = inputs.object::<Conditioning>("conditioning")?;
        let LoadedStyleModel(style) = inputs.object::<LoadedStyleModel>("style_model")?;
        let ClipVisionOutput(output) = inputs.object::<ClipVisionOutput>("clip_vision_output")?;
        let strength = inputs.float("strength")?;
        let attention_bias = inputs.string("strength_type")? == "attn_bias";
        let tokens = style.tokens(&output.last_hidden_state).map_err(tensor_error)?;
        let width = tokens.dim(2).map_err(tensor_error)?;
        let tokens = tokens.reshape((1, (), width)).map_err(tensor_error)?;
        let tokens = match attention_bias {
            true => tokens,
            false => (tokens * strength).map_err(tensor_error)?,
        };
        let bias = match attention_bias {
            true => strength as f32,
            false => 1.0,
        };
        let entries = conditioning
            .0
            .iter()
            .map(|entry| with_style_tokens(entry, &tokens, bias, attention_bias && strength != 1.0))
            .collect::<candle_core::Result<_>>()
            .map_err(tensor_error)?;
        Ok(NodeOutput::values(vec![Value::object(Conditioning(entries))]))
    }
}

/// `entry` with `tokens` [1, N, width] after its text; with `bias_needed` (or a mask already
/// there) the attention of every other token to them is biased by ln(`bias`), in float16 as
/// ComfyUI keeps it.
fn with_style_tokens(
    entry: &CondEntry,
    tokens: &Tensor,
    bias: f32,
    bias_needed: bool,
) -> candle_core::Result<CondEntry> {
    let text = &entry.cross_attention;
    let tokens = tokens.to_device(text.device())?.to_dtype(text.dtype())?;
    let attention_mask = match (&entry.attention_mask, bias_needed) {
        (None, false) => None,
        (mask, _) => Some(widened_mask(mask.as_ref(), text.dim(1)?, tokens.dim(1)?, bias)?),
    };
    Ok(CondEntry {
        cross_attention: Tensor::cat(&[text, &tokens], 1)?,
        attention_mask,
        ..entry.clone()
    })
}

/// The mask [T + 1, T + 1] over `text` tokens and the image (zeros when there is none) widened to
/// [T + N + 1, T + N + 1] for N `added` tokens after the text: the old quadrants kept, the new
/// tokens' columns ln(`bias`) except in their own rows, which stay 0.
fn widened_mask(mask: Option<&Tensor>, text: usize, added: usize, bias: f32) -> candle_core::Result<Tensor> {
    let old_size = text + 1;
    let old: Vec<f32> = match mask {
        Some(mask) => mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
        None => vec![0.0; old_size * old_size],
    };
    if old.len() != old_size * old_size {
        candle_core::bail!(
            "an attention mask of {} values does not fit {text} text tokens and the image",
            old.len()
        );
    }
    let bias = half::f16::from_f32(bias.ln()).to_f32();
    let size = old_size + added;
    // Index in the old mask of a row or column of the new one (None: an added token).
    let old_index = |i: usize| match i {
        i if i < text => Some(i),
        i if i < text + added => None,
        i => Some(i - added),
    };
    let values: Vec<f32> = (0..size)
        .flat_map(|row| (0..size).map(move |column| (row, column)))
        .map(|(row, column)| match (old_index(row), old_index(column)) {
            (Some(row), Some(column)) => old[row * old_size + column],
            (Some(_), None) => bias,
            (None, _) => 0.0,
        })
        .collect();
    let device = mask.map_or(Device::Cpu, |mask| mask.device().clone());
    Tensor::from_vec(values, (size, size), &device)
}
