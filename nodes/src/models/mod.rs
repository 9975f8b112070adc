//! Model files and architectures: safetensors weights, recognising a checkpoint's family and
//! architecture from its tensors, the networks themselves (text encoders, UNet, VAE) and tiny
//! random-weight models for tests.

pub mod attention;
pub mod clip_text;
pub mod conv;
pub mod cpu_kernels;
pub mod embeddings;
pub mod linear;
pub mod lora;
pub mod sgemm;
pub mod testmodels;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

use candle_core::{DType, Device};
use clip_text::{Activation, ClipTextConfig};
use unet::{HeadLayout, UNetConfig};
use vae::VaeConfig;
use weights::{SafetensorsFile, TensorShapes};

/// Prefixes of the parts of a single-file checkpoint in ComfyUI's (LDM) layout.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const SD1_CLIP_PREFIX: &str = "cond_stage_model.transformer.text_model.";

/// Why a model file was not understood.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("missing tensor '{0}'")]
    MissingTensor(String),
    #[error("unrecognised model: {0}")]
    Unrecognised(String),
    #[error("this is a {0} model, which Easel cannot run yet")]
    NotYetSupported(&'static str),
}

/// The model families ComfyUI knows, as far as Easel recognises them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Sd1,
    Sd2 { v_prediction: bool },
    Sdxl,
    SdxlRefiner,
    Sd3,
    Flux,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD1.x",
            Family::Sd2 { v_prediction: true } => "SD2.x (v-prediction)",
            Family::Sd2 { v_prediction: false } => "SD2.x",
            Family::Sdxl => "SDXL",
            Family::SdxlRefiner => "SDXL refiner",
            Family::Sd3 => "SD3",
            Family::Flux => "FLUX.1",
        }
    }
}

/// What a single-file checkpoint holds.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointLayout {
    pub family: Family,
    pub unet: UNetConfig,
    /// The text encoder, if the file has one.
    pub clip: Option<ClipTextConfig>,
    /// The VAE, if the file has one.
    pub vae: Option<VaeConfig>,
}

/// Recognises the family of a checkpoint from its tensor names and shapes. SD2.x is reported
/// as epsilon-prediction here; [`detect_checkpoint`] tells v-prediction from the weights.
pub fn detect_family(file: &dyn TensorShapes) -> Result<Family, DetectError> {
    let has_prefix = |prefix: &str| file.tensor_names().any(|name| name.starts_with(prefix));
    if has_prefix(&format!("{UNET_PREFIX}joint_blocks.0.")) {
        return Ok(Family::Sd3);
    }
    if has_prefix(&format!("{UNET_PREFIX}double_blocks.0.")) || has_prefix("double_blocks.0.") {
        return Ok(Family::Flux);
    }
    if !file.has(&format!("{UNET_PREFIX}input_blocks.0.0.weight")) {
        return Err(DetectError::Unrecognised(format!(
            "no diffusion model in a layout Easel knows (looked for '{UNET_PREFIX}input_blocks', \
             'joint_blocks' and 'double_blocks')"
        )));
    }
    if let Some(adm) = file.shape(&format!("{UNET_PREFIX}label_emb.0.0.weight")) {
        return Ok(if adm[1] == 2560 {
            Family::SdxlRefiner
        } else {
            Family::Sdxl
        });
    }
    if has_prefix("cond_stage_model.model.") {
        return Ok(Family::Sd2 { v_prediction: false });
    }
    Ok(Family::Sd1)
}

/// ComfyUI's heuristic for SD2.x checkpoints: v-prediction models have a wide spread in one
/// late LayerNorm bias (population standard deviation above 0.09).
fn sd2_is_v_prediction(file: &SafetensorsFile) -> bool {
    let key = format!("{UNET_PREFIX}output_blocks.11.1.transformer_blocks.0.norm1.bias");
    let Ok(values) = file
        .load(&key, DType::F32, &Device::Cpu)
        .and_then(|bias| bias.to_vec1::<f32>())
    else {
        return false;
    };
    let count = values.len().max(1) as f64;
    let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / count;
    let variance = values.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / count;
    variance.sqrt() > 0.09
}

/// Recognises a checkpoint file and reads the architecture of each part it holds (SD2.x files
/// are told apart as v-prediction or not in the error that says they cannot run yet).
pub fn detect_checkpoint(file: &SafetensorsFile) -> Result<CheckpointLayout, DetectError> {
    match detect_family(file)? {
        Family::Sd2 { .. } => {
            let family = Family::Sd2 {
                v_prediction: sd2_is_v_prediction(file),
            };
            Err(DetectError::NotYetSupported(family.name()))
        }
        family => layout_of(family, file),
    }
}

/// Recognises a checkpoint from its tensor shapes alone.
pub fn detect_layout(file: &dyn TensorShapes) -> Result<CheckpointLayout, DetectError> {
    layout_of(detect_family(file)?, file)
}

/// The architecture of each part of a checkpoint of `family`.
fn layout_of(family: Family, file: &dyn TensorShapes) -> Result<CheckpointLayout, DetectError> {
    match family {
        Family::Sd1 => {
            let unet = UNetConfig::infer(file, UNET_PREFIX, HeadLayout::Count(8))?;
            let clip = if file.has(&format!("{SD1_CLIP_PREFIX}embeddings.token_embedding.weight")) {
                Some(ClipTextConfig::infer(file, SD1_CLIP_PREFIX, Activation::QuickGelu)?)
            } else {
                None
            };
            let vae = if file.has(&format!("{VAE_PREFIX}encoder.conv_in.weight")) {
                Some(VaeConfig::infer(file, VAE_PREFIX)?)
            } else {
                None
            };
            Ok(CheckpointLayout {
                family,
                unet,
                clip,
                vae,
            })
        }
        other => Err(DetectError::NotYetSupported(other.name())),
    }
}
