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
    write_checkpoint, write_checkpoint_in, write_gguf_copy, write_parts, Recorder, TensorSpec,
};
use crate::architectures::clip_encoder::ClipNaming;
use crate::architectures::clip_text::ClipTextConfig;
use crate::architectures::mmdit::{Mmdit, MmditConfig};
use crate::architectures::t5::T5Config;
use crate::checkpoint::{SD3_CLIP_G_PREFIX, SD3_CLIP_L_PREFIX, SD3_T5_PREFIX, UNET_PREFIX, VAE_PREFIX};
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
    }
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
    Ok([checkpoint, sd35, sd35_q8].into_iter().chain(split).collect())
}
