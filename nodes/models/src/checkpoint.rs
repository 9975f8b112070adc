//! Recognising a checkpoint: its family and the architecture of each part it holds (diffusion
//! model, text encoders, VAE), read from its tensor names and shapes, and where each part's
//! tensors lie in ComfyUI's single-file layouts.

use crate::architectures::clip_encoder::Activation;
use crate::architectures::clip_text::ClipTextConfig;
use crate::architectures::unet::{HeadLayout, UNetConfig};
use crate::architectures::vae::VaeConfig;
use crate::weights::{MappedWeights, SafetensorsFile, TensorShapes};
use candle_core::{DType, Device};

/// Prefixes of the parts of a single-file checkpoint in ComfyUI's (LDM) layout.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
/// The text encoders' roots: SD1.x CLIP-L, SD2.x OpenCLIP-H, SDXL CLIP-L and OpenCLIP-bigG,
/// the SDXL refiner's OpenCLIP-bigG.
pub const SD1_CLIP_PREFIX: &str = "cond_stage_model.transformer.";
pub const SD2_CLIP_PREFIX: &str = "cond_stage_model.model.";
pub const SDXL_CLIP_L_PREFIX: &str = "conditioner.embedders.0.transformer.";
pub const SDXL_CLIP_G_PREFIX: &str = "conditioner.embedders.1.model.";
pub const SDXL_REFINER_CLIP_G_PREFIX: &str = "conditioner.embedders.0.model.";
/// The parts of a FLUX checkpoint as ComfyUI saves one (the model under [`UNET_PREFIX`]).
pub const FLUX_CLIP_L_PREFIX: &str = "text_encoders.clip_l.transformer.";
pub const FLUX_T5_PREFIX: &str = "text_encoders.t5xxl.transformer.";
pub const FLUX_VAE_PREFIX: &str = "vae.";
/// The text encoders of an SD3 checkpoint (CLIP-G in the transformers layout, as Stability
/// ships it); CLIP-L and T5-XXL lie where FLUX checkpoints keep them.
pub const SD3_CLIP_L_PREFIX: &str = FLUX_CLIP_L_PREFIX;
pub const SD3_CLIP_G_PREFIX: &str = "text_encoders.clip_g.transformer.";
pub const SD3_T5_PREFIX: &str = FLUX_T5_PREFIX;

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
    Sd2,
    Sdxl,
    SdxlRefiner,
    Sd3,
    Flux,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD1.x",
            Family::Sd2 => "SD2.x",
            Family::Sdxl => "SDXL",
            Family::SdxlRefiner => "SDXL refiner",
            Family::Sd3 => "SD3",
            Family::Flux => "FLUX.1",
        }
    }

    /// How the family's UNet sizes its attention heads.
    pub fn heads(self) -> HeadLayout {
        match self {
            Family::Sd1 => HeadLayout::Count(8),
            _ => HeadLayout::Width(64),
        }
    }
}

/// Which CLIP text encoder a model uses in a slot: it decides the activation, the padding and,
/// with the family, how the output is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextEncoderKind {
    /// OpenAI CLIP ViT-L/14 (SD1.x, SDXL).
    ClipL,
    /// OpenCLIP ViT-H/14 (SD2.x).
    ClipH,
    /// OpenCLIP ViT-bigG/14 (SDXL, its refiner).
    ClipG,
}

impl TextEncoderKind {
    pub fn activation(self) -> Activation {
        match self {
            TextEncoderKind::ClipL => Activation::QuickGelu,
            TextEncoderKind::ClipH | TextEncoderKind::ClipG => Activation::Gelu,
        }
    }

    /// The key of this encoder's vectors in multi-encoder embedding files.
    pub fn embedding_key(self) -> &'static str {
        match self {
            TextEncoderKind::ClipL => "clip_l",
            TextEncoderKind::ClipH => "clip_h",
            TextEncoderKind::ClipG => "clip_g",
        }
    }
}

/// One text encoder of a file: its kind, where its tensors lie and its architecture.
#[derive(Clone, Debug, PartialEq)]
pub struct TextEncoderLayout {
    pub kind: TextEncoderKind,
    /// The encoder's root in the file (see [`ClipTextConfig::infer`]).
    pub prefix: String,
    pub config: ClipTextConfig,
}

impl TextEncoderLayout {
    /// The encoder of `kind` under `prefix`, if the file has one there.
    pub fn find(file: &dyn TensorShapes, kind: TextEncoderKind, prefix: &str) -> Result<Option<Self>, DetectError> {
        if !file.tensor_names().any(|name| name.starts_with(prefix)) {
            return Ok(None);
        }
        let config = ClipTextConfig::infer(file, prefix, kind.activation())?;
        Ok(Some(TextEncoderLayout {
            kind,
            prefix: prefix.to_string(),
            config,
        }))
    }
}

/// What a single-file checkpoint holds.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointLayout {
    pub family: Family,
    pub unet: UNetConfig,
    /// Whether the diffusion model predicts velocity (v) rather than noise.
    pub v_prediction: bool,
    /// The text encoders the file has, in the family's order (SDXL: CLIP-L, then CLIP-G).
    pub text_encoders: Vec<TextEncoderLayout>,
    /// The VAE, if the file has one.
    pub vae: Option<VaeConfig>,
}

/// Recognises the family of a UNet in the LDM layout under `prefix` from its shapes: class
/// conditioning 2560 wide is the SDXL refiner's, any other SDXL's unless the first level has
/// attention (SD2.1 unCLIP); linear projections into the transformers are SD2.x's, convolutions
/// SD1.x's.
pub fn detect_unet_family(file: &dyn TensorShapes, prefix: &str) -> Result<Family, DetectError> {
    let has_prefix = |start: &str| file.tensor_names().any(|name| name.starts_with(start));
    if has_prefix(&format!("{prefix}joint_blocks.0.")) {
        return Ok(Family::Sd3);
    }
    if has_prefix(&format!("{prefix}double_blocks.0.")) {
        return Ok(Family::Flux);
    }
    if !file.has(&format!("{prefix}input_blocks.0.0.weight")) {
        return Err(DetectError::Unrecognised(format!(
            "no diffusion model in a layout Easel knows (looked for '{prefix}input_blocks', \
             'joint_blocks' and 'double_blocks')"
        )));
    }
    if let Some(adm) = file.shape(&format!("{prefix}label_emb.0.0.weight")) {
        return Ok(if adm[1] == 2560 {
            Family::SdxlRefiner
        } else if file.has(&format!("{prefix}input_blocks.1.1.proj_in.weight")) {
            // SD2.1 unCLIP: an SD2.x UNet (attention on its first level, where SDXL has none)
            // with class conditioning by image embeddings.
            Family::Sd2
        } else {
            Family::Sdxl
        });
    }
    let linear_projection = file
        .tensor_names()
        .find(|name| name.starts_with(prefix) && name.ends_with(".proj_in.weight"))
        .and_then(|name| file.shape(name))
        .is_some_and(|shape| shape.len() == 2);
    Ok(if linear_projection { Family::Sd2 } else { Family::Sd1 })
}

/// Recognises the family of a single-file checkpoint (the UNet under `model.diffusion_model.`;
/// FLUX files may also have it at the root).
pub fn detect_family(file: &dyn TensorShapes) -> Result<Family, DetectError> {
    if file.tensor_names().any(|name| name.starts_with("double_blocks.0.")) {
        return Ok(Family::Flux);
    }
    let family = detect_unet_family(file, UNET_PREFIX)?;
    // A refiner is also told by its text encoder: OpenCLIP-bigG alone, in the first slot.
    if family == Family::Sdxl && file.has(&format!("{SDXL_REFINER_CLIP_G_PREFIX}token_embedding.weight")) {
        return Ok(Family::SdxlRefiner);
    }
    Ok(family)
}

/// The σ range of an SDXL file made for v-prediction on EDM's continuous schedule (CosXL and
/// CosXL Edit: `edm_vpred.sigma_max`, and `edm_vpred.sigma_min` or 0.002; ComfyUI's
/// `SDXL.model_type`); `None` for any other file.
pub fn edm_v_prediction_range(file: &dyn MappedWeights, family: Family) -> Option<(f64, f64)> {
    const DEFAULT_SIGMA_MIN: f64 = 0.002;
    if family != Family::Sdxl {
        return None;
    }
    let scalar = |name: &str| -> Option<f64> {
        let tensor = file.load(name, DType::F32, &Device::Cpu).ok()?;
        let value = tensor.flatten_all().ok()?.to_vec1::<f32>().ok()?.first().copied()?;
        Some(f64::from(value))
    };
    let sigma_max = scalar("edm_vpred.sigma_max")?;
    Some((scalar("edm_vpred.sigma_min").unwrap_or(DEFAULT_SIGMA_MIN), sigma_max))
}

/// Whether the diffusion model under `prefix` of `family` predicts velocity, as ComfyUI decides:
/// SDXL files say so with a `v_pred` tensor; for SD2.x ComfyUI looks at the spread of one late
/// LayerNorm bias (population standard deviation above 0.09 means v-prediction).
pub fn is_v_prediction(file: &dyn MappedWeights, family: Family, prefix: &str) -> bool {
    match family {
        Family::Sdxl | Family::SdxlRefiner => file.has("v_pred"),
        Family::Sd2 => {
            let key = format!("{prefix}output_blocks.11.1.transformer_blocks.0.norm1.bias");
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
        _ => false,
    }
}

/// Recognises a checkpoint file and reads the architecture of each part it holds.
pub fn detect_checkpoint(file: &SafetensorsFile) -> Result<CheckpointLayout, DetectError> {
    let mut layout = detect_layout(file)?;
    layout.v_prediction = is_v_prediction(file, layout.family, UNET_PREFIX);
    Ok(layout)
}

/// Where a Stable Diffusion family's checkpoints keep their CLIP text encoders (CLIP-L in the
/// transformers layout, the OpenCLIP encoders in theirs); empty for the other families.
pub fn checkpoint_clip_prefixes(family: Family) -> &'static [(TextEncoderKind, &'static str)] {
    match family {
        Family::Sd1 => &[(TextEncoderKind::ClipL, SD1_CLIP_PREFIX)],
        Family::Sd2 => &[(TextEncoderKind::ClipH, SD2_CLIP_PREFIX)],
        Family::Sdxl => &[
            (TextEncoderKind::ClipL, SDXL_CLIP_L_PREFIX),
            (TextEncoderKind::ClipG, SDXL_CLIP_G_PREFIX),
        ],
        Family::SdxlRefiner => &[(TextEncoderKind::ClipG, SDXL_REFINER_CLIP_G_PREFIX)],
        _ => &[],
    }
}

/// Recognises a checkpoint from its tensor shapes alone (v-prediction needs the values: see
/// [`detect_checkpoint`]).
pub fn detect_layout(file: &dyn TensorShapes) -> Result<CheckpointLayout, DetectError> {
    let family = detect_family(file)?;
    let encoders = checkpoint_clip_prefixes(family);
    if encoders.is_empty() {
        return Err(DetectError::NotYetSupported(family.name()));
    }
    let unet = UNetConfig::infer(file, UNET_PREFIX, family.heads())?;
    let mut text_encoders = Vec::new();
    for (kind, prefix) in encoders {
        text_encoders.extend(TextEncoderLayout::find(file, *kind, prefix)?);
    }
    let vae = if file.has(&format!("{VAE_PREFIX}encoder.conv_in.weight")) {
        Some(VaeConfig::infer(file, VAE_PREFIX)?)
    } else {
        None
    };
    Ok(CheckpointLayout {
        family,
        unet,
        v_prediction: false,
        text_encoders,
        vae,
    })
}
