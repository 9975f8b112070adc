//! ControlNetLoader, DiffControlNetLoader, ControlNetApplyAdvanced and ControlNetApply
//! (`nodes.py`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use easel_engine::schema::{InputSpec, NodeSchema, OutputSpec};
use easel_engine::{Node, NodeContext, NodeError, NodeInputs, NodeOutput, Services, Value};
use easel_models::architectures::controlnet::{
    ControlNet, ControlNetConfig, UNION_CONTROLNET_MARKER, UNION_CONTROL_TYPES,
};
use easel_models::architectures::flux_controlnet::{
    FluxControlNet, FluxControlNetConfig, MISTOLINE_MARKER, MISTOLINE_SINGLE_PREFIX, XLABS_MARKER,
};
use easel_models::architectures::mmdit_controlnet::{
    MmditControlNet, MmditControlNetConfig, SD35_CONTROLNET_MARKER, SD3_CONTROLNET_MARKER,
};
use easel_models::architectures::t2i_adapter::{T2IAdapter, T2IAdapterConfig};
use easel_models::diffusers_layout::{
    ConvertedWeights, DIFFUSERS_CONTROLNET_MARKER, DIFFUSERS_FLUX_CONTROLNET_MARKER, DIFFUSERS_T2I_ADAPTER_MARKER,
};
use easel_models::kernels::sgemm::Precision;
use easel_models::lora::Patch;
use easel_models::weights::{MappedWeights, RenamedWeights, WeightSource};
use serde_json::{Map, Value as Json};

use super::control_lora::{ControlLora, CONTROL_LORA_MARKER};
use super::{ControlApplication, ControlModel, ControlNetwork, LoadedControlNet};
use crate::conditioning::{CondEntry, Conditioning};
use crate::image::resample::{common_upscale, ResizeMethod};
use crate::image::{Image, Mask};
use crate::loaders::model_files_fingerprint;
use crate::loaders::models::{cached, file_names, file_size, model_file, open_weight_file, undetected};
use crate::model::diffusion_model::{DiffusionModel, Model};
use crate::model::vae::VaeModel;
use crate::runtime::{broadcast, device};

const FOLDER: &str = "controlnet";

/// Control model layouts Easel does not run yet, by a tensor that marks them (ComfyUI's
/// `load_controlnet_state_dict` and `load_t2i_adapter` checks), and what they are.
const LATER_FORMATS: [(&str, &str); 4] = [
    (
        "transformer_blocks.0.img_mlp.net.0.proj.weight",
        "Qwen-Image ControlNet",
    ),
    ("after_proj_list.18.bias", "Hunyuan-DiT ControlNet"),
    ("backbone.0.0.weight", "Stable Cascade ControlNet"),
    ("backbone.10.blocks.0.weight", "Stable Cascade ControlNet"),
];

/// Loads a control model (safetensors, or a PyTorch pickle such as the original `.pth` releases),
/// told apart by its tensors as ComfyUI's `load_controlnet` does: a
/// ControlNet in the LDM layout (bare, or under `control_model.` as the original conversions
/// keep it) or in diffusers' layout, else a T2I-Adapter (ComfyUI's or diffusers' names); also
/// returns the file size. A control-LoRA is kept as its file until a model samples with it. A
/// "diff" ControlNet (under `control_model.`, with a `difference` tensor) holds its weights less
/// those of the UNet it was made from: `model`'s are added back.
pub fn load_controlnet(
    path: &Path,
    model: Option<&DiffusionModel>,
    device: &Device,
) -> Result<(LoadedControlNet, u64), NodeError> {
    let file = open_weight_file(path)?;
    if let Some((_, format)) = LATER_FORMATS.iter().find(|(marker, _)| file.has(marker)) {
        return Err(NodeError::new(format!(
            "{}: a {format} is not supported by Easel yet (SD1.x, SD2.x and SDXL ControlNets, \
             control-LoRAs, T2I-Adapters, FLUX and SD3 ControlNets are)",
            path.display()
        )));
    }
    if file.has(DIFFUSERS_FLUX_CONTROLNET_MARKER) {
        let converted =
            ConvertedWeights::diffusers_flux_controlnet(file).map_err(|error| NodeError::new(error.to_string()))?;
        return Ok((
            load_flux_controlnet(path, Arc::new(converted), device)?,
            file_size(path),
        ));
    }
    if file.has(MISTOLINE_MARKER) || (file.has("controlnet_blocks.0.weight") && file.has(XLABS_MARKER)) {
        return Ok((load_flux_controlnet(path, file, device)?, file_size(path)));
    }
    if file.has(SD3_CONTROLNET_MARKER) {
        return Ok((load_sd3_controlnet(path, file, device)?, file_size(path)));
    }
    if file.has(CONTROL_LORA_MARKER) {
        let lora = ControlLora::new(file).map_err(|error| NodeError::new(format!("{}: {error}", path.display())))?;
        let loaded = LoadedControlNet {
            network: ControlNetwork::ControlLora(lora),
            compression_ratio: 8,
            global_average_pooling: is_shuffle(path),
        };
        return Ok((loaded, file_size(path)));
    }
    let detect = |error| undetected(path, error);
    let controlnet_prefix = ["", "control_model."]
        .into_iter()
        .find(|prefix| file.has(&format!("{prefix}zero_convs.0.0.weight")));
    let (weights, prefix): (Arc<dyn MappedWeights>, &str) = match controlnet_prefix {
        _ if file.has(DIFFUSERS_CONTROLNET_MARKER) => {
            let converted =
                ConvertedWeights::diffusers_controlnet(file).map_err(|error| NodeError::new(error.to_string()))?;
            (Arc::new(converted), "")
        }
        Some(prefix) => (file, prefix),
        None => return Ok((load_t2i_adapter(path, file, device)?, file_size(path))),
    };
    let heads = ControlNetConfig::heads_for(weights.as_ref(), prefix).map_err(detect)?;
    let config = ControlNetConfig::infer(weights.as_ref(), prefix, heads).map_err(detect)?;
    let mut source = WeightSource::new(weights, prefix, device, Precision::F32);
    if prefix == DIFF_PREFIX && source.file.has(DIFF_MARKER) {
        match model {
            Some(model) => source = source.patched(model_weights_added(&source, model)),
            None => tracing::warn!("WARNING: Loaded a diff controlnet without a model. It will very likely not work."),
        }
    }
    let network = ControlNet::new(config, source.weights()).map_err(|error| NodeError::new(error.to_string()))?;
    let loaded = LoadedControlNet {
        network: ControlNetwork::ControlNet(Box::new(network)),
        compression_ratio: 8,
        global_average_pooling: is_shuffle(path),
    };
    Ok((loaded, file_size(path)))
}

/// An SD3 ControlNet: diffusers' layout (InstantX's, AliMama's inpainting one) read under
/// Stability's names, or Stability's SD3.5 layout (its embedders under either's names). Its
/// compression ratio is 1: the hint is the image at the latent's size × the VAE's downscale,
/// encoded.
fn load_sd3_controlnet(
    path: &Path,
    file: Arc<dyn MappedWeights>,
    device: &Device,
) -> Result<LoadedControlNet, NodeError> {
    let converted = match file.has(SD35_CONTROLNET_MARKER) {
        true => ConvertedWeights::sd35_controlnet(file),
        false => ConvertedWeights::diffusers_sd3_controlnet(file).map_err(|error| NodeError::new(error.to_string()))?,
    };
    let config = MmditControlNetConfig::infer(&converted).map_err(|error| undetected(path, error))?;
    let source = WeightSource::new(Arc::new(converted), "", device, Precision::F32);
    let network = MmditControlNet::new(config, source.weights()).map_err(|error| NodeError::new(error.to_string()))?;
    Ok(LoadedControlNet {
        network: ControlNetwork::Mmdit(Box::new(network)),
        compression_ratio: 1,
        global_average_pooling: false,
    })
}

/// A FLUX ControlNet (Mistoline's single-block layers read under ComfyUI's names). One that
/// takes latents has a compression ratio of 1: its hint is the image at the latent's size × the
/// VAE's downscale, encoded.
fn load_flux_controlnet(
    path: &Path,
    file: Arc<dyn MappedWeights>,
    device: &Device,
) -> Result<LoadedControlNet, NodeError> {
    let (from, to) = MISTOLINE_SINGLE_PREFIX;
    let weights: Arc<dyn MappedWeights> = Arc::new(RenamedWeights::new(file, |name| match name.strip_prefix(from) {
        Some(rest) => format!("{to}{rest}"),
        None => name.to_string(),
    }));
    let config = FluxControlNetConfig::infer(weights.as_ref()).map_err(|error| undetected(path, error))?;
    let source = WeightSource::new(weights, "", device, Precision::F32);
    let compression_ratio = if config.kind.takes_latent() { 1 } else { 8 };
    let network = FluxControlNet::new(config, source.weights()).map_err(|error| NodeError::new(error.to_string()))?;
    Ok(LoadedControlNet {
        network: ControlNetwork::Flux(Box::new(network)),
        compression_ratio,
        global_average_pooling: false,
    })
}

/// A T2I-Adapter in ComfyUI's or diffusers' names, or ComfyUI's error for a file that is no
/// control model at all.
fn load_t2i_adapter(path: &Path, file: Arc<dyn MappedWeights>, device: &Device) -> Result<LoadedControlNet, NodeError> {
    let weights: Arc<dyn MappedWeights> = if file.has(DIFFUSERS_T2I_ADAPTER_MARKER) {
        let converted =
            ConvertedWeights::diffusers_t2i_adapter(file).map_err(|error| NodeError::new(error.to_string()))?;
        Arc::new(converted)
    } else {
        file
    };
    let config = T2IAdapterConfig::infer(weights.as_ref())
        .map_err(|error| undetected(path, error))?
        .ok_or_else(|| undetected(path, "error could not detect control model type."))?;
    let source = WeightSource::new(weights, "", device, Precision::F32);
    let adapter = T2IAdapter::new(config, source.weights()).map_err(|error| NodeError::new(error.to_string()))?;
    Ok(LoadedControlNet {
        network: ControlNetwork::T2IAdapter(adapter),
        compression_ratio: 8,
        global_average_pooling: false,
    })
}

/// Whether the control model file at `path` is a union ControlNet (read from its header).
pub fn is_union_controlnet(path: &Path) -> bool {
    open_weight_file(path).is_ok_and(|file| file.has(UNION_CONTROLNET_MARKER))
}

/// Whether ComfyUI pools the residuals of the ControlNet at `path` over the image (it does for
/// files named `…_shuffle`, the v1.1 shuffle model).
fn is_shuffle(path: &Path) -> bool {
    let stem = path.file_stem().map(|stem| stem.to_string_lossy()).unwrap_or_default();
    stem.ends_with("_shuffle") || stem.ends_with("_shuffle_fp16")
}

/// Where a diff ControlNet keeps its weights, and the tensor that marks it.
const DIFF_PREFIX: &str = "control_model.";
const DIFF_MARKER: &str = "difference";

/// Patches adding to each tensor of a diff ControlNet the model's tensor of the same name.
fn model_weights_added(control: &WeightSource, model: &DiffusionModel) -> HashMap<String, Vec<Patch>> {
    let model_prefix = model.source.name_prefix();
    control
        .file
        .tensor_names()
        .filter_map(|name| {
            let name_in_model = name.strip_prefix(DIFF_PREFIX)?;
            model
                .source
                .file
                .has(&format!("{model_prefix}{name_in_model}"))
                .then(|| {
                    let added = Patch::merge(model.source.clone(), name_in_model.to_string(), 1.0, 1.0);
                    (name.to_string(), vec![added])
                })
        })
        .collect()
}

/// `ControlNetLoader`.
pub struct ControlNetLoader;

impl Node for ControlNetLoader {
    fn schema(&self, services: &Services) -> NodeSchema {
        NodeSchema::v1("ControlNetLoader", "nodes", "loaders")
            .display("Load ControlNet Model")
            .required("control_net_name", InputSpec::combo(&file_names(services, FOLDER)))
            .model_folder("control_net_name", FOLDER)
            .output(OutputSpec::of("CONTROL_NET"))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &[("control_net_name", FOLDER)])
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let path = model_file(ctx, FOLDER, inputs.string("control_net_name")?)?;
        let device = device(ctx.services);
        let model = cached(ctx, &path, "controlnet", || load_controlnet(&path, None, &device))?;
        Ok(NodeOutput::values(vec![Value::object(ControlModel::new(model))]))
    }
}

/// `DiffControlNetLoader`: a control model loaded with the model a diff ControlNet needs (any
/// other loads as with ControlNetLoader). Not kept in the model cache: what it loads depends on
/// the model.
pub struct DiffControlNetLoader;

impl Node for DiffControlNetLoader {
    fn schema(&self, services: &Services) -> NodeSchema {
        NodeSchema::v1("DiffControlNetLoader", "nodes", "loaders")
            .display("Load ControlNet Model (diff)")
            .required("model", InputSpec::of("MODEL"))
            .required("control_net_name", InputSpec::combo(&file_names(services, FOLDER)))
            .model_folder("control_net_name", FOLDER)
            .output(OutputSpec::of("CONTROL_NET"))
    }

    fn fingerprint(&self, services: &Services, inputs: &Map<String, Json>) -> Option<Result<Json, String>> {
        model_files_fingerprint(services, inputs, &[("control_net_name", FOLDER)])
    }

    fn execute(&self, ctx: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let model = inputs.object::<Model>("model")?;
        let path = model_file(ctx, FOLDER, inputs.string("control_net_name")?)?;
        let (loaded, _) = load_controlnet(&path, Some(&model.0), &device(ctx.services))?;
        Ok(NodeOutput::values(vec![Value::object(ControlModel::new(Arc::new(
            loaded,
        )))]))
    }
}

/// The entries of `conditioning` with `control_net` applied after what each carries; entries
/// that carried the same application share the new one (`cnets`), across both sides.
fn applied(
    conditioning: &Conditioning,
    shared: &mut HashMap<Option<usize>, Arc<ControlApplication>>,
    new: &dyn Fn(Option<Arc<ControlApplication>>) -> ControlApplication,
) -> Conditioning {
    let entries = conditioning
        .0
        .iter()
        .map(|entry| {
            let key = entry.control.as_ref().map(|control| Arc::as_ptr(control) as usize);
            let control = shared
                .entry(key)
                .or_insert_with(|| Arc::new(new(entry.control.clone())))
                .clone();
            CondEntry {
                control: Some(control),
                ..entry.clone()
            }
        })
        .collect();
    Conditioning(entries)
}

/// What both apply nodes read: the control model, the image, the strength.
fn application_inputs(inputs: &NodeInputs) -> Result<(ControlModel, Image, f64), NodeError> {
    Ok((
        inputs.object::<ControlModel>("control_net")?.clone(),
        inputs.object::<Image>("image")?.clone(),
        inputs.float("strength")?,
    ))
}

/// What the apply nodes end with: the strength and the range of sampling, and the two prompts
/// with the control applied.
fn strength_range_and_prompts(schema: NodeSchema) -> NodeSchema {
    schema
        .required("strength", InputSpec::float(1.0, 0.0, 10.0).opt("step", 0.01))
        .required("start_percent", InputSpec::float(0.0, 0.0, 1.0).opt("step", 0.001))
        .required("end_percent", InputSpec::float(1.0, 0.0, 1.0).opt("step", 0.001))
        .output(OutputSpec::of("CONDITIONING").named("positive"))
        .output(OutputSpec::of("CONDITIONING").named("negative"))
}

/// `ControlNetApplyAdvanced` ("Apply ControlNet").
pub struct ControlNetApplyAdvanced;

impl Node for ControlNetApplyAdvanced {
    fn schema(&self, _: &Services) -> NodeSchema {
        let schema = NodeSchema::v1("ControlNetApplyAdvanced", "nodes", "conditioning/controlnet")
            .display("Apply ControlNet")
            .required("positive", InputSpec::of("CONDITIONING"))
            .required("negative", InputSpec::of("CONDITIONING"))
            .required("control_net", InputSpec::of("CONTROL_NET"))
            .required("image", InputSpec::of("IMAGE"));
        strength_range_and_prompts(schema).optional("vae", InputSpec::of("VAE"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        applied_to_both(inputs)
    }
}

/// What Apply ControlNet gives: the control applied to both prompts between its start and end
/// percent (nothing at strength 0).
fn applied_to_both(inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
    let image = inputs.object::<Image>("image")?.clone();
    applied_to_both_with(inputs, image, Vec::new())
}

/// [`applied_to_both`] with the hint image given and channels to put after its latent.
fn applied_to_both_with(inputs: &NodeInputs, image: Image, extra_concat: Vec<Image>) -> Result<NodeOutput, NodeError> {
    let positive = inputs.object::<Conditioning>("positive")?;
    let negative = inputs.object::<Conditioning>("negative")?;
    let (model, _, strength) = application_inputs(inputs)?;
    if strength == 0.0 {
        return Ok(NodeOutput::values(vec![
            Value::object(positive.clone()),
            Value::object(negative.clone()),
        ]));
    }
    let range = (inputs.float("start_percent")?, inputs.float("end_percent")?);
    let vae = inputs
        .get("vae")
        .map(|_| inputs.object::<VaeModel>("vae").cloned())
        .transpose()?;
    let new = |previous| {
        ControlApplication::new(model.clone(), image.clone(), strength, range, previous)
            .with_vae(vae.clone())
            .with_extra_concat(extra_concat.clone())
    };
    let mut shared = HashMap::new();
    let positive = applied(positive, &mut shared, &new);
    let negative = applied(negative, &mut shared, &new);
    Ok(NodeOutput::values(vec![
        Value::object(positive),
        Value::object(negative),
    ]))
}

/// `ControlNetApplySD3` ("Apply Controlnet with VAE", deprecated): Apply ControlNet with its VAE
/// required, as SD3's first ControlNet workflows used it.
pub struct ControlNetApplySD3;

impl Node for ControlNetApplySD3 {
    fn schema(&self, _: &Services) -> NodeSchema {
        let schema = NodeSchema::v3(
            "ControlNetApplySD3",
            "comfy_extras.nodes_sd3",
            "conditioning/controlnet",
        )
        .display("Apply Controlnet with VAE")
        .required("positive", InputSpec::of("CONDITIONING"))
        .required("negative", InputSpec::of("CONDITIONING"))
        .required("control_net", InputSpec::of("CONTROL_NET"))
        .required("vae", InputSpec::of("VAE"))
        .required("image", InputSpec::of("IMAGE"));
        let mut schema = strength_range_and_prompts(schema);
        schema.deprecated = true;
        schema
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        applied_to_both(inputs)
    }
}

/// `ControlNetInpaintingAliMamaApply`: Apply ControlNet with a mask, for AliMama's inpainting
/// ControlNets (`concat_mask`): they take the image with its masked part cleared (the kept
/// area, 1 − mask, resized bilinearly and rounded, multiplies it) and the kept area as a channel
/// after its latent. Other control models take the image as Apply ControlNet gives it, the mask
/// unread, as ComfyUI does.
pub struct ControlNetInpaintingAliMamaApply;

impl Node for ControlNetInpaintingAliMamaApply {
    fn schema(&self, _: &Services) -> NodeSchema {
        let schema = NodeSchema::v1(
            "ControlNetInpaintingAliMamaApply",
            "comfy_extras.nodes_controlnet",
            "conditioning/controlnet",
        )
        .display("ControlNetInpaintingAliMamaApply")
        .required("positive", InputSpec::of("CONDITIONING"))
        .required("negative", InputSpec::of("CONDITIONING"))
        .required("control_net", InputSpec::of("CONTROL_NET"))
        .required("vae", InputSpec::of("VAE"))
        .required("image", InputSpec::of("IMAGE"))
        .required("mask", InputSpec::of("MASK"));
        strength_range_and_prompts(schema)
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let mask = inputs.object::<Mask>("mask")?;
        let image = inputs.object::<Image>("image")?;
        if !inputs
            .object::<ControlModel>("control_net")?
            .loaded
            .network
            .concat_mask()
        {
            return applied_to_both(inputs);
        }
        let kept = Image::new(
            mask.batch,
            mask.height,
            mask.width,
            1,
            mask.data.iter().map(|value| 1.0 - value).collect(),
        )?;
        let apply = common_upscale(&kept, image.width, image.height, ResizeMethod::Bilinear, true, false)?;
        let batch = broadcast(image.batch, apply.batch, 0)?;
        let pixels = image.height * image.width;
        let mut data = Vec::with_capacity(batch * pixels * image.channels);
        for item in 0..batch {
            let source = &image.data[(item % image.batch) * pixels * image.channels..][..pixels * image.channels];
            let factors = &apply.data[(item % apply.batch) * pixels..][..pixels];
            for (pixel, factor) in source.chunks_exact(image.channels).zip(factors) {
                data.extend(pixel.iter().map(|value| value * factor.round_ties_even()));
            }
        }
        let cleared = Image::new(batch, image.height, image.width, image.channels, data)?;
        applied_to_both_with(inputs, cleared, vec![kept])
    }
}

/// `ControlNetApply` ("Apply ControlNet (OLD)"): one conditioning, over the whole of sampling.
/// Its control also reaches the negative entries of the same area that carry none
/// (`control_apply_to_uncond`).
pub struct ControlNetApply;

impl Node for ControlNetApply {
    fn schema(&self, _: &Services) -> NodeSchema {
        let mut schema = NodeSchema::v1("ControlNetApply", "nodes", "conditioning/controlnet")
            .display("Apply ControlNet (OLD)")
            .required("conditioning", InputSpec::of("CONDITIONING"))
            .required("control_net", InputSpec::of("CONTROL_NET"))
            .required("image", InputSpec::of("IMAGE"))
            .required("strength", InputSpec::float(1.0, 0.0, 10.0).opt("step", 0.01))
            .output(OutputSpec::of("CONDITIONING"));
        schema.deprecated = true;
        schema
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let conditioning = inputs.object::<Conditioning>("conditioning")?;
        let (model, image, strength) = application_inputs(inputs)?;
        if strength == 0.0 {
            return Ok(NodeOutput::values(vec![Value::object(conditioning.clone())]));
        }
        let new = |previous| ControlApplication::new(model.clone(), image.clone(), strength, (0.0, 1.0), previous);
        let mut applied_entries = applied(conditioning, &mut HashMap::new(), &new);
        for entry in &mut applied_entries.0 {
            entry.control_to_uncond = true;
        }
        Ok(NodeOutput::values(vec![Value::object(applied_entries)]))
    }
}

/// `SetUnionControlNetType`: the control model told which control type its hint is (read by
/// union ControlNets, left unread by others); "auto" tells none.
pub struct SetUnionControlNetType;

impl Node for SetUnionControlNetType {
    fn schema(&self, _: &Services) -> NodeSchema {
        let types: Vec<&str> = std::iter::once("auto").chain(UNION_CONTROL_TYPES).collect();
        NodeSchema::v1(
            "SetUnionControlNetType",
            "comfy_extras.nodes_controlnet",
            "conditioning/controlnet",
        )
        .display("SetUnionControlNetType")
        .required("control_net", InputSpec::of("CONTROL_NET"))
        .required("type", InputSpec::combo(&types))
        .output(OutputSpec::of("CONTROL_NET"))
    }

    fn execute(&self, _: &NodeContext, inputs: &NodeInputs) -> Result<NodeOutput, NodeError> {
        let name = inputs.string("type")?;
        let control = ControlModel {
            control_type: UNION_CONTROL_TYPES.iter().position(|known| *known == name),
            ..inputs.object::<ControlModel>("control_net")?.clone()
        };
        Ok(NodeOutput::values(vec![Value::object(control)]))
    }
}
