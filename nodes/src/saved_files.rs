//! Files nodes save as safetensors (models, latents): tensors as safetensors bytes, and the
//! metadata ComfyUI writes with them.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use easel_engine::pyjson::dumps;
use easel_engine::NodeContext;
use serde_json::Value as Json;

use easel_engine::NodeError;
use easel_models::kernels::sgemm::Elements;
use easel_models::weights::WeightSource;

use crate::image::nodes::ImageMetadata;
use crate::runtime::tensor_error;

/// A tensor's little-endian bytes and safetensors type: float16, bfloat16 and float64 as they
/// are, anything else as float32.
/// Every floating-point tensor of `source` in name order, its patches applied: its name under
/// the source's prefix, its value and the precision it is stored in (fp8 and GGML tensors count
/// as f16). Integer buffers (CLIP's position ids) are left out, as ComfyUI's state dicts have
/// none.
pub(crate) fn for_each_source_tensor(
    source: &WeightSource,
    mut visit: impl FnMut(&str, Tensor, DType) -> Result<(), NodeError>,
) -> Result<(), NodeError> {
    let weights = source.weights();
    let source_prefix = source.name_prefix();
    let mut names: Vec<&str> = source
        .file
        .tensor_names()
        .filter(|name| name.starts_with(source_prefix.as_str()))
        .collect();
    names.sort_unstable();
    for full_name in names {
        let stored = match source.file.elements(full_name) {
            Some(Elements::F32(_)) => DType::F32,
            Some(Elements::BF16(_)) => DType::BF16,
            Some(Elements::F16(_) | Elements::F8(..) | Elements::Ggml(..)) => DType::F16,
            None => continue,
        };
        let (Some(shape), Some(name)) = (
            source.file.shape(full_name),
            full_name.strip_prefix(source_prefix.as_str()),
        ) else {
            continue;
        };
        visit(name, weights.get(shape, name).map_err(tensor_error)?, stored)?;
    }
    Ok(())
}

pub(crate) fn tensor_bytes(tensor: &Tensor) -> Result<(safetensors::Dtype, Vec<u8>), candle_core::Error> {
    let flat = tensor.to_device(&Device::Cpu)?.flatten_all()?;
    Ok(match flat.dtype() {
        DType::F16 => (
            safetensors::Dtype::F16,
            flat.to_vec1::<half::f16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            safetensors::Dtype::BF16,
            flat.to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::F64 => (
            safetensors::Dtype::F64,
            flat.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        _ => (
            safetensors::Dtype::F32,
            flat.to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
    })
}

/// ComfyUI's metadata of a saved file: the prompt and the workflow's entries; `None` when
/// metadata is off (`--disable-metadata`).
pub(crate) fn prompt_metadata(ctx: &NodeContext) -> Option<HashMap<String, String>> {
    if !ctx.services.get::<ImageMetadata>().is_none_or(|m| m.enabled) {
        return None;
    }
    let mut metadata = HashMap::from([("prompt".to_string(), dumps(ctx.prompt))]);
    if let Some(Json::Object(extra)) = ctx.extra_pnginfo {
        metadata.extend(extra.iter().map(|(key, value)| (key.clone(), dumps(value))));
    }
    Some(metadata)
}
