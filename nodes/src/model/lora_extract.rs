//! `LoraSave` ("Extract and Save Lora", `comfy_extras/nodes_lora_extract.py`): a LoRA made from
//! the weights of a MODEL and/or a CLIP with their patches applied (typically the outputs of
//! ModelMergeSubtract and CLIPMergeSubtract, whose weights are differences), written as
//! safetensors to the output folder (`<prefix>_<counter>_.safetensors`, no metadata) in
//! ComfyUI's generic LoRA naming: `diffusion_model.<key>` for the UNet and
//! `text_encoders.<encoder>.transformer.<key>` for the text encoders (`clip_l`, `clip_g`,
//! `clip_h`, `t5xxl`; OpenCLIP encoders under their transformers names, as ComfyUI keeps them).
//!
//! For each `.weight` of two or more dimensions, `standard` writes `.lora_up.weight` and
//! `.lora_down.weight` ([`extract_lora`]), `full_diff` the whole tensor as `.diff`; with
//! `bias_diff`, one-dimensional weights (norms) become `.diff` and biases `.diff_b`. Everything
//! is written as float16.

use candle_core::{DType, Tensor};
use easel_engine::schema::{HiddenInput, InputSpec, NodeSchema};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services};
use easel_models::architectures::clip_encoder::ClipNaming;
use easel_models::checkpoint::TextEncoderKind;
use easel_models::lora_extract::extract_lora;
use easel_models::weights::WeightSource;

use crate::image::nodes::save_target;
use crate::model::clip::{Clip, TextEncoder, TextNetwork};
use crate::model::diffusion_model::Model;
use crate::model::saving::openclip_as_transformers;
use crate::paths::{write_replacing, Paths};
use crate::runtime::{experimental, tensor_error};
use crate::saved_files::{for_each_source_tensor, tensor_bytes};

/// The kinds of LoRA `LoraSave` writes (ComfyUI's `LORA_TYPES`).
const LORA_TYPES: [&str; 2] = ["standard", "full_diff"];

/// What to extract from each weight.
#[derive(Clone, Copy, Debug)]
struct Extraction {
    /// Low-rank factors of this rank (`standard`), or the whole difference (`full_diff`).
    rank: Option<usize>,
    bias_diff: bool,
}

impl Extraction {
    /// The LoRA tensors for the model tensor `key` (ComfyUI's state-dict name, after the LoRA
    /// prefix `lora_prefix`), whose patched value is `tensor`, added to `out` in f16.
    fn add(
        &self,
        lora_prefix: &str,
        key: &str,
        tensor: Tensor,
        out: &mut Vec<(String, Tensor)>,
    ) -> Result<(), NodeError> {
        let mut push = |suffix: &str, tensor: &Tensor| -> Result<(), NodeError> {
            let stem = key
                .strip_suffix(".weight")
                .or_else(|| key.strip_suffix(".bias"))
                .unwrap_or(key);
            out.push((
                format!("{lora_prefix}{stem}{suffix}"),
                tensor.to_dtype(DType::F16).map_err(tensor_error)?,
            ));
            Ok(())
        };
        if key.ends_with(".weight") {
            match self.rank {
                None => push(".diff", &tensor)?,
                Some(_) if tensor.rank() < 2 => {
                    if self.bias_diff {
                        push(".diff", &tensor)?;
                    }
                }
                Some(rank) => match extract_lora(&tensor, rank) {
                    Ok((up, down)) => {
                        push(".lora_up.weight", &up)?;
                        push(".lora_down.weight", &down)?;
                    }
                    Err(error) => tracing::warn!(
                        "Could not generate lora weights for key {key}, is the weight difference a zero? ({error})"
                    ),
                },
            }
        } else if self.bias_diff && key.ends_with(".bias") {
            push(".diff_b", &tensor)?;
        }
        Ok(())
    }

    /// The LoRA tensors of every floating-point tensor of `source` (patched), named by
    /// `rename` (which may split a tensor into several, or drop it), under `lora_prefix`.
    fn add_source(
        &self,
        source: &WeightSource,
        lora_prefix: &str,
        rename: impl Fn(&str, Tensor) -> candle_core::Result<Vec<(String, Tensor)>>,
        out: &mut Vec<(String, Tensor)>,
    ) -> Result<(), NodeError> {
        for_each_source_tensor(source, |name, tensor, _| {
            for (key, tensor) in rename(name, tensor).map_err(tensor_error)? {
                self.add(lora_prefix, &key, tensor, out)?;
            }
            Ok(())
        })
    }
}

/// Where ComfyUI's CLIP state dict keeps a text encoder's transformer.
fn encoder_root(encoder: &TextEncoder) -> &'static str {
    match encoder.clip_kind() {
        Some(TextEncoderKind::ClipL) => "clip_l.transformer.",
        Some(TextEncoderKind::ClipG) => "clip_g.transformer.",
        Some(TextEncoderKind::ClipH) => "clip_h.transformer.",
        None => "t5xxl.transformer.",
    }
}

fn keep(name: &str, tensor: Tensor) -> candle_core::Result<Vec<(String, Tensor)>> {
    Ok(vec![(name.to_string(), tensor)])
}

/// `tensors` as the bytes of a safetensors file without metadata.
fn safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>, NodeError> {
    let mut encoded = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let (dtype, bytes) = tensor_bytes(tensor).map_err(tensor_error)?;
        encoded.push((name.as_str(), dtype, tensor.dims().to_vec(), bytes));
    }
    let mut views = Vec::with_capacity(encoded.len());
    for (name, dtype, shape, bytes) in &encoded {
        let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
            .map_err(|error| NodeError::new(error.to_string()))?;
        views.push((*name, view));
    }
    safetensors::tensor::serialize(views, None).map_err(|error| NodeError::new(error.to_string()))
}

/// `LoraSave` ("Extract and Save Lora").
pub struct LoraSave;

impl Node for LoraSave {
    fn schema(&self, _: &Services) -> NodeSchema {
        experimental(
            NodeSchema::v3("LoraSave", "comfy_extras.nodes_lora_extract", "_for_testing")
                .display("Extract and Save Lora")
                .output_node()
                .required(
                    "filename_prefix",
                    InputSpec::string("loras/ComfyUI_extracted_lora").opt("multiline", false),
                )
                .required("rank", InputSpec::int(8, 1, 4096).opt("step", 1))
                .required("lora_type", InputSpec::combo_v3(&LORA_TYPES))
                .required("bias_diff", InputSpec::boolean(true))
                .optional(
                    "model_diff",
                    InputSpec::of("MODEL").opt("tooltip", "The ModelSubtract output to be converted to a lora."),
                )
                .optional(
                    "text_encoder_diff",
                    InputSpec::of("CLIP").opt("tooltip", "The CLIPSubtract output to be converted to a lora."),
                )
                .hidden("prompt", HiddenInput::Prompt)
                .hidden("extra_pnginfo", HiddenInput::ExtraPngInfo),
        )
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.optional_object::<Model>("model_diff")?;
        let clip = inputs.optional_object::<Clip>("text_encoder_diff")?;
        if model.is_none() && clip.is_none() {
            return Ok(NodeOutput::values(Vec::new()));
        }
        let rank = usize::try_from(inputs.int("rank")?)
            .map_err(|_| NodeError::value("rank must be at least 1"))?
            .max(1);
        let extraction = Extraction {
            rank: match inputs.string("lora_type")? {
                "standard" => Some(rank),
                "full_diff" => None,
                other => return Err(NodeError::value(format!("unknown lora_type '{other}'"))),
            },
            bias_diff: inputs.bool("bias_diff")?,
        };
        let paths = ctx.services.require::<Paths>()?;
        let target = save_target(inputs.string("filename_prefix")?, &paths.output, 0, 0)?;
        let mut tensors = Vec::new();
        if let Some(model) = model {
            extraction.add_source(&model.0.source, "diffusion_model.", keep, &mut tensors)?;
        }
        for encoder in clip.iter().flat_map(|clip| &clip.encoders) {
            let lora_prefix = format!("text_encoders.{}", encoder_root(encoder));
            match &encoder.network {
                TextNetwork::Clip { encoder: network, .. } if network.config().naming == ClipNaming::OpenClip => {
                    extraction.add_source(&encoder.source, &lora_prefix, openclip_as_transformers, &mut tensors)?
                }
                _ => extraction.add_source(&encoder.source, &lora_prefix, keep, &mut tensors)?,
            }
        }
        let bytes = safetensors_bytes(&tensors)?;
        let name = format!("{}_{:05}_.safetensors", target.filename, target.counter);
        write_replacing(&target.folder.join(name), &bytes)
            .map_err(|error| NodeError::typed("OSError", error.to_string()))?;
        Ok(NodeOutput::values(Vec::new()))
    }
}
