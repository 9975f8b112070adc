//! Weight-patching nodes (`comfy_extras/nodes_model_merging.py`, `nodes_attention_multiply.py`):
//! models and text encoders merged tensor by tensor (`W ← strength_model·W + strength·W₂`, W₂
//! the other model's tensor of the same name with its own patches; tensors whose shapes differ
//! are skipped with a warning, as ComfyUI does) and attention projections scaled.

use std::collections::HashMap;
use std::sync::Arc;

use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use easel_models::lora::{clip_attention_scales, Patch};
use easel_models::weights::WeightSource;

use crate::model::clip::{Clip, TextNetwork};
use crate::model::diffusion_model::Model;
use crate::runtime::{experimental, tensor_error};

const MODULE: &str = "comfy_extras.nodes_model_merging";
const CATEGORY: &str = "advanced/model_merging";

/// Merge patches for every tensor `target` and `other` share (by name under their prefixes),
/// `(strength, strength_model)` chosen per tensor name (relative to the prefix); `skip` leaves
/// tensors out.
fn merge_patches(
    target: &WeightSource,
    other: &WeightSource,
    strengths: impl Fn(&str) -> (f32, f32),
    skip: impl Fn(&str) -> bool,
) -> HashMap<String, Vec<Patch>> {
    let (target_prefix, other_prefix) = (target.name_prefix(), other.name_prefix());
    let mut patches = HashMap::new();
    for other_name in other.file.tensor_names() {
        let Some(name) = other_name.strip_prefix(other_prefix.as_str()) else {
            continue;
        };
        let target_name = format!("{target_prefix}{name}");
        let Some(shape) = target.file.shape(&target_name) else {
            continue;
        };
        if skip(name) {
            continue;
        }
        if other.file.shape(other_name) != Some(shape) {
            tracing::warn!(
                "WARNING SHAPE MISMATCH {target_name} WEIGHT NOT MERGED {:?} != {shape:?}",
                other.file.shape(other_name).unwrap_or_default()
            );
            continue;
        }
        let (strength, strength_model) = strengths(name);
        patches.insert(
            target_name,
            vec![Patch::merge(other.clone(), name.to_string(), strength, strength_model)],
        );
    }
    patches
}

/// The MODEL `model1` with `model2` merged in at `strengths` per tensor.
pub(crate) fn merged_model(
    inputs: &NodeInputs,
    strengths: impl Fn(&str) -> (f32, f32),
) -> Result<NodeOutput, NodeError> {
    let (model1, model2) = (inputs.object::<Model>("model1")?, inputs.object::<Model>("model2")?);
    let patches = merge_patches(&model1.0.source, &model2.0.source, strengths, |_| false);
    let merged = model1.0.with_weight_patches(patches).map_err(tensor_error)?;
    Ok(NodeOutput::values(vec![Value::object(Model(Arc::new(merged)))]))
}

/// The CLIP `clip1` with `clip2`'s encoders merged into those of the same kind at the same
/// place, at `(strength, strength_model)` (position ids and logit scales are kept).
fn merged_clip(inputs: &NodeInputs, strength: f32, strength_model: f32) -> Result<NodeOutput, NodeError> {
    let (clip1, clip2) = (inputs.object::<Clip>("clip1")?, inputs.object::<Clip>("clip2")?);
    let mut encoders = Vec::with_capacity(clip1.encoders.len());
    for (index, encoder) in clip1.encoders.iter().enumerate() {
        let other = clip2
            .encoders
            .get(index)
            .filter(|other| other.clip_kind() == encoder.clip_kind());
        let Some(other) = other else {
            encoders.push(encoder.clone());
            continue;
        };
        let patches = merge_patches(
            &encoder.source,
            &other.source,
            |_| (strength, strength_model),
            |name| name.ends_with(".position_ids") || name.ends_with(".logit_scale"),
        );
        encoders.push(encoder.with_weight_patches(patches).map_err(tensor_error)?);
    }
    Ok(NodeOutput::values(vec![Value::object(Clip {
        encoders,
        ..clip1.clone()
    })]))
}

fn ratio_spec() -> InputSpec {
    InputSpec::float(1.0, 0.0, 1.0).opt("step", 0.01)
}

fn multiplier_spec() -> InputSpec {
    InputSpec::float(1.0, -10.0, 10.0).opt("step", 0.01)
}

fn two_models(name: &str) -> NodeSchema {
    NodeSchema::v1(name, MODULE, CATEGORY)
        .required("model1", InputSpec::of("MODEL"))
        .required("model2", InputSpec::of("MODEL"))
}

fn two_clips(name: &str) -> NodeSchema {
    NodeSchema::v1(name, MODULE, CATEGORY)
        .required("clip1", InputSpec::of("CLIP"))
        .required("clip2", InputSpec::of("CLIP"))
}

/// `ModelMergeSimple`: `ratio·model1 + (1 − ratio)·model2`.
pub struct ModelMergeSimple;

impl Node for ModelMergeSimple {
    fn schema(&self, _: &Services) -> NodeSchema {
        two_models("ModelMergeSimple")
            .required("ratio", ratio_spec())
            .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let ratio = inputs.float("ratio")? as f32;
        merged_model(inputs, |_| (1.0 - ratio, ratio))
    }
}

/// `ModelMergeBlocks`: ModelMergeSimple with a ratio per part of the UNet: the tensors whose
/// name starts with `input`, `middle` or `out` (the longest match wins; `out` covers the
/// decoder blocks and the output layers), the others at `input`'s.
pub struct ModelMergeBlocks;

impl Node for ModelMergeBlocks {
    fn schema(&self, _: &Services) -> NodeSchema {
        two_models("ModelMergeBlocks")
            .required("input", ratio_spec())
            .required("middle", ratio_spec())
            .required("out", ratio_spec())
            .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let parts = [
            ("input", inputs.float("input")? as f32),
            ("middle", inputs.float("middle")? as f32),
            ("out", inputs.float("out")? as f32),
        ];
        merged_model(inputs, |name| {
            let ratio = block_ratio(&parts, name);
            (1.0 - ratio, ratio)
        })
    }
}

/// ComfyUI's `ModelMergeBlocks.merge` choice of ratio for the tensor `name` (relative to the
/// model's prefix): that of the longest block prefix `name` starts with, else the first block's.
pub(crate) fn block_ratio<P: AsRef<str>>(blocks: &[(P, f32)], name: &str) -> f32 {
    blocks
        .iter()
        .filter(|(prefix, _)| name.starts_with(prefix.as_ref()))
        .max_by_key(|(prefix, _)| prefix.as_ref().len())
        .or(blocks.first())
        .map_or(1.0, |(_, ratio)| *ratio)
}

/// `ModelMergeSubtract`: `multiplier·(model1 − model2)`.
pub struct ModelMergeSubtract;

impl Node for ModelMergeSubtract {
    fn schema(&self, _: &Services) -> NodeSchema {
        two_models("ModelMergeSubtract")
            .required("multiplier", multiplier_spec())
            .output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let multiplier = inputs.float("multiplier")? as f32;
        merged_model(inputs, |_| (-multiplier, multiplier))
    }
}

/// `ModelMergeAdd`: `model1 + model2`.
pub struct ModelMergeAdd;

impl Node for ModelMergeAdd {
    fn schema(&self, _: &Services) -> NodeSchema {
        two_models("ModelMergeAdd").output(OutputSpec::of("MODEL"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        merged_model(inputs, |_| (1.0, 1.0))
    }
}

/// `CLIPMergeSimple`: `ratio·clip1 + (1 − ratio)·clip2`.
pub struct ClipMergeSimple;

impl Node for ClipMergeSimple {
    fn schema(&self, _: &Services) -> NodeSchema {
        two_clips("CLIPMergeSimple")
            .required("ratio", ratio_spec())
            .output(OutputSpec::of("CLIP"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let ratio = inputs.float("ratio")? as f32;
        merged_clip(inputs, 1.0 - ratio, ratio)
    }
}

/// `CLIPMergeSubtract`: `multiplier·(clip1 − clip2)`.
pub struct ClipMergeSubtract;

impl Node for ClipMergeSubtract {
    fn schema(&self, _: &Services) -> NodeSchema {
        two_clips("CLIPMergeSubtract")
            .required("multiplier", multiplier_spec())
            .output(OutputSpec::of("CLIP"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let multiplier = inputs.float("multiplier")? as f32;
        merged_clip(inputs, -multiplier, multiplier)
    }
}

/// `CLIPMergeAdd`: `clip1 + clip2`.
pub struct ClipMergeAdd;

impl Node for ClipMergeAdd {
    fn schema(&self, _: &Services) -> NodeSchema {
        two_clips("CLIPMergeAdd").output(OutputSpec::of("CLIP"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        merged_clip(inputs, 1.0, 1.0)
    }
}

/// The four factors of an attention-multiply node: q, k, v, out.
fn attention_factors(inputs: &NodeInputs) -> Result<[f32; 4], NodeError> {
    Ok([
        inputs.float("q")? as f32,
        inputs.float("k")? as f32,
        inputs.float("v")? as f32,
        inputs.float("out")? as f32,
    ])
}

fn attention_multiply_schema(name: &str, socket: &str, input: &str) -> NodeSchema {
    let factor = || InputSpec::float(1.0, 0.0, 10.0).opt("step", 0.01);
    experimental(
        NodeSchema::v3(
            name,
            "comfy_extras.nodes_attention_multiply",
            "_for_testing/attention_experiments",
        )
        .required(input, InputSpec::of(socket))
        .required("q", factor())
        .required("k", factor())
        .required("v", factor())
        .required("out", factor())
        .output(OutputSpec::of(socket)),
    )
}

/// `UNetSelfAttentionMultiply` (`attn1`) and `UNetCrossAttentionMultiply` (`attn2`): the
/// attentions' projection weights and biases scaled.
pub struct UNetAttentionMultiply {
    pub cross: bool,
}

impl Node for UNetAttentionMultiply {
    fn schema(&self, _: &Services) -> NodeSchema {
        let name = match self.cross {
            false => "UNetSelfAttentionMultiply",
            true => "UNetCrossAttentionMultiply",
        };
        attention_multiply_schema(name, "MODEL", "model")
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let factors = attention_factors(inputs)?;
        let attention = if self.cross { "attn2" } else { "attn1" };
        let projections = ["to_q", "to_k", "to_v", "to_out.0"];
        let source = &model.0.source;
        let prefix = source.name_prefix();
        let mut patches: HashMap<String, Vec<Patch>> = HashMap::new();
        for name in source
            .file
            .tensor_names()
            .filter(|name| name.starts_with(prefix.as_str()))
        {
            for (projection, factor) in projections.iter().zip(factors) {
                let matches = [".weight", ".bias"]
                    .iter()
                    .any(|suffix| name.ends_with(&format!("{attention}.{projection}{suffix}")));
                if matches && factor != 1.0 {
                    patches.entry(name.to_string()).or_default().push(Patch::scale(factor));
                }
            }
        }
        let patched = model.0.with_weight_patches(patches).map_err(tensor_error)?;
        Ok(NodeOutput::values(vec![Value::object(Model(Arc::new(patched)))]))
    }
}

/// `CLIPAttentionMultiply`: the CLIP encoders' self-attention projections scaled.
pub struct ClipAttentionMultiply;

impl Node for ClipAttentionMultiply {
    fn schema(&self, _: &Services) -> NodeSchema {
        attention_multiply_schema("CLIPAttentionMultiply", "CLIP", "clip")
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let clip = inputs.object::<Clip>("clip")?;
        let factors = attention_factors(inputs)?;
        let mut encoders = Vec::with_capacity(clip.encoders.len());
        for encoder in &clip.encoders {
            let TextNetwork::Clip { encoder: network, .. } = &encoder.network else {
                encoders.push(encoder.clone());
                continue;
            };
            let source = &encoder.source;
            let patches = clip_attention_scales(
                source.file.as_ref(),
                &source.name_prefix(),
                network.config().naming,
                factors,
            );
            encoders.push(encoder.with_weight_patches(patches).map_err(tensor_error)?);
        }
        Ok(NodeOutput::values(vec![Value::object(Clip {
            encoders,
            ..clip.clone()
        })]))
    }
}
