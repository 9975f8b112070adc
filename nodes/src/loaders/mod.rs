//! The loaders category: model files into `MODEL`, `CLIP` and `VAE` values.
//!
//! - [`models`]: CheckpointLoaderSimple, CheckpointLoader, UNETLoader, VAELoader, and the helpers
//!   every loader shares (finding a file, opening it, recognising its family, the model cache);
//! - [`text_encoders`]: CLIPLoader and DualCLIPLoader (CLIP and T5 files, safetensors or GGUF);
//! - [`diffusers`]: DiffusersLoader (a diffusers folder's UNet, text encoders and VAE);
//! - [`t5_tokenizer_files`]: where a T5 encoder's `tokenizer.json` is found;
//! - [`lora`]: LoraLoader and LoraLoaderModelOnly;
//! - [`pending`]: loaders of model kinds Easel cannot run yet, declared for clients.

pub mod diffusers;
pub mod lora;
pub mod models;
pub mod pending;
pub mod t5_tokenizer_files;
pub mod text_encoders;

use crate::model_cache::FileVersion;
use crate::paths::Paths;
use easel_engine::{NodeRegistry, Services};
use serde_json::{Map, Value as Json};

/// A loader's `IS_CHANGED`: the [`FileVersion`] of each file named by the `(input, model folder)`
/// pairs, so that a file replaced on disk is loaded again instead of being served from the output
/// cache (whose model would read the old file's memory mapping).
pub(crate) fn model_files_fingerprint(
    services: &Services,
    inputs: &Map<String, Json>,
    files: &[(&str, &str)],
) -> Option<Result<Json, String>> {
    let paths = services.get::<Paths>()?;
    let versions = files.iter().map(|(input, folder)| {
        inputs
            .get(*input)
            .and_then(Json::as_str)
            .and_then(|name| paths.full_path(folder, name))
            .and_then(|path| FileVersion::of(&path))
            .map_or(Json::Null, |version| version.to_json())
    });
    Some(Ok(Json::Array(versions.collect())))
}

/// Adds the loader nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    registry.register(models::CheckpointLoaderSimple);
    registry.register(models::CheckpointLoader);
    registry.register(models::UnetLoader);
    registry.register(text_encoders::ClipLoader);
    registry.register(text_encoders::DualClipLoader);
    registry.register(text_encoders::TripleClipLoader);
    registry.register(models::VaeLoader);
    registry.register(diffusers::DiffusersLoader);
    for loader in &pending::PENDING_LOADERS {
        registry.register(loader);
    }
    registry.register(lora::LoraLoader);
    registry.register(lora::LoraLoaderModelOnly);
}
