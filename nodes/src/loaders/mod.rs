//! The loaders category: model files into `MODEL`, `CLIP` and `VAE` values.
//!
//! - [`models`]: CheckpointLoaderSimple, UNETLoader, VAELoader, and the helpers every loader
//!   shares (finding a file, opening it, recognising its family, the model cache);
//! - [`text_encoders`]: CLIPLoader and DualCLIPLoader (CLIP and T5 files, safetensors or GGUF);
//! - [`t5_tokenizer_files`]: where a T5 encoder's `tokenizer.json` is found;
//! - [`lora`]: LoraLoader and LoraLoaderModelOnly;
//! - [`pending`]: loaders of model kinds Easel cannot run yet, declared for clients.

pub mod lora;
pub mod models;
pub mod pending;
pub mod t5_tokenizer_files;
pub mod text_encoders;

use easel_engine::NodeRegistry;

/// Adds the loader nodes to `registry`.
pub fn register(registry: &mut NodeRegistry) {
    registry.register(models::CheckpointLoaderSimple);
    registry.register(models::UnetLoader);
    registry.register(text_encoders::ClipLoader);
    registry.register(text_encoders::DualClipLoader);
    registry.register(models::VaeLoader);
    for loader in &pending::PENDING_LOADERS {
        registry.register(loader);
    }
    registry.register(lora::LoraLoader);
    registry.register(lora::LoraLoaderModelOnly);
}
