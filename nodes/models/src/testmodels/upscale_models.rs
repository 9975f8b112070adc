//! A tiny upscale model: a 4× ESRGAN RRDBNet in the original layout (`model.N`), as
//! `4x-UltraSharp.pth` and most community models are laid out, with few channels and one block.

use std::path::{Path, PathBuf};

use super::{write_checkpoint, Recorder, TensorSpec};
use crate::architectures::esrgan::{Esrgan, EsrganConfig};

/// The file name `easel testmodels` gives the tiny ESRGAN (in `upscale_models`).
pub const TINY_ESRGAN_4X: &str = "easel_tiny_4x_esrgan.safetensors";

/// A tiny 4× RRDBNet: 8 features, growth 4, one residual-in-residual block.
pub fn tiny_esrgan() -> EsrganConfig {
    EsrganConfig {
        in_channels: 3,
        out_channels: 3,
        features: 8,
        growth: 4,
        blocks: 1,
        upsamplings: 2,
        unshuffle: None,
    }
}

/// Every tensor of an RRDBNet in the original ESRGAN layout.
pub fn esrgan_layout(config: &EsrganConfig) -> candle_core::Result<Vec<TensorSpec>> {
    let recorder = Recorder::default();
    Esrgan::new(config.clone(), recorder.var_builder("").into())?;
    Ok(recorder.specs())
}

/// Writes the tiny upscale model under `models_dir`.
pub(super) fn write_upscale_test_models(models_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let folder = models_dir.join("upscale_models");
    std::fs::create_dir_all(&folder)?;
    let path = folder.join(TINY_ESRGAN_4X);
    write_checkpoint(&path, &esrgan_layout(&tiny_esrgan()).map_err(std::io::Error::other)?)?;
    Ok(vec![path])
}
