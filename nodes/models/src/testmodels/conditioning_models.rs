//! Tiny models that condition generation beside the text: CLIP vision encoders (in
//! `clip_vision/`: CLIP for SD1.x and SD2.x, one for SDXL, SigLIP for FLUX), style models (in
//! `style_models/`: FLUX Redux for the tiny FLUX, the SD1.5 style adapter for the tiny SD1.x
//! model), an SD2.1 unCLIP checkpoint (in `checkpoints/`) with its image encoder, GLIGEN for
//! the tiny SD1.x model (in `gligen/`), IP-Adapters for it and the tiny SDXL (in `ipadapter/`)
//! and IC-Light offsets for the tiny SD1.x model (in `diffusion_models/`).

use std::path::{Path, PathBuf};

use super::{
    checkpoint_layout, tiny_clip_g, tiny_clip_l, tiny_flux, tiny_open_clip, tiny_sd1_unet, tiny_sd2_unet, tiny_sd_vae,
    tiny_sdxl_unet, write_checkpoint, Recorder, TensorSpec,
};
use crate::architectures::clip_encoder::{Activation, ClipNaming};
use crate::architectures::clip_vision::{ClipVision, ClipVisionConfig, VisionKind};
use crate::architectures::gligen::{Gligen, GligenConfig};
use crate::architectures::ip_adapter::{IpAdapter, IpAdapterConfig, ProjectionKind};
use crate::architectures::style_model::{StyleModel, StyleModelConfig};
use crate::architectures::unet::{UNet, UNetConfig};
use crate::checkpoint::SD2_CLIP_PREFIX;

/// A tiny CLIP vision encoder (transformers' layout): 64 wide, 16 heads, two layers, 14-pixel
/// patches on a 56-pixel image, projected to 32.
pub const TINY_CLIP_VISION: &str = "easel_tiny_clip_vision.safetensors";
/// A tiny CLIP vision encoder standing in for ViT-bigG in SDXL "revision": its embeddings are as
/// wide as the tiny SDXL's pooled text vector (the tiny CLIP-G's width).
pub const TINY_CLIP_VISION_G: &str = "easel_tiny_clip_vision_g.safetensors";
/// A tiny SigLIP encoder for the tiny Redux: 48 wide, two layers, 14-pixel patches on a
/// 42-pixel image.
pub const TINY_SIGLIP: &str = "easel_tiny_siglip.safetensors";
/// A tiny FLUX Redux: the tiny SigLIP's tokens to the tiny FLUX's 32-wide text tokens.
pub const TINY_FLUX_REDUX: &str = "easel_tiny_flux_redux.safetensors";
/// A tiny SD1.5 style adapter: the tiny CLIP vision encoder's tokens to four 64-wide text tokens
/// for the tiny SD1.x model.
pub const TINY_SD1_STYLE_ADAPTER: &str = "easel_tiny_sd1_style_adapter.safetensors";
/// A tiny GLIGEN for the tiny SD1.x UNet: a module on each of its transformer blocks, boxes of
/// its 64-wide CLIP-L's pooled vectors.
pub const TINY_SD1_GLIGEN: &str = "easel_tiny_sd1_gligen.safetensors";
/// A tiny standard IP-Adapter for the tiny SD1.x model, laid out as SD1.5's (16 key/value
/// modules, of which the tiny UNet has the blocks of modules 1 and 13), taking the tiny CLIP
/// vision encoder's embeddings.
pub const TINY_SD1_IP_ADAPTER: &str = "easel_tiny_sd1_ip_adapter.safetensors";
/// A tiny standard IP-Adapter for the tiny SDXL model, laid out as SDXL's (70 key/value modules,
/// of which the tiny UNet has the transformer blocks of output blocks 0 and 1), taking the tiny
/// CLIP vision encoder's embeddings.
pub const TINY_SDXL_IP_ADAPTER: &str = "easel_tiny_sdxl_ip_adapter.safetensors";
/// Tiny IC-Light offsets for the tiny SD1.x UNet (in `diffusion_models/`, LDM names): "fc"
/// (8 input channels: the latent and the foreground's) and "fbc" (12: and the background's).
pub const TINY_SD1_IC_LIGHT_FC: &str = "easel_tiny_sd1_iclight_fc.safetensors";
pub const TINY_SD1_IC_LIGHT_FBC: &str = "easel_tiny_sd1_iclight_fbc.safetensors";
/// A tiny SD2.1 unCLIP checkpoint: the tiny SD2.x model with class conditioning by the
/// embeddings of its image encoder (the tiny CLIP vision encoder's shape, in OpenCLIP's layout
/// under `embedder.model.visual.`) and their noise level.
pub const TINY_SD2_UNCLIP_CHECKPOINT: &str = "easel_tiny_sd2_unclip.safetensors";

pub fn tiny_clip_vision() -> ClipVisionConfig {
    ClipVisionConfig {
        kind: VisionKind::Clip,
        width: 64,
        intermediate: 128,
        layers: 2,
        heads: 16,
        patch_size: 14,
        image_size: 56,
        projection: Some(32),
        activation: Activation::QuickGelu,
        naming: ClipNaming::Transformers,
    }
}

pub fn tiny_clip_vision_g() -> ClipVisionConfig {
    ClipVisionConfig {
        projection: Some(tiny_clip_g().hidden_size),
        ..tiny_clip_vision()
    }
}

pub fn tiny_siglip() -> ClipVisionConfig {
    ClipVisionConfig {
        kind: VisionKind::SigLip,
        width: 48,
        intermediate: 96,
        image_size: 42,
        projection: None,
        activation: Activation::GeluTanh,
        ..tiny_clip_vision()
    }
}

pub fn tiny_flux_redux() -> StyleModelConfig {
    let text_width = tiny_flux().context_dim;
    StyleModelConfig::Redux {
        vision_width: tiny_siglip().width,
        hidden: 3 * text_width,
        text_width,
    }
}

pub fn tiny_sd1_style_adapter() -> StyleModelConfig {
    StyleModelConfig::Adapter {
        width: tiny_clip_vision().width,
        tokens: 4,
        layers: 1,
        context_width: tiny_sd1_unet().context_dim,
    }
}

/// The tiny unCLIP UNet: class conditioning by an image embedding and its noise level's.
pub fn tiny_sd2_unclip_unet() -> UNetConfig {
    let embedding = tiny_clip_vision().projection.unwrap_or(tiny_clip_vision().width);
    UNetConfig {
        adm_in_channels: Some(2 * embedding),
        ..tiny_sd2_unet()
    }
}

/// The tiny GLIGEN: a module on each transformer block of the tiny SD1.x UNet, in the UNet's
/// order (input blocks, middle block, output blocks), as wide as the block.
pub fn tiny_sd1_gligen() -> candle_core::Result<GligenConfig> {
    let unet = tiny_sd1_unet();
    let recorder = Recorder::default();
    UNet::new(unet.clone(), recorder.var_builder("").into())?;
    const NORM: &str = ".transformer_blocks.0.norm1.weight";
    let mut modules: Vec<(String, usize)> = recorder
        .specs()
        .into_iter()
        .filter_map(|spec| Some((spec.name.strip_suffix(NORM)?.to_string(), spec.shape[0])))
        .map(|(root, width)| (format!("{root}.transformer_blocks.0"), width))
        .collect();
    let order = |root: &str| -> (usize, usize) {
        let mut parts = root.split('.');
        let part = match parts.next() {
            Some("input_blocks") => 0,
            Some("middle_block") => 1,
            _ => 2,
        };
        let block = parts.next().and_then(|block| block.parse().ok()).unwrap_or(0);
        (part, block)
    };
    modules.sort_by_key(|(root, _)| order(root));
    Ok(GligenConfig {
        modules,
        key_dim: unet.context_dim,
        text_dim: tiny_clip_l().hidden_size,
    })
}

pub fn tiny_sd1_ip_adapter() -> IpAdapterConfig {
    let unet = tiny_sd1_unet();
    IpAdapterConfig {
        projection: ProjectionKind::Linear { tokens: 4 },
        clip_width: tiny_clip_vision().projection.unwrap_or(tiny_clip_vision().width),
        token_width: unet.context_dim,
        layers: (0..16)
            .map(|module| (2 * module + 1, (unet.context_dim, unet.model_channels)))
            .collect(),
        sdxl: false,
    }
}

pub fn tiny_sdxl_ip_adapter() -> IpAdapterConfig {
    let context = tiny_clip_l().hidden_size + tiny_clip_g().hidden_size;
    // The width of the tiny SDXL UNet's transformer blocks (its second level).
    let width = 2 * tiny_sdxl_unet(context, 6).model_channels;
    IpAdapterConfig {
        token_width: context,
        layers: (0..70).map(|module| (2 * module + 1, (context, width))).collect(),
        sdxl: true,
        ..tiny_sd1_ip_adapter()
    }
}

/// Every tensor of an IP-Adapter.
pub fn ip_adapter_layout(config: &IpAdapterConfig) -> candle_core::Result<Vec<TensorSpec>> {
    let recorder = Recorder::default();
    IpAdapter::new(config.clone(), recorder.var_builder("").into())?;
    Ok(recorder.specs())
}

/// Every tensor of a vision encoder under `prefix`.
pub fn clip_vision_layout(config: &ClipVisionConfig, prefix: &str) -> candle_core::Result<Vec<TensorSpec>> {
    let recorder = Recorder::default();
    ClipVision::new(config.clone(), recorder.var_builder(prefix).into())?;
    Ok(recorder.specs())
}

/// Every tensor of a style model.
pub fn style_model_layout(config: &StyleModelConfig) -> candle_core::Result<Vec<TensorSpec>> {
    let recorder = Recorder::default();
    StyleModel::new(config, recorder.var_builder("").into())?;
    Ok(recorder.specs())
}

/// Every tensor of IC-Light offsets for the tiny SD1.x UNet taking `in_channels`.
pub fn ic_light_layout(in_channels: usize) -> candle_core::Result<Vec<TensorSpec>> {
    let recorder = Recorder::default();
    let unet = UNetConfig {
        in_channels,
        ..tiny_sd1_unet()
    };
    UNet::new(unet, recorder.var_builder("").into())?;
    Ok(recorder.specs())
}

/// Every tensor of a GLIGEN file.
pub fn gligen_layout(config: &GligenConfig) -> candle_core::Result<Vec<TensorSpec>> {
    let recorder = Recorder::default();
    Gligen::new(config.clone(), recorder.var_builder("").into())?;
    Ok(recorder.specs())
}

/// Writes the models of this module under `models_dir`; returns their paths.
pub(super) fn write_conditioning_models(models_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let folder = |name: &str| -> std::io::Result<PathBuf> {
        let path = models_dir.join(name);
        std::fs::create_dir_all(&path)?;
        Ok(path)
    };
    let (clip_vision, style_models, checkpoints, gligen, ipadapter, diffusion_models) = (
        folder("clip_vision")?,
        folder("style_models")?,
        folder("checkpoints")?,
        folder("gligen")?,
        folder("ipadapter")?,
        folder("diffusion_models")?,
    );
    let files = [
        (
            clip_vision.join(TINY_CLIP_VISION),
            clip_vision_layout(&tiny_clip_vision(), ""),
        ),
        (
            clip_vision.join(TINY_CLIP_VISION_G),
            clip_vision_layout(&tiny_clip_vision_g(), ""),
        ),
        (clip_vision.join(TINY_SIGLIP), clip_vision_layout(&tiny_siglip(), "")),
        (
            style_models.join(TINY_FLUX_REDUX),
            style_model_layout(&tiny_flux_redux()),
        ),
        (
            style_models.join(TINY_SD1_STYLE_ADAPTER),
            style_model_layout(&tiny_sd1_style_adapter()),
        ),
        (checkpoints.join(TINY_SD2_UNCLIP_CHECKPOINT), unclip_checkpoint_layout()),
        (
            gligen.join(TINY_SD1_GLIGEN),
            tiny_sd1_gligen().and_then(|config| gligen_layout(&config)),
        ),
        (
            ipadapter.join(TINY_SD1_IP_ADAPTER),
            ip_adapter_layout(&tiny_sd1_ip_adapter()),
        ),
        (
            ipadapter.join(TINY_SDXL_IP_ADAPTER),
            ip_adapter_layout(&tiny_sdxl_ip_adapter()),
        ),
        (diffusion_models.join(TINY_SD1_IC_LIGHT_FC), ic_light_layout(8)),
        (diffusion_models.join(TINY_SD1_IC_LIGHT_FBC), ic_light_layout(12)),
    ];
    let mut written = Vec::new();
    for (path, layout) in files {
        write_checkpoint(&path, &layout.map_err(std::io::Error::other)?)?;
        written.push(path);
    }
    Ok(written)
}

/// The tiny unCLIP checkpoint's tensors: the SD2.x parts and the image encoder.
fn unclip_checkpoint_layout() -> candle_core::Result<Vec<TensorSpec>> {
    let text = tiny_open_clip(64);
    let mut layout = checkpoint_layout(&tiny_sd2_unclip_unet(), &[(SD2_CLIP_PREFIX, &text)], &tiny_sd_vae())?;
    let vision = ClipVisionConfig {
        naming: ClipNaming::OpenClip,
        ..tiny_clip_vision()
    };
    layout.extend(clip_vision_layout(&vision, "embedder.model.visual")?);
    Ok(layout)
}
