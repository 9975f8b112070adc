//! Tiny SD3-shaped models: an SD3-medium-like MMDiT in a single-file checkpoint with its three
//! text encoders and VAE (as `sd3_medium_incl_clips_t5xxlfp16.safetensors` is laid out), and the
//! split files people use with UNETLoader, TripleCLIPLoader and VAELoader: an SD3.5-medium-like
//! MMDiT (query/key norms, a second self-attention in its first block) as safetensors and as
//! GGUF Q8_0, and the checkpoint's CLIP-L, CLIP-G, T5-XXL and VAE as files of their own.
//!
//! SD3's conditioning pads CLIP's hidden states to T5-XXL's 4096 channels (ComfyUI fixes the
//! width), so the tiny SD3 T5 is 4096 wide (and otherwise tiny).

use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype as FileDtype;

use super::{
    clip_text_layout, ones_where, t5_layout, tensors_under, tiny_clip_l, tiny_flux_vae, tiny_open_clip, vae_layout,
    write_checkpoint, write_checkpoint_in, write_gguf_copy, write_parts, Fill, Recorder, TensorSpec,
};
use crate::architectures::clip_encoder::ClipNaming;
use crate::architectures::clip_text::ClipTextConfig;
use crate::architectures::mmdit::{Mmdit, MmditConfig};
use crate::architectures::mmdit_controlnet::{HintPreprocessing, MmditControlNet, MmditControlNetConfig};
use crate::architectures::t5::T5Config;
use crate::checkpoint::{SD3_CLIP_G_PREFIX, SD3_CLIP_L_PREFIX, SD3_T5_PREFIX, UNET_PREFIX, VAE_PREFIX};
use crate::diffusers_layout::mmdit_diffusers_matrices;
use crate::formats::ggml_quants::GgmlType;
use crate::weights::SafetensorsFile;

/// The file names `easel testmodels` gives the tiny SD3 models.
pub const TINY_SD3_CHECKPOINT: &str = "easel_tiny_sd3_medium_incl_clips_t5xxl.safetensors";
pub const TINY_SD35: &str = "easel_tiny_sd3.5_medium.safetensors";
pub const TINY_SD35_Q8_0: &str = "easel_tiny_sd3.5_medium-Q8_0.gguf";
pub const TINY_SD3_CLIP_L: &str = "easel_tiny_sd3_clip_l.safetensors";
pub const TINY_SD3_CLIP_G: &str = "easel_tiny_sd3_clip_g.safetensors";
pub const TINY_SD3_T5: &str = "easel_tiny_sd3_t5xxl.safetensors";
pub const TINY_SD3_VAE: &str = "easel_tiny_sd3_vae.safetensors";
/// The tiny SD3 ControlNets (in `controlnet`, diffusers' layout as InstantX and AliMama ship
/// theirs): one taking the hint's latent, one also the inpainting mask.
pub const TINY_SD3_CONTROLNET: &str = "easel_tiny_sd3_controlnet.safetensors";
pub const TINY_SD3_INPAINT_CONTROLNET: &str = "easel_tiny_sd3_inpainting_controlnet.safetensors";
/// The tiny SD3.5 ControlNet (in `controlnet`, Stability's layout, control type canny) for the
/// tiny SD3.5 medium.
pub const TINY_SD35_CONTROLNET: &str = "easel_tiny_sd3.5_controlnet_canny.safetensors";

/// A tiny SD3 medium: depth 2 (128 wide, two heads of 64), two joint blocks, positions for
/// latents up to 32×32, the pooled vector of the tiny CLIP-L and CLIP-G, T5-XXL's 4096-wide
/// text tokens.
pub fn tiny_mmdit() -> MmditConfig {
    MmditConfig {
        in_channels: 16,
        out_channels: 16,
        depth: 2,
        blocks: 2,
        adm_in_channels: Some(tiny_clip_l().hidden_size + tiny_sd3_clip_g().hidden_size),
        context_dim: Some(4096),
        pos_embed_max_size: 16,
        qk_norm: false,
        x_block_self_attention: Vec::new(),
        final_layer: true,
    }
}

/// A tiny SD3.5 medium: the tiny SD3 with RMS query/key norms and a second self-attention in
/// the first block's image stream.
pub fn tiny_mmdit_35() -> MmditConfig {
    MmditConfig {
        qk_norm: true,
        x_block_self_attention: vec![0],
        ..tiny_mmdit()
    }
}

/// SD3.5 medium's MMDiT at its real size: depth 24 (1536 wide), a 384×384 position table, RMS
/// query/key norms, a second self-attention in the image streams of blocks 0–12.
pub fn sd35_medium_mmdit() -> MmditConfig {
    MmditConfig {
        in_channels: 16,
        out_channels: 16,
        depth: 24,
        blocks: 24,
        adm_in_channels: Some(2048),
        context_dim: Some(4096),
        pos_embed_max_size: 384,
        qk_norm: true,
        x_block_self_attention: (0..13).collect(),
        final_layer: true,
    }
}

/// A tiny SD3 ControlNet for the tiny SD3: one joint block (serving the model's first), taking
/// a hint of `hint_channels` (16, or 17 with the inpainting mask).
pub fn tiny_sd3_controlnet(hint_channels: usize) -> MmditControlNetConfig {
    MmditControlNetConfig::Joint {
        trunk: MmditConfig {
            blocks: 1,
            final_layer: false,
            ..tiny_mmdit()
        },
        hint_channels,
    }
}

/// A tiny SD3.5 ControlNet in Stability's layout for the tiny SD3.5 medium (depth 2): one
/// self-attention block, the canny control type.
pub fn tiny_sd35_controlnet() -> MmditControlNetConfig {
    MmditControlNetConfig::Embedder {
        depth: tiny_mmdit_35().depth,
        blocks: 1,
        adm_in_channels: tiny_mmdit_35().adm_in_channels.unwrap_or(0),
        preprocessing: HintPreprocessing::Canny,
    }
}

/// Every tensor of an SD3.5 ControlNet in Stability's names (without the patch embedding, which
/// comes from the model), and its control type as Stability's files record it.
pub fn sd35_controlnet_layout(config: &MmditControlNetConfig) -> candle_core::Result<Vec<TensorSpec>> {
    let MmditControlNetConfig::Embedder { preprocessing, .. } = config else {
        candle_core::bail!("only SD3.5 ControlNets have Stability's SD3.5 layout");
    };
    let recorder = Recorder::default();
    MmditControlNet::new(config.clone(), recorder.var_builder("").into())?;
    let mut specs = recorder.specs();
    let fill = match preprocessing {
        HintPreprocessing::None => Fill::Zeros,
        HintPreprocessing::Canny => Fill::Ones,
        HintPreprocessing::Depth => candle_core::bail!("a tiny depth control type is not written"),
    };
    specs.push(TensorSpec {
        name: "control_type".into(),
        shape: vec![1],
        fill,
    });
    Ok(specs)
}

/// Every tensor of a diffusers-layout SD3 ControlNet (`config` a [`MmditControlNetConfig::Joint`]):
/// the network's tensors under diffusers' names, the fused query, key and value projections
/// split, as [`crate::diffusers_layout::ConvertedWeights::diffusers_sd3_controlnet`] joins them.
pub fn sd3_controlnet_diffusers_layout(config: &MmditControlNetConfig) -> candle_core::Result<Vec<TensorSpec>> {
    let MmditControlNetConfig::Joint { trunk, .. } = config else {
        candle_core::bail!("only diffusers' SD3 ControlNets have a diffusers layout");
    };
    let recorder = Recorder::default();
    MmditControlNet::new(config.clone(), recorder.var_builder("").into())?;
    let matrices = mmdit_diffusers_matrices(trunk.blocks, trunk.hidden_size(), &trunk.x_block_self_attention);
    let mut specs = Vec::new();
    for spec in recorder.specs() {
        let (stem, end) = spec.name.rsplit_once('.').unwrap_or((spec.name.as_str(), ""));
        let parts: Vec<_> = matrices.iter().filter(|matrix| matrix.native == stem).collect();
        if parts.is_empty() {
            let name = match spec.name.as_str() {
                "pos_embed" => "pos_embed.pos_embed".to_string(),
                name => name.to_string(),
            };
            specs.push(TensorSpec { name, ..spec });
            continue;
        }
        for matrix in parts {
            let mut shape = spec.shape.clone();
            if let (Some((_, rows)), Some(first)) = (matrix.rows, shape.first_mut()) {
                *first = rows;
            }
            specs.push(TensorSpec {
                name: format!("{}.{end}", matrix.diffusers),
                shape,
                fill: spec.fill,
            });
        }
    }
    Ok(specs)
}

/// The tiny CLIP-G of SD3's files: the tiny OpenCLIP-bigG stand-in in the transformers layout
/// (as Stability ships SD3's `clip_g`), with its projection.
pub fn tiny_sd3_clip_g() -> ClipTextConfig {
    ClipTextConfig {
        naming: ClipNaming::Transformers,
        ..tiny_open_clip(96)
    }
}

/// A tiny T5-XXL for SD3: 4096 wide (the width SD3's conditioning joins), one layer of two
/// 8-wide heads, the tiny T5 vocabulary.
pub fn tiny_sd3_t5() -> T5Config {
    T5Config {
        vocab_size: 64,
        d_model: 4096,
        layers: 1,
        heads: 2,
        d_kv: 8,
        d_ff: 16,
    }
}

/// Every tensor of an MMDiT under `prefix`; the query and key norms' weights are ones.
pub fn mmdit_layout(config: &MmditConfig, prefix: &str) -> candle_core::Result<Vec<TensorSpec>> {
    let recorder = Recorder::default();
    Mmdit::new(config.clone(), recorder.var_builder(prefix).into())?;
    let specs = ones_where(recorder.specs(), "ln_q.weight");
    Ok(ones_where(specs, "ln_k.weight"))
}

/// Writes the tiny SD3 models under `models_dir` (the T5 tokenizer they share with FLUX's is
/// written with the FLUX models).
pub(super) fn write_sd3_test_models(models_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let folder = |name: &str| -> std::io::Result<PathBuf> {
        let dir = models_dir.join(name);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    };
    let layout_error = std::io::Error::other;
    let checkpoint = folder("checkpoints")?.join(TINY_SD3_CHECKPOINT);
    let mut parts = mmdit_layout(&tiny_mmdit(), UNET_PREFIX).map_err(layout_error)?;
    parts.extend(clip_text_layout(&tiny_clip_l(), SD3_CLIP_L_PREFIX).map_err(layout_error)?);
    parts.extend(clip_text_layout(&tiny_sd3_clip_g(), SD3_CLIP_G_PREFIX).map_err(layout_error)?);
    parts.extend(t5_layout(&tiny_sd3_t5(), SD3_T5_PREFIX).map_err(layout_error)?);
    parts.extend(vae_layout(&tiny_flux_vae(), VAE_PREFIX).map_err(layout_error)?);
    write_checkpoint(&checkpoint, &parts)?;

    let sd35 = folder("diffusion_models")?.join(TINY_SD35);
    write_checkpoint_in(
        &sd35,
        &mmdit_layout(&tiny_mmdit_35(), UNET_PREFIX).map_err(layout_error)?,
        FileDtype::BF16,
    )?;
    let sd35_q8 = folder("unet")?.join(TINY_SD35_Q8_0);
    let sd35_file = SafetensorsFile::open(&sd35).map_err(std::io::Error::other)?;
    let at_root = |name: &str| name.strip_prefix(UNET_PREFIX).unwrap_or(name).to_string();
    write_gguf_copy(&sd35_file, GgmlType::Q8_0, "sd3", &at_root, &sd35_q8)?;

    let bytes = std::fs::read(&checkpoint)?;
    let split = write_parts(
        models_dir,
        vec![
            (
                "text_encoders",
                TINY_SD3_CLIP_L,
                tensors_under(&bytes, SD3_CLIP_L_PREFIX)?,
            ),
            (
                "text_encoders",
                TINY_SD3_CLIP_G,
                tensors_under(&bytes, SD3_CLIP_G_PREFIX)?,
            ),
            ("text_encoders", TINY_SD3_T5, tensors_under(&bytes, SD3_T5_PREFIX)?),
            ("vae", TINY_SD3_VAE, tensors_under(&bytes, VAE_PREFIX)?),
        ],
    )?;
    let mut controlnets = Vec::new();
    for (name, hint_channels) in [(TINY_SD3_CONTROLNET, 16), (TINY_SD3_INPAINT_CONTROLNET, 17)] {
        let path = folder("controlnet")?.join(name);
        let layout = sd3_controlnet_diffusers_layout(&tiny_sd3_controlnet(hint_channels)).map_err(layout_error)?;
        write_checkpoint(&path, &layout)?;
        controlnets.push(path);
    }
    let sd35_controlnet = folder("controlnet")?.join(TINY_SD35_CONTROLNET);
    write_checkpoint(
        &sd35_controlnet,
        &sd35_controlnet_layout(&tiny_sd35_controlnet()).map_err(layout_error)?,
    )?;
    controlnets.push(sd35_controlnet);
    Ok([checkpoint, sd35, sd35_q8]
        .into_iter()
        .chain(split)
        .chain(controlnets)
        .collect())
}
