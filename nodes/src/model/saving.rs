//! Saving models (`comfy_extras/nodes_model_merging.py`): CheckpointSave, ModelSave, CLIPSave
//! and VAESave write safetensors files in ComfyUI's layouts, every tensor with the patches of the
//! model it comes from (merges, LoRAs), in the dtype its file had (quantized GGUF and fp8 tensors
//! as f16), with ComfyUI's metadata: the prompt and workflow (unless metadata is off), and for a
//! checkpoint the prediction type and SDXL's model spec.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use easel_engine::schema::{HiddenInput, InputSpec, NodeSchema};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services};
use easel_models::architectures::clip_encoder::ClipNaming;
use easel_models::checkpoint::{
    checkpoint_clip_prefixes, Family, TextEncoderKind, FLUX_CLIP_L_PREFIX, FLUX_T5_PREFIX, FLUX_VAE_PREFIX,
    SD3_CLIP_G_PREFIX, SD3_CLIP_L_PREFIX, SD3_T5_PREFIX, UNET_PREFIX, VAE_PREFIX,
};
use easel_models::sampling::schedule::{ContinuousTimestep, SigmaSchedule};
use easel_models::weights::WeightSource;

use crate::image::nodes::save_target;
use crate::model::clip::{Clip, TextEncoder, TextNetwork};
use crate::model::diffusion_model::{DiffusionModel, Model, Prediction};
use crate::model::vae::VaeModel;
use crate::paths::{write_replacing, Paths};
use crate::runtime::tensor_error;
use crate::saved_files::{for_each_source_tensor, prompt_metadata, tensor_bytes};

const MODULE: &str = "comfy_extras.nodes_model_merging";
const CATEGORY: &str = "advanced/model_merging";

/// One tensor of a file being written.
struct SavedTensor {
    name: String,
    tensor: Tensor,
    dtype: DType,
}

/// The tensors of a file being written, in the order added.
#[derive(Default)]
struct SavedFile {
    tensors: Vec<SavedTensor>,
}

impl SavedFile {
    /// Every floating-point tensor of `source` (its patches applied) under `prefix`, each through
    /// `rename` (which may split a tensor or drop it). Integer buffers (CLIP's position ids) are
    /// left out, as ComfyUI's state dicts have none.
    fn add_source(
        &mut self,
        source: &WeightSource,
        prefix: &str,
        rename: impl Fn(&str, Tensor) -> candle_core::Result<Vec<(String, Tensor)>>,
    ) -> Result<(), NodeError> {
        for_each_source_tensor(source, |name, tensor, dtype| {
            for (renamed, tensor) in rename(name, tensor).map_err(tensor_error)? {
                self.tensors.push(SavedTensor {
                    name: format!("{prefix}{renamed}"),
                    tensor,
                    dtype,
                });
            }
            Ok(())
        })
    }

    /// An empty f32 tensor ComfyUI writes as a flag (`v_pred`).
    fn add_flag(&mut self, name: &str) -> Result<(), NodeError> {
        let tensor = Tensor::zeros(0, DType::F32, &candle_core::Device::Cpu).map_err(tensor_error)?;
        self.tensors.push(SavedTensor {
            name: name.to_string(),
            tensor,
            dtype: DType::F32,
        });
        Ok(())
    }

    /// A float32 scalar (a 0-dimensional tensor), as `torch.tensor(x).float()` saves.
    fn add_scalar(&mut self, name: &str, value: f32) -> Result<(), NodeError> {
        let tensor = Tensor::new(value, &candle_core::Device::Cpu).map_err(tensor_error)?;
        self.tensors.push(SavedTensor {
            name: name.to_string(),
            tensor,
            dtype: DType::F32,
        });
        Ok(())
    }

    /// The safetensors bytes with `metadata`.
    fn serialize(&self, metadata: HashMap<String, String>) -> Result<Vec<u8>, NodeError> {
        let mut encoded = Vec::with_capacity(self.tensors.len());
        for saved in &self.tensors {
            let tensor = saved.tensor.to_dtype(saved.dtype).map_err(tensor_error)?;
            let (dtype, bytes) = tensor_bytes(&tensor).map_err(tensor_error)?;
            encoded.push((saved.name.as_str(), dtype, tensor.dims().to_vec(), bytes));
        }
        let mut views = Vec::with_capacity(encoded.len());
        for (name, dtype, shape, bytes) in &encoded {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map_err(|error| NodeError::new(error.to_string()))?;
            views.push((*name, view));
        }
        safetensors::tensor::serialize(views, Some(metadata)).map_err(|error| NodeError::new(error.to_string()))
    }
}

/// Writes `file` as `<prefix>_<counter>_.safetensors` in the output folder.
fn write_file(
    ctx: &NodeContext,
    prefix: &str,
    file: &SavedFile,
    metadata: impl FnOnce(&str, u64) -> HashMap<String, String>,
) -> Result<(), NodeError> {
    let paths = ctx.services.require::<Paths>()?;
    let target = save_target(prefix, &paths.output, 0, 0)?;
    let bytes = file.serialize(metadata(&target.filename, target.counter))?;
    let name = format!("{}_{:05}_.safetensors", target.filename, target.counter);
    write_replacing(&target.folder.join(name), &bytes).map_err(|error| NodeError::typed("OSError", error.to_string()))
}

/// Where a text encoder of `family` lies in a checkpoint, and the naming it has there (CLIP-L
/// in the transformers layout, CLIP-G and CLIP-H in OpenCLIP's but SD3's CLIP-G in the
/// transformers layout, as ComfyUI writes them; none for T5).
fn checkpoint_clip_prefix(family: Family, encoder: &TextEncoder) -> Option<(&'static str, Option<ClipNaming>)> {
    let naming = |kind: TextEncoderKind| match kind {
        TextEncoderKind::ClipL => ClipNaming::Transformers,
        _ => ClipNaming::OpenClip,
    };
    match (family, encoder.clip_kind()) {
        (Family::Flux, Some(TextEncoderKind::ClipL)) => Some((FLUX_CLIP_L_PREFIX, Some(ClipNaming::Transformers))),
        (Family::Flux, None) => Some((FLUX_T5_PREFIX, None)),
        (Family::Sd3, Some(TextEncoderKind::ClipL)) => Some((SD3_CLIP_L_PREFIX, Some(ClipNaming::Transformers))),
        (Family::Sd3, Some(TextEncoderKind::ClipG)) => Some((SD3_CLIP_G_PREFIX, Some(ClipNaming::Transformers))),
        (Family::Sd3, None) => Some((SD3_T5_PREFIX, None)),
        (_, Some(kind)) => checkpoint_clip_prefixes(family)
            .iter()
            .find(|(found, _)| *found == kind)
            .map(|(_, prefix)| (*prefix, Some(naming(kind)))),
        (_, None) => None,
    }
}

fn clip_naming(encoder: &TextEncoder) -> Option<ClipNaming> {
    match &encoder.network {
        TextNetwork::Clip { encoder, .. } => Some(encoder.config().naming),
        TextNetwork::T5 { .. } => None,
    }
}

fn keep(name: &str, tensor: Tensor) -> candle_core::Result<Vec<(String, Tensor)>> {
    Ok(vec![(name.to_string(), tensor)])
}

/// ComfyUI's `save_checkpoint`: the model under `model.diffusion_model.`, the text encoders and
/// the VAE under their places in the family's checkpoints.
fn save_checkpoint(
    ctx: &NodeContext,
    model: &DiffusionModel,
    clip: Option<&Clip>,
    vae: Option<&VaeModel>,
    prefix: &str,
) -> Result<(), NodeError> {
    let mut file = SavedFile::default();
    file.add_source(&model.source, UNET_PREFIX, keep)?;
    if let Some(clip) = clip {
        for encoder in &clip.encoders {
            let Some((clip_prefix, naming)) = checkpoint_clip_prefix(model.family, encoder) else {
                return Err(NodeError::value(format!(
                    "a {} checkpoint has no place for this CLIP's text encoders",
                    model.family.name()
                )));
            };
            if naming != clip_naming(encoder) {
                return Err(NodeError::value(format!(
                    "this text encoder's weights are not in the layout a {} checkpoint keeps them in; save it with CLIPSave",
                    model.family.name()
                )));
            }
            file.add_source(&encoder.source, clip_prefix, |name, tensor| match name {
                "logit_scale" | "text_projection.weight" if model.family == Family::Sd1 => Ok(Vec::new()),
                _ => keep(name, tensor),
            })?;
        }
    }
    if let Some(vae) = vae {
        let vae_prefix = match model.family {
            Family::Flux => FLUX_VAE_PREFIX,
            _ => VAE_PREFIX,
        };
        file.add_source(&vae.source, vae_prefix, keep)?;
    }
    // What tells the sampling when the file is read back, as ComfyUI's CheckpointSave writes
    // it: v-prediction on EDM's continuous schedule by its σ range (CosXL, or a model through
    // ModelSamplingContinuousEDM), else a v-prediction model type by a flag.
    let edm_v = model.prediction == Prediction::V
        && matches!(
            model.schedule,
            SigmaSchedule::Continuous {
                timestep: ContinuousTimestep::Edm,
                ..
            }
        );
    if edm_v {
        file.add_scalar("edm_vpred.sigma_max", model.schedule.sigma_max())?;
        file.add_scalar("edm_vpred.sigma_min", model.schedule.sigma_min())?;
    }
    let v_model_type = model.prediction == Prediction::V && !edm_v;
    if v_model_type {
        file.add_flag("v_pred")?;
    }
    write_file(ctx, prefix, &file, |filename, counter| {
        let mut metadata = HashMap::new();
        let architecture = match model.family {
            Family::Sdxl => Some("stable-diffusion-xl-v1-base"),
            Family::SdxlRefiner => Some("stable-diffusion-xl-v1-refiner"),
            _ => None,
        };
        if let Some(architecture) = architecture {
            metadata.insert("modelspec.architecture".to_string(), architecture.to_string());
            metadata.insert("modelspec.sai_model_spec".to_string(), "1.0.0".to_string());
            metadata.insert("modelspec.implementation".to_string(), "sgm".to_string());
            metadata.insert("modelspec.title".to_string(), format!("{filename} {counter}"));
        }
        match model.prediction {
            Prediction::Epsilon => {
                metadata.insert("modelspec.predict_key".to_string(), "epsilon".to_string());
            }
            Prediction::V if v_model_type => {
                metadata.insert("modelspec.predict_key".to_string(), "v".to_string());
            }
            _ => {}
        }
        metadata.extend(prompt_metadata(ctx).unwrap_or_default());
        metadata
    })
}

/// An OpenCLIP text-encoder tensor under its transformers name (ComfyUI keeps CLIP-G and
/// CLIP-H in that layout): `in_proj` split into the query, key and value projections, the
/// projection matrix transposed.
pub(crate) fn openclip_as_transformers(name: &str, tensor: Tensor) -> candle_core::Result<Vec<(String, Tensor)>> {
    let renamed = match name {
        "token_embedding.weight" => "text_model.embeddings.token_embedding.weight".to_string(),
        "positional_embedding" => "text_model.embeddings.position_embedding.weight".to_string(),
        "ln_final.weight" => "text_model.final_layer_norm.weight".to_string(),
        "ln_final.bias" => "text_model.final_layer_norm.bias".to_string(),
        "text_projection" => return Ok(vec![("text_projection.weight".to_string(), tensor.t()?.contiguous()?)]),
        "logit_scale" => return Ok(Vec::new()),
        _ => {
            let Some((layer, rest)) = name
                .strip_prefix("transformer.resblocks.")
                .and_then(|rest| rest.split_once('.'))
            else {
                return Ok(vec![(name.to_string(), tensor)]);
            };
            let root = format!("text_model.encoder.layers.{layer}");
            if let Some(kind) = rest.strip_prefix("attn.in_proj_") {
                let third = tensor.dim(0)? / 3;
                return ["q_proj", "k_proj", "v_proj"]
                    .iter()
                    .enumerate()
                    .map(|(index, projection)| {
                        Ok((
                            format!("{root}.self_attn.{projection}.{kind}"),
                            tensor.narrow(0, index * third, third)?.contiguous()?,
                        ))
                    })
                    .collect();
            }
            let module = [
                ("ln_1.", "layer_norm1."),
                ("ln_2.", "layer_norm2."),
                ("mlp.c_fc.", "mlp.fc1."),
                ("mlp.c_proj.", "mlp.fc2."),
                ("attn.out_proj.", "self_attn.out_proj."),
            ]
            .iter()
            .find_map(|(open_clip, transformers)| {
                rest.strip_prefix(open_clip)
                    .map(|parameter| format!("{transformers}{parameter}"))
            })
            .unwrap_or_else(|| rest.to_string());
            format!("{root}.{module}")
        }
    };
    Ok(vec![(renamed, tensor)])
}

/// `CheckpointSave` ("Save Checkpoint").
pub struct CheckpointSave;

impl Node for CheckpointSave {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("CheckpointSave", MODULE, CATEGORY)
            .display("Save Checkpoint")
            .output_node()
            .required("model", InputSpec::of("MODEL"))
            .required("clip", InputSpec::of("CLIP"))
            .required("vae", InputSpec::of("VAE"))
            .required("filename_prefix", InputSpec::string("checkpoints/ComfyUI"))
            .hidden("prompt", HiddenInput::Prompt)
            .hidden("extra_pnginfo", HiddenInput::ExtraPngInfo)
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let clip = inputs.object::<Clip>("clip")?;
        let vae = inputs.object::<VaeModel>("vae")?;
        save_checkpoint(ctx, &model.0, Some(clip), Some(vae), inputs.string("filename_prefix")?)?;
        Ok(NodeOutput::values(Vec::new()))
    }
}

/// `ModelSave`: the diffusion model alone, as a checkpoint without encoders or VAE.
pub struct ModelSave;

impl Node for ModelSave {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("ModelSave", MODULE, CATEGORY)
            .output_node()
            .required("model", InputSpec::of("MODEL"))
            .required("filename_prefix", InputSpec::string("diffusion_models/ComfyUI"))
            .hidden("prompt", HiddenInput::Prompt)
            .hidden("extra_pnginfo", HiddenInput::ExtraPngInfo)
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        save_checkpoint(ctx, &model.0, None, None, inputs.string("filename_prefix")?)?;
        Ok(NodeOutput::values(Vec::new()))
    }
}

/// `CLIPSave`: one file per text encoder (`<prefix>_clip_l`, `_clip_g`, `_clip_h`, `_t5xxl`), in
/// the transformers layout ComfyUI keeps them in.
pub struct ClipSave;

impl Node for ClipSave {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("CLIPSave", MODULE, CATEGORY)
            .output_node()
            .required("clip", InputSpec::of("CLIP"))
            .required("filename_prefix", InputSpec::string("clip/ComfyUI"))
            .hidden("prompt", HiddenInput::Prompt)
            .hidden("extra_pnginfo", HiddenInput::ExtraPngInfo)
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let clip = inputs.object::<Clip>("clip")?;
        let prefix = inputs.string("filename_prefix")?;
        for encoder in &clip.encoders {
            let part = match encoder.clip_kind() {
                Some(TextEncoderKind::ClipL) => "clip_l",
                Some(TextEncoderKind::ClipG) => "clip_g",
                Some(TextEncoderKind::ClipH) => "clip_h",
                None => "t5xxl",
            };
            let mut file = SavedFile::default();
            match clip_naming(encoder) {
                Some(ClipNaming::OpenClip) => file.add_source(&encoder.source, "", openclip_as_transformers)?,
                _ => file.add_source(&encoder.source, "", keep)?,
            }
            write_file(ctx, &format!("{prefix}_{part}"), &file, |_, _| {
                let mut metadata = prompt_metadata(ctx).unwrap_or_default();
                if !metadata.is_empty() {
                    metadata.insert("format".to_string(), "pt".to_string());
                }
                metadata
            })?;
        }
        Ok(NodeOutput::values(Vec::new()))
    }
}

/// `VAESave`.
pub struct VaeSave;

impl Node for VaeSave {
    fn schema(&self, _: &Services) -> NodeSchema {
        NodeSchema::v1("VAESave", MODULE, CATEGORY)
            .output_node()
            .required("vae", InputSpec::of("VAE"))
            .required("filename_prefix", InputSpec::string("vae/ComfyUI_vae"))
            .hidden("prompt", HiddenInput::Prompt)
            .hidden("extra_pnginfo", HiddenInput::ExtraPngInfo)
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let vae = inputs.object::<VaeModel>("vae")?;
        let mut file = SavedFile::default();
        file.add_source(&vae.source, "", keep)?;
        write_file(ctx, inputs.string("filename_prefix")?, &file, |_, _| {
            prompt_metadata(ctx).unwrap_or_default()
        })?;
        Ok(NodeOutput::values(Vec::new()))
    }
}
